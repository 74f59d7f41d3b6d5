"""Benchmark of the operations report and of history retention at fleet scale (not a test).

    python -m bench.operations [--toolboxes 10000] [--per-toolbox 10] [--runs 21]

Seeds an embedded PostgreSQL (fresh, deleted afterwards) with set-based SQL: 10,000 toolboxes,
100,000 MCP server instances deployed evenly over the last 35 days (one deploy each; 90%
reached `running` 3-120 s after the request, the rest failed for the reasons the worker and the
sweep record: pull denied, exited at once, port taken, agent unreachable, deadline, a heartbeat
saw it fail; the newest 5 still deploying), 10 events per instance (1,000,000) and 3 commands
per instance (deploy, stop, start: 300,000) each with its `outcome->'agent_calls'`. Then prints:

* `cp_operations_report` for the last 24 h in hourly buckets (~2,900 deploys, ~17,000 finished
  commands, ~27,000 agent calls in the window): median and max of --runs calls, on one
  connection, next to the floor (`select 1` on the same connection, same run), the backend's own
  CPU time per report (the scheduler's accounting: what the figure costs when nothing else runs
  on the cores), and the same through the production `postgres` transport
  (PostgresDatabase.call: JSON decoded into Python); verdict against the target (< 50 ms);
* EXPLAIN (ANALYZE, BUFFERS) of the report's statement, read from the function's own body in
  pg_proc and prepared with plan_cache_mode=force_generic_plan (the plan PL/pgSQL settles on);
  a Seq Scan on a big table (instances, events, commands, agent calls) is flagged;
* one `cp_prune_history(30, 30, 20, 5000)` batch (the sweep's call each minute), rolled back so
  each run does the same work: 5,000 finished commands deleted, 5,000 old events examined (all
  kept: the newest 20 of existing servers; the worst case for the walk). Median of --runs / 3.

Every figure is printed next to the statement that produced it.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import tempfile
import time
from typing import Any

os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.gettempdir())
os.environ.setdefault("NO_GCE_CHECK", "true")

import psycopg

from devstack import embedded_pg
from ops.migrate import migrate

TARGET_MS = 50.0
DAYS = 35
# A Seq Scan on these is flagged. Not on account_tool_environments: the liveness figures read every live
# toolbox (10,000 rows), and a sequential scan is the right plan for that.
BIG_TABLES = ("account_tool_instances", "account_tool_instance_events", "dtma_commands", "agent_calls")
REPORT_SQL = "select public.cp_operations_report(now() - interval '24 hours', now(), 3600, 210)"
PRUNE_SQL = "select public.cp_prune_history(30, 30, 20, 5000)"

# g: instance number 0..N-1; toolbox g / per. Deploy times spread evenly over DAYS, newest ~now.
# h = g * 7919 % 1000 picks the outcome (7919 is prime, so the classes interleave evenly):
#   < 900 running (via the agent's answer, or a heartbeat when h % 3 = 0), 900-939 image_pull_failed,
#   940-959 container_exited, 960-969 host_port_taken, 970-979 toolbox_unreachable,
#   980-989 deadline (the sweep), 990-999 a heartbeat saw it fail; the newest 5 are still deploying.
SEED = """
insert into auth.users (id, email)
select ('00000000-0000-4000-8000-' || lpad(to_hex(u), 12, '0'))::uuid, 'user' || u || '@bench.test'
  from generate_series(0, %(users)s - 1) u;

-- 1 in 100 unresponsive, 1 in 200 awaiting its first heartbeat, 1 in 100 of the active silent for
-- 5-15 min (late: the sweep has not marked it yet); the rest beat within the last minute.
insert into public.account_tool_environments
  (id, user_id, name, status, public_ip_address, region_slug, size_slug, dtma_token_sha256,
   last_heartbeat_at, status_changed_at)
select ('00000000-0000-4000-9000-' || lpad(to_hex(n), 12, '0'))::uuid,
       ('00000000-0000-4000-8000-' || lpad(to_hex(n / 10), 12, '0'))::uuid,
       'toolbox-' || n,
       (case when n %% 100 = 7 then 'unresponsive' when n %% 200 = 13 then 'awaiting_heartbeat' else 'active' end)
         ::public.account_tool_environment_status_enum,
       ('203.0.' || (n / 256 %% 256) || '.' || (n %% 256))::inet, 'nyc3', 's-1vcpu-2gb',
       sha256(('token-' || n)::bytea),
       case when n %% 200 = 13 then null
            when n %% 100 = 7 then now() - interval '2 hours'
            when n %% 100 = 42 then now() - make_interval(secs => 300 + n %% 600)
            else now() - make_interval(secs => n %% 60) end,
       now() - interval '40 days'
  from generate_series(0, %(toolboxes)s - 1) n;

create temporary table plan on commit preserve rows as
select g, g / %(per)s as box, g %% %(per)s as k,
       ('00000000-0000-4000-a000-' || lpad(to_hex(g), 12, '0'))::uuid as id,
       ('00000000-0000-4000-9000-' || lpad(to_hex(g / %(per)s), 12, '0'))::uuid as box_id,
       now() - make_interval(secs => (%(n)s - g)::float8 * %(span)s / %(n)s) as c,
       case when g >= %(n)s - 5 then 'in_progress'
            when g * 7919 %% 1000 < 900 then 'running'
            when g * 7919 %% 1000 < 940 then 'image_pull_failed'
            when g * 7919 %% 1000 < 960 then 'container_exited'
            when g * 7919 %% 1000 < 970 then 'host_port_taken'
            when g * 7919 %% 1000 < 980 then 'toolbox_unreachable'
            when g * 7919 %% 1000 < 990 then 'deadline'
            else 'heartbeat_failed' end as fate,
       (3 + (g * 104729 %% 1170) / 10.0)::float8 as ttr,
       g * 7919 %% 3 = 0 as by_heartbeat,
       case when g * 7919 %% 1000 between 900 and 939 then 'ghcr.io/acme/private-' || g %% 7 || ':1.0'
            else 'mcp/server-' || g %% 50 || ':latest' end as image
  from generate_series(0::bigint, %(n)s - 1) g;

insert into public.account_tool_instances
  (id, account_tool_environment_id, tool_catalog_id, status_on_toolbox, instance_name_on_toolbox,
   host_port, container_port, docker_image_url, mcp_server_type, mcp_transport_type, mcp_endpoint_path,
   status_changed_at, created_at)
select p.id, p.box_id, '00000000-0000-0000-0000-000000000001',
       (case p.fate when 'running' then 'running' when 'in_progress' then 'deploying' else 'error' end)
         ::public.account_tool_installation_status_enum,
       'srv-' || p.k, 49152 + p.k, 8080, p.image, 'mcp_server', 'streamable_http', '/mcp',
       p.c + make_interval(secs => p.ttr), p.c
  from plan p;

-- 10 events per instance: the deploy's record and send, its outcome, then notes (readiness,
-- liveness) spread between the outcome and now.
insert into public.account_tool_instance_events
  (account_tool_instance_id, account_tool_environment_id, instance_name_on_toolbox, from_status, to_status,
   source, message, at)
select p.id, p.box_id, 'srv-' || p.k, e.f, e.t, e.src::public.instance_event_source_enum, e.msg, e.at
  from plan p
 cross join lateral (
   select null::public.account_tool_installation_status_enum as f,
          'pending_deploy'::public.account_tool_installation_status_enum as t, 'api' as src,
          'deploy of ' || p.image || ' requested' as msg, p.c as at, 1 as o
   union all
   select 'pending_deploy', 'deploying', 'api', 'asked the toolbox agent to pull ' || p.image, p.c, 2
   union all
   select 'deploying',
          (case when p.fate = 'running' then 'running' else 'error' end)::public.account_tool_installation_status_enum,
          case when p.fate = 'deadline' then 'sweep' when p.fate = 'heartbeat_failed' then 'heartbeat'
               when p.fate = 'running' and p.by_heartbeat then 'heartbeat' else 'api' end,
          case when p.fate = 'running' then 'container is running' else 'deploy failed: ' || p.fate end,
          p.c + make_interval(secs => case when p.fate = 'deadline' then 600 + p.ttr else p.ttr end), 3
    where p.fate <> 'in_progress'
   union all
   select s.st, s.st, 'api', 'MCP endpoint answers: 12 tools',
          p.c + make_interval(secs => p.ttr + j * extract(epoch from now() - p.c - make_interval(secs => p.ttr)) / 9),
          3 + j
     from generate_series(1, case when p.fate = 'in_progress' then 8 else 7 end) j,
          (select (case p.fate when 'running' then 'running' when 'in_progress' then 'deploying' else 'error' end)
                    ::public.account_tool_installation_status_enum as st) s
 ) e
 order by e.at, p.g, e.o;

-- 3 commands per instance, each with the agent calls it made: the deploy, a stop and a start.
insert into public.dtma_commands
  (id, account_tool_instance_id, account_tool_environment_id, action, expected_status, status, attempts,
   enqueued, enqueued_at, outcome, created_at, started_at, finished_at)
select ('00000000-0000-4000-c000-' || lpad(to_hex(p.g * 3 + x.n), 12, '0'))::uuid, p.id, p.box_id, x.action,
       x.expected::public.account_tool_installation_status_enum, x.status, 1, 1, x.created, x.outcome,
       x.created, x.created + interval '50 milliseconds', x.finished
  from plan p
 cross join lateral (
   select p.c + (now() - p.c) * 0.4 as stop_at, p.c + (now() - p.c) * 0.7 as start_at
 ) t
 cross join lateral (
   select 0 as n, 'deploy' as action, 'deploying' as expected, p.c as created,
          case when p.fate = 'in_progress' then 'running'
               when p.fate in ('toolbox_unreachable', 'deadline', 'heartbeat_failed') then 'failed' else 'done' end
            as status,
          case when p.fate = 'in_progress' then null
               when p.fate in ('deadline', 'heartbeat_failed') then p.c + interval '300 seconds'
               when p.fate = 'toolbox_unreachable' then p.c + interval '2 seconds'
               else p.c + make_interval(secs => p.ttr) end as finished,
          case when p.fate = 'in_progress' then null else jsonb_build_object(
            'http_status', case p.fate when 'running' then 201 when 'host_port_taken' then 409
                                       when 'deadline' then 202 when 'heartbeat_failed' then 202 else 502 end,
            'code', case p.fate when 'running' then 'created' when 'deadline' then 'accepted'
                                when 'heartbeat_failed' then 'accepted' else p.fate end,
            'message', 'bench',
            'agent_calls', jsonb_build_array(jsonb_build_object(
              'op', 'deploy',
              'ms', case p.fate when 'toolbox_unreachable' then 2000.0 when 'deadline' then 300000.0
                                when 'heartbeat_failed' then 300000.0 else round((p.ttr * 950)::numeric, 1) end,
              'result', case p.fate when 'running' then 'ok' when 'container_exited' then 'ok'
                                    when 'toolbox_unreachable' then 'unreachable' when 'deadline' then 'timeout'
                                    when 'heartbeat_failed' then 'timeout' else 'rejected' end,
              'status', case p.fate when 'running' then 201 when 'container_exited' then 201
                                    when 'toolbox_unreachable' then null when 'deadline' then null
                                    when 'heartbeat_failed' then null else 500 end)))
          end as outcome
   union all
   select 1, 'stop', 'stopping', t.stop_at, 'done', t.stop_at + interval '1 second',
          jsonb_build_object('http_status', 200, 'code', 'done', 'message', null, 'agent_calls', jsonb_build_array(
            jsonb_build_object('op', 'stop', 'ms', 150 + p.g %% 800 + (p.g %% 7) / 10.0, 'result', 'ok',
                               'status', 200)))
   union all
   select 2, 'start', 'starting', t.start_at, 'done', t.start_at + interval '1 second',
          jsonb_build_object('http_status', 200, 'code', 'done', 'message', null, 'agent_calls', jsonb_build_array(
            jsonb_build_object('op', 'start', 'ms', 80 + p.g %% 400 + (p.g %% 3) / 10.0,
                               'result', case when p.g %% 100 = 0 then 'rejected' else 'ok' end,
                               'status', case when p.g %% 100 = 0 then 500 else 200 end),
            jsonb_build_object('op', 'tools_status', 'ms', 4 + p.g %% 40 + (p.g %% 9) / 10.0,
                               'result', case when p.g %% 250 = 0 then 'timeout' else 'ok' end,
                               'status', case when p.g %% 250 = 0 then null else 200 end)))
 ) x
 order by x.created;

drop table plan
"""


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.2f} ms"


def seed(url: str, toolboxes: int, per: int) -> None:
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        params = {"users": (toolboxes + 9) // 10, "toolboxes": toolboxes, "per": per, "n": toolboxes * per,
                  "span": DAYS * 86_400}
        for statement in SEED.split(";\n\n"):
            conn.execute(statement, params)
        conn.execute("vacuum analyze")
        counts = conn.execute("""select (select count(*) from account_tool_environments),
                                        (select count(*) from account_tool_instances),
                                        (select count(*) from account_tool_instance_events),
                                        (select count(*) from dtma_commands)""").fetchone()
    print(f"seeded {counts[0]:,} toolboxes, {counts[1]:,} instances, {counts[2]:,} events, {counts[3]:,} commands "
          f"over {DAYS} days in {time.perf_counter() - started:.1f} s (set-based INSERT ... generate_series; "
          "VACUUM ANALYZE)")


def timed(conn: psycopg.Connection, statement: str, runs: int) -> tuple[list[float], Any]:
    samples, value = [], None
    for _ in range(runs):
        started = time.perf_counter()
        value = conn.execute(statement).fetchone()[0]
        samples.append(time.perf_counter() - started)
    return samples, value


def bench_report(url: str, runs: int) -> dict[str, Any]:
    from shared.adapters.db.postgres import PostgresDatabase

    print(f"\n== the operations report, last 24 h, hourly buckets ({runs} runs each, one connection)")
    from bench.common import threads_cpu

    with psycopg.connect(url, autocommit=True) as conn:
        backend = conn.execute("select pg_backend_pid()").fetchone()[0]
        timed(conn, REPORT_SQL, 2)  # warm: plan cache, buffers
        floor, _ = timed(conn, "select 1", runs)
        cpu_before = threads_cpu(backend)
        report_samples, report = timed(conn, REPORT_SQL, runs)
        cpu = (threads_cpu(backend) - cpu_before) / runs
    db = PostgresDatabase(url, max_size=1)
    try:
        db.call("cp_operations_report", p_since=None, p_until=None, p_bucket_seconds=3600, p_stale_after_seconds=210)
        app = []
        for _ in range(runs):
            started = time.perf_counter()
            db.call("cp_operations_report", p_since=None, p_until=None, p_bucket_seconds=3600,
                    p_stale_after_seconds=210)
            app.append(time.perf_counter() - started)
    finally:
        db.close()
    median = statistics.median(report_samples)
    d, a, t = report["deploys"], report["agent_calls"], report["toolboxes"]
    print(f"select 1   (floor, same connection)\n    median {ms(statistics.median(floor))}  max {ms(max(floor))}")
    print(f"{REPORT_SQL}\n    median {ms(median)}  max {ms(max(report_samples))}  (n={runs}); database CPU per "
          f"report {cpu * 1000:.2f} ms (the backend's own CPU time, from the scheduler: the cost without the "
          "other processes sharing these cores)")
    print(f"PostgresDatabase.call('cp_operations_report', p_since=None, p_until=None, p_bucket_seconds=3600, "
          f"p_stale_after_seconds=210)\n    median {ms(statistics.median(app))}  max {ms(max(app))}  (n={runs})")
    print(f"figures: {d['started']:,} deploys started, {d['succeeded']:,} succeeded, {d['failed']:,} failed, "
          f"{d['in_progress']} in progress, success rate {d['success_rate']}; failures {d['failures_by_reason']}; "
          f"time to running p50 {d['time_to_running']['p50_seconds']} s p95 {d['time_to_running']['p95_seconds']} s; "
          f"{a['commands']:,} commands with agent calls, ops {sorted(a['by_operation'])}; toolboxes "
          f"{t['active']:,} active, {t['unresponsive']} unresponsive, {t['late']} late, heartbeat age "
          f"p95 {t['heartbeat_age_seconds']['p95']} s; {len(report['series'])} buckets")
    verdict = "met" if median * 1000 < TARGET_MS else "NOT MET"
    print(f"verdict: report median {median * 1000:.1f} ms vs target < {TARGET_MS:.0f} ms: {verdict}")
    return {"report_ms": median * 1000, "floor_ms": statistics.median(floor) * 1000,
            "app_ms": statistics.median(app) * 1000, "cpu_ms": cpu * 1000}


def report_statement(conn: psycopg.Connection) -> str:
    """The report's one statement, from the function's body as installed, with its variables as
    parameters ($1 since, $2 until, $3 bucket seconds, $4 stale after seconds, $5 buckets; the one
    computed variable, v_late_before, as its expression)."""
    body = conn.execute("select prosrc from pg_proc where proname = 'cp_operations_report'").fetchone()[0]
    statement = body[body.index("  with settled as"):body.index(") into v_result;")] + ")"
    for name, param in (("v_since", "$1"), ("v_until", "$2"), ("p_bucket_seconds", "$3"),
                        ("v_late_before", "(now() - make_interval(secs => p_stale_after_seconds))"),
                        ("p_stale_after_seconds", "$4"), ("v_buckets", "$5")):
        statement = re.sub(rf"\b{name}\b", param, statement)
    return statement


def bench_explain(url: str) -> None:
    print("\n== EXPLAIN (ANALYZE, BUFFERS) of the report's statement (generic plan, as PL/pgSQL runs it)")
    with psycopg.connect(url) as conn:
        conn.execute("set plan_cache_mode = force_generic_plan")
        conn.execute(f"prepare report (timestamptz, timestamptz, int, int, int) as {report_statement(conn)}")
        plan = [r[0] for r in conn.execute(
            "explain (analyze, buffers, costs off) execute report(now() - interval '24 hours', now(), 3600, 210, 24)")]
        seq = [line.strip() for line in plan if "Seq Scan" in line and any(t in line for t in BIG_TABLES)]
        print(f"-- {plan[-1].strip()}{'  SEQ SCAN: ' + '; '.join(seq) if seq else ''}")
        for line in plan:
            if not line.strip().startswith(("Planning", "Execution")):
                print("   " + line)
        conn.rollback()


def bench_prune(url: str, runs: int) -> dict[str, Any]:
    print("\n== retention: one batch of the sweep's cp_prune_history (each run rolled back: the same work)")
    with psycopg.connect(url) as conn:
        samples, counts = [], {}
        for _ in range(runs):
            started = time.perf_counter()
            counts = conn.execute(PRUNE_SQL).fetchone()[0]
            samples.append(time.perf_counter() - started)
            conn.rollback()
    print(f"{PRUNE_SQL}\n    median {ms(statistics.median(samples))}  max {ms(max(samples))}  (n={runs}); {counts}")
    return {"prune_ms": statistics.median(samples), "prune": counts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--toolboxes", type=int, default=10_000)
    parser.add_argument("--per-toolbox", type=int, default=10)
    parser.add_argument("--runs", type=int, default=21)
    args = parser.parse_args()
    print(f"$ python -m bench.operations --toolboxes {args.toolboxes} --per-toolbox {args.per_toolbox} "
          f"--runs {args.runs}   ({os.cpu_count()} CPUs, embedded PostgreSQL 16)")
    server = embedded_pg.start(keep=False)
    try:
        migrate(server.uri)
        seed(server.uri, args.toolboxes, args.per_toolbox)
        bench_report(server.uri, args.runs)
        bench_explain(server.uri)
        bench_prune(server.uri, max(3, args.runs // 3))
    finally:
        from shared.adapters.db import close_all

        close_all()
        server.stop()


if __name__ == "__main__":
    main()
