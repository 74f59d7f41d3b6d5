"""A server as the API shows it: deploy, manage and mcp_status all answer with this one shape
(`shared.usecases.view_models.ServerView`, from which docs/openapi.json's `Server` is generated).

The stored status says what the last report said; whether that is still true depends on how long
ago the toolbox last reported (or last answered a direct read). So every server carries both:
`status` (stored) and `effective_status`, `unknown` as soon as nothing recent is known, whatever
is stored (a silent agent is not reported as running, as Kubernetes and Nomad treat a silent
node). The ages come from the database clock in the same statement that read the rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.core import lifecycle
from shared.core.config import Settings
from shared.usecases import mcp_health
from shared.usecases.ports import Ports
from shared.usecases.view_models import ServerView


def endpoint(ip: str | None, host_port: int | None, path: str | None) -> str | None:
    """Where the MCP server itself listens: its published host port, not the DTMA's 30000."""
    if not ip or not host_port:
        return None
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{host_port}{path or ''}"


def _published(row: dict[str, Any], public_ip: str | None) -> tuple[str, str | None, str]:
    """(publish, endpoint, reachable_from): where Docker publishes the host port, as the deploy chose it
    (`port_mapping` is what cp_record_deploy recorded; rows from before the choice are public).

    A binding without an address is public whatever else the row says: that is what Docker does
    with it, and the answer must never claim less exposure than there is."""
    mapping = row.get("port_mapping") or {}
    publish, host_ip = mapping.get("publish") or "public", mapping.get("host_ip")
    port, path = row["host_port"], row["endpoint_path"]
    if publish == "public" or not host_ip:
        where = f"{public_ip}:{port}" if public_ip else f"port {port} of the droplet (no public IP address yet)"
        return "public", endpoint(public_ip, port, path), (
            f"anyone who can reach {where}: Docker publishes it on every address of the droplet and the server has "
            f"no authentication of its own, so limit port {port} to its consumers with a DigitalOcean cloud "
            "firewall, or deploy it with publish=loopback if only the droplet uses it")
    if publish == "loopback":
        tunnel = f" (ssh -L {port}:{host_ip}:{port} root@{public_ip})" if public_ip else ""
        return publish, endpoint(host_ip, port, path), (
            f"the droplet only: published on {host_ip}, so only processes on the droplet, or an SSH "
            f"tunnel{tunnel}, can reach it")
    return publish, endpoint(host_ip, port, path), (
        f"the droplet's private network (VPC) only: published on {host_ip}")


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
    mcp: mcp_health.Assessment


def _truth(row: dict[str, Any], settings: Settings, url: str | None) -> _Truth:
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
        return _Truth(lifecycle.Effective.UNKNOWN, False, "unhealthy", _docker_down(box),
                      mcp_health.assess(row, effective="unknown", endpoint=url, settings=settings))
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
    # Running means answering (shared/usecases/mcp_health.py): healthy only while the MCP endpoint
    # answers; not answering is degraded, not checked yet unknown; a server the backend cannot
    # reach (stdio, loopback, private) keeps the health Docker's state gives it.
    check = mcp_health.assess(row, effective=effective.value, endpoint=url, settings=settings)
    if check.verdict == "not_ready":
        notes.append(f"the MCP endpoint does not answer: {(check.sentence or '').rstrip('.')}.")
        if health == "healthy":
            health = "degraded"
    elif check.verdict == "unchecked":
        notes.append(f"{check.sentence}.")
        if health == "healthy":
            health = "unknown"
    return _Truth(effective, stale, health, " ".join(notes) or None, check)


def server_json(row: dict[str, Any], settings: Settings) -> ServerView:
    """One server exactly as the API documents it (docs/api.md; its type is the document's `Server`).

    A plain dict typed by `ServerView`, not a pydantic model: this runs for every row of every
    mcp_status page, and a model would cost several times as much for no check the tests do not
    already make (shared/usecases/view_models.py).
    """
    box = row["toolbox"]
    age = box["heartbeat_age_seconds"]
    publish, url, reachable_from = _published(row, box["public_ip_address"])
    truth = _truth(row, settings, url)
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
        "endpoint": url,
        "publish": publish,
        "reachable_from": reachable_from,
        "transport": row["transport"],
        "image": row["image"],
        "error": truth.error,
        "mcp": truth.mcp.block,
        # Only answers about one server carry its tools (cp_list_mcp_servers adds them for one id).
        "tools": truth.mcp.tools if "tools" in row else None,
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


def read_server(ports: Ports, user_id: str, server_id: str) -> ServerView:
    """One server exactly as mcp_status renders it, in one round trip.

    deploy_mcp_server and manage_mcp_server answer with this, so the web app handles one shape
    whichever function it called. Raises the 404 ApiError when it is not the caller's.
    """
    page = ports.db.call("cp_list_mcp_servers", p_user_id=user_id, p_id=server_id)
    return server_json(page["items"][0], ports.settings)
