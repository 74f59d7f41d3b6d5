"""The DTMA stand-in answers like the real agent, over real loopback HTTP.

The call-by-call comparison with answers recorded from the real agent is in
``test_standin_vs_real.py``; this module tests the stand-in's own features and the quirks
in more variations than the recorded scenario covers.

No mocks: every test talks to a started StandInAgent with httpx, and heartbeats are
received by a small http.server in this file. Intervals are tens of milliseconds and
every wait polls against a deadline, so the module runs in a few seconds.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.dtma_standin import StandInAgent, StandInFleet
from devstack.dtma_standin.engine import human_duration

TOKEN = "standin-test-token-4f1c"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REPO_ROOT = Path(__file__).resolve().parents[1]


def wait_until(condition: Callable[[], Any], timeout: float = 3.0) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.01)
    raise AssertionError("condition not met in time")


def deploy_body(
    name: str = "mcp-github", image: str = "mcp/github:latest", **override: Any
) -> dict[str, Any]:
    return {
        "dockerImageUrl": image,
        "instanceNameOnToolbox": name,
        "accountToolInstanceId": f"ati-{name}",
        "baseConfigOverrideJson": override,
    }


def ports(host_port: str, container_port: str = "8080/tcp") -> dict[str, Any]:
    return {"PortBindings": {container_port: [{"HostPort": host_port}]}}


class HeartbeatReceiver:
    """A stand-in backend that records every heartbeat and answers a configurable status."""

    def __init__(self, status: int = 204) -> None:
        self.status = status
        self.posts: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.posts.append(
                    {"path": self.path, "headers": dict(self.headers), "body": json.loads(body)}
                )
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05})
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/functions/v1"

    def bodies(self, token: str = TOKEN) -> list[dict[str, Any]]:
        return [p["body"] for p in list(self.posts) if p["headers"]["Authorization"] == f"Bearer {token}"]

    def wait_for(self, count: int, token: str = TOKEN, timeout: float = 3.0) -> list[dict[str, Any]]:
        def enough() -> list[dict[str, Any]] | None:
            bodies = self.bodies(token)
            return bodies if len(bodies) >= count else None

        return wait_until(enough, timeout)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


@pytest.fixture
def agent() -> Iterator[StandInAgent]:
    with StandInAgent(TOKEN) as running:
        yield running


@pytest.fixture
def client(agent: StandInAgent) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=agent.url, headers=AUTH, timeout=5, trust_env=False) as http:
        yield http


@pytest.fixture
def receiver() -> Iterator[HeartbeatReceiver]:
    backend = HeartbeatReceiver()
    yield backend
    backend.close()


# -- plain routes and authentication ---------------------------------------------------------


def test_health_is_plain_text_ok_without_auth(agent: StandInAgent) -> None:
    response = httpx.get(f"{agent.url}/health", trust_env=False)
    assert (response.status_code, response.text) == (200, "OK")
    assert response.headers["content-type"] == "text/html; charset=utf-8"


@pytest.mark.parametrize(
    ("headers", "status", "error"),
    [
        ({}, 401, "Unauthorized: Missing or invalid token format"),
        ({"Authorization": f"Basic {TOKEN}"}, 401, "Unauthorized: Missing or invalid token format"),
        ({"Authorization": "Bearer wrong-token"}, 403, "Forbidden: Invalid token"),
    ],
)
def test_tools_routes_require_the_bearer_token(
    agent: StandInAgent, headers: dict[str, str], status: int, error: str
) -> None:
    with httpx.Client(base_url=agent.url, headers=headers, trust_env=False) as anonymous:
        for method, path in [("GET", "/tools/status"), ("POST", "/tools"), ("POST", "/tools/x/stop")]:
            response = anonymous.request(method, path, json={})
            assert (response.status_code, response.json()) == (status, {"error": error})
    assert agent.requests and not any(record.had_valid_auth for record in agent.requests)
    assert agent.containers()[0].name == "dtma_manager"  # nothing was deployed


def test_request_log_records_valid_auth_but_never_the_token(
    agent: StandInAgent, client: httpx.Client
) -> None:
    client.get("/tools/status")
    record = agent.requests[-1]
    assert (record.method, record.path, record.had_valid_auth, record.status) == (
        "GET",
        "/tools/status",
        True,
        200,
    )
    assert TOKEN not in repr(agent.requests) + repr(agent) + json.dumps(agent.state())


def test_status_is_unauthenticated_and_shaped_like_the_agent(agent: StandInAgent) -> None:
    body = httpx.get(f"{agent.url}/status", trust_env=False).json()
    assert body["status"] == "healthy" and body["service"] == "DTMA" and body["version"] == "0.1.0"
    assert body["environment"] == {  # the flags read env vars; the real token comes from /etc/dtma.conf
        "hasAuthToken": False,
        "hasApiKey": False,
        "hasApiBaseUrl": False,
        "port": str(agent.port),
    }
    assert [item["names"] for item in body["tool_instances"]] == [["dtma_manager"]]
    assert set(body["system_metrics"]) == {"cpu_load_percent", "memory", "disk"}


def test_status_flags_follow_the_process_environment() -> None:
    env = {"DTMA_BEARER_TOKEN": "x", "AGENTOPIA_API_BASE_URL": "http://backend", "BACKEND_TO_DTMA_API_KEY": ""}
    with StandInAgent(TOKEN, process_env=env) as agent:
        environment = httpx.get(f"{agent.url}/status", trust_env=False).json()["environment"]
    assert (environment["hasAuthToken"], environment["hasApiKey"], environment["hasApiBaseUrl"]) == (
        True,
        False,
        True,
    )


def test_unknown_routes_answer_express_404(client: httpx.Client) -> None:
    for method, path in [("GET", "/nope"), ("GET", "/tools/x"), ("PUT", "/tools/x/start"), ("GET", "/tools")]:
        response = client.request(method, path)
        assert (response.status_code, response.json()) == (404, {"error": "Not Found"})


# -- deploy ----------------------------------------------------------------------------------


def test_deploy_answers_201_with_docker_inspect_and_honours_env_and_ports(
    agent: StandInAgent, client: httpx.Client
) -> None:
    body = deploy_body(
        Env=["GITHUB_TOKEN=ghp_secret", "MODE=stdio"], HostConfig=ports("49152"), Labels={"x": "y"}
    )
    response = client.post("/tools", json=body)
    assert response.status_code == 201
    document = response.json()
    assert document["success"] is True and document["message"] == "Tool 'mcp-github' deployed successfully."
    data = document["data"]
    assert (
        data["instance_name_on_toolbox"] == "mcp-github"
        and data["account_tool_instance_id"] == "ati-mcp-github"
    )
    assert data["image"] == "mcp/github:latest" and len(data["container_id"]) == 64
    assert data["ports"] == {"8080/tcp": [{"HostIp": "0.0.0.0", "HostPort": "49152"}]}
    state = data["state"]
    assert set(state) == {
        "Status", "Running", "Paused", "Restarting", "OOMKilled", "Dead", "Pid", "ExitCode", "Error",
        "StartedAt", "FinishedAt",
    }  # fmt: skip
    assert (state["Status"], state["Running"], state["ExitCode"]) == ("running", True, 0)
    assert state["FinishedAt"] == "0001-01-01T00:00:00Z"
    deployed = next(c for c in agent.containers() if c.name == "mcp-github")
    assert deployed.env_dict() == {"GITHUB_TOKEN": "ghp_secret", "MODE": "stdio"}
    assert deployed.host_ports == (49152,) and deployed.managed
    assert "ghp_secret" not in repr(deployed) + json.dumps(agent.state())


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"dockerImageUrl": "mcp/x", "instanceNameOnToolbox": "x"},
        {"dockerImageUrl": "", "instanceNameOnToolbox": "x", "accountToolInstanceId": "a"},
        [1, 2],
    ],
)
def test_deploy_without_required_fields_is_400(client: httpx.Client, body: object) -> None:
    response = client.post("/tools", json=body)
    assert response.status_code == 400
    assert response.json() == {
        "success": False,
        "error": "Missing required fields: dockerImageUrl, instanceNameOnToolbox, accountToolInstanceId",
    }


def test_malformed_json_is_500_even_before_auth(agent: StandInAgent) -> None:
    for headers in (AUTH, {}):
        response = httpx.post(
            f"{agent.url}/tools",
            content=b'{"dockerImageUrl": ',
            headers={**headers, "Content-Type": "application/json"},
            trust_env=False,
        )
        assert (response.status_code, response.json()) == (500, {"error": "Internal Server Error"})


def test_name_and_port_conflicts_are_409(client: httpx.Client) -> None:
    assert client.post("/tools", json=deploy_body("one", HostConfig=ports("49152"))).status_code == 201
    again = client.post("/tools", json=deploy_body("one"))
    assert (again.status_code, again.json()) == (
        409,
        {"success": False, "error": "Instance with name 'one' already exists."},
    )
    clash = client.post("/tools", json=deploy_body("two", HostConfig=ports("49152", "9090/tcp")))
    assert clash.status_code == 409
    assert (
        clash.json()["error"]
        == "Port conflict: Requested HostPort 49152 is already in use by a managed instance."
    )


def test_exit_image_deploys_with_201_but_is_not_running(client: httpx.Client) -> None:
    response = client.post(
        "/tools", json=deploy_body("stdio-server", "standin/exit-3:latest", HostConfig=ports("49153"))
    )
    assert response.status_code == 201
    data = response.json()["data"]
    assert (data["state"]["Running"], data["state"]["Status"], data["state"]["ExitCode"]) == (
        False,
        "exited",
        3,
    )
    assert data["ports"] == {}
    listed = next(
        i
        for i in client.get("/tools/status").json()["tool_instances"]
        if i["instance_name_on_toolbox"] == "stdio-server"
    )
    assert (listed["status"], listed["ports"]) == ("exited", [])


def test_pull_denied_image_is_500_with_dockerode_text(client: httpx.Client) -> None:
    response = client.post("/tools", json=deploy_body("denied", "standin/pull-denied:1.0"))
    assert response.status_code == 500
    document = response.json()
    assert document["success"] is False and document["message"] == "Failed to deploy tool 'denied'."
    assert document["error"].startswith(
        "(HTTP code 404) unexpected - pull access denied for standin/pull-denied, "
        "repository does not exist or may require 'docker login'"
    )


def test_stream_error_image_pulls_then_fails_at_create_leaving_nothing(
    agent: StandInAgent, client: httpx.Client
) -> None:
    agent.set_pull_delay(0.15)
    started = time.monotonic()
    response = client.post("/tools", json=deploy_body("broken", "standin/stream-error", HostConfig=ports("49180")))
    assert time.monotonic() - started >= 0.15  # the stream ran for the whole pull before its error
    assert (response.status_code, response.json()) == (
        500,
        {
            "success": False,
            "message": "Failed to deploy tool 'broken'.",
            "error": "(HTTP code 404) no such container - No such image: standin/stream-error:latest ",
        },
    )
    assert "broken" not in [c.name for c in agent.containers()]
    assert client.post("/tools/broken/stop").status_code == 404  # never entered the managed map
    again = client.post("/tools", json=deploy_body("broken", "standin/stream-error:2.0"))
    assert again.json()["error"] == "(HTTP code 404) no such container - No such image: standin/stream-error:2.0 "


def test_images_can_be_made_to_fail_by_name() -> None:
    with (
        StandInAgent(
            TOKEN,
            pull_denied_images=["mcp/gone"],
            pull_stream_error_images=["mcp/flaky:1.0"],
            exit_images={"mcp/stdio": 2},
        ) as agent,
        httpx.Client(base_url=agent.url, headers=AUTH, trust_env=False) as http,
    ):
        denied = http.post("/tools", json=deploy_body("gone", "mcp/gone:3")).json()["error"]
        assert denied.startswith("(HTTP code 404) unexpected - pull access denied for mcp/gone, repository")
        flaky = http.post("/tools", json=deploy_body("flaky", "mcp/flaky:1.0")).json()["error"]
        assert flaky == "(HTTP code 404) no such container - No such image: mcp/flaky:1.0 "
        assert http.post("/tools", json=deploy_body("flaky-ok", "mcp/flaky:1.1")).status_code == 201  # other tag
        exited = http.post("/tools", json=deploy_body("stdio", "mcp/stdio")).json()["data"]["state"]
        assert (exited["Status"], exited["ExitCode"]) == ("exited", 2)
        assert http.post("/_standin/images", json={"image": "mcp/gone"}).json() == {"ok": True}  # rule dropped
        assert http.post("/tools", json=deploy_body("gone", "mcp/gone:3")).status_code == 201
        assert http.post("/_standin/images", json={"image": "mcp/x", "pull": "stream-error"}).status_code == 200
        assert http.get("/_standin/state").json()["image_rules"] == {
            "mcp/flaky:1.0": {"pull": "stream-error", "exit_code": None},
            "mcp/stdio": {"pull": "ok", "exit_code": 2},
            "mcp/x": {"pull": "stream-error", "exit_code": None},
        }
        assert http.post("/tools", json=deploy_body("xx", "mcp/x:9")).status_code == 500
        assert http.post("/_standin/images", json={"image": "mcp/x", "pull": "maybe"}).status_code == 400
        assert http.post("/_standin/images", json={"image": "", "pull": "ok"}).status_code == 400
        with pytest.raises(ValueError, match="exit_code"):
            agent.set_image_behaviour("mcp/y", exit_code=300)


def test_deploy_waits_for_the_pull(agent: StandInAgent, client: httpx.Client) -> None:
    agent.set_pull_delay(0.15)
    started = time.monotonic()
    assert client.post("/tools", json=deploy_body("slowish")).status_code == 201
    assert time.monotonic() - started >= 0.15
    agent.set_pull_delay(0)
    started = time.monotonic()
    assert client.post("/tools", json=deploy_body("slow-image", "standin/slow-0.2")).status_code == 201
    assert time.monotonic() - started >= 0.2


def test_env_of_the_wrong_type_is_rejected_like_docker(client: httpx.Client) -> None:
    response = client.post("/tools", json=deploy_body("bad-env", Env={"KEY": "value"}))
    assert response.status_code == 500
    assert response.json()["error"].startswith("(HTTP code 400) unexpected - json: cannot unmarshal object")


# -- start, stop, delete ----------------------------------------------------------------------


def test_stop_twice_is_200_then_500_304(client: httpx.Client) -> None:
    client.post("/tools", json=deploy_body("svc"))
    first = client.post("/tools/svc/stop")
    assert (first.status_code, first.json()) == (
        200,
        {"success": True, "message": "Tool instance 'svc' stopped successfully."},
    )
    second = client.post("/tools/svc/stop")
    assert second.status_code == 500
    assert second.json()["message"] == "Failed to stop tool instance 'svc'."
    assert second.json()["error"].startswith("(HTTP code 304) container already stopped")
    unknown = client.post("/tools/ghost/stop")
    assert unknown.status_code == 404
    assert unknown.json()["error"] == "Tool instance 'ghost' not found or not managed by this DTMA."


def test_start_twice_is_started_then_already_running(client: httpx.Client) -> None:
    client.post("/tools", json=deploy_body("svc"))
    client.post("/tools/svc/stop")
    assert client.post("/tools/svc/start").json()["message"] == "Tool instance 'svc' started successfully."
    again = client.post("/tools/svc/start")
    assert (again.status_code, again.json()["message"]) == (200, "Tool instance 'svc' is already running.")
    assert client.post("/tools/ghost/start").status_code == 404


def test_delete_twice_is_200_then_404(agent: StandInAgent, client: httpx.Client) -> None:
    client.post("/tools", json=deploy_body("svc"))
    first = client.delete("/tools/svc")
    assert (first.status_code, first.json()["message"]) == (200, "Tool instance 'svc' removed successfully.")
    second = client.delete("/tools/svc")
    assert second.status_code == 404
    assert second.json() == {
        "success": False,
        "error": "Tool instance 'svc' not found or not managed by this DTMA.",
    }
    assert "svc" not in [c.name for c in agent.containers()]


def test_container_removed_behind_the_agents_back_fails_with_docker_404(
    agent: StandInAgent, client: httpx.Client
) -> None:
    client.post("/tools", json=deploy_body("svc"))
    agent.remove_container_out_of_band("svc")
    response = client.delete("/tools/svc")
    assert response.status_code == 500
    assert response.json()["error"] == "(HTTP code 404) no such container - No such container: svc "


def test_tools_status_lists_every_container_with_raw_docker_ports() -> None:
    with (
        StandInAgent(TOKEN, unmanaged_containers=2) as busy,
        httpx.Client(base_url=busy.url, headers=AUTH, trust_env=False) as http,
    ):
        http.post("/tools", json=deploy_body("svc", HostConfig=ports("49160")))
        document = http.get("/tools/status").json()
    assert (document["version"], document["environment"]["port"]) == ("1.0.0", "30000")
    by_name = {item["instance_name_on_toolbox"]: item for item in document["tool_instances"]}
    assert set(by_name) == {"svc", "unmanaged-1", "unmanaged-2", "dtma_manager"}
    assert by_name["svc"]["account_tool_instance_id"] == "ati-svc"
    assert by_name["svc"]["ports"] == [
        {"IP": "0.0.0.0", "PrivatePort": 8080, "PublicPort": 49160, "Type": "tcp"}
    ]
    assert by_name["dtma_manager"]["account_tool_instance_id"] is None


# -- agent restart ---------------------------------------------------------------------------


def test_restart_agent_forgets_what_it_deployed(agent: StandInAgent, client: httpx.Client) -> None:
    client.post("/tools", json=deploy_body("svc", HostConfig=ports("49170")))
    agent.restart_agent()
    assert client.post("/tools/svc/stop").status_code == 404
    item = next(
        i
        for i in client.get("/tools/status").json()["tool_instances"]
        if i["instance_name_on_toolbox"] == "svc"
    )
    assert (item["account_tool_instance_id"], item["status"]) == (None, "running")
    redeploy = client.post("/tools", json=deploy_body("svc"))
    assert redeploy.status_code == 500
    assert redeploy.json()["error"].startswith(
        '(HTTP code 409) unexpected - Conflict. The container name "/svc"'
    )
    port_taken = client.post("/tools", json=deploy_body("other", HostConfig=ports("49170")))
    assert port_taken.status_code == 500
    assert "port is already allocated" in port_taken.json()["error"]
    assert next(c for c in agent.containers() if c.name == "other").state == "created"
    assert client.delete("/tools/other").status_code == 404


def test_unmanaged_container_holding_a_port_leaves_an_orphan_the_agent_disowns(
    agent: StandInAgent, client: httpx.Client
) -> None:
    snapshot = agent.add_unmanaged_container("legacy", host_port=49190)
    assert (snapshot.state, snapshot.host_ports, snapshot.managed, snapshot.image) == (
        "running",
        (49190,),
        False,
        "busybox:latest",
    )
    clash = client.post("/tools", json=deploy_body("mcp-new", HostConfig=ports("49190")))
    assert clash.status_code == 500  # the map-only pre-check passed; Docker's start refused the port
    document = clash.json()
    assert document["message"] == "Failed to deploy tool 'mcp-new'."
    assert re.fullmatch(
        r"\(HTTP code 500\) server error - driver failed programming external connectivity on endpoint "
        r"mcp-new \([0-9a-f]{64}\): Bind for 0\.0\.0\.0:49190 failed: port is already allocated ",
        document["error"],
    )
    orphan = next(c for c in agent.containers() if c.name == "mcp-new")
    assert (orphan.state, orphan.managed, orphan.host_ports) == ("created", False, ())
    missing = {"success": False, "error": "Tool instance 'mcp-new' not found or not managed by this DTMA."}
    for method, path in [("DELETE", "/tools/mcp-new"), ("POST", "/tools/mcp-new/start")]:
        response = client.request(method, path)
        assert (response.status_code, response.json()) == (404, missing)
    listed = {i["instance_name_on_toolbox"]: i for i in client.get("/tools/status").json()["tool_instances"]}
    assert (listed["mcp-new"]["status"], listed["mcp-new"]["account_tool_instance_id"]) == ("created", None)
    assert listed["legacy"]["ports"] == [{"IP": "0.0.0.0", "PrivatePort": 49190, "PublicPort": 49190, "Type": "tcp"}]
    blocked = client.post("/tools", json=deploy_body("mcp-new", HostConfig=ports("49191")))
    assert blocked.json()["error"].startswith('(HTTP code 409) unexpected - Conflict. The container name "/mcp-new"')


def test_deploy_named_like_an_unmanaged_container_is_dockers_409(agent: StandInAgent, client: httpx.Client) -> None:
    foreign = agent.add_unmanaged_container("old-job", "alpine:3.19", running=False, exit_code=1, age_seconds=3 * 3600)
    response = client.post("/tools", json=deploy_body("old-job"))
    assert (response.status_code, response.json()) == (
        500,
        {
            "success": False,
            "message": "Failed to deploy tool 'old-job'.",
            "error": '(HTTP code 409) unexpected - Conflict. The container name "/old-job" is already in use by '
            f'container "{foreign.id}". You have to remove (or rename) that container to be able to reuse '
            "that name. ",
        },
    )
    item = next(i for i in agent.heartbeat_payload()["tool_statuses"] if i["names"] == ["old-job"])
    assert (item["state"], item["status"], item["ports"]) == ("exited", "Exited (1) 3 hours ago", [])


def test_unmanaged_containers_through_the_control_surface(agent: StandInAgent) -> None:
    with httpx.Client(base_url=agent.url, trust_env=False) as http:
        created = http.post(
            "/_standin/containers",
            json={"name": "sidecar", "image": "nginx:1.27", "host_port": 49195, "container_port": 80},
        )
        assert created.status_code == 200
        container = created.json()["container"]
        assert (container["name"], container["state"], container["managed"]) == ("sidecar", "running", False)
        assert container["port_bindings"] == {"80/tcp": [{"HostPort": "49195"}]}
        stopped = http.post("/_standin/containers", json={"name": "batch", "running": False, "exit_code": 3})
        assert (stopped.json()["container"]["state"], stopped.json()["container"]["exit_code"]) == ("exited", 3)
        taken_port = http.post("/_standin/containers", json={"name": "other", "host_port": 49195})
        assert taken_port.status_code == 409 and "port is already allocated" in taken_port.json()["error"]
        assert "other" not in [c.name for c in agent.containers()]  # a refused start leaves nothing here
        taken_name = http.post("/_standin/containers", json={"name": "sidecar"})
        assert taken_name.status_code == 409 and "Conflict" in taken_name.json()["error"]
        bad_bodies = [{}, {"name": "x1", "host_port": "80"}, {"name": "x1", "running": 0}]
        bad_bodies += [{"name": "x1", "exit_code": 256}, {"name": "x1", "host_port": 70000}]
        for bad in bad_bodies:
            assert http.post("/_standin/containers", json=bad).status_code == 400, bad
        http.post("/_standin/docker", json={"down": True})
        assert http.post("/_standin/containers", json={"name": "late"}).status_code == 409


# -- fault injection -------------------------------------------------------------------------


def test_crash_container_shows_as_exited(agent: StandInAgent, client: httpx.Client) -> None:
    client.post("/tools", json=deploy_body("svc"))
    agent.crash_container("svc", exit_code=137)
    item = next(i for i in agent.heartbeat_payload()["tool_statuses"] if i["names"] == ["svc"])
    assert item["state"] == "exited" and item["status"].startswith("Exited (137) ")
    with pytest.raises(ValueError, match="not running"):
        agent.crash_container("svc")
    with pytest.raises(KeyError):
        agent.crash_container("ghost")


def test_docker_down(agent: StandInAgent, client: httpx.Client) -> None:
    client.post("/tools", json=deploy_body("svc"))
    agent.set_docker_down(True)
    status = client.get("/tools/status")
    assert status.status_code == 500
    assert status.json() == {
        "success": False,
        "message": "Failed to retrieve container status.",
        "error": "connect ENOENT /var/run/docker.sock",
    }
    assert (
        client.post("/tools", json=deploy_body("new")).json()["error"]
        == "connect ENOENT /var/run/docker.sock"
    )
    assert client.post("/tools/svc/stop").status_code == 500
    agent_status = client.get("/status").json()
    assert agent_status["status"] == "healthy"
    assert agent_status["tool_instances"] == [{"error": "Failed to fetch tool statuses"}]
    agent.set_docker_down(False)
    assert client.get("/tools/status").status_code == 200


def test_fail_next_injects_a_failure_for_n_calls(agent: StandInAgent, client: httpx.Client) -> None:
    agent.fail_next("deploy", 502, {"error": "Bad gateway"}, times=2)
    for _ in range(2):
        response = client.post("/tools", json=deploy_body("svc"))
        assert (response.status_code, response.json()) == (502, {"error": "Bad gateway"})
    assert client.post("/tools", json=deploy_body("svc")).status_code == 201
    agent.fail_next("health", 503)
    assert httpx.get(f"{agent.url}/health", trust_env=False).status_code == 503
    with httpx.Client(base_url=agent.url, trust_env=False) as anonymous:
        agent.fail_next("tools_status")
        assert anonymous.get("/tools/status").status_code == 401  # auth still comes first
    assert client.get("/tools/status").json() == {"error": "Internal Server Error"}


def test_refuse_connections_then_accept_on_the_same_port(agent: StandInAgent, client: httpx.Client) -> None:
    port = agent.port
    assert client.get("/health").status_code == 200  # leaves a keep-alive connection in the pool
    agent.refuse_connections()
    with pytest.raises(httpx.ConnectError):
        client.get("/health")
    agent.accept_connections()
    assert agent.port == port
    assert client.get("/health").status_code == 200


# -- heartbeats ------------------------------------------------------------------------------


def test_heartbeat_request_is_exactly_what_axios_sends(receiver: HeartbeatReceiver) -> None:
    with StandInAgent(
        TOKEN, heartbeat_url=receiver.base_url, heartbeat_interval=0.05, unmanaged_containers=1
    ) as agent:
        posts = wait_until(lambda: receiver.posts if len(receiver.posts) >= 2 else None)
        assert agent.last_heartbeat_status == 204
    post = posts[0]
    assert post["path"] == "/functions/v1/heartbeat"
    headers = {key.lower(): value for key, value in post["headers"].items()}
    assert headers["authorization"] == f"Bearer {TOKEN}"
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"] == "axios/1.10.0"
    assert headers["accept"] == "application/json, text/plain, */*"
    body = post["body"]
    assert list(body) == ["dtma_version", "system_status", "tool_statuses"]
    assert body["dtma_version"] == "0.1.0"
    assert set(body["system_status"]["memory"]) == {"total_bytes", "active_bytes", "free_bytes", "used_bytes"}
    assert body["system_status"]["disk"]["mount"] == "/"
    statuses = {item["names"][0]: item for item in body["tool_statuses"]}
    assert set(statuses) == {"dtma_manager", "unmanaged-1"}
    own = statuses["dtma_manager"]
    assert set(own) == {"id", "names", "image", "image_id", "command", "created", "state", "status", "ports"}
    assert own["image"] == "ghcr.io/maverick-software/dtma-agent:latest" and own["status"].startswith("Up ")
    assert own["ports"] == [
        {"ip": "0.0.0.0", "private_port": 30000, "public_port": agent.port, "type": "tcp"}
    ]


def test_boot_id_and_seq_increment_and_reset_on_restart(receiver: HeartbeatReceiver) -> None:
    with StandInAgent(
        TOKEN, heartbeat_url=receiver.base_url, heartbeat_interval=0.05, send_boot_id_seq=True
    ) as agent:
        first_boot = receiver.wait_for(3)
        agent.restart_agent()
        second_boot = wait_until(
            lambda: [b for b in receiver.bodies() if b["boot_id"] == agent.boot_id][:2] or None
        )
    assert [body["seq"] for body in first_boot[:3]] == [1, 2, 3]
    assert len({body["boot_id"] for body in first_boot[:3]}) == 1
    assert second_boot[0]["seq"] == 1 and second_boot[0]["boot_id"] != first_boot[0]["boot_id"]


def test_pause_stops_heartbeats_and_resume_restarts_them(receiver: HeartbeatReceiver) -> None:
    with StandInAgent(TOKEN, heartbeat_url=receiver.base_url, heartbeat_interval=0.03) as agent:
        receiver.wait_for(1)
        agent.pause_heartbeats()
        time.sleep(0.05)  # let a beat that was already in flight land
        count = len(receiver.posts)
        time.sleep(0.15)
        assert len(receiver.posts) == count
        assert agent.send_heartbeat_now() == 204  # explicit sends work while paused
        agent.resume_heartbeats()
        receiver.wait_for(count + 3)


def test_docker_down_heartbeat_and_backend_answers(receiver: HeartbeatReceiver) -> None:
    receiver.status = 401
    with StandInAgent(TOKEN, heartbeat_url=receiver.base_url, heartbeat_interval=60) as agent:
        receiver.wait_for(1)
        agent.set_docker_down()
        assert agent.send_heartbeat_now() == 401
        assert receiver.bodies()[-1]["tool_statuses"] == [{"error": "Failed to fetch tool statuses"}]
        assert agent.heartbeat_payload()["tool_statuses"] == [{"error": "Failed to fetch tool statuses"}]


def test_heartbeat_without_an_answer_is_status_0() -> None:
    with socket.socket() as probe:  # a port nobody listens on once the probe is closed
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    with StandInAgent(TOKEN, heartbeat_url=f"http://127.0.0.1:{closed_port}", heartbeat_interval=60) as agent:
        wait_until(lambda: agent.heartbeats_sent >= 1)
        assert agent.last_heartbeat_status == 0
        assert agent.send_heartbeat_now() == 0


def test_fleet_pushes_all_heartbeats_from_one_thread(receiver: HeartbeatReceiver) -> None:
    with StandInFleet(20, heartbeat_url=receiver.base_url, heartbeat_interval=0.1) as fleet:
        assert len({agent.port for agent in fleet}) == 20
        threads = [t for t in threading.enumerate() if t.name == "standin-heartbeats"]
        assert len(threads) == 1
        for agent in fleet:
            receiver.wait_for(2, token=agent.token)
        with httpx.Client(trust_env=False) as http:
            statuses = {
                http.get(
                    f"{agent.url}/tools/status", headers={"Authorization": f"Bearer {agent.token}"}
                ).status_code
                for agent in fleet
            }
        assert statuses == {200}
    assert not [t for t in threading.enumerate() if t.name == "standin-heartbeats"]


# -- control surface and lifecycle -------------------------------------------------------------


def test_control_surface_drives_the_agent(receiver: HeartbeatReceiver) -> None:
    with (
        StandInAgent(TOKEN, heartbeat_url=receiver.base_url, heartbeat_interval=60) as agent,
        httpx.Client(base_url=agent.url, trust_env=False) as http,
    ):
        http.post("/tools", json=deploy_body("svc"), headers=AUTH)
        assert http.post("/_standin/heartbeats/pause").json() == {"ok": True}
        assert http.get("/_standin/state").json()["heartbeats"]["paused"] is True
        assert http.post("/_standin/heartbeats/send").json() == {"ok": True, "status": 204}
        assert http.post("/_standin/containers/svc/crash", json={"exit_code": 2}).status_code == 200
        assert http.post("/_standin/pull_delay", json={"seconds": 0.01}).status_code == 200
        assert http.post("/_standin/docker", json={"down": True}).status_code == 200
        state = http.get("/_standin/state").json()
        assert (state["docker_down"], state["pull_delay"]) == (True, 0.01)
        assert next(c for c in state["containers"] if c["name"] == "svc")["exit_code"] == 2
        http.post("/_standin/docker", json={"down": False})
        assert http.post("/_standin/fail", json={"route": "stop", "status": 503}).status_code == 200
        assert http.post("/tools/svc/stop", headers=AUTH).status_code == 503
        assert http.post("/_standin/restart").status_code == 200
        assert http.post("/tools/svc/start", headers=AUTH).status_code == 404
        assert http.post("/_standin/containers/svc/remove").status_code == 200
        assert http.post("/_standin/containers/svc/remove").status_code == 404
        assert http.post("/_standin/docker", json={"down": "yes"}).status_code == 400
        assert http.post("/_standin/fail", json={"route": "nope"}).status_code == 400
        assert http.get("/_standin/unknown").status_code == 404


def test_heartbeat_send_without_url_is_409_on_the_control_surface(agent: StandInAgent) -> None:
    response = httpx.post(f"{agent.url}/_standin/heartbeats/send", trust_env=False)
    assert response.status_code == 409


def test_stop_is_idempotent_and_closes_the_port() -> None:
    agent = StandInAgent(TOKEN).start()
    url = agent.url
    agent.stop()
    agent.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", trust_env=False)
    with pytest.raises(RuntimeError):
        agent.start()


def test_human_duration_matches_docker() -> None:
    cases = {
        0.4: "Less than a second",
        1: "1 second",
        59: "59 seconds",
        61: "About a minute",
        300: "5 minutes",
    }
    cases |= {3600: "About an hour", 7200: "2 hours", 3 * 86400: "3 days"}
    assert {seconds: human_duration(seconds) for seconds in cases} == cases


def test_cli_serves_until_sigterm(tmp_path: Path) -> None:
    env = {**os.environ, "DTMA_AUTH_TOKEN": TOKEN, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "devstack.dtma_standin", "--port", "0", "--verbose", "--exit-image", "mcp/stdio=3"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 10)
        assert ready, "the CLI printed nothing"
        line = process.stdout.readline()
        assert line.startswith("DTMA stand-in listening on http://127.0.0.1:")
        url = line.split()[-1]
        assert httpx.get(f"{url}/health", trust_env=False).text == "OK"
        assert httpx.get(f"{url}/tools/status", headers=AUTH, trust_env=False).status_code == 200
        deployed = httpx.post(f"{url}/tools", headers=AUTH, json=deploy_body("stdio", "mcp/stdio:1"), trust_env=False)
        assert deployed.json()["data"]["state"]["ExitCode"] == 3
        process.send_signal(signal.SIGTERM)
        _, log = process.communicate(timeout=5)
        assert process.returncode == 0
        assert "GET /tools/status" in log and TOKEN not in log  # verbose logging never shows the token
    finally:
        process.kill()
        process.wait()


def test_cli_refuses_to_start_without_a_token() -> None:
    env = {key: value for key, value in os.environ.items() if key != "DTMA_AUTH_TOKEN"}
    env["PYTHONPATH"] = str(REPO_ROOT)
    result = subprocess.run(
        [sys.executable, "-m", "devstack.dtma_standin", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert result.returncode == 2
    assert "DTMA_AUTH_TOKEN" in result.stderr
