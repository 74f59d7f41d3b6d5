"""What the DTMA reports about its droplet: system metrics, container list, heartbeat payload.

The same container list feeds the heartbeat's ``tool_statuses`` and ``GET /status``'s
``tool_instances``, exactly as in the real agent's ``getToolStatuses()`` (recorded in
``tests/fixtures/real-dtma-heartbeat-*.json``).
"""

from __future__ import annotations

from typing import Any

from devstack.dtma_standin.engine import DockerError, Engine

#: The single item the DTMA sends instead of the list when Docker cannot be reached.
TOOL_STATUS_ERROR = "Failed to fetch tool statuses"

_MIB = 1024**2
_GIB = 1024**3


def system_status(running_containers: int) -> dict[str, Any]:
    """Plausible ``systeminformation`` numbers for a 2 GB droplet.

    They grow with the number of running containers so that dashboards fed by the
    stand-in visibly move; nothing about the host running the stand-in leaks into them.
    """
    memory_total = 2 * _GIB
    memory_active = 420 * _MIB + running_containers * 48 * _MIB
    memory_used = memory_active + 180 * _MIB
    disk_total = 50 * _GIB
    disk_used = 6 * _GIB + running_containers * 350 * _MIB
    return {
        "cpu_load_percent": min(100.0, 2.5 + 3.0 * running_containers),
        "memory": {
            "total_bytes": memory_total,
            "active_bytes": memory_active,
            "free_bytes": memory_total - memory_used,
            "used_bytes": memory_used,
        },
        "disk": {
            "mount": "/",
            "total_bytes": disk_total,
            "used_bytes": disk_used,
            "free_bytes": disk_total - disk_used,
        },
    }


def tool_statuses(engine: Engine) -> list[dict[str, Any]]:
    """Every container on the engine (own, unmanaged, managed; running or not), snake_cased."""
    try:
        summaries = engine.list_all()
    except DockerError:
        return [{"error": TOOL_STATUS_ERROR}]
    return [
        {
            "id": summary["Id"],
            "names": [name.removeprefix("/") for name in summary["Names"]],
            "image": summary["Image"],
            "image_id": summary["ImageID"],
            "command": summary["Command"],
            "created": summary["Created"],
            "state": summary["State"],
            "status": summary["Status"],
            "ports": [
                {
                    "ip": port["IP"],
                    "private_port": port["PrivatePort"],
                    "public_port": port["PublicPort"],
                    "type": port["Type"],
                }
                for port in summary["Ports"]
            ],
        }
        for summary in summaries
    ]


def heartbeat_payload(engine: Engine, *, dtma_version: str, boot: tuple[str, int] | None) -> dict[str, Any]:
    """The body of ``POST <base>/heartbeat``; ``boot`` adds the optional ``boot_id``/``seq`` pair.

    The real agent never names the toolbox in the payload: only the bearer token does.
    """
    payload: dict[str, Any] = {
        "dtma_version": dtma_version,
        "system_status": system_status(engine.running_count()),
        "tool_statuses": tool_statuses(engine),
    }
    if boot is not None:
        payload["boot_id"], payload["seq"] = boot
    return payload
