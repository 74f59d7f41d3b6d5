"""Agent commands through the real queue contract: deploy and manage enqueue Cloud Tasks REST
`tasks.create` calls to the local emulator (devstack/cloud_tasks.py), which delivers each task
over HTTP, with an OIDC-shaped token and retries with backoff, to dtma_command_worker served on a
loopback port; the worker runs the command against a DTMA stand-in. Retries, duplicates,
ordering, the queue being down, a worker dying mid-command and the per-toolbox bound are each
driven here; docs/commands.md describes the contract."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import psycopg
import pytest
import respx
from flask.testing import FlaskClient

from devstack.cloud_tasks import CloudTasksEmulator
from devstack.server import HttpServer
from shared.adapters.tasks import CloudTasksQueue, EnqueueFailed
from shared.core.config import load_settings
from tests.factories import Factory
from tests.helpers import auth, last_command, server_row, spec

QUEUE = "projects/test-project/locations/local/queues/dtma-commands"
SA = "dtma-commands@test-project.iam.gserviceaccount.com"


class Lazy:
    """A WSGI app filled in after the server is bound (the worker's URL goes into its own settings)."""

    def __init__(self) -> None:
        self.app: Any = None

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        return self.app(environ, start_response)


class Queued:
    """deploy/manage/sweep clients enqueueing to the emulator, and the worker it delivers to."""

    def __init__(self, function_client: Callable[..., FlaskClient], emulator: CloudTasksEmulator, worker_url: str,
                 **env: str) -> None:
        self.emulator = emulator
        self.worker_url = worker_url
        self.env = {"TASKS_MODE": "cloud_tasks", "CLOUD_TASKS_API_URL": emulator.url, "COMMAND_QUEUE": QUEUE,
                    "COMMAND_WORKER_URL": worker_url, "COMMAND_INVOKER_SA": SA, **env}
        self.make = function_client

    def client(self, function: str, **env: str) -> FlaskClient:
        return self.make(function, **self.env, **env)

    def until(self, predicate: Callable[[], bool], seconds: float = 15.0) -> None:
        deadline = time.monotonic() + seconds
        while not predicate():
            assert time.monotonic() < deadline, "not reached in time"
            time.sleep(0.05)


@pytest.fixture
def queued(function_client: Callable[..., FlaskClient]) -> Iterator[Callable[..., Queued]]:
    emulator = CloudTasksEmulator(min_backoff=0.05, max_backoff=0.5).start()
    app = Lazy()
    server = HttpServer("127.0.0.1", 0, app)
    server.start()
    made: list[Queued] = []

    def make(**env: str) -> Queued:
        world = Queued(function_client, emulator, f"http://127.0.0.1:{server.port}/", **env)
        app.app = world.client("dtma_command_worker").application
        made.append(world)
        return world

    try:
        yield make
    finally:
        emulator.pause(True)
        emulator.wait_idle(10)
        emulator.stop()
        server.stop()


def deploy(world: Queued, box: Any, **overrides: Any) -> str:
    response = world.client("deploy_mcp_server").post("/", json=spec(box, **overrides), headers=auth(box.user_id))
    assert response.status_code == 202, response.json
    return response.json["id"]


def deployed(world: Queued, box: Any, pg: psycopg.Connection) -> str:
    """A server deployed through the queue, once the worker has recorded it running."""
    server = deploy(world, box)
    world.until(lambda: server_row(pg, server)[0] == "running")
    return server


def tasks_of(world: Queued) -> list[dict[str, Any]]:
    return world.emulator.tasks()


def command_id_of(pg: psycopg.Connection, instance_id: str) -> str:
    return str(pg.execute("select id from dtma_commands where account_tool_instance_id = %s order by seq desc limit 1",
                          (instance_id,)).fetchone()[0])


# --- the happy path, through the queue ------------------------------------------------------------------

def test_a_deploy_travels_through_the_queue_to_the_worker(queued: Any, toolbox_agent: Any,
                                                          pg: psycopg.Connection) -> None:
    world = queued()
    box, agent = toolbox_agent()
    server = deployed(world, box, pg)
    command = command_id_of(pg, server)
    # The worker records the outcome before it answers the delivery: wait for both.
    world.until(lambda: [t["state"] for t in tasks_of(world)] == ["done"])
    (task,) = tasks_of(world)
    assert task["name"] == f"{QUEUE}/tasks/{command}-1" and task["state"] == "done" and task["attempts"] == 1
    assert task["json"] == {"command_id": command} and task["url"] == world.worker_url
    assert task["dispatch_deadline"] == "900s"
    assert last_command(pg, server)["status"] == "done"
    # The env values travelled sealed in the command row, not in the task.
    assert "ghp_supersecret123" not in task["body"]
    assert next(c for c in agent.containers() if c.name == "mcp-github").env_dict() == {
        "GITHUB_TOKEN": "ghp_supersecret123"}


def test_an_action_answers_inline_when_the_worker_is_quick(queued: Any, toolbox_agent: Any,
                                                           pg: psycopg.Connection) -> None:
    world = queued()
    box, _ = toolbox_agent()
    server = deployed(world, box, pg)
    stop = world.client("manage_mcp_server").post(f"/{server}/stop", headers=auth(box.user_id))
    assert stop.status_code == 200 and stop.json["status"] == "stopped", stop.json


def test_a_slow_action_answers_202_and_its_outcome_still_arrives(queued: Any, toolbox_agent: Any,
                                                                 pg: psycopg.Connection) -> None:
    world = queued(DTMA_DEPLOY_BUDGET_SECONDS="0.05")
    box, _ = toolbox_agent()
    server = deployed(world, box, pg)
    world.emulator.pause(True)  # the queue holds the task beyond the manage function's budget
    stop = world.client("manage_mcp_server").post(f"/{server}/stop", headers=auth(box.user_id))
    assert stop.status_code == 202 and stop.json["status"] == "stopping"
    world.emulator.pause(False)
    world.until(lambda: server_row(pg, server)[0] == "stopped")


# --- at least once ------------------------------------------------------------------------------------------

def test_a_duplicate_delivery_changes_nothing(queued: Any, toolbox_agent: Any, pg: psycopg.Connection) -> None:
    world = queued()
    box, agent = toolbox_agent()
    server = deploy(world, box)
    world.until(lambda: last_command(pg, server)["status"] == "done")
    again = httpx.post(world.worker_url, json={"command_id": command_id_of(pg, server)}, timeout=10)
    assert again.status_code == 200 and again.json() == {"state": "done"}
    assert sum(1 for r in agent.requests if r.method == "POST" and r.path == "/tools") == 1
    assert server_row(pg, server)[0] == "running"


def test_a_retry_after_the_worker_died_mid_deploy_records_what_really_runs(
        queued: Any, toolbox_agent: Any, pg: psycopg.Connection) -> None:
    """The first attempt reached the agent and died before recording anything; Cloud Tasks
    delivers again once the lease is over. The agent answers 409 "already exists": the worker
    looks, and records the running container instead of failing a deploy that worked."""
    world = queued()
    box, agent = toolbox_agent()
    world.emulator.pause(True)
    server = deploy(world, box)
    command = command_id_of(pg, server)
    claim = pg.execute("select cp_claim_command(%s, 1, 2)", (command,)).fetchone()[0]  # attempt 1 ...
    assert claim["run"] is True
    sent = httpx.post(f"{agent.url}/tools", headers={"Authorization": f"Bearer {agent.token}"}, timeout=10, json={
        "dockerImageUrl": "mcp/github:latest", "instanceNameOnToolbox": "mcp-github",
        "accountToolInstanceId": server, "baseConfigOverrideJson": {"Env": [], "HostConfig": {}}})
    assert sent.status_code == 201  # ... reached the agent, then the worker died
    time.sleep(1.1)  # its lease runs out
    world.emulator.pause(False)
    world.until(lambda: last_command(pg, server)["status"] in ("done", "failed"))
    assert server_row(pg, server) == ("running", None)
    done = last_command(pg, server)
    assert done["status"] == "done" and done["attempts"] == 2
    assert "started by an earlier attempt" in pg.execute(
        "select message from account_tool_instance_events where account_tool_instance_id = %s order by id desc "
        "limit 1", (server,)).fetchone()[0]


def test_a_late_delivery_after_the_deadline_is_superseded_not_run(queued: Any, toolbox_agent: Any,
                                                                  pg: psycopg.Connection) -> None:
    world = queued()
    box, agent = toolbox_agent()
    world.emulator.pause(True)
    server = deploy(world, box)
    pg.execute("update account_tool_instances set status_changed_at = now() - interval '1 hour' where id = %s",
               (server,))
    counts = world.client("mcp_status_sweep", DEPLOY_DEADLINE_SECONDS="60").post("/").json
    assert counts["deadlines_failed"] == 1
    world.emulator.pause(False)
    world.until(lambda: last_command(pg, server)["status"] == "superseded")
    assert server_row(pg, server)[0] == "error"
    assert not any(r.path == "/tools" for r in agent.requests)


# --- order and bounds ------------------------------------------------------------------------------------------

def test_commands_of_one_server_apply_in_order(queued: Any, toolbox_agent: Any, pg: psycopg.Connection) -> None:
    world = queued()
    box, _ = toolbox_agent()
    world.emulator.pause(True)
    server = deploy(world, box)
    first = command_id_of(pg, server)
    # A second command recorded behind the deploy (as a retry of the web app could race it).
    later = "00000000-0000-4000-8000-0000000000aa"
    pg.execute("select cp_private.cp_add_command(%s, i, 'stop', 'running', null, null) from account_tool_instances i "
               "where i.id = %s", (later, server))
    early = httpx.post(world.worker_url, json={"command_id": later}, timeout=10)
    assert early.status_code == 429 and int(early.headers["Retry-After"]) >= 1
    assert "earlier command" in early.json()["error"]["message"]
    world.emulator.pause(False)
    world.until(lambda: pg.execute("select status from dtma_commands where id = %s", (first,)).fetchone()[0] == "done")
    # Delivered again after the deploy: the server has moved on from the status it was recorded
    # with, so it is superseded rather than run against a state it did not expect.
    again = httpx.post(world.worker_url, json={"command_id": later}, timeout=10)
    assert again.status_code == 200 and again.json() == {"state": "superseded"}
    assert server_row(pg, server)[0] == "running"


def test_a_toolbox_runs_a_bounded_number_of_commands_at_once(queued: Any, toolbox_agent: Any,
                                                             pg: psycopg.Connection) -> None:
    world = queued(TOOLBOX_MAX_CONCURRENT_COMMANDS="2")
    box, _ = toolbox_agent(pull_delay=0.4)
    peak, stop = [0], threading.Event()

    def watch() -> None:
        with psycopg.connect(pg.info.dsn, autocommit=True) as conn:
            while not stop.is_set():
                running = conn.execute("select count(*) from dtma_commands where status = 'running' "
                                       "and account_tool_environment_id = %s", (box.id,)).fetchone()[0]
                peak[0] = max(peak[0], running)
                time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    servers = [deploy(world, box, name=f"srv-{n}") for n in range(5)]
    try:
        world.until(lambda: all(server_row(pg, s)[0] == "running" for s in servers), seconds=30)
    finally:
        stop.set()
        watcher.join()
    assert 1 <= peak[0] <= 2  # never more than the bound (the 429s below show it was reached)
    assert any(t["attempts"] > 1 for t in tasks_of(world))  # the others were told to come back


# --- the queue down -------------------------------------------------------------------------------------------

def test_queue_down_keeps_the_command_and_the_sweep_enqueues_it_again(queued: Any, toolbox_agent: Any,
                                                                       pg: psycopg.Connection) -> None:
    world = queued()
    box, _ = toolbox_agent()
    world.emulator.set_unavailable(True)
    server = deploy(world, box)  # still 202: the command is recorded
    history = [e[3] for e in Factory(pg).events(server)]
    assert any("could not be queued right now" in m for m in history), history
    assert pg.execute("select enqueued_at is null from dtma_commands").fetchone()[0]
    world.emulator.set_unavailable(False)
    counts = world.client("mcp_status_sweep").post("/").json
    assert counts["commands_requeued"] == 1
    world.until(lambda: server_row(pg, server)[0] == "running")
    assert [t["id"] for t in tasks_of(world)] == [f"{command_id_of(pg, server)}-2"]


# --- the production enqueue call ----------------------------------------------------------------------------

def test_the_production_enqueue_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Against Google: a metadata-server access token, and exactly the documented body."""
    settings = load_settings(None, {"TASKS_MODE": "cloud_tasks", "COMMAND_QUEUE": QUEUE,
                                    "COMMAND_WORKER_URL": "https://worker-abc-uc.a.run.app/", "COMMAND_INVOKER_SA": SA,
                                    "COMMAND_DISPATCH_DEADLINE_SECONDS": "600"})
    with respx.mock(assert_all_called=True) as router:
        token = router.get("http://metadata.google.internal/computeMetadata/v1/instance/service-accounts/default/token")
        token.respond(200, json={"access_token": "ya29.test-token", "expires_in": 3599, "token_type": "Bearer"})
        create = router.post(f"https://cloudtasks.googleapis.com/v2/{QUEUE}/tasks")
        create.respond(200, json={"name": f"{QUEUE}/tasks/c-1"})
        queue = CloudTasksQueue(settings)
        queue.enqueue("c", 1)
        queue.enqueue("d", 1)
    assert token.call_count == 1  # cached
    assert token.calls[0].request.headers["Metadata-Flavor"] == "Google"
    sent = create.calls[0].request
    assert sent.headers["Authorization"] == "Bearer ya29.test-token"
    body = json.loads(sent.content)
    assert body == {"task": {
        "name": f"{QUEUE}/tasks/c-1", "dispatchDeadline": "600s",
        "httpRequest": {"url": "https://worker-abc-uc.a.run.app/", "httpMethod": "POST",
                        "headers": {"Content-Type": "application/json"},
                        "body": base64.b64encode(b'{"command_id":"c"}').decode(),
                        "oidcToken": {"serviceAccountEmail": SA, "audience": "https://worker-abc-uc.a.run.app/"}}}}


@pytest.mark.parametrize(("status", "body"), [(503, {"error": {"code": 503, "status": "UNAVAILABLE"}}),
                                              (403, {"error": {"code": 403, "status": "PERMISSION_DENIED"}})])
def test_a_refused_create_is_an_enqueue_failure_and_409_is_success(status: int, body: dict[str, Any]) -> None:
    settings = load_settings(None, {"TASKS_MODE": "cloud_tasks", "COMMAND_QUEUE": QUEUE,
                                    "CLOUD_TASKS_API_URL": "http://127.0.0.1:9", "COMMAND_INVOKER_SA": SA,
                                    "COMMAND_WORKER_URL": "http://127.0.0.1:9/"})
    with respx.mock() as router:
        route = router.post(f"http://127.0.0.1:9/v2/{QUEUE}/tasks")
        route.respond(status, json=body)
        with pytest.raises(EnqueueFailed, match=body["error"]["status"]):
            CloudTasksQueue(settings).enqueue("c", 1)
        route.respond(409, json={"error": {"code": 409, "status": "ALREADY_EXISTS"}})
        CloudTasksQueue(settings).enqueue("c", 1)  # an earlier try of this very create went through
        assert "Authorization" not in route.calls[-1].request.headers  # no token off Google


def test_the_worker_refuses_what_is_not_a_command_id(queued: Any) -> None:
    world = queued()
    for body in ({}, {"command_id": "nope"}, {"command_id": 5}, []):
        answer = httpx.post(world.worker_url, json=body, timeout=10)
        assert answer.status_code == 400 and "command_id" in answer.json()["error"]["message"]
    unknown = httpx.post(world.worker_url, json={"command_id": "00000000-0000-4000-8000-000000000001"}, timeout=10)
    assert unknown.status_code == 200 and unknown.json() == {"state": "gone"}
