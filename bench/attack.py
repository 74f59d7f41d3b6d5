"""Attack run: bounded hostile traffic against the local stack, on loopback only (not a test).

    python -m bench.attack                      # ~5,700 requests: 1-1.5 min on 2 cores (see below)
    python -m bench.attack --quick              # ~1,400 requests: 30-60 s
    python -m bench.attack --json /tmp/attack.json [--strict] [--only auth tenant ...]
    python -m bench.attack --tree /tmp/head     # serve another checkout (git archive HEAD | tar -x -C /tmp/head)

(From the repository root with the project's interpreter, `.venv/bin/python -m bench.attack`.)
It is not part of `python -m bench`: it takes longer than 30 s. Measured on 2 cores: 81 s (--quick
57 s) against a tree whose functions read a lying 300 MB body before refusing it (each such request
then waits out its 8 s / 64 MiB send bound and a 3 s read), 52 s once they refuse at once; the
stack starts in ~2 s.

It starts its own local stack (`python -m devstack.stack --port 0` as a child process, with a fresh
embedded PostgreSQL in a temporary directory, deleted afterwards; the sweep loop off), seeds a
second user B with a toolbox of their own, deploys user A's servers, and then sends, to each of
deploy_mcp_server, manage_mcp_server, mcp_status, mcp_status_sweep, dtma_heartbeat_ingest and
dtma_command_worker (docs/security-testing.md says what each category holds):

* auth     forged, expired, alg-confused and spliced JWTs, anon/service-role keys, bad toolbox tokens;
* tenant   user B (and a user with a valid JWT but no auth.users row) reading and managing user A's
           servers and toolbox, B's toolbox token reporting A's instances; then A's server is
           checked unchanged;
* secrets  deploys with `SECRET_TOKEN=sk-live-...` env values that the DTMA stand-in fails with
           an error quoting the value (exact, upper-cased, first 20 characters), a start failure
           quoting it, validation errors around it; every answer of the whole run, and the stack's
           log, are searched for every planted value in those forms and in base64;
* bodies   lying Content-Length (300 MB declared: 4 KB sent then half-close; streamed until the
           server answers, capped at --stream-cap-mib), chunked bodies over 1 MiB, short bodies
           then close, smuggling-shaped headers, deep nesting, duplicate keys, NaN, lone surrogates,
           NUL, type confusion (`"container_port": true`, `"seq": "5"`), `registry:99999/x`,
           non-UUID path ids, a 900 KB system_status, a 100 KB unknown heartbeat field, and the
           time to a 401 for a bad toolbox token with a 1 MB valid heartbeat;
* slow     20 slowloris connections (headers or body dribbled) for 10 s while a normal client
           keeps reading mcp_status;
* burst    50 parallel deploys / manage calls with one Idempotency-Key, 50 racing stops, 50
           parallel heartbeats and refreshes;
* fuzz     seeded mutations of each function's valid request (values, structure, encoding,
           content type, query strings), 8 at a time.

Every answer is checked for: a 5xx; an error body that is not JSON (the local HTTP server's own
"Error response" pages are reported apart); PostgreSQL's words (DB_TEXT in bench/attack_wire.py);
a planted secret; a forged credential or another tenant let through; hostile input accepted; and
the RSS of the process serving the functions (the stack runs all six in ONE process: the numbers
are that process's), sampled every 20 ms (and VmHWM, reset through /proc/<pid>/clear_refs) before,
during and after each single hostile request.

Exit status: 1 when any of: a 5xx, PostgreSQL text in an answer, a secret echoed (in an answer or
the stack's log), a single request growing the serving process by more than --rss-limit-mib (150),
a non-JSON error body from a function, an auth bypass or a cross-tenant access; with --strict also
the warnings (hostile input accepted, a body read before refusing, a slow 401, no answer, ...);
2 when the stack could not start.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import jwt

from bench import attack_cases as cases
from bench.attack_cases import ANY, AUTH, DASHES, DENY, REFUSE, dumps
from bench.attack_wire import (
    DB_TEXT,
    KEEP_BODY,
    MIB,
    Answer,
    RssMonitor,
    SlowClient,
    chunked,
    cmdline,
    descendants,
    filler,
    raw_exchange,
    request_head,
    run_slow_clients,
    secret_forms,
)

ROOT = Path(__file__).resolve().parents[1]
FUNCTIONS = ("deploy_mcp_server", "manage_mcp_server", "mcp_status", "mcp_status_sweep", "dtma_heartbeat_ingest",
             "dtma_command_worker")
USER_FUNCTIONS = ("deploy_mcp_server", "manage_mcp_server", "mcp_status")
IAM_PRIVATE = ("mcp_status_sweep", "dtma_command_worker")
#: The service accounts the local stack's invoker checks name (devstack/stack.py: COMMAND_INVOKER_SA, SWEEP_INVOKER_SA).
INVOKERS = {"dtma_command_worker": "dtma-commands@local.test", "mcp_status_sweep": "mcp-sweep-invoker@local.test"}
CATEGORIES = ("auth", "tenant", "secrets", "bodies", "slow", "burst", "fuzz")
READY = "MCP local stack ready at"
IMAGE = "mcp/everything:latest"
FAIL, WARN = "fail", "warn"
#: A refusal that had this much of a body pushed into it before answering read the body first.
READ_BEFORE_ANSWER_MIB = 8


# --- the stack -------------------------------------------------------------------------------------------

def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


class StackError(RuntimeError):
    pass


class LocalStack:
    """`python -m devstack.stack` as a child process on a free port, with its own fresh database."""

    def __init__(self, tree: Path, keep: bool = False) -> None:
        self.tree = tree
        self.keep = keep
        self.tmp = Path(tempfile.mkdtemp(prefix="mcp-attack-"))
        self.state_dir, self.data_dir = self.tmp / "state", self.tmp / "pgdata"
        self.out_path = self.tmp / "stack.out"
        self.process: subprocess.Popen[bytes] | None = None
        self.env: dict[str, str] = {}
        self.secrets: dict[str, str] = {}
        self.started_in = 0.0

    def start(self, timeout: float = 120.0) -> LocalStack:
        env = {**os.environ, "PYTHONPATH": str(self.tree), "NO_GCE_CHECK": "true"}
        env.setdefault("XDG_RUNTIME_DIR", tempfile.gettempdir())
        for name in ("DATABASE_URL", "HEARTBEAT_INTERVAL_SECONDS", "HEARTBEAT_GRACE_SECONDS"):
            env.pop(name, None)
        command = [sys.executable, "-m", "devstack.stack", "--port", "0", "--state-dir", str(self.state_dir),
                   "--data-dir", str(self.data_dir), "--sweep-interval", "0"]
        with contextlib.suppress(OSError):
            if "--sweep-oidc" in (self.tree / "devstack" / "stack.py").read_text():
                command.append("--sweep-oidc")  # the sweep checks its caller's token, as on Google Cloud
        began = time.monotonic()
        with open(self.out_path, "wb") as out:
            self.process = subprocess.Popen(command, cwd=str(self.tree), env=env, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while READY not in self.output():
            if self.process.poll() is not None:
                raise StackError(f"the local stack exited ({self.process.returncode}):\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                raise StackError(f"the local stack was not ready within {timeout:g} s:\n{self.output()[-3000:]}")
            time.sleep(0.05)
        self.started_in = time.monotonic() - began
        self.env = read_env_file(self.state_dir / "stack.env")
        self.secrets = read_env_file(self.state_dir / "secrets.env")
        return self

    def output(self) -> str:
        try:
            return self.out_path.read_text(errors="replace")
        except OSError:
            return ""

    def serving_pids(self) -> list[int]:
        """The stack process (it serves every function) and any Python process below it (not PostgreSQL)."""
        assert self.process is not None
        pids = [self.process.pid]
        for pid in descendants(self.process.pid):
            line = cmdline(pid)
            if "python" in line and "postgres" not in line:
                pids.append(pid)
        return pids

    def stop(self) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)  # the stack stops its functions, stand-in and database
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        self._stop_orphaned_postgres()
        if not self.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _stop_orphaned_postgres(self) -> None:
        """If the stack died without stopping its database, stop that server (ours: its data dir is ours)."""
        pidfile = self.data_dir / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(pidfile.read_text().splitlines()[0])
            if "postgres" in cmdline(pid):
                os.kill(pid, signal.SIGTERM)
                for _ in range(100):
                    if not cmdline(pid):
                        break
                    time.sleep(0.1)


# --- probes and findings ----------------------------------------------------------------------------------

@dataclass
class Finding:
    kind: str
    severity: str
    category: str
    function: str
    case: str
    detail: str
    #: What makes two findings of one kind different (the report shows distinct ones first).
    key: str = ""


@dataclass
class Probe:
    category: str
    function: str
    case: str
    expect: str
    answer: Answer
    rss: dict[str, float] | None = None
    findings: list[Finding] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        a = self.answer
        return {"category": self.category, "function": self.function, "case": self.case, "expect": self.expect,
                "status": a.status, "content_type": a.content_type, "elapsed_ms": round(a.elapsed * 1000, 1),
                "error": a.error, "sent": a.sent, "sent_at_answer": a.sent_at_answer,
                "body": a.snippet(200), "rss": self.rss, "findings": [f.kind for f in self.findings]}


def error_code(answer: Answer) -> str | None:
    """`error.code` of our error shape, if the answer has it."""
    body = answer.json() if answer.is_json() else None
    error = body.get("error") if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None


def _is_http_server_page(answer: Answer) -> bool:
    """The local HTTP server's own error page (http.server `send_error`: a request it could not parse)."""
    return b"<title>Error response</title>" in answer.body


@dataclass
class Options:
    fuzz_per_function: int = 770
    burst: int = 50
    slow_clients: int = 20
    slow_seconds: float = 10.0
    stream_cap_mib: int = 64
    rss_limit_mib: float = 150.0
    seed: int = 20240601
    strict: bool = False
    only: tuple[str, ...] = CATEGORIES


class Attack:
    def __init__(self, stack: LocalStack, options: Options) -> None:
        self.stack = stack
        self.options = options
        env = stack.env
        self.functions_url = env["FUNCTIONS_URL"]
        host_port = self.functions_url.removeprefix("http://").split("/")[0]
        host, port = host_port.split(":")
        self.address = (host, int(port))
        self.prefix = "/" + self.functions_url.removeprefix("http://").partition("/")[2]
        self.standin_url = env["DTMA_STANDIN_URL"]
        self.jwt_secret = env["SUPABASE_JWT_SECRET"]
        self.master = stack.secrets.get("DTMA_KEY_SECRET", "")
        self.user_a, self.jwt_a = env["DEMO_USER_ID"], env["DEMO_USER_JWT"]
        self.box_a, self.token_a = env["DEMO_TOOLBOX_ID"], env["DEMO_TOOLBOX_TOKEN"]
        self.auth_a = f"Bearer {self.jwt_a}"
        self.tb_auth_a = f"Bearer {self.token_a}"
        self.client = httpx.Client(trust_env=False, timeout=15.0, limits=httpx.Limits(max_connections=120,
                                                                                      max_keepalive_connections=40))
        self.standin = httpx.Client(base_url=self.standin_url, trust_env=False, timeout=10.0)
        self.probes: list[Probe] = []
        self.findings: list[Finding] = []
        self.notes: dict[str, list[str]] = {}
        self.category_rss: dict[str, dict[str, float]] = {}
        self.category_seconds: dict[str, float] = {}
        self._lock = threading.Lock()
        self._counter = 0
        self.rng = random.Random(options.seed)
        # Planted secrets: every answer of the run is searched for them (and for the stack's own).
        self.planted = {f"SECRET_TOKEN #{n}": f"sk-live-{secrets.token_hex(16)}" for n in range(1, 9)}
        self.watched = {**self.planted, **stack.secrets, "toolbox token": self.token_a}
        self.watched = {k: v for k, v in self.watched.items() if v}
        self.pids = stack.serving_pids()
        self.monitor = RssMonitor(self.pids).start()
        self.rss_start = self.monitor.now() / 1024
        # Filled by setup().
        self.user_b = self.jwt_b = self.box_b = self.token_b = ""
        self.ghost = self.jwt_ghost = ""
        self.wrong_master_key = self.version2_key = ""
        self.setup_deploy_body: dict[str, Any] = {}
        #: function -> Authorization header with a valid OIDC token, for trees where it checks one.
        self.invoker: dict[str, str] = {}
        self.server_a = self.server_a_fuzz = self.container_a = ""

    def close(self) -> None:
        self.monitor.stop()
        self.client.close()
        self.standin.close()

    def unique(self, prefix: str) -> str:
        with self._lock:
            self._counter += 1
            return f"{prefix}-{self._counter}"

    def note(self, category: str, text: str) -> None:
        self.notes.setdefault(category, []).append(text)

    # -- judging ---------------------------------------------------------------------------------------------

    def record(self, probe: Probe, *, answer_required: bool = True) -> Probe:
        a, found = probe.answer, []

        def add(kind: str, severity: str, detail: str, key: str = "") -> None:
            found.append(Finding(kind, severity, probe.category, probe.function, probe.case, detail,
                                 key or probe.case))

        status = a.status
        if status is not None and status >= 500:
            code = error_code(a)
            if status in (502, 503, 504) and code:  # documented: the toolbox failed / a dependency is down
                add("5xx, documented (upstream)", WARN, f"{status} {code}: {a.snippet()}")
            else:
                add("5xx", FAIL, f"{status} {a.content_type or '(no type)'}: {a.snippet()}")
        if status is not None and status >= 400 and not a.is_json():
            if _is_http_server_page(a):
                add("non-JSON error (HTTP server's own page)", WARN, f"{status}: {a.snippet(120)}")
            else:
                add("non-JSON error body", FAIL, f"{status} {a.content_type or '(no type)'}: {a.snippet()}")
        text = a.text() if (a.body or a.headers) else ""
        match = DB_TEXT.search(text)
        if match:
            start = max(0, match.start() - 80)
            add("database text", FAIL, f"{status}: ...{text[start:match.end() + 80]!r}",
                text[match.start():match.end() + 24].lower())
        for label, value in self.watched.items():
            for form, needle in secret_forms(value).items():
                if needle in text:
                    add("secret echo", FAIL, f"{label} ({form}) in a {status} answer: {a.snippet(160)}",
                        f"{label} ({form})")
                    break
        if probe.expect == AUTH and status is not None and status < 500 and status not in (401, 403):
            # Every function authenticates first: any other answer means the credential got through.
            add("auth bypass", FAIL, f"a credential that must be refused got past authentication ({status}): "
                                     f"{a.snippet(160)}")
        if status is not None and 200 <= status < 300:
            if probe.expect == DENY:
                add("cross-tenant access", FAIL, f"answered {status}: {a.snippet(160)}")
            elif probe.expect == REFUSE:
                add("hostile input accepted", WARN, f"answered {status}: {a.snippet(120)}")
        if status is None and answer_required:
            add("no answer", WARN, a.error or "no answer")
        if probe.rss and probe.rss["growth"] > self.options.rss_limit_mib:
            add("memory growth", FAIL, f"RSS {probe.rss['before']:.0f} -> peak {probe.rss['peak']:.0f} MiB "
                                       f"(+{probe.rss['growth']:.0f}) -> {probe.rss['after']:.0f} MiB")
        probe.findings = found
        with self._lock:
            self.probes.append(probe)
            self.findings.extend(found)
        return probe

    def check_stored_heartbeat(self, category: str) -> None:
        """The toolbox row after the oversized beats: what they left there must stay small."""
        import psycopg

        with psycopg.connect(self.stack.env["DATABASE_URL"], autocommit=True) as conn:
            row = conn.execute("select pg_column_size(t.*) from account_tool_environments t where id = %s",
                               (self.box_a,)).fetchone()
        if row is not None and row[0] > 16_384:
            self.flag("heartbeat blob stored", FAIL, category, "dtma_heartbeat_ingest", "oversized beats",
                      f"the toolbox row holds {row[0]} bytes after 900 KB / 100 KB beats")

    def flag(self, kind: str, severity: str, category: str, function: str, case: str, detail: str) -> None:
        with self._lock:
            self.findings.append(Finding(kind, severity, category, function, case, detail, f"{function} {case}"))

    # -- sending ---------------------------------------------------------------------------------------------

    def url(self, function: str, path: str = "") -> str:
        return f"{self.functions_url}/{function}{path}"

    def send(self, category: str, function: str, case: str, method: str = "POST", path: str = "", *,
             expect: str = ANY, auth: str | None = None, body: bytes | None = None, json_body: Any = None,
             content_type: str | None = "application/json", params: Any = None,
             headers: dict[str, str] | None = None, measure: bool = False, timeout: float = 15.0,
             answer_required: bool = True) -> Probe:
        hdrs: dict[str, str] = {}
        if auth is not None:
            hdrs["Authorization"] = auth
        if json_body is not None:
            body = dumps(json_body)
        if body is not None and content_type:
            hdrs["Content-Type"] = content_type
        hdrs.update(headers or {})
        url = self.url(function, path)
        if params:  # encoded here: lone surrogates and NULs go out percent-encoded, as they are
            items = params.items() if isinstance(params, dict) else params
            url += ("&" if "?" in url else "?") + urlencode(list(items), errors="surrogatepass")
        window = self.monitor.window() if measure else contextlib.nullcontext({})
        with window as rss:
            began = time.monotonic()
            try:
                response = self.client.request(method, url, content=body, headers=hdrs, timeout=timeout)
                answer = Answer(status=response.status_code,
                                headers={k.lower(): v for k, v in response.headers.items()},
                                body=response.content[:KEEP_BODY])
            except httpx.LocalProtocolError:  # httpx will not send it (e.g. "Bearer "): the socket will
                target = url.removeprefix(f"http://{self.address[0]}:{self.address[1]}")
                lines = [*hdrs.items(), ("Content-Length", str(len(body or b"")))]
                answer = raw_exchange(self.address, request_head(method, target, lines), [body or b""],
                                      read_seconds=timeout)
            except httpx.HTTPError as exc:
                answer = Answer(error=f"{type(exc).__name__}: {exc}")
            except (UnicodeError, ValueError) as exc:  # the client would not send it: not the server's fault
                answer, answer_required = Answer(error=f"not sent: {type(exc).__name__}: {exc}"), False
            answer.elapsed = time.monotonic() - began
        return self.record(Probe(category, function, case, expect, answer, rss if measure else None),
                           answer_required=answer_required)

    def raw(self, category: str, function: str, case: str, *, expect: str, headers: list[tuple[str, str]],
            body: Iterable[bytes] = (), method: str = "POST", path: str = "", cap: int | None = None,
            send_seconds: float = 10.0, read_seconds: float = 5.0, close_after_body: bool = False,
            answer_required: bool = True, measure: bool = True, head: bytes | None = None) -> Probe:
        head = head or request_head(method, f"{self.prefix}/{function}{path}", headers)
        window = self.monitor.window() if measure else contextlib.nullcontext({})
        with window as rss:
            answer = raw_exchange(self.address, head, body, cap=cap or self.options.stream_cap_mib * MIB,
                                  send_seconds=send_seconds, read_seconds=read_seconds,
                                  close_after_body=close_after_body)
        return self.record(Probe(category, function, case, expect, answer, rss if measure else None),
                           answer_required=answer_required)

    def control(self, path: str, body: dict[str, Any] | None = None) -> Any:
        response = self.standin.post(f"/_standin/{path}", json=body or {})
        if response.status_code != 200:
            raise RuntimeError(f"stand-in /_standin/{path} answered {response.status_code}: {response.text[:300]}")
        return response.json()

    def restore_toolbox(self, category: str) -> None:
        """After heartbeats that told lies: the stand-in reports the truth again."""
        with contextlib.suppress(httpx.HTTPError, RuntimeError):
            sent = self.control("heartbeats/send")
            if sent.get("status") != 204:
                self.note(category, f"the stand-in's next heartbeat was answered {sent.get('status')}")

    def server_of(self, server_id: str, auth: str | None = None, category: str = "setup") -> dict[str, Any] | None:
        probe = self.send(category, "mcp_status", "read a server", "GET", params={"id": server_id},
                          auth=auth or self.auth_a)
        body = probe.answer.json()
        return body.get("server") if probe.answer.status == 200 and isinstance(body, dict) else None

    def wait_status(self, server_id: str, want: set[str], timeout: float = 20.0,
                    category: str = "setup") -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        server = None
        while time.monotonic() < deadline:
            server = self.server_of(server_id, category=category)
            if server and server.get("status") in want:
                return server
            time.sleep(0.25)
        return server

    def deploy(self, category: str, name: str, *, env: dict[str, str] | None = None, image: str = IMAGE,
               case: str = "deploy", key: str | None = None) -> Probe:
        body: dict[str, Any] = {"toolbox_id": self.box_a, "name": name, "image": image, "container_port": 3001}
        if env:
            body["env"] = env
        return self.send(category, "deploy_mcp_server", case, json_body=body, auth=self.auth_a, expect=ANY,
                         headers={"Idempotency-Key": key} if key else None)

    # -- setup ---------------------------------------------------------------------------------------------

    def setup(self) -> None:
        import psycopg

        sys.path.insert(0, str(self.stack.tree))
        from ops.rows import insert_toolbox
        from shared.core.toolbox_keys import derive_key

        with psycopg.connect(self.stack.env["DATABASE_URL"], autocommit=True) as conn:
            row = conn.execute("insert into auth.users (email) values ('attacker-b@example.test') returning id"
                               ).fetchone()
            assert row is not None
            self.user_b = str(row[0])
            self.box_b = str(uuid.uuid4())
            self.token_b = derive_key(self.master, self.box_b, 1)
            standin_port = int(self.standin_url.rsplit(":", 1)[1])
            insert_toolbox(conn, user_id=self.user_b, name="attacker-toolbox", toolbox_id=self.box_b,
                           dtma_port=standin_port, token=self.token_b, heartbeat_age_seconds=1.0)
        self.watched["user B's toolbox token"] = self.token_b
        self.jwt_b = jwt.encode(cases.user_claims(self.user_b), self.jwt_secret, algorithm="HS256")
        self.ghost = str(uuid.uuid4())
        self.jwt_ghost = jwt.encode(cases.user_claims(self.ghost), self.jwt_secret, algorithm="HS256")
        self.wrong_master_key = derive_key("not-the-master-secret-" + "y" * 32, self.box_a, 1)
        self.version2_key = derive_key(self.master, self.box_a, 2)
        self.detect_invokers()
        main = self.deploy("setup", "atk-a-main", key="atk-a-setup", case="A deploys atk-a-main")
        fuzz = self.deploy("setup", "atk-a-fuzz", case="A deploys atk-a-fuzz")
        if main.answer.status != 202 or fuzz.answer.status != 202:
            raise StackError(f"setup deploy answered {main.answer.status}/{fuzz.answer.status}: "
                             f"{main.answer.snippet()} {fuzz.answer.snippet()}")
        self.server_a, self.server_a_fuzz = main.answer.json()["id"], fuzz.answer.json()["id"]
        self.setup_deploy_body = {"toolbox_id": self.box_a, "name": "atk-a-main", "image": IMAGE,
                                  "container_port": 3001}
        for server_id in (self.server_a, self.server_a_fuzz):
            server = self.wait_status(server_id, {"running", "error"})
            if not server or server["status"] != "running":
                raise StackError(f"user A's server {server_id} did not reach running: {server}")
        server = self.server_of(self.server_a)
        self.container_a = (server or {}).get("name") or "atk-a-main"

    def invoker_token(self, function: str, email: str) -> str | None:
        """An OIDC ID token from the Cloud Tasks emulator's local issuer (trees whose emulator has one)."""
        tasks = self.stack.env.get("CLOUD_TASKS_URL")
        if not tasks:
            return None
        try:
            response = self.client.get(f"{tasks}/_emulator/oidc/token",
                                       params={"audience": self.url(function), "email": email})
            token = response.json().get("token") if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        return token if isinstance(token, str) else None

    def invoker_public_pem(self) -> bytes | None:
        tasks = self.stack.env.get("CLOUD_TASKS_URL")
        try:
            from cryptography.hazmat.primitives import serialization
            from jwt.algorithms import RSAAlgorithm

            keys = self.client.get(f"{tasks}/_emulator/oidc/jwks.json").json()["keys"]
            public = RSAAlgorithm.from_jwk(json.dumps(keys[0]))
            return public.public_bytes(serialization.Encoding.PEM,  # type: ignore[union-attr]
                                       serialization.PublicFormat.SubjectPublicKeyInfo)
        except Exception:  # no JWKS, no cryptography: that one case is left out
            return None

    def detect_invokers(self) -> None:
        """Does the worker (the sweep) check its caller's OIDC token in this tree? Then use a valid one."""
        for function, body in (("dtma_command_worker", {"command_id": str(uuid.uuid4())}),
                               ("mcp_status_sweep", {})):
            probe = self.send("setup", function, "without a token: is an OIDC token checked?", json_body=body)
            if probe.answer.status == 401:
                token = self.invoker_token(function, INVOKERS[function])
                if token:
                    self.invoker[function] = f"Bearer {token}"
                else:
                    self.note("setup", f"{function} wants a token and none could be minted: its body attacks "
                                       "stop at the 401")
        checked = ", ".join(self.invoker) or "neither"
        self.note("setup", f"functions checking their caller's OIDC token in this tree: {checked}")

    # -- auth ----------------------------------------------------------------------------------------------

    def cat_auth(self) -> None:
        cat = "auth"
        anon = self.stack.env.get("SUPABASE_ANON_KEY", "")
        forged = cases.forged_jwts(self.jwt_secret, self.user_a, anon, self.jwt_b)
        targets = {
            "deploy_mcp_server": ("POST", "", lambda: {"toolbox_id": self.box_a, "name": self.unique("atk-auth"),
                                                        "image": IMAGE}),
            "manage_mcp_server": ("POST", f"/{self.server_a_fuzz}/restart", lambda: None),
            "mcp_status": ("GET", "", lambda: None),
        }
        for function, (method, path, make) in targets.items():
            for label, header, expect in forged:
                body = make()
                self.send(cat, function, label, method, path, expect=expect, auth=header,
                          json_body=body, params={"id": self.server_a} if function == "mcp_status" else None)
            # What an HTTP client would not send: raw bytes in the header, a folded header, two of them.
            for label, value in (("non-ASCII bytes in the token", "Bearer \xff\xfe\x00abc"),
                                 ("token with a trailing tab", f"Bearer {self.jwt_b[:-4]}\t")):
                self.raw(cat, function, label, expect=AUTH, method=method,
                         path=path + (f"?id={self.server_a}" if function == "mcp_status" else ""),
                         headers=[("Authorization", value), ("Content-Length", "0")], measure=False)
            self.raw(cat, function, "two Authorization headers (forged first)", expect=ANY, method=method,
                     path=path + (f"?id={self.server_a}" if function == "mcp_status" else ""),
                     headers=[("Authorization", forged[6][1] or ""), ("Authorization", self.auth_a),
                              ("Content-Length", "0")], measure=False)
        beat = cases.heartbeat(0, tool_statuses=[{"account_tool_instance_id": self.server_a_fuzz,
                                                   "status_on_toolbox": "running"}])
        for label, header in cases.bad_toolbox_tokens(self.token_a, self.jwt_a, self.wrong_master_key,
                                                      self.version2_key):
            self.send(cat, "dtma_heartbeat_ingest", label, path="/heartbeat", expect=AUTH, auth=header,
                      json_body=beat)
        self.send(cat, "dtma_heartbeat_ingest", "user B's toolbox token on A's beat (valid for B)", path="/heartbeat",
                  expect=ANY, auth=f"Bearer {self.token_b}", json_body=cases.heartbeat(0, tool_statuses=[]))
        # IAM-private on Google Cloud (Cloud Run checks the caller's OIDC token). Where the function checks
        # the token itself too (detect_invokers), forged ones must be refused; otherwise it answers anyone.
        for function in IAM_PRIVATE:
            body = {} if function == "mcp_status_sweep" else {"command_id": str(uuid.uuid4())}
            valid = self.invoker.get(function)
            if valid is None:
                for label, header, _ in (forged[0], forged[6], ("a user's JWT", self.auth_a, ANY)):
                    self.send(cat, function, label, expect=ANY, auth=header, json_body=body)
                self.note(cat, f"{function} checks no token in this tree (IAM-private: Cloud Run's IAM check is its "
                               "authentication): its auth rows are not judged")
                continue
            other = next(f for f in IAM_PRIVATE if f != function)
            other_token = self.invoker_token(other, INVOKERS[other]) or ""
            wrong = self.invoker_token(function, "attacker@evil.test") or ""
            for label, header, expect in cases.forged_invoker_tokens(
                    valid.removeprefix("Bearer "), other_token, wrong, self.invoker_public_pem(), self.jwt_a):
                self.send(cat, function, label, expect=expect, auth=header, json_body=body)

    # -- tenant --------------------------------------------------------------------------------------------

    def cat_tenant(self) -> None:
        cat = "tenant"
        before = self.server_of(self.server_a, category=cat)
        stranger = str(uuid.uuid4())
        for who, auth in (("user B", f"Bearer {self.jwt_b}"), ("no-row user", f"Bearer {self.jwt_ghost}")):
            pairs: list[tuple[Probe, Probe]] = []

            def both(case: str, method: str, path: str, *, params: Any = None, body: Any = None,
                     headers: dict[str, str] | None = None, who: str = who, auth: str = auth,
                     pairs: list[tuple[Probe, Probe]] = pairs) -> None:
                def fill(value: Any, target: str) -> Any:
                    text = json.dumps(value).replace("{A}", target)
                    return json.loads(text)
                mine = self.send(cat, case.split()[0], f"{who}: {case}", method, fill(path, self.server_a),
                                 params=fill(params, self.server_a), json_body=fill(body, self.server_a),
                                 auth=auth, expect=DENY, headers=headers)
                none = self.send(cat, case.split()[0], f"{who}: {case} (an id nobody has)", method,
                                 fill(path, stranger), params=fill(params, stranger), json_body=fill(body, stranger),
                                 auth=auth, expect=DENY, headers=headers)
                pairs.append((mine, none))

            both("mcp_status ?id=A", "GET", "", params={"id": "{A}"})
            both("mcp_status /A", "GET", "/{A}")
            both("mcp_status POST {id: A}", "POST", "", body={"id": "{A}"})
            both("mcp_status ?id=A&refresh=true", "GET", "", params={"id": "{A}", "refresh": "true"})
            for action in ("stop", "start", "restart", "remove"):
                both(f"manage_mcp_server /A/{action}", "POST", f"/{{A}}/{action}")
            both("manage_mcp_server DELETE /A", "DELETE", "/{A}")
            both("manage_mcp_server DELETE /A?force=true", "DELETE", "/{A}", params={"force": "true"})
            both("manage_mcp_server POST {A, remove, force}", "POST", "",
                 body={"instance_id": "{A}", "action": "remove", "force": True})
            for label, function, params in (("list", "mcp_status", None),
                                            ("list ?toolbox_id=A's", "mcp_status", {"toolbox_id": self.box_a}),
                                            ("list ?refresh=true", "mcp_status", {"refresh": "true"})):
                probe = self.send(cat, function, f"{who}: {label}", "GET", params=params, auth=auth, expect=ANY)
                body = probe.answer.body.decode(errors="replace")
                for leaked in (self.server_a, self.server_a_fuzz, self.box_a, "atk-a-main"):
                    if leaked in body:
                        self.flag("cross-tenant access", FAIL, cat, function, f"{who}: {label}",
                                  f"the answer names user A's {leaked}: {probe.answer.snippet(200)}")
                        break
            deploy_onto_a = {"toolbox_id": self.box_a, "name": self.unique("atk-b-onto-a"), "image": IMAGE}
            self.send(cat, "deploy_mcp_server", f"{who}: deploy onto A's toolbox", json_body=deploy_onto_a,
                      auth=auth, expect=DENY)
            self.send(cat, "deploy_mcp_server", f"{who}: deploy onto A's toolbox with an Idempotency-Key",
                      json_body={**deploy_onto_a, "name": self.unique("atk-b-onto-a")}, auth=auth, expect=DENY,
                      headers={"Idempotency-Key": self.unique("atk-b-key")})
            self.send(cat, "deploy_mcp_server", f"{who}: A's deploy body and A's Idempotency-Key",
                      json_body=self.setup_deploy_body, auth=auth, expect=DENY,
                      headers={"Idempotency-Key": "atk-a-setup"})
            for mine, none in pairs:
                a, b = mine.answer, none.answer
                code_a, code_b = error_code(a), error_code(b)
                if (a.status, code_a) != (b.status, code_b):
                    self.flag("existence oracle", WARN, cat, mine.function, mine.case,
                              f"A's id answers {a.status} {code_a}, an unknown id {b.status} {code_b}")
        # B's toolbox token reporting A's instances, in both formats.
        for label, items in (
                ("B's toolbox reports A's instance exited", [{"account_tool_instance_id": self.server_a,
                                                              "status_on_toolbox": "exited"}]),
                ("B's toolbox reports A's container exited", [{
                    "id": "f" * 64, "names": [f"/{self.container_a}"], "image": IMAGE, "state": "exited",
                    "status": "Exited (137) 1 second ago", "created": time.time(), "ports": []}])):
            self.send(cat, "dtma_heartbeat_ingest", label, path="/heartbeat", auth=f"Bearer {self.token_b}",
                      json_body=cases.heartbeat(0, tool_statuses=items), expect=ANY)
        after = self.server_of(self.server_a, category=cat)
        if before is None or after is None:
            self.flag("cross-tenant effect", FAIL, cat, "mcp_status", "A's server after the tenant attacks",
                      f"A's server {self.server_a} is gone (before: {before is not None}, after: {after is not None})")
        else:
            changed = {k: (before.get(k), after.get(k)) for k in ("status", "effective_status", "error")
                       if before.get(k) != after.get(k)}
            grown = len(after.get("progress") or []) - len(before.get("progress") or [])
            if changed or grown:
                self.flag("cross-tenant effect", FAIL, cat, "mcp_status", "A's server after the tenant attacks",
                          f"changed {changed}, {grown} new progress event(s): "
                          f"{(after.get('progress') or [])[-grown:] if grown else ''}")

    # -- secrets -------------------------------------------------------------------------------------------

    def cat_secrets(self) -> None:
        cat = "secrets"
        values = list(self.planted.values())

        def agent_fails_quoting(name: str, text: str, route: str = "deploy") -> None:
            verb = {"deploy": "deploy tool", "start": "start tool instance"}[route]
            self.control("fail", {"route": route, "status": 500, "body": {
                "success": False, "message": f"Failed to {verb} '{name}'.", "error": text}})

        shapes = (("exact", lambda s: f"(HTTP code 500) server error - create container: invalid env "
                                      f"SECRET_TOKEN={s} in Config.Env"),
                  ("upper-cased", lambda s: f"ENV CHECK FAILED: SECRET_TOKEN={s.upper()}"),
                  ("first 20 chars", lambda s: f"env value rejected: SECRET_TOKEN={s[:20]}... (truncated)"))
        deployed = []
        for (form, shape), value in zip(shapes, values, strict=False):
            name = self.unique("atk-secret")
            agent_fails_quoting(name, shape(value))
            probe = self.deploy(cat, name, env={"SECRET_TOKEN": value, "PLAIN": "not-a-secret"},
                                case=f"deploy; the agent's error quotes the value {form}", key=f"{name}-key")
            if probe.answer.status == 202:
                server_id = probe.answer.json()["id"]
                deployed.append((name, server_id, value))
                self.wait_status(server_id, {"error", "running"}, category=cat)
                self.send(cat, "mcp_status", f"list after the {form} failure", "GET", auth=self.auth_a)
                self.send(cat, "manage_mcp_server", f"restart after the {form} failure", path=f"/{server_id}/restart",
                          auth=self.auth_a)
                self.deploy(cat, name, env={"SECRET_TOKEN": value, "PLAIN": "not-a-secret"},
                            case=f"replay of the {form} deploy (same Idempotency-Key)", key=f"{name}-key")
        # A start that fails quoting the container's environment (the agent knows it; the worker does not).
        value = values[3]
        name = self.unique("atk-secret-start")
        probe = self.deploy(cat, name, env={"SECRET_TOKEN": value}, case="deploy (succeeds) for a failing start")
        if probe.answer.status == 202:
            server_id = probe.answer.json()["id"]
            if (self.wait_status(server_id, {"running", "error"}, category=cat) or {}).get("status") == "running":
                self.send(cat, "manage_mcp_server", "stop", path=f"/{server_id}/stop", auth=self.auth_a)
                self.wait_status(server_id, {"stopped", "error"}, category=cat)
                agent_fails_quoting(name, f"container start failed: env SECRET_TOKEN={value} invalid", route="start")
                self.send(cat, "manage_mcp_server", "start; the agent's error quotes the env value",
                          path=f"/{server_id}/start", auth=self.auth_a)
                self.wait_status(server_id, {"error", "running", "stopped"}, category=cat)
        # Failing images (the stand-in's own failures) with a secret in the env.
        for image, value in (("standin/pull-denied:latest", values[4]), ("standin/exit-3:latest", values[5])):
            probe = self.deploy(cat, self.unique("atk-secret-img"), env={"SECRET_TOKEN": value}, image=image,
                                case=f"deploy of {image} with a secret env")
            if probe.answer.status == 202:
                self.wait_status(probe.answer.json()["id"], {"error", "running"}, category=cat)
        # Validation errors around a secret value.
        value = values[6]
        body = {"toolbox_id": self.box_a, "image": IMAGE, "container_port": 3001}
        for label, env in (("env value over 32 KB", {"SECRET_TOKEN": value + "A" * 33_000}),
                           ("env value not a string", {"SECRET_TOKEN": {"nested": value}}),
                           ("env name invalid", {"BAD NAME": value}),
                           ("env value with NUL", {"SECRET_TOKEN": value + "\u0000"}),
                           ("env given as a list", [f"SECRET_TOKEN={value}"])):
            self.send(cat, "deploy_mcp_server", f"refused deploy: {label}", auth=self.auth_a, expect=REFUSE,
                      json_body={**body, "name": self.unique("atk-secret-bad"), "env": env})
        self.send(cat, "deploy_mcp_server", "refused deploy: secret in a duplicate key", auth=self.auth_a,
                  expect=REFUSE, body=(dumps({**body, "name": self.unique("atk-secret-dup")})[:-1]
                                       + f',"env":{{"S":"{values[7]}","S":"{values[7]}"}}}}'.encode()))
        time.sleep(0.5)
        self.scan_log(cat)

    def scan_log(self, category: str) -> None:
        path = Path(self.stack.env.get("LOG_FILE", ""))
        if not path.is_file():
            self.note(category, "the stack's log file was not found; not searched")
            return
        text = path.read_text(errors="replace")
        hits = 0
        for label, value in self.planted.items():
            for form, needle in secret_forms(value).items():
                index = text.find(needle)
                if index >= 0:
                    hits += 1
                    line = text[text.rfind("\n", 0, index) + 1:text.find("\n", index)]
                    self.flag("secret echo", FAIL, category, "(stack log)", f"{label} ({form}) in the stack's log",
                              line[:300])
                    break
        self.note(category, f"the stack's log ({len(text):,} bytes) searched for {len(self.planted)} planted values "
                            f"in {len(secret_forms('x' * 40))} forms: {hits} found")

    # -- bodies --------------------------------------------------------------------------------------------

    def shapes(self) -> dict[str, tuple[str, str, str | None, Callable[[], dict[str, Any]], str]]:
        """function -> (method, path, valid Authorization, fresh valid body, a string field to splice)."""
        return {
            "deploy_mcp_server": ("POST", "", self.auth_a, lambda: {
                "toolbox_id": self.box_a, "name": self.unique("atk-body"), "image": IMAGE, "container_port": 3001},
                                  "name"),
            "manage_mcp_server": ("POST", "", self.auth_a, lambda: {"instance_id": str(uuid.uuid4()),
                                                                   "action": "stop"}, "action"),
            "mcp_status": ("POST", "", self.auth_a, lambda: {"limit": 10}, "status"),
            "mcp_status_sweep": ("POST", "", self.invoker.get("mcp_status_sweep"), lambda: {}, "x"),
            "dtma_heartbeat_ingest": ("POST", "/heartbeat", self.tb_auth_a, lambda: cases.heartbeat(
                0, tool_statuses=[{"account_tool_instance_id": self.server_a_fuzz, "status_on_toolbox": "running"}]),
                                      "dtma_version"),
            "dtma_command_worker": ("POST", "", self.invoker.get("dtma_command_worker"),
                                    lambda: {"command_id": str(uuid.uuid4())}, "command_id"),
        }

    def cat_bodies(self) -> None:
        cat = "bodies"
        cap = self.options.stream_cap_mib * MIB
        declared = 300 * 1000 * 1000
        for function, (method, path, auth, make, key) in self.shapes().items():
            ignores_body = function == "mcp_status_sweep"
            optional_body = function == "mcp_status"  # no body (or null) means "no parameters"
            # JSON-level attacks.
            base_body = make()
            for label, body, expect in cases.common_json_attacks(base_body, key):
                if "name" in base_body:  # a deploy accepted by mistake must not hide the next one behind a 409
                    body = body.replace(base_body["name"].encode(), self.unique("atk-body").encode())
                if optional_body and label == "JSON null":
                    expect = ANY
                self.send(cat, function, label, method, path, auth=auth, body=body,
                          expect=ANY if ignores_body else expect, measure=True)
            for label, content_type in (("Content-Type text/plain", "text/plain"),
                                        ("Content-Type form", "application/x-www-form-urlencoded"),
                                        ("no Content-Type", None)):
                self.send(cat, function, label, method, path, auth=auth, body=dumps(make()), content_type=content_type,
                          expect=ANY)
            self.send(cat, function, "empty body", method, path, auth=auth, body=b"", expect=ANY)
            for verb in ("PUT", "PATCH", "TRACE", "PROPFIND"):
                self.send(cat, function, f"method {verb}", verb, path, auth=auth, body=dumps(make()), expect=REFUSE)
            # Raw: what an HTTP client would never send.
            base = [("Content-Type", "application/json")]
            bad_auth = [("Authorization", "Bearer forged.not.valid")] if auth else []  # none: it reads none
            good_auth = [("Authorization", auth)] if auth else []
            small = dumps(make())
            self.raw(cat, function, "300 MB declared, 4 KB sent, then half-close",
                     expect=ANY if ignores_body else REFUSE,
                     headers=[*base, *bad_auth, ("Content-Length", str(declared))], body=filler(4096),
                     path=path, close_after_body=True, answer_required=False, read_seconds=5)
            variants = [("forged credential" if auth else "no credential (checks none)", bad_auth)]
            if function in ("deploy_mcp_server", "dtma_heartbeat_ingest"):
                variants.append(("valid credential", good_auth))
            for who, credential in variants:
                probe = self.raw(cat, function, f"300 MB declared, streamed until answered ({who})",
                                 expect=ANY if ignores_body else REFUSE, answer_required=False,
                                 headers=[*base, *credential, ("Content-Length", str(declared))],
                                 body=filler(declared), path=path, cap=cap, send_seconds=8, read_seconds=3)
                self.check_read_before_answer(probe)
            self.raw(cat, function, "chunked 2 MiB", expect=ANY if ignores_body else REFUSE,
                     headers=[*base, *good_auth, ("Transfer-Encoding", "chunked")], body=chunked(2 * MIB),
                     path=path, send_seconds=8, read_seconds=5)
            self.raw(cat, function, "short body (100 of 1000 bytes), then half-close",
                     expect=ANY if ignores_body else REFUSE,
                     headers=[*base, *good_auth, ("Content-Length", "1000")], body=[small[:100]], path=path,
                     close_after_body=True, answer_required=False)
            # Framing: what the body is when the headers disagree about it. The body then sent is valid,
            # so a function that reads no body (mcp_status) or ignores it (the sweep) may well answer 2xx.
            lenient = ANY if ignores_body or optional_body else REFUSE
            for label, extra, payload, expect in (
                    ("Content-Length: -1", [("Content-Length", "-1")], [small], lenient),
                    ("Content-Length: abc", [("Content-Length", "abc")], [small], lenient),
                    ("two different Content-Lengths, then half-close",
                     [("Content-Length", str(len(small))), ("Content-Length", str(len(small) + 5))], [small],
                     ANY if ignores_body else REFUSE),
                    ("Content-Length and chunked", [("Content-Length", "4"), ("Transfer-Encoding", "chunked")],
                     [f"{len(small):x}\r\n".encode() + small + b"\r\n0\r\n\r\n"], ANY),
                    ("chunk size not hex", [("Transfer-Encoding", "chunked")],
                     [b"zz\r\n" + small + b"\r\n0\r\n\r\n"], ANY if ignores_body else REFUSE),
                    ("chunk larger than sent, then half-close", [("Transfer-Encoding", "chunked")],
                     [b"100000\r\n" + small], ANY if ignores_body else REFUSE)):
                self.raw(cat, function, label, expect=expect, headers=[*base, *good_auth, *extra], body=payload,
                         path=path, close_after_body=label.endswith("half-close"), answer_required=False,
                         read_seconds=5)
        self.specific_bodies(cat)

    def check_read_before_answer(self, probe: Probe, limit: int = READ_BEFORE_ANSWER_MIB * MIB) -> None:
        a = probe.answer
        taken = a.sent_at_answer if a.sent_at_answer is not None else a.sent
        if taken is not None and taken > limit:
            when = ("no answer while sending" if a.sent_at_answer is None
                    else f"answered {a.status} after {a.first_byte or 0:.2f} s")
            self.flag("body read before answering", WARN, probe.category, probe.function, probe.case,
                      f"{taken / MIB:.1f} MiB of a body it then refused were taken in ({when}; final answer "
                      f"{a.status}, {a.error or 'ok'})")

    def specific_bodies(self, cat: str) -> None:
        deploy = self.shapes()["deploy_mcp_server"][3]
        for label, field_name, raw in (
                ("container_port true", "container_port", "true"), ("container_port \"80\"", "container_port", '"80"'),
                ("container_port 80.0", "container_port", "80.0"), ("container_port 0", "container_port", "0"),
                ("container_port 65536", "container_port", "65536"), ("host_port true", "host_port", "true"),
                ("host_port \"40000\"", "host_port", '"40000"'), ("image registry:99999/x", "image",
                                                                  '"registry:99999/x"'),
                ("image localhost:0/x", "image", '"localhost:0/x"'), ("image with a newline", "image",
                                                                       '"mcp/everything:latest\\n"'),
                ("image 300 chars", "image", json.dumps("a" * 300)), ("name 64 chars", "name", json.dumps("a" * 64)),
                ("name ../x", "name", '"../x"'), ("transport STDIO", "transport", '"STDIO"'),
                ("capabilities a string", "capabilities", '"tools"'), ("env value a number", "env", '{"A":123}'),
                ("env value null", "env", '{"A":null}'), ("endpoint_path without /", "endpoint_path", '"mcp"'),
                ("toolbox_id 36 dashes", "toolbox_id", json.dumps(DASHES)),
                ("toolbox_id nobody's", "toolbox_id", json.dumps(str(uuid.uuid4()))),
                ("catalog_id nobody's", "catalog_id", json.dumps(str(uuid.uuid4()))),
                ("catalog_id 36 dashes", "catalog_id", json.dumps(DASHES)),
                ("unknown field", "zzz_unknown", "1")):
            self.send(cat, "deploy_mcp_server", label, auth=self.auth_a, expect=REFUSE, measure=True,
                      body=cases.with_field(deploy(), field_name, raw))
        self.send(cat, "deploy_mcp_server", "toolbox_id upper-case (valid)", auth=self.auth_a, expect=ANY,
                  json_body={**deploy(), "toolbox_id": self.box_a.upper()})
        for label, key in (("Idempotency-Key 300 chars", "k" * 300), ("Idempotency-Key with a space", "a b\tc")):
            self.send(cat, "deploy_mcp_server", label, auth=self.auth_a, json_body=deploy(), expect=REFUSE,
                      headers={"Idempotency-Key": key})
        self.raw(cat, "deploy_mcp_server", "Idempotency-Key with non-ASCII bytes", expect=REFUSE,
                 headers=[("Authorization", self.auth_a), ("Content-Type", "application/json"),
                          ("Idempotency-Key", "\xe9t\xe9"), ("Content-Length", str(len(dumps(deploy()))))],
                 body=[dumps(deploy())])
        # manage: ids that are not UUIDs (the route's pattern lets 36 of [0-9a-fA-F-] through).
        for label, path, method in (
                ("path id of 36 dashes /stop", f"/{DASHES}/stop", "POST"),
                ("path id of 36 dashes DELETE", f"/{DASHES}", "DELETE"),
                ("path id of 36 dashes DELETE ?force=true", f"/{DASHES}?force=true", "DELETE"),
                ("path id hex, dashes misplaced", "/0000000000000000000000000000000000-0/start", "POST"),
                ("path id ending in a dash", "/00000000-0000-0000-0000-00000000000-/restart", "POST"),
                ("path id with %00", "/%00/stop", "POST"), ("path traversal", "/..%2f..%2fetc/stop", "POST"),
                ("unknown action", f"/{self.server_a_fuzz}/explode", "POST"),
                ("force=maybe", f"/{self.server_a_fuzz}?force=maybe", "DELETE"),
                ("force twice", f"/{self.server_a_fuzz}?force=true&force=false", "DELETE"),
                ("force on a stop", f"/{self.server_a_fuzz}/stop?force=true", "POST")):
            self.send(cat, "manage_mcp_server", label, method, path, auth=self.auth_a, expect=REFUSE)
        for label, body in (("body instance_id 36 dashes", {"instance_id": DASHES, "action": "stop"}),
                            ("body action STOP", {"instance_id": self.server_a_fuzz, "action": "STOP"}),
                            ("body force \"true\"", {"instance_id": self.server_a_fuzz, "action": "remove",
                                                     "force": "true"}),
                            ("body force 1", {"instance_id": self.server_a_fuzz, "action": "remove", "force": 1}),
                            ("body without action", {"instance_id": self.server_a_fuzz})):
            self.send(cat, "manage_mcp_server", label, auth=self.auth_a, json_body=body, expect=REFUSE)
        # mcp_status: query strings and bodies of the wrong types.
        for label, params in (("?id= 36 dashes", {"id": DASHES}), ("?toolbox_id= 36 dashes", {"toolbox_id": DASHES}),
                              ("?limit=-1", {"limit": "-1"}), ("?limit=10**20", {"limit": str(10 ** 20)}),
                              ("?limit=true", {"limit": "true"}), ("?status=<script>", {"status": "<script>"}),
                              ("?cursor=garbage", {"cursor": "!!!"}),
                              ("?cursor forged (+20:00 offset)", {"cursor": cases.b64url(json.dumps(
                                  {"created_at": "2020-01-01T00:00:00+20:00", "id": str(uuid.uuid4())}))}),
                              ("?cursor forged (year 1)", {"cursor": cases.b64url(json.dumps(
                                  {"created_at": "0001-01-01T00:00:00-23:59", "id": str(uuid.uuid4())}))}),
                              ("?cursor forged (id 36 dashes)", {"cursor": cases.b64url(json.dumps(
                                  {"created_at": "2020-01-01T00:00:00", "id": DASHES}))}),
                              ("?id twice", [("id", self.server_a), ("id", self.server_a_fuzz)]),
                              ("?refresh=maybe", {"refresh": "maybe"})):
            # A cursor whose time has an offset is normalised to UTC: a 200 is right for those two.
            self.send(cat, "mcp_status", label, "GET", params=params, auth=self.auth_a,
                      expect=ANY if label.startswith(("?cursor forged (+", "?cursor forged (year")) else REFUSE)
        self.send(cat, "mcp_status", "path /36 dashes", "GET", f"/{DASHES}", auth=self.auth_a, expect=REFUSE)
        self.send(cat, "mcp_status", "path /a/b", "GET", "/a/b", auth=self.auth_a, expect=REFUSE)
        for label, body in (("body limit true", {"limit": True}), ("body limit \"5\"", {"limit": "5"}),
                            ("body limit 5.0", {"limit": 5.0}), ("body refresh \"yes\"", {"refresh": "yes"}),
                            ("body refresh 1", {"refresh": 1}), ("body id 36 dashes", {"id": DASHES}),
                            ("body unknown field", {"limit": 5, "user_id": self.user_b})):
            self.send(cat, "mcp_status", label, auth=self.auth_a, json_body=body, expect=REFUSE)
        # Heartbeats: types, NUL and surrogates where the database stores them, sizes.
        beat = self.shapes()["dtma_heartbeat_ingest"][3]
        for label, field_name, raw in (
                ("seq \"5\"", "seq", '"5"'), ("seq true", "seq", "true"), ("seq 5.5", "seq", "5.5"),
                ("seq -1", "seq", "-1"), ("seq 2**63", "seq", str(2 ** 63)),
                ("system_status with \\u0000", "system_status", '{"note":"a\\u0000b"}'),
                ("system_status with \\ud800", "system_status", '{"note":"a\\ud800b"}'),
                ("system_status key \\u0000", "system_status", '{"a\\u0000":1}'),
                ("system_status a list", "system_status", "[1,2]"),
                ("dtma_version with \\u0000", "dtma_version", '"0.1\\u0000"'),
                ("dtma_version a number", "dtma_version", "1"),
                ("boot_id with \\u0000", "boot_id", '"a\\u0000b"'), ("boot_id a number", "boot_id", "5"),
                ("tool_statuses an object", "tool_statuses", "{}"),
                ("item id 36 dashes", "tool_statuses",
                 json.dumps([{"account_tool_instance_id": DASHES, "status_on_toolbox": "running"}])),
                ("item container name with \\u0000", "tool_statuses",
                 '[{"id":"x","names":["/a\\u0000"],"state":"running","status":"Up"}]'),
                ("item docker error with \\u0000", "tool_statuses", '[{"error":"down\\u0000"}]'),
                ("item created 1e308", "tool_statuses",
                 '[{"id":"x","names":["/zz-created"],"state":"running","status":"Up","created":1e308}]'),
                ("item status text with \\ud800", "tool_statuses",
                 json.dumps([{"account_tool_instance_id": self.server_a_fuzz, "status_on_toolbox": "running",
                              "runtime_details": {"x": "PLACEHOLDER"}}]).replace("PLACEHOLDER", "\\ud800")),
                ("5001 items", "tool_statuses", json.dumps([{"error": "x"}] * 5001))):
            payload = beat()
            if field_name == "seq":
                payload["boot_id"] = "atk-boot"
            self.send(cat, "dtma_heartbeat_ingest", label, path="/heartbeat", auth=self.tb_auth_a,
                      body=cases.with_field(payload, field_name, raw), measure=True,
                      expect=ANY if label == "item created 1e308" else REFUSE)
        # A beat with oversized blobs still counts (liveness, containers); what it may leave on the
        # toolbox row is bounded: accepted is fine, stored verbatim is the finding.
        big = {**beat(), "system_status": {"note": "x" * 900_000}}
        self.send(cat, "dtma_heartbeat_ingest", "900 KB system_status string", path="/heartbeat", auth=self.tb_auth_a,
                  json_body=big, expect=ANY, measure=True)
        self.send(cat, "dtma_heartbeat_ingest", "100 KB unknown top-level field", path="/heartbeat",
                  auth=self.tb_auth_a, json_body={**beat(), "zz_unknown": "y" * 100_000}, expect=ANY, measure=True)
        self.check_stored_heartbeat(cat)
        self.restore_toolbox(cat)
        # The time to a 401 for a bad toolbox token: with a tiny body, and with a valid 1 MB heartbeat.
        megabyte = cases.heartbeat_of_size(1_000_000)
        times: dict[str, list[float]] = {"small": [], "1 MB": []}
        for _ in range(5):
            for label, body in (("small", dumps(cases.heartbeat(0))), ("1 MB", megabyte)):
                probe = self.send(cat, "dtma_heartbeat_ingest", f"bad token, {label} valid heartbeat",
                                  path="/heartbeat", auth="Bearer " + "0" * 64, body=body, expect=AUTH,
                                  measure=label != "small")
                times[label].append(probe.answer.elapsed * 1000)
        small_ms, big_ms = statistics.median(times["small"]), statistics.median(times["1 MB"])
        self.note(cat, f"time to the 401 for a bad toolbox token: {small_ms:.1f} ms with a small heartbeat, "
                       f"{big_ms:.1f} ms with a valid {len(megabyte) / 1e6:.2f} MB one (medians of 5)")
        if big_ms > max(5 * small_ms, small_ms + 15):
            self.flag("slow refusal", WARN, cat, "dtma_heartbeat_ingest", "bad token with a 1 MB valid heartbeat",
                      f"the 401 takes {big_ms:.0f} ms against {small_ms:.1f} ms for a small body: the body is read "
                      "and parsed before the token is checked")
        self.send(cat, "dtma_heartbeat_ingest", "real token, 1 MB valid heartbeat", path="/heartbeat",
                  auth=self.tb_auth_a, body=megabyte, expect=ANY, measure=True)
        self.restore_toolbox(cat)
        # The worker: ids that are not UUIDs, of the wrong type.
        for label, body in (("command_id 36 dashes", {"command_id": DASHES}),
                            ("command_id a number", {"command_id": 5}), ("command_id null", {"command_id": None}),
                            ("command_id \\u0000", {"command_id": "\u0000"}),
                            ("no command_id", {}), ("command_id nobody's", {"command_id": str(uuid.uuid4())})):
            self.send(cat, "dtma_command_worker", label, json_body=body, auth=self.invoker.get("dtma_command_worker"),
                      expect=ANY if label.endswith("nobody's") else REFUSE)
        # A user with a valid JWT and no auth.users row.
        ghost = f"Bearer {self.jwt_ghost}"
        self.send(cat, "deploy_mcp_server", "no-row user: deploy onto nobody's toolbox", auth=ghost, expect=REFUSE,
                  json_body={**deploy(), "toolbox_id": str(uuid.uuid4())})
        self.send(cat, "deploy_mcp_server", "no-row user: deploy with an Idempotency-Key", auth=ghost, expect=REFUSE,
                  json_body={**deploy(), "toolbox_id": str(uuid.uuid4())}, headers={"Idempotency-Key": "atk-ghost"})
        self.send(cat, "manage_mcp_server", "no-row user: stop with an Idempotency-Key", auth=ghost, expect=REFUSE,
                  path=f"/{uuid.uuid4()}/stop", headers={"Idempotency-Key": "atk-ghost-manage"})
        self.send(cat, "mcp_status", "no-row user: list", "GET", auth=ghost, expect=ANY)

    # -- slow clients --------------------------------------------------------------------------------------

    def cat_slow(self) -> None:
        cat = "slow"
        shapes = self.shapes()
        clients = []
        for n in range(self.options.slow_clients):
            function = FUNCTIONS[n % len(FUNCTIONS)]
            method, path, auth, make, _ = shapes[function]
            body = make()
            if function == "deploy_mcp_server":
                body["toolbox_id"] = str(uuid.uuid4())  # completes as a 404, not a deploy
            data = dumps(body)
            headers = [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
            if auth:
                headers.append(("Authorization", auth))
            head = request_head(method, f"{self.prefix}/{function}{path}", headers)
            dribble_headers = n % 2 == 0
            clients.append(SlowClient(f"{function}: {'headers' if dribble_headers else 'body'} dribbled",
                                      head + data, 8 if dribble_headers else len(head)))
        thread = threading.Thread(target=run_slow_clients, args=(self.address, clients, self.options.slow_seconds,
                                                                 0.5), daemon=True)
        began = time.monotonic()
        thread.start()
        latencies = []
        while thread.is_alive() and time.monotonic() - began < self.options.slow_seconds:
            probe = self.send(cat, "mcp_status", "normal read while slow clients hold connections", "GET",
                              auth=self.auth_a, params={"limit": 5}, expect=ANY)
            latencies.append(probe.answer.elapsed * 1000)
            time.sleep(0.25)
        thread.join(self.options.slow_seconds + 30)
        held, early = 0, []
        for client in clients:
            answer = client.answer or Answer(error="no result")
            if client.closed_by_server_after is None:
                held += 1
            else:
                early.append(f"{client.label} after {client.closed_by_server_after:.1f} s "
                             f"({'answered ' + str(answer.status) if answer.status else 'closed'})")
            self.record(Probe(cat, client.label.split(":")[0], client.label, ANY, answer), answer_required=False)
        worst = max(latencies) if latencies else float("nan")
        self.note(cat, f"{len(clients)} slow clients for {self.options.slow_seconds:g} s: the server held {held} open "
                       f"to the end{'; ended early: ' + '; '.join(early) if early else ''}; {len(latencies)} normal "
                       f"reads meanwhile, slowest {worst:.0f} ms")
        failed = [p for p in self.probes if p.category == cat and p.case.startswith("normal read")
                  and p.answer.status != 200]
        if failed or worst > 2000:
            self.flag("degraded under slow clients", WARN, cat, "mcp_status", "normal reads",
                      f"{len(failed)} failed, slowest {worst:.0f} ms")

    # -- bursts --------------------------------------------------------------------------------------------

    def burst(self, cat: str, function: str, case: str, calls: list[dict[str, Any]]) -> list[Probe]:
        barrier = threading.Barrier(len(calls))

        def one(kwargs: dict[str, Any]) -> Probe:
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait(10)
            return self.send(cat, function, case, **kwargs)

        with ThreadPoolExecutor(len(calls)) as pool:
            return list(pool.map(one, calls))

    def cat_burst(self) -> None:
        cat = "burst"
        n = self.options.burst
        name = self.unique("atk-burst-same")
        body = {"toolbox_id": self.box_a, "name": name, "image": IMAGE, "container_port": 3001}
        probes = self.burst(cat, "deploy_mcp_server", f"{n} deploys, one Idempotency-Key, one body",
                            [{"json_body": body, "auth": self.auth_a, "headers": {"Idempotency-Key": name}}] * n)
        self.check_one_outcome(cat, "deploy_mcp_server", probes, f"{n} deploys, one Idempotency-Key, one body")
        self.count_servers(cat, [name], 1, f"{n} deploys, one Idempotency-Key, one body")
        key = self.unique("atk-burst-key")
        names = [self.unique("atk-burst-diff") for _ in range(n)]
        probes = self.burst(cat, "deploy_mcp_server", f"{n} deploys, one Idempotency-Key, {n} bodies",
                            [{"json_body": {**body, "name": other}, "auth": self.auth_a,
                              "headers": {"Idempotency-Key": key}} for other in names])
        self.count_servers(cat, names, 1, f"{n} deploys, one Idempotency-Key, {n} bodies")
        names = [self.unique("atk-burst-race")] * n
        self.burst(cat, "deploy_mcp_server", f"{n} deploys of one name, no key",
                   [{"json_body": {**body, "name": names[0]}, "auth": self.auth_a}] * n)
        self.count_servers(cat, names[:1], 1, f"{n} deploys of one name, no key")
        key = self.unique("atk-burst-manage")
        probes = self.burst(cat, "manage_mcp_server", f"{n} restarts, one Idempotency-Key",
                            [{"path": f"/{self.server_a_fuzz}/restart", "auth": self.auth_a,
                              "headers": {"Idempotency-Key": key}}] * n)
        self.check_one_outcome(cat, "manage_mcp_server", probes, f"{n} restarts, one Idempotency-Key")
        self.wait_status(self.server_a_fuzz, {"running", "error", "stopped"}, category=cat)
        probes = self.burst(cat, "manage_mcp_server", f"{n} racing stops, no key",
                            [{"path": f"/{self.server_a_fuzz}/stop", "auth": self.auth_a}] * n)
        done = sum(1 for p in probes if p.answer.status in (200, 202))
        self.note(cat, f"{n} racing stops: {done} answered 200/202, the rest "
                       f"{dict(Counter(p.answer.status for p in probes if p.answer.status not in (200, 202)))}")
        self.wait_status(self.server_a_fuzz, {"stopped", "error", "running"}, category=cat)
        beat = cases.heartbeat(0, tool_statuses=[{"account_tool_instance_id": self.server_a,
                                                   "status_on_toolbox": "running"}])
        self.burst(cat, "dtma_heartbeat_ingest", f"{n} parallel heartbeats", [
            {"path": "/heartbeat", "auth": self.tb_auth_a, "json_body": beat}] * n)
        self.restore_toolbox(cat)
        self.burst(cat, "mcp_status", f"{n} parallel refreshes", [
            {"method": "GET", "auth": self.auth_a, "params": {"refresh": "true"}}] * n)
        self.burst(cat, "mcp_status_sweep", f"{n} parallel sweeps",
                   [{"json_body": {}, "auth": self.invoker.get("mcp_status_sweep")}] * n)

    def check_one_outcome(self, cat: str, function: str, probes: list[Probe], case: str) -> None:
        ids = set()
        for probe in probes:
            body = probe.answer.json()
            if isinstance(body, dict) and probe.answer.status in (200, 201, 202):
                ids.add(body.get("id"))
        statuses = Counter(p.answer.status for p in probes)
        self.note(cat, f"{case}: answers {dict(statuses)}, {len(ids)} distinct server id(s)")
        if len(ids) > 1:
            self.flag("idempotency broken", WARN, cat, function, case, f"{len(ids)} different servers answered")

    def count_servers(self, cat: str, names: list[str], most: int, case: str) -> None:
        time.sleep(0.3)
        probe = self.send(cat, "mcp_status", f"count after: {case}", "GET", auth=self.auth_a, params={"limit": 100})
        body = probe.answer.json() or {}
        servers = [s for s in body.get("servers", []) if s.get("name") in set(names)]
        if len(servers) > most:
            self.flag("idempotency broken", WARN, cat, "deploy_mcp_server", case,
                      f"{len(servers)} servers recorded, at most {most} expected")

    # -- fuzz ----------------------------------------------------------------------------------------------

    def cat_fuzz(self) -> None:
        cat = "fuzz"
        shapes = self.shapes()
        rng = self.rng
        jobs: list[dict[str, Any]] = []
        deploy_base = {"toolbox_id": self.box_a, "name": "atk-fuzz-base", "image": IMAGE, "container_port": 3001,
                       "transport": "streamable_http", "endpoint_path": "/mcp", "env": {"A": "b"},
                       "capabilities": ["tools"]}
        for function in FUNCTIONS:
            method, path, auth, make, _ = shapes[function]
            for _ in range(self.options.fuzz_per_function):
                job: dict[str, Any] = {"function": function, "auth": auth, "method": method, "path": path}
                if function == "mcp_status" and rng.random() < 0.5:
                    label, params = cases.query_mutant({"limit": "10"}, rng)
                    job.update(method="GET", params=params, case=f"query {label}")
                elif function == "manage_mcp_server" and rng.random() < 0.4:
                    evil = cases.evil_value(rng, str(uuid.uuid4()))
                    segment = quote(evil if isinstance(evil, str) else json.dumps(evil), safe="",
                                    errors="surrogatepass")
                    action = rng.choice(["stop", "start", "restart", "remove", "", "x"])
                    job.update(path=f"/{segment}/{action}".rstrip("/"), method=rng.choice(["POST", "DELETE"]),
                               case=f"path /{segment[:30]}/{action}")
                else:
                    base = deploy_base if function == "deploy_mcp_server" else make()
                    if function == "manage_mcp_server":
                        base = {"instance_id": rng.choice([self.server_a_fuzz, str(uuid.uuid4())]),
                                "action": rng.choice(["stop", "start", "restart"])}
                    mutant = cases.mutate(base, rng)
                    job.update(body=mutant.body, content_type=mutant.content_type or None, case=mutant.label)
                jobs.append(job)
        rng.shuffle(jobs)
        # Heartbeat mutants last: a lying full container list would disturb the other functions' servers.
        jobs.sort(key=lambda j: j["function"] == "dtma_heartbeat_ingest")
        deadline = time.monotonic() + 300

        def run(job: dict[str, Any]) -> None:
            if time.monotonic() > deadline:
                return
            function, case = job.pop("function"), job.pop("case")
            self.send(cat, function, case, expect=ANY, timeout=10.0, **job)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(run, jobs))
        self.restore_toolbox(cat)
        sent = sum(1 for p in self.probes if p.category == cat)
        if sent < len(jobs):
            self.note(cat, f"stopped at the 300 s bound: {sent} of {len(jobs)} sent")

    # -- the run -------------------------------------------------------------------------------------------

    def run(self) -> None:
        began = time.monotonic()
        with self.monitor.window() as rss:
            self.setup()
        self.category_rss["setup"], self.category_seconds["setup"] = rss, time.monotonic() - began
        for name in CATEGORIES:
            if name not in self.options.only:
                continue
            print(f"== {name}", flush=True)
            began = time.monotonic()
            with self.monitor.window() as rss:
                try:
                    getattr(self, f"cat_{name}")()
                except Exception as exc:  # a category that breaks must not hide the others' findings
                    where = traceback.extract_tb(exc.__traceback__)[-1]
                    self.flag("attack run error", WARN, name, "-", "-",
                              f"{type(exc).__name__}: {exc} (bench/attack at line {where.lineno})")
            self.category_rss[name], self.category_seconds[name] = rss, time.monotonic() - began
            count = sum(1 for p in self.probes if p.category == name)
            print(f"   {count} requests in {self.category_seconds[name]:.1f} s", flush=True)
        if "secrets" not in self.options.only:
            self.scan_log("secrets")


# --- the report ------------------------------------------------------------------------------------------

def _histogram(probes: list[Probe]) -> str:
    counts = Counter("none" if p.answer.status is None else str(p.answer.status) for p in probes)
    return " ".join(f"{k}:{v}" for k, v in sorted(counts.items()))


def _count(findings: Iterable[Finding], kind: str) -> int:
    return sum(1 for f in findings if f.kind == kind)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def rows_by(attack: Attack, key: str, names: Iterable[str]) -> list[list[Any]]:
    rows = []
    for name in names:
        probes = [p for p in attack.probes if getattr(p, key) == name]
        findings = [f for f in attack.findings if getattr(f, key) == name]
        if not probes and not findings:
            continue
        growth = [p.rss["growth"] for p in probes if p.rss]
        slowest = max((p.answer.elapsed for p in probes), default=0) * 1000
        documented = _count(findings, "5xx, documented (upstream)")
        rows.append([name, len(probes), _histogram(probes),
                     f"{_count(findings, '5xx')}" + (f" (+{documented} documented)" if documented else ""),
                     _count(findings, "non-JSON error body"), _count(findings, "database text"),
                     _count(findings, "secret echo"),
                     _count(findings, "auth bypass") + _count(findings, "cross-tenant access")
                     + _count(findings, "cross-tenant effect"),
                     _count(findings, "hostile input accepted"), _count(findings, "body read before answering"),
                     f"{max(growth):.1f}" if growth else "-",
                     f"{attack.category_rss[name]['growth']:.1f}" if key == "category" and name in attack.category_rss
                     else "-", f"{slowest:,.0f}"])
    return rows


HEADERS = ["requests", "status histogram", "5xx", "non-JSON errors", "DB text", "secret echo", "auth/tenant",
           "accepted hostile", "body read first", "max RSS growth, one request (MiB)", "RSS growth, whole (MiB)",
           "slowest ms"]


def report(attack: Attack, elapsed: float) -> tuple[str, dict[str, Any], bool]:
    """(Markdown text, JSON document, failed?)."""
    options = attack.options
    fails = [f for f in attack.findings if f.severity == FAIL]
    warns = [f for f in attack.findings if f.severity == WARN]
    failed = bool(fails) or (options.strict and bool(warns))
    rss_end = attack.monitor.now() / 1024
    pids = ", ".join(f"{pid} ({cmdline(pid)[:60]})" for pid in attack.pids)
    lines = [f"Attack run against {attack.stack.env.get('STACK_URL')} (tree {attack.stack.tree}): "
             f"{len(attack.probes):,} requests in {elapsed:.0f} s (stack start {attack.stack.started_in:.1f} s)",
             f"Serving process(es): {pids}: every function in one process; RSS {attack.rss_start:.0f} MiB at the "
             f"start, {rss_end:.0f} MiB at the end (sampled every 20 ms"
             f"{' plus VmHWM' if attack.monitor.hwm_resettable else ''}).", "",
             "By category:", "",
             _table(["category", *HEADERS], rows_by(attack, "category", ["setup", *CATEGORIES])), "",
             "By function:", "",
             _table(["function", *HEADERS[:-2], HEADERS[-1]],
                    [row[:-2] + row[-1:] for row in rows_by(attack, "function", [*FUNCTIONS, "(stack log)"])]), ""]
    measured = sorted((p for p in attack.probes if p.rss), key=lambda p: p.rss["growth"] if p.rss else 0,
                      reverse=True)[:8]
    if measured:
        lines += ["Largest RSS growth from one request (MiB):", "",
                  _table(["category", "function", "case", "status", "before", "peak", "after", "growth", "ms"],
                         [[p.category, p.function, p.case, p.answer.status, f"{p.rss['before']:.0f}",
                           f"{p.rss['peak']:.0f}", f"{p.rss['after']:.0f}", f"{p.rss['growth']:+.1f}",
                           f"{p.answer.elapsed * 1000:,.0f}"] for p in measured if p.rss]), ""]
    kinds = Counter((f.severity, f.kind) for f in attack.findings)
    lines += [f"Findings: {len(fails)} failing, {len(warns)} warnings" + (" (--strict: warnings fail)"
                                                                           if options.strict else "")]
    for (severity, kind), count in sorted(kinds.items(), key=lambda item: (item[0][0] != FAIL, item[0][1])):
        examples = [f for f in attack.findings if f.kind == kind and f.severity == severity]
        where = Counter(f"{f.function}" for f in examples)
        distinct = {f.key for f in examples}
        lines.append(f"- [{severity.upper()}] {kind}: {count} answer(s), {len(distinct)} distinct "
                     f"({', '.join(f'{k} {v}' for k, v in where.items())})")
        shown: set[str] = set()
        for finding in examples:
            if finding.key in shown or len(shown) >= 6:
                continue
            shown.add(finding.key)
            lines.append(f"    - {finding.category}/{finding.function} \"{finding.case}\": {finding.detail[:400]}")
        if len(distinct) > len(shown):
            lines.append(f"    - ... and {len(distinct) - len(shown)} more distinct (--json lists every one)")
    if attack.notes:
        lines += ["", "Notes:"]
        for category, notes in attack.notes.items():
            lines += [f"- {category}: {note}" for note in notes]
    lines.append("")
    lines.append(("FAILED" if failed else "PASSED") + f": {len(fails)} failing finding(s), {len(warns)} warning(s)")
    document = {
        "stack": {"url": attack.stack.env.get("STACK_URL"), "tree": str(attack.stack.tree), "pids": attack.pids,
                  "rss_start_mib": attack.rss_start, "rss_end_mib": rss_end},
        "elapsed_s": elapsed, "requests": len(attack.probes),
        "options": {k: v for k, v in vars(options).items()},
        "categories": {row[0]: dict(zip(["requests", "statuses", "5xx", "non_json", "db_text", "secret_echo",
                                          "auth_tenant", "accepted", "read_first", "max_rss_growth_one",
                                          "rss_growth_whole", "slowest_ms"], row[1:], strict=True))
                       for row in rows_by(attack, "category", ["setup", *CATEGORIES])},
        "findings": [vars(f) for f in attack.findings], "notes": attack.notes,
        "probes": [p.summary() for p in attack.probes], "failed": failed,
    }
    return "\n".join(lines), document, failed


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.attack", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="~1,400 requests (fewer fuzz cases, 20-call bursts, "
                                                             "5 s of slow clients)")
    parser.add_argument("--json", type=Path, help="write every finding and request summary here")
    parser.add_argument("--strict", action="store_true", help="warnings fail the run too")
    parser.add_argument("--only", nargs="*", choices=CATEGORIES, metavar="CATEGORY",
                        help="some categories: " + " ".join(CATEGORIES))
    parser.add_argument("--fuzz-per-function", type=int, help="fuzz requests per function (default 770; --quick 100)")
    parser.add_argument("--stream-cap-mib", type=int, default=64,
                        help="most bytes sent into one lying 300 MB body (default 64)")
    parser.add_argument("--rss-limit-mib", type=float, default=150.0,
                        help="growth of the serving process from one request that fails the run (default 150)")
    parser.add_argument("--seed", type=int, default=Options.seed)
    parser.add_argument("--tree", type=Path, default=ROOT,
                        help="serve the stack from this checkout (default: this one)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (stack log, database)")
    args = parser.parse_args(argv)
    if not 1 <= args.stream_cap_mib <= 512:
        parser.error("--stream-cap-mib must be 1-512")
    options = Options(fuzz_per_function=args.fuzz_per_function if args.fuzz_per_function is not None
                      else (100 if args.quick else 770),
                      burst=20 if args.quick else 50, slow_seconds=5.0 if args.quick else 10.0,
                      stream_cap_mib=args.stream_cap_mib, rss_limit_mib=args.rss_limit_mib, seed=args.seed,
                      strict=args.strict, only=tuple(args.only or CATEGORIES))
    if not 0 <= options.fuzz_per_function <= 5000:
        parser.error("--fuzz-per-function must be 0-5000")
    signal.signal(signal.SIGTERM, _interrupt)  # stop the stack on SIGTERM too (the finally below)
    began = time.monotonic()
    stack = LocalStack(args.tree.resolve(), keep=args.keep)
    print(f"starting the local stack from {stack.tree} (state in {stack.tmp})", flush=True)
    attack = None
    try:
        stack.start()
        attack = Attack(stack, options)
        print(f"stack ready at {stack.env['STACK_URL']} in {stack.started_in:.1f} s; serving pid(s) {attack.pids}",
              flush=True)
        attack.run()
        text, document, failed = report(attack, time.monotonic() - began)
    except StackError as exc:
        print(f"attack: {exc}", file=sys.stderr)
        return 2
    finally:
        if attack is not None:
            attack.close()
        stack.stop()  # on every path: the stack, its stand-in and its database
    print()
    print(text)
    if args.json:
        args.json.write_text(json.dumps(document, indent=1, default=str))
        print(f"JSON written to {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
