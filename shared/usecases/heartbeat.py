"""dtma_heartbeat_ingest: what an agent's heartbeat means for its toolbox and instances.

Python's part is to authenticate the agent, validate the payload and turn every
`tool_statuses` item into an observation (reports.py) (which instance, which status it asks for, and why);
the database's part (`cp_ingest_heartbeat`, sql/migrations/0005_heartbeat.sql) is to match,
apply and record them in one round trip. Items come in two formats, detected per item:

* instance format `{account_tool_instance_id, status_on_toolbox, ...}` (what the original
  backend expected);
* container format: the Docker container summaries the real DTMA sends today
  (docs/real-agent.md), matched to the instance this service created on this toolbox: by
  container id once known, else by name for a container created after the instance was recorded.

An item `{"error": ...}` means the agent could not talk to Docker: the toolbox's Docker is
recorded as unhealthy and no instance changes.
"""

from __future__ import annotations

import hashlib
import logging

from shared.adapters.http import Call, Reply
from shared.core.errors import ApiError
from shared.usecases.ports import Ports
from shared.usecases.reports import build_report

log = logging.getLogger("mcp.heartbeat")


def bearer_token(call: Call) -> str:
    header = call.header("Authorization") or ""
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise ApiError(401, "unauthenticated", "Authorization header must be 'Bearer <toolbox token>'",
                       headers={"WWW-Authenticate": "Bearer"})
    return token


def handle(call: Call, ports: Ports) -> Reply:
    """Authenticate, validate, apply: 204 on success, as the DTMA expects."""
    digest = hashlib.sha256(bearer_token(call).encode()).hexdigest()
    report = build_report(call.json())
    try:
        result = ports.db.call("cp_ingest_heartbeat", p_token_sha256=digest, p_report=report)
    except ApiError as err:
        if err.status == 401:
            # Same answer whether the token is unknown or was revoked by a key rotation.
            raise ApiError(401, "unauthenticated", "invalid toolbox token",
                           headers={"WWW-Authenticate": "Bearer"}) from None
        raise
    call.log_fields.update({"toolbox_id": result["toolbox_id"], "ignored": result["ignored"],
                            **{k: result.get(k) for k in ("matched", "transitions", "rejected", "unmanaged")}})
    changed = result.get("transitions") or result.get("rejected") or result.get("previous_status") != "active"
    call.routine = not changed
    if result.get("rejected"):
        log.warning("heartbeat from toolbox %s named %d instance(s) of other toolboxes; ignored them",
                    result["toolbox_id"], result["rejected"])
    return Reply(204)
