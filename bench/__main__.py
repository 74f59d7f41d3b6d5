"""Run every benchmark of the project, write docs/benchmarks.md, the summary and the capacity model.

    PYTHONPATH=. python -m bench            # the whole set, ~9-10 min on 2 cores
    PYTHONPATH=. python -m bench --quick    # fewer/shorter runs, to check the harness (~4 min)
    PYTHONPATH=. python -m bench --only commands deploy   # some sections (docs are then not rewritten)
    PYTHONPATH=. python -m bench --no-readme              # rewrite docs/benchmarks.md only

The summary table and the capacity model go between `<!-- bench-summary:start/end -->` and
`<!-- capacity:start/end -->` markers, in whichever of README.md and docs/*.md holds them
(docs/performance.md at present).

Order: heartbeat (bench/heartbeat.py), deploy (bench/deploy.py), agent commands through the queue
(bench/commands.py), then one shared database, set of DTMA stand-ins, Cloud Tasks emulator and
command worker for cold start (bench/coldstart.py), memory (bench/memory.py) and the served
mcp_status (bench/status.py), then the sweep at 10,000 toolboxes / 100,000 instances
(bench/sweep.py, run as its own process, output kept verbatim), then the operations report and
retention at 10,000 toolboxes / 100,000 instances / 1,000,000 events (bench/operations.py, the same
way, ~1 min: most of it building the history), then the load test (bench/load.py)
when it exists and takes a duration option. Every figure is printed with its floor (the no-op
function, bench/noop, served the same way in the same run) and the ratio; figures are medians over
several runs; nothing here asserts a time. Load goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import coldstart, commands, deploy, heartbeat, memory, status
from bench.common import ROOT, machine, table
from bench.world import World

DOCS = ROOT / "docs"
SECTIONS = ("heartbeat", "deploy", "commands", "coldstart", "memory", "status", "sweep", "operations", "mcp_probe",
            "web", "watch",
            "load")
RESULTS = Path(tempfile.gettempdir()) / "mcp-bench-results.json"
CLOUD_RUN_CONCURRENCY = 40
CLOUD_RUN_TARGET_CPU = 0.6  # Cloud Run scales out before an instance's CPU passes ~60%


def run_sweep(quick: bool) -> dict[str, Any]:
    args = ["--runs", "3", "--reads", "100"] if quick else ["--runs", "5", "--reads", "300"]
    command = [sys.executable, "-m", "bench.sweep", *args]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=str(ROOT), timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    out = done.stdout + (f"\n[stderr]\n{done.stderr[-2000:]}" if done.returncode else "")
    figures: dict[str, Any] = {"returncode": done.returncode, "elapsed_s": time.perf_counter() - started}
    batches = re.findall(r"cp_sweep\(210, 900, 600, 120, (\d+), 0\.5\)\n\s+median\s+([\d.]+) ms", out)
    for batch, value in batches:
        figures.setdefault(f"sweep_batch_{batch}", []).append(float(value))
    if len(batches) >= 3:
        figures["changing_500_ms"] = float(batches[0][1])
        figures["changing_all_ms"] = float(batches[1][1])
        figures["noop_ms"] = float(batches[2][1])
    changed = re.search(r"changed: (\d+) toolboxes -> unresponsive \(\+(\d+) instance events\), (\d+) first-contact "
                        r"failures, (\d+) deadlines", out.split("20000, 0.5)")[1] if "20000, 0.5)" in out else "")
    if changed:
        figures["changed"] = [int(g) for g in changed.groups()]
    lists = re.findall(r"p50\s+([\d.]+) ms\s+p99\s+([\d.]+) ms", out)
    if len(lists) >= 2:
        figures["list_sql"], figures["list_app"] = [tuple(map(float, x)) for x in lists[:2]]
    seeded = re.search(r"seeded ([\d,]+) toolboxes, ([\d,]+) instances", out)
    if seeded:
        figures["seeded"] = seeded.groups()
    return {"command": "python -m bench.sweep " + " ".join(args), "output": out, "figures": figures}


def run_operations(quick: bool) -> dict[str, Any]:
    args = ["--runs", "11"] if quick else ["--runs", "21"]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "bench.operations", *args], capture_output=True, text=True,
                          cwd=str(ROOT), timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    out = done.stdout + (f"\n[stderr]\n{done.stderr[-2000:]}" if done.returncode else "")
    figures: dict[str, Any] = {"returncode": done.returncode, "elapsed_s": time.perf_counter() - started}
    for key, pattern in (("floor_ms", r"select 1 .*\n\s+median\s+([\d.]+) ms"),
                         ("report_ms", r"select public\.cp_operations_report\(.*\n\s+median\s+([\d.]+) ms"),
                         ("cpu_ms", r"database CPU per report ([\d.]+) ms"),
                         ("app_ms", r"PostgresDatabase\.call\('cp_operations_report'.*\n\s+median\s+([\d.]+) ms"),
                         ("prune_ms", r"select public\.cp_prune_history\(.*\n\s+median\s+([\d.]+) ms")):
        found = re.search(pattern, out)
        if found:
            figures[key] = float(found.group(1))
    seeded = re.search(r"seeded ([\d,]+) toolboxes, ([\d,]+) instances, ([\d,]+) events, ([\d,]+) commands", out)
    if seeded:
        figures["seeded"] = seeded.groups()
    return {"command": "python -m bench.operations " + " ".join(args), "output": out, "figures": figures}


def run_mcp_probe(quick: bool) -> dict[str, Any]:
    """bench/mcp_probe.py in its own process (it serves a real MCP server), output kept verbatim."""
    args = ["--servers", "300", "--probes", "50"] if quick else ["--servers", "1000", "--probes", "100"]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "bench.mcp_probe", *args], capture_output=True, text=True,
                          cwd=str(ROOT), timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT)})
    out = done.stdout + (f"\n[stderr]\n{done.stderr[-2000:]}" if done.returncode else "")
    figures: dict[str, Any] = {"returncode": done.returncode, "elapsed_s": time.perf_counter() - started}
    for key, pattern in (("floor_ms", r"floor: .* median ([\d.]+) ms"), ("probe_ms", r"probe: wall median ([\d.]+) ms"),
                         ("batch_s", r"that batch takes ([\d.]+) s")):
        found = re.search(pattern, out)
        if found:
            figures[key] = float(found.group(1))
    return {"command": "python -m bench.mcp_probe " + " ".join(args), "output": out, "figures": figures}


def run_web_console(quick: bool) -> dict[str, Any]:
    """bench/web_console.py in its own process (a local stack and Debian's chromium), output kept verbatim."""
    args = ["--loads", "5", "--changes", "20"] if quick else ["--loads", "7", "--changes", "30"]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "bench.web_console", *args], capture_output=True, text=True,
                          cwd=str(ROOT), timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    out = done.stdout + (f"\n[stderr]\n{done.stderr[-2000:]}" if done.returncode else "")
    figures: dict[str, Any] = {"returncode": done.returncode, "elapsed_s": time.perf_counter() - started}
    last = out.strip().splitlines()[-1] if out.strip() else ""
    if done.returncode == 0 and last.startswith("{"):
        figures.update(json.loads(last))
    return {"command": "python -m bench.web_console " + " ".join(args), "output": out, "figures": figures}


def run_watch(quick: bool) -> dict[str, Any]:
    """bench/watch.py in its own process (1,000 SSE watchers on one gunicorn instance), output kept verbatim."""
    args = ["--watchers", "300", "--users", "30", "--changes", "40"] if quick else ["--watchers", "1000"]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "bench.watch", *args], capture_output=True, text=True,
                          cwd=str(ROOT), timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    out = done.stdout + (f"\n[stderr]\n{done.stderr[-2000:]}" if done.returncode else "")
    return {"command": "python -m bench.watch " + " ".join(args), "output": out,
            "figures": {"returncode": done.returncode, "elapsed_s": time.perf_counter() - started}}


def _watch_section(watch: dict[str, Any]) -> list[str]:
    return ["", "## The watch stream (`bench/watch.py`)", "",
            f"`{watch['command']}`: a change committed -> its SSE event at a client (floor: the same change's NOTIFY "
            "on a plain LISTEN connection), and the serving process's CPU per change of one user with 10 and with "
            "all watchers connected (docs/watch.md).", "", "```", watch["output"].strip(), "```"]


def _web_section(web: dict[str, Any]) -> list[str]:
    lines = ["", "## The web console in Chromium (`bench/web_console.py`)", "",
             f"`{web['command']}`: 100 servers rendered (navigation -> every row in the DOM, floor: the same page "
             "with 0 servers) and a database change -> the page's DOM (floor: a plain SSE client on the same watch "
             "stream).", "", "```", web["output"].strip(), "```"]
    return lines


def run_load_test(quick: bool) -> dict[str, Any]:
    path = ROOT / "bench" / "load.py"
    if not path.exists():
        return {"skipped": "bench/load.py does not exist in this tree"}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    helped = subprocess.run([sys.executable, "-m", "bench.load", "--help"], capture_output=True, text=True,
                            cwd=str(ROOT), timeout=120, env=env)
    option = next((o for o in ("--duration", "--seconds") if o in helped.stdout), None)
    if helped.returncode or option is None:
        return {"skipped": "bench/load.py has no --duration/--seconds option; not run (a load test without a "
                           "bound does not belong in a bounded run)"}
    # At least 3 heartbeat intervals (its own check); its figures go into docs/benchmarks.md, not over
    # docs/load.md, which keeps the load test's own full-length run.
    command = [sys.executable, "-m", "bench.load", option, "20" if quick else "30"]
    if "--docs" in helped.stdout:
        command += ["--docs", ""]
    done = subprocess.run(command, capture_output=True, text=True, cwd=str(ROOT), timeout=600, env=env)
    shown = " ".join(shlex.quote(a) for a in command[3:])
    return {"command": f"python -m bench.load {shown}", "returncode": done.returncode,
            "output": (done.stdout + ("\n[stderr]\n" + done.stderr[-3000:] if done.returncode else ""))[-20000:]}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer and shorter runs (checks the harness)")
    parser.add_argument("--only", nargs="*", default=None, choices=SECTIONS, metavar="SECTION",
                        help="subset: " + " ".join(SECTIONS))
    parser.add_argument("--no-readme", action="store_true",
                        help="write docs/benchmarks.md only; leave the summary and capacity blocks (README.md, "
                             "docs/performance.md) alone")
    args = parser.parse_args()
    quick = args.quick
    only = set(args.only or SECTIONS)
    started = time.perf_counter()
    results: dict[str, Any] = {"command": "PYTHONPATH=. python -m bench" + (" --quick" if quick else "")
                               + (" --only " + " ".join(sorted(only)) if args.only else "")
                               + (" --no-readme" if args.no_readme else ""),
                               "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    runs = 2 if quick else 3
    if "heartbeat" in only:
        print("== heartbeat", flush=True)
        results["heartbeat"] = heartbeat.run(toolboxes=5000, load_toolboxes=256, duration=3 if quick else 4,
                                             runs=runs)
    if "deploy" in only:
        print("== deploy", flush=True)
        results["deploy"] = deploy.run(sequential=80 if quick else 150, duration=4 if quick else 5, runs=runs)
    if "commands" in only:
        print("== agent commands (bench/commands.py)", flush=True)
        results["commands"] = commands.run(commands.QUICK if quick else commands.Params())
    if only & {"coldstart", "memory", "status"}:
        with World() as world:
            results.setdefault("postgres", world.pg.version())
            if "coldstart" in only:
                print("== cold start", flush=True)
                results["coldstart"] = coldstart.run(runs=3 if quick else 5, world=world,
                                                     click_runs=8 if quick else 20)
            if "memory" in only:
                print("== memory", flush=True)
                results["memory"] = memory.run(burst=3 if quick else 4, world=world)
            if "status" in only:
                print("== mcp_status served", flush=True)
                results["status"] = status.run(duration=3 if quick else 4, runs=runs, world=world)
    if "sweep" in only:
        print("== sweep (bench/sweep.py)", flush=True)
        results["sweep"] = run_sweep(quick)
    if "operations" in only:
        print("== operations report and retention (bench/operations.py)", flush=True)
        results["operations"] = run_operations(quick)
    if "mcp_probe" in only:
        print("== MCP probe cost and a sweep's probing (bench/mcp_probe.py)", flush=True)
        results["mcp_probe"] = run_mcp_probe(quick)
    if "web" in only:
        print("== web console in Chromium (bench/web_console.py)", flush=True)
        results["web"] = run_web_console(quick)
    if "watch" in only:
        print("== watch stream (bench/watch.py)", flush=True)
        results["watch"] = run_watch(quick)
    if "load" in only:
        print("== load (bench/load.py)", flush=True)
        results["load"] = run_load_test(quick)
    pg_version = results.get("postgres") or results.get("heartbeat", {}).get("postgres") \
        or results.get("deploy", {}).get("postgres") or results.get("commands", {}).get("postgres")
    results["machine"] = machine(pg_version)
    results["elapsed_s"] = time.perf_counter() - started
    RESULTS.write_text(json.dumps(results, indent=1, default=str))
    if only >= {"heartbeat", "deploy", "commands", "coldstart", "memory", "status", "sweep"}:
        DOCS.mkdir(exist_ok=True)
        (DOCS / "benchmarks.md").write_text(render_benchmarks(results))
        if args.no_readme:
            print(f"wrote docs/benchmarks.md in {results['elapsed_s']:.0f} s (summary and capacity blocks left "
                  f"alone); raw results {RESULTS}")
            return
        written = {write_readme_block("capacity", render_capacity(results)),
                   write_readme_block("bench-summary", "\n".join(_summary_table(results)))}
        print(f"wrote docs/benchmarks.md and the summary and capacity model in "
              f"{', '.join(sorted(str(w) for w in written if w))} in {results['elapsed_s']:.0f} s; raw results "
              f"{RESULTS}")
    else:
        print(f"partial run ({' '.join(sorted(only))}): docs not rewritten; raw results {RESULTS}")


# --- docs/benchmarks.md ---------------------------------------------------------------------------

def _machine_lines(m: dict[str, Any], command: str, elapsed: float) -> list[str]:
    packages = ", ".join(f"{k} {v}" for k, v in m["packages"].items())
    return [f"Command: `{command}` (from the repository root; took {elapsed / 60:.1f} min).", "",
            f"Machine: {m['cores']} cores ({m['cpu'] or 'unknown CPU'}), {m['memory_gib']} GiB, {m['os']}; "
            f"Python {m['python']}; PostgreSQL {m['postgres']} (embedded, `pgserver`, Unix socket, "
            f"on the same cores as everything else); load generator: `{m['load_tool']}`; {packages}.", ""]


def render_benchmarks(r: dict[str, Any]) -> str:
    hb, dp, cs, mem, st, sw = (r[k] for k in ("heartbeat", "deploy", "coldstart", "memory", "status", "sweep"))
    lines = ["# Benchmarks", "",
             "Generated by `python -m bench` (bench/__main__.py); do not edit by hand. Every figure has its floor, "
             "measured in the same run: the no-op function `bench/noop/main.py` (imports functions_framework only, "
             "answers 204), served the same way, i.e. `functions-framework --target X --source ...` (gunicorn, 1 "
             "worker, threads = 4 x cores) on a loopback port. Figures are medians over several runs (each run a "
             "freshly started function); no test asserts a time.", ""]
    lines += _machine_lines(r["machine"], r["command"], r["elapsed_s"])
    lines += ["Everything runs on the same two cores: the load generator, the function and PostgreSQL. On Cloud Run "
              "the database is elsewhere and each instance has its own vCPU, so throughput ratios here are a lower "
              "bound; the CPU-time-per-request figures (function and database separately) are what transfers, and "
              "are what the capacity model (docs/performance.md) uses.", ""]
    lines += _summary_table(r)
    lines += _heartbeat_section(hb)
    lines += _deploy_section(dp)
    lines += _commands_section(r["commands"])
    lines += _coldstart_section(cs)
    lines += _memory_section(mem)
    lines += _status_section(st)
    lines += _sweep_section(sw)
    if "operations" in r:
        lines += _operations_section(r["operations"])
    if "web" in r:
        lines += _web_section(r["web"])
    if "watch" in r:
        lines += _watch_section(r["watch"])
    lines += _load_section(r.get("load", {}))
    return "\n".join(lines) + "\n"


def _summary_table(r: dict[str, Any]) -> list[str]:
    hb = r["heartbeat"]["summary"]
    best = max((c for c in hb["heartbeat"] if c.isdigit()), key=lambda c: hb["heartbeat"][c]["rps"])
    dp = r["deploy"]["summary"]
    cm = r["commands"]
    click = r["coldstart"]["first_click"]
    cs = r["coldstart"]["summary"]
    peak = max(v["after_burst"]["total_peak"] for v in r["memory"]["results"].values())
    sw = r["sweep"]["figures"]
    rows = [
        *_heartbeat_rows(r["heartbeat"], best),
        _deploy_row(dp),
        _first_click_row(click),
        _outcome_row(cm),
        _head_of_line_row(cm),
        ["sweep changing 10% of 10k toolboxes / 100k instances", f"{sw.get('changing_all_ms', float('nan')):.0f} ms",
         f"no-change sweep {sw.get('noop_ms', float('nan')):.1f} ms", "-", "< 1 s",
         "met" if sw.get("changing_all_ms", 1e9) < 1000 else "**not met**"],
        *([["operations report, last 24 h, 10k toolboxes / 100k instances / 1M events",
             f"{r['operations']['figures']['report_ms']:.1f} ms",
             f"`select 1` {r['operations']['figures'].get('floor_ms', float('nan')):.2f} ms", "-", "< 50 ms",
             "met" if r["operations"]["figures"]["report_ms"] < 50 else "**not met**"]]
           if "report_ms" in r.get("operations", {}).get("figures", {}) else []),
        *_coldstart_rows(cs),
        ["memory, highest peak (master + worker)", f"{peak:.0f} MiB", "-", "-", "< 160 MiB", "met" if peak < 160 else
         "**not met**"],
    ]
    return ["## Summary", "", table(["what", "measured", "floor / reference", "ratio", "target", "verdict"], rows), ""]


HB_CPU_TARGET = 1.5  # function CPU per steady-state beat / no-op request CPU
HB_DB_TARGET_MS = 0.3  # PostgreSQL CPU per steady-state beat
HB_ORIGINAL_TARGET = 5.0  # heartbeat throughput / the original's pattern


def _heartbeat_rows(hb: dict[str, Any], best: str) -> list[list[str]]:
    """The issue's heartbeat figures: CPU per steady beat against the no-op, database CPU per steady beat,
    throughput against the original's pattern (and, for reference, against the no-op)."""
    s, q = hb["summary"], hb["sequential"]
    h, n, o = s["heartbeat"][best], s["noop"][best], s["original"][best]
    steady, noop, direct = q["heartbeat_steady"], q["noop_steady"], q["direct"]["back_to_back"]
    alone = steady["cpu_ms"] / noop["cpu_ms"]
    loaded = h["cpu_ms_per_request"] / n["cpu_ms_per_request"]
    worst = max(alone, loaded)
    return [
        ["function CPU per steady-state heartbeat (20 containers) / no-op request CPU: one at a time; "
         f"under load (c={best})", f"{steady['cpu_ms']:.2f} ms; {h['cpu_ms_per_request']:.2f} ms",
         f"no-op {noop['cpu_ms']:.2f} ms; {n['cpu_ms_per_request']:.2f} ms", f"{alone:.2f}x; {loaded:.2f}x",
         f"<= {HB_CPU_TARGET:g}x", "met" if worst <= HB_CPU_TARGET else "**not met** (see Heartbeat)"],
        ["PostgreSQL CPU per steady-state heartbeat: called back to back (serving backend); through the function "
         f"one at a time; under load (c={best})",
         f"**{direct['db_cpu_ms']:.2f} ms** ({direct['backend_cpu_ms']:.2f} ms); {steady['db_cpu_ms']:.2f} ms; "
         f"{h['db_cpu_ms_per_request']:.2f} ms",
         f"a changed beat {q['heartbeat_changed']['db_cpu_ms']:.2f} ms; original {o['db_cpu_ms_per_request']:.2f} ms",
         "-", f"<= {HB_DB_TARGET_MS:g} ms, a changed beat one round trip",
         ("met" if direct["db_cpu_ms"] <= HB_DB_TARGET_MS else "**not met**") +
         " (see Heartbeat); one round trip: tests/test_heartbeat_steady.py"],
        ["heartbeat throughput vs the original's access pattern (same run, c=" + best + ")", f"{h['rps']:,.0f} hb/s",
         f"original {o['rps']:,.0f} hb/s", f"{h['rps'] / o['rps']:.1f}x", f">= {HB_ORIGINAL_TARGET:g}x",
         "met" if h["rps"] >= HB_ORIGINAL_TARGET * o["rps"] else "**not met** (see Heartbeat)"],
        ["heartbeat throughput vs the no-op (c=" + best + ")", f"{h['rps']:,.0f} hb/s", f"no-op {n['rps']:,.0f} req/s",
         f"{h['rps'] / n['rps']:.0%}", "- (report)", "see Heartbeat"],
    ]


def _coldstart_rows(cs: dict[str, Any]) -> list[list[str]]:
    """Cold start against each function's exact-imports floor, and the user-facing ones against the no-op."""
    worst = max((v["floor_ratio"], k) for k, v in cs.items() if "floor_ratio" in v)
    user = max((cs[k]["cold_ratio"], k) for k in coldstart.USER_FACING)
    return [
        ["cold start to first answer / the function's exact-imports floor, worst function",
         f"{cs[worst[1]]['cold_ms']:.0f} ms ({worst[1]})",
         f"{cs[worst[1]]['floor']} {cs[cs[worst[1]]['floor']]['cold_ms']:.0f} ms", f"{worst[0]:.2f}x",
         f"<= {coldstart.COLD_TARGET:g}x every function",
         "met" if worst[0] <= coldstart.COLD_TARGET else "**not met** (see Cold start)"],
        ["cold start of the user-facing functions / no-op floor, worst", f"{cs[user[1]]['cold_ms']:.0f} ms ({user[1]})",
         f"no-op {cs['noop']['cold_ms']:.0f} ms", f"{user[0]:.2f}x", f"report; <= {coldstart.USER_FACING_TARGET:g}x",
         "met" if user[0] <= coldstart.USER_FACING_TARGET else "**not met** (see Cold start)"],
    ]


def _rows_written(per: dict[str, float]) -> float:
    return sum(v for k, v in per.items() if k.startswith("account_tool") and "HOT" not in k)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.1f}x" if b else "n/a"


def _fewer(original: float, ours: float, what: str) -> str:
    """"23.0x fewer transactions", or "about as many rows (21.5 vs 22.5)" when the gap is small."""
    if ours and original / ours >= 1.2:
        return f"{original / ours:.1f}x fewer {what}"
    return f"about as many {what} ({ours:.1f} vs {original:.1f})"


def _instance_rows_note(per: dict[str, float]) -> str:
    """What the measured instance rows per steady-state beat say (the figure decides the sentence)."""
    rows = per.get("account_tool_instances", 0.0)
    if rows < 0.5:
        return "instance rows only when something about a container changed, events only on transitions"
    return (f"{rows:.1f} instance rows per beat although nothing changed: every reported instance is stamped "
            f"(last_heartbeat_from_dtma), {per.get('account_tool_instances (HOT updates)', 0.0):.1f} of them HOT "
            "updates")


def _deploy_row(dp: dict[str, Any]) -> list[str]:
    d1, d8, n1, n8 = dp["deploy"]["sequential"], dp["deploy"]["c8"], dp["noop"]["sequential"], dp["noop"]["c8"]
    above = max(d1["p99_ms"] - n1["p99_ms"], d8["p99_ms"] - n8["p99_ms"])
    return ["deploy answer, warm (record + enqueue + 202), p99 one at a time / 8 concurrent",
            f"{d1['p99_ms']:.1f} / {d8['p99_ms']:.1f} ms", f"no-op {n1['p99_ms']:.1f} / {n8['p99_ms']:.1f} ms",
            f"+{d1['p99_ms'] - n1['p99_ms']:.1f} / +{d8['p99_ms'] - n8['p99_ms']:.1f} ms", "< floor + 100 ms",
            "met" if above < deploy.TARGET_ABOVE_FLOOR_MS else "**not met** (see Deploy)"]


def _first_click_row(click: dict[str, Any]) -> list[str]:
    d, n = click[coldstart.CLICK], click["noop"]
    return [f"first deploy after idle (spawn the function, first 202), p99 of {d['n']}", f"{d['p99_ms']:,.0f} ms",
            f"no-op first answer p99 {n['p99_ms']:.0f} ms", f"{d['p99_ms'] / n['p99_ms']:.2f}x", "< 2 s",
            "met" if d["p99_ms"] < coldstart.CLICK_TARGET_MS else "**not met** (see Cold start)"]


def _outcome_row(cm: dict[str, Any]) -> list[str]:
    pull, fail = cm["pull"], cm["fail"]
    worst = max(pull["outcome_p99_ms"], fail["outcome_p99_ms"])
    return [f"agent's answer -> status readable, p99: pull done / pull failed {fail['hold_s']:g} s into a 60 s pull",
            f"{pull['outcome_p99_ms']:.1f} / {fail['outcome_p99_ms']:.1f} ms", "-", "-", "< 1 s",
            "met" if worst < commands.TARGET_MS else "**not met** (see Agent commands)"]


def _head_of_line_row(cm: dict[str, Any]) -> list[str]:
    h, t = cm["head_of_line"], cm["threads"]
    return [f"a quick deploy's outcome while slow pulls hold all {t} worker threads",
            f"{h[f'held_{t}_ms']:,.0f} ms", f"worker idle {h['idle_p50_ms']:.0f} ms", "-", "- (finding)",
            "see Agent commands"]


def _heartbeat_section(hb: dict[str, Any]) -> list[str]:
    s, p = hb["summary"], hb["params"]
    lines = ["## Heartbeat ingest (`bench/heartbeat.py`)", "",
             f"{p['toolboxes']:,} toolboxes x {p['per_toolbox']} MCP servers ({p['instances']:,} instances) in the "
             f"database; {p['load_toolboxes']} distinct agents post the real DTMA's format (20 Docker container "
             "summaries, all managed, steady state: nothing changed since the previous beat). The original's "
             "pattern is bench/original_pattern.py: 1 SELECT + 1 UPDATE + 20 UPDATEs, each its own transaction, "
             "through the same kind of pool, same database (its own toolboxes, so the ingest's stay in steady "
             f"state), same serving. {p['runs']} runs x {p['duration']:g} s "
             "per concurrency; medians. A steady beat is recognised by the digest of its report "
             "(sql/migrations/0012_heartbeat_digest.sql): the database then locks the toolbox, checks that none "
             "of its instance rows changed since the digest was stored, and records the liveness on the toolbox "
             "row only; the function reuses the report it built for the same containers.", ""]
    lines += heartbeat.report_lines(hb)
    q = hb["sequential"]
    lines += ["", "One request at a time on one keep-alive connection (no queue, so no core is shared with waiting "
              "requests; CPU of the function's processes, of every PostgreSQL process, and of the client backend "
              "that served the beats, divided by the requests). A changed beat: every container's image tag "
              "alternates, so each beat rewrites the toolbox's 20 instance rows through the full reconciliation, "
              "still in one call.", ""]
    seq_rows = [[label, f"{q[key]['requests']:,}", f"{q[key]['cpu_ms']:.2f}", f"{q[key]['db_cpu_ms']:.2f}",
                 f"{q[key]['backend_cpu_ms']:.2f}", f"{q[key]['p50_ms']:.2f}"]
                for key, label in (("noop_steady", "no-op"), ("heartbeat_steady", "heartbeat, steady state"),
                                   ("heartbeat_changed", "heartbeat, every beat a change"))]
    lines.append(table(["one at a time", "requests", "function CPU ms", "PostgreSQL CPU ms (all processes)",
                        "serving backend CPU ms", "p50 ms"], seq_rows))
    d = q["direct"]
    lines += ["", "cp_ingest_heartbeat called straight from one connection configured like the function's "
              "(autocommit, no prepared statements), steady beats of the same agents: back to back "
              f"({d['back_to_back']['calls']:,} calls), as a connection of a busy pool or transaction pooler runs "
              f"them, PostgreSQL spends **{d['back_to_back']['db_cpu_ms']:.2f} ms** per beat (the serving backend "
              f"{d['back_to_back']['backend_cpu_ms']:.2f} ms); with a {d['paused']['pause_ms']:g} ms pause after each "
              f"call ({d['paused']['calls']:,} calls) {d['paused']['db_cpu_ms']:.2f} ms (backend "
              f"{d['paused']['backend_cpu_ms']:.2f} ms): a backend woken from idle for each beat, on cores shared "
              "with everything else, pays for the wake-up and cold caches, which is why the one-at-a-time figure "
              "through the function is higher than the work itself."]
    lines += ["", "Cost per heartbeat (same runs; CPU is process CPU time divided by requests served, at each "
              "concurrency; transactions and tuples from pg_stat deltas read after each server stopped):", ""]
    rows = []
    for target, label in (("heartbeat", "ingest (cp_ingest_heartbeat)"), ("original", "original pattern"),
                          ("noop", "no-op")):
        pr = s[target]["per_request"]
        cs = [c for c in s[target] if c.isdigit()]
        cpu = " / ".join(f"{s[target][c]['cpu_ms_per_request']:.2f}" for c in cs)
        db = " / ".join(f"{s[target][c]['db_cpu_ms_per_request']:.2f}" for c in cs)
        rows.append([label, cpu, db, f"{pr.get('xact', 0):.2f}",
                     f"{pr.get('account_tool_environments', 0):.2f} "
                     f"({pr.get('account_tool_environments (HOT updates)', 0):.2f} HOT)",
                     f"{pr.get('account_tool_instances', 0):.2f}", f"{pr.get('account_tool_instance_events', 0):.2f}"])
    lines.append(table(["per heartbeat", "function CPU ms (c=" + "/".join(cs) + ")", "PostgreSQL CPU ms",
                        "DB transactions", "toolbox rows written", "instance rows written", "event rows written"],
                       rows))
    lines += ["", "### Where the time goes", ""]
    prof = hb.get("profile") or {}
    if prof.get("buckets"):
        lines += [f"CPU profile of the ingest worker at concurrency 32 ({prof['tool']}, {prof['samples']:,} samples of "
                  "the thread holding the GIL, i.e. where the one core the worker can use goes):", ""]
        lines.append(table(["part of the request", "share of worker CPU"],
                           [[k, f"{v:.0%}"] for k, v in prof["buckets"]]))
        lines += ["", "Top frames by own time: " + "; ".join(f"`{k}` {v:.0%}" for k, v in prof["top_self"][:8]) + "."]
    else:
        lines.append(f"(profile not taken: {prof.get('note', 'unknown')})")
    h8 = s["heartbeat"][max(c for c in s["heartbeat"] if c.isdigit())]
    n8 = s["noop"][max(c for c in s["noop"] if c.isdigit())]
    o8 = s["original"][max(c for c in s["original"] if c.isdigit())]
    total_h = h8["cpu_ms_per_request"] + h8["db_cpu_ms_per_request"]
    total_o = o8["cpu_ms_per_request"] + o8["db_cpu_ms_per_request"]
    per_h, per_o = s["heartbeat"]["per_request"], s["original"]["per_request"]
    q_h, q_n = q["heartbeat_steady"], q["noop_steady"]
    lines += ["", "Reading the gap. The floor spends "
              f"{n8['cpu_ms_per_request']:.2f} ms of CPU per request under load and {q_n['cpu_ms']:.2f} ms one at a "
              "time (gunicorn, Flask/werkzeug, nothing else). A steady heartbeat costs "
              f"{h8['cpu_ms_per_request']:.2f} ms and {q_h['cpu_ms']:.2f} ms in the function: the same Flask "
              "request, the body read and parsed by pydantic-core with the duplicate-key and depth checks "
              "(shared/adapters/http.py), the digest of what reconciliation reads, the volatile fields validated, "
              "one database round trip through psycopg (adapting the parameters, sending ~6 KB, reading the "
              "answer), the routine log line; the profile above splits it. PostgreSQL spends "
              f"{q_h['db_cpu_ms']:.2f} ms per steady beat one at a time ({q_h['backend_cpu_ms']:.2f} ms in the "
              f"serving backend, the rest in WAL and background processes) and {h8['db_cpu_ms_per_request']:.2f} ms "
              "under load, where the function, the load generator and PostgreSQL share these two cores. One gunicorn "
              "worker uses one core at a time (the GIL), so the ingest's ceiling here is about 1 / function-CPU per "
              "second. Against the original, total CPU per heartbeat is "
              f"{total_h:.2f} ms vs {total_o:.2f} ms ({total_o / total_h:.1f}x), database CPU "
              f"{o8['db_cpu_ms_per_request'] / h8['db_cpu_ms_per_request']:.1f}x less, "
              f"{_fewer(per_o.get('xact', 0), per_h.get('xact', 0), 'database transactions')} and "
              f"{_fewer(_rows_written(per_o), _rows_written(per_h), 'rows written')} "
              f"[{_instance_rows_note(per_h)}]; the replay runs over a Unix socket with ~70 us round trips, where the "
              "original paid 22 PostgREST HTTP round trips per beat, so the ratio in throughput understates the "
              "difference in database load, which is what limits a fleet (docs/performance.md).", ""]
    lines += ["### SQL plans at this fleet size", "",
              "EXPLAIN (ANALYZE, BUFFERS) of cp_ingest_heartbeat's statements for one steady-state beat, as generic "
              "plans (what PL/pgSQL settles on); the last row is the whole call, steady path included.", ""]
    rows = []
    for plan in hb["explain"]:
        nodes = [line.strip().split(" (actual")[0] for line in plan["plan"]
                 if "Scan" in line and "(actual" in line]
        rows.append([plan["label"], "; ".join(dict.fromkeys(nodes)) or plan["plan"][0].split(" (actual")[0],
                     plan["execution"].replace("Execution Time: ", ""),
                     "**" + "; ".join(plan["seq_scans"]) + "**" if plan["seq_scans"] else "none"])
    lines.append(table(["statement", "scans", "execution", "seq scans of hot tables"], rows))
    lines.append("")
    return lines


def _deploy_section(dp: dict[str, Any]) -> list[str]:
    p = dp["params"]
    return ["## Deploy answer (`bench/deploy.py`)", "",
            "deploy_mcp_server as the web app meets it, warm. A deploy records the instance and its command in one "
            "transaction (cp_record_deploy_command: owner, toolbox state, name and host port checked under a "
            "toolbox lock), enqueues the command with Cloud Tasks' REST createTask over httpx (`TASKS_MODE="
            "cloud_tasks`), reads the server back as mcp_status shows it and answers 202: two database round trips "
            "and one HTTP call, and never the agent. The queue is the Cloud Tasks emulator (devstack/cloud_tasks.py) "
            "in the benchmark process, paused, so what is timed is record + enqueue + answer and the commands do "
            "not run beside the function on the same two cores (in production the worker runs on other instances; "
            "bench/commands.py times the rest). The old case of a 60 s image pull answered after the 1.5 s budget "
            "is gone: a deploy never waits for the agent now, whatever the pull takes. "
            f"{p['toolboxes']} toolboxes; {p['runs']} runs, each against a freshly started function; medians of "
            f"the runs' p50 and p99 ({p['sequential']} deploys one at a time, then 8 at a time for "
            f"{p['duration']:g} s). Target: p99 less than 100 ms above the floor's.", "",
            *deploy.report_lines(dp),
            "The emulator's HTTP handler, as shipped, leaves Nagle's algorithm on: on the functions' keep-alive "
            "connection each createTask answer then waits for the client's delayed ACK, ~40 ms (the DTMA stand-in's "
            "server turns it off for this reason). Google's API has no such stall, so the runs above use the "
            "emulator with TCP_NODELAY set on its connections (bench/common.py start_tasks_emulator); the "
            "as-shipped figure is the last sentence above. Real createTask calls to cloudtasks.googleapis.com from "
            "Cloud Run cost a network round trip to Google's front end (and a metadata-server token, cached) that "
            "loopback cannot show.", "",
            f"After the runs: instances by status {dp['instances']}, commands by status {dp['commands']}, tasks "
            f"held by the paused queue {dp['tasks_enqueued']:,} (one task per deploy answered).", ""]


def _commands_section(cm: dict[str, Any]) -> list[str]:
    p, t = cm["params"], cm["threads"]
    return ["## Agent commands through the queue (`bench/commands.py`)", "",
            "After the 202, the user's answer comes through the command worker. Wired as in production, on "
            "loopback: deploy_mcp_server and manage_mcp_server (functions-framework, `TASKS_MODE=cloud_tasks`) -> "
            "the Cloud Tasks emulator in the benchmark process (delivery over HTTP; deploy.sh's queue settings: 20 "
            "attempts, backoff 1 s doubling 5 times to 60 s, 50 deliveries at once) -> dtma_command_worker "
            f"(functions-framework, 1 gunicorn worker, {t} threads = 4 x cores) -> one DTMA stand-in per toolbox "
            "(benchmark process) -> PostgreSQL. The clock starts when the stand-in's request log records its answer "
            "to `POST /tools` (the answer is decided and about to be written; polled every 1 ms) and stops when the "
            "server's new status is committed (polled every 1 ms on a separate connection); one mcp_status read of "
            "the server then confirms what the user sees (status and message). Target: p99 under 1 s.", "",
            f"Successful pulls: `standin/slow-{p['pull_s']:g}` ({p['pull_s']:g} s pull, then create, start, 201), "
            f"{p['pulls']} deploys {p['pull_gap_s']:g} s apart, each on its own toolbox. A failure in the middle of a "
            f"60 s pull: {p['failures']} deploys of `standin/stream-error` on agents whose pulls take "
            f"{p['fail_after_s']:g} s, {p['fail_gap_s']:g} s apart. The stand-in holds the request for those "
            f"{p['fail_after_s']:g} s and then answers 500 \"No such image\", which is what the real agent answers "
            "when Docker's pull stream fails midway (docs/real-agent.md, D2): the agent answers only when the stream "
            "ends, so from the worker's side this is a 60 s pull that failed after "
            f"{p['fail_after_s']:g} s; nothing in the worker depends on how long the pull would have gone on (it "
            "waits on one HTTP response; its database pool keeps idle connections 10 minutes). The runs do not "
            "wait out a full 60 s pull.", "",
            *commands.outcome_lines(cm), "",
            "The deploy answer is slower here than in the Deploy section: the emulator delivers the command at "
            "once and the worker starts on it beside the deploy function's last round trip, on the same two "
            "cores. \"202 -> agent called\" is the stand-in's answer time minus the pull's length minus the 202's "
            "arrival: the queue's delivery, the worker's claim and the agent call's start.", "",
            *commands.head_of_line_lines(cm), "",
            "Head of line. The worker holds one gunicorn thread per command for as long as the agent takes, and "
            f"functions-framework starts {t} threads here (4 x the cores Python sees, THREADS being unset, as "
            "deploy.sh deploys it: 4 where os.cpu_count() is 1) while Cloud Run sends an instance up to "
            "`--concurrency` (40 by default) requests at once. "
            "A command that arrives while every thread waits on a pull is accepted by gunicorn and then waits for a "
            "thread: the quick deploy above waited for the slow pulls to end. The queue sees no error, so it neither "
            "retries elsewhere nor scales out. Giving the worker THREADS equal to its concurrency (its threads "
            "mostly wait on sockets), or a concurrency equal to its threads, removes the wait.", "",
            "Cost per command: CPU of the worker's processes (master + worker; the scheduler's ns accounting of "
            f"their threads, checked against /proc ticks: {cm['cost']['cpu_ms_from_ticks']['deploy']:.2f} / "
            f"{cm['cost']['cpu_ms_from_ticks']['stop']:.2f} / {cm['cost']['cpu_ms_from_ticks']['noop']:.2f} ms) over "
            f"{p['cost']} deploy commands and {p['cost']} stop commands one at a time (instant pulls), and the no-op "
            f"over {p['cost']} POSTs of the same body on new connections, as the queue delivers; round trips from "
            f"{cm['round_trips']['n']} more of each through counted copies of the functions (bench/counted/main.py "
            "logs every statement their psycopg cursors send; one statement is one round trip). The worker's cost "
            "per command is flat in the pull's length: it waits on a socket meanwhile.", "",
            *commands.cost_lines(cm), ""]


def _coldstart_section(cs: dict[str, Any]) -> list[str]:
    m = cs["marginal_import_ms"]
    fw = cs["framework_import_ms"]
    s = cs["summary"]
    return ["## Cold start (`bench/coldstart.py`)", "",
            "Time from spawning `functions-framework --target X --source functions/X/main.py` (as Cloud Run does) "
            "to the answer of one real first request sent as soon as the port accepts (heartbeat 204, 100-server "
            "mcp_status 200, deploy 202 after recording it and enqueueing its command to the Cloud Tasks emulator, "
            "restart 200 after dtma_command_worker ran it through the queue against a DTMA stand-in, sweep 200), "
            "and the import of main.py alone in a fresh interpreter. "
            f"{cs['params']['runs']} runs, interleaved; medians. Bytecode caches (.pyc) are warm.", "",
            *coldstart.report_lines(cs), "",
            f"First click after idle: the time from spawning deploy_mcp_server to the answer of its first deploy "
            "(recorded, and its command enqueued with createTask to the Cloud Tasks emulator: the first request also "
            f"builds the queue's httpx client), {cs['first_click'][coldstart.CLICK]['n']} cold starts interleaved "
            "with as many of the no-op (the runs of the table above included). Target: p99 under 2 s on this "
            "machine.", "",
            *coldstart.first_click_lines(cs), "",
            "Not loaded on any default path: supabase-py, google-cloud-logging, pgserver (the table lists every heavy "
            "package present after the first request).", "",
            "The exact-imports floors (bench/floor_imports): a functions-framework process that imports exactly the "
            "third-party packages a function must use, the way it uses them, and answers 204: `floor:db` "
            f"({coldstart.FLOOR_SETS['floor:db'].replace(',', ', ')}) for the heartbeat, `floor:db+jwt+httpx` "
            "for the user-facing functions and the sweep (PyJWT for user tokens or the caller's OIDC token, httpx "
            "with httpcore, its transport, for the agents and Cloud Tasks). What a function spends above its "
            "floor is its own modules, its "
            "settings and its first request (the first database connection, the JWT check, createTask). The sweep's "
            "MCP endpoint checks are off here (MCP_SWEEP_PROBE_BATCH=0): the bench world's servers are records "
            "without endpoints, and each check would wait for its timeout.", "",
            "Marginal import cost in a process that already imported functions_framework (which itself costs "
            f"{fw:.0f} ms): psycopg + psycopg_pool {m['psycopg,psycopg_pool']:.0f} ms, pydantic "
            f"{m['pydantic']:.0f} ms, PyJWT + cryptography {m['jwt']:.0f} ms, httpx {m['httpx']:.0f} ms, "
            f"shared.core.config {m['shared.core.config']:.0f} ms (pydantic included; settings no longer load "
            "pydantic-settings). Against the no-op, which imports none of them, the user-facing functions' "
            "unavoidable imports alone (their floor `floor:db+jwt+httpx`) take "
            f"{s['floor:db+jwt+httpx']['cold_ms'] / s['noop']['cold_ms']:.2f}x of the 2x. docs/performance.md "
            "has the production options (bytecode in the package, startup CPU boost, minimum instances) and "
            "their cost.", ""]


def _memory_section(mem: dict[str, Any]) -> list[str]:
    peak = max(v["after_burst"]["total_peak"] for v in mem["results"].values())
    return ["## Memory (`bench/memory.py`)", "",
            "MiB, from /proc: RSS of the gunicorn worker, PSS of master + worker (what the container holds; the "
            "worker is a fork of the master and shares its pages) at idle after the first requests and after a "
            f"{mem['params']['burst']:g} s burst of real requests at concurrency {mem['params']['concurrency']}, "
            "and the peak (VmHWM of master + worker, an upper bound).", "",
            *memory.report_lines(mem), "",
            f"Highest peak {peak:.0f} MiB: every function fits Cloud Run's 256 MiB with more than "
            f"{256 - peak:.0f} MiB of headroom, so deploy.sh keeps `--memory 256Mi`.", ""]


def _status_section(st: dict[str, Any]) -> list[str]:
    return ["## mcp_status served (`bench/status.py`)", "",
            "GET mcp_status with an HS256 user JWT, served by functions-framework; one at a time (200 reads) and 8 "
            f"at a time ({st['params']['duration']:g} s); {st['params']['runs']} runs; medians. Function and "
            "PostgreSQL CPU per read are the capacity model's inputs.", "",
            *status.report_lines(st), "",
            "A full page of 100 servers is one database round trip (cp_list_mcp_servers) whose cost is mostly "
            "building ~120 KB of JSON (each server with its toolbox and last 5 events) in PostgreSQL, then parsing "
            "and re-rendering it in the function; a 10-server poll costs about a tenth.", ""]


def _sweep_section(sw: dict[str, Any]) -> list[str]:
    f = sw["figures"]
    lines = ["## Sweep and status SQL at 10,000 toolboxes / 100,000 instances (`bench/sweep.py`)", "",
             f"Command: `{sw['command']}` (written separately; its output follows verbatim).", ""]
    if "changing_all_ms" in f:
        rows = [["sweep changing ~10% of the fleet, production batch (500 per kind; `more` = true)",
                 f"{f['changing_500_ms']:.1f} ms", "< 1 s"],
                ["sweep changing ~10% of the fleet in one call", f"{f['changing_all_ms']:.1f} ms", "< 1 s"],
                ["sweep that changes nothing", f"{f['noop_ms']:.2f} ms", "-"]]
        if "list_sql" in f:
            rows.append(["cp_list_mcp_servers, 100 servers (p50 / p99)",
                         f"{f['list_sql'][0]:.2f} / {f['list_sql'][1]:.2f} ms",
                         "-"])
            rows.append(["mcp_status app via WSGI test client (p50 / p99)",
                         f"{f['list_app'][0]:.2f} / {f['list_app'][1]:.2f} ms", "-"])
        lines += [table(["what", "median", "target"], rows), ""]
    lines += ["<details><summary>bench/sweep.py output (plans included)</summary>", "", "```", sw["output"].rstrip(),
              "```", "", "</details>", ""]
    return lines


def _operations_section(op: dict[str, Any]) -> list[str]:
    f = op["figures"]
    lines = ["## Operations report and retention at 10,000 toolboxes / 100,000 instances / 1,000,000 events "
             "(`bench/operations.py`)", "",
             f"Command: `{op['command']}` (written separately; its output follows verbatim).", ""]
    if "report_ms" in f:
        rows = [["cp_operations_report, last 24 h in hourly buckets (one connection)", f"{f['report_ms']:.1f} ms",
                 f"`select 1` {f.get('floor_ms', float('nan')):.2f} ms", "< 50 ms",
                 "met" if f["report_ms"] < 50 else "**not met**"],
                ["its database CPU time per report (contention-free cost)", f"{f.get('cpu_ms', float('nan')):.1f} ms",
                 "-", "-", "-"],
                ["the same through PostgresDatabase.call (JSON decoded)", f"{f.get('app_ms', float('nan')):.1f} ms",
                 "-", "-", "-"],
                ["one retention batch (cp_prune_history, 5,000 of each kind)",
                 f"{f.get('prune_ms', float('nan')):.1f} ms", "-", "-", "-"]]
        lines += [table(["what", "median", "floor", "target", "verdict"], rows), ""]
    lines += ["<details><summary>bench/operations.py output (plan included)</summary>", "", "```",
              op["output"].rstrip(), "```", "", "</details>", ""]
    return lines


def _load_section(load: dict[str, Any]) -> list[str]:
    lines = ["## Load test (`bench/load.py`)", ""]
    if "skipped" in load:
        return [*lines, f"Not run: {load['skipped']}.", ""]
    return [*lines, f"Command: `{load['command']}` (exit {load['returncode']}); output verbatim:", "", "```",
            load["output"].rstrip(), "```", ""]


# --- the summary and capacity blocks ---------------------------------------------------------------

README = DOCS.parent / "README.md"


def write_readme_block(name: str, text: str) -> Path | None:
    """Replace the block between `<!-- name:start -->` and `<!-- name:end -->` with `text` (without its own
    `## ` heading: the page has one) in every one of README.md and docs/*.md that holds it (docs/benchmarks.md
    aside), so the page quotes this run's figures; the path written, or None (and a warning) if none has it."""
    body = text.split("\n", 2)[2] if text.startswith("## ") else text
    block = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)
    written = None
    for page in [README, *sorted(DOCS.glob("*.md"))]:
        if page.name == "benchmarks.md" or not page.exists():
            continue
        current = page.read_text()
        if block.search(current):
            page.write_text(block.sub(lambda m: m.group(1) + body.strip("\n") + "\n" + m.group(2), current))
            written = page.relative_to(DOCS.parent)
    if written is None:
        print(f"warning: no page holds <!-- {name}:start --> ... <!-- {name}:end -->; not written", flush=True)
    return written


def render_capacity(r: dict[str, Any]) -> str:
    hb = r["heartbeat"]["summary"]
    conc = max(c for c in hb["heartbeat"] if c.isdigit())
    h, o = hb["heartbeat"][conc], hb["original"][conc]
    per = hb["heartbeat"]["per_request"]
    per_o = hb["original"]["per_request"]
    rows_per_beat, rows_per_beat_o = _rows_written(per), _rows_written(per_o)
    quiet = per.get("account_tool_instances", 0.0) < 0.5
    st = r["status"]["summary"]
    read10, read100 = st["mcp_status_10"], st["mcp_status"]
    p99 = h["p99_ms"] / 1000
    lines = ["## Performance and capacity", "",
             f"Measured by `{r['command']}` (docs/benchmarks.md; {r['machine']['cores']} cores, Python "
             f"{r['machine']['python']}, PostgreSQL {r['machine']['postgres']}). Per heartbeat (20 containers, steady "
             f"state): **{h['cpu_ms_per_request']:.2f} ms** of function CPU, "
             f"**{h['db_cpu_ms_per_request']:.2f} ms** of "
             f"database CPU, **{per.get('xact', 0):.2f}** database transaction and **{rows_per_beat:.2f}** rows "
             f"written ({'the toolbox row; ' if quiet else ''}{_instance_rows_note(per)}). The original's pattern, "
             f"measured the same way: {o['cpu_ms_per_request']:.2f} ms + "
             f"{o['db_cpu_ms_per_request']:.2f} ms, {per_o.get('xact', 0):.1f} transactions and "
             f"{rows_per_beat_o:.1f} rows "
             f"per beat. Per status read: {read10['cpu_ms_per_read']:.2f} ms function + "
             f"{read10['db_cpu_ms_per_read']:.2f} ms database CPU for a 10-server user, "
             f"{read100['cpu_ms_per_read']:.2f} + {read100['db_cpu_ms_per_read']:.2f} ms for a full page of 100.", "",
             *_per_vcpu_lines(r["heartbeat"]),
             "At one heartbeat per toolbox per minute (the DTMA's interval), and, for the web app, one status poll "
             "per toolbox per minute of a 10-server user (an upper bound for dashboards left open):", ""]
    rows = []
    for n in (1_000, 10_000, 100_000):
        rps = n / 60
        hb_cpu = rps * h["cpu_ms_per_request"]  # CPU-ms per second
        db_cpu = rps * h["db_cpu_ms_per_request"]
        reads = rps
        read_cpu = reads * read10["cpu_ms_per_read"]
        read_db = reads * read10["db_cpu_ms_per_read"]
        inst_cpu = max(1, math.ceil(hb_cpu / (1000 * CLOUD_RUN_TARGET_CPU)))
        inst_conc = max(1, math.ceil(rps * p99 / CLOUD_RUN_CONCURRENCY))
        inst_read = max(1, math.ceil(read_cpu / (1000 * CLOUD_RUN_TARGET_CPU)))
        db_cores = (db_cpu + read_db) / 1000
        rows.append([f"{n:,}", f"{rps:,.1f}", f"{rps * per.get('xact', 0):,.1f}", f"{rps * rows_per_beat:,.1f}",
                     f"{rps * rows_per_beat_o:,.0f} / {rps * per_o.get('xact', 0):,.0f}",
                     f"{hb_cpu / 1000:.2f}", f"{max(inst_cpu, inst_conc)}", f"{read_cpu / 1000:.2f} ({inst_read})",
                     f"{db_cpu / 1000:.2f} + {read_db / 1000:.2f} = {db_cores:.2f}", _supabase_size(db_cores)])
    lines.append(table(["toolboxes", "heartbeats/s", "DB transactions/s (ingest)", "rows written/s (ingest)",
                        "original: rows/s / transactions/s", "ingest vCPU busy", "dtma_heartbeat_ingest instances",
                        "mcp_status vCPU busy (instances)", "database cores busy (ingest + polls)",
                        "Supabase compute"], rows))
    lines += ["", "How the columns are derived:", "",
              "* vCPU busy = requests/s x measured CPU-ms per request / 1000. Cloud Run instances = that divided by "
              f"{CLOUD_RUN_TARGET_CPU:.0%} (Cloud Run adds instances before one passes about 60% CPU), at least the "
              f"in-flight requests (requests/s x p99 latency) / concurrency {CLOUD_RUN_CONCURRENCY}, rounded up; "
              "instances are 1 vCPU, concurrency 40 (deploy.sh defaults). One gunicorn worker uses one core, which "
              "is what a 1 vCPU instance has. The heartbeat's p99 here includes queueing behind the load generator "
              "on shared cores; with a database elsewhere it is a few ms, and concurrency never binds first.",
              "* Database cores = heartbeats/s x database CPU-ms per beat + polls/s x database CPU-ms per poll, on "
              "this machine's cores (a Supabase vCPU may be slower; keep the busy share under ~50% for headroom, "
              "autovacuum and Realtime). Connections: instances x DB_POOL_MAX_SIZE (4) through the transaction "
              "pooler.",
              ("* Rows written/s is WAL and Realtime volume: the toolbox row per beat only. Instance rows and events "
               "appear only when a container actually changes, so Realtime subscribers are not woken every minute "
               "per server." if quiet else
               f"* Rows written/s is WAL and Realtime volume: {rows_per_beat:.1f} rows per beat, the toolbox row and "
               f"every instance it reports ({_instance_rows_note(per)}), so a Realtime subscriber to "
               "account_tool_instances is woken for every server every minute."), "",
              "At 100,000 toolboxes the ingest needs a handful of 1 vCPU instances; the database, not the functions, "
              "is the resource to size; per heartbeat it runs "
              f"{_fewer(per_o.get('xact', 0), per.get('xact', 0), 'transactions')}, with "
              f"{_fewer(rows_per_beat_o, rows_per_beat, 'rows written')}, and spends "
              f"{_ratio(o['db_cpu_ms_per_request'], h['db_cpu_ms_per_request'])} less database CPU than the "
              "original's pattern.", ""]
    return "\n".join(lines)


def _per_vcpu_lines(hb: dict[str, Any]) -> list[str]:
    """Toolboxes one database vCPU carries at one beat a minute, from the steady-state database CPU per beat."""
    s, q = hb["summary"], hb["sequential"]
    conc = max(c for c in s["heartbeat"] if c.isdigit())
    figures = {"back to back": q["direct"]["back_to_back"]["db_cpu_ms"],
               "one at a time": q["heartbeat_steady"]["db_cpu_ms"],
               "under load": s["heartbeat"][conc]["db_cpu_ms_per_request"],
               "every beat a change": q["heartbeat_changed"]["db_cpu_ms"]}
    parts = [f"{60_000 / ms:,.0f} {label} ({ms:.2f} ms per beat)" for label, ms in figures.items() if ms]
    return ["", "**Toolboxes per database vCPU at 60 s beats** (steady state unless said, the vCPU fully busy; "
            "halve for headroom): " + "; ".join(parts) + ". The original's pattern: "
            f"{60_000 / s['original'][conc]['db_cpu_ms_per_request']:,.0f}. The table below uses the figure under "
            "load, the conservative one (these two cores are shared by the load generator, the function and "
            "PostgreSQL).", ""]


def _supabase_size(cores: float) -> str:
    # Supabase compute add-ons (vCPU count; Micro..Large are 2-core ARM, shared below Large). The rule: keep
    # the measured busy share under half of the cores.
    for name, vcpu in (("Micro/Small (2-core shared)", 2 * 0.25), ("Large (2-core dedicated)", 2),
                       ("XL (4-core)", 4), ("2XL (8-core)", 8), ("4XL (16-core)", 16)):
        if cores <= vcpu / 2:
            return name
    return "8XL or larger (32+ cores)"


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    print("$ " + " ".join(shlex.quote(a) for a in ["python", "-m", "bench", *sys.argv[1:]]), flush=True)
    main()
