"""`deploy.sh gcp` and `ops/gcp_package.py`, against the stand-in gcloud in tests/bin.

The stand-in records each call's argv in $GCLOUD_LOG and answers like gcloud (URLs for
`functions describe`, NOT_FOUND for a scheduler job, task queue or service account it has not
created yet).
The real gcloud is never run. Every test works on a copy of the project tree (shared/, pyproject.toml
and placeholder functions/<entry_point>/main.py files) named by MCP_ROOT, so nothing is written into
the checkout.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from ops.gcp_package import NEVER_SHIP, dict_flag
from shared.core.config import ALL_FUNCTIONS, Settings

REPO = Path(__file__).resolve().parents[1]
DEPLOY_SH = REPO / "deploy.sh"
STANDIN_BIN = REPO / "tests" / "bin"
PROJECT = "demo-proj"
RUNTIME_SA = f"mcp-functions@{PROJECT}.iam.gserviceaccount.com"
SCHEDULER_SA = f"mcp-sweep-invoker@{PROJECT}.iam.gserviceaccount.com"
TASKS_SA = f"mcp-tasks-invoker@{PROJECT}.iam.gserviceaccount.com"
WORKER = "dtma_command_worker"
QUEUE = "mcp-dtma-commands"
SWEEP = "mcp_status_sweep"
FUNCTIONS = ALL_FUNCTIONS  # shared/core/config.py's list; the worker is deployed first (the others get its URL)
# Then the plan's order: first the functions whose URL some function is given (the sweep its own).
DEPLOY_ORDER = (WORKER, SWEEP, *(e for e in FUNCTIONS if e not in (WORKER, SWEEP)))
PRIVATE = {"mcp_status_sweep", WORKER}
# What deploy.sh tells the functions that enqueue commands (placeholder: the worker's URL).
TASKS_ENV = {
    "COMMAND_QUEUE": f"projects/{PROJECT}/locations/us-central1/queues/{QUEUE}",
    "COMMAND_WORKER_URL": "${DTMA_COMMAND_WORKER_URL}",
    "COMMAND_INVOKER_SA": TASKS_SA,
    "TASKS_MODE": "cloud_tasks",
}
# Who may call the sweep and the worker (their OIDC check): the accounts, and each one's own URL.
INVOKER_ENV = {
    "SWEEP_INVOKER_SA": SCHEDULER_SA,
    "SWEEP_INVOKER_AUDIENCE": "${MCP_STATUS_SWEEP_URL}",
    "WORKER_INVOKER_SA": TASKS_SA,
    "WORKER_INVOKER_AUDIENCE": "${DTMA_COMMAND_WORKER_URL}",
}
# The log-based metrics (ops/gcp_package.py log_metrics), in the order they are created.
LOG_METRICS = ("mcp_dtma_call_latency", "mcp_dtma_call_errors", "mcp_command_outcomes", "mcp_deploy_time_to_running")
METRICS_DIR = "build/gcp/log-metrics"
QUEUE_SETTINGS = ["--max-attempts=20", "--min-backoff=1s", "--max-backoff=60s", "--max-doublings=5",
                  "--max-dispatches-per-second=20", "--max-concurrent-dispatches=50"]
DEFAULT_SECRETS = {
    "DATABASE_URL": "mcp-database-url:latest",
    "SUPABASE_SERVICE_ROLE_KEY": "mcp-supabase-service-role-key:latest",
    "SUPABASE_JWT_SECRET": "mcp-supabase-jwt-secret:latest",
    "DTMA_KEY_SECRET": "mcp-dtma-key-secret:latest",
    "IDEMPOTENCY_SECRET": "mcp-idempotency-secret:latest",
}
PLAIN = {
    "SUPABASE_URL": "https://ref.supabase.co",
    "CORS_ALLOWED_ORIGINS": "https://app.example.com,https://staging.example.com",  # a comma: ^@^ escape
    "LOG_LEVEL": "INFO",
    "HOST_PORT_RANGE": "50000-50999",
    "HEARTBEAT_GRACE_SECONDS": "45",
    "DTMA_KEY_MODE": "derived",
}
SCRUBBED_ENV = ("GCP_PROJECT", "GOOGLE_CLOUD_PROJECT", "GCP_REGION", "MCP_ROOT", "PYTHON", "GCLOUD_FAIL",
                "GCLOUD_MISSING_SECRETS", "GCLOUD_MISSING_FUNCTIONS", "GCLOUD_STATE")


def url(name: str) -> str:
    return f"https://{name}-abc-uc.a.run.app"


def kebab(entry: str) -> str:
    return entry.replace("_", "-")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    shutil.copytree(REPO / "shared", root / "shared", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    for entry in FUNCTIONS:
        (root / "functions" / entry).mkdir(parents=True)
        (root / "functions" / entry / "main.py").write_text(f"# placeholder for {entry}\n")
    return root


def write_env_file(path: Path, values: dict[str, str]) -> Path:
    path.write_text("# plain settings\n\n" + "".join(f"{k}={v}\n" for k, v in values.items()))
    return path


@pytest.fixture
def env_file(tmp_path: Path) -> Path:
    return write_env_file(tmp_path / "gcp.env", PLAIN)


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return tmp_path / "gcloud.log"


def deploy(tree: Path, log: Path, *args: str, **env_extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    env.update(PATH=f"{STANDIN_BIN}{os.pathsep}{env['PATH']}", GCLOUD_LOG=str(log), MCP_ROOT=str(tree),
               PYTHON=sys.executable)
    env.update(env_extra)
    return subprocess.run(["bash", str(DEPLOY_SH), "gcp", *args], env=env, cwd=tree, capture_output=True,
                          text=True, timeout=60, check=False)


def complete_args(env_file: Path, *more: str) -> list[str]:
    return ["--project", PROJECT, "--env-file", str(env_file), *more]


def planned(stdout: str) -> list[list[str]]:
    """The `+ ` lines of a dry run as argv lists; `VAR=$(cmd)` lines give `cmd`."""
    commands = []
    for line in stdout.splitlines():
        if not line.startswith("+ "):
            continue
        text = line[2:]
        capture = re.fullmatch(r"[A-Z_]+=\$\((.*)\)", text)
        commands.append(shlex.split(capture.group(1) if capture else text))
    return commands


def logged(log: Path) -> list[list[str]]:
    if not log.exists():
        return []
    return [["gcloud", *shlex.split(line)] for line in log.read_text().splitlines()]


def flag(argv: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"{name}=")]
    assert len(values) == 1, (name, argv)
    return values[0]


def parse_dict_flag(value: str) -> dict[str, str]:
    """What gcloud makes of KEY=VALUE,... (with the `^DELIM^` escape, `gcloud topic escaping`)."""
    delim = ","
    if value.startswith("^"):
        delim, value = value[1], value[3:]
    return dict(item.split("=", 1) for item in value.split(delim)) if value else {}


def readers(name: str) -> list[str]:
    return Settings.model_fields[name].json_schema_extra["used_by"]


def deploys(commands: list[list[str]]) -> dict[str, list[str]]:
    return {c[3]: c for c in commands if c[:3] == ["gcloud", "functions", "deploy"]}


def enqueuers() -> list[str]:
    """The functions that create command tasks: those that read COMMAND_QUEUE."""
    return [e for e in FUNCTIONS if e in readers("COMMAND_QUEUE")]


def position(commands: list[list[str]], prefix: list[str]) -> int:
    """Index of the first command starting with `prefix`."""
    return next(i for i, c in enumerate(commands) if c[:len(prefix)] == prefix)


def tasks_commands(region: str = "us-central1", queue: str = QUEUE, tasks_sa: str = TASKS_SA,
                   runtime_sa: str = RUNTIME_SA, exists: bool = False) -> list[list[str]]:
    """The queue's commands, in order: describe, create (or update), then the runtime account's two grants."""
    g = [f"--project={PROJECT}", "--quiet"]
    return [
        ["gcloud", "tasks", "queues", "describe", queue, f"--location={region}", *g],
        ["gcloud", "tasks", "queues", "update" if exists else "create", queue, f"--location={region}",
         *QUEUE_SETTINGS, *g],
        ["gcloud", "tasks", "queues", "add-iam-policy-binding", queue, f"--location={region}",
         f"--member=serviceAccount:{runtime_sa}", "--role=roles/cloudtasks.enqueuer", *g],
        ["gcloud", "iam", "service-accounts", "add-iam-policy-binding", tasks_sa,
         f"--member=serviceAccount:{runtime_sa}", "--role=roles/iam.serviceAccountUser", "--condition=None", *g],
    ]


def log_metric_commands(exists: bool = False) -> list[list[str]]:
    """Each metric's commands, in order: describe, then create (or update) from its file."""
    g = [f"--project={PROJECT}", "--quiet"]
    return [c for name in LOG_METRICS for c in (
        ["gcloud", "logging", "metrics", "describe", name, "--format=value(name)", *g],
        ["gcloud", "logging", "metrics", "update" if exists else "create", name,
         f"--config-from-file={METRICS_DIR}/{name}.json", *g])]


def metric_files(stdout: str) -> dict[str, dict]:
    """The LogMetric files a dry run shows (`# build/gcp/log-metrics/NAME.json: {...}`), by metric name."""
    shown = re.findall(rf"^# {METRICS_DIR}/([a-z_]+)\.json: (\{{.*\}})$", stdout, re.M)
    return {name: json.loads(body) for name, body in shown}


def worker_invoker(region: str = "us-central1", tasks_sa: str = TASKS_SA) -> list[str]:
    return ["gcloud", "functions", "add-invoker-policy-binding", "dtma-command-worker", f"--region={region}",
            f"--member=serviceAccount:{tasks_sa}", f"--project={PROJECT}", "--quiet"]


# --- dry run ---------------------------------------------------------------------------------------

def test_dry_run_prints_the_whole_plan_and_runs_nothing(tree: Path, env_file: Path, log: Path) -> None:
    result = deploy(tree, log, *complete_args(env_file), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert not log.exists(), "a dry run must not call gcloud at all"
    assert not (tree / "build").exists(), "a dry run must not package either"
    commands = planned(result.stdout)

    # One function spelled out in full. The tasks account's `@` moves the list delimiter to `|`.
    by_name = deploys(commands)
    assert list(by_name) == [kebab(e) for e in DEPLOY_ORDER]
    env = dict(PLAIN, GOOGLE_CLOUD_PROJECT=PROJECT, **TASKS_ENV, **INVOKER_ENV)
    assert by_name["deploy-mcp-server"] == [
        "gcloud", "functions", "deploy", "deploy-mcp-server", "--gen2", "--region=us-central1",
        f"--project={PROJECT}", "--runtime=python312", "--source=build/gcp/deploy_mcp_server",
        "--entry-point=deploy_mcp_server", "--trigger-http", f"--service-account={RUNTIME_SA}",
        "--allow-unauthenticated",
        f"--set-env-vars=^|^COMMAND_INVOKER_SA={TASKS_SA}"
        f"|COMMAND_QUEUE=projects/{PROJECT}/locations/us-central1/queues/{QUEUE}"
        "|COMMAND_WORKER_URL=${DTMA_COMMAND_WORKER_URL}"
        "|CORS_ALLOWED_ORIGINS=https://app.example.com,https://staging.example.com"
        "|DTMA_KEY_MODE=derived|GOOGLE_CLOUD_PROJECT=demo-proj|HOST_PORT_RANGE=50000-50999|LOG_LEVEL=INFO"
        "|SUPABASE_URL=https://ref.supabase.co|TASKS_MODE=cloud_tasks",  # not HEARTBEAT_GRACE_SECONDS
        "--set-secrets=" + ",".join(f"{k}={DEFAULT_SECRETS[k]}" for k in sorted(DEFAULT_SECRETS)),
        "--min-instances=0", "--max-instances=20", "--concurrency=40", "--cpu=1", "--memory=256Mi",
        "--timeout=60s", "--quiet"]
    # The placeholder is double-quoted in the printed line, so that pasting the plan expands it.
    assert '--set-env-vars="^|^COMMAND_INVOKER_SA=' in result.stdout

    # Every function: only the settings and secrets it reads (used_by in shared/core/config.py).
    for entry in FUNCTIONS:
        argv = by_name[kebab(entry)]
        assert f"--entry-point={entry}" in argv and f"--source=build/gcp/{entry}" in argv
        assert {"--gen2", "--runtime=python312", "--memory=256Mi", "--trigger-http"} <= set(argv)
        public = entry not in PRIVATE
        assert ("--allow-unauthenticated" in argv) is public
        assert ("--no-allow-unauthenticated" in argv) is not public
        assert flag(argv, "--timeout") == ("1800s" if entry == WORKER else "60s")
        expected_env = {k: v for k, v in env.items() if entry in readers(k)}
        if entry == "mcp_status":  # watch streams hold a gunicorn thread each: as many as --status-concurrency
            expected_env["THREADS"] = "250"
            assert flag(argv, "--concurrency") == "250"
        assert parse_dict_flag(flag(argv, "--set-env-vars")) == expected_env
        expected_secrets = {k: v for k, v in DEFAULT_SECRETS.items() if entry in readers(k)}
        assert parse_dict_flag(flag(argv, "--set-secrets")) == expected_secrets
        assert not any(a.startswith("--set-env-vars=") and "K_SERVICE" in a for a in argv)
    sweep_secrets = parse_dict_flag(flag(by_name["mcp-status-sweep"], "--set-secrets"))
    assert set(sweep_secrets) == {"DATABASE_URL", "SUPABASE_SERVICE_ROLE_KEY"}
    assert "HOST_PORT_RANGE" not in flag(by_name["mcp-status"], "--set-env-vars")
    assert "CORS_ALLOWED_ORIGINS" not in flag(by_name["dtma-heartbeat-ingest"], "--set-env-vars")

    # The functions that enqueue commands get the queue, the worker's URL, the tasks account, the mode;
    # the worker gets none of that, nor the user-facing settings (CORS, JWT secret, port range).
    assert set(enqueuers()) == {"deploy_mcp_server", "manage_mcp_server", "mcp_status_sweep"}
    for entry in enqueuers():
        got = parse_dict_flag(flag(by_name[kebab(entry)], "--set-env-vars"))
        assert {k: got.get(k) for k in TASKS_ENV} == TASKS_ENV, entry
    for entry in set(FUNCTIONS) - set(enqueuers()):
        assert not set(TASKS_ENV) & set(parse_dict_flag(flag(by_name[kebab(entry)], "--set-env-vars"))), entry
    worker = by_name["dtma-command-worker"]
    assert parse_dict_flag(flag(worker, "--set-env-vars")) == {
        "DTMA_KEY_MODE": "derived", "GOOGLE_CLOUD_PROJECT": PROJECT, "LOG_LEVEL": "INFO",
        "SUPABASE_URL": "https://ref.supabase.co", "WORKER_INVOKER_SA": TASKS_SA,
        "WORKER_INVOKER_AUDIENCE": "${DTMA_COMMAND_WORKER_URL}"}
    # The sweep and the worker check their caller's OIDC token: the account and audience they expect are
    # those the scheduler job and the enqueued tasks name (the same placeholders, filled in alike).
    sweep = parse_dict_flag(flag(by_name["mcp-status-sweep"], "--set-env-vars"))
    assert {k: sweep[k] for k in ("SWEEP_INVOKER_SA", "SWEEP_INVOKER_AUDIENCE")} == {
        "SWEEP_INVOKER_SA": SCHEDULER_SA, "SWEEP_INVOKER_AUDIENCE": "${MCP_STATUS_SWEEP_URL}"}
    for entry in set(FUNCTIONS) - {WORKER, SWEEP}:
        assert not set(INVOKER_ENV) & set(parse_dict_flag(flag(by_name[kebab(entry)], "--set-env-vars"))), entry
    assert parse_dict_flag(flag(worker, "--set-secrets")) == {
        k: DEFAULT_SECRETS[k] for k in ("DATABASE_URL", "SUPABASE_SERVICE_ROLE_KEY", "DTMA_KEY_SECRET")}
    assert "--service-account=" + RUNTIME_SA in worker

    # The queue: its account, the queue with its retry and rate settings, the three grants.
    assert ["gcloud", "iam", "service-accounts", "create", "mcp-tasks-invoker",
            "--display-name=MCP agent commands invoker (Cloud Tasks OIDC)", f"--project={PROJECT}",
            "--quiet"] in commands
    queue_commands = [c for c in commands if c[:3] == ["gcloud", "tasks", "queues"]
                      or c[:4] == ["gcloud", "iam", "service-accounts", "add-iam-policy-binding"]]
    assert queue_commands == tasks_commands()
    assert "gcloud tasks queues update mcp-dtma-commands ..." in result.stdout  # the note for a rerun
    # ...all before the first function that enqueues is deployed, which comes after the worker, its
    # URL (read before its deploy: the worker is given its own URL too) and its invoker grant.
    first_enqueuer = min(position(commands, ["gcloud", "functions", "deploy", kebab(e)]) for e in enqueuers())
    worker_url = position(commands, ["gcloud", "functions", "describe", "dtma-command-worker"])
    assert position(commands, ["gcloud", "tasks", "queues", "create"]) < first_enqueuer
    assert (worker_url < position(commands, ["gcloud", "functions", "deploy", "dtma-command-worker"])
            < commands.index(worker_invoker()) < first_enqueuer)
    assert "+ DTMA_COMMAND_WORKER_URL=$(gcloud functions describe dtma-command-worker" in result.stdout
    assert ("# if dtma-command-worker is not deployed yet (the describe above fails), it is deployed twice: first "
            "with https://dtma-command-worker.not-deployed-yet.invalid") in result.stdout
    assert len([c for c in commands if c[:4] == ["gcloud", "functions", "describe", "mcp-status-sweep"]]) == 1

    # IAM: the runtime SA reads each secret; the scheduler SA invokes the sweep and nothing else, the
    # tasks SA the worker and nothing else.
    bindings = [c for c in commands if c[:3] == ["gcloud", "secrets", "add-iam-policy-binding"]]
    assert sorted(c[3] for c in bindings) == sorted(v.split(":")[0] for v in DEFAULT_SECRETS.values())
    for c in bindings:
        assert f"--member=serviceAccount:{RUNTIME_SA}" in c
        assert "--role=roles/secretmanager.secretAccessor" in c
    invokers = [c for c in commands if c[:3] == ["gcloud", "functions", "add-invoker-policy-binding"]]
    assert invokers == [worker_invoker(),
                        ["gcloud", "functions", "add-invoker-policy-binding", "mcp-status-sweep",
                         "--region=us-central1", f"--member=serviceAccount:{SCHEDULER_SA}",
                         f"--project={PROJECT}", "--quiet"]]
    assert ["gcloud", "functions", "describe", "mcp-status-sweep", "--gen2", "--region=us-central1",
            f"--project={PROJECT}", "--format=value(serviceConfig.uri)"] in commands

    # The scheduler job: every minute, POST {}, OIDC token for the sweep's URL.
    [create] = [c for c in commands if c[:4] == ["gcloud", "scheduler", "jobs", "create"]]
    assert create == [
        "gcloud", "scheduler", "jobs", "create", "http", "mcp-status-sweep", "--location=us-central1",
        "--schedule=* * * * *", "--http-method=POST", "--uri=${MCP_STATUS_SWEEP_URL}",
        f"--oidc-service-account-email={SCHEDULER_SA}", "--oidc-token-audience=${MCP_STATUS_SWEEP_URL}",
        "--message-body={}", "--attempt-deadline=60s", f"--project={PROJECT}", "--quiet",
        "--headers=Content-Type=application/json"]
    assert "+ MCP_STATUS_SWEEP_URL=$(gcloud functions describe mcp-status-sweep" in result.stdout
    assert "# AGENTOPIA_API_BASE_URL=${DTMA_HEARTBEAT_INGEST_URL}" in result.stdout
    assert (f"# Cloud Tasks queue projects/{PROJECT}/locations/us-central1/queues/{QUEUE} delivers agent "
            f"commands to dtma-command-worker ${{DTMA_COMMAND_WORKER_URL}} (timeout 1800s), with an OIDC token "
            f"of {TASKS_SA}." in result.stdout)


def test_dry_run_prints_exactly_what_a_first_run_runs(tree: Path, env_file: Path, log: Path,
                                                      tmp_path: Path) -> None:
    dry = deploy(tree, tmp_path / "unused.log", *complete_args(env_file), "--dry-run")
    real = deploy(tree, log, *complete_args(env_file))
    assert dry.returncode == 0 and real.returncode == 0, (dry.stderr, real.stderr)
    placeholders = {f"${{{kebab(e).upper().replace('-', '_')}_URL}}": url(kebab(e)) for e in FUNCTIONS}

    def filled(argv: list[str]) -> list[str]:
        for placeholder, value in placeholders.items():
            argv = [a.replace(placeholder, value) for a in argv]
        return argv

    assert [filled(c) for c in planned(dry.stdout) if c[0] == "gcloud"] == logged(log)


def test_only_one_function(tree: Path, env_file: Path, log: Path) -> None:
    result = deploy(tree, log, *complete_args(env_file, "--only", "deploy-mcp-server", "--dry-run"))
    assert result.returncode == 0, result.stderr
    commands = planned(result.stdout)
    assert list(deploys(commands)) == ["deploy-mcp-server"]
    assert [a for c in commands if "--out" in c for a in c[-2:]] == ["--function", "deploy_mcp_server"]
    assert not [c for c in commands if c[1] == "scheduler" or "mcp-status-sweep" in c]
    assert "dtma.conf" not in result.stdout
    # It still enqueues: the queue is (re)configured, and the worker deployed before gives its URL.
    assert [c for c in commands if c[:3] == ["gcloud", "tasks", "queues"]
            or c[:4] == ["gcloud", "iam", "service-accounts", "add-iam-policy-binding"]] == tasks_commands()
    describe_worker = ["gcloud", "functions", "describe", "dtma-command-worker", "--gen2", "--region=us-central1",
                       f"--project={PROJECT}", "--format=value(serviceConfig.uri)"]
    assert commands[-4:-2] == [describe_worker, worker_invoker()]  # then its own deploy, and its URL
    assert commands[-2][:4] == ["gcloud", "functions", "deploy", "deploy-mcp-server"]
    env = parse_dict_flag(flag(commands[-2], "--set-env-vars"))
    assert {k: env[k] for k in TASKS_ENV} == TASKS_ENV
    assert ("queues/mcp-dtma-commands delivers agent commands to dtma-command-worker ${DTMA_COMMAND_WORKER_URL}, "
            "with an OIDC token of") in result.stdout

    result = deploy(tree, log, *complete_args(env_file, "--only", "mcp_status_sweep", "--dry-run"))
    commands = planned(result.stdout)
    assert list(deploys(commands)) == ["mcp-status-sweep"]
    bound = [c[3] for c in commands if c[:3] == ["gcloud", "secrets", "add-iam-policy-binding"]]
    assert bound == ["mcp-database-url", "mcp-supabase-service-role-key"]
    assert any(c[:5] == ["gcloud", "scheduler", "jobs", "create", "http"] for c in commands)
    assert any(c[:4] == ["gcloud", "tasks", "queues", "create"] for c in commands)  # the sweep re-enqueues

    result = deploy(tree, log, *complete_args(env_file, "--only", "dtma-command-worker", "--dry-run"))
    commands = planned(result.stdout)
    assert list(deploys(commands)) == ["dtma-command-worker"]
    assert [c for c in commands if c[:3] == ["gcloud", "tasks", "queues"]
            or c[:4] == ["gcloud", "iam", "service-accounts", "add-iam-policy-binding"]] == tasks_commands()
    assert commands[-3][:4] == ["gcloud", "functions", "describe", "dtma-command-worker"]  # its own URL
    assert commands[-2][:4] == ["gcloud", "functions", "deploy", "dtma-command-worker"]
    assert commands[-1] == worker_invoker()
    assert "--no-allow-unauthenticated" in commands[-2] and "--timeout=1800s" in commands[-2]
    assert parse_dict_flag(flag(commands[-2], "--set-env-vars"))["WORKER_INVOKER_AUDIENCE"] == \
        "${DTMA_COMMAND_WORKER_URL}"
    assert not [c for c in commands if c[1] == "scheduler"]
    assert "Cloud Tasks queue" in result.stdout

    result = deploy(tree, log, *complete_args(env_file, "--only", "mcp_status", "--dry-run"))
    commands = planned(result.stdout)
    assert list(deploys(commands)) == ["mcp-status"]
    assert not [c for c in commands if c[1] == "tasks" or "dtma-command-worker" in c or "mcp-tasks-invoker" in c]
    assert "Cloud Tasks" not in result.stdout
    assert not log.exists()


def test_only_an_enqueuer_before_the_worker_exists_stops(tree: Path, env_file: Path, log: Path) -> None:
    result = deploy(tree, log, *complete_args(env_file, "--only", "manage_mcp_server"),
                    GCLOUD_MISSING_FUNCTIONS="dtma-command-worker")
    assert result.returncode != 0
    assert "could not read the URL of dtma-command-worker" in result.stderr
    assert "--only dtma-command-worker" in result.stderr
    assert not [c for c in logged(log) if c[1:3] == ["functions", "deploy"]]


def test_queue_and_tasks_options(tree: Path, env_file: Path, log: Path) -> None:
    tasks_sa = "cmd-invoker@other-proj.iam.gserviceaccount.com"
    result = deploy(tree, log, *complete_args(
        env_file, "--region", "europe-west1", "--queue", "agent-cmds", "--tasks-sa", tasks_sa,
        "--worker-timeout=900", "--timeout", "30s", "--dry-run"))
    assert result.returncode == 0, result.stderr
    commands = planned(result.stdout)
    assert [c for c in commands if c[:3] == ["gcloud", "tasks", "queues"]
            or c[:4] == ["gcloud", "iam", "service-accounts", "add-iam-policy-binding"]] == tasks_commands(
        region="europe-west1", queue="agent-cmds", tasks_sa=tasks_sa)
    assert worker_invoker(region="europe-west1", tasks_sa=tasks_sa) in commands
    by_name = deploys(commands)
    assert flag(by_name["dtma-command-worker"], "--timeout") == "900s"
    assert flag(by_name["manage-mcp-server"], "--timeout") == "30s"
    env = parse_dict_flag(flag(by_name["manage-mcp-server"], "--set-env-vars"))
    assert env["COMMAND_QUEUE"] == f"projects/{PROJECT}/locations/europe-west1/queues/agent-cmds"
    assert env["COMMAND_INVOKER_SA"] == tasks_sa
    # An account outside the project is expected to exist, not created.
    created = [c[4] for c in commands if c[:4] == ["gcloud", "iam", "service-accounts", "create"]]
    assert "cmd-invoker" not in created and "mcp-tasks-invoker" not in created
    assert f"{tasks_sa} must exist already" in result.stdout


def test_a_queue_that_exists_is_updated(tree: Path, env_file: Path, log: Path, tmp_path: Path) -> None:
    state = tmp_path / "gcloud-state"  # the stand-in's memory, next to its log
    state.mkdir()
    (state / f"queue-{QUEUE}").touch()
    result = deploy(tree, log, *complete_args(env_file))
    assert result.returncode == 0, result.stderr
    calls = logged(log)
    assert [c for c in calls if c[1:3] == ["tasks", "queues"]
            or c[1:4] == ["iam", "service-accounts", "add-iam-policy-binding"]] == tasks_commands(exists=True)
    assert not [c for c in calls if c[1:4] == ["tasks", "queues", "create"]]


# --- log-based metrics ---------------------------------------------------------------------------

def test_dry_run_shows_each_log_metric_and_its_definition(tree: Path, env_file: Path, log: Path) -> None:
    result = deploy(tree, log, *complete_args(env_file, "--dry-run"))
    assert result.returncode == 0, result.stderr
    commands = planned(result.stdout)
    assert [c for c in commands if c[:3] == ["gcloud", "logging", "metrics"]] == log_metric_commands()
    # Before the first function is deployed: a metric counts only the lines written once it exists.
    last_metric = max(i for i, c in enumerate(commands) if c[:3] == ["gcloud", "logging", "metrics"])
    assert last_metric < position(commands, ["gcloud", "functions", "deploy"])
    [enable] = [c for c in commands if c[:3] == ["gcloud", "services", "enable"]]
    assert {"logging.googleapis.com", "monitoring.googleapis.com"} <= set(enable)
    assert "# each log-based metric below that already exists is updated instead, from the same file: gcloud " \
           "logging metrics update NAME --config-from-file=FILE" in result.stdout

    # Each file's content, as the dry run shows it: the LogMetric gcloud is given.
    files = metric_files(result.stdout)
    assert list(files) == list(LOG_METRICS)
    services = " OR ".join(f'"{kebab(e)}"' for e in FUNCTIONS)  # every function, whatever this run deploys
    scope = f'resource.type="cloud_run_revision" AND resource.labels.service_name=({services})'
    call, outcome = 'jsonPayload.event="dtma_call"', 'jsonPayload.event="command_outcome"'

    def kind(metric: dict) -> tuple[str, str, str]:
        descriptor = metric["metricDescriptor"]
        return descriptor["metricKind"], descriptor["valueType"], descriptor["unit"]

    def labels(metric: dict) -> dict[str, str]:
        extractors = metric.get("labelExtractors", {})
        declared = {label["key"]: label["valueType"] for label in metric["metricDescriptor"].get("labels", [])}
        assert set(extractors) == set(declared), "every label needs an extractor"
        assert all(v == "STRING" for v in declared.values())
        return extractors

    latency = files["mcp_dtma_call_latency"]
    assert latency["filter"] == f"{scope} AND {call}"
    assert kind(latency) == ("DELTA", "DISTRIBUTION", "ms")
    assert latency["valueExtractor"] == "EXTRACT(jsonPayload.duration_ms)"
    assert labels(latency) == {"operation": "EXTRACT(jsonPayload.operation)", "result": "EXTRACT(jsonPayload.result)"}
    buckets = latency["bucketOptions"]["exponentialBuckets"]
    assert buckets["growthFactor"] > 1 and buckets["scale"] > 0
    assert buckets["scale"] * buckets["growthFactor"] ** buckets["numFiniteBuckets"] >= 3600_000  # longest call

    errors = files["mcp_dtma_call_errors"]
    assert errors["filter"] == f'{scope} AND {call} AND NOT jsonPayload.result="ok"'
    assert kind(errors) == ("DELTA", "INT64", "1")
    assert "valueExtractor" not in errors and "bucketOptions" not in errors
    assert labels(errors) == labels(latency)

    outcomes = files["mcp_command_outcomes"]
    assert outcomes["filter"] == f"{scope} AND {outcome}"
    assert kind(outcomes) == ("DELTA", "INT64", "1")
    assert labels(outcomes) == {k: f"EXTRACT(jsonPayload.{k})" for k in ("action", "code", "result")}

    to_running = files["mcp_deploy_time_to_running"]
    assert to_running["filter"] == (f'{scope} AND {outcome} AND jsonPayload.action="deploy" '
                                    'AND jsonPayload.result="succeeded"')
    assert kind(to_running) == ("DELTA", "DISTRIBUTION", "ms")
    assert to_running["valueExtractor"] == "EXTRACT(jsonPayload.duration_ms)" and labels(to_running) == {}
    assert to_running["bucketOptions"]["exponentialBuckets"]["scale"] >= buckets["scale"]

    for name, body in files.items():
        assert set(body) <= {"description", "filter", "metricDescriptor", "labelExtractors", "valueExtractor",
                             "bucketOptions"}, name
        assert f"# log-based metric {name}: {body['description']}" in result.stdout
    assert f"# Log-based metrics (in Metrics Explorer as logging/user/NAME): {', '.join(LOG_METRICS)}." \
        in result.stdout

    # A run of one function (re)configures the same metrics: they count every function's lines.
    only = deploy(tree, log, *complete_args(env_file, "--only", "mcp_status", "--dry-run"))
    assert only.returncode == 0, only.stderr
    assert metric_files(only.stdout) == files
    assert [c for c in planned(only.stdout) if c[:3] == ["gcloud", "logging", "metrics"]] == log_metric_commands()
    assert not log.exists()


def test_log_metrics_are_created_then_updated(tree: Path, env_file: Path, log: Path, tmp_path: Path) -> None:
    dry = deploy(tree, tmp_path / "unused.log", *complete_args(env_file, "--dry-run"))
    first = deploy(tree, log, *complete_args(env_file))
    assert first.returncode == 0, first.stderr
    assert [c for c in logged(log) if c[1:3] == ["logging", "metrics"]] == log_metric_commands()
    state = tmp_path / "gcloud-state"
    for name, body in metric_files(dry.stdout).items():
        assert json.loads((tree / METRICS_DIR / f"{name}.json").read_text()) == body  # the file written...
        assert json.loads((state / f"metric-{name}").read_text()) == body  # ...is what gcloud was given
    assert f"Log-based metrics (in Metrics Explorer as logging/user/NAME): {', '.join(LOG_METRICS)}." in first.stdout

    log.write_text("")
    second = deploy(tree, log, *complete_args(env_file))  # the stand-in now knows them: updated, not created again
    assert second.returncode == 0, second.stderr
    assert [c for c in logged(log) if c[1:3] == ["logging", "metrics"]] == log_metric_commands(exists=True)


def test_a_metric_that_cannot_be_created_stops_the_run_before_any_deploy(tree: Path, env_file: Path,
                                                                         log: Path) -> None:
    result = deploy(tree, log, *complete_args(env_file), GCLOUD_FAIL="logging metrics create mcp_command_outcomes")
    assert result.returncode != 0
    assert [c[4] for c in logged(log) if c[1:4] == ["logging", "metrics", "create"]] == list(LOG_METRICS[:3])
    assert not [c for c in logged(log) if c[1:3] == ["functions", "deploy"]]


def test_no_log_metrics(tree: Path, env_file: Path, log: Path) -> None:
    result = deploy(tree, log, *complete_args(env_file, "--no-log-metrics", "--dry-run"))
    assert result.returncode == 0, result.stderr
    commands = planned(result.stdout)
    assert not [c for c in commands if c[1] == "logging"]
    [enable] = [c for c in commands if c[:3] == ["gcloud", "services", "enable"]]
    assert "logging.googleapis.com" not in enable and "monitoring.googleapis.com" not in enable
    assert "log-metrics" not in result.stdout and "Log-based" not in result.stdout
    assert list(deploys(commands)) == [kebab(e) for e in DEPLOY_ORDER]


def test_plan_holds_the_log_metrics(tree: Path) -> None:
    def plan(*args: str) -> dict:
        result = package(tree, "--plan", "--project", PROJECT, "--secret", "DTMA_KEY_SECRET=k", *args)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    assert list(plan()["log_metrics"]) == list(LOG_METRICS)
    assert plan("--function", "mcp_status")["log_metrics"] == plan()["log_metrics"]
    assert plan("--no-log-metrics")["log_metrics"] == {}


def test_flags_override_defaults(tree: Path, env_file: Path, log: Path) -> None:
    result = deploy(tree, log, *complete_args(
        env_file, "--region=europe-west1", "--memory", "512Mi", "--min-instances=1", "--max-instances=3",
        "--concurrency=80", "--timeout=30", "--schedule=*/2 * * * *",
        "--runtime-sa", "rt@other-proj.iam.gserviceaccount.com",
        "--secret", "DTMA_KEY_SECRET=dtma-master:7", "--secret", "SUPABASE_SERVICE_ROLE_KEY=", "--dry-run"))
    assert result.returncode == 0, result.stderr
    commands = planned(result.stdout)
    argv = deploys(commands)["manage-mcp-server"]
    for expected in ("--region=europe-west1", "--memory=512Mi", "--min-instances=1", "--max-instances=3",
                     "--concurrency=80", "--timeout=30s",
                     "--service-account=rt@other-proj.iam.gserviceaccount.com"):
        assert expected in argv
    assert parse_dict_flag(flag(argv, "--set-secrets")) == {
        "DATABASE_URL": "mcp-database-url:latest", "SUPABASE_JWT_SECRET": "mcp-supabase-jwt-secret:latest",
        "DTMA_KEY_SECRET": "dtma-master:7", "IDEMPOTENCY_SECRET": "mcp-idempotency-secret:latest"}
    [create] = [c for c in commands if c[:4] == ["gcloud", "scheduler", "jobs", "create"]]
    assert "--schedule=*/2 * * * *" in create and "--location=europe-west1" in create
    # A runtime account outside the project is never created, only expected to exist.
    created = [c[4] for c in commands if c[:4] == ["gcloud", "iam", "service-accounts", "create"]]
    assert created == ["mcp-tasks-invoker", "mcp-sweep-invoker"]
    assert [c for c in commands if c[:3] == ["gcloud", "tasks", "queues"]
            or c[:4] == ["gcloud", "iam", "service-accounts", "add-iam-policy-binding"]] == tasks_commands(
        region="europe-west1", runtime_sa="rt@other-proj.iam.gserviceaccount.com")


# --- refusing incomplete configuration ----------------------------------------------------------

@pytest.mark.parametrize(("args", "env", "expected"), [
    pytest.param([], PLAIN, ["project: not set"], id="no-project"),
    pytest.param(["--project", PROJECT, "--secret", "DTMA_KEY_SECRET="], PLAIN,
                 ["DTMA_KEY_SECRET"], id="dtma-key-secret-unmapped"),
    pytest.param(["--project", PROJECT, "--secret", "SUPABASE_JWT_SECRET="],
                 {k: v for k, v in PLAIN.items() if k != "SUPABASE_URL"},
                 ["SUPABASE_JWT_SECRET", "SUPABASE_URL"], id="no-way-to-verify-jwts"),
    pytest.param(["--project", PROJECT, "--no-default-secrets"], PLAIN,
                 ["no database", "DTMA_KEY_SECRET"], id="no-secrets-at-all"),
    pytest.param(["--project", PROJECT], dict(PLAIN, DATABASE_URL="postgresql://u:p@h/db"),
                 ["DATABASE_URL, a secret"], id="secret-in-env-file"),
    pytest.param(["--project", PROJECT], dict(PLAIN, K_SERVICE="x"), ["K_SERVICE"], id="reserved-env"),
    pytest.param(["--project", PROJECT], dict(PLAIN, HOST_PORT_RANGE="lots"), ["HOST_PORT_RANGE"],
                 id="invalid-value"),
    pytest.param(["--project", PROJECT, "--secret", "LOG_LEVEL=x"], PLAIN, ["LOG_LEVEL is not a secret"],
                 id="plain-setting-as-secret"),
    pytest.param(["--project", PROJECT, "--only", "nope"], PLAIN, ["unknown function 'nope'"],
                 id="unknown-fn"),
    pytest.param(["--secret", "DTMA_KEY_SECRET=", "--memory", "lots"], PLAIN,
                 ["project: not set", "DTMA_KEY_SECRET", "--memory"], id="all-problems-at-once"),
    pytest.param(["--project", PROJECT, "--tasks-sa", "not-an-email"], PLAIN,
                 ["--tasks-sa: 'not-an-email' is not a service account email"], id="tasks-sa-not-an-email"),
    pytest.param(["--project", PROJECT, "--tasks-sa", "a b@x.iam.gserviceaccount.com"], PLAIN,
                 ["--tasks-sa: 'a b@x.iam.gserviceaccount.com' is not a service account email"],
                 id="tasks-sa-with-space"),
    pytest.param(["--project", PROJECT, "--queue", "my_queue"], PLAIN, ["--queue: 'my_queue' is not a queue name"],
                 id="queue-name"),
    pytest.param(["--project", PROJECT, "--queue", "q" * 101], PLAIN, ["--queue: 'qqq"], id="queue-too-long"),
    pytest.param(["--project", PROJECT, "--worker-timeout", "3601"], PLAIN, ["--worker-timeout: '3601'"],
                 id="worker-timeout-over-an-hour"),
    pytest.param(["--project", PROJECT], dict(PLAIN, COMMAND_QUEUE="projects/x/locations/y/queues/z"),
                 ["--env-file sets COMMAND_QUEUE, which deploy.sh sets itself"], id="queue-in-env-file"),
    pytest.param(["--project", PROJECT], dict(PLAIN, SWEEP_INVOKER_AUDIENCE="https://elsewhere.example"),
                 ["--env-file sets SWEEP_INVOKER_AUDIENCE, which deploy.sh sets itself"], id="audience-in-env-file"),
    pytest.param(["--project", PROJECT, "--scheduler-sa", "not-an-email"], PLAIN,
                 ["--scheduler-sa: 'not-an-email' is not a service account email"], id="scheduler-sa-not-an-email"),
    pytest.param(["--project", PROJECT, "--worker-timeout", "600"],
                 dict(PLAIN, COMMAND_DISPATCH_DEADLINE_SECONDS="900"),
                 ["COMMAND_DISPATCH_DEADLINE_SECONDS=900 exceeds the command worker's timeout (600s)"],
                 id="dispatch-deadline-over-worker-timeout"),
])
def test_incomplete_configuration_is_refused_before_anything_runs(
        tree: Path, log: Path, tmp_path: Path, args: list[str], env: dict[str, str],
        expected: list[str]) -> None:
    env_file = write_env_file(tmp_path / "gcp.env", env)
    result = deploy(tree, log, *args, "--env-file", str(env_file))  # a real run, not a dry run
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "refusing to deploy" in result.stderr
    for text in expected:
        assert text in result.stderr
    assert not log.exists()
    assert "+ " not in result.stdout + result.stderr
    assert not (tree / "build").exists()


def test_missing_secret_in_secret_manager_stops_before_deploying(tree: Path, env_file: Path,
                                                                 log: Path) -> None:
    result = deploy(tree, log, *complete_args(env_file), GCLOUD_MISSING_SECRETS="mcp-dtma-key-secret")
    assert result.returncode == 2
    assert "mcp-dtma-key-secret" in result.stderr
    assert [c[1:3] for c in logged(log)] == [["services", "enable"]] + [["secrets", "describe"]] * 5


def test_failed_deploy_stops_the_run(tree: Path, env_file: Path, log: Path) -> None:
    result = deploy(tree, log, *complete_args(env_file), GCLOUD_FAIL="functions deploy mcp-status ")
    assert result.returncode != 0
    names = [c[3] for c in logged(log) if c[1:3] == ["functions", "deploy"]]
    assert names == ["dtma-command-worker", "mcp-status-sweep", "deploy-mcp-server", "manage-mcp-server",
                     "mcp-status"]
    assert not [c for c in logged(log) if c[1] == "scheduler"]
    assert "AGENTOPIA_API_BASE_URL" not in result.stdout


def test_a_python_without_the_dependencies_is_refused(tree: Path, env_file: Path, log: Path,
                                                      tmp_path: Path) -> None:
    bare = tmp_path / "bare-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=60)
    result = deploy(tree, log, *complete_args(env_file), PYTHON=str(bare / "bin" / "python"))
    assert result.returncode == 2
    assert "could not compute the deploy plan" in result.stderr and "PYTHON=" in result.stderr
    assert not log.exists()

    (tree / "shared" / "core" / "config.py").write_text("import not_a_module_anywhere\n")
    result = deploy(tree, log, *complete_args(env_file))
    assert result.returncode == 2
    assert "refusing to deploy" in result.stderr and "'not_a_module_anywhere'" in result.stderr
    assert not log.exists()


# --- a real run against the stand-in ------------------------------------------------------------

def test_run_then_rerun_records_the_gcloud_sequence(tree: Path, env_file: Path, log: Path) -> None:
    secrets = sorted(v.split(":")[0] for v in DEFAULT_SECRETS.values())
    g = [f"--project={PROJECT}", "--quiet"]
    job_flags = ["--location=us-central1", "--schedule=* * * * *", "--http-method=POST",
                 f"--uri={url('mcp-status-sweep')}", f"--oidc-service-account-email={SCHEDULER_SA}",
                 f"--oidc-token-audience={url('mcp-status-sweep')}", "--message-body={}",
                 "--attempt-deadline=60s", *g]

    def expected_sequence(first: bool) -> list[list[str]]:
        def account(email: str, title: str) -> list[list[str]]:
            describe = [["gcloud", "iam", "service-accounts", "describe", email, *g]]
            create = [["gcloud", "iam", "service-accounts", "create", email.split("@")[0],
                       f"--display-name={title}", *g]]
            return describe + create if first else describe
        job = (["gcloud", "scheduler", "jobs", "create", "http", "mcp-status-sweep", *job_flags,
                "--headers=Content-Type=application/json"] if first else
               ["gcloud", "scheduler", "jobs", "update", "http", "mcp-status-sweep", *job_flags,
                "--update-headers=Content-Type=application/json"])
        def deployed_then_url(entry: str) -> list[list[str]]:
            [deploy_call] = [c for c in deployed if c[3] == kebab(entry)]
            describe = ["gcloud", "functions", "describe", kebab(entry), "--gen2", "--region=us-central1",
                        f"--project={PROJECT}", "--format=value(serviceConfig.uri)"]
            if entry in (WORKER, SWEEP):  # given its own URL: read first (the stand-in has it already)
                return [describe, deploy_call, *([worker_invoker()] if entry == WORKER else [])]
            return [deploy_call, describe]
        return [
            ["gcloud", "services", "enable", "cloudfunctions.googleapis.com", "run.googleapis.com",
             "cloudbuild.googleapis.com", "artifactregistry.googleapis.com", "cloudscheduler.googleapis.com",
             "cloudtasks.googleapis.com", "secretmanager.googleapis.com", "iam.googleapis.com",
             "logging.googleapis.com", "monitoring.googleapis.com", *g],
            *[["gcloud", "secrets", "describe", s, "--format=value(name)", *g] for s in secrets],
            *account(RUNTIME_SA, "MCP control plane functions (runtime)"),
            *[["gcloud", "secrets", "add-iam-policy-binding", s, f"--member=serviceAccount:{RUNTIME_SA}",
               "--role=roles/secretmanager.secretAccessor", "--condition=None", *g] for s in secrets],
            *account(TASKS_SA, "MCP agent commands invoker (Cloud Tasks OIDC)"),
            *tasks_commands(exists=not first),
            *log_metric_commands(exists=not first),
            *[c for e in DEPLOY_ORDER for c in deployed_then_url(e)],
            *account(SCHEDULER_SA, "MCP status sweep invoker (Cloud Scheduler OIDC)"),
            ["gcloud", "functions", "add-invoker-policy-binding", "mcp-status-sweep", "--region=us-central1",
             f"--member=serviceAccount:{SCHEDULER_SA}", *g],
            ["gcloud", "scheduler", "jobs", "describe", "mcp-status-sweep", "--location=us-central1", *g],
            job,
        ]

    first = deploy(tree, log, *complete_args(env_file))
    assert first.returncode == 0, first.stderr
    calls = logged(log)
    deployed = [c for c in calls if c[1:3] == ["functions", "deploy"]]
    assert [c[3] for c in deployed] == [kebab(e) for e in DEPLOY_ORDER]
    assert calls == expected_sequence(first=True)
    # The worker's real URL replaced the placeholder in every enqueuer's environment.
    for entry in enqueuers():
        [argv] = [c for c in deployed if c[3] == kebab(entry)]
        assert parse_dict_flag(flag(argv, "--set-env-vars"))["COMMAND_WORKER_URL"] == url("dtma-command-worker")
    # ...and the sweep's and the worker's own URLs are the audiences they check: the ones the scheduler
    # job and the enqueued tasks (COMMAND_WORKER_URL) put in their OIDC tokens, for the same accounts.
    sweep_env, worker_env = (parse_dict_flag(flag(c, "--set-env-vars")) for c in deployed[1::-1])
    assert (sweep_env["SWEEP_INVOKER_AUDIENCE"], sweep_env["SWEEP_INVOKER_SA"]) == (url("mcp-status-sweep"),
                                                                                    SCHEDULER_SA)
    assert (worker_env["WORKER_INVOKER_AUDIENCE"], worker_env["WORKER_INVOKER_SA"]) == (
        sweep_env["COMMAND_WORKER_URL"], sweep_env["COMMAND_INVOKER_SA"])
    for entry in FUNCTIONS:
        assert (tree / "build" / "gcp" / entry / "requirements.txt").is_file()
    assert first.stdout.splitlines()[-1] == f"AGENTOPIA_API_BASE_URL={url('dtma-heartbeat-ingest')}"
    for entry in FUNCTIONS:
        assert url(kebab(entry)) in first.stdout
    assert (f"Cloud Tasks queue projects/{PROJECT}/locations/us-central1/queues/{QUEUE} delivers agent commands "
            f"to dtma-command-worker {url('dtma-command-worker')} (timeout 1800s), with an OIDC token of {TASKS_SA}."
            in first.stdout)
    assert "+ gcloud functions deploy deploy-mcp-server" in first.stderr  # traced as it runs

    log.write_text("")
    second = deploy(tree, log, *complete_args(env_file))  # the stand-in now knows the job and accounts
    assert second.returncode == 0, second.stderr
    assert logged(log) == expected_sequence(first=False)


def test_a_first_deploy_of_the_sweep_and_worker_learns_their_url_then_deploys_them_with_it(
        tree: Path, env_file: Path, log: Path, tmp_path: Path) -> None:
    # The stand-in, except that a function exists only once deployed: a project deployed to the first time.
    wrapper = tmp_path / "first-run-bin" / "gcloud"
    wrapper.parent.mkdir()
    wrapper.write_text(f"""#!/usr/bin/env bash
set -euo pipefail
state=$(dirname -- "$GCLOUD_LOG")/functions-deployed
mkdir -p -- "$state"
if [[ $1 == functions && $2 == describe && ! -e $state/$3 ]]; then
  {{ printf '%q ' "$@"; printf '\\n'; }} >>"$GCLOUD_LOG"
  printf 'ERROR: (gcloud) NOT_FOUND: function %s not found\\n' "$3" >&2
  exit 1
fi
if [[ $1 == functions && $2 == deploy ]]; then touch -- "$state/$3"; fi
exec {STANDIN_BIN / "gcloud"} "$@"
""")
    wrapper.chmod(0o755)
    path = f"{wrapper.parent}{os.pathsep}{STANDIN_BIN}{os.pathsep}{os.environ['PATH']}"

    first = deploy(tree, log, *complete_args(env_file), PATH=path)
    assert first.returncode == 0, first.stderr
    calls = [c for c in logged(log) if c[1] == "functions"]

    def described(name: str) -> list[str]:
        return ["gcloud", "functions", "describe", name, "--gen2", "--region=us-central1", f"--project={PROJECT}",
                "--format=value(serviceConfig.uri)"]

    audience = {"dtma-command-worker": "WORKER_INVOKER_AUDIENCE", "mcp-status-sweep": "SWEEP_INVOKER_AUDIENCE"}
    for name, setting in audience.items():
        # Its URL is unknown: deployed once with an audience no token carries, then again with its URL.
        at = calls.index(described(name))
        assert calls[at + 1][:4] == ["gcloud", "functions", "deploy", name]
        assert calls[at + 2] == described(name)
        assert calls[at + 3][:4] == ["gcloud", "functions", "deploy", name]
        before, after = (parse_dict_flag(flag(calls[at + k], "--set-env-vars")) for k in (1, 3))
        assert before[setting] == f"https://{name}.not-deployed-yet.invalid"
        assert after[setting] == url(name)
        assert {k: v for k, v in before.items() if k != setting} == {k: v for k, v in after.items() if k != setting}
    # The queue's account may invoke the worker only once it checks the right audience.
    assert calls.index(worker_invoker()) == calls.index(described("dtma-command-worker")) + 4
    assert [c[3] for c in calls if c[:3] == ["gcloud", "functions", "deploy"]] == [
        "dtma-command-worker", "dtma-command-worker", "mcp-status-sweep", "mcp-status-sweep",
        *(kebab(e) for e in DEPLOY_ORDER[2:])]
    assert parse_dict_flag(flag(calls[calls.index(described("mcp-status-sweep")) + 1], "--set-env-vars"))[
        "COMMAND_WORKER_URL"] == url("dtma-command-worker")

    log.write_text("")  # a second run: each is deployed once, with the URL it already has
    second = deploy(tree, log, *complete_args(env_file), PATH=path)
    assert second.returncode == 0, second.stderr
    names = [c[3] for c in logged(log) if c[1:3] == ["functions", "deploy"]]
    assert names == [kebab(e) for e in DEPLOY_ORDER]


# --- packaging ----------------------------------------------------------------------------------

def package(tree: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ops.gcp_package", "--root", str(tree), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)


def snapshot(directory: Path) -> dict[str, tuple[int, int, str]]:
    return {str(p.relative_to(directory)): (stat.S_IMODE(p.stat().st_mode), int(p.stat().st_mtime),
                                            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "")
            for p in sorted(directory.rglob("*"))}


def test_package_contains_main_shared_and_pinned_requirements(tree: Path) -> None:
    result = package(tree, "--out", "build/gcp", "--function", "mcp_status")
    assert result.returncode == 0, result.stderr
    out = tree / "build" / "gcp" / "mcp_status"
    assert [p.name for p in (tree / "build" / "gcp").iterdir()] == ["mcp_status"]
    assert (out / "main.py").read_text() == "# placeholder for mcp_status\n"
    assert (out / "shared" / "__init__.py").is_file() and (out / "shared" / "core" / "config.py").is_file()
    assert not list(out.rglob("__pycache__")) and not list(out.rglob("*.pyc"))
    shipped = {str(p.relative_to(out / "shared")) for p in (out / "shared").rglob("*.py")}
    source = {str(p.relative_to(tree / "shared")) for p in (tree / "shared").rglob("*.py")}
    assert shipped == source

    lines = [line for line in (out / "requirements.txt").read_text().splitlines()
             if line and not line.startswith("#")]
    pins = {}
    for line in lines:
        name, _, version = line.partition("==")
        assert version, f"unpinned: {line}"
        pins[re.sub(r"\[.*\]", "", name)] = version
    for dist in ("functions-framework", "psycopg", "psycopg-binary", "psycopg-pool", "pydantic",
                 "pydantic-settings", "httpx", "supabase", "google-cloud-logging", "pyjwt",
                 "flask", "pydantic-core", "cryptography"):  # direct, and runtime deps of direct ones
        assert pins[dist] == metadata.version(dist), dist
    assert "psycopg[binary]==" + pins["psycopg"] in lines
    assert not set(pins) & (NEVER_SHIP | {"pip", "setuptools"})
    assert lines == sorted(lines, key=lambda line: re.split(r"[\[=]", line)[0])


def test_package_is_deterministic(tree: Path, tmp_path: Path) -> None:
    assert package(tree, "--out", str(tmp_path / "a")).returncode == 0
    (tree / "shared" / "__pycache__").mkdir(exist_ok=True)  # caches from a local run are left out
    (tree / "shared" / "__pycache__" / "config.cpython-311.pyc").write_bytes(b"junk")
    assert package(tree, "--out", str(tmp_path / "b")).returncode == 0
    assert package(tree, "--out", str(tmp_path / "b")).returncode == 0  # rebuilding in place
    first, second = snapshot(tmp_path / "a"), snapshot(tmp_path / "b")
    assert first == second
    assert {p.split("/")[0] for p in first} == set(FUNCTIONS)


def test_package_refuses_a_missing_function_source(tree: Path) -> None:
    shutil.rmtree(tree / "functions" / "mcp_status_sweep")
    result = package(tree, "--out", "build/gcp")
    assert result.returncode == 2
    assert "functions/mcp_status_sweep/main.py" in result.stderr
    assert not (tree / "build" / "gcp").exists()


def test_plan_routes_deploy_settings_by_used_by(tree: Path) -> None:
    def plan(*args: str) -> dict:
        result = package(tree, "--plan", "--project", PROJECT, "--secret", "DTMA_KEY_SECRET=k", *args)
        return json.loads(result.stdout)

    got = plan("--deploy-env", "TASKS_MODE=cloud_tasks", "--deploy-env", f"COMMAND_INVOKER_SA={TASKS_SA}",
               "--deploy-env", "COMMAND_QUEUE=projects/p/locations/r/queues/q",
               "--deploy-env-url", "COMMAND_WORKER_URL=dtma-command-worker", "--deploy-env", "NOT_A_SETTING=1")
    # The worker's URL is needed: it comes first (without the sweep's own URL, the sweep keeps its place).
    assert [f["entry_point"] for f in got["functions"]] == [WORKER, *(e for e in FUNCTIONS if e != WORKER)]
    for f in got["functions"]:
        assert f["public"] is (f["entry_point"] not in PRIVATE)
        assert f["provided"] == (sorted(TASKS_ENV) if f["entry_point"] in enqueuers() else [])
        assert "NOT_A_SETTING" not in f["env"]
    assert any("NOT_A_SETTING" in w and "no function gets it" in w for w in got["warnings"])
    assert not got["problems"]
    assert got["urls"] == [WORKER]

    # Without the worker in the plan, the enqueuers still get its URL's placeholder (deploy.sh reads it).
    got = plan("--function", "mcp_status_sweep", "--deploy-env", "TASKS_MODE=cloud_tasks",
               "--deploy-env", f"COMMAND_INVOKER_SA={TASKS_SA}",
               "--deploy-env", "COMMAND_QUEUE=projects/p/locations/r/queues/q",
               "--deploy-env-url", "COMMAND_WORKER_URL=dtma_command_worker")
    [sweep] = got["functions"]
    assert sweep["env"]["COMMAND_WORKER_URL"] == "${DTMA_COMMAND_WORKER_URL}" and not got["problems"]

    # The URL of a function that does not exist, a value the function would refuse: refused.
    got = plan("--deploy-env-url", "COMMAND_WORKER_URL=nope")
    assert any("COMMAND_WORKER_URL is the URL of nope" in p for p in got["problems"])
    got = plan("--deploy-env", "COMMAND_QUEUE=not/a/queue")
    assert any("COMMAND_QUEUE" in p for p in got["problems"])
    # TASKS_MODE=cloud_tasks without the rest: the enqueuers' own start-up check refuses it.
    got = plan("--deploy-env", "TASKS_MODE=cloud_tasks")
    assert any("TASKS_MODE=cloud_tasks needs" in p for p in got["problems"])


def test_env_vars_flag_escapes_commas() -> None:
    assert dict_flag({"B": "2", "A": "1"}) == "A=1,B=2"
    assert dict_flag({"A": "x,y", "B": "2"}) == "^@^A=x,y@B=2"
    assert parse_dict_flag(dict_flag({"A": "x,y@z", "B": "a|b"})) == {"A": "x,y@z", "B": "a|b"}


# --- the script itself --------------------------------------------------------------------------

def test_usage_and_unknown_commands() -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", str(DEPLOY_SH), *args], capture_output=True, text=True, timeout=10)

    assert run().returncode == 2
    help_ = run("--help")
    assert help_.returncode == 0 and "gcp [options]" in help_.stdout and "local" in help_.stdout
    assert run("nope").returncode == 2
    assert run("gcp", "--bogus").returncode == 2


@pytest.mark.parametrize("script", [DEPLOY_SH, STANDIN_BIN / "gcloud"], ids=["deploy.sh", "stand-in gcloud"])
def test_shellcheck_clean(script: Path) -> None:
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (the dev extra installs it: pip install -e '.[dev]')")
    result = subprocess.run([shellcheck, str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


# --- docs/web-app.md tells the web app what deploy.sh creates ------------------------------------------

def test_the_web_app_doc_names_what_deploy_sh_creates(tree: Path, env_file: Path, log: Path) -> None:
    """The FunctionsClient base URL and the function names docs/web-app.md gives the web app are the
    ones a deploy prints and deploys, so the doc cannot drift from deploy.sh."""
    result = deploy(tree, log, *complete_args(env_file, "--region", "europe-west1"), "--dry-run")
    assert result.returncode == 0, result.stderr
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("# Web app (docs/web-app.md): ")]
    printed = re.fullmatch(r"# Web app \(docs/web-app\.md\): new FunctionsClient\('(\S+)'\) invokes (.+)\.", line)
    assert printed, line
    assert printed.group(1) == f"https://europe-west1-{PROJECT}.cloudfunctions.net"
    invoked = printed.group(2).split(", ")
    deployed = deploys(planned(result.stdout))
    # Each is a function deploy.sh deploys, publicly reachable, with its snake_case entry point.
    for name in invoked:
        assert "--allow-unauthenticated" in deployed[name] and flag(deployed[name], "--entry-point") == name.replace(
            "-", "_")
    doc = (REPO / "docs" / "web-app.md").read_text()
    table = doc.split("## The functions it calls", 1)[1].split("\n\n", 2)[1]
    rows = re.findall(r"^\| `([a-z-]+)` \| `([a-z_]+)` \|", table, re.M)
    assert [name for name, _ in rows] == invoked
    assert all(local == name.replace("-", "_") for name, local in rows)
    assert "`https://REGION-PROJECT.cloudfunctions.net`" in doc
    # Every call in the doc's code goes to one of them.
    called = {c.split("/")[0].split("?")[0] for c in re.findall(r"functions\.invoke\('([^']+)'", doc)}
    assert called and called <= set(invoked), called
