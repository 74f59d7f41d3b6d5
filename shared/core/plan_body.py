"""The plan's deploy body, the second shape `deploy_mcp_server` accepts, mapped onto the flat request.

Agentopia's MCP integration plan has the web app's `MCPService.deployServer` call
`ToolInstanceService.deployToolToToolbox` with

    {"accountToolEnvironmentId": "<toolbox id>",
     "toolCatalogId": "00000000-0000-0000-0000-000000000001",
     "instanceNameOnToolbox": "Weather API Server",
     "baseConfigOverrideJson": {"mcpConfig": {"dockerImage": "...", "transport": "http", "port": 8080,
                                              "environmentVariables": {...}, "capabilities": [...],
                                              "discoveryMetadata": {...}}}}

(docs/api.md "The plan's body"). A body with `baseConfigOverrideJson` is that shape; every other
body is the flat request (shared/core/models.py DeployRequest), as strict as before.

Mapping: `accountToolEnvironmentId` -> toolbox_id; `instanceNameOnToolbox` is what the person
typed, so the container name is derived from it (shared/core/names.py) and the text itself is kept
as `display_name`; `mcpConfig.dockerImage` -> image, `transport` -> transport ("http" is MCP's
streamable HTTP), `port` -> container_port, `hostPort` -> host_port, `endpoint` -> endpoint_path,
`environmentVariables` -> env, `capabilities` -> capabilities, `publish` -> publish;
`discoveryMetadata` is kept as given (a bounded JSON object). The field rules are the flat
request's own (image reference, env names, ports), checked by validating the mapped request, and a
problem is reported under the plan's name for the field (`baseConfigOverrideJson.mcpConfig.port`).

Refused: a body mixing both shapes (400: which fields of each); a `toolCatalogId` other than the
generic MCP catalog entry (400: this service deploys MCP servers, whose image is `dockerImage`); a
`userId` other than the caller's (400: the token says who deploys); unknown fields (422, as the flat
request).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.core.errors import ApiError, from_validation, invalid
from shared.core.models import DeployRequest, LaxUUID, parse
from shared.core.names import container_name

PLAN_MARKER = "baseConfigOverrideJson"
# The generic MCP catalog row every MCP server instance points at (sql/migrations/0002_tables.sql).
GENERIC_MCP_CATALOG_ID = UUID("00000000-0000-0000-0000-000000000001")
MAX_DISPLAY_NAME = 255
MAX_DISCOVERY_METADATA = 16 * 1024  # bytes of compact JSON
# The plan's transport names; "http" is MCP's streamable HTTP transport.
TRANSPORTS = {"http": "streamable_http", "streamable_http": "streamable_http", "streamable-http": "streamable_http",
              "sse": "sse", "stdio": "stdio"}

# Where each flat field comes from in the plan's body, to report problems under the name the web app sent.
_MCP = f"{PLAN_MARKER}.mcpConfig"
PLAN_PATHS = {"toolbox_id": "accountToolEnvironmentId", "name": "instanceNameOnToolbox",
              "catalog_id": "toolCatalogId", "image": f"{_MCP}.dockerImage", "transport": f"{_MCP}.transport",
              "container_port": f"{_MCP}.port", "host_port": f"{_MCP}.hostPort", "endpoint_path": f"{_MCP}.endpoint",
              "env": f"{_MCP}.environmentVariables", "capabilities": f"{_MCP}.capabilities",
              "publish": f"{_MCP}.publish"}
_PLAN_TOP_LEVEL = {"accountToolEnvironmentId", "toolCatalogId", "instanceNameOnToolbox", PLAN_MARKER, "userId"}


class _Plan(BaseModel):
    """Strict like the flat request: unknown fields are refused and types are not coerced."""

    model_config = ConfigDict(extra="forbid", strict=True)


class McpConfig(_Plan):
    """`baseConfigOverrideJson.mcpConfig`: the plan's `MCPDeploymentConfig.configuration`."""

    docker_image: str | None = Field(default=None, alias="dockerImage")
    transport: Literal["http", "streamable_http", "streamable-http", "sse", "stdio"] | None = None
    port: int | None = None
    host_port: int | None = Field(default=None, alias="hostPort")
    endpoint: str | None = None
    environment_variables: dict[str, str] | None = Field(default=None, alias="environmentVariables")
    capabilities: list[str] | None = None
    discovery_metadata: dict[str, Any] | None = Field(default=None, alias="discoveryMetadata")
    publish: str | None = None


class BaseConfigOverride(_Plan):
    mcp_config: McpConfig = Field(default_factory=McpConfig, alias="mcpConfig")


class PlanDeployBody(_Plan):
    account_tool_environment_id: LaxUUID = Field(alias="accountToolEnvironmentId")
    tool_catalog_id: LaxUUID = Field(default=GENERIC_MCP_CATALOG_ID, alias="toolCatalogId")
    instance_name_on_toolbox: Annotated[str, Field(min_length=1, max_length=MAX_DISPLAY_NAME)] = Field(
        alias="instanceNameOnToolbox")
    base_config_override_json: BaseConfigOverride = Field(alias=PLAN_MARKER)
    # deployToolToToolbox's argument object carries the caller's id; the token decides who deploys.
    user_id: LaxUUID | None = Field(default=None, alias="userId")


@dataclass(frozen=True)
class Deploy:
    """A deploy request whichever shape it came in: the flat request, and what only the plan carries."""

    request: DeployRequest
    display_name: str | None = None
    discovery_metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> str:
        return "plan" if self.display_name is not None else "flat"


def is_plan_body(body: Any) -> bool:
    return isinstance(body, dict) and PLAN_MARKER in body


def _check_one_shape(body: dict[str, Any]) -> None:
    flat_only = sorted(k for k in body if k not in _PLAN_TOP_LEVEL and k in _FLAT_FIELDS)
    if flat_only:
        raise ApiError(400, "mixed_shapes",
                       f"the body mixes the plan's shape ({PLAN_MARKER}) with the flat request's field(s) "
                       f"{', '.join(flat_only)}: send the plan's body with everything under {_MCP}, or the flat "
                       f"request without {PLAN_MARKER}",
                       {"fields": flat_only, "field": PLAN_MARKER})


def _flat_fields() -> frozenset[str]:
    names: set[str] = set()
    for name, info in DeployRequest.model_fields.items():
        names.add(name)
        alias = info.validation_alias
        names.update(getattr(alias, "choices", []) if alias is not None else [])
    return frozenset(n for n in names if isinstance(n, str))


_FLAT_FIELDS = _flat_fields()


def _plan_location(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """A location in the mapped flat request, as the path of the plan's field it came from."""
    if not loc or loc[0] not in PLAN_PATHS:
        return loc
    return (PLAN_PATHS[loc[0]], *loc[1:])


def _unknown(exc: ValidationError) -> None:
    unknown = [".".join(str(p) for p in e["loc"]) for e in exc.errors() if e["type"] == "extra_forbidden"]
    if unknown:
        raise ApiError(422, "unknown_fields", f"unknown field(s): {', '.join(unknown)}", {"fields": unknown})


def parse_plan(body: dict[str, Any], user_id: str) -> Deploy:
    """The plan's body as a flat DeployRequest plus the display name and discovery metadata."""
    _check_one_shape(body)
    try:
        plan = PlanDeployBody.model_validate(body)
    except ValidationError as exc:
        _unknown(exc)
        raise from_validation(exc) from None
    if plan.user_id is not None and str(plan.user_id) != user_id:
        raise invalid("userId", "is not the signed-in user: the deploy is made for the user of the Authorization "
                      "token; leave userId out or send the signed-in user's id")
    if plan.tool_catalog_id != GENERIC_MCP_CATALOG_ID:
        raise invalid("toolCatalogId", f"must be the generic MCP catalog entry {GENERIC_MCP_CATALOG_ID}: this "
                      "service deploys MCP servers, and the image to run goes in "
                      f"{_MCP}.dockerImage", code="catalog_not_supported")
    typed = plan.instance_name_on_toolbox
    name = container_name(typed)
    if name is None:
        raise invalid("instanceNameOnToolbox", f"{typed[:80]!r} holds no letter or digit to name the container "
                      "after: type a name with at least one letter or digit, such as \"Weather API Server\"")
    config = plan.base_config_override_json.mcp_config
    metadata = config.discovery_metadata or {}
    if len(json.dumps(metadata, separators=(",", ":"))) > MAX_DISCOVERY_METADATA:
        raise invalid(f"{_MCP}.discoveryMetadata", f"is larger than {MAX_DISCOVERY_METADATA // 1024} KiB of JSON")
    flat: dict[str, Any] = {"toolbox_id": str(plan.account_tool_environment_id), "name": name,
                            "catalog_id": str(plan.tool_catalog_id)}
    mapped = {"image": config.docker_image, "transport": TRANSPORTS[config.transport] if config.transport else None,
              "container_port": config.port, "host_port": config.host_port, "endpoint_path": config.endpoint,
              "env": config.environment_variables, "capabilities": config.capabilities, "publish": config.publish}
    flat.update({k: v for k, v in mapped.items() if v is not None})
    try:
        request = DeployRequest.model_validate(flat)
    except ValidationError as exc:
        errors = exc.errors()
        for error in errors:
            error["loc"] = _plan_location(tuple(error["loc"]))
        raise from_validation(_Relocated(errors)) from None
    return Deploy(request, display_name=typed, discovery_metadata=metadata)


class _Relocated:
    """A ValidationError's errors with their locations rewritten (from_validation reads `.errors()`)."""

    def __init__(self, errors: list[Any]) -> None:
        self._errors = errors

    def errors(self) -> list[Any]:
        return self._errors


def parse_deploy(body: Any, user_id: str) -> Deploy:
    """Either shape of deploy_mcp_server's body (the plan's is recognised by `baseConfigOverrideJson`)."""
    if is_plan_body(body):
        return parse_plan(body, user_id)
    return Deploy(parse(DeployRequest, body))
