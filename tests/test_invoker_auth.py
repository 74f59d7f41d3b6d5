"""The sweep and the command worker check their caller's Google OIDC ID token themselves, besides IAM
(shared/adapters/invoker_auth.py).

Everything is real: RS256 keys made here, their JWKS served over loopback HTTP as Google serves its
own (tests/jwt_helpers.py), the functions through functions-framework against the test database,
and, end to end, the local Cloud Tasks emulator minting the token of each delivery with its own
issuer. Every refused call is shown to change nothing: the sweep marks no toolbox, the worker claims
no command.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import jwt
import psycopg
import pytest
from flask.testing import FlaskClient

from devstack.cloud_tasks import CloudTasksEmulator
from devstack.server import HttpServer
from devstack.stack import COMMAND_INVOKER_SA, SWEEP_INVOKER_SA, SweepLoop, command_queue_env, invoker_env
from shared.adapters import invoker_auth
from shared.core.config import ConfigError, load_settings
from tests.factories import Factory, Toolbox
from tests.helpers import auth, last_command, server_row, spec
from tests.jwt_helpers import (
    DEFAULT_HS256_SECRET,
    OMIT,
    EcKeyPair,
    JwksServer,
    RsaKeyPair,
    closed_port_url,
    encode_compact,
    mint_hs256_with_public_key,
)

SWEEP = "mcp_status_sweep"
WORKER = "dtma_command_worker"
SCHEDULER_SA = "mcp-sweep-invoker@test-project.iam.gserviceaccount.com"
TASKS_SA = "mcp-tasks-invoker@test-project.iam.gserviceaccount.com"
SWEEP_URL = "https://mcp-status-sweep-abc-uc.a.run.app"
WORKER_URL = "https://dtma-command-worker-abc-uc.a.run.app"
GOOGLE = "https://accounts.google.com"
QUEUE = "projects/test-project/locations/local/queues/dtma-commands"
STALE = 3 * 60 + 30 + 60  # past the default threshold: the sweep marks such a toolbox unresponsive


def google_claims(aud: str = SWEEP_URL, email: str = SCHEDULER_SA, **changes: Any) -> dict[str, Any]:
    """The claims of a Google ID token for a service account (Cloud Scheduler's or Cloud Tasks' oidcToken);
    `changes` override them, OMIT drops one."""
    now = int(time.time())
    claims = {"aud": aud, "azp": "112233445566778899001", "email": email, "email_verified": True,
              "exp": now + 3600, "iat": now, "iss": GOOGLE, "sub": "112233445566778899001", **changes}
    return {k: v for k, v in claims.items() if v is not OMIT}


def google_token(pair: RsaKeyPair, **changes: Any) -> str:
    return jwt.encode(google_claims(**changes), pair.private_key, algorithm="RS256",
                      headers={"kid": pair.kid, "typ": "JWT"})


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def google_key() -> RsaKeyPair:
    return RsaKeyPair()


@pytest.fixture(scope="module")
def other_key() -> RsaKeyPair:
    return RsaKeyPair()


@pytest.fixture
def jwks(google_key: RsaKeyPair) -> Iterator[JwksServer]:
    """Google's JWKS, as https://www.googleapis.com/oauth2/v3/certs serves it, on a loopback port."""
    with JwksServer([google_key.jwk]) as server:
        yield server


@pytest.fixture
def sweep_client(function_client: Callable[..., FlaskClient], jwks: JwksServer) -> FlaskClient:
    return function_client(SWEEP, SWEEP_INVOKER_SA=SCHEDULER_SA, SWEEP_INVOKER_AUDIENCE=SWEEP_URL,
                           INVOKER_JWKS_URL=jwks.url)


def marked(pg: psycopg.Connection, box: Toolbox) -> bool:
    return pg.execute("select status::text from account_tool_environments where id = %s",
                      (box.id,)).fetchone()[0] == "unresponsive"


def refusals(google_key: RsaKeyPair, other_key: RsaKeyPair, aud: str, email: str) -> list[Any]:
    """(id, Authorization header or None, what the 401 must say): every way a caller can fail the check."""
    ec = EcKeyPair()

    def token(**changes: Any) -> str:
        return google_token(google_key, **{"aud": aud, "email": email, **changes})

    def signed(headers: dict[str, Any], key: Any, alg: str) -> str:
        return jwt.encode(google_claims(aud=aud, email=email), key, algorithm=alg, headers=headers)

    now = int(time.time())
    return [
        pytest.param(None, "missing Authorization header", id="no-token"),
        pytest.param("Basic dXNlcjpwYXNz", "must be 'Bearer <token>'", id="not-bearer"),
        pytest.param("Bearer not-a-jwt", "token is malformed", id="garbage"),
        pytest.param(f"Bearer {token(aud='https://elsewhere-abc-uc.a.run.app')}", "audience", id="wrong-audience"),
        pytest.param(f"Bearer {token(iss='https://evil.example')}", "issuer is not Google", id="wrong-issuer"),
        pytest.param(f"Bearer {token(email='someone@test-project.iam.gserviceaccount.com')}",
                     "not the invoker service account", id="wrong-email"),
        pytest.param(f"Bearer {token(email=OMIT)}", "missing the 'email' claim", id="no-email"),
        pytest.param(f"Bearer {token(email_verified=False)}", "email_verified", id="unverified-email"),
        pytest.param(f"Bearer {token(email_verified='true')}", "email_verified", id="email-verified-as-text"),
        pytest.param(f"Bearer {token(email_verified=OMIT)}", "email_verified", id="no-email-verified"),
        pytest.param(f"Bearer {token(iat=now - 7200, exp=now - 3600)}", "expired", id="expired"),
        pytest.param(f"Bearer {token(exp=OMIT)}", "missing the 'exp' claim", id="no-exp"),
        pytest.param(f"Bearer {token(iat=now + 3600, exp=now + 7200)}", "not yet valid", id="issued-in-the-future"),
        pytest.param(f"Bearer {signed({'kid': google_key.kid}, DEFAULT_HS256_SECRET, 'HS256')}",
                     "algorithm is not RS256", id="hs256"),
        pytest.param(f"Bearer {mint_hs256_with_public_key(google_key)}", "algorithm is not RS256",
                     id="hs256-with-the-public-key"),
        pytest.param("Bearer " + encode_compact({"alg": "none", "typ": "JWT", "kid": google_key.kid},
                                                google_claims(aud=aud, email=email)), "algorithm is not RS256",
                     id="alg-none"),
        pytest.param(f"Bearer {signed({'kid': ec.kid}, ec.private_key, 'ES256')}", "algorithm is not RS256",
                     id="es256"),
        pytest.param(f"Bearer {google_token(google_key.impostor(), aud=aud, email=email)}",
                     "signature is invalid", id="another-key-same-kid"),
        pytest.param(f"Bearer {google_token(other_key, aud=aud, email=email)}", "signing key is unknown",
                     id="another-key"),
        pytest.param(f"Bearer {signed({}, google_key.private_key, 'RS256')}", "no 'kid'", id="no-kid"),
    ]


# --- the sweep --------------------------------------------------------------------------------------------

def test_a_valid_scheduler_token_runs_the_sweep(sweep_client: FlaskClient, google_key: RsaKeyPair,
                                                factory: Factory, pg: psycopg.Connection) -> None:
    box = factory.toolbox(heartbeat_age_seconds=STALE)
    response = sweep_client.post("/", json={}, headers=bearer(google_token(google_key)))
    assert response.status_code == 200, response.json
    assert response.json["marked_unresponsive"] == 1 and marked(pg, box)
    # Both spellings of Google's issuer, and the URL with a trailing slash, are the same caller.
    for changes in ({"iss": "accounts.google.com"}, {"aud": SWEEP_URL + "/"}):
        again = sweep_client.post("/", json={}, headers=bearer(google_token(google_key, **changes)))
        assert again.status_code == 200, (changes, again.json)


def test_every_bad_token_is_refused_with_401_and_the_sweep_does_not_run(
        sweep_client: FlaskClient, google_key: RsaKeyPair, other_key: RsaKeyPair, factory: Factory,
        pg: psycopg.Connection, caplog: pytest.LogCaptureFixture) -> None:
    box = factory.toolbox(heartbeat_age_seconds=STALE)
    caplog.set_level(logging.DEBUG)
    for case in refusals(google_key, other_key, SWEEP_URL, SCHEDULER_SA):
        authorization, reason = case.values
        headers = {"Authorization": authorization} if authorization is not None else {}
        response = sweep_client.post("/", json={}, headers=headers)
        assert response.status_code == 401, (case.id, response.json)
        error = response.json["error"]
        assert error["code"] == "unauthenticated" and reason in error["message"], (case.id, error)
        assert response.headers["WWW-Authenticate"] == "Bearer"
        if authorization is not None:
            token = authorization.split(" ", 1)[1]
            assert token not in response.get_data(as_text=True), case.id
            assert token not in caplog.text, f"{case.id}: the token was logged"
            for part in token.split(".")[:2]:
                assert not part or part not in caplog.text, f"{case.id}: a part of the token was logged"
        assert not marked(pg, box), f"{case.id}: the sweep ran"
    assert "mcp_status_sweep refused a call: token audience is not this function's URL" in caplog.text


def test_signing_keys_out_of_reach_answer_503_and_the_sweep_does_not_run(
        function_client: Callable[..., FlaskClient], google_key: RsaKeyPair, factory: Factory,
        pg: psycopg.Connection) -> None:
    box = factory.toolbox(heartbeat_age_seconds=STALE)
    client = function_client(SWEEP, SWEEP_INVOKER_SA=SCHEDULER_SA, SWEEP_INVOKER_AUDIENCE=SWEEP_URL,
                             INVOKER_JWKS_URL=closed_port_url())
    response = client.post("/", json={}, headers=bearer(google_token(google_key)))
    assert response.status_code == 503 and response.headers["Retry-After"] == "10"
    assert "cannot verify the caller's token right now" in response.json["error"]["message"]
    assert not marked(pg, box)


def test_off_google_cloud_without_the_settings_the_check_is_off(function_client: Callable[..., FlaskClient],
                                                                factory: Factory) -> None:
    factory.toolbox(heartbeat_age_seconds=STALE)
    response = function_client(SWEEP).post("/", json={})
    assert response.status_code == 200 and response.json["marked_unresponsive"] == 1


# --- configuration ----------------------------------------------------------------------------------------

BASE = {"DATABASE_URL": "postgresql://u@h/db", "DTMA_KEY_SECRET": "k" * 32}


@pytest.mark.parametrize(("function", "names"), [(SWEEP, ("SWEEP_INVOKER_SA", "SWEEP_INVOKER_AUDIENCE")),
                                                 (WORKER, ("WORKER_INVOKER_SA", "WORKER_INVOKER_AUDIENCE"))])
def test_on_google_cloud_the_check_is_mandatory(monkeypatch: pytest.MonkeyPatch, function: str,
                                                names: tuple[str, str]) -> None:
    monkeypatch.setenv("K_SERVICE", function.replace("_", "-"))
    with pytest.raises(ConfigError, match=rf"checks its caller's OIDC token itself: set {names[0]} and {names[1]}"):
        load_settings(function, environ=BASE)
    with pytest.raises(ConfigError, match=rf"set {names[1]} \(./deploy.sh gcp does\)"):
        load_settings(function, environ={**BASE, names[0]: "a@p.iam.gserviceaccount.com"})
    configured = {**BASE, names[0]: "a@p.iam.gserviceaccount.com", names[1]: "https://f-abc-uc.a.run.app"}
    settings = load_settings(function, environ=configured)
    assert invoker_auth.expected_invoker(settings, function) == invoker_auth.Invoker(
        function, "a@p.iam.gserviceaccount.com", "https://f-abc-uc.a.run.app",
        "https://www.googleapis.com/oauth2/v3/certs", ("https://accounts.google.com", "accounts.google.com"))
    # The local overrides are refused there: the keys and the issuer are Google's.
    for override in ({"INVOKER_JWKS_URL": "https://keys.example/jwks.json"}, {"INVOKER_ISSUER": "https://me"}):
        with pytest.raises(ConfigError, match="INVOKER_JWKS_URL and INVOKER_ISSUER are for local stacks"):
            load_settings(function, environ={**configured, **override})
    load_settings(function, environ={**configured, "INVOKER_ISSUER": "accounts.google.com"})


def test_the_function_refuses_to_start_on_google_cloud_without_them(
        function_client: Callable[..., FlaskClient], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("K_SERVICE", "mcp-status-sweep")
    with pytest.raises(ConfigError, match=r"mcp_status_sweep cannot start: .*SWEEP_INVOKER_SA"):
        function_client(SWEEP)


def test_off_google_cloud_the_check_is_off_unset_and_never_half_configured() -> None:
    assert invoker_auth.expected_invoker(load_settings(SWEEP, environ=BASE), SWEEP) is None
    with pytest.raises(ConfigError, match="SWEEP_INVOKER_AUDIENCE is not set but SWEEP_INVOKER_SA is: set both"):
        load_settings(SWEEP, environ={**BASE, "SWEEP_INVOKER_SA": SCHEDULER_SA})
    with pytest.raises(ConfigError, match="WORKER_INVOKER_SA is not set but WORKER_INVOKER_AUDIENCE is"):
        load_settings(WORKER, environ={**BASE, "WORKER_INVOKER_AUDIENCE": WORKER_URL})
    local = load_settings(SWEEP, environ={**BASE, "SWEEP_INVOKER_SA": SCHEDULER_SA, "SWEEP_INVOKER_AUDIENCE": SWEEP_URL,
                                          "INVOKER_JWKS_URL": "http://127.0.0.1:9/jwks.json",
                                          "INVOKER_ISSUER": "http://127.0.0.1:9/_emulator/oidc"})
    expected = invoker_auth.expected_invoker(local, SWEEP)
    assert expected is not None and expected.issuers == ("http://127.0.0.1:9/_emulator/oidc",)
    # Each function reads only its own pair: the worker's settings do not turn the sweep's check on.
    only_worker = {**BASE, "WORKER_INVOKER_SA": TASKS_SA, "WORKER_INVOKER_AUDIENCE": WORKER_URL}
    assert invoker_auth.expected_invoker(load_settings(SWEEP, environ=only_worker), SWEEP) is None


# --- the worker -------------------------------------------------------------------------------------------

class Lazy:
    """A WSGI app filled in after the server is bound (the worker's URL goes into its own settings)."""

    def __init__(self) -> None:
        self.app: Any = None

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        return self.app(environ, start_response)


@pytest.fixture
def emulator() -> Iterator[CloudTasksEmulator]:
    emulator = CloudTasksEmulator(min_backoff=0.05, max_backoff=0.2).start()
    try:
        yield emulator
    finally:
        emulator.pause(True)  # some tests leave tasks pending on purpose: stop without waiting for them
        emulator.stop()


@pytest.fixture
def worker_server() -> Iterator[tuple[Lazy, str]]:
    app = Lazy()
    server = HttpServer("127.0.0.1", 0, app)
    server.start()
    try:
        yield app, f"http://127.0.0.1:{server.port}/functions/v1/{WORKER}"
    finally:
        server.stop()


def queue_env(emulator: CloudTasksEmulator, worker_url: str) -> dict[str, str]:
    return {"TASKS_MODE": "cloud_tasks", "CLOUD_TASKS_API_URL": emulator.url, "COMMAND_QUEUE": QUEUE,
            "COMMAND_WORKER_URL": worker_url, "COMMAND_INVOKER_SA": TASKS_SA}


def queued_deploy(function_client: Callable[..., FlaskClient], env: dict[str, str], box: Any) -> str:
    response = function_client("deploy_mcp_server", **env).post("/", json=spec(box), headers=auth(box.user_id))
    assert response.status_code == 202, response.json
    return response.json["id"]


def command_of(pg: psycopg.Connection, instance_id: str) -> str:
    return str(pg.execute("select id from dtma_commands where account_tool_instance_id = %s order by seq desc "
                          "limit 1", (instance_id,)).fetchone()[0])


def until(predicate: Callable[[], bool], seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "not reached in time"
        time.sleep(0.05)


def test_the_worker_runs_a_command_only_for_the_queues_token(
        function_client: Callable[..., FlaskClient], emulator: CloudTasksEmulator, jwks: JwksServer,
        google_key: RsaKeyPair, other_key: RsaKeyPair, toolbox_agent: Any, pg: psycopg.Connection) -> None:
    emulator.pause(True)  # the command stays queued: only the calls below reach the worker
    env = queue_env(emulator, WORKER_URL)
    box, agent = toolbox_agent()
    server = queued_deploy(function_client, env, box)
    command = command_of(pg, server)
    worker = function_client(WORKER, **env, WORKER_INVOKER_SA=TASKS_SA, WORKER_INVOKER_AUDIENCE=WORKER_URL,
                             INVOKER_JWKS_URL=jwks.url)
    before = last_command(pg, server)
    assert before["status"] == "pending" and before["attempts"] == 0
    for case in refusals(google_key, other_key, WORKER_URL, TASKS_SA):
        authorization, reason = case.values
        headers = {"Authorization": authorization} if authorization is not None else {}
        response = worker.post("/", json={"command_id": command}, headers=headers)
        assert response.status_code == 401 and reason in response.json["error"]["message"], (case.id, response.json)
        assert last_command(pg, server) == before, f"{case.id}: the command was touched"
    # The sweep's token is not the queue's, even for the right audience.
    response = worker.post("/", json={"command_id": command},
                           headers=bearer(google_token(google_key, aud=WORKER_URL, email=SCHEDULER_SA)))
    assert response.status_code == 401
    # The token is checked before the body is read: no body, no token is 401, not 400.
    assert worker.post("/", data=b"not json", content_type="application/json").status_code == 401
    assert not any(r.path == "/tools" for r in agent.requests)

    response = worker.post("/", json={"command_id": command},
                           headers=bearer(google_token(google_key, aud=WORKER_URL, email=TASKS_SA)))
    assert response.status_code == 200, response.json
    assert last_command(pg, server)["status"] == "done" and server_row(pg, server)[0] == "running"


def test_the_emulator_delivers_with_a_token_the_worker_accepts(
        function_client: Callable[..., FlaskClient], emulator: CloudTasksEmulator,
        worker_server: tuple[Lazy, str], toolbox_agent: Any, pg: psycopg.Connection) -> None:
    """End to end, as the local stack runs it: deploy enqueues with oidcToken {TASKS_SA, worker URL}; the
    emulator mints an RS256 token at delivery; the worker checks it against the emulator's JWKS."""
    app, worker_url = worker_server
    env = queue_env(emulator, worker_url)
    check = {"WORKER_INVOKER_SA": TASKS_SA, "WORKER_INVOKER_AUDIENCE": worker_url,
             "INVOKER_JWKS_URL": emulator.oidc_jwks_url, "INVOKER_ISSUER": emulator.oidc.issuer}
    app.app = function_client(WORKER, **env, **check).application
    box, _ = toolbox_agent()
    server = queued_deploy(function_client, env, box)
    until(lambda: server_row(pg, server)[0] == "running")
    until(lambda: [t["state"] for t in emulator.tasks()] == ["done"])
    [task] = emulator.tasks()
    assert task["attempts"] == 1 and task["last_status"] == 200
    # No token, or a token the emulator did not mint: refused, whoever asks.
    assert httpx.post(worker_url, json={"command_id": command_of(pg, server)}, timeout=10).status_code == 401


def test_deliveries_for_another_account_are_refused_and_retried_not_run(
        function_client: Callable[..., FlaskClient], emulator: CloudTasksEmulator,
        worker_server: tuple[Lazy, str], toolbox_agent: Any, pg: psycopg.Connection) -> None:
    app, worker_url = worker_server
    env = queue_env(emulator, worker_url)
    app.app = function_client(WORKER, **env, WORKER_INVOKER_SA="someone-else@test-project.iam.gserviceaccount.com",
                              WORKER_INVOKER_AUDIENCE=worker_url, INVOKER_JWKS_URL=emulator.oidc_jwks_url,
                              INVOKER_ISSUER=emulator.oidc.issuer).application
    box, agent = toolbox_agent()
    server = queued_deploy(function_client, env, box)
    until(lambda: emulator.tasks()[0]["attempts"] >= 3)
    [task] = emulator.tasks()
    assert task["state"] == "pending" and task["last_status"] == 401  # Cloud Tasks retries a 401
    assert last_command(pg, server)["status"] == "pending" and last_command(pg, server)["attempts"] == 0
    assert not any(r.path == "/tools" for r in agent.requests)


# --- the local stack's sweep ----------------------------------------------------------------------------------

def test_the_local_stacks_sweep_loop_sends_a_token_the_sweep_accepts(
        function_client: Callable[..., FlaskClient], emulator: CloudTasksEmulator, factory: Factory,
        pg: psycopg.Connection) -> None:
    app = Lazy()
    server = HttpServer("127.0.0.1", 0, app)
    server.start()
    base = f"http://127.0.0.1:{server.port}"
    env = invoker_env(emulator.oidc_jwks_url, emulator.oidc.issuer, base, sweep=True)
    # The stack's worker expects what its enqueuers put on the tasks: their audience and account.
    queue = command_queue_env(emulator.url, base)
    assert (env["WORKER_INVOKER_AUDIENCE"], env["WORKER_INVOKER_SA"]) == (queue["COMMAND_WORKER_URL"],
                                                                          queue["COMMAND_INVOKER_SA"])
    assert env["WORKER_INVOKER_SA"] == COMMAND_INVOKER_SA
    assert "SWEEP_INVOKER_SA" not in invoker_env(emulator.oidc_jwks_url, emulator.oidc.issuer, base, sweep=False)
    sweep_url = env["SWEEP_INVOKER_AUDIENCE"]
    app.app = function_client(SWEEP, **env).application
    box = factory.toolbox(heartbeat_age_seconds=STALE)
    try:
        assert httpx.post(sweep_url, json={}, timeout=10).status_code == 401  # a sweep by hand, without a token
        assert not marked(pg, box)
        loop = SweepLoop(sweep_url, 0.05, lambda: emulator.mint_token(sweep_url, SWEEP_INVOKER_SA))
        loop.start()
        try:
            until(lambda: marked(pg, box))
        finally:
            loop.stop()
        # What a person uses for a sweep by hand: the emulator's token endpoint.
        token = httpx.get(f"{emulator.url}/_emulator/oidc/token", params={"audience": sweep_url,
                                                                           "email": SWEEP_INVOKER_SA}).json()["token"]
        assert httpx.post(sweep_url, json={}, headers=bearer(token), timeout=10).status_code == 200
    finally:
        server.stop()


def test_nothing_of_the_token_reaches_a_refusal(sweep_client: FlaskClient, google_key: RsaKeyPair) -> None:
    """The reasons name the failed check, never a value from the token (header or claims)."""
    marker = f"leak-{uuid.uuid4().hex}"
    tokens = [google_token(google_key, aud=marker), google_token(google_key, iss=marker),
              google_token(google_key, email=f"{marker}@x.iam.gserviceaccount.com"),
              jwt.encode(google_claims(), google_key.private_key, algorithm="RS256", headers={"kid": marker}),
              jwt.encode(google_claims(), DEFAULT_HS256_SECRET, algorithm="HS256", headers={"kid": marker})]
    for token in tokens:
        response = sweep_client.post("/", json={}, headers=bearer(token))
        assert response.status_code == 401
        assert marker not in json.dumps(response.json)
