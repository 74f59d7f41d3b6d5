"""A PostgREST-RPC test double: NOT PostgREST, only the slice our `supabase` transport uses.

`shared.adapters.db.supabase_rpc` calls `POST /rest/v1/rpc/<fn>` through supabase-py. This double
answers that one request shape against the test database, closely enough that the transport
contract tests (tests/test_db_transports.py) run the same cases on both transports:

* auth like Supabase's gateway: the `apikey` header AND `Authorization: Bearer <key>` must both
  equal the configured service key, else 401 with a JSON body (no `code`, like Kong's answer);
* `POST /rest/v1/rpc/<fn>` with a JSON object of named arguments runs
  `select public.<fn>(name => value, ...)` in ONE transaction, as role `service_role` with
  `request.jwt.claims` set, as PostgREST does for a service key. Objects and arrays travel as
  jsonb, scalars as they are (real PostgREST casts every argument to its declared type through
  `json_to_record`; our cp_* functions take collections only as jsonb, so this is equivalent);
* 200 with the function's result as JSON (a jsonb scalar or `null` is the JSON value itself);
* a Postgres error becomes `{"code": sqlstate, "message", "details", "hint"}` with PostgREST's
  SQLSTATE -> HTTP status table (docs.postgrest.org references/errors: 23503/23505 -> 409,
  P0001 -> 400, 57* -> 500, 08* -> 503, anything unlisted such as our MC4xx -> 400);
* a function not found by name and argument names -> 404 `PGRST202` (the "schema cache" is
  read live from pg_catalog, so functions created by a test are callable at once, where real
  PostgREST would need `NOTIFY pgrst, 'reload schema'`);
* `fault`: a canned answer instead of the database (`DATABASE_DOWN` = 503 `PGRST001`,
  `GATEWAY_DOWN` = a proxy's 502 HTML page) for fault tests;
* a request log (`requests`) whose headers never hold the key: `apikey` and `Authorization`
  are replaced by `<redacted>` and `key_ok` says whether both matched.

Not implemented: GET/HEAD RPC, set-returning functions, filters, Prefer, tables, JWT roles.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

RPC_PATH = re.compile(r"^/rest/v1/rpc/([a-z_][a-z0-9_]{0,62})$")
ARG_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
SECRET_HEADERS = frozenset({"apikey", "authorization"})


@dataclass(frozen=True)
class Fault:
    """A canned answer sent instead of touching the database."""

    status: int
    body: bytes
    content_type: str = "application/json; charset=utf-8"


DATABASE_DOWN = Fault(503, json.dumps({
    "code": "PGRST001", "message": "Database client error. Retrying the connection.",
    "details": "connection to server failed: Connection refused", "hint": None}).encode())
GATEWAY_DOWN = Fault(502, b"<html><body><h1>502 Bad Gateway</h1></body></html>", "text/html")


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names; secret values replaced by "<redacted>"
    header_names: list[str]  # as sent (case preserved), in order
    key_ok: bool
    body: Any = None
    status: int = 0
    peer: tuple[str, int] | None = None  # the client's address: equal peers = one kept-alive connection


@dataclass
class _Answer:
    status: int
    body: bytes
    content_type: str = "application/json; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


def _json(status: int, payload: Any) -> _Answer:
    return _Answer(status, json.dumps(payload, default=str).encode())


def _error(status: int, code: str | None, message: str, details: str | None = None,
           hint: str | None = None) -> _Answer:
    return _json(status, {"code": code, "details": details, "hint": hint, "message": message})


def http_status_for(sqlstate: str) -> int:
    """PostgREST's SQLSTATE -> HTTP status table (docs.postgrest.org references/errors)."""
    exact = {"23503": 409, "23505": 409, "25006": 405, "P0001": 400, "42883": 404, "42P01": 404,
             "42501": 403, "53400": 500}
    if sqlstate in exact:
        return exact[sqlstate]
    prefix = {"08": 503, "09": 500, "0L": 403, "0P": 403, "25": 500, "28": 403, "2D": 500, "38": 500,
              "39": 500, "3B": 500, "40": 500, "53": 503, "54": 413, "55": 500, "57": 500, "58": 500,
              "F0": 500, "HV": 500, "P0": 500, "XX": 500}
    if sqlstate[:2] in prefix:
        return prefix[sqlstate[:2]]
    if re.fullmatch(r"PT\d{3}", sqlstate):
        return int(sqlstate[2:])
    return 400


class PostgrestStandin:
    """`with PostgrestStandin(database_url, key) as api: ... api.url ...`"""

    def __init__(self, database_url: str, service_key: str, *, role: str | None = "service_role",
                 schema: str = "public") -> None:
        self.database_url = database_url
        self.service_key = service_key
        self.role = role
        self.schema = schema
        self.fault: Fault | None = None
        self.requests: list[RecordedRequest] = []
        self._log_lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._pool: ConnectionPool | None = None

    # --- lifecycle ----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The base URL to use as SUPABASE_URL."""
        assert self._server is not None, "start() the stand-in first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> PostgrestStandin:
        if self._server is not None:
            return self
        self._pool = ConnectionPool(self.database_url, min_size=1, max_size=4, timeout=5, open=True,
                                    kwargs={"autocommit": True}, name="postgrest-standin")
        standin = self

        class Handler(_Handler):
            owner = standin

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="postgrest-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> PostgrestStandin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self) -> None:
        """Forget the request log and any fault (between tests)."""
        self.fault = None
        with self._log_lock:
            self.requests.clear()

    # --- request handling (called from the server's threads) -------------------------------
    def _record(self, entry: RecordedRequest) -> None:
        with self._log_lock:
            self.requests.append(entry)

    def _key_ok(self, headers: dict[str, str]) -> tuple[bool, _Answer | None]:
        apikey = headers.get("apikey")
        if apikey is None:
            return False, _error(401, None, "No API key found in request",
                                 hint="No `apikey` request header or url param was found.")
        if apikey != self.service_key or headers.get("authorization") != f"Bearer {self.service_key}":
            return False, _error(401, None, "Invalid API key",
                                 hint="Double check your Supabase `anon` or `service_role` API key.")
        return True, None

    def _find_function(self, conn: psycopg.Connection, function: str, names: list[str]) -> bool:
        """Like PostgREST's schema cache: a function of that name whose named arguments cover the
        ones sent, and whose arguments not sent all have defaults."""
        rows = conn.execute(
            """select coalesce(p.proargnames, '{}'), p.pronargs, p.pronargdefaults
                 from pg_proc p where p.pronamespace = %s::regnamespace and p.proname = %s""",
            (self.schema, function)).fetchall()
        for argnames, nargs, ndefaults in rows:
            inputs = list(argnames[:nargs])
            required = set(inputs[:nargs - ndefaults])
            if set(names) <= set(inputs) and required <= set(names):
                return True
        return False

    def _call(self, function: str, args: dict[str, Any]) -> _Answer:
        assert self._pool is not None
        names = list(args)
        statement = sql.SQL("select {}.{}({})").format(
            sql.Identifier(self.schema), sql.Identifier(function),
            sql.SQL(", ").join(sql.SQL("{} => {}").format(sql.Identifier(n), sql.Placeholder(n))
                               for n in names))
        values = {k: Jsonb(v) if isinstance(v, dict | list) else v for k, v in args.items()}
        try:
            with self._pool.connection() as conn:
                if not self._find_function(conn, function, names):
                    return _error(404, "PGRST202",
                                  f"Could not find the {self.schema}.{function}({', '.join(sorted(names))}) "
                                  "function in the schema cache",
                                  hint="If a new function was created in the database with this name and "
                                       "parameters, try reloading the schema cache.")
                with conn.transaction():
                    if self.role:
                        conn.execute(sql.SQL("set local role {}").format(sql.Identifier(self.role)))
                        conn.execute("select set_config('request.jwt.claims', %s, true)",
                                     (json.dumps({"role": self.role}),))
                    row = conn.execute(statement, values).fetchone()
        except PoolTimeout:
            return _error(504, "PGRST003", "Timed out acquiring connection from connection pool.")
        except psycopg.Error as exc:
            if not exc.sqlstate:
                if isinstance(exc, psycopg.OperationalError):  # could not talk to the database at all
                    return _error(503, "PGRST001", "Database client error. Retrying the connection.",
                                  str(exc))
                return _error(500, None, f"stand-in could not run the call: {exc}")
            diag = exc.diag
            return _error(http_status_for(exc.sqlstate), exc.sqlstate, diag.message_primary or str(exc),
                          diag.message_detail, diag.message_hint)
        return _json(200, row[0] if row else None)

    def handle(self, method: str, path: str, headers: dict[str, str], header_names: list[str],
               raw_body: bytes, peer: tuple[str, int] | None = None) -> _Answer:
        body: Any = None
        if raw_body:
            try:
                body = json.loads(raw_body)
            except ValueError:
                body = raw_body.decode("utf-8", "replace")
        logged = {k: ("<redacted>" if k in SECRET_HEADERS else v) for k, v in headers.items()}
        key_ok, refusal = self._key_ok(headers)
        entry = RecordedRequest(method, path, logged, header_names, key_ok, body, peer=peer)
        answer = refusal or self._route(method, path, body, raw_body)
        entry.status = answer.status
        self._record(entry)
        return answer

    def _route(self, method: str, path: str, body: Any, raw_body: bytes) -> _Answer:
        if self.fault is not None:
            return _Answer(self.fault.status, self.fault.body, self.fault.content_type)
        match = RPC_PATH.match(path.split("?", 1)[0])
        if match is None:
            return _error(404, "PGRST125", f"Invalid path specified in request URL: {path}")
        if method != "POST":
            return _error(405, "PGRST101", "This double implements only POST for RPC.")
        if not raw_body:
            body = {}
        if not isinstance(body, dict):
            return _error(400, "PGRST102", "Empty or invalid json")
        function = match.group(1)
        if not all(ARG_NAME.match(name) for name in body):
            return _error(404, "PGRST202", f"Could not find the {self.schema}.{function} function with "
                                           "those parameters in the schema cache")
        return self._call(function, body)


class _Handler(BaseHTTPRequestHandler):
    owner: PostgrestStandin
    protocol_version = "HTTP/1.1"  # keep-alive, so httpx reuses the connection
    disable_nagle_algorithm = True  # else each answer waits ~40 ms for a delayed ACK

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw_body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        answer = self.owner.handle(self.command, self.path, headers, list(self.headers.keys()), raw_body,
                                   tuple(self.client_address[:2]))
        self.send_response(answer.status)
        self.send_header("Content-Type", answer.content_type)
        self.send_header("Content-Length", str(len(answer.body)))
        for name, value in answer.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(answer.body)

    do_POST = do_GET = do_PATCH = do_PUT = do_DELETE = _serve  # HEAD: stdlib's 501

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the request log is `owner.requests`."""
