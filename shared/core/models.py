"""Request bodies of the web-app-facing functions, validated before anything is recorded.

Everything here ends up on a droplet as a container name, an image reference, environment
variables or a port binding, so each field is held to what Docker itself accepts and nothing
else: no shell metacharacters, path traversal or control characters reach the DTMA. Unknown
fields are refused (422, naming them) so a typo is never silently ignored; the camelCase names
the web app sends today are accepted as aliases.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator

from shared.core.errors import ApiError, from_validation
from shared.core.names import CONTAINER_NAME, container_name

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
ENDPOINT_PATH = re.compile(r"^/[A-Za-z0-9/._~-]{0,200}$")
# Docker's reference grammar (distribution/reference): [host[:port]/]path[:tag][@digest].
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
# A first component is a registry host only if it has a dot or a port, or is localhost;
# otherwise it is part of the (lower-case) repository path, as Docker parses it.
_HOST = r"(?:(?:localhost|[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+)(?::[0-9]{1,5})?/|[A-Za-z0-9-]+:[0-9]{1,5}/)"
IMAGE_REFERENCE = re.compile(
    rf"^{_HOST}?{_COMPONENT}(?:/{_COMPONENT})*(?::[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})?(?:@sha256:[a-f0-9]{{64}})?$")

def _registry_port(reference: str) -> int | None:
    """The port of the reference's registry host, if its first component is `host:port`."""
    first, slash, _ = reference.partition("/")
    if not slash or ":" not in first:
        return None
    return int(first.rpartition(":")[2])


MAX_ENV_VARS = 100
MAX_ENV_VALUE = 32 * 1024


def _aliases(*names: str) -> Any:
    return AliasChoices(*names)


# Ids arrive as JSON strings, so UUID fields alone are parsed leniently (a UUID from its text).
LaxUUID = Annotated[UUID, Field(strict=False)]


class _Strict(BaseModel):
    """Strict types: a boolean is not a port and "80" is not a number (pydantic's lax mode would
    bind `true` as port 1). Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, str_strip_whitespace=False, strict=True)


class DeployRequest(_Strict):
    toolbox_id: LaxUUID = Field(validation_alias=_aliases("toolbox_id", "toolboxId", "accountToolEnvironmentId"))
    name: str = Field(validation_alias=_aliases("name", "instanceNameOnToolbox", "instance_name_on_toolbox"))
    image: str | None = Field(default=None, validation_alias=_aliases("image", "dockerImage", "dockerImageUrl"))
    transport: Literal["stdio", "sse", "streamable_http"] = Field(
        default="streamable_http", validation_alias=_aliases("transport", "mcpTransport", "mcpTransportType"))
    container_port: int = Field(default=8080, ge=1, le=65535,
                                validation_alias=_aliases("container_port", "containerPort", "mcpPort"))
    host_port: int | None = Field(default=None, ge=1, le=65535, validation_alias=_aliases("host_port", "hostPort"))
    endpoint_path: str = Field(default="/mcp", validation_alias=_aliases(
        "endpoint_path", "endpointPath", "mcpEndpoint", "mcpEndpointPath"))
    env: dict[str, Annotated[str, Field(max_length=MAX_ENV_VALUE)]] = Field(
        default_factory=dict, max_length=MAX_ENV_VARS, validation_alias=_aliases("env", "environmentVariables"))
    capabilities: list[Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]] = Field(
        default_factory=list, max_length=32, validation_alias=_aliases("capabilities", "mcpCapabilities"))
    catalog_id: LaxUUID | None = Field(default=None, validation_alias=_aliases("catalog_id", "toolCatalogId"))
    # Where Docker publishes the host port (HostIp of the binding): "public" = every address of the
    # droplet (Docker's default, unauthenticated to the internet unless a cloud firewall limits it;
    # SECURITY.md), "loopback" = 127.0.0.1 (the droplet only), "private" = the droplet's VPC address.
    publish: Literal["public", "private", "loopback"] = Field(
        default="public",
        description="Where the host port is published on the droplet: public (all its addresses; limit it with "
                    "a cloud firewall), loopback (127.0.0.1: reachable from the droplet only) or private (its "
                    "VPC address: refused while the toolbox's private address is unknown).")

    @field_validator("name")
    @classmethod
    def _container_name(cls, value: str) -> str:
        if not CONTAINER_NAME.fullmatch(value):
            raise ValueError(name_problem(value))
        return value

    @field_validator("image")
    @classmethod
    def _image_reference(cls, value: str | None) -> str | None:
        if value is not None and (len(value) > 255 or not IMAGE_REFERENCE.fullmatch(value)):
            raise ValueError("is not a valid Docker image reference (e.g. mcp/github:latest or "
                             "ghcr.io/org/server@sha256:...)")
        port = _registry_port(value) if value is not None else None
        if port is not None and not 1 <= port <= 65535:
            raise ValueError(f"names registry port {port}; a port is 1-65535")
        return value

    @field_validator("endpoint_path")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        if not ENDPOINT_PATH.fullmatch(value) or "/../" in value + "/" or "//" in value:
            raise ValueError("must be an absolute URL path such as /mcp")
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for name, item in value.items():
            if not ENV_NAME.fullmatch(name):
                raise ValueError(f"variable name {name[:40]!r} must be letters, digits and '_', not starting "
                                 "with a digit")
            if "\x00" in item:
                raise ValueError(f"value of {name} contains a NUL character")
        return value


class ActionRequest(_Strict):
    """The body form of manage_mcp_server, for clients that cannot set the path."""

    instance_id: LaxUUID = Field(validation_alias=_aliases("instance_id", "instanceId", "id"))
    action: Literal["start", "stop", "restart", "remove", "delete"]
    # remove only: drop the record without asking the agent (an unreachable or deleted droplet).
    force: StrictBool = False


NAME_RULE = ("1-63 characters: letters, digits, '_', '.', '-', starting with a letter or digit (Docker container "
             "name rules)")
NAME_FIELDS = ("name", "instanceNameOnToolbox", "instance_name_on_toolbox")


def name_problem(value: str) -> str:
    """Why `value` is not a container name, and the name derived from it that would be (names.py)."""
    suggestion = container_name(value)
    shown = value if len(value) <= 80 else value[:77] + "..."
    if suggestion is None:
        return f"{shown!r} is not a valid container name and holds nothing to build one from: use {NAME_RULE}"
    return f"{shown!r} is not a valid container name ({NAME_RULE}); use {suggestion!r}"


def _suggested_name(body: dict[str, Any], errors: list[Any]) -> str | None:
    """The valid name to offer when the request's name is what failed (in whichever spelling it came)."""
    for error in errors:
        where = error["loc"][0] if error["loc"] else None
        if where in NAME_FIELDS and isinstance(body.get(where), str):
            return container_name(body[where])
    return None


def _location(item: dict[str, Any]) -> str:
    return ".".join(str(p) for p in item["loc"]) or "body"


def parse(model: type[BaseModel], body: Any) -> Any:
    """Validate `body`; unknown fields -> 422 naming them, anything else wrong -> 400 naming the field."""
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request", "body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        errors = exc.errors()
        unknown = [_location(e) for e in errors if e["type"] == "extra_forbidden"]
        if unknown:
            raise ApiError(422, "unknown_fields", f"unknown field(s): {', '.join(unknown)}",
                           {"fields": unknown}) from None
        refused = from_validation(exc)
        suggestion = _suggested_name(body, errors)
        if suggestion is not None:
            refused.details["suggested_name"] = suggestion
        raise refused from None
