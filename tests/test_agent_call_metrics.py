"""Every DTMA call is measured: a `dtma_call` log line (what deploy.sh's log-based metrics count) and,
for a command, an entry of its outcome record's `agent_calls`; every finished command writes one
`command_outcome` line. Driven through deploy_mcp_server / manage_mcp_server and the DTMA stand-in,
as in production (docs/deploying.md, "Metrics and logs")."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from ops.gcp_package import log_metrics
from shared.adapters import dtma
from shared.adapters import logging as mcp_logging
from shared.core.config import ALL_FUNCTIONS, load_settings
from tests.factories import MASTER_SECRET
from tests.helpers import auth, last_command, settle, spec

SECRET_ENV_VALUE = "ghp_supersecret123"  # the env value of tests.helpers.spec()
DTMA_CALL_FIELDS = {"event", "operation", "toolbox_id", "duration_ms", "result", "http_status"}
OUTCOME_FIELDS = {"event", "command_id", "action", "toolbox_id", "instance_id", "image", "code", "http_status",
                  "result", "state", "duration_ms", "run_ms", "attempt", "dtma_calls"}


@pytest.fixture
def lines(caplog: pytest.LogCaptureFixture) -> Iterator[list[logging.LogRecord]]:
    """The structured records of the DTMA client and the command worker, from every thread."""
    caplog.set_level(logging.INFO)
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if isinstance(getattr(record, "json_fields", None), dict):
                records.append(record)

    keep = Keep(logging.INFO)
    loggers = [logging.getLogger("mcp.dtma"), logging.getLogger("mcp.commands")]
    for logger in loggers:
        logger.addHandler(keep)
    yield records
    for logger in loggers:
        logger.removeHandler(keep)


def events(records: list[logging.LogRecord], event: str) -> list[dict[str, Any]]:
    return [r.json_fields for r in records if r.json_fields.get("event") == event]  # type: ignore[attr-defined]


def deploy(function_client: Any, box: Any, **overrides: Any) -> str:
    response = function_client("deploy_mcp_server").post("/", json=spec(box, **overrides), headers=auth(box.user_id))
    assert response.status_code == 202, response.json
    settle()
    return response.json["id"]


def ops(calls: list[dict[str, Any]]) -> list[str]:
    return [c["op"] for c in calls]


def test_a_deploy_records_its_agent_call_and_logs_it(function_client: Any, toolbox_agent: Any,
                                                      pg: psycopg.Connection, lines: list[logging.LogRecord]) -> None:
    box, agent = toolbox_agent()
    server = deploy(function_client, box)
    command = last_command(pg, server)
    assert command["status"] == "done" and command["outcome"]["code"] == "created"
    # The contract the SQL report reads: every call, in order, {op, ms, result, status}.
    [call] = command["outcome"]["agent_calls"]
    assert set(call) == {"op", "ms", "result", "status"}
    assert (call["op"], call["result"], call["status"]) == ("deploy", "ok", 201)
    assert isinstance(call["ms"], float) and call["ms"] > 0 and round(call["ms"], 1) == call["ms"]
    assert [r.method + " " + r.path for r in agent.requests if r.path.startswith("/tools")] == ["POST /tools"]

    [line] = [f for f in events(lines, "dtma_call") if f["toolbox_id"] == box.id]
    assert set(line) == DTMA_CALL_FIELDS | {"command_id"}
    assert (line["operation"], line["result"], line["http_status"], line["duration_ms"]) == (
        "deploy", "ok", 201, call["ms"])
    [outcome] = events(lines, "command_outcome")
    assert set(outcome) == OUTCOME_FIELDS
    assert outcome["command_id"] == line["command_id"]
    assert {k: outcome[k] for k in ("action", "toolbox_id", "instance_id", "image", "code", "http_status", "result",
                                    "state", "attempt", "dtma_calls")} == {
        "action": "deploy", "toolbox_id": box.id, "instance_id": server, "image": "mcp/github:latest",
        "code": "created", "http_status": 201, "result": "succeeded", "state": "done", "attempt": 1, "dtma_calls": 1}
    # From the moment the command was recorded: at least this delivery's own part, which holds the call.
    assert outcome["duration_ms"] >= outcome["run_ms"] >= call["ms"] > 0


def test_manage_actions_record_each_call_in_order(function_client: Any, toolbox_agent: Any,
                                                   pg: psycopg.Connection, lines: list[logging.LogRecord]) -> None:
    box, _ = toolbox_agent()
    server = deploy(function_client, box)
    manage = function_client("manage_mcp_server")

    def act(action: str) -> list[dict[str, Any]]:
        response = manage.post(f"/{server}/{action}", headers=auth(box.user_id))
        assert response.status_code == 200, response.json
        settle()
        command = last_command(pg, server)
        assert command["action"] == action and command["status"] == "done"
        calls = command["outcome"]["agent_calls"]
        assert all(c["result"] == "ok" and c["ms"] > 0 and c["status"] == 200 for c in calls), calls
        return calls

    assert ops(act("stop")) == ["stop"]
    started = ops(act("start"))  # then it looks: a start is confirmed by the agent's container list
    assert started[0] == "start" and len(started) >= 2 and set(started[1:]) == {"tools_status"}
    restarted = ops(act("restart"))
    assert restarted[:2] == ["stop", "start"] and set(restarted[2:]) == {"tools_status"}
    removed = manage.delete(f"/{server}", headers=auth(box.user_id))
    assert removed.status_code == 200, removed.json
    settle()
    assert ops(last_command(pg, server)["outcome"]["agent_calls"]) == ["delete"]

    outcomes = events(lines, "command_outcome")
    assert [o["action"] for o in outcomes] == ["deploy", "stop", "start", "restart", "remove"]
    assert {o["result"] for o in outcomes} == {"succeeded"}
    logged = [f["operation"] for f in events(lines, "dtma_call")]
    assert logged == ["deploy", "stop", *started, *restarted, "delete"]


def test_a_rejected_call_is_recorded_with_the_agents_status(function_client: Any, toolbox_agent: Any,
                                                             pg: psycopg.Connection,
                                                             lines: list[logging.LogRecord]) -> None:
    box, agent = toolbox_agent()
    agent.fail_next("deploy", 500, {"success": False, "error": "disk full"})
    server = deploy(function_client, box)
    command = last_command(pg, server)
    assert command["outcome"]["code"] == "toolbox_failed"
    [call] = command["outcome"]["agent_calls"]
    assert (call["op"], call["result"], call["status"]) == ("deploy", "rejected", 500) and call["ms"] > 0
    [line] = events(lines, "dtma_call")
    assert (line["result"], line["http_status"]) == ("rejected", 500)
    assert [r.levelno for r in lines if r.json_fields.get("event") == "dtma_call"] == [logging.WARNING]  # type: ignore[attr-defined]
    [outcome] = events(lines, "command_outcome")
    assert (outcome["result"], outcome["code"], outcome["http_status"]) == ("failed", "toolbox_failed", 502)


def test_a_call_that_is_a_success_for_the_command_is_still_the_agents_refusal(
        function_client: Any, toolbox_agent: Any, pg: psycopg.Connection, lines: list[logging.LogRecord]) -> None:
    # The real agent answers a second stop with 500 "(HTTP code 304)": the command succeeds, the call did not.
    box, agent = toolbox_agent()
    server = deploy(function_client, box)
    agent.crash_container("mcp-github", exit_code=0)
    response = function_client("manage_mcp_server").post(f"/{server}/stop", headers=auth(box.user_id))
    assert response.status_code == 200, response.json
    settle()
    command = last_command(pg, server)
    assert command["status"] == "done"
    assert [(c["op"], c["result"], c["status"]) for c in command["outcome"]["agent_calls"]] == [
        ("stop", "rejected", 500)]
    assert events(lines, "command_outcome")[-1]["result"] == "succeeded"


def test_an_unreachable_agent_is_recorded_as_such(function_client: Any, toolbox_agent: Any,
                                                   pg: psycopg.Connection, lines: list[logging.LogRecord]) -> None:
    box, agent = toolbox_agent()
    agent.refuse_connections()
    server = deploy(function_client, box)
    command = last_command(pg, server)
    assert command["status"] == "failed" and command["outcome"]["code"] == "toolbox_unreachable"
    [call] = command["outcome"]["agent_calls"]  # one entry, however many connection attempts it took
    assert (call["op"], call["result"], call["status"]) == ("deploy", "unreachable", None) and call["ms"] >= 0
    [line] = events(lines, "dtma_call")
    assert (line["result"], line["http_status"]) == ("unreachable", None)
    assert events(lines, "command_outcome")[0]["result"] == "failed"


def test_a_call_without_an_answer_in_time_is_a_timeout(function_client: Any, toolbox_agent: Any,
                                                        pg: psycopg.Connection) -> None:
    box, _ = toolbox_agent()
    client = function_client("deploy_mcp_server", DTMA_COMMAND_TIMEOUT_SECONDS="0.3")
    response = client.post("/", json=spec(box, image="standin/slow-2:latest"), headers=auth(box.user_id))
    assert response.status_code == 202
    settle()
    command = last_command(pg, response.json["id"])
    assert command["outcome"]["http_status"] == 202  # unknown: the next heartbeat tells
    [call] = command["outcome"]["agent_calls"]
    assert (call["op"], call["result"], call["status"]) == ("deploy", "timeout", None)
    assert 250 <= call["ms"] < 5000


def test_an_unusable_answer_is_a_bad_response(function_client: Any, toolbox_agent: Any,
                                              pg: psycopg.Connection) -> None:
    box, agent = toolbox_agent()
    agent.fail_next("deploy", 201, {"success": True})  # a 201 without the container's state
    server = deploy(function_client, box)
    [call] = last_command(pg, server)["outcome"]["agent_calls"]
    assert (call["op"], call["result"], call["status"]) == ("deploy", "bad_response", 201)


def test_no_line_holds_the_key_the_token_or_an_env_value(function_client: Any, toolbox_agent: Any,
                                                          lines: list[logging.LogRecord]) -> None:
    box, agent = toolbox_agent()
    deploy(function_client, box)  # succeeds
    agent.fail_next("deploy", 500, {"success": False, "error": f"failed with {SECRET_ENV_VALUE} and {box.token}"})
    deploy(function_client, box, name="mcp-two")  # the agent's answer quotes both
    assert len(events(lines, "dtma_call")) == 2 and len(events(lines, "command_outcome")) == 2
    for record in lines:
        text = record.getMessage() + json.dumps(record.json_fields)  # type: ignore[attr-defined]
        for secret in (box.token, SECRET_ENV_VALUE, MASTER_SECRET, "Bearer"):
            assert secret not in text, (secret, text)


def test_the_json_line_cloud_logging_reads(toolbox_agent: Any) -> None:
    """The production StructuredLogHandler puts the fields at the top of the line: `jsonPayload.<field>`."""
    box, agent = toolbox_agent()
    settings = load_settings(environ={"LOG_FORMAT": "json", "GOOGLE_CLOUD_PROJECT": "proj-1",
                                      "DTMA_KEY_SECRET": MASTER_SECRET})
    stream = io.StringIO()
    handler = mcp_logging._handler(settings)
    handler.setStream(stream)  # type: ignore[attr-defined]
    handler.addFilter(mcp_logging.RedactingFilter())
    logger = logging.getLogger("mcp.dtma")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    client = dtma.DtmaClient(master_secret=MASTER_SECRET, allow_private=True)
    try:
        target = client.target({"id": box.id, "public_ip_address": "127.0.0.1", "dtma_port": agent.port})
        with dtma.recording(command_id="c-1") as calls:
            client.tool_status(target, 3.0)
        client.tool_status(target, 3.0)  # outside a recording: logged, not recorded
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        client.close()
    # (The handler's first line in a process is its own instrumentation record.)
    first, second = (line for line in map(json.loads, stream.getvalue().splitlines()) if "event" in line)
    assert first["severity"] == "INFO" and first["message"].startswith(f"dtma tools_status on toolbox {box.id}: ok")
    assert {k: first[k] for k in DTMA_CALL_FIELDS | {"command_id"}} == {
        "event": "dtma_call", "operation": "tools_status", "toolbox_id": box.id, "duration_ms": calls[0]["ms"],
        "result": "ok", "http_status": 200, "command_id": "c-1"}
    assert "command_id" not in second and second["operation"] == "tools_status"
    assert ops(calls) == ["tools_status"]
    assert box.token not in stream.getvalue()


def test_recordings_are_per_block_and_per_thread(toolbox_agent: Any) -> None:
    import threading

    box, agent = toolbox_agent()
    client = dtma.DtmaClient(master_secret=MASTER_SECRET, allow_private=True)
    target = client.target({"id": box.id, "public_ip_address": "127.0.0.1", "dtma_port": agent.port})
    into: list[dict[str, Any]] = []
    try:
        with dtma.recording(into) as calls:
            assert calls is into
            client.tool_status(target, 3.0)
            other = threading.Thread(target=client.tool_status, args=(target, 3.0))  # another thread: not this one's
            other.start()
            other.join()
            with dtma.recording() as inner:
                client.tool_status(target, 3.0)
        client.tool_status(target, 3.0)
    finally:
        client.close()
    assert len(into) == 1 and len(inner) == 1
    assert dtma.OPERATIONS == ("deploy", "start", "stop", "delete", "tools_status")
    assert set(dtma.RESULTS.values()) | {dtma.OK} == {"ok", "rejected", "unreachable", "timeout", "bad_response"}


def test_the_metrics_deploy_sh_creates_read_fields_these_lines_carry(function_client: Any, toolbox_agent: Any,
                                                                      lines: list[logging.LogRecord]) -> None:
    box, _ = toolbox_agent()
    deploy(function_client, box)
    logged = {"dtma_call": events(lines, "dtma_call")[0], "command_outcome": events(lines, "command_outcome")[0]}
    for name, metric in log_metrics(ALL_FUNCTIONS).items():
        [event] = re.findall(r'jsonPayload\.event="(\w+)"', metric["filter"])
        line = logged[event]
        assert set(re.findall(r"jsonPayload\.(\w+)", json.dumps(metric))) <= set(line), name
        if "valueExtractor" in metric:
            field = re.fullmatch(r"EXTRACT\(jsonPayload\.(\w+)\)", metric["valueExtractor"])[1]  # type: ignore[index]
            assert isinstance(line[field], float) and line[field] > 0, name
        # A successful deploy's lines match every condition on a value (NOT-conditions aside).
        for field, value in re.findall(r'(?<!NOT )jsonPayload\.(\w+)="(\w+)"', metric["filter"]):
            if name != "mcp_dtma_call_errors":
                assert line[field] == value, (name, field)
