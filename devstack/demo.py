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
POLL_SECONDS = 0.2
SPINNER = "|/-\\"


class DemoFailure(Exception):
    """A step did not show what it should; the message says what was seen instead."""


class DemoAborted(Exception):
    """The stack is shutting down (Ctrl-C or SIGTERM during the walkthrough)."""


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


class Walkthrough:
    def __init__(self, config: DemoConfig, out: TextIO, stop: threading.Event) -> None:
        self.config = config
        self.display = Display(out)
        self.stop = stop
        self.checked = 0
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
        ]


def run(config: DemoConfig, out: TextIO, stop: threading.Event) -> bool:
    """The whole walkthrough; True only if every step showed the expected state."""
    walk = Walkthrough(config, out, stop)
    started = time.monotonic()
    out.write("\nDemo: deploy an MCP server on the stand-in toolbox and follow it through its life\n")
    steps = walk.steps()
    try:
        for number, (title, step) in enumerate(steps, 1):
            walk.display.line(f"  [{number}/{len(steps)}] {title}")
            began = time.monotonic()
            try:
                summary = step()
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
    out.write(
        f"\nDemo passed: {len(steps)} steps in {time.monotonic() - started:.1f} s; "
        f"{walk.checked} answers matched docs/openapi.json.\n"
    )
    out.flush()
    return True
