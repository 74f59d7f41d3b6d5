"""Heartbeat delivery: the request exactly as axios sends it, and one thread that schedules many agents.

A single :class:`HeartbeatScheduler` serves one agent or a whole fleet: it keeps each
agent's next due time and calls the agents' beat callbacks in turn from one thread, so
500 simulated toolboxes cost one thread and one connection pool, not 500 of each.
Like the real agent, a failed heartbeat is not retried; the next one comes on schedule.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

logger = logging.getLogger(__name__)

#: The agent's axios instance gives up after 15 s (``timeout: 15000`` in its API client).
AXIOS_TIMEOUT_SECONDS = 15.0
#: Every header axios 1.10.0 sends besides Authorization, Host and Content-Length, as the real
#: agent's heartbeats carry them (recorded in ``tests/fixtures/real-dtma-heartbeat-*.json``).
AXIOS_HEADERS = {
    "Accept": "application/json, text/plain, */*",
    "Content-Type": "application/json",
    "User-Agent": "axios/1.10.0",
    "Accept-Encoding": "gzip, compress, deflate, br",
    "Connection": "keep-alive",
}
#: What :meth:`HeartbeatScheduler.post` returns when no HTTP answer came back.
NO_ANSWER = 0


def heartbeat_url(base_url: str) -> str:
    """``<AGENTOPIA_API_BASE_URL>/heartbeat``, joined the way axios joins baseURL and path."""
    if not base_url.startswith(("http://", "https://")):
        raise ValueError(f"heartbeat base URL must be http(s), got {base_url!r}")
    return base_url.rstrip("/") + "/heartbeat"


@dataclass(eq=False)
class ScheduleEntry:
    """One agent's place in the schedule; opaque to callers."""

    beat: Callable[[], object]
    interval: float
    due: float


class HeartbeatScheduler:
    """Calls registered beat callbacks on their intervals from one daemon thread.

    Each entry is due right after :meth:`add`, then ``interval`` seconds after its last
    beat started (the way ``setInterval`` behaves). Entries due together are served one
    after the other, so the interval should exceed the time a whole round of posts takes.
    """

    def __init__(self, *, timeout: float = AXIOS_TIMEOUT_SECONDS) -> None:
        self._client = httpx.Client(timeout=timeout, trust_env=False)  # no proxies: traffic stays on loopback
        self._cond = threading.Condition()
        self._entries: list[ScheduleEntry] = []
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="standin-heartbeats", daemon=True)

    def post(self, url: str, token: str, payload: dict[str, Any]) -> int:
        """Send one heartbeat; returns the HTTP status, or :data:`NO_ANSWER` if none came."""
        body = json.dumps(payload, separators=(",", ":")).encode()
        headers = {**AXIOS_HEADERS, "Authorization": f"Bearer {token}"}
        try:
            response = self._client.post(url, content=body, headers=headers)
        except httpx.HTTPError as error:
            logger.info("heartbeat to %s got no answer: %s", url, type(error).__name__)
            return NO_ANSWER
        if response.status_code != 204:  # the agent logs anything but 204 as unexpected
            logger.info("heartbeat to %s answered %s", url, response.status_code)
        return response.status_code

    def add(self, beat: Callable[[], object], interval: float) -> ScheduleEntry:
        """Schedule ``beat`` now and then every ``interval`` seconds."""
        if interval <= 0:
            raise ValueError("heartbeat interval must be positive")
        entry = ScheduleEntry(beat, interval, time.monotonic())
        with self._cond:
            if self._closed:
                raise RuntimeError("scheduler is closed")
            self._entries.append(entry)
            if not self._thread.is_alive():
                self._thread.start()
            self._cond.notify()
        return entry

    def remove(self, entry: ScheduleEntry) -> None:
        """Unschedule ``entry``; a beat already running finishes."""
        with self._cond:
            if entry in self._entries:
                self._entries.remove(entry)

    def trigger(self, entry: ScheduleEntry) -> None:
        """Make ``entry`` due now, e.g. because its agent just (re)started."""
        with self._cond:
            entry.due = time.monotonic()
            self._cond.notify()

    def close(self) -> None:
        """Stop the thread (after the beat in progress, if any) and close the connection pool."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        self._client.close()

    def _run(self) -> None:
        while (due := self._next_due()) is not None:
            for entry in due:
                try:
                    entry.beat()
                except Exception:
                    logger.exception("heartbeat callback failed")

    def _next_due(self) -> list[ScheduleEntry] | None:
        """Wait until some entries are due (None once closed) and reschedule them."""
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                due = [entry for entry in self._entries if entry.due <= now]
                if due:
                    for entry in due:
                        entry.due = now + entry.interval
                    return due
                next_due = min((entry.due for entry in self._entries), default=None)
                self._cond.wait(None if next_due is None else next_due - now)
            return None
