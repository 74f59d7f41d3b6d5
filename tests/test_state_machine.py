"""Every transition of the instance state machine, allowed and refused, through the SQL
function that all status changes go through."""

from __future__ import annotations

import itertools
import json

import psycopg
import pytest

from shared.adapters.db.postgres import PostgresDatabase
from shared.core import lifecycle
from tests.factories import Factory
from tests.helpers import transition

STATUSES = list(lifecycle.Status)
SOURCES = list(lifecycle.Source)
ALL_TRIPLES = list(itertools.product(STATUSES, STATUSES, SOURCES))


def test_sql_table_and_python_mirror_are_the_same(pg: psycopg.Connection) -> None:
    rows = pg.execute("select from_status::text, to_status::text, source::text "
                      "from public.instance_status_transitions").fetchall()
    assert {tuple(r) for r in rows} == {(f.value, t.value, s.value) for f, t, s in lifecycle.TRANSITIONS}


def test_every_written_status_is_an_enum_member(pg: psycopg.Connection) -> None:
    labels = {r[0] for r in pg.execute(
        "select unnest(enum_range(null::public.account_tool_installation_status_enum))::text")}
    assert {s.value for s in lifecycle.Status} <= labels


@pytest.mark.parametrize(("frm", "to", "source"), ALL_TRIPLES, ids=lambda v: str(v))
def test_transition(frm: lifecycle.Status, to: lifecycle.Status, source: lifecycle.Source,
                    factory: Factory, pg: psycopg.Connection) -> None:
    instance = factory.instance(factory.toolbox(), status=frm.value)
    if lifecycle.allowed(frm, to, source):
        row = transition(pg, instance, to.value, source.value, "because the test said so")
        assert row["status_on_toolbox"] == to.value
        assert factory.status_of(instance) == to.value
        assert factory.events(instance) == [(frm.value, to.value, source.value, "because the test said so")]
        expected_error = "because the test said so" if to is lifecycle.Status.ERROR else None
        assert row["instance_error_message"] == expected_error
    else:
        with pytest.raises(psycopg.Error) as caught:
            transition(pg, instance, to.value, source.value, "nope")
        assert caught.value.sqlstate == "MC409"
        message = caught.value.diag.message_primary or ""
        assert f"is {frm.value}" in message and to.value in message
        assert factory.status_of(instance) == frm.value
        assert factory.events(instance) == []


def test_events_are_append_only(factory: Factory, postgres_db: PostgresDatabase, pg: psycopg.Connection) -> None:
    instance = factory.instance(factory.toolbox(), status="stopped")
    transition(pg, instance, "starting", "api", "start")
    with pytest.raises(psycopg.Error, match="append-only"):
        pg.execute("update public.account_tool_instance_events set message = 'rewritten'")
    assert factory.events(instance)[0][3] == "start"


def test_events_survive_the_instance(factory: Factory, pg: psycopg.Connection,
                                     postgres_db: PostgresDatabase) -> None:
    instance = factory.instance(factory.toolbox(), status="stopped")
    transition(pg, instance, "deleting", "api", "remove")
    pg.execute("delete from public.account_tool_instances where id = %s", (instance,))
    assert [e[1] for e in factory.events(instance)] == ["deleting"]


def test_a_refusal_carries_json_details(factory: Factory, pg: psycopg.Connection) -> None:
    instance = factory.instance(factory.toolbox(), status="running")
    with pytest.raises(psycopg.Error) as caught:
        transition(pg, instance, "starting", "api", "x")
    assert json.loads(caught.value.diag.message_detail or "{}") == {"status": "running", "requested": "starting",
                                                                     "source": "api"}


def _name(factory: Factory, instance: str) -> str:
    return factory.conn.execute("select instance_name_on_toolbox from public.account_tool_instances where id=%s",
                                (instance,)).fetchone()[0]
