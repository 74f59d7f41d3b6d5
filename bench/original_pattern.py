"""A replay of the ORIGINAL heartbeat function's database access pattern (one read, then one write per item),
served the same way as ours, for bench/heartbeat.py's comparison.

The original Edge Function made 1 SELECT (toolbox by token) + 1 UPDATE (toolbox) + N UPDATEs (one
per `tool_statuses` item with an `account_tool_instance_id`, no ownership check), each its own
PostgREST request and so its own transaction. Here each is one autocommit statement through a
psycopg pool configured like the production transport (shared/adapters/db/postgres.py), on the same
database and schema (the token is looked up by its digest, as the schema stores it). The
statements run one after another on one connection: on loopback the original's parallel
`Promise.allSettled` would gain nothing but pool contention. Payload handling is the original's:
`json.loads`, no validation. Not a deployable function; a benchmark fixture only.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading

import flask
import functions_framework
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

_pool: ConnectionPool | None = None
_lock = threading.Lock()


def _get_pool() -> ConnectionPool:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ConnectionPool(os.environ["DATABASE_URL"], min_size=1, max_size=4, open=True,
                                   kwargs={"autocommit": True, "prepare_threshold": None})
        return _pool


@functions_framework.http
def heartbeat(request: flask.Request) -> flask.Response | tuple[str, int]:
    if request.method == "OPTIONS":
        return "ok", 200
    if request.method != "POST":
        return flask.jsonify(error="Method not allowed"), 405
    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer "):
        return flask.jsonify(error="Unauthorized: Missing or invalid token"), 401
    token = header[len("Bearer "):]
    try:
        payload = json.loads(request.get_data())
    except ValueError:
        return flask.jsonify(error="Invalid JSON payload"), 400
    digest = hashlib.sha256(token.encode()).digest()
    with _get_pool().connection() as conn:
        row = conn.execute("select id, status from public.account_tool_environments where dtma_token_sha256 = %s",
                           (digest,)).fetchone()
        if row is None:
            return flask.jsonify(error="Unauthorized: Invalid token"), 401
        conn.execute(
            """update public.account_tool_environments
                  set last_heartbeat_at = now(), dtma_last_known_version = %s, dtma_health_details_json = %s,
                      status = case when status in ('provisioning', 'awaiting_heartbeat') then 'active'
                                    else status end
                where id = %s""",
            (payload.get("dtma_version"), Jsonb(payload.get("system_status")), row[0]))
        for item in payload.get("tool_statuses") or []:
            if not item.get("account_tool_instance_id"):
                continue
            conn.execute(
                """update public.account_tool_instances
                      set status_on_toolbox = %s, runtime_details = %s, last_heartbeat_from_dtma = now()
                    where id = %s""",
                (item.get("status_on_toolbox"), Jsonb(item.get("runtime_details") or {}),
                 item["account_tool_instance_id"]))
    return "", 204
