"""What tests need to follow a command through the worker.

The functions under test run with TASKS_MODE=inline (no COMMAND_QUEUE is configured), so each
recorded command runs in the process's background pool exactly as the worker would run it
delivered by Cloud Tasks; tests/test_commands.py drives the real queue contract through the
local Cloud Tasks emulator. `settle()` waits for those commands to finish."""

from __future__ import annotations

from typing import Any

import psycopg

from shared import background


def settle(timeout: float = 30.0) -> None:
    """Wait until every command started in this process has recorded its outcome."""
    assert background.drain(timeout), f"commands still running after {timeout:g} s"


def last_command(pg: psycopg.Connection, instance_id: str) -> dict[str, Any]:
    """The newest command of an instance: its status and the outcome the worker recorded."""
    row = pg.execute("select action, status, outcome, attempts from dtma_commands where account_tool_instance_id = %s "
                     "order by seq desc limit 1", (instance_id,)).fetchone()
    assert row is not None, f"no command for {instance_id}"
    return {"action": row[0], "status": row[1], "outcome": row[2] or {}, "attempts": row[3]}


def server_row(pg: psycopg.Connection, instance_id: str) -> tuple[str, str | None]:
    row = pg.execute("select status_on_toolbox::text, instance_error_message from account_tool_instances "
                     "where id = %s", (instance_id,)).fetchone()
    assert row is not None, f"no instance {instance_id}"
    return row[0], row[1]
