"""One `LISTEN cp_changes` connection per process, fanned out to the watchers of each user.

The change-log triggers (sql/migrations/0011_watch.sql) send `pg_notify('cp_changes', <user id>)`
when a user's servers change. A watch request registers a `Waiter` for its user and sleeps on it;
the listener thread wakes only the waiters of the user a notification names, so the work per
notification grows with that user's watchers, not with everyone's (1,000 watchers of 100 users:
one notification wakes ~10).

The connection is dedicated (not from the pool: a pooled connection is handed to other requests,
and LISTEN belongs to a session), autocommit, and opened lazily by the first watcher. When it
drops, the thread reconnects with backoff and then wakes EVERY waiter: a notification may have
been sent while nobody listened, and each watcher's cursor makes re-reading safe and complete.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import psycopg

log = logging.getLogger("mcp.listener")
CHANNEL = "cp_changes"


class Waiter:
    """One watcher's doorbell: set by the listener, waited on and cleared by the watcher."""

    __slots__ = ("_event", "user_id")

    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        self._event = threading.Event()

    def ring(self) -> None:
        self._event.set()

    def wait(self, timeout: float) -> bool:
        """True when rung (and clears it: the caller reads now, and a ring during that read is kept)."""
        rung = self._event.wait(max(0.0, timeout))
        if rung:
            self._event.clear()
        return rung


class Listener:
    """The process's LISTEN connection and the registry of waiters by user id."""

    def __init__(self, conninfo: str, *, connect: Callable[[str], psycopg.Connection] | None = None,
                 max_backoff: float = 10.0) -> None:
        self._conninfo = conninfo
        self._connect = connect or (lambda url: psycopg.connect(url, autocommit=True, connect_timeout=5))
        self._max_backoff = max_backoff
        self._lock = threading.Lock()
        self._by_user: dict[str, set[Waiter]] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._conn: psycopg.Connection | None = None
        self.connected = threading.Event()
        self.notifications = 0
        self.reconnects = 0

    # --- registry ----------------------------------------------------------------------------
    def register(self, user_id: str) -> Waiter:
        waiter = Waiter(user_id)
        with self._lock:
            self._by_user.setdefault(user_id, set()).add(waiter)
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="watch-listener", daemon=True)
                self._thread.start()
        return waiter

    def unregister(self, waiter: Waiter) -> None:
        with self._lock:
            waiters = self._by_user.get(waiter.user_id)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._by_user[waiter.user_id]

    def count(self) -> int:
        with self._lock:
            return sum(len(w) for w in self._by_user.values())

    def _dispatch(self, user_id: str) -> None:
        with self._lock:
            waiters = tuple(self._by_user.get(user_id, ()))
        for waiter in waiters:
            waiter.ring()

    def _wake_all(self) -> None:
        with self._lock:
            waiters = [w for ws in self._by_user.values() for w in ws]
        for waiter in waiters:
            waiter.ring()

    # --- the connection ------------------------------------------------------------------------
    def _run(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            try:
                with self._connect(self._conninfo) as conn:
                    self._conn = conn
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.connected.set()
                    backoff = 0.2
                    self._wake_all()  # anything sent before LISTEN took effect is read now
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=1.0):
                            self.notifications += 1
                            self._dispatch(note.payload)
            except psycopg.Error as exc:
                if self._stop.is_set():
                    break
                log.warning("watch listener lost its connection (%s); reconnecting in %.1f s",
                            type(exc).__name__, backoff)
            finally:
                self._conn = None
                self.connected.clear()
            if self._stop.is_set():
                break
            self.reconnects += 1
            self._wake_all()
            self._stop.wait(backoff)
            backoff = min(backoff * 2, self._max_backoff)

    def backend_pid(self) -> int | None:
        """The LISTEN connection's server process id (tests and the benchmark count connections)."""
        conn = self._conn
        return conn.info.backend_pid if conn is not None else None

    def stop(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout=5)
        self._thread = None


_lock = threading.Lock()
_listeners: dict[str, Listener] = {}


def listen_url(database_url: str | None, watch_url: str | None) -> str | None:
    """Where to LISTEN, or None when only polling works: LISTEN needs a session, which Supabase's
    transaction pooler (port 6543) does not keep."""
    if watch_url:
        return watch_url
    if not database_url:
        return None
    try:
        port = urlsplit(database_url).port
    except ValueError:
        port = None
    return None if port == 6543 else database_url


def get_listener(conninfo: str) -> Listener:
    """The process's listener for `conninfo` (one connection however many watchers)."""
    with _lock:
        listener = _listeners.get(conninfo)
        if listener is None:
            listener = _listeners[conninfo] = Listener(conninfo)
        return listener


def stop_all() -> None:
    """Stop every listener (tests, shutdown)."""
    with _lock:
        listeners = list(_listeners.values())
        _listeners.clear()
    for listener in listeners:
        listener.stop()


def wait_connected(listener: Listener, timeout: float) -> bool:
    """Block until the LISTEN is in place (tests: a change made before it would only be seen by
    the wake-up that follows connecting)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if listener.connected.wait(0.05):
            return True
    return False
