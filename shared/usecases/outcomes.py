"""What a DTMA failure means for an instance, for the user, and for the HTTP answer.

Deploy and every manage action map DTMA failures the same way, here, once. The agent's words are
translated into a sentence a user can act on; what the real agent says in each case is recorded in
docs/real-agent.md.

| DTMA said                                   | instance             | HTTP | code                 |
|---------------------------------------------|----------------------|------|----------------------|
| no answer (timeout, connection broke)       | unchanged (deadline) | 202  | `accepted`           |
| connection refused / DNS / connect timeout  | as before the action | 502  | `toolbox_unreachable`|
| 409 (name or port in its own map)           | error                | 409  | `conflict`           |
| 500 "port is already allocated"             | error                | 409  | `host_port_taken`    |
| 500 Docker 409 "name ... already in use"    | error                | 409  | `name_taken`         |
| 500 pull denied / "No such image"           | error                | 502  | `image_pull_failed`  |
| 500 connect ECONNREFUSED/ENOENT (Docker)    | error                | 502  | `docker_down`        |
| 401 / 403                                   | error                | 502  | `toolbox_key_rejected` |
| any other status, bad body                  | error                | 502  | `toolbox_failed`     |

`reached` is False when the request never arrived at the agent, so callers put the instance
back where it was instead of recording a failure the toolbox never saw.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from shared.adapters.dtma import DtmaBadResponse, DtmaError, DtmaRejected, DtmaTimeout, DtmaUnreachable
from shared.core.lifecycle import DOCKER_DOWN, Status

_PORT_TAKEN = re.compile(r"Bind for (?:\[[^\]]*\]|[^ :]+):(\d+) failed: port is already allocated")
_NAME_TAKEN = re.compile(r'container name "/?([^"]+)" is already in use')


@dataclass(frozen=True)
class Outcome:
    to: Status | None
    message: str
    http_status: int
    code: str
    reached: bool = True


# What stands for the agent's own words about a server that holds secret env values (SECURITY.md).
WITHHELD = ("[the agent's message is not shown: this server has secret environment values, which an agent's "
            "error may quote; read it in the agent's log on the droplet]")


def from_dtma_error(exc: DtmaError, *, action: str, name: str, withhold_agent_text: bool = False) -> Outcome:
    """The outcome of a failed call. `withhold_agent_text`: the server has secret env values and the
    action's caller cannot check the agent's words against them (only a deploy holds the values),
    so those words are classified but never shown or stored."""
    if isinstance(exc, DtmaTimeout):
        return Outcome(None, f"{exc.message}; it may still be working on it: the next heartbeat will tell whether "
                             f"{name} is up", 202, "accepted")
    if isinstance(exc, DtmaUnreachable):
        return Outcome(None, f"the {action} of {name} never reached the toolbox: {exc.message}. Nothing changed on "
                             f"the toolbox; check that the droplet is running and its port is open, then try again",
                       502, "toolbox_unreachable", reached=False)
    if isinstance(exc, DtmaRejected):
        return _rejected(exc, action=action, name=name, shown=WITHHELD if withhold_agent_text else exc.agent_message)
    message = f"the toolbox's answer to the {action} of {name} was not usable {WITHHELD}" if withhold_agent_text \
        else exc.message
    if isinstance(exc, DtmaBadResponse):
        return Outcome(Status.ERROR, f"{message}; {name}'s state will be known at the next heartbeat", 502,
                       "toolbox_failed")
    return Outcome(Status.ERROR, message, 502, "toolbox_failed")


def _rejected(exc: DtmaRejected, *, action: str, name: str, shown: str) -> Outcome:
    """Classified by the agent's words (`said`); only `shown` is ever displayed."""
    said = exc.agent_message
    if exc.status == 409:
        return Outcome(Status.ERROR, f"the toolbox refused to {action} {name}: {shown}", 409, "conflict")
    if exc.status in (401, 403):
        return Outcome(Status.ERROR, f"the toolbox agent refused the backend's key ({exc.status}); reissue "
                                     "the toolbox's credentials (mcp-toolbox credentials) and restart its "
                                     "agent", 502, "toolbox_key_rejected")
    if match := _PORT_TAKEN.search(said):
        return Outcome(Status.ERROR, f"host port {match[1]} is already taken on the toolbox by a container this "
                                     f"service does not manage, so {name} could not start. The agent left a "
                                     f"container named {name} behind that it cannot remove: remove this server, "
                                     f"run docker rm -f {name} on the droplet, then deploy again (leave host_port "
                                     "out to get a free port)", 409, "host_port_taken")
    if match := _NAME_TAKEN.search(said):
        return Outcome(Status.ERROR, f"a container named {match[1]} already exists on the toolbox and was not "
                                     "created by this deploy; pick another name, or remove that container on the "
                                     "droplet", 409, "name_taken")
    if "pull access denied" in said or "manifest unknown" in said:
        return Outcome(Status.ERROR, f"the toolbox could not pull the image for {name}: {shown}. Check the image "
                                     "name and tag, or make the image public", 502, "image_pull_failed")
    if "No such image" in said:
        # The agent misses errors reported inside Docker's pull stream and then fails to create
        # the container with "No such image" (docs/real-agent.md).
        return Outcome(Status.ERROR, f"the toolbox could not pull the image for {name}: the pull failed on the "
                                     f"toolbox (the agent reports: {shown}). Check the image name and tag, that "
                                     "the registry lets the droplet pull it, and the droplet's disk space", 502,
                       "image_pull_failed")
    if DOCKER_DOWN.search(said):
        return Outcome(Status.ERROR, f"Docker is not answering on the toolbox, so the agent could not {action} "
                                     f"{name} (it says: {shown}). On the droplet: systemctl status docker", 502,
                       "docker_down")
    return Outcome(Status.ERROR, f"the toolbox failed to {action} {name} ({exc.status}): {shown}", 502,
                   "toolbox_failed")
