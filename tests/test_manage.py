"""manage_mcp_server: start, stop, restart, remove, through the real database and a DTMA
stand-in that reproduces the real agent's quirks (docs/real-agent.md)."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from flask.testing import FlaskClient

from tests.factories import Factory
from tests.helpers import auth, settle, spec

FN = "manage_mcp_server"


@pytest.fixture
def deployed(function_client: Any, toolbox_agent: Any) -> tuple[Any, Any, str]:
    """A running MCP server deployed through deploy_mcp_server onto a stand-in."""
    box, agent = toolbox_agent()
    response = function_client("deploy_mcp_server").post("/", json=spec(box), headers=auth(box.user_id))
    assert response.status_code == 202, response.json
    settle()
    return box, agent, response.json["id"]


@pytest.fixture
def client(function_client: Any, deployed: Any) -> FlaskClient:
    return function_client(FN)


def container_state(agent: Any, name: str = "mcp-github") -> str | None:
    return next((c.state for c in agent.containers() if c.name == name), None)


def test_stop_start_restart_remove(client: FlaskClient, deployed: Any, factory: Factory,
                                   pg: psycopg.Connection) -> None:
    box, agent, server = deployed
    stop = client.post(f"/{server}/stop", headers=auth(box.user_id))
    assert stop.status_code == 200 and stop.json["status"] == "stopped"
    assert container_state(agent) == "exited"
    start = client.post(f"/manage_mcp_server/{server}/start", headers=auth(box.user_id))
    assert start.status_code == 200 and start.json["status"] == "running"
    assert container_state(agent) == "running"
    restart = client.post(f"/functions/v1/manage_mcp_server/{server}/restart", headers=auth(box.user_id))
    assert restart.status_code == 200 and restart.json["status"] == "running"
    assert [e[1] for e in factory.events(server)][-3:] == ["stopping", "starting", "running"]
    removed = client.delete(f"/{server}", headers=auth(box.user_id))
    assert removed.status_code == 200 and removed.json["status"] == "removed"
    assert container_state(agent) is None
    assert factory.status_of(server) is None
    history = factory.events(server)
    assert history[-1][:2] == ("deleting", None) and len(history) > 5


def test_body_form_for_clients_that_cannot_choose_the_path(client: FlaskClient, deployed: Any) -> None:
    box, _, server = deployed
    response = client.post("/", json={"instance_id": server, "action": "stop"}, headers=auth(box.user_id))
    assert response.status_code == 200 and response.json["status"] == "stopped"


def test_actions_the_state_machine_forbids_are_409_naming_the_status(client: FlaskClient, deployed: Any) -> None:
    box, agent, server = deployed
    response = client.post(f"/{server}/start", headers=auth(box.user_id))
    assert response.status_code == 409
    assert response.json["error"]["message"] == "cannot start mcp-github while it is running"
    assert sum(1 for r in agent.requests if r.path.endswith("/start")) == 0


def test_stopping_an_already_stopped_container_is_success(client: FlaskClient, deployed: Any,
                                                          factory: Factory) -> None:
    box, agent, server = deployed
    agent.crash_container("mcp-github", exit_code=0)  # stopped on the toolbox, not yet reported
    response = client.post(f"/{server}/stop", headers=auth(box.user_id))
    assert response.status_code == 200 and response.json["status"] == "stopped"


def test_agent_restart_is_reported_as_such(client: FlaskClient, deployed: Any, factory: Factory) -> None:
    box, agent, server = deployed
    agent.restart_agent()  # forgets what it deployed; the container keeps running
    response = client.post(f"/{server}/stop", headers=auth(box.user_id))
    assert response.status_code == 409
    assert response.json["error"]["code"] == "agent_lost_container"
    assert "the toolbox agent no longer manages mcp-github" in response.json["error"]["message"]
    assert container_state(agent) == "running"
    assert factory.status_of(server) == "running"  # the stop changed nothing on the toolbox


def test_removing_a_container_that_is_already_gone_completes(client: FlaskClient, deployed: Any,
                                                             factory: Factory) -> None:
    box, agent, server = deployed
    agent.restart_agent()
    agent.remove_container_out_of_band("mcp-github")
    response = client.delete(f"/{server}", headers=auth(box.user_id))
    assert response.status_code == 200 and factory.status_of(server) is None


def test_starting_a_container_that_is_gone_says_so(client: FlaskClient, deployed: Any, factory: Factory) -> None:
    box, agent, server = deployed
    client.post(f"/{server}/stop", headers=auth(box.user_id))
    agent.restart_agent()
    agent.remove_container_out_of_band("mcp-github")
    response = client.post(f"/{server}/start", headers=auth(box.user_id))
    assert response.status_code == 409 and response.json["error"]["code"] == "container_gone"
    assert factory.status_of(server) == "error"


def test_dtma_down_during_stop_leaves_the_server_as_it_was(client: FlaskClient, deployed: Any,
                                                           factory: Factory) -> None:
    box, agent, server = deployed
    agent.refuse_connections()
    response = client.post(f"/{server}/stop", headers=auth(box.user_id))
    assert response.status_code == 502 and response.json["error"]["code"] == "toolbox_unreachable"
    assert "never reached the toolbox" in response.json["error"]["message"]
    assert response.json["error"]["details"]["server"]["status"] == "running"
    assert factory.status_of(server) == "running"
    assert factory.events(server)[-1][:3] == ("stopping", "running", "api")
    assert "never reached the toolbox" in factory.events(server)[-1][3]


def test_dtma_500_on_remove_leaves_the_server_as_it_was(client: FlaskClient, deployed: Any,
                                                        factory: Factory) -> None:
    box, agent, server = deployed
    agent.fail_next("delete", 500, {"success": False, "message": "Failed", "error": "device busy"})
    response = client.delete(f"/{server}", headers=auth(box.user_id))
    # The server has a secret env value, so the agent's own words are classified, not shown
    # (test_hardening.py shows them for a server without one).
    assert response.status_code == 502 and response.json["error"]["code"] == "toolbox_failed"
    assert "not shown: this server has secret environment values" in response.json["error"]["message"]
    assert factory.status_of(server) == "running" and container_state(agent) == "running"


def test_other_users_cannot_act(client: FlaskClient, deployed: Any, factory: Factory) -> None:
    _, agent, server = deployed
    stranger = factory.user()
    for method, path in [("post", f"/{server}/stop"), ("delete", f"/{server}"),
                         ("post", "/00000000-0000-4000-8000-00000000000a/stop")]:
        response = getattr(client, method)(path, headers=auth(stranger))
        assert response.status_code == 404 and response.json["error"]["message"] == "MCP server not found"
    assert factory.status_of(server) == "running"
    assert container_state(agent) == "running"


def test_idempotent_stop(client: FlaskClient, deployed: Any) -> None:
    box, agent, server = deployed
    headers = {**auth(box.user_id), "Idempotency-Key": "stop-1"}
    first = client.post(f"/{server}/stop", headers=headers)
    second = client.post(f"/{server}/stop", headers=headers)
    assert first.status_code == second.status_code == 200
    assert second.headers["Idempotent-Replayed"] == "true" and first.json == second.json
    assert sum(1 for r in agent.requests if r.path.endswith("/stop")) == 1


@pytest.mark.parametrize(("method", "path", "status"), [
    ("get", "/{id}/stop", 405), ("post", "/{id}/explode", 404), ("post", "/not-a-uuid/stop", 400),
    ("put", "/{id}", 405),
])
def test_bad_routes(client: FlaskClient, deployed: Any, method: str, path: str, status: int) -> None:
    box, _, server = deployed
    response = getattr(client, method)(path.format(id=server), headers=auth(box.user_id))
    assert response.status_code == status and "error" in response.json


def test_bad_body_form(client: FlaskClient, deployed: Any) -> None:
    box, _, server = deployed
    response = client.post("/", json={"instance_id": server, "action": "explode"}, headers=auth(box.user_id))
    assert response.status_code == 400 and "action" in response.json["error"]["message"]
