"""Findings of an attack on the local stack, each held to its fix (body limits over raw sockets are in
test_body_limits.py, SQL function privileges in test_sql_security.py).

F3 heartbeat tokens are checked before the body; F5 no database text reaches a client; F6 secret
env values never leave in part or in another letter case; F7 strict types; F8b a heartbeat stores
bounded blobs; an idempotency secret of its own, rotated without breaking retries.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import psycopg
import pytest
from flask.testing import FlaskClient

from shared import runtime
from shared.adapters.db.postgres import PostgresDatabase
from shared.usecases import heartbeat
from tests.factories import Factory
from tests.helpers import CountingCursor, auth, beat, container, server_row, settle, spec

DATABASE_TEXT = re.compile(r"violates|invalid input syntax|SQLSTATE|syntax error at|relation \"|psycopg|"
                           r"unsupported Unicode escape|foreign key|duplicate key value|column \"|constraint", re.I)


def assert_no_database_text(response: Any) -> None:
    assert response.is_json, response.data[:200]
    assert not DATABASE_TEXT.search(response.get_data(as_text=True)), response.json


# --- F3: the heartbeat token before the body ---------------------------------------------------

@pytest.fixture
def beats(function_client: Any) -> FlaskClient:
    heartbeat.RECENT.clear()
    return function_client("dtma_heartbeat_ingest")


def _beat(client: FlaskClient, token: str, body: Any) -> Any:
    return client.post("/heartbeat", json=body, headers={"Authorization": f"Bearer {token}"})


@pytest.mark.parametrize("body", [
    {"dtma_version": 5},  # names a field to an authenticated agent
    {"not": "a heartbeat"},
    [1, 2, 3],
])
def test_a_bad_token_is_401_whatever_the_body(beats: FlaskClient, factory: Factory, body: Any) -> None:
    box = factory.toolbox()
    answer = _beat(beats, box.token + "x", body)
    assert answer.status_code == 401 and answer.json["error"]["message"] == "invalid toolbox token"
    # The same body from the toolbox's own agent is told what is wrong.
    assert _beat(beats, box.token, body).status_code == 400


def test_a_bad_token_is_refused_before_a_megabyte_is_validated(beats: FlaskClient, factory: Factory,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = heartbeat.build_report
    monkeypatch.setattr(heartbeat, "build_report", lambda body: calls.append(1) or real(body))
    box = factory.toolbox()
    big = beat(*[container(f"c-{n}") for n in range(2000)])
    assert 500_000 < len(json.dumps(big)) < 1024 * 1024
    assert _beat(beats, "a" * 64, big).status_code == 401
    assert calls == []  # never parsed nor validated
    assert _beat(beats, box.token, big).status_code == 204 and calls == [1]


def test_a_steady_heartbeat_stays_one_round_trip_and_a_revoked_token_is_refused(
        beats: FlaskClient, factory: Factory, database_url: str, pg: psycopg.Connection) -> None:
    counting = PostgresDatabase(database_url, connection_kwargs={"cursor_factory": CountingCursor})
    try:
        runtime.load("dtma_heartbeat_ingest").__dict__["db"] = counting
        box = factory.toolbox()
        CountingCursor.statements = 0
        assert _beat(beats, box.token, beat(container("x"))).status_code == 204
        assert CountingCursor.statements == 2  # first sight of this token here: checked before the body
        CountingCursor.statements = 0
        assert _beat(beats, box.token, beat(container("x"))).status_code == 204
        assert CountingCursor.statements == 1
        # A key rotation revokes the token: refused at once by the ingest, then before the body.
        pg.execute("update account_tool_environments set dtma_token_sha256 = null where id = %s", (box.id,))
        assert _beat(beats, box.token, beat(container("x"))).status_code == 401
        CountingCursor.statements = 0
        assert _beat(beats, box.token, {"junk": True}).status_code == 401
        assert CountingCursor.statements == 1
    finally:
        counting.close()


# --- F5: no database text ------------------------------------------------------------------------

def test_a_valid_token_of_a_user_with_no_account_row(function_client: Any, factory: Factory) -> None:
    """The JWT verifies, but auth.users has no such user (deleted): our sentence, not a foreign key."""
    box = factory.toolbox()
    deploy = function_client("deploy_mcp_server")
    ghost = str(uuid.uuid4())
    answer = deploy.post("/", json=spec(box), headers={**auth(ghost), "Idempotency-Key": "k-1"})
    assert answer.status_code in (403, 404), answer.json
    assert_no_database_text(answer)


@pytest.mark.parametrize("path", ["/------------------------------------/stop", "/not-a-uuid/start",
                                  "/0000000g-0000-0000-0000-000000000000/restart"])
def test_path_ids_are_parsed_before_any_sql(function_client: Any, factory: Factory, path: str) -> None:
    manage = function_client("manage_mcp_server")
    answer = manage.post(path, headers=auth(factory.user()))
    assert answer.status_code == 400 and answer.json["error"]["details"]["field"] == "instance_id", answer.json
    assert_no_database_text(answer)
    assert_no_database_text(manage.delete(path.rsplit("/", 1)[0], headers=auth(factory.user())))


@pytest.mark.parametrize("text", ['"\\u0000"', '"a\\ud800b"', '"\\udc00"'])
def test_text_jsonb_cannot_hold_is_refused_by_validation(beats: FlaskClient, factory: Factory,
                                                         function_client: Any, text: str) -> None:
    box = factory.toolbox()
    raw = b'{"dtma_version": "1", "tool_statuses": [], "system_status": {"note": ' + text.encode() + b"}}"
    answer = beats.post("/heartbeat", data=raw, content_type="application/json",
                        headers={"Authorization": f"Bearer {box.token}"})
    assert answer.status_code == 400 and answer.json["error"]["details"]["field"] == "system_status.note"
    assert_no_database_text(answer)
    deploy = function_client("deploy_mcp_server")
    raw = json.dumps(spec(box)).replace('"mcp-github"', text).encode()
    answer = deploy.post("/", data=raw, content_type="application/json", headers=auth(box.user_id))
    assert answer.status_code == 400 and answer.json["error"]["details"]["field"] == "name", answer.json


def test_a_surrogate_pair_is_fine(beats: FlaskClient, factory: Factory) -> None:
    box = factory.toolbox()
    raw = b'{"dtma_version": "1", "tool_statuses": [], "system_status": {"note": "\\ud83d\\ude00"}}'
    answer = beats.post("/heartbeat", data=raw, content_type="application/json",
                        headers={"Authorization": f"Bearer {box.token}"})
    assert answer.status_code == 204


def test_postgres_own_messages_become_our_sentences() -> None:
    from shared.core.errors import domain_error

    err = domain_error("23503", 'insert or update on table "idempotency_keys" violates foreign key constraint "x"',
                       {"table": "idempotency_keys"}, "idempotency_keys_user_id_fkey")
    assert err is not None and err.status == 404 and not DATABASE_TEXT.search(err.message) and err.details == {}
    assert err.constraint == "idempotency_keys_user_id_fkey"  # kept for use cases to refine, never shown
    ours = domain_error("MC409", "the name mcp-x is taken on this toolbox", {"field": "name"})
    assert ours is not None and ours.message == "the name mcp-x is taken on this toolbox"


# --- F6: secret env values never leave, in part or in another case -------------------------------

SECRET = "sk-live-4f9a2c7e1b8d6a3f0e5c9b2a"


@pytest.mark.parametrize("echo", [SECRET[:20], SECRET.upper(), f"token {SECRET[5:17]}... rejected", SECRET])
def test_an_agent_error_quoting_part_of_a_secret_is_withheld(function_client: Any, toolbox_agent: Any,
                                                             pg: psycopg.Connection, echo: str) -> None:
    box, agent = toolbox_agent()
    deploy = function_client("deploy_mcp_server")
    agent.fail_next("deploy", 500, {"success": False, "error": f"bad env API_KEY={echo}"})
    answer = deploy.post("/", json=spec(box, env={"API_KEY": SECRET, "REGION": "eu"}), headers=auth(box.user_id))
    assert answer.status_code == 202
    settle()
    status, message = server_row(pg, answer.json["id"])
    assert status == "error" and "quoted part of a secret environment value" in message
    stored = pg.execute("select coalesce(string_agg(to_jsonb(e)::text, ''), '') from account_tool_instance_events e"
                        ).fetchone()[0] + pg.execute("select coalesce(string_agg(to_jsonb(c)::text, ''), '') "
                                                     "from dtma_commands c").fetchone()[0]
    for piece in (SECRET[:8], SECRET[8:16], SECRET[-8:]):
        assert piece.lower() not in (stored + message).lower()


def test_an_agent_error_without_secrets_is_shown(function_client: Any, toolbox_agent: Any,
                                                 pg: psycopg.Connection) -> None:
    box, agent = toolbox_agent()
    deploy = function_client("deploy_mcp_server")
    agent.fail_next("deploy", 500, {"success": False, "error": "no space left on device"})
    answer = deploy.post("/", json=spec(box, env={"API_KEY": SECRET}), headers=auth(box.user_id))
    settle()
    assert "no space left on device" in server_row(pg, answer.json["id"])[1]


@pytest.mark.parametrize("env,shown", [({"API_KEY": SECRET}, False), ({}, True)])
def test_a_start_failure_of_a_server_with_secrets_does_not_show_the_agents_words(
        function_client: Any, toolbox_agent: Any, pg: psycopg.Connection, env: dict[str, str], shown: bool) -> None:
    """Only a deploy holds the env values to check the agent's words against; later actions on a
    server with secret values classify the agent's answer but never show or store its words."""
    box, agent = toolbox_agent()
    deployed = function_client("deploy_mcp_server").post("/", json=spec(box, env=env), headers=auth(box.user_id))
    settle()
    manage = function_client("manage_mcp_server")
    assert manage.post(f"/{deployed.json['id']}/stop", headers=auth(box.user_id)).status_code == 200
    agent.fail_next("start", 500, {"success": False, "error": f"cannot start: env API_KEY={SECRET} is odd"})
    answer = manage.post(f"/{deployed.json['id']}/start", headers=auth(box.user_id))
    settle()
    status, message = server_row(pg, deployed.json["id"])
    listed = function_client("mcp_status").get("/", headers=auth(box.user_id))
    text = answer.get_data(as_text=True) + (message or "") + listed.get_data(as_text=True)
    assert answer.status_code == 502 and status == "error"
    assert ("cannot start: env API_KEY" in text) is shown
    assert (SECRET[:8] in text) is shown
    if not shown:
        assert "not shown: this server has secret environment values" in message


# --- F7: strict types ------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("container_port", True), ("container_port", "80"), ("host_port", 31000.5),
                                         ("host_port", "31000"), ("image", "registry:99999/x"),
                                         ("image", "registry:0/x"), ("env", {"A": 1}), ("name", 5)])
def test_lax_values_are_refused(function_client: Any, factory: Factory, field: str, value: Any) -> None:
    box = factory.toolbox()
    deploy = function_client("deploy_mcp_server")
    answer = deploy.post("/", json=spec(box, **{field: value}), headers=auth(box.user_id))
    assert answer.status_code == 400, answer.json
    assert answer.json["error"]["details"]["field"].split(".")[0] == field


def test_a_registry_with_a_real_port_is_fine(function_client: Any, factory: Factory) -> None:
    box = factory.toolbox()
    answer = function_client("deploy_mcp_server").post("/", json=spec(box, image="registry.local:5000/team/x:1"),
                                                       headers=auth(box.user_id))
    assert answer.status_code == 202, answer.json


@pytest.mark.parametrize("fields", [{"seq": "5", "boot_id": "b"}, {"seq": True, "boot_id": "b"},
                                    {"dtma_version": 1}])
def test_heartbeat_numbers_are_numbers(beats: FlaskClient, factory: Factory, fields: dict[str, Any]) -> None:
    box = factory.toolbox()
    answer = _beat(beats, box.token, beat(**fields))
    assert answer.status_code == 400, answer.data


def test_a_container_port_given_as_text_is_refused(beats: FlaskClient, factory: Factory) -> None:
    box = factory.toolbox()
    item = container("x", ports=[{"ip": "0.0.0.0", "private_port": "8080", "public_port": 31000, "type": "tcp"}])
    answer = _beat(beats, box.token, beat(item))
    assert answer.status_code == 400 and "private_port" in answer.json["error"]["message"]


# --- F8b: what a heartbeat may store ---------------------------------------------------------------

def test_oversized_heartbeat_blobs_are_not_stored(beats: FlaskClient, factory: Factory,
                                                  pg: psycopg.Connection) -> None:
    box = factory.toolbox()
    body = beat(container("x"), padding="p" * 100_000)
    body["system_status"] = {"cpu_load_percent": 1.0, "notes": "n" * 900_000}
    assert _beat(beats, box.token, body).status_code == 204  # the beat still counts
    row = pg.execute("select dtma_health_details_json::text, dtma_report_details_json::text, "
                     "pg_column_size(account_tool_environments.*) from account_tool_environments where id = %s",
                     (box.id,)).fetchone()
    assert row[2] < 8_000, row[2]
    assert "not stored" in row[0] and "nnnnnnnnnn" not in row[0]
    assert "not stored" in row[1] and "pppppppppp" not in row[1]
    assert pg.execute("select last_heartbeat_at > now() - interval '1 minute' from account_tool_environments "
                      "where id = %s", (box.id,)).fetchone()[0]


def test_a_real_agents_system_status_is_stored_whole(beats: FlaskClient, factory: Factory,
                                                     pg: psycopg.Connection) -> None:
    box = factory.toolbox()
    body = beat(container("x"))
    assert _beat(beats, box.token, body).status_code == 204
    stored = pg.execute("select dtma_health_details_json from account_tool_environments where id = %s",
                        (box.id,)).fetchone()[0]
    assert stored == body["system_status"]


# --- the idempotency secret -------------------------------------------------------------------------

def test_rotating_the_idempotency_secret_keeps_retries_in_flight(function_client: Any, toolbox_agent: Any,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    box, _ = toolbox_agent()
    headers = {**auth(box.user_id), "Idempotency-Key": "rotate-1"}
    before = function_client("deploy_mcp_server", IDEMPOTENCY_SECRET="old-idempotency-secret-0123456789")
    first = before.post("/", json=spec(box), headers=headers)
    assert first.status_code == 202
    settle()
    # After the rotation, with the previous secret kept: the retry is recognised and replayed.
    after = function_client("deploy_mcp_server", IDEMPOTENCY_SECRET="new-idempotency-secret-0123456789",
                            IDEMPOTENCY_SECRET_PREVIOUS="old-idempotency-secret-0123456789")
    again = after.post("/", json=spec(box), headers=headers)
    assert again.status_code == 202 and again.headers.get("Idempotent-Replayed") == "true"
    assert again.json["id"] == first.json["id"]
    # A different request under the same key is still refused.
    assert after.post("/", json=spec(box, name="other"), headers=headers).status_code == 422
    # Without the previous secret, the old fingerprint no longer matches: that is what the setting is for.
    monkeypatch.delenv("IDEMPOTENCY_SECRET_PREVIOUS")
    forgot = function_client("deploy_mcp_server", IDEMPOTENCY_SECRET="new-idempotency-secret-0123456789")
    assert forgot.post("/", json=spec(box), headers=headers).status_code == 422


def test_rotating_the_dtma_master_secret_does_not_touch_fingerprints(function_client: Any,
                                                                      toolbox_agent: Any) -> None:
    box, _ = toolbox_agent()
    headers = {**auth(box.user_id), "Idempotency-Key": "rotate-2"}
    first = function_client("deploy_mcp_server").post("/", json=spec(box), headers=headers)
    settle()
    rotated = function_client("deploy_mcp_server", DTMA_KEY_SECRET="a-brand-new-master-secret-0123456789abcdef")
    again = rotated.post("/", json=spec(box), headers=headers)
    assert again.status_code == 202 and again.json["id"] == first.json["id"]


@pytest.mark.parametrize("exp", ["9999999999", True])
def test_a_token_time_that_is_not_a_number_is_refused(function_client: Any, factory: Factory, exp: Any) -> None:
    import jwt

    from tests.conftest import JWT_SECRET

    token = jwt.encode({"sub": factory.user(), "aud": "authenticated", "role": "authenticated", "exp": exp},
                       JWT_SECRET, algorithm="HS256")
    answer = function_client("mcp_status").get("/", headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 401, answer.json
