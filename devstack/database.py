"""The local stack's database: `DATABASE_URL` when set, else the embedded PostgreSQL, migrated.

On top of `devstack.embedded_pg` this handles what a long-lived developer stack meets and a test
run does not:

* a previous stack killed with SIGKILL (or a crashed terminal) leaves its pid in pgserver's
  handle list, and pgserver only stops the server when the *last* handle closes, so every later
  run would leave PostgreSQL running. Dead pids are pruned before attaching;
* `--reset` must not delete a data directory under a running server (another stack using it);
* after stopping, "no running database" is checked, not assumed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from devstack import embedded_pg
from ops.migrate import MigrationReport, migrate

log = logging.getLogger("devstack.database")
HANDLES_FILE = ".handle_pids.json"


class DatabaseError(RuntimeError):
    """The database cannot be used as asked; the message says what to do."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def postmaster_pid(data_dir: Path) -> int | None:
    """The pid of a PostgreSQL server running on `data_dir`, or None."""
    try:
        first = (data_dir / "postmaster.pid").read_text().splitlines()[0]
        pid = int(first.strip())
    except (OSError, IndexError, ValueError):
        return None
    return pid if _alive(pid) else None


def _prune_dead_handles(data_dir: Path) -> list[int]:
    """Drop pids of processes that no longer exist from pgserver's handle list (see module doc)."""
    path = data_dir / HANDLES_FILE
    if not path.is_file():
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR (see devstack.embedded_pg)
        from pgserver.postgres_server import PostgresServer  # the lock pgserver itself takes

    with PostgresServer._lock:
        try:
            pids = [int(p) for p in json.loads(path.read_text())]
        except (OSError, ValueError, TypeError):
            pids = []
        dead = [p for p in pids if p == os.getpid() or not _alive(p)]
        if dead:
            path.write_text(json.dumps([p for p in pids if p not in dead]))
    return dead


def reset(data_dir: Path) -> None:
    """Delete the embedded database's data directory (refused while a server runs on it)."""
    pid = postmaster_pid(data_dir)
    if pid is not None:
        raise DatabaseError(
            f"a PostgreSQL server (pid {pid}) is running on {data_dir}; stop the stack that uses it before --reset"
        )
    if data_dir.exists():
        shutil.rmtree(data_dir)


@dataclass
class LocalDatabase:
    """A migrated database; `embedded` is set when this process started (or attached to) one."""

    uri: str
    embedded: embedded_pg.EmbeddedPostgres | None
    report: MigrationReport
    #: Pids of killed stacks whose handles were forgotten (their server is reused, then stopped).
    pruned: tuple[int, ...] = ()

    @property
    def description(self) -> str:
        if self.embedded is None:
            return "DATABASE_URL (external; not started or stopped by the stack)"
        return f"embedded PostgreSQL 16 in {self.embedded.data_dir}"

    def stop(self, timeout: float = 15.0) -> str:
        """Stop the embedded server if this process was its last user; say what happened."""
        if self.embedded is None:
            return "external database left as it was"
        data_dir = self.embedded.data_dir
        self.embedded.stop()
        deadline = time.monotonic() + timeout
        while (pid := postmaster_pid(data_dir)) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid is None:
            return f"PostgreSQL stopped ({data_dir})"
        others = [p for p in live_handles(data_dir) if p != os.getpid()]
        if others:
            return f"PostgreSQL left running for other processes using {data_dir}: pids {others}"
        raise DatabaseError(f"PostgreSQL (pid {pid}) on {data_dir} did not stop within {timeout:g} s")


def live_handles(data_dir: Path) -> list[int]:
    """Pids of running processes that use the embedded server on `data_dir` (pgserver's list)."""
    try:
        pids = [int(p) for p in json.loads((data_dir / HANDLES_FILE).read_text())]
    except (OSError, ValueError, TypeError):
        return []
    return [p for p in pids if _alive(p)]


def open_database(database_url: str | None, data_dir: Path, *, reset_first: bool) -> LocalDatabase:
    """Use `database_url`, or start the embedded server on `data_dir`; apply the migrations."""
    if database_url:
        if reset_first:
            raise DatabaseError(
                "--reset only wipes the embedded database; DATABASE_URL is set, so the stack "
                "would not touch it (unset DATABASE_URL, or reset that database yourself)"
            )
        return LocalDatabase(uri=database_url, embedded=None, report=migrate(database_url))
    if reset_first:
        reset(data_dir)
    dead = _prune_dead_handles(data_dir)
    if dead:
        log.info("forgot %d stale handle(s) of processes that no longer run: %s", len(dead), dead)
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    server = embedded_pg.start(data_dir, keep=True)
    try:
        report = migrate(server.uri)
    except BaseException:
        server.stop()
        raise
    return LocalDatabase(uri=server.uri, embedded=server, report=report, pruned=tuple(dead))
