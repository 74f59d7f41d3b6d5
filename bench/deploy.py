"""Benchmark of deploy_mcp_server's answer, warm (not a test).

    python -m bench.deploy [--sequential 150] [--duration 5] [--runs 3]

What the web app waits for between "Deploy" and an answer. A deploy records the instance and its
command in one transaction (cp_record_deploy_command), enqueues the command with Cloud Tasks'
REST createTask (shared/adapters/tasks.py, httpx, `TASKS_MODE=cloud_tasks`), reads the server back as
mcp_status shows it and answers 202; the agent is never called while the user waits (the
command worker does that, bench/commands.py). Served the production way (functions-framework /
gunicorn) against an embedded PostgreSQL, the queue being the Cloud Tasks emulator
(devstack/cloud_tasks.py) in this process, with its queue paused: what is timed is record +
enqueue + answer, and the commands do not run beside the function on the same two cores (in
production the worker runs on other instances). In one run:

* one deploy at a time (`--sequential` deploys, latency without queueing);
* 8 at a time for `--duration` s, with the function's CPU time per deploy;
* the floor: the no-op function receiving the same requests the same ways;
* for reference, createTask alone: the same REST call from this process to the emulator;
* the emulator as shipped: its HTTP handler leaves Nagle's algorithm on, so each answer on a
  keep-alive connection waits ~40 ms for the client's delayed ACK (the DTMA stand-in's server
  turns it off for that reason). The runs above use an emulator with it off, as Google's API
  behaves; one more sequential run goes through the emulator as shipped, to show the artefact.

Every deploy has a unique name (the request body carries `{{n}}`), so each one records an
instance, allocates a host port and enqueues its own task; after the run the number of tasks the
emulator holds is checked against the instances recorded. Figures are medians over `--runs`
rounds, each against a freshly started function.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import (
    DTMA_KEY_SECRET,
    HELD_QUEUE,
    ROOT,
    Postgres,
    Req,
    function_env,
    jwt_for,
    median,
    percentile,
    queue_counts,
    queue_env,
    run_load,
    sequential_latencies,
    serving,
    start_tasks_emulator,
    table,
)
from ops.rows import insert_toolbox

FUNCTION = "deploy_mcp_server"
TOOLBOXES = 32  # 848 host ports each: room for every deploy of a run
# The queue is paused, so nothing is ever delivered here; the URL still goes into each task.
UNUSED_WORKER_URL = "http://127.0.0.1:9/dtma_command_worker"
TARGET_ABOVE_FLOOR_MS = 100


def seed(pg: Postgres, user_id: str, boxes: list[tuple[str, str]]) -> None:

    with pg.connect() as conn:
        conn.execute("insert into auth.users (id, email) values (%s, 'deploy-bench@bench.test')", (user_id,))
        for toolbox_id, key in boxes:
            insert_toolbox(conn, toolbox_id=toolbox_id, user_id=user_id, name=f"bench-{toolbox_id[:8]}", token=key,
                           dtma_port=30000, heartbeat_age_seconds=0)


def deploy_requests(user_id: str, toolbox_ids: list[str]) -> list[Req]:
    headers = {"Authorization": f"Bearer {jwt_for(user_id, 3 * 3600)}", "Content-Type": "application/json"}
    return [Req("POST", "/", headers, json.dumps({"toolbox_id": t, "name": "bench-{{n}}",
                                                  "image": "mcp/everything:latest", "transport": "streamable_http",
                                                  "container_port": 8080}),
                dynamic=True) for t in toolbox_ids]


def _latency(samples: list[float]) -> dict[str, float]:
    return {"p50_ms": percentile(samples, 50) * 1000, "p99_ms": percentile(samples, 99) * 1000, "n": len(samples)}


def one_round(pg: Postgres, tasks_url: str, target: str, reqs: list[Req], sequential: int,
              duration: float) -> dict[str, Any]:
    env = function_env(pg.uri, **queue_env(tasks_url, UNUSED_WORKER_URL, HELD_QUEUE))
    function = FUNCTION if target == "deploy" else "noop"
    expected = "202" if target == "deploy" else "204"
    out: dict[str, Any] = {}
    with serving(function, env) as server:
        sequential_latencies(server, reqs, 5)  # first requests open the pool, the JWT check, the queue's client
        samples, statuses = sequential_latencies(server, reqs, sequential)
        _check(statuses, expected, server)
        out["sequential"] = _latency(samples)
        cpu0 = server.cpu_seconds()
        result = run_load(server.url, reqs, 8, duration)
        cpu = server.cpu_seconds() - cpu0
        _check(result.statuses, expected, server)
        out["c8"] = {"p50_ms": result.p50_ms, "p99_ms": result.p99_ms, "n": result.requests, "rps": result.rps,
                     "cpu_ms": cpu * 1000 / max(1, result.requests)}
    return out


def _check(statuses: dict[str, int], expected: str, server: Any) -> None:
    bad = {k: v for k, v in statuses.items() if k != expected}
    if bad:
        raise RuntimeError(f"{server.function}: expected only {expected}, got {statuses}: {server.log_tail()}")


def create_task_alone(tasks_url: str, count: int) -> dict[str, float]:
    """The enqueue by itself: createTask bodies as shared/adapters/tasks.py builds them, one at a time, over one
    keep-alive httpx client (the function's client is the same), into the paused queue."""
    import httpx

    samples = []
    with httpx.Client(trust_env=False, timeout=5) as client:
        for n in range(count + 5):
            task_id = f"{uuid.uuid4()}-1"
            body = {"task": {"name": f"{HELD_QUEUE}/tasks/{task_id}", "dispatchDeadline": "900s",
                             "httpRequest": {"url": UNUSED_WORKER_URL, "httpMethod": "POST",
                                             "headers": {"Content-Type": "application/json"},
                                             "body": base64.b64encode(json.dumps(
                                                 {"command_id": task_id[:36]}).encode()).decode(),
                                             "oidcToken": {"serviceAccountEmail": "x@bench.iam.gserviceaccount.com",
                                                           "audience": UNUSED_WORKER_URL}}}}
            started = time.perf_counter()
            response = client.post(f"{tasks_url}/v2/{HELD_QUEUE}/tasks", content=json.dumps(body),
                                   headers={"Content-Type": "application/json"})
            elapsed = time.perf_counter() - started
            if response.status_code != 200:
                raise RuntimeError(f"createTask answered {response.status_code}: {response.text[:300]}")
            if n >= 5:
                samples.append(elapsed)
    return _latency(samples)


def as_shipped(pg: Postgres, tasks_url: str, reqs: list[Req], sequential: int) -> dict[str, float]:
    """One at a time against the emulator as shipped (Nagle on: see start_tasks_emulator)."""
    env = function_env(pg.uri, **queue_env(tasks_url, UNUSED_WORKER_URL, HELD_QUEUE))
    with serving(FUNCTION, env) as server:
        sequential_latencies(server, reqs, 5)
        samples, statuses = sequential_latencies(server, reqs, sequential)
        _check(statuses, "202", server)
    return _latency(samples)


def run(sequential: int = 150, duration: float = 5.0, runs: int = 3) -> dict[str, Any]:
    from shared.core.toolbox_keys import derive_key

    user_id = str(uuid.uuid4())
    toolbox_ids = [str(uuid.uuid4()) for _ in range(TOOLBOXES)]
    rounds: dict[str, list[dict[str, Any]]] = {"deploy": [], "noop": []}
    started = time.perf_counter()
    emulator = start_tasks_emulator()
    shipped = start_tasks_emulator(nodelay=False)
    try:
        with Postgres() as pg:
            seed(pg, user_id, [(t, derive_key(DTMA_KEY_SECRET, t, 1)) for t in toolbox_ids])
            reqs = deploy_requests(user_id, toolbox_ids)
            for r in range(runs):
                for target in ("deploy", "noop"):
                    rounds[target].append(one_round(pg, emulator.url, target, reqs, sequential, duration))
                    print(f"round {r + 1}/{runs} {target}: " + ", ".join(
                        f"{k} p50 {v['p50_ms']:.1f} p99 {v['p99_ms']:.1f} ms" for k, v in rounds[target][-1].items()),
                        flush=True)
            shipped_sequential = as_shipped(pg, shipped.url, reqs, sequential)
            print(f"emulator as shipped: one at a time p50 {shipped_sequential['p50_ms']:.1f} "
                  f"p99 {shipped_sequential['p99_ms']:.1f} ms", flush=True)
            with pg.connect() as conn:
                instances = dict(conn.execute("select status_on_toolbox::text, count(*) from account_tool_instances "
                                              "group by 1 order by 1").fetchall())
                commands = dict(conn.execute("select status::text, count(*) from dtma_commands "
                                             "group by 1 order by 1").fetchall())
            tasks = queue_counts(emulator, HELD_QUEUE)["pending"] + queue_counts(shipped, HELD_QUEUE)["pending"]
            alone = {"nodelay": create_task_alone(emulator.url, sequential),
                     "shipped": create_task_alone(shipped.url, sequential)}
            version = pg.version()
    finally:
        emulator.stop()
        shipped.stop()
    summary = {t: {case: {m: median([it[case][m] for it in items]) for m in items[0][case]}
                   for case in items[0]} for t, items in rounds.items()}
    return {"summary": summary, "rounds": rounds, "instances": instances, "commands": commands,
            "tasks_enqueued": tasks, "create_task_alone": alone, "shipped_sequential": shipped_sequential,
            "postgres": version, "elapsed_s": time.perf_counter() - started,
            "params": {"sequential": sequential, "duration": duration, "runs": runs, "toolboxes": TOOLBOXES}}


CASES = (("sequential", "one at a time"), ("c8", "8 concurrent"))


def report_lines(result: dict[str, Any]) -> list[str]:
    s = result["summary"]
    rows = []
    for key, label in CASES:
        d, n = s["deploy"][key], s["noop"][key]
        above = d["p99_ms"] - n["p99_ms"]
        rows.append([label, "202", f"{d['p50_ms']:.1f}", f"**{d['p99_ms']:.1f}**", f"{n['p50_ms']:.2f}",
                     f"{n['p99_ms']:.2f}", f"{d['p50_ms'] - n['p50_ms']:.1f}", f"**{above:.1f}**",
                     "met" if above < TARGET_ABOVE_FLOOR_MS else "**not met**", f"{d['n']:.0f}"])
    lines = [table(["case", "answer", "deploy p50 ms", "deploy p99 ms", "no-op p50 ms", "no-op p99 ms",
                    "p50 above floor ms", "p99 above floor ms", f"p99 < floor + {TARGET_ABOVE_FLOOR_MS} ms",
                    "deploys per round"], rows)]
    c8 = s["deploy"]["c8"]
    alone, shipped = result["create_task_alone"], result["shipped_sequential"]
    lines += ["", f"Throughput at 8 concurrent: {c8['rps']:,.0f} deploys/s (no-op {s['noop']['c8']['rps']:,.0f} "
              f"req/s); function CPU {c8['cpu_ms']:.2f} ms per deploy (no-op {s['noop']['c8']['cpu_ms']:.2f} ms per "
              "request). createTask alone, from this process to the emulator over one keep-alive httpx client: "
              f"p50 {alone['nodelay']['p50_ms']:.2f} ms, p99 {alone['nodelay']['p99_ms']:.2f} ms; with the emulator "
              f"as shipped (Nagle on) p50 {alone['shipped']['p50_ms']:.2f} ms, and one deploy at a time through it "
              f"p50 {shipped['p50_ms']:.1f} ms, p99 {shipped['p99_ms']:.1f} ms.", ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequential", type=int, default=150)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = run(args.sequential, args.duration, args.runs)
    print("\n".join(report_lines(result)))
    print(f"instances by status afterwards: {result['instances']}; commands {result['commands']}; tasks held in "
          f"the queue {result['tasks_enqueued']}; took {result['elapsed_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    main()
