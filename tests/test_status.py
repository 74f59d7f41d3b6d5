"""mcp_status through the functions-framework app, against the real database and, for
`refresh=true`, a real loopback DTMA stand-in."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
from flask.testing import FlaskClient

from devstack.dtma_standin import StandInAgent
from shared import runtime
from shared.adapters.db.postgres import PostgresDatabase
from tests.conftest import JWT_SECRET
from tests.factories import Factory, Toolbox
from tests.helpers import CountingCursor, beat, container
from tests.jwt_helpers import mint_hs256

FN = "mcp_status"
STALE = 3 * 60 + 30


@pytest.fixture
def client(function_client: Any) -> FlaskClient:
    return function_client(FN)


def auth(user_id: str, **kwargs: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_hs256(JWT_SECRET, sub=user_id, **kwargs)}"}


def get(client: FlaskClient, user_id: str, path: str = "/", **params: Any) -> Any:
    return client.get(path, query_string=params, headers=auth(user_id))


def listing(client: FlaskClient, user_id: str, **params: Any) -> dict[str, Any]:
    response = get(client, user_id, **params)
    assert response.status_code == 200, response.json
    return response.json


def one(client: FlaskClient, user_id: str, server_id: str, **params: Any) -> dict[str, Any]:
    response = get(client, user_id, f"/{server_id}", **params)
    assert response.status_code == 200, response.json
    return response.json["server"]


def add_event(pg: psycopg.Connection, inst: str, box: Toolbox, message: str, frm: str = "running",
              to: str = "running", source: str = "api") -> None:
    pg.execute("""insert into account_tool_instance_events (account_tool_instance_id,
                    account_tool_environment_id, instance_name_on_toolbox, from_status, to_status, source,
                    message)
                  values (%s, %s, 'x', %s, %s, %s, %s)""", (inst, box.id, frm, to, source, message))


# --- what one server looks like ------------------------------------------------------------------

def test_a_server_as_the_web_app_sees_it(client: FlaskClient, factory: Factory,
                                         pg: psycopg.Connection) -> None:
    box = factory.toolbox(name="droplet-1", heartbeat_age_seconds=12)
    inst = factory.instance(box, status="running", name="github", host_port=49160, mcp_endpoint_path="/mcp",
                            docker_image_url="mcp/github:latest")
    pg.execute("update account_tool_instances set status_changed_at = now() - interval '300 seconds' "
               "where id = %s", (inst,))
    pg.execute("insert into mcp_endpoint_probes (account_tool_instance_id, ready, checked_at, tool_count) "
               "values (%s, true, now(), 0)", (inst,))  # its MCP endpoint answered (tests/test_mcp_health.py)
    add_event(pg, inst, box, "deploy sent", "pending_deploy", "deploying")
    add_event(pg, inst, box, "container github is running", "deploying", "running", "heartbeat")
    server = one(client, box.user_id, inst)
    assert server["id"] == inst and server["name"] == "github"
    assert server["toolbox"]["id"] == box.id and server["toolbox"]["name"] == "droplet-1"
    assert server["toolbox"]["region"] == "nyc3" and server["toolbox"]["status"] == "active"
    assert 12 <= server["toolbox"]["seconds_since_heartbeat"] < 60 and server["toolbox"]["last_heartbeat_at"]
    assert (server["status"], server["effective_status"], server["health"]) == (
        "running", "running", "healthy")
    assert server["stale"] is False and server["error"] is None
    assert server["endpoint"] == "http://127.0.0.1:49160/mcp"  # the server's own port, not the DTMA's
    assert server["transport"] == "streamable_http" and server["image"] == "mcp/github:latest"
    assert [(p["from"], p["to"], p["source"], p["message"]) for p in server["progress"]] == [
        ("pending_deploy", "deploying", "api", "deploy sent"),
        ("deploying", "running", "heartbeat", "container github is running")]
    assert all(p["at"] for p in server["progress"])
    assert 300 <= server["uptime_seconds"] < 400
    for key in ("created_at", "updated_at", "status_changed_at", "capabilities", "discovery_metadata"):
        assert key in server


def test_progress_is_the_last_five_events_oldest_first(client: FlaskClient, factory: Factory,
                                                       pg: psycopg.Connection) -> None:
    box = factory.toolbox()
    inst = factory.instance(box, status="running")
    for n in range(8):
        add_event(pg, inst, box, f"event {n}")
    progress = one(client, box.user_id, inst)["progress"]
    assert [p["message"] for p in progress] == [f"event {n}" for n in range(3, 8)]


def test_error_carries_the_recorded_reason(client: FlaskClient, factory: Factory) -> None:
    box = factory.toolbox()
    inst = factory.instance(box, status="error", instance_error_message="container github exited with code 1")
    server = one(client, box.user_id, inst)
    assert (server["effective_status"], server["health"]) == ("error", "unhealthy")
    assert server["error"] == "container github exited with code 1" and server["uptime_seconds"] is None


def test_no_endpoint_without_an_address_or_a_port(client: FlaskClient, factory: Factory) -> None:
    box = factory.toolbox(ip=None)
    inst = factory.instance(box, status="pending_deploy")
    server = one(client, box.user_id, inst)
    assert server["endpoint"] is None and server["effective_status"] == "pending"


def test_degraded_when_heartbeats_are_late_but_not_yet_stale(client: FlaskClient, factory: Factory) -> None:
    box = factory.toolbox(heartbeat_age_seconds=170)  # > 150 s degraded threshold, < 210 s stale
    inst = factory.instance(box, status="running")
    server = one(client, box.user_id, inst)
    assert (server["effective_status"], server["health"]) == ("running", "degraded")


# --- freshness -----------------------------------------------------------------------------------

@pytest.mark.parametrize("toolbox", [{"heartbeat_age_seconds": STALE + 20},
                                     {"status": "unresponsive", "heartbeat_age_seconds": STALE + 20}])
def test_a_silent_toolbox_makes_its_servers_unknown(client: FlaskClient, factory: Factory,
                                                    toolbox: dict[str, Any]) -> None:
    box = factory.toolbox(name="droplet-9", **toolbox)
    inst = factory.instance(box, status="running", name="github")
    server = one(client, box.user_id, inst)
    assert server["status"] == "running"  # kept, so recovery is exact
    assert (server["effective_status"], server["health"], server["stale"]) == ("unknown", "unknown", True)
    assert server["uptime_seconds"] is None
    assert server["error"].startswith(
        f"toolbox droplet-9 has not reported for {STALE + 20} s; github was last known running; its status "
        "is unknown until the toolbox reports again")


def test_a_toolbox_that_never_reported(client: FlaskClient, factory: Factory) -> None:
    box = factory.toolbox(name="droplet-0", heartbeat_age_seconds=None)
    inst = factory.instance(box, status="deploying")
    server = one(client, box.user_id, inst)
    assert server["effective_status"] == "unknown" and server["toolbox"]["seconds_since_heartbeat"] is None
    assert server["error"].startswith("toolbox droplet-0 has never reported")


def test_staleness_threshold_comes_from_configuration(function_client: Any, factory: Factory) -> None:
    client = function_client(FN, HEARTBEAT_INTERVAL_SECONDS="10", HEARTBEAT_GRACE_SECONDS="0")
    box = factory.toolbox(heartbeat_age_seconds=31)
    inst = factory.instance(box, status="running")
    assert one(client, box.user_id, inst)["effective_status"] == "unknown"


def test_silent_swept_heartbeat_read_round_trip(function_client: Any, factory: Factory,
                                                pg: psycopg.Connection) -> None:
    """The whole recovery path, end to end through the three functions."""
    status_client = function_client(FN)
    sweep_client = function_client("mcp_status_sweep")
    heartbeat_client = function_client("dtma_heartbeat_ingest")
    box = factory.toolbox(heartbeat_age_seconds=STALE + 60)
    inst = factory.instance(box, status="running", name="srv")
    pg.execute("insert into mcp_endpoint_probes (account_tool_instance_id, ready, checked_at, tool_count) "
               "values (%s, true, now(), 0)", (inst,))  # its MCP endpoint answered (tests/test_mcp_health.py)
    assert one(status_client, box.user_id, inst)["effective_status"] == "unknown"  # stale before any sweep

    assert sweep_client.post("/").json["marked_unresponsive"] == 1
    swept = one(status_client, box.user_id, inst)
    assert (swept["status"], swept["effective_status"], swept["toolbox"]["status"]) == ("running", "unknown",
                                                                                         "unresponsive")
    assert swept["progress"][-1]["source"] == "sweep"

    response = heartbeat_client.post("/heartbeat", json=beat(container("srv")),
                                     headers={"Authorization": f"Bearer {box.token}"})
    assert response.status_code == 204
    back = one(status_client, box.user_id, inst)
    assert (back["status"], back["effective_status"], back["health"]) == ("running", "running", "healthy")
    assert back["toolbox"]["status"] == "active" and back["toolbox"]["seconds_since_heartbeat"] < 5
    assert back["progress"][-1]["message"] == "toolbox is reporting again"


# --- lists, filters, pages -----------------------------------------------------------------------

def test_list_has_only_the_callers_mcp_servers(client: FlaskClient, factory: Factory) -> None:
    mine = factory.toolbox()
    servers = {factory.instance(mine, status="running") for _ in range(3)}
    factory.instance(mine, status="running", mcp=False)  # a legacy tool on the same toolbox
    factory.instance(factory.toolbox(), status="running")  # someone else's
    body = listing(client, mine.user_id)
    assert {s["id"] for s in body["servers"]} == servers
    assert body["next_cursor"] is None and body["as_of"]
    assert "refresh" not in body


def test_filters(client: FlaskClient, factory: Factory) -> None:
    user = factory.user()
    a, b = factory.toolbox(user), factory.toolbox(user)
    a_running = factory.instance(a, status="running")
    a_stopped = factory.instance(a, status="stopped")
    b_running = factory.instance(b, status="running")
    assert {s["id"] for s in listing(client, user, toolbox_id=a.id)["servers"]} == {a_running, a_stopped}
    assert {s["id"] for s in listing(client, user, status="running")["servers"]} == {a_running, b_running}
    assert [s["id"] for s in listing(client, user, toolbox_id=b.id, status="stopped")["servers"]] == []


def test_pages_are_stable_with_no_duplicates_or_gaps(client: FlaskClient, factory: Factory) -> None:
    box = factory.toolbox()
    created = [factory.instance(box, status="running") for _ in range(7)]
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        body = listing(client, box.user_id, **params)
        seen += [s["id"] for s in body["servers"]]
        pages += 1
        if pages == 1:
            created.append(factory.instance(box, status="running"))  # deployed while the user pages
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert pages == 3 and seen == created


def test_post_reads_like_get(client: FlaskClient, factory: Factory) -> None:
    box = factory.toolbox()
    inst = factory.instance(box, status="running")
    headers = auth(box.user_id)
    assert client.post("/", json={}, headers=headers).json["servers"][0]["id"] == inst
    assert client.post("/", headers=headers).json["servers"][0]["id"] == inst  # invoke() without a body
    assert client.post("/", json={"id": inst}, headers=headers).json["server"]["id"] == inst
    page = client.post("/", json={"toolbox_id": box.id, "status": "running", "limit": 1},
                       headers=headers).json
    assert [s["id"] for s in page["servers"]] == [inst]


def test_mounted_paths_work(client: FlaskClient, factory: Factory) -> None:
    box = factory.toolbox()
    inst = factory.instance(box, status="running")
    response = client.get(f"/functions/v1/mcp_status/{inst}", headers=auth(box.user_id))
    assert response.status_code == 200 and response.json["server"]["id"] == inst


# --- tenancy -------------------------------------------------------------------------------------

def test_user_b_sees_nothing_of_user_as(client: FlaskClient, factory: Factory) -> None:
    a_box = factory.toolbox()
    a_server = factory.instance(a_box, status="running")
    b = factory.user()
    factory.instance(factory.toolbox(b), status="running")
    assert a_server not in {s["id"] for s in listing(client, b)["servers"]}
    assert listing(client, b, toolbox_id=a_box.id)["servers"] == []
    theirs = get(client, b, f"/{a_server}")
    missing = get(client, b, f"/{uuid.uuid4()}")
    assert theirs.status_code == missing.status_code == 404
    assert theirs.json["error"]["message"] == missing.json["error"]["message"] == "MCP server not found"
    assert theirs.json["error"]["code"] == missing.json["error"]["code"] == "not_found"
    assert client.post("/", json={"id": a_server}, headers=auth(b)).status_code == 404


# --- authentication and validation ---------------------------------------------------------------

@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer not-a-jwt"},
    {"Authorization": "Bearer " + mint_hs256(JWT_SECRET, exp_in=-3600)},
    {"Authorization": "Bearer " + mint_hs256("another-secret-that-is-also-32-bytes-or-more")},
    {"Authorization": "Bearer " + mint_hs256(JWT_SECRET, role="anon")},
], ids=["missing", "garbage", "expired", "wrong-key", "anon-key"])
def test_unauthenticated_is_401_json(client: FlaskClient, factory: Factory, headers: dict[str, str]) -> None:
    factory.instance(factory.toolbox(), status="running")
    for response in (client.get("/", headers=headers), client.post("/", json={}, headers=headers)):
        assert response.status_code == 401 and response.mimetype == "application/json"
        assert response.json["error"]["code"] == "unauthenticated"
        assert response.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize(("path", "params", "param"), [
    ("/not-a-uuid", {}, "id"),
    ("/", {"id": "123"}, "id"),
    ("/", {"toolbox_id": "abc"}, "toolbox_id"),
    ("/", {"limit": "0"}, "limit"),
    ("/", {"limit": "101"}, "limit"),
    ("/", {"limit": "ten"}, "limit"),
    ("/", {"status": "exploded"}, "status"),
    ("/", {"cursor": "bm90IGEgY3Vyc29y"}, "cursor"),
    ("/", {"cursor": "%%%"}, "cursor"),
    ("/", {"refresh": "maybe"}, "refresh"),
    ("/", {"limit": ["1", "2"]}, "limit"),
])
def test_bad_parameters_are_400_naming_them(client: FlaskClient, factory: Factory, path: str,
                                            params: dict[str, Any], param: str) -> None:
    response = client.get(path, query_string=params, headers=auth(factory.user()))
    assert response.status_code == 400
    assert response.json["error"]["message"].startswith(param + ":")
    assert response.json["error"]["details"]["field"] == param


def test_unknown_query_parameters_are_plumbing_and_ignored(client: FlaskClient, factory: Factory) -> None:
    assert get(client, factory.user(), forceFunctionRegion="us-east-1").status_code == 200


def test_post_body_is_strict(client: FlaskClient, factory: Factory) -> None:
    headers = auth(factory.user())
    unknown = client.post("/", json={"limit": 5, "sort": "name", "fliter": "x"}, headers=headers)
    assert unknown.status_code == 422
    assert unknown.json["error"]["details"] == {"fields": ["fliter", "sort"]}
    assert "fliter, sort" in unknown.json["error"]["message"]
    wrong_type = client.post("/", json={"limit": "5"}, headers=headers)
    assert wrong_type.status_code == 400 and wrong_type.json["error"]["message"].startswith("limit:")
    assert client.post("/", json={"refresh": "yes"}, headers=headers).status_code == 400
    assert client.post("/", json=[1], headers=headers).status_code == 400


def test_id_does_not_combine_with_list_filters(client: FlaskClient, factory: Factory) -> None:
    response = get(client, factory.user(), id=str(uuid.uuid4()), status="running")
    assert response.status_code == 400 and response.json["error"]["details"]["field"] == "id"


def test_deeper_paths_are_404_and_other_methods_405(client: FlaskClient, factory: Factory) -> None:
    headers = auth(factory.user())
    assert client.get(f"/{uuid.uuid4()}/logs", headers=headers).status_code == 404
    assert client.delete("/", headers=headers).status_code == 405


def test_preflight_needs_no_token(client: FlaskClient) -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,apikey,content-type"}
    response = client.options("/", headers=preflight)
    assert response.status_code == 204
    assert "authorization" in response.headers["Access-Control-Allow-Headers"]


# --- one round trip ------------------------------------------------------------------------------

def test_one_database_round_trip_for_100_servers(function_client: Any, factory: Factory, database_url: str,
                                                 pg: psycopg.Connection) -> None:
    client = function_client(FN)
    counting = PostgresDatabase(database_url, connection_kwargs={"cursor_factory": CountingCursor})
    try:
        runtime.load(FN).__dict__["db"] = counting
        user = factory.user()
        boxes = [factory.toolbox(user) for _ in range(4)]
        for n in range(100):
            inst = factory.instance(boxes[n % 4], status="running", host_port=40000 + n)
            for m in range(6):
                add_event(pg, inst, boxes[n % 4], f"e{m}")
        listing(client, user, limit=1)  # opens the pool's connection
        CountingCursor.statements = 0
        body = listing(client, user, limit=100)
        assert CountingCursor.statements == 1
        assert len(body["servers"]) == 100 and all(len(s["progress"]) == 5 for s in body["servers"])
    finally:
        counting.close()


# --- refresh from the DTMA -----------------------------------------------------------------------

@pytest.fixture
def agent_box(factory: Factory, pg: psycopg.Connection) -> Iterator[tuple[StandInAgent, Toolbox]]:
    """A toolbox whose DTMA is a real stand-in agent on loopback, holding the toolbox's key."""
    box = factory.toolbox(name="droplet-dtma")
    agent = StandInAgent(token=box.token, port=0).start()
    pg.execute("update account_tool_environments set dtma_port = %s where id = %s", (agent.port, box.id))
    box.port = agent.port
    try:
        yield agent, box
    finally:
        agent.stop()


def deploy_on_agent(agent: StandInAgent, name: str, instance_id: str, image: str = "mcp/github:latest",
                    host_port: int = 49170) -> None:
    response = httpx.post(f"{agent.url}/tools", headers={"Authorization": f"Bearer {agent.token}"},
                          json={"dockerImageUrl": image, "instanceNameOnToolbox": name,
                                "accountToolInstanceId": instance_id,
                                "baseConfigOverrideJson": {"HostConfig": {"PortBindings": {
                                    "8080/tcp": [{"HostPort": str(host_port)}]}}}})
    assert response.status_code == 201, response.text


def heartbeat_at(pg: psycopg.Connection, box: Toolbox) -> Any:
    return pg.execute("select last_heartbeat_at, status::text, dtma_report_details_json "
                      "from account_tool_environments where id = %s", (box.id,)).fetchone()


def test_refresh_applies_what_the_dtma_reports(client: FlaskClient, factory: Factory, pg: psycopg.Connection,
                                               agent_box: tuple[StandInAgent, Toolbox]) -> None:
    agent, box = agent_box
    deploying = factory.instance(box, status="deploying", name="github")
    crashed = factory.instance(box, status="running", name="slack")
    gone = factory.instance(box, status="running", name="notion")  # not on the agent at all
    deploy_on_agent(agent, "github", deploying)
    deploy_on_agent(agent, "slack", crashed, image="standin/exit-3", host_port=49171)
    before = heartbeat_at(pg, box)

    body = listing(client, box.user_id, refresh="true")
    assert body["refresh"] == {box.id: {"ok": True, "containers": 3, "matched": 2, "transitions": 2}}
    servers = {s["id"]: s for s in body["servers"]}
    assert servers[deploying]["status"] == servers[deploying]["effective_status"] == "running"
    assert servers[deploying]["progress"][-1] == {**servers[deploying]["progress"][-1], "from": "deploying",
                                                  "to": "running", "source": "dtma",
                                                  "message": "container github is running"}
    # It exited with code 3 and nobody asked it to stop: an error, even though this read has no code.
    assert servers[crashed]["status"] == servers[crashed]["effective_status"] == "error"
    assert servers[crashed]["error"].startswith("container slack exited unexpectedly (the agent's status read does "
                                                "not carry the exit code; the next heartbeat will)")
    # Absence in one read is not a verdict, and a read is not a heartbeat.
    assert servers[gone]["status"] == "running" and factory.events(gone) == []
    assert heartbeat_at(pg, box) == before
    runtime_details = pg.execute("select container_id, runtime_details from account_tool_instances "
                                 "where id = %s", (deploying,)).fetchone()
    assert runtime_details[0] and runtime_details[1]["ports"][0]["public_port"] == 49170


def test_refresh_of_one_server(client: FlaskClient, factory: Factory,
                               agent_box: tuple[StandInAgent, Toolbox]) -> None:
    agent, box = agent_box
    inst = factory.instance(box, status="deploying", name="github")
    deploy_on_agent(agent, "github", inst)
    response = client.post("/", json={"id": inst, "refresh": True}, headers=auth(box.user_id))
    assert response.status_code == 200
    assert response.json["server"]["status"] == "running" and response.json["refresh"][box.id]["ok"] is True


def test_refresh_with_the_dtma_down_still_answers(client: FlaskClient, factory: Factory,
                                                  agent_box: tuple[StandInAgent, Toolbox]) -> None:
    agent, box = agent_box
    inst = factory.instance(box, status="deploying", name="github")
    agent.refuse_connections()
    body = listing(client, box.user_id, refresh="true")
    unreachable = f"toolbox at 127.0.0.1:{agent.port} is unreachable"
    assert body["refresh"] == {box.id: {"ok": False, "error": unreachable}}
    assert body["servers"][0]["id"] == inst and body["servers"][0]["status"] == "deploying"
    assert factory.events(inst) == []


def test_refresh_when_the_dtma_answers_an_error(client: FlaskClient, factory: Factory,
                                                agent_box: tuple[StandInAgent, Toolbox]) -> None:
    agent, box = agent_box
    factory.instance(box, status="running", name="github")
    agent.set_docker_down()
    body = listing(client, box.user_id, refresh="true")
    result = body["refresh"][box.id]
    assert result["ok"] is False and result["error"].startswith("Docker is not answering on the toolbox")
    # What the read found is recorded: the server says Docker is down, not "running".
    server = body["servers"][0]
    assert server["effective_status"] == "unknown" and server["health"] == "unhealthy"
    assert server["toolbox"]["docker_healthy"] is False and "Docker is not answering" in server["error"]


def test_refresh_within_its_budget_when_the_dtma_hangs(function_client: Any, factory: Factory,
                                                       pg: psycopg.Connection) -> None:
    client = function_client(FN, DTMA_STATUS_TIMEOUT_SECONDS="0.3")
    with socket.socket() as hung:  # accepts the connection (backlog) and never answers
        hung.bind(("127.0.0.1", 0))
        hung.listen(4)
        box = factory.toolbox(port=hung.getsockname()[1])
        factory.instance(box, status="running")
        result = listing(client, box.user_id, refresh="1")["refresh"][box.id]
    assert result["ok"] is False and "did not answer within 0.3 s" in result["error"]


def test_refresh_refuses_internal_addresses_unless_allowed(function_client: Any, factory: Factory) -> None:
    client = function_client(FN, ALLOW_PRIVATE_TOOLBOX_IPS="false")
    box = factory.toolbox(ip="10.0.0.5")
    factory.instance(box, status="running")
    result = listing(client, box.user_id, refresh="true")["refresh"][box.id]
    assert result["ok"] is False and "not a public address" in result["error"]


def test_refresh_asks_at_most_five_toolboxes(function_client: Any, factory: Factory) -> None:
    client = function_client(FN, ALLOW_PRIVATE_TOOLBOX_IPS="false")  # every ask fails fast, offline
    user = factory.user()
    boxes = [factory.toolbox(user, ip="10.0.0.5") for _ in range(7)]
    for box in boxes:
        factory.instance(box, status="running")
    refresh = listing(client, user, refresh="true")["refresh"]
    assert list(refresh) == [b.id for b in boxes]
    skipped = [r for r in refresh.values() if r["error"].startswith("not refreshed: at most 5 toolboxes")]
    assert len(skipped) == 2
