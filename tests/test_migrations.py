"""The migration runner and the schema it builds."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from ops.migrate import SQL_DIR, MigrationError, load_migrations, main, migrate
from tests.helpers import run_concurrently

SCHEMA_SNAPSHOT = """
select 'column', table_schema || '.' || table_name || '.' || column_name || ':' || data_type
  from information_schema.columns where table_schema in ('public', 'auth', 'cp_meta')
union all
select 'function', p.oid::regprocedure::text from pg_proc p
  where p.pronamespace in ('public'::regnamespace, 'auth'::regnamespace)
union all
select 'policy', schemaname || '.' || tablename || '.' || policyname from pg_policies
union all
select 'enum', t.typname || '.' || e.enumlabel from pg_enum e join pg_type t on t.oid = e.enumtypid
union all
select 'migration', version || ':' || sha256 from cp_meta.schema_migrations
union all
select 'catalog', id::text || ':' || docker_image_url from public.tool_catalog
order by 1, 2
"""


@pytest.fixture
def scratch_db(database_url: str) -> Iterator[str]:
    """A new, empty database on the same server (roles are cluster-wide and already exist)."""
    name = f"scratch_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"create database {name}")
    url = psycopg.conninfo.make_conninfo(database_url, dbname=name)
    try:
        yield url
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f"drop database {name} with (force)")


def snapshot(url: str) -> list[tuple[str, str]]:
    with psycopg.connect(url) as conn:
        return conn.execute(SCHEMA_SNAPSHOT).fetchall()


def test_applies_all_then_twice_changes_nothing(scratch_db: str) -> None:
    first = migrate(scratch_db)
    assert first.shim_applied
    assert first.applied == [m.name for m in load_migrations()]
    before = snapshot(scratch_db)
    second = migrate(scratch_db)
    assert not second.shim_applied and second.applied == []
    assert second.already_applied == first.applied
    assert snapshot(scratch_db) == before


def test_shim_is_skipped_when_auth_schema_exists(scratch_db: str) -> None:
    # What Supabase provides, created by "Supabase" (here: the test) before our migrations run.
    with psycopg.connect(scratch_db, autocommit=True) as conn:
        conn.execute("""
            create schema auth;
            create table auth.users (id uuid primary key, email text, supabase_marker boolean default true);
            create function auth.uid() returns uuid language sql stable
              as $$ select nullif(current_setting('request.jwt.claim.sub', true), '')::uuid $$;
            create publication supabase_realtime;
        """)
    report = migrate(scratch_db)
    assert not report.shim_applied
    with psycopg.connect(scratch_db) as conn:
        # Our shim would have created auth.jwt() and a users table without the marker column.
        assert conn.execute("select to_regprocedure('auth.jwt()')").fetchone()[0] is None
        cols = {r[0] for r in conn.execute(
            "select column_name from information_schema.columns where table_schema='auth' and table_name='users'")}
        assert "supabase_marker" in cols
        assert conn.execute("select count(*) from public.tool_catalog").fetchone()[0] == 1


def _copy_sql(tmp_path: Path) -> Path:
    target = tmp_path / "sql"
    shutil.copytree(SQL_DIR, target)
    return target


def test_refuses_when_an_applied_migration_was_edited(scratch_db: str, tmp_path: Path) -> None:
    sql_dir = _copy_sql(tmp_path)
    migrate(scratch_db, sql_dir)
    edited = sql_dir / "migrations" / "0002_tables.sql"
    edited.write_text(edited.read_text() + "\n-- an innocent-looking edit\n")
    with pytest.raises(MigrationError, match=r"0002_tables\.sql changed after it was applied"):
        migrate(scratch_db, sql_dir)


def test_refuses_when_an_applied_migration_file_is_gone(scratch_db: str, tmp_path: Path) -> None:
    sql_dir = _copy_sql(tmp_path)
    migrate(scratch_db, sql_dir)
    (sql_dir / "migrations" / "0004_security.sql").unlink()
    with pytest.raises(MigrationError, match=r"0004_security\.sql is recorded as applied but its file is gone"):
        migrate(scratch_db, sql_dir)


def test_a_failing_migration_leaves_nothing_behind(scratch_db: str, tmp_path: Path) -> None:
    sql_dir = _copy_sql(tmp_path)
    migrate(scratch_db, sql_dir)
    (sql_dir / "migrations" / "9999_broken.sql").write_text(
        "create table public.half_done (id int);\nselect no_such_function();\n")
    with pytest.raises(psycopg.errors.UndefinedFunction):
        migrate(scratch_db, sql_dir)
    with psycopg.connect(scratch_db) as conn:
        assert conn.execute("select to_regclass('public.half_done')").fetchone()[0] is None
        assert conn.execute("select count(*) from cp_meta.schema_migrations where version = '9999'").fetchone()[0] == 0


def test_concurrent_runners_apply_each_migration_once(scratch_db: str) -> None:
    reports: list = []
    assert run_concurrently(lambda: reports.append(migrate(scratch_db)), 3) == []
    applied = [name for r in reports for name in r.applied]
    assert sorted(applied) == sorted(m.name for m in load_migrations())


def test_bad_file_names_are_refused(tmp_path: Path) -> None:
    sql_dir = _copy_sql(tmp_path)
    (sql_dir / "migrations" / "5_Oops.sql").write_text("select 1;")
    with pytest.raises(MigrationError, match=r"NNNN_lowercase_words\.sql"):
        load_migrations(sql_dir)


def test_cli_check_reports_pending_and_up_to_date(scratch_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--database-url", scratch_db, "--check"]) == 1
    assert "not applied" in capsys.readouterr().err
    assert main(["--database-url", scratch_db]) == 0
    assert main(["--database-url", scratch_db, "--check"]) == 0
    assert "up to date" in capsys.readouterr().out
