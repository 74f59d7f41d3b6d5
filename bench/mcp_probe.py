"""What checking an MCP server costs, and whether a sweep's batch fits its budget.

    python -m bench.mcp_probe [--servers 1000] [--probes 100]

One real MCP server (the `mcp` SDK's FastMCP over streamable HTTP, served by uvicorn on loopback,
three tools) answers every probe; the targets of the sweep figure are 1,000 distinct server ids
on it. Printed, each next to the floor measured in the same run:

* one probe (initialize + tools/list + closing the session): wall time (median, p95), the
  process's CPU per probe, and resident memory after all probes; the floor is one plain HTTP
  request to the same server over a new connection (what any check must pay at least);
* a sweep's probing: `probe_many` over 1,000 targets at MCP_PROBE_CONCURRENCY, against the batch
  the sweep allows itself (MCP_PROBE_CONCURRENCY x MCP_SWEEP_PROBE_BUDGET_SECONDS /
  MCP_PROBE_TIMEOUT_SECONDS, at most MCP_SWEEP_PROBE_BATCH): its wall time must fit the budget.

The server shares the machine's cores with the client, so the figures are an upper bound on the
client's side. Loopback only; bounded in count and time.
"""

from __future__ import annotations

import argparse
import resource
import socket
import statistics
import threading
import time
import uuid
from typing import Any

from shared.adapters import mcp_probe
from shared.core.config import Settings


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve() -> tuple[int, Any]:
    """A FastMCP server with three tools on a loopback port, in a thread; returns (port, server)."""
    import uvicorn
    from mcp.server.fastmcp import FastMCP

    app = FastMCP("bench-server", log_level="CRITICAL")

    @app.tool()
    def echo(text: str) -> str:
        """Return the text."""
        return text

    @app.tool()
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @app.tool()
    def now() -> float:
        """Seconds since the epoch."""
        return time.time()

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app.streamable_http_app(), host="127.0.0.1", port=port,
                                           log_level="critical", lifespan="on"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the MCP server did not start")
        time.sleep(0.02)
    return port, server


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", type=int, default=1000, help="targets of the sweep figure")
    parser.add_argument("--probes", type=int, default=100, help="sequential probes for the per-probe figure")
    args = parser.parse_args()
    settings = Settings()

    port, server = serve()
    import logging

    for name in ("httpx", "mcp", "uvicorn"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    target = mcp_probe.ProbeTarget(str(uuid.uuid4()), "127.0.0.1", port, "/mcp", "streamable_http")
    common = {"timeout": settings.MCP_PROBE_TIMEOUT_SECONDS, "max_bytes": settings.MCP_PROBE_MAX_BYTES,
              "allow_private": True}
    try:
        first = mcp_probe.probe(target, **common)  # imports the SDK once; not counted
        assert first.ok, first.error

        floor: list[float] = []
        request = f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode()
        for _ in range(args.probes):
            started = time.perf_counter()
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(request)
                while sock.recv(65536):
                    pass
            floor.append(time.perf_counter() - started)

        walls: list[float] = []
        rss_before = _rss_mib()
        cpu_before = time.process_time()
        for _ in range(args.probes):
            started = time.perf_counter()
            result = mcp_probe.probe(target, **common)
            walls.append(time.perf_counter() - started)
            assert result.ok and len(result.tools) == 3, result.error
        cpu = (time.process_time() - cpu_before) / args.probes
        rss_after = _rss_mib()

        def ms(seconds: float) -> str:
            return f"{seconds * 1000:.1f} ms"

        p95 = statistics.quantiles(walls, n=20)[-1]
        print(f"$ python -m bench.mcp_probe --servers {args.servers} --probes {args.probes}")
        print(f"\n== one probe (initialize + tools/list + session end), {args.probes} in a row, one FastMCP server")
        print(f"floor: one HTTP request over a new connection (raw socket)   median {ms(statistics.median(floor))}")
        print(f"probe: wall median {ms(statistics.median(walls))}, p95 {ms(p95)} "
              f"({statistics.median(walls) / statistics.median(floor):.1f}x the floor); "
              f"client CPU per probe {ms(cpu)} (server in the same process: includes its share)")
        print(f"memory: peak RSS {rss_before:.0f} MiB before the probes, {rss_after:.0f} MiB after "
              f"({rss_after - rss_before:+.1f} MiB over {args.probes} probes)")

        concurrency, timeout = settings.MCP_PROBE_CONCURRENCY, settings.MCP_PROBE_TIMEOUT_SECONDS
        budget = settings.MCP_SWEEP_PROBE_BUDGET_SECONDS
        allowed = min(settings.MCP_SWEEP_PROBE_BATCH, int(concurrency * budget / timeout))
        targets = [mcp_probe.ProbeTarget(str(uuid.uuid4()), "127.0.0.1", port, "/mcp", "streamable_http")
                   for _ in range(args.servers)]
        started = time.perf_counter()
        cpu_before = time.process_time()
        results = mcp_probe.probe_many(targets, concurrency=concurrency, **common)
        wall = time.perf_counter() - started
        cpu_all = time.process_time() - cpu_before
        ok = sum(r.ok for r in results)
        batch_wall = wall * allowed / args.servers
        print(f"\n== a sweep's probing: {args.servers} running servers, concurrency {concurrency}, "
              f"timeout {timeout:g} s")
        print(f"probe_many: {ok}/{args.servers} answered in {wall:.1f} s ({args.servers / wall:.0f} probes/s; "
              f"CPU {cpu_all / args.servers * 1000:.1f} ms per probe)")
        print(f"batch bound: one sweep checks at most {allowed} servers (MCP_SWEEP_PROBE_BATCH "
              f"{settings.MCP_SWEEP_PROBE_BATCH}, {concurrency} x {budget:g} s / {timeout:g} s); at this rate "
              f"that batch takes {batch_wall:.1f} s of its {budget:g} s budget; {args.servers} servers are all "
              f"checked every {max(1, -(-args.servers // allowed))} sweep(s)")
        verdict = "met" if batch_wall <= budget and ok == args.servers else "MISSED"
        print(f"verdict: batch within budget ({batch_wall:.1f} s <= {budget:g} s): {verdict}")
    finally:
        server.should_exit = True


if __name__ == "__main__":
    main()
