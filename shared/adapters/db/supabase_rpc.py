"""The `supabase` transport: the same SQL functions through PostgREST RPC (supabase-py).

Used when a deployment has only the project URL and service key. PostgREST runs each RPC in
one transaction, so the one-call-one-transaction contract holds. Its errors carry the
SQLSTATE in `code`, which is all the mapping needs. supabase-py is imported here only, so
functions on the postgres transport never pay its ~330 ms import.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import httpx
from postgrest.exceptions import APIError
from supabase import Client, ClientOptions, create_client

from shared.adapters.db import check_call
from shared.core.config import Settings
from shared.core.errors import TRANSIENT_SQLSTATE_CLASSES, ServiceUnavailable, domain_error

_CONSTRAINT = re.compile(r'constraint "([^"]+)"')
# PostgREST's own codes for "could not reach / use the database" (PGRST000-PGRST003).
_UNAVAILABLE = {"PGRST000", "PGRST001", "PGRST002", "PGRST003"}
# A proxy's error page (not PostgREST JSON) reaches us as APIError with the HTTP status as code.
_GATEWAY_STATUSES = {"502", "503", "504"}


def _jsonable(value: Any) -> Any:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def translate(exc: APIError) -> Exception:
    code = exc.code or ""
    if code in _UNAVAILABLE or code in _GATEWAY_STATUSES or code.startswith(TRANSIENT_SQLSTATE_CLASSES):
        return ServiceUnavailable("the database is unreachable; retry shortly", 5)
    detail: dict[str, Any] = {}
    if exc.details:
        try:
            parsed = json.loads(exc.details)
            detail = parsed if isinstance(parsed, dict) else {}
        except ValueError:
            detail = {}
    match = _CONSTRAINT.search(exc.message or "")
    mapped = domain_error(code, exc.message or "database error", detail, match.group(1) if match else None)
    return mapped if mapped is not None else exc


class SupabaseDatabase:
    def __init__(self, client: Client) -> None:
        self._client = client

    @classmethod
    def from_settings(cls, settings: Settings) -> SupabaseDatabase:
        assert settings.SUPABASE_URL and settings.SUPABASE_SERVICE_ROLE_KEY is not None
        options = ClientOptions(postgrest_client_timeout=10, auto_refresh_token=False, persist_session=False)
        return cls(create_client(settings.SUPABASE_URL, settings.SUPABASE_SERVICE_ROLE_KEY.get_secret_value(),
                                 options=options))

    def call(self, function: str, /, **params: Any) -> Any:
        check_call(function, params)
        try:
            response = self._client.rpc(function, {k: _jsonable(v) for k, v in params.items()}).execute()
        except APIError as exc:
            raise translate(exc) from exc
        except httpx.HTTPError:
            raise ServiceUnavailable("the database API is unreachable; retry shortly", 5) from None
        return response.data

    def close(self) -> None:
        """Nothing to release: supabase-py's HTTP client closes with the process."""
