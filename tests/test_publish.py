"""Where an MCP server's host port is published (`publish` of deploy_mcp_server, SECURITY.md).

Docker publishes a PortBinding without HostIp on every address of the droplet, and an MCP server
has no authentication of its own. `publish: "loopback"` binds it to 127.0.0.1 instead; "public"
(the default) keeps today's binding; "private" needs the droplet's VPC address, which nothing
records, so it is refused. Through the functions-framework app, the real database and a DTMA
stand-in whose engine publishes ports on their HostIp as Docker does.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from flask.testing import FlaskClient

from devstack import openapi
from devstack.dtma_standin import StandInAgent
from devstack.dtma_standin.engine import DockerError, Engine
from shared.adapters.dtma import DtmaClient
from shared.core.config import Settings
from shared.usecases.view import server_json
from tests.helpers import auth, settle, spec

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
SPEC = json.loads((ROOT / "docs" / "openapi.json").read_text())
HOST_PORT = 49152  # the first port of HOST_PORT_RANGE: each test starts from empty tables


@pytest.fixture
def client(function_client: Any) -> FlaskClient:
    return function_client("deploy_mcp_server")


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every `POST /tools` body the backend sends to an agent (the command worker runs in this process)."""
    bodies: list[dict[str, Any]] = []
    original = DtmaClient.deploy

    def recording(self: DtmaClient, target: Any, body: dict[str, Any], budget: float) -> dict[str, Any]:
        bodies.append(copy.deepcopy(body))
        return original(self, target, body, budget)

    monkeypatch.setattr(DtmaClient, "deploy", recording)
    return bodies


def nothing_recorded(pg: psycopg.Connection) -> bool:
    return pg.execute("select count(*) from account_tool_instances").fetchone()[0] == 0 and \
        pg.execute("select count(*) from dtma_commands").fetchone()[0] == 0


def reported_ports(agent: StandInAgent, name: str) -> list[dict[str, Any]]:
    """The `ports` of one container in the agent's heartbeat, as the real agent words them."""
    (item,) = [i for i in agent.heartbeat_payload()["tool_statuses"] if i.get("names") == [name]]
    return item["ports"]


# --- deploy through the stand-in -------------------------------------------------------------------

def test_loopback_publishes_on_127_0_0_1_only(client: FlaskClient, toolbox_agent: Any, pg: psycopg.Connection,
                                              sent: list[dict[str, Any]]) -> None:
    box, agent = toolbox_agent()
    response = client.post("/", json=spec(box, publish="loopback"), headers=auth(box.user_id))
    assert response.status_code == 202, response.json
    server = response.json
    assert server["publish"] == "loopback"
    assert server["endpoint"] == f"http://127.0.0.1:{HOST_PORT}/mcp"
    assert server["reachable_from"].startswith("the droplet only: published on 127.0.0.1")
    openapi.check_response(SPEC, "/deploy_mcp_server", "POST", 202, server)
    settle()
    binding = {"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(HOST_PORT)}]}
    # What the backend sent the agent, what the agent handed Docker, and what Docker reports.
    (body,) = sent
    assert body["baseConfigOverrideJson"]["HostConfig"] == {"PortBindings": binding}
    (container,) = [c for c in agent.containers() if c.name == "mcp-github"]
    assert container.state == "running" and container.port_bindings == binding
    assert reported_ports(agent, "mcp-github") == [
        {"ip": "127.0.0.1", "private_port": 8080, "public_port": HOST_PORT, "type": "tcp"}]
    row = pg.execute("select status_on_toolbox, base_config_override_json, port_mapping_json, runtime_details "
                     "from account_tool_instances").fetchone()
    assert row[0] == "running"
    assert row[1] == {"HostConfig": {"PortBindings": binding}}
    assert row[2] == {"container_port": 8080, "host_port": HOST_PORT, "publish": "loopback", "host_ip": "127.0.0.1"}
    assert row[3]["ports"] == binding  # the deploy answer: Docker's inspect NetworkSettings.Ports


def test_public_is_the_default_and_sends_exactly_the_binding_of_before(
        client: FlaskClient, toolbox_agent: Any, pg: psycopg.Connection, sent: list[dict[str, Any]]) -> None:
    box, agent = toolbox_agent()
    response = client.post("/", json=spec(box), headers=auth(box.user_id))
    assert response.status_code == 202, response.json
    assert response.json["publish"] == "public"
    assert response.json["endpoint"] == f"http://127.0.0.1:{HOST_PORT}/mcp"  # the toolbox's (test) address
    assert "DigitalOcean cloud firewall" in response.json["reachable_from"]
    settle()
    binding = {"8080/tcp": [{"HostPort": str(HOST_PORT)}]}
    assert sent[0]["baseConfigOverrideJson"]["HostConfig"] == {"PortBindings": binding}
    assert [c.port_bindings for c in agent.containers() if c.name == "mcp-github"] == [binding]
    assert reported_ports(agent, "mcp-github")[0]["ip"] == "0.0.0.0"
    mapping = pg.execute("select port_mapping_json from account_tool_instances").fetchone()[0]
    assert mapping["publish"] == "public" and mapping["host_ip"] is None


def test_mcp_status_shows_where_each_server_is_published(function_client: Any, client: FlaskClient,
                                                         toolbox_agent: Any) -> None:
    box, _ = toolbox_agent()
    for name, publish in (("open", "public"), ("local", "loopback")):
        assert client.post("/", json=spec(box, name=name, publish=publish),
                           headers=auth(box.user_id)).status_code == 202
    settle()
    page = function_client("mcp_status").get("/", headers=auth(box.user_id)).json
    seen = {s["name"]: (s["publish"], s["endpoint"].split("//")[1].split("/")[0]) for s in page["servers"]}
    assert seen == {"open": ("public", f"127.0.0.1:{HOST_PORT}"), "local": ("loopback", f"127.0.0.1:{HOST_PORT + 1}")}


@pytest.mark.parametrize("value", ["everywhere", "PUBLIC", "Loopback", "127.0.0.1", "0.0.0.0", "", " loopback",
                                   None, 1, True, ["loopback"], {"mode": "loopback"}])
def test_invalid_values_are_400_naming_the_field(client: FlaskClient, toolbox_agent: Any, pg: psycopg.Connection,
                                                 value: Any) -> None:
    box, agent = toolbox_agent()
    response = client.post("/", json=spec(box, publish=value), headers=auth(box.user_id))
    assert response.status_code == 400, response.json
    error = response.json["error"]
    assert error["code"] == "invalid_request" and error["details"]["field"] == "publish"
    assert error["message"].startswith("publish: ")
    assert nothing_recorded(pg) and agent.requests == []


def test_private_is_refused_because_no_private_address_is_known(client: FlaskClient, toolbox_agent: Any,
                                                                pg: psycopg.Connection) -> None:
    box, agent = toolbox_agent()
    response = client.post("/", json=spec(box, publish="private"), headers=auth(box.user_id))
    assert response.status_code == 400, response.json
    error = response.json["error"]
    assert error["code"] == "private_address_unknown" and error["details"]["field"] == "publish"
    assert "private (VPC) address" in error["message"] and "loopback" in error["message"]
    openapi.check_response(SPEC, "/deploy_mcp_server", "POST", 400, response.json)
    assert nothing_recorded(pg) and agent.requests == []


# --- the body against the real agent's request format ------------------------------------------------

#: What dtma-agent@82a6bec `src/routes/tool_routes.ts` `router.post('/')` reads of the body, and the
#: PortMap interface it declares for HostConfig.PortBindings: `{[containerPort]: {HostIp?: string;
#: HostPort?: string}[]}`. It passes that PortMap to Docker unchanged and drops everything else of
#: HostConfig (it sets RestartPolicy itself).
AGENT_FIELDS = ("dockerImageUrl", "instanceNameOnToolbox", "accountToolInstanceId", "baseConfigOverrideJson")
PORT_SPEC = re.compile(r"^[0-9]{1,5}/tcp$")


def create_options_as_the_agent_builds_them(body: dict[str, Any]) -> dict[str, Any]:
    """tool_routes.ts lines ~70-125: refuse what it refuses, then build dockerode's create options."""
    assert set(body) == set(AGENT_FIELDS)
    for required in AGENT_FIELDS[:3]:
        assert isinstance(body[required], str) and body[required], required
    override = body["baseConfigOverrideJson"]
    assert set(override) == {"Env", "HostConfig"}
    assert all(isinstance(item, str) and "=" in item for item in override["Env"])
    assert set(override["HostConfig"]) == {"PortBindings"}  # nothing the agent would silently drop
    bindings = override["HostConfig"]["PortBindings"]
    for port, entries in bindings.items():
        assert PORT_SPEC.fullmatch(port) and isinstance(entries, list) and entries
        for entry in entries:
            assert set(entry) <= {"HostIp", "HostPort"} and all(isinstance(v, str) for v in entry.values())
    return {"Image": body["dockerImageUrl"], "name": body["instanceNameOnToolbox"], "Env": override["Env"],
            "HostConfig": {"RestartPolicy": {"Name": "unless-stopped"}, "PortBindings": bindings}}


def test_the_loopback_body_is_the_real_agents_request_format(client: FlaskClient, toolbox_agent: Any,
                                                             sent: list[dict[str, Any]]) -> None:
    box, _ = toolbox_agent()
    assert client.post("/", json=spec(box, publish="loopback"), headers=auth(box.user_id)).status_code == 202
    settle()
    (body,) = sent
    options = create_options_as_the_agent_builds_them(body)
    assert options["HostConfig"]["PortBindings"] == {"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": "49152"}]}
    # The same shape as the deploy bodies recorded against the real agent, plus the HostIp its
    # PortMap declares.
    recorded = next(c["request_body"] for c in json.loads((FIXTURES / "real-dtma-responses.json").read_text())["calls"]
                    if c["label"] == "deploy")
    assert list(body) == list(recorded)
    assert list(body["baseConfigOverrideJson"]) == list(recorded["baseConfigOverrideJson"])
    # And Docker (the stand-in's engine, which checks bodies as Docker does) publishes it on 127.0.0.1.
    engine = Engine()
    engine.finish_pull(options["Image"], engine.pull(options["Image"]))
    engine.create(options["name"], options["Image"], env=options["Env"],
                  port_bindings=options["HostConfig"]["PortBindings"])
    engine.start(options["name"])
    assert engine.list_all()[0]["Ports"] == [{"IP": "127.0.0.1", "PrivatePort": 8080, "PublicPort": 49152,
                                              "Type": "tcp"}]
    assert engine.inspect(options["name"])["NetworkSettings"]["Ports"] == {
        "8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": "49152"}]}


# --- the stand-in's engine holds HostIp to Docker's rules --------------------------------------------

def running_engine(name: str, binding: dict[str, str], engine: Engine | None = None) -> Engine:
    engine = engine or Engine()
    engine.finish_pull("mcp/github:latest", engine.pull("mcp/github:latest"))
    engine.create(name, "mcp/github:latest", env=[], port_bindings={"8080/tcp": [binding]})
    engine.start(name)
    return engine


@pytest.mark.parametrize("host_ip", ["localhost", "127.0.0.1:80", "10.0.0.0/8", "127.000.0.1", "256.0.0.1", " ",
                                     "0.0.0.0; rm -rf /"])
def test_a_host_ip_that_is_not_an_ip_address_is_refused_at_create(host_ip: str) -> None:
    engine = Engine()
    engine.finish_pull("mcp/github:latest", engine.pull("mcp/github:latest"))
    with pytest.raises(DockerError) as refused:
        engine.create("srv", "mcp/github:latest", env=[], port_bindings={"8080/tcp": [{"HostIp": host_ip}]})
    assert refused.value.message.startswith("(HTTP code 400) unexpected - invalid JSON: ParseAddr(")
    assert engine.list_all() == []


def test_a_host_ip_of_the_wrong_json_type_is_refused_like_docker() -> None:
    engine = Engine()
    with pytest.raises(DockerError, match=r"cannot unmarshal number into Go struct field \S*HostIp of type string"):
        engine.create("srv", "mcp/github:latest", env=[], port_bindings={"8080/tcp": [{"HostIp": 127}]})


def test_host_ips_are_reported_in_canonical_form() -> None:
    engine = running_engine("v6", {"HostIp": "0:0:0:0:0:0:0:1", "HostPort": "49152"})
    assert engine.list_all()[0]["Ports"][0]["IP"] == "::1"


def test_one_host_port_on_addresses_that_do_not_overlap() -> None:
    engine = running_engine("local", {"HostIp": "127.0.0.1", "HostPort": "49152"})
    running_engine("vpc", {"HostIp": "10.116.0.2", "HostPort": "49152"}, engine)
    running_engine("local-v6", {"HostIp": "::1", "HostPort": "49152"}, engine)
    for wanted in ({"HostIp": "127.0.0.1"}, {}, {"HostIp": "0.0.0.0"}):
        with pytest.raises(DockerError, match=r"Bind for [0-9.]+:49152 failed: port is already allocated"):
            running_engine(f"clash-{len(engine.list_all())}", {**wanted, "HostPort": "49152"}, engine)
    everywhere = running_engine("everywhere", {"HostPort": "49153"})
    with pytest.raises(DockerError, match=re.escape("Bind for 127.0.0.1:49153 failed")):
        running_engine("late", {"HostIp": "127.0.0.1", "HostPort": "49153"}, everywhere)


def test_through_the_agents_http_api_a_bad_host_ip_is_its_500_with_dockers_text() -> None:
    with StandInAgent("publish-test-token") as agent, httpx.Client(
            base_url=agent.url, headers={"Authorization": "Bearer publish-test-token"}, trust_env=False) as http:
        body = {"dockerImageUrl": "mcp/github:latest", "instanceNameOnToolbox": "srv",
                "accountToolInstanceId": "ati-srv",
                "baseConfigOverrideJson": {"HostConfig": {"PortBindings": {
                    "8080/tcp": [{"HostIp": "localhost", "HostPort": "49152"}]}}}}
        answer = http.post("/tools", json=body)
        assert answer.status_code == 500
        assert answer.json()["error"] == ('(HTTP code 400) unexpected - invalid JSON: ParseAddr("localhost"): '
                                          "unable to parse IP ")
        body["baseConfigOverrideJson"]["HostConfig"]["PortBindings"]["8080/tcp"][0]["HostIp"] = "127.0.0.1"
        assert http.post("/tools", json=body).status_code == 201
        listed = http.get("/tools/status").json()["tool_instances"]
        assert [i["ports"] for i in listed if i["instance_name_on_toolbox"] == "srv"] == [
            [{"IP": "127.0.0.1", "PrivatePort": 8080, "PublicPort": 49152, "Type": "tcp"}]]


# --- the view ------------------------------------------------------------------------------------------

def view_row(port_mapping: dict[str, Any] | None, ip: str | None = "203.0.113.7") -> dict[str, Any]:
    at = "2025-06-01T12:00:00+00:00"
    toolbox = {"id": "7d0f4a52-0000-4000-8000-000000000001", "name": "droplet-1", "region_slug": "nyc3",
               "status": "active", "public_ip_address": ip, "dtma_port": 30000, "dtma_key_version": 1,
               "last_heartbeat_at": at, "heartbeat_age_seconds": 3.0, "provisioning_error_message": None,
               "dtma_last_reached_at": None, "reached_age_seconds": None, "docker_error": None}
    return {"id": "7d0f4a52-0000-4000-8000-000000000002", "name": "github", "status": "running",
            "status_changed_at": at, "status_age_seconds": 10.0, "error_message": None, "image": "mcp/github:latest",
            "host_port": 49160, "container_port": 8080, "port_mapping": port_mapping, "container_id": "c0ffee",
            "endpoint_path": "/mcp", "transport": "streamable_http", "capabilities": [], "discovery_metadata": None,
            "runtime": {}, "last_report_at": at, "agent_unmanaged_at": None, "created_at": at, "updated_at": at,
            "toolbox": toolbox, "events": []}


@pytest.mark.parametrize(("mapping", "ip", "publish", "url", "says"), [
    (None, "203.0.113.7", "public", "http://203.0.113.7:49160/mcp", "anyone who can reach 203.0.113.7:49160"),
    ({"container_port": 8080, "host_port": 49160}, "203.0.113.7", "public", "http://203.0.113.7:49160/mcp",
     "cloud firewall"),  # recorded before the choice existed
    ({"publish": "public", "host_ip": None}, None, "public", None, "no public IP address yet"),
    ({"publish": "loopback", "host_ip": "127.0.0.1"}, "203.0.113.7", "loopback", "http://127.0.0.1:49160/mcp",
     "ssh -L 49160:127.0.0.1:49160 root@203.0.113.7"),
    ({"publish": "private", "host_ip": "10.116.0.2"}, "203.0.113.7", "private", "http://10.116.0.2:49160/mcp",
     "private network (VPC) only"),
])
def test_the_view_says_where_a_server_is_reachable(mapping: dict[str, Any] | None, ip: str | None, publish: str,
                                                   url: str | None, says: str) -> None:
    answer = server_json(view_row(mapping, ip), Settings())
    assert (answer["publish"], answer["endpoint"]) == (publish, url)
    assert says in answer["reachable_from"]
    openapi.validate(dict(answer), "#/components/schemas/Server", SPEC)
