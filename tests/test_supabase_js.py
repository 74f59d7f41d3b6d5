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
