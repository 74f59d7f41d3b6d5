"""The web console in a real browser: how long the page takes to show 100 servers, and how long a change
in the database takes to reach the page. Debian's chromium driven by Playwright, against a local stack
(devstack) started here; loopback only, bounded in count.

    PYTHONPATH=. python -m bench.web_console [--loads 7] [--changes 25]

* render: navigation start -> every server row in the DOM (performance.now() in the page, so the
  browser's own clock from the navigation), median of `--loads` loads of the signed-in page, with
  100 servers seeded for the demo user; the floor is the same page with 0 servers, measured in the
  same run first. Target: < 1 s.
* change -> DOM: an UPDATE of one server's image committed from here, until the page's DOM shows the
  new image (a MutationObserver notes Date.now(); the same machine's wall clock as this process).
  The floor is a plain SSE client in this process reading the same watch stream (the stream's own
  latency, without the browser, supabase-js or the page). Median and p99 over `--changes` changes.
  Target: < 1 s (the stream itself targets < 500 ms).

Nothing here asserts a time; it prints figures, floors, ratios and verdicts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg

from bench.world import STATUS_SEED
from devstack.launcher import StackProcess

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SERVERS = 100
RENDER_TARGET_MS = 1000.0
CHANGE_TARGET_MS = 1000.0
ROWS_DONE = """(n) => document.body.dataset.loaded === 'true'
    && document.querySelectorAll('#servers tbody tr').length === n ? performance.now() : false"""
WATCH_FOR = """(want) => {
  window.__seenAt = null;
  const body = document.querySelector('#servers tbody');
  const seen = () => { if (window.__seenAt === null && body.textContent.includes(want)) window.__seenAt = Date.now(); };
  window.__observer?.disconnect();
  window.__observer = new MutationObserver(seen);
  window.__observer.observe(body, {childList: true, subtree: true, characterData: true});
}"""


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def verdict(value: float, target: float) -> str:
    return f"{'PASS' if value < target else 'FAIL'} (target < {target:.0f} ms)"


class StreamFloor:
    """A plain SSE reader of mcp_status?watch=true in this process: the moment each change arrives."""

    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url, token
        self.seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="sse-floor")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "text/event-stream"}
        cursor = None
        with httpx.Client(timeout=httpx.Timeout(10, read=90), trust_env=False) as client:
            while not self._stop.is_set():
                params = {"watch": "true", **({"since": cursor} if cursor else {})}
                try:
                    with client.stream("GET", self.url, params=params, headers=headers) as response:
                        for line in response.iter_lines():
                            if self._stop.is_set():
                                return
                            if line.startswith("id:"):
                                cursor = line[3:].strip()
                            if line.startswith("data:"):
                                now = time.time() * 1000
                                for server in json.loads(line[5:]).get("servers", []):
                                    self.seen.setdefault(server.get("image") or "", now)
                except httpx.HTTPError:
                    time.sleep(0.2)


def seed(database_url: str, user_id: str) -> None:
    params = {"base": 4096, "user": user_id, "boxes": 10, "per": SERVERS // 10}
    with psycopg.connect(database_url, autocommit=False) as conn, conn.transaction():
        for statement in filter(str.strip, STATUS_SEED.split(";")):
            conn.execute(statement, {k: v for k, v in params.items() if f"%({k})s" in statement})


def loads(page: Any, url: str, n: int, servers: int) -> list[float]:
    figures = []
    for _ in range(n):
        page.goto(url)
        handle = page.wait_for_function(ROWS_DONE, arg=servers, polling="raf", timeout=30_000)
        figures.append(float(handle.json_value()))
    return figures


def changes(page: Any, database_url: str, floor: StreamFloor, count: int) -> tuple[list[float], list[float]]:
    browser_ms, stream_ms = [], []
    with psycopg.connect(database_url, autocommit=True) as conn:
        ids = [str(r[0]) for r in conn.execute(
            "select i.id from public.account_tool_instances i join public.account_tool_environments e "
            "on e.id = i.account_tool_environment_id where e.name like 'status-box-%%' order by i.id limit %s",
            (count,))]
        for n, server_id in enumerate(ids):
            image = f"mcp/bench-change-{n}-{int(time.time())}:latest"
            page.evaluate(WATCH_FOR, image)
            started = time.time() * 1000
            conn.execute("update public.account_tool_instances set docker_image_url = %s where id = %s",
                         (image, server_id))
            page.wait_for_function("() => window.__seenAt !== null", timeout=30_000)
            browser_ms.append(float(page.evaluate("window.__seenAt")) - started)
            deadline = time.monotonic() + 10
            while image not in floor.seen and time.monotonic() < deadline:
                time.sleep(0.005)
            if image in floor.seen:
                stream_ms.append(floor.seen[image] - started)
            time.sleep(0.2)  # one change at a time: the next starts from a quiet stream
    return browser_ms, stream_ms


def run(loads_n: int = 7, changes_n: int = 25) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    base = Path(tempfile.mkdtemp(prefix="bench-web-"))
    result: dict[str, Any] = {}
    with StackProcess("--port", "0", "--sweep-interval", "0", "--functions-heartbeat-interval", "600",
                      data_dir=base / "pg", state_dir=base / "state") as stack, sync_playwright() as p:
        env = stack.env
        context = p.chromium.launch_persistent_context(str(base / "profile"), executable_path=CHROMIUM,
                                                       args=CHROMIUM_ARGS, headless=True,
                                                       viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.goto(f"{stack.url}/")
        page.fill("#password", env["DEMO_USER_PASSWORD"])
        page.press("#password", "Enter")
        page.wait_for_selector("#app:not([hidden])")
        empty = loads(page, f"{stack.url}/", loads_n, 0)
        seed(env["DATABASE_URL"], env["DEMO_USER_ID"])
        full = loads(page, f"{stack.url}/", loads_n, SERVERS)
        floor = StreamFloor(f"{env['FUNCTIONS_URL']}/mcp_status", env["DEMO_USER_JWT"])
        floor.start()
        time.sleep(1.0)
        browser_ms, stream_ms = changes(page, env["DATABASE_URL"], floor, changes_n)
        floor.stop()
        mode = page.evaluate("document.body.dataset.live")
        context.close()
    result["render"] = {"servers": SERVERS, "loads": loads_n, "median_ms": statistics.median(full),
                        "floor_median_ms": statistics.median(empty), "all_ms": full, "floor_all_ms": empty}
    result["change"] = {"changes": len(browser_ms), "median_ms": statistics.median(browser_ms),
                        "p99_ms": pct(browser_ms, 0.99), "floor_median_ms": statistics.median(stream_ms or [0.0]),
                        "floor_p99_ms": pct(stream_ms or [0.0], 0.99), "mode": mode}
    return result


def report(result: dict[str, Any]) -> list[str]:
    r, c = result["render"], result["change"]
    ratio = r["median_ms"] / r["floor_median_ms"] if r["floor_median_ms"] else float("nan")
    extra = c["median_ms"] - c["floor_median_ms"]
    return [
        f"render {r['servers']} servers: median {r['median_ms']:.0f} ms over {r['loads']} loads "
        f"(navigation -> every row in the DOM); floor, 0 servers: {r['floor_median_ms']:.0f} ms; ratio {ratio:.2f}x "
        f"-> {verdict(r['median_ms'], RENDER_TARGET_MS)}",
        f"change -> DOM ({c['mode']}): median {c['median_ms']:.0f} ms, p99 {c['p99_ms']:.0f} ms over {c['changes']} "
        f"changes; floor, a plain SSE client on the same stream: median {c['floor_median_ms']:.0f} ms, p99 "
        f"{c['floor_p99_ms']:.0f} ms (the page adds {extra:.0f} ms) -> {verdict(c['p99_ms'], CHANGE_TARGET_MS)}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.web_console", description=__doc__.split("\n\n")[0])
    parser.add_argument("--loads", type=int, default=7, help="page loads per case (default 7)")
    parser.add_argument("--changes", type=int, default=25, help="database changes to time (default 25, >= 20)")
    args = parser.parse_args()
    if not Path(CHROMIUM).is_file():
        sys.exit(f"{CHROMIUM} is missing: apt-get install -y chromium")
    result = run(args.loads, max(args.changes, 1))
    for line in report(result):
        print(line)
    print(json.dumps({"render": {k: v for k, v in result["render"].items() if not k.endswith("all_ms")},
                      "change": result["change"]}))


if __name__ == "__main__":
    main()
