"""mcp_status?watch=true: the caller's servers as they change, as Server-Sent Events or long-poll.

Contract: docs/watch.md. How it works:

* Every read is one round trip, `cp_watch_changes` (sql/migrations/0011_watch.sql): the servers
  that changed since the cursor, rendered by the same owner-scoped SQL as the list and by the
  same `server_json`, plus the ids removed and the next cursor (a database snapshot, so nothing
  committed later can be skipped, whatever the commit order).
* Between reads the watcher sleeps on its `Waiter` (shared/adapters/listener.py): the process's
  one LISTEN connection rings the waiters of the user a notification names. Without LISTEN (the
  `supabase` transport, or no session-mode URL) it reads every WATCH_POLL_SECONDS instead.
* Time-driven changes: a toolbox that stops reporting writes nothing, yet its servers turn
  `unknown` (and health `degraded` before that) by heartbeat age. From the rows it rendered the
  watcher knows the instant each such threshold passes and re-reads those servers then.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from shared.adapters.http import Call, Reply, Stream
from shared.adapters.listener import Listener, Waiter, get_listener, listen_url
from shared.core.config import Settings
from shared.core.errors import ApiError, ServiceUnavailable
from shared.usecases.ports import Ports
from shared.usecases.status_query import WATCH_DEFAULT_TIMEOUT, Query, encode_watch_cursor
from shared.usecases.view import server_json

SSE_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
# Fields that move with the clock or with every heartbeat; a re-read that changes only these is not a change.
_VOLATILE = ("uptime_seconds", "last_report_at", "updated_at")
_VOLATILE_TOOLBOX = ("seconds_since_heartbeat", "last_heartbeat_at", "agent_last_reached_at")
# A re-read at a threshold comes this much after it, so that the age has really passed it (ages compare with >).
_PAST_THRESHOLD = 0.05

_active_lock = threading.Lock()
_active = 0


def active_watchers() -> int:
    """Watch requests this process holds now (tests and the benchmark check nothing leaks)."""
    with _active_lock:
        return _active


def _admit(settings: Settings) -> None:
    global _active
    with _active_lock:
        if _active >= settings.WATCH_MAX_PER_INSTANCE:
            raise ServiceUnavailable(f"this instance already serves {_active} watchers; reconnect shortly", 2,
                                     code="too_many_watchers")
        _active += 1


def _release() -> None:
    global _active
    with _active_lock:
        _active -= 1


def _signature(server: dict[str, Any]) -> str:
    """What a client would see change, without the clock's and the heartbeats' own movement."""
    view = {k: v for k, v in server.items() if k not in _VOLATILE}
    view["toolbox"] = {k: v for k, v in server["toolbox"].items() if k not in _VOLATILE_TOOLBOX}
    mcp = view.get("mcp")
    if isinstance(mcp, dict):
        view["mcp"] = {k: v for k, v in mcp.items() if k != "checked_at"}
    return json.dumps(view, sort_keys=True, default=str)


def next_threshold(row: dict[str, Any], settings: Settings) -> float | None:
    """Seconds until this server's effective status or health changes by age alone, or None.

    The same thresholds view.py applies: heartbeats older than `stale_after_seconds` make it
    `unknown` (unless the agent was read directly more recently), older than
    HEALTH_DEGRADED_AFTER_SECONDS make a running server `degraded`."""
    box = row["toolbox"]
    window = settings.stale_after_seconds
    waits = []
    age, reached = box.get("heartbeat_age_seconds"), box.get("reached_age_seconds")
    if age is not None:
        waits += [limit - age for limit in (window, settings.HEALTH_DEGRADED_AFTER_SECONDS) if age <= limit]
    if reached is not None and reached <= window:
        waits.append(window - reached)
    return min(waits) + _PAST_THRESHOLD if waits else None


@dataclass
class Watch:
    """One watcher's state: its cursor, what it last sent, and when each server next changes by age."""

    ports: Ports
    user_id: str
    toolbox_id: str | None
    cursor: str | None = None
    as_of: str | None = None
    sent: dict[str, str] = field(default_factory=dict)
    due: dict[str, float] = field(default_factory=dict)

    def read(self, *, also: list[str] | None = None) -> dict[str, Any] | None:
        """One read: an event body (`servers`, `removed`, `cursor`, `as_of`, `snapshot`) or None when
        there is nothing to tell. Raises the 410 when the cursor is too old."""
        answer = self.ports.db.call("cp_watch_changes", p_user_id=self.user_id, p_since=self.cursor,
                                    p_toolbox_id=self.toolbox_id, p_also=also or None)
        if answer["expired"]:
            raise ApiError(410, "cursor_expired", "since: this cursor is older than the changes kept (one hour) or "
                           "comes from another database; reconnect without since for a fresh snapshot",
                           {"field": "since"})
        snapshot = bool(answer["snapshot"])
        now = time.monotonic()
        servers = []
        for row in answer["items"]:
            server = server_json(row, self.ports.settings)
            wait = next_threshold(row, self.ports.settings)
            if wait is None:
                self.due.pop(server["id"], None)
            else:
                self.due[server["id"]] = now + wait
            signature = _signature(dict(server))
            if snapshot or self.sent.get(server["id"]) != signature:
                servers.append(server)
            self.sent[server["id"]] = signature
        removed = list(answer["removed"])
        for gone in removed:
            self.sent.pop(gone, None)
            self.due.pop(gone, None)
        self.cursor, self.as_of = answer["cursor"], answer["now"]
        body = {"servers": servers, "removed": removed, "cursor": encode_watch_cursor(self.cursor),
                "as_of": answer["now"], "snapshot": snapshot}
        return body if snapshot or servers or removed else None

    def next_due(self) -> float | None:
        return min(self.due.values()) if self.due else None

    def read_due(self) -> dict[str, Any] | None:
        """Re-read the servers whose age threshold passed (and whatever the log has since the cursor)."""
        now = time.monotonic()
        ids = [i for i, at in self.due.items() if at <= now]
        for i in ids:
            self.due.pop(i)
        return self.read(also=ids)

    def current(self) -> dict[str, Any]:
        """The cursor as an answer with nothing in it (a long-poll that timed out, the end event)."""
        return {"servers": [], "removed": [], "cursor": encode_watch_cursor(self.cursor or ""),
                "as_of": self.as_of, "snapshot": False}


class _Doorbell:
    """LISTEN's waiter, or a clock when only polling works (then every wake-up is a read)."""

    def __init__(self, settings: Settings, user_id: str) -> None:
        url = listen_url(settings.DATABASE_URL.get_secret_value() if settings.DATABASE_URL else None,
                         settings.WATCH_DATABASE_URL.get_secret_value() if settings.WATCH_DATABASE_URL else None)
        self.poll = settings.WATCH_POLL_SECONDS
        self.listener: Listener | None = get_listener(url) if url and settings.db_transport == "postgres" else None
        self.waiter: Waiter | None = self.listener.register(user_id) if self.listener else None

    def wait(self, timeout: float) -> bool:
        """True when a read is due now because of a change (or, polling, because the period passed)."""
        if self.waiter is not None:
            return self.waiter.wait(timeout)
        if timeout >= self.poll:
            time.sleep(self.poll)
            return True
        time.sleep(max(0.0, timeout))
        return False

    def close(self) -> None:
        if self.listener is not None and self.waiter is not None:
            self.listener.unregister(self.waiter)
            self.waiter = None


def _sse(event: str | None, data: dict[str, Any] | None, cursor: str | None = None) -> bytes:
    lines = []
    if cursor:
        lines.append(f"id: {cursor}")
    if event:
        lines.append(f"event: {event}")
    if data is not None:
        lines.append("data: " + json.dumps(data, separators=(",", ":"), default=str))
    return ("\n".join(lines) + "\n\n").encode()


class _EventStream:
    """The SSE body: an iterator whose close() releases the watcher even if it never started."""

    def __init__(self, call: Call, watch: Watch, bell: _Doorbell, first: dict[str, Any] | None) -> None:
        self._call, self._watch, self._bell = call, watch, bell
        self._chunks = self._generate(first)
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        return next(self._chunks)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._chunks.close()
        finally:
            self._bell.close()
            _release()

    def _generate(self, first: dict[str, Any] | None) -> Iterator[bytes]:
        settings, watch, fields = self._call.settings, self._watch, self._call.log_fields
        end = time.monotonic() + settings.WATCH_MAX_SECONDS
        keepalive = settings.WATCH_KEEPALIVE_SECONDS
        fields["events"] = 0
        yield b"retry: 1000\n\n"
        if first is not None:
            yield self._event(first)
        quiet_since = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= end:
                break
            due = watch.next_due()
            wake = min(end, quiet_since + keepalive, due if due is not None else end)
            if self._bell.wait(wake - now):
                body = watch.read()
            elif due is not None and time.monotonic() >= due:
                body = watch.read_due()
            else:
                if time.monotonic() - quiet_since >= keepalive:
                    quiet_since = time.monotonic()
                    yield b": keep-alive\n\n"
                continue
            if body is not None:
                quiet_since = time.monotonic()
                yield self._event(body)
        yield _sse("end", {"cursor": encode_watch_cursor(watch.cursor or ""), "reason": "lifetime"},
                   encode_watch_cursor(watch.cursor or ""))

    def _event(self, body: dict[str, Any]) -> bytes:
        self._call.log_fields["events"] = self._call.log_fields.get("events", 0) + 1
        kind = "snapshot" if body["snapshot"] else "changes"
        data = {k: v for k, v in body.items() if k != "snapshot"}
        if kind == "snapshot":
            data.pop("removed", None)
        return _sse(kind, data, body["cursor"])


def handle(call: Call, ports: Ports, user_id: str, query: Query) -> Reply | Stream:
    """Start a watch: SSE when the client accepts text/event-stream, else a long-poll."""
    settings = ports.settings
    _admit(settings)
    bell: _Doorbell | None = None
    streaming = False  # once the stream exists, its close() releases the watcher
    try:
        # The doorbell first: a change between the first read and registering would ring nobody.
        bell = _Doorbell(settings, user_id)
        watch = Watch(ports, user_id, query.toolbox_id, cursor=query.since)
        first = watch.read()  # the 410 for an expired cursor comes here, before any stream starts
        call.log_fields.update({"user_id": user_id, "watch": True, "listen": bell.listener is not None})
        if "text/event-stream" in (call.header("Accept") or ""):
            call.log_fields["mode"] = "sse"
            streaming = True
            return Stream(_EventStream(call, watch, bell, first), headers=dict(SSE_HEADERS))
        call.log_fields["mode"] = "long-poll"
        return Reply(200, _long_poll(watch, bell, first, query, settings), {"Cache-Control": "no-store"})
    finally:
        if not streaming:
            if bell is not None:
                bell.close()
            _release()


def _long_poll(watch: Watch, bell: _Doorbell, first: dict[str, Any] | None, query: Query,
               settings: Settings) -> dict[str, Any]:
    """At once when there is something (or no cursor: the full list); else wait up to `timeout`."""
    if first is not None:
        return first
    timeout = min(query.timeout if query.timeout is not None else WATCH_DEFAULT_TIMEOUT, settings.WATCH_MAX_SECONDS)
    end = time.monotonic() + timeout
    while (now := time.monotonic()) < end:
        due = watch.next_due()
        if bell.wait(min(end, due if due is not None else end) - now):
            body = watch.read()
        elif due is not None and time.monotonic() >= due:
            body = watch.read_due()
        else:
            continue
        if body is not None:
            return body
    return watch.current()
