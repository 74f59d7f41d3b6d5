"""Steady-state heartbeats (sql/migrations/0012_heartbeat_digest.sql): a beat that says what the previous
one said only records the toolbox's liveness, and a digest match never hides a change.

Each "hidden change" test below arranges a database change between two beats whose reports are
identical, i.e. exactly the case where a digest of the report alone would wrongly skip
reconciliation, and checks what the user would see after the second beat.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest
from flask.testing import FlaskClient

from shared import runtime
from shared.adapters.db.postgres import PostgresDatabase
from tests.factories import Factory, Toolbox
from tests.helpers import CountingCursor, beat, container

FN = "dtma_heartbeat_ingest"


@pytest.fixture
def client(function_client: Any) -> FlaskClient:
    return function_client(FN)


def post(client: FlaskClient, box: Toolbox, body: Any) -> None:
    response = client.post("/heartbeat", json=body, headers={"Authorization": f"Bearer {box.token}"})
    assert response.status_code == 204, response.data


def toolbox(pg: psycopg.Connection, box: Toolbox) -> dict[str, Any]:
    cur = pg.cursor(row_factory=psycopg.rows.dict_row)
    return cur.execute("select status::text, last_heartbeat_at, dtma_report_digest is not null as steady, "
                       "dtma_health_details_json, dtma_report_details_json, dtma_last_seq "
                       "from account_tool_environments where id = %s", (box.id,)).fetchone()


def instance(pg: psycopg.Connection, instance_id: str) -> dict[str, Any]:
    cur = pg.cursor(row_factory=psycopg.rows.dict_row)
    return cur.execute("select status_on_toolbox::text as status, instance_error_message, xmin::text as version, "
                       "runtime_details, missing_heartbeats from account_tool_instances where id = %s",
                       (instance_id,)).fetchone()


def settled(client: FlaskClient, box: Toolbox, body: Any, pg: psycopg.Connection) -> None:
    """Beat until the toolbox is steady (the first beat after a change applies it, the next confirms)."""
    for _ in range(3):
        post(client, box, body)
        if toolbox(pg, box)["steady"]:
            return
    raise AssertionError("the toolbox never became steady")


def test_a_steady_beat_records_liveness_and_writes_no_instance_row(client: FlaskClient, factory: Factory,
                                                                   pg: psycopg.Connection) -> None:
    box = factory.toolbox()
    srv = factory.instance(box, name="srv")
    body = beat(container("srv"))
    settled(client, box, body, pg)
    before_box, before_srv = toolbox(pg, box), instance(pg, srv)
    time.sleep(0.02)
    # What changes every beat without meaning anything: Docker's relative status text and the figures.
    changed = beat(container("srv", status="Up 2 minutes"))
    changed["system_status"]["cpu_load_percent"] = 97.0
    post(client, box, changed)
    after_box, after_srv = toolbox(pg, box), instance(pg, srv)
    assert after_srv == before_srv  # not even rewritten
    assert after_box["steady"] and after_box["last_heartbeat_at"] > before_box["last_heartbeat_at"]
    assert after_box["dtma_health_details_json"]["cpu_load_percent"] == 97.0  # the figures stay current
    assert after_box["dtma_report_details_json"] == before_box["dtma_report_details_json"]


def test_a_steady_beat_and_a_beat_after_a_change_are_each_one_round_trip(
        client: FlaskClient, factory: Factory, database_url: str, pg: psycopg.Connection) -> None:
    counting = PostgresDatabase(database_url, connection_kwargs={"cursor_factory": CountingCursor})
    try:
        runtime.load(FN).__dict__["db"] = counting
        box = factory.toolbox()
        srv = factory.instance(box, name="srv")
        body = beat(container("srv"))
        settled(client, box, body, pg)
        CountingCursor.statements = 0
        post(client, box, body)
        assert CountingCursor.statements == 1
        pg.execute("update account_tool_instances set status_on_toolbox = 'stopping' where id = %s", (srv,))
        CountingCursor.statements = 0
        post(client, box, beat(container("srv", "exited", "Exited (0) 1 second ago")))
        assert CountingCursor.statements == 1
        assert instance(pg, srv)["status"] == "stopped"
    finally:
        counting.close()


def test_a_new_server_whose_container_was_already_listed_is_bound_by_the_next_identical_beat(
        client: FlaskClient, factory: Factory, pg: psycopg.Connection) -> None:
    box = factory.toolbox()
    body = beat(container("mcp-late"))  # listed before any record of it: unmanaged
    settled(client, box, body, pg)
    assert toolbox(pg, box)["dtma_report_details_json"]["unmanaged_containers"][0]["names"] == ["mcp-late"]
    # The deploy is recorded now (its container was created moments before: within the clock slack).
    srv = factory.instance(box, name="mcp-late", status="deploying")
    post(client, box, body)  # the very same report
    assert instance(pg, srv)["status"] == "running"
    assert toolbox(pg, box)["dtma_report_details_json"]["unmanaged_containers"] == []


def test_a_user_action_between_identical_beats_is_reconciled(client: FlaskClient, factory: Factory,
                                                             pg: psycopg.Connection) -> None:
    box = factory.toolbox()
    srv = factory.instance(box, name="srv", status="stopped")
    body = beat(container("srv", "exited", "Exited (0) 3 minutes ago"))
    settled(client, box, body, pg)
    assert instance(pg, srv)["status"] == "stopped"
    # The user starts it; the agent's start has not happened: the same report now means the
    # container exited although nobody asked for a stop.
    pg.execute("update account_tool_instances set status_on_toolbox = 'running' where id = %s", (srv,))
    post(client, box, body)
    row = instance(pg, srv)
    assert row["status"] == "error" and "exited unexpectedly" in row["instance_error_message"]


def test_a_container_missing_from_identical_beats_still_fails_its_server(client: FlaskClient, factory: Factory,
                                                                         pg: psycopg.Connection) -> None:
    box = factory.toolbox()
    srv = factory.instance(box, name="gone", status="running")
    body = beat(container("other"))
    post(client, box, body)
    assert instance(pg, srv)["missing_heartbeats"] == 1 and not toolbox(pg, box)["steady"]
    post(client, box, body)  # identical: must still count the second miss
    assert instance(pg, srv)["status"] == "error"


def test_a_removed_server_leaves_its_container_unmanaged_at_the_next_identical_beat(
        client: FlaskClient, factory: Factory, pg: psycopg.Connection) -> None:
    box = factory.toolbox()
    srv = factory.instance(box, name="srv")
    body = beat(container("srv"))
    settled(client, box, body, pg)
    pg.execute("delete from account_tool_instances where id = %s", (srv,))
    post(client, box, body)
    unmanaged = toolbox(pg, box)["dtma_report_details_json"]["unmanaged_containers"]
    assert [u["names"] for u in unmanaged] == [["srv"]]  # deploys now avoid its port


def test_an_unresponsive_toolbox_recovers_on_an_identical_beat(client: FlaskClient, factory: Factory,
                                                               pg: psycopg.Connection) -> None:
    box = factory.toolbox()
    factory.instance(box, name="srv")
    body = beat(container("srv"))
    settled(client, box, body, pg)
    pg.execute("update account_tool_environments set status = 'unresponsive' where id = %s", (box.id,))
    post(client, box, body)
    assert toolbox(pg, box)["status"] == "active"


def test_a_new_exit_code_is_a_change_although_only_the_status_text_differs(
        client: FlaskClient, factory: Factory, pg: psycopg.Connection) -> None:
    box = factory.toolbox()
    srv = factory.instance(box, name="srv", status="error", instance_error_message="exited")
    settled(client, box, beat(container("srv", "exited", "Exited (1) 2 minutes ago")), pg)
    post(client, box, beat(container("srv", "exited", "Exited (137) 1 second ago")))
    assert "code 137" in instance(pg, srv)["instance_error_message"]


def test_an_old_sequence_number_is_ignored_on_the_steady_path_too(client: FlaskClient, factory: Factory,
                                                                  pg: psycopg.Connection) -> None:
    box = factory.toolbox()
    factory.instance(box, name="srv")
    for seq in (1, 2, 3):
        post(client, box, beat(container("srv"), boot_id="boot-a", seq=seq))
    assert toolbox(pg, box)["steady"] and toolbox(pg, box)["dtma_last_seq"] == 3
    before = toolbox(pg, box)["last_heartbeat_at"]
    post(client, box, beat(container("srv"), boot_id="boot-a", seq=2))
    assert toolbox(pg, box)["last_heartbeat_at"] == before and toolbox(pg, box)["dtma_last_seq"] == 3
    post(client, box, beat(container("srv"), boot_id="boot-a", seq=4))
    assert toolbox(pg, box)["last_heartbeat_at"] > before and toolbox(pg, box)["dtma_last_seq"] == 4


def test_the_status_text_is_stored_when_the_row_is_written(client: FlaskClient, factory: Factory,
                                                          pg: psycopg.Connection) -> None:
    box = factory.toolbox()
    srv = factory.instance(box, name="srv", status="deploying")
    post(client, box, beat(container("srv", status="Up 3 seconds")))
    assert instance(pg, srv)["runtime_details"]["status"] == "Up 3 seconds"


@pytest.mark.parametrize(("field", "value"), [("seq", "5"), ("system_status", []), ("boot_id", "")])
def test_a_repeated_body_still_has_its_volatile_fields_validated(client: FlaskClient, factory: Factory,
                                                                 pg: psycopg.Connection, field: str,
                                                                 value: Any) -> None:
    """The function reuses the report it built for the same containers; what changes every beat is
    still checked every beat."""
    box = factory.toolbox()
    factory.instance(box, name="srv")
    settled(client, box, beat(container("srv")), pg)
    body = beat(container("srv"), boot_id="b", seq=7)
    body[field] = value
    response = client.post("/heartbeat", json=body, headers={"Authorization": f"Bearer {box.token}"})
    assert response.status_code == 400 and field in response.json["error"]["message"]
    assert toolbox(pg, box)["dtma_last_seq"] != 7


def changes(pg: psycopg.Connection, box: Toolbox) -> int:
    return pg.execute("select count(*) from mcp_server_changes where toolbox_id = %s", (box.id,)).fetchone()[0]


@pytest.mark.parametrize("steady", [True, False])
def test_a_beat_after_a_silence_tells_the_watch_stream_whichever_path_it_takes(
        client: FlaskClient, factory: Factory, pg: psycopg.Connection, steady: bool) -> None:
    """Health `degraded` by heartbeat age (or `unknown` once stale) flips back with no stored value
    changing, so a beat after such a silence logs a change for the toolbox's servers (0011's
    cp_watch_toolbox_heard); a beat on time does not."""
    box = factory.toolbox()
    srv = factory.instance(box, name="srv")
    body = beat(container("srv"))
    settled(client, box, body, pg)
    before = changes(pg, box)
    post(client, box, body)
    assert changes(pg, box) == before  # on time: nothing for the watchers
    pg.execute("update account_tool_environments set last_heartbeat_at = now() - interval '170 seconds' "
               "where id = %s", (box.id,))  # past HEALTH_DEGRADED_AFTER_SECONDS (150)
    if not steady:
        pg.execute("update account_tool_instances set missing_heartbeats = 1 where id = %s", (srv,))
    post(client, box, body)
    assert toolbox(pg, box)["steady"] is steady  # the full path wrote the reset: no digest until the next
    assert changes(pg, box) > before
