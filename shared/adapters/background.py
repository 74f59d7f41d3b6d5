"""A bounded pool for agent commands run in this process (TASKS_MODE=inline).

In production the command worker runs each command in the request Cloud Tasks delivers
(docs/commands.md). Inline mode (tests, single-process development) runs the same worker code
here instead, after the user's request has answered; `drain` waits for what is still running.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

log = logging.getLogger("mcp.background")

# Bounded: a burst of slow deploys queues here instead of opening unbounded threads; each worker
# holds one agent call.
MAX_COMMANDS = 16
_pool = ThreadPoolExecutor(max_workers=MAX_COMMANDS, thread_name_prefix="dtma-command")


_pending: set[Future[object]] = set()
_pending_lock = threading.Lock()


def _log_late_failure(future: Future[object]) -> None:
    with _pending_lock:
        _pending.discard(future)
    exc = future.exception()
    if exc is not None:
        log.error("an agent command failed after its request had answered", exc_info=exc)


def drain(timeout: float) -> bool:
    """Wait for the commands still running after their request answered; True if none is left.

    For an orderly shutdown (and for tests, before they empty the tables those commands write).
    """
    with _pending_lock:
        pending = list(_pending)
    _done, not_done = wait(pending, timeout=timeout)
    return not not_done


def submit(command: Callable[[], object]) -> None:
    """Run `command` in the pool and return at once (it is tracked for `drain`)."""
    context = contextvars.copy_context()
    future = _pool.submit(context.run, command)
    with _pending_lock:
        _pending.add(future)
    future.add_done_callback(_log_late_failure)
