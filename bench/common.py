"""Shared pieces of the benchmarks: an embedded PostgreSQL, serving a function the production way,
load generation, process CPU and memory readings, and small statistics.

Functions are served exactly as Cloud Run functions serve them: the `functions-framework` console
script (gunicorn, 1 worker, threads = 4 x cores) with `--target X --source functions/X/main.py`,
on a loopback port, as a separate process. The floor every figure is compared with is
`bench/noop/main.py`, a function that imports only functions_framework and answers 204, served the
same way in the same run.

Load comes from `wrk` (Debian package `wrk`) when it is on PATH: a C load generator that costs
the 2-core machine far less CPU than the server it measures. A Lua script cycles through a fixed
list of requests (one per toolbox, so concurrent heartbeats do not queue on one toolbox's row
lock) and can make each body unique (`{{n}}`). Without wrk, a bounded pool of Python threads with
keep-alive connections does the same, more slowly; every result says which tool produced it.
Nothing here sends traffic anywhere but 127.0.0.1, and every run is bounded in time.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.gettempdir())
os.environ.setdefault("NO_GCE_CHECK", "true")

JWT_SECRET = "bench-jwt-secret-that-is-at-least-32-bytes-long"
DTMA_KEY_SECRET = "bench-master-secret-0123456789abcdef"
IDEMPOTENCY_SECRET = "bench-idempotency-secret-0123456789abcdef"
NOOP_SOURCE = ROOT / "bench" / "noop" / "main.py"
COUNTED_SOURCE = ROOT / "bench" / "counted" / "main.py"
FUNCTIONS = ("dtma_heartbeat_ingest", "mcp_status", "deploy_mcp_server", "manage_mcp_server", "mcp_status_sweep")
WORKER = "dtma_command_worker"

# The command queue. Functions that enqueue get TASKS_MODE=cloud_tasks pointed at a Cloud Tasks emulator
# (devstack/cloud_tasks.py) running in the benchmark process: the production client, REST createTask over
# httpx. COMMAND_QUEUE is delivered to dtma_command_worker; HELD_QUEUE is paused for good, for runs that time
# what a function does up to its answer (record + enqueue + answer) and must not have the command run beside
# them on the same two cores (in production the worker runs on other instances).
COMMAND_QUEUE = "projects/bench/locations/local/queues/dtma-commands"
HELD_QUEUE = "projects/bench/locations/local/queues/held-commands"
COMMAND_INVOKER_SA = "dtma-commands@bench.iam.gserviceaccount.com"
# deploy.sh's queue (QUEUE_SETTINGS): --max-attempts=20 --min-backoff=1s --max-backoff=60s --max-doublings=5
# --max-concurrent-dispatches=50 (its 20 dispatches/s are not emulated).
PRODUCTION_QUEUE = {"min_backoff": 1.0, "max_backoff": 60.0, "max_doublings": 5, "max_attempts": 20,
                    "max_concurrent": 50}
CLK_TCK = os.sysconf("SC_CLK_TCK")


def source_of(function: str) -> Path:
    return NOOP_SOURCE if function == "noop" else ROOT / "functions" / function / "main.py"


# --- statistics ----------------------------------------------------------------------------------

def percentile(samples: Sequence[float], q: float) -> float:
    """Inclusive percentile (q in 0..100) by linear interpolation; NaN for no samples."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# --- the machine ---------------------------------------------------------------------------------

def machine(pg_version: str | None = None) -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    versions = {}
    for package in ("functions-framework", "gunicorn", "flask", "pydantic", "psycopg", "psycopg-pool"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[package] = version(package)
    return {
        "cores": os.cpu_count(), "cpu": model, "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
        "postgres": pg_version, "load_tool": load_tool_name(), "packages": versions,
    }


# --- the database --------------------------------------------------------------------------------

class Postgres:
    """A fresh embedded PostgreSQL with the project's migrations, deleted on stop."""

    def __init__(self) -> None:
        from devstack import embedded_pg
        from ops.migrate import migrate

        self._server = embedded_pg.start(keep=False)
        self.uri = self._server.uri
        self.data_dir = self._server.data_dir
        migrate(self.uri)

    def connect(self, **kwargs: Any) -> Any:
        import psycopg

        return psycopg.connect(self.uri, autocommit=True, **kwargs)

    def version(self) -> str:
        with self.connect() as conn:
            return conn.execute("show server_version").fetchone()[0]

    def postmaster_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((Path(self.data_dir) / "postmaster.pid").read_text().split()[0])
        return None

    def cpu_seconds(self) -> float:
        """CPU time of the postmaster and every process it forked (backends, writers, autovacuum)."""
        pid = self.postmaster_pid()
        return sum(process_cpu(p) for p in [pid, *descendants(pid)]) if pid else 0.0

    def counters(self) -> dict[str, int]:
        """Cumulative transactions and tuples written (pg_stat_*) of this database."""
        with self.connect() as conn:
            xact = conn.execute("select xact_commit + xact_rollback from pg_stat_database "
                                "where datname = current_database()").fetchone()[0]
            rows = conn.execute("""select relname, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del
                                     from pg_stat_user_tables where schemaname = 'public'""").fetchall()
        out = {"xact": int(xact)}
        for name, ins, upd, hot, dele in rows:
            out[f"{name}.ins"], out[f"{name}.upd"], out[f"{name}.hot"], out[f"{name}.del"] = ins, upd, hot, dele
        return out

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Until no other client backend is connected (a stopped server's pool has gone), so that
        their statistics are flushed (backends flush at exit)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.connect() as conn:
                others = conn.execute("select count(*) from pg_stat_activity where backend_type = 'client backend' "
                                      "and pid <> pg_backend_pid()").fetchone()[0]
            if not others:
                time.sleep(0.05)
                return
            time.sleep(0.05)

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> Postgres:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def written(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Tuples written per table (insert + update + delete) and transactions between two snapshots."""
    out = {"xact": after["xact"] - before["xact"]}
    tables = {k.rsplit(".", 1)[0] for k in after if "." in k}
    for table in sorted(tables):
        total = sum(after.get(f"{table}.{kind}", 0) - before.get(f"{table}.{kind}", 0)
                    for kind in ("ins", "upd", "del"))
        hot = after.get(f"{table}.hot", 0) - before.get(f"{table}.hot", 0)
        if total:
            out[table] = total
            out[f"{table} (HOT updates)"] = hot
    return out


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


def jwt_for(user_id: str, lifetime: int = 3600) -> str:
    import jwt

    now = int(time.time())
    return jwt.encode({"sub": user_id, "role": "authenticated", "aud": "authenticated", "iat": now,
                       "exp": now + lifetime}, JWT_SECRET, algorithm="HS256")


# --- processes -----------------------------------------------------------------------------------

def descendants(pid: int | None) -> list[int]:
    if not pid:
        return []
    found: list[int] = []
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            found.append(child)
            stack.append(child)
    return found


def process_cpu(pid: int) -> float:
    """utime + stime of a live process, in seconds (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def threads_cpu(pid: int) -> float:
    """CPU seconds of a process's live threads from the scheduler's own accounting
    (/proc/<pid>/task/*/sched, se.sum_exec_runtime, in ms to the ns): fine enough for a few
    commands, where /proc/<pid>/stat counts 10 ms ticks; threads that have exited are not counted."""
    total = 0.0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return 0.0
    for task in tasks:
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in (task / "sched").read_text().splitlines():
                if line.startswith("se.sum_exec_runtime"):
                    total += float(line.split(":", 1)[1]) / 1000
                    break
    return total


def memory(pid: int) -> dict[str, float]:
    """RSS, peak RSS (VmHWM) and PSS of a process, in MiB."""
    out = {"rss": 0.0, "hwm": 0.0, "pss": 0.0}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss"] = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                out["hwm"] = int(line.split()[1]) / 1024
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                out["pss"] = int(line.split()[1]) / 1024
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def functions_framework_command() -> list[str]:
    script = Path(sys.executable).parent / "functions-framework"
    if script.exists():
        return [str(script)]
    found = shutil.which("functions-framework")
    return [found] if found else [sys.executable, "-m", "functions_framework"]


def function_env(database_url: str | None, **extra: str) -> dict[str, str]:
    """The environment a deployed function gets, pointed at the bench database. Logging stays on
    (INFO, one line per request) because production pays for it too; it goes to a file."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DATABASE_URL", "SUPABASE_", "DTMA_", "IDEMPOTENCY_", "PYTHONDONTWRITEBYTECODE",
                                "K_SERVICE", "TASKS_MODE", "COMMAND_", "CLOUD_TASKS_", "THREADS", "WORKERS", "BENCH_"))}
    env.update({"PYTHONPATH": str(ROOT), "SUPABASE_JWT_SECRET": JWT_SECRET, "DTMA_KEY_SECRET": DTMA_KEY_SECRET,
                "IDEMPOTENCY_SECRET": IDEMPOTENCY_SECRET,
                "LOG_LEVEL": "INFO", "LOG_FORMAT": "text", "ALLOW_PRIVATE_TOOLBOX_IPS": "true",
                "NO_GCE_CHECK": "true"})
    if database_url:
        env["DATABASE_URL"] = database_url
    env.update(extra)
    return env


@dataclass
class Server:
    """One function served by `functions-framework` (gunicorn) on a loopback port."""

    function: str
    env: dict[str, str]
    port: int = 0
    source: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        self.port = self.port or free_port()
        source = self.source or source_of(self.function)
        target = "noop" if self.function == "noop" else self.function
        command = [*functions_framework_command(), "--target", target, "--source", str(source),
                   "--host", "127.0.0.1", "--port", str(self.port)]
        handle, name = tempfile.mkstemp(prefix=f"bench-{self.function}-", suffix=".log")
        self.log_path = Path(name)
        self.started_at = time.perf_counter()
        self.process = subprocess.Popen(command, env=self.env, stdout=handle, stderr=handle, cwd=str(ROOT),
                                        start_new_session=True)
        os.close(handle)
        return self

    def wait_ready(self, probe: Callable[[Server], bool] | None = None, timeout: float = 30.0) -> float:
        """Poll until the function answers (any status from the function itself); seconds since start."""
        probe = probe or options_probe
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{self.function} exited: {self.log_tail()}")
            try:
                if probe(self):
                    return time.perf_counter() - self.started_at
            except OSError:
                pass
            time.sleep(0.001)
        raise TimeoutError(f"{self.function} did not answer within {timeout} s: {self.log_tail()}")

    def log_tail(self, chars: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:] if self.log_path else ""
        return ""

    @property
    def master_pid(self) -> int | None:
        return self.process.pid if self.process else None

    def worker_pids(self) -> list[int]:
        return descendants(self.master_pid)

    def cpu_seconds(self) -> float:
        """CPU of the whole serving process tree (gunicorn master and worker)."""
        pid = self.master_pid
        return sum(process_cpu(p) for p in [pid, *self.worker_pids()]) if pid else 0.0

    def cpu_seconds_fine(self) -> float:
        """The same from the scheduler's ns accounting of live threads (threads_cpu)."""
        pid = self.master_pid
        return sum(threads_cpu(p) for p in [pid, *self.worker_pids()]) if pid else 0.0

    def memory(self) -> dict[str, float]:
        """MiB: worker RSS/peak, master RSS/peak, and the tree's total PSS (what the container holds)."""
        master = memory(self.master_pid) if self.master_pid else {"rss": 0, "hwm": 0, "pss": 0}
        workers = [memory(p) for p in self.worker_pids()]
        return {"worker_rss": sum(w["rss"] for w in workers), "worker_peak": sum(w["hwm"] for w in workers),
                "master_rss": master["rss"], "master_peak": master["hwm"],
                "total_pss": master["pss"] + sum(w["pss"] for w in workers),
                "total_peak": master["hwm"] + sum(w["hwm"] for w in workers)}

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        self.process = None
        if self.log_path:
            with contextlib.suppress(OSError):
                self.log_path.unlink()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def queue_env(tasks_url: str, worker_url: str, queue: str = COMMAND_QUEUE) -> dict[str, str]:
    """What deploy.sh gives the functions that enqueue commands, pointed at the emulator."""
    return {"TASKS_MODE": "cloud_tasks", "CLOUD_TASKS_API_URL": tasks_url, "COMMAND_QUEUE": queue,
            "COMMAND_WORKER_URL": worker_url, "COMMAND_INVOKER_SA": COMMAND_INVOKER_SA}


def start_tasks_emulator(nodelay: bool = True, **settings: Any) -> Any:
    """A Cloud Tasks emulator in this process (loopback, random port), started; HELD_QUEUE paused.

    nodelay: answer with Nagle's algorithm off, as the DTMA stand-in's server already does. The
    emulator's handler leaves it on, so on a keep-alive connection (the functions' httpx client) its
    answer's body waits for the client's delayed ACK of the headers: ~40 ms added to every createTask,
    an artefact of the emulator that Google's API does not have. bench/deploy.py measures both."""
    from devstack import cloud_tasks

    emulator = cloud_tasks.CloudTasksEmulator(**settings)
    if nodelay:
        server = emulator._server  # this emulator only; the class is left as shipped
        server.RequestHandlerClass = type("NoDelayHandler", (server.RequestHandlerClass,),
                                          {"disable_nagle_algorithm": True})
    emulator.start()
    emulator.pause(True, HELD_QUEUE)
    return emulator


def queue_counts(emulator: Any, queue: str) -> dict[str, int]:
    """pending / in_flight / done / failed tasks of one queue (zeros before its first task)."""
    for q in emulator.queues():
        if q["name"] == queue:
            return {k: int(q[k]) for k in ("pending", "in_flight", "done", "failed", "peak_in_flight")}
    return {"pending": 0, "in_flight": 0, "done": 0, "failed": 0, "peak_in_flight": 0}


def wait_queue_idle(emulator: Any, queue: str = COMMAND_QUEUE, timeout: float = 60.0) -> bool:
    """Until `queue` has no task pending or in flight (the held queue never gets there)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = queue_counts(emulator, queue)
        if not counts["pending"] and not counts["in_flight"]:
            return True
        time.sleep(0.02)
    return False


@contextlib.contextmanager
def serving(function: str, env: dict[str, str], source: Path | None = None,
            probe: Callable[[Server], bool] | None = None) -> Iterator[Server]:
    server = Server(function, env, source=source).start()
    try:
        server.wait_ready(probe)
        yield server
    finally:
        server.stop()


def request(server: Server, method: str, path: str = "/", body: bytes | str | None = None,
            headers: dict[str, str] | None = None, timeout: float = 30.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        if isinstance(body, str):
            body = body.encode()
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def options_probe(server: Server) -> bool:
    """An answer from the function (its CORS preflight, or the no-op's 204); no database involved."""
    status, _ = request(server, "OPTIONS", "/", timeout=2.0)
    return status < 500


# --- load ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Req:
    method: str
    path: str
    headers: dict[str, str]
    body: str = ""
    dynamic: bool = False  # replace "{{n}}" in the body with a number unique to this request


@dataclass
class LoadResult:
    tool: str
    connections: int
    duration: float
    requests: int
    errors: int
    p50_ms: float
    p99_ms: float
    statuses: dict[str, int] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.duration if self.duration else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rps": self.rps}


def load_tool_name() -> str:
    return "wrk" if shutil.which("wrk") and os.environ.get("BENCH_LOAD_TOOL", "auto") != "python" else "python"


def _lua_string(value: str) -> str:
    level = 1
    while f"]{'=' * level}]" in value:
        level += 1
    return f"[{'=' * level}[{value}]{'=' * level}]"


_LUA = """
local reqs = {%(reqs)s}
local nonce = %(nonce)s
local nreq = #reqs
local counter = 0
local formatted = {}
local threads = {}
tid = 0

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  counter = tid * 7919
  for i, r in ipairs(reqs) do
    if not r.dynamic then formatted[i] = wrk.format(r.method, r.path, r.headers, r.body) end
  end
end

function request()
  counter = counter + 1
  local i = (counter %% nreq) + 1
  local f = formatted[i]
  if f then return f end
  local r = reqs[i]
  local body = string.gsub(r.body, "{{n}}", nonce .. tid .. "t" .. counter)
  return wrk.format(r.method, r.path, r.headers, body)
end

statuses = {}
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local out = io.open(%(out)s, "w")
  local codes = {}
  for _, t in ipairs(threads) do
    local s = t:get("statuses")
    for k, v in pairs(s) do codes[k] = (codes[k] or 0) + v end
  end
  local parts = {}
  for k, v in pairs(codes) do table.insert(parts, string.format('"%%d":%%d', k, v)) end
  out:write(string.format('{"requests":%%d,"duration_us":%%d,"connect":%%d,"read":%%d,"write":%%d,' ..
    '"status":%%d,"timeout":%%d,"p50":%%f,"p99":%%f,"statuses":{%%s}}',
    summary.requests, summary.duration, summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.status, summary.errors.timeout, latency:percentile(50), latency:percentile(99),
    table.concat(parts, ",")))
  out:close()
end
"""


def _wrk(url: str, reqs: Sequence[Req], connections: int, duration: float) -> LoadResult:
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        out = Path(tmp) / "result.json"
        items = []
        for r in reqs:
            headers = ", ".join(f"[ {_lua_string(k)} ] = {_lua_string(v)}" for k, v in r.headers.items())
            items.append(f"{{method = {_lua_string(r.method)}, path = {_lua_string(r.path)}, headers = {{{headers}}}, "
                         f"body = {_lua_string(r.body)}, dynamic = {'true' if r.dynamic else 'false'}}}")
        script = Path(tmp) / "load.lua"
        script.write_text(_LUA % {"reqs": ",\n".join(items), "out": _lua_string(str(out)),
                                  "nonce": _lua_string(secrets.token_hex(3))})
        threads = max(1, min(2, connections))
        seconds = max(1, round(duration))
        done = subprocess.run(["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s",
                               "--timeout", "10s", "-s", str(script), url],
                              capture_output=True, text=True, timeout=seconds + 60)
        if done.returncode or not out.exists():
            raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip()[-500:]}")
        data = json.loads(out.read_text())
    errors = data["connect"] + data["read"] + data["write"] + data["timeout"] + data["status"]
    return LoadResult("wrk", connections, data["duration_us"] / 1e6, data["requests"], errors,
                      data["p50"] / 1000, data["p99"] / 1000, {str(k): v for k, v in data["statuses"].items()})


def _python_load(url: str, reqs: Sequence[Req], connections: int, duration: float) -> LoadResult:
    host, port = url.removeprefix("http://").split("/")[0].split(":")
    latencies: list[list[float]] = [[] for _ in range(connections)]
    statuses: dict[str, int] = {}
    errors = [0]
    lock = threading.Lock()
    nonce = secrets.token_hex(3)
    stop_at = time.perf_counter() + duration

    def worker(index: int) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        n = index * 7919
        mine = latencies[index]
        local: dict[str, int] = {}
        while time.perf_counter() < stop_at:
            n += 1
            r = reqs[n % len(reqs)]
            body = r.body.replace("{{n}}", f"{nonce}{index}p{n}") if r.dynamic else r.body
            started = time.perf_counter()
            try:
                conn.request(r.method, r.path, body=body.encode() if body else None, headers=r.headers)
                response = conn.getresponse()
                response.read()
            except OSError:
                with lock:
                    errors[0] += 1
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=10)
                continue
            mine.append(time.perf_counter() - started)
            local[str(response.status)] = local.get(str(response.status), 0) + 1
            if response.status >= 400:
                with lock:
                    errors[0] += 1
        conn.close()
        with lock:
            for k, v in local.items():
                statuses[k] = statuses.get(k, 0) + v

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration + 30)
    elapsed = time.perf_counter() - started
    samples = [s for lat in latencies for s in lat]
    return LoadResult("python", connections, elapsed, len(samples), errors[0], percentile(samples, 50) * 1000,
                      percentile(samples, 99) * 1000, statuses)


def run_load(url: str, reqs: Sequence[Req], connections: int, duration: float) -> LoadResult:
    """Keep `connections` requests in flight for `duration` seconds, cycling through `reqs`."""
    if load_tool_name() == "wrk":
        return _wrk(url, reqs, connections, duration)
    return _python_load(url, reqs, connections, duration)


def sequential_latencies(server: Server, reqs: Sequence[Req], count: int) -> tuple[list[float], dict[str, int]]:
    """One keep-alive connection, one request at a time: latency without queueing."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    samples, statuses = [], {}
    try:
        for n in range(count):
            r = reqs[n % len(reqs)]
            body = r.body.replace("{{n}}", f"s{n}-{secrets.token_hex(3)}") if r.dynamic else r.body
            started = time.perf_counter()
            conn.request(r.method, r.path, body=body.encode() if body else None, headers=r.headers)
            response = conn.getresponse()
            response.read()
            samples.append(time.perf_counter() - started)
            statuses[str(response.status)] = statuses.get(str(response.status), 0) + 1
    finally:
        conn.close()
    return samples, statuses


# --- reporting -----------------------------------------------------------------------------------

def fmt(value: float, digits: int = 1) -> str:
    if value != value:  # NaN
        return "n/a"
    return f"{value:,.{digits}f}"


def ratio(value: float, floor: float) -> str:
    return f"{value / floor:.2f}x" if floor else "n/a"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
