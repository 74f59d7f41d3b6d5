"""The backend's client for a toolbox's DTMA agent (HTTP on port 30000).

One httpx client per process (connection pooling across invocations), separate connect and
read budgets per call, and typed failures so every caller maps them once:

* `DtmaUnreachable`: the request never reached the agent (refused, DNS, connect timeout).
  Retried once, because nothing was sent.
* `DtmaTimeout`: the request was sent and no answer came within the budget. The outcome is
  unknown (DTMA's deploy is synchronous and may still be pulling), so it is never retried.
* `DtmaRejected`: the agent answered non-2xx; carries the status and the agent's message.
* `DtmaBadResponse`: a 2xx whose body is not the JSON the contract promises.

Where the key goes is decided here and nowhere else: the address comes from the toolbox row
(which owners cannot edit), loopback/private/link-local addresses are refused unless local
development allows them, proxies from the environment are ignored (`trust_env=False`), and
redirects are not followed, so the backend key is only ever sent to the toolbox's own DTMA.

Every call is measured and exported (docs/deploying.md, "Metrics and logs"): one structured log
line per call, `{"event": "dtma_call", "operation", "toolbox_id", "duration_ms", "result",
"http_status"}` (plus the fields of the `recording()` it runs in, such as `command_id`), which the
log-based metrics `deploy.sh gcp` creates count; and, inside `recording()`, one `{op, ms, result,
status}` entry in the list the command worker stores in its outcome record (`agent_calls`). Status
reads are logged at INFO like the rest: they are made only by commands and by a user's refresh
(never on a timer), so they are few, and a DEBUG line would be missing from the metrics. A call
that fails is logged at WARNING. Neither the key nor any body (which can hold env values) is ever
part of a line: only the operation, the toolbox and the outcome.
"""

from __future__ import annotations

import contextvars
import ipaddress
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from shared.core.addresses import is_internal
from shared.core.config import Settings
from shared.core.toolbox_keys import derive_key

log = logging.getLogger("mcp.dtma")


class DtmaError(Exception):
    """Base of every DTMA failure; `message` is a sentence a user can act on."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class DtmaUnreachable(DtmaError):
    pass


class DtmaTimeout(DtmaError):
    pass


class DtmaRejected(DtmaError):
    def __init__(self, status: int, agent_message: str, where: str) -> None:
        super().__init__(f"the toolbox agent at {where} answered {status}: {agent_message}")
        self.status = status
        self.agent_message = agent_message


class DtmaBadResponse(DtmaError):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # the 2xx whose body was not usable


class AddressRefused(DtmaError):
    """The toolbox's address is one the backend must not send its key to."""


# --- measuring ---------------------------------------------------------------------------------
# Operations: the agent's routes, named as DTMA names them (docs/real-agent.md).
DEPLOY, START, STOP, DELETE, TOOLS_STATUS = "deploy", "start", "stop", "delete", "tools_status"
OPERATIONS = (DEPLOY, START, STOP, DELETE, TOOLS_STATUS)
# What a call came to: `ok`, or the failure class it raised.
OK = "ok"
RESULTS = {DtmaRejected: "rejected", DtmaUnreachable: "unreachable", DtmaTimeout: "timeout",
           DtmaBadResponse: "bad_response"}
# An exception that is no DTMA failure (a bug here): logged, and it ends the command without an outcome.
UNEXPECTED = "error"


@dataclass
class Recording:
    """The calls made within one `recording()` block, in order, as the outcome record stores them."""

    calls: list[dict[str, Any]]
    fields: dict[str, Any]


_recording: contextvars.ContextVar[Recording | None] = contextvars.ContextVar("dtma_recording", default=None)


@contextmanager
def recording(into: list[dict[str, Any]] | None = None, **fields: Any) -> Iterator[list[dict[str, Any]]]:
    """Append every DTMA call made in this block (by this thread or task) to `into` (a new list if
    None), as `{"op", "ms", "result", "status"}`; `fields` (e.g. `command_id`) go on each call's log line."""
    current = Recording(into if into is not None else [], dict(fields))
    token = _recording.set(current)
    try:
        yield current.calls
    finally:
        _recording.reset(token)


def _observe(target: Target, operation: str, started: float, result: str, status: int | None) -> None:
    ms = round((time.perf_counter() - started) * 1000, 1)
    current = _recording.get()
    if current is not None:
        current.calls.append({"op": operation, "ms": ms, "result": result, "status": status})
    fields = {"event": "dtma_call", "operation": operation, "toolbox_id": target.toolbox_id, "duration_ms": ms,
              "result": result, "http_status": status, **(current.fields if current else {})}
    log.log(logging.INFO if result == OK else logging.WARNING, "dtma %s on toolbox %s: %s%s in %.1f ms",
            operation, target.toolbox_id, result, f" ({status})" if status is not None else "", ms,
            extra={"json_fields": fields})


@dataclass(frozen=True)
class Target:
    """Where one toolbox's DTMA listens and the key that opens it."""

    toolbox_id: str
    host: str
    port: int
    key: str

    @property
    def where(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"http://{self.where}"

    def __repr__(self) -> str:  # never print the key
        return f"Target(toolbox_id={self.toolbox_id!r}, where={self.where!r})"


def agent_message(response: httpx.Response) -> str:
    """The agent's own explanation: `error`, else `message`, else the start of the body."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300].strip() or response.reason_phrase
    if isinstance(body, dict):
        for key in ("error", "message"):
            if isinstance(body.get(key), str) and body[key]:
                return body[key][:500]
    return response.text[:300]


class DtmaClient:
    def __init__(self, *, default_port: int = 30000, connect_timeout: float = 2.0, key_mode: str = "derived",
                 master_secret: str | None = None, legacy_key: str | None = None,
                 allow_private: bool = False, transport: httpx.BaseTransport | None = None) -> None:
        self.default_port = default_port
        self.connect_timeout = connect_timeout
        self.key_mode = key_mode
        self._master_secret = master_secret
        self._legacy_key = legacy_key
        self.allow_private = allow_private
        self._http = httpx.Client(trust_env=False, follow_redirects=False, transport=transport,
                                  limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
                                  headers={"User-Agent": "mcp-control-plane"})

    @classmethod
    def from_settings(cls, settings: Settings) -> DtmaClient:
        secret = settings.DTMA_KEY_SECRET.get_secret_value() if settings.DTMA_KEY_SECRET else None
        legacy = settings.BACKEND_TO_DTMA_API_KEY.get_secret_value() if settings.BACKEND_TO_DTMA_API_KEY else None
        return cls(default_port=settings.DTMA_PORT, connect_timeout=settings.DTMA_CONNECT_TIMEOUT_SECONDS,
                   key_mode=settings.DTMA_KEY_MODE, master_secret=secret, legacy_key=legacy,
                   allow_private=settings.ALLOW_PRIVATE_TOOLBOX_IPS)

    def key_for(self, toolbox_id: str, key_version: int) -> str:
        if self.key_mode == "legacy":
            if not self._legacy_key:
                raise RuntimeError("DTMA_KEY_MODE=legacy needs BACKEND_TO_DTMA_API_KEY")
            return self._legacy_key
        if not self._master_secret:
            raise RuntimeError("DTMA_KEY_MODE=derived needs DTMA_KEY_SECRET")
        return derive_key(self._master_secret, toolbox_id, key_version)

    def target(self, toolbox: dict[str, Any]) -> Target:
        """The DTMA of a toolbox row (`id`, `public_ip_address`, `dtma_port`, `dtma_key_version`)."""
        raw = str(toolbox.get("public_ip_address") or "")
        try:
            address = ipaddress.ip_address(raw.split("/")[0])
        except ValueError:
            raise AddressRefused("the toolbox has no usable public IP address yet") from None
        if is_internal(address) and not self.allow_private:
            raise AddressRefused(f"the toolbox address {address} is not a public address; refusing to send it "
                                 "the backend key (set ALLOW_PRIVATE_TOOLBOX_IPS=true for local development)")
        port = int(toolbox.get("dtma_port") or self.default_port)
        key = self.key_for(str(toolbox["id"]), int(toolbox.get("dtma_key_version") or 1))
        return Target(str(toolbox["id"]), str(address), port, key)

    def _request(self, target: Target, method: str, path: str, budget: float,
                 body: dict[str, Any] | None = None) -> tuple[int, Any]:
        """(HTTP status, JSON body) of a 2xx; every other outcome raises its DtmaError."""
        timeout = httpx.Timeout(budget, connect=min(self.connect_timeout, budget))
        headers = {"Authorization": f"Bearer {target.key}"}
        for attempt in (1, 2):
            try:
                response = self._http.request(method, target.base_url + path, json=body, headers=headers,
                                              timeout=timeout)
                break
            except (httpx.ConnectError, httpx.ConnectTimeout):
                if attempt == 2:
                    raise DtmaUnreachable(f"toolbox at {target.where} is unreachable") from None
            except httpx.TimeoutException:
                raise DtmaTimeout(f"the toolbox agent at {target.where} did not answer within {budget:g} s") from None
            except httpx.TransportError as exc:
                # Sent, then the connection broke (reset mid-response): outcome unknown.
                raise DtmaTimeout(f"the connection to the toolbox agent at {target.where} broke before it "
                                  f"answered ({type(exc).__name__})") from None
        if response.status_code >= 300:
            raise DtmaRejected(response.status_code, agent_message(response), target.where)
        try:
            return response.status_code, response.json()
        except ValueError:
            raise DtmaBadResponse(f"the toolbox agent at {target.where} answered {response.status_code} "
                                  "with a body that is not JSON", response.status_code) from None

    def _call(self, target: Target, operation: str, method: str, path: str, budget: float,
              body: dict[str, Any] | None = None, check: Callable[[Any], str | None] | None = None) -> Any:
        """One measured call: `_request`, then `check` (the answer's shape: None, or what is wrong with it).
        Its log line and recorded entry are written however it ends."""
        started = time.perf_counter()
        result, status = UNEXPECTED, None  # what an exception that is no DtmaError leaves
        try:
            status, answer = self._request(target, method, path, budget, body)
            problem = check(answer) if check else None
            if problem:
                raise DtmaBadResponse(f"the toolbox agent at {target.where} {problem}", status)
            result = OK
            return answer
        except DtmaError as exc:
            result = next((name for kind, name in RESULTS.items() if isinstance(exc, kind)), UNEXPECTED)
            status = getattr(exc, "status", None)
            raise
        finally:
            _observe(target, operation, started, result, status)

    def deploy(self, target: Target, body: dict[str, Any], budget: float) -> dict[str, Any]:
        """`POST /tools`: pull, create and start (synchronous on the agent)."""
        # The agent always sends Docker's inspect `State` (docs/real-agent.md); without it the answer
        # says nothing about the container, which must not read as "it exited".
        def check(answer: Any) -> str | None:
            if not isinstance(answer, dict) or not isinstance(answer.get("data"), dict) \
                    or not isinstance(answer["data"].get("state"), dict):
                return "answered the deploy without the container's details"
            return None
        answer: dict[str, Any] = self._call(target, DEPLOY, "POST", "/tools", budget, body, check)
        return answer

    def start(self, target: Target, name: str, budget: float) -> Any:
        return self._call(target, START, "POST", f"/tools/{quote(name, safe='')}/start", budget)

    def stop(self, target: Target, name: str, budget: float) -> Any:
        return self._call(target, STOP, "POST", f"/tools/{quote(name, safe='')}/stop", budget)

    def remove(self, target: Target, name: str, budget: float) -> Any:
        return self._call(target, DELETE, "DELETE", f"/tools/{quote(name, safe='')}", budget)

    def tool_status(self, target: Target, budget: float) -> dict[str, Any]:
        """`GET /tools/status`: every container the agent sees, with its managed ids."""
        def check(answer: Any) -> str | None:
            if not isinstance(answer, dict) or not isinstance(answer.get("tool_instances"), list):
                return "answered /tools/status without a tool_instances list"
            return None
        answer: dict[str, Any] = self._call(target, TOOLS_STATUS, "GET", "/tools/status", budget, check=check)
        return answer

    def close(self) -> None:
        self._http.close()
