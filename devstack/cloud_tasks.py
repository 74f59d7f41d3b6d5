"""A loopback emulator of the Cloud Tasks v2 REST API that also dispatches the tasks.

In production the functions queue every agent command with Cloud Tasks' `createTask`
(`POST {base}/v2/projects/{p}/locations/{l}/queues/{q}/tasks`), and Cloud Tasks delivers it to
the IAM-private `dtma_command_worker` with an OIDC token. Locally the same client talks to this
emulator instead (`CLOUD_TASKS_API_URL`), which answers as Cloud Tasks does and delivers the
tasks itself:

* createTask is validated as Google validates it (queue path, task id, `httpRequest.url`,
  base64 body, `dispatchDeadline` in 15 s..30 min) and answers Google's error shape; a task name
  is unique for the emulator's lifetime (409 ALREADY_EXISTS, also for a finished task). Queues
  need not be created first: any well-formed queue path has its own state.
* Each task is delivered as its `httpRequest`, with Cloud Tasks' `X-CloudTasks-*` headers and, when
  the task names an `oidcToken`, `Authorization: Bearer <ID token>` minted at each delivery as Cloud
  Tasks mints Google's: RS256, the claims of a Google ID token for `serviceAccountEmail` (`aud` the
  task's `audience`, else its URL; `email_verified` true; 1 h), signed by this emulator's own RSA key,
  whose JWKS it serves at `/_emulator/oidc/jwks.json` (issuer `<url>/_emulator/oidc`). A worker
  pointed at that JWKS and issuer (INVOKER_JWKS_URL, INVOKER_ISSUER) verifies them as it verifies
  Google's in production. A 2xx answer completes it; anything else (another status, no answer
  within the dispatch deadline, a connection error) is retried with Cloud Tasks' backoff (double
  `max_doublings` times from `min_backoff`, then linear, capped at `max_backoff`) until
  `max_attempts`, after which the task is dropped and recorded as failed.
* At most `max_concurrent` deliveries per queue run at once, each in its own thread; createTask
  never waits for a delivery. Only loopback targets are contacted (this runs on a developer's
  machine): a task whose URL is anywhere else fails without any traffic.

Control surface (same server, loopback only): `GET /_emulator/tasks[?queue=<path or id>]`,
`GET /_emulator/queues`, `POST /_emulator/unavailable {"on": bool}` (createTask answers 503
UNAVAILABLE while on), `POST /_emulator/pause {"on": bool, "queue": optional}` (stop or resume
dispatching; new tasks are still accepted), `GET /_emulator/oidc/jwks.json` (the tokens' public key)
and `GET /_emulator/oidc/token?audience=<url>&email=<service account>` (`{"token": ...}`, what
`gcloud auth print-identity-token --impersonate-service-account` gives: for calling the sweep by
hand when the local stack checks its token). The same from Python: :class:`CloudTasksEmulator`.

Standalone: `python -m devstack.cloud_tasks --port 8123`.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import hashlib
import heapq
import http.client
import ipaddress
import itertools
import json
import logging
import re
import secrets
import signal
import socket
import socketserver
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, unquote, urlsplit

from devstack.closing import StartStop

log = logging.getLogger("devstack.cloud_tasks")

#: Cloud Tasks' dispatch deadline for HTTP targets: default 10 min, allowed 15 s..30 min.
DEFAULT_DISPATCH_DEADLINE = 600.0
MIN_DISPATCH_DEADLINE = 15.0
MAX_DISPATCH_DEADLINE = 1800.0
#: Cloud Tasks' maximum task size.
MAX_TASK_BYTES = 1024 * 1024
#: Answers of the target are read up to this much, then the connection is closed.
MAX_RESPONSE_BYTES = 1024 * 1024
#: Google's ID tokens live one hour.
OIDC_LIFETIME = 3600
#: Where the emulator serves its OIDC issuer's keys, and the issuer's path (`iss` is `<url>` + this).
OIDC_PATH = "/_emulator/oidc"
OIDC_JWKS_PATH = f"{OIDC_PATH}/jwks.json"
USER_AGENT = "Google-Cloud-Tasks"

_ID = r"[A-Za-z0-9_-]"
QUEUE_PATH = re.compile(
    r"projects/([A-Za-z0-9.:_-]{1,100})/locations/([A-Za-z0-9_-]{1,100})/queues/([A-Za-z0-9-]{1,100})"
)
TASK_ID = re.compile(rf"{_ID}{{1,500}}")
_DURATION = re.compile(r"(\d{1,12})(\.\d{1,9})?s")
_TIMESTAMP_FRACTION = re.compile(r"\.(\d+)")
HTTP_METHODS = ("POST", "GET", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS")
_BODY_METHODS = ("POST", "PUT", "PATCH")
_TASK_FIELDS = {"name", "httpRequest", "scheduleTime", "dispatchDeadline"}
_OUTPUT_ONLY = {"createTime", "dispatchCount", "responseCount", "firstAttempt", "lastAttempt", "view"}
_HTTP_REQUEST_FIELDS = {"url", "httpMethod", "headers", "body", "oidcToken", "oauthToken"}
# Headers a task cannot set: Cloud Tasks sets (or drops) them itself.
_RESERVED_HEADERS = ("host", "content-length", "transfer-encoding", "connection", "x-google-", "x-appengine-",
                     "x-cloudtasks-")  # fmt: skip

PENDING, DONE, FAILED, DELETED = "pending", "done", "failed", "deleted"
TIMEOUT, CONNECTION_ERROR, REFUSED = "timeout", "connection error", "refused: not a loopback address"



class ApiError(Exception):
    """An answer in Google's error shape: `{"error": {"code", "message", "status"}}`."""

    def __init__(self, code: int, status: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.message = message

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "status": self.status}}


def _invalid(message: str) -> ApiError:
    return ApiError(400, "INVALID_ARGUMENT", message)


def _not_found(message: str = "Requested entity was not found.") -> ApiError:
    return ApiError(404, "NOT_FOUND", message)


ALREADY_EXISTS = ApiError(409, "ALREADY_EXISTS", "Requested entity already exists")
UNAVAILABLE = ApiError(503, "UNAVAILABLE", "The service is currently unavailable.")


def backoff_delay(retry: int, min_backoff: float, max_backoff: float, max_doublings: int) -> float:
    """Seconds before retry number `retry` + 1 (0 = after the first failed attempt), as Cloud Tasks does.

    The interval starts at min_backoff, doubles max_doublings times, then grows linearly by the
    last doubled step, and never exceeds max_backoff (min 10, max 300, doublings 3:
    10, 20, 40, 80, 160, 240, 300, 300, ...).
    """
    retry = max(0, retry)
    if retry <= max_doublings:
        delay = min_backoff * 2**retry
    else:
        delay = min_backoff * 2**max_doublings * (retry - max_doublings + 1)
    return min(max_backoff, delay)


def format_duration(seconds: float) -> str:
    """A google.protobuf.Duration in JSON: "900s", "0.5s"."""
    text = f"{seconds:.9f}".rstrip("0").rstrip(".")
    return f"{text}s"


def parse_duration(value: Any, field_name: str) -> float:
    if not isinstance(value, str) or not (match := _DURATION.fullmatch(value)):
        raise _invalid(f"Invalid value at '{field_name}' (type.googleapis.com/google.protobuf.Duration), {value!r}")
    return int(match.group(1)) + float(match.group(2) or 0)


def format_time(epoch: float) -> str:
    """RFC 3339 in UTC with microseconds, as Google writes a Timestamp."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(value: Any, field_name: str) -> float:
    if isinstance(value, str):
        # datetime reads at most microseconds; a Timestamp may carry nanoseconds.
        text = _TIMESTAMP_FRACTION.sub(lambda m: "." + m.group(1)[:6].ljust(6, "0"), value, count=1)
        try:
            parsed = datetime.fromisoformat(text.replace("z", "Z"))
        except ValueError:
            parsed = None
        if parsed is not None and parsed.tzinfo is not None:
            return parsed.timestamp()
    raise _invalid(f"Invalid value at '{field_name}' (type.googleapis.com/google.protobuf.Timestamp), {value!r}")


def decode_bytes(value: Any, field_name: str) -> bytes:
    """A `bytes` field of Google's JSON mapping: base64, standard or URL-safe, padding optional."""
    if isinstance(value, str):
        compact = value.strip()
        padded = compact + "=" * (-len(compact) % 4)
        for alphabet in (None, b"-_"):
            try:
                return base64.b64decode(padded, altchars=alphabet, validate=True)
            except (binascii.Error, ValueError):
                continue
    shown = value if isinstance(value, str) and len(value) <= 40 else "..."
    raise _invalid(f"Invalid value at '{field_name}' (TYPE_BYTES), Base64 decoding failed for \"{shown}\"")


def _stable_subject(email: str) -> str:
    """A numeric, stable `sub` for a service account (Google's is its unique id, 21 digits)."""
    return str(int.from_bytes(hashlib.sha256(email.encode()).digest()[:8], "big") % 10**21).rjust(21, "1")


class LocalOidc:
    """A local stand-in for Google's OIDC issuer: one RSA key (made on first use), tokens shaped like
    Google's ID tokens for a service account, and the JWKS that verifies them."""

    def __init__(self, issuer: str) -> None:
        self.issuer = issuer
        self.kid = f"cloud-tasks-emulator-{secrets.token_hex(6)}"
        self._key: Any = None
        self._lock = threading.Lock()

    def _private_key(self) -> Any:
        with self._lock:
            if self._key is None:
                from cryptography.hazmat.primitives.asymmetric import rsa

                self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            return self._key

    def jwks(self) -> dict[str, Any]:
        """The public key, as Google publishes its own (https://www.googleapis.com/oauth2/v3/certs)."""
        from jwt.algorithms import RSAAlgorithm

        jwk = RSAAlgorithm.to_jwk(self._private_key().public_key(), as_dict=True)
        return {"keys": [{**jwk, "kid": self.kid, "alg": "RS256", "use": "sig"}]}

    def mint(self, audience: str, email: str, now: float | None = None, lifetime_seconds: int = OIDC_LIFETIME) -> str:
        """An ID token for service account `email`, with Google's claims, RS256-signed."""
        import jwt

        iat = int(time.time() if now is None else now)
        sub = _stable_subject(email)
        claims = {"aud": audience, "azp": sub, "email": email, "email_verified": True, "exp": iat + lifetime_seconds,
                  "iat": iat, "iss": self.issuer, "sub": sub}  # fmt: skip
        return jwt.encode(claims, self._private_key(), algorithm="RS256", headers={"kid": self.kid, "typ": "JWT"})

    def verify(self, token: str, audience: str | None = None) -> dict[str, Any]:
        """The claims of a token minted here; ValueError if it is not one, expired, or for another audience."""
        import jwt

        try:
            claims = jwt.decode(token, self._private_key().public_key(), algorithms=["RS256"], issuer=self.issuer,
                                audience=audience, options={"verify_aud": audience is not None})
        except jwt.ExpiredSignatureError:
            raise ValueError("the token has expired") from None
        except jwt.InvalidAudienceError:
            raise ValueError(f"the token is not for {audience!r}") from None
        except jwt.PyJWTError:
            raise ValueError("not a token of this emulator") from None
        return dict(claims)


def is_loopback_host(host: str) -> bool:
    """Whether every address `host` names is a loopback address (names are resolved)."""
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(str(a).split("%")[0]).is_loopback for a in addresses)


@dataclass(frozen=True)
class TaskSpec:
    """A validated createTask request."""

    task_id: str | None
    url: str
    method: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    oidc_email: str | None
    oidc_audience: str | None
    dispatch_deadline: float
    schedule_time: float | None
    full_view: bool


def parse_create_task(
    queue_path: str, document: Any, *, min_deadline: float = MIN_DISPATCH_DEADLINE,
    max_deadline: float = MAX_DISPATCH_DEADLINE,
) -> TaskSpec:  # fmt: skip
    """Validate a createTask body for `queue_path` as Cloud Tasks does; ApiError(400) if it is wrong."""
    if not isinstance(document, dict):
        raise _invalid("Invalid JSON payload received. Expected an object.")
    for key in document:
        if key not in ("task", "responseView"):
            raise _invalid(f'Invalid JSON payload received. Unknown name "{key}": Cannot find field.')
    view = document.get("responseView", "BASIC")
    if view not in ("BASIC", "FULL", "VIEW_UNSPECIFIED"):
        raise _invalid(f"Invalid value at 'response_view' (type.googleapis.com/google.cloud.tasks.v2.Task.View), "
                       f"{view!r}")  # fmt: skip
    task = document.get("task")
    if not isinstance(task, dict):
        raise _invalid("Task must be specified.")
    for key in task:
        if key == "appEngineHttpRequest":
            raise _invalid("The emulator delivers HTTP targets only (httpRequest), not App Engine tasks.")
        if key not in _TASK_FIELDS and key not in _OUTPUT_ONLY:
            raise _invalid(f"Invalid JSON payload received. Unknown name \"{key}\" at 'task': Cannot find field.")

    task_id = None
    name = task.get("name")
    if name not in (None, ""):
        if not isinstance(name, str):
            raise _invalid("Invalid value at 'task.name' (TYPE_STRING)")
        parent, sep, task_id = name.rpartition("/tasks/")
        if not sep or parent != queue_path:
            raise _invalid(f"Task name {name!r} is not in the queue {queue_path!r} of the request: expected "
                           f"'{queue_path}/tasks/TASK_ID'.")  # fmt: skip
        if not TASK_ID.fullmatch(task_id):
            raise _invalid("Task ID must contain only letters ([A-Za-z]), numbers ([0-9]), hyphens (-), or "
                           "underscores (_). The maximum length is 500 characters.")  # fmt: skip

    request = task.get("httpRequest")
    if not isinstance(request, dict):
        raise _invalid("Task.httpRequest must be set (the emulator delivers HTTP targets only).")
    for key in request:
        if key not in _HTTP_REQUEST_FIELDS:
            raise _invalid(f'Invalid JSON payload received. Unknown name "{key}" at \'task.http_request\': '
                           "Cannot find field.")  # fmt: skip
    url = request.get("url")
    if not isinstance(url, str) or not url:
        raise _invalid("HttpRequest.url is required.")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or len(url) > 2083:
        raise _invalid(f"HttpRequest.url {url!r} must be an absolute http:// or https:// URL of at most 2083 "
                       "characters.")  # fmt: skip
    method = request.get("httpMethod", "POST")
    if method in ("HTTP_METHOD_UNSPECIFIED", None):
        method = "POST"
    if method not in HTTP_METHODS:
        raise _invalid(f"Invalid value at 'task.http_request.http_method' (type.googleapis.com/"
                       f"google.cloud.tasks.v2.HttpMethod), {method!r}")  # fmt: skip
    raw_headers = request.get("headers", {})
    if not isinstance(raw_headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and k and "\n" not in k + v and "\r" not in k + v
        for k, v in raw_headers.items()
    ):
        raise _invalid("Invalid value at 'task.http_request.headers': a map of header names to string values.")
    headers = tuple((k, v) for k, v in raw_headers.items() if not k.lower().startswith(_RESERVED_HEADERS))
    body = b""
    if "body" in request:
        body = decode_bytes(request["body"], "task.http_request.body")
        if body and method not in _BODY_METHODS:
            raise _invalid("Body can only be set for POST, PUT and PATCH requests.")
    if len(body) > MAX_TASK_BYTES:
        raise _invalid(f"Task size too large: the body is {len(body)} bytes, at most {MAX_TASK_BYTES}.")

    oidc_email = oidc_audience = None
    if "oauthToken" in request:
        raise _invalid("The emulator supports oidcToken only (oauthToken is for Google APIs).")
    if "oidcToken" in request:
        oidc = request["oidcToken"]
        if not isinstance(oidc, dict) or set(oidc) - {"serviceAccountEmail", "audience"}:
            raise _invalid("Invalid value at 'task.http_request.oidc_token': serviceAccountEmail and audience only.")
        oidc_email = oidc.get("serviceAccountEmail")
        if not isinstance(oidc_email, str) or "@" not in oidc_email:
            raise _invalid("OidcToken.serviceAccountEmail must be a service account's email address.")
        oidc_audience = oidc.get("audience") or url
        if not isinstance(oidc_audience, str):
            raise _invalid("Invalid value at 'task.http_request.oidc_token.audience' (TYPE_STRING)")

    deadline = DEFAULT_DISPATCH_DEADLINE
    if "dispatchDeadline" in task:
        deadline = parse_duration(task["dispatchDeadline"], "task.dispatch_deadline")
        if not min_deadline <= deadline <= max_deadline:
            raise _invalid(f"Task.dispatchDeadline {task['dispatchDeadline']} must be between "
                           f"{format_duration(min_deadline)} and {format_duration(max_deadline)}.")  # fmt: skip
    deadline = min(max(deadline, min_deadline), max_deadline)
    schedule = parse_time(task["scheduleTime"], "task.schedule_time") if task.get("scheduleTime") else None
    return TaskSpec(
        task_id=task_id, url=url, method=method, headers=headers, body=body, oidc_email=oidc_email,
        oidc_audience=oidc_audience, dispatch_deadline=deadline, schedule_time=schedule, full_view=view == "FULL",
    )  # fmt: skip


@dataclass(eq=False)
class _Task:
    name: str
    task_id: str
    queue: _Queue
    spec: TaskSpec
    create_time: float
    schedule_time: float  # wall clock (Task.scheduleTime, X-CloudTasks-TaskETA)
    due: float  # monotonic
    dispatch_count: int = 0
    response_count: int = 0
    last_status: int | str | None = None
    previous_response: int | None = None
    state: str = PENDING
    first_attempt: float | None = None
    last_attempt: float | None = None

    def resource(self, *, full: bool = False) -> dict[str, Any]:
        """The Task as Cloud Tasks v2 answers it (BASIC view: no body)."""
        spec = self.spec
        request: dict[str, Any] = {"url": spec.url, "httpMethod": spec.method}
        if spec.headers:
            request["headers"] = dict(spec.headers)
        if full and spec.body:
            request["body"] = base64.b64encode(spec.body).decode()
        if spec.oidc_email:
            request["oidcToken"] = {"serviceAccountEmail": spec.oidc_email, "audience": spec.oidc_audience}
        resource: dict[str, Any] = {
            "name": self.name,
            "httpRequest": request,
            "scheduleTime": format_time(self.schedule_time),
            "createTime": format_time(self.create_time),
            "dispatchDeadline": format_duration(spec.dispatch_deadline),
            "dispatchCount": self.dispatch_count,
            "responseCount": self.response_count,
            "view": "FULL" if full else "BASIC",
        }
        if self.first_attempt is not None:
            resource["firstAttempt"] = {"dispatchTime": format_time(self.first_attempt)}
        if self.last_attempt is not None:
            resource["lastAttempt"] = {"dispatchTime": format_time(self.last_attempt)}
        return resource

    def snapshot(self) -> dict[str, Any]:
        """What the control surface shows: the task's delivery history and its decoded body."""
        text = self.spec.body.decode("utf-8", errors="replace")
        try:
            parsed = json.loads(text) if text else None
        except ValueError:
            parsed = None
        return {
            "name": self.name,
            "id": self.task_id,
            "queue": self.queue.path,
            "url": self.spec.url,
            "method": self.spec.method,
            "state": self.state,
            "attempts": self.dispatch_count,
            "responses": self.response_count,
            "last_status": self.last_status,
            "create_time": format_time(self.create_time),
            "schedule_time": format_time(self.schedule_time),
            "dispatch_deadline": format_duration(self.spec.dispatch_deadline),
            "body": text,
            "json": parsed,
        }


@dataclass(eq=False)
class _Queue:
    path: str
    queue_id: str
    heap: list[tuple[float, int, _Task]] = field(default_factory=list)
    in_flight: int = 0
    peak_in_flight: int = 0
    paused: bool = False


@dataclass(eq=False)
class _Attempt:
    task: _Task
    deadline: float  # monotonic
    sock: socket.socket | None = None
    timed_out: bool = False
    thread: threading.Thread | None = None


class CloudTasksEmulator(StartStop):
    """The Cloud Tasks v2 REST API on a loopback port, delivering its tasks itself.

    Use as a context manager or with start()/stop(); `url` is the base URL to give a client
    (`{url}/v2/projects/...`). `tasks()`, `set_unavailable()`, `pause()` and `wait_idle()` are the
    control surface for tests; the same is served under `/_emulator/`.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        min_backoff: float = 0.1,
        max_backoff: float = 5.0,
        max_doublings: int = 4,
        max_attempts: int = 100,
        max_concurrent: int = 10,
        min_deadline: float = MIN_DISPATCH_DEADLINE,
        max_deadline: float = MAX_DISPATCH_DEADLINE,
    ) -> None:
        if not is_loopback_host(host):
            raise ValueError(f"the Cloud Tasks emulator listens on loopback only, not {host!r}")
        if min_backoff < 0 or max_backoff < min_backoff or max_doublings < 0 or max_concurrent < 1:
            raise ValueError("need 0 <= min_backoff <= max_backoff, max_doublings >= 0, max_concurrent >= 1")
        if not 0 < min_deadline <= max_deadline:
            raise ValueError("need 0 < min_deadline <= max_deadline")
        self.host = host
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.max_doublings = max_doublings
        #: Attempts per task before it is dropped as failed; 0 or less: unlimited (Cloud Tasks' -1).
        self.max_attempts = max_attempts
        self.max_concurrent = max_concurrent
        self.min_deadline = min_deadline
        self.max_deadline = max_deadline
        self._cond = threading.Condition()
        self._queues: dict[str, _Queue] = {}
        self._tasks: dict[str, _Task] = {}  # every name ever used, finished tasks included
        self._attempts: set[_Attempt] = set()
        self._seq = itertools.count()
        self._unavailable = False
        self._paused = False
        self._stopping = False
        self._started = False
        self._server = _Server((host, port), self)
        self._http_thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="cloud-tasks-http", daemon=True
        )
        self._scheduler = threading.Thread(target=self._schedule, name="cloud-tasks-scheduler", daemon=True)
        #: The issuer of the tasks' OIDC tokens, with its own key (made on first use: an RSA key takes ~0.1 s).
        self.oidc = LocalOidc(self.url + OIDC_PATH)

    # -- life cycle ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def oidc_jwks_url(self) -> str:
        """The JWKS of the tasks' OIDC tokens (a worker's INVOKER_JWKS_URL; INVOKER_ISSUER is `oidc.issuer`)."""
        return self.url + OIDC_JWKS_PATH

    def start(self) -> Self:
        if self._started:
            raise RuntimeError("the emulator was already started")
        self._started = True
        self._http_thread.start()
        self._scheduler.start()
        log.info("Cloud Tasks emulator serving at %s", self.url)
        return self

    def stop(self, timeout: float = 3.0) -> None:
        """Stop serving and dispatching (deliveries in flight are cut); idempotent, returns within ~timeout."""
        with self._cond:
            if self._stopping:
                return
            self._stopping = True
            attempts = list(self._attempts)
            for attempt in attempts:
                _shut(attempt.sock)
            self._cond.notify_all()
        if self._http_thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
        self._server.sever_connections()
        end = time.monotonic() + timeout
        if self._scheduler.is_alive():
            self._scheduler.join(max(0.0, end - time.monotonic()))
        for attempt in attempts:
            if attempt.thread is not None and attempt.thread.is_alive():
                attempt.thread.join(max(0.0, end - time.monotonic()))

    # -- control ------------------------------------------------------------------------------

    def set_unavailable(self, on: bool = True) -> None:
        """While on, createTask answers 503 UNAVAILABLE (as during a Cloud Tasks outage)."""
        with self._cond:
            self._unavailable = on

    def pause(self, on: bool = True, queue: str | None = None) -> None:
        """Stop (on) or resume dispatching, for every queue or one (path or id); tasks are still accepted."""
        with self._cond:
            if queue is None:
                self._paused = on
            else:
                self._queue(self._queue_path(queue)).paused = on
            self._cond.notify_all()

    def tasks(self, queue: str | None = None) -> list[dict[str, Any]]:
        """Every task ever created (or those of one queue, path or id), oldest first."""
        with self._cond:
            path = self._queue_path(queue) if queue is not None else None
            return [t.snapshot() for t in self._tasks.values() if path is None or t.queue.path == path]

    def queues(self) -> list[dict[str, Any]]:
        with self._cond:
            result = []
            for q in self._queues.values():
                states = [t.state for t in self._tasks.values() if t.queue is q]
                result.append({
                    "name": q.path, "paused": q.paused or self._paused, "in_flight": q.in_flight,
                    "peak_in_flight": q.peak_in_flight, "max_concurrent": self.max_concurrent,
                    **{state: states.count(state) for state in (PENDING, DONE, FAILED, DELETED)},
                })  # fmt: skip
            return result

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until no task is pending or in flight; False if that did not happen within `timeout`."""
        end = time.monotonic() + timeout
        with self._cond:
            while not self._idle():
                remaining = end - time.monotonic()
                if remaining <= 0 or self._stopping:
                    return self._idle()
                self._cond.wait(remaining)
            return True

    def mint_token(self, audience: str, email: str, now: float | None = None,
                   lifetime_seconds: int = OIDC_LIFETIME) -> str:
        """An OIDC ID token for service account `email` and `audience`, as a delivery carries (LocalOidc)."""
        return self.oidc.mint(audience, email, now, lifetime_seconds)

    def verify_token(self, token: str, audience: str | None = None) -> dict[str, Any]:
        """The claims of a token this emulator minted; ValueError if it is not one, expired, or for another audience."""
        return self.oidc.verify(token, audience)

    # -- the API ------------------------------------------------------------------------------

    def create_task(self, queue_path: str, document: Any) -> dict[str, Any]:
        """createTask: the Task resource, or ApiError."""
        if not QUEUE_PATH.fullmatch(queue_path):
            raise _invalid(f"Queue name {queue_path!r} is not of the form "
                           "'projects/PROJECT_ID/locations/LOCATION_ID/queues/QUEUE_ID'.")  # fmt: skip
        with self._cond:
            if self._unavailable or self._stopping:
                raise UNAVAILABLE
        spec = parse_create_task(queue_path, document, min_deadline=self.min_deadline, max_deadline=self.max_deadline)
        with self._cond:
            if self._unavailable or self._stopping:
                raise UNAVAILABLE
            task_id = spec.task_id
            while task_id is None or (spec.task_id is None and f"{queue_path}/tasks/{task_id}" in self._tasks):
                task_id = str(secrets.randbits(63))  # Cloud Tasks names a task with a large number
            name = f"{queue_path}/tasks/{task_id}"
            if name in self._tasks:
                raise ALREADY_EXISTS
            queue = self._queue(queue_path)
            now = time.time()
            schedule = max(now, spec.schedule_time) if spec.schedule_time is not None else now
            task = _Task(name=name, task_id=task_id, queue=queue, spec=spec, create_time=now,
                         schedule_time=schedule, due=time.monotonic() + (schedule - now))  # fmt: skip
            self._tasks[name] = task
            heapq.heappush(queue.heap, (task.due, next(self._seq), task))
            self._cond.notify_all()
            log.debug("task %s queued for %s %s", name, spec.method, spec.url)
            return task.resource(full=spec.full_view)

    def get_task(self, name: str) -> dict[str, Any]:
        with self._cond:
            task = self._tasks.get(name)
            if task is None or task.state != PENDING:  # Cloud Tasks deletes a task once it is finished
                raise _not_found()
            return task.resource()

    def delete_task(self, name: str) -> None:
        with self._cond:
            task = self._tasks.get(name)
            if task is None or task.state != PENDING:
                raise _not_found()
            task.state = DELETED
            self._cond.notify_all()

    def list_tasks(self, queue_path: str) -> dict[str, Any]:
        with self._cond:
            pending = [t.resource() for t in self._tasks.values() if t.queue.path == queue_path and t.state == PENDING]
            return {"tasks": pending} if pending else {}

    # -- dispatching --------------------------------------------------------------------------

    def _queue(self, path: str) -> _Queue:
        queue = self._queues.get(path)
        if queue is None:
            queue = self._queues[path] = _Queue(path=path, queue_id=path.rsplit("/", 1)[-1])
        return queue

    def _queue_path(self, queue: str) -> str:
        """A queue path from a path or a bare queue id (which must then be unambiguous)."""
        if "/" in queue:
            return queue
        known = [path for path in self._queues if path.rsplit("/", 1)[-1] == queue]
        return known[0] if len(known) == 1 else f"projects/local/locations/local/queues/{queue}"

    def _idle(self) -> bool:
        return not self._attempts and all(t.state != PENDING for t in self._tasks.values())

    def _schedule(self) -> None:
        with self._cond:
            while not self._stopping:
                now = time.monotonic()
                wake = now + 1.0
                for attempt in self._attempts:
                    if attempt.timed_out:
                        continue
                    if now >= attempt.deadline:
                        attempt.timed_out = True
                        _shut(attempt.sock)
                    else:
                        wake = min(wake, attempt.deadline)
                if not self._paused:
                    for queue in self._queues.values():
                        if not queue.paused:
                            wake = min(wake, self._launch_due(queue, now))
                self._cond.wait(max(0.0, wake - time.monotonic()))

    def _launch_due(self, queue: _Queue, now: float) -> float:
        """Start every due task the queue has room for; when the next one falls due (else infinity)."""
        while queue.heap and queue.in_flight < self.max_concurrent:
            due, _, task = queue.heap[0]
            if task.state != PENDING:
                heapq.heappop(queue.heap)
                continue
            if due > now:
                return due
            heapq.heappop(queue.heap)
            attempt = _Attempt(task=task, deadline=now + task.spec.dispatch_deadline)
            retry_count, execution_count = task.dispatch_count, task.response_count
            task.dispatch_count += 1
            task.last_attempt = time.time()
            if task.first_attempt is None:
                task.first_attempt = task.last_attempt
            queue.in_flight += 1
            queue.peak_in_flight = max(queue.peak_in_flight, queue.in_flight)
            headers = self._headers(task, retry_count, execution_count)
            attempt.thread = threading.Thread(
                target=self._deliver, args=(attempt, headers),
                name=f"cloud-tasks-dispatch-{queue.queue_id}-{task.task_id}"[:80], daemon=True,
            )  # fmt: skip
            self._attempts.add(attempt)
            attempt.thread.start()
        return float("inf")

    def _headers(self, task: _Task, retry_count: int, execution_count: int) -> list[tuple[str, str]]:
        spec = task.spec
        headers = [(k, v) for k, v in spec.headers if not (spec.oidc_email and k.lower() == "authorization")]
        names = {k.lower() for k, _ in headers}
        if "user-agent" not in names:
            headers.append(("User-Agent", USER_AGENT))
        if spec.body and "content-type" not in names:
            headers.append(("Content-Type", "application/octet-stream"))
        if spec.oidc_email and spec.oidc_audience:
            headers.append(("Authorization", f"Bearer {self.mint_token(spec.oidc_audience, spec.oidc_email)}"))
        headers += [
            ("X-CloudTasks-QueueName", task.queue.queue_id),
            ("X-CloudTasks-TaskName", task.task_id),
            ("X-CloudTasks-TaskRetryCount", str(retry_count)),
            ("X-CloudTasks-TaskExecutionCount", str(execution_count)),
            ("X-CloudTasks-TaskETA", f"{task.schedule_time:.6f}"),
        ]
        if task.previous_response is not None:
            headers.append(("X-CloudTasks-TaskPreviousResponse", str(task.previous_response)))
        return headers

    def _deliver(self, attempt: _Attempt, headers: list[tuple[str, str]]) -> None:
        task = attempt.task
        try:
            outcome: int | str = self._exchange(attempt, headers)
        except _NotLoopback:
            outcome = REFUSED
        except (OSError, http.client.HTTPException, ssl.SSLError) as exc:
            outcome = TIMEOUT if attempt.timed_out or isinstance(exc, TimeoutError) else CONNECTION_ERROR
        except Exception:
            log.exception("delivering task %s failed unexpectedly", task.name)
            outcome = CONNECTION_ERROR
        with self._cond:
            self._attempts.discard(attempt)
            task.queue.in_flight -= 1
            if not self._stopping:
                self._record(task, outcome)
            self._cond.notify_all()

    def _exchange(self, attempt: _Attempt, headers: list[tuple[str, str]]) -> int:
        """One HTTP exchange with the task's target; its status code (the body is read and dropped)."""
        spec = attempt.task.spec
        parts = urlsplit(spec.url)
        host = parts.hostname or ""
        if not is_loopback_host(host):
            raise _NotLoopback(host)
        timeout = max(0.001, attempt.deadline - time.monotonic())
        connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        connection = connection_class(host, parts.port, timeout=timeout)
        try:
            connection.connect()
            with self._cond:
                attempt.sock = connection.sock
                if attempt.timed_out or self._stopping:
                    _shut(attempt.sock)
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            connection.putrequest(spec.method, target, skip_accept_encoding=True)
            for name, value in headers:
                connection.putheader(name, value)
            if spec.body or spec.method in _BODY_METHODS:
                connection.putheader("Content-Length", str(len(spec.body)))
            connection.endheaders(spec.body or None)
            response = connection.getresponse()
            status = response.status
            with contextlib.suppress(OSError, http.client.HTTPException):
                response.read(MAX_RESPONSE_BYTES)
            return status
        finally:
            connection.close()

    def _record(self, task: _Task, outcome: int | str) -> None:
        task.last_status = outcome
        if isinstance(outcome, int):
            task.response_count += 1
            task.previous_response = outcome
        if task.state != PENDING:  # deleted while in flight
            return
        if isinstance(outcome, int) and 200 <= outcome < 300:
            task.state = DONE
            log.info("task %s delivered (HTTP %s, attempt %d)", task.name, outcome, task.dispatch_count)
            return
        if outcome == REFUSED:
            task.state = FAILED
            log.warning("task %s dropped: %s is not a loopback address; the emulator only delivers to this "
                        "machine", task.name, urlsplit(task.spec.url).hostname)  # fmt: skip
            return
        if 0 < self.max_attempts <= task.dispatch_count:
            task.state = FAILED
            log.warning("task %s dropped after %d attempts (last: %s)", task.name, task.dispatch_count, outcome)
            return
        delay = backoff_delay(task.dispatch_count - 1, self.min_backoff, self.max_backoff, self.max_doublings)
        task.schedule_time = time.time() + delay
        task.due = time.monotonic() + delay
        heapq.heappush(task.queue.heap, (task.due, next(self._seq), task))
        log.info("task %s attempt %d: %s; retrying in %.2f s", task.name, task.dispatch_count, outcome, delay)


class _NotLoopback(Exception):
    pass


def _shut(sock: socket.socket | None) -> None:
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


# -- HTTP ---------------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], emulator: CloudTasksEmulator) -> None:
        self.emulator = emulator
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._connections: set[socket.socket] = set()
        self._connections_guard = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse-DNS lookup (`socket.getfqdn`), which can stall start-up."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request: object, client_address: object) -> None:
        log.debug("connection from %s ended with an error", client_address, exc_info=True)

    def track(self, connection: socket.socket, on: bool) -> None:
        with self._connections_guard:
            (self._connections.add if on else self._connections.discard)(connection)

    def sever_connections(self) -> None:
        with self._connections_guard:
            connections = list(self._connections)
        for connection in connections:
            _shut(connection)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    # The stand-in's server does the same: without it, a small request and its answer wait out a
    # delayed ACK (~40 ms) on loopback.
    disable_nagle_algorithm = True
    timeout = 30

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, False)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s - %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._handle()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def _handle(self) -> None:
        try:
            status, body = self._route()
        except ApiError as exc:
            status, body = exc.code, exc.body()
        except Exception:
            log.exception("the Cloud Tasks emulator failed on %s %s", self.command, self.path)
            status, body = 500, ApiError(500, "INTERNAL", "Internal error encountered.").body()
        payload = json.dumps(body, indent=2).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(payload)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(payload)

    def _read_json(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_TASK_BYTES * 2 or length < 0:
            self.close_connection = True
            raise _invalid("Task size too large.")
        raw = self.rfile.read(length) if length else b""
        if not raw.strip():
            return {}
        try:
            return json.loads(raw)
        except ValueError:
            raise _invalid("Invalid JSON payload received.") from None

    def _route(self) -> tuple[int, Any]:
        emulator = self.server.emulator
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        method = self.command
        body = self._read_json() if method in ("POST", "PUT", "PATCH") else None
        if path.startswith("/v2/"):
            resource = path[len("/v2/") :]
            if method == "POST" and resource.endswith("/tasks"):
                return 200, emulator.create_task(resource[: -len("/tasks")], body)
            if method == "GET" and resource.endswith("/tasks") and QUEUE_PATH.fullmatch(resource[: -len("/tasks")]):
                return 200, emulator.list_tasks(resource[: -len("/tasks")])
            queue_path, sep, task_id = resource.rpartition("/tasks/")
            if sep and QUEUE_PATH.fullmatch(queue_path) and TASK_ID.fullmatch(task_id):
                if method == "GET":
                    return 200, emulator.get_task(resource)
                if method == "DELETE":
                    emulator.delete_task(resource)
                    return 200, {}
            raise _not_found(f"The emulator does not serve {method} {path}.")
        if path == "/_emulator/tasks" and method == "GET":
            queue = parse_qs(parts.query).get("queue", [None])[0]
            return 200, {"tasks": emulator.tasks(queue)}
        if path == "/_emulator/queues" and method == "GET":
            return 200, {"queues": emulator.queues()}
        if path == OIDC_JWKS_PATH and method == "GET":
            return 200, emulator.oidc.jwks()
        if path == f"{OIDC_PATH}/token" and method == "GET":
            query = parse_qs(parts.query)
            audience, email = query.get("audience", [""])[0], query.get("email", [""])[0]
            if not audience or "@" not in email:
                raise _invalid("Expected ?audience=<URL of the function>&email=<service account email>.")
            return 200, {"token": emulator.mint_token(audience, email)}
        if path in ("/_emulator/unavailable", "/_emulator/pause") and method == "POST":
            on = body.get("on") if isinstance(body, dict) else None
            queue = body.get("queue") if isinstance(body, dict) else None
            if not isinstance(on, bool) or not (queue is None or isinstance(queue, str)):
                raise _invalid('Expected {"on": true|false} (and, for pause, an optional "queue").')
            if path.endswith("unavailable"):
                emulator.set_unavailable(on)
                return 200, {"unavailable": on}
            emulator.pause(on, queue)
            return 200, {"paused": on, "queue": queue}
        if path in ("/", "/_emulator", "/_emulator/") and method == "GET":
            return 200, {
                "service": "Cloud Tasks v2 emulator (local stack)",
                "api": f"{emulator.url}/v2/projects/PROJECT/locations/LOCATION/queues/QUEUE/tasks",
                "control": ["GET /_emulator/tasks[?queue=]", "GET /_emulator/queues",
                            'POST /_emulator/unavailable {"on": bool}', 'POST /_emulator/pause {"on": bool}',
                            f"GET {OIDC_JWKS_PATH}", f"GET {OIDC_PATH}/token?audience=&email="],
            }  # fmt: skip
        raise _not_found(f"The emulator does not serve {method} {path}.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.cloud_tasks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="a loopback address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8123, help="default 8123; 0 picks a free port")
    parser.add_argument("--min-backoff", type=float, default=0.1)
    parser.add_argument("--max-backoff", type=float, default=5.0)
    parser.add_argument("--max-doublings", type=int, default=4)
    parser.add_argument("--max-attempts", type=int, default=100, help="0: unlimited")
    parser.add_argument("--max-concurrent", type=int, default=10, help="deliveries in flight per queue")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    emulator = CloudTasksEmulator(
        args.host, args.port, min_backoff=args.min_backoff, max_backoff=args.max_backoff,
        max_doublings=args.max_doublings, max_attempts=args.max_attempts, max_concurrent=args.max_concurrent,
    )  # fmt: skip
    with emulator:
        print(f"Cloud Tasks emulator at {emulator.url} (CLOUD_TASKS_API_URL); Ctrl-C stops it", flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
