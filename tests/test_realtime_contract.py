"""What docs/realtime.md promises a Supabase Realtime subscriber, checked on the migrated database
without a Realtime server: the publication's members, each table's replica identity, that the
filters it names are columns of their tables, and that row level security (which Realtime applies
to what each subscriber receives) shows an owner their own rows and nobody else's."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest

from tests.conftest import ROOT
from tests.factories import Factory
from tests.helpers import transition

DOC = ROOT / "docs" / "realtime.md"
IDENTITY = {"default": "d", "full": "f", "nothing": "n", "index": "i"}
ROW = re.compile(r"^\| `(?P<table>[a-z_]+)` \| (?P<identity>[a-z]+) \| (?P<subscribe>[^|]+) \|")


def documented() -> dict[str, tuple[str, str]]:
    """table -> (replica identity, how to subscribe), from the doc's table."""
    rows = {}
    for line in DOC.read_text().splitlines():
        match = ROW.match(line)
        if match:
            rows[match["table"]] = (match["identity"], match["subscribe"])
    assert rows, "docs/realtime.md lists no published tables"
    return rows


@contextmanager
def as_user(pg: psycopg.Connection, user_id: str) -> Iterator[psycopg.Connection]:
    """As Realtime checks a subscriber: role `authenticated` with the user's JWT claims."""
    with pg.transaction(force_rollback=True):
        pg.execute("select set_config('request.jwt.claims', %s, true)",
                   (json.dumps({"role": "authenticated", "sub": user_id}),))
        pg.execute("set local role authenticated")
        yield pg


def test_the_publication_holds_exactly_the_documented_tables(pg: psycopg.Connection) -> None:
    published = {r[0] for r in pg.execute(
        "select tablename from pg_publication_tables where pubname = 'supabase_realtime' and schemaname = 'public'")}
    assert published == set(documented())


def test_replica_identity_is_as_documented(pg: psycopg.Connection) -> None:
    for table, (identity, _) in documented().items():
        actual = pg.execute("select relreplident from pg_class where oid = %s::regclass",
                            (f"public.{table}",)).fetchone()[0]
        assert actual == IDENTITY[identity], table


def test_documented_filters_name_columns_of_their_tables(pg: psycopg.Connection) -> None:
    for table, (_, subscribe) in documented().items():
        for column in re.findall(r"filter: '([a-z_]+)=eq\.", subscribe):
            assert pg.execute("select 1 from information_schema.columns where table_schema = 'public' "
                              "and table_name = %s and column_name = %s", (table, column)).fetchone(), (table, column)


@pytest.fixture
def two_owners(factory: Factory, pg: psycopg.Connection) -> tuple[tuple[str, str, str], tuple[str, str, str]]:
    """Two users, each with a toolbox, a server with an event, and change-log rows (the triggers')."""
    owners = []
    for _ in range(2):
        box = factory.toolbox()
        server = factory.instance(box, status="stopped")
        transition(pg, server, "starting", "api", "start asked")
        owners.append((box.user_id, box.id, server))
    return owners[0], owners[1]


def test_each_published_table_shows_an_owner_only_their_own_rows(pg: psycopg.Connection, two_owners: tuple) -> None:
    mine, _ = two_owners
    owner_of = {"account_tool_environments": "id", "account_tool_instances": "account_tool_environment_id",
                "account_tool_instance_events": "account_tool_environment_id", "mcp_server_changes": "toolbox_id"}
    assert set(owner_of) == set(documented())
    for table, column in owner_of.items():
        with as_user(pg, mine[0]) as conn:
            seen = {str(r[0]) for r in conn.execute(f"select {column} from public.{table}")}
        assert seen == {mine[1]}, table


def test_a_removal_reaches_its_owner_as_an_insert_and_nobody_else(pg: psycopg.Connection, two_owners: tuple) -> None:
    mine, theirs = two_owners
    pg.execute("delete from account_tool_instances where id = %s", (mine[2],))
    query = "select instance_id::text, kind from public.mcp_server_changes where kind = 'removed'"
    with as_user(pg, mine[0]) as conn:
        assert conn.execute(query).fetchall() == [(mine[2], "removed")]
    with as_user(pg, theirs[0]) as conn:
        assert conn.execute(query).fetchall() == []


def test_owners_cannot_write_the_change_log(pg: psycopg.Connection, two_owners: tuple) -> None:
    mine, _ = two_owners
    with pytest.raises(psycopg.errors.InsufficientPrivilege), as_user(pg, mine[0]) as conn:
        conn.execute("insert into public.mcp_server_changes (user_id, instance_id, kind) values (%s, %s, 'changed')",
                     (mine[0], mine[2]))
