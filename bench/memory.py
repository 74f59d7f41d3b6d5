"""Resident memory of every function's process against the no-op floor (not a test).

    python -m bench.memory [--burst 4]

Each function is served the production way (functions-framework: a gunicorn master that imported
the app, and one forked worker with 4 x cores threads). Memory is read from /proc:

* idle: after the first few real requests (the pool has connected, every lazy import is done);
* after a burst: `--burst` s of that function's real requests at concurrency 32 (heartbeats with 20
  containers, 100-server mcp_status reads, deploys recorded and enqueued, restarts run by
  dtma_command_worker through the queue against loopback DTMA stand-ins, sweeps over the seeded
  fleet);
* peak: the kernel's high-water mark (VmHWM) of the master plus the worker's, an upper bound of
  what the container held at once.

What Cloud Run counts against `--memory` is the container's memory: both processes. The worker is
a fork of the master, so their RSS share pages; the sum of PSS is the honest total, and the sum of
the peaks is a safe upper bound. Target: peak under 160 MiB (256 MiB with headroom).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from bench.common import FUNCTIONS, run_load, sequential_latencies, serving, table
from bench.world import World

LIMIT_MIB = 160


def measure(world: World, function: str, burst: float) -> dict[str, Any]:
    reqs, expected = world.requests(function)
    with serving(function, world.env(function)) as server:
        _, statuses = sequential_latencies(server, reqs, 8 if function != "noop" else 1)
        if function == "noop":
            statuses = {"204": 1}
        idle = server.memory()
        result = run_load(server.url, reqs if function != "noop" else reqs[:1], 32, burst)
        time.sleep(0.2)
        after = server.memory()
        unexpected = {k: v for k, v in result.statuses.items() if k not in expected}
    world.settle()  # commands left by the burst (manage) run before the next function is measured
    return {"idle": idle, "after_burst": after, "burst_requests": result.requests, "statuses": result.statuses,
            "unexpected": unexpected, "warmup_statuses": statuses}


def run(burst: float = 4.0, world: World | None = None) -> dict[str, Any]:
    own = world is None
    world = world or World()
    try:
        results = {}
        for function in ("noop", *FUNCTIONS):
            results[function] = measure(world, function, burst)
            r = results[function]
            print(f"{function}: idle PSS {r['idle']['total_pss']:.1f} MiB, after burst "
                  f"{r['after_burst']['total_pss']:.1f} MiB, peak {r['after_burst']['total_peak']:.1f} MiB "
                  f"({r['burst_requests']} requests {r['statuses']})", flush=True)
    finally:
        if own:
            world.stop()
    return {"results": results, "limit_mib": LIMIT_MIB, "params": {"burst": burst, "concurrency": 32}}


def report_lines(result: dict[str, Any]) -> list[str]:
    rows = []
    floor = result["results"]["noop"]
    for function, r in result["results"].items():
        idle, after = r["idle"], r["after_burst"]
        rows.append([f"`{function}`", f"{idle['worker_rss']:.1f}", f"{idle['total_pss']:.1f}",
                     f"{after['worker_rss']:.1f}", f"{after['total_pss']:.1f}", f"**{after['total_peak']:.1f}**",
                     f"{after['total_pss'] - floor['after_burst']['total_pss']:+.1f}",
                     "yes" if after["total_peak"] < result["limit_mib"] else "**no**", f"{r['burst_requests']:,}"])
    return [table(["function", "idle worker RSS", "idle total PSS", "after burst worker RSS", "after burst total PSS",
                   "peak (master + worker HWM)", "PSS vs no-op", f"peak < {result['limit_mib']} MiB",
                   "burst requests"], rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--burst", type=float, default=4.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = run(args.burst)
    print("\n".join(report_lines(result)))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
