"""`./deploy.sh local` (= `python -m devstack.stack`): the whole system on this machine.

One process runs: PostgreSQL (embedded, or DATABASE_URL), the functions on one port under
`/functions/v1/<name>` and `/<name>`, a DTMA stand-in that heartbeats to them as a seeded demo
toolbox, a sweep every N seconds in place of Cloud Scheduler, and a Cloud Tasks emulator
(devstack.cloud_tasks) that queues the agent commands and delivers them to dtma_command_worker
as Cloud Tasks does in production. It writes `.local/stack.env`
for scripts and the web app, prints what a person needs to try it, and on Ctrl-C or SIGTERM
stops everything it started, the database included, so nothing keeps running.

Why one process: the functions are WSGI apps and the stand-in is a thread-served HTTP server,
so one interpreter hosts all of it and shuts it down in order. PostgreSQL is the only other
process; it is stopped on every exit path, and if the stack itself was killed (SIGKILL), the
next start takes the orphaned server over and stops it at the end (devstack.database).
"""

from __future__ import annotations

import argparse
import json
import logging
import logging.handlers
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

from devstack import database, embedded_pg, seed
from devstack.server import PREFIX, Dispatcher, HttpServer, load_function
from shared.core.config import ConfigError

log = logging.getLogger("devstack.stack")

ROOT = Path(__file__).resolve().parents[1]
#: Receives every agent command from the task queue (IAM-private in production).
COMMAND_WORKER = "dtma_command_worker"
FUNCTIONS = (
    "deploy_mcp_server",
    "manage_mcp_server",
    "mcp_status",
    "mcp_status_sweep",
    "dtma_heartbeat_ingest",
    # Served once its source exists, so a checkout without it still starts.
    *((COMMAND_WORKER,) if (ROOT / "functions" / COMMAND_WORKER / "main.py").is_file() else ()),
)
#: The queue the functions put agent commands on, and who Cloud Tasks' OIDC token names.
COMMAND_QUEUE = "projects/local/locations/local/queues/dtma-commands"
COMMAND_INVOKER_SA = "dtma-commands@local.test"
#: Who the scheduled sweep's OIDC token names (Cloud Scheduler's service account in production).
SWEEP_INVOKER_SA = "mcp-sweep-invoker@local.test"
HOST = "127.0.0.1"
DEFAULT_PORT = 54321  # Supabase CLI's API port: a web app pointed at local Supabase finds the functions here
READY = "MCP local stack ready at"


class StartupError(RuntimeError):
    """The stack cannot start; the message says why and what to do."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM arrived while starting."""


# The functions' liveness settings (shared/core/config.py's defaults: the real DTMA beats every 60 s) and
# the stand-in's own period. They are separate on purpose: a real agent registered on the local stack
# beats every 60 s, whatever the stand-in does. The demo shortens both so a silent toolbox shows in
# seconds; the stand-in never beats less often than the functions expect.
FUNCTIONS_HEARTBEAT_INTERVAL = 60
FUNCTIONS_HEARTBEAT_GRACE = 30
STANDIN_HEARTBEAT_INTERVAL = 10.0
DEMO_FUNCTIONS_HEARTBEAT_INTERVAL = 2
DEMO_FUNCTIONS_HEARTBEAT_GRACE = 1
DEMO_STANDIN_HEARTBEAT_INTERVAL = 1.0
STACK_ENV = "stack.env"


@dataclass(frozen=True)
class Options:
    port: int
    dtma_port: int
    data_dir: Path
    state_dir: Path
    reset: bool
    demo: bool
    sweep_interval: float
    #: The stand-in's own heartbeat period (seconds).
    standin_heartbeat_interval: float
    pull_delay: float
    #: HEARTBEAT_INTERVAL_SECONDS / HEARTBEAT_GRACE_SECONDS of the functions.
    functions_heartbeat_interval: int = FUNCTIONS_HEARTBEAT_INTERVAL
    functions_heartbeat_grace: int = FUNCTIONS_HEARTBEAT_GRACE
    #: Port of the Cloud Tasks emulator (0: a free one).
    tasks_port: int = 0
    #: Whether mcp_status_sweep checks its caller's OIDC token, as on Google Cloud (the worker always does).
    sweep_oidc: bool = False

    @property
    def stale_after(self) -> int:
        """Seconds of silence after which the functions call a toolbox stale (shared/core/config.py)."""
        return 3 * self.functions_heartbeat_interval + self.functions_heartbeat_grace

    @property
    def functions_env(self) -> dict[str, str]:
        """Timing settings of the functions: the demo's are short so a silent toolbox shows in seconds."""
        env = {
            "HEARTBEAT_INTERVAL_SECONDS": str(self.functions_heartbeat_interval),
            "HEARTBEAT_GRACE_SECONDS": str(self.functions_heartbeat_grace),
        }
        if self.demo:
            env["DTMA_DEPLOY_BUDGET_SECONDS"] = "0.5"
        return env


class StopSignal:
    """Ctrl-C and SIGTERM set an event instead of raising wherever the main thread happens to be.

    Raising KeyboardInterrupt inside pgserver's start or a migration could leave a half-started
    server behind; the steps check the event between themselves instead, and shutdown runs once.
    """

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signal_name = ""
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.event.is_set():
            print(
                f"\n{signal.Signals(signum).name} again: still stopping, please wait",
                file=sys.stderr,
                flush=True,
            )
            return
        self.signal_name = signal.Signals(signum).name
        self.event.set()

    def check(self) -> None:
        if self.event.is_set():
            raise Interrupted


class SweepLoop:
    """POSTs mcp_status_sweep every `interval` seconds, as Cloud Scheduler does in production: with an
    OIDC token (`token()`, a fresh one each time) for the sweep's URL."""

    def __init__(self, url: str, interval: float, token: Callable[[], str] | None = None) -> None:
        self.url = url
        self.interval = interval
        self.token = token
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stack-sweep", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        with httpx.Client(timeout=30.0, trust_env=False) as client:
            while not self._stop.wait(self.interval):
                try:
                    headers = {"Authorization": f"Bearer {self.token()}"} if self.token else {}
                    response = client.post(self.url, json={}, headers=headers)
                    if response.status_code != 200:
                        log.warning("scheduled sweep answered %s: %s", response.status_code, response.text[:300])
                except httpx.HTTPError as exc:
                    if not self._stop.is_set():
                        log.warning("scheduled sweep failed: %s", exc)


def _set_function_env(values: dict[str, str], timing: dict[str, str]) -> list[str]:
    """The environment every function reads at start (as `gcloud --set-env-vars` would set it).

    `timing` is Options.functions_env, already resolved from the options and the environment
    (parse_args), so it is set as is: the banner then says what the functions really use.

    Settings that point at a real Supabase project are dropped (and named in the result): with
    them the functions would verify tokens against that project, not the local stack's secret.
    """
    ignored = []
    for name in (
        "SUPABASE_URL",
        "SUPABASE_JWKS_URL",
        "SUPABASE_JWT_ISSUER",
        "K_SERVICE",
        # Who may call the sweep and the worker: the stack's own issuer, never one from the shell.
        "SWEEP_INVOKER_SA",
        "SWEEP_INVOKER_AUDIENCE",
        "WORKER_INVOKER_SA",
        "WORKER_INVOKER_AUDIENCE",
        "INVOKER_JWKS_URL",
        "INVOKER_ISSUER",
        "SUPABASE_SECRET_KEY",
        "SUPABASE_SERVICE_ROLE_KEY",
        "BACKEND_TO_DTMA_API_KEY",
    ):
        if os.environ.pop(name, None) is not None:
            ignored.append(name)
    os.environ.update(values)
    os.environ.update(timing)
    return ignored


def command_queue_env(tasks_url: str, base_url: str) -> dict[str, str]:
    """How the functions queue agent commands locally: the Cloud Tasks emulator, delivering to this stack.

    The same settings as in production, where CLOUD_TASKS_API_URL is Google's API and the worker's
    URL its Cloud Run URL (the stack serves it under /functions/v1 like every other function).
    """
    return {
        "TASKS_MODE": "cloud_tasks",
        "CLOUD_TASKS_API_URL": tasks_url,
        "COMMAND_QUEUE": COMMAND_QUEUE,
        "COMMAND_WORKER_URL": f"{base_url}{PREFIX}/{COMMAND_WORKER}",
        "COMMAND_INVOKER_SA": COMMAND_INVOKER_SA,
    }


def invoker_env(jwks_url: str, issuer: str, base_url: str, *, sweep: bool) -> dict[str, str]:
    """Who may call the worker (and, with `sweep`, the sweep) locally: as on Google Cloud, each checks
    its caller's RS256 OIDC token, here minted by the Cloud Tasks emulator's issuer (its JWKS and
    `iss`) instead of Google. The audiences are the URLs the emulator and the sweep loop call."""
    env = {
        "INVOKER_JWKS_URL": jwks_url,
        "INVOKER_ISSUER": issuer,
        "WORKER_INVOKER_SA": COMMAND_INVOKER_SA,
        "WORKER_INVOKER_AUDIENCE": f"{base_url}{PREFIX}/{COMMAND_WORKER}",
    }
    if sweep:
        env.update(SWEEP_INVOKER_SA=SWEEP_INVOKER_SA, SWEEP_INVOKER_AUDIENCE=f"{base_url}{PREFIX}/mcp_status_sweep")
    return env


def database_url_to_use(environ_url: str | None, state_dir: Path) -> tuple[str | None, str | None]:
    """(DATABASE_URL to use, or None for the embedded database; a note to print, or None).

    After `set -a; . .local/stack.env; set +a` the shell holds the DATABASE_URL of the stack's own
    embedded database. A later `./deploy.sh local` must not take that for an external database
    (the embedded server it names is stopped with the stack), so a DATABASE_URL equal to the one
    the stack wrote for its embedded database means "the embedded database". stack.env says which
    kind it wrote (DATABASE_KIND); files written before that key existed are judged by the URL: the
    embedded server's socket lives in its data directory.
    """
    if not environ_url:
        return None, None
    written = seed.read_env_file(state_dir / STACK_ENV)
    if written.get("DATABASE_URL") != environ_url:
        return environ_url, None
    kind = written.get("DATABASE_KIND")
    embedded = kind == "embedded" if kind is not None else _socket_in_data_dir(environ_url)
    if not embedded:
        return environ_url, None
    source = _relative(state_dir / STACK_ENV)
    return None, f"DATABASE_URL in the environment is the embedded database {source} names: starting that one"


def _socket_in_data_dir(url: str) -> bool:
    from psycopg.conninfo import conninfo_to_dict

    try:
        host = str(conninfo_to_dict(url).get("host") or "")
    except Exception:
        return False
    return host.startswith("/") and (Path(host) / "PG_VERSION").is_file()


def _log_to_file(path: Path) -> logging.Handler:
    from shared.adapters.logging import RedactingFilter

    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=5_000_000, backupCount=2, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return handler


def _close_handler(handler: logging.Handler) -> None:
    logging.getLogger().removeHandler(handler)
    handler.close()


def _quiet_console() -> None:
    """During the demo the terminal shows the walkthrough; function logs still go to the file."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)


class Stack:
    """Starts the parts in order and stops, in reverse, exactly what was started."""

    def __init__(self, options: Options, stop: StopSignal, out: Any = None) -> None:
        self.options = options
        self.stop_signal = stop
        self.out = out or sys.stdout
        self._cleanup = ExitStack()
        self.dispatcher = Dispatcher(FUNCTIONS, self.openapi)
        self.base_url = ""
        self.env: dict[str, str] = {}
        self._spec: dict[str, Any] | None = None
        self.db: database.LocalDatabase | None = None

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def openapi(self) -> dict[str, Any]:
        """The document in the repository (tests keep it equal to what devstack.openapi generates)."""
        if self._spec is None:
            from devstack.openapi import OUTPUT, build

            self._spec = json.loads(OUTPUT.read_text()) if OUTPUT.is_file() else build()
        return self._spec

    def _step(self, text: str, action: Callable[[], Any]) -> Any:
        """Run one start-up step and report it on one line (after it, so log lines cannot split it)."""
        self.stop_signal.check()
        began = time.monotonic()
        result = action()
        self.say(f"  {text}: done ({time.monotonic() - began:.1f} s)")
        return result

    def start(self) -> None:
        opts = self.options
        self.say("Starting the MCP control plane locally")
        log_file = opts.state_dir / "stack.log"
        self._cleanup.callback(_close_handler, _log_to_file(log_file))
        try:
            # Bound first, so a port clash is reported before anything slow starts.
            server = HttpServer(HOST, opts.port, self.dispatcher)
        except OSError as exc:
            raise StartupError(
                f"cannot listen on {HOST}:{opts.port}: {exc.strerror or exc}. Another local stack? "
                "Stop it, or pass --port N (0 picks a free port)."
            ) from None
        self._cleanup.callback(server.stop)  # only closes the socket if serving never started
        self.base_url = f"http://{HOST}:{server.port}"
        self.dispatcher.base_url = self.base_url
        functions_url = self.base_url + PREFIX

        database_url, note = database_url_to_use(os.environ.get("DATABASE_URL"), opts.state_dir)
        if note:
            self.say(f"    {note}")
        db = self._step(
            "database",
            lambda: database.open_database(database_url, opts.data_dir, reset_first=opts.reset),
        )
        if db.embedded is not None:
            self._cleanup.callback(self._stopped_db, db)
        if db.pruned:
            self.say(
                f"    released the database handle of a stack that was killed (pid {', '.join(map(str, db.pruned))})"
            )
        applied = len(db.report.applied)
        self.say(
            f"    {db.description}; {applied} migration(s) applied"
            f"{', ' + str(len(db.report.already_applied)) + ' already' if db.report.already_applied else ''}"
        )

        secrets = seed.load_or_create_secrets(opts.state_dir)
        seeded = self._step("seeding the demo user and toolbox", lambda: seed.seed(db.uri, secrets.dtma_key_secret))
        # Before the functions load: they read CLOUD_TASKS_API_URL at start.
        tasks = self._step("Cloud Tasks emulator", self._start_cloud_tasks)
        if COMMAND_WORKER not in FUNCTIONS:
            self.say(
                f"    functions/{COMMAND_WORKER}/main.py does not exist: queued agent commands will not be delivered"
            )
        ignored = _set_function_env(
            {
                **command_queue_env(tasks.url, self.base_url),
                **invoker_env(tasks.oidc_jwks_url, tasks.oidc.issuer, self.base_url, sweep=opts.sweep_oidc),
                "DATABASE_URL": db.uri,
                "DB_TRANSPORT": "postgres",
                "SUPABASE_JWT_SECRET": secrets.jwt_secret,
                "DTMA_KEY_SECRET": secrets.dtma_key_secret,
                "IDEMPOTENCY_SECRET": secrets.idempotency_secret,
                "DTMA_KEY_MODE": "derived",
                "ALLOW_PRIVATE_TOOLBOX_IPS": "true",
                "CORS_ALLOWED_ORIGINS": "*",
                "LOG_FORMAT": "text",
                "NO_GCE_CHECK": "true",
            },
            opts.functions_env,
        )
        if ignored:
            self.say(f"    ignoring {', '.join(ignored)} from the environment: the local stack uses its own secrets")

        def load_all() -> None:
            from shared.adapters import db as shared_db

            self._cleanup.callback(self._stopped, "database pools", shared_db.close_all)
            for name in FUNCTIONS:
                self.dispatcher.mount(load_function(name, ROOT / "functions"))

        self._step(f"loading {len(FUNCTIONS)} functions", load_all)
        if opts.demo:
            _quiet_console()
        server.start()
        # Stops before the database pools close, so no request runs against a closed pool.
        self._cleanup.callback(self._stopped, "HTTP server", server.stop)
        # Dispatching stops before the HTTP server does (no delivery hits a closed port); the
        # emulator itself stops later, so a function still answering can queue a command.
        self._cleanup.callback(tasks.pause, True)

        from devstack.dtma_standin import StandInAgent

        agent = StandInAgent(
            seeded.toolbox_token,
            host=HOST,
            port=opts.dtma_port,
            pull_delay=opts.pull_delay,
            heartbeat_url=f"{functions_url}/dtma_heartbeat_ingest",
            heartbeat_interval=opts.standin_heartbeat_interval,
        )
        try:
            agent.start()
        except OSError as exc:
            raise StartupError(
                f"the DTMA stand-in cannot listen on {HOST}:{opts.dtma_port}: {exc.strerror or exc}; "
                "pass --dtma-port N (0 picks a free port)"
            ) from None
        self._cleanup.callback(self._stopped, "DTMA stand-in", agent.stop)
        seed.set_dtma_port(db.uri, seeded.toolbox_id, agent.port)
        self._step("first heartbeat from the stand-in", lambda: self._first_heartbeat(agent))

        if opts.sweep_interval > 0:
            sweep_url = f"{functions_url}/mcp_status_sweep"
            sweep = SweepLoop(sweep_url, opts.sweep_interval, lambda: tasks.mint_token(sweep_url, SWEEP_INVOKER_SA))
            sweep.start()
            self._cleanup.callback(self._stopped, "sweep loop", sweep.stop)

        jwt = seed.mint_jwt(secrets.jwt_secret, sub=seeded.user_id, role="authenticated", email=seed.DEMO_EMAIL)
        self.env = {
            "FUNCTIONS_URL": functions_url,
            "STACK_URL": self.base_url,
            "OPENAPI_URL": f"{self.base_url}/openapi.json",
            "SUPABASE_JWT_SECRET": secrets.jwt_secret,
            "SUPABASE_ANON_KEY": seed.mint_jwt(
                secrets.jwt_secret, sub=None, role="anon", lifetime_seconds=10 * 365 * 24 * 3600
            ),
            "DEMO_USER_ID": seeded.user_id,
            "DEMO_USER_EMAIL": seed.DEMO_EMAIL,
            "DEMO_USER_JWT": jwt,
            "DEMO_TOOLBOX_ID": seeded.toolbox_id,
            "DEMO_TOOLBOX_TOKEN": seeded.toolbox_token,
            "DTMA_STANDIN_URL": agent.url,
            "CLOUD_TASKS_URL": tasks.url,
            "DTMA_KEY": seeded.toolbox_token,
            "DATABASE_URL": db.uri,
            # Tells the next start that this DATABASE_URL is the stack's own (database_url_to_use).
            "DATABASE_KIND": "embedded" if db.embedded is not None else "external",
            "LOG_FILE": str(log_file),
        }
        self.env["DEMO_USER_PASSWORD"] = self._mount_web_console(seeded.user_id, secrets.jwt_secret)
        if opts.sweep_oidc:
            # A sweep by hand needs what the scheduler sends: an ID token of its account (24 h here).
            self.env["SWEEP_TOKEN"] = tasks.mint_token(f"{functions_url}/mcp_status_sweep", SWEEP_INVOKER_SA,
                                                       lifetime_seconds=24 * 3600)
        seed.write_env_file(
            opts.state_dir / STACK_ENV,
            self.env,
            f"Written by `./deploy.sh local` at {time.strftime('%Y-%m-%d %H:%M:%S')}; valid while "
            "it runs.\nDEMO_USER_JWT expires after 24 h (re-minted at every start).",
        )
        self.db = db
        self.print_banner()

    def _mount_web_console(self, user_id: str, jwt_secret: str) -> str:
        """Serve web/ at `/` with its config and the demo user's sign-in (devstack/web.py); the password."""
        from devstack import web

        password = web.demo_password(self.options.state_dir)
        self.dispatcher.web = web.WebConsole(
            base_url=self.base_url, anon_key=self.env["SUPABASE_ANON_KEY"], jwt_secret=jwt_secret,
            user=web.DemoUser(user_id=user_id, email=seed.DEMO_EMAIL, password=password))
        missing = web.bundle_missing()
        if missing:
            self.say(f"    web console: {missing}")
        return password

    def _start_cloud_tasks(self) -> Any:
        from devstack.cloud_tasks import CloudTasksEmulator

        try:
            emulator = CloudTasksEmulator(HOST, self.options.tasks_port)
        except OSError as exc:
            raise StartupError(
                f"the Cloud Tasks emulator cannot listen on {HOST}:{self.options.tasks_port}: "
                f"{exc.strerror or exc}; pass --tasks-port N (0 picks a free port)"
            ) from None
        emulator.start()
        self._cleanup.callback(self._stopped, "Cloud Tasks emulator", emulator.stop)
        return emulator

    def _first_heartbeat(self, agent: Any, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while agent.last_heartbeat_status != 204:
            self.stop_signal.check()
            if time.monotonic() > deadline:
                raise StartupError(
                    f"the stand-in's heartbeat was not accepted within {timeout:g} s (last answer: "
                    f"{agent.last_heartbeat_status}); see {self.options.state_dir / 'stack.log'}"
                )
            time.sleep(0.05)

    def print_banner(self) -> None:
        env, o = self.env, self.options
        url, standin = env["FUNCTIONS_URL"], env["DTMA_STANDIN_URL"]
        rel = _relative(o.state_dir / STACK_ENV)
        sweep = f"every {o.sweep_interval:g} s (as Cloud Scheduler would)" if o.sweep_interval > 0 else "off"
        auth = '-H "Authorization: Bearer $JWT"'
        as_json = "-H 'Content-Type: application/json'"
        deploy = json.dumps({"toolbox_id": env["DEMO_TOOLBOX_ID"], "name": "my-mcp", "image": "mcp/everything:latest"})
        every = f"{o.standin_heartbeat_interval:g}"
        beat = json.dumps({"dtma_version": "0.1.0", "system_status": {}, "tool_statuses": []})
        text = [
            "",
            f"{READY} {self.base_url}",
            "",
            f"  functions       {url}/<name>   (also {self.base_url}/<name>)",
            f"                  {', '.join(FUNCTIONS)}",
            f"  OpenAPI         {env['OPENAPI_URL']}",
            f"  database        {self.db.description if self.db else ''}",
            f"                  {env['DATABASE_URL']}",
            f"  DTMA stand-in   {standin}  (toolbox {seed.DEMO_TOOLBOX_NAME} {env['DEMO_TOOLBOX_ID']};",
            f"                  heartbeat every {every} s; control it under /_standin/)",
            f"  liveness        the functions expect a heartbeat every {o.functions_heartbeat_interval} s "
            f"(HEARTBEAT_INTERVAL_SECONDS; grace {o.functions_heartbeat_grace} s):",
            f"                  a toolbox silent for {o.stale_after} s reads unknown; the sweep marks it unresponsive",
            f"  sweep           {sweep}",
            f"  Cloud Tasks     {env.get('CLOUD_TASKS_URL', '(not started)')}  (emulator; agent commands queue on",
            f"                  {COMMAND_QUEUE.rsplit('/', 1)[-1]} -> {COMMAND_WORKER}; "
            "tasks: GET /_emulator/tasks)",
            f"  demo user       {env['DEMO_USER_EMAIL']}  {env['DEMO_USER_ID']}",
            f"  web console     {self.base_url}/  (sign in as {env['DEMO_USER_EMAIL']}, password "
            f"{env.get('DEMO_USER_PASSWORD', '')})",
            f"  stack.env       {rel}  (all of the above: set -a; . {rel}; set +a)",
            f"  logs            stderr, and {_relative(Path(env['LOG_FILE']))}",
            "",
            "The demo user's JWT (HS256, valid 24 h; DEMO_USER_JWT in stack.env) and the toolbox's token:",
            f"  export JWT={env['DEMO_USER_JWT']}",
            f"  export TOKEN={env['DEMO_TOOLBOX_TOKEN']}",
            "",
            "Try it:",
            "  # deploy an MCP server (201 running, or 202 while the image is still being pulled)",
            f"  curl -sS -X POST {url}/deploy_mcp_server {auth} {as_json} \\",
            f"    -d '{deploy}'",
            "  # status of all your MCP servers (or ?id=<id>)",
            f"  curl -sS {url}/mcp_status {auth}",
            "  # stop / start / restart / remove one",
            f"  curl -sS -X POST {url}/manage_mcp_server {auth} {as_json} \\",
            """    -d '{"instance_id": "<id>", "action": "stop"}'""",
            "  # one sweep now (what Cloud Scheduler does every minute in production)",
            *([f"  export SWEEP_TOKEN={env['SWEEP_TOKEN']}  # the scheduler's OIDC token (SWEEP_TOKEN in stack.env)",
               f'  curl -sS -X POST {url}/mcp_status_sweep -H "Authorization: Bearer $SWEEP_TOKEN"']
              if env.get("SWEEP_TOKEN") else [f"  curl -sS -X POST {url}/mcp_status_sweep"]),
            f"  # a heartbeat as the toolbox's agent sends it (the stand-in does, every {every} s)",
            f'  curl -sS -X POST {url}/dtma_heartbeat_ingest/heartbeat -H "Authorization: Bearer $TOKEN" \\',
            f"    {as_json} -d '{beat}'",
            "  # make the toolbox go silent (its servers turn unknown), then bring it back",
            f"  curl -sS -X POST {standin}/_standin/heartbeats/pause",
            f"  curl -sS -X POST {standin}/_standin/heartbeats/resume",
            "",
        ]
        self.say("\n".join(text))

    def wait(self) -> None:
        self.say("Serving. Press Ctrl-C to stop (stops the functions, the stand-in, Cloud Tasks and PostgreSQL).")
        self.stop_signal.event.wait()

    def _stopped(self, what: str, action: Callable[[], Any]) -> None:
        try:
            action()
        except Exception:
            log.exception("stopping %s failed", what)
            self.say(f"  {what}: could not stop cleanly (see the log)")
        else:
            self.say(f"  {what} stopped")

    def _stopped_db(self, db: database.LocalDatabase) -> None:
        try:
            self.say(f"  {db.stop()}")
        except database.DatabaseError as exc:
            self.say(f"  {exc}")
            raise

    def shutdown(self) -> None:
        """Stop, in reverse order of start, everything that was started; safe to call twice."""
        self.say("Stopping the local stack")
        self._cleanup.close()


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def parse_args(argv: Sequence[str] | None, environ: Mapping[str, str] | None = None) -> Options:
    """The options; `environ` (default os.environ) supplies HEARTBEAT_* when no flag sets them."""
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="./deploy.sh local",
        description=(
            "Run every function on one port with an embedded PostgreSQL and a DTMA stand-in toolbox; "
            "Ctrl-C or SIGTERM stops all of it."
        ),
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"port of the functions (default {DEFAULT_PORT}; 0 picks a free one)",
    )
    parser.add_argument("--dtma-port", type=int, default=0, help="port of the DTMA stand-in (default: a free one)")
    parser.add_argument(
        "--tasks-port", type=int, default=0, help="port of the Cloud Tasks emulator (default: a free one)"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="embedded PostgreSQL data directory, kept between runs (default: one per checkout "
        "under the temp folder); ignored when DATABASE_URL names another database (the DATABASE_URL "
        "this stack wrote to stack.env for its embedded database counts as unset)",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=ROOT / ".local",
        help="where secrets.env, stack.env and stack.log live (default: .local/)",
    )
    parser.add_argument("--reset", action="store_true", help="wipe the embedded database first")
    parser.add_argument(
        "--sweep-oidc",
        action="store_true",
        help="mcp_status_sweep checks its caller's OIDC token, as on Google Cloud (the scheduled sweep sends "
        "one; a sweep by hand then needs SWEEP_TOKEN from stack.env). The command worker always checks the "
        "Cloud Tasks emulator's token",
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="run the scripted walkthrough, then stop; exit status 0 only if it passed",
    )
    parser.add_argument(
        "--sweep-interval",
        type=float,
        default=15.0,
        help="seconds between scheduled sweeps (0: none; default 15)",
    )
    parser.add_argument(
        "--functions-heartbeat-interval",
        type=int,
        default=None,
        metavar="SECONDS",
        help="the functions' HEARTBEAT_INTERVAL_SECONDS: how often they expect each toolbox's heartbeat "
        f"(default ${{HEARTBEAT_INTERVAL_SECONDS}}, else {FUNCTIONS_HEARTBEAT_INTERVAL}, the real agent's period; "
        f"--demo: {DEMO_FUNCTIONS_HEARTBEAT_INTERVAL})",
    )
    parser.add_argument(
        "--functions-heartbeat-grace",
        type=int,
        default=None,
        metavar="SECONDS",
        help="the functions' HEARTBEAT_GRACE_SECONDS: a toolbox silent for 3 intervals + this is stale "
        f"(default ${{HEARTBEAT_GRACE_SECONDS}}, else {FUNCTIONS_HEARTBEAT_GRACE}; "
        f"--demo: {DEMO_FUNCTIONS_HEARTBEAT_GRACE})",
    )
    parser.add_argument(
        "--standin-heartbeat-interval",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"the DTMA stand-in's own heartbeat period (default {STANDIN_HEARTBEAT_INTERVAL:g}; "
        f"--demo: {DEMO_STANDIN_HEARTBEAT_INTERVAL:g}); at most the functions' interval",
    )
    parser.add_argument(
        "--heartbeat-interval",
        dest="deprecated_heartbeat_interval",
        type=float,
        default=None,
        metavar="SECONDS",
        help="deprecated: the same as --standin-heartbeat-interval (it no longer changes the functions' "
        "interval; that is --functions-heartbeat-interval)",
    )
    parser.add_argument(
        "--pull-delay",
        type=float,
        default=None,
        help="seconds the stand-in takes to pull an image (default 0.5; --demo: 2)",
    )
    args = parser.parse_args(argv)
    if args.demo and args.sweep_oidc:
        parser.error("--sweep-oidc does not go with --demo: the walkthrough sweeps by hand, without a token")
    for name in ("port", "dtma_port", "tasks_port"):
        if not 0 <= getattr(args, name) <= 65535:
            parser.error(f"--{name.replace('_', '-')} must be 0..65535")

    def from_env(name: str, minimum: int) -> int | None:
        """HEARTBEAT_* from the environment (not in --demo, whose timing is its own)."""
        raw = env.get(name, "").strip()
        if args.demo or not raw:
            return None
        try:
            value = int(raw)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            parser.error(f"{name}={raw!r} in the environment is not a whole number >= {minimum}")
        return value

    interval = args.functions_heartbeat_interval
    if interval is None:
        interval = from_env("HEARTBEAT_INTERVAL_SECONDS", 1)
    if interval is None:
        interval = DEMO_FUNCTIONS_HEARTBEAT_INTERVAL if args.demo else FUNCTIONS_HEARTBEAT_INTERVAL
    grace = args.functions_heartbeat_grace
    if grace is None:
        grace = from_env("HEARTBEAT_GRACE_SECONDS", 0)
    if grace is None:
        grace = DEMO_FUNCTIONS_HEARTBEAT_GRACE if args.demo else FUNCTIONS_HEARTBEAT_GRACE
    if interval < 1 or grace < 0:
        parser.error("--functions-heartbeat-interval must be >= 1 and --functions-heartbeat-grace >= 0")

    standin = args.standin_heartbeat_interval
    if args.deprecated_heartbeat_interval is not None:
        if standin is not None and standin != args.deprecated_heartbeat_interval:
            parser.error(
                "--heartbeat-interval (deprecated) and --standin-heartbeat-interval disagree; "
                "pass only --standin-heartbeat-interval"
            )
        standin = args.deprecated_heartbeat_interval
        print(
            "./deploy.sh local: --heartbeat-interval is deprecated: it sets the stand-in's period only "
            "(--standin-heartbeat-interval); the functions' interval is --functions-heartbeat-interval",
            file=sys.stderr,
        )
    if standin is None:
        standin = min(DEMO_STANDIN_HEARTBEAT_INTERVAL if args.demo else STANDIN_HEARTBEAT_INTERVAL, float(interval))
    if standin > interval:
        parser.error(
            f"the stand-in's heartbeat period ({standin:g} s) is longer than the functions' heartbeat interval "
            f"({interval} s): the stand-in's toolbox would read unknown between its heartbeats; lower "
            "--standin-heartbeat-interval or raise --functions-heartbeat-interval"
        )
    pull = args.pull_delay if args.pull_delay is not None else (2.0 if args.demo else 0.5)
    if standin <= 0 or pull < 0 or args.sweep_interval < 0:
        parser.error("intervals must be positive and the pull delay >= 0")
    data_dir = args.data_dir or embedded_pg.default_data_dir(ROOT)
    return Options(
        port=args.port,
        dtma_port=args.dtma_port,
        tasks_port=args.tasks_port,
        data_dir=data_dir.resolve(),
        state_dir=args.state_dir.resolve(),
        reset=args.reset,
        demo=args.demo,
        sweep_interval=args.sweep_interval,
        sweep_oidc=args.sweep_oidc,
        standin_heartbeat_interval=standin,
        pull_delay=pull,
        functions_heartbeat_interval=interval,
        functions_heartbeat_grace=grace,
    )


def _run_demo(stack: Stack, stop: StopSignal) -> bool:
    from devstack import demo

    config = demo.DemoConfig(
        functions_url=stack.env["FUNCTIONS_URL"],
        standin_url=stack.env["DTMA_STANDIN_URL"],
        user_jwt=stack.env["DEMO_USER_JWT"],
        toolbox_id=stack.env["DEMO_TOOLBOX_ID"],
        spec=stack.openapi(),
        pull_delay=stack.options.pull_delay,
        database_url=stack.env.get("DATABASE_URL"),
    )
    return demo.run(config, stack.out, stop.event)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    # pgserver keys its inter-process lock on XDG_RUNTIME_DIR; every user of it here uses the
    # temp folder (devstack.embedded_pg, tests/conftest.py), so they all share one lock.
    os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.gettempdir())
    stop = StopSignal()
    stop.install()
    stack = Stack(options, stop)
    code = 0
    try:
        stack.start()
        if options.demo:
            code = 0 if _run_demo(stack, stop) else 1
        else:
            stack.wait()
    except Interrupted:
        stack.say("\n(interrupted while starting)")
        code = 130 if stop.signal_name == "SIGINT" else 0
    except (StartupError, database.DatabaseError, ConfigError) as exc:
        stack.say(f"\nlocal stack: {exc}")
        code = 1
    except Exception:
        log.exception("the local stack failed")
        stack.say("\nlocal stack: failed unexpectedly (traceback above and in the log)")
        code = 1
    finally:
        if stop.signal_name:
            stack.say(f"\n{stop.signal_name} received")
        try:
            stack.shutdown()
        except Exception:
            code = code or 1
        stop.restore()
    stack.say("Stopped." if code == 0 else f"Stopped (exit status {code}).")
    return code


if __name__ == "__main__":
    sys.exit(main())
