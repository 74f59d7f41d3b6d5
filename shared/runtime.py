"""What a function instance builds once and reuses across invocations.

Each `functions/<name>/main.py` calls `runtime.load(<name>)` at import, so a bad configuration
fails the instance at start with one message listing every problem, instead of failing on
some later request. Adapters (database pool, DTMA client, JWT verifier) are built on first
use and then kept for the life of the instance: connection reuse across invocations is most of
what makes a warm function fast.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shared.adapters.db import Database, get_database
from shared.adapters.http import json_error_pages
from shared.adapters.logging import setup_logging
from shared.core.config import Settings, load_settings

if TYPE_CHECKING:
    from shared.adapters.auth import JwtVerifier
    from shared.adapters.dtma import DtmaClient
    from shared.adapters.tasks import Queue


@dataclass
class Runtime:
    function: str
    settings: Settings

    @functools.cached_property
    def db(self) -> Database:
        return get_database(self.settings)

    @functools.cached_property
    def verifier(self) -> JwtVerifier:
        from shared.adapters.auth import verifier_from_settings

        return verifier_from_settings(self.settings)

    @functools.cached_property
    def dtma(self) -> DtmaClient:
        from shared.adapters.dtma import DtmaClient

        return DtmaClient.from_settings(self.settings)

    @functools.cached_property
    def tasks(self) -> Queue:
        """Where recorded commands go: Cloud Tasks, or (inline) this process's own worker."""
        from shared.adapters import tasks

        if self.settings.tasks_mode == "cloud_tasks":
            return tasks.CloudTasksQueue(self.settings)
        from shared.usecases import commands

        return tasks.InlineQueue(lambda command_id: commands.execute(self, command_id, inline=True))


_runtimes: dict[str, Runtime] = {}
_lock = threading.Lock()


def load(function: str) -> Runtime:
    """The runtime of `function` in this process, validated and with logging set up (and, loaded by
    functions-framework, the app's own refusals rendered as JSON)."""
    with _lock:
        current = _runtimes.get(function)
        if current is None:
            settings = load_settings(function)
            setup_logging(settings)
            current = _runtimes[function] = Runtime(function, settings)
        json_error_pages()
        return current


def reset() -> None:
    """Forget every runtime (tests change the environment between cases)."""
    with _lock:
        _runtimes.clear()
