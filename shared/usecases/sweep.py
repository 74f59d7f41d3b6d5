"""mcp_status_sweep: one pass of the job that keeps stored state honest when agents go silent.

Cloud Scheduler POSTs here every minute or so. The function is deployed without public access
(`--no-allow-unauthenticated`), so Cloud Run's IAM check is the authentication: only the
scheduler's service account can invoke it, and there is no user JWT to verify. The request body
is ignored (a scheduler job sends whatever it was configured with); GET and the rest are 405, so
a browser or a crawler that reaches the URL cannot trigger work.

All of the work is one SQL call (`cp_sweep`, sql/migrations/0007_status_and_sweep.sql): it is
bounded by SWEEP_BATCH_SIZE, uses the database clock, and is safe when two sweeps overlap (row
locks with SKIP LOCKED). This module only passes the configuration, logs the counts, and says
loudly when the guard tripped: more than SWEEP_GUARD_FRACTION of the active toolboxes falling
silent at once points at our heartbeat ingest, not at the droplets, so nothing was marked and a
human should look.

Each sweep also checks that the MCP endpoints of a bounded batch of running servers answer
(shared/usecases/mcp_health.py `sweep`: never-checked and longest-unchecked first, at most
MCP_SWEEP_PROBE_BATCH, cut to fit MCP_SWEEP_PROBE_BUDGET_SECONDS); its counts go to the log line.
"""

from __future__ import annotations

import logging
from typing import Any

from shared.adapters.db import Database
from shared.adapters.http import Call, Reply
from shared.core.config import Settings
from shared.usecases import commands_queue, mcp_health
from shared.usecases.ports import Ports

log = logging.getLogger("mcp.sweep")

# Below this many silent toolboxes the guard never trips: in a fleet of one or two toolboxes any
# silence is "more than half", and one droplet going quiet is most likely that droplet.
GUARD_MIN_TOOLBOXES = 3


def sweep_once(db: Database, settings: Settings) -> dict[str, Any]:
    """Run one sweep with the configured thresholds and return its counts."""
    return db.call(
        "cp_sweep",
        p_stale_after_seconds=settings.stale_after_seconds,
        p_first_contact_grace_seconds=settings.FIRST_CONTACT_GRACE_SECONDS,
        p_deploy_deadline_seconds=settings.DEPLOY_DEADLINE_SECONDS,
        p_action_deadline_seconds=settings.ACTION_DEADLINE_SECONDS,
        p_batch_size=settings.SWEEP_BATCH_SIZE,
        p_guard_fraction=settings.SWEEP_GUARD_FRACTION,
        p_guard_min_toolboxes=GUARD_MIN_TOOLBOXES,
    )


def _log(counts: dict[str, Any], settings: Settings) -> None:
    fields = {"json_fields": {"sweep": counts}}
    if counts["guard_tripped"]:
        log.error("sweep guard tripped: %d of %d active toolboxes silent (plus %d marked unresponsive within "
                  "%d s), more than %.0f%%; marked none. Check the heartbeat ingest path, then the droplets.",
                  counts["silent_toolboxes"], counts["active_toolboxes"], counts["recently_unresponsive"],
                  settings.stale_after_seconds, settings.SWEEP_GUARD_FRACTION * 100, extra=fields)
    else:
        log.info("sweep: %d toolbox(es) unresponsive (%d instance events), %d failed first contact, "
                 "%d instance deadline(s) %s%s", counts["marked_unresponsive"], counts["instance_events"],
                 counts["first_contact_failed"], counts["deadlines_failed"], counts["deadlines"],
                 "; more to do" if counts["more"] else "", extra=fields)


# A command the queue should have delivered by now (pending, or its lease long expired) is enqueued
# again after this long; one still open after COMMAND_GIVE_UP_SECONDS is failed.
COMMAND_REQUEUE_SECONDS = 300
COMMAND_GIVE_UP_SECONDS = 3600


def requeue_commands(rt: Ports) -> dict[str, int]:
    """Commands whose enqueue failed or that the queue lost go to the queue again (the outbox's
    other half: shared/usecases/commands_queue.py); commands that never ran are failed with a reason."""
    found = rt.db.call("cp_commands_to_requeue", p_requeue_after_seconds=COMMAND_REQUEUE_SECONDS,
                       p_give_up_after_seconds=COMMAND_GIVE_UP_SECONDS, p_batch_size=rt.settings.SWEEP_BATCH_SIZE)
    requeued = 0
    if rt.settings.tasks_mode == "cloud_tasks":
        requeued = sum(commands_queue.send(rt, item["id"], item["attempt"]) for item in found["requeue"])
    return {"commands_requeued": requeued, "commands_waiting": len(found["requeue"]) - requeued,
            "commands_given_up": found["given_up"]}


def prune_history(rt: Ports) -> dict[str, int]:
    """Retention: one bounded batch of `cp_prune_history` (sql/migrations/0010_operations.sql) deletes events
    older than EVENTS_RETENTION_DAYS (each existing server keeps its newest EVENTS_KEEP_PER_SERVER) and
    finished commands older than COMMANDS_RETENTION_DAYS, at most RETENTION_BATCH_SIZE of each kind, so
    running it every minute never holds long locks. Logged, not answered (the answer is SweepCounts)."""
    s = rt.settings
    if not s.RETENTION_BATCH_SIZE:
        return {}
    pruned = rt.db.call("cp_prune_history", p_events_retention_days=s.EVENTS_RETENTION_DAYS,
                        p_commands_retention_days=s.COMMANDS_RETENTION_DAYS,
                        p_keep_events_per_instance=s.EVENTS_KEEP_PER_SERVER, p_batch_size=s.RETENTION_BATCH_SIZE)
    return {"events_pruned": pruned["events_deleted"], "commands_pruned": pruned["commands_deleted"]}


def handle(call: Call, rt: Ports) -> Reply:
    """One sweep; 200 with the counts, including when the guard tripped (the sweep did its job).
    Only the scheduler's service account may ask: its Google OIDC token is checked first (401)."""
    from shared.adapters import invoker_auth
    from shared.core.config import SWEEP

    invoker_auth.authenticate(call.header("Authorization"), rt.settings, SWEEP)
    counts = sweep_once(rt.db, call.settings)
    counts.update(requeue_commands(rt))
    call.log_fields.update(prune_history(rt))
    # Last, bounded by MCP_SWEEP_PROBE_BUDGET_SECONDS: the batch of running servers whose MCP endpoint is
    # checked (shared/usecases/mcp_health.py). Logged, not answered (the answer is the document's SweepCounts).
    checks = mcp_health.sweep(rt)
    call.log_fields.update({"guard_tripped": counts["guard_tripped"], "marked": counts["marked_unresponsive"],
                            "deadlines_failed": counts["deadlines_failed"], **checks})
    _log(counts, call.settings)
    return Reply(200, counts)
