"""The SQL operations behind deploy and manage, allowed and refused, called directly."""

from __future__ import annotations

import itertools
import uuid

import psycopg
import pytest

from shared.adapters.db.postgres import PostgresDatabase
from shared.core import lifecycle
from shared.core.errors import DomainError
from tests.factories import Factory

POLICY = {"port_low": 49152, "port_high": 49155, "dtma_port": 30000, "allow_internal": True}


def record_deploy(db: PostgresDatabase, **params: object) -> dict[str, object]:
    """The deploy RPC (cp_record_deploy_command: the instance and its command, one transaction)."""
    return db.call("cp_record_deploy_command", **params, p_command_id=str(uuid.uuid4()), p_secret_env=None)


def spec(**overrides: object) -> dict[str, object]:
    return {"name": "srv", "image": None, "catalog_id": None, "transport": "streamable_http", "container_port": 8080,
            "host_port": None, "endpoint_path": "/mcp", "env_names": ["A"], "capabilities": ["tools"], **overrides}


@pytest.mark.parametrize(("action", "status"), list(itertools.product(
    sorted(lifecycle.ACTIONS), [s.value for s in lifecycle.Status])))
def test_begin_action_follows_the_action_table(action: str, status: str, factory: Factory,
                                               postgres_db: PostgresDatabase) -> None:
    box = factory.toolbox()
    instance = factory.instance(box, status=status)
    plan = lifecycle.ACTIONS[action].plan
    # As manage does: the action's own name ("delete" is an alias of remove).
    args = {"p_user_id": box.user_id, "p_instance_id": instance, "p_action": lifecycle.ACTIONS[action].name,
            "p_plan": {k.value: v.value for k, v in plan.items()}, "p_message": f"{action} requested",
            "p_allow_internal": True, "p_command_id": str(uuid.uuid4())}
    if status in {s.value for s in plan}:
        begun = postgres_db.call("cp_begin_action_command", **args)
        assert begun["instance"]["status_on_toolbox"] == plan[lifecycle.Status(status)].value
        assert begun["toolbox"]["id"] == box.id and begun["toolbox"]["public_ip_address"] == "127.0.0.1"
    else:
        with pytest.raises(DomainError) as caught:
            postgres_db.call("cp_begin_action_command", **args)
        assert caught.value.status == 409
        assert caught.value.message.endswith(f"while it is {status}")
        assert factory.status_of(instance) == status and factory.events(instance) == []


def test_begin_action_refuses_internal_addresses_unless_allowed(factory: Factory,
                                                                postgres_db: PostgresDatabase) -> None:
    box = factory.toolbox(ip="10.0.0.7")
    instance = factory.instance(box, status="running")
    with pytest.raises(DomainError, match=r"non-public address 10\.0\.0\.7"):
        postgres_db.call("cp_begin_action_command", p_user_id=box.user_id, p_instance_id=instance,
                         p_action="stop", p_plan={"running": "stopping"}, p_message="stop", p_allow_internal=False,
                         p_command_id=str(uuid.uuid4()))
    assert factory.status_of(instance) == "running"


def test_settle_applies_records_or_defers_to_a_newer_report(factory: Factory, postgres_db: PostgresDatabase) -> None:
    box = factory.toolbox()
    instance = factory.instance(box, status="deploying")
    # No answer in time: the status stays, the event says why.
    row = postgres_db.call("cp_settle", p_instance_id=instance, p_expected="deploying", p_to=None,
                           p_message="no answer within 1.5 s")
    assert row["status_on_toolbox"] == "deploying"
    assert factory.events(instance)[-1] == ("deploying", "deploying", "api", "no answer within 1.5 s")
    # A heartbeat got there first: the DTMA's late answer is history, not a transition.
    factory.conn.execute("update account_tool_instances set status_on_toolbox = 'running' where id = %s", (instance,))
    row = postgres_db.call("cp_settle", p_instance_id=instance, p_expected="deploying", p_to="error",
                           p_message="late failure")
    assert row["status_on_toolbox"] == "running"
    assert factory.events(instance)[-1] == ("running", "running", "api", "late failure")
    # A transition the state machine forbids is refused.
    with pytest.raises(DomainError) as caught:
        postgres_db.call("cp_settle", p_instance_id=instance, p_expected="running", p_to="deploying", p_message="x")
    assert caught.value.status == 409


def test_settle_records_what_the_agent_reported(factory: Factory, postgres_db: PostgresDatabase,
                                                pg: psycopg.Connection) -> None:
    instance = factory.instance(factory.toolbox(), status="deploying")
    postgres_db.call("cp_settle", p_instance_id=instance, p_expected="deploying", p_to="running",
                     p_message="running", p_container_id="abc123", p_runtime={"state": "running"})
    row = pg.execute("select container_id, runtime_details from account_tool_instances where id=%s",
                     (instance,)).fetchone()
    assert row == ("abc123", {"state": "running"})


def test_finish_removal_only_from_deleting(factory: Factory, postgres_db: PostgresDatabase) -> None:
    box = factory.toolbox()
    running = factory.instance(box, status="running")
    with pytest.raises(DomainError, match="is running, not deleting"):
        postgres_db.call("cp_finish_removal", p_instance_id=running, p_message="gone")
    deleting = factory.instance(box, status="deleting")
    assert postgres_db.call("cp_finish_removal", p_instance_id=deleting, p_message="gone")["removed"] is True
    assert factory.status_of(deleting) is None
    assert factory.events(deleting)[-1] == ("deleting", None, "api", "gone")


def test_record_deploy_allocates_ports_and_refuses_collisions(factory: Factory, postgres_db: PostgresDatabase) -> None:
    box = factory.toolbox()
    ports = []
    for n in range(4):
        recorded = record_deploy(postgres_db, p_user_id=box.user_id, p_toolbox_id=box.id,
                                 p_spec=spec(name=f"s{n}"), p_policy=POLICY)
        ports.append(recorded["instance"]["host_port"])
        assert recorded["instance"]["status_on_toolbox"] == "deploying"
        assert recorded["instance"]["docker_image_url"] == "mcp/everything:latest"
    assert ports == [49152, 49153, 49154, 49155]
    for request, refusal in ((spec(name="s9"), "no free host port left"),
                             (spec(name="s8", host_port=49152), "host port 49152 is already used"),
                             (spec(name="s0"), "already exists"),
                             (spec(name="s7", host_port=30000), "agent's own port")):
        with pytest.raises(DomainError, match=refusal):
            record_deploy(postgres_db, p_user_id=box.user_id, p_toolbox_id=box.id, p_spec=request,
                          p_policy=POLICY)


def test_record_deploy_refuses_unknown_catalog_and_foreign_toolboxes(factory: Factory,
                                                                     postgres_db: PostgresDatabase) -> None:
    box = factory.toolbox()
    with pytest.raises(DomainError, match="catalog entry not found"):
        record_deploy(postgres_db, p_user_id=box.user_id, p_toolbox_id=box.id,
                      p_spec=spec(catalog_id="00000000-0000-4000-8000-0000000000cc"), p_policy=POLICY)
    with pytest.raises(DomainError) as caught:
        record_deploy(postgres_db, p_user_id=factory.user(), p_toolbox_id=box.id, p_spec=spec(), p_policy=POLICY)
    assert caught.value.status == 404 and caught.value.message == "toolbox not found"


def test_idempotency_claim_replay_conflict_and_expiry(factory: Factory, postgres_db: PostgresDatabase,
                                                      pg: psycopg.Connection) -> None:
    user = factory.user()

    def claim(digest: str = "d1") -> dict[str, object]:
        return postgres_db.call("cp_idempotency_claim", p_user_id=user, p_scope="deploy", p_key="k",
                                p_request_digest=digest, p_ttl_seconds=60)

    assert claim() == {"claimed": True}
    assert claim() == {"in_flight": True}
    postgres_db.call("cp_idempotency_complete", p_user_id=user, p_scope="deploy", p_key="k", p_status=201,
                     p_response={"id": "x"})
    assert claim() == {"replay": True, "status": 201, "response": {"id": "x"}}
    with pytest.raises(DomainError) as caught:
        claim("d2")
    assert caught.value.status == 422
    pg.execute("update idempotency_keys set created_at = now() - interval '2 minutes'")
    assert claim("d2") == {"claimed": True}
    postgres_db.call("cp_idempotency_complete", p_user_id=user, p_scope="deploy", p_key="k", p_status=None,
                     p_response=None)
    assert claim("d3") == {"claimed": True}
