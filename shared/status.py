"""mcp_status: the caller's MCP servers as the web app shows them, truthfully.

The stored status says what the last report said; whether that is still true depends on how long
ago the toolbox last reported. So every server is answered with both: `status` (stored) and
`effective_status`, which is `unknown` as soon as its toolbox is not `active` or its heartbeat is
older than the staleness threshold, whatever is stored (a silent agent is not reported as
running, as Kubernetes and Nomad treat a silent node). The heartbeat age is computed by the database clock in the same
statement that reads the rows, so the answer needs no sweep to have run and no clock agreement
between function instances.

Requests (user JWT, `Authorization: Bearer`):

* `GET /` with query parameters `id`, `toolbox_id`, `status` (stored status), `limit` (1-100,
  default 50), `cursor` (the previous page's `next_cursor`), `refresh` (`true`/`false`);
* `GET /<id>`: one server;
* `POST /` with the same fields as a JSON object (what `supabase.functions.invoke` sends).

Answers `{"servers": [...], "next_cursor": str|null, "as_of": ts}` for a list and
`{"server": {...}, "as_of": ts}` for one id; a server that does not exist or is not the caller's
is the same 404. Without `refresh` that is ONE database round trip (`cp_list_mcp_servers`).

`refresh=true` also asks each toolbox in the answer (at most MAX_REFRESH_TOOLBOXES, concurrently,
within DTMA_STATUS_TIMEOUT_SECONDS overall) for `GET /tools/status`, applies what it says
through the heartbeat's reconciliation (`cp_refresh_from_dtma`, events with source `dtma`), and
reads again. A DTMA that cannot be reached is reported per toolbox under `refresh`, never as a
5xx: the stored answer is still worth showing.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol
from uuid import UUID

from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr, ValidationError

from shared import lifecycle
from shared.auth import JwtVerifier, authenticate
from shared.config import Settings
from shared.db import Database
from shared.errors import ApiError, from_validation, invalid
from shared.http import Call, Reply

if TYPE_CHECKING:
    # Only `refresh=true` talks to a DTMA: httpx and the heartbeat's models (~16 ms of a cold start)
    # are imported on that path, not by every mcp_status instance at start.
    from shared.dtma import DtmaClient
    from shared.heartbeat import ContainerSummary

log = logging.getLogger("mcp.status")

MAX_LIMIT = 100
DEFAULT_LIMIT = 50
# A refresh talks to one DTMA per toolbox; a user with many toolboxes filters by toolbox_id
# rather than making one request fan out across the fleet.
MAX_REFRESH_TOOLBOXES = 5
FILTERABLE_STATUSES = frozenset(s.value for s in lifecycle.Status)
_PARAMS = ("id", "toolbox_id", "status", "limit", "cursor", "refresh")
_TRUE, _FALSE = frozenset({"true", "1", "yes"}), frozenset({"false", "0", "no", ""})

# Shared across requests and never shut down per request: `with ThreadPoolExecutor()` would
# wait for a DTMA that is slower than the budget, which is exactly what the budget forbids.
_refresh_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="dtma-refresh")


class Deps(Protocol):
    """What the use case needs from the function's runtime (shared.runtime.Runtime has it)."""

    @property
    def settings(self) -> Settings: ...
    @property
    def db(self) -> Database: ...
    @property
    def verifier(self) -> JwtVerifier: ...
    @property
    def dtma(self) -> DtmaClient: ...


# --- the request -------------------------------------------------------------------------------

class StatusRequest(BaseModel):
    """A POST body. Strict: a typo'd field is an error, not a silently ignored filter."""

    model_config = ConfigDict(extra="forbid")

    id: StrictStr | None = None
    toolbox_id: StrictStr | None = None
    status: StrictStr | None = None
    limit: StrictInt | None = None
    cursor: StrictStr | None = None
    refresh: StrictBool = False


@dataclass(frozen=True)
class Query:
    id: str | None = None
    toolbox_id: str | None = None
    status: str | None = None
    limit: int = DEFAULT_LIMIT
    cursor: dict[str, str] | None = None
    refresh: bool = False


def _bad(param: str, message: str) -> ApiError:
    return invalid(param, message)


def _uuid(param: str, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return str(UUID(value))
    except ValueError:
        raise _bad(param, "must be a UUID") from None


def encode_cursor(cursor: dict[str, Any] | None) -> str | None:
    """The SQL keyset cursor as an opaque token (clients must not build or parse it)."""
    if cursor is None:
        return None
    raw = json.dumps({"created_at": cursor["created_at"], "id": cursor["id"]}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(token: str | None) -> dict[str, str] | None:
    if token is None or token == "":
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        when = datetime.fromisoformat(data["created_at"])
        # In UTC: a forged offset PostgreSQL cannot take (e.g. +20:00) must not reach the SQL.
        when = (when if when.tzinfo else when.replace(tzinfo=UTC)).astimezone(UTC)
        return {"created_at": when.isoformat(), "id": str(UUID(data["id"]))}
    except (binascii.Error, ValueError, TypeError, KeyError, UnicodeDecodeError, AttributeError, OverflowError):
        raise _bad("cursor", "is not a cursor this API issued; pass next_cursor back unchanged") from None


def _limit(value: int | None) -> int:
    if value is None:
        return DEFAULT_LIMIT
    if not 1 <= value <= MAX_LIMIT:
        raise _bad("limit", f"must be an integer between 1 and {MAX_LIMIT}")
    return value


def _status(value: str | None) -> str | None:
    if value is not None and value not in FILTERABLE_STATUSES:
        raise _bad("status", "must be one of " + ", ".join(s.value for s in lifecycle.Status))
    return value


def _query_params(call: Call) -> StatusRequest:
    """GET parameters as the same model a POST body fills. Unknown parameters are ignored:
    query strings also carry plumbing (supabase-js adds `forceFunctionRegion`)."""
    args = call.request.args
    fields: dict[str, Any] = {}
    for name in _PARAMS:
        values = args.getlist(name)
        if len(values) > 1:
            raise _bad(name, "given more than once")
        if values:
            fields[name] = values[0]
    if "limit" in fields:
        try:
            fields["limit"] = int(fields["limit"])
        except ValueError:
            raise _bad("limit", f"must be an integer between 1 and {MAX_LIMIT}") from None
    if "refresh" in fields:
        word = fields["refresh"].lower()
        if word not in _TRUE | _FALSE:
            raise _bad("refresh", "must be true or false")
        fields["refresh"] = word in _TRUE
    return StatusRequest.model_validate(fields)


def _body(call: Call) -> StatusRequest:
    body = call.json(required=False)
    if body is None:
        return StatusRequest()
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request", "body: must be a JSON object")
    try:
        return StatusRequest.model_validate(body)
    except ValidationError as exc:
        unknown = sorted(str(e["loc"][0]) for e in exc.errors() if e["type"] == "extra_forbidden")
        if unknown:
            raise ApiError(422, "unknown_fields", "unknown field(s): " + ", ".join(unknown) + "; allowed: "
                           + ", ".join(_PARAMS), {"fields": unknown}) from None
        raise from_validation(exc) from None


def parse_query(call: Call) -> Query:
    """The request's parameters, validated, from the path, the query string or the body."""
    parts = [p for p in call.path.split("/") if p]
    if len(parts) > 1:
        raise ApiError(404, "not_found", f"no such route: {call.path}; use / or /<id>")
    request = _query_params(call) if call.method == "GET" else _body(call)
    path_id = _uuid("id", parts[0]) if parts else None
    body_id = _uuid("id", request.id)
    if path_id and body_id and path_id != body_id:
        raise _bad("id", "differs from the id in the path")
    one = path_id or body_id
    if one and (request.toolbox_id or request.status or request.cursor):
        raise _bad("id", "reads one server; it cannot be combined with toolbox_id, status or cursor")
    return Query(id=one, toolbox_id=_uuid("toolbox_id", request.toolbox_id), status=_status(request.status),
                 limit=_limit(request.limit), cursor=decode_cursor(request.cursor), refresh=request.refresh)


# --- the answer ----------------------------------------------------------------------------------

def endpoint(ip: str | None, host_port: int | None, path: str | None) -> str | None:
    """Where the MCP server itself listens: its published host port, not the DTMA's 30000."""
    if not ip or not host_port:
        return None
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{host_port}{path or ''}"


def _whole(seconds: float | None) -> int | None:
    return None if seconds is None else max(0, int(seconds))


def _unknown_reason(row: dict[str, Any], box: dict[str, Any], age: float | None) -> str:
    """Why the status is unknown, as something the user can check."""
    name, stored = box["name"] or box["id"], row["status"]
    until = f"{row['name']} was last known {stored}; its status is unknown until the toolbox reports again"
    reached = box.get("reached_age_seconds")
    if reached is not None and (age is None or reached < age):
        return f"{_heartbeats_missing(box, age, reached)} {until}."
    if box["status"] in lifecycle.LIVE_TOOLBOX_STATUSES | {"unresponsive"}:
        if age is None:
            return f"toolbox {name} has never reported; {until}. Check that its DTMA agent is running."
        return (f"toolbox {name} has not reported for {_whole(age)} s; {until}. Check that the droplet is up "
                "and its DTMA agent is running.")
    reason = f"toolbox {name} is {str(box['status']).replace('_', ' ')}"
    if box.get("provisioning_error_message"):
        reason += f" ({box['provisioning_error_message']})"
    return f"{reason}; {until}."


def _heartbeats_missing(box: dict[str, Any], age: float | None, reached: float) -> str:
    """The agent answers the backend, but its heartbeats do not arrive: its configuration is wrong."""
    last = "it has never sent one" if age is None else f"the last one arrived {_whole(age)} s ago"
    return (f"toolbox {box['name'] or box['id']}'s agent answers the backend (read {_whole(reached)} s ago) but its "
            f"heartbeats do not arrive ({last}). On the droplet, check AGENTOPIA_API_BASE_URL (the "
            "dtma_heartbeat_ingest URL) and DTMA_AUTH_TOKEN (this toolbox's key) in /etc/dtma.conf, then restart "
            "the agent.")


def _docker_down(box: dict[str, Any]) -> str:
    return (f"Docker is not answering on toolbox {box['name'] or box['id']} (its agent says: "
            f"{box['docker_error']}); the state of its containers is unknown and nothing can be deployed, started "
            "or stopped there until Docker is back. On the droplet: systemctl status docker")


def _unmanaged(row: dict[str, Any]) -> str:
    return (f"the toolbox agent no longer manages container {row['name']} (it restarted and forgot it), so it "
            f"cannot stop, start or remove it. Remove this server (the record goes; run docker rm -f {row['name']} "
            "on the droplet), then deploy it again")


@dataclass(frozen=True)
class _Truth:
    """What we can say about one server now, from its row and its toolbox's liveness."""

    effective: lifecycle.Effective
    stale: bool
    health: str
    error: str | None


def _truth(row: dict[str, Any], settings: Settings) -> _Truth:
    box = row["toolbox"]
    age, reached = box["heartbeat_age_seconds"], box.get("reached_age_seconds")
    window = settings.stale_after_seconds
    heartbeats_stale = lifecycle.is_stale(box["status"], age, window)
    # A direct read of the agent within the window tells the containers' state as well as a
    # heartbeat does; only the heartbeats' absence is then worth saying.
    read_recently = (reached is not None and reached <= window
                     and box["status"] in lifecycle.LIVE_TOOLBOX_STATUSES | {"unresponsive"})
    stale = heartbeats_stale and not read_recently
    if box.get("docker_error") and not stale:
        return _Truth(lifecycle.Effective.UNKNOWN, False, "unhealthy", _docker_down(box))
    effective = lifecycle.effective_status(row["status"], stale=stale)
    health = lifecycle.health(effective, age if not heartbeats_stale else None, settings.HEALTH_DEGRADED_AFTER_SECONDS)
    notes: list[str] = []
    if effective is lifecycle.Effective.ERROR:
        notes.append(row["error_message"] or f"{row['name']} failed without a recorded reason; restart or remove it")
    elif effective is lifecycle.Effective.UNKNOWN:
        notes.append(_unknown_reason(row, box, age) if stale else
                     f"{row['name']} has status {row['status']}, which this service does not manage.")
    elif heartbeats_stale and reached is not None:
        notes.append(_heartbeats_missing(box, age, reached))
    if row.get("agent_unmanaged_at") and not stale:
        notes.append(_unmanaged(row))
        if health == "healthy":
            health = "degraded"
    return _Truth(effective, stale, health, " ".join(notes) or None)


def server_json(row: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """One server exactly as the API documents it (docs/api.md)."""
    box = row["toolbox"]
    age = box["heartbeat_age_seconds"]
    truth = _truth(row, settings)
    running = truth.effective is lifecycle.Effective.RUNNING
    return {
        "id": row["id"],
        "name": row["name"],
        "toolbox": {"id": box["id"], "name": box["name"], "region": box["region_slug"],
                    "status": box["status"], "last_heartbeat_at": box["last_heartbeat_at"],
                    "seconds_since_heartbeat": _whole(age),
                    "docker_healthy": not box.get("docker_error"),
                    "agent_last_reached_at": box.get("dtma_last_reached_at")},
        "status": row["status"],
        "effective_status": truth.effective.value,
        "health": truth.health,
        "stale": truth.stale,
        "managed_by_agent": not row.get("agent_unmanaged_at"),
        "endpoint": endpoint(box["public_ip_address"], row["host_port"], row["endpoint_path"]),
        "transport": row["transport"],
        "image": row["image"],
        "error": truth.error,
        "progress": [{"at": e["at"], "from": e["from"], "to": e["to"], "message": e["message"],
                      "source": e["source"]} for e in row["events"]],
        # Since we recorded it entering `running`, the only start time we know for certain.
        "uptime_seconds": _whole(row["status_age_seconds"]) if running else None,
        "status_changed_at": row["status_changed_at"],
        "last_report_at": row["last_report_at"],
        "host_port": row["host_port"],
        "container_port": row["container_port"],
        "capabilities": row["capabilities"],
        "discovery_metadata": row["discovery_metadata"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
    }


# --- refresh from the DTMA -----------------------------------------------------------------------

def _summary(item: Any) -> ContainerSummary | None:
    """A /tools/status item as the heartbeat's container summary, or None when unusable.

    Docker's raw port keys (`IP`, `PrivatePort`, ...) become the heartbeat's snake_case ones and
    `status` (the Docker *state* here) becomes `state`; the read carries no status text, so no
    exit code either.
    """
    from shared.heartbeat import ContainerSummary

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
    from shared.heartbeat import container_observation

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


def _distinct_toolboxes(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for item in items:
        seen.setdefault(item["toolbox"]["id"], item["toolbox"])
    return list(seen.values())


def _ask(dtma: DtmaClient, box: dict[str, Any], budget: float) -> dict[str, Any]:
    return dtma.tool_status(dtma.target(box), budget)


def refresh(items: list[dict[str, Any]], user_id: str, deps: Deps) -> dict[str, dict[str, Any]]:
    """Ask each toolbox's DTMA, apply what answered, and say per toolbox what happened."""
    budget = deps.settings.DTMA_STATUS_TIMEOUT_SECONDS
    boxes = _distinct_toolboxes(items)
    results: dict[str, dict[str, Any]] = {}
    futures: dict[Future[dict[str, Any]], dict[str, Any]] = {
        _refresh_pool.submit(_ask, deps.dtma, box, budget): box for box in boxes[:MAX_REFRESH_TOOLBOXES]}
    done, late = wait(futures, timeout=budget)
    for future in late:
        future.cancel()
        results[futures[future]["id"]] = {"ok": False,
                                          "error": f"the toolbox agent did not answer within {budget:g} s"}
    for future in done:
        box = futures[future]
        results[box["id"]] = _apply(future, box, user_id, deps.db)
    for box in boxes[MAX_REFRESH_TOOLBOXES:]:
        results[box["id"]] = {"ok": False, "error": f"not refreshed: at most {MAX_REFRESH_TOOLBOXES} "
                                                    "toolboxes per request; filter by toolbox_id"}
    return {box["id"]: results[box["id"]] for box in boxes}


def _apply(future: Future[dict[str, Any]], box: dict[str, Any], user_id: str, db: Database) -> dict[str, Any]:
    from shared.dtma import DtmaError, DtmaRejected

    try:
        answer = future.result()
        report = report_from_tool_status(answer)
    except DtmaRejected as exc:
        if exc.status != 500 or not lifecycle.DOCKER_DOWN.search(exc.agent_message):
            return {"ok": False, "error": exc.message}
        # The agent answers but cannot reach Docker: worth recording, like a heartbeat saying so.
        report = {"containers": [], "instances": [], "full_list": False, "docker_error": exc.agent_message[:500]}
        answer = {"tool_instances": []}
    except DtmaError as exc:
        return {"ok": False, "error": exc.message}
    except Exception:
        log.exception("refresh of toolbox %s failed", box["id"])
        return {"ok": False, "error": "reading the toolbox agent failed unexpectedly"}
    try:
        applied = db.call("cp_refresh_from_dtma", p_user_id=user_id, p_toolbox_id=box["id"], p_report=report)
    except ApiError as exc:
        if exc.status >= 500:
            raise
        return {"ok": False, "error": exc.message}
    if report["docker_error"]:
        return {"ok": False, "error": f"Docker is not answering on the toolbox: {report['docker_error']}"}
    return {"ok": True, "containers": len(answer["tool_instances"]), "matched": applied["matched"],
            "transitions": applied["transitions"]}


# --- the handler ---------------------------------------------------------------------------------

def _read(db: Database, user_id: str, query: Query) -> dict[str, Any]:
    return db.call("cp_list_mcp_servers", p_user_id=user_id, p_id=query.id, p_toolbox_id=query.toolbox_id,
                   p_status=query.status, p_limit=query.limit, p_cursor=query.cursor)


def read_server(deps: Deps, user_id: str, server_id: str) -> dict[str, Any]:
    """One server exactly as mcp_status renders it, in one round trip.

    deploy_mcp_server and manage_mcp_server answer with this, so the web app handles one shape
    whichever function it called. Raises the 404 ApiError when it is not the caller's.
    """
    page = deps.db.call("cp_list_mcp_servers", p_user_id=user_id, p_id=server_id)
    return server_json(page["items"][0], deps.settings)


def handle(call: Call, deps: Deps) -> Reply:
    """Authenticate, validate, read (and refresh), render."""
    user = authenticate(call.header("Authorization"), deps.verifier)
    query = parse_query(call)
    page = _read(deps.db, user.user_id, query)
    refreshed = None
    if query.refresh and page["items"]:
        refreshed = refresh(page["items"], user.user_id, deps)
        page = _read(deps.db, user.user_id, query)
    servers = [server_json(row, deps.settings) for row in page["items"]]
    call.log_fields.update({"user_id": user.user_id, "servers": len(servers), "refresh": query.refresh})
    if query.id:
        body: dict[str, Any] = {"server": servers[0], "as_of": page["now"]}
    else:
        body = {"servers": servers, "next_cursor": encode_cursor(page["next_cursor"]), "as_of": page["now"]}
    if query.refresh:
        body["refresh"] = refreshed or {}
    return Reply(200, body)
