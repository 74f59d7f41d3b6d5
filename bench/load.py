"""Load test (not part of the default test run; tests/test_load_smoke.py runs a short variant).

    python -m bench.load [--toolboxes 500] [--interval 6] [--duration 60] [--users 5]
                                      [--docs docs/load.md]

Everything stays on 127.0.0.1 and is bounded (at most 1000 toolboxes, 600 s):

* a fresh embedded PostgreSQL (deleted afterwards), migrated;
* `dtma_heartbeat_ingest`, `deploy_mcp_server`, `manage_mcp_server` and `mcp_status` served over
  real HTTP by threaded werkzeug servers (devstack.server.HttpServer), one port per function as
  on Cloud Run, each with its own connection pool of DB_POOL_MAX_SIZE (4), in a separate process
  (`--serve`) so that the load generator does not share its interpreter;
* N stand-in DTMA agents (devstack.dtma_standin.StandInFleet: one real HTTP server and one
  simulated Docker engine per toolbox), each running `--per-toolbox` MCP servers;
* heartbeats: every toolbox sends exactly what its agent would send (the real DTMA's container
  list) every `--interval` seconds (6 s = 10x the real 60 s), from `--senders` threads, with a
  random phase, so the fleet offers N / interval requests per second;
* users: `--users` threads that, with a short think time, read their servers (`mcp_status`,
  limit 100), deploy new ones onto their toolboxes, and start the ones they see stopped or failed;
* chaos: containers crash on the toolboxes (exit 0, 1 or 137), so heartbeats keep changing the
  truth they carry.

Users and chaos stop 2 intervals before the end; heartbeats go on to the end, so every toolbox
reports at least once more about a quiet droplet while the rest of the fleet still hammers the
ingest. The final check compares, for every toolbox, the database with the LAST heartbeat it sent:
the toolbox row (active, its version and system_status) and every MCP server's status (what the
container state in that heartbeat maps to, shared.core.lifecycle's table).

Prints the command, the configuration and the figures (throughput, p50/p99 per request kind,
errors, the final check) and writes them to `--docs` (default docs/load.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.gettempdir())
os.environ.setdefault("NO_GCE_CHECK", "true")

import httpx  # noqa: E402
import jwt  # noqa: E402
import psycopg  # noqa: E402

from shared.core.lifecycle import observed_from_docker  # noqa: E402
from shared.core.toolbox_keys import derive_key, token_digest  # noqa: E402

JWT_SECRET = "load-test-jwt-secret-that-is-at-least-32-bytes"
MASTER_SECRET = "load-test-master-secret-for-dtma-keys-0123456789"
IDEMPOTENCY_SECRET = "load-test-idempotency-secret-0123456789abcdef"
GENERIC_MCP_CATALOG_ID = "00000000-0000-0000-0000-000000000001"
FUNCTIONS = ("dtma_heartbeat_ingest", "deploy_mcp_server", "manage_mcp_server", "mcp_status")
MAX_TOOLBOXES, MAX_DURATION = 1000, 600.0
# Users and container crashes stop this many heartbeat intervals before the end, so that every
# toolbox then reports at least once about a droplet nothing changes any more.
QUIET_INTERVALS = 2


@dataclass
class LoadConfig:
    toolboxes: int = 500
    interval: float = 6.0
    duration: float = 60.0
    users: int = 5
    per_toolbox: int = 2
    senders: int = 16
    think: float = 0.2
    chaos_every: float = 0.25
    seed: int = 7

    def check(self) -> None:
        if not 1 <= self.toolboxes <= MAX_TOOLBOXES:
            raise ValueError(f"toolboxes must be 1-{MAX_TOOLBOXES}")
        if not 0 < self.duration <= MAX_DURATION or self.interval <= 0:
            raise ValueError(f"duration must be in (0, {MAX_DURATION}] s and interval > 0")
        if self.duration < (QUIET_INTERVALS + 1) * self.interval:
            raise ValueError(f"duration must be at least {QUIET_INTERVALS + 1} intervals (users stop "
                             f"{QUIET_INTERVALS} intervals before the end)")

    @property
    def offered_rate(self) -> float:
        return self.toolboxes / self.interval


def function_env(database_url: str) -> dict[str, str]:
    """Production settings for the served functions (loopback DTMAs allowed: local only)."""
    return {"SUPABASE_JWT_SECRET": JWT_SECRET, "DTMA_KEY_SECRET": MASTER_SECRET,
            "IDEMPOTENCY_SECRET": IDEMPOTENCY_SECRET, "ALLOW_PRIVATE_TOOLBOX_IPS": "true",
            "LOG_FORMAT": "text", "DATABASE_URL": database_url}


# --- serving the functions ---------------------------------------------------------------------------

@contextmanager
def serve_functions(database_url: str, names: tuple[str, ...] = FUNCTIONS) -> Iterator[dict[str, str]]:
    """Serve each function on its own loopback port in this process; yields name -> base URL.

    Each function gets its own database URL (application_name=<function>) and so its own pool,
    as separate Cloud Run instances would. The environment is set only while the functions load
    (each main.py reads its settings at import).
    """
    from devstack.server import HttpServer, load_function
    from shared import runtime
    from shared.adapters import db

    saved = dict(os.environ)
    servers = []
    pools = [f"{database_url}{'&' if '?' in database_url else '?'}application_name={name}" for name in names]
    try:
        urls = {}
        for name, pool_url in zip(names, pools, strict=True):
            os.environ.update(function_env(pool_url))
            runtime.reset()
            server = HttpServer("127.0.0.1", 0, load_function(name, ROOT / "functions").app)
            server.start()
            servers.append(server)
            urls[name] = f"http://127.0.0.1:{server.port}"
        os.environ.clear()
        os.environ.update(saved)
        runtime.reset()
        yield urls
    finally:
        os.environ.clear()
        os.environ.update(saved)
        for server in servers:
            server.stop()
        db.close_all(pools)  # the pools of this process, which outlive the servers otherwise


@contextmanager
def serve_in_subprocess(database_url: str) -> Iterator[dict[str, str]]:
    """The same, in a child process (`--serve`), so server and load do not share one GIL."""
    child = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve", "--database-url",
                              database_url], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        if not line:
            raise RuntimeError("the function server did not start")
        yield json.loads(line)
    finally:
        if child.stdin is not None:
            child.stdin.close()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(5)


# --- seeding -------------------------------------------------------------------------------------------

@dataclass
class Seeded:
    users: list[str]
    toolbox_ids: list[str]
    owner_of: dict[str, str]


def user_token(user_id: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": user_id, "role": "authenticated", "aud": "authenticated", "iat": now,
                       "exp": now + 3600}, JWT_SECRET, algorithm="HS256")


def seed(database_url: str, config: LoadConfig, fleet: Any, toolbox_ids: list[str]) -> Seeded:
    """Users, toolboxes (pointing at their stand-in), MCP servers recorded as running, and the
    same servers deployed on the stand-ins through their DTMA API."""
    users = [str(uuid.uuid4()) for _ in range(config.users)]
    owner_of = {box: users[n % len(users)] for n, box in enumerate(toolbox_ids)}
    rows = []
    with psycopg.connect(database_url, autocommit=True) as conn, conn.cursor() as cur:
        cur.executemany("insert into auth.users (id, email) values (%s, %s)",
                        [(u, f"load-{u[:8]}@bench.test") for u in users])
        cur.executemany(
            """insert into public.account_tool_environments (id, user_id, name, status, public_ip_address,
                     region_slug, size_slug, dtma_token_sha256, dtma_key_version, dtma_port, last_heartbeat_at)
                   values (%s, %s, %s, 'active', '127.0.0.1', 'nyc3', 's-1vcpu-1gb', %s, 1, %s, now())""",
            [(box, owner_of[box], f"load-{n}", token_digest(agent.token), agent.port)
             for n, (box, agent) in enumerate(zip(toolbox_ids, fleet, strict=True))])
        for box in toolbox_ids:
            for k in range(config.per_toolbox):
                rows.append((str(uuid.uuid4()), box, f"srv-{k}", 49152 + k))
        cur.executemany(
            """insert into public.account_tool_instances (id, account_tool_environment_id, tool_catalog_id,
                     status_on_toolbox, instance_name_on_toolbox, host_port, container_port, docker_image_url,
                     mcp_server_type, mcp_transport_type, mcp_endpoint_path)
                   values (%s, %s, %s, 'running', %s, %s, 8080, 'mcp/everything:latest', 'mcp_server',
                           'streamable_http', '/mcp')""",
            [(i, box, GENERIC_MCP_CATALOG_ID, name, port) for i, box, name, port in rows])
    agents = dict(zip(toolbox_ids, fleet, strict=True))
    with httpx.Client(trust_env=False, timeout=10) as client:
        for instance_id, box, name, port in rows:
            agent = agents[box]
            answer = client.post(f"{agent.url}/tools", headers={"Authorization": f"Bearer {agent.token}"}, json={
                "dockerImageUrl": "mcp/everything:latest", "instanceNameOnToolbox": name,
                "accountToolInstanceId": instance_id,
                "baseConfigOverrideJson": {"Env": [], "HostConfig": {"PortBindings": {
                    "8080/tcp": [{"HostPort": str(port)}]}}}})
            if answer.status_code != 201:
                raise RuntimeError(f"seeding {name} on {box}: {answer.status_code} {answer.text[:200]}")
    return Seeded(users, toolbox_ids, owner_of)


# --- the load --------------------------------------------------------------------------------------------

@dataclass
class Samples:
    latencies: dict[str, list[float]] = field(default_factory=dict)
    finished_at: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    error_examples: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ok(self, kind: str, seconds: float) -> None:
        with self.lock:
            self.latencies.setdefault(kind, []).append(seconds)
            self.finished_at.setdefault(kind, []).append(time.monotonic())

    def error(self, kind: str, what: str) -> None:
        with self.lock:
            self.errors[kind] = self.errors.get(kind, 0) + 1
            if len(self.error_examples) < 10:
                self.error_examples.append(f"{kind}: {what}")


def heartbeat_sender(agents: list[tuple[str, Any]], url: str, config: LoadConfig, end: float, samples: Samples,
                     last: dict[str, dict[str, Any]], rng: random.Random) -> None:
    """Each agent beats every `interval` from a random phase, like independent droplets."""
    due = {box: time.monotonic() + rng.uniform(0, config.interval) for box, _ in agents}
    with httpx.Client(trust_env=False, timeout=15) as client:
        while True:
            box, agent = min(agents, key=lambda item: due[item[0]])
            wait = due[box] - time.monotonic()
            if due[box] >= end:
                return
            if wait > 0:
                time.sleep(wait)
            due[box] += config.interval
            payload = agent.heartbeat_payload()
            started = time.perf_counter()
            try:
                response = client.post(url, json=payload, headers={"Authorization": f"Bearer {agent.token}"})
            except httpx.HTTPError as exc:
                samples.error("heartbeat", type(exc).__name__)
                continue
            if response.status_code == 204:
                samples.ok("heartbeat", time.perf_counter() - started)
                last[box] = payload
            else:
                samples.error("heartbeat", f"{response.status_code} {response.text[:200]}")


def user_loop(user: str, boxes: list[str], urls: dict[str, str], config: LoadConfig, stop_at: float,
              samples: Samples, rng: random.Random) -> None:
    headers = {"Authorization": f"Bearer {user_token(user)}"}
    made = 0
    with httpx.Client(trust_env=False, timeout=15) as client:
        while time.monotonic() < stop_at:
            roll = rng.random()
            started = time.perf_counter()
            try:
                if roll < 0.5:
                    kind = "status"
                    response = client.get(urls["mcp_status"] + "/", params={"limit": 100}, headers=headers)
                    expected = {200}
                elif roll < 0.75:
                    kind, made = "deploy", made + 1
                    response = client.post(urls["deploy_mcp_server"] + "/", headers=headers, json={
                        "toolbox_id": rng.choice(boxes), "name": f"u-{user[:6]}-{made}", "image": "mcp/github:latest",
                        "env": {"TOKEN": f"secret-{made}"}})
                    expected = {202}  # recorded and queued; the worker deploys it
                else:
                    kind = "manage"
                    listing = client.get(urls["mcp_status"] + "/", params={"limit": 100, "status": "error"},
                                         headers=headers).json()["servers"] or client.get(
                        urls["mcp_status"] + "/", params={"limit": 100, "status": "stopped"},
                        headers=headers).json()["servers"]
                    if not listing:
                        time.sleep(config.think)
                        continue
                    started = time.perf_counter()
                    response = client.post(f"{urls['manage_mcp_server']}/{rng.choice(listing)['id']}/start",
                                           headers=headers)
                    expected = {200, 202}  # 202: the toolbox runs its maximum of commands; it waits its turn
            except httpx.HTTPError as exc:
                samples.error("user", type(exc).__name__)
                continue
            if response.status_code in expected:
                samples.ok(kind, time.perf_counter() - started)
            else:
                samples.error(kind, f"{response.status_code} {response.text[:300]}")
            time.sleep(rng.uniform(0, 2 * config.think))


def chaos_loop(fleet: Any, config: LoadConfig, stop_at: float, rng: random.Random, crashes: list[int]) -> None:
    agents = list(fleet)
    while time.monotonic() < stop_at:
        agent = rng.choice(agents)
        running = [c.name for c in agent.containers() if c.state == "running" and c.name.startswith(("srv-", "u-"))]
        if running:
            try:
                agent.crash_container(rng.choice(running), rng.choice([0, 1, 137]))
                crashes[0] += 1
            except (KeyError, ValueError):
                pass  # stopped meanwhile by a user's action
        time.sleep(config.chaos_every)


# --- the final check ---------------------------------------------------------------------------------------

def final_check(database_url: str, toolbox_ids: list[str], last: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The database against the last heartbeat each toolbox sent."""
    mismatches: list[str] = []
    instances = 0
    with psycopg.connect(database_url, autocommit=True) as conn:
        boxes = {str(r[0]): r[1:] for r in conn.execute(
            "select id, status::text, dtma_last_known_version, dtma_health_details_json "
            "from account_tool_environments where id = any(%s::uuid[])", (toolbox_ids,)).fetchall()}
        rows = conn.execute("select account_tool_environment_id, instance_name_on_toolbox, status_on_toolbox::text "
                            "from account_tool_instances where account_tool_environment_id = any(%s::uuid[])",
                            (toolbox_ids,)).fetchall()
    recorded: dict[str, dict[str, str]] = {}
    for box, name, status in rows:
        recorded.setdefault(str(box), {})[name] = status
    for box in toolbox_ids:
        payload = last.get(box)
        if payload is None:
            mismatches.append(f"{box}: no heartbeat was ever accepted")
            continue
        status, version, health = boxes[box]
        if status != "active" or version != payload["dtma_version"] or health != payload["system_status"]:
            mismatches.append(f"{box}: toolbox row is {status}/{version}, not what its last heartbeat said")
        reported = {item["names"][0]: item for item in payload["tool_statuses"] if "names" in item}
        for name, stored in recorded.get(box, {}).items():
            instances += 1
            item = reported.get(name)
            if item is None:
                mismatches.append(f"{box}/{name}: recorded {stored} but absent from the last heartbeat")
                continue
            expected, _ = observed_from_docker(item["state"], item["status"], name)
            # An exited container reads `stopped` after a stop a user asked for, `error` otherwise.
            if expected is None:
                continue
            allowed = {expected.value, "error"} if item["state"] == "exited" else {expected.value}
            if stored not in allowed:
                mismatches.append(f"{box}/{name}: {stored}, last heartbeat said {item['state']} ({item['status']})")
    return {"toolboxes": len(toolbox_ids), "instances": instances, "mismatches": mismatches}


# --- one run ---------------------------------------------------------------------------------------------

@dataclass
class Report:
    config: LoadConfig
    elapsed: float
    samples: Samples
    final: dict[str, Any]
    crashes: int
    started: float = 0.0

    @property
    def errors(self) -> int:
        return sum(self.samples.errors.values())

    def count(self, kind: str) -> int:
        return len(self.samples.latencies.get(kind, []))

    def percentile(self, kind: str, q: float, after: float | None = None) -> float:
        values = self.samples.latencies.get(kind, [])
        if after is not None:  # only requests that finished after this many seconds
            values = [v for v, t in zip(values, self.samples.finished_at[kind], strict=True)
                      if t - self.started >= after]
        values = sorted(values)
        if not values:
            return float("nan")
        return values[min(len(values) - 1, round(q * (len(values) - 1)))] * 1000

    @property
    def heartbeat_rate(self) -> float:
        return self.count("heartbeat") / self.elapsed

    def lines(self) -> list[str]:
        """The figures as Markdown (also what is printed)."""
        c = self.config
        out = [f"- load: {c.toolboxes} toolboxes x {c.per_toolbox} MCP servers, a heartbeat every {c.interval:g} s "
               f"each (offered {c.offered_rate:.1f}/s), {c.users} users, {c.duration:g} s",
               f"- throughput: {self.count('heartbeat')} heartbeats accepted in {self.elapsed:.1f} s = "
               f"{self.heartbeat_rate:.1f}/s",
               "", "| request | count | p50 ms | p99 ms | max ms | p99 ms after the first interval |",
               "|---|---|---|---|---|---|"]
        for kind in ("heartbeat", "status", "deploy", "manage"):
            if self.count(kind):
                values = self.samples.latencies[kind]
                out.append(f"| {kind} | {self.count(kind)} | {self.percentile(kind, 0.5):.1f} | "
                           f"{self.percentile(kind, 0.99):.1f} | {max(values) * 1000:.1f} | "
                           f"{self.percentile(kind, 0.99, after=c.interval):.1f} |")
        out.append("")
        out.append(f"- errors: {self.errors}" + (f" {self.samples.errors}, e.g. {self.samples.error_examples[:3]}"
                                                  if self.errors else ""))
        out.append(f"- chaos: {self.crashes} containers crashed on the toolboxes during the run")
        final = self.final
        out.append(f"- final state: {final['toolboxes']} toolboxes and {final['instances']} MCP servers checked "
                   f"against each toolbox's last heartbeat: {len(final['mismatches'])} mismatches")
        out += [f"  - {m}" for m in final["mismatches"][:10]]
        return out


def run(database_url: str, urls: dict[str, str], config: LoadConfig) -> Report:
    """One load run against functions already served at `urls` on `database_url`."""
    from devstack.dtma_standin import StandInFleet

    config.check()
    rng = random.Random(config.seed)
    toolbox_ids = [str(uuid.uuid4()) for _ in range(config.toolboxes)]
    tokens = [derive_key(MASTER_SECRET, box, 1) for box in toolbox_ids]
    with StandInFleet(config.toolboxes, tokens=tokens) as fleet:
        seeded = seed(database_url, config, fleet, toolbox_ids)
        agents = list(zip(toolbox_ids, fleet, strict=True))
        samples, last, crashes = Samples(), {}, [0]
        start = time.monotonic()
        end = start + config.duration
        quiet = end - QUIET_INTERVALS * config.interval
        threads = [threading.Thread(target=heartbeat_sender, name=f"beats-{n}", daemon=True,
                                    args=(agents[n::config.senders], urls["dtma_heartbeat_ingest"] + "/heartbeat",
                                          config, end, samples, last, random.Random(rng.random())))
                   for n in range(min(config.senders, len(agents)))]
        boxes_of: dict[str, list[str]] = {}
        for box, user in seeded.owner_of.items():
            boxes_of.setdefault(user, []).append(box)
        threads += [threading.Thread(target=user_loop, name=f"user-{n}", daemon=True,
                                     args=(user, boxes_of[user], urls, config, quiet, samples,
                                           random.Random(rng.random())))
                    for n, user in enumerate(seeded.users) if user in boxes_of]
        threads.append(threading.Thread(target=chaos_loop, name="chaos", daemon=True,
                                        args=(fleet, config, quiet, random.Random(rng.random()), crashes)))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(config.duration + 30)
        elapsed = time.monotonic() - start
        final = final_check(database_url, toolbox_ids, last)
    return Report(config, elapsed, samples, final, crashes[0], start)


# --- command line ------------------------------------------------------------------------------------------

def write_docs(path: Path, command: str, report: Report) -> None:
    cpu = os.cpu_count()
    body = [
        "# Load test",
        "",
        "Not part of the default test run (tests/test_load_smoke.py runs a short variant of the same code).",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Machine: {platform.machine()}, {cpu} CPUs, Python {platform.python_version()}, embedded PostgreSQL 16; "
        "the functions in one child process (one threaded werkzeug server and one pool of 4 connections per "
        "function), the stand-in fleet, heartbeat senders and users in the parent. All on 127.0.0.1.",
        "",
        "## Figures",
        "",
        *report.lines(),
        "",
        "Latencies are client-side (request sent to answer read) over loopback HTTP, so they include the "
        "load generator's own scheduling (500 stand-in servers, 16 senders and the users share one interpreter "
        "on 2 CPUs with the database and the function process); the last column leaves out the first heartbeat "
        "interval, while each function's pool is still opening its connections. `status` is a list read "
        "(limit 100); `deploy` is a full deploy through the toolbox's stand-in DTMA (instant pull); `manage` "
        "is a start of a server the user saw stopped or failed.",
        "",
        "## What was checked",
        "",
        "* error count: every answer other than the one expected (204 heartbeat, 200 status, 200 or 202 manage, "
        "202 deploy) and every transport error;",
        "* final state: for every toolbox, the toolbox row (active, `dtma_last_known_version`, "
        "`dtma_health_details_json`) and every MCP server's stored status equal what that toolbox's LAST "
        "accepted heartbeat said (the container state mapped through `shared.core.lifecycle`). Users and the "
        f"container crashes stop {QUIET_INTERVALS} intervals before the end, heartbeats go on to the end.",
        "",
    ]
    path.write_text("\n".join(body))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = LoadConfig()
    parser.add_argument("--toolboxes", type=int, default=defaults.toolboxes)
    parser.add_argument("--interval", type=float, default=defaults.interval, help="seconds between heartbeats")
    parser.add_argument("--duration", type=float, default=defaults.duration)
    parser.add_argument("--users", type=int, default=defaults.users)
    parser.add_argument("--per-toolbox", type=int, default=defaults.per_toolbox)
    parser.add_argument("--senders", type=int, default=defaults.senders)
    parser.add_argument("--database-url", help="an empty, migrated database (default: a fresh embedded one)")
    parser.add_argument("--docs", default="docs/load.md", help="where to write the figures ('' to skip)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.serve:  # child: serve the functions until stdin closes
        with serve_functions(args.database_url) as urls:
            print(json.dumps(urls), flush=True)
            sys.stdin.read()
        return 0

    config = LoadConfig(toolboxes=args.toolboxes, interval=args.interval, duration=args.duration, users=args.users,
                        per_toolbox=args.per_toolbox, senders=args.senders)
    config.check()
    command = "python -m bench.load " + " ".join(
        f"--{k} {v}" for k, v in (("toolboxes", config.toolboxes), ("interval", f"{config.interval:g}"),
                                  ("duration", f"{config.duration:g}"), ("users", config.users)))
    print(command, flush=True)
    server = None
    url = args.database_url
    if url is None:
        from devstack import embedded_pg
        from ops.migrate import migrate

        server = embedded_pg.start(keep=False)
        url = server.uri
        migrate(url)
    try:
        with serve_in_subprocess(url) as urls:
            report = run(url, urls, config)
    finally:
        if server is not None:
            server.stop()
    for line in report.lines():
        print(line)
    if args.docs:
        write_docs(ROOT / args.docs, command, report)
        print(f"figures written to {args.docs}")
    ok = report.errors == 0 and not report.final["mismatches"]
    if not ok:
        print("FAILED: errors or final-state mismatches (see above)")
    print(f"median heartbeat {statistics.median(report.samples.latencies.get('heartbeat', [0])) * 1000:.1f} ms")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
