"""`mcp-ops report`: the fleet's operating figures for a window, as an operator reads them.

Deploy success rate and failures by reason, time from request to `running`, agent call latency
per operation, heartbeat lateness, and a chart of deploy outcomes per bucket: all from one call of
`cp_operations_report` (sql/migrations/0010_operations.sql), the same figures a script gets with
`--json`. docs/operations.md explains each figure.

    mcp-ops report [--hours 24] [--bucket-minutes 60] [--json] [--database-url URL]

Exit status: 0 printed, 2 bad arguments, 1 the database failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

BAR_WIDTH = 40


def fetch(database_url: str, *, hours: float, bucket_minutes: int, stale_after_seconds: int) -> dict[str, Any]:
    """One call of cp_operations_report over one plain connection (a CLI needs no pool)."""
    import psycopg

    until = datetime.now(UTC)
    with psycopg.connect(database_url, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute("select public.cp_operations_report(p_since => %s, p_until => %s, "
                           "p_bucket_seconds => %s, p_stale_after_seconds => %s)",
                           (until - timedelta(hours=hours), until, bucket_minutes * 60,
                            stale_after_seconds)).fetchone()
    assert row is not None
    return row[0]


def _num(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}{unit}" if value < 100 else f"{value:,.0f}{unit}"
    return f"{value:,}{unit}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    return ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in (header, *rows)]


def render(report: Mapping[str, Any]) -> str:
    """The report as text: summary, failures, latency, toolboxes, and the chart."""
    window, deploys = report["window"], report["deploys"]
    ttr, calls, boxes = deploys["time_to_running"], report["agent_calls"], report["toolboxes"]
    rate = deploys.get("success_rate")
    lines = [f"Operations report {window['since'][:19]} .. {window['until'][:19]} UTC", "",
             f"Deploys: {deploys['started']} started, {deploys['succeeded']} succeeded, {deploys['failed']} failed, "
             f"{deploys['in_progress']} in progress; success rate "
             f"{'-' if rate is None else f'{float(rate) * 100:.1f}%'}",
             f"Time to running: p50 {_num(ttr.get('p50_seconds'), ' s')}, p95 {_num(ttr.get('p95_seconds'), ' s')}, "
             f"max {_num(ttr.get('max_seconds'), ' s')} ({ttr.get('count', 0)} deploys)"]
    reasons = deploys.get("failures_by_reason") or {}
    if reasons:
        lines += ["", "Failures by reason:"]
        lines += ["  " + line for line in _table(("reason", "count"), sorted(
            ((r, str(n)) for r, n in reasons.items()), key=lambda item: -int(item[1])))]
    for key, label, name in (("top_failing_images", "Images that failed most", "image"),
                             ("top_failing_toolboxes", "Toolboxes that failed most", "name")):
        rows = deploys.get(key) or []
        if rows:
            lines += ["", f"{label}:"]
            lines += ["  " + line for line in _table((name, "failed", "started"), [
                (str(r.get(name) or r.get("toolbox_id")), str(r["failed"]), str(r["started"])) for r in rows])]
    ops = calls.get("by_operation") or {}
    lines += ["", f"Agent calls ({calls.get('commands', 0)} commands):"]
    if ops:
        lines += ["  " + line for line in _table(("operation", "calls", "p50 ms", "p95 ms", "max ms", "errors"), [
            (op, str(v["count"]), _num(v.get("p50_ms")), _num(v.get("p95_ms")), _num(v.get("max_ms")),
             str(v["errors"]) + (f" {v['errors_by_result']}" if v.get("errors_by_result") else ""))
            for op, v in sorted(ops.items())])]
    else:
        lines.append("  none in this window")
    age = boxes.get("heartbeat_age_seconds") or {}
    lines += ["", f"Toolboxes: {boxes['active']} active, {boxes['unresponsive']} unresponsive, "
                  f"{boxes['awaiting_first_heartbeat']} awaiting their first heartbeat, {boxes['late']} late "
                  f"(> {boxes['stale_after_seconds']} s); heartbeat age p50 {_num(age.get('p50'), ' s')}, "
                  f"p95 {_num(age.get('p95'), ' s')}, max {_num(age.get('max'), ' s')}"]
    lines += ["", *chart(report.get("series") or [])]
    return "\n".join(lines)


def chart(series: Sequence[Mapping[str, Any]]) -> list[str]:
    """One row per bucket: succeeded as '#', failed as 'x', still in progress as '.', then the
    bucket's median time to running. Scaled to the busiest bucket."""
    busiest = max((s["started"] for s in series), default=0)
    lines = ["Deploys per bucket (# succeeded, x failed, . in progress) and median time to running:"]
    if not busiest:
        return [*lines, "  no deploys in this window"]
    scale = min(1.0, BAR_WIDTH / busiest)
    for bucket in series:
        def bar(count: int, mark: str) -> str:
            return mark * (round(count * scale) if count else 0) or (mark if count else "")

        row = bar(bucket["succeeded"], "#") + bar(bucket["failed"], "x") + bar(bucket["in_progress"], ".")
        ttr = bucket.get("p50_time_to_running_seconds")
        lines.append(f"  {str(bucket['start'])[11:16]}  {row.ljust(BAR_WIDTH + 3)} "
                     f"{bucket['succeeded']:>4} ok {bucket['failed']:>3} failed"
                     + (f"  p50 {_num(ttr, ' s')}" if ttr is not None else ""))
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcp-ops", description="Operating figures of the MCP control plane.")
    sub = parser.add_subparsers(dest="command", required=True)
    report = sub.add_parser("report", help="deploy success, time to running, agent latency, heartbeats")
    report.add_argument("--hours", type=float, default=24.0, help="the window: the last N hours (default 24)")
    report.add_argument("--bucket-minutes", type=int, default=60, help="chart bucket (default 60)")
    report.add_argument("--stale-after-seconds", type=int, default=210,
                        help="a heartbeat older than this is late (default 210: 3 x 60 s + 30 s)")
    report.add_argument("--json", action="store_true", help="print the figures as JSON")
    report.add_argument("--database-url", default=os.environ.get("DATABASE_URL"),
                        help="PostgreSQL URL (default: $DATABASE_URL)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problems = []
    if not args.database_url:
        problems.append("no database: set DATABASE_URL or pass --database-url")
    if not 0 < args.hours <= 24 * 90:
        problems.append("--hours must be more than 0 and at most 2160 (90 days)")
    if not 1 <= args.bucket_minutes <= 24 * 60 or args.hours * 60 / args.bucket_minutes > 500:
        problems.append("--bucket-minutes must be 1-1440, with at most 500 buckets in the window")
    if problems:
        for problem in problems:
            print(f"mcp-ops report: {problem}", file=sys.stderr)
        return 2
    import psycopg

    try:
        report = fetch(args.database_url, hours=args.hours, bucket_minutes=args.bucket_minutes,
                       stale_after_seconds=args.stale_after_seconds)
    except psycopg.OperationalError:
        print("mcp-ops report: the database failed: cannot connect (check --database-url / DATABASE_URL)",
              file=sys.stderr)
        return 1
    except psycopg.Error as exc:
        print(f"mcp-ops report: the database failed: {exc.diag.message_primary or type(exc).__name__}",
              file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2, default=str) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
