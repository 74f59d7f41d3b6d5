"""Hostile bodies against real servers, over raw sockets, with the serving process's memory measured.

The functions run as they do in production (functions-framework's CLI: gunicorn with threads) and
as the local stack serves them (werkzeug's threaded server). An HTTP client library would fix up
what an attacker does on purpose (declare 300 MB and send little, stop mid-body, keep sending
after the answer), so these tests talk to the socket directly. Memory is the resident set of the
serving process tree, sampled while the request runs: a body the server reads after answering
shows up there, not in the answer.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import DEPLOY, HEARTBEAT, base_env, closed_port

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024


@dataclass
class Server:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    prefix: str  # path of the functions below the port
    log: Path  # the process's stdout and stderr: the functions' JSON log lines

    def url_path(self, function: str) -> str:
        return f"{self.prefix}/{function}" if self.prefix else "/"

    def rss(self) -> int:
        """Resident bytes of the server and its children (gunicorn serves from a forked worker)."""
        total, todo = 0, [self.process.pid]
        while todo:
            pid = todo.pop()
            try:
                with open(f"/proc/{pid}/status") as status:
                    for line in status:
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1]) * 1024
                for task in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{task}/children") as children:
                        todo.extend(int(c) for c in children.read().split())
            except FileNotFoundError:
                continue
        return total


_WERKZEUG_SERVER = """
import sys, time
from pathlib import Path
from devstack.server import Dispatcher, HttpServer, load_function
names = sys.argv[2:]
dispatcher = Dispatcher(names, lambda: {})
for name in names:
    dispatcher.mount(load_function(name, Path("functions")))
server = HttpServer("127.0.0.1", int(sys.argv[1]), dispatcher)
server.start()
print("ready", flush=True)
while True:
    time.sleep(3600)
"""


def _wait_listening(port: int, process: subprocess.Popen[bytes], log: Path, deadline: float = 60.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("server did not start listening")


def _start(kind: str, function: str, database_url: str, log: Path) -> Server:
    env = {**os.environ, **base_env(database_url), "PYTHONPATH": str(ROOT), "LOG_FORMAT": "json",
           "TASKS_MODE": "inline", "THREADS": "4"}
    port = closed_port()
    if kind == "gunicorn":
        argv = [sys.executable, "-m", "functions_framework", "--target", function,
                "--source", str(ROOT / "functions" / function / "main.py"), "--host", "127.0.0.1", "--port", str(port)]
        prefix = ""
    else:
        argv = [sys.executable, "-c", _WERKZEUG_SERVER, str(port), function]
        prefix = "/functions/v1"
    with log.open("wb") as out:
        process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        _wait_listening(port, process, log)
    except Exception:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    return Server(kind, port, process, prefix, log)


@pytest.fixture(scope="module", params=["gunicorn", "werkzeug"])
def servers(request: pytest.FixtureRequest, database_url: str,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    started: dict[str, Server] = {}
    logs = tmp_path_factory.mktemp(f"servers-{request.param}")
    try:
        for function in (HEARTBEAT, DEPLOY):
            started[function] = _start(request.param, function, database_url, logs / f"{function}.log")
        yield started
    finally:
        for server in started.values():
            os.killpg(server.process.pid, signal.SIGTERM)
            try:
                server.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(server.process.pid, signal.SIGKILL)


class Peak:
    """The highest resident size of a server while a block runs, sampled every 10 ms."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.before = server.rss()
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.server.rss())

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.3)  # a read that happens after the answer shows up here
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.server.rss())

    @property
    def growth(self) -> int:
        return self.peak - self.before


@dataclass
class Answer:
    status: int | None  # None: the connection closed or was reset without an answer
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, object]:
        assert self.headers.get("content-type", "").startswith("application/json"), self
        return json.loads(self.body)


def _read_answer(sock: socket.socket, timeout: float = 10.0) -> Answer:
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return Answer(None, {}, data)
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return Answer(int(lines[0].split()[1]), headers, body)
    except (ConnectionResetError, TimeoutError):
        return Answer(None, {}, data)


def _head(server: Server, function: str, extra: str) -> bytes:
    return (f"POST {server.url_path(function)} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer not-a-real-token\r\n{extra}\r\n").encode()


def _send_until_answered(sock: socket.socket, total: int) -> int:
    """Send `total` bytes of body in 64 KiB pieces, stopping when the server stops taking them."""
    piece = b"x" * (64 * 1024)
    sent = 0
    sock.settimeout(5)
    try:
        while sent < total:
            sock.sendall(piece)
            sent += len(piece)
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass
    return sent


@pytest.mark.parametrize("function", [HEARTBEAT, DEPLOY])
def test_a_huge_declared_body_is_refused_before_it_is_read(servers: dict[str, Server], function: str) -> None:
    """300 MB declared, 64 KiB sent: the answer comes without waiting for the rest (it would never come)."""
    server = servers[function]
    with Peak(server) as peak, socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(_head(server, function, f"Content-Length: {300 * MiB}\r\n") + b"{" * 65536)
        answer = _read_answer(sock)
    assert answer.status in (401, 413), answer
    assert answer.json()["error"]["code"] in ("unauthenticated", "payload_too_large")
    assert peak.growth < 16 * MiB, f"grew {peak.growth / MiB:.1f} MiB"


@pytest.mark.parametrize("function", [HEARTBEAT, DEPLOY])
def test_a_body_sent_after_the_answer_is_not_read_into_memory(servers: dict[str, Server], function: str) -> None:
    """The client keeps streaming 96 MiB of a 300 MB declared body after the refusal: the process must not
    buffer it (functions-framework reads the whole body after every answer unless told not to)."""
    server = servers[function]
    with Peak(server) as peak, socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(_head(server, function, f"Content-Length: {300 * MiB}\r\n"))
        _send_until_answered(sock, 96 * MiB)
        answer = _read_answer(sock, timeout=2)
    assert answer.status in (None, 401, 413), answer
    assert peak.growth < 24 * MiB, f"grew {peak.growth / MiB:.1f} MiB"


def test_a_chunked_body_is_cut_at_the_limit(servers: dict[str, Server]) -> None:
    """No declared length: counted while read, refused one byte past 1 MiB, never held whole."""
    server = servers[DEPLOY]
    head = (f"POST {server.url_path(DEPLOY)} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()
    with Peak(server) as peak, socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head)
        chunk = b"%x\r\n%s\r\n" % (256 * 1024, b" " * (256 * 1024))
        try:
            for _ in range(8 * 4 * 4):  # 32 MiB offered
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = _read_answer(sock, timeout=3)
    # Without a token the deploy answers 401 first; a server that reads the body answers 413.
    assert answer.status in (None, 401, 413), answer
    assert peak.growth < 24 * MiB, f"grew {peak.growth / MiB:.1f} MiB"


def test_a_chunked_body_over_the_limit_from_an_authenticated_caller_is_413(
        servers: dict[str, Server], database_url: str) -> None:
    from tests.helpers import auth

    server = servers[DEPLOY]
    token = auth(str(uuid.uuid4()))["Authorization"]
    head = (f"POST {server.url_path(DEPLOY)} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Authorization: {token}\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    with Peak(server) as peak, socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head)
        chunk = b"%x\r\n%s\r\n" % (256 * 1024, b" " * (256 * 1024))
        try:
            for _ in range(5):  # 1.25 MiB
                sock.sendall(chunk)
            sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = _read_answer(sock)
    assert answer.status == 413, answer
    assert answer.json()["error"]["code"] == "payload_too_large"
    assert peak.growth < 24 * MiB


def test_a_client_that_stops_mid_body_never_gets_a_500(servers: dict[str, Server]) -> None:
    """Declares 4 KiB, sends 100 bytes, stops sending: nothing or a JSON 400, and the log agrees."""
    from tests.helpers import auth

    server = servers[DEPLOY]
    token = auth(str(uuid.uuid4()))["Authorization"]
    head = (f"POST {server.url_path(DEPLOY)} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Authorization: {token}\r\nContent-Length: 4096\r\n"
            f"X-Request-Id: short-body-{server.name}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head + b'{"name": "x"' + b" " * 88)
        sock.shutdown(socket.SHUT_WR)
        answer = _read_answer(sock)
    assert answer.status in (None, 400), answer
    if answer.status == 400:
        assert answer.json()["error"]["code"] == "incomplete_body"
    line = _log_line(server, f"short-body-{server.name}")
    assert line["status"] == 400, line


def _log_line(server: Server, request_id: str, timeout: float = 5.0) -> dict[str, object]:
    """The function's own request log line (JSON) for `request_id`."""
    end = time.monotonic() + timeout
    while True:
        for raw in server.log.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(raw)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("request_id") == request_id and "status" in entry:
                return entry
        if time.monotonic() > end:
            raise AssertionError(f"no log line for {request_id}: {server.log.read_text()[-2000:]}")
        time.sleep(0.05)
