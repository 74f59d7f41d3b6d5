"""Agent commands that outlive the request that started them.

The agent's deploy is synchronous (it pulls the image inside the request, for minutes) and a
stop waits for Docker's stop timeout. A user-facing function waits for a command only a short
budget and then answers 202; the command goes on in this process's pool and records its outcome
the moment the agent answers, so the answer is not lost.

This is the in-process form of the command worker: it needs the process to live until the agent
answers, which holds for the local stack and for a Cloud Run instance with CPU allocated outside
requests. If the process dies first, the sweep's deadline still fails the command with a reason.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TypeVar

log = logging.getLogger("mcp.background")

T = TypeVar("T")

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


def run_within(budget: float, command: Callable[[], T]) -> tuple[bool, T | None]:
    """Run `command` in the pool; (True, result) if it ended within `budget` seconds, else
    (False, None) and it goes on. Exceptions within the budget propagate to the caller."""
    context = contextvars.copy_context()  # request-scoped secrets reach the command's redaction
    future = _pool.submit(context.run, command)
    try:
        return True, future.result(timeout=budget)
    except FutureTimeout:
        with _pending_lock:
            _pending.add(future)
        future.add_done_callback(_log_late_failure)
        return False, None
