"""manage_mcp_server: start, stop, restart and remove an MCP server through its toolbox's DTMA.

Routes: `POST /<id>/start|stop|restart`, `DELETE /<id>[?force=true]`, and `POST /` with
`{instance_id, action[, force]}` for clients that cannot choose the path (supabase-js `invoke`).

Each action records its transitional status and its command in one transaction
(`cp_begin_action_command`, which checks the state machine and answers 409 naming the current
status), enqueues the command (shared/adapters/tasks.py), and waits up to DTMA_DEPLOY_BUDGET_SECONDS for
the worker to record its outcome: most actions finish well within that and answer 200 (or the
failure, as the worker recorded it); a slower one (Docker's stop timeout) answers 202 and its
outcome is recorded when the agent answers. The conversation with the agent and its truth rules
are the worker's (shared/usecases/commands.py, docs/real-agent.md).

Every record can be removed: `force` removes it without asking the agent (an unreachable or
deleted droplet), saying that whatever ran there is left as it was.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from shared.adapters.auth import authenticate
from shared.adapters.http import Call, Reply
from shared.core import lifecycle
from shared.core.errors import ApiError, invalid
from shared.core.models import ActionRequest, parse
from shared.usecases import commands_queue, idempotency, view
from shared.usecases.ports import Ports

_PATH = re.compile(r"^/(?P<id>[^/]{1,64})(?:/(?P<action>start|stop|restart|remove|delete))?/?$")
_TRUE, _FALSE = frozenset({"true", "1", "yes"}), frozenset({"false", "0", "no", ""})


@dataclass(frozen=True)
class _Request:
    instance_id: str
    action: str
    force: bool
    body: Any


def _route(call: Call) -> _Request:
    if call.path in ("", "/"):
        if call.method != "POST":
            raise ApiError(405, "method_not_allowed", "use POST with {instance_id, action}")
        body = call.json()
        request = parse(ActionRequest, body)
        return _checked(_Request(str(request.instance_id), request.action, request.force, body))
    match = _PATH.match(call.path)
    if not match:
        raise ApiError(404, "not_found", f"no such route: {call.method} {call.path}")
    action = match.group("action")
    force = _force(call.request.args.getlist("force"))
    if call.method == "DELETE" and action is None:
        return _Request(_path_id(match.group("id")), "remove", force, None)
    if call.method == "POST" and action is not None:
        return _checked(_Request(_path_id(match.group("id")), action, force, None))
    raise ApiError(405, "method_not_allowed", "use POST /<id>/start|stop|restart or DELETE /<id>")


def _path_id(text: str) -> str:
    """The instance id of the path, parsed before any SQL sees it."""
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise invalid("instance_id", "must be a UUID (the id mcp_status lists)") from None


def _force(values: list[str]) -> bool:
    if not values:
        return False
    if len(values) > 1 or values[0].lower() not in _TRUE | _FALSE:
        raise invalid("force", "must be given once, as true or false")
    return values[0].lower() in _TRUE


def _checked(request: _Request) -> _Request:
    """Refused before anything is recorded: force only makes sense for a removal."""
    if request.force and request.action not in ("remove", "delete"):
        raise invalid("force", "applies to remove only")
    return request


def _force_remove(rt: Ports, instance: dict[str, Any], command_id: str) -> Reply:
    name = instance["instance_name_on_toolbox"]
    left = (f"the toolbox was not asked to remove container {name}; if it still exists there, run docker rm -f {name} "
            "on the droplet")
    # The command is never enqueued: removing the record supersedes it.
    rt.db.call("cp_finish_removal", p_instance_id=instance["id"],
               p_message=f"record of {name} removed (forced); {left}")
    return Reply(200, {"id": instance["id"], "name": name, "status": "removed", "left_on_toolbox": left})


def act(rt: Ports, user_id: str, request: _Request) -> Reply:
    action = lifecycle.ACTIONS[request.action]
    command_id = str(uuid.uuid4())
    begun = rt.db.call("cp_begin_action_command", p_user_id=user_id, p_instance_id=request.instance_id,
                       p_action=action.name, p_plan={k.value: v.value for k, v in action.plan.items()},
                       p_message=f"{action.name} requested" + (" (forced)" if request.force else ""),
                       p_allow_internal=rt.settings.ALLOW_PRIVATE_TOOLBOX_IPS, p_command_id=command_id)
    instance = begun["instance"]
    if request.force:
        return _force_remove(rt, instance, command_id)
    commands_queue.send(rt, command_id)
    state = _wait(rt, command_id, rt.settings.DTMA_DEPLOY_BUDGET_SECONDS)
    outcome = state.get("outcome") or {}
    if outcome.get("removed"):
        return Reply(200, {"id": instance["id"], "name": instance["instance_name_on_toolbox"], "status": "removed",
                           "left_on_toolbox": outcome.get("left_on_toolbox")})
    server = view.read_server(rt, user_id, instance["id"])
    http = int(outcome.get("http_status") or 202) if state["status"] in ("done", "failed") else 202
    if http < 300:
        return Reply(http, server)
    raise ApiError(http, outcome.get("code") or "toolbox_failed", outcome.get("message") or "the action failed",
                   {"server": server})


def _wait(rt: Ports, command_id: str, budget: float) -> dict[str, Any]:
    """The command's state once it has ended, or as it is when the budget runs out."""
    deadline = time.monotonic() + budget
    pause = 0.01
    while True:
        state = rt.db.call("cp_command_state", p_command_id=command_id)
        if state["status"] not in ("pending", "running") or time.monotonic() + pause > deadline:
            return state
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


def handle(call: Call, rt: Ports) -> Reply:
    user = authenticate(call.header("Authorization"), rt.verifier)
    request = _route(call)
    call.log_fields.update({"user_id": user.user_id, "instance_id": request.instance_id, "action": request.action})
    return idempotency.run(rt.db, rt.settings, call, user_id=user.user_id, scope="manage",
                           body={"instance_id": request.instance_id, "action": request.action,
                                 "force": request.force, "body": request.body},
                           work=lambda: act(rt, user.user_id, request))
