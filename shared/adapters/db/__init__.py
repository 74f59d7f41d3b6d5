"""The database port: every operation is one call of one SQL function.

Decision (docs/architecture.md): state transitions live in SQL functions, one call per operation, each
one transaction guarded by the expected current status. Python therefore needs exactly one
primitive, `Database.call(name, **params)`, which returns the function's JSON result. Two
transports implement it and the same tests run on both:

* `postgres` (psycopg pool, default whenever DATABASE_URL is set): one round trip per call;
* `supabase` (supabase-py `rpc`): for deployments that only have the project URL and key.

Errors come back as `shared.core.errors.DomainError` (the SQL refused: 4xx) or `ServiceUnavailable`
(the database could not be reached: 503 with Retry-After), whichever transport is in use.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from typing import Any, Protocol

from shared.core.config import Settings

FUNCTION_NAME = re.compile(r"^cp_[a-z0-9_]+$")
PARAM_NAME = re.compile(r"^p_[a-z0-9_]+$")


class Database(Protocol):
    def call(self, function: str, /, **params: Any) -> Any:
        """Call `public.<function>(p_name => value, ...)` in one transaction; return its JSON."""
        ...

    def close(self) -> None: ...


def check_call(function: str, params: dict[str, Any]) -> None:
    """Names are interpolated into SQL by the postgres transport, so only our own shapes pass."""
    if not FUNCTION_NAME.match(function):
        raise ValueError(f"not a control-plane SQL function: {function!r}")
    for name in params:
        if not PARAM_NAME.match(name):
            raise ValueError(f"SQL function parameters are named p_*: {name!r}")


_lock = threading.Lock()
_instances: dict[str, Database] = {}


def get_database(settings: Settings) -> Database:
    """The process's database (one pool per process, reused across invocations).

    Transports are imported here, not at module import, so a function pays only for the one it
    uses (supabase-py alone costs ~330 ms of cold start).
    """
    transport = settings.db_transport
    target = settings.DATABASE_URL if transport == "postgres" else settings.SUPABASE_URL
    key = f"{transport}:{target.get_secret_value() if hasattr(target, 'get_secret_value') else target}"
    with _lock:
        db = _instances.get(key)
        if db is None:
            if transport == "postgres":
                from shared.adapters.db.postgres import PostgresDatabase

                db = PostgresDatabase.from_settings(settings)
            elif transport == "supabase":
                from shared.adapters.db.supabase_rpc import SupabaseDatabase

                db = SupabaseDatabase.from_settings(settings)
            else:
                raise RuntimeError("no database configured")
            _instances[key] = db
        return db


def close_all(urls: Iterable[str] | None = None) -> None:
    """Close the process's pools (only those of `urls`, when given): shutdowns and tests."""
    with _lock:
        for key in [k for k in _instances if urls is None or any(k.endswith(url) for url in urls)]:
            _instances.pop(key).close()
