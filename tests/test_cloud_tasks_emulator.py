"""The Cloud Tasks emulator of the local stack (devstack/cloud_tasks.py), over real HTTP.

createTask is sent exactly as the production client sends it (tasks v2 REST) and answered as
Google answers; tasks are delivered to a loopback HTTP server started here, which records what
it received (body, OIDC stand-in, X-CloudTasks-* headers) and answers as each test scripts it:
errors then success (retries with backoff), a hang longer than the dispatch deadline, slow
answers (bounded concurrency), a hang while the emulator stops. No database is needed.
"""

from __future__ import annotations

import base64
import io
import json
import socketserver
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt
import pytest

from devstack.cloud_tasks import CloudTasksEmulator, backoff_delay
from devstack.stack import COMMAND_QUEUE, Stack, StopSignal, command_queue_env, parse_args

PROJECT_QUEUE = "projects/local/locations/local/queues/dtma-commands"
SA = "dtma-commands@local.test"


def b64url_json(part: str) -> dict[str, Any]:
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    """A loopback HTTP server standing in for dtma_command_worker; `answer(n)` -> (status, seconds to wait)."""

    answer: Callable[[int], tuple[int, float]] = lambda n: (200, 0.0)
    requests: list[Received] = field(default_factory=list)
    in_flight: int = 0
    peak: int = 0
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/functions/v1/dtma_command_worker"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver.lock:
                    n = len(receiver.requests)
                    receiver.requests.append(Received(self.path, dict(self.headers.items()), body, time.monotonic()))
                    receiver.in_flight += 1
                    receiver.peak = max(receiver.peak, receiver.in_flight)
                status, wait = receiver.answer(n)
                try:
                    if wait:
                        receiver.release.wait(wait)  # the test's teardown cuts every wait short
                finally:
                    with receiver.lock:
                        receiver.in_flight -= 1
                payload = b'{"ok": true}'
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def server_bind(self) -> None:
                socketserver.TCPServer.server_bind(self)  # no reverse DNS
                self.server_name, self.server_port = self.server_address[:2]

            def handle_error(self, request: object, client_address: object) -> None:
                pass  # the emulator cuts connections on purpose (deadline, stop)

        self.server = Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        self.release.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self.lock:
                if len(self.requests) >= count:
                    return list(self.requests)
            time.sleep(0.01)
        raise AssertionError(f"{count} request(s) expected, got {len(self.requests)}")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


@pytest.fixture
def emulator() -> Iterator[CloudTasksEmulator]:
    with CloudTasksEmulator(min_backoff=0.05, max_backoff=0.5) as e:
        yield e


def task_request(worker_url: str, body: Any, *, task_id: str | None = None, deadline: str = "900s",
                 queue: str = PROJECT_QUEUE) -> dict[str, Any]:
    """Exactly what the production client sends."""
    task: dict[str, Any] = {
        "dispatchDeadline": deadline,
        "httpRequest": {
            "url": worker_url,
            "httpMethod": "POST",
            "headers": {"Content-Type": "application/json"},
            "body": base64.b64encode(json.dumps(body).encode()).decode(),
            "oidcToken": {"serviceAccountEmail": SA, "audience": worker_url},
        },
    }
    if task_id is not None:
        task["name"] = f"{queue}/tasks/{task_id}"
    return {"task": task}


def create(emulator: CloudTasksEmulator, document: Any, *, queue: str = PROJECT_QUEUE,
           token: str | None = "ya29.local") -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.post(f"{emulator.url}/v2/{queue}/tasks", content=json.dumps(document), headers=headers,
                      timeout=10, trust_env=False)


def new_id() -> str:
    return f"cmd-{uuid.uuid4().hex}_deploy"


def test_the_production_request_is_accepted_and_answered_as_a_task(emulator: CloudTasksEmulator) -> None:
    emulator.pause()  # nothing listens at this URL; only the answer matters here
    worker = "http://127.0.0.1:9/functions/v1/dtma_command_worker"
    task_id = new_id()
    for token in ("ya29.from-google", None):  # with and without a bearer token
        response = create(emulator, task_request(worker, {"command_id": 1}, task_id=f"{task_id}{bool(token)}"),
                          token=token)
        assert response.status_code == 200, response.text
        task = response.json()
        assert task["name"] == f"{PROJECT_QUEUE}/tasks/{task_id}{bool(token)}"
        assert task["dispatchDeadline"] == "900s"
        assert task["httpRequest"]["url"] == worker and task["httpRequest"]["httpMethod"] == "POST"
        assert task["httpRequest"]["oidcToken"] == {"serviceAccountEmail": SA, "audience": worker}
        assert "body" not in task["httpRequest"]  # BASIC view
        assert task["dispatchCount"] == 0 and task["responseCount"] == 0
        for key in ("createTime", "scheduleTime"):
            assert task[key].endswith("Z") and task[key][:2] == "20"
    # Without a name the emulator makes one; queues need not exist beforehand.
    other = "projects/p-1/locations/europe-west1/queues/another-queue"
    document = task_request(worker, {})
    response = create(emulator, document, queue=other)
    assert response.status_code == 200, response.text
    assert response.json()["name"].startswith(f"{other}/tasks/")
    listed = httpx.get(f"{emulator.url}/v2/{other}/tasks", trust_env=False).json()["tasks"]
    assert [t["name"] for t in listed] == [response.json()["name"]]
    assert {t["queue"] for t in emulator.tasks()} == {PROJECT_QUEUE, other}
    assert len(emulator.tasks("dtma-commands")) == 2 and all(t["state"] == "pending" for t in emulator.tasks())


def _bad(mutate: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    document = task_request("http://127.0.0.1:9/w", {"a": 1}, task_id="ok-id")
    mutate(document)
    return document


@pytest.mark.parametrize(("queue", "document"), [
    ("projects/local/queues/dtma-commands", _bad(lambda d: d["task"].pop("name"))),
    ("projects/local/locations/local/queues/bad_queue!", _bad(lambda d: d["task"].pop("name"))),
    (PROJECT_QUEUE, _bad(lambda d: d["task"].update(name=f"{PROJECT_QUEUE}/tasks/has space"))),
    (PROJECT_QUEUE, _bad(lambda d: d["task"].update(name=f"{PROJECT_QUEUE}/tasks/{'x' * 501}"))),
    (PROJECT_QUEUE, _bad(lambda d: d["task"].update(name="projects/local/locations/local/queues/other/tasks/a"))),
    (PROJECT_QUEUE, _bad(lambda d: d["task"]["httpRequest"].pop("url"))),
    (PROJECT_QUEUE, _bad(lambda d: d["task"]["httpRequest"].update(url="/relative"))),
    (PROJECT_QUEUE, _bad(lambda d: d["task"]["httpRequest"].update(body="not base64!"))),
    (PROJECT_QUEUE, _bad(lambda d: d["task"].update(dispatchDeadline="14s"))),
    (PROJECT_QUEUE, _bad(lambda d: d["task"].update(dispatchDeadline="1801s"))),
    (PROJECT_QUEUE, _bad(lambda d: d["task"].update(dispatchDeadline="15 minutes"))),
    (PROJECT_QUEUE, _bad(lambda d: d["task"].update(dispatchDedline="900s"))),
    (PROJECT_QUEUE, _bad(lambda d: d["task"].pop("httpRequest"))),
    (PROJECT_QUEUE, _bad(lambda d: d["task"]["httpRequest"]["oidcToken"].pop("serviceAccountEmail"))),
    (PROJECT_QUEUE, _bad(lambda d: d.pop("task"))),
])  # fmt: skip
def test_a_bad_request_is_refused_with_googles_error_shape(emulator: CloudTasksEmulator, queue: str,
                                                           document: dict[str, Any]) -> None:
    response = create(emulator, document, queue=queue)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"code", "message", "status"}
    assert error["code"] == 400 and error["status"] == "INVALID_ARGUMENT" and error["message"]
    assert emulator.tasks() == []
    # The limits themselves are accepted.
    for deadline in ("15s", "1800s"):
        ok = create(emulator, task_request("http://127.0.0.1:9/w", {}, deadline=deadline), queue=PROJECT_QUEUE)
        assert ok.status_code == 200, ok.text


def test_a_task_is_delivered_once_with_the_oidc_stand_in_and_cloud_tasks_headers(
        emulator: CloudTasksEmulator, receiver: Receiver) -> None:
    task_id = new_id()
    body = {"command_id": "c0ffee", "action": "deploy", "note": "é"}
    before = time.time()
    assert create(emulator, task_request(receiver.url, body, task_id=task_id)).status_code == 200
    assert emulator.wait_idle(10)
    time.sleep(0.2)  # a second delivery would show now
    assert len(receiver.requests) == 1
    got = receiver.requests[0]
    assert got.path == "/functions/v1/dtma_command_worker"
    assert json.loads(got.body) == body
    headers = {k.lower(): v for k, v in got.headers.items()}
    assert headers["content-type"] == "application/json"
    assert headers["x-cloudtasks-queuename"] == "dtma-commands"
    assert headers["x-cloudtasks-taskname"] == task_id
    assert headers["x-cloudtasks-taskretrycount"] == "0"
    assert headers["x-cloudtasks-taskexecutioncount"] == "0"
    assert before - 1 <= float(headers["x-cloudtasks-tasketa"]) <= time.time() + 1
    scheme, token = headers["authorization"].split(" ")
    assert scheme == "Bearer"
    header, payload, _ = token.split(".")
    assert b64url_json(header)["alg"] == "RS256" and b64url_json(header)["kid"] == emulator.oidc.kid
    claims = b64url_json(payload)
    assert claims["aud"] == receiver.url and claims["email"] == SA and claims["email_verified"] is True
    assert claims["iss"] == f"{emulator.url}/_emulator/oidc" and claims["exp"] - claims["iat"] == 3600
    assert claims["sub"]
    # Verified as a worker verifies it: the key from the JWKS the emulator serves, RS256 only.
    key = jwt.PyJWKClient(emulator.oidc_jwks_url).get_signing_key_from_jwt(token)
    assert jwt.decode(token, key, algorithms=["RS256"], audience=receiver.url,
                      issuer=emulator.oidc.issuer)["email"] == SA
    assert emulator.verify_token(token, audience=receiver.url)["email"] == SA
    with pytest.raises(ValueError, match="not"):
        emulator.verify_token(token, audience="http://elsewhere")

    [task] = emulator.tasks()
    assert (task["state"], task["attempts"], task["last_status"]) == ("done", 1, 200)
    assert task["json"] == body and json.loads(task["body"]) == body
    served = httpx.get(f"{emulator.url}/_emulator/tasks", trust_env=False).json()["tasks"]
    assert served == emulator.tasks()
    # Finished tasks are gone from the API, as in Cloud Tasks.
    assert httpx.get(f"{emulator.url}/v2/{task['name']}", trust_env=False).status_code == 404


def test_the_oidc_issuer_serves_its_jwks_and_mints_tokens_like_google(emulator: CloudTasksEmulator) -> None:
    jwks = httpx.get(emulator.oidc_jwks_url, trust_env=False).json()
    [key] = jwks["keys"]
    assert (key["kty"], key["alg"], key["use"], key["kid"]) == ("RSA", "RS256", "sig", emulator.oidc.kid)
    assert "d" not in key and "p" not in key  # the public half only
    # What `gcloud auth print-identity-token --impersonate-service-account` gives, for a sweep by hand.
    answer = httpx.get(f"{emulator.url}/_emulator/oidc/token", params={"audience": "http://127.0.0.1:1/s",
                                                                        "email": SA}, trust_env=False)
    assert answer.status_code == 200, answer.text
    claims = emulator.verify_token(answer.json()["token"], audience="http://127.0.0.1:1/s")
    assert claims["email"] == SA and claims["email_verified"] is True
    assert httpx.get(f"{emulator.url}/_emulator/oidc/token", params={"audience": "x"},
                     trust_env=False).status_code == 400
    # Someone else's key, an expired token: not the emulator's.
    other = CloudTasksEmulator()
    try:
        with pytest.raises(ValueError, match="not a token of this emulator"):
            emulator.verify_token(other.mint_token("a", SA))
    finally:
        other.stop()
    with pytest.raises(ValueError, match="expired"):
        emulator.verify_token(emulator.mint_token("a", SA, now=time.time() - 7200))


def test_an_error_answer_is_retried_with_backoff(receiver: Receiver) -> None:
    receiver.answer = lambda n: (500 if n == 0 else 200, 0.0)
    with CloudTasksEmulator(min_backoff=0.3, max_backoff=1.0) as emulator:
        assert create(emulator, task_request(receiver.url, {"n": 1}, task_id=new_id())).status_code == 200
        assert emulator.wait_idle(15)
    first, second = receiver.wait_for(2)
    assert len(receiver.requests) == 2
    counts = [(r.headers["X-CloudTasks-TaskRetryCount"], r.headers["X-CloudTasks-TaskExecutionCount"])
              for r in (first, second)]
    assert counts == [("0", "0"), ("1", "1")]
    assert second.headers["X-CloudTasks-TaskPreviousResponse"] == "500"
    assert second.at - first.at >= 0.25  # min_backoff, generously
    assert first.body == second.body
    [task] = emulator.tasks()
    assert (task["state"], task["attempts"], task["responses"], task["last_status"]) == ("done", 2, 2, 200)


def test_a_hang_longer_than_the_dispatch_deadline_is_retried(receiver: Receiver) -> None:
    receiver.answer = lambda n: (200, 30.0 if n == 0 else 0.0)
    with CloudTasksEmulator(min_backoff=0.05, min_deadline=0.2) as emulator:
        response = create(emulator, task_request(receiver.url, {}, task_id=new_id(), deadline="0.5s"))
        assert response.status_code == 200 and response.json()["dispatchDeadline"] == "0.5s"
        started = time.monotonic()
        assert emulator.wait_idle(15)
        assert time.monotonic() - started < 10  # the hang was cut at the deadline, not waited out
        _, second = receiver.wait_for(2)
        assert second.headers["X-CloudTasks-TaskRetryCount"] == "1"
        assert second.headers["X-CloudTasks-TaskExecutionCount"] == "0"  # the first attempt got no answer
        [task] = emulator.tasks()
        assert (task["state"], task["attempts"], task["responses"]) == ("done", 2, 1)
        # Google's bounds hold unless lowered: the default emulator refuses 0.5 s.
    with CloudTasksEmulator() as strict:
        assert create(strict, task_request(receiver.url, {}, deadline="0.5s")).status_code == 400


def test_failures_stop_after_max_attempts_and_other_hosts_are_never_contacted(receiver: Receiver) -> None:
    receiver.answer = lambda n: (503, 0.0)
    with CloudTasksEmulator(min_backoff=0.01, max_backoff=0.02, max_attempts=3) as emulator:
        create(emulator, task_request(receiver.url, {}, task_id="always-503"))
        create(emulator, task_request("http://127.0.0.1:1/closed", {}, task_id="closed-port"))
        create(emulator, task_request("http://192.0.2.10/worker", {}, task_id="not-loopback"))
        assert emulator.wait_idle(15)
        tasks = {t["id"]: t for t in emulator.tasks()}
    assert (tasks["always-503"]["state"], tasks["always-503"]["attempts"]) == ("failed", 3)
    assert tasks["always-503"]["last_status"] == 503 and len(receiver.requests) == 3
    assert tasks["closed-port"]["state"] == "failed" and tasks["closed-port"]["last_status"] == "connection error"
    assert tasks["not-loopback"]["state"] == "failed" and tasks["not-loopback"]["attempts"] == 1
    assert "not a loopback" in tasks["not-loopback"]["last_status"]


def test_backoff_follows_cloud_tasks() -> None:
    assert [backoff_delay(k, 10, 300, 3) for k in range(8)] == [10, 20, 40, 80, 160, 240, 300, 300]
    assert [backoff_delay(k, 0.1, 5, 4) for k in range(7)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 4.8])


def test_a_name_is_used_once_even_after_its_task_finished(emulator: CloudTasksEmulator, receiver: Receiver) -> None:
    document = task_request(receiver.url, {"x": 1}, task_id=new_id())
    assert create(emulator, document).status_code == 200
    duplicate = create(emulator, document)
    assert duplicate.status_code == 409
    assert duplicate.json() == {"error": {"code": 409, "message": "Requested entity already exists",
                                          "status": "ALREADY_EXISTS"}}
    assert emulator.wait_idle(10) and emulator.tasks()[0]["state"] == "done"
    assert create(emulator, document).status_code == 409
    assert len(receiver.requests) == 1


def test_unavailable_mode_answers_503_then_accepts_again(emulator: CloudTasksEmulator, receiver: Receiver) -> None:
    control = httpx.post(f"{emulator.url}/_emulator/unavailable", json={"on": True}, trust_env=False)
    assert control.status_code == 200
    document = task_request(receiver.url, {}, task_id=new_id())
    refused = create(emulator, document)
    assert refused.status_code == 503
    assert refused.json() == {"error": {"code": 503, "status": "UNAVAILABLE",
                                        "message": "The service is currently unavailable."}}
    assert emulator.tasks() == []
    httpx.post(f"{emulator.url}/_emulator/unavailable", json={"on": False}, trust_env=False)
    assert create(emulator, document).status_code == 200  # the refused name was not used
    emulator.set_unavailable(True)
    assert create(emulator, task_request(receiver.url, {})).status_code == 503
    emulator.set_unavailable(False)
    assert emulator.wait_idle(10) and len(receiver.requests) == 1
    bad = httpx.post(f"{emulator.url}/_emulator/unavailable", json={"on": "yes"}, trust_env=False)
    assert bad.status_code == 400


def test_pause_holds_dispatching_but_accepts_tasks(emulator: CloudTasksEmulator, receiver: Receiver) -> None:
    assert httpx.post(f"{emulator.url}/_emulator/pause", json={"on": True}, trust_env=False).status_code == 200
    assert create(emulator, task_request(receiver.url, {"held": True}, task_id=new_id())).status_code == 200
    assert not emulator.wait_idle(0.4)
    assert receiver.requests == [] and emulator.tasks()[0]["state"] == "pending"
    httpx.post(f"{emulator.url}/_emulator/pause", json={"on": False}, trust_env=False)
    assert emulator.wait_idle(10) and len(receiver.requests) == 1


def test_concurrent_deliveries_per_queue_are_bounded(receiver: Receiver) -> None:
    receiver.answer = lambda n: (200, 0.3)
    with CloudTasksEmulator(max_concurrent=3) as emulator:
        started = time.monotonic()
        for _ in range(9):
            assert create(emulator, task_request(receiver.url, {})).status_code == 200
        assert time.monotonic() - started < 5  # createTask never waited for a delivery
        assert emulator.wait_idle(20)
        [queue] = emulator.queues()
    assert len(receiver.requests) == 9
    assert 2 <= receiver.peak <= 3
    assert queue["peak_in_flight"] <= 3 and queue["done"] == 9


def test_stop_returns_promptly_with_deliveries_in_flight(receiver: Receiver) -> None:
    receiver.answer = lambda n: (200, 60.0)
    emulator = CloudTasksEmulator(max_concurrent=4).start()
    try:
        for _ in range(6):
            create(emulator, task_request(receiver.url, {}))
        receiver.wait_for(4)
    finally:
        started = time.monotonic()
        emulator.stop()
        took = time.monotonic() - started
    assert took < 5, took
    assert not [t for t in threading.enumerate() if t.name.startswith("cloud-tasks")]
    with pytest.raises(httpx.TransportError):
        create(emulator, task_request(receiver.url, {}))
    emulator.stop()  # idempotent


def test_the_emulator_listens_on_loopback_only() -> None:
    with pytest.raises(ValueError, match="loopback"):
        CloudTasksEmulator(host="0.0.0.0")


def test_the_local_stack_gives_the_functions_the_queue_settings() -> None:
    env = command_queue_env("http://127.0.0.1:4444", "http://127.0.0.1:54321")
    assert env == {
        "TASKS_MODE": "cloud_tasks",
        "CLOUD_TASKS_API_URL": "http://127.0.0.1:4444",
        "COMMAND_QUEUE": "projects/local/locations/local/queues/dtma-commands",
        "COMMAND_WORKER_URL": "http://127.0.0.1:54321/functions/v1/dtma_command_worker",
        "COMMAND_INVOKER_SA": "dtma-commands@local.test",
    }
    assert COMMAND_QUEUE == PROJECT_QUEUE

    stack = Stack(parse_args(["--state-dir", "/tmp/state"], environ={}), StopSignal(), out=io.StringIO())
    stack.base_url = "http://127.0.0.1:1"
    stack.env = {"FUNCTIONS_URL": "http://127.0.0.1:1/functions/v1", "DTMA_STANDIN_URL": "http://127.0.0.1:2",
                 "OPENAPI_URL": "", "DATABASE_URL": "", "DEMO_TOOLBOX_ID": "t", "DEMO_USER_EMAIL": "e",
                 "DEMO_USER_ID": "u", "LOG_FILE": "/tmp/state/stack.log", "DEMO_USER_JWT": "j",
                 "DEMO_TOOLBOX_TOKEN": "k", "CLOUD_TASKS_URL": "http://127.0.0.1:4444"}
    stack.print_banner()
    assert "http://127.0.0.1:4444" in stack.out.getvalue()
    assert "curl -sS -X POST http://127.0.0.1:1/functions/v1/mcp_status_sweep\n" in stack.out.getvalue()
    # With --sweep-oidc the sweep checks the scheduler's token: the banner's sweep by hand sends one.
    assert parse_args(["--sweep-oidc"], environ={}).sweep_oidc is True
    with pytest.raises(SystemExit):
        parse_args(["--sweep-oidc", "--demo"], environ={})  # the walkthrough sweeps without a token
    stack.env["SWEEP_TOKEN"] = "eyJ.sweep.token"
    stack.out = io.StringIO()
    stack.print_banner()
    assert "export SWEEP_TOKEN=eyJ.sweep.token" in stack.out.getvalue()
    assert 'mcp_status_sweep -H "Authorization: Bearer $SWEEP_TOKEN"' in stack.out.getvalue()
