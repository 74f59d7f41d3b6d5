"""One database, DTMA stand-ins, a Cloud Tasks emulator and a command worker shared by the
benchmarks that measure served functions (cold start, memory, status): see `World`.

Split from bench/common.py so that the heartbeat benchmark's fleet (bench/heartbeat.py) can be
seeded here without common and heartbeat importing each other.
"""

from __future__ import annotations

import json
import time
from typing import Any

from bench import heartbeat
from bench.common import (
    COMMAND_QUEUE,
    DTMA_KEY_SECRET,
    HELD_QUEUE,
    WORKER,
    Postgres,
    Req,
    Server,
    function_env,
    jwt_for,
    queue_env,
    request,
    serving,
    start_tasks_emulator,
    wait_queue_idle,
)

# --- one database and DTMA stand-ins for every function -----------------------------------------

STATUS_SEED = """
insert into public.account_tool_environments
  (id, user_id, name, status, public_ip_address, region_slug, size_slug, dtma_token_sha256, last_heartbeat_at)
select ('00000000-0000-4000-b000-' || lpad(to_hex(%(base)s + t), 12, '0'))::uuid, %(user)s, 'status-box-' || t,
       'active',
       '127.0.0.1', 'nyc3', 's-1vcpu-2gb', sha256(convert_to('status-box-' || %(base)s + t, 'UTF8')), now()
  from generate_series(0, %(boxes)s - 1) t;

insert into public.account_tool_instances
  (account_tool_environment_id, tool_catalog_id, status_on_toolbox, instance_name_on_toolbox, host_port,
   container_port, docker_image_url, mcp_server_type, mcp_transport_type, mcp_endpoint_path, runtime_details,
   created_at)
select ('00000000-0000-4000-b000-' || lpad(to_hex(%(base)s + t), 12, '0'))::uuid,
       '00000000-0000-0000-0000-000000000001', 'running', 'srv-' || k, 49152 + k, 8080, 'mcp/everything:latest',
       'mcp_server', 'streamable_http', '/mcp',
       '{"state": "running", "status": "Up 2 hours", "image": "mcp/everything:latest", "exit_code": null,
         "ports": [{"ip": "0.0.0.0", "private_port": 8080, "public_port": 49152, "type": "tcp"}]}',
       now() - interval '1 day' + make_interval(secs => t * 100 + k)
  from generate_series(0, %(boxes)s - 1) t, generate_series(0, %(per)s - 1) k;

insert into public.account_tool_instance_events
  (account_tool_instance_id, account_tool_environment_id, instance_name_on_toolbox, from_status, to_status,
   source, message, at)
select i.id, i.account_tool_environment_id, i.instance_name_on_toolbox, s.f, s.t,
       s.src::public.instance_event_source_enum, s.msg, i.created_at + make_interval(secs => s.o)
  from public.account_tool_instances i
  join public.account_tool_environments e on e.id = i.account_tool_environment_id and e.user_id = %(user)s,
       (values (1, null::public.account_tool_installation_status_enum,
                'pending_deploy'::public.account_tool_installation_status_enum, 'api', 'deploy recorded'),
               (2, 'pending_deploy', 'deploying', 'api', 'deploy sent to the toolbox DTMA'),
               (3, 'deploying', 'running', 'heartbeat', 'container is running')) s(o, f, t, src, msg);
"""


class World:
    """One embedded database holding what every function's benchmark requests need: heartbeat toolboxes
    (bench/heartbeat.py's fleet), a user with 100 MCP servers on 10 toolboxes and one with 10 on 1 (for
    mcp_status), and a user whose toolboxes have loopback DTMA stand-ins (instant pulls) with deployed
    servers (deploy_mcp_server, manage_mcp_server).

    Commands travel as in production: a Cloud Tasks emulator in this process and dtma_command_worker
    served by functions-framework. manage_mcp_server's queue (COMMAND_QUEUE) is delivered to the worker,
    since manage waits for its command's outcome; deploy_mcp_server and the sweep enqueue to HELD_QUEUE,
    so a deploy's figures are its own (record + enqueue + answer) and its command does not run beside it
    on the same two cores. Call settle() after a burst of manage requests: it waits for the queue to
    drain so the next measurement does not share the machine with leftover commands."""

    DTMA_TOOLBOXES = 4
    MANAGED = 32

    def __init__(self, heartbeat_toolboxes: int = 256) -> None:
        from devstack.dtma_standin import StandInFleet
        from ops.rows import insert_toolbox
        from shared.core.toolbox_keys import derive_key

        self.pg = Postgres()
        self.fleet: Any = None
        self.tasks: Any = None
        self.worker: Server | None = None
        try:
            self.heartbeat_toolboxes = heartbeat_toolboxes
            heartbeat.seed(self.pg, max(heartbeat_toolboxes, 1000))
            self.user100, self.user10, self.dtma_user = (str(uuid) for uuid in _uuids(3))
            with self.pg.connect() as conn:
                for user in (self.user100, self.user10, self.dtma_user):
                    conn.execute("insert into auth.users (id, email) values (%s, %s)", (user, f"{user}@bench.test"))
                for params in ({"user": self.user100, "boxes": 10, "per": 10, "base": 0},
                               {"user": self.user10, "boxes": 1, "per": 10, "base": 100}):
                    for statement in STATUS_SEED.split(";\n\n"):
                        conn.execute(statement, params)
            self.dtma_boxes = [str(u) for u in _uuids(self.DTMA_TOOLBOXES)]
            keys = [derive_key(DTMA_KEY_SECRET, t, 1) for t in self.dtma_boxes]
            self.fleet = StandInFleet(self.DTMA_TOOLBOXES, tokens=keys).start()
            with self.pg.connect() as conn:
                for toolbox_id, agent, key in zip(self.dtma_boxes, self.fleet, keys, strict=True):
                    insert_toolbox(conn, toolbox_id=toolbox_id, user_id=self.dtma_user, name=f"dtma-{toolbox_id[:8]}",
                                   token=key, dtma_port=agent.port, heartbeat_age_seconds=0)
                conn.execute("vacuum analyze")
            # Quick retries (the tests' settings): the World measures functions, not the queue's backoff.
            self.tasks = start_tasks_emulator(min_backoff=0.05, max_backoff=1.0)
            self.worker = Server(WORKER, function_env(self.pg.uri)).start()
            self.worker.wait_ready()
            self.managed: list[str] = []
            with serving("deploy_mcp_server", self.env("deploy_mcp_server", queue=COMMAND_QUEUE)) as server:
                for n in range(self.MANAGED):
                    status, body = request(server, "POST", "/", json.dumps(
                        {"toolbox_id": self.dtma_boxes[n % self.DTMA_TOOLBOXES], "name": f"managed-{n}",
                         "image": "mcp/everything:latest", "transport": "streamable_http",
                         "container_port": 8080}),
                        {"Authorization": f"Bearer {jwt_for(self.dtma_user)}", "Content-Type": "application/json"})
                    if status != 202:
                        raise RuntimeError(f"seeding a managed server failed: {status} {body[:300]!r}")
                    self.managed.append(json.loads(body)["id"])
            self._wait_running(self.managed)
        except BaseException:
            self.stop()
            raise

    def _wait_running(self, ids: list[str], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with self.pg.connect() as conn:
            while True:
                states = dict(conn.execute("select status_on_toolbox::text, count(*) from account_tool_instances "
                                           "where id = any(%s::uuid[]) group by 1", (ids,)).fetchall())
                if states.get("running", 0) == len(ids):
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the managed servers did not all reach running: {states}; worker log: "
                                       f"{self.worker.log_tail() if self.worker else ''}")
                time.sleep(0.05)

    @property
    def worker_url(self) -> str:
        assert self.worker is not None
        return self.worker.url + "/"

    def env(self, function: str | None = None, queue: str | None = None, **extra: str) -> dict[str, str]:
        """A function's environment; functions that enqueue get the emulator (see the class docstring)."""
        if queue is None:
            queue = COMMAND_QUEUE if function == "manage_mcp_server" else HELD_QUEUE
        if function == "mcp_status_sweep":
            # The world's servers are records with no MCP endpoint behind them: a sweep would spend its
            # whole probe budget (MCP_SWEEP_PROBE_BUDGET_SECONDS) on them. bench/mcp_probe.py measures probing.
            extra.setdefault("MCP_SWEEP_PROBE_BATCH", "0")
        return function_env(self.pg.uri, **queue_env(self.tasks.url, self.worker_url, queue), **extra)

    def settle(self, timeout: float = 60.0) -> None:
        """Wait until the delivered queue is drained (commands left by manage requests have run)."""
        wait_queue_idle(self.tasks, COMMAND_QUEUE, timeout)

    def requests(self, function: str) -> tuple[list[Req], set[str]]:
        """Representative requests for `function` and the statuses they should get."""

        json_type = {"Content-Type": "application/json"}
        if function in ("dtma_heartbeat_ingest", "noop"):
            reqs = heartbeat.requests_for("heartbeat", self.heartbeat_toolboxes)
            return reqs, {"204"}
        if function == "mcp_status":
            return [Req("GET", "/?limit=100", {"Authorization": f"Bearer {jwt_for(self.user100, 3 * 3600)}"})], {"200"}
        if function == "mcp_status_10":
            return [Req("GET", "/?limit=100", {"Authorization": f"Bearer {jwt_for(self.user10, 3 * 3600)}"})], {"200"}
        auth = {"Authorization": f"Bearer {jwt_for(self.dtma_user, 3 * 3600)}", **json_type}
        if function == "deploy_mcp_server":
            # Recorded and enqueued, answered 202 at once (the command waits in HELD_QUEUE).
            return [Req("POST", "/", auth, json.dumps(
                {"toolbox_id": t, "name": "load-{{n}}", "image": "mcp/everything:latest",
                 "transport": "streamable_http", "container_port": 8080}), dynamic=True)
                for t in self.dtma_boxes], {"202"}
        if function == "manage_mcp_server":
            # Concurrent actions on one server are refused with 409 (the state machine), as in production;
            # 202 when the worker has not recorded the outcome within the budget (a toolbox runs at most
            # TOOLBOX_MAX_CONCURRENT_COMMANDS at once; the others wait their turn in the queue).
            return [Req("POST", f"/{i}/restart", auth) for i in self.managed], {"200", "202", "409"}
        if function == "mcp_status_sweep":
            return [Req("POST", "/", json_type, "{}")], {"200"}
        raise ValueError(function)

    def stop(self) -> None:
        if self.tasks is not None:
            self.tasks.pause(True)
        if self.worker is not None:
            self.worker.stop()
        if self.tasks is not None:
            self.tasks.stop()
        if self.fleet is not None:
            self.fleet.stop()
        self.pg.stop()

    def __enter__(self) -> World:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _uuids(n: int) -> list[str]:
    import uuid

    return [str(uuid.uuid4()) for _ in range(n)]
