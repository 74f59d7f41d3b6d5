"""deploy_mcp_server: put an MCP server on one of the caller's toolboxes.

Order of events, each step one database call:
1. validate the request (nothing recorded if it is wrong);
2. record the instance: owner, toolbox state (active, Docker up), name and host port are checked
   under a toolbox lock, around every name and port the toolbox reports in use, and it moves
   pending_deploy -> deploying with events (`cp_record_deploy`);
3. command the DTMA `POST /tools` as a background command (shared/background.py): the agent
   pulls the image inside that request, which can take minutes. The request waits at most
   DTMA_DEPLOY_BUDGET_SECONDS, then answers 202; the command goes on and records the outcome
   the moment the agent answers (`cp_settle`): running, or error with the agent's reason.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from shared import background, idempotency, lifecycle, status
from shared.auth import authenticate
from shared.dtma import AddressRefused, DtmaError
from shared.errors import ApiError
from shared.http import Call, Reply
from shared.logging import redact, request_secrets
from shared.models import DeployRequest, parse
from shared.outcomes import Outcome, from_dtma_error
from shared.runtime import Runtime

log = logging.getLogger("mcp.deploy")


def _check_ports(request: DeployRequest, rt: Runtime) -> None:
    settings = rt.settings
    if request.host_port is not None:
        if request.host_port == settings.DTMA_PORT:
            raise ApiError(400, "invalid_request", f"host_port: {request.host_port} is the toolbox agent's own port",
                           {"field": "host_port"})
        if request.host_port < 1024 and not settings.ALLOW_PRIVILEGED_PORTS:
            raise ApiError(400, "invalid_request", "host_port: ports below 1024 are not allowed",
                           {"field": "host_port"})


def dtma_body(instance: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """The body of DTMA's `POST /tools` (docs/real-agent.md): the agent reads only Env and PortBindings."""
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


def _command(rt: Runtime, instance: dict[str, Any], toolbox: dict[str, Any], env: dict[str, str]) -> Outcome:
    """Call the agent (as long as a pull can take) and record what it answered."""
    name = instance["instance_name_on_toolbox"]
    container_id, runtime_details = None, None
    try:
        target = rt.dtma.target(toolbox)
        answer = rt.dtma.deploy(target, dtma_body(instance, env), rt.settings.DTMA_COMMAND_TIMEOUT_SECONDS)
        outcome, container_id, runtime_details = _outcome_of_answer(answer, name)
    except AddressRefused as exc:
        outcome = Outcome(lifecycle.Status.ERROR, exc.message, 409, "toolbox_address_refused")
    except DtmaError as exc:
        outcome = from_dtma_error(exc, action="deploy", name=name)
    # The agent's words may quote the request's env values (secrets: never stored or returned).
    outcome = replace(outcome, message=redact(outcome.message))
    # A deploy that never reached the agent created nothing: an error. No answer (to None): the
    # outcome is unknown, only the event is written; a heartbeat or the sweep's deadline settles it.
    to = lifecycle.Status.ERROR if not outcome.reached else outcome.to
    rt.db.call("cp_settle", p_instance_id=instance["id"], p_expected="deploying", p_to=to.value if to else None,
               p_message=outcome.message, p_container_id=container_id, p_runtime=runtime_details)
    return outcome


def deploy(rt: Runtime, user_id: str, request: DeployRequest) -> Reply:
    settings = rt.settings
    low, high = settings.host_port_range
    recorded = rt.db.call(
        "cp_record_deploy", p_user_id=user_id, p_toolbox_id=str(request.toolbox_id),
        p_spec={"name": request.name, "image": request.image,
                "catalog_id": str(request.catalog_id) if request.catalog_id else None,
                "transport": request.transport, "container_port": request.container_port,
                "host_port": request.host_port, "endpoint_path": request.endpoint_path,
                "env_names": sorted(request.env), "capabilities": request.capabilities},
        p_policy={"port_low": low, "port_high": high, "dtma_port": settings.DTMA_PORT,
                  "allow_internal": settings.ALLOW_PRIVATE_TOOLBOX_IPS})
    instance, toolbox = recorded["instance"], recorded["toolbox"]
    done, outcome = background.run_within(settings.DTMA_DEPLOY_BUDGET_SECONDS,
                                          lambda: _command(rt, instance, toolbox, request.env))
    view = status.read_server(rt, user_id, instance["id"])
    if not done or outcome is None or outcome.http_status == 202:
        return Reply(202, view)
    if outcome.http_status >= 400:
        raise ApiError(outcome.http_status, outcome.code, outcome.message, {"server": view})
    return Reply(outcome.http_status, view)


def handle(call: Call, rt: Runtime) -> Reply:
    user = authenticate(call.header("Authorization"), rt.verifier)
    if call.path not in ("", "/"):
        raise ApiError(404, "not_found", f"no such route: {call.method} {call.path}")
    body = call.json()
    request = parse(DeployRequest, body)
    _check_ports(request, rt)
    call.log_fields.update({"user_id": user.user_id, "toolbox_id": str(request.toolbox_id)})
    with request_secrets(request.env.values()):
        return idempotency.run(rt.db, rt.settings, call, user_id=user.user_id, scope="deploy", body=body,
                               work=lambda: deploy(rt, user.user_id, request))
