"""Apply the SQL migrations in `sql/migrations` to a database, in order, exactly once.

Why a runner of our own instead of the Supabase CLI: the same files must apply to Supabase and
to a vanilla PostgreSQL (the embedded one in tests and local runs), and the latter first needs
`sql/local/supabase_shim.sql`. The runner:

* applies the shim only when the database has no `auth` schema (never on Supabase), unrecorded;
* applies each pending migration in its own transaction together with its bookkeeping row, so
  a failing file leaves nothing behind;
* serialises concurrent runners with a transaction-scoped advisory lock (safe through
  Supabase's transaction pooler, unlike a session lock);
* refuses to run when the recorded history differs from the files (an edited or deleted
  migration): the schema would no longer be what the files say.

Usage: `python -m ops.migrate [--database-url URL] [--check]` (or the `mcp-migrate` script).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

SQL_DIR = Path(os.environ.get("MCP_SQL_DIR", Path(__file__).resolve().parents[1] / "sql"))
MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
# An arbitrary constant shared by every runner: the advisory lock key.
LOCK_KEY = 7_402_113_901

BOOKKEEPING = """
create schema if not exists cp_meta;
revoke all on schema cp_meta from public;
create table if not exists cp_meta.schema_migrations (
  version text primary key,
  name text not null,
  sha256 text not null,
  applied_at timestamptz not null default now()
);
"""


class MigrationError(RuntimeError):
    """The database and the migration files disagree; nothing was applied."""


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    sql: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


@dataclass
class MigrationReport:
    shim_applied: bool = False
    applied: list[str] = field(default_factory=list)
    already_applied: list[str] = field(default_factory=list)


def load_migrations(sql_dir: Path = SQL_DIR) -> list[Migration]:
    """Read the migration files, refusing names that would make the order ambiguous."""
    found: list[Migration] = []
    for path in sorted((sql_dir / "migrations").glob("*.sql")):
        match = MIGRATION_NAME.match(path.name)
        if not match:
            raise MigrationError(f"{path.name}: migration files are named NNNN_lowercase_words.sql")
        found.append(Migration(match.group(1), path.name, path.read_text()))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migration files share a version number: {versions}")
    return found


def _check_history(recorded: dict[str, tuple[str, str]], files: Sequence[Migration]) -> None:
    by_version = {m.version: m for m in files}
    problems = []
    for version, (name, digest) in sorted(recorded.items()):
        migration = by_version.get(version)
        if migration is None:
            problems.append(f"{name} is recorded as applied but its file is gone")
        elif migration.sha256 != digest:
            problems.append(f"{name} changed after it was applied (edit a new migration instead)")
    if problems:
        raise MigrationError("database history differs from sql/migrations: " + "; ".join(problems))


def _recorded(conn: psycopg.Connection) -> dict[str, tuple[str, str]]:
    rows = conn.execute("select version, name, sha256 from cp_meta.schema_migrations").fetchall()
    return {version: (name, digest) for version, name, digest in rows}


def migrate(conninfo: str, sql_dir: Path = SQL_DIR, *, check_only: bool = False) -> MigrationReport:
    """Bring the database at `conninfo` up to date; see the module docstring for the rules."""
    files = load_migrations(sql_dir)
    report = MigrationReport()
    with psycopg.connect(conninfo, autocommit=True, prepare_threshold=None) as conn:
        with conn.transaction():
            conn.execute("select pg_advisory_xact_lock(%s)", (LOCK_KEY,))
            conn.execute(BOOKKEEPING)
            if conn.execute("select to_regnamespace('auth') is null").fetchone()[0]:
                if check_only:
                    raise MigrationError("the Supabase shim is not applied")
                conn.execute((sql_dir / "local" / "supabase_shim.sql").read_text())
                report.shim_applied = True
        _check_history(_recorded(conn), files)
        for migration in files:
            with conn.transaction():
                conn.execute("select pg_advisory_xact_lock(%s)", (LOCK_KEY,))
                recorded = _recorded(conn)
                _check_history(recorded, files)
                if migration.version in recorded:
                    report.already_applied.append(migration.name)
                    continue
                if check_only:
                    raise MigrationError(f"{migration.name} is not applied")
                conn.execute(migration.sql)
                conn.execute(
                    "insert into cp_meta.schema_migrations (version, name, sha256) values (%s, %s, %s)",
                    (migration.version, migration.name, migration.sha256),
                )
                report.applied.append(migration.name)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mcp-migrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"),
                        help="PostgreSQL URL (default: $DATABASE_URL). Use a direct or session-mode "
                             "connection for DDL, not the transaction pooler.")
    parser.add_argument("--check", action="store_true",
                        help="apply nothing; exit 1 unless the database is up to date")
    args = parser.parse_args(argv)
    if not args.database_url:
        parser.error("no database: pass --database-url or set DATABASE_URL")
    try:
        report = migrate(args.database_url, check_only=args.check)
    except MigrationError as exc:
        print(f"mcp-migrate: {exc}", file=sys.stderr)
        return 1
    if report.shim_applied:
        print("applied sql/local/supabase_shim.sql (no auth schema: not a Supabase database)")
    for name in report.applied:
        print(f"applied {name}")
    print(f"up to date: {len(report.applied) + len(report.already_applied)} migrations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
