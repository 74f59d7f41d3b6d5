"""The watch stream (mcp_status?watch=true, docs/watch.md) on one function instance.

    PYTHONPATH=. python -m bench.watch [--watchers 1000] [--users 100] [--changes 60]

mcp_status runs under functions-framework's gunicorn as on Cloud Run (THREADS = the watchers it
may hold), on a fresh embedded PostgreSQL. The bench process holds the SSE connections itself, all
on one selector thread, so its own cost does not grow with them.

(a) Latency, change committed -> SSE event read by a client: one UPDATE at a time of one server of
    user 0, timed from the UPDATE (autocommit: its commit is in that round trip) to the
    `event: changes` line arriving. Floor, in the same run: the same UPDATE to a plain
    `LISTEN cp_changes` connection in this process (what PostgreSQL's NOTIFY alone costs).
(b) CPU per event of the serving process, for changes of ONE user (who has one watcher), with 10
    and then with --watchers connections open, spread over --users users. The registry wakes only
    the waiters of the user a notification names, so the ratio should stay near 1.
Bounded: loopback only, --changes changes per phase, a few seconds each.
"""

from __future__ import annotations

import argparse
import contextlib
import selectors
import socket
import statistics
import sys
import time
import uuid
from typing import Any

import psycopg

from bench.common import Postgres, Server, function_env, jwt_for, percentile

TARGET_MS = 500.0


def seed(pg: Postgres, users: int) -> list[tuple[str, str]]:
    """`users` users, each with a toolbox that has just reported and one running MCP server: (user, server)."""
    out = []
    with pg.connect() as conn:
        for n in range(users):
            user = conn.execute("insert into auth.users (email) values (%s) returning id",
                                (f"watch{n}@bench.test",)).fetchone()[0]
            box = conn.execute(
                "insert into account_tool_environments (user_id, name, status, region_slug, size_slug, "
                "public_ip_address, last_heartbeat_at) values (%s, %s, 'active', 'nyc1', 's-1vcpu-1gb', "
                "'127.0.0.1', now()) returning id", (user, f"box-{n}")).fetchone()[0]
            server = conn.execute(
                "insert into account_tool_instances (account_tool_environment_id, tool_catalog_id, status_on_toolbox, "
                "instance_name_on_toolbox, host_port, container_port, docker_image_url, mcp_server_type, "
                "mcp_transport_type, mcp_endpoint_path) values (%s, '00000000-0000-0000-0000-000000000001', "
                "'running', %s, 49152, 8080, 'mcp/everything:latest', 'mcp_server', 'streamable_http', '/mcp') "
                "returning id", (box, f"srv-{n}")).fetchone()[0]
            out.append((str(user), str(server)))
    return out


class Watchers:
    """SSE connections on one selector: each counts the `event: changes` lines it has read."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.selector = selectors.DefaultSelector()
        self.changes: dict[socket.socket, int] = {}
        self.buffers: dict[socket.socket, bytes] = {}

    def open(self, user_id: str) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port))
        sock.sendall((f"GET /?watch=true HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n"
                      f"Authorization: Bearer {jwt_for(user_id)}\r\n\r\n").encode())
        sock.setblocking(False)
        self.changes[sock] = 0
        self.buffers[sock] = b""
        self.selector.register(sock, selectors.EVENT_READ)
        return sock

    def pump(self, timeout: float) -> None:
        for key, _ in self.selector.select(timeout):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            if not data:
                self.selector.unregister(sock)
                continue
            text = self.buffers[sock] + data
            self.changes[sock] += text.count(b"event: changes")
            self.buffers[sock] = text[-20:]

    def wait_for(self, sock: socket.socket, count: int, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while self.changes[sock] < count and time.monotonic() < deadline:
            self.pump(0.05)
        return self.changes[sock] >= count

    def settle(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.pump(0.05)

    def close(self) -> None:
        for sock in list(self.changes):
            with contextlib.suppress(OSError, KeyError, ValueError):
                self.selector.unregister(sock)
            sock.close()
        self.changes.clear()


def toggle(conn: psycopg.Connection, server: str, n: int) -> None:
    conn.execute("update account_tool_instances set status_on_toolbox = %s where id = %s",
                 ("stopped" if n % 2 == 0 else "running", server))


def notify_floor(pg: Postgres, server: str, count: int) -> list[float]:
    """ms from an UPDATE's commit to its notification on a plain LISTEN connection in this process."""
    samples = []
    with pg.connect() as listener, pg.connect() as writer:
        listener.execute("LISTEN cp_changes")
        for n in range(count):
            committed = time.perf_counter()  # from the UPDATE's start: its commit is in the round trip
            toggle(writer, server, n)
            for _ in listener.notifies(timeout=5, stop_after=1):
                break
            samples.append((time.perf_counter() - committed) * 1000)
    return samples


def sse_latency(pg: Postgres, watchers: Watchers, probe: socket.socket, server: str, count: int) -> list[float]:
    samples = []
    with pg.connect() as writer:
        for n in range(count):
            before = watchers.changes[probe]
            committed = time.perf_counter()
            toggle(writer, server, n)
            if not watchers.wait_for(probe, before + 1):
                raise RuntimeError("an event did not arrive within 10 s")
            samples.append((time.perf_counter() - committed) * 1000)
            watchers.settle(0.01)
    return samples


def cpu_per_event(pg: Postgres, function: Server, watchers: Watchers, probe: socket.socket, server: str,
                  count: int) -> tuple[float, float]:
    """(ms of server CPU per change, ms of server CPU per idle second) for `count` changes of one user."""
    watchers.settle(1.0)
    idle_before = function.cpu_seconds_fine()
    watchers.settle(2.0)
    idle_per_s = (function.cpu_seconds_fine() - idle_before) / 2.0
    start_cpu, started = function.cpu_seconds_fine(), time.perf_counter()
    sse_latency(pg, watchers, probe, server, count)
    watchers.settle(0.3)
    spent = function.cpu_seconds_fine() - start_cpu - idle_per_s * (time.perf_counter() - started)
    return spent * 1000 / count, idle_per_s * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.watch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--watchers", type=int, default=1000)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--changes", type=int, default=60)
    args = parser.parse_args(argv)
    assert args.watchers <= 1000, "gunicorn's gthread worker holds at most 1000 connections (worker_connections)"
    started = time.perf_counter()
    with Postgres() as pg:
        pairs = seed(pg, args.users)
        env = function_env(pg.uri, THREADS=str(args.watchers + 8), WATCH_MAX_SECONDS="600",
                           WATCH_KEEPALIVE_SECONDS="300", WATCH_MAX_PER_INSTANCE=str(args.watchers + 8),
                           LOG_LEVEL="WARNING", DB_POOL_MAX_SIZE="8")
        function = Server("mcp_status", env).start()
        try:
            function.wait_ready()
            watchers = Watchers(function.port)
            probe_user, probe_server = pairs[0]
            probe = watchers.open(probe_user)
            floor = notify_floor(pg, probe_server, args.changes)
            for n in range(9):
                watchers.open(pairs[1 + n % (len(pairs) - 1)][0])
            watchers.settle(1.0)
            latency = sse_latency(pg, watchers, probe, probe_server, args.changes)
            few_cpu, few_idle = cpu_per_event(pg, function, watchers, probe, probe_server, args.changes)
            opened = time.perf_counter()
            for n in range(args.watchers - 10):
                watchers.open(pairs[1 + n % (len(pairs) - 1)][0])
                if n % 100 == 0:
                    watchers.pump(0)
            watchers.settle(3.0)
            with pg.connect() as conn:
                listens = conn.execute("select count(*) from pg_stat_activity "
                                       "where query ilike 'listen cp_changes%'").fetchone()[0]
            open_s = time.perf_counter() - opened
            many_latency = sse_latency(pg, watchers, probe, probe_server, args.changes)
            many_cpu, many_idle = cpu_per_event(pg, function, watchers, probe, probe_server, args.changes)
            rss = function.memory()["worker_rss"]
            others_woken = sum(c for s, c in watchers.changes.items() if s is not probe)
            watchers.close()
        finally:
            function.stop()
    report(args, floor, latency, many_latency, few_cpu, many_cpu, few_idle, many_idle, listens, open_s, rss,
           others_woken, time.perf_counter() - started)
    return 0


def report(args: Any, floor: list[float], latency: list[float], many_latency: list[float], few_cpu: float,
           many_cpu: float, few_idle: float, many_idle: float, listens: int, open_s: float, rss: float,
           others_woken: int, elapsed: float) -> None:
    def line(name: str, samples: list[float]) -> str:
        return (f"{name}: median {statistics.median(samples):.2f} ms  p99 {percentile(samples, 99):.2f} ms  "
                f"max {max(samples):.2f} ms  (n={len(samples)})")

    floor_median = statistics.median(floor)
    print(f"== watch stream: mcp_status under gunicorn, {args.watchers} SSE watchers over {args.users} users")
    print(line("floor, UPDATE commit -> NOTIFY on a plain LISTEN connection", floor))
    print(line("(a) commit -> SSE event at the client, 10 watchers", latency))
    print(line(f"(a) commit -> SSE event at the client, {args.watchers} watchers", many_latency))
    for name, samples in (("10", latency), (str(args.watchers), many_latency)):
        p99 = percentile(samples, 99)
        print(f"    {name} watchers: median {statistics.median(samples) / floor_median:.1f}x the floor; "
              f"p99 {p99:.1f} ms vs target {TARGET_MS:.0f} ms: {'PASS' if p99 < TARGET_MS else 'FAIL'}")
    print(f"(b) server CPU per change of one user: {few_cpu:.2f} ms with 10 watchers, {many_cpu:.2f} ms with "
          f"{args.watchers} (ratio {many_cpu / few_cpu if few_cpu > 0 else float('nan'):.2f}x; "
          f"{'PASS' if many_cpu <= max(2 * few_cpu, few_cpu + 1.0) else 'FAIL'}: does not grow with uninterested "
          "watchers)")
    print(f"    idle server CPU: {few_idle:.2f} ms/s with 10 watchers, {many_idle:.2f} ms/s with {args.watchers}")
    print(f"    other watchers sent an event by those changes: {others_woken} (expected 0)")
    print(f"    LISTEN connections to PostgreSQL: {listens} (expected 1); {args.watchers} watchers opened in "
          f"{open_s:.1f} s; worker RSS {rss:.0f} MiB")
    print(f"    elapsed {elapsed:.0f} s; id {uuid.uuid4().hex[:8]}")


if __name__ == "__main__":
    sys.exit(main())
