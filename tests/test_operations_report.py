"""The operations report (`cp_operations_report`) and history retention (`cp_prune_history`),
sql/migrations/0010_operations.sql, against the real database.

The report's history is made by the real SQL functions (deploys recorded with
cp_record_deploy_command, commands claimed and finished with their agent calls, settled with
cp_settle, failed by cp_sweep's deadline, heartbeat verdicts through the state machine's own
function) and then moved back in time: the events of each deploy get known times, so every figure
below is exact. Events are append-only, so the move runs with triggers off for this session
(`session_replication_role = replica`, as the table owner); nothing else is inserted behind the
functions' back except where a test says so (old rows for retention).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from shared.adapters.db.postgres import PostgresDatabase
from shared.core.errors import DomainError
from tests.factories import Factory, Toolbox
from tests.helpers import transition

POLICY = {"port_low": 49152, "port_high": 49999, "dtma_port": 30000, "allow_internal": True}
BUCKET = 1800
STALE = 210


@pytest.fixture(autouse=True)
def _fresh_retention_cursor(pg: psycopg.Connection) -> Iterator[None]:
    """The events walk remembers where it stopped; each test starts from the oldest event."""
    pg.execute("update cp_private.retention_cursor set after_at = '-infinity', after_id = 0, passes = 0")
    yield


def percentile_cont(values: list[float], fraction: float) -> float:
    """PostgreSQL's percentile_cont: linear interpolation between the sorted values."""
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


class History:
    """Deploys and commands through the real functions, then placed at known times."""

    def __init__(self, pg: psycopg.Connection, db: PostgresDatabase) -> None:
        self.pg, self.db = pg, db
        self.names = 0

    def deploy(self, box: Toolbox, image: str) -> tuple[str, str]:
        self.names += 1
        command = str(uuid.uuid4())
        spec = {"name": f"srv-{self.names}", "image": image, "catalog_id": None, "transport": "streamable_http",
                "container_port": 8080, "host_port": None, "endpoint_path": "/mcp", "env_names": [],
                "capabilities": ["tools"]}
        recorded = self.db.call("cp_record_deploy_command", p_user_id=box.user_id, p_toolbox_id=box.id, p_spec=spec,
                                p_policy=POLICY, p_command_id=command, p_secret_env=None)
        return recorded["instance"]["id"], command

    def claim(self, command: str) -> None:
        claim = self.db.call("cp_claim_command", p_command_id=command, p_lease_seconds=60, p_max_per_toolbox=10)
        assert claim.get("run"), claim

    def finish(self, command: str, status: str, code: str, calls: list[Any] | None, http_status: int = 200) -> None:
        outcome: dict[str, Any] = {"http_status": http_status, "code": code, "message": f"{code} (test)"}
        if calls is not None:
            outcome["agent_calls"] = calls
        assert self.db.call("cp_finish_command", p_command_id=command, p_status=status, p_outcome=outcome)["finished"]

    def settle(self, instance: str, to: str | None, message: str, expected: str = "deploying") -> None:
        self.db.call("cp_settle", p_instance_id=instance, p_expected=expected, p_to=to, p_message=message)

    def place(self, instance: str, recorded_at: datetime, settled_at: datetime | None = None) -> None:
        """Move the deploy's record (and send) to `recorded_at`, its outcome event to `settled_at`."""
        with self.pg.transaction():
            self.pg.execute("set local session_replication_role = replica")
            self.pg.execute("""update public.account_tool_instance_events set at = %s
                                where account_tool_instance_id = %s
                                  and ((from_status is null and to_status = 'pending_deploy')
                                       or (from_status = 'pending_deploy' and to_status = 'deploying'))""",
                            (recorded_at, instance))
            if settled_at is not None:
                moved = self.pg.execute("""update public.account_tool_instance_events set at = %s
                                            where account_tool_instance_id = %s and from_status = 'deploying'
                                              and to_status in ('running', 'error')""",
                                        (settled_at, instance)).rowcount
                assert moved == 1


def call(ms: float | str | None, result: str = "ok", op: str = "deploy", status: int | None = 200) -> dict[str, Any]:
    return {"op": op, "ms": ms, "result": result, "status": status}


def report(db: PostgresDatabase, since: datetime, until: datetime, bucket: int = BUCKET) -> dict[str, Any]:
    return db.call("cp_operations_report", p_since=since, p_until=until, p_bucket_seconds=bucket,
                   p_stale_after_seconds=STALE)


@pytest.fixture
def scripted(pg: psycopg.Connection, factory: Factory, postgres_db: PostgresDatabase) -> dict[str, Any]:
    """14 deploys in a 2-hour window of four 30-minute buckets, one before it, agent commands.

    | bucket | deploys (box, image): outcome                                                  |
    | before | a good: running after 7 s (not in the window)                                  |
    | 0      | a good: running after 5, 10, 20 s; a private: pull denied                      |
    | 1      | a good: running after 30 s, and after 40 s seen by a heartbeat (the agent's    |
    |        | answer timed out); b web: host port taken; b web: a heartbeat saw it exit     |
    | 2      | a good: running after 60 s; b good: agent unreachable; b slow: sweep deadline  |
    | 3      | a good: running after 120 s; a good: still deploying; b good: running, but     |
    |        | only after the window ends (in progress as of p_until)                         |
    """
    h = History(pg, postgres_db)
    user = factory.user()
    a = factory.toolbox(user, name="alpha")
    b = factory.toolbox(user, name="beta")
    now = pg.execute("select now()").fetchone()[0]
    until = now + timedelta(minutes=10)
    since = until - timedelta(hours=2)

    def at(bucket: int, minute: float) -> datetime:
        return since + timedelta(seconds=bucket * BUCKET + minute * 60)

    def succeeds(box: Toolbox, recorded: datetime, seconds: float, *, by_heartbeat: bool = False,
                 agent_ms: float | None = None) -> str:
        instance, command = h.deploy(box, "mcp/good:1")
        h.claim(command)
        if by_heartbeat:
            h.settle(instance, None, "no answer in time; the next heartbeat will tell")
            transition(pg, instance, "running", "heartbeat", "heartbeat shows the container running")
            h.finish(command, "failed", "accepted", [call(30000, "timeout", status=None)], 202)
        else:
            h.settle(instance, "running", "container abc is running")
            h.finish(command, "done", "created", [call(agent_ms if agent_ms is not None else seconds * 900)], 201)
        h.place(instance, recorded, recorded + timedelta(seconds=seconds))
        return instance

    def fails(box: Toolbox, image: str, recorded: datetime, code: str, agent_call: dict[str, Any],
              http_status: int, status: str = "done") -> str:
        instance, command = h.deploy(box, image)
        h.claim(command)
        h.settle(instance, "error", f"deploy failed: {code}")
        h.finish(command, status, code, [agent_call], http_status)
        h.place(instance, recorded, recorded + timedelta(seconds=3))
        return instance

    outside = succeeds(a, since - timedelta(minutes=1), 7)
    first = succeeds(a, at(0, 1), 5)
    succeeds(a, at(0, 2), 10)
    succeeds(a, at(0, 3), 20)
    fails(a, "ghcr.io/acme/private:1", at(0, 4), "image_pull_failed", call(800, "rejected", status=500), 502)
    succeeds(a, at(1, 1), 30)
    succeeds(a, at(1, 2), 40, by_heartbeat=True)
    fails(b, "mcp/web:2", at(1, 3), "host_port_taken", call(300, "rejected", status=500), 409)
    exited, command = h.deploy(b, "mcp/web:2")
    h.claim(command)
    h.settle(exited, None, "no answer in time; the next heartbeat will tell")
    transition(pg, exited, "error", "heartbeat", "container exited unexpectedly with code 1")
    h.finish(command, "failed", "accepted", [call(30000, "timeout", status=None)], 202)
    h.place(exited, at(1, 4), at(1, 4) + timedelta(seconds=50))
    succeeds(a, at(2, 1), 60)
    fails(b, "mcp/good:1", at(2, 2), "toolbox_unreachable", call(2000.5, "unreachable", status=None), 502,
          status="failed")
    slow, command = h.deploy(b, "mcp/slow:3")
    h.claim(command)
    h.settle(slow, None, "no answer in time; the next heartbeat will tell")
    h.finish(command, "failed", "accepted", [call(30000, "timeout", status=None)], 202)
    pg.execute("update account_tool_instances set status_changed_at = now() - interval '700 seconds' where id = %s",
               (slow,))
    swept = postgres_db.call("cp_sweep", p_stale_after_seconds=100_000, p_first_contact_grace_seconds=100_000,
                             p_deploy_deadline_seconds=600, p_action_deadline_seconds=120, p_batch_size=500,
                             p_guard_fraction=0.5)
    assert swept["deadlines"] == {"deploying": 1}
    h.place(slow, at(2, 3), at(2, 3) + timedelta(seconds=600))
    succeeds(a, at(3, 1), 120)
    pending, _ = h.deploy(a, "mcp/good:1")  # recorded, its command never claimed
    h.place(pending, at(3, 2))
    late = succeeds(b, at(3, 3), 100, agent_ms=100)
    h.place(late, at(3, 3), until + timedelta(minutes=5))

    # Agent commands besides the deploys: a stop and a start of the first server; a stop of another
    # with a malformed array (only its well-formed element counts); a command without the array;
    # one that finished before the window (its calls are left out).
    for action, plan, to, calls in (
            ("stop", {"running": "stopping"}, "stopped", [call(250.5, op="stop")]),
            ("start", {"stopped": "starting"}, "running", [call(120, op="start"), call(15, op="tools_status")])):
        command = str(uuid.uuid4())
        postgres_db.call("cp_begin_action_command", p_user_id=user, p_instance_id=first, p_action=action,
                         p_plan=plan, p_message=f"{action} requested", p_allow_internal=True, p_command_id=command)
        h.claim(command)
        h.settle(first, to, f"{action} done", expected=next(iter(plan.values())))
        h.finish(command, "done", "done", calls)
    for instance, calls in ((outside, [{"op": "stop", "ms": "fast", "result": "bad_response", "status": None}, 5,
                                       {"ms": 3}, {"op": 7}]),
                            (late, None)):
        command = str(uuid.uuid4())
        postgres_db.call("cp_begin_action_command", p_user_id=user, p_instance_id=instance, p_action="stop",
                         p_plan={"running": "stopping"}, p_message="stop requested", p_allow_internal=True,
                         p_command_id=command)
        h.claim(command)
        h.settle(instance, "stopped", "stopped", expected="stopping")
        h.finish(command, "done", "done", calls)
    pg.execute("""insert into public.dtma_commands
                    (id, account_tool_instance_id, account_tool_environment_id, action, expected_status, status,
                     outcome, created_at, started_at, finished_at)
                  values (%s, %s, %s, 'stop', 'stopping', 'done', %s, %s, %s, %s)""",
               (str(uuid.uuid4()), first, a.id,
                Jsonb({"code": "done", "agent_calls": [call(9999, op="stop")]}),
                since - timedelta(hours=1), since - timedelta(hours=1), since - timedelta(minutes=1)))

    # Toolboxes now: alpha and beta beat 5 s ago; one active silent for 400 s (late), one unresponsive,
    # one awaiting its first heartbeat.
    factory.toolbox(user, name="gamma", heartbeat_age_seconds=400)
    factory.toolbox(user, name="delta", status="unresponsive", heartbeat_age_seconds=3600)
    factory.toolbox(user, name="epsilon", status="awaiting_heartbeat", heartbeat_age_seconds=None)
    return {"since": since, "until": until, "a": a, "b": b}


def test_every_figure_of_a_scripted_history(scripted: dict[str, Any], postgres_db: PostgresDatabase) -> None:
    since, until, a, b = scripted["since"], scripted["until"], scripted["a"], scripted["b"]
    got = report(postgres_db, since, until)

    assert got["window"]["bucket_seconds"] == BUCKET
    assert datetime.fromisoformat(got["window"]["since"]) == since
    assert datetime.fromisoformat(got["window"]["until"]) == until

    succeeded = [5, 10, 20, 30, 40, 60, 120]
    deploys = got["deploys"]
    assert {k: deploys[k] for k in ("started", "succeeded", "failed", "in_progress")} == {
        "started": 14, "succeeded": 7, "failed": 5, "in_progress": 2}
    assert deploys["success_rate"] == round(7 / 12, 4) == 0.5833
    assert deploys["failures_by_reason"] == {"image_pull_failed": 1, "host_port_taken": 1, "container_failed": 1,
                                             "toolbox_unreachable": 1, "deadline": 1}
    assert deploys["time_to_running"] == {
        "count": 7, "p50_seconds": 30, "p95_seconds": round(percentile_cont(succeeded, 0.95), 3),
        "max_seconds": 120}
    assert deploys["time_to_running"]["p95_seconds"] == 102
    assert deploys["top_failing_images"] == [
        {"image": "mcp/web:2", "failed": 2, "started": 2},
        {"image": "mcp/good:1", "failed": 1, "started": 10},
        {"image": "ghcr.io/acme/private:1", "failed": 1, "started": 1},
        {"image": "mcp/slow:3", "failed": 1, "started": 1}]
    assert deploys["top_failing_toolboxes"] == [
        {"toolbox_id": b.id, "name": "beta", "failed": 4, "started": 5},
        {"toolbox_id": a.id, "name": "alpha", "failed": 1, "started": 9}]

    # Calls count by when their command finished (all of them now, in the window), whenever the deploy was:
    # the deploy before the window is in; the one never claimed has no calls yet.
    deploy_ms = [6300, 4500, 9000, 18000, 27000, 30000, 54000, 108000,  # running (the 40 s one timed out)
                 800, 300, 30000, 2000.5, 30000, 100]  # pull, port, exited, unreachable, deadline, late
    calls = got["agent_calls"]
    assert calls["commands"] == 14 + 3  # the deploys that finished, the two stops and the start
    assert calls["by_operation"] == {
        "deploy": {"count": 14, "errors": 6, "errors_by_result": {"timeout": 3, "rejected": 2, "unreachable": 1},
                   "p50_ms": 13500, "p95_ms": round(percentile_cont(deploy_ms, 0.95), 1), "max_ms": 108000},
        "stop": {"count": 2, "errors": 1, "errors_by_result": {"bad_response": 1}, "p50_ms": 250.5,
                 "p95_ms": 250.5, "max_ms": 250.5},
        "start": {"count": 1, "errors": 0, "errors_by_result": {}, "p50_ms": 120, "p95_ms": 120, "max_ms": 120},
        "tools_status": {"count": 1, "errors": 0, "errors_by_result": {}, "p50_ms": 15, "p95_ms": 15,
                         "max_ms": 15}}
    assert calls["by_operation"]["deploy"]["p95_ms"] == 72900

    boxes = got["toolboxes"]
    assert {k: boxes[k] for k in ("active", "unresponsive", "awaiting_first_heartbeat", "late",
                                  "stale_after_seconds")} == {
        "active": 3, "unresponsive": 1, "awaiting_first_heartbeat": 1, "late": 1, "stale_after_seconds": STALE}
    ages = boxes["heartbeat_age_seconds"]  # 5, 5, 400 s old when made, plus the time the test took
    assert 5 <= ages["p50"] < 15 and 5 <= ages["p95"] < 410 and 400 <= ages["max"] < 410
    assert ages["p95"] == ages["max"]  # percentile_disc: the nearest real toolbox's age

    assert [{k: v for k, v in item.items() if k != "start"} for item in got["series"]] == [
        {"started": 4, "succeeded": 3, "failed": 1, "in_progress": 0, "p50_time_to_running_seconds": 10},
        {"started": 4, "succeeded": 2, "failed": 2, "in_progress": 0, "p50_time_to_running_seconds": 35},
        {"started": 3, "succeeded": 1, "failed": 2, "in_progress": 0, "p50_time_to_running_seconds": 60},
        {"started": 3, "succeeded": 1, "failed": 0, "in_progress": 2, "p50_time_to_running_seconds": 120}]
    assert [datetime.fromisoformat(item["start"]) for item in got["series"]] == [
        since + timedelta(seconds=BUCKET * n) for n in range(4)]
    assert sum(item["started"] for item in got["series"]) == deploys["started"]


def test_a_later_until_sees_the_late_deploy_settle(scripted: dict[str, Any], postgres_db: PostgresDatabase) -> None:
    got = report(postgres_db, scripted["since"], scripted["until"] + timedelta(minutes=10), bucket=3600)
    assert got["deploys"]["in_progress"] == 1 and got["deploys"]["succeeded"] == 8
    assert got["deploys"]["time_to_running"]["max_seconds"] == 1620 + 300  # recorded 27 min before until
    assert len(got["series"]) == 3  # 2 h 10 min in hours: the last bucket is partial


def test_an_empty_window_and_the_defaults(pg: psycopg.Connection, postgres_db: PostgresDatabase) -> None:
    got = postgres_db.call("cp_operations_report", p_since=None, p_until=None, p_bucket_seconds=3600,
                           p_stale_after_seconds=STALE)
    until, since = (datetime.fromisoformat(got["window"][k]) for k in ("until", "since"))
    assert until - since == timedelta(hours=24) and len(got["series"]) == 24
    assert got["deploys"] == {"started": 0, "succeeded": 0, "failed": 0, "in_progress": 0, "success_rate": None,
                              "failures_by_reason": {}, "top_failing_images": [], "top_failing_toolboxes": [],
                              "time_to_running": {"count": 0, "p50_seconds": None, "p95_seconds": None,
                                                  "max_seconds": None}}
    assert got["agent_calls"] == {"commands": 0, "by_operation": {}}
    assert got["toolboxes"]["heartbeat_age_seconds"] == {"p50": None, "p95": None, "max": None}
    assert all(item["started"] == 0 and item["p50_time_to_running_seconds"] is None for item in got["series"])


@pytest.mark.parametrize(("since_hours", "until_hours", "bucket", "message"), [
    (0, -1, 3600, "since must be before until"),
    (-1, -1, 3600, "since must be before until"),
    (-24, 0, 0, "bucket_seconds"),
    (-24 * 30, 0, 60, "43200 buckets asked for; at most 1000"),
])
def test_a_window_out_of_range_is_refused(postgres_db: PostgresDatabase, since_hours: int, until_hours: int,
                                          bucket: int, message: str) -> None:
    base = datetime.fromisoformat("2026-01-01T00:00:00+00:00")
    with pytest.raises(DomainError, match=message) as caught:
        report(postgres_db, base + timedelta(hours=since_hours), base + timedelta(hours=until_hours), bucket)
    assert caught.value.status == 400


# --- retention ------------------------------------------------------------------------------------------------

def old_events(pg: psycopg.Connection, box: Toolbox, instance: str, count: int, days: float,
               step_seconds: int = 60) -> None:
    """`count` events of `instance`, the first `days` days ago, a minute apart (inserted directly:
    history from before the retention cutoff cannot be made now through the functions)."""
    pg.execute("""insert into public.account_tool_instance_events
                    (account_tool_instance_id, account_tool_environment_id, instance_name_on_toolbox,
                     from_status, to_status, source, message, at)
                  select %s, %s, 'old', 'running', 'running', 'heartbeat', 'note ' || n,
                         now() - make_interval(days => %s) + make_interval(secs => n * %s)
                    from generate_series(1, %s) n""", (instance, box.id, days, step_seconds, count))


def event_notes(pg: psycopg.Connection, instance: str) -> list[str]:
    return [r[0] for r in pg.execute("select message from account_tool_instance_events "
                                     "where account_tool_instance_id = %s order by id", (instance,))]


def finished_command(pg: psycopg.Connection, box: Toolbox, instance: str, days: float, status: str = "done",
                     calls: int = 2) -> str:
    command = str(uuid.uuid4())
    finished = None if status in ("pending", "running") else f"{days} days"
    pg.execute("""insert into public.dtma_commands (id, account_tool_instance_id, account_tool_environment_id, action,
                                                    expected_status, status, outcome, created_at, finished_at)
                  values (%s, %s, %s, 'stop', 'stopping', %s, %s, now() - make_interval(days => %s),
                          now() - %s::interval)""",
               (command, instance, box.id, status,
                Jsonb({"code": "done", "agent_calls": [call(10 * n, op="stop") for n in range(calls)]}),
                days, finished))
    return command


def prune(db: PostgresDatabase, batch: int = 5000, keep: int = 20) -> dict[str, Any]:
    return db.call("cp_prune_history", p_events_retention_days=30, p_commands_retention_days=30,
                   p_keep_events_per_instance=keep, p_batch_size=batch)


def test_old_history_is_pruned_and_every_server_keeps_its_newest_events(
        pg: psycopg.Connection, factory: Factory, postgres_db: PostgresDatabase) -> None:
    box = factory.toolbox()
    busy = factory.instance(box, status="running")
    quiet = factory.instance(box, status="running")
    removed = str(uuid.uuid4())  # its row is gone; events outlive it
    old_events(pg, box, busy, 25, days=40)
    pg.execute("""insert into public.account_tool_instance_events
                    (account_tool_instance_id, account_tool_environment_id, instance_name_on_toolbox, from_status,
                     to_status, source, message)
                  values (%s, %s, 'busy', 'running', 'running', 'api', 'recent 1'),
                         (%s, %s, 'busy', 'running', 'running', 'api', 'recent 2'),
                         (%s, %s, 'busy', 'running', 'running', 'api', 'recent 3'),
                         (%s, %s, 'gone', 'deleting', null, 'api', 'recent removal')""",
               (busy, box.id, busy, box.id, busy, box.id, removed, box.id))
    old_events(pg, box, quiet, 5, days=400)
    old_events(pg, box, removed, 5, days=31)
    old_done = finished_command(pg, box, busy, days=31)
    old_failed = finished_command(pg, box, busy, days=45, status="failed")
    old_open = finished_command(pg, box, busy, days=45, status="pending")
    recent = finished_command(pg, box, busy, days=29)
    assert pg.execute("select count(*) from cp_private.agent_calls").fetchone()[0] == 6  # finished ones only

    assert prune(postgres_db) == {"events_deleted": 8 + 5, "events_examined": 25 + 5 + 5, "commands_deleted": 2,
                                  "more": False}
    assert event_notes(pg, busy) == [f"note {n}" for n in range(9, 26)] + ["recent 1", "recent 2", "recent 3"]
    assert event_notes(pg, quiet) == [f"note {n}" for n in range(1, 6)]  # fewer than 20, kept however old
    assert event_notes(pg, removed) == ["recent removal"]
    commands = {r[0] for r in pg.execute("select id::text from dtma_commands")}
    assert commands == {old_open, recent} and not {old_done, old_failed} & commands
    assert {r[0] for r in pg.execute("select distinct command_id::text from cp_private.agent_calls")} == {recent}
    assert prune(postgres_db)["events_deleted"] == 0  # a second pass finds nothing more


def test_each_call_is_bounded_by_the_batch_size(pg: psycopg.Connection, factory: Factory,
                                                postgres_db: PostgresDatabase) -> None:
    box = factory.toolbox()
    instance = factory.instance(box)
    old_events(pg, box, str(uuid.uuid4()), 12, days=40)
    for _ in range(7):
        finished_command(pg, box, instance, days=40)
    passes = [prune(postgres_db, batch=5) for _ in range(4)]
    assert [(p["events_deleted"], p["events_examined"], p["commands_deleted"], p["more"]) for p in passes] == [
        (5, 5, 5, True), (5, 5, 2, True), (2, 2, 0, False), (0, 0, 0, False)]
    assert pg.execute("select count(*) from account_tool_instance_events").fetchone()[0] == 0
    assert pg.execute("select count(*) from dtma_commands").fetchone()[0] == 0


def test_the_walk_moves_past_events_it_keeps(pg: psycopg.Connection, factory: Factory,
                                             postgres_db: PostgresDatabase) -> None:
    """Kept events pile up at the old end; a batch that only meets those must not stall the next one."""
    box = factory.toolbox()
    kept = factory.instance(box)
    old_events(pg, box, kept, 10, days=50)  # kept: the instance exists and has fewer than 20
    old_events(pg, box, str(uuid.uuid4()), 3, days=40)  # deletable, newer than all of those
    passes = [prune(postgres_db, batch=5) for _ in range(4)]
    # ... and after the end, the walk starts over from the oldest.
    assert [(p["events_examined"], p["events_deleted"]) for p in passes] == [(5, 0), (5, 0), (3, 3), (5, 0)]
    assert len(event_notes(pg, kept)) == 10
    assert pg.execute("select passes from cp_private.retention_cursor").fetchone()[0] == 1


def test_keep_zero_prunes_every_old_event(pg: psycopg.Connection, factory: Factory,
                                          postgres_db: PostgresDatabase) -> None:
    box = factory.toolbox()
    instance = factory.instance(box)
    old_events(pg, box, instance, 3, days=40)
    assert prune(postgres_db, keep=0)["events_deleted"] == 3


@pytest.mark.parametrize("params", [
    {"p_events_retention_days": 0}, {"p_commands_retention_days": 0}, {"p_keep_events_per_instance": -1},
    {"p_batch_size": 0}, {"p_batch_size": 50_001}])
def test_retention_parameters_out_of_range_are_refused(postgres_db: PostgresDatabase, params: dict[str, int]) -> None:
    args = {"p_events_retention_days": 30, "p_commands_retention_days": 30, "p_keep_events_per_instance": 20,
            "p_batch_size": 100, **params}
    with pytest.raises(DomainError, match="retention parameters out of range") as caught:
        postgres_db.call("cp_prune_history", **args)
    assert caught.value.status == 400


def test_a_malformed_agent_calls_array_never_fails_the_commands_finish(
        pg: psycopg.Connection, factory: Factory, postgres_db: PostgresDatabase) -> None:
    box = factory.toolbox()
    instance = factory.instance(box)
    h = History(pg, postgres_db)
    command = str(uuid.uuid4())
    postgres_db.call("cp_begin_action_command", p_user_id=box.user_id, p_instance_id=instance, p_action="stop",
                     p_plan={"running": "stopping"}, p_message="stop", p_allow_internal=True, p_command_id=command)
    h.claim(command)
    h.finish(command, "done", "done", [{"op": "stop", "ms": 1e300, "result": "ok"}, {"op": "x" * 500, "ms": 1},
                                       None, [], "stop"])
    assert pg.execute("select status from dtma_commands where id = %s", (command,)).fetchone()[0] == "done"
    rows = pg.execute("select op, ms, result, n from cp_private.agent_calls where command_id = %s order by n",
                      (command,)).fetchall()
    assert rows == [("stop", 1e12, "ok", 0), ("x" * 64, 1.0, "unknown", 1)]


# --- the sweep runs retention ----------------------------------------------------------------------------------

def test_the_sweep_prunes_history_with_the_configured_retention(function_client: Any, factory: Factory,
                                                                pg: psycopg.Connection) -> None:
    box = factory.toolbox()
    instance = factory.instance(box)
    old_events(pg, box, str(uuid.uuid4()), 4, days=8)
    old_events(pg, box, instance, 4, days=8)
    finished_command(pg, box, instance, days=8)
    client = function_client("mcp_status_sweep", EVENTS_RETENTION_DAYS="7", COMMANDS_RETENTION_DAYS="7",
                             EVENTS_KEEP_PER_SERVER="1", RETENTION_BATCH_SIZE="3")
    assert client.post("/").status_code == 200
    assert pg.execute("select count(*) from account_tool_instance_events").fetchone()[0] == 5  # 3 of 8 went
    assert pg.execute("select count(*) from dtma_commands").fetchone()[0] == 0
    for _ in range(2):
        assert client.post("/").status_code == 200
    assert event_notes(pg, instance) == ["note 4"]  # the newest one is kept
    assert pg.execute("select count(*) from account_tool_instance_events").fetchone()[0] == 1


def test_a_batch_size_of_zero_turns_retention_off(function_client: Any, factory: Factory,
                                                  pg: psycopg.Connection) -> None:
    box = factory.toolbox()
    old_events(pg, box, str(uuid.uuid4()), 2, days=400)
    client = function_client("mcp_status_sweep", RETENTION_BATCH_SIZE="0")
    assert client.post("/").status_code == 200
    assert pg.execute("select count(*) from account_tool_instance_events").fetchone()[0] == 2
