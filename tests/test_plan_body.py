"""The plan's deploy body (`MCPService.deployServer` -> `deployToolToToolbox`), accepted by
deploy_mcp_server beside the flat request, and names a person types turned into container names.

End to end through the functions-framework app, the real database, the command worker and a
loopback DTMA stand-in, as tests/test_deploy.py does. The same body sent verbatim through
supabase-js is in tests/test_supabase_js.py.
"""

from __future__ import annotations

import copy
import uuid
from typing import Any

import psycopg
import pytest
from flask.testing import FlaskClient
from hypothesis import given
from hypothesis import strategies as st

from shared.core.names import container_name, free_name, is_container_name
from tests.factories import Factory
from tests.helpers import auth, server_row, settle, spec

FN = "deploy_mcp_server"
GENERIC = "00000000-0000-0000-0000-000000000001"


def plan_body(toolbox_id: str, name: str = "Weather API Server", **mcp: Any) -> dict[str, Any]:
    """The body the plan's MCPService.deployServer sends, as the web app builds it."""
    config = {"dockerImage": "mcp/weather:1.2", "transport": "http", "port": 8080,
              "environmentVariables": {"WEATHER_API_KEY": "wk_secret_123", "UNITS": "metric"},
              "capabilities": ["tools", "resources"],
              "discoveryMetadata": {"templateId": "weather", "category": "data"}}
    config.update(mcp)
    return {"accountToolEnvironmentId": toolbox_id, "toolCatalogId": GENERIC, "instanceNameOnToolbox": name,
            "baseConfigOverrideJson": {"mcpConfig": config}}


@pytest.fixture
def client(function_client: Any) -> FlaskClient:
    return function_client(FN)


def count(pg: psycopg.Connection) -> int:
    return pg.execute("select count(*) from account_tool_instances").fetchone()[0]


# --- container names from what a person types ----------------------------------------------------

@pytest.mark.parametrize(("typed", "name"), [
    ("Weather API Server", "weather-api-server"),
    ("Météo/Server #1", "meteo-server-1"),
    ("  GitHub  (prod)  ", "github-prod"),
    ("🚀 Rocket Tools 🚀", "rocket-tools"),
    ("Straße Ærø", "strasse-aero"),
    ("__private..srv--", "private..srv"),
    ("v1.2_beta", "v1.2_beta"),
    ("x" * 200, "x" * 63),
    ("a " * 100, "-".join("a" * 32)),
])
def test_typed_names_become_container_names(typed: str, name: str) -> None:
    assert container_name(typed) == name and is_container_name(name)


@pytest.mark.parametrize("typed", ["", "  ", "🚀🔥", "中文名", "#/!?"])
def test_names_with_nothing_usable_give_none(typed: str) -> None:
    assert container_name(typed) is None


@given(st.text(max_size=300))
def test_any_text_gives_a_valid_name_or_none(typed: str) -> None:
    name = container_name(typed)
    assert name is None or is_container_name(name)


def test_free_name_counts_up_within_63_characters() -> None:
    assert free_name("srv", {"srv", "srv-2"}) == "srv-3"
    long = "y" * 63
    assert free_name(long, {long}) == "y" * 61 + "-2"


# --- the plan's body deploys --------------------------------------------------------------------

def test_the_plans_body_deploys_and_ends_running(client: FlaskClient, toolbox_agent: Any,
                                                 pg: psycopg.Connection) -> None:
    box, agent = toolbox_agent()
    response = client.post("/", json=plan_body(box.id), headers=auth(box.user_id))
    assert response.status_code == 202, response.json
    server = response.json
    # The answer says which container name was used, and keeps what the person typed.
    assert server["name"] == "weather-api-server"
    assert server["discovery_metadata"]["display_name"] == "Weather API Server"
    assert server["discovery_metadata"]["templateId"] == "weather"
    assert server["image"] == "mcp/weather:1.2" and server["transport"] == "streamable_http"
    assert server["capabilities"] == ["tools", "resources"]
    settle()
    assert server_row(pg, server["id"]) == ("running", None)
    (container,) = [c for c in agent.containers() if c.name == "weather-api-server"]
    assert container.image == "mcp/weather:1.2" and container.state == "running"
    assert container.env_dict() == {"WEATHER_API_KEY": "wk_secret_123", "UNITS": "metric"}
    assert list(container.port_bindings) == ["8080/tcp"]
    catalog, env_names = pg.execute("select tool_catalog_id::text, env_var_names from account_tool_instances "
                                    "where id = %s", (server["id"],)).fetchone()
    assert catalog == GENERIC and sorted(env_names) == ["UNITS", "WEATHER_API_KEY"]


@pytest.mark.parametrize(("mcp", "expected"), [
    ({"transport": "sse", "endpoint": "/sse"}, {"transport": "sse", "endpoint_suffix": "/sse"}),
    ({"transport": "stdio"}, {"transport": "stdio"}),
    ({"port": 9000, "hostPort": 50123}, {"endpoint_suffix": ":50123/mcp"}),
    ({"publish": "loopback"}, {"publish": "loopback"}),
])
def test_each_mcp_config_field_maps_onto_the_flat_request(client: FlaskClient, toolbox_agent: Any,
                                                          mcp: dict[str, Any], expected: dict[str, Any]) -> None:
    box, _ = toolbox_agent()
    response = client.post("/", json=plan_body(box.id, **mcp), headers=auth(box.user_id))
    assert response.status_code == 202, response.json
    server = response.json
    if "transport" in expected:
        assert server["transport"] == expected["transport"]
    if "endpoint_suffix" in expected:
        assert server["endpoint"].endswith(expected["endpoint_suffix"]), server["endpoint"]
    if "publish" in expected:
        assert server["publish"] == expected["publish"]


def test_a_minimal_plan_body_deploys_the_catalog_image(client: FlaskClient, toolbox_agent: Any) -> None:
    """`config.configuration` may be empty: the generic MCP catalog entry's image is deployed."""
    box, _ = toolbox_agent()
    body = {"accountToolEnvironmentId": box.id, "toolCatalogId": GENERIC, "instanceNameOnToolbox": "Everything",
            "baseConfigOverrideJson": {}}
    response = client.post("/", json=body, headers=auth(box.user_id))
    assert response.status_code == 202, response.json
    assert response.json["name"] == "everything" and response.json["image"] == "mcp/everything:latest"


def test_the_callers_own_user_id_is_accepted(client: FlaskClient, toolbox_agent: Any) -> None:
    box, _ = toolbox_agent()
    body = {**plan_body(box.id), "userId": box.user_id}
    assert client.post("/", json=body, headers=auth(box.user_id)).status_code == 202


# --- refusals ------------------------------------------------------------------------------------

def _with(body: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(body)
    *parents, last = path.split(".")
    target = out
    for key in parents:
        target = target[key]
    target[last] = value
    return out


@pytest.mark.parametrize(("change", "status", "code", "names"), [
    # Both shapes in one body.
    (lambda b: {**b, "image": "mcp/github:latest"}, 400, "mixed_shapes", "image"),
    (lambda b: {**b, "toolbox_id": b["accountToolEnvironmentId"], "env": {}}, 400, "mixed_shapes", "env, toolbox_id"),
    # Only the generic MCP catalog entry.
    (lambda b: {**b, "toolCatalogId": "00000000-0000-0000-0000-000000000002"}, 400, "catalog_not_supported",
     "toolCatalogId"),
    # Someone else's id.
    (lambda b: {**b, "userId": str(uuid.uuid4())}, 400, "invalid_request", "userId"),
    # A name with nothing to build a container name from.
    (lambda b: {**b, "instanceNameOnToolbox": "🚀🔥"}, 400, "invalid_request", "instanceNameOnToolbox"),
    (lambda b: {**b, "instanceNameOnToolbox": "   "}, 400, "invalid_request", "instanceNameOnToolbox"),
    (lambda b: {**b, "instanceNameOnToolbox": "x" * 256}, 400, "invalid_request", "instanceNameOnToolbox"),
    # Unknown fields, at any depth, named.
    (lambda b: _with(b, "baseConfigOverrideJson.mcpConfig.dockerImag", "x"), 422, "unknown_fields",
     "baseConfigOverrideJson.mcpConfig.dockerImag"),
    (lambda b: _with(b, "baseConfigOverrideJson.resourceLimits", {"cpu": 1}), 422, "unknown_fields",
     "baseConfigOverrideJson.resourceLimits"),
    (lambda b: {**b, "templateId": "weather"}, 422, "unknown_fields", "templateId"),
    # The flat request's rules, reported under the plan's names.
    (lambda b: _with(b, "baseConfigOverrideJson.mcpConfig.port", "8080"), 400, "invalid_request",
     "baseConfigOverrideJson.mcpConfig.port"),
    (lambda b: _with(b, "baseConfigOverrideJson.mcpConfig.port", 70000), 400, "invalid_request",
     "baseConfigOverrideJson.mcpConfig.port"),
    (lambda b: _with(b, "baseConfigOverrideJson.mcpConfig.dockerImage", "Bad Image; rm -rf /"), 400,
     "invalid_request", "baseConfigOverrideJson.mcpConfig.dockerImage"),
    (lambda b: _with(b, "baseConfigOverrideJson.mcpConfig.transport", "websocket"), 400, "invalid_request",
     "baseConfigOverrideJson.mcpConfig.transport"),
    (lambda b: _with(b, "baseConfigOverrideJson.mcpConfig.environmentVariables", {"BAD-NAME": "x"}), 400,
     "invalid_request", "baseConfigOverrideJson.mcpConfig.environmentVariables"),
    (lambda b: _with(b, "baseConfigOverrideJson.mcpConfig.endpoint", "mcp"), 400, "invalid_request",
     "baseConfigOverrideJson.mcpConfig.endpoint"),
    (lambda b: _with(b, "baseConfigOverrideJson.mcpConfig.discoveryMetadata", {"blob": "x" * 20000}), 400,
     "invalid_request", "baseConfigOverrideJson.mcpConfig.discoveryMetadata"),
    (lambda b: _with(b, "baseConfigOverrideJson.mcpConfig.hostPort", 80), 400, "invalid_request",
     "baseConfigOverrideJson.mcpConfig.hostPort"),
    (lambda b: _with(b, "baseConfigOverrideJson.mcpConfig.publish", "private"), 400, "private_address_unknown",
     "baseConfigOverrideJson.mcpConfig.publish"),
    (lambda b: _with(b, "baseConfigOverrideJson.mcpConfig", "weather"), 400, "invalid_request",
     "baseConfigOverrideJson.mcpConfig"),
    (lambda b: {k: v for k, v in b.items() if k != "accountToolEnvironmentId"}, 400, "invalid_request",
     "accountToolEnvironmentId"),
])
def test_plan_body_refusals_name_the_problem(client: FlaskClient, toolbox_agent: Any, pg: psycopg.Connection,
                                             change: Any, status: int, code: str, names: str) -> None:
    box, agent = toolbox_agent()
    response = client.post("/", json=change(plan_body(box.id)), headers=auth(box.user_id))
    assert response.status_code == status, response.json
    error = response.json["error"]
    assert error["code"] == code and names in error["message"], error
    assert count(pg) == 0 and not [c for c in agent.containers() if c.managed]


def test_mixed_shapes_say_which_fields_belong_where(client: FlaskClient, toolbox_agent: Any) -> None:
    box, _ = toolbox_agent()
    response = client.post("/", json={**plan_body(box.id), "name": "weather"}, headers=auth(box.user_id))
    assert response.status_code == 400
    assert response.json["error"]["details"]["fields"] == ["name"]
    assert response.json["error"]["message"] == (
        "the body mixes the plan's shape (baseConfigOverrideJson) with the flat request's field(s) name: send the "
        "plan's body with everything under baseConfigOverrideJson.mcpConfig, or the flat request without "
        "baseConfigOverrideJson")


# --- the flat request stays strict, and says which name would do --------------------------------

@pytest.mark.parametrize(("field", "typed", "suggested"), [
    ("name", "Weather API Server", "weather-api-server"),
    ("instanceNameOnToolbox", "Météo/Server #1", "meteo-server-1"),
    ("name", "x" * 64, "x" * 63),
])
def test_an_invalid_flat_name_is_refused_with_the_suggested_name(client: FlaskClient, toolbox_agent: Any,
                                                                 pg: psycopg.Connection, field: str, typed: str,
                                                                 suggested: str) -> None:
    box, _ = toolbox_agent()
    body = {k: v for k, v in spec(box).items() if k != "name"} | {field: typed}
    response = client.post("/", json=body, headers=auth(box.user_id))
    assert response.status_code == 400, response.json
    error = response.json["error"]
    assert error["details"]["suggested_name"] == suggested
    assert error["message"].endswith(f"; use {suggested!r}") and error["message"].startswith(f"{field}: ")
    assert count(pg) == 0


def test_a_flat_name_with_nothing_usable_says_so(client: FlaskClient, toolbox_agent: Any) -> None:
    box, _ = toolbox_agent()
    response = client.post("/", json=spec(box, name="🚀"), headers=auth(box.user_id))
    assert response.status_code == 400
    assert "suggested_name" not in response.json["error"]["details"]
    assert "holds nothing to build one from" in response.json["error"]["message"]


def test_the_flat_request_is_as_strict_as_before(client: FlaskClient, toolbox_agent: Any) -> None:
    box, _ = toolbox_agent()
    for body, status in [(spec(box, container_port=True), 400), (spec(box, container_port="8080"), 400),
                         (spec(box, mcpConfig={"port": 1}), 422), (spec(box, dockerImage="mcp/x:1"), 422)]:
        response = client.post("/", json=body, headers=auth(box.user_id))
        assert response.status_code == status, (body, response.json)


# --- name collisions suggest a free name ---------------------------------------------------------

def test_a_taken_name_is_a_409_that_suggests_a_free_one(client: FlaskClient, toolbox_agent: Any,
                                                        factory: Factory, pg: psycopg.Connection) -> None:
    box, _ = toolbox_agent()
    first = client.post("/", json=plan_body(box.id), headers=auth(box.user_id))
    second = client.post("/", json=spec(box, name="weather-api-server-2"), headers=auth(box.user_id))
    assert first.status_code == second.status_code == 202
    again = client.post("/", json=plan_body(box.id, port=8081), headers=auth(box.user_id))
    assert again.status_code == 409, again.json
    error = again.json["error"]
    assert error["details"]["suggested_name"] == "weather-api-server-3"
    assert error["message"].startswith("an MCP server named weather-api-server already exists on toolbox")
    assert error["message"].endswith("; 'weather-api-server-3' is free")
    # Not deployed twice: a retried click must not make a second copy.
    assert count(pg) == 2
    # The suggestion is accepted as it is.
    taken = client.post("/", json=spec(box, name=error["details"]["suggested_name"]), headers=auth(box.user_id))
    assert taken.status_code == 202, taken.json
