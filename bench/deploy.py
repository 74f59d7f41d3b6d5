"""Benchmark of deploy_mcp_server's initiation latency (not a test).

    PYTHONPATH=. python bench/deploy.py [--sequential 150] [--duration 5] [--runs 3]

What the web app waits for between "Deploy" and an answer, served the production way
(functions-framework / gunicorn) against an embedded PostgreSQL and loopback DTMA stand-ins (one
per toolbox, each holding only its own derived key), in one run:

* instant DTMA (the image is already pulled): one deploy at a time (`--sequential` deploys,
  latency without queueing), then 8 at a time for `--duration` s. Answer: 201, running;
* a 60 s image pull: 8 at a time for `--duration` s. The DTMA holds the request for the whole
  pull, the function answers 202 "deploying" after DTMA_DEPLOY_BUDGET_SECONDS (1.5 s), and the
  pulls carry on in the stand-ins until they are stopped at the end: the benchmark takes
  `--duration` s, not 60 s per deploy;
* the floor: the no-op function receiving the same request the same ways.

Every deploy has a unique name (the request body carries `{{n}}`), so each one records an
instance, allocates a host port and calls the DTMA for real. Figures are medians over `--runs`
rounds, each against a freshly started function.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    DTMA_KEY_SECRET,
    ROOT,
    Postgres,
    Req,
    function_env,
    jwt_for,
    median,
    percentile,
    run_load,
    sequential_latencies,
    serving,
    table,
)

FUNCTION = "deploy_mcp_server"
TOOLBOXES = 16  # per kind; 848 host ports each: room for every deploy of a run


def seed(pg: Postgres, user_id: str, boxes: list[tuple[str, int, str]]) -> None:
    from shared.toolbox_keys import token_digest

    with pg.connect() as conn:
        conn.execute("insert into auth.users (id, email) values (%s, 'deploy-bench@bench.test')", (user_id,))
        for toolbox_id, port, key in boxes:
            conn.execute(
                """insert into public.account_tool_environments
                     (id, user_id, name, status, public_ip_address, region_slug, size_slug, dtma_token_sha256,
                      dtma_key_version, dtma_port, last_heartbeat_at)
                   values (%s, %s, %s, 'active', '127.0.0.1', 'nyc3', 's-1vcpu-2gb', %s, 1, %s, now())""",
                (toolbox_id, user_id, f"bench-{toolbox_id[:8]}", token_digest(key), port))


def deploy_requests(user_id: str, toolbox_ids: list[str]) -> list[Req]:
    headers = {"Authorization": f"Bearer {jwt_for(user_id, 3 * 3600)}", "Content-Type": "application/json"}
    return [Req("POST", "/", headers, json.dumps({"toolbox_id": t, "name": "bench-{{n}}",
                                                  "image": "mcp/everything:latest", "transport": "streamable_http",
                                                  "container_port": 8080}),
                dynamic=True) for t in toolbox_ids]


def _latency(samples: list[float]) -> dict[str, float]:
    return {"p50_ms": percentile(samples, 50) * 1000, "p99_ms": percentile(samples, 99) * 1000, "n": len(samples)}


def one_round(pg: Postgres, target: str, instant: list[Req], pulling: list[Req], sequential: int,
              duration: float) -> dict[str, Any]:
    env = function_env(pg.uri)
    function = FUNCTION if target == "deploy" else "noop"
    expected = {"instant": "201", "pull": "202"} if target == "deploy" else {"instant": "204", "pull": "204"}
    out: dict[str, Any] = {}
    with serving(function, env) as server:
        sequential_latencies(server, instant, 5)  # first requests open the pool, the JWT check, the DTMA client
        samples, statuses = sequential_latencies(server, instant, sequential)
        _check(statuses, expected["instant"], server)
        out["instant_sequential"] = _latency(samples)
        result = run_load(server.url, instant, 8, duration)
        _check(result.statuses, expected["instant"], server)
        out["instant_c8"] = {"p50_ms": result.p50_ms, "p99_ms": result.p99_ms, "n": result.requests, "rps": result.rps}
        result = run_load(server.url, pulling, 8, duration)
        _check(result.statuses, expected["pull"], server)
        out["pull60_c8"] = {"p50_ms": result.p50_ms, "p99_ms": result.p99_ms, "n": result.requests, "rps": result.rps}
    return out


def _check(statuses: dict[str, int], expected: str, server: Any) -> None:
    bad = {k: v for k, v in statuses.items() if k != expected}
    if bad:
        raise RuntimeError(f"{server.function}: expected only {expected}, got {statuses}: {server.log_tail()}")


def run(sequential: int = 150, duration: float = 5.0, runs: int = 3) -> dict[str, Any]:
    from devstack.dtma_standin import StandInFleet
    from shared.toolbox_keys import derive_key

    user_id = str(uuid.uuid4())
    instant_ids = [str(uuid.uuid4()) for _ in range(TOOLBOXES)]
    pull_ids = [str(uuid.uuid4()) for _ in range(TOOLBOXES)]
    keys = {t: derive_key(DTMA_KEY_SECRET, t, 1) for t in instant_ids + pull_ids}
    instant_fleet = StandInFleet(TOOLBOXES, tokens=[keys[t] for t in instant_ids], pull_delay=0.0)
    pull_fleet = StandInFleet(TOOLBOXES, tokens=[keys[t] for t in pull_ids], pull_delay=60.0)
    rounds: dict[str, list[dict[str, Any]]] = {"deploy": [], "noop": []}
    started = time.perf_counter()
    with Postgres() as pg, instant_fleet, pull_fleet:
        seed(pg, user_id, [(t, a.port, keys[t]) for t, a in zip(instant_ids, instant_fleet, strict=True)]
             + [(t, a.port, keys[t]) for t, a in zip(pull_ids, pull_fleet, strict=True)])
        instant, pulling = deploy_requests(user_id, instant_ids), deploy_requests(user_id, pull_ids)
        for r in range(runs):
            for target in ("deploy", "noop"):
                rounds[target].append(one_round(pg, target, instant, pulling, sequential, duration))
                print(f"round {r + 1}/{runs} {target}: " + ", ".join(
                    f"{k} p50 {v['p50_ms']:.1f} p99 {v['p99_ms']:.1f} ms" for k, v in rounds[target][-1].items()),
                    flush=True)
        with pg.connect() as conn:
            instances = conn.execute("select status_on_toolbox::text, count(*) from account_tool_instances "
                                     "group by 1 order by 1").fetchall()
        version = pg.version()
    summary = {t: {case: {m: median([it[case][m] for it in items]) for m in items[0][case]}
                   for case in items[0]} for t, items in rounds.items()}
    return {"summary": summary, "rounds": rounds, "instances": dict(instances), "postgres": version,
            "elapsed_s": time.perf_counter() - started,
            "params": {"sequential": sequential, "duration": duration, "runs": runs,
                       "budget_s": 1.5, "pull_s": 60, "toolboxes_per_kind": TOOLBOXES}}


CASES = (("instant_sequential", "instant DTMA, one at a time", "201"),
         ("instant_c8", "instant DTMA, 8 concurrent", "201"),
         ("pull60_c8", "60 s image pull, 8 concurrent", "202 after the 1.5 s budget"))


def report_lines(result: dict[str, Any]) -> list[str]:
    s = result["summary"]
    rows = []
    for key, label, answer in CASES:
        d, n = s["deploy"][key], s["noop"][key]
        rows.append([label, answer, f"{d['p50_ms']:.1f}", f"{d['p99_ms']:.1f}", f"{n['p50_ms']:.2f}",
                     f"{n['p99_ms']:.2f}", f"{d['p50_ms'] - n['p50_ms']:.1f}", f"{d['n']:.0f}"])
    return [table(["case", "answer", "deploy p50 ms", "deploy p99 ms", "no-op p50 ms", "no-op p99 ms",
                   "p50 above floor ms", "deploys per round"], rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequential", type=int, default=150)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = run(args.sequential, args.duration, args.runs)
    print("\n".join(report_lines(result)))
    print(f"instances by status afterwards: {result['instances']}; took {result['elapsed_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    main()
