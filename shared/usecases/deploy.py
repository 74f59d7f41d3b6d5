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
from shared.core.errors import ApiError, invalid
from shared.core.models import DeployRequest, parse
from shared.usecases import commands_queue, idempotency, view
from shared.usecases.ports import Ports

log = logging.getLogger("mcp.deploy")


# The HostIp of the port binding for each `publish` choice (shared/core/models.py DeployRequest).
# None: no HostIp, Docker's default, every address of the droplet (what deploys did before the
# choice existed, so the agent's body for "public" is unchanged). "private" has no entry: it needs
# the droplet's VPC address, which nothing records (see _check_publish).
HOST_IPS: dict[str, str | None] = {"public": None, "loopback": "127.0.0.1"}


def _check_publish(request: DeployRequest) -> None:
    """Refuse `publish: "private"` before anything is recorded: it needs the droplet's private (VPC)
    address, and no toolbox has one on record. The toolbox row keeps only `public_ip_address` and
    the agent's heartbeat reports none (its `system_status` is CPU, memory and disk). Once
    provisioning records the VPC address on the toolbox, `cp_record_deploy` can bind to it instead."""
    if request.publish not in HOST_IPS:
        raise invalid("publish", f"{request.publish!r} needs the toolbox's private (VPC) address, which this service "
                      "does not know: toolboxes record only their public address and the DTMA agent's heartbeat "
                      "does not report one. Use \"loopback\" (reachable from the droplet only), or \"public\" with a "
                      "DigitalOcean cloud firewall limiting the port to its consumers",
                      code="private_address_unknown")


def _check_ports(request: DeployRequest, rt: Ports) -> None:
    """Ports below 1024 are a setting's business; the agent's own port is refused where the
    toolbox's port is known, in `cp_record_deploy`."""
    if request.host_port is not None and request.host_port < 1024 and not rt.settings.ALLOW_PRIVILEGED_PORTS:
        raise invalid("host_port", "ports below 1024 are not allowed")


def deploy(rt: Ports, user_id: str, request: DeployRequest) -> Reply:
    settings = rt.settings
    low, high = settings.host_port_range
    command_id = str(uuid.uuid4())
    recorded = rt.db.call(
        "cp_record_deploy_command", p_user_id=user_id, p_toolbox_id=str(request.toolbox_id),
        p_spec={"name": request.name, "image": request.image,
                "catalog_id": str(request.catalog_id) if request.catalog_id else None,
                "transport": request.transport, "container_port": request.container_port,
                "host_port": request.host_port, "endpoint_path": request.endpoint_path,
                "env_names": sorted(request.env), "capabilities": request.capabilities,
                "publish": request.publish, "host_ip": HOST_IPS[request.publish]},
        p_policy={"port_low": low, "port_high": high, "dtma_port": settings.DTMA_PORT,
                  "allow_internal": settings.ALLOW_PRIVATE_TOOLBOX_IPS},
        p_command_id=command_id, p_secret_env=secret_env.seal(settings, command_id, request.env))
    commands_queue.send(rt, command_id)
    return Reply(202, view.read_server(rt, user_id, recorded["instance"]["id"]))


def handle(call: Call, rt: Ports) -> Reply:
    user = authenticate(call.header("Authorization"), rt.verifier)
    if call.path not in ("", "/"):
        raise ApiError(404, "not_found", f"no such route: {call.method} {call.path}")
    body = call.json()
    request = parse(DeployRequest, body)
    _check_ports(request, rt)
    _check_publish(request)
    call.log_fields.update({"user_id": user.user_id, "toolbox_id": str(request.toolbox_id)})
    with request_secrets(request.env.values()):
        return idempotency.run(rt.db, rt.settings, call, user_id=user.user_id, scope="deploy", body=body,
                               work=lambda: deploy(rt, user.user_id, request))
