"""The one error type that crosses layers, and its JSON shape.

Every refusal anywhere (bad input, auth, state machine, database, DTMA) ends up as an ApiError,
rendered as `{"error": {"code", "message", "details"}}` with its HTTP status, so the web app
(which sees it as `FunctionsHttpError` with the body on `error.context`) handles one shape.
Messages are sentences a user can act on; `code` is stable for programs.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("mcp.db")


class ApiError(Exception):
    """A request that cannot be served as asked. `status` is the HTTP status to answer with."""

    def __init__(self, status: int, code: str, message: str, details: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status}, {self.code!r}, {self.message!r})"


def invalid(field: str, message: str, problems: list[str] | None = None, code: str = "invalid_request") -> ApiError:
    """A 400 naming what is wrong. Every bad input answers with this one details shape:
    `{"field": <where>, "problems": [<every problem found, "where: what">]}`."""
    return ApiError(400, code, f"{field}: {message}", {"field": field, "problems": problems or [f"{field}: {message}"]})


def from_validation(exc: Any, prefix: str = "", code: str = "invalid_request") -> ApiError:
    """A pydantic ValidationError as `invalid(...)`, naming its first problem and listing all."""
    def where(item: dict[str, Any]) -> str:
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in item["loc"]).lstrip(".")
        return (prefix + path) or "body"

    errors = exc.errors()
    first = errors[0]
    return invalid(where(first), str(first["msg"]).removeprefix("Value error, "),
                   [f"{where(e)}: {str(e['msg']).removeprefix('Value error, ')}" for e in errors], code)


class DomainError(ApiError):
    """The database refused an operation (state machine, ownership, uniqueness).

    `sqlstate` and `constraint` let a use case turn a generic refusal into a precise message
    (e.g. which unique constraint a name or port collided with).
    """

    def __init__(self, status: int, code: str, message: str, details: dict[str, Any] | None = None,
                 *, sqlstate: str = "", constraint: str | None = None) -> None:
        super().__init__(status, code, message, details)
        self.sqlstate = sqlstate
        self.constraint = constraint


class ServiceUnavailable(ApiError):
    """A dependency (database, JWKS) is down: retryable, so it says when to retry."""

    def __init__(self, message: str, retry_after_seconds: int = 5, code: str = "unavailable") -> None:
        super().__init__(503, code, message, headers={"Retry-After": str(retry_after_seconds)})


# SQLSTATE classes a retry can cure: connection exception (08), transaction rollback such as a
# serialization failure or deadlock (40), insufficient resources (53), operator intervention such
# as a statement timeout or a shutdown during failover (57). Other classes psycopg reports as
# "operational" (28 auth, 2F/38/39 routine errors, 54 limits) are bugs or misconfiguration.
TRANSIENT_SQLSTATE_CLASSES = ("08", "40", "53", "57")

# SQLSTATEs raised by our SQL functions (sql/migrations/0003_state_machine.sql, class MC: their
# messages are our own sentences) and the PostgreSQL errors a request can still cause, mapped to
# (HTTP status, error code).
SQLSTATE_STATUS: dict[str, tuple[int, str]] = {
    "MC400": (400, "invalid_request"),
    "MC401": (401, "unauthenticated"),
    "MC403": (403, "forbidden"),
    "MC404": (404, "not_found"),
    "MC409": (409, "conflict"),
    "MC422": (422, "unprocessable"),
    "23505": (409, "conflict"),
    "23514": (400, "invalid_request"),
    "23503": (404, "not_found"),
    "22P02": (400, "invalid_request"),
    "22023": (400, "invalid_request"),
    "22P05": (400, "invalid_request"),
    "22001": (400, "invalid_request"),
    "22003": (400, "invalid_request"),
    "22007": (400, "invalid_request"),
    "22008": (400, "invalid_request"),
}

# PostgreSQL's own message text names tables, constraints and types: it never reaches a client.
# These sentences replace it (the original goes to the log with the request id).
_POSTGRES_SENTENCES: dict[str, str] = {
    "23505": "this conflicts with an existing record",
    "23514": "a value is outside what is allowed",
    "23503": "a record this request refers to does not exist (was the account or toolbox deleted?)",
    "22P02": "a value is not in the expected format",
    "22023": "a value is not valid",
    "22P05": "a text value holds a character that cannot be stored (\\u0000)",
    "22001": "a text value is longer than allowed",
    "22003": "a number is out of range",
    "22007": "a date or time is not in the expected format",
    "22008": "a date or time is out of range",
}


def domain_error(sqlstate: str, message: str, details: dict[str, Any] | None = None,
                 constraint: str | None = None) -> DomainError | None:
    """The DomainError for a SQLSTATE a request can cause, or None for a server-side fault.

    Only our own SQL's refusals (class MC) keep their message and details; for PostgreSQL's own
    errors the client gets a sentence of ours (use cases refine it by `constraint`)."""
    mapped = SQLSTATE_STATUS.get(sqlstate)
    if mapped is None:
        return None
    status, code = mapped
    if not sqlstate.startswith("MC"):
        log.info("database refused a request (SQLSTATE %s, constraint %s): %s", sqlstate, constraint, message)
        message, details = _POSTGRES_SENTENCES[sqlstate], {}
    return DomainError(status, code, message, details, sqlstate=sqlstate, constraint=constraint)
