"""Speak MCP to a deployed server: the handshake, tool discovery, and a verdict a user can act on.

`probe(target)` connects to one MCP server the way an MCP client would (the official `mcp` SDK,
streamable HTTP or the older HTTP+SSE transport), runs `initialize` and `tools/list` (and
`resources/list` / `prompts/list` when the server's capabilities offer them), and answers a
`ProbeResult`: what the server said about itself and its tools, or one sentence naming the
endpoint and what to fix, with a machine-readable `error_kind`. `probe_many` runs several probes
on one event loop with bounded concurrency. docs/mcp-health.md describes the kinds and limits.

Nothing the server sends is trusted:

* Only the given host and port are contacted. The address must pass the rule the DTMA client
  applies (`shared.core.addresses.is_internal`, relaxed by `allow_private`, which callers take
  from ALLOW_PRIVATE_TOOLBOX_IPS); a hostname is refused rather than resolved. Every request is
  checked against that host and port before it is sent.
* No redirects (the SDK would follow same-origin 307/308 by itself: `max_redirects=0` stops it),
  no proxies or netrc from the environment, no cookies and no credentials.
* One wall-clock budget (`timeout`) covers connecting, the handshake, every listing and closing
  the session; `max_bytes` caps what is read from the server over the whole probe, counted on the
  wire with compression refused (a compressed answer is not decoded), so memory stays bounded.
* Strings kept are plain text without control characters and length-capped; at most 256 tools,
  descriptions cut to 1 KiB, schemas cut to 8 KiB. Error sentences quote at most a short,
  sanitised snippet of what the server said.
* Streamable HTTP's optional server-to-client GET stream is not opened (answered 405 locally), and
  the session is ended with its DELETE, so a probe holds one connection and leaves no session.

Verdicts come from what is seen on the wire (each response's status and content type, judged as it
arrives by the probe's own httpx transport) and from what httpx and the SDK raise; the SDK only logs
some failures and then waits, so the transport ends the probe as soon as it sees one.

The SDK and anyio are imported inside `probe`/`probe_many` only: importing this module costs a
function's cold start nothing beyond httpx, which the DTMA client already loads.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import json
import math
import os
import re
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx

from shared.core.addresses import is_internal

if TYPE_CHECKING:
    from anyio import CancelScope

TRANSPORTS = ("streamable_http", "sse", "stdio")
ERROR_KINDS = ("refused", "timeout", "needs_auth", "not_mcp", "wrong_transport", "stdio", "address_refused",
               "too_large", "failed")
MAX_TOOLS = 256
MAX_PAGES = 16                 # list pages followed per listing (a cursor that never ends stops here)
MAX_DESCRIPTION_BYTES = 1024
MAX_NAME_BYTES = 256           # tool names, server name
MAX_VERSION_BYTES = 128        # server version, protocol version
MAX_SCHEMA_BYTES = 8192        # one tool's input schema, serialised
MAX_CAPABILITIES_BYTES = 4096
MAX_JSON_DEPTH = 32
SNIPPET_CHARS = 60             # the most of the server's own text an error sentence quotes
USER_AGENT = "mcp-control-plane-probe"
TRUNCATED_SCHEMA: dict[str, Any] = {"type": "object", "x-truncated": True}

# Control characters (C0 but tab/newline, DEL, C1), zero-width and bidirectional controls, line and
# paragraph separators, BOM, and lone surrogates (which UTF-8 and jsonb cannot hold). Compiled on
# first use (`_patterns`): compiling at import would add to every cold start.
_UNSAFE = "\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ud800-\udfff"


@dataclass(frozen=True)
class ProbeTarget:
    """One MCP server to probe: where it listens and how it speaks."""

    instance_id: str
    host: str          # the toolbox's address (or 127.0.0.1 for a loopback-published server)
    port: int          # the instance's host port
    path: str          # endpoint path, e.g. "/mcp" or "/sse"
    transport: str     # "streamable_http" | "sse" | "stdio"


@dataclass(frozen=True)
class ProbeResult:
    """What one probe found: the server and its tools, or why it did not answer as MCP."""

    instance_id: str
    ok: bool
    checked_at: str            # ISO-8601 UTC
    endpoint: str              # http://host:port/path
    duration_ms: float
    error: str | None          # one sentence naming the endpoint and what to fix, None when ok
    error_kind: str | None     # one of ERROR_KINDS, None when ok
    protocol_version: str | None
    server_name: str | None
    server_version: str | None
    capabilities: dict[str, Any]
    tools: list[dict[str, Any]]      # {name, description, input_schema}; at most 256, description cut to 1 KiB
    resources_count: int | None
    prompts_count: int | None

    def to_json(self) -> dict[str, Any]:
        """JSON-able, what gets stored in mcp_discovery_metadata (the same keys as the fields)."""
        return asdict(self)


def probe(target: ProbeTarget, *, timeout: float, max_bytes: int, allow_private: bool) -> ProbeResult:
    """Probe one server (an event loop of its own; see `probe_many` to probe several at once)."""
    return probe_many([target], timeout=timeout, max_bytes=max_bytes, allow_private=allow_private,
                      concurrency=1)[0]


_IMPORT_LOCK = threading.Lock()


def probe_many(targets: Sequence[ProbeTarget], *, timeout: float, max_bytes: int, allow_private: bool,
               concurrency: int) -> list[ProbeResult]:
    """One result per target, in the same order; at most `concurrency` probes run at a time, each
    within `timeout` seconds, on one event loop for the whole call."""
    if timeout <= 0 or max_bytes <= 0 or concurrency < 1:
        raise ValueError("probe_many needs timeout > 0, max_bytes > 0 and concurrency >= 1")
    results: list[ProbeResult | None] = [_refusal(t, allow_private) for t in targets]
    pending = [i for i, result in enumerate(results) if result is None]
    if pending:
        # Heavy (~0.5 s cold): only when something is probed over the network, and before any
        # probe's clock starts, so the first probe of a process does not spend its budget importing.
        # The SDK imports itself in a circle: two threads importing it for the first time at once
        # can both fail ("cannot import name ... circular import"), so the first import is serialised.
        with _IMPORT_LOCK:
            import anyio
            import mcp.client.sse
            import mcp.client.streamable_http  # noqa: F401

        async def run_all() -> None:
            limiter = anyio.CapacityLimiter(concurrency)

            async def one(i: int) -> None:
                async with limiter:
                    results[i] = await _probe_one(targets[i], timeout, max_bytes)

            async with anyio.create_task_group() as tg:
                for i in pending:
                    tg.start_soon(one, i)

        anyio.run(run_all)
    return [r for r in results if r is not None]


# --- what is refused before any connection ----------------------------------------------------

def endpoint_of(target: ProbeTarget) -> str:
    """`http://host:port/path` (IPv6 in brackets, the path percent-encoded where needed)."""
    host = str(target.host or "").split("/")[0].strip("[]")
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        host = quote(_line(host, 64) or "?", safe=".-_")
    if ":" in host:
        host = f"[{host}]"
    path = str(target.path or "/")
    path = quote(path if path.startswith("/") else "/" + path, safe="/:@!$&'()*+,;=-._~%?")
    return f"http://{host}:{target.port}{path[:512]}"


def _refusal(target: ProbeTarget, allow_private: bool) -> ProbeResult | None:
    """The result of a target that is not probed (stdio, an address the backend must not contact),
    or None when it may be probed."""
    endpoint = endpoint_of(target)
    if target.transport == "stdio":
        return _failure(target, endpoint, 0.0, "stdio",
                        f"{endpoint} is not probed: a stdio MCP server talks only to the process that starts "
                        "it and is not reachable over the network (deploy it with the streamable_http or sse "
                        "transport to have it checked)")
    if target.transport not in TRANSPORTS:
        return _failure(target, endpoint, 0.0, "wrong_transport",
                        f"{endpoint} is not probed: transport {_quote(target.transport)} is not one of "
                        "streamable_http, sse or stdio")
    try:
        address = ipaddress.ip_address(str(target.host or "").split("/")[0].strip("[]"))
    except ValueError:
        return _failure(target, endpoint, 0.0, "address_refused",
                        f"{endpoint} is not probed: {_quote(target.host)} is not an IP address, and the probe "
                        "only connects to the toolbox's own recorded address")
    if not isinstance(target.port, int) or not 0 < target.port < 65536:
        return _failure(target, endpoint, 0.0, "address_refused",
                        f"{endpoint} is not probed: {_quote(target.port)} is not a TCP port (1-65535)")
    if is_internal(address) and not allow_private:
        return _failure(target, endpoint, 0.0, "address_refused",
                        f"{endpoint} is not probed: {address} is not a public address, so the backend does not "
                        "contact it (set ALLOW_PRIVATE_TOOLBOX_IPS=true for local development)")
    return None


# --- one probe --------------------------------------------------------------------------------

class _TooLarge(Exception):
    """The server sent more than max_bytes; raised from the response stream to stop reading."""


class _Watch:
    """What the probe saw on the wire, and the budget it can cut short.

    The SDK swallows several failures (a body that is not JSON-RPC, an unexpected content type,
    an error answer to an SSE message post) and would wait for the budget to run out; the
    transport below judges each response as it arrives, records the first failure here and
    cancels the probe at once."""

    def __init__(self, target: ProbeTarget, host: str, endpoint: str, max_bytes: int) -> None:
        self.target = target
        self.host = host
        self.endpoint = endpoint
        self.max_bytes = max_bytes
        self.bytes_read = 0
        self.failure: tuple[str, str] | None = None
        self.scope: CancelScope | None = None
        self.last_answer = "an answer"  # "200 application/json", for sentences

    def fail(self, kind: str, sentence: str) -> None:
        if self.failure is None:
            self.failure = (kind, sentence)
        if self.scope is not None:
            self.scope.cancel()

    def judge(self, request: httpx.Request, response: httpx.Response) -> None:
        """Record the failure a response means, if it means one."""
        status = response.status_code
        ctype = _line(response.headers.get("content-type", "").split(";")[0].strip().lower(), 40) or "no content type"
        self.last_answer = f"{status} {ctype}"
        ep, method, sse = self.endpoint, request.method, self.target.transport == "sse"
        if method == "DELETE" or (method == "GET" and not sse):
            return  # ending the session, and streamable HTTP's optional server-to-client stream
        if 300 <= status < 400:
            location = request.url.join(response.headers.get("location", ""))
            if (location.scheme, location.host, location.port) == (request.url.scheme, request.url.host,
                                                                 request.url.port):
                self.fail("wrong_transport", f"{ep} answered {status} redirecting to {_quote(location.path)}: "
                                             "redirects are not followed; set the server's path to that path")
            else:
                self.fail("not_mcp", f"{ep} answered {status} redirecting to another address "
                                     f"({_quote(_authority(location))}): redirects are not followed, so this is "
                                     "not an MCP endpoint the backend can check")
        elif status in (401, 403):
            self.fail("needs_auth", f"{ep} answered {status}: the server needs authentication, which the probe "
                                    "does not send (credentials in its env?)")
        elif status == 421:
            self.fail("failed", f"{ep} answered 421: the server refuses the Host header {_authority(request.url)} "
                                "(DNS-rebinding protection); allow that host in its settings")
        elif (status in (404, 405, 406, 415) or (status == 400 and sse)) and (method == "GET" or not sse):
            other = "streamable_http at /mcp" if sse else "sse at /sse"
            self.fail("wrong_transport", f"{ep} answered {status} to an MCP {method}: wrong transport or path "
                                         f"(try {other})")
        elif status >= 400:
            what = "an MCP message" if sse and method == "POST" else "the MCP handshake"
            hint = "the server failed (its container logs say why)" if status >= 500 else \
                "the server rejected it; check the server's transport and path"
            self.fail("failed", f"{ep} answered {status} to {what}: {hint}")
        elif sse and method == "GET":
            if status == 200 and ctype != "text/event-stream":
                self.fail("not_mcp", f"{ep} is not an MCP SSE endpoint (answered {status} {ctype}); check the path "
                                     "and transport")
        elif method == "POST" and not sse and _is_request(request):
            if status in (202, 204):
                self.fail("not_mcp", f"{ep} is not an MCP endpoint (answered {status} with no JSON-RPC response "
                                     "to a request)")
            elif ctype not in ("application/json", "text/event-stream"):
                self.fail("not_mcp", f"{ep} is not an MCP endpoint (answered {status} {ctype}); check the path "
                                     "and transport")

    def check_endpoint_event(self, url: httpx.URL, head: bytes) -> None:
        """Fail when the SSE stream's first `endpoint` event names another origin than the stream's."""
        found = re.search(rb"(?:^|\n)event: ?endpoint\r?\ndata: ?([^\r\n]*)\r?\n", head)
        if found is None:
            return
        try:
            target = url.join(found.group(1).decode("utf-8", "replace").strip())
        except httpx.InvalidURL:
            return  # the SDK's own parsing decides
        if (target.scheme, target.host, target.port) != (url.scheme, url.host, url.port):
            self.fail("address_refused", f"{self.endpoint} named another address for its messages "
                                         f"({_quote(_authority(target))}); the probe only contacts the server's "
                                         "own address")

    def count(self, size: int) -> None:
        self.bytes_read += size
        if self.bytes_read > self.max_bytes:
            self.fail("too_large", f"{self.endpoint} sent more than {self.max_bytes} bytes during the MCP "
                                   "handshake and listing: the probe stopped reading; a server's answers to "
                                   "initialize and tools/list should be far smaller")
            raise _TooLarge(f"more than {self.max_bytes} bytes")


def _is_request(request: httpx.Request) -> bool:
    """Whether the body (the SDK's own JSON) is a JSON-RPC request, which must get a response."""
    try:
        body = json.loads(request.content or b"null")
    except ValueError:
        return False
    return isinstance(body, dict) and "id" in body and "method" in body


class _CountedStream(httpx.AsyncByteStream):
    """A response body, counted against max_bytes. The SSE transport's event stream is also read for
    its `endpoint` event: the SDK refuses one on another origin but then waits forever (mcp 1.30),
    so the probe checks it first and stops at once."""

    def __init__(self, inner: httpx.AsyncByteStream, watch: _Watch, sse_url: httpx.URL | None) -> None:
        self._inner = inner
        self._watch = watch
        self._sse_url = sse_url
        self._head = b""

    async def __aiter__(self):  # noqa: ANN204 - an async iterator of bytes
        async for chunk in self._inner:
            self._watch.count(len(chunk))
            if self._sse_url is not None and len(self._head) < 8192:
                self._head += chunk[:8192]
                self._watch.check_endpoint_event(self._sse_url, self._head)
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


@functools.cache
def _no_tls() -> ssl.SSLContext:
    """The TLS context of every probe's transport, built once: httpx would otherwise load the CA
    bundle for each client (~20 ms). It is never used (only http:// is sent); trusting no CA, it
    would refuse any certificate."""
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


class _GuardedTransport(httpx.AsyncBaseTransport):
    """Sends only to the target's host and port, strips cookies and credentials, refuses
    compression, judges every response and counts every byte read."""

    def __init__(self, watch: _Watch) -> None:
        self._watch = watch
        self._inner = httpx.AsyncHTTPTransport(retries=0, trust_env=False, verify=_no_tls(),
                                               limits=httpx.Limits(max_connections=4, max_keepalive_connections=2))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        watch = self._watch
        url = request.url
        if url.scheme != "http" or url.host != watch.host or url.port != watch.target.port:
            watch.fail("address_refused", f"{watch.endpoint} told the probe to send to {_quote(_authority(url))}; "
                                          "the probe only contacts the server's own address")
            raise httpx.ConnectError("refused: not the probed address", request=request)
        if request.method == "GET" and watch.target.transport == "streamable_http":
            # The optional server-to-client stream the SDK opens after the handshake: the probe needs
            # nothing from it, so it is answered here as a server without one would (405), sparing
            # the server a connection and the error it logs when the session ends under it.
            return httpx.Response(405, request=request)
        for name in ("cookie", "authorization", "proxy-authorization"):
            if name in request.headers:
                del request.headers[name]
        request.headers["accept-encoding"] = "identity"
        response = await self._inner.handle_async_request(request)
        watch.judge(request, response)
        headers = [(k, v) for k, v in response.headers.raw if k.lower() != b"content-encoding"]
        assert isinstance(response.stream, httpx.AsyncByteStream)
        sse_url = url if watch.target.transport == "sse" and request.method == "GET" else None
        return httpx.Response(response.status_code, headers=headers, extensions=response.extensions,
                              stream=_CountedStream(response.stream, watch, sse_url))

    async def aclose(self) -> None:
        await self._inner.aclose()


class _State:
    """What one probe has learnt so far (a plain class: a dataclass costs import time)."""

    def __init__(self) -> None:
        self.phase = "handshake"  # what the probe waits for: handshake, tools/list, resources/list, ...
        self.done = False
        self.error: Exception | None = None
        self.protocol_version: str | None = None
        self.server_name: str | None = None
        self.server_version: str | None = None
        self.capabilities: dict[str, Any] = {}
        self.tools: list[dict[str, Any]] = []
        self.resources_count: int | None = None
        self.prompts_count: int | None = None


async def _probe_one(target: ProbeTarget, timeout: float, max_bytes: int) -> ProbeResult:
    started = time.monotonic()
    checked_at = _now()
    endpoint = endpoint_of(target)
    try:
        return await _probe_network(target, endpoint, checked_at, started, timeout, max_bytes)
    except Exception as exc:  # a probe never breaks the others; a bug here is reported, not raised
        return _failure(target, endpoint, _ms(started), "failed",
                        f"{endpoint} could not be probed ({type(exc).__name__}); the probe itself failed",
                        checked_at)


async def _probe_network(target: ProbeTarget, endpoint: str, checked_at: str, started: float, timeout: float,
                         max_bytes: int) -> ProbeResult:
    import anyio  # imported lazily: see the module docstring

    host = str(ipaddress.ip_address(str(target.host).split("/")[0].strip("[]")))
    watch = _Watch(target, host, endpoint, max_bytes)
    state = _State()
    with anyio.CancelScope(deadline=anyio.current_time() + timeout) as scope:
        watch.scope = scope
        try:
            await _converse(target, endpoint, watch, state, timeout)
        except Exception as exc:
            state.error = exc
    duration = _ms(started)
    if state.done:
        return ProbeResult(target.instance_id, True, checked_at, endpoint, duration, None, None,
                           state.protocol_version, state.server_name, state.server_version, state.capabilities,
                           state.tools, state.resources_count, state.prompts_count)
    if watch.failure is not None:
        kind, sentence = watch.failure
    elif state.error is not None and (found := _classify(state.error, endpoint, watch, state, timeout)):
        kind, sentence = found
    else:
        kind, sentence = "timeout", _timeout_sentence(endpoint, state, timeout)
    return ProbeResult(target.instance_id, False, checked_at, endpoint, duration, sentence, kind,
                       state.protocol_version, state.server_name, state.server_version, state.capabilities,
                       state.tools, state.resources_count, state.prompts_count)


async def _converse(target: ProbeTarget, endpoint: str, watch: _Watch, state: _State, timeout: float) -> None:
    from mcp import ClientSession
    from mcp.types import Implementation

    def http_client(**_sdk_defaults: Any) -> httpx.AsyncClient:
        # The SDK's factory arguments (its headers, timeouts and auth) are ignored on purpose.
        return httpx.AsyncClient(transport=_GuardedTransport(watch), timeout=httpx.Timeout(timeout),
                                 follow_redirects=False, max_redirects=0, trust_env=False,
                                 headers={"User-Agent": USER_AGENT})

    async def on_message(message: Any) -> None:
        # The SDK hands a message it could not use here, then goes on waiting for the answer.
        if isinstance(message, Exception) and not isinstance(message, _TooLarge):
            if "unknown request id" in str(message).lower():
                what = "a JSON-RPC response to a request the probe did not send"
            else:
                what = f"{watch.last_answer} that is not JSON-RPC"
            watch.fail("not_mcp", f"{endpoint} is not an MCP endpoint (answered {what}); check the path and "
                                  "transport")

    async def talk(read: Any, write: Any) -> None:
        async with ClientSession(read, write, message_handler=on_message,
                                 client_info=Implementation(name=USER_AGENT, version="1")) as session:
            await _discover(session, state)

    if target.transport == "sse":
        from mcp.client.sse import sse_client

        async with sse_client(endpoint, timeout=timeout, sse_read_timeout=timeout,
                              httpx_client_factory=http_client) as (read, write):
            await talk(read, write)
    else:
        from mcp.client.streamable_http import streamable_http_client

        async with http_client() as client, streamable_http_client(endpoint, http_client=client) as (read, write, _):
            await talk(read, write)


async def _discover(session: Any, state: _State) -> None:
    from mcp.shared.exceptions import McpError

    init = await session.initialize()
    state.protocol_version = _line(init.protocolVersion, MAX_VERSION_BYTES)
    state.server_name = _line(init.serverInfo.name, MAX_NAME_BYTES)
    state.server_version = _line(init.serverInfo.version, MAX_VERSION_BYTES)
    capabilities = init.capabilities
    state.capabilities = _capabilities(capabilities.model_dump(mode="json", by_alias=True, exclude_none=True))
    if capabilities.tools is not None:
        state.phase = "tools/list"
        async for tool in _paged(session.list_tools, "tools"):
            if len(state.tools) >= MAX_TOOLS:
                break
            state.tools.append(_tool(tool))
    for name, capability, lister in (("resources", capabilities.resources, session.list_resources),
                                     ("prompts", capabilities.prompts, session.list_prompts)):
        if capability is None:
            continue
        state.phase = f"{name}/list"
        count = 0
        try:
            async for _ in _paged(lister, name):
                count += 1
        except McpError:
            continue  # offered but not listable: the count stays unknown; tools decide health
        setattr(state, f"{name}_count", count)
    state.done = True


async def _paged(lister: Callable[..., Any], attribute: str):  # noqa: ANN202 - an async iterator
    """The items of a paginated listing, at most MAX_PAGES pages, stopping on a repeated cursor."""
    from mcp.types import PaginatedRequestParams

    cursor: str | None = None
    seen: set[str] = set()
    for _ in range(MAX_PAGES):
        page = await lister(params=PaginatedRequestParams(cursor=cursor) if cursor else None)
        for item in getattr(page, attribute):
            yield item
        cursor = page.nextCursor
        if not cursor or cursor in seen:
            return
        seen.add(cursor)


def _tool(tool: Any) -> dict[str, Any]:
    schema = _json_value(tool.inputSchema, 0)
    if not isinstance(schema, dict) or len(json.dumps(schema, ensure_ascii=False).encode()) > MAX_SCHEMA_BYTES:
        schema = dict(TRUNCATED_SCHEMA)
    return {"name": _line(tool.name, MAX_NAME_BYTES) or "",
            "description": _text(tool.description, MAX_DESCRIPTION_BYTES),
            "input_schema": schema}


def _capabilities(raw: dict[str, Any]) -> dict[str, Any]:
    capabilities = _json_value(raw, 0)
    if not isinstance(capabilities, dict):
        return {}
    if len(json.dumps(capabilities, ensure_ascii=False).encode()) > MAX_CAPABILITIES_BYTES:
        return {key: {} for key in list(capabilities)[:32]}
    return capabilities


# --- classifying what the SDK and httpx raised -------------------------------------------------

def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _os_error(exc: BaseException | None, depth: int = 0) -> OSError | None:
    """The operating system's error under an exception (httpx wraps httpcore wraps anyio wraps it)."""
    if exc is None or depth > 8:
        return None
    if isinstance(exc, OSError) and exc.errno:
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := _os_error(inner, depth + 1)) is not None:
                return found
    return _os_error(exc.__cause__ or exc.__context__, depth + 1)


def _classify(error: Exception, ep: str, watch: _Watch, state: _State,
              timeout: float) -> tuple[str, str] | None:
    """(kind, sentence) for the most telling exception the probe raised, None for a timeout."""
    import anyio
    from mcp.shared.exceptions import McpError
    from pydantic import ValidationError

    secondary = (anyio.get_cancelled_exc_class(), anyio.ClosedResourceError, anyio.BrokenResourceError,
                 anyio.EndOfStream)
    leaves = _leaves(error)
    telling = [e for e in leaves if not isinstance(e, secondary)] or leaves
    exc = next((e for e in telling if isinstance(e, httpx.HTTPError)), telling[0])
    if isinstance(exc, httpx.HTTPStatusError):
        watch.judge(exc.request, exc.response)
        return watch.failure or ("failed", f"{ep} answered {watch.last_answer} to the MCP handshake; see the "
                                           "server's logs")
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return None
    if isinstance(exc, httpx.ConnectError):
        cause = _os_error(exc)
        if cause is not None and cause.errno == errno.ECONNREFUSED:
            return "refused", (f"nothing listens on {ep} (connection refused): the container runs but its MCP server "
                               "is not up, or it listens on another port than the published container port")
        reason = os.strerror(cause.errno).lower() if cause is not None and cause.errno else _line(str(exc), 80)
        return "refused", (f"{ep} could not be reached ({reason}): check that the toolbox is up and that its "
                           f"firewall lets the backend reach port {watch.target.port}")
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError):
        text = str(exc).lower()
        if "disconnected" in text or isinstance(exc, httpx.ReadError | httpx.WriteError):
            return "failed", (f"{ep} closed the connection without answering: the server crashed on the request, "
                              "or this port speaks another protocol than HTTP")
        return "not_mcp", (f"{ep} is not an MCP endpoint (it answered bytes that are not HTTP: "
                           f"{_quote(str(exc))}); check the port")
    if isinstance(exc, McpError):
        if state.phase == "tools/list":
            return "failed", (f"{ep} answered the MCP handshake but tools/list failed: {_quote(exc.error.message)}; "
                              "see the server's logs")
        if exc.error.code == -32000 or "closed" in str(exc.error.message).lower():
            return "failed", (f"{ep} closed the MCP session before answering {state.phase}: see the server's logs")
        return "failed", f"{ep} refused the MCP handshake: {_quote(exc.error.message)}; see the server's logs"
    if isinstance(exc, RuntimeError) and "protocol version" in str(exc).lower():
        return "failed", (f"{ep} answered with MCP protocol version {_quote(str(exc).rsplit(':', 1)[-1].strip())}, "
                          "which the probe does not speak: update the server's MCP SDK")
    if isinstance(exc, ValidationError):
        what = "initialize" if state.phase == "handshake" else state.phase
        return "not_mcp", (f"{ep} is not an MCP endpoint (its answer to {what} is not a valid MCP result); check "
                           "the path and transport")
    if type(exc).__name__ == "SSEError":
        return "not_mcp", (f"{ep} is not an MCP SSE endpoint (answered {watch.last_answer}); check the path and "
                           "transport")
    if isinstance(exc, RuntimeError) and "started" in str(exc):
        return "not_mcp", (f"{ep} closed its event stream without naming a message endpoint: it is not an MCP SSE "
                           "endpoint; check the path and transport")
    return "failed", f"{ep} could not be probed ({type(exc).__name__}: {_quote(str(exc))}); see the server's logs"


def _timeout_sentence(ep: str, state: _State, timeout: float) -> str:
    if state.phase == "handshake":
        return (f"{ep} did not answer the MCP handshake within {timeout:g} s: it may still be starting, or it is "
                "stuck (see its container logs)")
    return f"{ep} answered the MCP handshake but not {state.phase} within {timeout:g} s: see its container logs"


# --- text from the server ---------------------------------------------------------------------

def _cut(text: str, limit_bytes: int) -> str:
    raw = text.encode("utf-8")
    if len(raw) <= limit_bytes:
        return text
    return raw[:max(limit_bytes - 3, 0)].decode("utf-8", "ignore") + "…"


@functools.cache
def _patterns() -> tuple[re.Pattern[str], re.Pattern[str], re.Pattern[str]]:
    """(unsafe in a line, unsafe in multi-line text, runs of whitespace)."""
    return re.compile(f"[\x00-\x1f{_UNSAFE}]"), re.compile(f"[\x00-\x08\x0b-\x1f{_UNSAFE}]"), re.compile(r"\s+")


def _line(value: Any, limit_bytes: int) -> str | None:
    """One line of plain text: no control characters, whitespace collapsed, at most limit_bytes."""
    if value is None:
        return None
    unsafe, _, spaces = _patterns()
    text = spaces.sub(" ", unsafe.sub("", str(value).replace("\n", " ").replace("\t", " "))).strip()
    return _cut(text, limit_bytes)


def _text(value: Any, limit_bytes: int) -> str | None:
    """Plain text that may keep newlines and tabs, at most limit_bytes."""
    if value is None:
        return None
    return _cut(_patterns()[1].sub("", str(value)), limit_bytes)


def _quote(value: Any) -> str:
    """A short snippet of something the server (or the target) said, fit for a sentence."""
    text = (_line(value, 4 * SNIPPET_CHARS) or "").replace('"', "'")
    if len(text) > SNIPPET_CHARS:
        text = text[:SNIPPET_CHARS - 1] + "…"
    return f'"{text}"'


def _authority(url: httpx.URL) -> str:
    host = url.host or "?"
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{url.port}" if url.port else host


def _json_value(value: Any, depth: int) -> Any:
    """A JSON value from the server made safe to store: strings sanitised and capped, no NaN or
    infinities, nesting at most MAX_JSON_DEPTH deep (deeper parts become null)."""
    if depth > MAX_JSON_DEPTH:
        return None
    if isinstance(value, dict):
        return {_line(k, MAX_NAME_BYTES) or "": _json_value(v, depth + 1) for k, v in list(value.items())[:512]}
    if isinstance(value, list | tuple):
        return [_json_value(v, depth + 1) for v in value[:512]]
    if isinstance(value, str):
        return _text(value, MAX_DESCRIPTION_BYTES)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value if abs(value) < 2**63 else None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return _line(value, MAX_DESCRIPTION_BYTES)


# --- results ----------------------------------------------------------------------------------

def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)


def _failure(target: ProbeTarget, endpoint: str, duration_ms: float, kind: str, sentence: str,
             checked_at: str | None = None) -> ProbeResult:
    return ProbeResult(target.instance_id, False, checked_at or _now(), endpoint, duration_ms, sentence, kind,
                       None, None, None, {}, [], None, None)
