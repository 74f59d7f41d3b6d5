"""deploy_mcp_server: put an MCP server on one of the caller's toolboxes, answering at once.

Order of events:
1. validate the request (nothing recorded if it is wrong);
2. record the instance and its deploy command in one transaction (`cp_record_deploy_command`):
   owner, toolbox state (active, Docker up), name and host port are checked under a toolbox lock,
   around every name and port the toolbox reports in use; the instance moves pending_deploy ->
   deploying with events; the environment values travel sealed in the command (shared/adapters/secret_env.py);
3. enqueue the command (shared/adapters/tasks.py) and answer 202 with the server. The command worker
   (shared/usecases/commands.py) holds the agent's synchronous `POST /tools` as long as the pull takes and
   records `running`, or `error` with the agent's reason, the moment the agent answers. If the
   queue does not take the task, the command stays recorded and the sweep enqueues it again.
"""

from __future__ import annotations

import logging
import uuid

from shared.adapters import secret_env
from shared.adapters.auth import authenticate
from shared.adapters.http import Call, Reply
from shared.adapters.logging import request_secrets
from shared.core.errors import ApiError, DomainError, invalid
from shared.core.models import DeployRequest
from shared.core.names import free_name
from shared.core.plan_body import PLAN_PATHS, Deploy, parse_deploy
from shared.usecases import commands_queue, idempotency, view
from shared.usecases.ports import Ports

log = logging.getLogger("mcp.deploy")


# The HostIp of the port binding for each `publish` choice (shared/core/models.py DeployRequest).
# None: no HostIp, Docker's default, every address of the droplet (what deploys did before the
# choice existed, so the agent's body for "public" is unchanged). "private" has no entry: it needs
# the droplet's VPC address, which nothing records (see _check_publish).
HOST_IPS: dict[str, str | None] = {"public": None, "loopback": "127.0.0.1"}


def _check_publish(request: DeployRequest, field: str = "publish") -> None:
    """Refuse `publish: "private"` before anything is recorded: it needs the droplet's private (VPC)
    address, and no toolbox has one on record. The toolbox row keeps only `public_ip_address` and
    the agent's heartbeat reports none (its `system_status` is CPU, memory and disk). Once
    provisioning records the VPC address on the toolbox, `cp_record_deploy` can bind to it instead."""
    if request.publish not in HOST_IPS:
        raise invalid(field, f"{request.publish!r} needs the toolbox's private (VPC) address, which this service "
                      "does not know: toolboxes record only their public address and the DTMA agent's heartbeat "
                      "does not report one. Use \"loopback\" (reachable from the droplet only), or \"public\" with a "
                      "DigitalOcean cloud firewall limiting the port to its consumers",
                      code="private_address_unknown")


def _check_ports(request: DeployRequest, rt: Ports, field: str = "host_port") -> None:
    """Ports below 1024 are a setting's business; the agent's own port is refused where the
    toolbox's port is known, in `cp_record_deploy`."""
    if request.host_port is not None and request.host_port < 1024 and not rt.settings.ALLOW_PRIVILEGED_PORTS:
        raise invalid(field, "ports below 1024 are not allowed")


# How many of the toolbox's servers a name collision reads to suggest a free name (pages of 100).
SUGGESTION_PAGES = 5


def _names_on_toolbox(rt: Ports, user_id: str, toolbox_id: str) -> set[str]:
    """The names of the caller's servers on one toolbox (a toolbox has one owner, so: all of them)."""
    names: set[str] = set()
    cursor = None
    for _ in range(SUGGESTION_PAGES):
        page = rt.db.call("cp_list_mcp_servers", p_user_id=user_id, p_toolbox_id=toolbox_id, p_limit=100,
                          p_cursor=cursor)
        names.update(item["name"] for item in page["items"])
        cursor = page.get("next_cursor")
        if cursor is None:
            break
    return names


def _name_taken(rt: Ports, user_id: str, request: DeployRequest, err: DomainError) -> ApiError:
    """A name collision, with a free name to use instead: the refusal is kept (a retried click must
    not deploy a second copy), and the sentence says which name would be accepted. Only on this
    path does the deploy read the toolbox's names, so a deploy that goes through costs nothing more."""
    taken = _names_on_toolbox(rt, user_id, str(request.toolbox_id)) | {request.name}
    if "container" in err.details:
        taken.add(str(err.details["container"]))
    suggestion = free_name(request.name, taken)
    if suggestion is None:
        return err
    return ApiError(err.status, err.code, f"{err.message}; {suggestion!r} is free",
                    {**err.details, "suggested_name": suggestion})


def deploy(rt: Ports, user_id: str, request: DeployRequest, extra: Deploy | None = None) -> Reply:
    settings = rt.settings
    low, high = settings.host_port_range
    command_id = str(uuid.uuid4())
    spec = {"name": request.name, "image": request.image,
            "catalog_id": str(request.catalog_id) if request.catalog_id else None,
            "transport": request.transport, "container_port": request.container_port,
            "host_port": request.host_port, "endpoint_path": request.endpoint_path,
            "env_names": sorted(request.env), "capabilities": request.capabilities,
            "publish": request.publish, "host_ip": HOST_IPS[request.publish]}
    if extra is not None and extra.display_name is not None:
        # The plan's body: what the person typed, and its discovery metadata (shared/core/plan_body.py).
        spec |= {"display_name": extra.display_name, "discovery_metadata": extra.discovery_metadata}
    try:
        recorded = rt.db.call(
            "cp_record_deploy_command", p_user_id=user_id, p_toolbox_id=str(request.toolbox_id), p_spec=spec,
            p_policy={"port_low": low, "port_high": high, "dtma_port": settings.DTMA_PORT,
                      "allow_internal": settings.ALLOW_PRIVATE_TOOLBOX_IPS},
            p_command_id=command_id, p_secret_env=secret_env.seal(settings, command_id, request.env))
    except DomainError as err:
        if err.status == 409 and err.details.get("field") == "name":
            raise _name_taken(rt, user_id, request, err) from None
        raise
    commands_queue.send(rt, command_id)
    return Reply(202, view.read_server(rt, user_id, recorded["instance"]["id"]))


def handle(call: Call, rt: Ports) -> Reply:
    user = authenticate(call.header("Authorization"), rt.verifier)
    if call.path not in ("", "/"):
        raise ApiError(404, "not_found", f"no such route: {call.method} {call.path}")
    body = call.json()
    parsed = parse_deploy(body, user.user_id)
    request = parsed.request
    # Problems are named as the body named the field (the plan's body: its own paths).
    where = PLAN_PATHS if parsed.shape == "plan" else {}
    _check_ports(request, rt, where.get("host_port", "host_port"))
    _check_publish(request, where.get("publish", "publish"))
    call.log_fields.update({"user_id": user.user_id, "toolbox_id": str(request.toolbox_id), "body_shape": parsed.shape})
    with request_secrets(request.env.values()):
        return idempotency.run(rt.db, rt.settings, call, user_id=user.user_id, scope="deploy", body=body,
                               work=lambda: deploy(rt, user.user_id, request, parsed))
