"""The wire side of `python -m bench.attack`: raw-socket HTTP, answers, RSS sampling, the detectors.

Raw sockets are used wherever an HTTP client would fix the request up (a Content-Length that lies,
a body cut short, a connection closed early, headers dribbled a byte at a time); everything else
goes through httpx (bench/attack.py). Every exchange here is bounded: bytes sent (`cap`), seconds
spent sending (`send_seconds`) and seconds waiting for the answer (`read_seconds`); the answer's
body is kept up to 1 MiB.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import select
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

MIB = 1024 * 1024
KEEP_BODY = MIB

# PostgreSQL's (and psycopg's) own words: none of them may reach a client.
DB_TEXT = re.compile(
    r"violates|invalid input syntax|SQLSTATE|syntax error at|relation \"|psycopg|unsupported Unicode escape|"
    r"foreign key|duplicate key value|column \"|PL/pgSQL|operator does not exist|out of range for type|"
    r"value too long for type|null value in column|current transaction is aborted|invalid byte sequence|"
    r"malformed array literal|cannot cast type|DETAIL:|HINT:",
    re.IGNORECASE,
)


# --- answers ------------------------------------------------------------------------------------------

@dataclass
class Answer:
    """What came back for one request (status None: no HTTP answer at all)."""

    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    elapsed: float = 0.0
    error: str | None = None
    #: Raw exchanges: body bytes sent in all, and how many had gone when the first answer byte came.
    sent: int | None = None
    sent_at_answer: int | None = None
    #: Seconds from the end of the headers to the first byte of the answer (raw exchanges).
    first_byte: float | None = None

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    def is_json(self) -> bool:
        if "json" not in self.content_type:
            return False
        try:
            json.loads(self.body)
        except ValueError:
            return False
        return True

    def text(self) -> str:
        """Headers and body as text, JSON escapes undone, for the text detectors."""
        raw = self.body.decode("utf-8", "replace")
        parts = [raw, *(f"{k}: {v}" for k, v in self.headers.items())]
        if self.is_json():
            with contextlib.suppress(ValueError, RecursionError):
                parts.append(json.dumps(json.loads(self.body), ensure_ascii=False))
        return "\n".join(parts)

    def snippet(self, limit: int = 300) -> str:
        return self.body[:limit].decode("utf-8", "replace")


def _parse_head(head: bytes) -> tuple[int | None, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            key = name.strip().lower()
            headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    return status, headers


def _dechunk(data: bytes) -> tuple[bytes, bool]:
    """(body, complete) of a chunked body read so far."""
    out, pos = bytearray(), 0
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            return bytes(out), False
        try:
            size = int(data[pos:end].split(b";")[0], 16)
        except ValueError:
            return bytes(out), True
        if size == 0:
            return bytes(out), True
        if len(data) < end + 2 + size + 2:
            out += data[end + 2:end + 2 + size]
            return bytes(out), False
        out += data[end + 2:end + 2 + size]
        pos = end + 2 + size + 2


def read_answer(sock: socket.socket, deadline: float, buffered: bytes = b"") -> tuple[int | None, dict[str, str],
                                                                                          bytes, str | None]:
    """Read one HTTP answer (headers, then Content-Length, chunked or until close) by `deadline`."""
    data = bytearray(buffered)
    error = None

    def more() -> bool:
        nonlocal error
        left = deadline - time.monotonic()
        if left <= 0:
            error = "timed out waiting for the answer"
            return False
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            error = "timed out waiting for the answer"
            return False
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc}"
            return False
        if not chunk:
            return False
        data.extend(chunk)
        return True

    while b"\r\n\r\n" not in data:
        if not more():
            if not data:
                return None, {}, b"", error or "connection closed without an answer"
            return None, {}, bytes(data[:KEEP_BODY]), error or "connection closed inside the answer's headers"
    head, _, rest = bytes(data).partition(b"\r\n\r\n")
    status, headers = _parse_head(head)
    body = bytearray(rest)
    data = body
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            decoded, complete = _dechunk(bytes(body))
            if complete or len(body) > KEEP_BODY or not more():
                return status, headers, decoded[:KEEP_BODY], error
    length = headers.get("content-length")
    if length is not None and length.strip().isdigit():
        want = min(int(length), KEEP_BODY)
        while len(body) < want and more():
            pass
        return status, headers, bytes(body[:KEEP_BODY]), error if len(body) < want else None
    if status in (204, 304) or (status is not None and 100 <= status < 200):
        return status, headers, b"", None
    while len(body) < KEEP_BODY and more():
        pass
    return status, headers, bytes(body[:KEEP_BODY]), None


def request_head(method: str, path: str, headers: Iterable[tuple[str, str]] | dict[str, str], *,
                 host: str = "127.0.0.1") -> bytes:
    items = headers.items() if isinstance(headers, dict) else headers
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in items]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")


def filler(total: int, chunk: int = 64 * 1024, start: bytes = b'{"padding":"') -> Iterator[bytes]:
    """`total` bytes of a JSON-looking body, in pieces."""
    yield start
    left = total - len(start)
    block = b"A" * chunk
    while left > 0:
        piece = block[:min(chunk, left)]
        left -= len(piece)
        yield piece


def chunked(total: int, chunk: int = 64 * 1024) -> Iterator[bytes]:
    """A chunked body of `total` data bytes (plus the terminating chunk)."""
    for piece in filler(total, chunk):
        yield f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    yield b"0\r\n\r\n"


def raw_exchange(address: tuple[str, int], head: bytes, body: Iterable[bytes] = (), *, cap: int = 64 * MIB,
                 send_seconds: float = 10.0, read_seconds: float = 10.0, close_after_body: bool = False) -> Answer:
    """Send `head`, then `body` piece by piece while the server does not answer (at most `cap` bytes
    and `send_seconds`), optionally half-close, then read the answer (at most `read_seconds`)."""
    started = time.monotonic()
    answer = Answer(sent=0)
    try:
        sock = socket.create_connection(address, timeout=5)
    except OSError as exc:
        answer.error = f"connect: {exc}"
        return answer
    buffered = b""
    try:
        sock.sendall(head)
        headers_done = time.monotonic()
        sock.setblocking(False)
        pieces = iter(body)
        pending = b""
        stop_at = time.monotonic() + send_seconds
        sent = 0
        while time.monotonic() < stop_at:
            if not pending:
                pending = next(pieces, b"")
                if not pending:
                    break
                if sent + len(pending) > cap:
                    pending = pending[:cap - sent]
                    if not pending:
                        break
            readable, writable, _ = select.select([sock], [sock], [], 0.2)
            if readable:
                try:
                    buffered = sock.recv(65536)
                except OSError as exc:
                    answer.error = f"{type(exc).__name__} while sending"
                    buffered = b""
                answer.sent_at_answer = sent
                answer.first_byte = time.monotonic() - headers_done
                break
            if writable:
                try:
                    n = sock.send(pending)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    answer.error = f"{type(exc).__name__} while sending"
                    break
                sent += n
                pending = pending[n:]
        answer.sent = sent
        sock.setblocking(True)
        if close_after_body:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
        status, headers, data, error = read_answer(sock, time.monotonic() + read_seconds, buffered)
        if answer.first_byte is None and status is not None:
            answer.first_byte = time.monotonic() - headers_done
            answer.sent_at_answer = sent
        answer.status, answer.headers, answer.body = status, headers, data
        answer.error = (error or answer.error or "no answer") if status is None else error
    except OSError as exc:
        answer.error = f"{type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(OSError):
            sock.close()
        answer.elapsed = time.monotonic() - started
    return answer


# --- slow clients --------------------------------------------------------------------------------------

@dataclass
class SlowClient:
    """One slowloris connection: `head + body` dribbled `step` bytes at a time."""

    label: str
    payload: bytes
    dribble_from: int  # bytes sent at once before dribbling starts
    sock: socket.socket | None = None
    sent: int = 0
    closed_by_server_after: float | None = None
    early_answer: bytes = b""
    answer: Answer | None = None


def run_slow_clients(address: tuple[str, int], clients: list[SlowClient], seconds: float, interval: float) -> None:
    """Dribble one byte per client every `interval` s for `seconds`, then send the rest and read answers."""
    started = time.monotonic()
    for client in clients:
        try:
            client.sock = socket.create_connection(address, timeout=5)
            client.sock.sendall(client.payload[:client.dribble_from])
            client.sent = client.dribble_from
        except OSError:
            client.closed_by_server_after = 0.0
            client.sock = None
    while time.monotonic() - started < seconds:
        for client in clients:
            sock = client.sock
            if sock is None or client.closed_by_server_after is not None:
                continue
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:  # the server answered early (e.g. 408) or closed the connection: stop dribbling
                with contextlib.suppress(OSError):
                    client.early_answer += sock.recv(65536)
                client.closed_by_server_after = time.monotonic() - started
                continue
            if client.sent < len(client.payload) - 1:
                try:
                    sock.send(client.payload[client.sent:client.sent + 1])
                    client.sent += 1
                except OSError:
                    client.closed_by_server_after = time.monotonic() - started
        time.sleep(interval)
    for client in clients:
        started_one = time.monotonic()
        sock = client.sock
        if sock is None or client.closed_by_server_after is not None:
            client.answer = Answer(error="closed by the server while dribbling")
            if client.early_answer:
                status, headers = _parse_head(client.early_answer.partition(b"\r\n\r\n")[0])
                client.answer = Answer(status=status, headers=headers,
                                       body=client.early_answer.partition(b"\r\n\r\n")[2])
            with contextlib.suppress(OSError):
                if sock is not None:
                    sock.close()
            continue
        try:
            sock.sendall(client.payload[client.sent:])
            status, headers, body, error = read_answer(sock, time.monotonic() + 10, client.early_answer)
            client.answer = Answer(status=status, headers=headers, body=body, error=error)
        except OSError as exc:
            client.answer = Answer(error=f"{type(exc).__name__}: {exc}")
        finally:
            with contextlib.suppress(OSError):
                sock.close()
        client.answer.elapsed = time.monotonic() - started_one


# --- memory --------------------------------------------------------------------------------------------

def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc/*/stat)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def rss_kib(pid: int, key: str = "VmRSS") -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class RssMonitor:
    """Samples VmRSS of the function-serving processes every `period` s in a background thread.

    `window()` measures one stretch (before, peak, after, growth, in MiB); windows may nest (a
    category around its requests). The peak is the highest sample, and, where the kernel lets us
    reset it (`/proc/<pid>/clear_refs`, our own child), VmHWM too, which sees the peaks between two
    samples: before each reset the high-water mark so far is credited to every open window.
    """

    def __init__(self, pids: list[int], period: float = 0.02) -> None:
        self.pids = pids
        self.period = period
        self._open: list[dict[str, int]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="attack-rss", daemon=True)
        self.hwm_resettable = all(self._reset_hwm(pid) for pid in pids)

    def now(self) -> int:
        """KiB, summed over the serving processes."""
        return sum(rss_kib(pid) for pid in self.pids)

    def start(self) -> RssMonitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)

    def _credit(self, value: int) -> None:
        for window in self._open:
            window["peak"] = max(window["peak"], value)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            value = self.now()
            with self._lock:
                self._credit(value)

    @staticmethod
    def _reset_hwm(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as handle:
                handle.write("5")
            return True
        except OSError:
            return False

    def _hwm(self) -> int:
        return sum(rss_kib(pid, "VmHWM") for pid in self.pids)

    @contextlib.contextmanager
    def window(self) -> Iterator[dict[str, float]]:
        result: dict[str, float] = {}
        with self._lock:
            before = self.now()
            if self.hwm_resettable:
                self._credit(self._hwm())
                for pid in self.pids:
                    self._reset_hwm(pid)
            window = {"peak": before}
            self._open.append(window)
        try:
            yield result
        finally:
            time.sleep(self.period * 2)
            with self._lock:
                after = self.now()
                self._credit(after)
                if self.hwm_resettable:
                    self._credit(self._hwm())
                self._open = [w for w in self._open if w is not window]
            result.update(before=before / 1024, peak=window["peak"] / 1024, after=after / 1024,
                          growth=(window["peak"] - before) / 1024)


# --- secrets -------------------------------------------------------------------------------------------

def secret_forms(value: str) -> dict[str, str]:
    """The forms in which a secret may come back: exact, its first 20 characters, upper-cased, base64."""
    forms = {"exact": value, "first 20 chars": value[:20], "upper-cased": value.upper(),
             "base64": base64.b64encode(value.encode()).decode().rstrip("=")}
    return {k: v for k, v in forms.items() if len(v) >= 12}
