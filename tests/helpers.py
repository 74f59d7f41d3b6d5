"""What many tests need: the requests they send, the rows they read, and following a command.

The functions under test run with TASKS_MODE=inline (no COMMAND_QUEUE is configured), so each
recorded command runs in the process's background pool exactly as the worker would run it
delivered by Cloud Tasks; tests/test_commands.py drives the real queue contract through the
local Cloud Tasks emulator. `settle()` waits for those commands to finish."""

from __future__ import annotations

import hashlib
import socket
import time
from typing import Any

import psycopg
import pytest
from flask.testing import FlaskClient

from shared.adapters import background
from tests.conftest import JWT_SECRET, ROOT
from tests.factories import IDEMPOTENCY_SECRET, MASTER_SECRET
from tests.jwt_helpers import mint_hs256


def settle(timeout: float = 30.0) -> None:
    """Wait until every command started in this process has recorded its outcome."""
    assert background.drain(timeout), f"commands still running after {timeout:g} s"


def last_command(pg: psycopg.Connection, instance_id: str) -> dict[str, Any]:
    """The newest command of an instance: its status and the outcome the worker recorded."""
    row = pg.execute("select action, status, outcome, attempts from dtma_commands where account_tool_instance_id = %s "
                     "order by seq desc limit 1", (instance_id,)).fetchone()
    assert row is not None, f"no command for {instance_id}"
    return {"action": row[0], "status": row[1], "outcome": row[2] or {}, "attempts": row[3]}


def transition(conn: psycopg.Connection, instance_id: str, to: str, source: str, message: str) -> dict[str, Any]:
    """Apply one transition through the state machine's own function, as the use cases' SQL does
    (tests of the table itself; the RPCs the functions call are tested through the functions)."""
    return conn.execute(
        "select to_jsonb(cp_private.cp_apply_instance_transition(i, %s::public.account_tool_installation_status_enum, "
        "%s::public.instance_event_source_enum, %s)) from public.account_tool_instances i where i.id = %s",
        (to, source, message, instance_id)).fetchone()[0]


def run_concurrently(work: Any, threads: int, timeout: float = 60.0) -> list[BaseException]:
    """Run `work()` on `threads` threads at once; the exceptions they raised (none, hopefully)."""
    import threading

    errors: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except Exception as exc:  # reported to the caller
            errors.append(exc)

    started = [threading.Thread(target=run) for _ in range(threads)]
    for thread in started:
        thread.start()
    for thread in started:
        thread.join(timeout)
    return errors


def server_row(pg: psycopg.Connection, instance_id: str) -> tuple[str, str | None]:
    row = pg.execute("select status_on_toolbox::text, instance_error_message from account_tool_instances "
                     "where id = %s", (instance_id,)).fetchone()
    assert row is not None, f"no instance {instance_id}"
    return row[0], row[1]


def auth(user_id: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_hs256(JWT_SECRET, sub=user_id)}"}


def spec(box: Any, **overrides: Any) -> dict[str, Any]:
    return {"toolbox_id": box.id, "name": "mcp-github", "image": "mcp/github:latest",
            "transport": "streamable_http", "container_port": 8080, "env": {"GITHUB_TOKEN": "ghp_supersecret123"},
            **overrides}


def container(name: str, state: str = "running", status: str = "Up 1 minute", **extra: Any) -> dict[str, Any]:
    """A container summary exactly as the real DTMA sends it (tests/fixtures/real-dtma-heartbeat-*.json),
    created now: after the instance rows a test arranges, as a container this service deployed is."""
    return {"id": hashlib.sha256(name.encode()).hexdigest(), "names": [name], "image": "mcp/github:latest",
            "image_id": "sha256:" + "ab" * 32, "command": "docker-entrypoint.sh", "created": int(time.time()),
            "state": state, "status": status,
            "ports": [{"ip": "0.0.0.0", "private_port": 8080, "public_port": 49152, "type": "tcp"}], **extra}


def beat(*items: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"dtma_version": "0.1.0",
            "system_status": {"cpu_load_percent": 3.5, "memory": {"total_bytes": 1, "active_bytes": 1,
                                                                   "free_bytes": 0, "used_bytes": 1},
                              "disk": {"mount": "/", "total_bytes": 1, "used_bytes": 1, "free_bytes": 0}},
            "tool_statuses": list(items), **fields}


class CountingCursor(psycopg.Cursor):
    statements = 0

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        type(self).statements += 1
        return super().execute(*args, **kwargs)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


DEPLOY, MANAGE, STATUS, SWEEP, HEARTBEAT = ("deploy_mcp_server", "manage_mcp_server", "mcp_status",
                                            "mcp_status_sweep", "dtma_heartbeat_ingest")


FUNCTIONS = (DEPLOY, MANAGE, STATUS, SWEEP, HEARTBEAT)


def base_env(database_url: str) -> dict[str, str]:
    return {"DATABASE_URL": database_url, "SUPABASE_JWT_SECRET": JWT_SECRET, "DTMA_KEY_SECRET": MASTER_SECRET,
            "IDEMPOTENCY_SECRET": IDEMPOTENCY_SECRET,
            "ALLOW_PRIVATE_TOOLBOX_IPS": "true", "LOG_FORMAT": "text"}


def build_clients(env: dict[str, str], names: tuple[str, ...] = FUNCTIONS) -> dict[str, FlaskClient]:
    """functions-framework apps configured by `env`, as a deployment would configure them. Each
    main.py reads its settings at import, so the environment is only needed while building."""
    from functions_framework import create_app

    from shared import runtime

    patch = pytest.MonkeyPatch()
    try:
        for key, value in env.items():
            patch.setenv(key, value)
        runtime.reset()
        return {name: create_app(target=name, source=str(ROOT / "functions" / name / "main.py")).test_client()
                for name in names}
    finally:
        patch.undo()
        runtime.reset()


def snapshot(conn: psycopg.Connection) -> dict[str, tuple[int, str]]:
    """(row count, digest of every row) of every table in `public` and `auth`: one round trip."""
    tables = conn.execute("select format('%I.%I', schemaname, tablename) from pg_tables "
                          "where schemaname in ('public', 'auth') order by 1").fetchall()
    query = " union all ".join(
        f"select '{name}', count(*), md5(coalesce(string_agg(t::text, '|' order by t::text), '')) from {name} t"
        for (name,) in tables)
    return {name: (count, digest) for name, count, digest in conn.execute(query).fetchall()}
