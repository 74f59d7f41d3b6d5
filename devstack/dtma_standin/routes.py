"""The DTMA's HTTP API (HEAD ``82a6bec``), reproduced answer for answer.

Route logic follows the real ``src/index.ts`` and ``src/routes/tool_routes.ts``: same
checks in the same order, same status codes, same JSON bodies and messages, and the quirks
the real agent shows (recorded in ``tests/fixtures/real-dtma-responses.json`` and checked
call by call by ``tests/test_standin_vs_real.py``): malformed JSON is a 500, a second stop
is a 500 "(HTTP code 304)", the managed-instance map is memory-only, deploy answers 201
for a container that already exited, ... Docker itself is the in-memory
:class:`~devstack.dtma_standin.engine.Engine`.
"""

from __future__ import annotations

import hmac
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import unquote

from devstack.dtma_standin.engine import DockerError, Engine
from devstack.dtma_standin.report import system_status, tool_statuses
from devstack.dtma_standin.server import Reply, Request

#: express.json()'s default body limit; larger JSON bodies end in the generic 500.
JSON_LIMIT_BYTES = 100 * 1024
#: How many requests :attr:`DtmaApp.records` keeps (oldest dropped first).
REQUEST_LOG_SIZE = 10_000

MISSING_FIELDS = "Missing required fields: dockerImageUrl, instanceNameOnToolbox, accountToolInstanceId"
NOT_FOUND = Reply.json(404, {"error": "Not Found"})
INTERNAL_ERROR = Reply.json(500, {"error": "Internal Server Error"})
UNAUTHORIZED = Reply.json(401, {"error": "Unauthorized: Missing or invalid token format"})
FORBIDDEN = Reply.json(403, {"error": "Forbidden: Invalid token"})

ControlHandler = Callable[[str, list[str], object], Reply]


class Route(StrEnum):
    """Route kinds that :meth:`DtmaApp.inject` can make fail."""

    HEALTH = "health"
    STATUS = "status"
    DEPLOY = "deploy"
    DELETE = "delete"
    START = "start"
    STOP = "stop"
    TOOLS_STATUS = "tools_status"


@dataclass(frozen=True)
class RequestRecord:
    """One request that reached the stand-in; the token itself is never kept."""

    method: str
    path: str
    had_valid_auth: bool
    status: int


@dataclass(frozen=True)
class ManagedInstance:
    """An entry of the DTMA's in-memory ``managedInstances`` map."""

    account_tool_instance_id: Any
    port_bindings: Any


@dataclass
class _Injection:
    reply: Reply
    remaining: int


class BodyError(ValueError):
    """The body could not be parsed the way express.json() parses it."""


class DtmaApp:
    """Request -> Reply for one agent; every state change happens under the agent's lock."""

    def __init__(
        self,
        *,
        token: str,
        engine: Engine,
        lock: threading.RLock,
        dtma_version: str,
        pull_delay: float,
        process_env: Mapping[str, str],
    ) -> None:
        self._token = token.encode()
        self._engine = engine
        self._lock = lock
        self._dtma_version = dtma_version
        self._managed: dict[str, ManagedInstance] = {}
        self._injections: dict[Route, deque[_Injection]] = {}
        self._records: deque[RequestRecord] = deque(maxlen=REQUEST_LOG_SIZE)
        self._interrupted = threading.Event()
        self.pull_delay = pull_delay
        self.listen_port = 0
        self.process_env = dict(process_env)
        self.control: ControlHandler | None = None

    # -- state the agent reads or resets ----------------------------------------------------

    def managed(self) -> dict[str, ManagedInstance]:
        """A copy of the managed-instance map."""
        with self._lock:
            return dict(self._managed)

    def forget_managed(self) -> None:
        """What a DTMA process restart does: the map lives only in memory, so it starts empty."""
        with self._lock:
            self._managed.clear()

    def records(self) -> list[RequestRecord]:
        """Requests seen so far, oldest first."""
        with self._lock:
            return list(self._records)

    def inject(self, route: Route, status: int, body: object, times: int) -> None:
        """Answer the next ``times`` calls of ``route`` with ``status``/``body`` instead of handling them."""
        with self._lock:
            self._injections.setdefault(route, deque()).append(_Injection(Reply.json(status, body), times))

    def interrupt(self) -> None:
        """Cut short any simulated image pull, so stopping never waits for one."""
        self._interrupted.set()

    # -- request handling -------------------------------------------------------------------

    def handle(self, request: Request) -> Reply:
        """Answer one request and record it."""
        reply = self._dispatch(request)
        record = RequestRecord(
            request.method, request.path, self._is_valid(request.authorization), reply.status
        )
        with self._lock:
            self._records.append(record)
        return reply

    def _dispatch(self, request: Request) -> Reply:
        try:
            body = parse_json_body(request.content_type, request.body)
        except BodyError:
            return INTERNAL_ERROR  # express.json() runs before routing and auth, so this wins
        method = "GET" if request.method == "HEAD" else request.method
        parts = [unquote(part) for part in request.path.strip("/").split("/") if part]
        match parts:
            case ["_standin", *rest] if self.control is not None:
                return self.control(method, rest, body)
            case ["health"] if method == "GET":
                return self._guarded(Route.HEALTH, lambda: Reply.text(200, "OK"))
            case ["status"] if method == "GET":
                return self._guarded(Route.STATUS, self._agent_status)
            case ["tools", *rest]:
                return self._authorize(request.authorization) or self._tools(method, rest, body)
        return NOT_FOUND

    def _tools(self, method: str, parts: list[str], body: object) -> Reply:
        match method, parts:
            case "POST", []:
                return self._guarded(Route.DEPLOY, lambda: self._deploy(body))
            case "GET", ["status"]:
                return self._guarded(Route.TOOLS_STATUS, self._tools_status)
            case "DELETE", [name]:
                return self._guarded(Route.DELETE, lambda: self._delete(name))
            case "POST", [name, "start"]:
                return self._guarded(Route.START, lambda: self._start(name))
            case "POST", [name, "stop"]:
                return self._guarded(Route.STOP, lambda: self._stop(name))
        return NOT_FOUND

    def _guarded(self, route: Route, handler: Callable[[], Reply]) -> Reply:
        """Serve an injected failure if one is pending for ``route``, else the real answer."""
        with self._lock:
            pending = self._injections.get(route)
            if pending:
                injection = pending[0]
                injection.remaining -= 1
                if injection.remaining <= 0:
                    pending.popleft()
                return injection.reply
        return handler()

    def _authorize(self, header: str | None) -> Reply | None:
        """``authenticateDtmaRequest``: 401 without a ``Bearer `` header, 403 for a wrong token."""
        if not header or not header.startswith("Bearer "):
            return UNAUTHORIZED
        return None if self._is_valid(header) else FORBIDDEN

    def _is_valid(self, header: str | None) -> bool:
        if not header or not header.startswith("Bearer "):
            return False
        return hmac.compare_digest(header[len("Bearer ") :].encode(), self._token)

    # -- unauthenticated routes -------------------------------------------------------------

    def _agent_status(self) -> Reply:
        """``GET /status``: says "healthy" even when Docker is down, as the real agent does.

        The ``has*`` flags read the DTMA process's environment variables, not ``/etc/dtma.conf``
        where the token and base URL really come from, so on a droplet they are all false
        (as recorded in ``tests/fixtures/real-dtma-responses.json``) unless ``process_env`` sets them.
        """
        with self._lock:
            instances = tool_statuses(self._engine)
            metrics = system_status(self._engine.running_count())
            env = dict(self.process_env)
        return Reply.json(
            200,
            {
                "status": "healthy",
                "timestamp": iso_now(),
                "version": self._dtma_version,
                "service": "DTMA",
                "environment": {
                    "hasAuthToken": bool(env.get("DTMA_BEARER_TOKEN")),
                    "hasApiKey": bool(env.get("BACKEND_TO_DTMA_API_KEY")),
                    "hasApiBaseUrl": bool(env.get("AGENTOPIA_API_BASE_URL")),
                    "port": str(self.listen_port),
                },
                "tool_instances": instances,
                "system_metrics": metrics,
            },
        )

    # -- /tools -----------------------------------------------------------------------------

    def _deploy(self, body: object) -> Reply:
        """``POST /tools``: synchronous pull + create + start + inspect; 201 even if the container exited."""
        fields = body if isinstance(body, dict) else {}
        image, name, account_id = (fields.get(key) for key in _REQUIRED)
        if not all(_js_truthy(value) for value in (image, name, account_id)):
            return Reply.json(400, {"success": False, "error": MISSING_FIELDS})
        image, name = _js_string(image), _js_string(name)
        if name in self.managed():
            return Reply.json(
                409, {"success": False, "error": f"Instance with name '{name}' already exists."}
            )
        override = fields.get("baseConfigOverrideJson", {})
        if override is None:  # the real code dereferences it unguarded
            return _deploy_failed(name, "Cannot read properties of null (reading 'HostConfig')")
        env, bindings = _override_parts(override)
        if conflict := self._managed_port_conflict(bindings):
            error = f"Port conflict: Requested HostPort {conflict} is already in use by a managed instance."
            return Reply.json(409, {"success": False, "error": error})
        try:
            return self._pull_create_start(name, image, account_id, env, bindings)
        except DockerError as error:
            return _deploy_failed(name, error.message)

    def _pull_create_start(
        self, name: str, image: str, account_id: Any, env: object, bindings: object
    ) -> Reply:
        with self._lock:
            behaviour = self._engine.pull(image)
        pull_seconds = self.pull_delay if behaviour.pull_seconds is None else behaviour.pull_seconds
        self._interrupted.wait(pull_seconds)  # outside the lock: other calls proceed during a pull
        with self._lock:
            self._engine.finish_pull(image, behaviour)  # an error inside the stream goes unnoticed here
            container = self._engine.create(name, image, env=env, port_bindings=bindings or {})
            self._engine.start(name)  # a taken port fails here and leaves the `created` container
            self._managed[name] = ManagedInstance(account_id, bindings)
            inspect = self._engine.inspect(name)
        return Reply.json(
            201,
            {
                "success": True,
                "message": f"Tool '{name}' deployed successfully.",
                "data": {
                    "container_id": container.id,
                    "instance_name_on_toolbox": name,
                    "account_tool_instance_id": account_id,
                    "image": inspect["Config"]["Image"],
                    "ports": inspect["NetworkSettings"]["Ports"],
                    "state": inspect["State"],
                },
            },
        )

    def _managed_port_conflict(self, bindings: object) -> object | None:
        """``getExplicitHostPorts`` pre-check: compares only with ports the *map* remembers."""
        requested = _explicit_host_ports(bindings)
        for instance in self.managed().values():
            taken = _explicit_host_ports(instance.port_bindings)
            if conflict := next((port for port in requested if port in taken), None):
                return conflict
        return None

    def _delete(self, name: str) -> Reply:
        if missing := self._not_managed(name):
            return missing
        try:
            with self._lock:
                self._engine.remove(name)
                self._managed.pop(name, None)
        except DockerError as error:
            return _failed(f"Failed to remove tool instance '{name}'.", error.message)
        return _succeeded(f"Tool instance '{name}' removed successfully.")

    def _start(self, name: str) -> Reply:
        if missing := self._not_managed(name):
            return missing
        try:
            with self._lock:
                if self._engine.inspect(name)["State"]["Running"]:
                    return _succeeded(f"Tool instance '{name}' is already running.")
                self._engine.start(name)
        except DockerError as error:
            return _failed(f"Failed to start tool instance '{name}'.", error.message)
        return _succeeded(f"Tool instance '{name}' started successfully.")

    def _stop(self, name: str) -> Reply:
        """A second stop is a 500 "(HTTP code 304) container already stopped -  ", as the real agent answers."""
        if missing := self._not_managed(name):
            return missing
        try:
            with self._lock:
                self._engine.stop(name)
        except DockerError as error:
            return _failed(f"Failed to stop tool instance '{name}'.", error.message)
        return _succeeded(f"Tool instance '{name}' stopped successfully.")

    def _not_managed(self, name: str) -> Reply | None:
        """Every route but deploy and status consults only the in-memory map, lost on a restart."""
        if name in self.managed():
            return None
        return Reply.json(
            404, {"success": False, "error": f"Tool instance '{name}' not found or not managed by this DTMA."}
        )

    def _tools_status(self) -> Reply:
        """``GET /tools/status``: every container; version and environment are hard-coded in the real agent."""
        try:
            with self._lock:
                summaries = self._engine.list_all()
                managed = dict(self._managed)
        except DockerError as error:
            return _failed("Failed to retrieve container status.", error.message)
        instances = [_tool_instance(summary, managed) for summary in summaries]
        return Reply.json(
            200,
            {
                "status": "healthy",
                "timestamp": iso_now(),
                "version": "1.0.0",
                "service": "DTMA",
                "environment": {
                    "hasAuthToken": True,
                    "hasApiKey": True,
                    "hasApiBaseUrl": True,
                    "port": "30000",
                },
                "tool_instances": instances,
            },
        )


_REQUIRED = ("dockerImageUrl", "instanceNameOnToolbox", "accountToolInstanceId")


def parse_json_body(content_type: str | None, raw: bytes | None) -> object:
    """express.json(): parse only ``application/json``; anything else leaves ``req.body = {}``.

    Like body-parser's strict mode, the top level must be an object or an array, NaN and
    Infinity are not JSON, and bodies over 100 kB are refused.
    """
    if (content_type or "").split(";")[0].strip().lower() != "application/json":
        return {}
    if raw is None or len(raw) > JSON_LIMIT_BYTES:
        raise BodyError("request entity too large")
    if not raw:
        return {}
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BodyError("body is not UTF-8") from error
    if text.lstrip(" \t\r\n")[:1] not in ("{", "["):
        raise BodyError("strict mode: top level must be an object or an array")
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as error:
        raise BodyError(str(error)) from error


def _reject_constant(name: str) -> object:
    raise BodyError(f"{name} is not JSON")


def _js_truthy(value: object) -> bool:
    """JavaScript truthiness: like Python's, except that empty arrays and objects are truthy."""
    return bool(value) or isinstance(value, list | dict)


def _js_string(value: object) -> str:
    """How a template literal renders the JSON scalars a client might send in a name field."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return value if isinstance(value, str) else str(value)


def _override_parts(override: object) -> tuple[object, object]:
    """``Env`` (default ``[]``) and ``HostConfig.PortBindings``: all the DTMA uses of the override."""
    if not isinstance(override, dict):
        return [], None
    env = override.get("Env")
    host_config = override.get("HostConfig")
    bindings = host_config.get("PortBindings") if isinstance(host_config, dict) else None
    return (env if _js_truthy(env) else []), bindings


def _explicit_host_ports(bindings: object) -> list[object]:
    """Non-empty ``HostPort`` values of a PortMap, as the DTMA's helper collects them."""
    if not isinstance(bindings, dict):
        return []
    ports: list[object] = []
    for entries in bindings.values():
        for entry in entries if isinstance(entries, list) else []:
            port = entry.get("HostPort") if isinstance(entry, dict) else None
            if port and port not in ports:
                ports.append(port)
    return ports


def _tool_instance(summary: dict[str, Any], managed: dict[str, ManagedInstance]) -> dict[str, Any]:
    """One ``tool_instances`` item; containers missing from the map (e.g. after a restart) get a null id."""
    name = summary["Names"][0].removeprefix("/")
    instance = managed.get(name)
    account_id = instance.account_tool_instance_id if instance else None
    return {
        "account_tool_instance_id": account_id if _js_truthy(account_id) else None,
        "instance_name_on_toolbox": name,
        "container_id": summary["Id"],
        "status": summary["State"],
        "image": summary["Image"],
        "ports": summary["Ports"],
        "created": summary["Created"],
    }


def _succeeded(message: str) -> Reply:
    return Reply.json(200, {"success": True, "message": message})


def _failed(message: str, error: str) -> Reply:
    return Reply.json(500, {"success": False, "message": message, "error": error})


def _deploy_failed(name: str, error: str) -> Reply:
    return _failed(f"Failed to deploy tool '{name}'.", error)


def iso_now() -> str:
    """JavaScript's ``new Date().toISOString()``: UTC with milliseconds."""
    now_ms = time.time_ns() // 1_000_000
    seconds, millis = divmod(now_ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"
