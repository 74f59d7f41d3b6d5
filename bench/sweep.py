"""Benchmark of mcp_status_sweep and mcp_status at fleet scale (not a test).

    python -m bench.sweep [--toolboxes 10000] [--per-toolbox 10] [--runs 5]

Seeds an embedded PostgreSQL (fresh, deleted afterwards) with 10,000 toolboxes and 100,000 MCP
server instances (10 per toolbox, 100 per user, 3 events each) using set-based SQL, then prints:

* a sweep that changes ~10% of the fleet (1 toolbox in 10 silent -> unresponsive with an event
  per instance, 1% of instances past their deploy deadline, a few toolboxes past first-contact
  grace), once with the production batch size and once with a batch big enough to do it all in
  one call. Each run is rolled back, so every run sees the same work; median of --runs;
* a sweep that changes nothing (after the above is committed), median of --runs x 4;
* mcp_status list latency for a user with 100 servers (limit=100): the SQL function through the
  production `postgres` transport, and the whole function app (JWT check, parsing, rendering)
  through functions-framework's WSGI test client; p50/p99 of 300 reads each;
* EXPLAIN (ANALYZE, BUFFERS) of the sweep's main scans, as prepared statements with
  plan_cache_mode=force_generic_plan: the plan PL/pgSQL settles on after five calls. The
  predicates are copied from cp_sweep / cp_list_mcp_servers (sql/migrations/0007); keep them in
  step. A "Seq Scan" on a hot table is flagged.

Every figure is printed next to the statement or request that produced it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.gettempdir())
os.environ.setdefault("NO_GCE_CHECK", "true")

import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402

from devstack import embedded_pg  # noqa: E402
from ops.migrate import migrate  # noqa: E402

STALE, FIRST_CONTACT, DEPLOY, ACTION, GUARD = 210, 900, 600, 120, 0.5
JWT_SECRET = "bench-jwt-secret-that-is-at-least-32-bytes-long"

SEED = """
insert into auth.users (id, email)
select ('00000000-0000-4000-8000-' || lpad(to_hex(u), 12, '0'))::uuid, 'user' || u || '@bench.test'
  from generate_series(0, %(users)s - 1) u;

-- Toolbox n belongs to user n / 10. 1 in 10 is silent (last heartbeat 5-15 min ago); 1 in 200 is
-- still awaiting its first heartbeat an hour after provisioning; the rest beat within 60 s.
insert into public.account_tool_environments
  (id, user_id, name, status, public_ip_address, region_slug, size_slug, dtma_token_sha256,
   last_heartbeat_at, status_changed_at)
select ('00000000-0000-4000-9000-' || lpad(to_hex(n), 12, '0'))::uuid,
       ('00000000-0000-4000-8000-' || lpad(to_hex(n / 10), 12, '0'))::uuid,
       'toolbox-' || n,
       (case when n %% 200 = 7 then 'awaiting_heartbeat' else 'active' end)
         ::public.account_tool_environment_status_enum,
       ('203.0.' || (n / 256 %% 256) || '.' || (n %% 256))::inet, 'nyc3', 's-1vcpu-2gb',
       sha256(('token-' || n)::bytea),
       case when n %% 200 = 7 then null
            when n %% 10 = 3 then now() - make_interval(secs => 300 + n %% 600)
            else now() - make_interval(secs => n %% 60) end,
       now() - interval '1 hour'
  from generate_series(0, %(toolboxes)s - 1) n;

-- k instances per toolbox: running, except that on 1 toolbox in 10 the last one has been
-- deploying for 20 min (past the deadline) and on another 1 in 10 for 1 min (not yet).
insert into public.account_tool_instances
  (id, account_tool_environment_id, tool_catalog_id, status_on_toolbox, instance_name_on_toolbox,
   host_port, container_port, docker_image_url, mcp_server_type, mcp_transport_type, mcp_endpoint_path,
   status_changed_at, created_at)
select ('00000000-0000-4000-a000-' || lpad(to_hex(n * %(per)s + k), 12, '0'))::uuid,
       ('00000000-0000-4000-9000-' || lpad(to_hex(n), 12, '0'))::uuid,
       '00000000-0000-0000-0000-000000000001',
       (case when k = %(per)s - 1 and n %% 10 in (1, 2) then 'deploying' else 'running' end)
         ::public.account_tool_installation_status_enum,
       'srv-' || k, 49152 + k, 8080, 'mcp/everything:latest', 'mcp_server', 'streamable_http', '/mcp',
       case when k = %(per)s - 1 and n %% 10 = 1 then now() - interval '20 minutes'
            when k = %(per)s - 1 and n %% 10 = 2 then now() - interval '1 minute'
            else now() - interval '2 hours' end,
       now() - interval '1 day' + make_interval(secs => n * %(per)s + k)
  from generate_series(0, %(toolboxes)s - 1) n, generate_series(0, %(per)s - 1) k;

insert into public.account_tool_instance_events
  (account_tool_instance_id, account_tool_environment_id, instance_name_on_toolbox, from_status, to_status,
   source, message, at)
select i.id, i.account_tool_environment_id, i.instance_name_on_toolbox, s.f, s.t,
       s.src::public.instance_event_source_enum, s.msg, i.created_at + make_interval(secs => s.o)
  from public.account_tool_instances i,
       (values (1, null::public.account_tool_installation_status_enum,
                'pending_deploy'::public.account_tool_installation_status_enum, 'api', 'deploy recorded'),
               (2, 'pending_deploy', 'deploying', 'api', 'deploy sent to the toolbox DTMA'),
               (3, 'deploying', 'running', 'heartbeat', 'container is running')) s(o, f, t, src, msg);
"""

# The predicates of cp_sweep's and cp_list_mcp_servers' main statements, as prepared statements.
EXPLAINS: dict[str, tuple[str, str]] = {
    "guard: count silent active toolboxes": (
        "(timestamptz)",
        """select count(*) from public.account_tool_environments
            where status = 'active' and (last_heartbeat_at < $1
                  or (last_heartbeat_at is null and status_changed_at < $1))"""),
    "step 1: pick silent toolboxes (FOR UPDATE SKIP LOCKED)": (
        "(timestamptz, int)",
        """select e.id, coalesce(e.last_heartbeat_at, e.status_changed_at)
             from public.account_tool_environments e
            where e.status = 'active' and (e.last_heartbeat_at < $1
                  or (e.last_heartbeat_at is null and e.status_changed_at < $1))
            order by e.last_heartbeat_at nulls first, e.id limit $2 for update skip locked"""),
    "step 1: instances of the marked toolboxes (event insert)": (
        "(uuid[])",
        """select i.id from public.account_tool_instances i where i.account_tool_environment_id = any($1)"""),
    "step 2: pick toolboxes past first-contact grace": (
        "(int, int)",
        """select e.id from public.account_tool_environments e
            where e.status = 'awaiting_heartbeat' and e.status_changed_at < now() - make_interval(secs => $1)
            order by e.status_changed_at, e.id limit $2 for update skip locked"""),
    "step 3: pick instances past their deadline": (
        "(int, int, timestamptz, int)",
        """select i as inst from public.account_tool_instances i
             join public.account_tool_environments e on e.id = i.account_tool_environment_id
            where i.status_on_toolbox in ('pending_deploy', 'deploying', 'starting', 'stopping', 'deleting')
              and i.status_changed_at < now() - make_interval(secs => least($1, $2))
              and ((i.status_on_toolbox = 'pending_deploy'
                    and i.status_changed_at < now() - make_interval(secs => $1))
                or (i.status_on_toolbox = 'deploying'
                    and i.status_changed_at < now() - make_interval(secs => $1)
                    and e.status = 'active' and e.last_heartbeat_at >= $3)
                or (i.status_on_toolbox in ('starting', 'stopping', 'deleting')
                    and i.status_changed_at < now() - make_interval(secs => $2)
                    and e.status = 'active' and e.last_heartbeat_at >= $3))
            order by i.status_changed_at, i.id limit $4 for update of i skip locked"""),
    "mcp_status: one page of a user's servers with their last 5 events": (
        "(uuid, int)",
        """with page as (
             select i.* from public.account_tool_instances i
               join public.account_tool_environments e on e.id = i.account_tool_environment_id
              where e.user_id = $1 and i.mcp_server_type = 'mcp_server'
              order by i.created_at, i.id limit $2 + 1)
           select p.id, ev.events from page p
             left join lateral (select jsonb_agg(l.message order by l.id) as events
                                  from (select * from public.account_tool_instance_events ev
                                         where ev.account_tool_instance_id = p.id
                                         order by ev.id desc limit 5) l
                               ) ev on true"""),
}
EXPLAIN_ARGS: dict[str, Callable[[Any], tuple[Any, ...]]] = {
    "guard: count silent active toolboxes": lambda c: (c["silent_before"],),
    "step 1: pick silent toolboxes (FOR UPDATE SKIP LOCKED)": lambda c: (c["silent_before"], 500),
    "step 1: instances of the marked toolboxes (event insert)": lambda c: (c["silent_ids"],),
    "step 2: pick toolboxes past first-contact grace": lambda c: (FIRST_CONTACT, 500),
    "step 3: pick instances past their deadline": lambda c: (DEPLOY, ACTION, c["silent_before"], 500),
    "mcp_status: one page of a user's servers with their last 5 events": lambda c: (c["user"], 100),
}
HOT_TABLES = ("account_tool_environments", "account_tool_instances", "account_tool_instance_events")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.2f} ms"


def percentile(samples: list[float], q: int) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[q - 1]


def sweep_sql(batch: int) -> str:
    return f"select public.cp_sweep({STALE}, {FIRST_CONTACT}, {DEPLOY}, {ACTION}, {batch}, {GUARD})"


def seed(url: str, toolboxes: int, per: int) -> None:
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        params = {"users": (toolboxes + 9) // 10, "toolboxes": toolboxes, "per": per}
        for statement in SEED.split(";\n\n"):
            conn.execute(statement, params)
        conn.execute("vacuum analyze")
        counts = conn.execute("""select (select count(*) from account_tool_environments),
                                        (select count(*) from account_tool_instances),
                                        (select count(*) from account_tool_instance_events)""").fetchone()
    print(f"seeded {counts[0]:,} toolboxes, {counts[1]:,} instances, {counts[2]:,} events "
          f"in {time.perf_counter() - started:.1f} s (set-based INSERT ... generate_series; VACUUM ANALYZE)")


def timed_sweep(conn: psycopg.Connection, batch: int, *, commit: bool) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    counts = conn.execute(sweep_sql(batch)).fetchone()[0]
    elapsed = time.perf_counter() - started
    conn.commit() if commit else conn.rollback()
    return elapsed, counts


def bench_changing_sweeps(url: str, runs: int) -> None:
    print("\n== sweep that changes ~10% of the fleet (each run rolled back, so each does the same work)")
    with psycopg.connect(url) as conn:
        for batch in (500, 20_000):
            results = [timed_sweep(conn, batch, commit=False) for _ in range(runs)]
            counts = results[0][1]
            print(f"{sweep_sql(batch)}\n    median {ms(statistics.median(r[0] for r in results))}  "
                  f"max {ms(max(r[0] for r in results))}  (n={runs}); changed: "
                  f"{counts['marked_unresponsive']} toolboxes -> unresponsive "
                  f"(+{counts['instance_events']} instance events), "
                  f"{counts['first_contact_failed']} first-contact failures, {counts['deadlines_failed']} "
                  f"deadlines; guard_tripped={counts['guard_tripped']} more={counts['more']}")
        _, committed = timed_sweep(conn, 20_000, commit=True)
        print(f"committed one full sweep: {committed['marked_unresponsive']} toolboxes unresponsive")


def bench_noop_sweeps(url: str, runs: int) -> None:
    print("\n== sweep that changes nothing (fleet already swept)")
    with psycopg.connect(url, autocommit=True) as conn:
        samples = []
        for _ in range(runs * 4):
            started = time.perf_counter()
            counts = conn.execute(sweep_sql(500)).fetchone()[0]
            samples.append(time.perf_counter() - started)
            assert counts["marked_unresponsive"] == counts["deadlines_failed"] == 0, counts
    print(f"{sweep_sql(500)}\n    median {ms(statistics.median(samples))}  max {ms(max(samples))}  "
          f"(n={len(samples)})")


def bench_list(url: str, user: str, reads: int) -> None:
    from shared.adapters.db.postgres import PostgresDatabase

    print(f"\n== mcp_status list latency, user with 100 servers (10 toolboxes), {reads} reads each")
    db = PostgresDatabase(url, max_size=1)
    try:
        db.call("cp_list_mcp_servers", p_user_id=user, p_limit=100)
        samples = []
        for _ in range(reads):
            started = time.perf_counter()
            page = db.call("cp_list_mcp_servers", p_user_id=user, p_limit=100)
            samples.append(time.perf_counter() - started)
        assert len(page["items"]) == 100
        print(f"PostgresDatabase.call('cp_list_mcp_servers', p_user_id=<user>, p_limit=100)\n"
              f"    p50 {ms(percentile(samples, 50))}  p99 {ms(percentile(samples, 99))}")
    finally:
        db.close()
    bench_function_app(url, user, reads)


def bench_function_app(url: str, user: str, reads: int) -> None:
    import jwt
    from functions_framework import create_app

    from shared import runtime

    os.environ.update({"DATABASE_URL": url, "SUPABASE_JWT_SECRET": JWT_SECRET, "LOG_LEVEL": "WARNING",
                       "DTMA_KEY_SECRET": "bench-master-secret-0123456789abcdef", "LOG_FORMAT": "text"})
    runtime.reset()
    source = str(ROOT / "functions" / "mcp_status" / "main.py")
    client = create_app(target="mcp_status", source=source).test_client()
    now = int(time.time())
    token = jwt.encode({"sub": user, "role": "authenticated", "aud": "authenticated", "iat": now,
                        "exp": now + 3600}, JWT_SECRET, algorithm="HS256")
    headers = {"Authorization": f"Bearer {token}"}
    samples = []
    for n in range(reads + 1):
        started = time.perf_counter()
        response = client.get("/?limit=100", headers=headers)
        if n:
            samples.append(time.perf_counter() - started)
        assert response.status_code == 200 and len(response.json["servers"]) == 100, response.json
    print(f"GET /mcp_status?limit=100 (functions-framework app, WSGI test client, JWT HS256)\n"
          f"    p50 {ms(percentile(samples, 50))}  p99 {ms(percentile(samples, 99))}  "
          f"({len(response.data):,} bytes)")


def bench_explains(url: str, user: str) -> None:
    print("\n== EXPLAIN (ANALYZE, BUFFERS) of the main scans (generic plans; before the sweep was committed)")
    with psycopg.connect(url) as conn:
        conn.execute("set plan_cache_mode = force_generic_plan")
        silent_before = conn.execute("select now() - make_interval(secs => %s)", (STALE,)).fetchone()[0]
        silent_ids = [r[0] for r in conn.execute(
            "select id from account_tool_environments where status = 'active' and last_heartbeat_at < %s "
            "limit 500", (silent_before,))]
        context = {"silent_before": silent_before, "silent_ids": silent_ids, "user": user}
        for number, (label, (types, statement)) in enumerate(EXPLAINS.items()):
            conn.execute(f"prepare q{number} {types} as {statement}")
            args = EXPLAIN_ARGS[label](context)
            literals = sql.SQL(", ").join(sql.Literal(a) for a in args)
            explain = sql.SQL("explain (analyze, buffers, costs off) execute {}({})")
            plan = [r[0] for r in conn.execute(explain.format(sql.Identifier(f"q{number}"), literals))]
            seq = [line.strip() for line in plan if "Seq Scan" in line and any(t in line for t in HOT_TABLES)]
            print(f"-- {label}: {plan[-1].strip()}{'  SEQ SCAN: ' + '; '.join(seq) if seq else ''}")
            for line in plan:
                if not line.strip().startswith(("Planning", "Execution")):
                    print("   " + line)
        conn.rollback()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--toolboxes", type=int, default=10_000)
    parser.add_argument("--per-toolbox", type=int, default=10)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--reads", type=int, default=300)
    args = parser.parse_args()
    print(f"$ python -m bench.sweep --toolboxes {args.toolboxes} "
          f"--per-toolbox {args.per_toolbox} --runs {args.runs} --reads {args.reads}   "
          f"({os.cpu_count()} CPUs, embedded PostgreSQL 16)")
    server = embedded_pg.start(keep=False)
    try:
        migrate(server.uri)
        seed(server.uri, args.toolboxes, args.per_toolbox)
        user = "00000000-0000-4000-8000-000000000000"
        bench_explains(server.uri, user)
        bench_changing_sweeps(server.uri, args.runs)
        bench_noop_sweeps(server.uri, args.runs)
        bench_list(server.uri, user, args.reads)
    finally:
        from shared.adapters.db import close_all

        close_all()
        server.stop()


if __name__ == "__main__":
    main()
