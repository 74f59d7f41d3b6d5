"""The MCP probe (shared/adapters/mcp_probe.py) against real and hostile servers, all on loopback.

Real servers: the `mcp` SDK's own FastMCP over streamable HTTP (stateful SSE answers, and stateless
JSON answers) and over HTTP+SSE, served by uvicorn in a thread, and the reference server
`@modelcontextprotocol/server-everything` from npm (tests/js, pinned in its package-lock.json),
started over streamable HTTP. Hostile servers are plain sockets: they hang, hang up, answer
garbage, ask for credentials, answer HTML, stream without end, redirect elsewhere, or speak a
JSON-RPC that lies. Every verdict is checked for its kind and for a sentence that names the
endpoint; the limits (time, bytes, concurrency) are measured, not assumed.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from shared.adapters.dtma import AddressRefused, DtmaClient
from shared.adapters.mcp_probe import (
    ERROR_KINDS,
    MAX_DESCRIPTION_BYTES,
    MAX_TOOLS,
    TRUNCATED_SCHEMA,
    ProbeResult,
    ProbeTarget,
    _refusal,
    probe,
    probe_many,
)
from shared.core.addresses import INTERNAL_NETWORKS
from tests.helpers import closed_port

ROOT = Path(__file__).resolve().parents[1]
JS_DIR = Path(__file__).resolve().parent / "js"
EVERYTHING = "@modelcontextprotocol/server-everything"
EVERYTHING_VERSION = json.loads((JS_DIR / "package.json").read_text())["dependencies"][EVERYTHING]
NPM_INSTALL_SECONDS = 240
OFFLINE_MARKERS = ("ENOTFOUND", "EAI_AGAIN", "ETIMEDOUT", "ECONNREFUSED", "ECONNRESET", "ENETUNREACH",
                   "network request", "getaddrinfo", "socket hang up", "self-signed certificate")
TIMEOUT = 3.0
MAX_BYTES = 1 << 20
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


def target(port: int, path: str = "/mcp", transport: str = "streamable_http", host: str = "127.0.0.1",
           instance_id: str = "inst-1") -> ProbeTarget:
    return ProbeTarget(instance_id=instance_id, host=host, port=port, path=path, transport=transport)


def run(t: ProbeTarget, *, timeout: float = TIMEOUT, max_bytes: int = MAX_BYTES,
        allow_private: bool = True) -> ProbeResult:
    return probe(t, timeout=timeout, max_bytes=max_bytes, allow_private=allow_private)


def failed(result: ProbeResult, kind: str) -> str:
    """Assert a failure of `kind` whose sentence names the endpoint, is one clean line, and return it."""
    assert not result.ok, result
    assert result.error_kind == kind, result.error
    assert result.error_kind in ERROR_KINDS
    sentence = result.error
    assert sentence is not None and result.endpoint in sentence, sentence
    assert not CONTROL.search(sentence), repr(sentence)
    assert result.tools == [], result
    json.dumps(result.to_json(), allow_nan=False)
    return sentence


# --- real SDK servers (uvicorn in a thread) -----------------------------------------------------

class Uvicorn:
    """An ASGI app served by uvicorn on 127.0.0.1, in a thread."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Uvicorn:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def fastmcp(name: str, version: str, **settings: Any) -> Any:
    from mcp.server.fastmcp import FastMCP

    server = FastMCP(name, **settings)
    server._mcp_server.version = version  # FastMCP reports the SDK's version unless told otherwise

    @server.tool()
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @server.tool()
    def echo(text: str, times: int = 1) -> str:
        """Repeat a text."""
        return text * times

    @server.tool()
    def now() -> str:
        """The server's clock."""
        return "12:00"

    @server.resource("probe://readme")
    def readme() -> str:
        return "read me"

    @server.prompt()
    def greet(name: str) -> str:
        return f"Hello {name}"

    return server


class Recorder:
    """ASGI middleware that records every request's headers and sets a cookie on every answer."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.requests: list[tuple[str, dict[str, str]]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        self.requests.append((scope["method"], {k.decode(): v.decode() for k, v in scope["headers"]}))

        async def send_with_cookie(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                   (b"set-cookie", b"session=secret; Path=/")]}
            await send(message)

        return await self.app(scope, receive, send_with_cookie)


@pytest.fixture(scope="module")
def sdk_http() -> Iterator[tuple[int, Recorder]]:
    """FastMCP over streamable HTTP at /mcp (stateful: a session id, SSE answers)."""
    app = Recorder(fastmcp("probe-test-server", "3.1.4").streamable_http_app())
    with Uvicorn(app) as served:
        yield served.port, app


@pytest.fixture(scope="module")
def sdk_http_json() -> Iterator[int]:
    """FastMCP over streamable HTTP, stateless with plain JSON answers."""
    with Uvicorn(fastmcp("probe-json-server", "0.9", stateless_http=True, json_response=True)
                 .streamable_http_app()) as served:
        yield served.port


@pytest.fixture(scope="module")
def sdk_sse() -> Iterator[int]:
    """FastMCP over the older HTTP+SSE transport at /sse."""
    with Uvicorn(fastmcp("probe-sse-server", "2.0.0").sse_app()) as served:
        yield served.port


def test_a_real_sdk_server_is_discovered(sdk_http: tuple[int, Recorder]) -> None:
    from mcp.shared.version import SUPPORTED_PROTOCOL_VERSIONS

    port, _ = sdk_http
    result = run(target(port, instance_id="inst-real"))
    assert result.ok, result.error
    assert (result.error, result.error_kind) == (None, None)
    assert result.instance_id == "inst-real"
    assert result.endpoint == f"http://127.0.0.1:{port}/mcp"
    assert (result.server_name, result.server_version) == ("probe-test-server", "3.1.4")
    assert result.protocol_version in SUPPORTED_PROTOCOL_VERSIONS
    assert {"tools", "resources", "prompts"} <= set(result.capabilities)
    tools = {tool["name"]: tool for tool in result.tools}
    assert set(tools) == {"add", "echo", "now"}
    assert tools["add"]["description"] == "Add two integers."
    assert tools["add"]["input_schema"]["type"] == "object"
    assert set(tools["add"]["input_schema"]["properties"]) == {"a", "b"}
    assert tools["add"]["input_schema"]["required"] == ["a", "b"]
    assert tools["echo"]["input_schema"]["properties"]["times"]["default"] == 1
    assert (result.resources_count, result.prompts_count) == (1, 1)
    assert 0 < result.duration_ms < TIMEOUT * 1000
    checked = datetime.fromisoformat(result.checked_at)
    assert checked.utcoffset() is not None and checked.utcoffset().total_seconds() == 0
    stored = json.loads(json.dumps(result.to_json(), allow_nan=False))
    assert set(stored) == set(ProbeResult.__dataclass_fields__)
    assert stored["tools"] == result.tools and stored["ok"] is True


def test_stateless_json_answers_are_discovered(sdk_http_json: int) -> None:
    result = run(target(sdk_http_json))
    assert result.ok, result.error
    assert result.server_name == "probe-json-server"
    assert sorted(tool["name"] for tool in result.tools) == ["add", "echo", "now"]


def test_an_sse_server_is_discovered(sdk_sse: int) -> None:
    result = run(target(sdk_sse, "/sse", "sse"))
    assert result.ok, result.error
    assert result.endpoint == f"http://127.0.0.1:{sdk_sse}/sse"
    assert (result.server_name, result.server_version) == ("probe-sse-server", "2.0.0")
    assert sorted(tool["name"] for tool in result.tools) == ["add", "echo", "now"]
    assert (result.resources_count, result.prompts_count) == (1, 1)


def test_no_cookies_credentials_compression_or_proxies(sdk_http: tuple[int, Recorder],
                                                       monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The server sets a cookie on every answer; proxies and a netrc in the environment point elsewhere.
    The probe still reaches the server directly and never sends the cookie back, nor credentials."""
    port, recorder = sdk_http
    dead = f"http://127.0.0.1:{closed_port()}"
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
        monkeypatch.setenv(name, dead)
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login user password hunter2\n")
    monkeypatch.setenv("NETRC", str(netrc))
    recorder.requests.clear()
    result = run(target(port))
    assert result.ok, result.error
    methods = [method for method, _ in recorder.requests]
    assert methods.count("POST") >= 3 and "DELETE" in methods  # the session is ended, not left behind
    assert "GET" not in methods  # the optional server-to-client stream is not opened
    for _, headers in recorder.requests:
        assert "cookie" not in headers and "authorization" not in headers, headers
        assert headers["user-agent"] == "mcp-control-plane-probe"
        assert headers.get("accept-encoding", "identity") == "identity"


@pytest.mark.parametrize(("server", "path", "transport", "kind", "says"), [
    ("sdk_sse", "/sse", "streamable_http", "wrong_transport", "answered 405 to an MCP POST: wrong transport or path"),
    ("sdk_http", "/mcp", "sse", "wrong_transport", "answered 400 to an MCP GET: wrong transport or path"),
    ("sdk_sse", "/mcp", "sse", "wrong_transport", "answered 404 to an MCP GET"),
    ("sdk_http", "/other", "streamable_http", "wrong_transport", "answered 404 to an MCP POST"),
    ("sdk_http", "/mcp/", "streamable_http", "wrong_transport", "answered 307 redirecting to \"/mcp\""),
])
def test_wrong_transport_or_path_on_real_servers(request: pytest.FixtureRequest, server: str, path: str,
                                                 transport: str, kind: str, says: str) -> None:
    port = request.getfixturevalue(server)
    port = port[0] if isinstance(port, tuple) else port
    sentence = failed(run(target(port, path, transport)), kind)
    assert says in sentence


# --- @modelcontextprotocol/server-everything (npm) ---------------------------------------------

def _everything_installed() -> bool:
    manifest = JS_DIR / "node_modules" / EVERYTHING / "package.json"
    return manifest.is_file() and json.loads(manifest.read_text())["version"] == EVERYTHING_VERSION


@pytest.fixture(scope="module")
def everything_modules() -> None:
    """tests/js's locked packages, installed with `npm ci` when the pinned server is missing; skipped
    (with the reason) without Node.js >= 20 and npm, or when the npm registry cannot be reached."""
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed: the server-everything test needs Node.js >= 20 and npm")
    version = subprocess.run(["node", "--version"], capture_output=True, text=True, check=True).stdout.strip()
    if int(version.lstrip("v").split(".")[0]) < 20:
        pytest.skip(f"Node.js {version} is too old: server-everything needs Node.js >= 20")
    if _everything_installed():
        return
    try:
        done = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=JS_DIR,
                              capture_output=True, text=True, timeout=NPM_INSTALL_SECONDS)
    except subprocess.TimeoutExpired:
        pytest.skip(f"npm ci did not finish within {NPM_INSTALL_SECONDS} s (is the npm registry reachable?)")
    output = done.stdout + done.stderr
    if done.returncode != 0:
        if any(marker in output for marker in OFFLINE_MARKERS):
            pytest.skip("the npm registry is unreachable, so server-everything cannot be installed:\n" + output[-800:])
        pytest.fail(f"npm ci failed:\n{output}")
    assert _everything_installed(), f"npm ci did not install {EVERYTHING} {EVERYTHING_VERSION}:\n{output}"


# server-everything listens on every interface at $PORT; this preload pins it to 127.0.0.1 on a free
# port and reports the port.
LOOPBACK_PRELOAD = """\
import net from "node:net";
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  if (typeof args[0] === "number" || typeof args[0] === "string") {
    args = [{ port: Number(args[0]), host: "127.0.0.1" }, ...args.slice(1).filter((a) => typeof a === "function")];
  }
  this.once("listening", () => process.stderr.write(`PROBE-TEST-LISTENING ${this.address().port}\\n`));
  return listen.apply(this, args);
};
"""


@pytest.fixture(scope="module")
def everything(everything_modules: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """server-everything over streamable HTTP at /mcp on a loopback port."""
    base = tmp_path_factory.mktemp("everything")
    preload = base / "loopback.mjs"
    preload.write_text(LOOPBACK_PRELOAD)
    log = base / "stderr.log"
    entry = JS_DIR / "node_modules" / EVERYTHING / "dist" / "index.js"
    with log.open("w") as err:
        process = subprocess.Popen(["node", "--import", preload.as_uri(), str(entry), "streamableHttp"],
                                   cwd=JS_DIR, env={**os.environ, "PORT": "0"}, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 30
        while not (found := re.search(r"PROBE-TEST-LISTENING (\d+)", log.read_text())):
            assert process.poll() is None, f"server-everything exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"server-everything did not start:\n{log.read_text()}"
            time.sleep(0.05)
        yield int(found.group(1))
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def test_the_reference_server_everything_is_discovered(everything: int) -> None:
    result = run(target(everything, instance_id="inst-everything"), timeout=10)
    assert result.ok, result.error
    assert result.server_name == "mcp-servers/everything"
    assert result.server_version
    names = [tool["name"] for tool in result.tools]
    assert len(names) > 5 and "echo" in names, names
    assert len(set(names)) == len(names)
    echo = next(tool for tool in result.tools if tool["name"] == "echo")
    assert echo["description"] and "message" in echo["input_schema"]["properties"]
    assert all(tool["input_schema"].get("type") == "object" for tool in result.tools)
    assert result.resources_count and result.resources_count > 0
    assert result.prompts_count and result.prompts_count > 0
    json.dumps(result.to_json(), allow_nan=False)


# --- hostile servers (plain sockets) -----------------------------------------------------------

class RawServer:
    """A TCP server that hands each connection to `handle(conn, server)` in its own thread, and
    counts connections (total, open now, most open at once) and bytes sent."""

    def __init__(self, handle: Callable[[socket.socket, RawServer], None], host: str = "127.0.0.1") -> None:
        self.handle = handle
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.create_server((host, 0), family=family, backlog=64)
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.connections = self.open = self.max_open = self.sent = 0
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.lifetimes: list[list[float]] = []  # [accepted, closed] per connection (monotonic)
        self.conns: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.acceptor = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> RawServer:
        self.acceptor.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.acceptor.join(5)
        self.listener.close()
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in self.threads:
            thread.join(5)

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            lifetime = [time.monotonic(), float("inf")]
            with self.lock:
                self.connections += 1
                self.open += 1
                self.max_open = max(self.max_open, self.open)
                self.conns.append(conn)
                self.lifetimes.append(lifetime)
            thread = threading.Thread(target=self._serve, args=(conn, lifetime), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket, lifetime: list[float]) -> None:
        try:
            self.handle(conn, self)
        except OSError:
            pass
        finally:
            with self.lock:
                self.open -= 1
                lifetime[1] = time.monotonic()
            conn.close()

    def most_at_once(self, grace: float = 0.1) -> int:
        """The most connections open together, not counting one that was closing (within `grace`
        seconds of its end) when the next arrived: the server notices a hang-up a moment late."""
        return max((sum(1 for start, end in self.lifetimes if start <= t < end - grace)
                    for t, _ in self.lifetimes), default=0)

    def read_request(self, conn: socket.socket) -> tuple[str, str, dict[str, str], bytes] | None:
        """One HTTP/1.1 request (None at EOF); recorded."""
        conn.settimeout(0.2)
        data = b""
        while b"\r\n\r\n" not in data:
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                if self.stop.is_set():
                    return None
                continue
            if not chunk:
                return None
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        while len(body) < int(headers.get("content-length", 0)):
            body += conn.recv(65536)
        with self.lock:
            self.requests.append((method, path, headers, body))
        return method, path, headers, body

    def hang(self, conn: socket.socket) -> None:
        while not self.stop.wait(0.05):
            pass


def http(status: str, headers: dict[str, str] | None = None, body: bytes = b"") -> bytes:
    head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def answering(status: str, headers: dict[str, str] | None = None, body: bytes = b"") -> Callable[..., None]:
    def handle(conn: socket.socket, server: RawServer) -> None:
        while server.read_request(conn) is not None:
            conn.sendall(http(status, headers, body))
    return handle


def hanging(conn: socket.socket, server: RawServer) -> None:
    """Reads the request, never answers; returns when the client hangs up."""
    server.read_request(conn)
    while not server.stop.is_set():
        try:
            if not conn.recv(65536):
                return
        except TimeoutError:
            continue


def closing_at_once(conn: socket.socket, server: RawServer) -> None:
    conn.close()


def garbage(conn: socket.socket, server: RawServer) -> None:
    server.read_request(conn)
    conn.sendall(b"\x00\x00\x01\x14\n\x14\xff\xfe\x1b[2J garbage\r\nmore: \x07 garbage\r\n\r\n" * 4)
    server.hang(conn)


def endless(content_type: str, first: bytes, chunk: bytes) -> Callable[..., None]:
    """200, then a body without end (no length: it ends when the connection does)."""
    def handle(conn: socket.socket, server: RawServer) -> None:
        server.read_request(conn)
        conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nConnection: close\r\n\r\n".encode() + first)
        while not server.stop.is_set():
            conn.sendall(chunk)
            server.sent += len(chunk)
    return handle


@pytest.fixture
def serve() -> Iterator[Callable[..., RawServer]]:
    started: list[RawServer] = []

    def start(handle: Callable[..., None], host: str = "127.0.0.1") -> RawServer:
        server = RawServer(handle, host).__enter__()
        started.append(server)
        return server

    yield start
    for server in started:
        server.__exit__(None, None, None)


def test_a_server_that_accepts_and_hangs_times_out_within_the_budget(serve: Callable[..., RawServer]) -> None:
    server = serve(hanging)
    result = run(target(server.port), timeout=0.5)
    sentence = failed(result, "timeout")
    assert sentence.startswith(f"http://127.0.0.1:{server.port}/mcp did not answer the MCP handshake within 0.5 s")
    assert 0.45 <= result.duration_ms / 1000 < 1.0, result.duration_ms
    assert server.connections == 1


def test_a_server_that_hangs_up_at_once(serve: Callable[..., RawServer]) -> None:
    server = serve(closing_at_once)
    result = run(target(server.port))
    assert "closed the connection without answering" in failed(result, "failed")
    assert result.duration_ms < TIMEOUT * 1000 / 2


def test_a_server_that_answers_garbage(serve: Callable[..., RawServer]) -> None:
    server = serve(garbage)
    result = run(target(server.port))
    sentence = failed(result, "not_mcp")
    assert "answered bytes that are not HTTP" in sentence
    assert result.duration_ms < TIMEOUT * 1000 / 2


@pytest.mark.parametrize(("status", "headers", "body", "kind", "says"), [
    ("401 Unauthorized", {"WWW-Authenticate": 'Bearer realm="mcp"'}, b'{"error":"unauthorized"}', "needs_auth",
     "answered 401: the server needs authentication"),
    ("403 Forbidden", {}, b"", "needs_auth", "answered 403"),
    ("200 OK", {"Content-Type": "text/html; charset=utf-8"}, b"<!doctype html><h1>It works</h1>", "not_mcp",
     "is not an MCP endpoint (answered 200 text/html)"),
    ("404 Not Found", {"Content-Type": "text/plain"}, b"Cannot POST /mcp", "wrong_transport",
     "answered 404 to an MCP POST: wrong transport or path (try sse at /sse)"),
    ("405 Method Not Allowed", {"Allow": "GET"}, b"", "wrong_transport", "answered 405 to an MCP POST"),
    ("500 Internal Server Error", {}, b"boom", "failed", "answered 500 to the MCP handshake: the server failed"),
    ("421 Misdirected Request", {}, b"Invalid Host header", "failed",
     "answered 421: the server refuses the Host header 127.0.0.1:"),
    ("200 OK", {"Content-Type": "application/json"}, b'{"not": "json-rpc", ', "not_mcp",
     "is not an MCP endpoint (answered 200 application/json that is not JSON-RPC)"),
    ("202 Accepted", {}, b"", "not_mcp", "answered 202 with no JSON-RPC response"),
])
def test_http_answers_that_are_not_mcp(serve: Callable[..., RawServer], status: str, headers: dict[str, str],
                                       body: bytes, kind: str, says: str) -> None:
    server = serve(answering(status, headers, body))
    result = run(target(server.port))
    sentence = failed(result, kind)
    assert says in sentence, sentence
    assert result.duration_ms < TIMEOUT * 1000 / 2, "judged from the answer, not by waiting for the budget"


@pytest.mark.parametrize(("transport", "content_type", "first", "chunk"), [
    ("streamable_http", "application/json", b'{"jsonrpc": "2.0", "id": 0, "result": {"x": "', b"x" * 65536),
    ("streamable_http", "text/event-stream", b"event: message\ndata: ", b"y" * 65536),
    ("sse", "text/event-stream", b"", b": keep-alive padding " + b"z" * 65536 + b"\n\n"),
])
def test_an_endless_body_is_cut_at_max_bytes(serve: Callable[..., RawServer], transport: str, content_type: str,
                                             first: bytes, chunk: bytes) -> None:
    server = serve(endless(content_type, first, chunk))
    run(target(server.port, transport=transport), timeout=1)  # warm: the SDK's imports are not the probe's memory
    limit = 256 * 1024
    tracemalloc.start()
    try:
        result = run(target(server.port, transport=transport), max_bytes=limit, timeout=10)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    sentence = failed(result, "too_large")
    assert f"sent more than {limit} bytes" in sentence
    assert result.duration_ms < 5000, "stopped by the byte cap, not by the budget"
    assert server.sent > limit
    assert peak < 12 * limit, f"peak {peak} bytes while reading a body without end"


def sse_stream(events: bytes) -> Callable[..., None]:
    """An SSE endpoint: 200 text/event-stream, `events`, then the stream stays open (b"" closes it)."""
    def handle(conn: socket.socket, server: RawServer) -> None:
        server.read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n" + events)
        if events:
            hanging(conn, server)
    return handle


def test_an_sse_server_naming_another_address_for_messages(serve: Callable[..., RawServer]) -> None:
    elsewhere = serve(answering("202 Accepted"), host="127.0.0.2")
    server = serve(sse_stream(f"event: endpoint\ndata: http://127.0.0.2:{elsewhere.port}/messages\n\n".encode()))
    result = run(target(server.port, "/sse", "sse"))
    assert "the probe only contacts the server's own address" in failed(result, "address_refused")
    assert elsewhere.connections == 0


def test_an_sse_stream_that_ends_without_an_endpoint(serve: Callable[..., RawServer]) -> None:
    server = serve(sse_stream(b""))
    result = run(target(server.port, "/sse", "sse"))
    assert "closed its event stream without naming a message endpoint" in failed(result, "not_mcp")


def test_an_sse_path_answering_html(serve: Callable[..., RawServer]) -> None:
    server = serve(answering("200 OK", {"Content-Type": "text/html"}, b"<html></html>"))
    result = run(target(server.port, "/sse", "sse"))
    assert "is not an MCP SSE endpoint (answered 200 text/html)" in failed(result, "not_mcp")


def test_a_redirect_to_another_host_is_not_followed(serve: Callable[..., RawServer]) -> None:
    elsewhere = serve(answering("200 OK", {"Content-Type": "application/json"}, b"{}"), host="127.0.0.2")
    location = f"http://127.0.0.2:{elsewhere.port}/mcp"
    for status in ("307 Temporary Redirect", "308 Permanent Redirect", "302 Found"):
        server = serve(answering(status, {"Location": location}))
        sentence = failed(run(target(server.port)), "not_mcp")
        assert f'redirecting to another address ("127.0.0.2:{elsewhere.port}")' in sentence
        assert "redirects are not followed" in sentence
        assert len(server.requests) == 1
    assert elsewhere.connections == 0


def test_a_redirect_on_the_same_server_is_not_followed_either(serve: Callable[..., RawServer]) -> None:
    server = serve(answering("307 Temporary Redirect", {"Location": "/mcp/"}))
    sentence = failed(run(target(server.port)), "wrong_transport")
    assert 'redirecting to "/mcp/": redirects are not followed; set the server\'s path' in sentence
    assert [request[:2] for request in server.requests] == [("POST", "/mcp")]


def test_an_ipv6_server(serve: Callable[..., RawServer]) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        server = serve(answering("401 Unauthorized"), host="::1")
    except OSError as exc:
        pytest.skip(f"cannot listen on ::1: {exc}")
    result = run(target(server.port, host="::1"))
    assert result.endpoint == f"http://[::1]:{server.port}/mcp"
    assert "answered 401" in failed(result, "needs_auth")


def test_a_closed_port_is_refused() -> None:
    port = closed_port()
    result = run(target(port))
    sentence = failed(result, "refused")
    assert sentence.startswith(f"nothing listens on http://127.0.0.1:{port}/mcp (connection refused): the "
                               "container runs but its MCP server is not up")
    assert result.duration_ms < 1000


@pytest.mark.parametrize("host", ["10.0.0.5", "192.168.1.20", "169.254.169.254", "100.64.0.1", "172.16.5.4",
                                  "127.0.0.1", "::1", "fd00::1", "::ffff:10.0.0.1", "0.0.0.0"])
def test_an_internal_address_is_refused_without_connecting(host: str) -> None:
    result = run(target(8080, host=host), allow_private=False)
    sentence = failed(result, "address_refused")
    assert "is not a public address" in sentence and "ALLOW_PRIVATE_TOOLBOX_IPS" in sentence
    assert result.duration_ms == 0.0


def test_refusals_open_no_event_loop_and_load_no_sdk() -> None:
    """Nothing is imported, let alone connected, for a target that is refused or not probed."""
    code = (
        "import sys\n"
        "from shared.adapters.mcp_probe import ProbeTarget, probe_many\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('mcp', 'anyio'))\n"
        "assert loaded == [], loaded\n"
        "targets = [ProbeTarget('a', '10.1.2.3', 8080, '/mcp', 'streamable_http'),\n"
        "           ProbeTarget('b', 'metadata.google.internal', 80, '/mcp', 'sse'),\n"
        "           ProbeTarget('c', '203.0.113.9', 8080, '/mcp', 'stdio')]\n"
        "results = probe_many(targets, timeout=1, max_bytes=1000, allow_private=False, concurrency=2)\n"
        "assert [r.error_kind for r in results] == ['address_refused', 'address_refused', 'stdio'], results\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('mcp', 'anyio', 'asyncio'))\n"
        "assert loaded == [], loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def _addresses() -> list[str]:
    """Every refused network's first and last address and the addresses just outside it, and a few
    public and internal ones (as tests/test_addresses.py feeds the Python and SQL rules)."""
    cases = ["8.8.8.8", "1.1.1.1", "203.0.114.1", "172.32.0.1", "2606:4700:4700::1111", "127.0.0.1", "10.1.2.3",
             "169.254.169.254", "::1", "fd00::1", "fe80::1", "::ffff:10.0.0.1", "64:ff9b::a00:1", "2001:db8::1"]
    for text in INTERNAL_NETWORKS:
        net = ipaddress.ip_network(text)
        cases += [str(net.network_address), str(net.broadcast_address)]
        for outside in (int(net.network_address) - 1, int(net.broadcast_address) + 1):
            if 0 <= outside < 2 ** net.max_prefixlen:
                cases.append(str(ipaddress.ip_address(outside) if net.version == 4 else ipaddress.IPv6Address(outside)))
    return sorted(set(cases))


@pytest.fixture(scope="module")
def dtma_clients() -> dict[bool, DtmaClient]:
    return {allow: DtmaClient(key_mode="legacy", legacy_key="k", allow_private=allow) for allow in (False, True)}


@pytest.mark.parametrize("address", _addresses())
def test_the_address_rule_is_the_dtma_clients(dtma_clients: dict[bool, DtmaClient], address: str) -> None:
    """The probe refuses exactly what the DTMA client refuses, before any connection."""
    for allow_private, dtma in dtma_clients.items():
        try:
            dtma.target({"id": "tb", "public_ip_address": address, "dtma_port": 30000})
            dtma_refuses = False
        except AddressRefused:
            dtma_refuses = True
        refusal = _refusal(target(8080, host=address), allow_private)
        assert (refusal is not None and refusal.error_kind == "address_refused") == dtma_refuses, address


def test_a_hostname_is_not_resolved() -> None:
    sentence = failed(run(target(80, host="localhost"), allow_private=True), "address_refused")
    assert '"localhost" is not an IP address' in sentence


def test_a_stdio_server_is_not_probed() -> None:
    result = run(target(0, path="", transport="stdio", host="203.0.113.7"), allow_private=False)
    sentence = failed(result, "stdio")
    assert "not reachable over the network" in sentence
    assert result.duration_ms == 0.0


def test_an_unknown_transport_is_not_probed() -> None:
    assert "is not one of streamable_http, sse or stdio" in failed(run(target(1, transport="websocket")),
                                                                   "wrong_transport")


# --- a JSON-RPC server that lies ---------------------------------------------------------------

INIT = {"protocolVersion": "2025-06-18", "capabilities": {"tools": {"listChanged": False}},
        "serverInfo": {"name": "scripted", "version": "1.0"}}


def scripted(answers: dict[str, Any]) -> Callable[..., None]:
    """A minimal streamable-HTTP MCP server answering JSON: answers[method] is the result, or a
    callable giving the whole JSON-RPC message (bytes are sent as they are)."""
    def handle(conn: socket.socket, server: RawServer) -> None:
        while (request := server.read_request(conn)) is not None:
            message = json.loads(request[3] or b"{}")
            if "id" not in message:
                conn.sendall(http("202 Accepted"))
                continue
            answer = answers.get(message.get("method"))
            if callable(answer):
                payload = answer(message)
            elif answer is None:
                payload = {"jsonrpc": "2.0", "id": message["id"], "error": {"code": -32601, "message": "no"}}
            else:
                payload = {"jsonrpc": "2.0", "id": message["id"], "result": answer}
            body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            conn.sendall(http("200 OK", {"Content-Type": "application/json"}, body))
    return handle


def test_what_the_server_says_is_sanitised_and_capped(serve: Callable[..., RawServer]) -> None:
    evil = "\x1b[31mred\x1b[0m\u202eevil\x00\u200bname\r\nInjected: header\x85\ufeff"
    deep: dict[str, Any] = {"type": "object"}
    for _ in range(60):
        deep = {"type": "object", "properties": {"x": deep}}
    tools = [{"name": f"tool-{i}-{evil}", "description": ("é" * 800) + evil * 20,
              "inputSchema": {"type": "object", "properties": {"n": {"type": "number", "default": 1.5,
                                                                     "description": evil}}}}
             for i in range(300)]
    tools[0]["inputSchema"] = {"type": "object", "properties": {"big": {"enum": ["v" * 500] * 40}}}
    tools[1]["inputSchema"] = deep
    init = {**INIT, "serverInfo": {"name": evil * 20, "version": evil},
            "capabilities": {"tools": {}, "experimental": {"k" * 50: {"v": "w" * 5000}}}}
    server = serve(scripted({"initialize": init, "tools/list": {"tools": tools}}))
    result = run(target(server.port), max_bytes=4 * MAX_BYTES)  # ~1.3 MB of listing
    assert result.ok, result.error
    stored = json.dumps(result.to_json(), allow_nan=False, ensure_ascii=False)
    assert "\\u0000" not in stored and "\\u001b" not in stored and "\u202e" not in stored
    assert not CONTROL.search(result.server_name or "") and len(result.server_name.encode()) <= 256
    assert result.server_name.startswith("[31mred[0mevilname Injected: header")
    assert not CONTROL.search(result.server_version or "")
    assert len(result.tools) == MAX_TOOLS
    for tool in result.tools:
        assert not CONTROL.search(tool["name"]) and tool["name"].startswith("tool-")
        assert len(tool["description"].encode()) <= MAX_DESCRIPTION_BYTES
        assert not CONTROL.search(tool["description"].replace("\n", " "))
    assert result.tools[0]["input_schema"] == TRUNCATED_SCHEMA   # 20 KB of schema
    assert len(json.dumps(result.tools[1]["input_schema"])) < 8192  # 60 levels: the deep end is cut
    assert result.tools[2]["input_schema"]["properties"]["n"]["default"] == 1.5
    assert set(result.capabilities) == {"tools", "experimental"}
    assert len(json.dumps(result.capabilities)) <= 4096


def test_a_listing_that_never_ends_stops(serve: Callable[..., RawServer]) -> None:
    pages = iter(range(10**6))

    def page(message: dict[str, Any]) -> dict[str, Any]:
        n = next(pages)
        return {"jsonrpc": "2.0", "id": message["id"],
                "result": {"tools": [{"name": f"t{n}", "inputSchema": {"type": "object"}}], "nextCursor": f"c{n}"}}

    server = serve(scripted({"initialize": INIT, "tools/list": page}))
    result = run(target(server.port))
    assert result.ok, result.error
    assert [tool["name"] for tool in result.tools] == [f"t{n}" for n in range(16)]
    assert result.tools[0]["description"] is None


@pytest.mark.parametrize(("answers", "kind", "says"), [
    ({"initialize": lambda m: {"jsonrpc": "2.0", "id": m["id"],
                               "error": {"code": -32600, "message": "go away\x1b[2J" + "!" * 200}}},
     "failed", 'refused the MCP handshake: "go away[2J!!!'),
    ({"initialize": {**INIT, "protocolVersion": "1999-01-01"}}, "failed",
     'answered with MCP protocol version "1999-01-01", which the probe does not speak'),
    ({"initialize": {"hello": "world"}}, "not_mcp", "its answer to initialize is not a valid MCP result"),
    ({"initialize": lambda m: b"[1, 2, 3]"}, "not_mcp", "that is not JSON-RPC"),
    ({"initialize": INIT}, "failed", "answered the MCP handshake but tools/list failed"),
    ({"initialize": INIT, "tools/list": lambda m: {"jsonrpc": "2.0", "id": m["id"] + 100, "result": {"tools": []}}},
     "not_mcp", "answered a JSON-RPC response to a request the probe did not send"),
    ({"initialize": INIT, "tools/list": lambda m: {"jsonrpc": "2.0", "method": "notifications/message",
                                                   "params": {"level": "info", "data": "hello"}}},
     "timeout", "answered the MCP handshake but not tools/list within 1 s"),
])
def test_json_rpc_that_lies(serve: Callable[..., RawServer], answers: dict[str, Any], kind: str, says: str) -> None:
    server = serve(scripted(answers))
    result = run(target(server.port), timeout=1)
    sentence = failed(result, kind)
    assert says in sentence, sentence
    quoted = re.findall(r'"([^"]*)"', sentence)
    assert all(len(q) <= 60 for q in quoted), sentence


def test_a_server_without_tools_is_healthy_with_none(serve: Callable[..., RawServer]) -> None:
    server = serve(scripted({"initialize": {**INIT, "capabilities": {}}}))
    result = run(target(server.port))
    assert result.ok, result.error
    assert result.tools == [] and result.capabilities == {}
    assert (result.resources_count, result.prompts_count) == (None, None)


# --- many at once ------------------------------------------------------------------------------

def test_probe_many_keeps_the_order_and_one_result_each(sdk_http: tuple[int, Recorder], sdk_sse: int) -> None:
    port, _ = sdk_http
    dead = closed_port()
    targets = [target(port, instance_id="a"), target(dead, instance_id="b"),
               target(0, "", "stdio", instance_id="c"), target(sdk_sse, "/sse", "sse", instance_id="d"),
               target(8080, host="localhost", instance_id="e")]
    results = probe_many(targets, timeout=TIMEOUT, max_bytes=MAX_BYTES, allow_private=True, concurrency=3)
    assert [r.instance_id for r in results] == ["a", "b", "c", "d", "e"]
    assert [r.ok for r in results] == [True, False, False, True, False]
    assert [r.error_kind for r in results] == [None, "refused", "stdio", None, "address_refused"]
    assert probe_many([], timeout=1, max_bytes=1, allow_private=False, concurrency=1) == []
    with pytest.raises(ValueError, match="concurrency"):
        probe_many(targets, timeout=1, max_bytes=1, allow_private=False, concurrency=0)


def test_probe_many_bounds_concurrency_and_total_time(serve: Callable[..., RawServer]) -> None:
    import mcp.client.streamable_http  # noqa: F401 - imported before the clock starts, as probe_many does

    server = serve(hanging)
    timeout, n, concurrency = 0.6, 7, 2
    began = time.monotonic()
    results = probe_many([target(server.port, instance_id=str(i)) for i in range(n)], timeout=timeout,
                         max_bytes=MAX_BYTES, allow_private=True, concurrency=concurrency)
    took = time.monotonic() - began
    assert [r.error_kind for r in results] == ["timeout"] * n
    assert [r.instance_id for r in results] == [str(i) for i in range(n)]
    assert server.connections == n
    assert server.most_at_once() == concurrency
    rounds = -(-n // concurrency)  # 4 rounds of at most 2
    assert rounds * timeout * 0.95 <= took < rounds * timeout + 1.5 < n * timeout, took
    assert all(timeout * 0.95 <= r.duration_ms / 1000 < timeout + 0.5 for r in results)
