"""Build `docs/openapi.json` (OpenAPI 3.1) from the code that defines the API, and check answers against it.

Request bodies come from the pydantic models the functions validate with (`shared.core.models`,
`shared.usecases.status_query`, `shared.usecases.reports`), and the server every user-facing function answers
(`Server`, `ToolboxSummary`, `Progress`) from the types `shared.usecases.view` builds it with
(`shared.usecases.view_models`), so the document cannot drift from what is accepted or answered. The
other answers are described here, next to each other; the local stack's tests and `--demo` check
real answers against the document (`check_response`, with the `jsonschema` library: OpenAPI 3.1
schemas are JSON Schema 2020-12), so a field added to an answer without being documented fails.

Usage: `python -m devstack.openapi` rewrites docs/openapi.json; `--check` exits 1 if the file
is not what the code generates (CI).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match
from pydantic import AliasChoices, BaseModel, TypeAdapter
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from shared.core import lifecycle
from shared.core.models import ActionRequest, DeployRequest
from shared.core.plan_body import PlanDeployBody
from shared.usecases.reports import ContainerSummary, Heartbeat, InstanceReport
from shared.usecases.status_query import MAX_LIMIT, StatusRequest
from shared.usecases.view_models import ProgressEvent, ServerView, ToolboxSummary

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "docs" / "openapi.json"
REF = "#/components/schemas/{model}"
JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    kind = schema.get("type")
    if isinstance(kind, str):
        return {**schema, "type": [kind, "null"]}
    return {"anyOf": [schema, {"type": "null"}]}


def _strict(properties: dict[str, Any], description: str = "", optional: Sequence[str] = ()) -> dict[str, Any]:
    """An object whose every listed property is present (except `optional`) and nothing else."""
    schema: dict[str, Any] = {
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
        "required": [name for name in properties if name not in optional],
    }
    if description:
        schema = {"description": description, **schema}
    return schema


def _model_schema(model: type[BaseModel], schemas: dict[str, Any]) -> dict[str, Any]:
    """The model's JSON schema, with the camelCase aliases the web app sends noted per property."""
    schema = model.model_json_schema(ref_template=REF)
    schemas.update(schema.pop("$defs", {}))
    for name, field in model.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            others = [str(choice) for choice in alias.choices if choice != name]
            if others and name in schema.get("properties", {}):
                schema["properties"][name]["description"] = "Also accepted as: " + ", ".join(others) + "."
    return schema


# The answer types of shared.usecases.view_models and the component each becomes, in document order.
VIEW_COMPONENTS: dict[Any, str] = {ProgressEvent: "Progress", ToolboxSummary: "ToolboxSummary", ServerView: "Server"}


class _Untitled(GenerateJsonSchema):
    """pydantic's schema without the titles it derives from Python names (`ServerView` is `Server` here)."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False

    def typed_dict_schema(self, schema: core_schema.TypedDictSchema) -> JsonSchemaValue:
        generated = super().typed_dict_schema(schema)
        generated.pop("title", None)
        return generated


def _renamed_refs(node: Any, names: dict[str, str]) -> Any:
    """`node` with every `$ref` to a shared.usecases.view_models type pointing at its component."""
    if isinstance(node, dict):
        return {key: (f"#/components/schemas/{names[value]}" if key == "$ref" else _renamed_refs(value, names))
                for key, value in node.items()}
    if isinstance(node, list):
        return [_renamed_refs(item, names) for item in node]
    return node


def _view_schemas() -> dict[str, Any]:
    """`Progress`, `ToolboxSummary` and `Server`, generated from the types the answer is built with
    (shared/usecases/view_models.py)."""
    names = {kind.__name__: component for kind, component in VIEW_COMPONENTS.items()}
    server = TypeAdapter(ServerView).json_schema(mode="serialization", ref_template="{model}",
                                                 schema_generator=_Untitled)
    found = {"ServerView": server, **server.pop("$defs", {})}
    unnamed = sorted(set(found) - set(names))
    if unnamed:
        raise LookupError(f"shared.usecases.view_models types without a component name in VIEW_COMPONENTS: {unnamed}")
    return {names[key]: _renamed_refs(found[key], names) for key in names}


STRING = {"type": "string"}
TIMESTAMP = {"type": "string", "format": "date-time"}
UUID = {"type": "string", "format": "uuid"}
COUNT = {"type": "integer", "minimum": 0}


def _schemas() -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    schemas["DeployRequest"] = _model_schema(DeployRequest, schemas)
    plan = _model_schema(PlanDeployBody, schemas)
    plan["description"] = (
        "The body Agentopia's plan has MCPService.deployServer send (deployToolToToolbox's arguments), "
        "recognised by `baseConfigOverrideJson`. The container name is derived from `instanceNameOnToolbox` "
        "(lower-case ASCII, other characters become '-', at most 63) and the typed text is kept as "
        "`discovery_metadata.display_name`; `toolCatalogId` must be the generic MCP catalog entry; "
        "fields of the flat request beside `baseConfigOverrideJson` are refused (400 mixed_shapes).")
    schemas["PlanDeployRequest"] = plan
    schemas["ActionRequest"] = _model_schema(ActionRequest, schemas)
    schemas["StatusRequest"] = _model_schema(StatusRequest, schemas)
    heartbeat = _model_schema(Heartbeat, schemas)
    heartbeat["properties"]["tool_statuses"]["items"] = {
        "anyOf": [_ref("ContainerSummary"), _ref("InstanceReport"), _ref("DockerError")]
    }
    heartbeat["description"] = (
        "What the DTMA agent sends every interval. Items of `tool_statuses` are Docker "
        "container summaries (the real agent today) or instance reports; unknown "
        "top-level fields are kept, not refused (agents evolve)."
    )
    schemas["Heartbeat"] = heartbeat
    schemas["ContainerSummary"] = _model_schema(ContainerSummary, schemas)
    schemas["InstanceReport"] = _model_schema(InstanceReport, schemas)
    schemas["DockerError"] = {
        "type": "object",
        "required": ["error"],
        "properties": {"error": STRING},
        "description": "The agent could not talk to Docker; no instance changes.",
    }
    schemas["Error"] = _strict(
        {
            "error": _strict(
                {
                    "code": {
                        "type": "string",
                        "description": "Stable, for programs (e.g. `toolbox_unreachable`).",
                    },
                    "message": {"type": "string", "description": "A sentence a user can act on."},
                    "details": {
                        "type": "object",
                        "description": "Context: the offending field, or the `server` as "
                        "recorded after a failed deploy or action.",
                    },
                }
            )
        },
        "Every refusal has this shape. supabase-js raises it as FunctionsHttpError; the body is on `error.context`.",
    )
    schemas.update(_view_schemas())
    refresh = {
        "type": "object",
        "description": "mcp_status?refresh=true: per toolbox id, what its DTMA said.",
        "additionalProperties": _strict(
            {
                "ok": {"type": "boolean"},
                "error": STRING,
                "containers": COUNT,
                "matched": COUNT,
                "transitions": COUNT,
            },
            optional=("error", "containers", "matched", "transitions"),
        ),
    }
    schemas["ServerList"] = _strict(
        {
            "servers": {"type": "array", "items": _ref("Server"), "maxItems": MAX_LIMIT},
            "next_cursor": _nullable({"type": "string", "description": "Pass back as `cursor` for the next page."}),
            "as_of": TIMESTAMP,
            "refresh": refresh,
        },
        optional=("refresh",),
    )
    schemas["Toolbox"] = _strict(
        {
            "id": UUID,
            "name": _nullable(STRING),
            "region": STRING,
            "status": STRING,
            "public_address": _nullable(STRING),
            "last_heartbeat_at": _nullable(TIMESTAMP),
            "heartbeat_age_seconds": _nullable(COUNT),
            "stale": {"type": "boolean", "description": "Same rule as a server's `stale`."},
            "docker_healthy": _nullable({"type": "boolean", "description": "null while the toolbox is silent."}),
            "dtma_version": _nullable(STRING),
            "agent_last_reached_at": _nullable(TIMESTAMP),
            "accepts_deploys": {"type": "boolean",
                                "description": "Whether deploy_mcp_server would accept this toolbox now."},
            "liveness": {"type": "string", "description": "A sentence: how lately it reported, what to check."},
            "server_count": COUNT,
            "created_at": TIMESTAMP,
        },
        "One of the caller's toolboxes (mcp_status/toolboxes).",
    )
    schemas["WatchAnswer"] = _strict(
        {
            # Items are Servers; not a $ref here, so that a wrong list page is reported against ServerList
            # (the closest anyOf branch) rather than tied between two lists of servers.
            "servers": {"type": "array", "items": {"type": "object"},
                        "description": "Server objects (as in ServerList): every server (snapshot) or those that "
                        "changed since `since`."},
            "removed": {"type": "array", "items": UUID, "description": "Ids of servers gone since `since`."},
            "cursor": {"type": "string", "description": "Pass back as `since` (opaque)."},
            "as_of": _nullable(TIMESTAMP),
            "snapshot": {"type": "boolean", "description": "true: `servers` is the whole list (no `since` given)."},
        },
        "mcp_status?watch=true as long-poll (docs/watch.md). With `Accept: text/event-stream` the same bodies "
        "arrive as Server-Sent Events `snapshot` and `changes`, then `end`.",
    )
    schemas["ToolboxList"] = _strict({"toolboxes": {"type": "array", "items": _ref("Toolbox")}, "as_of": TIMESTAMP})
    schemas["ServerOne"] = _strict(
        {"server": _ref("Server"), "as_of": TIMESTAMP, "refresh": refresh}, optional=("refresh",)
    )
    schemas["Removed"] = _strict(
        {
            "id": UUID,
            "name": STRING,
            "status": {"const": "removed"},
            "left_on_toolbox": _nullable(
                {"type": "string", "description": "What is still on the droplet and what to do about it."}
            ),
        },
        "The record is deleted; the container is gone from the toolbox unless left_on_toolbox says otherwise.",
    )
    schemas["SweepCounts"] = _strict(
        {
            "guard_tripped": {
                "type": "boolean",
                "description": "Too many toolboxes fell silent at once: none were marked (suspect the ingest path).",
            },
            "active_toolboxes": COUNT,
            "silent_toolboxes": COUNT,
            "recently_unresponsive": COUNT,
            "marked_unresponsive": COUNT,
            "instance_events": COUNT,
            "first_contact_failed": COUNT,
            "deadlines_failed": COUNT,
            "deadlines": {"type": "object", "additionalProperties": COUNT},
            "more": {"type": "boolean", "description": "A batch limit was hit; run again."},
            "commands_requeued": {**COUNT, "description": "Agent commands handed to the queue again."},
            "commands_waiting": {**COUNT, "description": "Commands to requeue that the queue did not take."},
            "commands_given_up": {**COUNT, "description": "Commands open for too long, failed with a reason."},
        }
    )
    schemas["CommandDelivery"] = _strict({"command_id": UUID}, "One task of the command queue.")
    schemas["CommandResult"] = {
        "type": "object",
        "description": "What happened to the command: `state` done, failed (the agent never answered), "
        "superseded (the server had moved on), gone; with the outcome recorded on the server.",
        "required": ["state"],
        "properties": {"state": {"type": "string", "enum": ["done", "failed", "superseded", "gone"]}},
    }
    return schemas


ERRORS: dict[str, str] = {
    "400": "The request is malformed (`invalid_json`, `invalid_request` naming the field, "
    "`invalid_heartbeat`, `invalid_idempotency_key`), or its body ended before its declared length "
    "(`incomplete_body`).",
    "401": "No valid token (`unauthenticated`); `WWW-Authenticate: Bearer`.",
    "403": "The token is valid but may not do this (`forbidden`).",
    "404": "Not found, or not the caller's (the same answer, so ids of others do not leak).",
    "405": "Method not allowed here; `Allow` lists the methods.",
    "409": "Conflicts with the current state: the state machine refuses the action (the message names the "
    "current status), a name or port is taken, the toolbox is not usable, an Idempotency-Key was reused "
    "with another body.",
    "410": "mcp_status?watch=true: the `since` cursor is older than the changes kept (`cursor_expired`); "
    "reconnect without `since` for a fresh snapshot.",
    "413": "The body is larger than MAX_BODY_BYTES (`payload_too_large`).",
    "415": "The body is not `application/json` (`unsupported_media_type`).",
    "422": "Unknown fields (`unknown_fields`, listed in `details.fields`): typos are never ignored.",
    "500": "An unexpected fault; the message quotes the request id.",
    "502": "The toolbox agent failed or refused (`toolbox_unreachable`, `toolbox_failed`, "
    "`image_pull_failed`, `container_exited`, ...); `details.server` is the record as it now stands.",
    "503": "The database or the signing keys are unreachable (`unavailable`), or this instance holds "
    "WATCH_MAX_PER_INSTANCE watchers (`too_many_watchers`); retry after `Retry-After` seconds.",
}


def _responses(ok: dict[str, Any], errors: Sequence[str]) -> dict[str, Any]:
    return {**ok, **{code: {"$ref": f"#/components/responses/E{code}"} for code in errors}}


def _body(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "description": description,
        "headers": {"X-Request-Id": {"$ref": "#/components/headers/RequestId"}},
        "content": {JSON: {"schema": schema}},
    }


def _preflight(function: str) -> dict[str, Any]:
    return {
        "summary": f"CORS preflight of {function}",
        "security": [],
        "tags": ["cors"],
        "description": "Answered before any authentication (a preflight carries no credentials). Allows "
        "`authorization, x-client-info, apikey, content-type`, and more, explicitly: a "
        "wildcard would not cover `authorization`.",
        "responses": {
            "204": {
                "description": "Allowed; Access-Control-Allow-* headers, no body and no "
                "Content-Type (supabase-js would try to parse it)."
            }
        },
    }


USER_ERRORS = ("400", "401", "403", "404", "405", "409", "413", "415", "422", "500", "502", "503")
IDEMPOTENCY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "minLength": 1, "maxLength": 255},
    "description": "Retries with the same key within "
    "IDEMPOTENCY_TTL_SECONDS get the first answer again (header `Idempotent-Replayed: true`), with no second "
    "DTMA call.",
}
ID_PATH = {"name": "id", "in": "path", "required": True, "schema": UUID}


def _paths() -> dict[str, Any]:
    accepted = {
        "202": _body(
            _ref("Server"),
            "Recorded and queued; the command worker records the outcome (`running`, or `error` with "
            "the agent's reason) the moment the agent answers. Poll mcp_status.",
        )
    }
    manage_ok = {
        "200": _body(
            {"anyOf": [_ref("Server"), _ref("Removed")]},
            "Done: the server (start/stop/restart) or the removal.",
        ),
        **accepted,
    }
    status_query = [
        {"name": "id", "in": "query", "schema": UUID, "description": "One server (answers ServerOne)."},
        {"name": "toolbox_id", "in": "query", "schema": UUID},
        {
            "name": "status",
            "in": "query",
            "schema": {"type": "string", "enum": [s.value for s in lifecycle.Status]},
            "description": "Stored status.",
        },
        {
            "name": "limit",
            "in": "query",
            "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": 50},
        },
        {
            "name": "cursor",
            "in": "query",
            "schema": STRING,
            "description": "`next_cursor` of the previous page.",
        },
        {
            "name": "refresh",
            "in": "query",
            "schema": {"type": "boolean", "default": False},
            "description": "Also ask each toolbox's DTMA (GET /tools/status) and apply what it says.",
        },
        {
            "name": "watch",
            "in": "query",
            "schema": {"type": "boolean", "default": False},
            "description": "Watch the servers (docs/watch.md): Server-Sent Events with `Accept: text/event-stream`, "
            "else long-poll (answers WatchAnswer).",
        },
        {"name": "since", "in": "query", "schema": STRING,
         "description": "watch=true: the `cursor` of the previous watch answer or event; 410 when too old."},
        {"name": "timeout", "in": "query", "schema": {"type": "number", "minimum": 0, "default": 25},
         "description": "watch=true long-poll: seconds to wait for a change (at most WATCH_MAX_SECONDS)."},
    ]
    status_ok = {
        "200": _body(
            {"anyOf": [_ref("ServerList"), _ref("ServerOne"), _ref("WatchAnswer")]},
            "A page of servers, one server when `id` is given, or a watch answer (watch=true).",
        )
    }
    status_ok["200"]["content"]["text/event-stream"] = {
        "schema": {"type": "string", "description": "watch=true with Accept: text/event-stream (docs/watch.md)."}}
    status_errors = ("400", "401", "404", "405", "410", "413", "415", "422", "500", "503")
    heartbeat = {
        "summary": "A DTMA agent's heartbeat",
        "tags": ["agents"],
        "security": [{"toolboxToken": []}],
        "description": "Authenticated by the toolbox's token (only its SHA-256 is stored). Applies to that "
        "toolbox only, in one database round trip. The agent posts to `<base>/heartbeat`; any "
        "path below the function is accepted.",
        "requestBody": {"required": True, "content": {JSON: {"schema": _ref("Heartbeat")}}},
        "responses": _responses(
            {"204": {"description": "Applied (or a duplicate, ignored). No body."}},
            ("400", "401", "405", "409", "413", "415", "500", "503"),
        ),
    }
    return {
        "/deploy_mcp_server": {
            "post": {
                "summary": "Deploy an MCP server onto one of the caller's toolboxes",
                "tags": ["servers"],
                "operationId": "deployMcpServer",
                "parameters": [IDEMPOTENCY],
                "description": "Records the server and its deploy command, queues the command and answers 202 "
                "at once; the command worker holds the toolbox agent's synchronous `POST /tools` as long as "
                "the pull takes and records `running`, or `error` with the agent's reason, the moment it "
                "answers.",
                "requestBody": {"required": True, "content": {JSON: {"schema": {
                    "oneOf": [_ref("DeployRequest"), _ref("PlanDeployRequest")]}}}},
                "responses": _responses(accepted, USER_ERRORS),
            },
            "options": _preflight("deploy_mcp_server"),
        },
        "/manage_mcp_server": {
            "post": {
                "summary": "Start, stop, restart or remove a server (body form, for functions.invoke)",
                "tags": ["servers"],
                "operationId": "manageMcpServer",
                "parameters": [IDEMPOTENCY],
                "requestBody": {"required": True, "content": {JSON: {"schema": _ref("ActionRequest")}}},
                "responses": _responses(manage_ok, USER_ERRORS),
            },
            "options": _preflight("manage_mcp_server"),
        },
        "/manage_mcp_server/{id}/{action}": {
            "post": {
                "summary": "Start, stop or restart a server",
                "tags": ["servers"],
                "operationId": "actOnMcpServer",
                "parameters": [
                    ID_PATH,
                    {
                        "name": "action",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "enum": ["start", "stop", "restart", "remove"]},
                    },
                    IDEMPOTENCY,
                ],
                "responses": _responses(manage_ok, USER_ERRORS),
            }
        },
        "/manage_mcp_server/{id}": {
            "delete": {
                "summary": "Remove a server (container removed from the toolbox, record deleted)",
                "tags": ["servers"],
                "operationId": "removeMcpServer",
                "parameters": [
                    ID_PATH,
                    IDEMPOTENCY,
                    {
                        "name": "force",
                        "in": "query",
                        "required": False,
                        "description": "`true`: delete the record without asking the toolbox (its droplet is "
                        "unreachable or gone); whatever ran there is left as it was.",
                        "schema": {"type": "string", "enum": ["true", "false"]},
                    },
                ],
                "responses": _responses(manage_ok, USER_ERRORS),
            }
        },
        "/mcp_status": {
            "get": {
                "summary": "The caller's MCP servers with effective status, health and progress",
                "tags": ["servers"],
                "operationId": "listMcpServers",
                "parameters": status_query,
                "responses": _responses(status_ok, status_errors),
            },
            "post": {
                "summary": "The same, parameters in a JSON body (what supabase.functions.invoke sends)",
                "tags": ["servers"],
                "operationId": "queryMcpServers",
                "requestBody": {"required": False, "content": {JSON: {"schema": _ref("StatusRequest")}}},
                "responses": _responses(status_ok, status_errors),
            },
            "options": _preflight("mcp_status"),
        },
        "/mcp_status/{id}": {
            "get": {
                "summary": "One server",
                "tags": ["servers"],
                "operationId": "getMcpServer",
                "parameters": [ID_PATH],
                "responses": _responses({"200": _body(_ref("ServerOne"), "The server.")}, status_errors),
            }
        },
        "/mcp_status/toolboxes": {
            "get": {
                "summary": "The caller's toolboxes: liveness, Docker health, whether they accept deploys",
                "tags": ["servers"],
                "operationId": "listToolboxes",
                "responses": _responses({"200": _body(_ref("ToolboxList"), "The toolboxes.")}, status_errors),
            },
            "post": {
                "summary": "The same (what supabase.functions.invoke('mcp_status/toolboxes') sends)",
                "tags": ["servers"],
                "operationId": "queryToolboxes",
                "responses": _responses({"200": _body(_ref("ToolboxList"), "The toolboxes.")}, status_errors),
            },
        },
        "/mcp_status_sweep": {
            "post": {
                "summary": "One sweep: silent toolboxes -> unresponsive, overdue transitions -> error",
                "tags": ["operations"],
                "operationId": "sweep",
                "security": [{"cloudRunIam": []}],
                "description": "Called by Cloud Scheduler with an OIDC token; deployed without public "
                "access (Cloud Run's IAM check), and the function verifies the token again itself: Google's "
                "signature, issuer, audience = its own URL, the scheduler's service account (locally: the "
                "emulator's key, with `--sweep-oidc`). The body is ignored. Idempotent and safe when two run "
                "at once.",
                "responses": _responses(
                    {"200": _body(_ref("SweepCounts"), "What the sweep changed.")}, ("401", "405", "500", "503")
                ),
            }
        },
        "/dtma_heartbeat_ingest": {
            "post": {**heartbeat, "operationId": "ingestHeartbeatAtRoot"},
            "options": _preflight("dtma_heartbeat_ingest"),
        },
        "/dtma_heartbeat_ingest/heartbeat": {"post": {**heartbeat, "operationId": "ingestHeartbeat"}},
        "/dtma_command_worker": {
            "post": {
                "summary": "Run one agent command (deploy, start, stop, restart, remove) and record its outcome",
                "tags": ["operations"],
                "operationId": "runCommand",
                "security": [{"cloudRunIam": []}],
                "description": "Called by Cloud Tasks (the local stack's emulator locally) with an OIDC token; "
                "deployed without public access, and the function verifies the token again itself (Google's "
                "signature, issuer, audience = its own URL, the queue's service account). 200 when the delivery "
                "needs no repeat (a duplicate of a finished command included); 429 with Retry-After when the "
                "command must wait (an earlier command of the same server is open, or the toolbox runs its "
                "maximum of commands), so the queue delivers it again.",
                "requestBody": {"required": True, "content": {JSON: {"schema": _ref("CommandDelivery")}}},
                "responses": _responses(
                    {
                        "200": _body(_ref("CommandResult"), "The delivery is complete."),
                        "429": {"description": "Not now; delivered again later.",
                                "content": {JSON: {"schema": _ref("Error")}}},
                    },
                    ("400", "401", "405", "500", "503"),
                ),
            }
        },
    }


def build() -> dict[str, Any]:
    """The whole document."""
    error_body = {
        "content": {JSON: {"schema": _ref("Error")}},
        "headers": {"X-Request-Id": {"$ref": "#/components/headers/RequestId"}},
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "MCP control plane functions",
            "version": "1.0.0",
            "summary": "Deploy MCP servers onto Agentopia toolboxes through their DTMA agent, and read their "
            "real status.",
            "description": "Five HTTP functions (Google Cloud Run functions in production). The web app "
            "calls them with the user's Supabase access token, like Supabase Edge Functions "
            "(`supabase.functions.invoke(name, {body})` sends POST with JSON). The local stack "
            "(`./deploy.sh local`) serves all of them on one port under `/functions/v1/<name>` and "
            "`/<name>`, and this document at `/openapi.json`.",
        },
        "servers": [
            {
                "url": "{base}/functions/v1",
                "description": "Supabase-style routing (the local stack)",
                "variables": {"base": {"default": "http://127.0.0.1:54321"}},
            },
            {
                "url": "{base}",
                "description": "The local stack's bare mount (`/<name>`)",
                "variables": {"base": {"default": "http://127.0.0.1:54321"}},
            },
            {
                "url": "https://{region}-{project}.cloudfunctions.net",
                "description": "Google Cloud: each function at its own URL; deploy.sh names them in "
                "kebab-case (`deploy-mcp-server`), which the local stack also accepts.",
                "variables": {"region": {"default": "us-central1"}, "project": {"default": "my-project"}},
            },
        ],
        "security": [{"userJwt": []}],
        "tags": [
            {"name": "servers", "description": "Called by the web app with the user's JWT."},
            {"name": "agents", "description": "Called by DTMA agents on the toolboxes."},
            {"name": "operations", "description": "Called by Cloud Scheduler."},
            {"name": "cors", "description": "Browser preflights."},
        ],
        "paths": _paths(),
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {
                "userJwt": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "The Supabase user access token (HS256 project secret or the "
                    "project's JWKS keys). `apikey` and `x-client-info` are accepted and "
                    "ignored.",
                },
                "toolboxToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The toolbox's DTMA token (DTMA_AUTH_TOKEN on the droplet).",
                },
                "cloudRunIam": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "Google OIDC ID token",
                    "description": "Checked by Cloud Run IAM before the function runs (invoker role).",
                },
            },
            "headers": {
                "RequestId": {
                    "description": "The request's id (echoed from `X-Request-Id` when given); "
                    "quote it when reporting a problem.",
                    "schema": STRING,
                }
            },
            "responses": {f"E{code}": {"description": text, **error_body} for code, text in ERRORS.items()},
        },
    }


# --- checking answers against the document -----------------------------------------------------

DOCUMENT_URI = "urn:mcp-control-plane:openapi"  # where `#/components/...` of the document resolve


class SchemaMismatch(ValueError):
    """The answer is not what the document says; the message names each JSON path and rule."""


def _pointer(*parts: str | int) -> str:
    """A JSON pointer into the document (RFC 6901: `~` -> `~0`, `/` -> `~1`)."""
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in parts)


def _problem(error: ValidationError) -> str:
    """Where and why, from the most specific cause (inside anyOf/oneOf, the branch that came closest)."""
    cause = best_match([error]) if error.context else error
    shown, message = repr(cause.instance), cause.message
    if len(shown) > 60:  # jsonschema quotes the whole value: a server, a page of them
        message = message.replace(shown, shown[:57] + "...")
    text = f"{cause.json_path}: {message}"
    return text if len(text) <= 300 else text[:297] + "..."


def _registry(spec: Mapping[str, Any]) -> Registry:
    """The document as the one resource `$ref`s resolve in."""
    return Registry().with_resource(DOCUMENT_URI, Resource(contents=spec, specification=DRAFT202012))


def validate(instance: Any, ref: str, spec: Mapping[str, Any]) -> None:
    """Raise SchemaMismatch unless `instance` matches the schema at `ref` (`#/components/schemas/Error`, ...) of
    the OpenAPI document `spec`.

    Draft 2020-12 with every keyword it asserts: `additionalProperties: false` refuses undocumented
    fields, `required` missing ones, and a null is accepted only where the schema allows `null`.
    `format` is an annotation, as the specification says by default (not checked).
    """
    if not ref.startswith("#/"):
        raise SchemaMismatch(f"only references into the document are supported, not {ref}")
    validator = Draft202012Validator({"$ref": DOCUMENT_URI + ref}, registry=_registry(spec))
    problems = sorted(validator.iter_errors(instance), key=lambda error: list(error.path))
    if problems:
        raise SchemaMismatch("; ".join(_problem(error) for error in problems[:10]))


def _response_ref(spec: Mapping[str, Any], path: str, method: str, status: int) -> str | None:
    """Where in `spec` the schema of this answer is; None when the document gives it no body.

    Raises SchemaMismatch when the document does not list the path, method or status at all.
    """
    operation = spec.get("paths", {}).get(path, {}).get(method.lower())
    if operation is None:
        raise SchemaMismatch(f"{method.upper()} {path} is not documented")
    responses = operation.get("responses", {})
    code = next((key for key in (str(status), f"{str(status)[0]}XX", "default") if key in responses), None)
    if code is None:
        raise SchemaMismatch(f"{method.upper()} {path} does not document status {status}")
    where, response = _pointer("paths", path, method.lower(), "responses", code), responses[code]
    if "$ref" in response:  # `#/components/responses/E404`
        where = response["$ref"].removeprefix("#")
        response = _registry(spec).resolver().lookup(DOCUMENT_URI + response["$ref"]).contents
    if "schema" not in response.get("content", {}).get(JSON, {}):
        return None
    return "#" + where + _pointer("content", JSON, "schema")


def check_response(spec: Mapping[str, Any], path: str, method: str, status: int, body: Any) -> None:
    """Raise SchemaMismatch unless `body` is what the document says `method path` answers with `status`."""
    ref = _response_ref(spec, path, method, status)
    if ref is None:
        if body not in (None, b"", ""):
            raise SchemaMismatch(f"{method.upper()} {path} -> {status} documents no body, got {str(body)[:60]!r}")
        return
    try:
        validate(body, ref, spec)
    except SchemaMismatch as exc:
        raise SchemaMismatch(f"{method.upper()} {path} -> {status}: {exc}") from None


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.openapi", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file differs from the generated one")
    parser.add_argument("--out", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text() if args.out.is_file() else ""
        if current != text:
            print(f"{args.out} is out of date: run python -m devstack.openapi", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
