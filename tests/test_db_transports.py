"""The database port's contract, run identically on both transports.

`db` is parametrized: "postgres" is the psycopg pool on the test database, "supabase" is
supabase-py's `rpc()` against tests/postgrest_standin.py (a PostgREST-RPC test double on the
same database). Every contract case asserts the same outcome on both: the JSON result, the
DomainError (status, code, message, parsed details, constraint), ServiceUnavailable (503 with
Retry-After), or a server fault (neither of those, so the caller answers 500).

The last tests pin down the exact HTTP request supabase-py sends, with respx (supabase-py
talks through httpx, which respx intercepts; `responses` would see nothing, it only patches
`requests`).
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import psycopg
import pytest
import respx
from postgrest.exceptions import APIError

from shared.adapters.db import Database
from shared.adapters.db.postgres import PostgresDatabase
from shared.adapters.db.supabase_rpc import SupabaseDatabase
from shared.core.config import load_settings
from shared.core.errors import ApiError, DomainError, ServiceUnavailable
from tests.factories import Factory
from tests.postgrest_standin import DATABASE_DOWN, GATEWAY_DOWN, PostgrestStandin

SERVICE_KEY = "sb_secret_transport-contract-0123456789abcdef"


# --- fixtures -------------------------------------------------------------------------------------

def supabase_database(url: str, key: str = SERVICE_KEY) -> SupabaseDatabase:
    """The production construction path: settings from an environment, then from_settings."""
    settings = load_settings(environ={"SUPABASE_URL": url, "SUPABASE_SERVICE_ROLE_KEY": key})
    assert settings.db_transport == "supabase"
    return SupabaseDatabase.from_settings(settings)


@pytest.fixture(scope="module")
def standin(database_url: str) -> Iterator[PostgrestStandin]:
    with PostgrestStandin(database_url, SERVICE_KEY) as api:
        yield api


@pytest.fixture
def api(standin: PostgrestStandin) -> Iterator[PostgrestStandin]:
    """The stand-in with an empty request log and no fault, restored after the test."""
    standin.reset()
    yield standin
    standin.reset()


@pytest.fixture(scope="module")
def supabase_db(standin: PostgrestStandin) -> SupabaseDatabase:
    return supabase_database(standin.url)


@pytest.fixture(params=["postgres", "supabase"])
def db(request: pytest.FixtureRequest, api: PostgrestStandin, pg: psycopg.Connection) -> Database:
    """Either transport on the test database (`pg` so every test's rows are truncated after)."""
    return request.getfixturevalue(f"{request.param}_db")


@pytest.fixture
def sql_function(pg: psycopg.Connection) -> Iterator[Callable[[str, str], None]]:
    """Create a throw-away `public.cp_test_*` function for one test; dropped afterwards."""
    created: list[str] = []

    def create(signature: str, definition: str) -> None:
        assert signature.startswith("cp_test_")
        pg.execute(f"create or replace function public.{signature} {definition}")
        created.append(signature)

    yield create
    for signature in created:
        pg.execute(f"drop function if exists public.{signature}")


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound (so nobody else takes it), never listening."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def sqlstate_of(exc: BaseException) -> str | None:
    if isinstance(exc, psycopg.Error):
        return exc.sqlstate
    if isinstance(exc, APIError):
        return exc.code
    return getattr(exc, "sqlstate", None)


# --- an RPC with a row lock, a transition and its event (cp_begin_action_command) --------------------

STOP = {"running": "stopping"}


def begin(db: Database, instance: Any, user: Any, plan: Any = None, action: str = "stop") -> Any:
    return db.call("cp_begin_action_command", p_user_id=user, p_instance_id=instance, p_action=action,
                   p_plan=STOP if plan is None else plan, p_message=f"{action} requested", p_allow_internal=True,
                   p_command_id=str(uuid.uuid4()))


def test_an_action_returns_the_instance_json_and_writes_one_event(db: Database, factory: Factory,
                                                                  pg: psycopg.Connection) -> None:
    box = factory.toolbox()
    instance = factory.instance(box, status="running")
    row = begin(db, instance, box.user_id)["instance"]
    stored = pg.execute("select to_jsonb(i) from public.account_tool_instances i where id = %s",
                        (instance,)).fetchone()[0]
    assert row == stored  # the JSON the function built, unchanged by either transport
    assert row["id"] == instance and row["status_on_toolbox"] == "stopping"
    assert factory.events(instance) == [("running", "stopping", "api", "stop requested")]


def test_uuid_objects_and_owner_scope_are_accepted(db: Database, factory: Factory) -> None:
    toolbox = factory.toolbox()
    instance = factory.instance(toolbox, status="stopped")
    row = begin(db, uuid.UUID(instance), uuid.UUID(toolbox.user_id), {"stopped": "starting"}, "start")
    assert row["instance"]["status_on_toolbox"] == "starting" and row["previous_status"] == "stopped"


def test_refused_action_is_a_409_with_the_sql_message_and_json_details(db: Database, factory: Factory) -> None:
    box = factory.toolbox()
    instance = factory.instance(box, status="stopped", name="mcp-refused")
    with pytest.raises(DomainError) as caught:
        begin(db, instance, box.user_id)
    error = caught.value
    assert (error.status, error.code, error.sqlstate) == (409, "conflict", "MC409")
    assert error.message == "cannot stop mcp-refused while it is stopped"
    assert error.details == {"status": "stopped", "action": "stop"}
    assert error.constraint is None
    assert factory.status_of(instance) == "stopped"
    assert factory.events(instance) == []


@pytest.mark.parametrize("whose", ["missing", "someone else's"])
def test_missing_or_foreign_instance_is_the_same_404(db: Database, factory: Factory, whose: str) -> None:
    instance = str(uuid.uuid4()) if whose == "missing" else factory.instance(factory.toolbox(), status="running")
    with pytest.raises(DomainError) as caught:
        begin(db, instance, factory.user())
    assert (caught.value.status, caught.value.code, caught.value.sqlstate) == (404, "not_found", "MC404")
    assert caught.value.message == "MCP server not found"
    assert caught.value.details == {"id": instance}


@pytest.mark.parametrize("plan", [STOP, {"running": "stopping", "stopped": "starting"}], ids=repr)
def test_a_plan_travels_as_jsonb_and_guards(db: Database, factory: Factory, plan: Any) -> None:
    box = factory.toolbox()
    instance = factory.instance(box, status="running")
    assert begin(db, instance, box.user_id, plan)["instance"]["status_on_toolbox"] == "stopping"


@pytest.mark.parametrize(("instance", "plan", "fragment"), [
    ("not-a-uuid", STOP, "uuid"),
    (None, {"running": "flying"}, "flying"),
], ids=["bad-uuid", "bad-enum"])
def test_malformed_input_is_a_400(db: Database, factory: Factory, instance: Any, plan: Any, fragment: str) -> None:
    box = factory.toolbox()
    instance = instance or factory.instance(box, status="running")
    with pytest.raises(DomainError) as caught:
        begin(db, instance, box.user_id, plan)
    error = caught.value
    assert (error.status, error.code, error.sqlstate) == (400, "invalid_request", "22P02")
    # PostgreSQL's own text ("invalid input syntax for type uuid: ...") never reaches a client.
    assert error.message == "a value is not in the expected format" and fragment not in error.message


# --- other SQL outcomes ------------------------------------------------------------------------------

def test_unique_violation_is_a_409_naming_the_constraint(db: Database, factory: Factory,
                                                         sql_function: Callable[[str, str], None]) -> None:
    # No cp_* function can collide on a name yet; this one copies an instance under the same name.
    sql_function("cp_test_dup(p_instance_id uuid)", """returns jsonb language sql as $$
        insert into public.account_tool_instances
        select (jsonb_populate_record(i, jsonb_build_object('id', gen_random_uuid(),
                                                             'host_port', i.host_port + 1))).*
          from public.account_tool_instances i where i.id = p_instance_id
        returning to_jsonb(account_tool_instances)
    $$""")
    instance = factory.instance(factory.toolbox(), name="mcp-twin")
    with pytest.raises(DomainError) as caught:
        db.call("cp_test_dup", p_instance_id=instance)
    error = caught.value
    assert (error.status, error.code, error.sqlstate) == (409, "conflict", "23505")
    assert error.constraint == "uq_instance_name_per_toolbox"  # for use cases to refine; never shown
    assert error.message == "this conflicts with an existing record" and error.details == {}


@pytest.mark.parametrize(("value", "key", "result"), [
    ({"a": [1, 2], "b": {"c": None}}, None, {"a": [1, 2], "b": {"c": None}}),
    ([1, "two", True], None, [1, "two", True]),
    ({"n": 3}, "n", 3),
    ({"s": "text"}, "s", "text"),
    ({"n": 3}, "missing", None),
], ids=["object", "array", "number", "string", "sql-null"])
def test_json_results_come_back_as_the_value_itself(db: Database, sql_function: Callable[[str, str], None],
                                                    value: Any, key: str | None, result: Any) -> None:
    sql_function("cp_test_echo(p_value jsonb, p_key text)", """returns jsonb language sql as $$
        select case when p_key is null then p_value else p_value -> p_key end
    $$""")
    assert db.call("cp_test_echo", p_value=value, p_key=key) == result


UNAVAILABLE = "unavailable"
FAULT = "server fault"


@pytest.mark.parametrize(("sqlstate", "outcome"), [
    ("MC400", (400, "invalid_request")),
    ("MC401", (401, "unauthenticated")),
    ("MC403", (403, "forbidden")),
    ("MC404", (404, "not_found")),
    ("MC409", (409, "conflict")),
    ("MC422", (422, "unprocessable")),
    ("23503", (404, "not_found")),
    ("23514", (400, "invalid_request")),
    ("22023", (400, "invalid_request")),
    ("22P02", (400, "invalid_request")),
    # retryable: the caller answers 503 + Retry-After
    ("57014", UNAVAILABLE),  # statement timeout
    ("08006", UNAVAILABLE),  # connection failure
    ("40001", UNAVAILABLE),  # serialization failure
    ("40P01", UNAVAILABLE),  # deadlock detected
    ("53300", UNAVAILABLE),  # too many connections
    ("57P01", UNAVAILABLE),  # admin shutdown (failover)
    # neither the user's fault nor transient: a bug or misconfiguration, so a plain 500
    ("P0001", FAULT),
    ("XX000", FAULT),
    ("42501", FAULT),  # insufficient privilege (a missing GRANT)
    ("28000", FAULT),
    ("2F005", FAULT),  # a function ended without RETURN
    ("54000", FAULT),  # program limit exceeded
])
def test_sqlstate_outcomes_are_the_same_on_both_transports(
        db: Database, sql_function: Callable[[str, str], None], sqlstate: str, outcome: Any) -> None:
    sql_function("cp_test_raise(p_sqlstate text, p_message text, p_detail text)", """returns jsonb
        language plpgsql as $$
        begin
          raise exception using errcode = p_sqlstate, message = p_message, detail = p_detail;
        end $$""")
    with pytest.raises(Exception) as caught:
        db.call("cp_test_raise", p_sqlstate=sqlstate, p_message=f"raised {sqlstate}",
                p_detail='{"why": "test", "n": 1}')
    error = caught.value
    if outcome == UNAVAILABLE:
        assert isinstance(error, ServiceUnavailable), repr(error)
        assert error.status == 503 and int(error.headers["Retry-After"]) > 0
    elif outcome == FAULT:
        assert not isinstance(error, ApiError), repr(error)
        assert sqlstate_of(error) == sqlstate
    else:
        assert isinstance(error, DomainError), repr(error)
        assert (error.status, error.code, error.sqlstate) == (*outcome, sqlstate)
        if sqlstate.startswith("MC"):  # our SQL's own sentences and details
            assert error.message == f"raised {sqlstate}"
            assert error.details == {"why": "test", "n": 1}
        else:  # PostgreSQL's: replaced by a sentence of ours, details dropped
            assert error.message != f"raised {sqlstate}" and error.details == {}


@pytest.mark.parametrize("detail", ["plain words", "[1, 2]", "", None])
def test_a_detail_that_is_not_a_json_object_gives_empty_details(
        db: Database, sql_function: Callable[[str, str], None], detail: str | None) -> None:
    sql_function("cp_test_raise(p_sqlstate text, p_message text, p_detail text)", """returns jsonb
        language plpgsql as $$
        begin
          raise exception using errcode = p_sqlstate, message = p_message, detail = coalesce(p_detail, '');
        end $$""")
    with pytest.raises(DomainError) as caught:
        db.call("cp_test_raise", p_sqlstate="MC400", p_message="bad", p_detail=detail)
    assert caught.value.details == {}


def test_unknown_function_is_a_server_fault(db: Database) -> None:
    with pytest.raises(Exception) as caught:
        db.call("cp_no_such_function", p_x=1)
    assert not isinstance(caught.value, ApiError), repr(caught.value)
    # psycopg: 42883 undefined_function; PostgREST: PGRST202 (not in the schema cache)
    assert sqlstate_of(caught.value) in {"42883", "PGRST202"}


# --- names are checked before anything is sent --------------------------------------------------------

BAD_CALLS = [
    ("drop_table", {}),
    ("cp_x; drop table users", {}),
    ("CP_UPPER", {}),
    ("cp_begin_action", {"instance_id": "x"}),
    ("cp_begin_action", {"p_x => 1); --": "x"}),
    ("cp_begin_action", {"P_ACTION": "x"}),
]


@pytest.mark.parametrize(("function", "params"), BAD_CALLS)
def test_bad_names_are_refused_before_anything_is_sent(db: Database, api: PostgrestStandin, function: str,
                                                       params: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="SQL function"):
        db.call(function, **params)
    assert api.requests == []


@pytest.mark.parametrize("transport", ["postgres", "supabase"])
def test_bad_names_are_refused_even_when_the_database_is_down(closed_port: int, transport: str) -> None:
    """A ValueError rather than ServiceUnavailable: no connection was even attempted."""
    db = (PostgresDatabase(f"postgresql://nobody@127.0.0.1:{closed_port}/none", pool_timeout=1.0)
          if transport == "postgres" else supabase_database(f"http://127.0.0.1:{closed_port}"))
    try:
        for function, params in BAD_CALLS:
            with pytest.raises(ValueError):
                db.call(function, **params)
    finally:
        db.close()


# --- database unreachable -------------------------------------------------------------------------------

@pytest.fixture(params=["postgres-closed-port", "supabase-PGRST001", "supabase-gateway-502",
                        "supabase-closed-port"])
def unreachable_db(request: pytest.FixtureRequest, closed_port: int, api: PostgrestStandin,
                   supabase_db: SupabaseDatabase) -> Iterator[Database]:
    if request.param == "postgres-closed-port":
        db: Database = PostgresDatabase(f"postgresql://nobody@127.0.0.1:{closed_port}/none",
                                        pool_timeout=1.0, connect_timeout=1)
    elif request.param == "supabase-closed-port":
        db = supabase_database(f"http://127.0.0.1:{closed_port}")
    else:
        api.fault = DATABASE_DOWN if request.param == "supabase-PGRST001" else GATEWAY_DOWN
        db = supabase_db
    yield db
    if db is not supabase_db:
        db.close()


def test_unreachable_database_is_503_with_retry_after(unreachable_db: Database) -> None:
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable) as caught:
        unreachable_db.call("cp_settle", p_instance_id=str(uuid.uuid4()), p_expected="running", p_to="stopping",
                            p_message="x")
    assert caught.value.status == 503
    assert int(caught.value.headers["Retry-After"]) > 0
    assert caught.value.body()["error"]["code"] == "unavailable"
    assert time.monotonic() - started < 3  # pool_timeout ~1 s; POSTs are never retried by supabase-py


# --- the supabase transport on the wire ---------------------------------------------------------------

def test_what_supabase_py_sends_to_the_standin(supabase_db: SupabaseDatabase, api: PostgrestStandin,
                                               factory: Factory) -> None:
    instance = factory.instance(factory.toolbox(), status="running")
    supabase_db.call("cp_settle", p_instance_id=instance, p_expected="running", p_to="running", p_message="x",
                     p_runtime={"state": "running", "ports": []})
    supabase_db.call("cp_settle", p_instance_id=instance, p_expected="running", p_to="running", p_message="y")
    first, second = api.requests
    assert (first.method, first.path, first.status, first.key_ok) == (
        "POST", "/rest/v1/rpc/cp_settle", 200, True)
    assert first.body == {"p_instance_id": instance, "p_expected": "running", "p_to": "running", "p_message": "x",
                          "p_runtime": {"state": "running", "ports": []}}
    assert first.headers["content-profile"] == "public"
    assert first.headers["content-type"] == "application/json"
    assert first.headers["apikey"] == first.headers["authorization"] == "<redacted>"
    assert "apiKey" in first.header_names  # sic: supabase-py spells it apiKey (HTTP names are case-blind)
    assert SERVICE_KEY not in repr(api.requests)  # the log never holds the key
    assert first.peer == second.peer  # one kept-alive connection for both calls


def test_a_wrong_service_key_is_a_server_fault_not_a_user_error(api: PostgrestStandin) -> None:
    db = supabase_database(api.url, key="sb_secret_wrong")
    with pytest.raises(APIError) as caught:
        db.call("cp_settle", p_instance_id=str(uuid.uuid4()), p_expected="running", p_to="stopping", p_message="x")
    assert not isinstance(caught.value, ApiError)
    assert caught.value.message == "Invalid API key"
    assert [(r.status, r.key_ok) for r in api.requests] == [(401, False)]


def test_supabase_py_rpc_request_on_the_wire() -> None:
    """The exact request behind `db.call(...)`, intercepted with respx (supabase-py sends through
    httpx; the `responses` library only patches `requests` and would not see it)."""
    base = "https://project-ref.supabase.co"
    instance, user = uuid.uuid4(), uuid.uuid4()
    with respx.mock(assert_all_mocked=True, assert_all_called=True) as router:
        route = router.post(f"{base}/rest/v1/rpc/cp_begin_action").mock(
            return_value=httpx.Response(200, json={"id": str(instance), "status_on_toolbox": "stopping"}))
        db = supabase_database(base + "/")  # a trailing slash is stripped by the settings
        result = db.call("cp_begin_action", p_user_id=user, p_instance_id=instance, p_action="stop",
                         p_plan={"running": "stopping"}, p_message="stop requested")
        assert len(router.calls) == 1  # no auth/session request, no retry (respx forgets calls on exit)
        request = route.calls.last.request
    assert result == {"id": str(instance), "status_on_toolbox": "stopping"}
    assert request.method == "POST"
    assert str(request.url) == f"{base}/rest/v1/rpc/cp_begin_action"  # no query string
    # Exactly the named parameters: UUIDs as strings, dicts as JSON objects.
    assert json.loads(request.content) == {
        "p_user_id": str(user), "p_instance_id": str(instance), "p_action": "stop", "p_plan": {"running": "stopping"},
        "p_message": "stop requested"}
    headers = request.headers
    # supabase-py 2.34 (Client._get_auth_headers) sends the key twice: as `apiKey` (that casing;
    # header names are case-insensitive, Supabase's gateway reads it as `apikey`) and as a Bearer
    # token. For a non-JWT sb_secret_ key the gateway accepts Bearer only when it equals apikey.
    assert headers["apikey"] == SERVICE_KEY
    assert headers["authorization"] == f"Bearer {SERVICE_KEY}"
    assert "apiKey" in [name.decode() for name, _ in headers.raw]
    # postgrest-py's schema headers: Accept-Profile for reads, Content-Profile for the POST body;
    # both name the default schema. It sends them on every request, not only for non-default schemas.
    assert headers["content-profile"] == "public"
    assert headers["accept-profile"] == "public"
    assert headers["content-type"] == "application/json"
    assert headers["x-client-info"].startswith("supabase-py/")
    # No Prefer header: no count, no return=minimal; the function's JSON comes back as the body.
    assert "prefer" not in headers


# --- the stand-in itself (so the supabase runs above mean something) ------------------------------------

def _post(api: PostgrestStandin, path: str, body: Any = None, headers: dict[str, str] | None = None,
          method: str = "POST") -> httpx.Response:
    auth = {"apikey": SERVICE_KEY, "Authorization": f"Bearer {SERVICE_KEY}"} if headers is None else headers
    return httpx.request(method, api.url + path, json=body, headers=auth, timeout=5)


@pytest.mark.parametrize(("headers", "message"), [
    ({}, "No API key found in request"),
    ({"Authorization": f"Bearer {SERVICE_KEY}"}, "No API key found in request"),
    ({"apikey": SERVICE_KEY}, "Invalid API key"),
    ({"apikey": SERVICE_KEY, "Authorization": "Bearer sb_secret_other"}, "Invalid API key"),
    ({"apikey": "sb_secret_other", "Authorization": f"Bearer {SERVICE_KEY}"}, "Invalid API key"),
], ids=["none", "bearer-only", "apikey-only", "bearer-differs", "apikey-differs"])
def test_standin_wants_apikey_and_bearer_both_equal_to_the_key(api: PostgrestStandin, headers: dict[str, str],
                                                              message: str) -> None:
    response = _post(api, "/rest/v1/rpc/cp_test_nothing", {}, headers)
    assert response.status_code == 401
    assert response.json()["message"] == message
    assert api.requests[-1].key_ok is False
    assert SERVICE_KEY not in repr(api.requests)


@pytest.mark.parametrize(("path", "body", "method", "status", "code"), [
    ("/rest/v1/rpc/cp_no_such_function", {}, "POST", 404, "PGRST202"),
    ("/rest/v1/rpc/cp_settle", {"p_nope": 1}, "POST", 404, "PGRST202"),  # unknown argument
    ("/rest/v1/rpc/cp_settle", {"p_to": "x"}, "POST", 404, "PGRST202"),  # required one missing
    ("/rest/v1/rpc/cp_settle", {"p_to; drop": 1}, "POST", 404, "PGRST202"),
    ("/rest/v1/rpc/cp_x;drop", {}, "POST", 404, "PGRST125"),
    ("/rest/v1/instances", {}, "POST", 404, "PGRST125"),
    ("/rest/v1/rpc/cp_settle", [1, 2], "POST", 400, "PGRST102"),
    ("/rest/v1/rpc/cp_settle", {}, "GET", 405, "PGRST101"),
])
def test_standin_refuses_what_it_does_not_implement(api: PostgrestStandin, path: str, body: Any, method: str,
                                                   status: int, code: str) -> None:
    response = _post(api, path, body, method=method)
    assert (response.status_code, response.json()["code"]) == (status, code)


def test_standin_answers_postgres_errors_like_postgrest(api: PostgrestStandin, factory: Factory) -> None:
    box = factory.toolbox()
    instance = factory.instance(box, status="stopped")
    response = _post(api, "/rest/v1/rpc/cp_begin_action_command",
                     {"p_user_id": box.user_id, "p_instance_id": instance, "p_action": "stop",
                      "p_plan": {"running": "stopping"}, "p_message": "x", "p_allow_internal": True,
                      "p_command_id": str(uuid.uuid4())})
    assert response.status_code == 400  # MC409 is not in PostgREST's table: "other" -> 400
    body = response.json()
    assert set(body) == {"code", "message", "details", "hint"}
    assert body["code"] == "MC409" and body["hint"] is None
    assert json.loads(body["details"]) == {"status": "stopped", "action": "stop"}


@pytest.mark.parametrize(("sqlstate", "status"), [
    ("23505", 409), ("23503", 409), ("P0001", 400), ("22P02", 400), ("23514", 400), ("MC404", 400),
    ("57014", 500), ("08006", 503), ("40001", 500), ("53300", 503), ("54000", 413), ("42501", 403),
    ("42883", 404), ("XX000", 500), ("P0002", 500), ("PT402", 402),
])
def test_standin_status_table_is_postgrests(sqlstate: str, status: int) -> None:
    from tests.postgrest_standin import http_status_for

    assert http_status_for(sqlstate) == status


def test_standin_runs_each_call_as_service_role_in_one_transaction(
        api: PostgrestStandin, supabase_db: SupabaseDatabase,
        sql_function: Callable[[str, str], None]) -> None:
    """As PostgREST does for a service key: role switched and claims set inside the call's
    transaction (so the transaction began before the function's statement did)."""
    sql_function("cp_test_whoami()", """returns jsonb language sql as $$
        select jsonb_build_object('user', current_user,
                                  'claims', current_setting('request.jwt.claims', true)::jsonb,
                                  'transaction_began_earlier', now() < statement_timestamp())
    $$""")
    assert supabase_db.call("cp_test_whoami") == {
        "user": "service_role", "claims": {"role": "service_role"}, "transaction_began_earlier": True}
