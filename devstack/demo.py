"""`./deploy.sh local --demo`: a scripted walkthrough against the running local stack.

Everything goes over HTTP, as the web app and a droplet would see it: the functions with the demo
user's JWT, the DTMA stand-in through its loopback `/_standin/` control surface. Each step waits
(bounded) for the state it expects and says what it saw instead when it does not come; every
answer of a function is also checked against docs/openapi.json. `run()` returns True only if
every step showed the expected state.

A deploy answers 202 at once and its command goes through the local Cloud Tasks emulator to
`dtma_command_worker` while the stand-in pulls (2 s), as on a real droplet pulling a real image: the
walkthrough watches `deploying -> running` arrive the moment the agent answers, then a deploy whose
pull fails on the toolbox turn `error` with the agent's reason, and a server whose process dies
read `error` with its exit code.

Running means answering: the stand-in serves a real MCP server on the host port of each running
container (devstack/dtma_standin/mcp_servers.py), and the backend checks it with the MCP handshake.
The last steps read the tools a server offers (`mcp_status/<id>`: `mcp.ready`, `tools`), deploy an
image that runs but does not speak MCP (`degraded`), silence a healthy server through the stand-in
(`degraded`), restart it (`healthy` again), and remove them. A backend whose answers carry no `mcp`
block yet gets those steps reported as skipped, not failed.
"""

from __future__ import annotations

import itertools
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

import httpx

from devstack.openapi import SchemaMismatch, check_response

IMAGE = "mcp/everything:latest"
#: The stand-in runs containers of an image named `no-mcp` but answers every request with a 404 page.
NO_MCP_IMAGE = "example/no-mcp:latest"
POLL_SECONDS = 0.2
SPINNER = "|/-\\"


class DemoFailure(Exception):
    """A step did not show what it should; the message says what was seen instead."""


class DemoAborted(Exception):
    """The stack is shutting down (Ctrl-C or SIGTERM during the walkthrough)."""


class DemoSkipped(Exception):
    """The backend does not offer what a step shows (yet); said, not failed."""


@dataclass(frozen=True)
class DemoConfig:
    functions_url: str
    standin_url: str
    user_jwt: str
    toolbox_id: str
    spec: Mapping[str, Any]
    pull_delay: float = 2.0
    settle_timeout: float = 20.0
    silence_timeout: float = 30.0
    database_url: str | None = None  # for the operating figures of the run (mcp-ops report)


class Display:
    """One updating status line on a terminal; one line per change otherwise (logs, CI)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self._last = ""
        self._spin = itertools.cycle(SPINNER)

    def update(self, text: str) -> None:
        if self.tty:
            # One screen line only: "\r + clear line" cannot erase a line that wrapped.
            width = shutil.get_terminal_size().columns - 7
            self.out.write(f"\r\x1b[2K    {next(self._spin)} {text[:width]}")
            self.out.flush()
        elif text != self._last:
            self.out.write(f"    . {text}\n")
            self.out.flush()
        self._last = text

    def clear(self) -> None:
        if self.tty:
            self.out.write("\r\x1b[2K")
            self.out.flush()
        self._last = ""

    def line(self, text: str) -> None:
        self.clear()
        self.out.write(text + "\n")
        self.out.flush()


def _describe(server: Mapping[str, Any]) -> str:
    progress = server.get("progress") or []
    message = progress[-1]["message"] if progress else ""
    box = server.get("toolbox", {})
    age = box.get("seconds_since_heartbeat")
    heard = f"heartbeat {age} s ago" if age is not None else "no heartbeat yet"
    return f"{server['effective_status']:<9} toolbox {box.get('status')}, {heard} | {message}"


def _describe_mcp(server: Mapping[str, Any]) -> str:
    """One line on a server's MCP check, from whatever its `mcp` block holds."""
    check = server.get("mcp")
    if not isinstance(check, Mapping):
        return f"{server.get('effective_status')}, health {server.get('health')}, no mcp block"
    ready = {True: "ready", False: "not ready", None: "not checked"}.get(check.get("ready"), repr(check.get("ready")))
    said = check.get("server") if isinstance(check.get("server"), Mapping) else {}
    parts = [f"{server.get('effective_status')}, health {server.get('health')}, MCP {ready}"]
    if said.get("name"):
        parts.append(f"{said.get('name')} {said.get('version')}")
    if check.get("tool_count") is not None:
        parts.append(f"{check.get('tool_count')} tool(s)")
    error = f" | {check.get('error')}" if check.get("error") else ""
    return ", ".join(parts) + error


def _tools_of(body: Mapping[str, Any]) -> list[Mapping[str, Any]] | None:
    """The `tools` of a one-server answer: the server's own, else the answer's."""
    server = body.get("server") if isinstance(body.get("server"), Mapping) else {}
    for tools in (server.get("tools"), body.get("tools")):
        if isinstance(tools, list):
            return tools
    return None


class Walkthrough:
    def __init__(self, config: DemoConfig, out: TextIO, stop: threading.Event) -> None:
        self.config = config
        self.display = Display(out)
        self.stop = stop
        self.checked = 0
        self.started_at = time.time()
        self.http = httpx.Client(
            base_url=config.functions_url,
            timeout=15.0,
            trust_env=False,
            headers={"Authorization": f"Bearer {config.user_jwt}"},
        )
        self.standin = httpx.Client(base_url=config.standin_url, timeout=5.0, trust_env=False)

    def close(self) -> None:
        self.http.close()
        self.standin.close()

    # -- HTTP with the document's checks ---------------------------------------------------------

    def call(self, method: str, path: str, documented: str, *, expect: int, **kwargs: Any) -> Any:
        response = self.http.request(method, path, **kwargs)
        try:
            body = response.json() if response.content else None
        except ValueError:
            raise DemoFailure(
                f"{method} {path} answered {response.status_code} with non-JSON: {response.text[:200]!r}"
            ) from None
        if response.status_code != expect:
            error = body.get("error", body) if isinstance(body, dict) else body
            raise DemoFailure(f"{method} {path} answered {response.status_code}, expected {expect}: {error}")
        try:
            check_response(self.config.spec, documented, method, response.status_code, body)
        except SchemaMismatch as exc:
            raise DemoFailure(f"the answer does not match docs/openapi.json: {exc}") from None
        self.checked += 1
        return body

    def control(self, path: str, body: Mapping[str, Any] | None = None) -> None:
        response = self.standin.post(f"/_standin/{path}", json=body or {})
        if response.status_code != 200:
            raise DemoFailure(f"stand-in /_standin/{path} answered {response.status_code}: {response.text}")

    def server(self, instance_id: str) -> dict[str, Any]:
        return self.call("GET", "/mcp_status", "/mcp_status", expect=200, params={"id": instance_id})["server"]

    def wait_for(
        self,
        instance_id: str,
        want: str,
        timeout: float,
        also: Callable[[dict[str, Any]], bool] = lambda _s: True,
    ) -> dict[str, Any]:
        """Poll mcp_status, showing progress, until effective_status is `want` (and `also` holds)."""
        deadline = time.monotonic() + timeout
        while True:
            server = self.server(instance_id)
            self.display.update(_describe(server))
            if server["effective_status"] == want and also(server):
                self.display.clear()
                return server
            if time.monotonic() > deadline:
                self.display.clear()
                raise DemoFailure(
                    f"expected effective_status {want} within {timeout:g} s; last seen {_describe(server)}"
                )
            if self.stop.wait(POLL_SECONDS):
                raise DemoAborted

    def wait_mcp(
        self, instance_id: str, done: Callable[[dict[str, Any]], bool], timeout: float, what: str
    ) -> dict[str, Any]:
        """Poll mcp_status (refresh=true once a second: the backend then checks the endpoint) until `done`."""
        deadline = time.monotonic() + timeout
        next_refresh = time.monotonic() + 1.0
        while True:
            params = {"id": instance_id}
            if time.monotonic() >= next_refresh:
                params["refresh"] = "true"
                next_refresh = time.monotonic() + 1.0
            server = self.call("GET", "/mcp_status", "/mcp_status", expect=200, params=params)["server"]
            if "mcp" not in server:
                self.display.clear()
                raise DemoSkipped(
                    f"this backend's mcp_status carries no `mcp` block yet (health {server.get('health')})")
            self.display.update(_describe_mcp(server))
            if done(server):
                self.display.clear()
                return server
            if time.monotonic() > deadline:
                self.display.clear()
                raise DemoFailure(f"expected {what} within {timeout:g} s; last seen {_describe_mcp(server)}")
            if self.stop.wait(POLL_SECONDS):
                raise DemoAborted

    def deploy_named(self, name: str, image: str) -> str:
        """Deploy `image` as `name` (streamable HTTP at /mcp on container port 3001); its id."""
        body = {"toolbox_id": self.config.toolbox_id, "name": name, "image": image,
                "transport": "streamable_http", "container_port": 3001, "endpoint_path": "/mcp"}
        server = self.call("POST", "/deploy_mcp_server", "/deploy_mcp_server", expect=202, json=body,
                           headers={"Idempotency-Key": f"demo-deploy-{uuid.uuid4()}"})
        return str(server["id"])

    def manage(self, instance_id: str, action: str) -> dict[str, Any]:
        return self.call(
            "POST",
            "/manage_mcp_server",
            "/manage_mcp_server",
            expect=200,
            json={"instance_id": instance_id, "action": action},
            headers={"Idempotency-Key": f"demo-{action}-{uuid.uuid4()}"},
        )

    # -- the steps ---------------------------------------------------------------------------

    def steps(self) -> list[tuple[str, Callable[[], str]]]:
        state: dict[str, str] = {}

        def deploy() -> str:
            self.control("pull_delay", {"seconds": self.config.pull_delay})
            name = f"demo-everything-{time.strftime('%H%M%S')}"
            body = {
                "toolbox_id": self.config.toolbox_id,
                "name": name,
                "image": IMAGE,
                "transport": "streamable_http",
                "container_port": 3001,
                "endpoint_path": "/mcp",
                "env": {"DEMO_GREETING": "hello from the local stack"},
            }
            server = self.call(
                "POST",
                "/deploy_mcp_server",
                "/deploy_mcp_server",
                expect=202,
                json=body,
                headers={"Idempotency-Key": f"demo-deploy-{uuid.uuid4()}"},
            )
            if server["status"] != "deploying":
                raise DemoFailure(f"deploy answered 202 with status {server['status']}, expected deploying")
            state["id"], state["name"] = server["id"], name
            pull = self.config.pull_delay
            return f"202 Accepted: {name} is deploying ({IMAGE}; the stand-in pulls for {pull:g} s)"

        def running() -> str:
            server = self.wait_for(state["id"], "running", self.config.settle_timeout)
            last = [e for e in server["progress"] if e["to"] == "running"]
            if not last or last[-1]["source"] != "api":
                raise DemoFailure(f"running was not recorded from the agent's answer: {server['progress']}")
            history = ", ".join(f"{e['from'] or '-'} -> {e['to']} ({e['source']})" for e in server["progress"])
            return f"running at {server['endpoint']}, health {server['health']}; history: {history}"

        def stop() -> str:
            server = self.manage(state["id"], "stop")
            if server["status"] != "stopped":
                raise DemoFailure(f"stop answered status {server['status']}, expected stopped")
            self.wait_for(state["id"], "stopped", self.config.settle_timeout)
            return "stopped"

        def start() -> str:
            server = self.manage(state["id"], "start")
            if server["status"] != "running":
                raise DemoFailure(f"start answered status {server['status']}, expected running")
            self.wait_for(state["id"], "running", self.config.settle_timeout)
            return "running again"

        def silence() -> str:
            self.control("heartbeats/pause")
            server = self.wait_for(state["id"], "unknown", self.config.silence_timeout)
            counts = self.call("POST", "/mcp_status_sweep", "/mcp_status_sweep", expect=200, json={})
            swept = self.wait_for(
                state["id"],
                "unknown",
                self.config.settle_timeout,
                also=lambda s: s["toolbox"]["status"] == "unresponsive",
            )
            return (
                f"unknown after {server['toolbox']['seconds_since_heartbeat']} s of silence "
                f"(stored status still {swept['status']}); sweep marked "
                f"{counts['marked_unresponsive']} toolbox(es), toolbox is now {swept['toolbox']['status']}"
            )

        def recover() -> str:
            self.control("heartbeats/resume")
            server = self.wait_for(
                state["id"],
                "running",
                self.config.settle_timeout,
                also=lambda s: s["toolbox"]["status"] == "active",
            )
            return f"running again, toolbox {server['toolbox']['status']}: {server['progress'][-1]['message']}"

        def failed_pull() -> str:
            body = {"toolbox_id": self.config.toolbox_id, "name": f"{state['name']}-broken",
                    "image": "standin/stream-error:latest", "container_port": 3001}
            server = self.call("POST", "/deploy_mcp_server", "/deploy_mcp_server", expect=202, json=body)
            failed = self.wait_for(server["id"], "error", self.config.settle_timeout)
            state["broken"] = server["id"]
            return f"202, then error: {failed['error']}"

        def dies() -> str:
            self.control(f"containers/{state['name']}/crash", {"exit_code": 137})
            self.call("GET", "/mcp_status", "/mcp_status", expect=200, params={"id": state["id"], "refresh": "true"})
            self.control("heartbeats/send")
            server = self.wait_for(state["id"], "error", self.config.settle_timeout,
                                   also=lambda s: "code 137" in (s["error"] or ""))
            return f"error: {server['error']}"

        def remove() -> str:
            broken = self.manage(state.pop("broken"), "remove")
            if broken.get("status") != "removed":
                raise DemoFailure(f"remove answered {broken}, expected status removed")
            removed = self.manage(state["id"], "remove")
            if removed.get("status") != "removed":
                raise DemoFailure(f"remove answered {removed}, expected status removed")
            error = self.call("GET", "/mcp_status", "/mcp_status", expect=404, params={"id": state["id"]})
            return f"removed; mcp_status now answers 404 {error['error']['code']}"

        def tools() -> str:
            self.control("pull_delay", {"seconds": 0})
            name = f"{state['name']}-tools"
            state["tools"], state["tools_name"] = self.deploy_named(name, IMAGE), name
            self.wait_for(state["tools"], "running", self.config.settle_timeout)
            server = self.wait_mcp(state["tools"], lambda s: s["mcp"].get("ready") is not None,
                                   self.config.settle_timeout, "the MCP endpoint checked")
            check = server["mcp"]
            if check.get("ready") is not True or server["health"] != "healthy":
                raise DemoFailure(f"expected a ready MCP endpoint and health healthy; saw {_describe_mcp(server)}")
            said = check.get("server") or {}
            if said.get("name") != name:
                raise DemoFailure(f"expected the MCP server to call itself {name}; it said {said}")
            body = self.call("GET", f"/mcp_status/{state['tools']}", "/mcp_status/{id}", expect=200)
            listed = _tools_of(body)
            if listed is None:
                raise DemoFailure(f"mcp_status/<id> answered no `tools` list; its server has {sorted(body['server'])}")
            names = [str(tool.get("name")) for tool in listed]
            if len(listed) != check.get("tool_count") or f"{name}_echo" not in names:
                raise DemoFailure(f"expected {check.get('tool_count')} tools including {name}_echo; got {names}")
            if not all(isinstance(tool.get("input_schema"), Mapping) for tool in listed):
                raise DemoFailure(f"expected every tool to carry its input_schema; got {listed}")
            for tool in listed:
                self.display.line(f"      - {tool['name']}: {tool.get('description')}")
            return (f"health {server['health']}: {said.get('name')} {said.get('version')} answered the handshake "
                    f"(protocol {check.get('protocol_version')}) at {check.get('endpoint')} and offers "
                    f"{len(listed)} tools: {', '.join(names)}")

        def not_mcp() -> str:
            name = f"{state['name']}-plain"
            state["plain"] = self.deploy_named(name, NO_MCP_IMAGE)
            self.wait_for(state["plain"], "running", self.config.settle_timeout)
            server = self.wait_mcp(state["plain"], lambda s: s["mcp"].get("ready") is False,
                                   self.config.settle_timeout, "the MCP endpoint found not answering")
            if server["health"] != "degraded" or not server["mcp"].get("error"):
                raise DemoFailure(f"expected health degraded with the check's reason; saw {_describe_mcp(server)}")
            listed = _tools_of(self.call("GET", f"/mcp_status/{state['plain']}", "/mcp_status/{id}", expect=200))
            if listed:
                raise DemoFailure(f"a server that does not answer MCP should list no tools; got {listed}")
            return (f"{NO_MCP_IMAGE} runs ({server['effective_status']}) but health is {server['health']}: "
                    f"{server['mcp']['error']}")

        def silenced() -> str:
            self.control(f"containers/{state['tools_name']}/mcp", {"mode": "closed"})
            server = self.wait_mcp(state["tools"], lambda s: s["mcp"].get("ready") is False,
                                   self.config.settle_timeout, "the silenced endpoint found not answering")
            if server["health"] != "degraded":
                raise DemoFailure(f"expected health degraded once the endpoint stopped answering; saw "
                                  f"{_describe_mcp(server)}")
            degraded = f"{server['effective_status']} but {server['health']}: {server['mcp'].get('error')}"
            restarted = self.manage(state["tools"], "restart")
            if restarted.get("status") != "running":
                raise DemoFailure(f"restart answered status {restarted.get('status')}, expected running")
            back = self.wait_mcp(state["tools"], lambda s: s["mcp"].get("ready") is True and s["health"] == "healthy",
                                 self.config.settle_timeout, "the restarted server answering again")
            return f"{degraded}; after a restart: {_describe_mcp(back)}"

        def remove_checked() -> str:
            removed = []
            for key in ("plain", "tools"):
                if key in state:
                    answer = self.manage(state.pop(key), "remove")
                    if answer.get("status") != "removed":
                        raise DemoFailure(f"remove answered {answer}, expected status removed")
                    removed.append(answer.get("name", key))
            return f"removed {', '.join(removed)}" if removed else "nothing to remove"

        def figures() -> str:
            if not self.config.database_url:
                return "skipped: no database URL"
            from datetime import UTC, datetime

            import psycopg

            since = datetime.fromtimestamp(self.started_at - 1, UTC)
            with psycopg.connect(self.config.database_url, autocommit=True) as conn:
                row = conn.execute("select public.cp_operations_report(p_since => %s, p_bucket_seconds => 60)",
                                   (since,)).fetchone()
            assert row is not None
            deploys, calls = row[0]["deploys"], row[0]["agent_calls"]["by_operation"]
            # This run deployed four servers: three ran, one failed its pull (steps 1, 7, 10, 11).
            seen = (deploys["started"], deploys["succeeded"], deploys["failed"], deploys["failures_by_reason"])
            if seen != (4, 3, 1, {"image_pull_failed": 1}) or deploys["time_to_running"]["count"] != 3:
                raise DemoFailure(f"the operating figures do not match this run: {deploys}")
            ttr = deploys["time_to_running"]
            latency = ", ".join(f"{op} p50 {v['p50_ms']} ms ({v['count']})" for op, v in sorted(calls.items()))
            return (f"4 deploys: 3 succeeded, 1 failed (image_pull_failed), success rate "
                    f"{float(deploys['success_rate']) * 100:.0f}%; time to running p50 {ttr['p50_seconds']} s, "
                    f"p95 {ttr['p95_seconds']} s; agent calls: {latency} (mcp-ops report prints them all)")

        return [
            ("deploy an MCP server", deploy),
            ("watch deploying -> running", running),
            ("stop it", stop),
            ("start it", start),
            ("silence the toolbox", silence),
            ("bring the toolbox back", recover),
            ("deploy an image whose pull fails on the toolbox", failed_pull),
            ("the server's process dies", dies),
            ("remove both", remove),
            ("discover the tools of a running server", tools),
            ("a server that runs but does not speak MCP", not_mcp),
            ("the server stops answering, then restarts", silenced),
            ("remove them", remove_checked),
            ("the operating figures of this run", figures),
        ]


def run(config: DemoConfig, out: TextIO, stop: threading.Event) -> bool:
    """The whole walkthrough; True only if every step showed the expected state (skipped steps aside)."""
    walk = Walkthrough(config, out, stop)
    started = time.monotonic()
    out.write("\nDemo: deploy an MCP server on the stand-in toolbox and follow it through its life\n")
    steps = walk.steps()
    skipped = 0
    try:
        for number, (title, step) in enumerate(steps, 1):
            walk.display.line(f"  [{number}/{len(steps)}] {title}")
            began = time.monotonic()
            try:
                summary = step()
            except DemoSkipped as exc:
                walk.display.line(f"    skipped: {exc}")
                skipped += 1
                continue
            except DemoFailure as exc:
                walk.display.line(f"    FAILED: {exc}")
                out.write(f"\nDemo FAILED at step {number} ({title}).\n")
                return False
            except httpx.HTTPError as exc:
                walk.display.line(f"    FAILED: HTTP error: {type(exc).__name__}: {exc}")
                out.write(f"\nDemo FAILED at step {number} ({title}).\n")
                return False
            walk.display.line(f"    ok ({time.monotonic() - began:.1f} s): {summary}")
    except DemoAborted:
        walk.display.line("\nDemo interrupted.")
        return False
    finally:
        walk.close()
    passed = len(steps) - skipped
    out.write(
        f"\nDemo passed: {passed} steps in {time.monotonic() - started:.1f} s"
        f"{f' ({skipped} skipped)' if skipped else ''}; {walk.checked} answers matched docs/openapi.json.\n"
    )
    out.flush()
    return True
