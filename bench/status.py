"""mcp_status served the production way: latency, throughput and CPU per read (not a test).

    python -m bench.status [--duration 4] [--runs 3]

bench/sweep.py measures the SQL and the app through a WSGI test client; this serves the function
with functions-framework (gunicorn) on a loopback port, as Cloud Run does, and reads it with a real
HTTP client:

* a user with 100 MCP servers on 10 toolboxes, `GET /?limit=100` (a full page, ~120 KB of JSON);
* a user with 10 servers on 1 toolbox (a typical web-app poll);

each one at a time (latency without queueing, 200 reads) and 8 at a time for `--duration` s
(throughput), with the CPU time of the function's processes and of PostgreSQL per read (the figure
the capacity model uses). The floor is the no-op function read the same way. Medians over `--runs`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.common import median, percentile, run_load, sequential_latencies, serving, table
from bench.world import World

CASES = (("mcp_status", "100 servers (limit=100)"), ("mcp_status_10", "10 servers"))


def one_round(world: World, case: str, noop: bool, duration: float, reads: int) -> dict[str, Any]:
    reqs, expected = world.requests(case)
    function = "noop" if noop else "mcp_status"
    expected = {"204"} if noop else expected
    with serving(function, world.env(function)) as server:
        sequential_latencies(server, reqs, 5)
        samples, statuses = sequential_latencies(server, reqs, reads)
        if set(statuses) - expected:
            raise RuntimeError(f"{case}: {statuses}: {server.log_tail()}")
        cpu0, db0 = server.cpu_seconds(), world.pg.cpu_seconds()
        result = run_load(server.url, reqs, 8, duration)
        cpu1, db1 = server.cpu_seconds(), world.pg.cpu_seconds()
        if set(result.statuses) - expected:
            raise RuntimeError(f"{case}: {result.statuses}: {server.log_tail()}")
    return {"seq_p50_ms": percentile(samples, 50) * 1000, "seq_p99_ms": percentile(samples, 99) * 1000,
            "rps": result.rps, "c8_p50_ms": result.p50_ms, "c8_p99_ms": result.p99_ms,
            "cpu_ms_per_read": (cpu1 - cpu0) * 1000 / result.requests,
            "db_cpu_ms_per_read": (db1 - db0) * 1000 / result.requests}


def run(duration: float = 4.0, runs: int = 3, reads: int = 200, world: World | None = None) -> dict[str, Any]:
    own = world is None
    world = world or World(heartbeat_toolboxes=16)
    rounds: dict[str, list[dict[str, Any]]] = {}
    try:
        for r in range(runs):
            for case, _ in CASES:
                for noop in (False, True):
                    key = f"{case}{':noop' if noop else ''}"
                    rounds.setdefault(key, []).append(one_round(world, case, noop, duration, reads))
            print(f"round {r + 1}/{runs}: " + ", ".join(f"{k} {v[-1]['rps']:.0f}/s" for k, v in rounds.items()),
                  flush=True)
    finally:
        if own:
            world.stop()
    summary = {k: {m: median([it[m] for it in items]) for m in items[0]} for k, items in rounds.items()}
    return {"summary": summary, "rounds": rounds, "params": {"duration": duration, "runs": runs, "reads": reads}}


def report_lines(result: dict[str, Any]) -> list[str]:
    s = result["summary"]
    rows = []
    for case, label in CASES:
        v, f = s[case], s[f"{case}:noop"]
        rows.append([label, f"{v['seq_p50_ms']:.2f} / {v['seq_p99_ms']:.2f}",
                     f"{f['seq_p50_ms']:.2f} / {f['seq_p99_ms']:.2f}",
                     f"{v['rps']:,.0f}", f"{f['rps']:,.0f}", f"{v['rps'] / f['rps']:.0%}",
                     f"{v['cpu_ms_per_read']:.2f}", f"{v['db_cpu_ms_per_read']:.2f}"])
    return [table(["mcp_status read", "p50 / p99 ms, one at a time", "no-op p50 / p99 ms", "reads/s at 8 concurrent",
                   "no-op req/s", "vs no-op", "function CPU ms / read", "PostgreSQL CPU ms / read"], rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = run(args.duration, args.runs)
    print("\n".join(report_lines(result)))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
