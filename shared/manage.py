"""manage_mcp_server: start, stop, restart and remove an MCP server through its toolbox's DTMA.

Routes: `POST /<id>/start|stop|restart`, `DELETE /<id>`, and `POST /` with
`{instance_id, action}` for clients that cannot choose the path (supabase-js `invoke`).

Each action records its transitional status first (`cp_begin_action`, which checks the state
machine and answers 409 naming the current status), then commands the DTMA within the same
budget as deploy, then records the outcome. The real agent's quirks (reference §3.10) are
handled here rather than passed on:

* a second stop answers 500 "(HTTP code 304) container already stopped": that is success;
* after the agent restarts it forgets what it deployed and answers 404 for containers that
  still run. A 404 is therefore checked against `GET /tools/status`: if the container is still
  listed, the user hears "the toolbox agent restarted and no longer manages X"; if it is gone,
  a removal is complete and a start/stop is an error saying the container no longer exists.
"""

from __future__ import annotations

import re
import time
from typing import Any

from shared import idempotency, lifecycle, status
from shared.auth import authenticate
from shared.dtma import AddressRefused, DtmaError, DtmaRejected, Target
from shared.errors import ApiError
from shared.http import Call, Reply
from shared.lifecycle import Status
from shared.models import ActionRequest, parse
from shared.outcomes import Outcome, from_dtma_error
from shared.runtime import Runtime

_PATH = re.compile(r"^/(?P<id>[0-9a-fA-F-]{36})(?:/(?P<action>start|stop|restart|remove|delete))?/?$")
_ALREADY_STOPPED = "304"


def _route(call: Call) -> tuple[str, str, Any]:
    """(instance id, action, the body used for the idempotency fingerprint)."""
    if call.path in ("", "/"):
        if call.method != "POST":
            raise ApiError(405, "method_not_allowed", "use POST with {instance_id, action}")
        body = call.json()
        request = parse(ActionRequest, body)
        return str(request.instance_id), request.action, body
    match = _PATH.match(call.path)
    if not match:
        raise ApiError(404, "not_found", f"no such route: {call.method} {call.path}")
    action = match.group("action")
    if call.method == "DELETE" and action is None:
        return match.group("id").lower(), "remove", None
    if call.method == "POST" and action is not None:
        return match.group("id").lower(), action, None
    raise ApiError(405, "method_not_allowed", "use POST /<id>/start|stop|restart or DELETE /<id>")


class _Steps:
    """One action's conversation with the DTMA, within one deadline."""

    def __init__(self, rt: Runtime, target: Target, instance: dict[str, Any]) -> None:
        self.rt = rt
        self.target = target
        self.instance = instance
        self.name = instance["instance_name_on_toolbox"]
        self.deadline = time.monotonic() + rt.settings.DTMA_DEPLOY_BUDGET_SECONDS

    def budget(self) -> float:
        return max(0.2, self.deadline - time.monotonic())

    def settle(self, expected: Status, to: Status | None, message: str) -> None:
        self.rt.db.call("cp_settle", p_instance_id=self.instance["id"], p_expected=expected.value,
                        p_to=to.value if to else None, p_message=message)

    def still_listed(self) -> bool | None:
        """Does the agent still see the container (managed or not)? None if we cannot tell."""
        try:
            listing = self.rt.dtma.tool_status(self.target, self.budget())
        except DtmaError:
            return None
        return any(item.get("instance_name_on_toolbox") == self.name for item in listing["tool_instances"]
                   if isinstance(item, dict))

    def not_managed(self, verb: str) -> Outcome:
        listed = self.still_listed()
        if listed:
            return Outcome(Status.ERROR, f"the toolbox agent restarted and no longer manages {self.name}; the "
                                         f"container still exists on the toolbox, so it could not {verb} it. "
                                         "Remove the container on the droplet, then deploy again", 409,
                           "agent_lost_container")
        if listed is None:
            return Outcome(Status.ERROR, f"the toolbox agent does not know {self.name} and its container list "
                                         "could not be read", 502, "toolbox_failed")
        return Outcome(Status.ERROR, f"container {self.name} no longer exists on the toolbox; remove it and "
                                     "deploy it again", 409, "container_gone")

    def stop(self) -> Outcome | None:
        """None when stopped (or already stopped); otherwise the failure."""
        try:
            self.rt.dtma.stop(self.target, self.name, self.budget())
        except DtmaRejected as exc:
            if exc.status == 500 and _ALREADY_STOPPED in exc.agent_message:
                return None
            if exc.status == 404:
                return self.not_managed("stop")
            return from_dtma_error(exc, action="stop", name=self.name)
        except DtmaError as exc:
            return from_dtma_error(exc, action="stop", name=self.name)
        return None

    def start(self) -> Outcome | None:
        try:
            self.rt.dtma.start(self.target, self.name, self.budget())
        except DtmaRejected as exc:
            if exc.status == 404:
                return self.not_managed("start")
            return from_dtma_error(exc, action="start", name=self.name)
        except DtmaError as exc:
            return from_dtma_error(exc, action="start", name=self.name)
        return None

    def remove(self) -> Outcome | None:
        try:
            self.rt.dtma.remove(self.target, self.name, self.budget())
        except DtmaRejected as exc:
            if exc.status == 404:
                outcome = self.not_managed("remove")
                return None if outcome.code == "container_gone" else outcome
            return from_dtma_error(exc, action="remove", name=self.name)
        except DtmaError as exc:
            return from_dtma_error(exc, action="remove", name=self.name)
        return None


def _run(steps: _Steps, action: str, recorded: Status) -> Outcome | None:
    """Drive the DTMA from the recorded status to the action's goal. None: done, all recorded."""
    if recorded is Status.DELETING:
        failure = steps.remove()
        if failure is None:
            steps.rt.db.call("cp_finish_removal", p_instance_id=steps.instance["id"],
                             p_message=f"container {steps.name} removed from the toolbox")
            return None
        return _settled(steps, Status.DELETING, failure)
    if recorded is Status.STOPPING:
        failure = steps.stop()
        if failure is not None:
            return _settled(steps, Status.STOPPING, failure)
        if action == "stop":
            steps.settle(Status.STOPPING, Status.STOPPED, f"container {steps.name} stopped")
            return None
        steps.settle(Status.STOPPING, Status.STARTING, f"container {steps.name} stopped; starting it again")
    failure = steps.start()
    if failure is not None:
        return _settled(steps, Status.STARTING, failure)
    steps.settle(Status.STARTING, Status.RUNNING, f"container {steps.name} started")
    return None


def _settled(steps: _Steps, expected: Status, failure: Outcome) -> Outcome:
    steps.settle(expected, failure.to, failure.message)
    return failure


def act(rt: Runtime, user_id: str, instance_id: str, action_name: str) -> Reply:
    action = lifecycle.ACTIONS[action_name]
    begun = rt.db.call("cp_begin_action", p_user_id=user_id, p_instance_id=instance_id, p_action=action.name,
                       p_plan={k.value: v.value for k, v in action.plan.items()},
                       p_message=f"{action.name} requested", p_allow_internal=rt.settings.ALLOW_PRIVATE_TOOLBOX_IPS)
    instance, toolbox = begun["instance"], begun["toolbox"]
    recorded = Status(instance["status_on_toolbox"])
    try:
        target = rt.dtma.target(toolbox)
    except AddressRefused as exc:
        rt.db.call("cp_settle", p_instance_id=instance_id, p_expected=recorded.value, p_to=Status.ERROR.value,
                   p_message=exc.message)
        raise ApiError(409, "toolbox_address_refused", exc.message) from None
    failure = _run(_Steps(rt, target, instance), action.name, recorded)
    if recorded is Status.DELETING and failure is None:
        return Reply(200, {"id": instance_id, "name": instance["instance_name_on_toolbox"], "status": "removed"})
    view = status.read_server(rt, user_id, instance_id)
    if failure is None:
        return Reply(200, view)
    if failure.http_status == 202:
        return Reply(202, view)
    raise ApiError(failure.http_status, failure.code, failure.message, {"server": view})


def handle(call: Call, rt: Runtime) -> Reply:
    user = authenticate(call.header("Authorization"), rt.verifier)
    instance_id, action, body = _route(call)
    call.log_fields.update({"user_id": user.user_id, "instance_id": instance_id, "action": action})
    return idempotency.run(rt.db, rt.settings, call, user_id=user.user_id, scope="manage",
                           body={"instance_id": instance_id, "action": action, "body": body},
                           work=lambda: act(rt, user.user_id, instance_id, action))
