"""The one definition of a server as the API answers it (deploy, manage and mcp_status).

`shared.view.server_json` builds a `ServerView` and dumps it; `devstack.openapi` generates the
document's `Server`, `ToolboxSummary` and `Progress` schemas from these classes, so the answer and
its description cannot drift apart. The values come straight from `cp_list_mcp_servers` (jsonb),
so timestamps and ids are kept as the strings PostgreSQL wrote; their types here only say how the
document describes them (`format: date-time`, `format: uuid`).

Built on the `mcp_status` hot path with `model_construct` (no validation: the database and
`shared.view` already decided every value); the tests check real answers against the generated
document instead.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from shared import lifecycle

Uuid = Annotated[str, WithJsonSchema({"type": "string", "format": "uuid"})]
Timestamp = Annotated[str, WithJsonSchema({"type": "string", "format": "date-time"})]
Count = Annotated[int, Field(ge=0)]

HEALTH = ("healthy", "degraded", "unhealthy", "unknown")
TRANSPORTS = ("stdio", "sse", "streamable_http")


def _one_of(values: Any) -> Any:
    """A string restricted to `values` in the document (kept a plain str at run time)."""
    return WithJsonSchema({"type": "string", "enum": [str(v) for v in values]})


class _View(BaseModel):
    # Every field is required (no defaults) and nothing else may appear: additionalProperties false.
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProgressEvent(_View):
    """One recorded status change of the server."""

    at: Timestamp = Field(description="When it was recorded.")
    from_: str | None = Field(alias="from", description="The stored status before; null for the first event.")
    to: str = Field(description="The stored status after.")
    message: str = Field(description="What happened, in words.")
    source: Annotated[str, _one_of(lifecycle.Source)] = Field(
        description="Who recorded it: this API, a heartbeat, the sweep, or a direct read of the agent.")


class ToolboxSummary(_View):
    """The toolbox (droplet) the server runs on, and how recently its agent was heard from."""

    id: Uuid
    name: str | None
    region: str | None = Field(description="The droplet's region slug.")
    status: str = Field(description="Stored toolbox status (`active`, `unresponsive`, ...).")
    last_heartbeat_at: Timestamp | None = Field(description="When its agent's last heartbeat arrived.")
    seconds_since_heartbeat: Count | None = Field(description="Age of that heartbeat (database clock).")
    docker_healthy: bool = Field(description="False when the toolbox's agent last said it cannot reach Docker.")
    agent_last_reached_at: Timestamp | None = Field(
        description="Last direct read of the agent that it answered (refresh=true).")


class ServerView(_View):
    """One MCP server as the web app shows it."""

    id: Uuid
    name: str = Field(description="Container name on the toolbox.")
    toolbox: ToolboxSummary
    status: str = Field(description="Stored status: " + ", ".join(s.value for s in lifecycle.Status))
    effective_status: Annotated[str, _one_of(lifecycle.Effective)] = Field(
        description="What to show: `unknown` whenever the toolbox is silent or not active, whatever is stored.")
    health: Annotated[str, _one_of(HEALTH)] = Field(
        description="From the reported state and the heartbeat's age.")
    stale: bool = Field(description="Nothing recent from the toolbox: its last heartbeat (and direct read) is "
                        "older than the threshold.")
    managed_by_agent: bool = Field(
        description="False once the toolbox agent no longer manages the container (it restarted and forgot it): "
        "start/stop are refused, removal removes the record only.")
    endpoint: str | None = Field(description="http://<toolbox ip>:<host port><path>: the MCP server itself, not "
                                 "the agent's port.")
    transport: Annotated[str, _one_of(TRANSPORTS)] | None = Field(description="The MCP transport.")
    image: str | None = Field(description="The Docker image reference.")
    error: str | None = Field(description="Why it failed or why it is unknown, actionable.")
    progress: list[ProgressEvent] = Field(max_length=5, description="The last events, oldest first.")
    uptime_seconds: Count | None = Field(description="Since it was recorded entering `running`; null otherwise.")
    status_changed_at: Timestamp = Field(description="When the stored status last changed.")
    last_report_at: Timestamp | None = Field(description="When a report of the agent last covered it.")
    host_port: int | None = Field(description="The port published on the toolbox.")
    container_port: int | None = Field(description="The port the MCP server listens on inside its container.")
    capabilities: list[str] | None
    discovery_metadata: dict[str, Any] | None
    created_at: Timestamp
    updated_at: Timestamp
