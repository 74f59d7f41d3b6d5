"""mcp_status's request: parameters from the path, the query string or a JSON body, validated.

Query parameters `id`, `toolbox_id`, `status` (stored status), `limit` (1-100, default 50),
`cursor` (the previous page's `next_cursor`, opaque), `refresh` (`true`/`false`); `watch`
(`true`: a watch, docs/watch.md) with `since` (a watch's cursor, opaque) and `timeout` (long-poll
seconds); `GET /<id>` reads
one server; `POST /` takes the same fields as a JSON object (what `supabase.functions.invoke`
sends). Unknown body fields are refused; unknown query parameters are ignored (query strings also
carry plumbing, such as supabase-js's `forceFunctionRegion`).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from shared.adapters.http import Call
from shared.core import lifecycle
from shared.core.errors import ApiError, from_validation, invalid

MAX_LIMIT = 100
DEFAULT_LIMIT = 50
FILTERABLE_STATUSES = frozenset(s.value for s in lifecycle.Status)
_PARAMS = ("id", "toolbox_id", "status", "limit", "cursor", "refresh", "watch", "since", "timeout")
WATCH_DEFAULT_TIMEOUT = 25.0
_SNAPSHOT = re.compile(r"^(\d{1,20}):(\d{1,20}):((?:\d{1,20})(?:,\d{1,20})*)?$")
MAX_CURSOR_CHARS = 16_384
_TRUE, _FALSE = frozenset({"true", "1", "yes"}), frozenset({"false", "0", "no", ""})


class StatusRequest(BaseModel):
    """A POST body. Strict: a typo'd field is an error, not a silently ignored filter."""

    model_config = ConfigDict(extra="forbid")

    id: StrictStr | None = None
    toolbox_id: StrictStr | None = None
    status: StrictStr | None = None
    limit: StrictInt | None = None
    cursor: StrictStr | None = None
    refresh: StrictBool = False
    watch: StrictBool = False
    since: StrictStr | None = None
    timeout: StrictInt | StrictFloat | None = None


@dataclass(frozen=True)
class Query:
    id: str | None = None
    toolbox_id: str | None = None
    status: str | None = None
    limit: int = DEFAULT_LIMIT
    cursor: dict[str, str] | None = None
    refresh: bool = False
    watch: bool = False
    since: str | None = None  # the decoded watch cursor (a PostgreSQL snapshot, "xmin:xmax:xip,...")
    timeout: float | None = None


def _bad(param: str, message: str) -> ApiError:
    return invalid(param, message)


def _uuid(param: str, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return str(UUID(value))
    except ValueError:
        raise _bad(param, "must be a UUID") from None


def encode_cursor(cursor: dict[str, Any] | None) -> str | None:
    """The SQL keyset cursor as an opaque token (clients must not build or parse it)."""
    if cursor is None:
        return None
    raw = json.dumps({"created_at": cursor["created_at"], "id": cursor["id"]}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(token: str | None) -> dict[str, str] | None:
    if token is None or token == "":
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        when = datetime.fromisoformat(data["created_at"])
        # In UTC: a forged offset PostgreSQL cannot take (e.g. +20:00) must not reach the SQL.
        when = (when if when.tzinfo else when.replace(tzinfo=UTC)).astimezone(UTC)
        return {"created_at": when.isoformat(), "id": str(UUID(data["id"]))}
    except (binascii.Error, ValueError, TypeError, KeyError, UnicodeDecodeError, AttributeError, OverflowError):
        raise _bad("cursor", "is not a cursor this API issued; pass next_cursor back unchanged") from None


def encode_watch_cursor(snapshot: str) -> str:
    """The watch's resume point (cp_watch_changes' snapshot) as an opaque token."""
    return base64.urlsafe_b64encode(json.dumps({"s": snapshot}, separators=(",", ":")).encode()).decode().rstrip("=")


def decode_watch_cursor(token: str | None) -> str | None:
    if token is None or token == "":
        return None
    problem = _bad("since", "is not a cursor this API issued; pass a watch answer's cursor back unchanged")
    if len(token) > MAX_CURSOR_CHARS:
        raise problem
    try:
        snapshot = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))["s"]
        match = _SNAPSHOT.match(snapshot)
    except (binascii.Error, ValueError, TypeError, KeyError, UnicodeDecodeError):
        raise problem from None
    if not match or int(match[1]) > int(match[2]) or int(match[1]) < 1:
        raise problem
    in_progress = [int(x) for x in (match[3] or "").split(",") if x]
    if any(not int(match[1]) <= x < int(match[2]) for x in in_progress) or in_progress != sorted(set(in_progress)):
        raise problem
    return snapshot


def _timeout(value: float | None, watch: bool) -> float | None:
    if value is None:
        return None
    if not watch:
        raise _bad("timeout", "applies to watch=true only")
    if not 0 <= value <= 3600:
        raise _bad("timeout", "must be a number of seconds between 0 and 3600")
    return float(value)


def _limit(value: int | None) -> int:
    if value is None:
        return DEFAULT_LIMIT
    if not 1 <= value <= MAX_LIMIT:
        raise _bad("limit", f"must be an integer between 1 and {MAX_LIMIT}")
    return value


def _status(value: str | None) -> str | None:
    if value is not None and value not in FILTERABLE_STATUSES:
        raise _bad("status", "must be one of " + ", ".join(s.value for s in lifecycle.Status))
    return value


def _query_params(call: Call) -> StatusRequest:
    """GET parameters as the same model a POST body fills. Unknown parameters are ignored:
    query strings also carry plumbing (supabase-js adds `forceFunctionRegion`)."""
    args = call.request.args
    fields: dict[str, Any] = {}
    for name in _PARAMS:
        values = args.getlist(name)
        if len(values) > 1:
            raise _bad(name, "given more than once")
        if values:
            fields[name] = values[0]
    if "limit" in fields:
        try:
            fields["limit"] = int(fields["limit"])
        except ValueError:
            raise _bad("limit", f"must be an integer between 1 and {MAX_LIMIT}") from None
    for flag in ("refresh", "watch"):
        if flag in fields:
            word = fields[flag].lower()
            if word not in _TRUE | _FALSE:
                raise _bad(flag, "must be true or false")
            fields[flag] = word in _TRUE
    if "timeout" in fields:
        try:
            fields["timeout"] = float(fields["timeout"])
        except ValueError:
            raise _bad("timeout", "must be a number of seconds between 0 and 3600") from None
    return StatusRequest.model_validate(fields)


def _body(call: Call) -> StatusRequest:
    body = call.json(required=False)
    if body is None:
        return StatusRequest()
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request", "body: must be a JSON object")
    try:
        return StatusRequest.model_validate(body)
    except ValidationError as exc:
        unknown = sorted(str(e["loc"][0]) for e in exc.errors() if e["type"] == "extra_forbidden")
        if unknown:
            raise ApiError(422, "unknown_fields", "unknown field(s): " + ", ".join(unknown) + "; allowed: "
                           + ", ".join(_PARAMS), {"fields": unknown}) from None
        raise from_validation(exc) from None


def parse_query(call: Call) -> Query:
    """The request's parameters, validated, from the path, the query string or the body."""
    parts = [p for p in call.path.split("/") if p]
    if len(parts) > 1:
        raise ApiError(404, "not_found", f"no such route: {call.path}; use /, /<id> or /toolboxes")
    request = _query_params(call) if call.method == "GET" else _body(call)
    path_id = _uuid("id", parts[0]) if parts else None
    body_id = _uuid("id", request.id)
    if path_id and body_id and path_id != body_id:
        raise _bad("id", "differs from the id in the path")
    one = path_id or body_id
    if one and (request.toolbox_id or request.status or request.cursor):
        raise _bad("id", "reads one server; it cannot be combined with toolbox_id, status or cursor")
    if request.since and not request.watch:
        raise _bad("since", "is a watch cursor; use it with watch=true (the list's page cursor is `cursor`)")
    if request.watch and (one or request.status or request.cursor or request.refresh):
        raise _bad("watch", "watches all the caller's servers (optionally of one toolbox_id); it cannot be combined "
                   "with id, status, cursor or refresh")
    return Query(id=one, toolbox_id=_uuid("toolbox_id", request.toolbox_id), status=_status(request.status),
                 limit=_limit(request.limit), cursor=decode_cursor(request.cursor), refresh=request.refresh,
                 watch=request.watch, since=decode_watch_cursor(request.since),
                 timeout=_timeout(request.timeout, request.watch))
