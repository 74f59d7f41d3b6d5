"""The `postgres` transport: psycopg 3 with a connection pool, one round trip per call.

Connections are autocommit, so `select public.cp_x(...)` is its own transaction and nothing
else is sent (no BEGIN/COMMIT): one call, one round trip. `prepare_threshold=None` because
Supabase's transaction pooler (port 6543) cannot keep prepared statements across
transactions. The pool opens lazily and without waiting, so a function whose database is down
still starts, answers 503, and recovers by itself when the database is back.
"""

from __future__ import annotations

import functools
import json
import logging
import uuid
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from shared.adapters.db import check_call
from shared.core.config import Settings
from shared.core.errors import TRANSIENT_SQLSTATE_CLASSES, ServiceUnavailable, domain_error

log = logging.getLogger("mcp.db")


def _adapt(value: Any) -> Any:
    """Collections travel as jsonb (the cp_* convention), UUIDs as text."""
    if isinstance(value, dict | list | tuple):
        return Jsonb(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


@functools.lru_cache(maxsize=256)
def _statement(function: str, names: tuple[str, ...]) -> str:
    """`select public."cp_x"("p_a" => %(p_a)s, ...)`, rendered once: a Composed would be rendered again
    on every execute. The names passed check_call, so rendering needs no connection."""
    args = sql.SQL(", ").join(
        sql.SQL("{} => {}").format(sql.Identifier(n), sql.Placeholder(n)) for n in names)
    return sql.SQL("select public.{}({})").format(sql.Identifier(function), args).as_string(None)


def translate(exc: psycopg.Error) -> Exception:
    """Map a psycopg error to what the caller should answer."""
    if isinstance(exc, psycopg.errors.QueryCanceled):
        return ServiceUnavailable("the database took too long to answer; retry shortly", 2)
    if isinstance(exc, psycopg.InterfaceError) or (
            isinstance(exc, psycopg.OperationalError)
            and (not exc.sqlstate or exc.sqlstate.startswith(TRANSIENT_SQLSTATE_CLASSES))):
        return ServiceUnavailable("the database is unreachable; retry shortly", 5)
    diag = exc.diag
    detail: dict[str, Any] = {}
    if diag.message_detail:
        try:
            parsed = json.loads(diag.message_detail)
            detail = parsed if isinstance(parsed, dict) else {}
        except ValueError:
            detail = {}
    mapped = domain_error(exc.sqlstate or "", diag.message_primary or str(exc), detail, diag.constraint_name)
    return mapped if mapped is not None else exc


class PostgresDatabase:
    def __init__(self, conninfo: str, *, max_size: int = 4, pool_timeout: float = 5.0,
                 connect_timeout: int = 5, statement_timeout_ms: int = 10_000,
                 connection_kwargs: dict[str, Any] | None = None) -> None:
        kwargs: dict[str, Any] = {"autocommit": True, "prepare_threshold": None,
                                  "connect_timeout": connect_timeout}
        if statement_timeout_ms:
            kwargs["options"] = f"-c statement_timeout={statement_timeout_ms}"
        kwargs.update(connection_kwargs or {})
        self._pool = ConnectionPool(conninfo, min_size=1, max_size=max_size, kwargs=kwargs, open=False,
                                    timeout=pool_timeout, name="mcp")
        self._opened = False

    @classmethod
    def from_settings(cls, settings: Settings) -> PostgresDatabase:
        assert settings.DATABASE_URL is not None
        return cls(settings.DATABASE_URL.get_secret_value(), max_size=settings.DB_POOL_MAX_SIZE,
                   pool_timeout=settings.DB_POOL_TIMEOUT_SECONDS,
                   connect_timeout=settings.DB_CONNECT_TIMEOUT_SECONDS,
                   statement_timeout_ms=settings.DB_STATEMENT_TIMEOUT_MS)

    def _open(self) -> None:
        if not self._opened:
            self._pool.open(wait=False)
            self._opened = True

    def call(self, function: str, /, **params: Any) -> Any:
        check_call(function, params)
        statement = _statement(function, tuple(params))
        self._open()
        try:
            with self._pool.connection() as conn:
                row = conn.execute(statement, {k: _adapt(v) for k, v in params.items()}).fetchone()
        except PoolTimeout:
            raise ServiceUnavailable("the database is busy or unreachable; retry shortly", 2) from None
        except psycopg.Error as exc:
            raise translate(exc) from exc
        return row[0] if row else None

    def close(self) -> None:
        if self._opened:
            self._pool.close()
            self._opened = False
