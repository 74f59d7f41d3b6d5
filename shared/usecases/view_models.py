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

from pydantic import ConfigDict, Field, WithJsonSchema, with_config
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


def _one_of(values: Any) -> Any:
    """A string the document restricts to `values` (a plain str at run time)."""
    return WithJsonSchema({"type": "string", "enum": [str(v) for v in values]})


def _says(text: str) -> Any:
    return Field(description=text)


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
class ServerView(TypedDict):
    """One MCP server as the web app shows it."""

    id: Uuid
    name: Annotated[str, _says("Container name on the toolbox.")]
    toolbox: ToolboxSummary
    status: Annotated[str, _says("Stored status: " + ", ".join(s.value for s in lifecycle.Status))]
    effective_status: Annotated[str, _one_of(lifecycle.Effective), _says(
        "What to show: `unknown` whenever the toolbox is silent or not active, whatever is stored.")]
    health: Annotated[str, _one_of(HEALTH), _says("From the reported state and the heartbeat's age.")]
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
    error: Annotated[str | None, _says("Why it failed or why it is unknown, actionable.")]
    progress: Annotated[list[ProgressEvent], Field(max_length=MAX_PROGRESS),
                        _says("The last events, oldest first.")]
    uptime_seconds: Annotated[Count | None, _says("Since it was recorded entering `running`; null otherwise.")]
    status_changed_at: Annotated[Timestamp, _says("When the stored status last changed.")]
    last_report_at: Annotated[Timestamp | None, _says("When a report of its agent last covered it.")]
    host_port: Annotated[int | None, _says("The port published on the toolbox.")]
    container_port: Annotated[int | None, _says("The port it listens on inside its container.")]
    capabilities: list[str] | None
    discovery_metadata: dict[str, Any] | None
    created_at: Timestamp
    updated_at: Timestamp
