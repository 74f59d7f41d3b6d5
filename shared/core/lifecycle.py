"""The instance state machine: stored statuses, who may move them where, and what users see.

The database enforces the transitions (`instance_status_transitions` in
sql/migrations/0003_state_machine.sql); this module is the same table for Python readers, the
docs/data-model.md and the tests (`tests/test_state_machine.py` fails if the two ever differ). It also holds
the rules the API applies on top: which user action may start from which status, what a
container report asks for, and the *effective* status shown to users, where a silent toolbox
makes everything `unknown` (Kubernetes' NodeStatusUnknown: staleness is not failure, and
recovery is automatic).

```
deploy   (api)      pending_deploy -> deploying -> running | stopped | error
stop     (api)      running -> stopping -> stopped
start    (api)      stopped | error -> starting -> running
restart  (api)      running -> stopping -> starting -> running   (stopped | error: as start)
remove   (api)      running | stopped | error -> deleting -> (row deleted, events kept)
reports  (heartbeat, dtma)  settled statuses follow the container: running, error; stopped only
                    when a stop was asked for (an exit nobody asked for is an error)
deadline (sweep)    pending_deploy | deploying | starting | stopping | deleting -> error
```
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum


class Status(StrEnum):
    """The values of account_tool_installation_status_enum this project writes."""

    PENDING_DEPLOY = "pending_deploy"
    DEPLOYING = "deploying"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    STARTING = "starting"
    ERROR = "error"
    DELETING = "deleting"


class Source(StrEnum):
    API = "api"
    HEARTBEAT = "heartbeat"
    SWEEP = "sweep"
    DTMA = "dtma"


class Effective(StrEnum):
    """What the web app shows (mcp_status `effective_status`)."""

    PENDING = "pending"
    DEPLOYING = "deploying"
    RUNNING = "running"
    STOPPED = "stopped"
    STARTING = "starting"
    STOPPING = "stopping"
    ERROR = "error"
    REMOVING = "removing"
    UNKNOWN = "unknown"


S, Src = Status, Source
_REPORTS = (Src.HEARTBEAT, Src.DTMA)  # observations of the toolbox: heartbeats and direct DTMA reads


def _each(frm: Status, to: Status, *sources: Source) -> set[tuple[Status, Status, Source]]:
    return {(frm, to, src) for src in sources}


TRANSITIONS: frozenset[tuple[Status, Status, Source]] = frozenset().union(
    _each(S.PENDING_DEPLOY, S.DEPLOYING, Src.API),
    _each(S.PENDING_DEPLOY, S.ERROR, Src.API, Src.SWEEP),
    _each(S.DEPLOYING, S.RUNNING, Src.API, *_REPORTS),
    _each(S.DEPLOYING, S.ERROR, Src.API, *_REPORTS, Src.SWEEP),
    _each(S.RUNNING, S.STOPPING, Src.API),
    _each(S.RUNNING, S.DELETING, Src.API),
    _each(S.RUNNING, S.STOPPED, *_REPORTS),
    _each(S.RUNNING, S.ERROR, *_REPORTS),
    _each(S.STOPPING, S.STOPPED, Src.API, *_REPORTS),
    _each(S.STOPPING, S.STARTING, Src.API),
    _each(S.STOPPING, S.ERROR, Src.API, Src.SWEEP),
    _each(S.STOPPING, S.RUNNING, Src.API),  # the stop never reached the agent: back as it was
    _each(S.STOPPED, S.STARTING, Src.API),
    _each(S.STOPPED, S.DELETING, Src.API),
    _each(S.STOPPED, S.RUNNING, *_REPORTS),
    _each(S.STOPPED, S.ERROR, *_REPORTS),
    _each(S.STARTING, S.RUNNING, Src.API, *_REPORTS),
    _each(S.STARTING, S.ERROR, Src.API, *_REPORTS, Src.SWEEP),
    _each(S.STARTING, S.STOPPED, Src.API),  # the start never reached the agent
    _each(S.ERROR, S.STARTING, Src.API),
    _each(S.ERROR, S.DELETING, Src.API),
    _each(S.ERROR, S.RUNNING, *_REPORTS),
    _each(S.DELETING, S.ERROR, Src.API, Src.SWEEP),
    _each(S.DELETING, S.RUNNING, Src.API),  # the removal never reached the agent
    _each(S.DELETING, S.STOPPED, Src.API),
)


def allowed(frm: str, to: str, source: str) -> bool:
    return (frm, to, source) in TRANSITIONS


@dataclass(frozen=True)
class Action:
    """A user action: for each status it may start from, the transitional status it records."""

    name: str
    plan: dict[Status, Status]


_REMOVE = {S.RUNNING: S.DELETING, S.STOPPED: S.DELETING, S.ERROR: S.DELETING}
ACTIONS: dict[str, Action] = {
    "start": Action("start", {S.STOPPED: S.STARTING, S.ERROR: S.STARTING}),
    "stop": Action("stop", {S.RUNNING: S.STOPPING}),
    # restart = stop, then start: from running it passes through stopping; a stopped or failed
    # server is simply started.
    "restart": Action("restart", {S.RUNNING: S.STOPPING, S.STOPPED: S.STARTING, S.ERROR: S.STARTING}),
    "remove": Action("remove", _REMOVE),
    "delete": Action("remove", _REMOVE),
}


# Stored values that are not ours (legacy rows of Agentopia's other tools) and the status of this
# state machine each one means. The database applies the same table (`cp_canonical_status`,
# sql/migrations/0003_state_machine.sql) the first time a report concerns such a row, so legacy
# rows are reconciled like any other; tests/test_state_machine.py feeds both the same cases.
LEGACY_STATUSES: dict[str, Status] = {
    "active": S.RUNNING, "installing": S.DEPLOYING, "pending_install": S.PENDING_DEPLOY,
    "pending_config": S.PENDING_DEPLOY, "error_install": S.ERROR, "error_uninstall": S.ERROR,
    "error_runtime": S.ERROR, "disabled": S.STOPPED, "uninstalled": S.STOPPED,
    "pending_delete": S.DELETING, "uninstalling": S.DELETING, "pending_uninstall": S.DELETING,
}


def canonical(stored: str) -> str:
    """The state machine's name for a stored status (legacy values mapped)."""
    return LEGACY_STATUSES.get(stored, stored)


_EFFECTIVE: dict[str, Effective] = {
    S.PENDING_DEPLOY: Effective.PENDING, S.DEPLOYING: Effective.DEPLOYING, S.RUNNING: Effective.RUNNING,
    S.STOPPED: Effective.STOPPED, S.STARTING: Effective.STARTING, S.STOPPING: Effective.STOPPING,
    S.ERROR: Effective.ERROR, S.DELETING: Effective.REMOVING,
}

# Named groups of statuses. The SQL spells them out (a partial index predicate must, and the
# planner matches the sweep's query against it); tests/test_status_groups.py holds every such list
# in sql/migrations/ equal to one of these.
TRANSITIONAL = frozenset({S.PENDING_DEPLOY, S.DEPLOYING, S.STARTING, S.STOPPING, S.DELETING})
ACTIONS_IN_FLIGHT = frozenset({S.STARTING, S.STOPPING, S.DELETING})
EXPECTED_ON_TOOLBOX = frozenset({S.RUNNING, S.STOPPED})  # a container must be listed for these
ASKED_TO_STOP = frozenset({S.STOPPING, S.STOPPED})  # an exit reads as a stop only for these
TOOLBOX_DEPROVISIONING = frozenset({"pending_deprovision", "deprovisioning", "deprovisioned", "error_deprovisioning"})
TOOLBOX_REVIVED_BY_HEARTBEAT = frozenset({"provisioning", "awaiting_heartbeat", "unresponsive", "error_provisioning"})
TOOLBOX_WATCHED_FOR_SILENCE = frozenset({"active", "awaiting_heartbeat"})
STATUS_GROUPS: dict[str, frozenset[str]] = {
    "TRANSITIONAL": TRANSITIONAL, "ACTIONS_IN_FLIGHT": ACTIONS_IN_FLIGHT, "EXPECTED_ON_TOOLBOX": EXPECTED_ON_TOOLBOX,
    "ASKED_TO_STOP": ASKED_TO_STOP, "TOOLBOX_DEPROVISIONING": TOOLBOX_DEPROVISIONING,
    "TOOLBOX_REVIVED_BY_HEARTBEAT": TOOLBOX_REVIVED_BY_HEARTBEAT,
    "TOOLBOX_WATCHED_FOR_SILENCE": TOOLBOX_WATCHED_FOR_SILENCE,
}

# Toolbox statuses in which its agent's reports are current; any other (unresponsive,
# provisioning, deprovisioning...) means we do not know what runs there now.
LIVE_TOOLBOX_STATUSES = frozenset({"active"})


def is_stale(toolbox_status: str, heartbeat_age_seconds: float | None, stale_after_seconds: float) -> bool:
    """True when what we last heard from the toolbox can no longer be trusted."""
    if toolbox_status not in LIVE_TOOLBOX_STATUSES:
        return True
    return heartbeat_age_seconds is None or heartbeat_age_seconds > stale_after_seconds


def effective_status(stored: str, *, stale: bool) -> Effective:
    """The status a user sees: the stored one, unless the toolbox has gone silent."""
    if stale:
        return Effective.UNKNOWN
    return _EFFECTIVE.get(canonical(stored), Effective.UNKNOWN)


def health(effective: Effective, heartbeat_age_seconds: float | None, degraded_after_seconds: float) -> str:
    """healthy / degraded / unhealthy / unknown, from the reported state and its freshness."""
    if effective is Effective.RUNNING:
        if heartbeat_age_seconds is not None and heartbeat_age_seconds <= degraded_after_seconds:
            return "healthy"
        return "degraded"
    if effective is Effective.ERROR:
        return "unhealthy"
    return "unknown"


# --- What a report from the toolbox means for an instance -------------------------------------
# Docker container states (the `state` field of a container summary) -> the status a report of
# that state asks for. None: a passing state that says nothing yet (keep what we have).
# `exited` depends on the exit code, parsed from Docker's status text ("Exited (1) 5 minutes ago").
DOCKER_STATES: dict[str, tuple[Status | None, str]] = {
    "created": (None, "container {name} is created but not started yet"),
    "running": (S.RUNNING, "container {name} is running"),
    "restarting": (S.ERROR, "container {name} keeps restarting: it exits and Docker starts it again"),
    "removing": (None, "container {name} is being removed"),
    "paused": (S.STOPPED, "container {name} is paused"),
    "exited": (S.STOPPED, "container {name} stopped"),
    "dead": (S.ERROR, "container {name} is dead: Docker could not stop or remove it"),
}
_EXIT_CODE = re.compile(r"^Exited \((-?\d+)\)")
# What the agent answers when it cannot reach Docker (the socket on a droplet, TCP elsewhere).
DOCKER_DOWN = re.compile(r"connect (?:ECONNREFUSED|ENOENT)|Cannot connect to the Docker daemon")

# Status strings other agents put in the instance-format `status_on_toolbox` (the original
# backend passed them through raw, W12/W14): upper-case DTMA words and Docker states.
_REPORTED_WORDS: dict[str, Status | None] = {
    "RUNNING": S.RUNNING, "STOPPED": S.STOPPED, "ERROR": S.ERROR, "FAILED": S.ERROR,
    "PENDING": None, "STARTING": None, "STOPPING": None, "UNKNOWN": None,
}


def exit_code(status_text: str) -> int | None:
    match = _EXIT_CODE.match(status_text or "")
    return int(match.group(1)) if match else None


def observed_from_docker(state: str, status_text: str, name: str) -> tuple[Status | None, str]:
    """The status a container summary asks for, and the sentence recorded with it.

    For `exited` this is the reading of a stop that was asked for; `unexpected_exit` is the
    reading of an exit nobody asked for. The database picks one by the instance's status
    (`cp_reconcile_toolbox`): only a `stopping` or `stopped` instance was asked to stop.
    """
    if state not in DOCKER_STATES:
        # Not through str.format: the state is the agent's text and may hold braces.
        return None, f"container {name} is in unknown Docker state {state!r}"
    target, message = DOCKER_STATES[state]
    if state == "exited":
        code = exit_code(status_text)
        return S.STOPPED, f"container {name} stopped" + (f" (exit code {code})" if code is not None else "")
    return target, message.format(name=name)


def unexpected_exit(name: str, code: int | None) -> str:
    """Why a container that nobody asked to stop is an error, in words a user can act on."""
    if code is None:
        return (f"container {name} exited unexpectedly (the agent's status read does not carry the exit code; "
                "the next heartbeat will). Check its logs on the toolbox (docker logs "
                f"{name}), then restart or remove it")
    return (f"container {name} exited unexpectedly with code {code}. Check its logs on the toolbox (docker logs "
            f"{name}), then restart or remove it")


def observed_from_report(value: str, name: str) -> tuple[Status | None, str]:
    """The status an instance-format item's `status_on_toolbox` asks for."""
    if value in DOCKER_STATES:
        return observed_from_docker(value, "", name)
    if value in {S.RUNNING, S.STOPPED, S.ERROR}:
        return Status(value), f"toolbox reports {name} {value}"
    word = _REPORTED_WORDS.get(value.upper())
    if word is not None:
        return word, f"toolbox reports {name} {value.lower()}"
    return None, f"toolbox reports {name} as {value!r}"
