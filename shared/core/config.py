"""Configuration from environment variables, validated once per process.

Every setting declares which functions read it (`used_by`), so docs/configuration.md's table
and each function's start-up check come from this one list. A function that starts with a
missing or invalid variable fails at once with ONE message naming every problem, instead of
failing on the first request that happens to need the value.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

DEPLOY = "deploy_mcp_server"
MANAGE = "manage_mcp_server"
STATUS = "mcp_status"
SWEEP = "mcp_status_sweep"
HEARTBEAT = "dtma_heartbeat_ingest"
WORKER = "dtma_command_worker"
ALL_FUNCTIONS = (DEPLOY, MANAGE, STATUS, SWEEP, HEARTBEAT, WORKER)
USER_FACING = (DEPLOY, MANAGE, STATUS)
# Who talks to an agent: the worker runs every command (and, inline, so do deploy and manage);
# mcp_status reads agents on refresh=true.
CALLS_DTMA = (DEPLOY, MANAGE, STATUS, WORKER)
# Who creates command tasks: deploy and manage for new commands, the sweep for lost ones.
ENQUEUES = (DEPLOY, MANAGE, SWEEP)
# Who checks that MCP endpoints answer (shared/usecases/mcp_health.py): the worker after a start (and,
# inline, deploy and manage), mcp_status on refresh=true, the sweep in batches.
PROBES_MCP = (DEPLOY, MANAGE, STATUS, SWEEP, WORKER)
# Called by Google with an OIDC ID token (Cloud Scheduler, Cloud Tasks), which each checks itself:
# function -> (its invoker service account setting, its audience setting).
INVOKED_BY_GOOGLE = {SWEEP: ("SWEEP_INVOKER_SA", "SWEEP_INVOKER_AUDIENCE"),
                     WORKER: ("WORKER_INVOKER_SA", "WORKER_INVOKER_AUDIENCE")}
GOOGLE_OIDC_JWKS_URL = "https://www.googleapis.com/oauth2/v3/certs"
GOOGLE_OIDC_ISSUERS = ("https://accounts.google.com", "accounts.google.com")


class ConfigError(RuntimeError):
    """Start-up configuration is unusable; the message lists every problem."""


def _setting(default: Any, description: str, used_by: Iterable[str] = ALL_FUNCTIONS, **kwargs: Any) -> Any:
    return Field(default, description=description, json_schema_extra={"used_by": list(used_by)}, **kwargs)


class Settings(BaseModel):
    """All settings of all functions. Secrets are SecretStr so they never print.

    Read from the environment (`Settings()`, `load_settings`): each variable is named exactly like
    its field (or one of its aliases), and every field is a scalar that pydantic converts from the
    variable's text. That is all pydantic-settings did here, at ~60 ms of every cold start.
    """

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    def __init__(self, **values: Any) -> None:
        # Like pydantic-settings: the environment, overridden by explicit arguments.
        super().__init__(**{**_from_environment(os.environ), **values})

    # --- database -------------------------------------------------------------------------
    DATABASE_URL: SecretStr | None = _setting(
        None, "PostgreSQL URL. When set, the `postgres` transport is used (psycopg pool). On Supabase use the "
        "transaction pooler (port 6543).")
    SUPABASE_URL: str | None = _setting(
        None, "Supabase project URL. With a service key and no DATABASE_URL, the `supabase` transport "
        "(PostgREST RPC) is used; also the default JWT issuer and JWKS location.")
    SUPABASE_SERVICE_ROLE_KEY: SecretStr | None = _setting(
        None, "Supabase secret key (`sb_secret_...`) or legacy service_role JWT, for the `supabase` transport.",
        validation_alias=AliasChoices("SUPABASE_SERVICE_ROLE_KEY", "SUPABASE_SECRET_KEY"))
    DB_TRANSPORT: Literal["auto", "postgres", "supabase"] = _setting(
        "auto", "`auto` picks postgres when DATABASE_URL is set, else supabase.")
    DB_POOL_MAX_SIZE: int = _setting(4, "Connections per function instance (keep instances x this under "
                                        "the pooler's limit).", ge=1, le=100)
    DB_POOL_TIMEOUT_SECONDS: float = _setting(5.0, "Wait for a free connection before answering 503.", gt=0)
    DB_CONNECT_TIMEOUT_SECONDS: int = _setting(5, "TCP connect timeout to the database.", ge=1)
    DB_STATEMENT_TIMEOUT_MS: int = _setting(
        10_000, "Server-side statement timeout sent at connect (0 disables it).", ge=0)

    # --- user authentication (Supabase JWT) --------------------------------------------------
    SUPABASE_JWT_SECRET: SecretStr | None = _setting(
        None, "Legacy HS256 JWT secret of the Supabase project.", USER_FACING)
    SUPABASE_JWKS_URL: str | None = _setting(
        None, "JWKS of the project's asymmetric signing keys (default: SUPABASE_URL + "
        "/auth/v1/.well-known/jwks.json). https only (plain http only to a loopback address); redirects are "
        "not followed.", USER_FACING)
    SUPABASE_JWT_ISSUER: str | None = _setting(
        None, "Required `iss` of user tokens (default: SUPABASE_URL + /auth/v1).", USER_FACING)

    # --- backend -> DTMA ----------------------------------------------------------------------
    DTMA_PORT: int = _setting(30000, "Port of the DTMA agent on every toolbox.", CALLS_DTMA, ge=1, le=65535)
    DTMA_KEY_MODE: Literal["derived", "legacy"] = _setting(
        "derived", "`derived`: per-toolbox key HMAC(DTMA_KEY_SECRET, toolbox id, key version). `legacy`: "
        "one BACKEND_TO_DTMA_API_KEY for every toolbox.", (*CALLS_DTMA, HEARTBEAT))
    DTMA_KEY_SECRET: SecretStr | None = _setting(
        None, "Master secret the per-toolbox DTMA keys are derived from (Secret Manager).", CALLS_DTMA)
    BACKEND_TO_DTMA_API_KEY: SecretStr | None = _setting(
        None, "Legacy global key sent to every DTMA (DTMA_KEY_MODE=legacy only).", CALLS_DTMA)
    DTMA_CONNECT_TIMEOUT_SECONDS: float = _setting(2.0, "TCP connect timeout to a DTMA.", CALLS_DTMA, gt=0)
    DTMA_DEPLOY_BUDGET_SECONDS: float = _setting(
        1.5, "How long manage_mcp_server waits for its command's outcome before replying 202 (the command goes "
        "on and records its outcome when the agent answers). Deploys answer at once.", (MANAGE,), gt=0)
    DTMA_COMMAND_TIMEOUT_SECONDS: float = _setting(
        570.0, "How long the command worker waits for the agent's answer to one call (a pull can take minutes); "
        "keep it under DEPLOY_DEADLINE_SECONDS and COMMAND_DISPATCH_DEADLINE_SECONDS.", (DEPLOY, MANAGE, WORKER),
        gt=0)
    DTMA_STATUS_TIMEOUT_SECONDS: float = _setting(3.0, "Budget of mcp_status?refresh=true's DTMA read.",
                                                  (STATUS,), gt=0)
    TOOLBOX_MAX_CONCURRENT_COMMANDS: int = _setting(
        2, "Commands one toolbox runs at once (a droplet is not asked for many parallel pulls); more wait in "
        "the queue.", (DEPLOY, MANAGE, WORKER), ge=1, le=50)

    # --- the command queue (Cloud Tasks) -----------------------------------------------------------
    TASKS_MODE: Literal["auto", "cloud_tasks", "inline"] = _setting(
        "auto", "`cloud_tasks`: commands go to COMMAND_QUEUE and Cloud Tasks delivers them to the worker. "
        "`inline`: this process runs them itself (tests, single-process development). `auto`: cloud_tasks when "
        "COMMAND_QUEUE is set.", ENQUEUES)
    COMMAND_QUEUE: str | None = _setting(
        None, "Cloud Tasks queue of agent commands: projects/PROJECT/locations/REGION/queues/QUEUE.", ENQUEUES,
        pattern=r"^projects/[a-z0-9-]+/locations/[a-z0-9-]+/queues/[A-Za-z0-9-]+$")
    COMMAND_WORKER_URL: str | None = _setting(
        None, "URL of dtma_command_worker: where tasks are delivered, and the audience of their OIDC token.",
        ENQUEUES)
    COMMAND_INVOKER_SA: str | None = _setting(
        None, "Service account whose OIDC token Cloud Tasks attaches to each delivery.", ENQUEUES)
    CLOUD_TASKS_API_URL: str = _setting(
        "https://cloudtasks.googleapis.com", "Cloud Tasks REST endpoint (the local stack points it at its "
        "emulator).", ENQUEUES)
    COMMAND_DISPATCH_DEADLINE_SECONDS: int = _setting(
        900, "How long Cloud Tasks waits for the worker's answer to one delivery (15-1800).", ENQUEUES,
        ge=15, le=1800)

    # --- who may call the sweep and the worker (Google OIDC ID tokens) ------------------------------
    SWEEP_INVOKER_SA: str | None = _setting(
        None, "The service account whose Google OIDC ID token must come with every call of mcp_status_sweep (Cloud "
        "Scheduler's). Required on Google Cloud; elsewhere, unset (with SWEEP_INVOKER_AUDIENCE) turns the check off.",
        (SWEEP,))
    SWEEP_INVOKER_AUDIENCE: str | None = _setting(
        None, "The `aud` that token must carry: the sweep's own URL, which the scheduler job uses as audience.",
        (SWEEP,))
    WORKER_INVOKER_SA: str | None = _setting(
        None, "The service account whose Google OIDC ID token must come with every delivery to dtma_command_worker "
        "(Cloud Tasks', COMMAND_INVOKER_SA of the enqueuers). Required on Google Cloud; elsewhere, unset (with "
        "WORKER_INVOKER_AUDIENCE) turns the check off.", (WORKER,))
    WORKER_INVOKER_AUDIENCE: str | None = _setting(
        None, "The `aud` that token must carry: the worker's own URL (COMMAND_WORKER_URL of the enqueuers).",
        (WORKER,))
    INVOKER_JWKS_URL: str = _setting(
        GOOGLE_OIDC_JWKS_URL, "Where the signing keys of those tokens are published. Local stacks only: on Google "
        "Cloud it must be Google's.", (SWEEP, WORKER))
    INVOKER_ISSUER: str | None = _setting(
        None, "The `iss` of those tokens (default: Google's, `https://accounts.google.com` or "
        "`accounts.google.com`). Local stacks only.", (SWEEP, WORKER))
    ALLOW_PRIVATE_TOOLBOX_IPS: bool = _setting(
        False, "Allow loopback/private/link-local toolbox addresses (local development only): for the DTMA and "
        "for checking MCP endpoints.", (*CALLS_DTMA, SWEEP))
    HOST_PORT_RANGE: str = _setting("49152-49999", "Host ports allocated to MCP servers when the request "
                                                   "names none.", (DEPLOY,))
    ALLOW_PRIVILEGED_PORTS: bool = _setting(False, "Allow host ports below 1024.", (DEPLOY,))

    # --- liveness and deadlines -------------------------------------------------------------------
    HEARTBEAT_INTERVAL_SECONDS: int = _setting(60, "The DTMA's heartbeat period.", (STATUS, SWEEP, HEARTBEAT), ge=1)
    HEARTBEAT_GRACE_SECONDS: int = _setting(
        30, "Slack on top of 3 missed heartbeats before a toolbox is stale/unresponsive.",
        (STATUS, SWEEP, HEARTBEAT), ge=0)
    FIRST_CONTACT_GRACE_SECONDS: int = _setting(
        900, "How long a new toolbox may wait for its first heartbeat.", (SWEEP,), ge=1)
    DEPLOY_DEADLINE_SECONDS: int = _setting(600, "A deploy not seen running by then fails.", (SWEEP,), ge=1)
    ACTION_DEADLINE_SECONDS: int = _setting(120, "Deadline of start/stop/restart/remove.", (SWEEP,), ge=1)
    HEALTH_DEGRADED_AFTER_SECONDS: int = _setting(
        150, "Heartbeat age after which a running server's health is `degraded`.", (STATUS, HEARTBEAT),
        ge=1)
    SWEEP_BATCH_SIZE: int = _setting(500, "Most rows one sweep changes per kind.", (SWEEP,), ge=1)
    SWEEP_GUARD_FRACTION: float = _setting(
        0.5, "If more than this fraction of active toolboxes would turn unresponsive at once, none do.",
        (SWEEP,), gt=0, le=1)

    # --- retention (cp_prune_history, run by the sweep) ---------------------------------------------
    EVENTS_RETENTION_DAYS: int = _setting(
        30, "Server events older than this are deleted by the sweep, except each existing server's newest "
        "EVENTS_KEEP_PER_SERVER. The operations report reaches back at most this far.", (SWEEP,), ge=1, le=3650)
    EVENTS_KEEP_PER_SERVER: int = _setting(
        20, "Newest events every existing server keeps whatever their age, so its timeline is never empty.",
        (SWEEP,), ge=0, le=1000)
    COMMANDS_RETENTION_DAYS: int = _setting(
        30, "Finished agent commands (and the agent calls they recorded) older than this are deleted by the "
        "sweep.", (SWEEP,), ge=1, le=3650)
    RETENTION_BATCH_SIZE: int = _setting(
        5000, "Most rows of each kind one sweep handles: old events examined, finished commands deleted; 0: the "
        "sweep deletes nothing.", (SWEEP,), ge=0, le=50_000)

    # --- MCP endpoint checks (shared/usecases/mcp_health.py) --------------------------------------------
    MCP_PROBE_TIMEOUT_SECONDS: float = _setting(
        5.0, "Budget of one check that a server's MCP endpoint answers (initialize, then tools/list). "
        "mcp_status?refresh=true uses the smaller of this and DTMA_STATUS_TIMEOUT_SECONDS.", PROBES_MCP,
        gt=0, le=60)
    MCP_PROBE_MAX_BYTES: int = _setting(
        1_048_576, "Largest answer read from an MCP endpoint in one check; a larger one is a failed check.",
        PROBES_MCP, ge=4096, le=16_777_216)
    MCP_PROBE_CONCURRENCY: int = _setting(
        32, "Checks run at once by one sweep (and at most this many by one refresh).", PROBES_MCP, ge=1, le=256)
    MCP_PROBE_STARTUP_SECONDS: float = _setting(
        10.0, "After the command worker saw a server start, how long it keeps checking while nothing accepts "
        "connections on the endpoint yet (a server takes a moment to listen); 0 checks once. Commands run inline "
        "(TASKS_MODE=inline) always check once.", (WORKER,), ge=0, le=120)
    MCP_SWEEP_PROBE_BATCH: int = _setting(
        200, "Most running servers one sweep checks, those never checked first, then the longest unchecked "
        "(0: the sweep checks none).", (SWEEP,), ge=0, le=10_000)
    MCP_SWEEP_PROBE_BUDGET_SECONDS: float = _setting(
        35.0, "Time one sweep may spend checking: its batch is cut to MCP_PROBE_CONCURRENCY x "
        "(this / MCP_PROBE_TIMEOUT_SECONDS) servers. Keep it well under the sweep's own timeout (60 s).",
        (SWEEP,), gt=0)

    # --- HTTP -------------------------------------------------------------------------------------
    CORS_ALLOWED_ORIGINS: str = _setting(
        "*", "Comma-separated origins allowed to call the user-facing functions, or `*`.", USER_FACING)
    MAX_BODY_BYTES: int = _setting(1_048_576, "Largest request body accepted (413 beyond).", ge=1024)
    IDEMPOTENCY_TTL_SECONDS: int = _setting(86_400, "How long an Idempotency-Key is remembered.",
                                            (DEPLOY, MANAGE), ge=60)
    IDEMPOTENCY_SECRET: SecretStr | None = _setting(
        None, "Key of the HMAC that fingerprints requests sent with an Idempotency-Key (bodies carry env values, "
        "so a plain hash could be brute-forced from the table). Its own secret: rotating another one never "
        "breaks retries (Secret Manager).", (DEPLOY, MANAGE))
    IDEMPOTENCY_SECRET_PREVIOUS: SecretStr | None = _setting(
        None, "The IDEMPOTENCY_SECRET before a rotation: retries fingerprinted with it still match. Keep it for "
        "IDEMPOTENCY_TTL_SECONDS after rotating, then remove it.", (DEPLOY, MANAGE))

    # --- the watch stream (mcp_status?watch=true, docs/watch.md) ---------------------------------------
    WATCH_MAX_SECONDS: int = _setting(
        50, "Lifetime of one watch request (SSE stream or long-poll), after which it ends with its cursor and the "
        "client reconnects. Keep it under the function's request timeout (deploy.sh: 60 s).", (STATUS,), ge=1, le=3600)
    WATCH_KEEPALIVE_SECONDS: float = _setting(
        15.0, "A `: keep-alive` comment after this much silence on an SSE stream (proxies close idle "
        "connections).", (STATUS,), gt=0)
    WATCH_POLL_SECONDS: float = _setting(
        2.0, "Without LISTEN (the `supabase` transport, or a DATABASE_URL on Supabase's transaction pooler and no "
        "WATCH_DATABASE_URL), how often each watcher reads the change log.", (STATUS,), gt=0, le=60)
    WATCH_MAX_PER_INSTANCE: int = _setting(
        1000, "Watchers one function instance holds at once; more are answered 503 with Retry-After (another "
        "instance takes them).", (STATUS,), ge=1, le=100_000)
    WATCH_DATABASE_URL: SecretStr | None = _setting(
        None, "PostgreSQL URL of the one LISTEN connection per instance (default: DATABASE_URL). LISTEN needs a "
        "session: on Supabase, the session pooler (port 5432) or the direct connection, not the transaction pooler "
        "(6543).", (STATUS,))

    # --- logging ----------------------------------------------------------------------------------
    LOG_LEVEL: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = _setting("INFO", "Log level.")
    LOG_FORMAT: Literal["auto", "json", "text"] = _setting(
        "auto", "`auto`: Cloud Logging JSON on Google Cloud (K_SERVICE set), readable text elsewhere.")
    GOOGLE_CLOUD_PROJECT: str | None = _setting(None, "Project id for trace correlation in logs.")

    @field_validator("HOST_PORT_RANGE")
    @classmethod
    def _port_range(cls, value: str) -> str:
        low, sep, high = value.partition("-")
        if not (sep and low.isdigit() and high.isdigit() and 1 <= int(low) <= int(high) <= 65535):
            raise ValueError("must look like 49152-49999")
        return value

    @field_validator("SUPABASE_URL", "SUPABASE_JWKS_URL")
    @classmethod
    def _strip_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else value

    @model_validator(mode="after")
    def _transport_is_possible(self) -> Settings:
        if self.DB_TRANSPORT == "postgres" and self.DATABASE_URL is None:
            raise ValueError("DB_TRANSPORT=postgres needs DATABASE_URL")
        return self

    # --- derived values -----------------------------------------------------------------------
    @property
    def db_transport(self) -> Literal["postgres", "supabase"] | None:
        if self.DB_TRANSPORT != "auto":
            return self.DB_TRANSPORT
        if self.DATABASE_URL is not None:
            return "postgres"
        if self.SUPABASE_URL and self.SUPABASE_SERVICE_ROLE_KEY is not None:
            return "supabase"
        return None

    @property
    def jwks_url(self) -> str | None:
        if self.SUPABASE_JWKS_URL:
            return self.SUPABASE_JWKS_URL
        return f"{self.SUPABASE_URL}/auth/v1/.well-known/jwks.json" if self.SUPABASE_URL else None

    @property
    def jwt_issuer(self) -> str | None:
        if self.SUPABASE_JWT_ISSUER:
            return self.SUPABASE_JWT_ISSUER
        return f"{self.SUPABASE_URL}/auth/v1" if self.SUPABASE_URL else None

    @property
    def host_port_range(self) -> tuple[int, int]:
        low, _, high = self.HOST_PORT_RANGE.partition("-")
        return int(low), int(high)

    @property
    def cors_origins(self) -> frozenset[str]:
        return frozenset(o.strip() for o in self.CORS_ALLOWED_ORIGINS.split(",") if o.strip())

    @property
    def stale_after_seconds(self) -> int:
        """Three missed heartbeats plus grace (Kubernetes/Nomad: staleness, not failure)."""
        return 3 * self.HEARTBEAT_INTERVAL_SECONDS + self.HEARTBEAT_GRACE_SECONDS

    @property
    def tasks_mode(self) -> Literal["cloud_tasks", "inline"]:
        if self.TASKS_MODE != "auto":
            return self.TASKS_MODE
        return "cloud_tasks" if self.COMMAND_QUEUE else "inline"

    @property
    def on_google_cloud(self) -> bool:
        return "K_SERVICE" in os.environ

    def secret_values(self) -> list[str]:
        """Every configured secret, for the log redactor."""
        secrets = [self.DATABASE_URL, self.SUPABASE_SERVICE_ROLE_KEY, self.SUPABASE_JWT_SECRET,
                   self.DTMA_KEY_SECRET, self.BACKEND_TO_DTMA_API_KEY, self.IDEMPOTENCY_SECRET,
                   self.IDEMPOTENCY_SECRET_PREVIOUS, self.WATCH_DATABASE_URL]
        return [s.get_secret_value() for s in secrets if s is not None and s.get_secret_value()]

    def problems_for(self, function: str) -> list[str]:
        """What `function` needs that is missing, as sentences naming the variables."""
        problems = []
        if self.db_transport is None:
            problems.append("no database: set DATABASE_URL, or SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY")
        if function in (DEPLOY, MANAGE) and self.IDEMPOTENCY_SECRET is None:
            problems.append("IDEMPOTENCY_SECRET is not set (the key of Idempotency-Key request fingerprints)")
        if function in USER_FACING and self.SUPABASE_JWT_SECRET is None and self.jwks_url is None:
            problems.append("no way to verify user tokens: set SUPABASE_JWT_SECRET or SUPABASE_URL "
                            "(or SUPABASE_JWKS_URL)")
        if function in ENQUEUES and self.tasks_mode == "cloud_tasks":
            missing = [name for name in ("COMMAND_QUEUE", "COMMAND_WORKER_URL", "COMMAND_INVOKER_SA")
                       if not getattr(self, name)]
            if missing:
                problems.append("TASKS_MODE=cloud_tasks needs " + ", ".join(missing))
        if function in (DEPLOY, MANAGE) and self.tasks_mode == "inline" and self.on_google_cloud:
            # Inline, a command runs after the answer, where Cloud Run throttles the CPU: outcomes
            # would arrive late or not at all. Production goes through the queue.
            problems.append("on Google Cloud, agent commands need the queue: set COMMAND_QUEUE, COMMAND_WORKER_URL "
                            "and COMMAND_INVOKER_SA (./deploy.sh gcp does), not TASKS_MODE=inline")
        if function in INVOKED_BY_GOOGLE:
            problems += self._invoker_problems(function)
        if function in CALLS_DTMA:
            if self.DTMA_KEY_MODE == "derived" and self.DTMA_KEY_SECRET is None:
                problems.append("DTMA_KEY_MODE=derived needs DTMA_KEY_SECRET")
            if self.DTMA_KEY_MODE == "legacy" and self.BACKEND_TO_DTMA_API_KEY is None:
                problems.append("DTMA_KEY_MODE=legacy needs BACKEND_TO_DTMA_API_KEY")
        return problems

    def _invoker_problems(self, function: str) -> list[str]:
        """The OIDC check of the sweep's or the worker's caller: mandatory on Google Cloud, and then
        against Google's keys only; elsewhere off when unset, but never half configured."""
        names = INVOKED_BY_GOOGLE[function]
        missing = [name for name in names if not getattr(self, name)]
        if self.on_google_cloud:
            problems = [f"on Google Cloud, {function} checks its caller's OIDC token itself: set "
                        f"{' and '.join(missing)} (./deploy.sh gcp does)"] if missing else []
            if self.INVOKER_JWKS_URL != GOOGLE_OIDC_JWKS_URL or (self.INVOKER_ISSUER or GOOGLE_OIDC_ISSUERS[0]) \
                    not in GOOGLE_OIDC_ISSUERS:
                problems.append("INVOKER_JWKS_URL and INVOKER_ISSUER are for local stacks: on Google Cloud the "
                                "caller's token is Google's; remove them")
            return problems
        if len(missing) == 1:
            return [f"{missing[0]} is not set but {next(n for n in names if n not in missing)} is: set both "
                    "(the caller's OIDC token is checked) or neither (no check, local use only)"]
        return []


# Environment names a setting may also be given by (validation_alias choices other than the field's own name).
_ALIASES = frozenset(
    choice for name, info in Settings.model_fields.items() if isinstance(info.validation_alias, AliasChoices)
    for choice in info.validation_alias.choices if isinstance(choice, str) and choice != name)


def _describe(error: ValidationError) -> list[str]:
    out = []
    for item in error.errors():
        name = ".".join(str(part) for part in item["loc"]) or "configuration"
        out.append(f"{name}: {item['msg']}")
    return out


def _from_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables that name a setting (a field or an alias), as given."""
    return {k: v for k, v in environ.items() if k in Settings.model_fields or k in _ALIASES}


def load_settings(function: str | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Read and validate the settings, raising one ConfigError that lists every problem."""
    try:
        settings = Settings.model_validate(_from_environment(os.environ if environ is None else environ))
    except ValidationError as exc:
        raise ConfigError("invalid configuration: " + "; ".join(_describe(exc))) from None
    problems = settings.problems_for(function) if function else []
    if problems:
        raise ConfigError(f"{function} cannot start: " + "; ".join(problems))
    return settings
