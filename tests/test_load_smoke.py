"""A short smoke variant of the load test (bench/load.py, same code): 50 stand-in toolboxes
heartbeating every 0.5 s (100 requests/s offered) to dtma_heartbeat_ingest served over real HTTP,
while three users deploy, start and read status and containers crash on the toolboxes. No error
at all, and every toolbox's final state equals what its last heartbeat said."""

from __future__ import annotations

import psycopg

from bench.load import LoadConfig, run, serve_functions


def test_load_smoke(database_url: str, pg: psycopg.Connection) -> None:
    config = LoadConfig(toolboxes=50, interval=0.5, duration=5.0, users=3, per_toolbox=2, senders=8, think=0.05,
                        chaos_every=0.05)
    with serve_functions(database_url) as urls:
        report = run(database_url, urls, config)
    print("\n".join(report.lines()))
    assert report.errors == 0, report.lines()
    assert report.final["mismatches"] == [], report.final["mismatches"][:10]
    assert report.final["instances"] >= config.toolboxes * config.per_toolbox
    # The offered load was carried (allowing for start-up), and the users really worked.
    assert report.count("heartbeat") >= 0.8 * config.toolboxes * config.duration / config.interval
    assert report.count("deploy") > 0 and report.count("status") > 0 and report.crashes > 0
