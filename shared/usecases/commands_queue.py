"""Sending a recorded command on its way, for the functions that record commands.

The command is already in the database when this runs, so a queue that does not take the task
loses nothing: the failure is noted on the command (and in the server's history) and the sweep
enqueues it again (`cp_commands_to_requeue`). The user still gets their answer.
"""

from __future__ import annotations

import logging

from shared.adapters.tasks import EnqueueFailed
from shared.usecases.ports import Ports

log = logging.getLogger("mcp.tasks")


def send(rt: Ports, command_id: str, attempt: int = 1) -> bool:
    """Enqueue one command (the record already counts it as enqueued; only a failure, or a
    re-enqueue by the sweep, is written back); True if the queue took it."""
    try:
        rt.tasks.enqueue(command_id, attempt)
    except EnqueueFailed as exc:
        log.warning("command %s not enqueued: %s; the sweep will enqueue it again", command_id, exc)
        rt.db.call("cp_command_enqueued", p_command_id=command_id, p_error=str(exc))
        return False
    if attempt > 1:
        rt.db.call("cp_command_enqueued", p_command_id=command_id, p_error=None)
    return True
