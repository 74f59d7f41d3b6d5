"""mcp_status?watch=true (docs/watch.md) over real HTTP: a threaded werkzeug server on loopback
serving the functions-framework app, a raw HTTP client reading the Server-Sent Events as a
browser's EventSource would, the real database and its LISTEN/NOTIFY."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from werkzeug.serving import make_server

from shared.adapters import listener as listener_module
from shared.usecases import watch
from tests.factories import Factory
from tests.helpers import auth, settle, spec

FN = "mcp_status"


class Sse:
    """One SSE connection: a reader thread turns the stream into (event, data, id) tuples; comment
    lines arrive as ("comment", text, None); the end of the stream as ("closed", None, None)."""

    def __init__(self, port: int, query: str, user_id: str) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.conn.request("GET", f"/?{query}", headers={**auth(user_id), "Accept": "text/event-stream"})
        self.sock = self.conn.sock
        OPEN.append(self)
        self.response = self.conn.getresponse()
        self.items: queue.Queue[tuple[str, Any, str | None]] = queue.Queue()
        self.raw = bytearray()
        if self.response.status == 200:
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        event, data, ident = None, None, None
        try:
            while True:
                line = self.response.readline()
                if not line:
                    break
                self.raw += line
                text = line.decode().rstrip("\n")
                if text.startswith(":"):
                    self.items.put(("comment", text[1:].strip(), None))
                elif text.startswith("event: "):
                    event = text[7:]
                elif text.startswith("data: "):
                    data = json.loads(text[6:])
                elif text.startswith("id: "):
                    ident = text[4:]
                elif text == "":
                    if event:
                        self.items.put((event, data, ident))
                    event, data, ident = None, None, None
        except Exception:  # the test hung up (close()): http.client fails in several ways then
            pass
        self.items.put(("closed", None, None))

    def next(self, kind: str | None = None, timeout: float = 15.0) -> tuple[str, Any, str | None]:
        """The next item (of `kind`, skipping others)."""
        deadline = time.monotonic() + timeout
        while True:
            item = self.items.get(timeout=max(0.01, deadline - time.monotonic()))
            if kind is None or item[0] == kind or item[0] == "closed":
                return item

    def until(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 20.0) -> dict[str, Any]:
        """The first `changes` event whose data satisfies `predicate`."""
        deadline = time.monotonic() + timeout
        while True:
            kind, data, _ = self.next("changes", max(0.01, deadline - time.monotonic()))
            assert kind != "closed", "the stream closed first"
            if predicate(data):
                return data

    def close(self) -> None:
        """Hang up as a browser tab closing does (the socket itself, whatever still reads from it)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.conn.close()


OPEN: list[Sse] = []


@pytest.fixture
def serve(function_client: Any) -> Iterator[Callable[..., int]]:
    """Start mcp_status on a loopback port with these settings; the port."""
    servers = []

    def start(**env: str) -> int:
        # A gone client is noticed at the next write: short keep-alives let the teardown check it.
        app = function_client(FN, **{"WATCH_KEEPALIVE_SECONDS": "0.5", **env}).application
        server = make_server("127.0.0.1", 0, app, threaded=True)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        servers.append(server)
        return int(server.server_port)

    yield start
    while OPEN:
        OPEN.pop().close()
    assert eventually(lambda: watch.active_watchers() == 0), "a watcher outlived its client"
    for server in servers:
        server.shutdown()
        server.server_close()
    listener_module.stop_all()


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def listen_connections(pg: psycopg.Connection) -> int:
    return pg.execute("select count(*) from pg_stat_activity where query ilike 'listen cp_changes%'").fetchone()[0]


def ids(data: dict[str, Any]) -> list[str]:
    return [s["id"] for s in data["servers"]]


def test_snapshot_then_deploy_progress_stop_and_remove(serve: Any, function_client: Any, toolbox_agent: Any,
                                                       pg: psycopg.Connection) -> None:
    box, _agent = toolbox_agent()
    port = serve()
    stream = Sse(port, "watch=true", box.user_id)
    assert stream.response.status == 200
    assert stream.response.getheader("Content-Type").startswith("text/event-stream")
    assert stream.response.getheader("Cache-Control") == "no-store"
    assert stream.response.getheader("X-Accel-Buffering") == "no"
    assert stream.response.getheader("X-Request-Id") and stream.response.getheader("Access-Control-Allow-Origin")
    kind, snapshot, cursor = stream.next("snapshot")
    assert kind == "snapshot" and snapshot["servers"] == [] and snapshot["cursor"] == cursor and snapshot["as_of"]

    deployed = function_client("deploy_mcp_server").post("/", json=spec(box), headers=auth(box.user_id))
    assert deployed.status_code == 202, deployed.json
    server_id = deployed.json["id"]
    running = stream.until(lambda d: any(s["id"] == server_id and s["status"] == "running" for s in d["servers"]))
    (server,) = [s for s in running["servers"] if s["id"] == server_id]
    assert [e["to"] for e in server["progress"]][-3:] == ["pending_deploy", "deploying", "running"]
    # Exactly the list's rendering of the same server.
    listed = function_client(FN).get(f"/{server_id}", headers=auth(box.user_id)).json["server"]
    assert {k: v for k, v in server.items() if k not in ("tools", "toolbox", "uptime_seconds")} == \
        {k: v for k, v in listed.items() if k not in ("tools", "toolbox", "uptime_seconds")}
    settle()

    manage = function_client("manage_mcp_server")
    assert manage.post(f"/{server_id}/stop", headers=auth(box.user_id)).status_code in (200, 202)
    stream.until(lambda d: any(s["id"] == server_id and s["effective_status"] == "stopped" for s in d["servers"]))
    settle()
    assert manage.post(f"/{server_id}/remove", headers=auth(box.user_id)).status_code in (200, 202)
    removed = stream.until(lambda d: server_id in d["removed"])
    assert server_id not in ids(removed)
    stream.close()


def test_resume_with_since_misses_nothing_and_disconnect_deregisters(serve: Any, factory: Factory,
                                                                    pg: psycopg.Connection) -> None:
    box = factory.toolbox()
    kept, gone = factory.instance(box, status="running"), factory.instance(box, status="running")
    port = serve(WATCH_KEEPALIVE_SECONDS="0.2")
    stream = Sse(port, "watch=true", box.user_id)
    _, snapshot, cursor = stream.next("snapshot")
    assert sorted(ids(snapshot)) == sorted([kept, gone])
    assert eventually(lambda: watch.active_watchers() == 1)
    stream.close()
    # The server finds the client gone at its next write (a keep-alive) and lets the watcher go.
    assert eventually(lambda: watch.active_watchers() == 0)
    listener = listener_module.get_listener(os.environ["DATABASE_URL"])
    assert eventually(lambda: listener.count() == 0)

    # While disconnected: one server stops, one is removed, one is added.
    pg.execute("update account_tool_instances set status_on_toolbox = 'stopped' where id = %s", (kept,))
    pg.execute("delete from account_tool_instances where id = %s", (gone,))
    added = factory.instance(box, status="running")
    resumed = Sse(port, f"watch=true&since={cursor}", box.user_id)
    kind, data, _ = resumed.next()
    assert kind == "changes"
    assert sorted(ids(data)) == sorted([kept, added]) and data["removed"] == [gone]
    assert [s["status"] for s in data["servers"] if s["id"] == kept] == ["stopped"]
    resumed.close()


def test_expired_and_bad_cursors(serve: Any, function_client: Any, factory: Factory, pg: psycopg.Connection) -> None:
    box = factory.toolbox()
    server = factory.instance(box)
    client = function_client(FN)
    first = client.get("/?watch=true", headers=auth(box.user_id))
    assert first.status_code == 200 and first.json["snapshot"] is True and ids(first.json) == [server]
    cursor = first.json["cursor"]
    pg.execute("update account_tool_instances set status_on_toolbox = 'stopped' where id = %s", (server,))
    pg.execute("select cp_private.cp_prune_watch_changes(interval '0 seconds', 100000)")
    expired = client.get(f"/?watch=true&since={cursor}", headers=auth(box.user_id))
    assert expired.status_code == 410 and expired.json["error"]["code"] == "cursor_expired"
    assert "without since" in expired.json["error"]["message"]
    # SSE answers the same 410 before any stream starts.
    port = serve()
    stream = Sse(port, f"watch=true&since={cursor}", box.user_id)
    assert stream.response.status == 410 and json.loads(stream.response.read())["error"]["code"] == "cursor_expired"
    for bad in ("nonsense", "eyJzIjoiOTk6MTo1In0", "eyJzIjoiMTAwOjIwMDo1MDAifQ"):
        response = client.get(f"/?watch=true&since={bad}", headers=auth(box.user_id))
        assert response.status_code == 400 and response.json["error"]["message"].startswith("since:"), bad
    response = client.get(f"/?since={cursor}", headers=auth(box.user_id))
    assert response.status_code == 400 and "watch=true" in response.json["error"]["message"]
    response = client.post("/", json={"watch": True, "timeout": "soon"}, headers=auth(box.user_id))
    assert response.status_code == 400 and "timeout" in json.dumps(response.json)


def test_keep_alive_then_end_at_lifetime(serve: Any, factory: Factory) -> None:
    box = factory.toolbox()
    port = serve(WATCH_KEEPALIVE_SECONDS="0.2", WATCH_MAX_SECONDS="2")
    stream = Sse(port, "watch=true", box.user_id)
    stream.next("snapshot")
    kind, text, _ = stream.next("comment")
    assert (kind, text) == ("comment", "keep-alive")
    kind, data, ident = stream.next("end")
    assert kind == "end" and data["reason"] == "lifetime" and data["cursor"] == ident
    assert stream.next()[0] == "closed"


def test_another_users_watch_never_sees_a_change(serve: Any, factory: Factory, pg: psycopg.Connection) -> None:
    mine, theirs = factory.toolbox(), factory.toolbox()
    their_server = factory.instance(theirs)
    port = serve(WATCH_MAX_SECONDS="3", WATCH_KEEPALIVE_SECONDS="0.5")
    watcher = Sse(port, "watch=true", mine.user_id)
    owner = Sse(port, "watch=true", theirs.user_id)
    assert watcher.next("snapshot")[1]["servers"] == []
    owner.next("snapshot")
    pg.execute("update account_tool_instances set status_on_toolbox = 'stopped' where id = %s", (their_server,))
    pg.execute("update account_tool_environments set status = 'unresponsive' where id = %s", (theirs.id,))
    assert their_server in ids(owner.until(lambda d: their_server in ids(d)))
    assert watcher.next("end")[0] == "end"
    assert their_server.encode() not in watcher.raw and b"event: changes" not in watcher.raw
    watcher.close()
    owner.close()


def test_a_silent_toolbox_turns_unknown_without_a_write_and_recovers(serve: Any, factory: Factory,
                                                                     pg: psycopg.Connection) -> None:
    # Stale after 3 x 1 s + 0 s grace: the stream must say so by itself, nothing is written.
    box = factory.toolbox(heartbeat_age_seconds=0.5)
    server = factory.instance(box)
    port = serve(HEARTBEAT_INTERVAL_SECONDS="1", HEARTBEAT_GRACE_SECONDS="0", HEALTH_DEGRADED_AFTER_SECONDS="1")
    stream = Sse(port, "watch=true", box.user_id)
    (shown,) = stream.next("snapshot")[1]["servers"]
    assert shown["effective_status"] == "running" and shown["stale"] is False
    writes = pg.execute("select count(*) from mcp_server_changes where user_id = %s", (box.user_id,)).fetchone()[0]
    unknown = stream.until(lambda d: any(s["effective_status"] == "unknown" for s in d["servers"]), timeout=10)
    assert unknown["servers"][0]["stale"] is True and "has not reported" in unknown["servers"][0]["error"]
    assert pg.execute("select count(*) from mcp_server_changes where user_id = %s",
                      (box.user_id,)).fetchone()[0] == writes
    # The toolbox reports again: cp_ingest_heartbeat calls cp_watch_toolbox_heard after a silence
    # (here called as it does, so this test does not depend on the heartbeat's own conditions).
    with pg.transaction():
        pg.execute("update account_tool_environments set last_heartbeat_at = now() where id = %s", (box.id,))
        pg.execute("select cp_private.cp_watch_toolbox_heard(%s)", (box.id,))
    back = stream.until(lambda d: any(s["effective_status"] == "running" for s in d["servers"]), timeout=10)
    assert back["servers"][0]["stale"] is False and back["servers"][0]["id"] == server
    stream.close()


def test_long_poll(function_client: Any, factory: Factory, pg: psycopg.Connection) -> None:
    box = factory.toolbox()
    server = factory.instance(box)
    client = function_client(FN)
    first = client.get("/?watch=true", headers=auth(box.user_id)).json
    assert first["snapshot"] is True and ids(first) == [server] and first["removed"] == []
    idle = client.get(f"/?watch=true&since={first['cursor']}&timeout=0.3", headers=auth(box.user_id))
    assert idle.status_code == 200 and idle.headers["Cache-Control"] == "no-store"
    assert idle.json["servers"] == [] and idle.json["removed"] == [] and idle.json["snapshot"] is False
    assert idle.json["cursor"] == first["cursor"]

    def later() -> None:
        time.sleep(0.5)
        with psycopg.connect(pg.info.dsn, autocommit=True) as other:
            other.execute("update account_tool_instances set status_on_toolbox = 'stopped' where id = %s", (server,))

    threading.Thread(target=later).start()
    answer = client.post("/", json={"watch": True, "since": first["cursor"], "timeout": 20},
                         headers=auth(box.user_id)).json
    assert ids(answer) == [server] and answer["servers"][0]["status"] == "stopped"
    assert answer["cursor"] != first["cursor"]
    assert watch.active_watchers() == 0


def test_one_listen_connection_however_many_watchers(serve: Any, factory: Factory, pg: psycopg.Connection) -> None:
    boxes = [factory.toolbox() for _ in range(3)]
    port = serve()
    streams = [Sse(port, "watch=true", boxes[n % 3].user_id) for n in range(8)]
    for stream in streams:
        stream.next("snapshot")
    assert eventually(lambda: watch.active_watchers() == 8)
    assert listen_connections(pg) == 1
    for stream in streams:
        stream.close()


def test_a_lost_listen_connection_is_replaced_and_nothing_is_missed(serve: Any, factory: Factory,
                                                                    pg: psycopg.Connection) -> None:
    box = factory.toolbox()
    server = factory.instance(box)
    port = serve()
    stream = Sse(port, "watch=true", box.user_id)
    stream.next("snapshot")
    assert eventually(lambda: listen_connections(pg) == 1)
    pg.execute("select pg_terminate_backend(pid) from pg_stat_activity where query ilike 'listen cp_changes%'")
    # Changed while nobody listens: the reconnect wakes every watcher, and its cursor finds the change.
    pg.execute("update account_tool_instances set status_on_toolbox = 'stopped' where id = %s", (server,))
    assert stream.until(lambda d: server in ids(d), timeout=15)["servers"][0]["status"] == "stopped"
    assert eventually(lambda: listen_connections(pg) == 1)
    stream.close()


def test_too_many_watchers_is_503_with_retry_after(serve: Any, factory: Factory) -> None:
    box = factory.toolbox()
    port = serve(WATCH_MAX_PER_INSTANCE="1")
    first = Sse(port, "watch=true", box.user_id)
    first.next("snapshot")
    second = Sse(port, "watch=true", box.user_id)
    assert second.response.status == 503 and second.response.getheader("Retry-After")
    assert json.loads(second.response.read())["error"]["code"] == "too_many_watchers"
    first.close()


def test_under_gunicorn_as_on_cloud_run(database_url: str, factory: Factory, pg: psycopg.Connection,
                                        tmp_path: Any) -> None:
    """functions-framework's CLI (gunicorn, threads): events arrive unbuffered, and a client that goes
    ends its stream (the request's log line is written when the stream closes)."""
    import signal
    import subprocess
    import sys

    from tests.conftest import ROOT
    from tests.helpers import base_env, closed_port

    box = factory.toolbox()
    server = factory.instance(box)
    port, log = closed_port(), tmp_path / "gunicorn.log"
    env = {**os.environ, **base_env(database_url), "PYTHONPATH": str(ROOT), "LOG_FORMAT": "json", "THREADS": "8",
           "PYTHONUNBUFFERED": "1", "WATCH_KEEPALIVE_SECONDS": "0.2"}
    argv = [sys.executable, "-m", "functions_framework", "--target", FN, "--source",
            str(ROOT / "functions" / FN / "main.py"), "--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as out:
        process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        assert eventually(lambda: _listening(port), timeout=60), log.read_text()[-2000:]
        stream = Sse(port, "watch=true", box.user_id)
        assert ids(stream.next("snapshot")[1]) == [server]
        pg.execute("update account_tool_instances set status_on_toolbox = 'stopped' where id = %s", (server,))
        assert stream.until(lambda d: server in ids(d))["servers"][0]["status"] == "stopped"
        stream.close()
        assert eventually(lambda: "mcp_status GET / -> 200" in log.read_text()), log.read_text()[-3000:]
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(10)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False
