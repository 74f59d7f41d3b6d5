"""Every container fate reaches the user correctly: the scenarios of docs/real-agent.md, each
driven through the functions exactly as the web app does, against a DTMA stand-in that answers
like the real agent (tests/test_standin_vs_real.py holds it to the agent's recorded answers).

Each test is named after its row in docs/real-agent.md (D1-D10, F4, F8)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from flask.testing import FlaskClient

from tests.factories import Factory
from tests.helpers import auth, last_command, settle, spec

DEPLOY, MANAGE, STATUS, HEARTBEAT = "deploy_mcp_server", "manage_mcp_server", "mcp_status", "dtma_heartbeat_ingest"


class Web:
    """The web app's calls, plus the toolbox's heartbeat, for one user and one stand-in."""

    def __init__(self, function_client: Callable[..., FlaskClient], box: Any, agent: Any) -> None:
        self.box, self.agent = box, agent
        self.deploy_fn = function_client(DEPLOY, DTMA_DEPLOY_BUDGET_SECONDS="0.5")
        self.manage_fn = function_client(MANAGE, DTMA_DEPLOY_BUDGET_SECONDS="0.5")
        self.status_fn = function_client(STATUS)
        self.heartbeat_fn = function_client(HEARTBEAT)

    def deploy(self, **overrides: Any) -> Any:
        return self.deploy_fn.post("/", json=spec(self.box, **overrides), headers=auth(self.box.user_id))

    def act(self, server: str, action: str) -> Any:
        if action == "remove":
            return self.manage_fn.delete(f"/{server}", headers=auth(self.box.user_id))
        return self.manage_fn.post(f"/{server}/{action}", headers=auth(self.box.user_id))

    def server(self, server: str, refresh: bool = False) -> dict[str, Any]:
        response = self.status_fn.get(f"/{server}", query_string={"refresh": str(refresh).lower()},
                                      headers=auth(self.box.user_id))
        assert response.status_code == 200, response.json
        return response.json["server"]

    def heartbeat(self) -> None:
        response = self.heartbeat_fn.post("/heartbeat", json=self.agent.heartbeat_payload(),
                                          headers={"Authorization": f"Bearer {self.box.token}"})
        assert response.status_code == 204, response.data

    def requests_to(self, suffix: str) -> int:
        return sum(1 for r in self.agent.requests if r.path.endswith(suffix))


@pytest.fixture
def web(function_client: Any, toolbox_agent: Any) -> Web:
    box, agent = toolbox_agent()
    return Web(function_client, box, agent)


@pytest.fixture
def running(web: Web) -> str:
    response = web.deploy()
    assert response.status_code == 202, response.json
    settle()
    assert web.server(response.json["id"])["status"] == "running"
    return response.json["id"]


def wait_for(predicate: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


# --- D1: the local stack's staleness window fits a 60 s agent: tests/test_local_stack.py -------------

# --- D2: a slow pull that then fails -----------------------------------------------------------------

def test_d2_a_slow_pull_that_fails_is_an_error_with_the_agents_reason_when_it_answers(web: Web,
                                                                                     factory: Factory) -> None:
    web.agent.set_pull_delay(1.0)
    response = web.deploy(image="standin/stream-error:latest")
    assert response.status_code == 202 and response.json["status"] == "deploying"  # answered at once
    server = response.json["id"]
    wait_for(lambda: factory.status_of(server) == "error")  # no heartbeat, no sweep deadline
    seen = web.server(server)
    assert seen["error"].startswith("the toolbox could not pull the image for mcp-github: the pull failed on the "
                                    "toolbox (the agent reports: (HTTP code 404) no such container - No such image: "
                                    "standin/stream-error:latest")
    assert factory.events(server)[-1][:3] == ("deploying", "error", "api")


def test_d2_a_pull_the_registry_refuses_is_an_error_at_once(web: Web) -> None:
    response = web.deploy(image="standin/pull-denied:latest")
    assert response.status_code == 202
    settle()
    seen = web.server(response.json["id"])
    assert seen["status"] == "error" and "pull access denied" in seen["error"]


# --- D3: a container that exits or is killed after it ran ----------------------------------------

@pytest.mark.parametrize("code", [1, 137, 0])
def test_d3_a_container_that_exits_on_its_own_is_an_error_with_its_code(web: Web, running: str, code: int) -> None:
    web.agent.crash_container("mcp-github", exit_code=code)
    # The agent's status read carries no exit code: error all the same, never a clean stop.
    read = web.server(running, refresh=True)
    assert (read["status"], read["effective_status"], read["health"]) == ("error", "error", "unhealthy")
    assert read["error"].startswith("container mcp-github exited unexpectedly (the agent's status read does not "
                                    "carry the exit code")
    # The next heartbeat has Docker's status text, and with it the code.
    web.heartbeat()
    beat = web.server(running)
    assert beat["status"] == "error"
    assert beat["error"].startswith(f"container mcp-github exited unexpectedly with code {code}.")


def test_d3_a_stop_the_user_asked_for_is_a_stop_whatever_the_exit_code(web: Web, running: str,
                                                                        factory: Factory) -> None:
    assert web.act(running, "stop").json["status"] == "stopped"
    web.heartbeat()  # Docker reports "Exited (0)" here; SIGTERM/SIGKILL codes on a real droplet
    assert factory.status_of(running) == "stopped"
    assert web.server(running)["error"] is None


# --- D4: a start is confirmed by looking -------------------------------------------------------

def test_d4_a_start_that_exits_at_once_is_an_error_not_running(web: Web, factory: Factory) -> None:
    deployed = web.deploy(image="standin/exit-1:latest")
    settle()
    server = deployed.json["id"]
    assert last_command(factory.conn, server)["outcome"]["code"] == "container_exited"
    started = web.act(server, "start")  # the agent answers 200 "started successfully"
    assert started.status_code == 502, started.json
    assert started.json["error"]["code"] == "container_exited"
    assert "exited right after it was started" in started.json["error"]["message"]
    assert factory.status_of(server) == "error"
    assert web.requests_to("/tools/status") >= 1  # it looked before answering


def test_d4_a_start_that_runs_is_running(web: Web, running: str) -> None:
    assert web.act(running, "stop").status_code == 200
    started = web.act(running, "start")
    assert started.status_code == 200 and started.json["status"] == "running"
    assert started.json["progress"][-1]["message"] == "container mcp-github started and runs"


# --- D5: host ports held by containers this service does not manage ----------------------------

def test_d5_ports_the_toolbox_reports_in_use_are_allocated_around(web: Web) -> None:
    web.agent.add_unmanaged_container("other-app", "nginx:latest", host_port=49152)
    web.heartbeat()  # lists other-app publishing 49152
    picked = web.deploy()
    assert picked.status_code == 202, picked.json
    assert picked.json["host_port"] != 49152
    named = web.deploy(name="second", host_port=49152)
    assert named.status_code == 409
    assert "already used on toolbox" in named.json["error"]["message"] and "other-app" in named.json["error"]["message"]


def test_d5_a_port_taken_before_any_heartbeat_says_so_and_the_leftover_can_be_removed(web: Web,
                                                                                      factory: Factory) -> None:
    web.agent.add_unmanaged_container("other-app", "nginx:latest", host_port=49152)
    failed = web.deploy(host_port=49152)  # the agent's own check sees only its map; Docker refuses
    settle()
    server = failed.json["id"]
    assert last_command(factory.conn, server)["outcome"]["code"] == "host_port_taken"
    message = web.server(server)["error"]
    assert message.startswith("host port 49152 is already taken on the toolbox") and "restart" not in message
    assert "docker rm -f mcp-github" in message
    removed = web.act(server, "remove")  # the agent answers 404 for the `created` leftover
    assert removed.status_code == 200, removed.json
    assert "docker rm -f mcp-github" in removed.json["left_on_toolbox"]
    assert factory.status_of(server) is None


# --- D6: the agent restarted and forgot what it deployed ---------------------------------------

def test_d6_an_agent_that_forgot_the_container_is_a_state_the_user_keeps_seeing(web: Web, running: str,
                                                                               factory: Factory) -> None:
    web.agent.restart_agent()
    stop = web.act(running, "stop")
    assert stop.status_code == 409 and stop.json["error"]["code"] == "agent_lost_container"
    assert factory.status_of(running) == "running"  # the container runs: nothing changed
    web.heartbeat()  # lists the container running, by name only
    seen = web.server(running)
    assert seen["status"] == "running" and seen["managed_by_agent"] is False
    assert seen["health"] == "degraded"
    assert "no longer manages container mcp-github" in seen["error"] and "docker rm -f mcp-github" in seen["error"]
    # From now on start/stop are refused without bothering the agent.
    stops = web.requests_to("/stop")
    again = web.act(running, "restart")
    assert again.status_code == 409 and "no longer manages mcp-github" in again.json["error"]["message"]
    assert web.requests_to("/stop") == stops
    # Removal always works, and says what is left on the droplet.
    removed = web.act(running, "remove")
    assert removed.status_code == 200 and removed.json["status"] == "removed"
    assert "docker rm -f mcp-github" in removed.json["left_on_toolbox"]
    assert factory.status_of(running) is None
    assert any(c.name == "mcp-github" for c in web.agent.containers())  # truly left there


def test_d6_a_refresh_finds_out_without_any_action(web: Web, running: str) -> None:
    web.agent.restart_agent()
    seen = web.server(running, refresh=True)  # /tools/status: account_tool_instance_id null
    assert seen["managed_by_agent"] is False and "no longer manages" in seen["error"]


# --- D7: Docker down on the toolbox --------------------------------------------------------------

def test_d7_docker_down_shows_on_every_server_and_refuses_commands(web: Web, running: str) -> None:
    web.agent.set_docker_down()
    web.heartbeat()  # tool_statuses: [{"error": "Failed to fetch tool statuses"}]
    seen = web.server(running)
    assert (seen["effective_status"], seen["health"]) == ("unknown", "unhealthy")
    assert seen["toolbox"]["docker_healthy"] is False
    assert seen["error"].startswith("Docker is not answering on toolbox")
    refused = web.deploy(name="another")
    assert refused.status_code == 409 and "Docker is not answering" in refused.json["error"]["message"]
    web.agent.set_docker_down(False)
    web.heartbeat()
    assert web.server(running)["health"] == "healthy"


# --- D8: an action that never reached the agent ---------------------------------------------------

@pytest.mark.parametrize(("action", "before"), [("stop", "running"), ("restart", "running"), ("remove", "running")])
def test_d8_an_action_that_never_reached_the_agent_changes_nothing(web: Web, running: str, factory: Factory,
                                                                    action: str, before: str) -> None:
    web.agent.refuse_connections()
    response = web.act(running, action)
    assert response.status_code == 502 and response.json["error"]["code"] == "toolbox_unreachable"
    assert "never reached the toolbox" in response.json["error"]["message"]
    assert factory.status_of(running) == before
    assert "never reached the toolbox" in factory.events(running)[-1][3]


def test_d8_a_record_on_a_droplet_that_is_gone_can_still_be_removed(web: Web, running: str,
                                                                    factory: Factory) -> None:
    web.agent.refuse_connections()
    forced = web.manage_fn.delete(f"/{running}?force=true", headers=auth(web.box.user_id))
    assert forced.status_code == 200 and "docker rm -f mcp-github" in forced.json["left_on_toolbox"]
    assert factory.status_of(running) is None


# --- D9: legacy statuses -------------------------------------------------------------------------

def test_d9_legacy_instances_are_reconciled_like_the_others(web: Web, factory: Factory,
                                                            pg: psycopg.Connection) -> None:
    legacy = factory.instance(web.box, status="active", name="legacy-tool", mcp=False)
    web.agent.add_unmanaged_container("legacy-tool", "agentopia/tool:1", running=False, exit_code=2)
    web.heartbeat()
    assert factory.status_of(legacy) == "error"
    history = factory.events(legacy)
    assert history[0][:2] == ("active", "running") and "legacy status active is read as running" in history[0][3]
    assert history[-1][:2] == ("running", "error") and "code 2" in history[-1][3]


# --- D10: the agent answers but its heartbeats do not arrive ------------------------------------

def test_d10_an_agent_that_answers_without_heartbeats_is_its_own_condition(web: Web, running: str,
                                                                           pg: psycopg.Connection) -> None:
    pg.execute("update account_tool_environments set last_heartbeat_at = now() - interval '1 hour', "
               "status = 'unresponsive' where id = %s", (web.box.id,))
    before = web.server(running)
    assert before["effective_status"] == "unknown"
    after = web.server(running, refresh=True)
    assert after["effective_status"] == "running"  # the read just told us
    assert after["health"] == "degraded"
    assert "answers the backend" in after["error"] and "AGENTOPIA_API_BASE_URL" in after["error"]
    assert "DTMA_AUTH_TOKEN" in after["error"] and "check that its DTMA agent is running" not in after["error"]


# --- F4: names and containers this service did not create -------------------------------------

def test_f4_a_name_held_by_a_container_we_did_not_create_is_refused(web: Web, factory: Factory) -> None:
    web.heartbeat()  # lists the agent's own container, dtma_manager
    refused = web.deploy(name="dtma_manager")
    assert refused.status_code == 409
    assert refused.json["error"]["message"].startswith("a container named dtma_manager already runs on toolbox")
    assert web.requests_to("/tools") == 0


def test_f4_reconciliation_never_adopts_a_container_it_did_not_create(web: Web, factory: Factory) -> None:
    # A record named like the agent's own container (e.g. from before this rule): the heartbeat
    # must not report it running with the agent's image.
    inst = factory.instance(web.box, status="error", name="dtma_manager", instance_error_message="refused")
    # On a droplet the agent's container is hours older than any record; here both are seconds old,
    # so the record is dated past the five minutes of clock slack the rule allows.
    factory.conn.execute("update account_tool_instances set created_at = now() + interval '10 minutes' "
                         "where id = %s", (inst,))
    web.heartbeat()
    assert factory.status_of(inst) == "error"
    assert factory.conn.execute("select container_id from account_tool_instances where id = %s",
                                (inst,)).fetchone()[0] is None


# --- last_heartbeat_from_dtma means what it says -------------------------------------------------

def test_last_heartbeat_from_dtma_is_the_last_heartbeat_that_changed_the_instance(web: Web, running: str,
                                                                                  pg: psycopg.Connection) -> None:
    """A steady beat (the same report again) records the toolbox's liveness and writes no instance row
    (sql/migrations/0012_heartbeat_digest.sql); the server stays covered by the toolbox's beats."""
    def stamps() -> tuple[Any, Any]:
        return pg.execute("select i.last_heartbeat_from_dtma, e.last_heartbeat_at from account_tool_instances i "
                          "join account_tool_environments e on e.id = i.account_tool_environment_id "
                          "where i.id = %s", (running,)).fetchone()

    web.heartbeat()
    web.heartbeat()  # settles whatever the first beat after the deploy changed
    instance_first, box_first = stamps()
    time.sleep(0.05)
    web.heartbeat()  # nothing changed on the toolbox
    instance_now, box_now = stamps()
    assert instance_now == instance_first and box_now > box_first
    assert web.server(running)["last_report_at"] is not None


@pytest.mark.parametrize(("method", "path", "body"), [
    ("post", "/{id}/stop?force=true", None), ("delete", "/{id}?force=maybe", None),
    ("delete", "/{id}?force=true&force=false", None), ("post", "/", {"action": "stop", "force": True}),
    ("post", "/", {"action": "remove", "force": "yes"}),
])
def test_force_is_refused_where_it_means_nothing_and_changes_nothing(web: Web, running: str, factory: Factory,
                                                                     method: str, path: str, body: Any) -> None:
    before = factory.events(running)
    json_body = {"instance_id": running, **body} if body else None
    response = getattr(web.manage_fn, method)(path.format(id=running), json=json_body,
                                              headers=auth(web.box.user_id))
    assert response.status_code == 400 and "force" in response.json["error"]["message"]
    assert factory.status_of(running) == "running" and factory.events(running) == before
