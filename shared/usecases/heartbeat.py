"""dtma_heartbeat_ingest: what an agent's heartbeat means for its toolbox and instances.

Python's part is to authenticate the agent, validate the payload and turn every
`tool_statuses` item into an observation (reports.py) (which instance, which status it asks for, and why);
the database's part (`cp_ingest_heartbeat`, sql/migrations/0005_heartbeat.sql and
0012_heartbeat_digest.sql) is to match, apply and record them in one round trip. A beat that says
what the previous one said (the steady state of a fleet) is recognised there by the digest of its
report and only stamps the toolbox's liveness. Items come in two formats, detected per item:

* instance format `{account_tool_instance_id, status_on_toolbox, ...}` (what the original
  backend expected);
* container format: the Docker container summaries the real DTMA sends today
  (docs/real-agent.md), matched to the instance this service created on this toolbox: by
  container id once known, else by name for a container created after the instance was recorded.

An item `{"error": ...}` means the agent could not talk to Docker: the toolbox's Docker is
recorded as unhealthy and no instance changes.

The token is checked before the body is read (`RecentTokens`), so an unknown caller cannot make
the function parse a megabyte; a steady agent's beat stays one round trip.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time

from shared.adapters.http import Call, Reply
from shared.core.config import Settings
from shared.core.errors import ApiError
from shared.usecases.ports import Ports
from shared.usecases.reports import HeartbeatReport, build_report, report_key, with_liveness

log = logging.getLogger("mcp.heartbeat")


def bearer_token(call: Call) -> str:
    header = call.header("Authorization") or ""
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise ApiError(401, "unauthenticated", "Authorization header must be 'Bearer <toolbox token>'",
                       headers={"WWW-Authenticate": "Bearer"})
    return token


class RecentTokens:
    """Digests of toolbox tokens this instance saw accepted lately.

    A token is checked before its body is read, so an unauthenticated caller cannot make us read
    and validate up to a megabyte; for a token accepted within `ttl` that check is skipped,
    so a steady heartbeat stays one database round trip (the ingest itself checks the token
    again: a revoked token is refused there, and forgotten here). Bounded, oldest out first.
    """

    def __init__(self, ttl: float = 600.0, capacity: int = 20_000) -> None:
        self._ttl, self._capacity = ttl, capacity
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def __contains__(self, digest: str) -> bool:
        expires = self._seen.get(digest)
        return expires is not None and expires > time.monotonic()

    def add(self, digest: str) -> None:
        with self._lock:
            self._seen.pop(digest, None)
            self._seen[digest] = time.monotonic() + self._ttl
            while len(self._seen) > self._capacity:
                del self._seen[next(iter(self._seen))]

    def discard(self, digest: str) -> None:
        with self._lock:
            self._seen.pop(digest, None)

    def clear(self) -> None:
        with self._lock:
            self._seen.clear()


RECENT = RecentTokens()


class RecentReports:
    """The last report built for each toolbox this instance heard, by `report_key` of its body.

    A steady agent sends the same containers beat after beat; only its system figures (and seq)
    change. When the rest of the body is what this instance validated last time for the same
    toolbox, the report built then is reused and only the volatile fields are validated: most of
    the function's work per beat is building the report (docs/performance.md). The report still
    travels whole, so a beat is one round trip whatever the database decides. Bounded: about 5 KB
    per 20-container toolbox, so at most ~10 MB; least recently heard out first. An instance that
    hears more toolboxes than that between two beats of one (a fleet of many thousands on few
    instances) builds most reports again, which costs function CPU only.
    """

    def __init__(self, capacity: int = 2048) -> None:
        self._capacity = capacity
        self._reports: dict[str, tuple[bytes, HeartbeatReport]] = {}
        self._lock = threading.Lock()

    def get(self, token_digest: str, key: bytes) -> HeartbeatReport | None:
        entry = self._reports.get(token_digest)
        return entry[1] if entry is not None and entry[0] == key else None

    def put(self, token_digest: str, key: bytes, report: HeartbeatReport) -> None:
        with self._lock:
            self._reports.pop(token_digest, None)
            self._reports[token_digest] = (key, report)
            while len(self._reports) > self._capacity:
                del self._reports[next(iter(self._reports))]

    def discard(self, token_digest: str) -> None:
        with self._lock:
            self._reports.pop(token_digest, None)

    def clear(self) -> None:
        with self._lock:
            self._reports.clear()


REPORTS = RecentReports()
_INVALID = "invalid toolbox token"


def _refused() -> ApiError:
    # Same answer whether the token is unknown or was revoked by a key rotation.
    return ApiError(401, "unauthenticated", _INVALID, headers={"WWW-Authenticate": "Bearer"})


def heard_after_seconds(settings: Settings) -> int:
    """A beat after a silence longer than this changes what mcp_status shows although no stored value
    changes (health `degraded` by heartbeat age, or `unknown` once stale), so the ingest tells the
    watch stream (cp_private.cp_watch_toolbox_heard): the first of the two thresholds view.py applies."""
    return min(settings.stale_after_seconds, settings.HEALTH_DEGRADED_AFTER_SECONDS)


def handle(call: Call, ports: Ports) -> Reply:
    """Authenticate, validate, apply: 204 on success, as the DTMA expects."""
    digest = hashlib.sha256(bearer_token(call).encode()).hexdigest()
    if digest not in RECENT and not ports.db.call("cp_toolbox_token_known", p_token_sha256=digest):
        raise _refused()
    body = call.json()
    key = report_key(body) if isinstance(body, dict) else None
    previous = REPORTS.get(digest, key) if key is not None else None
    report = with_liveness(previous, body) if previous is not None else build_report(body)
    try:
        result = ports.db.call("cp_ingest_heartbeat", p_token_sha256=digest,
                               **report.params(heard_after_seconds(call.settings)))
    except ApiError as err:
        REPORTS.discard(digest)
        if err.status == 401:
            RECENT.discard(digest)
            raise _refused() from None
        raise
    RECENT.add(digest)
    if key is not None and previous is None:
        REPORTS.put(digest, key, report)
    if result.get("steady"):
        # Nothing changed since the last beat: the database recorded the liveness and read nothing else.
        call.log_fields.update({"toolbox_id": result["toolbox_id"], "steady": True})
        call.routine = True
        return Reply(204)
    call.log_fields.update({"toolbox_id": result["toolbox_id"], "ignored": result["ignored"],
                            **{k: result.get(k) for k in ("matched", "transitions", "rejected", "unmanaged")}})
    changed = result.get("transitions") or result.get("rejected") or result.get("previous_status") != "active"
    call.routine = not changed
    if result.get("rejected"):
        log.warning("heartbeat from toolbox %s named %d instance(s) of other toolboxes; ignored them",
                    result["toolbox_id"], result["rejected"])
    return Reply(204)
