"""Settings: one start-up error that names every missing or invalid variable."""

from __future__ import annotations

import pytest

from shared.core.config import ALL_FUNCTIONS, ConfigError, Settings, load_settings


def test_missing_everything_is_listed_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings("deploy_mcp_server", environ={})
    message = str(caught.value)
    assert message.startswith("deploy_mcp_server cannot start:")
    for needle in ("DATABASE_URL", "SUPABASE_JWT_SECRET", "DTMA_KEY_SECRET"):
        assert needle in message


def test_invalid_values_are_all_named() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings("mcp_status_sweep", environ={"DATABASE_URL": "postgresql://x", "DTMA_PORT": "70000",
                                                   "HOST_PORT_RANGE": "9-1", "LOG_LEVEL": "LOUD"})
    message = str(caught.value)
    assert "DTMA_PORT" in message and "HOST_PORT_RANGE" in message and "LOG_LEVEL" in message


def test_each_function_needs_only_what_it_reads() -> None:
    base = {"DATABASE_URL": "postgresql://x"}
    load_settings("mcp_status_sweep", environ=base)
    load_settings("dtma_heartbeat_ingest", environ=base)
    with pytest.raises(ConfigError, match="SUPABASE_JWT_SECRET"):
        load_settings("mcp_status", environ=base)


def test_transport_selection_and_derived_urls() -> None:
    supa = load_settings(environ={"SUPABASE_URL": "https://ref.supabase.co/", "SUPABASE_SECRET_KEY": "k"})
    assert supa.db_transport == "supabase"
    assert supa.jwks_url == "https://ref.supabase.co/auth/v1/.well-known/jwks.json"
    assert supa.jwt_issuer == "https://ref.supabase.co/auth/v1"
    both = load_settings(environ={"SUPABASE_URL": "https://r.supabase.co", "SUPABASE_SECRET_KEY": "k",
                                  "DATABASE_URL": "postgresql://x"})
    assert both.db_transport == "postgres"
    with pytest.raises(ConfigError, match="DB_TRANSPORT=postgres needs DATABASE_URL"):
        load_settings(environ={"DB_TRANSPORT": "postgres"})


def test_legacy_key_mode_needs_the_global_key() -> None:
    env = {"DATABASE_URL": "postgresql://x", "SUPABASE_JWT_SECRET": "s" * 40, "DTMA_KEY_MODE": "legacy",
           "IDEMPOTENCY_SECRET": "i" * 40}
    with pytest.raises(ConfigError, match="BACKEND_TO_DTMA_API_KEY"):
        load_settings("manage_mcp_server", environ=env)
    load_settings("manage_mcp_server", environ={**env, "BACKEND_TO_DTMA_API_KEY": "k" * 32})


def test_deploy_and_manage_need_their_own_idempotency_secret() -> None:
    """Never borrowed from another secret: rotating the DTMA master secret must not change fingerprints."""
    env = {"DATABASE_URL": "postgresql://x", "SUPABASE_JWT_SECRET": "s" * 40, "DTMA_KEY_SECRET": "d" * 40}
    for function in ("deploy_mcp_server", "manage_mcp_server"):
        with pytest.raises(ConfigError, match="IDEMPOTENCY_SECRET is not set"):
            load_settings(function, environ=env)
        load_settings(function, environ={**env, "IDEMPOTENCY_SECRET": "i" * 40})
    load_settings("mcp_status", environ=env)


def test_secrets_never_print() -> None:
    settings = load_settings(environ={"DATABASE_URL": "postgresql://u:hunter2@db/x", "DTMA_KEY_SECRET": "topsecret"})
    assert "hunter2" not in repr(settings) and "topsecret" not in str(settings.model_dump())
    assert set(settings.secret_values()) == {"postgresql://u:hunter2@db/x", "topsecret"}


def test_every_setting_says_who_reads_it() -> None:
    for name, field in Settings.model_fields.items():
        used_by = field.json_schema_extra["used_by"]
        assert used_by and set(used_by) <= set(ALL_FUNCTIONS), name
        assert field.description, name


def test_on_google_cloud_commands_must_go_through_the_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inline commands run after the answer, where Cloud Run throttles the CPU: refused at start."""
    from shared.core.config import ConfigError, load_settings

    monkeypatch.setenv("K_SERVICE", "deploy-mcp-server")
    env = {"DATABASE_URL": "postgresql://x@127.0.0.1/db", "SUPABASE_JWT_SECRET": "s" * 40,
           "DTMA_KEY_SECRET": "k" * 40, "IDEMPOTENCY_SECRET": "i" * 40}
    with pytest.raises(ConfigError, match="agent commands need the queue"):
        load_settings("deploy_mcp_server", env)
    queued = {**env, "COMMAND_QUEUE": "projects/p/locations/l/queues/q", "COMMAND_WORKER_URL": "https://w.example/",
              "COMMAND_INVOKER_SA": "tasks@p.iam.gserviceaccount.com"}
    assert load_settings("deploy_mcp_server", queued).tasks_mode == "cloud_tasks"
    assert load_settings("mcp_status", env).tasks_mode == "inline"  # reads only: no commands to run
