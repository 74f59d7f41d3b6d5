"""The one definition of a server as the API answers it (deploy, manage and mcp_status).

`shared.usecases.view.server_json` builds a `ServerView`; `devstack.openapi` generates the document's
`Server`, `ToolboxSummary` and `Progress` schemas from these types (a pydantic TypeAdapter), so the
answer and its description cannot drift apart, and the tests check real answers against that
document.

TypedDicts, not pydantic models: `mcp_status` renders up to 100 servers per call, and a model
would cost 3.4 times what building the dict does when validated and dumped, 6 times with
`model_construct` (0.72 ms for 100 servers, against 2.5 and 4.5 ms). The values are already
decided by the database and `shared.usecases.view`; validating them again would only turn a surprise into a
500.

The values come straight from `cp_list_mcp_servers` (jsonb), so timestamps and ids stay the
strings PostgreSQL wrote; `Uuid` and `Timestamp` only say how the document describes them.
Every key is required (null where the type says so) and no other key is allowed.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import ConfigDict, Field, GetJsonSchemaHandler, WithJsonSchema, with_config
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema
from typing_extensions import TypedDict  # pydantic reads TypedDicts from typing_extensions before Python 3.12

from shared.core import lifecycle

_CLOSED = ConfigDict(extra="forbid")  # additionalProperties: false

Uuid = Annotated[str, WithJsonSchema({"type": "string", "format": "uuid"})]
Timestamp = Annotated[str, WithJsonSchema({"type": "string", "format": "date-time"})]
Count = Annotated[int, Field(ge=0)]

HEALTH = ("healthy", "degraded", "unhealthy", "unknown")
TRANSPORTS = ("stdio", "sse", "streamable_http")
PUBLISH = ("public", "private", "loopback")  # shared/core/models.py DeployRequest.publish
MAX_PROGRESS = 5  # cp_list_mcp_servers keeps the last five events
# What an MCP server's own answer may put in ours (shared/usecases/mcp_health.py cuts it to these): it is
# the server's text, returned as JSON strings and never rendered as HTML by this service.
MAX_TOOL_NAME = 128  # the MCP specification's limit for a tool name
MAX_TOOL_DESCRIPTION = 1024
MAX_SERVER_TEXT = 200  # server name, version, protocol version
MAX_SENTENCE = 600


def _one_of(values: Any) -> Any:
    """A string the document restricts to `values` (a plain str at run time)."""
    return WithJsonSchema({"type": "string", "enum": [str(v) for v in values]})


def _says(text: str) -> Any:
    return Field(description=text)


class _Inline:
    """Annotation: the type's schema written out in place, not as a component of its own (the document
    names only `Server`, `ToolboxSummary` and `Progress`, devstack/openapi.py VIEW_COMPONENTS). Only the
    document's generation runs this."""

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        def resolve(node: Any) -> Any:
            if isinstance(node, list):
                return [resolve(item) for item in node]
            if not isinstance(node, dict):
                return node
            if "$ref" in node:
                target = handler.resolve_ref_schema({"$ref": node["$ref"]})
                return {**resolve(target), **{k: resolve(v) for k, v in node.items() if k != "$ref"}}
            return {key: resolve(value) for key, value in node.items()}

        return resolve(handler(schema))


_INLINE = _Inline()


# `from` is a Python keyword, hence the functional form.
ProgressEvent = TypedDict("ProgressEvent", {
    "at": Annotated[Timestamp, _says("When it was recorded.")],
    "from": Annotated[str | None, _says("The stored status before; null for the first event.")],
    "to": Annotated[str, _says("The stored status after.")],
    "message": Annotated[str, _says("What happened, in words.")],
    "source": Annotated[str, _one_of(lifecycle.Source),
                        _says("Who recorded it: this API, a heartbeat, the sweep, or a direct read of the agent.")],
})
ProgressEvent.__doc__ = "One recorded status change of the server."
with_config(_CLOSED)(ProgressEvent)


@with_config(_CLOSED)
class ToolboxSummary(TypedDict):
    """The toolbox (droplet) the server runs on, and how recently its agent was heard from."""

    id: Uuid
    name: str | None
    region: Annotated[str | None, _says("The droplet's region slug.")]
    status: Annotated[str, _says("Stored toolbox status (`active`, `unresponsive`, ...).")]
    last_heartbeat_at: Annotated[Timestamp | None, _says("When its agent's last heartbeat arrived.")]
    seconds_since_heartbeat: Annotated[Count | None, _says("The age of that heartbeat, in whole seconds.")]
    docker_healthy: Annotated[bool, _says("False when the toolbox's agent last said it cannot reach Docker.")]
    agent_last_reached_at: Annotated[Timestamp | None,
                                     _says("Last direct read of the agent that it answered (refresh=true).")]


@with_config(_CLOSED)
class McpServerInfo(TypedDict):
    """What the MCP server said it is in its `initialize` answer."""

    name: Annotated[str | None, Field(max_length=MAX_SERVER_TEXT)]
    version: Annotated[str | None, Field(max_length=MAX_SERVER_TEXT)]


@with_config(_CLOSED)
class McpCheck(TypedDict):
    """Whether the server's MCP endpoint answers the MCP handshake (initialize, then tools/list)."""

    ready: Annotated[bool | None, _says(
        "true: the endpoint answered the handshake at `checked_at`, in the container's current run; false: it did "
        "not (`error` says why; health is then `degraded`); null: not checked (`error` says why: not checked yet, "
        "not running, stdio, or published where the backend cannot reach it).")]
    checked_at: Annotated[Timestamp | None, _says("When that check was recorded; null when `ready` is null.")]
    endpoint: Annotated[str | None, _says("The URL checked (or that would be).")]
    protocol_version: Annotated[str | None, Field(max_length=MAX_SERVER_TEXT),
                                _says("The MCP protocol version the server agreed to.")]
    server: McpServerInfo
    tool_count: Annotated[Count | None, _says(
        "How many tools its tools/list offered (at most 256 are read); null unless ready.")]
    error: Annotated[str | None, Field(max_length=MAX_SENTENCE), _says(
        "Why it is not ready or not checked, a sentence; null when ready.")]


@with_config(_CLOSED)
class McpTool(TypedDict):
    """One tool the server offers (its tools/list answer), as data: shown as text, never as HTML."""

    name: Annotated[str, Field(max_length=MAX_TOOL_NAME)]
    description: Annotated[str | None, Field(max_length=MAX_TOOL_DESCRIPTION), _says(
        f"Cut to {MAX_TOOL_DESCRIPTION} characters.")]
    input_schema: Annotated[dict[str, Any] | None, _says(
        "The JSON Schema of its arguments, as the server gave it (`{\"type\": \"object\", \"x-truncated\": true}` "
        "when it was too large to keep); null when it gave none.")]


@with_config(_CLOSED)
class ServerView(TypedDict):
    """One MCP server as the web app shows it."""

    id: Uuid
    name: Annotated[str, _says("Container name on the toolbox.")]
    toolbox: ToolboxSummary
    status: Annotated[str, _says("Stored status: " + ", ".join(s.value for s in lifecycle.Status))]
    effective_status: Annotated[str, _one_of(lifecycle.Effective), _says(
        "What to show: `unknown` whenever the toolbox is silent or not active, whatever is stored.")]
    health: Annotated[str, _one_of(HEALTH), _says(
        "From the reported state, the heartbeat's age and whether the MCP endpoint answers (`mcp`): a running "
        "server is `healthy` only while it does, `degraded` when it does not, `unknown` until it was checked; one "
        "the backend cannot reach (stdio, published on loopback or a private address) from Docker's state alone.")]
    stale: Annotated[bool, _says("Nothing recent from the toolbox: its last heartbeat (and direct read) is older "
                                 "than the threshold.")]
    managed_by_agent: Annotated[bool, _says(
        "False once the toolbox agent no longer manages the container (it restarted and forgot it): start/stop "
        "are refused, removal removes the record only.")]
    endpoint: Annotated[str | None, _says(
        "http://<address>:<host port><path>: the MCP server itself, not the agent's port, on the address it is "
        "published on (the toolbox's public IP for `public`, 127.0.0.1 for `loopback`: reachable from the droplet "
        "only, see `reachable_from`).")]
    publish: Annotated[str, _one_of(PUBLISH), _says(
        "Where Docker publishes the host port on the droplet, as chosen at deploy: `public` (every address; "
        "unauthenticated unless a cloud firewall limits the port), `loopback` (127.0.0.1), `private` (its VPC "
        "address).")]
    reachable_from: Annotated[str, _says("Who can reach the endpoint, in words, and what to do about it.")]
    # Never null: the database requires a transport of every MCP server.
    transport: Annotated[str, _one_of(TRANSPORTS), _says("The MCP transport the server speaks.")]
    image: Annotated[str | None, _says("The Docker image reference.")]
    error: Annotated[str | None, _says("Why it failed, why it is unknown or degraded, actionable.")]
    mcp: Annotated[McpCheck, _INLINE, _says(
        "Whether its MCP endpoint answers the MCP handshake, as the backend last checked it (docs/api.md).")]
    tools: Annotated[list[McpTool] | None, _INLINE, _says(
        "The tools of its last successful check (empty unless `mcp.ready`), on answers about one server "
        "(mcp_status/<id>, deploy, manage); null in lists: read the server by id.")]
    progress: Annotated[list[ProgressEvent], Field(max_length=MAX_PROGRESS),
                        _says("The last events, oldest first.")]
    uptime_seconds: Annotated[Count | None, _says("Since it was recorded entering `running`; null otherwise.")]
    status_changed_at: Annotated[Timestamp, _says("When the stored status last changed.")]
    last_report_at: Annotated[Timestamp | None, _says(
        "When a heartbeat last changed what is recorded of it. A toolbox whose report is unchanged since the "
        "previous beat only refreshes its own `last_heartbeat_at`, so this can be older than that.")]
    host_port: Annotated[int | None, _says("The port published on the toolbox.")]
    container_port: Annotated[int | None, _says("The port it listens on inside its container.")]
    capabilities: list[str] | None
    discovery_metadata: dict[str, Any] | None
    created_at: Timestamp
    updated_at: Timestamp
