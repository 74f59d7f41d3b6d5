"""Cold start of every function against the no-op floor (not a test).

    python -m bench.coldstart [--runs 5]

For each function, `--runs` times:

* cold start: a new `functions-framework --target X --source functions/X/main.py` process
  (gunicorn, as in production) is started, and one real request is sent as soon as the port
  accepts a connection (a connection refused is retried every 1 ms; nothing is sent before the
  port is open, so non-idempotent requests are sent exactly once). The figure is the time from
  spawning the process to that request's answer: interpreter start, imports, configuration,
  gunicorn, the first database connection and the request's own work. The floor is the no-op
  function (bench/noop) started and asked the same way;
* import time alone: a fresh interpreter imports functions_framework and executes the
  function's main.py (what the gunicorn master does before it listens), timed inside the process.

The first requests are real: a heartbeat (204), a 100-server mcp_status read (200), a deploy
(202: recorded, and its command enqueued with Cloud Tasks' REST createTask to the emulator, as in
production), a restart (200: enqueued, run by dtma_command_worker against a loopback DTMA stand-in,
its outcome awaited) and a sweep (200).
Also reports which heavy packages each function has loaded after its first request, and the
marginal import cost of the packages that make up the gap.

First click after idle: deploy_mcp_server and the no-op are started cold `--click-runs` times in
all (the runs above included), interleaved, for a p99 of the time from spawning the process to the
answer of the first deploy (the click that meets a scaled-to-zero function).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import FUNCTIONS, ROOT, Server, median, percentile, source_of, table
from bench.world import World

HEAVY = ("supabase", "postgrest", "google.cloud.logging", "pgserver", "jwt", "cryptography", "httpx", "psycopg",
         "psycopg_pool", "pydantic", "pydantic_settings")

IMPORT_SNIPPET = """
import time, sys, importlib.util
t0 = time.perf_counter()
import functions_framework
t1 = time.perf_counter()
spec = importlib.util.spec_from_file_location("main", sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules["main"] = module
spec.loader.exec_module(module)
t2 = time.perf_counter()
heavy = sorted(m for m in sys.argv[2].split(",") if m in sys.modules)
print(f"{(t1 - t0) * 1000:.2f} {(t2 - t0) * 1000:.2f} {','.join(heavy)}")
"""

MARGINAL_SNIPPET = """
import time, sys
import functions_framework
t = time.perf_counter()
for name in sys.argv[1].split(","):
    __import__(name)
print(f"{(time.perf_counter() - t) * 1000:.2f}")
"""

LOADED_SNIPPET = "import sys; print('loaded:' + ','.join(sorted(m for m in %r if m in sys.modules)))"


def first_request(world: World, function: str, run: int) -> tuple[str, str, bytes, dict[str, str], set[int]]:
    reqs, expected = world.requests(function)
    req = reqs[run % len(reqs)]
    body = req.body.replace("{{n}}", f"cold{run}-{os.getpid()}") if req.dynamic else req.body
    if function == "noop":
        return "POST", "/", b"", {}, {204}
    return req.method, req.path, body.encode(), req.headers, {int(s) for s in expected}


# The exact-imports floor of each function: the third-party packages it must use (bench/floor_imports).
FLOOR_SOURCE = ROOT / "bench" / "floor_imports" / "main.py"
FLOOR_SETS = {"floor:db": "pydantic,psycopg,psycopg_pool",
              "floor:db+jwt+httpx": "pydantic,psycopg,psycopg_pool,jwt,httpx"}
# The heartbeat talks to the database only; the user-facing functions verify JWTs and call agents or
# Cloud Tasks over httpx; the sweep checks its caller's OIDC token (PyJWT) and enqueues over httpx.
FLOORS = {"dtma_heartbeat_ingest": "floor:db", "mcp_status": "floor:db+jwt+httpx",
          "deploy_mcp_server": "floor:db+jwt+httpx", "manage_mcp_server": "floor:db+jwt+httpx",
          "mcp_status_sweep": "floor:db+jwt+httpx"}
COLD_TARGET = 1.25  # cold start to first answer / the function's exact-imports floor
USER_FACING_TARGET = 2.0  # user-facing cold start / the no-op floor
USER_FACING = ("mcp_status", "deploy_mcp_server", "manage_mcp_server")


def server_for(world: World, target: str) -> Server:
    if target in FLOOR_SETS:
        return Server("floor", {**world.env(), "FLOOR_IMPORTS": FLOOR_SETS[target]}, source=FLOOR_SOURCE)
    if target == "mcp_status_sweep":
        # Its MCP endpoint checks wait on the bench world's servers, which are records without endpoints
        # (up to MCP_SWEEP_PROBE_BUDGET_SECONDS): the first sweep here is the sweep itself.
        return Server(target, world.env(target, MCP_SWEEP_PROBE_BATCH="0"))
    return Server(target, world.env(target))


def cold_start(world: World, function: str, run: int) -> dict[str, Any]:
    if function in FLOOR_SETS:
        return first_answer(server_for(world, function), "POST", "/", b"", {}, {204})
    method, path, body, headers, expected = first_request(world, function, run)
    return first_answer(server_for(world, function), method, path, body, headers, expected)


def first_answer(server: Server, method: str, path: str, body: bytes, headers: dict[str, str],
                 expected: set[int]) -> dict[str, Any]:
    """Start `server` (not started yet), send one request as soon as its port accepts a connection, and
    stop it; ms from spawning the process to the answer."""
    function = server.function
    server.start()
    try:
        deadline = time.monotonic() + 30
        while True:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            try:
                conn.connect()
            except OSError:
                conn.close()
                if time.monotonic() > deadline or (server.process and server.process.poll() is not None):
                    raise RuntimeError(f"{function} never listened: {server.log_tail()}") from None
                time.sleep(0.001)
                continue
            conn.request(method, path, body=body or None, headers=headers)
            response = conn.getresponse()
            response.read()
            elapsed = time.perf_counter() - server.started_at
            conn.close()
            break
        if response.status not in expected:
            raise RuntimeError(f"{function}: first request answered {response.status}: {server.log_tail()}")
        return {"ms": elapsed * 1000, "status": response.status}
    finally:
        server.stop()


def import_time(function: str, env: dict[str, str]) -> tuple[float, float, list[str]]:
    source = FLOOR_SOURCE if function in FLOOR_SETS else source_of(function)
    if function in FLOOR_SETS:
        env = {**env, "FLOOR_IMPORTS": FLOOR_SETS[function]}
    done = subprocess.run([sys.executable, "-c", IMPORT_SNIPPET, str(source), ",".join(HEAVY)],
                          env=env, capture_output=True, text=True, check=True, cwd=str(ROOT), timeout=60)
    framework, total, heavy = [*done.stdout.strip().split(" "), ""][:3]
    return float(framework), float(total), [h for h in heavy.split(",") if h]


def marginal(packages: str, env: dict[str, str], runs: int) -> float:
    samples = []
    for _ in range(runs):
        done = subprocess.run([sys.executable, "-c", MARGINAL_SNIPPET, packages], env=env, capture_output=True,
                              text=True, check=True, cwd=str(ROOT), timeout=60)
        samples.append(float(done.stdout.strip()))
    return median(samples)


def loaded_after_first_request(world: World, function: str) -> list[str]:
    """Heavy packages in the worker after one real request (py-spy-free: ask the process itself is not
    possible, so a WSGI test client in a fresh interpreter serves one request the same way)."""
    method, path, body, headers, _ = first_request(world, function, 10_000 + os.getpid() % 1000)
    snippet = f"""
import sys, json
from functions_framework import create_app
app = create_app(target={function if function != "noop" else "noop"!r}, source={str(source_of(function))!r})
client = app.test_client()
r = client.open({path!r}, method={method!r}, data={body!r}, headers={headers!r})
print(r.status_code)
{LOADED_SNIPPET % (HEAVY,)}
"""
    done = subprocess.run([sys.executable, "-c", snippet], env=world.env(function), capture_output=True, text=True,
                          cwd=str(ROOT), timeout=60)
    lines = [line for line in done.stdout.splitlines() if line.startswith("loaded:")]
    return [h for h in lines[-1].removeprefix("loaded:").split(",") if h] if lines else ["(failed)"]


CLICK = "deploy_mcp_server"


def run(runs: int = 5, world: World | None = None, click_runs: int = 20) -> dict[str, Any]:
    own = world is None
    world = world or World(heartbeat_toolboxes=16)
    try:
        targets = ("noop", *FLOOR_SETS, *FUNCTIONS)
        cold: dict[str, list[float]] = {t: [] for t in targets}
        imports: dict[str, list[float]] = {t: [] for t in targets}
        framework: list[float] = []
        heavy_at_import: dict[str, list[str]] = {}
        for r in range(runs):
            for target in targets:  # interleaved, so drift in the machine's speed hits every target alike
                cold[target].append(cold_start(world, target, r)["ms"])
                world.settle()  # a restart's command has run before the next process starts
                fw, total, heavy = import_time(target, world.env(target))
                imports[target].append(total)
                framework.append(fw)
                heavy_at_import[target] = heavy
            print(f"round {r + 1}/{runs}: " + ", ".join(f"{t} {cold[t][-1]:.0f}" for t in targets) + " ms",
                  flush=True)
        clicks = {t: list(cold[t]) for t in ("noop", CLICK)}
        for r in range(runs, click_runs):
            for target in ("noop", CLICK):
                clicks[target].append(cold_start(world, target, r)["ms"])
        if click_runs > runs:
            print(f"first click after idle, {len(clicks[CLICK])} runs: deploy p99 "
                  f"{percentile(clicks[CLICK], 99):.0f} ms, no-op p99 {percentile(clicks['noop'], 99):.0f} ms",
                  flush=True)
        heavy_after = {t: loaded_after_first_request(world, t) for t in ("noop", *FUNCTIONS)}
        env = world.env()
        marginals = {name: marginal(name, env, 3) for name in (
            "psycopg,psycopg_pool", "pydantic", "shared.core.config", "jwt", "httpx")}
    finally:
        if own:
            world.stop()
    summary = {t: {"cold_ms": median(cold[t]), "import_ms": median(imports[t])} for t in targets}
    for t in targets:
        summary[t]["cold_ratio"] = summary[t]["cold_ms"] / summary["noop"]["cold_ms"]
        summary[t]["import_ratio"] = summary[t]["import_ms"] / summary["noop"]["import_ms"]
        if t in FLOORS:
            floor = summary[FLOORS[t]]
            summary[t]["floor"] = FLOORS[t]
            summary[t]["floor_ratio"] = summary[t]["cold_ms"] / floor["cold_ms"]
            summary[t]["floor_import_ratio"] = summary[t]["import_ms"] / floor["import_ms"]
    first_click = {t: {"p50_ms": percentile(v, 50), "p99_ms": percentile(v, 99), "max_ms": max(v), "n": len(v),
                       "samples": v} for t, v in clicks.items()}
    return {"summary": summary, "cold": cold, "imports": imports, "framework_import_ms": median(framework),
            "heavy_at_import": heavy_at_import, "heavy_after_first_request": heavy_after,
            "marginal_import_ms": marginals, "first_click": first_click,
            "params": {"runs": runs, "click_runs": max(runs, click_runs)}}


def verdict(ratio: float, target: float) -> str:
    return "met" if ratio <= target else "**not met**"


def report_lines(result: dict[str, Any]) -> list[str]:
    s = result["summary"]
    rows = []
    for t, v in s.items():
        if "floor_ratio" in v:
            floor = f"**{v['floor_ratio']:.2f}x** of `{v['floor']}` ({verdict(v['floor_ratio'], COLD_TARGET)})"
        else:
            floor = "-" if t == "noop" else f"{FLOOR_SETS[t].replace(',', ', ')}"
        user = (f"**{v['cold_ratio']:.2f}x** ({verdict(v['cold_ratio'], USER_FACING_TARGET)})" if t in USER_FACING
                else f"{v['cold_ratio']:.2f}x")
        rows.append([f"`{t}`", f"{v['cold_ms']:.0f}", floor, user, f"{v['import_ms']:.0f}",
                     ", ".join(result["heavy_after_first_request"].get(t, [])) or "-"])
    return [table(["function", "cold start to first answer, ms (median)",
                   f"vs its exact-imports floor (target <= {COLD_TARGET}x)",
                   f"vs no-op (user-facing: target <= {USER_FACING_TARGET:g}x)", "import alone, ms",
                   "heavy packages loaded after the first request"], rows)]


CLICK_TARGET_MS = 2000


def first_click_lines(result: dict[str, Any]) -> list[str]:
    """The first deploy after idle: its p99 against the no-op's first answer and the 2 s target."""
    d, n = result["first_click"][CLICK], result["first_click"]["noop"]
    verdict = "met" if d["p99_ms"] < CLICK_TARGET_MS else "**not met**"
    return [table(["first answer after a cold start", "runs", "p50 ms", "p99 ms", "max ms", "p99 vs no-op",
                   "target", "verdict"],
                  [[f"`{CLICK}`: first deploy (202, recorded + createTask to the emulator)", f"{d['n']}",
                    f"{d['p50_ms']:.0f}", f"**{d['p99_ms']:.0f}**", f"{d['max_ms']:.0f}",
                    f"{d['p99_ms'] / n['p99_ms']:.2f}x (+{d['p99_ms'] - n['p99_ms']:.0f} ms)",
                    f"p99 < {CLICK_TARGET_MS / 1000:g} s", verdict],
                   ["`noop` (floor): first request (204)", f"{n['n']}", f"{n['p50_ms']:.0f}", f"{n['p99_ms']:.0f}",
                    f"{n['max_ms']:.0f}", "1.00x", "-", "-"]])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--click-runs", type=int, default=20,
                        help="cold starts of deploy_mcp_server and the no-op in all, for the first click's p99")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = run(args.runs, click_runs=args.click_runs)
    print("\n".join(report_lines(result)))
    print("\n".join(first_click_lines(result)))
    print("marginal import cost after functions_framework (ms):", json.dumps(result["marginal_import_ms"]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
