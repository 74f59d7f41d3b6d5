"""dtma_heartbeat_ingest through the functions-framework app, against the real database."""

from __future__ import annotations

import hashlib
import logging
import threading
import uuid
from typing import Any

import psycopg
import pytest
from flask.testing import FlaskClient

from shared import runtime
from shared.adapters.db.postgres import PostgresDatabase
from tests.factories import Factory, Toolbox
from tests.helpers import CountingCursor, beat, container

FN = "dtma_heartbeat_ingest"






def post(client: FlaskClient, toolbox: Toolbox | None, body: Any, path: str = "/heartbeat",
         token: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {token or toolbox.token}"} if (token or toolbox) else {}
    return client.post(path, json=body, headers=headers)


@pytest.fixture
def client(function_client: Any) -> FlaskClient:
    return function_client(FN)


def toolbox_row(pg: psycopg.Connection, toolbox: Toolbox) -> dict[str, Any]:
    cur = pg.cursor(row_factory=psycopg.rows.dict_row)
    return cur.execute("select *, now() - last_heartbeat_at as age from account_tool_environments where id = %s",
                       (toolbox.id,)).fetchone()


def test_real_dtma_payload_with_50_containers_of_which_3_are_managed(client: FlaskClient, factory: Factory,
                                                                     pg: psycopg.Connection) -> None:
    box = factory.toolbox(status="awaiting_heartbeat", heartbeat_age_seconds=None)
    running = factory.instance(box, name="mcp-github", status="deploying")
    crashed = factory.instance(box, name="mcp-slack", status="running")
    stopped = factory.instance(box, name="mcp-notion", status="stopping")  # the user asked for this stop
    items = [container("dtma_manager", image="ghcr.io/maverick-software/dtma-agent:latest")]
    items += [container(f"/unmanaged-{n}") for n in range(46)]
    items += [container("/mcp-github"), container("mcp-slack", "exited", "Exited (1) 5 minutes ago"),
              container("mcp-notion", "exited", "Exited (0) 2 seconds ago")]
    assert len(items) == 50
    response = post(client, box, beat(*items))
    assert response.status_code == 204 and response.data == b""
    assert "Content-Type" not in response.headers
    assert factory.status_of(running) == "running"
    assert factory.status_of(crashed) == "error"
    assert factory.status_of(stopped) == "stopped"
    assert factory.events(crashed)[-1][:3] == ("running", "error", "heartbeat")
    assert factory.events(crashed)[-1][3].startswith("container mcp-slack exited unexpectedly with code 1.")
    row = toolbox_row(pg, box)
    assert row["status"] == "active" and row["age"].total_seconds() < 5
    assert row["dtma_last_known_version"] == "0.1.0"
    assert row["dtma_health_details_json"]["cpu_load_percent"] == 3.5
    details = row["dtma_report_details_json"]
    assert len(details["unmanaged_containers"]) == 47 and details["docker"] == {"healthy": True}
    inst = pg.execute("select container_id, runtime_details from account_tool_instances where id = %s",
                      (running,)).fetchone()
    assert inst[0] == hashlib.sha256(b"/mcp-github").hexdigest()
    assert inst[1]["image"] == "mcp/github:latest" and inst[1]["ports"][0]["public_port"] == 49152
    assert inst[1]["status"] == "Up 1 minute"


def test_instance_format_items(client: FlaskClient, factory: Factory) -> None:
    box = factory.toolbox()
    a = factory.instance(box, status="deploying")
    b = factory.instance(box, status="running")
    body = beat({"account_tool_instance_id": a, "status_on_toolbox": "running"},
                {"account_tool_instance_id": b, "status_on_toolbox": "exited", "runtime_details": {"x": 1}})
    assert post(client, box, body).status_code == 204
    assert factory.status_of(a) == "running"
    assert factory.status_of(b) == "stopped"


def test_items_naming_another_toolboxs_instances_change_nothing(client: FlaskClient, factory: Factory,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    mine, theirs = factory.toolbox(), factory.toolbox()
    victim = factory.instance(theirs, status="running", name="shared-name")
    own = factory.instance(mine, status="running", name="own")
    body = beat({"account_tool_instance_id": victim, "status_on_toolbox": "error"},
                container("own"), container("shared-name", "exited", "Exited (3) now"))
    with caplog.at_level(logging.WARNING):
        assert post(client, mine, body).status_code == 204
    assert factory.status_of(victim) == "running" and factory.events(victim) == []
    assert factory.status_of(own) == "running"
    assert "named 1 instance(s) of other toolboxes" in caplog.text


def test_sequence_ordering(client: FlaskClient, factory: Factory) -> None:
    box = factory.toolbox()
    inst = factory.instance(box, status="running", name="srv")
    boot = str(uuid.uuid4())
    pg_stop = factory.conn.execute("update account_tool_instances set status_on_toolbox = 'stopping' where id = %s",
                                   (inst,))
    assert pg_stop.rowcount == 1  # the user asked for a stop; this beat confirms it
    assert post(client, box, beat(container("srv", "exited", "Exited (0) now"), boot_id=boot, seq=5)).status_code == 204
    assert factory.status_of(inst) == "stopped"
    # An older beat (seq 4) and a duplicate (seq 5) arrive late: acknowledged, ignored.
    for seq in (4, 5):
        assert post(client, box, beat(container("srv"), boot_id=boot, seq=seq)).status_code == 204
        assert factory.status_of(inst) == "stopped"
    assert post(client, box, beat(container("srv"), boot_id=boot, seq=6)).status_code == 204
    assert factory.status_of(inst) == "running"
    # The agent restarted: a new boot id starts its own sequence (and an exit nobody asked for is
    # an error, whatever its code).
    assert post(client, box, beat(container("srv", "exited", "Exited (0) now"),
                                  boot_id=str(uuid.uuid4()), seq=1)).status_code == 204
    assert factory.status_of(inst) == "error"


def test_an_absurd_seq_cannot_blind_a_toolbox(client: FlaskClient, factory: Factory) -> None:
    """One beat with a huge seq must not make every later genuine beat of the run be ignored."""
    box = factory.toolbox()
    inst = factory.instance(box, status="running", name="srv")
    boot = str(uuid.uuid4())
    assert post(client, box, beat(container("srv"), boot_id=boot, seq=2**62)).status_code == 204
    assert post(client, box, beat(container("srv", "exited", "Exited (137) now"), boot_id=boot,
                                  seq=7)).status_code == 204
    assert factory.status_of(inst) == "error"
    assert "code 137" in factory.events(inst)[-1][3]


def test_without_sequence_newest_arrival_wins(client: FlaskClient, factory: Factory) -> None:
    box = factory.toolbox()
    inst = factory.instance(box, status="running", name="srv")
    post(client, box, beat(container("srv", "exited", "Exited (0) now")))
    post(client, box, beat(container("srv")))
    assert factory.status_of(inst) == "running"


def test_a_container_missing_from_two_consecutive_heartbeats_is_an_error(client: FlaskClient,
                                                                         factory: Factory) -> None:
    box = factory.toolbox()
    inst = factory.instance(box, status="running", name="ghost")
    deploying = factory.instance(box, status="deploying", name="still-pulling")
    assert post(client, box, beat(container("dtma_manager"))).status_code == 204
    assert factory.status_of(inst) == "running"
    assert post(client, box, beat(container("dtma_manager"))).status_code == 204
    assert factory.status_of(inst) == "error"
    assert factory.events(inst)[-1][3] == ("container ghost is no longer on the toolbox (missing from 2 consecutive "
                                           "heartbeats); remove this server and deploy it again")
    assert factory.status_of(deploying) == "deploying"


def test_one_missed_heartbeat_is_forgiven(client: FlaskClient, factory: Factory) -> None:
    box = factory.toolbox()
    inst = factory.instance(box, status="running", name="flaky")
    post(client, box, beat(container("dtma_manager")))
    post(client, box, beat(container("flaky")))
    post(client, box, beat(container("dtma_manager")))
    assert factory.status_of(inst) == "running"


def test_docker_error_item_marks_docker_unhealthy_and_changes_no_instance(
        client: FlaskClient, factory: Factory, pg: psycopg.Connection) -> None:
    box = factory.toolbox()
    inst = factory.instance(box, status="running", name="srv")
    for _ in range(3):
        assert post(client, box, beat({"error": "Failed to fetch tool statuses"})).status_code == 204
    assert factory.status_of(inst) == "running"
    assert toolbox_row(pg, box)["dtma_report_details_json"]["docker"] == {
        "healthy": False, "error": "Failed to fetch tool statuses"}


def test_non_mcp_instances_are_reconciled_too(client: FlaskClient, factory: Factory) -> None:
    box = factory.toolbox()
    tool = factory.instance(box, status="deploying", name="legacy-tool", mcp=False)
    post(client, box, beat(container("legacy-tool")))
    assert factory.status_of(tool) == "running"


def test_unresponsive_toolbox_recovers_and_says_so(client: FlaskClient, factory: Factory,
                                                   pg: psycopg.Connection) -> None:
    box = factory.toolbox(status="unresponsive", heartbeat_age_seconds=900)
    inst = factory.instance(box, status="running", name="srv")
    assert post(client, box, beat(container("srv"))).status_code == 204
    assert toolbox_row(pg, box)["status"] == "active"
    assert factory.events(inst) == [("running", "running", "heartbeat", "toolbox is reporting again")]


def test_unknown_top_level_fields_are_kept(client: FlaskClient, factory: Factory, pg: psycopg.Connection) -> None:
    box = factory.toolbox()
    assert post(client, box, beat(agent_uptime_s=12, labels={"zone": "a"})).status_code == 204
    assert toolbox_row(pg, box)["dtma_report_details_json"]["extra"] == {"agent_uptime_s": 12,
                                                                         "labels": {"zone": "a"}}


@pytest.mark.parametrize("path", ["/", "/heartbeat", "/dtma_heartbeat_ingest/heartbeat",
                                  "/functions/v1/dtma_heartbeat_ingest/heartbeat", "/any/sub/path"])
def test_any_path_below_the_function(client: FlaskClient, factory: Factory, path: str) -> None:
    assert post(client, factory.toolbox(), beat(), path=path).status_code == 204


@pytest.mark.parametrize("status", ["deprovisioning", "deprovisioned", "pending_deprovision"])
def test_deprovisioned_toolboxes_are_refused(client: FlaskClient, factory: Factory, status: str,
                                             pg: psycopg.Connection) -> None:
    box = factory.toolbox(status=status)
    response = post(client, box, beat())
    assert response.status_code == 409
    assert response.json["error"]["message"] == f"toolbox is {status}; heartbeats are not accepted"
    assert toolbox_row(pg, box)["status"] == status


@pytest.mark.parametrize(("headers", "message"), [
    ({}, "Authorization header must be 'Bearer <toolbox token>'"),
    ({"Authorization": "Basic abc"}, "Authorization header must be 'Bearer <toolbox token>'"),
    ({"Authorization": "Bearer"}, "Authorization header must be 'Bearer <toolbox token>'"),
    ({"Authorization": "Bearer a b"}, "Authorization header must be 'Bearer <toolbox token>'"),
    ({"Authorization": "Bearer " + "0" * 64}, "invalid toolbox token"),
])
def test_authentication_failures(client: FlaskClient, factory: Factory, headers: dict[str, str],
                                 message: str) -> None:
    factory.toolbox()
    response = client.post("/heartbeat", json=beat(), headers=headers)
    assert response.status_code == 401
    assert response.json == {"error": {"code": "unauthenticated", "message": message, "details": {}}}
    assert response.headers["WWW-Authenticate"] == "Bearer"


def test_rotated_token_is_refused_like_an_unknown_one(client: FlaskClient, factory: Factory,
                                                      pg: psycopg.Connection) -> None:
    box = factory.toolbox()
    pg.execute("update account_tool_environments set dtma_token_sha256 = sha256('new-key') where id = %s", (box.id,))
    response = post(client, box, beat())
    assert response.status_code == 401 and response.json["error"]["message"] == "invalid toolbox token"


@pytest.mark.parametrize(("body", "field"), [
    ({"system_status": {}, "tool_statuses": []}, "dtma_version"),
    ({"dtma_version": 1, "system_status": {}, "tool_statuses": []}, "dtma_version"),
    ({"dtma_version": "x", "system_status": [], "tool_statuses": []}, "system_status"),
    ({"dtma_version": "x", "system_status": {}, "tool_statuses": {}}, "tool_statuses"),
    ({"dtma_version": "x", "system_status": {}, "tool_statuses": [{"names": ["a"]}]}, "tool_statuses[0].id"),
    ({"dtma_version": "x", "system_status": {}, "tool_statuses": [{"id": "a", "names": "a", "state": "x"}]},
     "tool_statuses[0].names"),
    ({"dtma_version": "x", "system_status": {}, "tool_statuses": [
        {"account_tool_instance_id": "not-a-uuid", "status_on_toolbox": "running"}]},
     "tool_statuses[0].account_tool_instance_id"),
    ({"dtma_version": "x", "system_status": {}, "tool_statuses": [{"something": 1}]}, "tool_statuses[0]"),
    ({"dtma_version": "x", "system_status": {}, "tool_statuses": [], "seq": -1, "boot_id": "b"}, "seq"),
    ([1, 2], "body"),
])
def test_invalid_bodies_name_the_field(client: FlaskClient, factory: Factory, body: Any, field: str) -> None:
    box = factory.toolbox()
    response = post(client, box, body)
    assert response.status_code == 400
    assert response.json["error"]["message"].startswith(field + ":")


def test_invalid_json_is_400(client: FlaskClient, factory: Factory) -> None:
    box = factory.toolbox()
    response = client.post("/heartbeat", data=b"{not json", headers={"Authorization": f"Bearer {box.token}",
                                                                      "Content-Type": "application/json"})
    assert response.status_code == 400 and response.json["error"]["code"] == "invalid_json"


def test_body_over_1_mib_is_413(client: FlaskClient, factory: Factory) -> None:
    box = factory.toolbox()
    body = beat(padding="x" * (1024 * 1024))
    assert post(client, box, body).status_code == 413


def test_other_methods_are_405_and_options_answers_cors(client: FlaskClient) -> None:
    response = client.get("/heartbeat")
    assert response.status_code == 405 and response.headers["Allow"] == "POST"
    preflight = client.options("/heartbeat", headers={"Origin": "https://app.example",
                                                       "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 204
    assert "authorization" in preflight.headers["Access-Control-Allow-Headers"]


def test_token_never_reaches_the_logs(client: FlaskClient, factory: Factory,
                                      caplog: pytest.LogCaptureFixture) -> None:
    box = factory.toolbox()
    with caplog.at_level(logging.DEBUG):
        post(client, box, beat(container("x")))
        post(client, None, beat(), token=box.token + "x")
    assert box.token not in caplog.text and box.token[:16] not in caplog.text




@pytest.mark.parametrize("items", [1, 100])
def test_one_database_round_trip_per_heartbeat(function_client: Any, factory: Factory, database_url: str,
                                               items: int) -> None:
    client = function_client(FN)
    counting = PostgresDatabase(database_url, connection_kwargs={"cursor_factory": CountingCursor})
    try:
        runtime.load(FN).__dict__["db"] = counting
        box = factory.toolbox()
        for n in range(0, items, 10):
            factory.instance(box, status="deploying", name=f"srv-{n}")
        post(client, box, beat(container("warm-up")))  # opens the pool's connection
        CountingCursor.statements = 0
        response = post(client, box, beat(*[container(f"srv-{n}") for n in range(items)]))
        assert response.status_code == 204
        assert CountingCursor.statements == 1
    finally:
        counting.close()


def test_concurrent_heartbeats_of_one_toolbox_serialize(factory: Factory, postgres_db: PostgresDatabase,
                                                        pg: psycopg.Connection) -> None:
    from shared.usecases.reports import build_report

    box = factory.toolbox()
    names = [f"srv-{n}" for n in range(10)]
    for name in names:
        factory.instance(box, status="deploying", name=name)
    digest = hashlib.sha256(box.token.encode()).hexdigest()
    errors: list[Exception] = []

    def send(seq: int) -> None:
        try:
            postgres_db.call("cp_ingest_heartbeat", p_token_sha256=digest,
                             **build_report(beat(*[container(n) for n in names])).params(210))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    counts = pg.execute("select count(*) from account_tool_instance_events where account_tool_environment_id = %s",
                        (box.id,)).fetchone()[0]
    assert counts == len(names)  # each deploying -> running exactly once


def test_heartbeats_of_different_toolboxes_do_not_wait_for_each_other(
        factory: Factory, postgres_db: PostgresDatabase, database_url: str) -> None:
    from shared.usecases.reports import build_report

    box_a, box_b = factory.toolbox(), factory.toolbox()
    report = build_report(beat(container("srv")))
    digest = {box.id: hashlib.sha256(box.token.encode()).hexdigest() for box in (box_a, box_b)}
    done: dict[str, bool] = {}

    def send(box: Toolbox) -> None:
        postgres_db.call("cp_ingest_heartbeat", p_token_sha256=digest[box.id], **report.params(210))
        done[box.id] = True

    # Another transaction holds toolbox A's row, as a long heartbeat of A would.
    with psycopg.connect(database_url) as holder:
        holder.execute("select 1 from account_tool_environments where id = %s for update", (box_a.id,))
        waiting = threading.Thread(target=send, args=(box_a,))
        waiting.start()
        send(box_b)  # completes while A's heartbeat is still queued behind the lock
        assert done == {box_b.id: True}
        assert waiting.is_alive()
        holder.rollback()
    waiting.join(10)
    assert done == {box_b.id: True, box_a.id: True}
