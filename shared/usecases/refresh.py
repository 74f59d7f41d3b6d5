"""mcp_status?refresh=true: ask each toolbox's agent (`GET /tools/status`) and apply what it says.

At most MAX_REFRESH_TOOLBOXES toolboxes per request, concurrently, within
DTMA_STATUS_TIMEOUT_SECONDS overall; each answer goes through the heartbeat's reconciliation
(`cp_refresh_from_dtma`, events with source `dtma`). A toolbox that cannot be read is reported
under `refresh`, never as a 5xx: the stored answer is still worth showing.

Alongside, within the same budget, the running servers read are checked for an MCP endpoint that
answers (shared/usecases/mcp_health.py `begin_refresh`); their answers are recorded after the
agents' reports are applied, so a server an agent just reported stopped is not recorded as answering.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any

from shared.adapters.db import Database
from shared.core import lifecycle
from shared.core.errors import ApiError
from shared.usecases import mcp_health
from shared.usecases.ports import Ports
from shared.usecases.reports import report_from_tool_status

if TYPE_CHECKING:
    from shared.adapters.dtma import DtmaClient

log = logging.getLogger("mcp.status")

# A refresh talks to one DTMA per toolbox; a user with many toolboxes filters by toolbox_id
# rather than making one request fan out across the fleet.
MAX_REFRESH_TOOLBOXES = 5

# Shared across requests and never shut down per request: `with ThreadPoolExecutor()` would
# wait for a DTMA that is slower than the budget, which is exactly what the budget forbids.
_refresh_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="dtma-refresh")


def _distinct_toolboxes(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for item in items:
        seen.setdefault(item["toolbox"]["id"], item["toolbox"])
    return list(seen.values())


def _ask(dtma: DtmaClient, box: dict[str, Any], budget: float) -> dict[str, Any]:
    return dtma.tool_status(dtma.target(box), budget)


def refresh(items: list[dict[str, Any]], user_id: str, ports: Ports) -> dict[str, dict[str, Any]]:
    """Ask each toolbox's DTMA, apply what answered, and say per toolbox what happened."""
    budget = ports.settings.DTMA_STATUS_TIMEOUT_SECONDS
    boxes = _distinct_toolboxes(items)
    checks = mcp_health.begin_refresh(items, ports, _refresh_pool)
    results: dict[str, dict[str, Any]] = {}
    futures: dict[Future[dict[str, Any]], dict[str, Any]] = {
        _refresh_pool.submit(_ask, ports.dtma, box, budget): box for box in boxes[:MAX_REFRESH_TOOLBOXES]}
    done, late = wait(futures, timeout=budget)
    for future in late:
        future.cancel()
        results[futures[future]["id"]] = {"ok": False,
                                          "error": f"the toolbox agent did not answer within {budget:g} s"}
    for future in done:
        box = futures[future]
        results[box["id"]] = _apply(future, box, user_id, ports.db)
    for box in boxes[MAX_REFRESH_TOOLBOXES:]:
        results[box["id"]] = {"ok": False, "error": f"not refreshed: at most {MAX_REFRESH_TOOLBOXES} "
                                                    "toolboxes per request; filter by toolbox_id"}
    mcp_health.finish_refresh(checks, ports)
    return {box["id"]: results[box["id"]] for box in boxes}


def _apply(future: Future[dict[str, Any]], box: dict[str, Any], user_id: str, db: Database) -> dict[str, Any]:
    from shared.adapters.dtma import DtmaError, DtmaRejected

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
