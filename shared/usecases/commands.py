"""dtma_command_worker: run one agent command, exactly as the agent answers it, and record it.

Cloud Tasks (or the local emulator) POSTs `{"command_id": ...}` here; the function is IAM-private
and invoked with an OIDC token, like the sweep. One delivery:

1. claims the command (`cp_claim_command`): a delivery of a finished command, or one whose server
   has moved on, answers 200 and does nothing; one that must wait (an earlier command of the same
   server is open, the toolbox already runs TOOLBOX_MAX_CONCURRENT_COMMANDS, another attempt holds
   the lease) answers 429 with Retry-After, and the queue delivers it again later;
2. calls the toolbox's agent for as long as the slowest pull takes (DTMA_COMMAND_TIMEOUT_SECONDS),
   recording every step as it happens: `running`, or `error` with the agent's reason turned into a
   sentence (shared/usecases/outcomes.py), the moment the agent answers;
3. marks the command done or failed (`cp_finish_command`), which erases its sealed environment;
4. when the command left the server running (a deploy, a start or restart it confirmed), checks that
   its MCP endpoint answers and records what it says (shared/usecases/mcp_health.py `after_start`).

Retries are safe: a deploy delivered again after its first attempt started the container finds
the instance no longer `deploying` and is superseded; one whose first attempt died mid-call meets
the agent's 409 "already exists" and looks at `GET /tools/status` to record what really runs.

The truth rules of docs/real-agent.md live here: a start is confirmed by looking; an action that
never reached the agent, or that it refused without touching the container, puts the server back
where it was; a second stop's 500 "(HTTP code 304)" is success; a 404 for a container the agent
still lists means it no longer manages it (a state the user keeps seeing); removal always removes
the record and says what is left on the droplet.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from shared.adapters import secret_env
from shared.adapters.dtma import AddressRefused, DtmaError, DtmaRejected, Target, recording
from shared.adapters.http import Call, Reply
from shared.adapters.logging import quotes_secret, redact, request_secrets
from shared.core import lifecycle
from shared.core.errors import invalid
from shared.core.lifecycle import Status
from shared.usecases import mcp_health
from shared.usecases.outcomes import Outcome, from_dtma_error
from shared.usecases.ports import Ports

log = logging.getLogger("mcp.commands")

_ALREADY_STOPPED = "304"
_ALREADY_EXISTS = "already exists"
# The lease outlasts the longest agent call a command makes, plus the status reads around it.
_LEASE_MARGIN_SECONDS = 60


def dtma_body(instance: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """The body of DTMA's `POST /tools` (docs/real-agent.md): the agent reads only Env and PortBindings.

    It hands PortBindings to Docker as they are (tool_routes.ts), so the binding `cp_record_deploy`
    recorded is exactly what Docker publishes: `{"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": "49152"}]}`
    for `publish: "loopback"`, no HostIp (every address of the droplet) for "public"."""
    return {
        "dockerImageUrl": instance["docker_image_url"],
        "instanceNameOnToolbox": instance["instance_name_on_toolbox"],
        "accountToolInstanceId": instance["id"],
        "baseConfigOverrideJson": {"Env": [f"{k}={v}" for k, v in env.items()],
                                   "HostConfig": instance["base_config_override_json"]["HostConfig"]},
    }


def _outcome_of_answer(answer: dict[str, Any], name: str) -> tuple[Outcome, str | None, dict[str, Any]]:
    """A 201 is not proof of a running server: the real DTMA answers 201 for a container that
    exited at once (docs/real-agent.md), so the reported state decides."""
    data = answer["data"]
    state = data.get("state") if isinstance(data.get("state"), dict) else {}
    container_id = data.get("container_id") if isinstance(data.get("container_id"), str) else None
    runtime = {"state": state.get("Status"), "exit_code": state.get("ExitCode"), "image": data.get("image"),
               "ports": data.get("ports")}
    if state.get("Running") is True or state.get("Status") == "running":
        short = (container_id or "")[:12]
        return Outcome(lifecycle.Status.RUNNING, f"container {short} is running", 201, "created"), \
            container_id, runtime
    code = state.get("ExitCode")
    detail = f" with code {code}" if code is not None else ""
    error = state.get("Error") or ""
    message = (f"container {name} exited right after starting{detail}{': ' + error if error else ''}. A stdio "
               "MCP server needs a client on its stdin; use an image that serves sse or streamable_http")
    return Outcome(lifecycle.Status.ERROR, message, 502, "container_exited"), container_id, runtime


def _deploy(rt: Ports, claim: dict[str, Any]) -> Outcome:
    """`POST /tools`, held as long as the pull takes, and what its answer means."""
    instance, toolbox, command = claim["instance"], claim["toolbox"], claim["command"]
    name = instance["instance_name_on_toolbox"]
    container_id, runtime_details = None, None
    env = secret_env.unseal(rt.settings, command["id"], command.get("secret_env"))
    with request_secrets(env.values()):
        try:
            target = rt.dtma.target(toolbox)
            try:
                answer = rt.dtma.deploy(target, dtma_body(instance, env), rt.settings.DTMA_COMMAND_TIMEOUT_SECONDS)
                outcome, container_id, runtime_details = _outcome_of_answer(answer, name)
            except DtmaRejected as exc:
                if command["attempt"] > 1 and exc.status == 409 and _ALREADY_EXISTS in exc.agent_message:
                    outcome = _after_retry(rt, target, instance)
                else:
                    raise
        except AddressRefused as exc:
            outcome = Outcome(Status.ERROR, exc.message, 409, "toolbox_address_refused")
        except DtmaError as exc:
            outcome = from_dtma_error(exc, action="deploy", name=name)
        # The agent's words may quote the environment values (secrets: never stored or returned, in
        # whole or in part, in any letter case): such an answer is withheld (SECURITY.md).
        if quotes_secret(outcome.message, env.values()):
            outcome = replace(outcome, message=(
                f"the toolbox's answer to the deploy of {name} quoted part of a secret environment value, so it "
                f"is not shown; read it on the toolbox (the agent's log, or `docker logs {name}` if the container "
                "was created)"))
        outcome = replace(outcome, message=redact(outcome.message))
    # A deploy that never reached the agent created nothing: an error. No answer (to None): the
    # outcome is unknown, only the event is written; a heartbeat or the sweep's deadline settles it.
    to = Status.ERROR if not outcome.reached else outcome.to
    rt.db.call("cp_settle", p_instance_id=instance["id"], p_expected="deploying", p_to=to.value if to else None,
               p_message=outcome.message, p_container_id=container_id, p_runtime=runtime_details)
    return outcome


def _after_retry(rt: Ports, target: Target, instance: dict[str, Any]) -> Outcome:
    """A redelivered deploy whose first attempt reached the agent: what runs there now?"""
    name = instance["instance_name_on_toolbox"]
    try:
        listing = rt.dtma.tool_status(target, rt.settings.DTMA_STATUS_TIMEOUT_SECONDS)
    except DtmaError as exc:
        return Outcome(None, f"a retried deploy found {name} already on the toolbox and could not read its state "
                             f"({exc.message}); the next heartbeat will tell", 202, "accepted")
    item = next((i for i in listing["tool_instances"]
                 if isinstance(i, dict) and i.get("instance_name_on_toolbox") == name), None)
    if item is None or item.get("account_tool_instance_id") != instance["id"]:
        return Outcome(Status.ERROR, f"the toolbox already has a container named {name} that is not this deploy's; "
                                     "pick another name, or remove that container on the droplet", 409, "name_taken")
    if item.get("status") == "running":
        return Outcome(Status.RUNNING, f"container {name} is running (started by an earlier attempt of this deploy)",
                       201, "created")
    return Outcome(Status.ERROR, lifecycle.unexpected_exit(name, None), 502, "container_exited")


@dataclass
class _Result:
    """What a command ended with: None failure means the goal was reached."""

    failure: Outcome | None = None
    removed: bool = False
    left_on_toolbox: str | None = None
    confirmed: bool = True


class _Steps:
    """One action's conversation with the DTMA, recording each outcome as it comes."""

    def __init__(self, rt: Ports, target: Target | None, claim: dict[str, Any]) -> None:
        self.rt = rt
        self.target: Target = target  # type: ignore[assignment]  # None only to revert at once
        self.instance = claim["instance"]
        # Only a deploy holds the env values to check an agent's words against; for the other
        # actions on a server that has secret values, those words are never shown (SECURITY.md).
        self.withhold = bool(self.instance.get("env_var_names"))
        self.previous = claim["command"]["previous_status"]
        self.previous_error = claim["command"].get("previous_error")
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
            return self.revert(Status.STOPPING, from_dtma_error(
                exc, action="stop", name=self.name, withhold_agent_text=self.withhold))
        except DtmaError as exc:
            return self._failed(Status.STOPPING, exc, "stop")
        return None

    def start(self) -> Outcome | None:
        try:
            self.rt.dtma.start(self.target, self.name, self.timeout)
        except DtmaRejected as exc:
            if exc.status == 404:
                return self.not_managed(Status.STARTING, "start")
            failure = from_dtma_error(exc, action="start", name=self.name, withhold_agent_text=self.withhold)
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
                return _Result(self.revert(Status.DELETING, from_dtma_error(
                    exc, action="remove", name=self.name, withhold_agent_text=self.withhold)))
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
        failure = from_dtma_error(exc, action=verb, name=self.name, withhold_agent_text=self.withhold)
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


def _action(rt: Ports, claim: dict[str, Any]) -> _Result:
    command = claim["command"]
    try:
        target = rt.dtma.target(claim["toolbox"])
    except AddressRefused as exc:
        failure = Outcome(None, exc.message, 409, "toolbox_address_refused", reached=False)
        steps = _Steps(rt, None, claim)
        return _Result(steps.revert(Status(claim["instance"]["status_on_toolbox"]), failure))
    return _run(_Steps(rt, target, claim), command["action"], Status(claim["instance"]["status_on_toolbox"]))


def _record(outcome: Outcome | None, result: _Result | None = None,
            agent_calls: Sequence[dict[str, Any]] = ()) -> tuple[str, dict[str, Any]]:
    """(command status, outcome record). `done`: the agent answered and its answer is recorded on
    the server, whether success or failure; `failed`: it never answered (unreachable, no answer
    in time), so the command did not happen as asked. The record is what manage_mcp_server answers,
    plus `agent_calls`: every DTMA call the command made, in order, `{"op", "ms", "result", "status"}`
    (shared/adapters/dtma.py `recording`; docs/deploying.md "Metrics and logs")."""
    if result is not None:
        outcome = result.failure
        pending = outcome is None and not result.confirmed
        record: dict[str, Any] = {"http_status": 202 if pending else (outcome.http_status if outcome else 200),
                                  "code": outcome.code if outcome else ("removed" if result.removed else "done"),
                                  "message": outcome.message if outcome else None,
                                  "removed": result.removed, "left_on_toolbox": result.left_on_toolbox}
    else:
        assert outcome is not None
        record = {"http_status": outcome.http_status, "code": outcome.code, "message": outcome.message}
    record["agent_calls"] = list(agent_calls)
    failed = outcome is not None and (not outcome.reached or outcome.http_status == 202)
    return ("failed" if failed else "done"), record


def execute(rt: Ports, command_id: str, *, inline: bool = False) -> dict[str, Any]:
    """One delivery of one command; the answer is what the worker says to the queue. `inline`: run by
    the serving process's own bounded pool (TASKS_MODE=inline), which must not wait for a server to start
    listening (shared/usecases/mcp_health.py `after_start`)."""
    settings = rt.settings
    claim = rt.db.call("cp_claim_command", p_command_id=command_id,
                       p_lease_seconds=int(settings.DTMA_COMMAND_TIMEOUT_SECONDS * 2 + _LEASE_MARGIN_SECONDS),
                       p_max_per_toolbox=settings.TOOLBOX_MAX_CONCURRENT_COMMANDS)
    if not claim.get("run"):
        return claim
    began = time.perf_counter()
    calls: list[dict[str, Any]] = []  # the DTMA calls of this delivery, in order: the record's agent_calls
    action = claim["command"]["action"]
    started = False  # the command left the server running: time to check that its endpoint answers
    try:
        with recording(calls, command_id=command_id):
            if action == "deploy":
                outcome = _deploy(rt, claim)
                status, record = _record(outcome, agent_calls=calls)
                started = outcome.reached and outcome.to is Status.RUNNING
            else:
                result = _action(rt, claim)
                status, record = _record(None, result, agent_calls=calls)
                started = action in ("start", "restart") and result.failure is None and result.confirmed
    except secret_env.SealError as exc:
        message = f"{exc}; deploy it again"
        rt.db.call("cp_settle", p_instance_id=claim["instance"]["id"], p_expected="deploying", p_to="error",
                   p_message=message)
        status, record = "failed", {"http_status": 500, "code": "sealed_env_unreadable", "message": message,
                                    "agent_calls": list(calls)}
    rt.db.call("cp_finish_command", p_command_id=command_id, p_status=status, p_outcome=record)
    _log_outcome(claim, command_id, status, record, began)
    if started:  # after the outcome is recorded: manage_mcp_server's wait for it is not lengthened
        mcp_health.after_start(rt, claim["instance"], claim["toolbox"], wait=not inline)
    return {"state": status, "action": action, **record}


def _log_outcome(claim: dict[str, Any], command_id: str, status: str, record: dict[str, Any], began: float) -> None:
    """One `command_outcome` line per finished command, for the log-based metrics (deploy.sh gcp).
    `duration_ms` runs from the moment the command was recorded (the instance's `status_changed_at`,
    written in the same transaction as the command, and unchanged while it waits: a claim needs the
    status it was recorded with) to now; `run_ms` is this delivery's own part of it."""
    command, instance = claim["command"], claim["instance"]
    http = record.get("http_status")
    result = "pending" if http == 202 else \
        "succeeded" if status == "done" and isinstance(http, int) and http < 300 else "failed"
    run_ms = round((time.perf_counter() - began) * 1000, 1)
    try:
        recorded = datetime.fromisoformat(str(instance.get("status_changed_at")))
        recorded = recorded if recorded.tzinfo else recorded.replace(tzinfo=UTC)
        duration_ms: float | None = round(max((datetime.now(UTC) - recorded).total_seconds() * 1000, run_ms), 1)
    except ValueError:
        duration_ms = None
    fields = {"event": "command_outcome", "command_id": command_id, "action": command["action"],
              "toolbox_id": claim["toolbox"]["id"], "instance_id": instance["id"],
              "image": instance.get("docker_image_url"), "code": record.get("code"), "http_status": http,
              "result": result, "state": status, "duration_ms": duration_ms, "run_ms": run_ms,
              "attempt": command.get("attempt"), "dtma_calls": len(record.get("agent_calls") or ())}
    log.log(logging.WARNING if result == "failed" else logging.INFO,
            "command %s of %s on toolbox %s: %s (%s, %s) after %s ms, attempt %s", command["action"],
            instance.get("instance_name_on_toolbox"), fields["toolbox_id"], result, fields["code"], http,
            duration_ms, fields["attempt"], extra={"json_fields": fields})


def handle(call: Call, rt: Ports) -> Reply:
    """The worker's HTTP face: 200 when the delivery needs no repeat, 429 when it must come again.
    Only the queue's service account may deliver: its Google OIDC token is checked first (401)."""
    from shared.adapters import invoker_auth
    from shared.core.config import WORKER

    invoker_auth.authenticate(call.header("Authorization"), rt.settings, WORKER)
    body = call.json()
    raw = body.get("command_id") if isinstance(body, dict) else None
    try:
        command_id = str(UUID(str(raw)))
    except ValueError:
        raise invalid("command_id", "must be the UUID of a command") from None
    call.log_fields["command_id"] = command_id
    answer = execute(rt, command_id)
    call.log_fields.update({k: answer.get(k) for k in ("state", "action", "code", "wait") if k in answer})
    if "wait" in answer:
        return Reply(429, {"error": {"code": "retry_later", "message": answer["wait"], "details": {}}},
                     {"Retry-After": str(int(answer.get("retry_after") or 1))})
    return Reply(200, answer)
