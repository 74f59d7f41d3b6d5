"""No secret reaches a log: a realistic run through every function, captured exactly as
production writes it, scanned for every token, key, JWT, secret and env value it handled.

Production logging is what `shared.adapters.logging.setup_logging` installs: ONE handler on the root
logger (readable text locally, Cloud Logging JSON on Google Cloud) with `RedactingFilter` on the
handler. This test installs it through that same function (into a buffer instead of
stderr/stdout, at DEBUG so library debug lines are included) and takes the other redacting
handlers of the test session off the root logger meanwhile, so the only redaction the captured
text went through is the production handler's own. It runs once per format.

The run: deploys with env values (one succeeds, one fails with an agent error that quotes an env
value, one replays an Idempotency-Key), a deploy whose DTMA call raises an exception quoting the
key and an env value (a 500 with a logged traceback), every manage action, status reads with and
without a DTMA refresh (up and down), heartbeats with good, wrong and missing tokens, requests
with forged, expired, `alg: none` and service-role JWTs, a sweep, and a function whose database
URL carries a password and cannot be reached.
"""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from shared.adapters import logging as shared_logging
from shared.core.config import load_settings
from tests.conftest import JWT_SECRET
from tests.factories import MASTER_SECRET, Factory
from tests.helpers import beat, closed_port, container, settle, spec
from tests.jwt_helpers import OMIT, mint_alg_none, mint_hs256

SERVICE_KEY = "sb_secret_logs-test-service-key-0123456789abcdef"
SERVICE_JWT = mint_hs256(JWT_SECRET, sub=OMIT, role="service_role", aud=None, iss="supabase")
DB_PASSWORD = "pg-Passw0rd-that-must-not-leak"
ENV_SECRETS = {"GITHUB_TOKEN": "ghp_supersecret123", "PLAIN": "correct-horse-battery-staple-42",
               "ECHOED": "zz-echoed-by-the-agent-9f8e7d"}


@pytest.fixture(params=["text", "json"])
def production_log(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """The production handler, installed by setup_logging, writing into a buffer."""
    root = logging.getLogger()
    saved_level = root.level
    saved_library_levels = {name: logging.getLogger(name).level for name in ("httpx", "httpcore")}
    redacting = [h for h in root.handlers if any(isinstance(f, shared_logging.RedactingFilter) for f in h.filters)]
    for handler in redacting:
        root.removeHandler(handler)
    buffer = io.StringIO()
    monkeypatch.setattr(sys, "stderr" if request.param == "text" else "stdout", buffer)
    monkeypatch.setattr(shared_logging, "_configured", False)
    settings = load_settings(environ={"LOG_FORMAT": request.param, "LOG_LEVEL": "DEBUG",
                                      "SUPABASE_JWT_SECRET": JWT_SECRET, "DTMA_KEY_SECRET": MASTER_SECRET,
                                      "SUPABASE_SERVICE_ROLE_KEY": SERVICE_KEY})
    before = list(root.handlers)
    shared_logging.setup_logging(settings)
    installed = [h for h in root.handlers if h not in before]
    assert len(installed) == 1 and any(isinstance(f, shared_logging.RedactingFilter) for f in installed[0].filters)
    try:
        yield buffer
    finally:
        for handler in installed:
            root.removeHandler(handler)
        for handler in redacting:
            root.addHandler(handler)
        root.setLevel(saved_level)
        for name, level in saved_library_levels.items():
            logging.getLogger(name).setLevel(level)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def run_everything(function_client: Any, toolbox_agent: Any, factory: Factory, pg: psycopg.Connection,
                   monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Drive every function through success and failure; return every secret that was used."""
    env = {"SUPABASE_SERVICE_ROLE_KEY": SERVICE_KEY, "DTMA_DEPLOY_BUDGET_SECONDS": "0.5"}
    deploy, manage, status, heartbeat, sweep = (
        function_client(name, **env) for name in ("deploy_mcp_server", "manage_mcp_server", "mcp_status",
                                                  "dtma_heartbeat_ingest", "mcp_status_sweep"))
    box, agent = toolbox_agent()
    other_box, _ = toolbox_agent()
    user_jwt = mint_hs256(JWT_SECRET, sub=box.user_id)
    other_jwt = mint_hs256(JWT_SECRET, sub=other_box.user_id)
    bad_jwts = [mint_hs256("a-wrong-secret-that-is-long-enough-0123456789", sub=box.user_id),
                mint_hs256(JWT_SECRET, sub=box.user_id, exp_in=-600), mint_alg_none(sub=box.user_id), SERVICE_JWT]
    used = [JWT_SECRET, MASTER_SECRET, SERVICE_KEY, DB_PASSWORD, box.token, other_box.token, user_jwt, other_jwt,
            *bad_jwts, *ENV_SECRETS.values()]

    # Deploy: success with env values, an agent error quoting one, an idempotent replay.
    body = spec(box, env=dict(ENV_SECRETS))
    first = deploy.post("/", json=body, headers={**bearer(user_jwt), "Idempotency-Key": "logs-1"})
    assert first.status_code == 202, first.json
    assert deploy.post("/", json=body, headers={**bearer(user_jwt), "Idempotency-Key": "logs-1"}).status_code == 202
    settle()
    agent.fail_next("deploy", 500, {"success": False, "error": f"invalid env ECHOED={ENV_SECRETS['ECHOED']}"})
    assert deploy.post("/", json=spec(box, name="echo", env=dict(ENV_SECRETS)),
                       headers=bearer(user_jwt)).status_code == 202
    settle()

    # A bug in the DTMA client whose exception quotes the key and an env value: the command fails
    # in the worker, its traceback logged.
    from shared.adapters.dtma import DtmaClient

    def explode(self: Any, target: Any, dtma_body: Any, budget: float) -> Any:
        raise RuntimeError(f"unexpected: Authorization: Bearer {target.key} with {dtma_body['baseConfigOverrideJson']}")

    with monkeypatch.context() as patch:
        patch.setattr(DtmaClient, "deploy", explode)
        assert deploy.post("/", json=spec(box, name="boom", env=dict(ENV_SECRETS)),
                           headers=bearer(user_jwt)).status_code == 202
        settle()

    # Manage: every action, and the other user's attempt.
    server = first.json["id"]
    for path, method in ((f"/{server}/stop", "POST"), (f"/{server}/start", "POST"), (f"/{server}/restart", "POST")):
        assert manage.open(path, method=method, headers=bearer(user_jwt)).status_code == 200
    assert manage.post(f"/{server}/stop", headers=bearer(other_jwt)).status_code == 404

    # Status: list, one, refresh with the DTMA up, then down.
    assert status.get("/", headers=bearer(user_jwt)).status_code == 200
    assert status.get(f"/{server}", query_string={"refresh": "true"}, headers=bearer(user_jwt)).status_code == 200
    agent.refuse_connections()
    assert status.get("/", query_string={"refresh": "true"}, headers=bearer(user_jwt)).status_code == 200
    agent.accept_connections()
    assert manage.delete(f"/{server}", headers=bearer(user_jwt)).status_code == 200

    # Heartbeats: good, naming another toolbox's server, wrong and missing tokens.
    assert heartbeat.post("/heartbeat", json=agent.heartbeat_payload(), headers=bearer(box.token)).status_code == 204
    foreign = beat({"account_tool_instance_id": server, "status_on_toolbox": "running"}, container("x"))
    assert heartbeat.post("/heartbeat", json=foreign, headers=bearer(other_box.token)).status_code == 204
    for headers in (bearer(box.token + "x"), bearer(box.token[:-1]), bearer(user_jwt), {"Authorization": box.token},
                    {}):
        assert heartbeat.post("/heartbeat", json=beat(), headers=headers).status_code == 401

    # JWTs that must not get in (and must not be logged either).
    for token in bad_jwts:
        for response in (status.get("/", headers=bearer(token)), deploy.post("/", json=body, headers=bearer(token)),
                         manage.post(f"/{server}/stop", headers=bearer(token))):
            assert response.status_code == 401

    assert sweep.post("/").status_code == 200

    # A database that cannot be reached, its URL carrying a password.
    unreachable = function_client("mcp_status", DATABASE_URL=f"postgresql://app:{DB_PASSWORD}@127.0.0.1:"
                                  f"{closed_port()}/postgres", DB_POOL_TIMEOUT_SECONDS="0.3")
    assert unreachable.get("/", headers=bearer(user_jwt)).status_code == 503
    return used


def test_no_secret_reaches_the_production_log(production_log: io.StringIO, function_client: Any,
                                              toolbox_agent: Any, factory: Factory, pg: psycopg.Connection,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from shared.adapters import db

    pools = set(db._instances)
    try:
        used = run_everything(function_client, toolbox_agent, factory, pg, monkeypatch)
    finally:
        with db._lock:  # close the unreachable database's pool (it would keep retrying)
            for key in set(db._instances) - pools:
                db._instances.pop(key).close()
    text = production_log.getvalue()
    # The capture is the real thing: every function spoke, failures included.
    for expected in ("deploy_mcp_server POST / -> 202", "an agent command failed after its request had answered",
                     "manage_mcp_server DELETE", "mcp_status GET",
                     "dtma_heartbeat_ingest POST /heartbeat -> 401", "mcp_status_sweep POST / -> 200",
                     "unavailable", "Traceback", "RuntimeError", shared_logging.REDACTED):
        assert expected in text, f"{expected!r} missing from the captured log"
    leaks = []
    for secret in used:
        fragments = {secret, secret[:16]} | ({secret.split(".")[2]} if secret.count(".") == 2 and
                                              secret.split(".")[2] else set())
        leaks += [f"{secret[:12]}... ({fragment[:8]}...)" for fragment in fragments if fragment in text]
    assert leaks == [], "secrets in the log: " + ", ".join(leaks)


def test_env_values_quoted_by_the_agent_are_not_stored_or_returned(
        function_client: Any, toolbox_agent: Any, pg: psycopg.Connection) -> None:
    """An agent error that quotes an env value must not carry it into the event history or the
    answer: env values are never stored, logged or returned."""
    box, agent = toolbox_agent()
    agent.fail_next("deploy", 500, {"success": False, "error": f"invalid env ECHOED={ENV_SECRETS['ECHOED']}"})
    response = function_client("deploy_mcp_server").post(
        "/", json=spec(box, env=dict(ENV_SECRETS)), headers=bearer(mint_hs256(JWT_SECRET, sub=box.user_id)))
    assert response.status_code == 202
    settle()
    assert ENV_SECRETS["ECHOED"] not in response.get_data(as_text=True)
    commands = pg.execute("select string_agg(t::text, '|') from dtma_commands t").fetchone()[0]
    assert ENV_SECRETS["ECHOED"] not in commands
    stored = pg.execute("select coalesce(string_agg(t::text, '|'), '') from account_tool_instances t").fetchone()[0]
    events = pg.execute("select string_agg(t::text, '|') from account_tool_instance_events t").fetchone()[0]
    assert ENV_SECRETS["ECHOED"] not in stored and ENV_SECRETS["ECHOED"] not in events
    # The agent's answer quoted a secret: it is withheld whole, and the outcome says where to read it.
    assert "quoted part of a secret environment value" in events and "invalid env ECHOED=" not in events
