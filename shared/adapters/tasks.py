"""Handing an agent command to the command worker: Google Cloud Tasks, or this process.

Production (`TASKS_MODE=cloud_tasks`): one `tasks.create` call of the Cloud Tasks REST API per
command, with an HTTP target (the worker's URL), an OIDC token for COMMAND_INVOKER_SA whose
audience is that URL, and a dispatch deadline. The body names only the command; everything else,
the deploy's secret environment included (encrypted), is in the command's row. The REST call goes
through httpx, which the functions already import: the Cloud Tasks client library would add gRPC
and protobuf to every cold start for one request. The access token comes from the metadata
server on Google Cloud (cached until shortly before it expires); against any other endpoint (the
local stack's emulator) no token is sent.

Task names are `<command id>-<n>`: Cloud Tasks refuses a second task of the same name, so a
create retried after a timeout cannot enqueue twice, while the sweep's re-enqueue of a lost
command (n + 1) is a new task. Delivery is at least once either way; the worker makes duplicates
harmless.

`TASKS_MODE=inline` runs the command in this process's background pool instead (tests of the use
cases, and single-process development): the same worker code, without the queue in between.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import httpx

from shared.core.config import Settings

log = logging.getLogger("mcp.tasks")

GOOGLE_API = "https://cloudtasks.googleapis.com"
_METADATA_TOKEN_URL = "http://metadata.google.internal/computeMetadata/v1/instance/service-accounts/default/token"  # noqa: S105
_CREATE_TIMEOUT = httpx.Timeout(5.0, connect=2.0)


class EnqueueFailed(Exception):
    """The queue did not take the task; the command stays pending for the sweep."""


class Queue(Protocol):
    def enqueue(self, command_id: str, attempt: int) -> None: ...


class _MetadataToken:
    """An access token of the function's service account, from the metadata server, cached."""

    def __init__(self, http: httpx.Client) -> None:
        self._http = http
        self._lock = threading.Lock()
        self._token: str | None = None
        self._until = 0.0

    def get(self) -> str:
        with self._lock:
            if self._token is None or time.monotonic() > self._until:
                response = self._http.get(_METADATA_TOKEN_URL, headers={"Metadata-Flavor": "Google"}, timeout=2.0)
                response.raise_for_status()
                body = response.json()
                self._token = str(body["access_token"])
                self._until = time.monotonic() + max(0, int(body.get("expires_in", 300)) - 60)
            return self._token


class CloudTasksQueue:
    """`projects.locations.queues.tasks.create` over REST."""

    def __init__(self, settings: Settings, http: httpx.Client | None = None) -> None:
        if not (settings.COMMAND_QUEUE and settings.COMMAND_WORKER_URL and settings.COMMAND_INVOKER_SA):
            raise ValueError("TASKS_MODE=cloud_tasks needs COMMAND_QUEUE, COMMAND_WORKER_URL and COMMAND_INVOKER_SA")
        self.queue = settings.COMMAND_QUEUE
        self.worker_url = settings.COMMAND_WORKER_URL
        self.invoker = settings.COMMAND_INVOKER_SA
        self.deadline = settings.COMMAND_DISPATCH_DEADLINE_SECONDS
        self.api = settings.CLOUD_TASKS_API_URL.rstrip("/")
        self._http = http or httpx.Client(trust_env=False, follow_redirects=False, timeout=_CREATE_TIMEOUT)
        self._token = _MetadataToken(self._http) if self.api == GOOGLE_API else None

    def request_body(self, command_id: str, attempt: int) -> dict[str, Any]:
        """The exact `tasks.create` body (tests hold it against the API's shape)."""
        payload = json.dumps({"command_id": command_id}, separators=(",", ":")).encode()
        return {"task": {
            "name": f"{self.queue}/tasks/{command_id}-{attempt}",
            "dispatchDeadline": f"{self.deadline}s",
            "httpRequest": {
                "url": self.worker_url,
                "httpMethod": "POST",
                "headers": {"Content-Type": "application/json"},
                "body": base64.b64encode(payload).decode(),
                "oidcToken": {"serviceAccountEmail": self.invoker, "audience": self.worker_url},
            },
        }}

    def enqueue(self, command_id: str, attempt: int) -> None:
        headers = {"Content-Type": "application/json"}
        try:
            if self._token is not None:
                headers["Authorization"] = f"Bearer {self._token.get()}"
            response = self._http.post(f"{self.api}/v2/{self.queue}/tasks", headers=headers,
                                       content=json.dumps(self.request_body(command_id, attempt)))
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            raise EnqueueFailed(f"the command queue is unreachable ({type(exc).__name__})") from None
        if response.status_code == 409:
            return  # ALREADY_EXISTS: an earlier try of this very create went through
        if response.status_code >= 300:
            raise EnqueueFailed(f"the command queue answered {response.status_code}: {_google_message(response)}")


class InlineQueue:
    """Runs each command in this process (no queue): see the module docstring. A command told to
    wait (its toolbox runs its maximum, an earlier command of its server is open) is tried again
    after a short pause, as the queue would deliver it again, for at most `patience` seconds."""

    def __init__(self, run: Callable[[str], dict[str, Any]], patience: float = 600.0) -> None:
        self._run = run
        self._patience = patience

    def enqueue(self, command_id: str, attempt: int) -> None:
        from shared.adapters import background

        background.submit(lambda: self._until_done(command_id))

    def _until_done(self, command_id: str) -> None:
        give_up = time.monotonic() + self._patience
        pause = 0.05
        while "wait" in (answer := self._run(command_id)) and time.monotonic() < give_up:
            time.sleep(min(pause, float(answer.get("retry_after") or 1)))
            pause = min(pause * 2, 1.0)


def _google_message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error", {})
        return str(error.get("status") or "") + (": " + str(error.get("message")) if error.get("message") else "")
    except (ValueError, AttributeError):
        return response.text[:200]
