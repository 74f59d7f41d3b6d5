"""Tenants: one table-driven matrix of every function and action against every kind of caller
who must not get in.

Victim: user A, with an active toolbox (its own DTMA stand-in), a running and a stopped MCP
server. Callers: user B (a real user with a toolbox and a server of their own), nobody, JWTs
that are forged, expired, from another project (wrong issuer, wrong audience), `alg: none`,
signed by an impostor key with a known `kid`, the algorithm-confusion forgery, the project's
service-role and anon keys where a user belongs, and toolbox tokens where a user belongs (and
toolbox B's token naming A's instances in a heartbeat).

Every cell asserts: the answer is the refusal that caller should get (401 for whoever is not a
user; 404 for B on anything of A's; an empty list where B lists with A's ids), the database is
unchanged (a digest of every table; for B's own accepted heartbeat, of everything of A's), no
DTMA was called, and the answer is *the same* as for a random id that exists nowhere (status,
code, message, and the body with the echoed id masked): nothing tells B whether A's objects exist.

The functions run with SUPABASE_URL set (so the issuer is checked) and a real loopback JWKS
(so ES256 and the algorithm-confusion forgery take the production code path).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from flask.testing import FlaskClient

from tests.conftest import JWT_SECRET
from tests.factories import Factory, Toolbox
from tests.helpers import (
    DEPLOY,
    FUNCTIONS,
    HEARTBEAT,
    MANAGE,
    STATUS,
    SWEEP,
    base_env,
    build_clients,
    snapshot,
)
from tests.jwt_helpers import OMIT, EcKeyPair, JwksServer, mint_alg_none, mint_hs256, mint_hs256_with_public_key

# Never listened on: the JWKS the issuer implies is not used (SUPABASE_JWKS_URL points at the
# loopback JWKS below); the URL only defines the issuer a token must carry.
PROJECT_URL = "http://127.0.0.1:9/project-a"
ISSUER = PROJECT_URL + "/auth/v1"
KEY = EcKeyPair()


@pytest.fixture(scope="module")
def jwks() -> Iterator[JwksServer]:
    with JwksServer([KEY.jwk]) as server:
        yield server


@pytest.fixture(scope="module")
def clients(database_url: str, jwks: JwksServer) -> dict[str, FlaskClient]:
    return build_clients(base_env(database_url) | {"SUPABASE_URL": PROJECT_URL, "SUPABASE_JWKS_URL": jwks.url})


# --- the victim and the intruder ---------------------------------------------------------------------

@dataclass(frozen=True)
class Targets:
    """What a call names: A's real objects, or ids that exist nowhere."""

    box: str
    running: str
    stopped: str
    running_name: str = "a-running"
    stopped_name: str = "a-stopped"


@dataclass
class Tenants:
    a: str
    b: str
    box_a: Toolbox
    box_b: Toolbox
    agents: list[Any]
    theirs: Targets
    random: Targets

    def dtma_calls(self) -> list[tuple[str, str]]:
        return [(r.method, r.path) for agent in self.agents for r in agent.requests]


@pytest.fixture
def tenants(factory: Factory, toolbox_agent: Any) -> Tenants:
    a, b = factory.user(), factory.user()
    box_a, agent_a = toolbox_agent(a)
    box_b, agent_b = toolbox_agent(b)
    running = factory.instance(box_a, status="running", name="a-running")
    stopped = factory.instance(box_a, status="stopped", name="a-stopped")
    factory.instance(box_b, status="running", name="b-own")
    # Their MCP endpoints were checked just now: a sweep has nothing to check (tests/test_mcp_health.py).
    factory.conn.execute("insert into mcp_endpoint_probes (account_tool_instance_id, ready, checked_at) "
                         "select id, true, now() from account_tool_instances where status_on_toolbox = 'running'")
    return Tenants(a, b, box_a, box_b, [agent_a, agent_b], Targets(box_a.id, running, stopped),
                   Targets(str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())))


def a_digest(conn: psycopg.Connection, t: Tenants) -> tuple[Any, ...]:
    """Everything of A's: the toolbox row, its instances, their events."""
    return conn.execute(
        """select (select md5(string_agg(e::text, '|')) from account_tool_environments e where e.id = %(box)s),
                  (select md5(string_agg(i::text, '|' order by i.id)) from account_tool_instances i
                    where i.account_tool_environment_id = %(box)s),
                  (select count(*) from account_tool_instance_events v
                    where v.account_tool_environment_id = %(box)s)""",
        {"box": t.box_a.id}).fetchone()


# --- callers -------------------------------------------------------------------------------------------

def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


CALLERS: dict[str, Callable[[Tenants], dict[str, str]]] = {
    "user-b": lambda t: bearer(mint_hs256(JWT_SECRET, sub=t.b, iss=ISSUER)),
    "user-b-es256": lambda t: bearer(KEY.mint(sub=t.b, iss=ISSUER)),
    "anonymous": lambda t: {},
    "forged-secret": lambda t: bearer(mint_hs256("a-different-secret-that-is-long-enough-0123", sub=t.a, iss=ISSUER)),
    "expired": lambda t: bearer(mint_hs256(JWT_SECRET, sub=t.a, iss=ISSUER, exp_in=-3600)),
    "other-project-issuer": lambda t: bearer(mint_hs256(JWT_SECRET, sub=t.a,
                                                        iss="https://other-project.supabase.co/auth/v1")),
    "no-issuer": lambda t: bearer(mint_hs256(JWT_SECRET, sub=t.a)),
    "other-audience": lambda t: bearer(mint_hs256(JWT_SECRET, sub=t.a, iss=ISSUER, aud="other-app")),
    "alg-none": lambda t: bearer(mint_alg_none(sub=t.a, iss=ISSUER)),
    "es256-impostor": lambda t: bearer(KEY.impostor().mint(sub=t.a, iss=ISSUER)),
    "hs256-with-public-key": lambda t: bearer(mint_hs256_with_public_key(KEY, sub=t.a, iss=ISSUER)),
    # The legacy service_role API key: signed with the project secret, no sub, no aud.
    "service-role-jwt": lambda t: bearer(mint_hs256(JWT_SECRET, sub=OMIT, role="service_role", aud=None,
                                                    iss="supabase", extra={"ref": "project-a"})),
    "service-role-with-sub": lambda t: bearer(mint_hs256(JWT_SECRET, sub=t.a, role="service_role", iss=ISSUER)),
    "service-role-secret-key": lambda t: bearer("sb_secret_" + "x" * 40),
    "anon-key": lambda t: bearer(mint_hs256(JWT_SECRET, sub=OMIT, role="anon", aud=None, iss="supabase")),
    "toolbox-token-b": lambda t: bearer(t.box_b.token),
    "toolbox-token-a": lambda t: bearer(t.box_a.token),
}


# --- actions -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Call:
    function: str
    method: str
    path: str
    body: Any = None


def _beat(t: Targets) -> dict[str, Any]:
    """A heartbeat naming the targets: instance format by id, container format by name."""
    return {"dtma_version": "0.1.0", "system_status": {}, "tool_statuses": [
        {"account_tool_instance_id": t.running, "status_on_toolbox": "exited"},
        {"account_tool_instance_id": t.stopped, "status_on_toolbox": "running"},
        {"id": "f" * 64, "names": [f"/{t.running_name}"], "image": "x", "state": "dead", "status": "Dead"},
        {"id": "e" * 64, "names": [f"/{t.stopped_name}"], "image": "x", "state": "running", "status": "Up"},
    ]}


def _deploy(t: Targets, field: str = "toolbox_id") -> dict[str, Any]:
    return {field: t.box, "name": "intruder", "image": "evil/miner:latest", "env": {"X": "y"}}


ACTIONS: dict[str, Callable[[Targets], Call]] = {
    "deploy": lambda t: Call(DEPLOY, "POST", "/", _deploy(t)),
    "deploy-camel-case": lambda t: Call(DEPLOY, "POST", "/", _deploy(t, "toolboxId")),
    "deploy-explicit-port": lambda t: Call(DEPLOY, "POST", "/", _deploy(t) | {"host_port": 8081}),
    "start-path": lambda t: Call(MANAGE, "POST", f"/{t.stopped}/start"),
    "stop-path": lambda t: Call(MANAGE, "POST", f"/{t.running}/stop"),
    "restart-path": lambda t: Call(MANAGE, "POST", f"/{t.running}/restart"),
    "remove-path": lambda t: Call(MANAGE, "DELETE", f"/{t.running}"),
    "remove-path-verb": lambda t: Call(MANAGE, "POST", f"/{t.stopped}/remove"),
    "stop-mounted-path": lambda t: Call(MANAGE, "POST", f"/functions/v1/manage_mcp_server/{t.running}/stop"),
    "start-body": lambda t: Call(MANAGE, "POST", "/", {"instance_id": t.stopped, "action": "start"}),
    "stop-body": lambda t: Call(MANAGE, "POST", "/", {"instance_id": t.running, "action": "stop"}),
    "restart-body": lambda t: Call(MANAGE, "POST", "/", {"instance_id": t.running, "action": "restart"}),
    "remove-body": lambda t: Call(MANAGE, "POST", "/", {"instance_id": t.running, "action": "remove"}),
    "delete-body-camel": lambda t: Call(MANAGE, "POST", "/", {"instanceId": t.stopped, "action": "delete"}),
    "status-one": lambda t: Call(STATUS, "GET", f"/{t.running}"),
    "status-one-refresh": lambda t: Call(STATUS, "GET", f"/{t.running}?refresh=true"),
    "status-one-query": lambda t: Call(STATUS, "GET", f"/?id={t.stopped}"),
    "status-one-post": lambda t: Call(STATUS, "POST", "/", {"id": t.running}),
    "status-list": lambda t: Call(STATUS, "GET", "/"),
    "status-list-toolbox": lambda t: Call(STATUS, "GET", f"/?toolbox_id={t.box}"),
    "status-list-filters": lambda t: Call(STATUS, "GET", f"/?toolbox_id={t.box}&status=running&limit=5"),
    "status-list-refresh": lambda t: Call(STATUS, "GET", f"/?toolbox_id={t.box}&refresh=true"),
    "status-list-post": lambda t: Call(STATUS, "POST", "/", {"toolbox_id": t.box, "refresh": True}),
    "heartbeat-naming-a": lambda t: Call(HEARTBEAT, "POST", "/heartbeat", _beat(t)),
    "sweep": lambda t: Call(SWEEP, "POST", "/"),
}
assert {a.function for a in (make(Targets("x", "y", "z")) for make in ACTIONS.values())} == set(FUNCTIONS)

USER_B = ("user-b", "user-b-es256")


def expected_status(caller: str, action: str) -> int:
    if action == "sweep":
        return 200  # IAM-private: no credential is read, so none means anything
    if action.startswith("heartbeat"):
        return 204 if caller == "toolbox-token-b" else 401
    if caller not in USER_B:
        return 401
    # B reading lists with A's ids gets B's own (empty) answer; anything naming one object is 404.
    return 200 if action.startswith("status-list") else 404


def send(client: FlaskClient, call: Call, headers: dict[str, str]) -> Any:
    if call.body is None:
        return client.open(call.path, method=call.method, headers=headers)
    return client.open(call.path, method=call.method, headers=headers, data=json.dumps(call.body),
                       content_type="application/json")


def masked(response: Any, t: Tenants, targets: Targets) -> Any:
    """The answer with what legitimately differs removed: the ids the caller itself sent (echoed
    in `details`), timestamps and request ids."""
    text = response.get_data(as_text=True)
    for value in (targets.box, targets.running, targets.stopped):
        text = text.replace(value, "<id>")
    if not text:
        return None
    body = json.loads(text)
    if isinstance(body, dict):
        body.pop("as_of", None)
    return body


# --- the matrix ------------------------------------------------------------------------------------------

# Toolbox A's own token reporting on A's own instances is the legitimate case, not a cell.
MATRIX = [(caller, action) for caller in CALLERS for action in ACTIONS
          if (caller, action) != ("toolbox-token-a", "heartbeat-naming-a")]


@pytest.mark.parametrize(("caller", "action"), MATRIX)
def test_nobody_gets_at_another_tenants_objects(clients: dict[str, FlaskClient], tenants: Tenants,
                                                pg: psycopg.Connection, caller: str, action: str) -> None:
    t = tenants
    headers = CALLERS[caller](t)
    theirs, random = ACTIONS[action](t.theirs), ACTIONS[action](t.random)
    client = clients[theirs.function]
    accepted_own_heartbeat = theirs.function == HEARTBEAT and caller == "toolbox-token-b"

    before, before_a = snapshot(pg), a_digest(pg, t)
    answer = send(client, theirs, headers)
    after, after_a = snapshot(pg), a_digest(pg, t)
    control = send(client, random, headers)

    want = expected_status(caller, action)
    assert answer.status_code == want, (answer.status_code, answer.get_data(as_text=True)[:300])
    if want >= 400:
        error = answer.json["error"]
        assert set(error) == {"code", "message", "details"}
        assert error["code"] == {401: "unauthenticated", 404: "not_found"}[want]
        if want == 401:
            assert answer.headers["WWW-Authenticate"] == "Bearer"
    # Nothing changed: A's objects never; and nothing at all unless B's toolbox reported about itself.
    assert after_a == before_a
    if not accepted_own_heartbeat:
        assert after == before, "a refused call changed the database"
    assert t.dtma_calls() == [], "a refused call reached a DTMA"
    # Indistinguishable from an id that exists nowhere.
    assert control.status_code == answer.status_code
    assert masked(control, t, t.random) == masked(answer, t, t.theirs)
    if action == "sweep":
        # A credential on the sweep is not read at all: the same answer as with none.
        assert answer.json == clients[SWEEP].post("/").json
    if answer.status_code == 200 and theirs.function == STATUS:
        listed = {s["id"] for s in answer.json.get("servers", [])}
        assert not listed & {t.theirs.running, t.theirs.stopped}
        assert answer.json.get("refresh", {}) == {}


def test_a_toolboxs_heartbeat_cannot_touch_another_toolboxs_instances(clients: dict[str, FlaskClient],
                                                                       tenants: Tenants, pg: psycopg.Connection,
                                                                       factory: Factory) -> None:
    """Toolbox B reports A's instances (by id) and containers named like A's: A is untouched, and
    the rejected items are counted on B's own row (W1 of the original)."""
    t = tenants
    response = send(clients[HEARTBEAT], ACTIONS["heartbeat-naming-a"](t.theirs), bearer(t.box_b.token))
    assert response.status_code == 204
    assert factory.status_of(t.theirs.running) == "running" and factory.status_of(t.theirs.stopped) == "stopped"
    assert factory.events(t.theirs.running) == [] and factory.events(t.theirs.stopped) == []
    rejected = pg.execute("select dtma_report_details_json->>'rejected_items' from account_tool_environments "
                          "where id = %s", (t.box_b.id,)).fetchone()[0]
    assert rejected == "2"


def test_the_owner_still_gets_in(clients: dict[str, FlaskClient], tenants: Tenants) -> None:
    """The matrix is only meaningful if the same calls work for A: the clients are not simply
    refusing everyone (issuer, audience and JWKS configuration are right)."""
    t = tenants
    for headers in (bearer(mint_hs256(JWT_SECRET, sub=t.a, iss=ISSUER)), bearer(KEY.mint(sub=t.a, iss=ISSUER))):
        one = send(clients[STATUS], ACTIONS["status-one"](t.theirs), headers)
        assert one.status_code == 200 and one.json["server"]["id"] == t.theirs.running
        listed = send(clients[STATUS], ACTIONS["status-list-toolbox"](t.theirs), headers)
        assert {s["id"] for s in listed.json["servers"]} == {t.theirs.running, t.theirs.stopped}
    stop = send(clients[MANAGE], ACTIONS["stop-path"](t.theirs), bearer(mint_hs256(JWT_SECRET, sub=t.a, iss=ISSUER)))
    # A's stand-in never deployed "a-running", so its DTMA answers 404: the point is that the
    # call got through to A's own DTMA, and only to it.
    assert stop.status_code in (200, 409, 502), stop.json
    assert [(r.method, r.path) for r in t.agents[0].requests][:1] == [("POST", "/tools/a-running/stop")]
    assert t.agents[1].requests == []
