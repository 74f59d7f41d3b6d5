"""Real MCP servers behind the stand-in's running containers, so that "running" can be checked by answering.

A real toolbox runs each MCP server in a container whose port Docker publishes on the droplet; the
control plane's probe speaks MCP to ``http://<toolbox address>:<host port><endpoint path>``. The
stand-in's containers are records in an in-memory engine, so this module puts a real MCP server (the
``mcp`` SDK's low-level server, streamable HTTP and SSE transports) on the host port of each running
container that should have one, and takes it away when the container stops.

Which containers serve MCP (the rule)
    A container serves while it is ``running``, was created through the agent's ``POST /tools`` (the
    DTMA deploys MCP servers; containers it did not create, such as its own ``dtma_manager`` or those
    of ``/_standin/containers``, serve nothing) and publishes a TCP port. What it serves is its *mode*:
    its image's rule if one was set (:meth:`McpHost.set_image_mode`), else ``not-mcp`` for an image
    whose name is ``no-mcp`` in any namespace and with any tag (``example/no-mcp:latest``,
    ``standin/no-mcp``), else ``serve``. A per-container override (:meth:`McpHost.set_override`) wins
    until the container stops or restarts: a restart starts a fresh process, which answers again.

Modes
    ``serve``    a real MCP server: streamable HTTP at the endpoint path (``/mcp``, or the container's
                 ``STANDIN_MCP_PATH`` environment variable), SSE at ``/sse`` (messages at ``/messages/``).
                 Server name = container name, version = image tag; three tools named
                 ``<container>_echo``, ``<container>_add``, ``<container>_now``.
    ``not-mcp``  the port is open and every request gets express's 404 HTML page ("Cannot POST /mcp").
    ``hang``     the port is open, requests are read and never answered (a wedged process).
    ``closed``   nothing listens on the port (connection refused), though the container runs.

Where it listens
    On the binding's ``HostIp``; an empty one or ``0.0.0.0`` (every address, Docker's default) binds
    ``127.0.0.1`` and ``::`` binds ``::1``: the stand-in's containers all live on loopback, and these
    servers have no authentication. A ``HostIp`` that is not a loopback address is not bound at all
    (the server is left unserved, with the reason in :meth:`McpHost.infos`). A port that cannot be
    bound (taken by another process, or by another stand-in's container on the same machine) is
    logged and left unserved too, which is a realistic degraded case: the container runs, nobody answers.

Threads and cost
    Each serving container has one daemon thread running uvicorn on sockets bound synchronously, so a
    client connecting right after the agent answered waits in the listen backlog instead of being
    refused. Stopping cuts open connections at once, as a dying process would; :meth:`McpHost.close`
    stops every server in parallel. No thread exists for a container that does not serve.

Importing the SDK
    The ``mcp`` package and uvicorn are imported when an agent with MCP servers starts
    (:func:`preload`), not when this module is, and never in a server's own thread: the SDK's
    package has an import cycle (``mcp`` -> ``mcp.client.session_group`` -> ``mcp.client.sse`` ->
    ``mcp``), so two threads importing it for the first time at once (a server starting while the
    control plane's probe, in the same process, imports its client) can each be handed a partly
    initialised module and fail with "cannot import name ... (most likely due to a circular import)".
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from devstack.dtma_standin.engine import Container, image_matches, image_repository, normalize_image

logger = logging.getLogger(__name__)

SERVE, NOT_MCP, HANG, CLOSED = "serve", "not-mcp", "hang", "closed"
#: Every mode a container's MCP server can be in (see the module docstring).
MODES = (SERVE, NOT_MCP, HANG, CLOSED)
#: Where streamable HTTP is served unless the container's environment says otherwise.
DEFAULT_PATH = "/mcp"
#: The container environment variable that moves the streamable HTTP endpoint.
PATH_ENV = "STANDIN_MCP_PATH"
SSE_PATH = "/sse"
SSE_MESSAGES_PATH = "/messages/"
#: Images with this last name component (any namespace, any tag) run but do not speak MCP.
NO_MCP_NAME = "no-mcp"
#: How long a stopping server waits for cancelled requests before giving up on them.
_CANCEL_GRACE_SECONDS = 1.0
_preload_lock = threading.Lock()
_preload_error: str | None = None
_preloaded = False


def preload() -> str | None:
    """Import the SDK and uvicorn once per process, from the calling thread; the error, or None.

    Called by :meth:`McpHost.start` (an agent's start) and again before each server, so that no
    server thread ever imports the SDK (see "Importing the SDK" above).
    """
    global _preload_error, _preloaded
    with _preload_lock:
        if not _preloaded:
            try:
                import mcp  # the whole package, client included: its import cycle is resolved here
                import mcp.server.lowlevel
                import mcp.server.sse
                import mcp.server.streamable_http_manager  # noqa: F401
                import starlette.applications
                import starlette.routing  # noqa: F401
                import uvicorn  # noqa: F401
            except ImportError as error:
                _preload_error = f"the mcp SDK cannot be imported ({error}); install the project's dependencies"
                logger.warning("stand-in MCP servers disabled: %s", _preload_error)
            _preloaded = True
        return _preload_error


ContainerKey = tuple[str, int]


def default_mode(image: str) -> str:
    """The mode an image has without a rule: ``not-mcp`` for ``.../no-mcp[:tag]``, else ``serve``."""
    return NOT_MCP if image_repository(image).rsplit("/", 1)[-1] == NO_MCP_NAME else SERVE


def check_mode(mode: object) -> str:
    """``mode`` if it is one of :data:`MODES`; ValueError otherwise."""
    if mode not in MODES:
        raise ValueError(f"mcp mode must be one of {list(MODES)}")
    return str(mode)


@dataclass(frozen=True)
class Wanted:
    """What one running container should serve, read from the engine under the agent's lock."""

    key: ContainerKey  # container id and start time: a restart is a new process
    name: str
    image: str
    mode: str
    path: str
    ports: tuple[tuple[str, int], ...]  # (HostIp as published, host port)


@dataclass(frozen=True)
class McpServerInfo:
    """What a container's MCP server is doing, for tests, ``/_standin/state`` and the demo."""

    name: str
    image: str
    mode: str
    path: str
    addresses: tuple[tuple[str, int], ...]  # bound (host, port) pairs
    serving: bool  # sockets are bound and a server thread owns them
    error: str | None

    @property
    def url(self) -> str | None:
        """The streamable HTTP endpoint of the first bound address, e.g. ``http://127.0.0.1:49152/mcp``."""
        if not self.addresses:
            return None
        host, port = self.addresses[0]
        return f"http://{_url_host(host)}:{port}{self.path}"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "image": self.image,
            "mode": self.mode,
            "path": self.path,
            "addresses": [f"{_url_host(host)}:{port}" for host, port in self.addresses],
            "url": self.url,
            "serving": self.serving,
            "error": self.error,
        }


class McpHost:
    """The MCP servers of one agent's containers; thread-safe.

    The agent calls :meth:`sync` with a function that reads the engine (under the agent's lock) after
    anything that may have changed which containers run; :meth:`sync` starts and stops servers to match.
    Lock order: this host's lock, then the agent's.
    """

    def __init__(self, *, enabled: bool = True, image_modes: Iterable[tuple[str, str]] = ()) -> None:
        self.enabled = enabled
        self._guard = threading.Lock()  # the servers; taken before the agent's lock
        self._config = threading.Lock()  # rules and overrides; a leaf: nothing is acquired while holding it
        self._rules: dict[str, str] = {}
        self._overrides: dict[ContainerKey, str] = {}
        self._servers: dict[str, _Served] = {}
        self._closed = False
        for image, mode in image_modes:
            self.set_image_mode(image, mode)

    def start(self) -> None:
        """Import what the servers need now, in the caller's thread (no-op when disabled)."""
        if self.enabled:
            preload()

    # -- configuration ------------------------------------------------------------------------

    def set_image_mode(self, pattern: str, mode: str | None) -> None:
        """Give every image ``pattern`` names (no tag: all tags) ``mode``; None drops the rule."""
        if not pattern or not isinstance(pattern, str):
            raise ValueError("image must be a non-empty string")
        with self._config:
            if mode is None:
                self._rules.pop(pattern, None)
            else:
                self._rules[pattern] = check_mode(mode)

    def image_rules(self) -> dict[str, str]:
        with self._config:
            return dict(self._rules)

    def image_mode(self, image: str) -> str:
        """The mode of ``image``: a tagged rule, else an untagged one, else :func:`default_mode`."""
        with self._config:
            matching = [pattern for pattern in self._rules if image_matches(image, pattern)]
            exact = [pattern for pattern in matching if normalize_image(pattern) == normalize_image(image)]
            if matching:
                return self._rules[(exact or matching)[0]]
        return default_mode(image)

    def set_override(self, key: ContainerKey, mode: str | None) -> None:
        """Put the running container ``key`` in ``mode`` until it stops or restarts (None: back to its image's)."""
        with self._config:
            if mode is None:
                self._overrides.pop(key, None)
            else:
                self._overrides[key] = check_mode(mode)

    # -- what runs --------------------------------------------------------------------------------

    def wanted(self, containers: Iterable[Container]) -> list[Wanted]:
        """The servers ``containers`` call for; call it under the agent's lock."""
        found: list[Wanted] = []
        for container in containers:
            ports = tuple((p.host_ip, p.host_port) for p in container.published if p.protocol == "tcp")
            if not container.running or container.foreign or not ports:
                continue
            key = (container.id, container.started_ns)
            with self._config:
                override = self._overrides.get(key)
            mode = override or self.image_mode(container.image)
            found.append(Wanted(key, container.name, container.image, mode, _endpoint_path(container.env), ports))
        return found

    def sync(self, read: Callable[[], list[Wanted]]) -> None:
        """Start and stop servers so that exactly what ``read()`` returns is served.

        ``read`` takes the agent's lock itself; never call this while holding that lock.
        """
        if not self.enabled:
            return
        with self._guard:
            if self._closed:
                return
            wanted = {item.name: item for item in read()}
            live_keys = {item.key for item in wanted.values()}
            with self._config:  # an override ends with the process it was set on
                self._overrides = {key: mode for key, mode in self._overrides.items() if key in live_keys}
                stale = [self._servers.pop(name) for name, served in list(self._servers.items())
                         if wanted.get(name) != served.wanted]
            _stop_all(stale)
            for name, item in wanted.items():
                if name not in self._servers:
                    served = _Served.start(item)
                    with self._config:
                        self._servers[name] = served

    def infos(self) -> list[McpServerInfo]:
        """One entry per container that should serve (also those left unserved, with the reason)."""
        with self._config:
            servers = sorted(self._servers.items())
        return [served.info() for _, served in servers]

    def info(self, name: str) -> McpServerInfo | None:
        """The server of container ``name``, or None if it should not serve (not running, foreign, no port)."""
        with self._config:
            served = self._servers.get(name)
        return served.info() if served else None

    def close(self) -> None:
        """Stop every server (in parallel) and serve nothing more; idempotent."""
        with self._guard:
            self._closed = True
            with self._config:
                servers, self._servers = list(self._servers.values()), {}
            _stop_all(servers)


def _endpoint_path(env: list[str]) -> str:
    for entry in env:
        name, _, value = entry.partition("=")
        if name == PATH_ENV and value.startswith("/"):
            return value
    return DEFAULT_PATH


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _bind_address(host_ip: str) -> str:
    """Where Docker's binding is reachable on this machine: loopback for the wildcards; ValueError otherwise."""
    address = ipaddress.ip_address(host_ip or "0.0.0.0")  # noqa: S104 - only ever mapped to loopback below
    if address.is_unspecified:
        return "::1" if address.version == 6 else "127.0.0.1"
    if not address.is_loopback:
        raise ValueError(f"HostIp {host_ip} is not a loopback address; the stand-in serves MCP on loopback only")
    return str(address)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


class _Served:
    """One container's server: its bound sockets and the thread serving them (none in ``closed`` mode)."""

    def __init__(self, wanted: Wanted) -> None:
        self.wanted = wanted
        self.addresses: list[tuple[str, int]] = []
        self.error: str | None = None
        self.thread: _ServerThread | None = None

    @classmethod
    def start(cls, wanted: Wanted) -> _Served:
        served = cls(wanted)
        if wanted.mode == CLOSED:
            return served
        if (error := preload()) is not None:
            served.error = f"cannot serve MCP for container {wanted.name}: {error}"
            return served
        sockets: list[socket.socket] = []
        try:
            for host_ip, port in wanted.ports:
                host = _bind_address(host_ip)
                sockets.append(_listen(host, port))
                served.addresses.append((host, port))
        except (ValueError, OSError) as error:
            for sock in sockets:
                sock.close()
            served.addresses = []
            served.error = f"cannot serve MCP for container {wanted.name}: {error}"
            logger.warning("%s", served.error)
            return served
        served.thread = _ServerThread(wanted, sockets)
        served.thread.start()
        return served

    def info(self) -> McpServerInfo:
        thread = self.thread
        error = self.error or (thread.error if thread else None)
        serving = thread is not None and thread.error is None
        return McpServerInfo(
            name=self.wanted.name,
            image=self.wanted.image,
            mode=self.wanted.mode,
            path=self.wanted.path,
            addresses=tuple(self.addresses),
            serving=serving,
            error=error,
        )


def _stop_all(servers: list[_Served]) -> None:
    threads = [served.thread for served in servers if served.thread is not None]
    for thread in threads:
        thread.request_stop()
    for thread in threads:
        thread.join()


class _ServerThread:
    """uvicorn serving one container's app on already-bound sockets; stops promptly from any thread."""

    def __init__(self, wanted: Wanted, sockets: list[socket.socket]) -> None:
        self._wanted = wanted
        self._sockets = sockets
        self._guard = threading.Lock()
        self._stop_requested = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._server: Any = None
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"standin-mcp-{wanted.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def request_stop(self) -> None:
        with self._guard:
            self._stop_requested = True
            server, loop, wake = self._server, self._loop, self._wake
        if server is not None:
            server.should_exit = True
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop already closed
                loop.call_soon_threadsafe(wake.set)

    def join(self) -> None:
        self._thread.join()

    def _run(self) -> None:
        try:
            server = _make_server(self._wanted, self)
            with self._guard:
                if self._stop_requested:
                    return
                self._server = server
            asyncio.run(server.serve(sockets=self._sockets))
        except (Exception, SystemExit) as error:  # uvicorn exits with SystemExit when its start fails
            self.error = f"MCP server of container {self._wanted.name} failed: {type(error).__name__}: {error}"
            logger.warning("%s", self.error, exc_info=not isinstance(error, SystemExit | ImportError))
        finally:
            for sock in self._sockets:
                sock.close()

    async def wait_for_stop(self) -> None:
        """Called on the server's loop: returns once :meth:`request_stop` was called."""
        wake = asyncio.Event()
        with self._guard:
            if self._stop_requested:
                return
            self._loop, self._wake = asyncio.get_running_loop(), wake
        await wake.wait()


def _make_server(wanted: Wanted, owner: _ServerThread) -> Any:
    """A uvicorn server for ``wanted``'s mode (imports uvicorn, and the SDK for ``serve``, on first use)."""
    import uvicorn

    if wanted.mode == SERVE:
        app, lifespan = _mcp_app(wanted), "on"
    elif wanted.mode == HANG:
        app, lifespan = _hang_app, "off"
    else:
        app, lifespan = _not_mcp_app, "off"
    config = uvicorn.Config(
        app,
        http="h11",
        ws="none",
        loop="asyncio",
        lifespan=lifespan,
        log_config=None,  # leave the process's logging alone
        log_level="warning",
        access_log=False,
        server_header=False,
    )

    class _Uvicorn(uvicorn.Server):
        """uvicorn without its 0.1 s polling: woken on stop, and cutting connections like a dying process."""

        async def main_loop(self) -> None:
            await self.on_tick(0)  # the default headers
            ticker = asyncio.ensure_future(self._tick())
            try:
                await owner.wait_for_stop()
            finally:
                ticker.cancel()

        async def _tick(self) -> None:
            while True:
                await asyncio.sleep(1.0)
                await self.on_tick(0)  # refreshes the Date header

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            for server in self.servers:
                server.close()
            for connection in list(self.server_state.connections):
                transport = getattr(connection, "transport", None)
                if transport is not None:
                    transport.abort()
            tasks = list(self.server_state.tasks)
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=_CANCEL_GRACE_SECONDS)
            await self.lifespan.shutdown()

    return _Uvicorn(config)


# -- the apps -----------------------------------------------------------------------------------


async def _not_mcp_app(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
    """An ordinary express app without the route: 404 with finalhandler's HTML page."""
    if scope["type"] != "http":
        return
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>Error</title>\n</head>\n'
        f"<body>\n<pre>Cannot {scope['method']} {scope['path']}</pre>\n</body>\n</html>\n"
    ).encode()
    headers = [
        (b"x-powered-by", b"Express"),
        (b"content-security-policy", b"default-src 'none'"),
        (b"x-content-type-options", b"nosniff"),
        (b"content-type", b"text/html; charset=utf-8"),
        (b"content-length", str(len(page)).encode()),
    ]
    await send({"type": "http.response.start", "status": 404, "headers": headers})
    await send({"type": "http.response.body", "body": page})


async def _hang_app(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
    """Reads nothing, answers nothing: the request waits until the client gives up or the server stops."""
    if scope["type"] == "http":
        await asyncio.Event().wait()


def _version(image: str) -> str:
    """The image's tag (``latest`` when it has none), or the first 12 hex digits of its digest."""
    full = normalize_image(image)
    if "@" in full:
        return full.split("@", 1)[1].removeprefix("sha256:")[:12]
    return full.rsplit(":", 1)[1]


def _tool_names(container: str) -> dict[str, str]:
    """``<container>_<tool>``; MCP tool names are at most 128 characters, so a long name is cut."""
    return {tool: f"{container[: 127 - len(tool)]}_{tool}" for tool in ("echo", "add", "now")}


def _mcp_app(wanted: Wanted) -> Any:
    """A Starlette app: the SDK's low-level server over streamable HTTP (``wanted.path``) and SSE."""
    import mcp.types as types
    from mcp.server.lowlevel import Server
    from mcp.server.sse import SseServerTransport
    from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
    from starlette.applications import Starlette
    from starlette.routing import Mount, Route

    _quiet_sdk_noise()
    names = _tool_names(wanted.name)
    where = f"container {wanted.name} (image {wanted.image}) on the DTMA stand-in"
    tools = [
        types.Tool(
            name=names["echo"],
            description=f"Echo the given text back. Served by {where}.",
            inputSchema={
                "type": "object",
                "properties": {"text": {"type": "string", "description": "what to echo"}},
                "required": ["text"],
            },
        ),
        types.Tool(
            name=names["add"],
            description=f"Add two numbers. Served by {where}.",
            inputSchema={
                "type": "object",
                "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                "required": ["a", "b"],
            },
        ),
        types.Tool(
            name=names["now"],
            description=f"The current time (UTC, ISO 8601). Served by {where}.",
            inputSchema={"type": "object", "properties": {}},
        ),
    ]
    server: Any = Server(
        wanted.name,
        version=_version(wanted.image),
        instructions=f"A stand-in MCP server for {where}.",
    )

    @server.list_tools()
    async def list_tools() -> list[Any]:
        return tools

    @server.call_tool()
    async def call_tool(name: str, arguments: dict[str, Any]) -> Any:
        if name == names["echo"]:
            text = str(arguments["text"])
        elif name == names["add"]:
            total = arguments["a"] + arguments["b"]
            return [types.TextContent(type="text", text=str(total))], {"sum": total}
        elif name == names["now"]:
            text = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        else:
            raise ValueError(f"unknown tool {name}")
        return [types.TextContent(type="text", text=text)]

    sessions = StreamableHTTPSessionManager(app=server)
    sse = SseServerTransport(SSE_MESSAGES_PATH)

    class StreamableHttp:
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            await sessions.handle_request(scope, receive, send)

    class Sse:
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            async with sse.connect_sse(scope, receive, send) as (read, write):
                await server.run(read, write, server.create_initialization_options())

    routes = [
        Route(wanted.path, endpoint=StreamableHttp()),
        Route(SSE_PATH, endpoint=Sse(), methods=["GET"]),
        Mount(SSE_MESSAGES_PATH, app=sse.handle_post_message),
    ]
    return Starlette(routes=routes, lifespan=lambda _app: sessions.run())


class _ClosedStreamNoise(logging.Filter):
    """The SDK logs an error with a traceback whenever a client ends its session (DELETE); not news here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Error in standalone SSE writer")


_noise_filter = _ClosedStreamNoise()


def _quiet_sdk_noise() -> None:
    sdk_logger = logging.getLogger("mcp.server.streamable_http")
    if _noise_filter not in sdk_logger.filters:
        sdk_logger.addFilter(_noise_filter)
