"""What a DTMA failure means for an instance, for the user, and for the HTTP answer.

Deploy and every manage action map DTMA failures the same way, here, once:

| DTMA said                         | instance        | HTTP | why                                         |
|-----------------------------------|-----------------|------|---------------------------------------------|
| nothing within the budget         | unchanged       | 202  | it may still be pulling; heartbeat settles  |
| connection refused / DNS / timeout| error           | 502  | the request never arrived                   |
| 409 (name or port in use)         | error           | 409  | the user can pick another name or port      |
| 401 / 403                         | error           | 502  | the toolbox holds another key: reissue it   |
| any other status, bad body        | error           | 502  | the toolbox failed; its words are quoted    |
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.dtma import DtmaBadResponse, DtmaError, DtmaRejected, DtmaTimeout, DtmaUnreachable
from shared.lifecycle import Status


@dataclass(frozen=True)
class Outcome:
    to: Status | None
    message: str
    http_status: int
    code: str


def from_dtma_error(exc: DtmaError, *, action: str, name: str) -> Outcome:
    if isinstance(exc, DtmaTimeout):
        return Outcome(None, f"{exc.message}; it may still be working on it: the next heartbeat will tell "
                             f"whether {name} is up", 202, "accepted")
    if isinstance(exc, DtmaUnreachable):
        return Outcome(Status.ERROR, f"{exc.message}: check that the droplet is running and its port is "
                                     f"open, then {action} {name} again", 502, "toolbox_unreachable")
    if isinstance(exc, DtmaRejected):
        said = exc.agent_message
        if exc.status == 409:
            return Outcome(Status.ERROR, f"the toolbox refused to {action} {name}: {said}", 409, "conflict")
        if exc.status in (401, 403):
            return Outcome(Status.ERROR, f"the toolbox agent refused the backend's key ({exc.status}); reissue "
                                         "the toolbox's credentials (mcp-toolbox-credentials) and restart its "
                                         "agent", 502, "toolbox_key_rejected")
        if "pull access denied" in said or "No such image" in said or "manifest unknown" in said:
            return Outcome(Status.ERROR, f"the toolbox could not pull the image for {name}: {said}. Check the "
                                         "image name and tag, or make the image public", 502, "image_pull_failed")
        return Outcome(Status.ERROR, f"the toolbox failed to {action} {name} ({exc.status}): {said}", 502,
                       "toolbox_failed")
    if isinstance(exc, DtmaBadResponse):
        return Outcome(Status.ERROR, f"{exc.message}; {name}'s state will be known at the next heartbeat", 502,
                       "toolbox_failed")
    return Outcome(Status.ERROR, exc.message, 502, "toolbox_failed")
