"""Faults: a flaky DTMA, a database that goes away, heartbeats that arrive twice, late, out of
order or all at once after a partition. Through the functions-framework apps, the real database,
loopback DTMA stand-ins and a tiny loopback socket server that misbehaves on purpose.

What every case proves:

* DTMA faults leave the instance in a state the state machine allows, with an event and a
  message a user can act on; a fault whose outcome is unknown answers 202 and leaves the
  transitional status, which the sweep's deadline then closes: nothing stays `deploying`.
* Database faults answer 503 with `Retry-After` and a clear message, quickly; write nothing
  partial (one transaction per operation: no instance without its events); and the same
  function instance recovers by itself when the database is back.
* Heartbeat faults end in the newest truth, and the sweep's guard holds during a partition.
"""

from __future__ import annotations

import concurrent.futures
import random
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from flask.testing import FlaskClient

from devstack import embedded_pg
from devstack.dtma_standin import StandInAgent
from ops.migrate import migrate
from tests.factories import Factory, Toolbox
from tests.helpers import auth, beat, closed_port, container, last_command, settle, spec

DEPLOY, MANAGE, STATUS, SWEEP, HEARTBEAT = ("deploy_mcp_server", "manage_mcp_server", "mcp_status",
                                            "mcp_status_sweep", "dtma_heartbeat_ingest")
BUDGET = "0.4"
# A command the fault server never answers gives up after this, so pool workers are not held
# for the production default of minutes.
COMMAND_TIMEOUT = "1.5"
TRANSITIONAL = ("pending_deploy", "deploying", "starting", "stopping", "deleting")
STALE = 3 * 60 + 30


# --- a DTMA that misbehaves at the socket level --------------------------------------------------------

def http_reply(status: str, body: bytes, content_type: str = "application/json", length: int | None = None) -> bytes:
    head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


class FaultServer:
    """A loopback TCP server that reads one whole HTTP request per connection, records it, then:
    `close`s without answering, `rst`s (SO_LINGER 0), `hang`s until stopped, or sends `reply`
    (which may be half a response, HTML, or JSON of the wrong shape) and closes."""

    def __init__(self, mode: str, reply: bytes = b"") -> None:
        self.mode, self.reply = mode, reply
        self.requests: list[tuple[str, str]] = []
        self._stop = threading.Event()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.05)
        self._thread = threading.Thread(target=self._serve, name="fault-dtma", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self._sock.getsockname()[1]

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            length = next((int(line.split(":", 1)[1]) for line in lines[1:]
                           if line.lower().startswith("content-length:")), 0)
            while len(body) < length:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                body += chunk
            method, path, _ = lines[0].split(" ", 2)
            self.requests.append((method, path))
            if self.mode == "rst":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            elif self.mode == "hang":
                self._stop.wait(10)
            elif self.mode == "reply":
                conn.sendall(self.reply)

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join(2)


@pytest.fixture
def fault_server() -> Iterator[Callable[..., FaultServer]]:
    servers: list[FaultServer] = []

    def make(mode: str, reply: bytes = b"") -> FaultServer:
        servers.append(FaultServer(mode, reply))
        return servers[-1]

    yield make
    for server in servers:
        server.close()




# --- helpers ------------------------------------------------------------------------------------------

def point_at(pg: psycopg.Connection, box: Toolbox, port: int) -> None:
    pg.execute("update account_tool_environments set dtma_port = %s where id = %s", (port, box.id))


def instance_row(pg: psycopg.Connection, instance_id: str) -> tuple[str, str | None] | None:
    return pg.execute("select status_on_toolbox::text, instance_error_message from account_tool_instances "
                      "where id = %s", (instance_id,)).fetchone()


def assert_lawful_history(pg: psycopg.Connection) -> None:
    """Every recorded status change is one the state machine allows, for the source that made it;
    and every instance the API created has its events, the last one naming its current status."""
    unlawful = pg.execute(
        """select e.from_status, e.to_status, e.source from account_tool_instance_events e
            where e.from_status is not null and e.to_status is not null and e.from_status <> e.to_status
              and not exists (select 1 from instance_status_transitions t where t.from_status = e.from_status
                              and t.to_status = e.to_status and t.source = e.source)""").fetchall()
    assert unlawful == []
    orphans = pg.execute(
        """select i.id, i.status_on_toolbox from account_tool_instances i
            where i.mcp_discovery_metadata ? 'deployed_via'
              and i.status_on_toolbox is distinct from (
                  select e.to_status from account_tool_instance_events e
                   where e.account_tool_instance_id = i.id order by e.id desc limit 1)""").fetchall()
    assert orphans == []


def sweep_with_short_deadlines(function_client: Any, pg: psycopg.Connection) -> dict[str, Any]:
    """Backdate every transitional instance, then sweep with 1 s deadlines."""
    pg.execute("update account_tool_instances set status_changed_at = now() - interval '5 seconds' "
               "where status_on_toolbox::text = any(%s)", (list(TRANSITIONAL),))
    client = function_client(SWEEP, DEPLOY_DEADLINE_SECONDS="1", ACTION_DEADLINE_SECONDS="1")
    response = client.post("/")
    assert response.status_code == 200, response.json
    return response.json


def nothing_transitional(pg: psycopg.Connection) -> None:
    stuck = pg.execute("select instance_name_on_toolbox, status_on_toolbox::text from account_tool_instances "
                       "where status_on_toolbox::text = any(%s)", (list(TRANSITIONAL),)).fetchall()
    assert stuck == []


# --- DTMA faults on deploy ---------------------------------------------------------------------------------

NOT_JSON = http_reply("201 Created", b"<html><body>Welcome to nginx!</body></html>", "text/html")
GATEWAY = http_reply("503 Service Unavailable", b"<html>upstream connect error</html>", "text/html")
HALF = http_reply("201 Created", b'{"success":true,"data":{"cont', length=400)
DEPLOY_FAULTS: dict[str, tuple[tuple[str, bytes] | str, str, str]] = {
    # fault: (how, instance status once the command ended, a fragment of what the user reads)
    # The deploy answers 202 before the agent is called, whatever the agent does; its command
    # records what the agent did. No answer at all leaves `deploying` for the deadline to close.
    "refused": ("refused", "error", "is unreachable. Nothing changed on the toolbox"),
    "slow-beyond-the-command-timeout": ("slow", "deploying", "did not answer within"),
    "hang": (("hang", b""), "deploying", "did not answer within"),
    "closed-after-request": (("close", b""), "deploying", "broke before it answered"),
    "reset-after-request": (("rst", b""), "deploying", "broke before it answered"),
    "reset-mid-response": (("reply", HALF), "deploying", "broke before it answered"),
    "500": ("500", "error", "disk full"),
    "503-html": (("reply", GATEWAY), "error", "upstream connect error"),
    "201-not-json": (("reply", NOT_JSON), "error", "with a body that is not JSON"),
    "201-no-data": ("shape:no-data", "error", "without the container's details"),
    "201-data-list": ("shape:data-list", "error", "without the container's details"),
    "201-no-state": ("shape:no-state", "error", "without the container's details"),
}
SHAPES = {"no-data": {"success": True, "message": "ok"}, "data-list": {"success": True, "data": []},
          "no-state": {"success": True, "data": {"container_id": "abc", "state": "running"}}}


@pytest.mark.parametrize("fault", list(DEPLOY_FAULTS))
def test_dtma_faults_on_deploy(function_client: Any, toolbox_agent: Any, fault_server: Any, factory: Factory,
                               pg: psycopg.Connection, fault: str) -> None:
    how, status_after, fragment = DEPLOY_FAULTS[fault]
    box, agent = toolbox_agent()
    where = f"127.0.0.1:{agent.port}"
    if how == "refused":
        agent.refuse_connections()
    elif how == "slow":
        agent.set_pull_delay(3)
    elif how == "500":
        agent.fail_next("deploy", 500, {"success": False, "error": "disk full"})
    elif isinstance(how, str) and how.startswith("shape:"):
        agent.fail_next("deploy", 201, SHAPES[how.split(":")[1]])
    else:
        server = fault_server(*how)
        point_at(pg, box, server.port)
        where = f"127.0.0.1:{server.port}"
    client = function_client(DEPLOY, DTMA_CONNECT_TIMEOUT_SECONDS="0.5", DTMA_COMMAND_TIMEOUT_SECONDS=COMMAND_TIMEOUT)
    started = time.monotonic()
    response = client.post("/", json=spec(box), headers=auth(box.user_id))
    assert time.monotonic() - started < 1, "the answer must not wait for the DTMA, whatever it does"
    assert response.status_code == 202, response.json
    instance_id = response.json["id"]
    settle()
    status, error = instance_row(pg, instance_id)
    assert status == status_after
    last = factory.events(instance_id)[-1]
    assert fragment in last[3], last
    if fault not in ("500", "503-html"):  # a refusal quotes the agent's own words instead
        assert where in last[3], last
    if status == "error":
        # What the user reads is the command's own sentence, naming the toolbox.
        assert last_command(pg, instance_id)["outcome"]["message"] == error
    assert_lawful_history(pg)
    # Nothing stays in a transitional status: the deploy deadline closes what the DTMA left open.
    counts = sweep_with_short_deadlines(function_client, pg)
    nothing_transitional(pg)
    if status_after == "deploying":
        assert counts["deadlines_failed"] == 1
        status, error = instance_row(pg, instance_id)
        assert status == "error" and "no heartbeat reported container mcp-github running within" in error
    assert_lawful_history(pg)


def test_a_slow_pull_failed_by_the_deadline_recovers_when_the_heartbeat_sees_it(
        function_client: Any, toolbox_agent: Any, factory: Factory, pg: psycopg.Connection) -> None:
    """The deadline's `error` is not final: the container came up after all, and the next
    heartbeat says so (error -> running is a heartbeat's transition)."""
    box, agent = toolbox_agent(pull_delay=0.6)
    response = function_client(DEPLOY, DTMA_DEPLOY_BUDGET_SECONDS="0.2").post("/", json=spec(box),
                                                                             headers=auth(box.user_id))
    assert response.status_code == 202
    sweep_with_short_deadlines(function_client, pg)
    assert factory.status_of(response.json["id"]) == "error"
    deadline = time.monotonic() + 5
    while not any(c.name == "mcp-github" and c.state == "running" for c in agent.containers()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    heartbeat = function_client(HEARTBEAT).post("/heartbeat", json=agent.heartbeat_payload(),
                                                headers={"Authorization": f"Bearer {box.token}"})
    assert heartbeat.status_code == 204
    assert factory.status_of(response.json["id"]) == "running"
    assert_lawful_history(pg)


# --- DTMA faults on manage actions -----------------------------------------------------------------------

MANAGE_FAULTS: dict[str, tuple[str, str, tuple[str, bytes] | str, int, str, str]] = {
    # fault: (action, starting status, how, HTTP answer, status right after, message fragment)
    # An action that never reached the agent, or that it refused without touching the container,
    # leaves the server as it was; a command still waiting beyond the budget answers 202.
    "stop-refused": ("stop", "running", "refused", 502, "running", "is unreachable"),
    "stop-closed": ("stop", "running", ("close", b""), 202, "stopping", "broke before it answered"),
    "stop-hang": ("stop", "running", ("hang", b""), 202, "stopping", "stop requested"),
    "stop-500": ("stop", "running", ("reply", http_reply("500 Internal Server Error", b'{"error":"boom"}')), 502,
                 "running", "boom"),
    "stop-not-json": ("stop", "running", ("reply", http_reply("200 OK", b"OK", "text/plain")), 502, "error",
                      "not JSON"),
    "start-reset": ("start", "stopped", ("rst", b""), 202, "starting", "broke before it answered"),
    "start-503-html": ("start", "stopped", ("reply", GATEWAY), 502, "error", "upstream connect error"),
    "restart-hang": ("restart", "running", ("hang", b""), 202, "stopping", "restart requested"),
    "remove-half-response": ("remove", "stopped", ("reply", HALF), 202, "deleting", "broke before it answered"),
    "remove-500": ("remove", "running", ("reply", http_reply("500 Internal Server Error", b'{"error":"busy"}')),
                   502, "running", "busy"),
}


@pytest.mark.parametrize("fault", list(MANAGE_FAULTS))
def test_dtma_faults_on_actions(function_client: Any, factory: Factory, fault_server: Any, pg: psycopg.Connection,
                                fault: str) -> None:
    action, start, how, http, status_after, fragment = MANAGE_FAULTS[fault]
    box = factory.toolbox()
    instance = factory.instance(box, status=start, name="srv")
    if how == "refused":
        port = closed_port()
    else:
        server = fault_server(*how)
        port = server.port
    point_at(pg, box, port)
    client = function_client(MANAGE, DTMA_DEPLOY_BUDGET_SECONDS=BUDGET, DTMA_CONNECT_TIMEOUT_SECONDS="0.5",
                             DTMA_COMMAND_TIMEOUT_SECONDS=COMMAND_TIMEOUT)
    path = f"/{instance}" if action == "remove" else f"/{instance}/{action}"
    method = "DELETE" if action == "remove" else "POST"
    response = client.open(path, method=method, headers=auth(box.user_id))
    assert response.status_code == http, response.json
    assert factory.status_of(instance) == status_after
    last = factory.events(instance)[-1]
    waiting = fragment.endswith("requested")  # the command still holds the agent call
    assert fragment in last[3] and ("srv" in last[3] or waiting), last
    if not waiting and (http != 502 or how == "refused" or "not JSON" in fragment):
        assert f"127.0.0.1:{port}" in last[3], last
    assert_lawful_history(pg)
    sweep_with_short_deadlines(function_client, pg)
    nothing_transitional(pg)
    if status_after in TRANSITIONAL:
        status, error = instance_row(pg, instance)
        assert status == "error" and "within" in error and "srv" in error
    assert_lawful_history(pg)


@pytest.mark.parametrize("how", ["refused", ("hang", b""), ("rst", b""), ("reply", NOT_JSON),
                                 ("reply", http_reply("200 OK", b'{"tool_instances": "nope"}'))],
                         ids=["refused", "hang", "reset", "not-json", "wrong-shape"])
def test_a_refresh_reports_dtma_faults_in_the_answer(function_client: Any, factory: Factory, fault_server: Any,
                                                     pg: psycopg.Connection, how: Any) -> None:
    box = factory.toolbox()
    instance = factory.instance(box, status="running")
    point_at(pg, box, closed_port() if how == "refused" else fault_server(*how).port)
    before = pg.execute("select to_jsonb(i)::text from account_tool_instances i where id = %s",
                        (instance,)).fetchone()
    client = function_client(STATUS, DTMA_STATUS_TIMEOUT_SECONDS="0.4", DTMA_CONNECT_TIMEOUT_SECONDS="0.3")
    started = time.monotonic()
    response = client.get("/", query_string={"refresh": "true"}, headers=auth(box.user_id))
    assert time.monotonic() - started < 2
    assert response.status_code == 200
    report = response.json["refresh"][box.id]
    assert report["ok"] is False and report["error"]
    assert response.json["servers"][0]["status"] == "running"
    assert pg.execute("select to_jsonb(i)::text from account_tool_instances i where id = %s",
                      (instance,)).fetchone() == before


# --- database faults ---------------------------------------------------------------------------------------

def with_app_name(url: str, name: str) -> str:
    """A distinct URL (so the function gets its own pool, see shared.adapters.db.get_database) whose
    connections are recognisable in pg_stat_activity."""
    return f"{url}{'&' if '?' in url else '?'}application_name={name}"


def forget_pool(url: str) -> None:
    from shared.adapters import db

    with db._lock:
        for key in [k for k in db._instances if k.endswith(url)]:
            db._instances.pop(key).close()


@pytest.fixture
def pool_url(database_url: str) -> Iterator[Callable[[str], str]]:
    made: list[str] = []

    def make(name: str) -> str:
        made.append(with_app_name(database_url, f"{name}_{uuid.uuid4().hex[:8]}"))
        return made[-1]

    yield make
    for url in made:
        forget_pool(url)


def app_name(url: str) -> str:
    return url.rsplit("application_name=", 1)[1]


def wait_for_lock_waiter(pg: psycopg.Connection, name: str, timeout: float = 5) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = pg.execute("select pid from pg_stat_activity where application_name = %s and wait_event_type = 'Lock'",
                         (name,)).fetchone()
        if row:
            return row[0]
        time.sleep(0.02)
    raise AssertionError(f"no backend of {name} ever waited on the lock")


def assert_503(response: Any, fragment: str) -> None:
    assert response.status_code == 503, (response.status_code, response.get_data(as_text=True)[:300])
    assert response.json["error"]["code"] == "unavailable"
    assert fragment in response.json["error"]["message"]
    assert int(response.headers["Retry-After"]) >= 1


def counts(pg: psycopg.Connection) -> tuple[int, int, int]:
    return pg.execute("select (select count(*) from account_tool_instances), "
                      "(select count(*) from account_tool_instance_events), "
                      "(select count(*) from idempotency_keys)").fetchone()


@pytest.mark.parametrize("function", [DEPLOY, MANAGE, STATUS, SWEEP, HEARTBEAT])
def test_database_unreachable_at_start_is_a_quick_503(function_client: Any, function: str) -> None:
    url = f"postgresql://postgres@127.0.0.1:{closed_port()}/postgres?application_name=unreachable"
    client = function_client(function, DATABASE_URL=url, DB_POOL_TIMEOUT_SECONDS="0.3",
                             DB_CONNECT_TIMEOUT_SECONDS="1")
    user = str(uuid.uuid4())
    calls = {DEPLOY: lambda: client.post("/", json={"toolbox_id": str(uuid.uuid4()), "name": "x"},
                                         headers=auth(user)),
             MANAGE: lambda: client.post(f"/{uuid.uuid4()}/stop", headers=auth(user)),
             STATUS: lambda: client.get("/", headers=auth(user)),
             SWEEP: lambda: client.post("/"),
             HEARTBEAT: lambda: client.post("/heartbeat", json=beat(), headers={"Authorization": "Bearer t0ken"})}
    try:
        for _ in range(2):
            started = time.monotonic()
            response = calls[function]()
            assert time.monotonic() - started < 2.5
            assert_503(response, "the database is busy or unreachable; retry shortly")
    finally:
        forget_pool(url)


class StoppablePostgres:
    """A second embedded PostgreSQL that a test may stop and start (pg_ctl, as its OS user)."""

    def __init__(self) -> None:
        self.server = embedded_pg.start(keep=False)
        self.uri = self.server.uri
        migrate(self.uri)
        self.running = True

    def _pg_ctl(self, *args: str) -> None:
        from pgserver._commands import pg_ctl

        inner = self.server._server
        pg_ctl(list(args), pgdata=self.server.data_dir, user=inner.system_user, timeout=20)

    def stop(self) -> None:
        self._pg_ctl("-w", "-m", "fast", "stop")
        self.running = False

    def start(self) -> None:
        socket_dir = self.uri.split("host=", 1)[1].split("&", 1)[0]
        self._pg_ctl("-w", "-o", '-h ""', "-o", f"-k {socket_dir}", "-l", str(self.server._server.log), "start")
        self.running = True

    def close(self) -> None:
        forget_pool(self.uri)
        if not self.running:
            self.start()  # so that pgserver's own cleanup finds the server it started and stops it
        self.server.stop()


@pytest.fixture
def own_postgres() -> Iterator[StoppablePostgres]:
    server = StoppablePostgres()
    try:
        yield server
    finally:
        server.close()


def poll(call: Callable[[], Any], ok: int, timeout: float = 10) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        response = call()
        if response.status_code == ok or time.monotonic() > deadline:
            return response
        assert_503(response, "retry shortly")
        time.sleep(0.1)


def test_database_down_then_back_without_restarting_the_functions(function_client: Any,
                                                                  own_postgres: StoppablePostgres) -> None:
    with psycopg.connect(own_postgres.uri, autocommit=True) as conn:
        box = Factory(conn).toolbox()
    agent = StandInAgent(box.token).start()
    try:
        with psycopg.connect(own_postgres.uri, autocommit=True) as conn:
            conn.execute("update account_tool_environments set dtma_port = %s where id = %s", (agent.port, box.id))
        own_postgres.stop()
        env = {"DATABASE_URL": own_postgres.uri, "DB_POOL_TIMEOUT_SECONDS": "0.5", "DB_CONNECT_TIMEOUT_SECONDS": "1"}
        deploy, status, heartbeat = (function_client(f, **env) for f in (DEPLOY, STATUS, HEARTBEAT))
        token = {"Authorization": f"Bearer {box.token}"}

        # Down from the start: quick 503s, and the DTMA is never asked to do anything.
        assert_503(status.get("/", headers=auth(box.user_id)), "unreachable")
        assert_503(deploy.post("/", json=spec(box), headers=auth(box.user_id)), "unreachable")
        assert_503(heartbeat.post("/heartbeat", json=agent.heartbeat_payload(), headers=token), "unreachable")
        assert agent.requests == []

        # Back: the same function instances serve again.
        own_postgres.start()
        assert poll(lambda: status.get("/", headers=auth(box.user_id)), 200).status_code == 200
        first = deploy.post("/", json=spec(box), headers=auth(box.user_id))
        assert first.status_code == 202, first.json
        settle()
        assert heartbeat.post("/heartbeat", json=agent.heartbeat_payload(), headers=token).status_code == 204

        # Lost between requests: 503 again, nothing recorded, no DTMA call.
        own_postgres.stop()
        posts = len(agent.requests)
        assert_503(deploy.post("/", json=spec(box, name="second"), headers=auth(box.user_id)), "unreachable")
        assert_503(status.get("/", headers=auth(box.user_id)), "unreachable")
        assert len(agent.requests) == posts
        own_postgres.start()
        second = poll(lambda: deploy.post("/", json=spec(box, name="second"), headers=auth(box.user_id)), 202)
        assert second.status_code == 202, second.json
        settle()
        with psycopg.connect(own_postgres.uri, autocommit=True) as conn:
            names = conn.execute("select instance_name_on_toolbox, status_on_toolbox::text "
                                 "from account_tool_instances order by 1").fetchall()
            assert names == [("mcp-github", "running"), ("second", "running")]
            assert_lawful_history(conn)
    finally:
        agent.stop()


def test_connection_killed_mid_request(function_client: Any, toolbox_agent: Any, pg: psycopg.Connection,
                                       database_url: str, pool_url: Callable[[str], str]) -> None:
    """The function's statement is waiting on a lock when its backend is terminated: 503, and the
    transaction it was in leaves nothing behind; the next request gets a fresh connection."""
    url = pool_url("faults_kill")
    client = function_client(DEPLOY, DATABASE_URL=url, DB_POOL_TIMEOUT_SECONDS="2")
    box, agent = toolbox_agent()
    before = counts(pg)
    with concurrent.futures.ThreadPoolExecutor(1) as pool, \
            psycopg.connect(database_url, autocommit=True) as locker, locker.transaction():
        locker.execute("select 1 from account_tool_environments where id = %s for update", (box.id,))
        pending = pool.submit(client.post, "/", json=spec(box), headers=auth(box.user_id))
        pid = wait_for_lock_waiter(pg, app_name(url))
        pg.execute("select pg_terminate_backend(%s)", (pid,))
        response = pending.result(10)
    assert_503(response, "the database is unreachable; retry shortly")
    assert counts(pg) == before and agent.requests == []
    retry = client.post("/", json=spec(box), headers=auth(box.user_id))
    assert retry.status_code == 202, retry.json
    settle()
    assert_lawful_history(pg)


def test_connections_killed_between_requests(function_client: Any, factory: Factory, pg: psycopg.Connection,
                                             pool_url: Callable[[str], str]) -> None:
    url = pool_url("faults_between")
    client = function_client(STATUS, DATABASE_URL=url, DB_POOL_MAX_SIZE="2")
    user = factory.user()
    assert client.get("/", headers=auth(user)).status_code == 200
    killed = pg.execute("select count(pg_terminate_backend(pid)) from pg_stat_activity where application_name = %s",
                        (app_name(url),)).fetchone()[0]
    assert killed >= 1
    answers = []
    for _ in range(4):
        response = client.get("/", headers=auth(user))
        answers.append(response.status_code)
        if response.status_code == 503:
            assert_503(response, "retry shortly")
        elif response.status_code == 200:
            break
    assert answers[-1] == 200 and set(answers) <= {200, 503}, answers


def test_pool_exhausted_is_a_quick_503(function_client: Any, toolbox_agent: Any, pg: psycopg.Connection,
                                       database_url: str, pool_url: Callable[[str], str]) -> None:
    """One connection, held by a deploy waiting on a lock: other requests on that instance get a
    503 after DB_POOL_TIMEOUT_SECONDS instead of queueing forever; afterwards all is served."""
    url = pool_url("faults_pool")
    env = {"DATABASE_URL": url, "DB_POOL_MAX_SIZE": "1", "DB_POOL_TIMEOUT_SECONDS": "0.3"}
    deploy, status = function_client(DEPLOY, **env), function_client(STATUS, **env)
    box, _ = toolbox_agent()
    assert status.get("/", headers=auth(box.user_id)).status_code == 200
    # Leaving the `with`: the lock is released first, then the deploy is waited for.
    with concurrent.futures.ThreadPoolExecutor(1) as pool, \
            psycopg.connect(database_url, autocommit=True) as locker, locker.transaction():
        locker.execute("select 1 from account_tool_environments where id = %s for update", (box.id,))
        pending = pool.submit(deploy.post, "/", json=spec(box), headers=auth(box.user_id))
        wait_for_lock_waiter(pg, app_name(url))
        started = time.monotonic()
        busy = status.get("/", headers=auth(box.user_id))
        assert time.monotonic() - started < 1.5
        assert_503(busy, "the database is busy or unreachable; retry shortly")
    deployed = pending.result(10)
    assert deployed.status_code == 202, deployed.json
    settle()
    assert status.get("/", headers=auth(box.user_id)).status_code == 200
    assert_lawful_history(pg)


def test_statement_timeout_is_a_503_and_a_retry_with_the_same_key_runs(
        function_client: Any, toolbox_agent: Any, pg: psycopg.Connection, database_url: str,
        pool_url: Callable[[str], str]) -> None:
    url = pool_url("faults_timeout")
    env = {"DATABASE_URL": url, "DB_STATEMENT_TIMEOUT_MS": "300"}
    deploy, heartbeat = function_client(DEPLOY, **env), function_client(HEARTBEAT, **env)
    box, agent = toolbox_agent()
    headers = {**auth(box.user_id), "Idempotency-Key": "retry-me"}
    before = pg.execute("select last_heartbeat_at from account_tool_environments where id = %s",
                        (box.id,)).fetchone()
    with psycopg.connect(database_url, autocommit=True) as locker, locker.transaction():
        locker.execute("select 1 from account_tool_environments where id = %s for update", (box.id,))
        started = time.monotonic()
        timed_out = deploy.post("/", json=spec(box), headers=headers)
        assert time.monotonic() - started < 2
        assert_503(timed_out, "the database took too long to answer; retry shortly")
        assert_503(heartbeat.post("/heartbeat", json=agent.heartbeat_payload(),
                                  headers={"Authorization": f"Bearer {box.token}"}), "took too long")
    # Nothing partial: no instance, no event, the key forgotten (an outage is not the answer).
    assert counts(pg) == (0, 0, 0) and agent.requests == []
    assert pg.execute("select last_heartbeat_at from account_tool_environments where id = %s",
                      (box.id,)).fetchone() == before
    retry = deploy.post("/", json=spec(box), headers=headers)
    assert retry.status_code == 202 and "Idempotent-Replayed" not in retry.headers
    settle()
    assert heartbeat.post("/heartbeat", json=agent.heartbeat_payload(),
                          headers={"Authorization": f"Bearer {box.token}"}).status_code == 204
    assert_lawful_history(pg)


# --- heartbeat faults ---------------------------------------------------------------------------------------

@pytest.fixture
def heartbeat(function_client: Any) -> FlaskClient:
    return function_client(HEARTBEAT)


def send(client: FlaskClient, box: Toolbox, body: dict[str, Any]) -> int:
    return client.post("/heartbeat", json=body, headers={"Authorization": f"Bearer {box.token}"}).status_code


def exited(name: str, code: int = 0) -> dict[str, Any]:
    return container(name, "exited", f"Exited ({code}) 3 seconds ago")


def test_duplicated_heartbeats_change_state_once(heartbeat: FlaskClient, factory: Factory) -> None:
    box = factory.toolbox()
    inst = factory.instance(box, status="running", name="h-1")
    crashed = beat(exited("h-1", 1), boot_id="boot-a", seq=5)
    for _ in range(3):
        assert send(heartbeat, box, crashed) == 204
    unsequenced = beat(exited("h-1", 1))
    for _ in range(3):
        assert send(heartbeat, box, unsequenced) == 204
    assert factory.status_of(inst) == "error"
    assert [e[:3] for e in factory.events(inst)] == [("running", "error", "heartbeat")]


def test_reordered_heartbeats_end_in_the_newest_truth(heartbeat: FlaskClient, factory: Factory) -> None:
    box = factory.toolbox()
    inst = factory.instance(box, status="running", name="h-1")
    assert send(heartbeat, box, beat(exited("h-1"), boot_id="boot-a", seq=2)) == 204
    assert send(heartbeat, box, beat(container("h-1"), boot_id="boot-a", seq=1)) == 204  # late
    assert factory.status_of(inst) == "error"  # an exit nobody asked for
    # The agent restarts (new boot, seq from 1): its beats count again.
    assert send(heartbeat, box, beat(container("h-1"), boot_id="boot-b", seq=1)) == 204
    assert factory.status_of(inst) == "running"


def test_a_heartbeat_replayed_days_later_is_ignored(heartbeat: FlaskClient, function_client: Any,
                                                    factory: Factory, pg: psycopg.Connection) -> None:
    box = factory.toolbox()
    inst = factory.instance(box, status="running", name="h-1")
    old = beat(container("h-1"), boot_id="boot-a", seq=7)
    assert send(heartbeat, box, old) == 204
    assert send(heartbeat, box, beat(exited("h-1"), boot_id="boot-a", seq=8)) == 204
    assert factory.status_of(inst) == "error"
    # Days pass in silence; the sweep marks the toolbox unresponsive.
    pg.execute("update account_tool_environments set last_heartbeat_at = now() - interval '3 days' where id = %s",
               (box.id,))
    assert function_client(SWEEP).post("/").json["marked_unresponsive"] == 1
    # A replay of the old beat (same boot, old seq) is acknowledged and changes nothing: not the
    # instance, and not the toolbox's liveness either.
    assert send(heartbeat, box, old) == 204
    row = pg.execute("select status::text, now() - last_heartbeat_at > interval '2 days' "
                     "from account_tool_environments where id = %s", (box.id,)).fetchone()
    assert row == ("unresponsive", True)
    assert factory.status_of(inst) == "error"
    # The agent's real next beat brings it back.
    assert send(heartbeat, box, beat(exited("h-1"), boot_id="boot-a", seq=9)) == 204
    assert pg.execute("select status::text from account_tool_environments where id = %s",
                      (box.id,)).fetchone()[0] == "active"


def test_a_partition_trips_the_sweep_guard_then_the_burst_lands_in_the_newest_truth(
        heartbeat: FlaskClient, function_client: Any, factory: Factory, pg: psycopg.Connection) -> None:
    boxes = [factory.toolbox(heartbeat_age_seconds=5) for _ in range(24)]
    instances = {box.id: factory.instance(box, status="running", name=f"p-{n}") for n, box in enumerate(boxes)}
    sweep = function_client(SWEEP)
    # The partition: every toolbox silent past the staleness threshold at once.
    pg.execute("update account_tool_environments set last_heartbeat_at = now() - make_interval(secs => %s)",
               (STALE + 60,))
    counts = sweep.post("/").json
    assert counts["guard_tripped"] is True and counts["marked_unresponsive"] == 0
    assert pg.execute("select count(*) from account_tool_environments where status <> 'active'").fetchone()[0] == 0
    assert pg.execute("select count(*) from account_tool_instance_events").fetchone()[0] == 0

    # The partition heals: every toolbox sends the beats it could not deliver, all at once, in
    # any order, some twice. Even toolboxes' newest beat says their server exited, odd ones'
    # says it runs (after older beats saying the opposite).
    def beats(n: int, box: Toolbox) -> list[tuple[Toolbox, dict[str, Any]]]:
        newest_running = n % 2 == 1
        items = []
        for seq in (1, 2, 3):
            running = newest_running if seq == 3 else not newest_running
            item = container(f"p-{n}") if running else exited(f"p-{n}")
            items.append((box, beat(item, boot_id=f"boot-{n}", seq=seq)))
        return [*items, items[0], items[2]]

    burst = [b for n, box in enumerate(boxes) for b in beats(n, box)]
    random.Random(7).shuffle(burst)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda item: send(heartbeat, *item), burst))
    assert set(statuses) == {204}
    for n, box in enumerate(boxes):
        assert factory.status_of(instances[box.id]) == ("running" if n % 2 else "error"), n
    fresh = pg.execute("select count(*) from account_tool_environments where status = 'active' "
                       "and now() - last_heartbeat_at < interval '30 seconds'").fetchone()[0]
    assert fresh == len(boxes)
    assert sweep.post("/").json["marked_unresponsive"] == 0
    assert_lawful_history(pg)


def test_a_minority_going_silent_is_marked_and_recovers(heartbeat: FlaskClient, function_client: Any,
                                                        factory: Factory, pg: psycopg.Connection) -> None:
    """The contrast to the partition: the guard trips only for a majority."""
    boxes = [factory.toolbox(heartbeat_age_seconds=5) for _ in range(6)]
    silent = boxes[0]
    inst = factory.instance(silent, status="running", name="m-1")
    pg.execute("update account_tool_environments set last_heartbeat_at = now() - make_interval(secs => %s) "
               "where id = %s", (STALE + 60, silent.id))
    counts = function_client(SWEEP).post("/").json
    assert counts["guard_tripped"] is False and counts["marked_unresponsive"] == 1
    assert send(heartbeat, silent, beat(container("m-1"), boot_id="b", seq=1)) == 204
    assert pg.execute("select status::text from account_tool_environments where id = %s",
                      (silent.id,)).fetchone()[0] == "active"
    assert factory.status_of(inst) == "running"
