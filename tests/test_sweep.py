"""mcp_status_sweep through the functions-framework app (and cp_sweep directly for concurrency),
against the real database. Time never passes in these tests: toolboxes are created with an old
heartbeat and instances are backdated, so every case is deterministic and fast."""

from __future__ import annotations

import logging
import threading
from typing import Any

import psycopg
import pytest
from flask.testing import FlaskClient

from shared.adapters.db.postgres import PostgresDatabase
from tests.factories import Factory, Toolbox
from tests.helpers import run_concurrently

FN = "mcp_status_sweep"
STALE = 3 * 60 + 30  # the default threshold: 3 x 60 s interval + 30 s grace


@pytest.fixture
def client(function_client: Any) -> FlaskClient:
    return function_client(FN)


def sweep(client: FlaskClient) -> dict[str, Any]:
    response = client.post("/")
    assert response.status_code == 200, response.json
    return response.json


def backdate(pg: psycopg.Connection, instance_id: str, seconds: int) -> None:
    pg.execute("update account_tool_instances set status_changed_at = now() - make_interval(secs => %s) "
               "where id = %s", (seconds, instance_id))


def box_status(pg: psycopg.Connection, box: Toolbox) -> tuple[str, str | None]:
    row = pg.execute("select status::text, provisioning_error_message from account_tool_environments "
                     "where id = %s", (box.id,)).fetchone()
    return row[0], row[1]


# --- silent toolboxes -----------------------------------------------------------------------------

def test_fresh_toolbox_is_left_alone(client: FlaskClient, factory: Factory, pg: psycopg.Connection) -> None:
    box = factory.toolbox(heartbeat_age_seconds=STALE - 10)
    inst = factory.instance(box, status="running")
    counts = sweep(client)
    assert counts["marked_unresponsive"] == 0 and counts["guard_tripped"] is False
    assert box_status(pg, box)[0] == "active"
    assert factory.events(inst) == []


def test_stale_toolbox_becomes_unresponsive_and_its_instances_keep_their_status(
        client: FlaskClient, factory: Factory, pg: psycopg.Connection) -> None:
    box = factory.toolbox(heartbeat_age_seconds=STALE + 50, name="droplet-1")
    running = factory.instance(box, status="running")
    stopped = factory.instance(box, status="stopped")
    legacy_tool = factory.instance(box, status="running", mcp=False)
    counts = sweep(client)
    assert counts["marked_unresponsive"] == 1 and counts["instance_events"] == 3
    assert box_status(pg, box)[0] == "unresponsive"
    assert factory.status_of(running) == "running" and factory.status_of(stopped) == "stopped"
    (frm, to, source, message), = factory.events(running)
    assert (frm, to, source) == ("running", "running", "sweep")
    assert message.startswith("toolbox droplet-1 silent for 2") and message.endswith(
        " s; status unknown until it reports again")
    assert factory.events(stopped)[0][:3] == ("stopped", "stopped", "sweep")
    assert len(factory.events(legacy_tool)) == 1


def test_a_second_sweep_changes_nothing(client: FlaskClient, factory: Factory) -> None:
    box = factory.toolbox(heartbeat_age_seconds=STALE + 50)
    inst = factory.instance(box, status="running")
    assert sweep(client)["marked_unresponsive"] == 1
    counts = sweep(client)
    assert counts["marked_unresponsive"] == 0 and counts["instance_events"] == 0
    assert len(factory.events(inst)) == 1


def test_thresholds_come_from_configuration(function_client: Any, factory: Factory,
                                            pg: psycopg.Connection) -> None:
    client = function_client(FN, HEARTBEAT_INTERVAL_SECONDS="10", HEARTBEAT_GRACE_SECONDS="5")
    box = factory.toolbox(heartbeat_age_seconds=40)  # > 3 x 10 + 5
    assert sweep(client)["marked_unresponsive"] == 1
    assert box_status(pg, box)[0] == "unresponsive"


def test_work_per_sweep_is_bounded_by_the_batch_size(function_client: Any, factory: Factory) -> None:
    client = function_client(FN, SWEEP_BATCH_SIZE="2", SWEEP_GUARD_FRACTION="1")
    for _ in range(5):
        factory.toolbox(heartbeat_age_seconds=STALE + 100)
    first = sweep(client)
    assert first["marked_unresponsive"] == 2 and first["more"] is True
    assert sweep(client)["marked_unresponsive"] == 2
    last = sweep(client)
    assert last["marked_unresponsive"] == 1 and last["more"] is False


# --- first contact -------------------------------------------------------------------------------

def test_awaiting_first_heartbeat_past_the_grace_fails_with_a_reason(
        function_client: Any, factory: Factory, pg: psycopg.Connection) -> None:
    client = function_client(FN, FIRST_CONTACT_GRACE_SECONDS="600")
    late = factory.toolbox(status="awaiting_heartbeat", heartbeat_age_seconds=None)
    young = factory.toolbox(status="awaiting_heartbeat", heartbeat_age_seconds=None)
    pg.execute("update account_tool_environments set status_changed_at = now() - interval '601 seconds' "
               "where id = %s", (late.id,))
    pg.execute("update account_tool_environments set status_changed_at = now() - interval '500 seconds' "
               "where id = %s", (young.id,))
    assert sweep(client)["first_contact_failed"] == 1
    status, reason = box_status(pg, late)
    assert status == "error_provisioning"
    assert reason.startswith("the toolbox agent sent no heartbeat within 10 min of provisioning")
    assert box_status(pg, young) == ("awaiting_heartbeat", None)


# --- deadlines -----------------------------------------------------------------------------------

DEADLINES = [
    ("pending_deploy", 600,
     "deploy of srv was recorded but never sent to the toolbox within 10 min; deploy it again"),
    ("deploying", 600,
     "no heartbeat reported container srv running within 10 min of the deploy; check the image and its logs "
     "on the toolbox, then deploy again"),
    ("starting", 120, "no report confirmed container srv started within 2 min"),
    ("stopping", 120, "no report confirmed container srv stopped within 2 min"),
    ("deleting", 120, "the toolbox never confirmed container srv was removed within 2 min; remove it again"),
]


@pytest.mark.parametrize(("status", "deadline", "message"), DEADLINES, ids=[d[0] for d in DEADLINES])
def test_each_deadline(client: FlaskClient, factory: Factory, pg: psycopg.Connection, status: str,
                       deadline: int, message: str) -> None:
    box = factory.toolbox()
    late = factory.instance(box, status=status, name="srv")
    in_time = factory.instance(box, status=status, name="other")
    backdate(pg, late, deadline + 1)
    backdate(pg, in_time, deadline - 5)
    counts = sweep(client)
    assert counts["deadlines_failed"] == 1 and counts["deadlines"] == {status: 1}
    assert factory.status_of(late) == "error"
    assert factory.events(late) == [(status, "error", "sweep", message)]
    assert pg.execute("select instance_error_message from account_tool_instances where id = %s",
                      (late,)).fetchone()[0] == message
    assert factory.status_of(in_time) == status and factory.events(in_time) == []


def test_deadlines_come_from_configuration(function_client: Any, factory: Factory,
                                           pg: psycopg.Connection) -> None:
    client = function_client(FN, DEPLOY_DEADLINE_SECONDS="90", ACTION_DEADLINE_SECONDS="30")
    box = factory.toolbox()
    deploying = factory.instance(box, status="deploying", name="srv")
    starting = factory.instance(box, status="starting", name="other")
    backdate(pg, deploying, 91)
    backdate(pg, starting, 31)
    assert sweep(client)["deadlines"] == {"deploying": 1, "starting": 1}
    assert factory.events(deploying)[-1][3].startswith(
        "no heartbeat reported container srv running within 90 s")
    assert factory.events(starting)[-1][3] == "no report confirmed container other started within 30 s"


@pytest.mark.parametrize("toolbox", [{"heartbeat_age_seconds": STALE + 60},
                                     {"status": "unresponsive", "heartbeat_age_seconds": 3600}])
def test_no_deadline_verdict_on_a_toolbox_we_cannot_hear(client: FlaskClient, factory: Factory,
                                                         pg: psycopg.Connection,
                                                         toolbox: dict[str, Any]) -> None:
    """Staleness is not failure: with no report to stand on, the instance stays (and reads unknown)."""
    box = factory.toolbox(**toolbox)
    deploying = factory.instance(box, status="deploying")
    pending = factory.instance(box, status="pending_deploy")
    backdate(pg, deploying, 3600)
    backdate(pg, pending, 3600)
    sweep(client)
    assert factory.status_of(deploying) == "deploying"
    assert factory.status_of(pending) == "error"  # never sent: nothing to hear from the toolbox about


# --- the guard -----------------------------------------------------------------------------------

def test_guard_trips_when_most_of_the_fleet_goes_silent_at_once(client: FlaskClient, factory: Factory,
                                                                pg: psycopg.Connection,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    silent = [factory.toolbox(heartbeat_age_seconds=STALE + 30) for _ in range(3)]
    factory.toolbox()
    inst = factory.instance(silent[0], status="running")
    deploying = factory.instance(factory.toolbox(), status="deploying")
    backdate(pg, deploying, 601)
    with caplog.at_level(logging.INFO, logger="mcp.sweep"):
        counts = sweep(client)
    assert counts["guard_tripped"] is True
    assert (counts["active_toolboxes"], counts["silent_toolboxes"]) == (5, 3)
    assert counts["marked_unresponsive"] == 0
    assert all(box_status(pg, box)[0] == "active" for box in silent)
    assert factory.events(inst) == []
    # Deadlines on toolboxes that do report are still enforced.
    assert factory.status_of(deploying) == "error"
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "sweep guard tripped: 3 of 5 active toolboxes silent" in errors[0].getMessage()


def test_guard_suspends_first_contact_failures_too(function_client: Any, factory: Factory,
                                                   pg: psycopg.Connection) -> None:
    client = function_client(FN, FIRST_CONTACT_GRACE_SECONDS="60")
    for _ in range(3):
        factory.toolbox(heartbeat_age_seconds=STALE + 30)
    waiting = factory.toolbox(status="awaiting_heartbeat", heartbeat_age_seconds=None)
    pg.execute("update account_tool_environments set status_changed_at = now() - interval '1 hour' "
               "where id = %s", (waiting.id,))
    counts = sweep(client)
    assert counts["guard_tripped"] is True and counts["first_contact_failed"] == 0
    assert box_status(pg, waiting)[0] == "awaiting_heartbeat"


@pytest.mark.parametrize(("silent", "fresh"), [(1, 0), (2, 0), (2, 2), (3, 3)])
def test_guard_stays_quiet_for_small_or_partial_failures(client: FlaskClient, factory: Factory,
                                                         silent: int, fresh: int) -> None:
    """One or two silent droplets are most likely those droplets, whatever the fraction; and
    half the fleet is not "more than half"."""
    for _ in range(silent):
        factory.toolbox(heartbeat_age_seconds=STALE + 30)
    for _ in range(fresh):
        factory.toolbox()
    counts = sweep(client)
    assert counts["guard_tripped"] is False and counts["marked_unresponsive"] == silent


def test_guard_counts_toolboxes_that_went_silent_in_recent_sweeps(client: FlaskClient, factory: Factory,
                                                                  pg: psycopg.Connection) -> None:
    """An ingest outage spreads over more than one sweep; the later sweeps still see its size."""
    for _ in range(2):
        factory.toolbox(status="unresponsive", heartbeat_age_seconds=STALE + 60)  # marked just now
    factory.toolbox(status="unresponsive", heartbeat_age_seconds=7200)
    pg.execute("update account_tool_environments set status_changed_at = now() - interval '2 hours' "
               "where last_heartbeat_at < now() - interval '1 hour'")  # long dead: not part of this wave
    for _ in range(2):
        factory.toolbox(heartbeat_age_seconds=STALE + 30)
    for _ in range(2):
        factory.toolbox()
    counts = sweep(client)
    # 2 silent + 2 recent = 4 > 0.5 x (4 active + 2 recent)
    assert counts["guard_tripped"] is True and counts["recently_unresponsive"] == 2


def test_guard_fraction_comes_from_configuration(function_client: Any, factory: Factory) -> None:
    client = function_client(FN, SWEEP_GUARD_FRACTION="0.9")
    for _ in range(4):
        factory.toolbox(heartbeat_age_seconds=STALE + 30)
    factory.toolbox()
    counts = sweep(client)  # 4 of 5 = 80%, not more than 90%
    assert counts["guard_tripped"] is False and counts["marked_unresponsive"] == 4


# --- concurrency ---------------------------------------------------------------------------------

def test_two_concurrent_sweeps_change_each_row_once(factory: Factory, postgres_db: PostgresDatabase,
                                                    pg: psycopg.Connection) -> None:
    silent = [factory.toolbox(heartbeat_age_seconds=STALE + 30) for _ in range(30)]
    watched = [factory.instance(box, status="running") for box in silent for _ in range(2)]
    live = factory.toolbox()
    late = [factory.instance(live, status="deploying") for _ in range(30)]
    for inst in late:
        backdate(pg, inst, 700)
    totals: list[dict[str, Any]] = []
    barrier = threading.Barrier(4)

    def run() -> None:
        barrier.wait(10)
        while True:
            counts = postgres_db.call("cp_sweep", p_stale_after_seconds=STALE,
                                      p_first_contact_grace_seconds=900, p_deploy_deadline_seconds=600,
                                      p_action_deadline_seconds=120, p_batch_size=4, p_guard_fraction=1.0)
            totals.append(counts)
            if not counts["more"]:
                return

    assert run_concurrently(run, 4) == []
    assert sum(c["marked_unresponsive"] for c in totals) == 30
    assert sum(c["instance_events"] for c in totals) == 60
    assert sum(c["deadlines_failed"] for c in totals) == 30
    assert all(len(factory.events(i)) == 1 for i in watched + late)
    assert all(factory.status_of(i) == "error" for i in late)


# --- HTTP surface --------------------------------------------------------------------------------

def test_only_post(client: FlaskClient) -> None:
    response = client.get("/")
    assert response.status_code == 405 and response.headers["Allow"] == "POST"
    assert "Access-Control-Allow-Origin" not in response.headers


def test_scheduler_body_is_ignored(client: FlaskClient) -> None:
    response = client.post("/", data=b'{"job": "mcp-status-sweep"}', content_type="application/json")
    assert response.status_code == 200 and response.json["guard_tripped"] is False
