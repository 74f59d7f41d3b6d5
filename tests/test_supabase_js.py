"""The real Supabase JavaScript clients against the local stack.

`@supabase/functions-js` `FunctionsClient` and `@supabase/supabase-js` `functions.invoke` (2.109,
the last release that supports Node 20) are installed from npm into tests/js/node_modules and
run by tests/js/invoke.mjs against a stack started here. Skipped, with the reason, when Node.js
or npm is missing or the npm registry cannot be reached; any other install failure fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devstack.launcher import StackProcess
from devstack.server import Dispatcher, HttpServer, load_function
from ops.gcp_package import function_name
from shared import runtime
from shared.core.config import ALL_FUNCTIONS, DEPLOY, MANAGE, STATUS
from tests.conftest import JWT_SECRET
from tests.helpers import base_env
from tests.jwt_helpers import mint_hs256

JS_DIR = Path(__file__).resolve().parent / "js"
PINNED = {"@supabase/functions-js": "2.109.0", "@supabase/supabase-js": "2.109.0", "ws": None}
NPM_INSTALL_SECONDS = 240
OFFLINE_MARKERS = ("ENOTFOUND", "EAI_AGAIN", "ETIMEDOUT", "ECONNREFUSED", "ECONNRESET", "ENETUNREACH",
                   "network request", "getaddrinfo", "socket hang up", "self-signed certificate")


def _installed() -> bool:
    for package, version in PINNED.items():
        manifest = JS_DIR / "node_modules" / package / "package.json"
        if not manifest.is_file():
            return False
        if version is not None and json.loads(manifest.read_text())["version"] != version:
            return False
    return True


@pytest.fixture(scope="module")
def node_modules() -> None:
    """Install the locked clients once (npm's cache makes later installs fast); skip when impossible."""
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed: the supabase-js compatibility test needs Node.js >= 20 and npm")
    version = subprocess.run(["node", "--version"], capture_output=True, text=True, check=True).stdout.strip()
    if int(version.lstrip("v").split(".")[0]) < 20:
        pytest.skip(f"Node.js {version} is too old: supabase-js 2.109 needs Node.js >= 20")
    if _installed():
        return
    try:
        done = subprocess.run(
            # `npm ci`: exactly the versions in tests/js/package-lock.json, dependencies included.
            ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=JS_DIR, capture_output=True, text=True, timeout=NPM_INSTALL_SECONDS)
    except subprocess.TimeoutExpired:
        pytest.skip(f"npm install did not finish within {NPM_INSTALL_SECONDS} s (is the npm registry reachable?)")
    output = done.stdout + done.stderr
    if done.returncode != 0:
        if any(marker in output for marker in OFFLINE_MARKERS):
            pytest.skip("the npm registry is unreachable, so the Supabase clients cannot be installed:\n"
                        + output[-800:])
        pytest.fail(f"npm install failed:\n{output}")
    assert _installed(), f"npm install did not install the pinned clients:\n{output}"


@pytest.fixture(scope="module")
def observed(node_modules: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Start a stack, run tests/js/invoke.mjs against it, and hand back what the clients saw."""
    base = tmp_path_factory.mktemp("js-stack")
    with StackProcess("--port", "0", "--sweep-interval", "0", data_dir=base / "pg", state_dir=base / "state") as stack:
        done = subprocess.run(["node", str(JS_DIR / "invoke.mjs")], cwd=JS_DIR, capture_output=True, text=True,
                              timeout=90, env={**os.environ, **stack.env})
        assert done.returncode == 0, f"invoke.mjs failed:\n{done.stderr}\n{done.stdout}\n--- stack ---\n{stack.output}"
        yield json.loads(done.stdout.strip().splitlines()[-1])


def ok(seen: dict[str, Any], status: int) -> Any:
    assert seen["error"] is None, seen
    assert seen["status"] == status, seen
    return seen["data"]


def http_error(seen: dict[str, Any], status: int, code: str) -> dict[str, Any]:
    """A 4xx arrives as FunctionsHttpError, with the status and our error body on `error.context`."""
    assert seen["data"] is None, seen
    error = seen["error"]
    assert error is not None and error["isHttpError"] and error["name"] == "FunctionsHttpError", seen
    assert error["contextStatus"] == status, seen
    assert error["body"]["error"]["code"] == code, seen
    return error["body"]["error"]


def test_functions_client_deploy_status_manage(observed: dict[str, Any]) -> None:
    seen = observed["functionsClient"]
    server = ok(seen["deploy"], 202)  # recorded and queued; the worker runs it
    assert server["status"] == "deploying" and server["name"].startswith("js-fc-")
    assert seen["deploy"]["contentType"].startswith("application/json")
    settled = ok(seen["statusOne"], 200)["server"]
    assert settled["id"] == server["id"] and settled["status"] == "running"
    assert ok(seen["statusGet"], 200)["server"]["effective_status"] == "running"
    assert ok(seen["stop"], 200)["status"] == "stopped"
    assert ok(seen["start"], 200)["status"] == "running"
    assert ok(seen["remove"], 200) == {"id": server["id"], "name": server["name"], "status": "removed",
                                       "left_on_toolbox": None}


def test_functions_client_errors_are_functions_http_errors(observed: dict[str, Any]) -> None:
    seen = observed["functionsClient"]
    error = http_error(seen["unknownField"], 422, "unknown_fields")
    assert error["details"]["fields"] == ["imagee"]
    http_error(seen["goneAfterRemove"], 404, "not_found")
    http_error(seen["noToken"], 401, "unauthenticated")


def test_a_204_without_json_type_is_a_success(observed: dict[str, Any]) -> None:
    seen = observed["functionsClient"]["heartbeat"]
    assert seen["error"] is None and seen["status"] == 204, seen
    assert seen["contentType"] is None and seen["data"] == ""


def test_supabase_js_invoke_deploy_status_manage(observed: dict[str, Any]) -> None:
    seen = observed["supabaseJs"]
    server = ok(seen["deploy"], 202)  # the web app's camelCase field names
    assert server["name"].startswith("js-sb-") and server["image"] == "mcp/everything:latest"
    assert ok(seen["settled"], 200)["server"]["status"] == "running"
    listed = ok(seen["list"], 200)
    assert server["id"] in [s["id"] for s in listed["servers"]]
    assert ok(seen["restart"], 200)["status"] == "running"
    assert ok(seen["remove"], 200)["status"] == "removed"


def test_supabase_js_errors(observed: dict[str, Any]) -> None:
    seen = observed["supabaseJs"]
    assert "action" in http_error(seen["badAction"], 400, "invalid_request")["message"]
    http_error(seen["anonOnly"], 401, "unauthenticated")


def test_preflight_allows_what_supabase_js_sends(observed: dict[str, Any]) -> None:
    preflight = observed["supabaseJs"]["preflight"]
    assert 200 <= preflight["status"] < 300, preflight
    assert preflight["allowOrigin"] in ("*", "http://localhost:5173")
    allowed = {h.strip().lower() for h in preflight["allowHeaders"].split(",")}
    assert {"apikey", "authorization", "content-type", "x-client-info"} <= allowed
    # Everything supabase-js's own CORS helper says its clients may send.
    assert {h.strip().lower() for h in preflight["sdkHeaders"].split(",")} <= allowed
    assert "POST" in preflight["allowMethods"]


# --- Google Cloud's URL layout, and the plan's body verbatim (tests/js/gcp_layout.mjs) -------------
# On Google Cloud each function is at https://REGION-PROJECT.cloudfunctions.net/<service name>, the
# kebab-case names deploy.sh gives them (docs/web-app.md). A loopback server that mounts each function
# at /<name> is that layout with another host, so a FunctionsClient whose base URL is its root calls
# the functions exactly as the web app calls the deployed ones. CORS is an allowlist there, as it
# should be in production (docs/configuration.md CORS_ALLOWED_ORIGINS).

ALLOWED_ORIGIN = "https://app.example.com"
OTHER_ORIGIN = "https://evil.example.net"


@pytest.fixture
def gcp_layout(node_modules: None, database_url: str, toolbox_agent: Any,
               monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Serve every function at /<name> and /functions/v1/<name> on loopback, configured like a
    deployment with an origin allowlist; run tests/js/gcp_layout.mjs against it; its observations."""
    box, _ = toolbox_agent()
    for key, value in {**base_env(database_url), "CORS_ALLOWED_ORIGINS": ALLOWED_ORIGIN,
                       "TASKS_MODE": "inline"}.items():
        monkeypatch.setenv(key, value)
    runtime.reset()
    functions_dir = Path(__file__).resolve().parents[1] / "functions"
    dispatcher = Dispatcher(ALL_FUNCTIONS, openapi=dict)
    for name in ALL_FUNCTIONS:
        dispatcher.mount(load_function(name, functions_dir))
    server = HttpServer("127.0.0.1", 0, dispatcher)
    server.start()
    base = f"http://127.0.0.1:{server.port}"
    names = {"deploy": function_name(DEPLOY), "manage": function_name(MANAGE), "status": function_name(STATUS)}
    try:
        done = subprocess.run(
            ["node", str(JS_DIR / "gcp_layout.mjs")], cwd=JS_DIR, capture_output=True, text=True, timeout=120,
            env={**os.environ, "FUNCTIONS_BASE": base, "SUPABASE_URL": base,
                 "SUPABASE_ANON_KEY": mint_hs256(JWT_SECRET, sub=None, role="anon"),
                 "USER_JWT": mint_hs256(JWT_SECRET, sub=box.user_id), "TOOLBOX_ID": box.id,
                 "ALLOWED_ORIGIN": ALLOWED_ORIGIN, "OTHER_ORIGIN": OTHER_ORIGIN, "FUNCTION_NAMES": json.dumps(names)})
    finally:
        server.stop()
        runtime.reset()
    assert done.returncode == 0, f"gcp_layout.mjs failed:\n{done.stderr}\n{done.stdout}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_functions_client_on_the_cloudfunctions_layout(gcp_layout: dict[str, Any]) -> None:
    seen = gcp_layout["gcp"]
    server = ok(seen["deploy"], 202)  # the plan's body, to deploy-mcp-server
    assert server["name"].startswith("weather-api-server-")
    assert server["discovery_metadata"]["display_name"].startswith("Weather API Server ")
    assert ok(seen["settled"], 200)["server"]["status"] == "running"
    assert server["id"] in [s["id"] for s in ok(seen["list"], 200)["servers"]]
    assert ok(seen["stop"], 200)["status"] == "stopped"
    assert ok(seen["remove"], 200)["status"] == "removed"
    # Every answer names the allowed page's origin, so a browser hands it over.
    assert {seen[k]["allowOrigin"] for k in ("deploy", "settled", "list", "stop", "remove")} == {ALLOWED_ORIGIN}


def test_errors_on_the_cloudfunctions_layout_carry_the_sentence_and_the_fix(gcp_layout: dict[str, Any]) -> None:
    seen = gcp_layout["gcp"]
    bad = http_error(seen["badName"], 400, "invalid_request")
    assert bad["details"]["suggested_name"] == "meteo-server-1"
    assert bad["message"].endswith("; use 'meteo-server-1'")
    taken = http_error(seen["taken"], 409, "conflict")
    assert taken["details"]["suggested_name"] == f"{seen['deploy']['data']['name']}-2"
    assert seen["badName"]["allowOrigin"] == ALLOWED_ORIGIN  # errors too reach the page


def test_cors_allows_the_listed_origin_only(gcp_layout: dict[str, Any]) -> None:
    allowed, other = gcp_layout["preflightAllowed"], gcp_layout["preflightOther"]
    assert 200 <= allowed["status"] < 300 and allowed["allowOrigin"] == ALLOWED_ORIGIN, allowed
    headers = {h.strip().lower() for h in allowed["allowHeaders"].split(",")}
    assert {h.strip().lower() for h in allowed["sdkHeaders"].split(",")} <= headers
    assert "POST" in allowed["allowMethods"] and "Origin" in allowed["vary"]
    # Another origin gets no Access-Control-Allow-Origin: its browser refuses the call.
    assert other["allowOrigin"] is None and gcp_layout["gcp"]["otherOrigin"]["allowOrigin"] is None


def test_the_plans_body_verbatim_through_supabase_js(gcp_layout: dict[str, Any]) -> None:
    seen = gcp_layout["supabaseJs"]
    server = ok(seen["deploy"], 202)
    assert server["name"].startswith("meteo-server-") and server["transport"] == "streamable_http"
    assert server["discovery_metadata"]["templateId"] == "everything"
    assert ok(seen["settled"], 200)["server"]["status"] == "running"
    assert http_error(seen["mixed"], 400, "mixed_shapes")["details"]["fields"] == ["image"]
    assert ok(seen["remove"], 200)["status"] == "removed"
