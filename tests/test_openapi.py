"""docs/openapi.json and the checker the local stack's tests and `--demo` use (devstack.openapi).

Without a database: the server schemas are generated from the types `shared.usecases.view` builds the answer
with, every kind of server `server_json` renders matches them, and the checker (jsonschema, Draft
2020-12, `$ref`s resolved in the document) refuses wrong answers: an undocumented or missing
field, a null or a value the document does not allow, at any depth, and an undocumented status or
body.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from devstack import openapi
from devstack.openapi import SchemaMismatch, check_response, validate
from shared.core.config import Settings
from shared.usecases.view import server_json
from shared.usecases.view_models import ProgressEvent, ServerView, ToolboxSummary

ROOT = Path(__file__).resolve().parents[1]
SPEC = json.loads((ROOT / "docs" / "openapi.json").read_text())
SERVER = "#/components/schemas/Server"
AT = "2025-06-01T12:00:00.123456+00:00"


def row(stored: str = "running", **box: Any) -> dict[str, Any]:
    """One item of cp_list_mcp_servers, as the database returns it (jsonb: timestamps are strings)."""
    toolbox = {"id": str(uuid.uuid4()), "name": "droplet-1", "region_slug": "nyc3", "status": "active",
               "public_ip_address": "203.0.113.7", "dtma_port": 30000, "dtma_key_version": 1,
               "last_heartbeat_at": AT, "heartbeat_age_seconds": 12.5, "provisioning_error_message": None,
               "dtma_last_reached_at": None, "reached_age_seconds": None, "docker_error": None, **box}
    return {"id": str(uuid.uuid4()), "name": "github", "status": stored, "status_changed_at": AT,
            "status_age_seconds": 300.25, "error_message": None, "image": "mcp/github:latest",
            "host_port": 40000, "container_port": 8080, "container_id": "c0ffee", "endpoint_path": "/mcp",
            "transport": "streamable_http", "capabilities": ["tools"], "discovery_metadata": None,
            "runtime": None, "last_report_at": AT, "agent_unmanaged_at": None, "created_at": AT, "updated_at": AT,
            "toolbox": toolbox,
            "events": [{"at": AT, "from": None if n == 0 else "deploying", "to": "running", "message": f"event {n}",
                        "source": "heartbeat"} for n in range(5)]}


def server(stored: str = "running", **box: Any) -> dict[str, Any]:
    return dict(server_json(row(stored, **box), Settings()))


def test_the_server_schemas_are_generated_from_the_view_types() -> None:
    schemas = openapi.build()["components"]["schemas"]
    assert schemas == SPEC["components"]["schemas"]
    for name, kind in (("Server", ServerView), ("ToolboxSummary", ToolboxSummary), ("Progress", ProgressEvent)):
        schema = schemas[name]
        assert list(schema["properties"]) == list(kind.__annotations__), name
        assert schema["required"] == list(schema["properties"]), name  # every key, always
        assert schema["additionalProperties"] is False, name
    assert schemas["Server"]["properties"]["toolbox"] == {"$ref": "#/components/schemas/ToolboxSummary"}
    assert schemas["Server"]["properties"]["progress"]["items"] == {"$ref": "#/components/schemas/Progress"}
    assert "ServerView" not in json.dumps(SPEC) and "ProgressEvent" not in json.dumps(SPEC)


@pytest.mark.parametrize(("stored", "box"), [
    ("running", {}),  # heard from
    ("error", {}),
    ("stopped", {}),
    ("running", {"status": "unresponsive"}),  # silent: unknown
    ("running", {"heartbeat_age_seconds": None, "last_heartbeat_at": None}),  # never reported
    ("running", {"docker_error": "Cannot connect to the Docker daemon"}),
    ("running", {"public_ip_address": None}),  # no endpoint
])
def test_every_kind_of_server_matches_the_document(stored: str, box: dict[str, Any]) -> None:
    answer = server(stored, **box)
    assert list(answer) == list(ServerView.__annotations__)
    validate(answer, SERVER, SPEC)
    check_response(SPEC, "/deploy_mcp_server", "POST", 202, answer)
    check_response(SPEC, "/mcp_status", "GET", 200, {"servers": [answer], "next_cursor": None, "as_of": AT})
    check_response(SPEC, "/mcp_status/{id}", "GET", 200, {"server": answer, "as_of": AT})


def _set(*path: str | int, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(answer: dict[str, Any]) -> None:
        node: Any = answer
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return change


def _drop(*path: str | int) -> Callable[[dict[str, Any]], None]:
    def change(answer: dict[str, Any]) -> None:
        node: Any = answer
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return change


WRONG = {
    "an undocumented field": (_set("uptime", value=3), "'uptime' was unexpected"),
    "a missing field": (_drop("health"), "'health' is a required property"),
    "null where it may not be": (_set("status", value=None), "None is not of type 'string'"),
    "a value outside the enum": (_set("effective_status", value="fine"), "'fine' is not one of"),
    "a bool as a string": (_set("stale", value="false"), "'false' is not of type 'boolean'"),
    "a port as a string": (_set("host_port", value="40000"), "'40000' is not valid under any of the given schemas"),
    "a negative uptime": (_set("uptime_seconds", value=-1), "-1 is less than the minimum of 0"),
    "an undocumented transport": (_set("transport", value="websocket"), "'websocket' is not one of"),
    "an undocumented toolbox field": (_set("toolbox", "ip", value="203.0.113.7"), "'ip' was unexpected"),
    "a missing toolbox field": (_drop("toolbox", "docker_healthy"), "'docker_healthy' is a required property"),
    "a progress event without from": (_drop("progress", 0, "from"), "'from' is a required property"),
    "a progress event from nowhere": (_set("progress", 1, "source", value="cron"), "'cron' is not one of"),
    "six progress events": (lambda answer: answer["progress"].append(answer["progress"][0]), "is too long"),
}


@pytest.mark.parametrize("name", list(WRONG))
def test_a_wrong_answer_fails_the_check(name: str) -> None:
    change, message = WRONG[name]
    right = server()
    wrong = copy.deepcopy(right)
    change(wrong)
    assert wrong != right
    with pytest.raises(SchemaMismatch, match="POST /deploy_mcp_server -> 202: ") as raised:
        check_response(SPEC, "/deploy_mcp_server", "POST", 202, wrong)
    assert message in str(raised.value)
    # Inside a list page and a single-server answer too (each an anyOf branch of the 200).
    with pytest.raises(SchemaMismatch, match=None) as raised:
        check_response(SPEC, "/mcp_status", "GET", 200, {"servers": [right, wrong], "next_cursor": None, "as_of": AT})
    assert message in str(raised.value) and "$.servers[1]" in str(raised.value)
    with pytest.raises(SchemaMismatch):
        check_response(SPEC, "/mcp_status/{id}", "GET", 200, {"server": wrong, "as_of": AT})


def test_errors_statuses_and_bodies_the_document_does_not_give_are_refused() -> None:
    error = {"error": {"code": "not_found", "message": "No such server.", "details": {}}}
    check_response(SPEC, "/mcp_status/{id}", "GET", 404, error)  # a `$ref` to components/responses/E404
    with pytest.raises(SchemaMismatch, match="'details' is a required property"):
        check_response(SPEC, "/mcp_status/{id}", "GET", 404, {"error": {"code": "x", "message": "y"}})
    with pytest.raises(SchemaMismatch, match="'hint' was unexpected"):
        validate({**error, "hint": "try again"}, "#/components/schemas/Error", SPEC)
    with pytest.raises(SchemaMismatch, match="does not document status 418"):
        check_response(SPEC, "/mcp_status", "GET", 418, error)
    with pytest.raises(SchemaMismatch, match="is not documented"):
        check_response(SPEC, "/mcp_status", "PATCH", 200, {})
    check_response(SPEC, "/dtma_heartbeat_ingest/heartbeat", "POST", 204, None)
    with pytest.raises(SchemaMismatch, match="documents no body"):
        check_response(SPEC, "/dtma_heartbeat_ingest/heartbeat", "POST", 204, {"ok": True})
    with pytest.raises(SchemaMismatch, match="only references into the document"):
        validate(error, "https://example.test/schema.json", SPEC)
