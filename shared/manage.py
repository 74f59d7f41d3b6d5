"""manage_mcp_server: start, stop, restart and remove an MCP server through its toolbox's DTMA.

Routes: `POST /<id>/start|stop|restart`, `DELETE /<id>[?force=true]`, and `POST /` with
`{instance_id, action[, force]}` for clients that cannot choose the path (supabase-js `invoke`).

Each action records its transitional status first (`cp_begin_action`, which checks the state
machine and answers 409 naming the current status), then runs as a background command
(shared/background.py): the request waits DTMA_DEPLOY_BUDGET_SECONDS and answers 202 if the
agent is slower (Docker's stop timeout), and the command records the outcome when it answers.
The truth rules (docs/real-agent.md has what the real agent answers in each case):

* a start is confirmed by looking (`GET /tools/status`) before anything says `running`; a
  container that exited right after starting is an `error`;
* an action that never reached the agent, or that the agent refused without touching the
  container, puts the server back where it was and says why in the answer and the history;
* a second stop answers 500 "(HTTP code 304) container already stopped": that is success;
* after the agent restarts it forgets what it deployed and answers 404 for containers that still
  run. Then the server is marked "no longer managed by the agent" (a state the user keeps seeing)
  and left as it was; start/stop/restart are refused from then on, and removal removes the record
  and says what is left on the droplet;
* every record can be removed: `force` removes it without asking the agent (an unreachable or
  deleted droplet), saying that whatever ran there is left as it was.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from shared import background, idempotency, lifecycle, status
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
        return _Request(match.group("id").lower(), "remove", force, None)
    if call.method == "POST" and action is not None:
        return _checked(_Request(match.group("id").lower(), action, force, None))
    raise ApiError(405, "method_not_allowed", "use POST /<id>/start|stop|restart or DELETE /<id>")


def _force(values: list[str]) -> bool:
    if not values:
        return False
    if len(values) > 1 or values[0].lower() not in _TRUE | _FALSE:
        raise ApiError(400, "invalid_request", "force: must be given once, as true or false", {"param": "force"})
    return values[0].lower() in _TRUE


def _checked(request: _Request) -> _Request:
    """Refused before anything is recorded: force only makes sense for a removal."""
    if request.force and request.action not in ("remove", "delete"):
        raise ApiError(400, "invalid_request", "force: applies to remove only", {"field": "force"})
    return request


@dataclass
class _Result:
    """What a command ended with: None failure means the goal was reached."""

    failure: Outcome | None = None
    removed: bool = False
    left_on_toolbox: str | None = None
    confirmed: bool = True


class _Steps:
    """One action's conversation with the DTMA, recording each outcome as it comes."""

    def __init__(self, rt: Runtime, target: Target, begun: dict[str, Any]) -> None:
        self.rt = rt
        self.target = target
        self.instance = begun["instance"]
        self.previous = begun["previous_status"]
        self.previous_error = begun.get("previous_error")
        self.id = self.instance["id"]
        self.name = self.instance["instance_name_on_toolbox"]
        self.timeout = rt.settings.DTMA_COMMAND_TIMEOUT_SECONDS
        self.read_timeout = rt.settings.DTMA_STATUS_TIMEOUT_SECONDS

    # -- recording ----------------------------------------------------------------------------

    def settle(self, expected: Status, to: Status | None, message: str) -> None:
        self.rt.db.call("cp_settle", p_instance_id=self.id, p_expected=expected.value,
                        p_to=to.value if to else None, p_message=message)

    def revert(self, expected: Status, failure: Outcome) -> Outcome:
        """The action changed nothing on the toolbox: back to where it started."""
        self.rt.db.call("cp_revert_action", p_instance_id=self.id, p_expected=expected.value,
                        p_previous=self.previous, p_previous_error=self.previous_error, p_message=failure.message)
        return failure

    def finish_removal(self, message: str) -> None:
        self.rt.db.call("cp_finish_removal", p_instance_id=self.id, p_message=message)

    # -- looking ------------------------------------------------------------------------------

    def listing(self) -> dict[str, Any] | None:
        """Our container as the agent's `GET /tools/status` lists it: {} if absent, None if unreadable."""
        try:
            answer = self.rt.dtma.tool_status(self.target, self.read_timeout)
        except DtmaError:
            return None
        for item in answer["tool_instances"]:
            if isinstance(item, dict) and item.get("instance_name_on_toolbox") == self.name:
                return item
        return {}

    def not_managed(self, expected: Status, verb: str) -> Outcome:
        """The agent answered 404: it no longer manages the container, or the container is gone."""
        listed = self.listing()
        if listed:
            message = (f"the toolbox agent no longer manages {self.name} (it restarted and forgot the container, or a "
                       f"failed deploy left it behind), so it could not {verb} it; the container is still on the "
                       f"droplet. Remove this server (then docker rm -f {self.name} on the droplet) and deploy again")
            self.rt.db.call("cp_mark_agent_unmanaged", p_instance_id=self.id, p_message=message)
            return self.revert(expected, Outcome(None, message, 409, "agent_lost_container"))
        if listed is None:
            return self.revert(expected, Outcome(None, f"the toolbox agent does not know {self.name} and its "
                                                       "container list could not be read; nothing changed", 502,
                                                 "toolbox_failed"))
        failure = Outcome(Status.ERROR, f"container {self.name} no longer exists on the toolbox; remove this server "
                                        "and deploy it again", 409, "container_gone")
        self.settle(expected, failure.to, failure.message)
        return failure

    # -- the agent's verbs ------------------------------------------------------------------

    def stop(self) -> Outcome | None:
        """None when stopped (or already stopped); otherwise the failure, already recorded."""
        try:
            self.rt.dtma.stop(self.target, self.name, self.timeout)
        except DtmaRejected as exc:
            if exc.status == 500 and _ALREADY_STOPPED in exc.agent_message:
                return None
            if exc.status == 404:
                return self.not_managed(Status.STOPPING, "stop")
            # The agent tried and Docker refused: the container is as it was.
            return self.revert(Status.STOPPING, from_dtma_error(exc, action="stop", name=self.name))
        except DtmaError as exc:
            return self._failed(Status.STOPPING, exc, "stop")
        return None

    def start(self) -> Outcome | None:
        try:
            self.rt.dtma.start(self.target, self.name, self.timeout)
        except DtmaRejected as exc:
            if exc.status == 404:
                return self.not_managed(Status.STARTING, "start")
            failure = from_dtma_error(exc, action="start", name=self.name)
            self.settle(Status.STARTING, failure.to, failure.message)
            return failure
        except DtmaError as exc:
            return self._failed(Status.STARTING, exc, "start")
        return None

    def confirm_running(self) -> _Result:
        """After the agent's 200 for a start: look before saying `running` (the agent's start does
        not inspect the container, and one that exits at once is still a 200). Unconfirmed: the
        next heartbeat settles it."""
        listed = self.listing()
        if listed is None:
            self.settle(Status.STARTING, None, f"the toolbox agent started {self.name}; waiting for a report that "
                                               "it runs")
            return _Result(confirmed=False)
        state = str(listed.get("status") or "") if listed else "gone"
        if state == "running":
            self.settle(Status.STARTING, Status.RUNNING, f"container {self.name} started and runs")
            return _Result()
        if state in ("exited", "gone"):
            message = (lifecycle.unexpected_exit(self.name, None).replace("exited unexpectedly",
                                                                          "exited right after it was started", 1)
                       if state == "exited" else
                       f"container {self.name} disappeared right after it was started; remove this server and "
                       "deploy it again")
            failure = Outcome(Status.ERROR, message, 502, "container_exited")
            self.settle(Status.STARTING, failure.to, failure.message)
            return _Result(failure)
        self.settle(Status.STARTING, None, f"container {self.name} is {state} after the start; waiting for a report")
        return _Result(confirmed=False)

    def remove(self) -> _Result:
        try:
            self.rt.dtma.remove(self.target, self.name, self.timeout)
        except DtmaRejected as exc:
            if exc.status != 404:
                return _Result(self.revert(Status.DELETING, from_dtma_error(exc, action="remove", name=self.name)))
            listed = self.listing()
            if listed:
                left = (f"container {self.name} is still on the droplet: the toolbox agent does not manage it (the "
                        "agent restarted since, or a failed deploy left it behind), so it could not remove it. Run "
                        f"docker rm -f {self.name} on the droplet to free its name and port")
            elif listed is None:
                left = (f"the toolbox agent does not know {self.name} and its container list could not be read: "
                        f"check the droplet for a container named {self.name} (docker ps -a)")
            else:
                left = None
            self.finish_removal(f"record of {self.name} removed; {left}" if left else
                                f"container {self.name} was already gone from the toolbox; record removed")
            return _Result(removed=True, left_on_toolbox=left)
        except DtmaError as exc:
            failure = self._failed(Status.DELETING, exc, "remove")
            if not failure.reached:
                failure = replace(failure, message=failure.message + "; or remove only this record with force=true "
                                                                     "(the container, if any, stays on the droplet)")
            return _Result(failure)
        self.finish_removal(f"container {self.name} removed from the toolbox")
        return _Result(removed=True)

    def _failed(self, expected: Status, exc: DtmaError, verb: str) -> Outcome:
        failure = from_dtma_error(exc, action=verb, name=self.name)
        if not failure.reached:
            return self.revert(expected, failure)
        self.settle(expected, failure.to, failure.message)
        return failure


def _run(steps: _Steps, action: str, recorded: Status) -> _Result:
    """Drive the DTMA from the recorded status to the action's goal, recording every step."""
    if recorded is Status.DELETING:
        return steps.remove()
    if recorded is Status.STOPPING:
        failure = steps.stop()
        if failure is not None:
            return _Result(failure)
        if action == "stop":
            steps.settle(Status.STOPPING, Status.STOPPED, f"container {steps.name} stopped")
            return _Result()
        steps.settle(Status.STOPPING, Status.STARTING, f"container {steps.name} stopped; starting it again")
        steps.previous, steps.previous_error = Status.STOPPED.value, None  # what a failed start leaves
    failure = steps.start()
    if failure is not None:
        return _Result(failure)
    return steps.confirm_running()


def _force_remove(rt: Runtime, instance: dict[str, Any]) -> Reply:
    name = instance["instance_name_on_toolbox"]
    left = (f"the toolbox was not asked to remove container {name}; if it still exists there, run docker rm -f {name} "
            "on the droplet")
    rt.db.call("cp_finish_removal", p_instance_id=instance["id"],
               p_message=f"record of {name} removed (forced); {left}")
    return Reply(200, {"id": instance["id"], "name": name, "status": "removed", "left_on_toolbox": left})


def act(rt: Runtime, user_id: str, request: _Request) -> Reply:
    action = lifecycle.ACTIONS[request.action]
    begun = rt.db.call("cp_begin_action", p_user_id=user_id, p_instance_id=request.instance_id,
                       p_action=action.name, p_plan={k.value: v.value for k, v in action.plan.items()},
                       p_message=f"{action.name} requested" + (" (forced)" if request.force else ""),
                       p_allow_internal=rt.settings.ALLOW_PRIVATE_TOOLBOX_IPS)
    instance, toolbox = begun["instance"], begun["toolbox"]
    recorded = Status(instance["status_on_toolbox"])
    if request.force:
        return _force_remove(rt, instance)
    try:
        target = rt.dtma.target(toolbox)
    except AddressRefused as exc:
        rt.db.call("cp_revert_action", p_instance_id=instance["id"], p_expected=recorded.value,
                   p_previous=begun["previous_status"], p_previous_error=begun.get("previous_error"),
                   p_message=exc.message)
        raise ApiError(409, "toolbox_address_refused", exc.message) from None
    done, result = background.run_within(rt.settings.DTMA_DEPLOY_BUDGET_SECONDS,
                                         lambda: _run(_Steps(rt, target, begun), action.name, recorded))
    name = instance["instance_name_on_toolbox"]
    if done and result is not None and result.removed:
        return Reply(200, {"id": instance["id"], "name": name, "status": "removed",
                           "left_on_toolbox": result.left_on_toolbox})
    view = status.read_server(rt, user_id, instance["id"])
    if not done or result is None or not result.confirmed or (result.failure and result.failure.http_status == 202):
        return Reply(202, view)
    if result.failure is None:
        return Reply(200, view)
    raise ApiError(result.failure.http_status, result.failure.code, result.failure.message, {"server": view})


def handle(call: Call, rt: Runtime) -> Reply:
    user = authenticate(call.header("Authorization"), rt.verifier)
    request = _route(call)
    call.log_fields.update({"user_id": user.user_id, "instance_id": request.instance_id, "action": request.action})
    return idempotency.run(rt.db, rt.settings, call, user_id=user.user_id, scope="manage",
                           body={"instance_id": request.instance_id, "action": request.action,
                                 "force": request.force, "body": request.body},
                           work=lambda: act(rt, user.user_id, request))
