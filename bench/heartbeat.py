"""Benchmark of dtma_heartbeat_ingest (not a test).

    python -m bench.heartbeat [--toolboxes 5000] [--load-toolboxes 256] [--duration 4] [--runs 3]

An embedded PostgreSQL is seeded with `--toolboxes` toolboxes of 20 running MCP servers each
(100,000 instances by default). Heartbeats in the real DTMA's format (20 Docker container
summaries each, all managed, ~6 KB) are posted by `--load-toolboxes` distinct agents, so
concurrent requests do not queue on one toolbox's row lock, at concurrency 8 and 32, against:

* `dtma_heartbeat_ingest`, served the production way (functions-framework / gunicorn);
* the no-op floor (bench/noop), served the same way;
* a replay of the original's access pattern (bench/original_pattern.py: 1 SELECT + 1 UPDATE +
  N UPDATEs, N = 20, instance-format items), served the same way, against the same database.

Each target is started fresh for each of `--runs` rounds (1 s warm-up, then `--duration` s per
concurrency); figures are medians over rounds. Per round it also records the CPU time of the
function's process tree and of all PostgreSQL processes, and the transactions and tuples written
(pg_stat_database / pg_stat_user_tables deltas, read after the server has stopped so every backend
has flushed its statistics), each divided by the requests served.

Also: EXPLAIN (ANALYZE, BUFFERS) of cp_ingest_heartbeat's statements at this fleet size, and a
CPU profile of the function's worker under load (py-spy when installed, else pyinstrument in
process).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import (
    ROOT,
    Postgres,
    Req,
    function_env,
    median,
    ratio,
    run_load,
    serving,
    table,
    written,
)

PER_TOOLBOX = 20
FUNCTION = "dtma_heartbeat_ingest"
TARGETS = ("heartbeat", "noop", "original")

SEED = """
insert into auth.users (id, email)
select ('00000000-0000-4000-8000-' || lpad(to_hex(u), 12, '0'))::uuid, 'hb' || u || '@bench.test'
  from generate_series(0, %(users)s - 1) u;

insert into public.account_tool_environments
  (id, user_id, name, status, public_ip_address, region_slug, size_slug, dtma_token_sha256,
   last_heartbeat_at, status_changed_at)
select ('00000000-0000-4000-9000-' || lpad(to_hex(n), 12, '0'))::uuid,
       ('00000000-0000-4000-8000-' || lpad(to_hex(n / 10), 12, '0'))::uuid,
       'toolbox-' || n, 'active', ('203.0.' || (n / 256 %% 256) || '.' || (n %% 256))::inet, 'nyc3', 's-1vcpu-2gb',
       sha256(convert_to('bench-toolbox-token-' || n, 'UTF8')), now() - make_interval(secs => n %% 60),
       now() - interval '1 hour'
  from generate_series(0, %(toolboxes)s - 1) n;

insert into public.account_tool_instances
  (id, account_tool_environment_id, tool_catalog_id, status_on_toolbox, instance_name_on_toolbox,
   host_port, container_port, docker_image_url, mcp_server_type, mcp_transport_type, mcp_endpoint_path,
   status_changed_at, created_at)
select ('00000000-0000-4000-a000-' || lpad(to_hex(n * %(per)s + k), 12, '0'))::uuid,
       ('00000000-0000-4000-9000-' || lpad(to_hex(n), 12, '0'))::uuid,
       '00000000-0000-0000-0000-000000000001', 'running', 'srv-' || k, 49152 + k, 8080,
       'mcp/everything:latest', 'mcp_server', 'streamable_http', '/mcp',
       now() - interval '2 hours', now() - interval '1 day' + make_interval(secs => n * %(per)s + k)
  from generate_series(0, %(toolboxes)s - 1) n, generate_series(0, %(per)s - 1) k;
"""


def token(n: int) -> str:
    return f"bench-toolbox-token-{n}"


def instance_id(n: int, k: int) -> str:
    return f"00000000-0000-4000-a000-{n * PER_TOOLBOX + k:012x}"


def seed(pg: Postgres, toolboxes: int) -> None:
    started = time.perf_counter()
    with pg.connect() as conn:
        params = {"users": (toolboxes + 9) // 10, "toolboxes": toolboxes, "per": PER_TOOLBOX}
        for statement in SEED.split(";\n\n"):
            conn.execute(statement, params)
        conn.execute("vacuum analyze")
    print(f"seeded {toolboxes:,} toolboxes x {PER_TOOLBOX} instances in {time.perf_counter() - started:.1f} s")


def system_status() -> dict[str, Any]:
    from devstack.dtma_standin.report import system_status as standin_status

    return standin_status(PER_TOOLBOX)


def container_body(n: int) -> str:
    """What the real DTMA posts: every container as a snake_cased Docker summary (docs/real-agent.md)."""
    items = []
    for k in range(PER_TOOLBOX):
        cid = hashlib.sha256(f"{n}/{k}".encode()).hexdigest()
        items.append({"id": cid, "names": [f"srv-{k}"], "image": "mcp/everything:latest",
                      "image_id": "sha256:" + hashlib.sha256(b"image").hexdigest(),
                      "command": "docker-entrypoint.sh node dist/index.js streamableHttp",
                      "created": int(time.time()) - 3600 + k, "state": "running", "status": f"Up {5 + k % 3} minutes",
                      "ports": [{"ip": "0.0.0.0", "private_port": 8080, "public_port": 49152 + k,
                                 "type": "tcp"}]})
    return json.dumps({"dtma_version": "0.1.0", "system_status": system_status(), "tool_statuses": items},
                      separators=(",", ":"))


def instance_body(n: int) -> str:
    """The instance format, the only one the original understood, with the same item count."""
    items = [{"account_tool_instance_id": instance_id(n, k), "instance_name_on_toolbox": f"srv-{k}",
              "status_on_toolbox": "running",
              "runtime_details": {"state": "running", "image": "mcp/everything:latest",
                                  "ports": [{"private_port": 8080, "public_port": 49152 + k, "type": "tcp"}]}}
             for k in range(PER_TOOLBOX)]
    return json.dumps({"dtma_version": "0.1.0", "system_status": system_status(), "tool_statuses": items},
                      separators=(",", ":"))


def requests_for(target: str, load_toolboxes: int) -> list[Req]:
    if target == "noop":
        return [Req("POST", "/heartbeat", {"Authorization": f"Bearer {token(n)}", "Content-Type": "application/json"},
                    container_body(n)) for n in range(min(load_toolboxes, 16))]
    # The replay writes every instance row on every beat (that is the pattern); it gets toolboxes of its
    # own so that the ingest's toolboxes stay in steady state between rounds.
    body = container_body if target == "heartbeat" else instance_body
    first = 0 if target == "heartbeat" else load_toolboxes
    return [Req("POST", "/heartbeat", {"Authorization": f"Bearer {token(n)}", "Content-Type": "application/json"},
                body(n)) for n in range(first, first + load_toolboxes)]


def serve_args(target: str, pg: Postgres) -> dict[str, Any]:
    env = function_env(pg.uri)
    if target == "heartbeat":
        return {"function": FUNCTION, "env": env}
    if target == "original":
        return {"function": "heartbeat", "env": env, "source": ROOT / "bench" / "original_pattern.py"}
    return {"function": "noop", "env": env}


def warm(pg: Postgres, load_toolboxes: int) -> None:
    """Two beats per loaded toolbox, so the measured beats are steady state: the first binds the containers
    (a change), the second changes nothing and stores the digest the next ones match."""
    from bench.common import sequential_latencies

    with serving(**serve_args("heartbeat", pg)) as server:
        _, statuses = sequential_latencies(server, requests_for("heartbeat", load_toolboxes), 2 * load_toolboxes)
    assert statuses == {"204": 2 * load_toolboxes}, statuses


def round_for(target: str, pg: Postgres, reqs: list[Req], duration: float, concurrencies: tuple[int, ...]
              ) -> dict[str, Any]:
    before = pg.counters()
    results: dict[str, Any] = {}
    total = 0
    with serving(**serve_args(target, pg)) as server:
        for c in concurrencies:
            warm_up = run_load(server.url, reqs, c, 1)
            cpu0, db0 = server.cpu_seconds(), pg.cpu_seconds()
            result = run_load(server.url, reqs, c, duration)
            cpu1, db1 = server.cpu_seconds(), pg.cpu_seconds()
            total += warm_up.requests + result.requests
            expected = "204"
            bad = {k: v for k, v in result.statuses.items() if k != expected}
            if bad or result.errors:
                raise RuntimeError(f"{target} c={c}: unexpected answers {result.statuses}, errors {result.errors}: "
                                   f"{server.log_tail()}")
            results[str(c)] = {**result.as_dict(), "cpu_ms_per_request": (cpu1 - cpu0) * 1000 / result.requests,
                               "db_cpu_ms_per_request": (db1 - db0) * 1000 / result.requests}
    pg.wait_idle()
    delta = written(before, pg.counters())
    results["per_request"] = {k: v / total for k, v in delta.items()}
    results["requests_total"] = total
    return results


def changed_requests(load_toolboxes: int, rounds: int) -> list[Req]:
    """Beats that each change something: every container's image alternates between two tags, so each
    beat rewrites the toolbox's 20 instance rows (their runtime) and takes the full path. Ends on the
    steady body, so the toolboxes are steady again afterwards."""
    plain = requests_for("heartbeat", load_toolboxes)
    other = [Req(r.method, r.path, r.headers, r.body.replace('"mcp/everything:latest"', '"mcp/everything:next"'))
             for r in plain]
    return [req for k in range(rounds) for req in (other if k % 2 == 0 else plain)]


def client_backends_cpu(pg: Postgres, pids: set[int] | None = None) -> tuple[float, set[int]]:
    """CPU seconds of the database's client backends (the ones serving the function's pool), and their pids.
    Pass the pids of an earlier reading so that backends opened since are counted from zero."""
    from bench.common import process_cpu

    with pg.connect() as conn:
        current = {row[0] for row in conn.execute(
            "select pid from pg_stat_activity where backend_type = 'client backend' and pid <> pg_backend_pid()")}
    both = current | (pids or set())
    return sum(process_cpu(pid) for pid in both), both


def direct_cost(pg: Postgres, load_toolboxes: int, calls: int = 3000, paused: int = 1000, pause_s: float = 0.002
                ) -> dict[str, Any]:
    """PostgreSQL CPU per steady-state cp_ingest_heartbeat called straight from one connection configured like
    the function's (autocommit, no prepared statements): back to back, as a connection of a busy pool or
    pooler runs them, and with a pause between calls, as one agent at a time arrives here. The serving
    backend's CPU (/proc) and every PostgreSQL process's, divided by the calls."""
    import time as clock

    from psycopg.types.json import Jsonb

    from bench.common import process_cpu
    from shared.usecases.reports import build_report

    beats = [(hashlib.sha256(token(n).encode()).hexdigest(), build_report(json.loads(container_body(n))).params(150))
             for n in range(load_toolboxes)]
    query = ("select public.cp_ingest_heartbeat(p_token_sha256 => %s, p_report => %s, p_digest => %s, "
             "p_live => %s, p_stale_after_seconds => %s)")
    out: dict[str, Any] = {}
    with pg.connect(prepare_threshold=None) as conn:
        pid = conn.execute("select pg_backend_pid()").fetchone()[0]

        def run(count: int, pause: float, check: bool = True) -> dict[str, float]:
            backend0, all0 = process_cpu(pid), pg.cpu_seconds()
            for i in range(count):
                digest, params = beats[i % len(beats)]
                result = conn.execute(query, (digest, params["p_report"], params["p_digest"], Jsonb(params["p_live"]),
                                              params["p_stale_after_seconds"])).fetchone()[0]
                if check and not result.get("steady"):
                    raise RuntimeError(f"not a steady beat: {result}")
                if pause:
                    clock.sleep(pause)
            return {"calls": count, "backend_cpu_ms": (process_cpu(pid) - backend0) * 1000 / count,
                    "db_cpu_ms": (pg.cpu_seconds() - all0) * 1000 / count}

        run(2 * len(beats), 0, check=False)  # the first beat after sequential_cost's changes applies them
        out["back_to_back"] = run(calls, 0)
        out["paused"] = {**run(paused, pause_s), "pause_ms": pause_s * 1000}
    return out


def sequential_cost(pg: Postgres, load_toolboxes: int, beats: int = 3000, changed_rounds: int = 4
                    ) -> dict[str, Any]:
    """CPU per request one request at a time on one keep-alive connection: the function's process tree
    and every PostgreSQL process, divided by the requests served. Without concurrency no core is shared
    with a queue of waiting requests, so these are the figures that transfer (the capacity model's)."""
    from bench.common import sequential_latencies

    out: dict[str, Any] = {}
    steady = requests_for("heartbeat", load_toolboxes)
    for target in ("noop", "heartbeat"):
        reqs = requests_for("noop", load_toolboxes) if target == "noop" else steady
        with serving(**serve_args(target, pg)) as server:
            sequential_latencies(server, reqs, 2 * len(reqs))  # pool open, reports built, toolboxes steady
            cases = [("steady", reqs, beats)]
            if target == "heartbeat":
                changed = changed_requests(load_toolboxes, changed_rounds)
                cases.append(("changed", changed, len(changed)))
            for case, case_reqs, count in cases:
                backend0, pids = client_backends_cpu(pg)
                cpu0, db0 = server.cpu_seconds(), pg.cpu_seconds()
                latencies, statuses = sequential_latencies(server, case_reqs, count)
                cpu1, db1 = server.cpu_seconds(), pg.cpu_seconds()
                backend1, _ = client_backends_cpu(pg, pids)
                if statuses != {"204": count}:
                    raise RuntimeError(f"{target} {case}: {statuses}: {server.log_tail()}")
                out[f"{target}_{case}"] = {
                    "requests": count, "cpu_ms": (cpu1 - cpu0) * 1000 / count, "db_cpu_ms": (db1 - db0) * 1000 / count,
                    "backend_cpu_ms": (backend1 - backend0) * 1000 / count, "p50_ms": median(latencies) * 1000}
    return out


def explain(pg: Postgres) -> list[dict[str, Any]]:
    """Plans of cp_ingest_heartbeat's statements (0012) for one steady-state beat, at this fleet size.
    Generic plans (what PL/pgSQL settles on); each statement is rolled back."""
    from shared.usecases.reports import build_report

    n = 7
    report = build_report(json.loads(container_body(n)))
    params = report.params(210)
    digest = hashlib.sha256(token(n).encode()).hexdigest()
    statements = {
        "steady path, one UPDATE: toolbox by token digest, digest and row-version token checked, liveness written": (
            "(text, bytea, jsonb)",
            """with previous as (
                 select e.id, e.last_heartbeat_at from public.account_tool_environments e
                  where e.dtma_token_sha256 = decode($1, 'hex'))
               update public.account_tool_environments e
                  set last_heartbeat_at = now(), updated_at = now(), dtma_health_details_json = $3
                 from previous
                where e.id = previous.id and e.status = 'active' and e.dtma_report_digest = $2
                  and e.dtma_report_instances = (
                    select count(*)::text || ':' || coalesce(bit_xor(uuid_hash_extended(
                             i.id, i.xmin::text::int8)), 0)::text
                      from public.account_tool_instances i where i.account_tool_environment_id = e.id)
               returning e.id, previous.last_heartbeat_at""",
            (digest, bytes.fromhex(params["p_digest"]), json.dumps(params["p_live"]["system_status"]))),
        "full path: lock the toolbox by token digest": (
            "(text)", "select * from public.account_tool_environments where dtma_token_sha256 = decode($1, 'hex') "
                      "for no key update", (digest,)),
        "whole call: select cp_ingest_heartbeat(...)": (
            "(text, text, text, jsonb, int)", "select public.cp_ingest_heartbeat($1, $2, $3, $4, $5)",
            (digest, params["p_report"], params["p_digest"], json.dumps(params["p_live"]), 210)),
    }
    from psycopg import sql

    box = f"00000000-0000-4000-9000-{n:012x}"
    out = []
    with pg.connect() as conn:
        conn.execute("set plan_cache_mode = force_generic_plan")
        for number, (label, (types, statement, args)) in enumerate(statements.items()):
            if args is None:
                args = (box,)
            conn.execute("begin")
            conn.execute(f"prepare h{number} {types} as {statement}")
            literals = sql.SQL(", ").join(sql.Literal(a) for a in args)
            plan = [r[0] for r in conn.execute(sql.SQL("explain (analyze, buffers, costs off) execute {}({})").format(
                sql.Identifier(f"h{number}"), literals))]
            conn.execute("rollback")
            seq = [line.strip() for line in plan if "Seq Scan" in line and "account_tool" in line]
            out.append({"label": label, "plan": plan, "seq_scans": seq,
                        "execution": next((p.strip() for p in plan if p.strip().startswith("Execution")), "")})
    return out


def profile(pg: Postgres, load_toolboxes: int, seconds: float = 4.0) -> dict[str, Any]:
    """Where the worker's CPU goes under load: py-spy on the gunicorn worker (sampling, on-CPU only)."""
    spy = shutil.which("py-spy") or (str(Path(sys.executable).parent / "py-spy")
                                      if (Path(sys.executable).parent / "py-spy").exists() else None)
    if not spy:
        return {"tool": None, "note": "py-spy not installed; profile skipped"}
    reqs = requests_for("heartbeat", load_toolboxes)
    with serving(**serve_args("heartbeat", pg)) as server, tempfile.TemporaryDirectory() as tmp:
        run_load(server.url, reqs, 32, 1)
        worker = server.worker_pids()[0]
        out = Path(tmp) / "profile.txt"
        spy_proc = subprocess.Popen([spy, "record", "-p", str(worker), "-d", str(int(seconds)), "-r", "200",
                                     "-f", "raw", "-o", str(out), "--nonblocking", "--gil"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        run_load(server.url, reqs, 32, seconds + 1)
        spy_proc.wait(30)
        if not out.exists():
            return {"tool": "py-spy", "note": "py-spy produced no profile (ptrace not permitted?)"}
        return summarise_stacks(out.read_text())


# A sample belongs to the first bucket (in this order) that any of its frames matches: e.g. the
# json.dumps of the report runs under psycopg's adapter, so it counts as psycopg, not as parsing.
BUCKETS = (
    ("logging (RedactingFilter, formatting, write)", ("logging/", "shared/adapters/logging.py")),
    ("psycopg and the pool: adapt the parameters, send, wait, load the result", ("psycopg",)),
    ("body read and JSON parse with the duplicate-key and depth checks (shared/adapters/http.py)",
     ("read_body", "decode_json", "_fast_loads", "parse_json", "_no_duplicates", "_depth")),
    ("pydantic validation (shared/usecases/reports.py models)", ("pydantic",)),
    ("report key, reuse and building (shared/usecases/reports.py, shared/core/lifecycle.py)",
     ("shared/usecases/reports.py", "shared/core/lifecycle.py")),
    ("the rest of the handler (token digest, recent tokens and reports; shared/usecases/heartbeat.py)",
     ("shared/usecases/heartbeat.py",)),
    ("flask/werkzeug request and response, shared/adapters/http.py serve",
     ("werkzeug", "flask/", "shared/adapters/http.py")),
    ("gunicorn (accept, parse HTTP, write)", ("gunicorn",)),
)


def summarise_stacks(raw: str) -> dict[str, Any]:
    """Collapsed stacks ("a;b;c N") -> share of samples per bucket and the top self frames."""
    buckets: Counter[str] = Counter()
    selfs: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        if frames and frames[0].startswith("process"):
            frames = frames[1:]
        total += n
        selfs[frames[-1].split(" (")[0] + " (" + frames[-1].split(" (")[-1] if frames else "?"] += n
        for name, needles in BUCKETS:
            if any(any(needle in frame for needle in needles) for frame in frames):
                buckets[name] += n
                break
        else:
            buckets["other (threading, selectors, stdlib)"] += n
    return {"tool": "py-spy", "samples": total,
            "buckets": [(k, v / total) for k, v in buckets.most_common()] if total else [],
            "top_self": [(k, v / total) for k, v in selfs.most_common(12)] if total else []}


def run(toolboxes: int = 5000, load_toolboxes: int = 256, duration: float = 4.0, runs: int = 3,
        concurrencies: tuple[int, ...] = (8, 32), with_profile: bool = True) -> dict[str, Any]:
    toolboxes = max(toolboxes, 2 * load_toolboxes)
    with Postgres() as pg:
        seed(pg, toolboxes)
        warm(pg, load_toolboxes)
        plans = explain(pg)
        rounds: dict[str, list[dict[str, Any]]] = {t: [] for t in TARGETS}
        for r in range(runs):
            for target in TARGETS:
                reqs = requests_for(target, load_toolboxes)
                rounds[target].append(round_for(target, pg, reqs, duration, concurrencies))
                c = {k: round(v["rps"]) for k, v in rounds[target][-1].items() if k.isdigit()}
                print(f"round {r + 1}/{runs} {target}: {c} req/s", flush=True)
        sequential = sequential_cost(pg, load_toolboxes)
        print("one at a time: " + ", ".join(f"{k} {v['cpu_ms']:.2f} ms + PostgreSQL {v['db_cpu_ms']:.2f} ms "
                                            f"(serving backend {v['backend_cpu_ms']:.2f} ms)"
                                            for k, v in sequential.items()), flush=True)
        sequential["direct"] = direct_cost(pg, load_toolboxes)
        print(f"cp_ingest_heartbeat called directly: {sequential['direct']}", flush=True)
        prof = profile(pg, load_toolboxes) if with_profile else {"tool": None, "note": "skipped"}
        version = pg.version()
    summary = summarise(rounds, concurrencies)
    return {"summary": summary, "sequential": sequential, "rounds": rounds, "explain": plans, "profile": prof,
            "postgres": version,
            "params": {"toolboxes": toolboxes, "instances": toolboxes * PER_TOOLBOX, "per_toolbox": PER_TOOLBOX,
                       "load_toolboxes": load_toolboxes, "duration": duration, "runs": runs}}


def summarise(rounds: dict[str, list[dict[str, Any]]], concurrencies: tuple[int, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for target, items in rounds.items():
        per_c = {}
        for c in concurrencies:
            key = str(c)
            per_c[key] = {m: median([it[key][m] for it in items])
                          for m in ("rps", "p50_ms", "p99_ms", "cpu_ms_per_request", "db_cpu_ms_per_request")}
        keys = set().union(*(it["per_request"].keys() for it in items))
        per_c["per_request"] = {k: median([it["per_request"].get(k, 0.0) for it in items]) for k in sorted(keys)}
        out[target] = per_c
    return out


def report_lines(result: dict[str, Any]) -> list[str]:
    s = result["summary"]
    lines = []
    rows = []
    for c in (k for k in s["heartbeat"] if k.isdigit()):
        hb, noop, orig = s["heartbeat"][c], s["noop"][c], s["original"][c]
        rows.append([c, f"{hb['rps']:,.0f}", f"{hb['p50_ms']:.2f} / {hb['p99_ms']:.2f}",
                     f"{noop['rps']:,.0f}", f"{noop['p50_ms']:.2f} / {noop['p99_ms']:.2f}",
                     f"**{hb['rps'] / noop['rps']:.0%}**",
                     f"{orig['rps']:,.0f}", f"{orig['p50_ms']:.2f} / {orig['p99_ms']:.2f}",
                     f"**{ratio(hb['rps'], orig['rps'])}**"])
    lines.append(table(["concurrency", "ingest hb/s", "ingest p50 / p99 ms", "no-op req/s", "no-op p50 / p99 ms",
                        "ingest / no-op (report)", "original pattern hb/s", "original p50 / p99 ms",
                        "ingest / original (target >= 5x)"], rows))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--toolboxes", type=int, default=5000)
    parser.add_argument("--load-toolboxes", type=int, default=256)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args()
    result = run(args.toolboxes, args.load_toolboxes, args.duration, args.runs, with_profile=not args.no_profile)
    print("\n".join(report_lines(result)))
    print(json.dumps(result["summary"], indent=1))
    for plan in result["explain"]:
        seq = "SEQ SCAN " + "; ".join(plan["seq_scans"]) if plan["seq_scans"] else ""
        print(f"-- {plan['label']}: {plan['execution']} {seq}")
    print(json.dumps(result["profile"], indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    main()
