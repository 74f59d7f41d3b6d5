"""`./deploy.sh local` as a user meets it: a real child process serving every function on one port.

Checked over real HTTP: both mounts of every function (and that each mount serves its own
function), the trailing-slash trap, a browser's CORS preflight as supabase-js triggers it,
stack.env, the OpenAPI document (served, up to date, and matching real answers), clean shutdown
on SIGTERM and Ctrl-C with no PostgreSQL left behind, twice in a row (the second time with the
first run's DATABASE_URL in the environment, as after sourcing stack.env), and the `--demo`
walkthrough end to end. Without starting anything: the heartbeat options (the functions' interval
is its own, the stand-in's period never longer) and the DATABASE_URL rule.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from devstack import openapi
from devstack.database import postmaster_pid
from devstack.launcher import StackProcess
from devstack.openapi import check_response, validate
from devstack.seed import read_env_file, write_env_file
from devstack.stack import Stack, StopSignal, database_url_to_use, parse_args

ROOT = Path(__file__).resolve().parents[1]
SPEC = json.loads((ROOT / "docs" / "openapi.json").read_text())
FUNCTIONS = ("deploy_mcp_server", "manage_mcp_server", "mcp_status", "mcp_status_sweep", "dtma_heartbeat_ingest",
             "dtma_command_worker")
ENV_KEYS = ("FUNCTIONS_URL", "SUPABASE_JWT_SECRET", "DEMO_USER_ID", "DEMO_USER_JWT", "DEMO_TOOLBOX_ID",
            "DEMO_TOOLBOX_TOKEN", "DTMA_STANDIN_URL", "DTMA_KEY", "DATABASE_URL")
BROWSER_HEADERS = "apikey,authorization,content-type,x-client-info"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackProcess]:
    base = tmp_path_factory.mktemp("stack")
    with StackProcess("--port", "0", "--sweep-interval", "0", data_dir=base / "pg", state_dir=base / "state") as proc:
        yield proc


@pytest.fixture(scope="module")
def http(stack: StackProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=15, trust_env=False, follow_redirects=False) as client:
        yield client


def user(stack: StackProcess) -> dict[str, str]:
    return {"Authorization": f"Bearer {stack.env['DEMO_USER_JWT']}"}


def checked(response: httpx.Response, documented: str) -> Any:
    """The answer's JSON body, after checking it is what docs/openapi.json says it is."""
    body = response.json() if response.content else None
    if response.status_code == 405 and response.request.method.lower() not in SPEC["paths"][documented]:
        # A method the document does not list: all it can promise is the error shape.
        validate(body, "#/components/schemas/Error", SPEC)
    else:
        check_response(SPEC, documented, response.request.method, response.status_code, body)
    return body


def heartbeat_payload() -> dict[str, Any]:
    """What the real DTMA sends: every container, its own included (docs/real-agent.md)."""
    return {"dtma_version": "0.1.0", "system_status": {"uptime": 12.5, "memory": {"free": 1, "total": 2}},
            "tool_statuses": [{"id": "f00d" * 16, "names": ["/dtma_manager"], "image": "dtma-agent:latest",
                               "image_id": "sha256:" + "0" * 64, "command": "npm start", "created": 1700000000,
                               "state": "running", "status": "Up 5 minutes", "ports": []}]}


@pytest.mark.parametrize("mount", ["/functions/v1/", "/"])
def test_every_function_is_served_under_both_mounts_and_each_is_its_own(
        stack: StackProcess, http: httpx.Client, mount: str) -> None:
    # deploy: POST only (a DELETE names the allowed method), and it wants a user JWT.
    response = http.delete(f"{mount}deploy_mcp_server")
    assert response.status_code == 405 and response.headers["Allow"] == "POST"
    assert checked(http.post(f"{mount}deploy_mcp_server", json={}), "/deploy_mcp_server")["error"]["code"] == \
        "unauthenticated"
    # manage: DELETE /<id> is its route; a random id of the caller is not found.
    missing = str(uuid.uuid4())
    response = http.delete(f"{mount}manage_mcp_server/{missing}", headers=user(stack))
    assert response.status_code == 404, response.text
    checked(response, "/manage_mcp_server/{id}")
    # status: GET lists the caller's servers.
    response = http.get(f"{mount}mcp_status", headers=user(stack))
    assert response.status_code == 200, response.text
    assert "servers" in checked(response, "/mcp_status")
    # sweep: POST answers counts, without any credentials (IAM guards it in production).
    response = http.post(f"{mount}mcp_status_sweep", json={})
    assert response.status_code == 200, response.text
    assert checked(response, "/mcp_status_sweep")["guard_tripped"] is False
    # heartbeat: 204 with the toolbox token, at <base>/heartbeat as the agent posts it.
    response = http.post(f"{mount}dtma_heartbeat_ingest/heartbeat", json=heartbeat_payload(),
                         headers={"Authorization": f"Bearer {stack.env['DEMO_TOOLBOX_TOKEN']}"})
    assert response.status_code == 204, response.text
    assert "content-type" not in response.headers
    checked(response, "/dtma_heartbeat_ingest/heartbeat")


def test_kebab_case_names_as_deployed_on_cloud_run(stack: StackProcess, http: httpx.Client) -> None:
    response = http.get("/functions/v1/mcp-status", headers=user(stack))
    assert response.status_code == 200 and "servers" in response.json()


def test_post_without_trailing_slash_is_served_not_redirected(stack: StackProcess, http: httpx.Client) -> None:
    body = {"toolbox_id": stack.env["DEMO_TOOLBOX_ID"], "name": f"slash-{uuid.uuid4().hex[:8]}",
            "image": "mcp/everything:latest"}
    response = http.post("/functions/v1/deploy_mcp_server", json=body, headers=user(stack))
    assert response.status_code == 202, response.text  # not 308
    server = checked(response, "/deploy_mcp_server")
    assert server["status"] == "deploying" and server["endpoint"].startswith("http://127.0.0.1:")
    # The emulator delivers the command to dtma_command_worker, which records the agent's answer.
    deadline = time.monotonic() + 15
    while True:
        response = http.get(f"/functions/v1/mcp_status/{server['id']}", headers=user(stack))
        seen = checked(response, "/mcp_status/{id}")["server"]
        if seen["status"] == "running" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert seen["status"] == seen["effective_status"] == "running", seen
    response = http.post(f"/functions/v1/manage_mcp_server/{server['id']}/stop", headers=user(stack))
    assert checked(response, "/manage_mcp_server/{id}/{action}")["status"] == "stopped"
    response = http.delete(f"/functions/v1/manage_mcp_server/{server['id']}", headers=user(stack))
    assert response.status_code == 200, response.text
    assert checked(response, "/manage_mcp_server/{id}") == {"id": server["id"], "name": body["name"],
                                                           "status": "removed", "left_on_toolbox": None}


@pytest.mark.parametrize("function", ["deploy_mcp_server", "manage_mcp_server", "mcp_status"])
def test_browser_preflight_with_the_headers_supabase_js_sends(http: httpx.Client, function: str) -> None:
    response = http.options(f"/functions/v1/{function}", headers={
        "Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": BROWSER_HEADERS})
    assert 200 <= response.status_code < 300
    assert response.headers["Access-Control-Allow-Origin"] in ("*", "http://localhost:5173")
    allowed = {h.strip().lower() for h in response.headers["Access-Control-Allow-Headers"].split(",")}
    assert set(BROWSER_HEADERS.split(",")) <= allowed
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    assert "content-type" not in response.headers and response.content == b""
    check_response(SPEC, f"/{function}", "options", response.status_code, None)


def test_stack_env_holds_every_connection_detail(stack: StackProcess) -> None:
    path = stack.state_dir / "stack.env"
    env = stack.env
    assert set(ENV_KEYS) <= set(env), sorted(set(ENV_KEYS) - set(env))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it holds secrets
    assert env["FUNCTIONS_URL"] == f"{stack.url}/functions/v1"
    assert env["DTMA_KEY"] == env["DEMO_TOOLBOX_TOKEN"]
    assert len(env["SUPABASE_JWT_SECRET"].encode()) >= 32
    claims = jwt.decode(env["DEMO_USER_JWT"], env["SUPABASE_JWT_SECRET"], algorithms=["HS256"],
                        audience="authenticated")
    assert claims["sub"] == env["DEMO_USER_ID"] and claims["role"] == "authenticated"
    assert claims["exp"] - claims["iat"] >= 23 * 3600
    assert httpx.get(f"{env['DTMA_STANDIN_URL']}/health", trust_env=False).text == "OK"
    assert env["DATABASE_URL"].startswith("postgresql://")


def test_index_and_openapi_document(stack: StackProcess, http: httpx.Client) -> None:
    index = http.get("/").json()
    assert set(index["functions"]) == set(FUNCTIONS)
    assert all(f["loaded"] for f in index["functions"].values())
    served = http.get("/openapi.json")
    assert served.status_code == 200 and served.json() == SPEC
    assert served.headers["Access-Control-Allow-Origin"] == "*"  # Swagger UI in a browser may fetch it
    assert SPEC["openapi"].startswith("3.1")
    assert openapi.render() == (ROOT / "docs" / "openapi.json").read_text(), \
        "docs/openapi.json is out of date: run python -m devstack.openapi"
    unknown = http.get("/functions/v1/nope")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"


def test_error_answers_match_the_document(stack: StackProcess, http: httpx.Client) -> None:
    box = stack.env["DEMO_TOOLBOX_ID"]
    cases = [
        (http.post("/deploy_mcp_server", json={"toolbox_id": box, "name": "x", "imagee": "typo"},
                   headers=user(stack)), 422, "unknown_fields"),
        (http.post("/deploy_mcp_server", content=b"{nope", headers={**user(stack), "Content-Type": "application/json"}),
         400, "invalid_json"),
        (http.post("/deploy_mcp_server", content=b"name=x", headers={**user(stack), "Content-Type": "text/plain"}),
         415, "unsupported_media_type"),
        (http.post("/deploy_mcp_server", content=b"{" + b" " * 1_100_000 + b"}",
                   headers={**user(stack), "Content-Type": "application/json"}), 413, "payload_too_large"),
        (http.post("/deploy_mcp_server", json={"toolbox_id": str(uuid.uuid4()), "name": "x"}, headers=user(stack)),
         404, "not_found"),
        (http.post("/manage_mcp_server", json={"instance_id": str(uuid.uuid4()), "action": "explode"},
                   headers=user(stack)), 400, "invalid_request"),
        (http.get(f"/mcp_status?id={uuid.uuid4()}", headers=user(stack)), 404, "not_found"),
        (http.get("/mcp_status", headers={"Authorization": "Bearer not-a-jwt"}), 401, "unauthenticated"),
        (http.post("/dtma_heartbeat_ingest/heartbeat", json=heartbeat_payload(),
                   headers={"Authorization": "Bearer wrong-token"}), 401, "unauthenticated"),
        (http.get("/mcp_status_sweep"), 405, "method_not_allowed"),
    ]
    for response, status, code in cases:
        path = "/" + response.request.url.path.strip("/")
        assert response.status_code == status, (path, response.text)
        assert checked(response, path)["error"]["code"] == code


def test_reset_is_refused_while_another_stack_uses_the_database(stack: StackProcess, tmp_path: Path) -> None:
    second = StackProcess("--port", "0", "--reset", data_dir=stack.data_dir, state_dir=tmp_path / "state")
    assert second.run(timeout=60) == 1
    assert "is running on" in second.output and "before --reset" in second.output
    assert postmaster_pid(stack.data_dir) is not None  # the first stack's database is untouched


def _port_closed(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    with socket.socket() as probe:
        return probe.connect_ex((host, int(port))) != 0


def test_sigterm_and_ctrl_c_stop_everything_twice_in_a_row(tmp_path: Path) -> None:
    ids = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        proc = StackProcess("--port", "0", data_dir=tmp_path / "pg", state_dir=tmp_path / "state")
        if ids:
            # As after `set -a; . .local/stack.env; set +a`: the shell holds the first run's DATABASE_URL,
            # which names the embedded database the first run stopped. It means "the embedded database".
            proc.environ["DATABASE_URL"] = read_env_file(tmp_path / "state" / "stack.env")["DATABASE_URL"]
        proc.start()
        try:
            assert postmaster_pid(proc.data_dir) is not None
            ids.append((proc.env["DEMO_USER_ID"], proc.env["DEMO_TOOLBOX_ID"], proc.env["SUPABASE_JWT_SECRET"]))
            assert proc.signal(signum, timeout=15) == 0, proc.output
            assert postmaster_pid(proc.data_dir) is None, f"PostgreSQL still runs:\n{proc.output}"
            assert "PostgreSQL stopped" in proc.output and "Stopped." in proc.output
            assert _port_closed(proc.url) and _port_closed(proc.env["DTMA_STANDIN_URL"])
        finally:
            proc.stop()
    assert ids[0] == ids[1]  # seeding reuses the user, the toolbox and the secrets
    assert "DATABASE_URL in the environment is the embedded database" in proc.output


def test_functions_heartbeat_interval_is_its_own_option(capsys: pytest.CaptureFixture[str]) -> None:
    """The functions expect the real agent's 60 s whatever the stand-in does (a real agent may join)."""
    plain = parse_args([], environ={})
    assert (plain.functions_heartbeat_interval, plain.functions_heartbeat_grace) == (60, 30)
    assert plain.standin_heartbeat_interval == 10
    assert plain.functions_env == {"HEARTBEAT_INTERVAL_SECONDS": "60", "HEARTBEAT_GRACE_SECONDS": "30"}
    assert plain.stale_after == 210

    quick_standin = parse_args(["--standin-heartbeat-interval", "2"], environ={})
    assert quick_standin.standin_heartbeat_interval == 2
    assert quick_standin.functions_env["HEARTBEAT_INTERVAL_SECONDS"] == "60"

    tuned = parse_args(["--functions-heartbeat-interval", "5", "--functions-heartbeat-grace", "0"], environ={})
    assert tuned.functions_env == {"HEARTBEAT_INTERVAL_SECONDS": "5", "HEARTBEAT_GRACE_SECONDS": "0"}
    assert tuned.standin_heartbeat_interval == 5  # the stand-in's default never beats slower than expected

    # The environment sets the functions' values when no flag does; a flag wins over it.
    from_env = parse_args([], environ={"HEARTBEAT_INTERVAL_SECONDS": "90", "HEARTBEAT_GRACE_SECONDS": "15"})
    assert from_env.functions_env == {"HEARTBEAT_INTERVAL_SECONDS": "90", "HEARTBEAT_GRACE_SECONDS": "15"}
    flag = parse_args(["--functions-heartbeat-interval", "45"], environ={"HEARTBEAT_INTERVAL_SECONDS": "90"})
    assert flag.functions_heartbeat_interval == 45

    # The old flag is the stand-in's period only, and says so.
    old = parse_args(["--heartbeat-interval", "3"], environ={})
    assert old.standin_heartbeat_interval == 3 and old.functions_heartbeat_interval == 60
    assert "deprecated" in capsys.readouterr().err


def test_demo_timing_is_short_and_consistent() -> None:
    demo = parse_args(["--demo"], environ={"HEARTBEAT_INTERVAL_SECONDS": "60"})  # the demo keeps its own timing
    assert demo.functions_env == {"HEARTBEAT_INTERVAL_SECONDS": "2", "HEARTBEAT_GRACE_SECONDS": "1",
                                  "DTMA_DEPLOY_BUDGET_SECONDS": "0.5"}
    assert demo.standin_heartbeat_interval == 1 <= demo.functions_heartbeat_interval


@pytest.mark.parametrize(("argv", "environ", "message"), [
    (["--standin-heartbeat-interval", "90"], {}, "longer than the functions' heartbeat interval (60 s)"),
    (["--demo", "--standin-heartbeat-interval", "5"], {}, "longer than the functions' heartbeat interval (2 s)"),
    (["--heartbeat-interval", "3", "--standin-heartbeat-interval", "4"], {}, "disagree"),
    (["--functions-heartbeat-interval", "0"], {}, "must be >= 1"),
    ([], {"HEARTBEAT_INTERVAL_SECONDS": "soon"}, "HEARTBEAT_INTERVAL_SECONDS='soon' in the environment"),
])
def test_inconsistent_heartbeat_options_are_refused(capsys: pytest.CaptureFixture[str], argv: list[str],
                                                    environ: dict[str, str], message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv, environ=environ)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_banner_names_both_heartbeat_periods() -> None:
    options = parse_args(["--state-dir", "/tmp/state"], environ={})
    stack = Stack(options, StopSignal(), out=io.StringIO())
    stack.base_url = "http://127.0.0.1:1"
    stack.env = {"FUNCTIONS_URL": "http://127.0.0.1:1/functions/v1", "DTMA_STANDIN_URL": "http://127.0.0.1:2",
                 "OPENAPI_URL": "", "DATABASE_URL": "", "DEMO_TOOLBOX_ID": "t", "DEMO_USER_EMAIL": "e",
                 "DEMO_USER_ID": "u", "LOG_FILE": "/tmp/state/stack.log", "DEMO_USER_JWT": "j",
                 "DEMO_TOOLBOX_TOKEN": "k"}
    stack.print_banner()
    banner = stack.out.getvalue()
    assert "heartbeat every 10 s" in banner
    assert "the functions expect a heartbeat every 60 s (HEARTBEAT_INTERVAL_SECONDS; grace 30 s)" in banner
    assert "silent for 210 s reads unknown" in banner


def test_database_url_of_the_stacks_own_embedded_database_means_embedded(tmp_path: Path) -> None:
    state = tmp_path / "state"
    data_dir = tmp_path / "pg"
    own = f"postgresql://postgres:@/postgres?host={data_dir}"
    external = "postgresql://app:secret@db.example.test:5432/app"
    assert database_url_to_use(None, state) == (None, None)
    assert database_url_to_use(own, state) == (own, None)  # no stack.env: taken as given

    write_env_file(state / "stack.env", {"DATABASE_URL": own, "DATABASE_KIND": "embedded"}, "test")
    url, note = database_url_to_use(own, state)
    assert url is None and note is not None and "is the embedded database" in note
    assert database_url_to_use(external, state) == (external, None)  # any other URL is used as given

    # A stack that itself ran on an external database wrote that one: it stays external.
    write_env_file(state / "stack.env", {"DATABASE_URL": external, "DATABASE_KIND": "external"}, "test")
    assert database_url_to_use(external, state) == (external, None)

    # stack.env written before DATABASE_KIND existed: the embedded server's socket is in its data directory.
    write_env_file(state / "stack.env", {"DATABASE_URL": own}, "test")
    assert database_url_to_use(own, state) == (own, None)
    data_dir.mkdir()
    (data_dir / "PG_VERSION").write_text("16\n")
    assert database_url_to_use(own, state)[0] is None


@pytest.mark.slow
def test_demo_walkthrough_end_to_end(tmp_path: Path) -> None:
    proc = StackProcess("--demo", "--port", "0", data_dir=tmp_path / "pg", state_dir=tmp_path / "state")
    code = proc.run(timeout=100)
    assert code == 0, proc.output
    output = proc.output
    for step in ("deploy an MCP server", "watch deploying -> running", "stop it", "start it",
                 "silence the toolbox", "bring the toolbox back", "deploy an image whose pull fails",
                 "the server's process dies", "remove both"):
        assert step in output
    assert "202 Accepted" in output and "deploying -> running (api)" in output
    assert "202, then error: the toolbox could not pull the image" in output
    assert "exited unexpectedly with code 137" in output
    assert "unknown after" in output and "toolbox is now unresponsive" in output
    assert "Demo passed" in output and "FAILED" not in output
    assert postmaster_pid(tmp_path / "pg") is None
    lines = output.splitlines()
    tracebacks = ["\n".join(lines[i:i + 30]) for i, line in enumerate(lines) if "Traceback" in line]
    assert not tracebacks, tracebacks
    assert os.path.exists(tmp_path / "state" / "stack.log")
