"""HTTP plumbing: a standard-library server that speaks HTTP/1.1 keep-alive like Node/express.

The application logic lives elsewhere and sees only :class:`Request` -> :class:`Reply`.
:class:`Listener` owns one listening socket and the thread that accepts on it; it can be
closed (connections are then refused, and open ones are cut) and re-opened on the same port.
"""

from __future__ import annotations

import contextlib
import json
import logging
import selectors
import socket
import socketserver
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

#: Node's default ``server.keepAliveTimeout``: idle keep-alive connections are closed after it.
KEEP_ALIVE_SECONDS = 5
#: Bodies larger than this are not read at all; the connection is closed after answering.
MAX_BODY_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Request:
    """One HTTP request, reduced to what the DTMA looks at.

    ``body`` is ``None`` when the body exceeded :data:`MAX_BODY_BYTES` and was not read.
    """

    method: str
    path: str
    authorization: str | None
    content_type: str | None
    body: bytes | None


@dataclass(frozen=True)
class Reply:
    """One HTTP response."""

    status: int
    body: bytes
    content_type: str

    @classmethod
    def json(cls, status: int, document: object) -> Reply:
        """Compact JSON, as express's ``res.json`` writes it."""
        body = json.dumps(document, separators=(",", ":")).encode()
        return cls(status, body, "application/json; charset=utf-8")

    @classmethod
    def text(cls, status: int, text: str) -> Reply:
        """express's ``res.send(string)``, which labels plain strings as HTML."""
        return cls(status, text.encode(), "text/html; charset=utf-8")


App = Callable[[Request], Reply]


class Listener:
    """Serves one agent's HTTP API on a fixed address; can be closed and re-opened on the same port."""

    def __init__(self, host: str, port: int, app: App) -> None:
        self._host = host
        self._port = port
        self._app = app
        self._guard = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None

    @property
    def port(self) -> int:
        """The bound port (the requested one until the first :meth:`open`)."""
        return self._port

    @property
    def bound_host(self) -> str:
        """The address actually bound, e.g. ``127.0.0.1`` for ``localhost``."""
        return self._server.server_address[0] if self._server else self._host

    @property
    def is_open(self) -> bool:
        """Whether connections are currently accepted."""
        return self._server is not None

    def open(self) -> None:
        """Bind (to the port bound before, after a :meth:`close`) and start accepting."""
        with self._guard:
            if self._server is not None:
                return
            server = _Server((self._host, self._port), self._app)
            server.socket.setblocking(
                False
            )  # a client that vanishes between select and accept can't block us
            self._port = server.server_address[1]
            self._wake = socket.socketpair()
            self._thread = threading.Thread(
                target=_serve, args=(server, self._wake[0]), name=f"standin-http-{self._port}", daemon=True
            )
            self._server = server
            self._thread.start()

    def close(self) -> None:
        """Stop accepting, close the listening socket and cut every open connection; idempotent."""
        with self._guard:
            server, thread, wake = self._server, self._thread, self._wake
            self._server = self._thread = self._wake = None
        if server is None or thread is None or wake is None:
            return
        wake[1].send(b"x")
        thread.join()
        server.server_close()
        server.sever_connections()
        for end in wake:
            end.close()


def _serve(server: _Server, wake: socket.socket) -> None:
    """Accept until woken: unlike ``serve_forever`` this stops at once instead of polling every 0.5 s."""
    with selectors.DefaultSelector() as selector:
        selector.register(server.socket, selectors.EVENT_READ)
        selector.register(wake, selectors.EVENT_READ)
        while True:
            ready = {key.fileobj for key, _ in selector.select()}
            if wake in ready:
                return
            server.handle_request()


class _Server(ThreadingHTTPServer):
    """Thread-per-connection server that remembers its connections so they can be cut."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], app: App) -> None:
        self.app = app
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._connections: set[socket.socket] = set()
        self._connections_guard = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse-DNS lookup (``socket.getfqdn``), which can stall start-up."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request: object, client_address: object) -> None:
        """A peer hanging up mid-response is routine here (e.g. after ``sever_connections``)."""
        logger.debug("connection from %s ended with an error", client_address, exc_info=True)

    def track(self, connection: socket.socket) -> None:
        with self._connections_guard:
            self._connections.add(connection)

    def untrack(self, connection: socket.socket) -> None:
        with self._connections_guard:
            self._connections.discard(connection)

    def sever_connections(self) -> None:
        """Cut open connections, as a dying process would; their handler threads then end."""
        with self._connections_guard:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    """Reads a request, hands it to the app, writes the reply with an exact Content-Length."""

    server: _Server
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # otherwise delayed ACKs add ~40 ms to every keep-alive request
    timeout = KEEP_ALIVE_SECONDS

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.untrack(self.connection)

    def do_GET(self) -> None:
        self._handle()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

    def do_HEAD(self) -> None:
        self._handle(send_body=False)

    def send_response(self, code: int, message: str | None = None) -> None:
        """Like the base class but without a ``Server`` header, which express does not send."""
        self.log_request(code)
        self.send_response_only(code, message)
        self.send_header("Date", self.date_time_string())

    def log_message(self, format: str, *args: object) -> None:
        """Request lines go to ``logging`` at DEBUG; they never contain headers, so never the token."""
        logger.debug("%s - %s", self.address_string(), format % args)

    def _handle(self, *, send_body: bool = True) -> None:
        try:
            body = self._read_body()
        except ValueError:
            self.send_error(400, "Malformed request body framing")
            return
        request = Request(
            method=self.command,
            path=urlsplit(self.path).path or "/",
            authorization=_stripped(self.headers.get("Authorization")),
            content_type=self.headers.get("Content-Type"),
            body=body,
        )
        self._write(self.server.app(request), send_body=send_body)

    def _read_body(self) -> bytes | None:
        """Read the whole body (Content-Length or chunked); ``None`` if over the cap (then close)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = self._read_chunked()
        else:
            length = int(self.headers.get("Content-Length") or 0)
            if length < 0:
                raise ValueError("negative Content-Length")
            body = self.rfile.read(length) if length <= MAX_BODY_BYTES else None
        if body is None:
            self.close_connection = True
        return body

    def _read_chunked(self) -> bytes | None:
        body = bytearray()
        while size := int(self.rfile.readline(1024).split(b";")[0].strip(), 16):
            if len(body) + size > MAX_BODY_BYTES:
                return None
            body += self.rfile.read(size)
            self.rfile.readline(1024)
        while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
            pass  # trailer fields, unused
        return bytes(body)

    def _write(self, reply: Reply, *, send_body: bool) -> None:
        self.send_response(reply.status)
        self.send_header("X-Powered-By", "Express")
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        else:
            self.send_header("Connection", "keep-alive")
            self.send_header("Keep-Alive", f"timeout={KEEP_ALIVE_SECONDS}")
        self.end_headers()
        if send_body:
            self.wfile.write(reply.body)


def _stripped(value: str | None) -> str | None:
    """Node trims header values; Python's parser keeps trailing blanks."""
    return value.strip() if value is not None else None
