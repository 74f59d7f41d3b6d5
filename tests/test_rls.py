"""Row-level security as the web app meets it: PostgREST switches to role `authenticated` and
sets `request.jwt.claims`; these tests do the same inside a transaction."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest

from tests.factories import Factory
from tests.helpers import transition


@contextmanager
def as_role(conn: psycopg.Connection, role: str, user_id: str | None = None) -> Iterator[psycopg.Connection]:
    claims = {"role": role, **({"sub": user_id} if user_id else {})}
    with conn.transaction(force_rollback=True):
        conn.execute("select set_config('request.jwt.claims', %s, true)", (json.dumps(claims),))
        conn.execute(f"set local role {role}")
        yield conn


@pytest.fixture
def two_tenants(factory: Factory) -> dict[str, str]:
    a, b = factory.user(), factory.user()
    box_a, box_b = factory.toolbox(a), factory.toolbox(b)
    inst_a, inst_b = factory.instance(box_a), factory.instance(box_b)
    for inst in (inst_a, inst_b):
        transition(factory.conn, inst, "stopping", "api", "stop")
    return {"a": a, "b": b, "box_a": box_a.id, "box_b": box_b.id, "inst_a": inst_a, "inst_b": inst_b}


def test_owner_sees_only_their_own_rows(pg: psycopg.Connection, two_tenants: dict[str, str]) -> None:
    t = two_tenants
    with as_role(pg, "authenticated", t["a"]) as conn:
        assert [str(r[0]) for r in conn.execute("select id from account_tool_environments")] == [t["box_a"]]
        assert [str(r[0]) for r in conn.execute("select id from account_tool_instances")] == [t["inst_a"]]
        events = conn.execute("select account_tool_instance_id from account_tool_instance_events").fetchall()
        assert [str(r[0]) for r in events] == [t["inst_a"]]
        assert conn.execute("select count(*) from tool_catalog").fetchone()[0] == 1
        assert conn.execute("select count(*) from instance_status_transitions").fetchone()[0] > 0


def test_web_app_query_works_with_column_grants(pg: psycopg.Connection, two_tenants: dict[str, str]) -> None:
    """The web app's mcpService.getServers select, translated to SQL."""
    with as_role(pg, "authenticated", two_tenants["a"]) as conn:
        rows = conn.execute("""
            select i.id, i.instance_name_on_toolbox, i.status_on_toolbox, i.last_heartbeat_from_dtma, i.created_at,
                   i.updated_at, i.mcp_server_type, i.mcp_transport_type, i.mcp_endpoint_path,
                   i.mcp_server_capabilities, i.mcp_discovery_metadata,
                   e.id, e.name, e.public_ip_address, e.region_slug, e.size_slug, e.user_id
              from account_tool_instances i join account_tool_environments e on e.id = i.account_tool_environment_id
             where e.user_id = auth.uid() and i.mcp_server_type is not null
             order by i.instance_name_on_toolbox""").fetchall()
        assert len(rows) == 1


@pytest.mark.parametrize(("table", "row", "assignment"), [
    *[("account_tool_environments", "box_a", a) for a in (
        "public_ip_address = '10.0.0.1'", "status = 'active'", "dtma_token_sha256 = '\\x00'",
        "dtma_key_version = 2", "dtma_port = 1", "user_id = gen_random_uuid()", "last_heartbeat_at = now()")],
    *[("account_tool_instances", "inst_a", a) for a in (
        "status_on_toolbox = 'running'", "instance_error_message = null", "host_port = 40000",
        "docker_image_url = 'evil/image'", "account_tool_environment_id = gen_random_uuid()")],
])
def test_owner_cannot_change_protected_columns(pg: psycopg.Connection, two_tenants: dict[str, str], table: str,
                                               row: str, assignment: str) -> None:
    """No address, status, credential or placement change through the API: only the functions do that."""
    with as_role(pg, "authenticated", two_tenants["a"]) as conn, \
            pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(f"update {table} set {assignment} where id = %s", (two_tenants[row],))


def test_owner_cannot_read_the_token_digest(pg: psycopg.Connection, two_tenants: dict[str, str]) -> None:
    with as_role(pg, "authenticated", two_tenants["a"]) as conn, \
            pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("select dtma_token_sha256 from account_tool_environments")


def test_owner_can_rename_own_toolbox_but_not_anothers(pg: psycopg.Connection, two_tenants: dict[str, str]) -> None:
    t = two_tenants
    with as_role(pg, "authenticated", t["a"]) as conn:
        assert conn.execute("update account_tool_environments set name = 'mine' where id = %s",
                            (t["box_a"],)).rowcount == 1
        assert conn.execute("update account_tool_environments set name = 'theirs' where id = %s",
                            (t["box_b"],)).rowcount == 0


def test_owner_can_annotate_only_their_instances(pg: psycopg.Connection, two_tenants: dict[str, str]) -> None:
    t = two_tenants
    with as_role(pg, "authenticated", t["a"]) as conn:
        sql = "update account_tool_instances set mcp_discovery_metadata = '{\"note\": 1}' where id = %s"
        assert conn.execute(sql, (t["inst_a"],)).rowcount == 1
        assert conn.execute(sql, (t["inst_b"],)).rowcount == 0


@pytest.mark.parametrize("statement", [
    "insert into account_tool_environments (user_id, region_slug, size_slug) values (auth.uid(), 'x', 'y')",
    "delete from account_tool_environments",
    "insert into account_tool_instance_events (account_tool_instance_id, account_tool_environment_id, "
    "instance_name_on_toolbox, source, message) values (gen_random_uuid(), gen_random_uuid(), 'x', 'api', 'x')",
    "delete from account_tool_instance_events",
    "delete from account_tool_instances",
    "update tool_catalog set docker_image_url = 'evil/image'",
])
def test_owner_cannot_insert_or_delete(pg: psycopg.Connection, two_tenants: dict[str, str], statement: str) -> None:
    with as_role(pg, "authenticated", two_tenants["a"]) as conn, \
            pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(statement)


@pytest.mark.parametrize("role", ["anon", "authenticated"])
def test_api_roles_cannot_call_the_backend_rpcs(pg: psycopg.Connection, two_tenants: dict[str, str],
                                                role: str) -> None:
    with as_role(pg, role, two_tenants["a"]) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("select public.cp_settle(p_instance_id => %s, p_expected => 'stopping', p_to => 'stopped', "
                     "p_message => 'x')", (two_tenants["inst_a"],))


def test_anon_sees_nothing(pg: psycopg.Connection, two_tenants: dict[str, str]) -> None:
    for table in ("account_tool_environments", "account_tool_instances", "account_tool_instance_events",
                  "tool_catalog"):
        with as_role(pg, "anon") as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(f"select count(*) from {table}")


def test_service_role_does_everything(pg: psycopg.Connection, two_tenants: dict[str, str]) -> None:
    t = two_tenants
    with as_role(pg, "service_role") as conn:
        assert conn.execute("select count(*) from account_tool_environments").fetchone()[0] == 2
        assert conn.execute("update account_tool_environments set status = 'unresponsive'").rowcount == 2
        assert conn.execute("select dtma_token_sha256 from account_tool_environments limit 1").fetchone()[0]
        row = conn.execute("select public.cp_settle(p_instance_id => %s, p_expected => 'stopping', p_to => 'stopped', "
                           "p_message => 'stopped')", (t["inst_b"],)).fetchone()[0]
        assert row["status_on_toolbox"] == "stopped"


def test_realtime_publication_has_the_watched_tables(pg: psycopg.Connection) -> None:
    tables = {r[0] for r in pg.execute(
        "select tablename from pg_publication_tables where pubname = 'supabase_realtime'")}
    assert {"account_tool_instances", "account_tool_instance_events", "account_tool_environments"} <= tables
