"""mcp_status/toolboxes: the caller's toolboxes, as the web console's list and deploy form show them.

A person choosing where to deploy needs to know which toolboxes are alive, and a server's
`unknown` only makes sense next to its toolbox's silence. So each toolbox is rendered with the
same staleness rule as its servers (shared/core/lifecycle.py `is_stale` over the same heartbeat
age, read in the same SQL terms as cp_list_mcp_servers), plus a sentence saying what to check.
One database round trip (`cp_list_toolboxes`).
"""

from __future__ import annotations

from typing import Any

from shared.core import lifecycle
from shared.core.config import Settings


def _whole(seconds: float | None) -> int | None:
    return None if seconds is None else max(0, int(seconds))


def _liveness(box: dict[str, Any], stale: bool) -> str:
    """What a person should read next to the toolbox's name."""
    age = _whole(box["heartbeat_age_seconds"])
    status = str(box["status"]).replace("_", " ")
    if box["status"] not in lifecycle.LIVE_TOOLBOX_STATUSES | {"unresponsive"}:
        detail = f" ({box['provisioning_error_message']})" if box.get("provisioning_error_message") else ""
        return f"toolbox is {status}{detail}; nothing can be deployed on it now."
    if age is None:
        return "the toolbox's agent has never reported; check that its DTMA agent is running."
    if stale:
        return (f"silent for {age} s: its servers' status is unknown until it reports again. Check that the droplet "
                "is up and its DTMA agent is running.")
    if box.get("docker_error"):
        return (f"Docker is not answering (its agent says: {box['docker_error']}); nothing can be deployed, started "
                "or stopped there until Docker is back.")
    return f"reporting: last heartbeat {age} s ago."


def toolbox_json(box: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """One toolbox as docs/api.md documents it."""
    stale = lifecycle.is_stale(box["status"], box["heartbeat_age_seconds"], settings.stale_after_seconds)
    return {
        "id": box["id"],
        "name": box["name"],
        "region": box["region_slug"],
        "status": box["status"],
        "public_address": box["public_ip_address"],
        "last_heartbeat_at": box["last_heartbeat_at"],
        "heartbeat_age_seconds": _whole(box["heartbeat_age_seconds"]),
        "stale": stale,
        # Only a fresh report says anything about Docker; a silent toolbox's Docker is unknown.
        "docker_healthy": None if stale else not box.get("docker_error"),
        "dtma_version": box["dtma_last_known_version"],
        "agent_last_reached_at": box["dtma_last_reached_at"],
        # The rule deploy_mcp_server applies (cp_check_toolbox_commandable), so the form can say so
        # before a person fills it in. A silent but still active toolbox is not refused there.
        "accepts_deploys": box["status"] == "active" and not box.get("docker_error")
                           and box["public_ip_address"] is not None,
        "liveness": _liveness(box, stale),
        "server_count": box["server_count"],
        "created_at": box["created_at"],
    }


def list_toolboxes(db: Any, user_id: str, settings: Settings) -> dict[str, Any]:
    """`{"toolboxes": [...], "as_of": ts}` for the caller."""
    page = db.call("cp_list_toolboxes", p_user_id=user_id)
    return {"toolboxes": [toolbox_json(box, settings) for box in page["items"]], "as_of": page["now"]}
