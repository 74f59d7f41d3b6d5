"""HTTP plumbing: CORS for supabase-js, request ids, routing below the function."""

from __future__ import annotations

import flask
import pytest

from shared.adapters.http import Call, Reply, serve, subpath
from shared.core.config import load_settings
from shared.core.errors import ApiError

BROWSER_PREFLIGHT = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "apikey,authorization,content-type,x-client-info"}


def app(origins: str = "*") -> flask.Flask:
    settings = load_settings(environ={"CORS_ALLOWED_ORIGINS": origins})
    application = flask.Flask("t")

    def handler(call: Call) -> Reply:
        if call.path == "/boom":
            raise RuntimeError("unexpected")
        if call.path == "/refuse":
            raise ApiError(409, "conflict", "no", {"why": 1})
        return Reply(200, {"path": call.path})

    @application.route("/", defaults={"path": ""}, methods=["GET", "POST", "OPTIONS", "PUT"])
    @application.route("/<path:path>", methods=["GET", "POST", "OPTIONS", "PUT"])
    def entry(path: str) -> flask.Response:
        return serve(flask.request, "mcp_status", settings, handler, methods={"GET", "POST"})

    return application


def test_preflight_is_answered_without_credentials_and_allows_what_supabase_js_sends() -> None:
    response = app().test_client().options("/", headers=BROWSER_PREFLIGHT)
    assert response.status_code == 204 and "Content-Type" not in response.headers
    allowed = {h.strip() for h in response.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"apikey", "authorization", "content-type", "x-client-info", "idempotency-key"} <= allowed
    assert response.headers["Access-Control-Allow-Origin"] == "*"


def test_origin_allowlist() -> None:
    client = app("https://app.example,https://staging.example").test_client()
    ok = client.get("/", headers={"Origin": "https://staging.example"})
    assert ok.headers["Access-Control-Allow-Origin"] == "https://staging.example" and ok.headers["Vary"] == "Origin"
    other = client.get("/", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers


def test_errors_carry_cors_and_the_shape() -> None:
    response = app().test_client().get("/refuse", headers={"Origin": "https://app.example"})
    assert response.status_code == 409
    assert response.json == {"error": {"code": "conflict", "message": "no", "details": {"why": 1}}}
    assert response.headers["Access-Control-Allow-Origin"] == "*"


def test_unexpected_exceptions_are_a_500_naming_the_request_id_without_a_traceback() -> None:
    response = app().test_client().get("/boom", headers={"X-Request-Id": "req-123"})
    assert response.status_code == 500 and response.headers["X-Request-Id"] == "req-123"
    assert response.json["error"]["message"] == "internal error; quote request id req-123 when reporting it"
    assert "Traceback" not in response.get_data(as_text=True)


def test_bad_request_ids_are_replaced() -> None:
    response = app().test_client().get("/", headers={"X-Request-Id": "evil; Set-Cookie: x=1"})
    assert len(response.headers["X-Request-Id"]) == 32 and "evil" not in response.headers["X-Request-Id"]


def test_method_not_allowed_lists_the_allowed() -> None:
    response = app().test_client().put("/")
    assert response.status_code == 405 and response.headers["Allow"] == "GET, POST"


@pytest.mark.parametrize(("path", "expected"), [
    ("/", "/"), ("/abc", "/abc"), ("/mcp_status", "/"), ("/mcp_status/x/y", "/x/y"), ("/mcp-status/x", "/x"),
    ("/functions/v1/mcp_status", "/"), ("/functions/v1/mcp_status/id", "/id"), ("/mcp_statusx", "/mcp_statusx"),
])
def test_subpath(path: str, expected: str) -> None:
    with flask.Flask("t").test_request_context(path):
        assert subpath(flask.request, "mcp_status") == expected
