"""Every transition of the instance state machine, allowed and refused, through the SQL
function that all status changes go through."""

from __future__ import annotations

import itertools
import json

import psycopg
import pytest

from shared import lifecycle
from shared.db.postgres import PostgresDatabase
from shared.errors import DomainError
from tests.factories import Factory

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
                    factory: Factory, postgres_db: PostgresDatabase) -> None:
    instance = factory.instance(factory.toolbox(), status=frm.value)
    if lifecycle.allowed(frm, to, source):
        row = postgres_db.call("cp_transition_instance", p_instance_id=instance, p_to=to.value,
                               p_source=source.value, p_message="because the test said so")
        assert row["status_on_toolbox"] == to.value
        assert factory.status_of(instance) == to.value
        assert factory.events(instance) == [(frm.value, to.value, source.value, "because the test said so")]
        expected_error = "because the test said so" if to is lifecycle.Status.ERROR else None
        assert row["instance_error_message"] == expected_error
    else:
        with pytest.raises(DomainError) as caught:
            postgres_db.call("cp_transition_instance", p_instance_id=instance, p_to=to.value,
                             p_source=source.value, p_message="nope")
        assert caught.value.status == 409
        assert f"is {frm.value}" in caught.value.message and to.value in caught.value.message
        assert caught.value.details["status"] == frm.value
        assert factory.status_of(instance) == frm.value
        assert factory.events(instance) == []


def test_expected_status_guard_refuses_a_stale_read(factory: Factory, postgres_db: PostgresDatabase) -> None:
    instance = factory.instance(factory.toolbox(), status="stopped")
    with pytest.raises(DomainError) as caught:
        postgres_db.call("cp_transition_instance", p_instance_id=instance, p_to="stopping", p_source="api",
                         p_message="stop", p_expected=["running"])
    assert caught.value.status == 409
    assert caught.value.message == f"instance {_name(factory, instance)} is stopped, not running"
    assert factory.events(instance) == []


def test_owner_scope_hides_other_users_instances(factory: Factory, postgres_db: PostgresDatabase) -> None:
    instance = factory.instance(factory.toolbox(), status="stopped")
    stranger = factory.user()
    with pytest.raises(DomainError) as caught:
        postgres_db.call("cp_transition_instance", p_instance_id=instance, p_to="starting", p_source="api",
                         p_message="start", p_user_id=stranger)
    assert caught.value.status == 404 and caught.value.message == "instance not found"
    assert factory.status_of(instance) == "stopped"


def test_missing_instance_is_not_found(factory: Factory, postgres_db: PostgresDatabase) -> None:
    with pytest.raises(DomainError) as caught:
        postgres_db.call("cp_transition_instance", p_instance_id="00000000-0000-4000-8000-000000000000",
                         p_to="starting", p_source="api", p_message="start")
    assert caught.value.status == 404


def test_events_are_append_only(factory: Factory, postgres_db: PostgresDatabase, pg: psycopg.Connection) -> None:
    instance = factory.instance(factory.toolbox(), status="stopped")
    postgres_db.call("cp_transition_instance", p_instance_id=instance, p_to="starting", p_source="api",
                     p_message="start")
    with pytest.raises(psycopg.Error, match="append-only"):
        pg.execute("update public.account_tool_instance_events set message = 'rewritten'")
    assert factory.events(instance)[0][3] == "start"


def test_events_survive_the_instance(factory: Factory, pg: psycopg.Connection,
                                     postgres_db: PostgresDatabase) -> None:
    instance = factory.instance(factory.toolbox(), status="stopped")
    postgres_db.call("cp_transition_instance", p_instance_id=instance, p_to="deleting", p_source="api",
                     p_message="remove")
    pg.execute("delete from public.account_tool_instances where id = %s", (instance,))
    assert [e[1] for e in factory.events(instance)] == ["deleting"]


def test_error_details_are_json(factory: Factory, postgres_db: PostgresDatabase) -> None:
    instance = factory.instance(factory.toolbox(), status="running")
    with pytest.raises(DomainError) as caught:
        postgres_db.call("cp_transition_instance", p_instance_id=instance, p_to="starting", p_source="api",
                         p_message="x")
    assert json.loads(json.dumps(caught.value.details)) == {"status": "running", "requested": "starting",
                                                           "source": "api"}


def _name(factory: Factory, instance: str) -> str:
    return factory.conn.execute("select instance_name_on_toolbox from public.account_tool_instances where id=%s",
                                (instance,)).fetchone()[0]
