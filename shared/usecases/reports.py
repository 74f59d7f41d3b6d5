"""What a toolbox's agent reports, as observations the database reconciles.

Heartbeats and direct reads (`GET /tools/status`, for mcp_status?refresh=true) both come here:
each `tool_statuses` item is validated and turned into an observation (which instance, the status
it asks for, the sentence to record, what the container looks like), and the database's
`cp_reconcile_toolbox` (sql/migrations/0005_heartbeat.sql) matches and applies them. Items come
in two formats, detected per item: instance format `{account_tool_instance_id, status_on_toolbox}`
(what the original backend expected), and container format, the Docker container summaries the
real agent sends (docs/real-agent.md). An item `{"error": ...}` means the agent could not reach
Docker.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Annotated, Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic_core import to_json

from shared.core import lifecycle
from shared.core.errors import ApiError, from_validation

MAX_ITEMS = 5000
# What a beat may leave on the toolbox row. A real agent's system_status is ~300 bytes; anything far
# larger is kept as a note saying so, not refused: the beat's liveness and containers still count.
MAX_SYSTEM_STATUS_BYTES = 4096
MAX_EXTRA_BYTES = 1024
MAX_RUNTIME_DETAILS_BYTES = 2048


class _Item(BaseModel):
    # Strict: a string is not a number ("seq": "5"), a boolean is not a port.
    model_config = ConfigDict(extra="allow", str_max_length=4096, strict=True)


class Port(_Item):
    ip: str | None = None
    private_port: int | None = None
    public_port: int | None = None
    type: str | None = None


class ContainerSummary(_Item):
    id: str = Field(max_length=128)
    names: list[str] = Field(min_length=1, max_length=32)
    image: str = ""
    image_id: str = ""
    command: str = ""
    created: float | None = None
    state: str = Field(max_length=32)
    status: str = ""
    ports: list[Port] = Field(default_factory=list, max_length=256)


class InstanceReport(_Item):
    account_tool_instance_id: Annotated[UUID, Field(strict=False)]  # a UUID from its JSON text
    status_on_toolbox: str = Field(max_length=64)
    instance_name_on_toolbox: str | None = None
    runtime_details: dict[str, Any] | None = None


class Heartbeat(_Item):
    dtma_version: str = Field(max_length=64)
    system_status: dict[str, Any]
    tool_statuses: list[dict[str, Any]] = Field(max_length=MAX_ITEMS)
    boot_id: str | None = Field(default=None, min_length=1, max_length=128)
    seq: int | None = Field(default=None, ge=0, le=2**62)


_HEARTBEAT_FIELDS = frozenset(Heartbeat.model_fields)
# What changes every beat without changing what reconciliation reads.
VOLATILE_FIELDS = ("system_status", "boot_id", "seq")


class _Liveness(_Item):
    """The volatile part of a heartbeat, with Heartbeat's rules (for a body whose rest was validated before)."""

    model_config = ConfigDict(extra="ignore", str_max_length=4096, strict=True)
    system_status: dict[str, Any]
    boot_id: str | None = Field(default=None, min_length=1, max_length=128)
    seq: int | None = Field(default=None, ge=0, le=2**62)
# A real agent's items are all container summaries: validated in one call (one pass in Rust)
# instead of one call per item; anything else goes item by item, which also words the refusal.
_CONTAINERS = TypeAdapter(list[ContainerSummary])


@dataclass(frozen=True)
class HeartbeatReport:
    """A heartbeat as `cp_ingest_heartbeat` takes it (sql/migrations/0012_heartbeat_digest.sql).

    `stable` is the JSON of everything reconciliation reads, and only that, so that two beats
    that mean the same have the same bytes and the database can recognise a steady beat by their
    digest without parsing them. `live` is what changes every beat without meaning anything for
    reconciliation: the agent's system figures, boot_id/seq, and Docker's relative status text
    per container ("Up 5 minutes"), which the database puts back into each container's runtime
    when it writes one.
    """

    stable: bytes
    live: dict[str, Any]
    digest: str = ""  # SHA-256 of `stable`, computed once (a reused report keeps it)

    def __post_init__(self) -> None:
        if not self.digest:
            object.__setattr__(self, "digest", hashlib.sha256(self.stable).hexdigest())

    def params(self, stale_after_seconds: int) -> dict[str, Any]:
        """The call's parameters: one round trip whether the beat is steady or not."""
        return {"p_report": self.stable.decode(), "p_digest": self.digest, "p_live": self.live,
                "p_stale_after_seconds": stale_after_seconds}

    def as_dict(self) -> dict[str, Any]:
        """The whole report (for tests and tools): the stable part with `live` beside it."""
        return {**json.loads(self.stable), "live": self.live}


def _field_error(exc: ValidationError, prefix: str = "") -> ApiError:
    return from_validation(exc, prefix, code="invalid_heartbeat")


def _port_json(port: Port) -> dict[str, Any]:
    """The declared fields that are set (a port's unknown fields are not stored)."""
    return {k: v for k, v in port.__dict__.items() if v is not None}


def container_observation(item: ContainerSummary) -> dict[str, Any]:
    """One container summary as a reconciliation observation (also used for DTMA status reads).

    `created` lets the database bind only containers created after the instance was recorded;
    `exited`/`unexpected` let it read an exit as a stop only when one was asked for
    (sql/migrations/0005_heartbeat.sql, `cp_reconcile_toolbox`).
    """
    names = [n.lstrip("/") for n in item.names]
    target, message = lifecycle.observed_from_docker(item.state, item.status, names[0])
    code = lifecycle.exit_code(item.status)
    runtime = {"state": item.state, "status": item.status, "image": item.image, "exit_code": code,
               "ports": [_port_json(p) for p in item.ports]}
    observation: dict[str, Any] = {"names": names, "target": target, "message": message, "container_id": item.id,
                                   "created": item.created, "runtime": runtime}
    if item.state == "exited":
        observation.update(exited=True, exit_code=code, unexpected=lifecycle.unexpected_exit(names[0], code))
    return observation


def _instance_observation(item: InstanceReport) -> dict[str, Any]:
    name = item.instance_name_on_toolbox or str(item.account_tool_instance_id)
    target, message = lifecycle.observed_from_report(item.status_on_toolbox, name)
    runtime = {"reported_status": item.status_on_toolbox,
               **_bounded(item.runtime_details or {}, MAX_RUNTIME_DETAILS_BYTES, "runtime_details")}
    return {"id": str(item.account_tool_instance_id), "target": target, "message": message, "runtime": runtime}


def _bounded(value: dict[str, Any], limit: int, what: str) -> dict[str, Any]:
    """`value` if its JSON fits in `limit` bytes, else a note of what was left out."""
    if not value:
        return value
    size = len(json.dumps(value, separators=(",", ":")))
    if size <= limit:
        return value
    return {"omitted": f"{what} of {size} bytes not stored (at most {limit} are kept)",
            "keys": [key[:64] for key in list(value)[:32]]}


def report_key(body: dict[str, Any]) -> bytes:
    """A digest of everything in `body` but its volatile fields: two bodies with the same key build
    the same stable report (build_report is a function of them), so it can be reused."""
    return hashlib.sha256(to_json({k: v for k, v in body.items() if k not in VOLATILE_FIELDS})).digest()


def with_liveness(report: HeartbeatReport, body: dict[str, Any]) -> HeartbeatReport:
    """`report` (built from a body with the same `report_key`) with `body`'s volatile fields, validated."""
    try:
        live = _Liveness.model_validate(body)
    except ValidationError as exc:
        raise _field_error(exc) from None
    return HeartbeatReport(report.stable, digest=report.digest, live={
        "system_status": _bounded(live.system_status, MAX_SYSTEM_STATUS_BYTES, "system_status"),
        "boot_id": live.boot_id, "seq": live.seq if live.boot_id is not None else None,
        "statuses": report.live["statuses"]})


def build_report(body: Any) -> HeartbeatReport:
    """Validate a heartbeat body and turn it into `cp_ingest_heartbeat`'s report (see the SQL)."""
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_heartbeat", "body: must be a JSON object")
    try:
        beat = Heartbeat.model_validate(body)
    except ValidationError as exc:
        raise _field_error(exc) from None
    containers, instances, docker_error = [], [], None
    items = beat.tool_statuses
    summaries = None
    if all("account_tool_instance_id" not in raw and ("names" in raw or "state" in raw) for raw in items):
        try:
            summaries = _CONTAINERS.validate_python(items)
        except ValidationError:
            summaries = None  # item by item below, for the message naming the item
    if summaries is not None:
        containers = [container_observation(summary) for summary in summaries]
    else:
        for index, raw in enumerate(items):
            where = f"tool_statuses[{index}]"
            try:
                if "account_tool_instance_id" in raw:
                    instances.append(_instance_observation(InstanceReport.model_validate(raw)))
                elif "names" in raw or "state" in raw:
                    containers.append(container_observation(ContainerSummary.model_validate(raw)))
                elif "error" in raw:
                    docker_error = str(raw["error"])[:500]
                else:
                    raise ApiError(400, "invalid_heartbeat",
                                   f"{where}: neither a container summary (names, state) nor an instance status "
                                   "(account_tool_instance_id, status_on_toolbox)", {"field": where})
            except ValidationError as exc:
                raise _field_error(exc, where + ".") from None
    # Docker's status text is relative to now ("Up 5 minutes"): it travels beside the digest.
    statuses = [observation["runtime"].pop("status") for observation in containers]
    known = _HEARTBEAT_FIELDS
    stable = {
        "dtma_version": beat.dtma_version,
        # The real DTMA lists every container on the engine, its own included, so a
        # container-format beat (or an empty one) is the whole truth about the toolbox.
        "full_list": not instances,
        "docker_error": docker_error,
        "extra": _bounded({k: v for k, v in body.items() if k not in known}, MAX_EXTRA_BYTES, "unknown fields"),
        "containers": containers,
        "instances": instances,
    }
    live = {"system_status": _bounded(beat.system_status, MAX_SYSTEM_STATUS_BYTES, "system_status"),
            "boot_id": beat.boot_id, "seq": beat.seq if beat.boot_id is not None else None, "statuses": statuses}
    return HeartbeatReport(to_json(stable), live)


def _summary(item: Any) -> ContainerSummary | None:
    """A /tools/status item as the heartbeat's container summary, or None when unusable.

    Docker's raw port keys (`IP`, `PrivatePort`, ...) become the heartbeat's snake_case ones and
    `status` (the Docker *state* here) becomes `state`; the read carries no status text, so no
    exit code either.
    """
    if not isinstance(item, dict) or not isinstance(item.get("instance_name_on_toolbox"), str):
        return None
    raw_ports = item.get("ports") if isinstance(item.get("ports"), list) else []
    ports = [{"ip": p.get("IP"), "private_port": p.get("PrivatePort"), "public_port": p.get("PublicPort"),
              "type": p.get("Type")} for p in raw_ports if isinstance(p, dict)]
    created = item.get("created")
    try:
        return ContainerSummary.model_validate({
            "id": str(item.get("container_id") or ""), "names": [item["instance_name_on_toolbox"]],
            "image": item.get("image") or "", "state": item.get("status") or "", "status": "",
            "created": created if isinstance(created, int | float) and not isinstance(created, bool) else None,
            "ports": ports})
    except ValidationError:
        return None


def report_from_tool_status(answer: dict[str, Any]) -> dict[str, Any]:
    """`GET /tools/status` as a reconciliation report (the heartbeat's shape, containers only).

    Each item also says which instance id the agent associates with the container
    (`agent_instance_id`, null when it does not manage it: after a restart it forgets them all).
    """
    containers = []
    for item in answer["tool_instances"]:
        summary = _summary(item)
        if summary is None:
            continue
        observation = container_observation(summary)
        managed = item.get("account_tool_instance_id")
        observation["agent_instance_id"] = managed if isinstance(managed, str) and managed else None
        containers.append(observation)
    # Absences are never counted for a DTMA read (cp_reconcile_toolbox); full_list says so too.
    return {"containers": containers, "instances": [], "full_list": False, "docker_error": None}
