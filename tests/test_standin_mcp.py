"""The DTMA stand-in's running containers answer MCP on their host ports, as real MCP servers would.

Containers are deployed, stopped, started and removed through the agent's own API (``/tools``), and
an MCP client (the ``mcp`` SDK's streamable HTTP or SSE client and ``ClientSession``) talks to
``http://127.0.0.1:<host port>/mcp``, exactly as the control plane's probe does. The knobs (images that
do not speak MCP, servers that stop answering) are driven through the ``/_standin/`` control surface
and the Python methods. No mocks; every port is a real loopback socket.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from mcp import ClientSession
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client

from devstack.dtma_standin import StandInAgent, StandInFleet
from devstack.dtma_standin.cli import _parser
from devstack.dtma_standin.mcp_servers import default_mode

TOKEN = "standin-mcp-test-token-91b3"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROBE_TIMEOUT = 5.0


# -- helpers ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def refused(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on host:port (the connection is refused)."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True


def deploy_body(name: str, image: str, host_port: int, *, host_ip: str | None = None, env: list[str] | None = None,
                container_port: int = 3001) -> dict[str, Any]:
    binding = {"HostPort": str(host_port)} | ({"HostIp": host_ip} if host_ip is not None else {})
    return {
        "dockerImageUrl": image,
        "instanceNameOnToolbox": name,
        "accountToolInstanceId": f"ati-{name}",
        "baseConfigOverrideJson": {
            "Env": env or [],
            "HostConfig": {"PortBindings": {f"{container_port}/tcp": [binding]}},
        },
    }


async def _handshake(session: ClientSession) -> dict[str, Any]:
    init = await session.initialize()
    tools = await session.list_tools()
    echo = next(tool.name for tool in tools.tools if tool.name.endswith("_echo"))
    add = next(tool.name for tool in tools.tools if tool.name.endswith("_add"))
    echoed = await session.call_tool(echo, {"text": "hello"})
    added = await session.call_tool(add, {"a": 2, "b": 40})
    return {
        "name": init.serverInfo.name,
        "version": init.serverInfo.version,
        "protocol_version": init.protocolVersion,
        "tools": {tool.name: tool for tool in tools.tools},
        "echo": echoed.content[0].text,  # type: ignore[union-attr]
        "sum": added.structuredContent,
    }


async def _streamable(url: str) -> dict[str, Any]:
    async with (
        httpx.AsyncClient(trust_env=False, timeout=httpx.Timeout(PROBE_TIMEOUT)) as http,
        streamable_http_client(url, http_client=http) as (read, write, _),
        ClientSession(read, write) as session,
    ):
        return await _handshake(session)


async def _sse(url: str) -> dict[str, Any]:
    def factory(**kwargs: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(trust_env=False, **kwargs)

    async with (
        sse_client(url, timeout=PROBE_TIMEOUT, httpx_client_factory=factory) as (read, write),
        ClientSession(read, write) as session,
    ):
        return await _handshake(session)


def mcp_probe(url: str, *, sse: bool = False) -> dict[str, Any]:
    """initialize + tools/list + two tools/call, as a client would; raises if the server does not answer."""
    return asyncio.run(asyncio.wait_for(_sse(url) if sse else _streamable(url), PROBE_TIMEOUT * 2))


def answers_mcp(url: str) -> bool:
    try:
        mcp_probe(url)
    except Exception:  # any failure of the client: refused, 404, timeout, bad answer
        return False
    return True


def mcp_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("standin-mcp-")]


@pytest.fixture
def agent() -> Iterator[StandInAgent]:
    with StandInAgent(TOKEN) as running:
        yield running


@pytest.fixture
def client(agent: StandInAgent) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=agent.url, headers=AUTH, timeout=10, trust_env=False) as http:
        yield http


# -- a deployed container answers MCP ----------------------------------------------------------------


def test_deployed_container_answers_initialize_and_tools_list(agent: StandInAgent, client: httpx.Client) -> None:
    port = free_port()
    assert client.post("/tools", json=deploy_body("weather", "mcp/weather:1.4.2", port)).status_code == 201
    seen = mcp_probe(f"http://127.0.0.1:{port}/mcp")
    assert (seen["name"], seen["version"]) == ("weather", "1.4.2")  # server name = container, version = tag
    assert seen["protocol_version"]
    assert sorted(seen["tools"]) == ["weather_add", "weather_echo", "weather_now"]
    echo = seen["tools"]["weather_echo"]
    assert "weather" in (echo.description or "") and echo.inputSchema["required"] == ["text"]
    assert (seen["echo"], seen["sum"]) == ("hello", {"sum": 42})
    info = agent.mcp_server("weather")
    assert info is not None and info.serving and info.error is None
    assert (info.mode, info.url, info.addresses) == ("serve", f"http://127.0.0.1:{port}/mcp", (("127.0.0.1", port),))


def test_two_servers_are_told_apart_and_untagged_images_are_latest(client: httpx.Client) -> None:
    first, second = free_port(), free_port()
    client.post("/tools", json=deploy_body("alpha", "mcp/everything", first))
    client.post("/tools", json=deploy_body("beta", "ghcr.io/org/tool@sha256:" + "ab" * 32, second))
    one, two = mcp_probe(f"http://127.0.0.1:{first}/mcp"), mcp_probe(f"http://127.0.0.1:{second}/mcp")
    assert (one["name"], one["version"], sorted(one["tools"])[0]) == ("alpha", "latest", "alpha_add")
    assert (two["name"], two["version"], sorted(two["tools"])[0]) == ("beta", "ab" * 6, "beta_add")


def test_sse_transport_is_served_at_sse(client: httpx.Client) -> None:
    port = free_port()
    client.post("/tools", json=deploy_body("legacy", "mcp/legacy-sse:2", port))
    seen = mcp_probe(f"http://127.0.0.1:{port}/sse", sse=True)
    assert (seen["name"], seen["version"], seen["echo"]) == ("legacy", "2", "hello")


def test_endpoint_path_follows_the_container_environment(agent: StandInAgent, client: httpx.Client) -> None:
    port = free_port()
    client.post("/tools", json=deploy_body("custom", "mcp/x:1", port, env=["STANDIN_MCP_PATH=/api/mcp", "A=b"]))
    assert mcp_probe(f"http://127.0.0.1:{port}/api/mcp")["name"] == "custom"
    assert httpx.post(f"http://127.0.0.1:{port}/mcp", json={}, trust_env=False).status_code == 404
    assert agent.mcp_server("custom").path == "/api/mcp"  # type: ignore[union-attr]


def test_loopback_host_ip_is_bound_and_others_are_not(agent: StandInAgent, client: httpx.Client) -> None:
    loopback, vpc = free_port(), free_port()
    client.post("/tools", json=deploy_body("local-only", "mcp/x:1", loopback, host_ip="127.0.0.1"))
    assert mcp_probe(f"http://127.0.0.1:{loopback}/mcp")["name"] == "local-only"
    assert client.post("/tools", json=deploy_body("private", "mcp/x:1", vpc, host_ip="10.0.0.5")).status_code == 201
    info = agent.mcp_server("private")
    assert info is not None and not info.serving and info.addresses == ()
    assert "10.0.0.5 is not a loopback address" in (info.error or "")
    assert refused(vpc)


def test_every_published_tcp_port_serves_and_a_container_without_one_serves_nothing(
    agent: StandInAgent, client: httpx.Client
) -> None:
    first, second = free_port(), free_port()
    body = deploy_body("twice", "mcp/x:1", first)
    body["baseConfigOverrideJson"]["HostConfig"]["PortBindings"]["9000/tcp"] = [{"HostPort": str(second)}]
    client.post("/tools", json=body)
    assert mcp_probe(f"http://127.0.0.1:{first}/mcp")["name"] == mcp_probe(f"http://127.0.0.1:{second}/mcp")["name"]
    assert client.post("/tools", json={**deploy_body("portless", "mcp/x:1", 1), "baseConfigOverrideJson": {}}).json()[
        "success"]
    assert [info.name for info in agent.mcp_servers()] == ["twice"]


# -- the container's life ------------------------------------------------------------------------------


def test_stop_refuses_start_answers_again(client: httpx.Client) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    client.post("/tools", json=deploy_body("svc", "mcp/svc:1", port))
    assert answers_mcp(url)
    assert client.post("/tools/svc/stop").status_code == 200
    assert refused(port)  # at once: the agent answered after the server was gone
    with pytest.raises(httpx.ConnectError):
        httpx.post(url, json={}, trust_env=False)
    assert client.post("/tools/svc/start").status_code == 200
    assert mcp_probe(url)["name"] == "svc"
    client.post("/tools/svc/stop")  # a restart is stop + start
    client.post("/tools/svc/start")
    assert answers_mcp(url)


def test_crash_and_removal_close_the_port(agent: StandInAgent, client: httpx.Client) -> None:
    crashing, removed, vanishing = free_port(), free_port(), free_port()
    for name, port in (("crashing", crashing), ("removed", removed), ("vanishing", vanishing)):
        client.post("/tools", json=deploy_body(name, "mcp/x:1", port))
        assert answers_mcp(f"http://127.0.0.1:{port}/mcp")
    agent.crash_container("crashing", 137)
    assert client.delete("/tools/removed").status_code == 200
    agent.remove_container_out_of_band("vanishing")
    assert all(refused(port) for port in (crashing, removed, vanishing))
    assert agent.mcp_servers() == []


def test_agent_restart_leaves_running_containers_serving(agent: StandInAgent, client: httpx.Client) -> None:
    port = free_port()
    client.post("/tools", json=deploy_body("survivor", "mcp/x:1", port))
    agent.restart_agent()
    assert mcp_probe(f"http://127.0.0.1:{port}/mcp")["name"] == "survivor"


def test_exited_and_foreign_containers_serve_nothing(agent: StandInAgent, client: httpx.Client) -> None:
    exited, foreign = free_port(), free_port()
    assert client.post("/tools", json=deploy_body("stdio", "standin/exit-1", exited)).status_code == 201
    agent.add_unmanaged_container("legacy", "mcp/everything:latest", host_port=foreign)
    assert refused(exited) and refused(foreign)
    assert not refused(agent.port)  # only the agent itself listens
    assert agent.mcp_servers() == []  # dtma_manager included: it was not deployed through the agent


def test_taken_port_is_logged_and_left_unserved(
    agent: StandInAgent, client: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        assert client.post("/tools", json=deploy_body("unlucky", "mcp/x:1", taken)).status_code == 201
        info = agent.mcp_server("unlucky")
        assert info is not None and not info.serving and "cannot serve MCP" in (info.error or "")
        assert "unlucky" in caplog.text
        other = free_port()
        client.post("/tools", json=deploy_body("fine", "mcp/x:1", other))  # the stand-in goes on serving
        assert answers_mcp(f"http://127.0.0.1:{other}/mcp")
    assert client.get("/tools/status").status_code == 200


# -- images that do not speak MCP, servers that stop answering --------------------------------------------


def test_no_mcp_image_opens_the_port_but_answers_404_html(agent: StandInAgent, client: httpx.Client) -> None:
    port = free_port()
    assert client.post("/tools", json=deploy_body("web", "example/no-mcp:latest", port)).status_code == 201
    response = httpx.post(f"http://127.0.0.1:{port}/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "initialize"},
                          trust_env=False)
    assert response.status_code == 404
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert "<pre>Cannot POST /mcp</pre>" in response.text
    assert not answers_mcp(f"http://127.0.0.1:{port}/mcp")
    assert agent.mcp_server("web").mode == "not-mcp"  # type: ignore[union-attr]
    assert [default_mode(i) for i in ("standin/no-mcp", "no-mcp:2", "mcp/no-mcp-really", "mcp/x")] == [
        "not-mcp", "not-mcp", "serve", "serve"]  # fmt: skip


def test_control_surface_makes_a_server_stop_answering(agent: StandInAgent, client: httpx.Client) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    client.post("/tools", json=deploy_body("flaky", "mcp/x:1", port))
    control = httpx.Client(base_url=agent.url, trust_env=False, timeout=10)
    with control:
        assert control.post("/_standin/containers/flaky/mcp", json={"mode": "closed"}).json() == {"ok": True}
        assert refused(port)
        assert control.post("/_standin/containers/flaky/mcp", json={"mode": "hang"}).status_code == 200
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url, json={}, trust_env=False, timeout=httpx.Timeout(5, read=0.3))
        assert control.post("/_standin/containers/flaky/mcp", json={"mode": "not-mcp"}).status_code == 200
        assert httpx.post(url, json={}, trust_env=False).status_code == 404
        state = control.get("/_standin/state").json()["mcp"]
        assert [(s["name"], s["mode"], s["serving"]) for s in state["servers"]] == [("flaky", "not-mcp", True)]
        assert control.post("/_standin/containers/flaky/mcp", json={"mode": None}).status_code == 200
        assert answers_mcp(url)
        assert control.post("/_standin/containers/flaky/mcp", json={"mode": "maybe"}).status_code == 400
        assert control.post("/_standin/containers/ghost/mcp", json={"mode": "hang"}).status_code == 404
        assert control.post("/_standin/containers/dtma_manager/mcp", json={"mode": "hang"}).status_code == 400
        client.post("/tools/flaky/stop")
        assert control.post("/_standin/containers/flaky/mcp", json={"mode": "hang"}).status_code == 400


def test_a_silenced_server_answers_again_after_a_restart(agent: StandInAgent, client: httpx.Client) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    client.post("/tools", json=deploy_body("wedged", "mcp/x:1", port))
    agent.set_container_mcp("wedged", "hang")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json={}, trust_env=False, timeout=httpx.Timeout(5, read=0.3))
    client.post("/tools/wedged/stop")
    client.post("/tools/wedged/start")  # a new process: the override is gone
    assert agent.mcp_server("wedged").mode == "serve"  # type: ignore[union-attr]
    assert answers_mcp(url)
    with pytest.raises(ValueError, match="mcp mode"):
        agent.set_container_mcp("wedged", "sleepy")
    with pytest.raises(KeyError):
        agent.set_container_mcp("ghost", "hang")


def test_image_rules_take_effect_at_once_and_can_be_dropped(agent: StandInAgent, client: httpx.Client) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    with httpx.Client(base_url=agent.url, trust_env=False) as control:
        assert control.post("/_standin/mcp/images", json={"image": "mcp/plain", "mode": "not-mcp"}).status_code == 200
        client.post("/tools", json=deploy_body("plain", "mcp/plain:3", port))
        assert httpx.post(url, json={}, trust_env=False).status_code == 404
        assert control.get("/_standin/state").json()["mcp"]["image_rules"] == {"mcp/plain": "not-mcp"}
        assert control.post("/_standin/mcp/images", json={"image": "mcp/plain", "mode": None}).status_code == 200
        assert answers_mcp(url)  # the running container's server restarted as its image now says
        agent.set_image_mcp("example/no-mcp", "serve")  # a rule beats the name convention
        other = free_port()
        client.post("/tools", json=deploy_body("fixed", "example/no-mcp:1", other))
        assert answers_mcp(f"http://127.0.0.1:{other}/mcp")
        assert control.post("/_standin/mcp/images", json={"image": "x", "mode": "loud"}).status_code == 400
        assert control.post("/_standin/mcp/images", json={"mode": "hang"}).status_code == 400


def test_constructor_and_cli_options() -> None:
    port, other = free_port(), free_port()
    with (
        StandInAgent(TOKEN, mcp_images={"mcp/quiet": "closed"}) as configured,
        httpx.Client(base_url=configured.url, headers=AUTH, trust_env=False) as http,
    ):
        http.post("/tools", json=deploy_body("quiet", "mcp/quiet:1", port))
        assert refused(port)
        info = configured.mcp_server("quiet")
        assert info is not None and (info.mode, info.serving, info.error) == ("closed", False, None)
    with (
        StandInAgent(TOKEN, mcp_servers=False) as silent,
        httpx.Client(base_url=silent.url, headers=AUTH, trust_env=False) as http,
    ):
        assert http.post("/tools", json=deploy_body("none", "mcp/x:1", other)).status_code == 201
        assert refused(other) and silent.mcp_servers() == []
        assert http.get("/_standin/state").json()["mcp"] == {"enabled": False, "image_rules": {}, "servers": []}
        with pytest.raises(RuntimeError, match="serves no MCP"):
            silent.set_container_mcp("none", "hang")
    args = _parser().parse_args(["--mcp-image", "mcp/a=hang", "--mcp-image", "b=not-mcp", "--no-mcp-servers"])
    assert (args.mcp_image, args.no_mcp_servers) == ([("mcp/a", "hang"), ("b", "not-mcp")], True)
    with pytest.raises(SystemExit):
        _parser().parse_args(["--mcp-image", "mcp/a=loud"])


def test_fleet_agents_serve_no_mcp_by_default() -> None:
    port = free_port()
    with StandInFleet(1, tokens=[TOKEN]) as fleet, httpx.Client(base_url=fleet[0].url, headers=AUTH,
                                                                 trust_env=False) as http:
        http.post("/tools", json=deploy_body("quiet", "mcp/x:1", port))
        assert refused(port) and fleet[0].mcp_servers() == []


# -- shutting down -------------------------------------------------------------------------------------------


def test_stand_in_stop_closes_every_server_and_thread() -> None:
    threads_before = threading.active_count()
    ports = [free_port() for _ in range(4)]
    agent = StandInAgent(TOKEN).start()
    with httpx.Client(base_url=agent.url, headers=AUTH, trust_env=False, timeout=10) as http:
        for number, port in enumerate(ports):
            http.post("/tools", json=deploy_body(f"s{number}", "mcp/x:1", port))
        agent.set_container_mcp("s3", "hang")
        assert answers_mcp(f"http://127.0.0.1:{ports[0]}/mcp")
        outcome: list[BaseException] = []

        def wait_on_the_hanging_server() -> None:  # a request in flight there must not hold the stop up
            try:
                httpx.post(f"http://127.0.0.1:{ports[3]}/mcp", json={}, trust_env=False, timeout=10)
            except httpx.HTTPError as error:
                outcome.append(error)

        hanging = threading.Thread(target=wait_on_the_hanging_server, daemon=True)
        hanging.start()
        time.sleep(0.1)
        assert len(mcp_threads()) == 4
    started = time.monotonic()
    agent.stop()
    assert time.monotonic() - started < 2.0
    hanging.join(5)
    assert not hanging.is_alive() and outcome  # its connection was cut, not answered
    assert not isinstance(outcome[0], httpx.TimeoutException)
    assert all(refused(port) for port in ports)
    assert mcp_threads() == []
    deadline = time.monotonic() + 3
    while threading.active_count() > threads_before and time.monotonic() < deadline:
        time.sleep(0.02)  # the agent's HTTP connection threads end when their sockets close
    assert threading.active_count() <= threads_before, [t.name for t in threading.enumerate()]


def test_state_lists_servers_as_json(agent: StandInAgent, client: httpx.Client) -> None:
    port = free_port()
    client.post("/tools", json=deploy_body("listed", "mcp/x:9", port, env=["SECRET=hunter2"]))
    state = httpx.get(f"{agent.url}/_standin/state", trust_env=False).json()
    assert state["mcp"]["servers"] == [
        {
            "name": "listed",
            "image": "mcp/x:9",
            "mode": "serve",
            "path": "/mcp",
            "addresses": [f"127.0.0.1:{port}"],
            "url": f"http://127.0.0.1:{port}/mcp",
            "serving": True,
            "error": None,
        }
    ]
    assert "hunter2" not in json.dumps(state)
