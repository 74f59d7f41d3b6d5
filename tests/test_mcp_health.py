"""Running means answering: a server is `healthy` only while its MCP endpoint answers the MCP handshake.

Unit level (no database): what a check means for a server's health, `mcp` block and tools, and what
of a server's answer is kept. Database level: cp_record_mcp_probes (events only when readiness flips,
answers for gone or stopped servers ignored), cp_mcp_probe_batch (bounded, never-checked and
longest-unchecked first, claimed), and RLS (an owner reads their checks and cannot forge one). Through
the functions with the probe adapter replaced where no real server is needed (the worker after a
start, a refresh, a sweep), and end to end against the DTMA stand-in's real MCP servers.
"""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

# The mcp SDK's client imported here, before any thread does: the package cannot be imported for the
# first time by two threads at once along different paths (the probe's mcp.client.sse in the worker's
# thread and the DTMA stand-in's mcp.server in its server thread, in one process, end in a
# circular-import ImportError or a _DeadlockError). Production imports only the client side.
import mcp.client.sse
import mcp.client.streamable_http  # noqa: F401
import psycopg
import pytest
from flask.testing import FlaskClient
from psycopg.types.json import Jsonb

from devstack.openapi import check_response, validate
from shared.adapters import mcp_probe
from shared.adapters.mcp_probe import ProbeResult, ProbeTarget
from shared.core.config import Settings
from shared.usecases import mcp_health
from shared.usecases.view import server_json
from shared.usecases.view_models import MAX_TOOL_DESCRIPTION, MAX_TOOL_NAME, ServerView
from tests.factories import Factory, Toolbox
from tests.helpers import auth, settle, spec
from tests.test_rls import as_role

ROOT = Path(__file__).resolve().parents[1]
SPEC = json.loads((ROOT / "docs" / "openapi.json").read_text())
AT = "2025-06-01T12:00:00.123456+00:00"
LATER = "2025-06-01T12:05:00.123456+00:00"
DEPLOY, MANAGE, STATUS, SWEEP = "deploy_mcp_server", "manage_mcp_server", "mcp_status", "mcp_status_sweep"
TOOLS = [{"name": "search", "description": "Search things.", "input_schema": {"type": "object"}},
         {"name": "fetch", "description": None, "input_schema": {"type": "object", "properties": {}}}]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answer(target: ProbeTarget, *, ok: bool = True, kind: str | None = None, error: str | None = None,
           tools: list[dict[str, Any]] | None = None, **fields: Any) -> ProbeResult:
    """What the adapter answers for `target`."""
    return ProbeResult(
        instance_id=target.instance_id, ok=ok, checked_at="2025-06-01T12:00:00.000Z",
        endpoint=f"http://{target.host}:{target.port}{target.path}", duration_ms=12.5,
        error=None if ok else (error or f"nothing listens on http://{target.host}:{target.port}{target.path}"),
        error_kind=None if ok else (kind or "refused"), protocol_version="2025-06-18" if ok else None,
        server_name="github-mcp" if ok else None, server_version="1.2.0" if ok else None,
        capabilities={"tools": {}} if ok else {}, tools=(TOOLS if tools is None else tools) if ok else [],
        resources_count=None, prompts_count=None, **fields)


class FakeProber:
    """Stands in for mcp_probe.probe_many: answers by instance id, remembers what it was asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[ProbeTarget], dict[str, Any]]] = []
        self.script: dict[str, list[Callable[[ProbeTarget], ProbeResult]]] = {}
        self.default: Callable[[ProbeTarget], ProbeResult] = answer
        self.fail_with: Exception | None = None

    def then(self, instance_id: str, *answers: Callable[[ProbeTarget], ProbeResult]) -> None:
        self.script.setdefault(instance_id, []).extend(answers)

    def __call__(self, targets: list[ProbeTarget], **kwargs: Any) -> list[ProbeResult]:
        self.calls.append((list(targets), kwargs))
        if self.fail_with is not None:
            raise self.fail_with
        out = []
        for target in targets:
            queue = self.script.get(target.instance_id)
            out.append((queue.pop(0) if queue else self.default)(target))
        return out

    @property
    def asked(self) -> list[str]:
        return [t.instance_id for targets, _ in self.calls for t in targets]


@pytest.fixture
def prober(monkeypatch: pytest.MonkeyPatch) -> FakeProber:
    fake = FakeProber()
    monkeypatch.setattr(mcp_probe, "probe_many", fake)
    return fake


def refused(target: ProbeTarget) -> ProbeResult:
    return answer(target, ok=False, kind="refused")


# --- unit: what a check means -------------------------------------------------------------------------

def row(stored: str = "running", *, probe: dict[str, Any] | None = None, one: bool = True,
        **fields: Any) -> dict[str, Any]:
    """One item of cp_list_mcp_servers (jsonb), with `mcp_probe` and, for one server, `tools`."""
    box = {"id": str(uuid.uuid4()), "name": "droplet-1", "region_slug": "nyc3", "status": "active",
           "public_ip_address": "157.230.1.2", "dtma_port": 30000, "dtma_key_version": 1, "last_heartbeat_at": AT,
           "heartbeat_age_seconds": 12.5, "provisioning_error_message": None, "dtma_last_reached_at": None,
           "reached_age_seconds": None, "docker_error": None, **fields.pop("toolbox", {})}
    item = {"id": str(uuid.uuid4()), "name": "github", "status": stored, "status_changed_at": AT,
            "status_age_seconds": 300.0, "error_message": None, "image": "mcp/github:latest", "host_port": 40000,
            "container_port": 8080, "container_id": "c0ffee", "endpoint_path": "/mcp", "transport": "streamable_http",
            "capabilities": ["tools"], "discovery_metadata": None, "runtime": None, "last_report_at": AT,
            "agent_unmanaged_at": None, "created_at": AT, "updated_at": AT, "toolbox": box, "events": [],
            "port_mapping": {"publish": "public", "host_ip": None}, "mcp_probe": probe, **fields}
    if one:
        item["tools"] = TOOLS if probe and probe.get("ready") else []
    return item


def probe(ready: bool = True, *, current: bool = True, sentence: str | None = None) -> dict[str, Any]:
    return {"ready": ready, "checked_at": LATER, "current": current, "tool_count": 2 if ready else None,
            "result": {"endpoint": "http://157.230.1.2:40000/mcp", "sentence": None if ready else (
                sentence or "nothing listens on http://157.230.1.2:40000/mcp (connection refused)"),
                       "error_kind": None if ready else "refused", "protocol_version": "2025-06-18" if ready else None,
                       "server_name": "github-mcp" if ready else None, "server_version": "1.2.0" if ready else None}}


def shown(item: dict[str, Any], settings: Settings | None = None) -> dict[str, Any]:
    server = dict(server_json(item, settings or Settings()))
    assert list(server) == list(ServerView.__annotations__)
    validate(server, "#/components/schemas/Server", SPEC)
    if item.get("tools") is not None:
        check_response(SPEC, "/mcp_status/{id}", "GET", 200, {"server": server, "as_of": AT})
    else:
        check_response(SPEC, "/mcp_status", "GET", 200, {"servers": [server], "next_cursor": None, "as_of": AT})
    return server


def test_a_running_server_that_answers_is_healthy_with_its_tools() -> None:
    server = shown(row(probe=probe()))
    assert (server["effective_status"], server["health"], server["error"]) == ("running", "healthy", None)
    assert server["mcp"] == {"ready": True, "checked_at": LATER, "endpoint": "http://157.230.1.2:40000/mcp",
                             "protocol_version": "2025-06-18", "server": {"name": "github-mcp", "version": "1.2.0"},
                             "tool_count": 2, "error": None}
    assert [t["name"] for t in server["tools"]] == ["search", "fetch"]


def test_a_running_container_whose_endpoint_does_not_answer_is_degraded_with_the_sentence() -> None:
    server = shown(row(probe=probe(False)))
    assert (server["effective_status"], server["health"]) == ("running", "degraded")
    assert server["mcp"]["ready"] is False and server["mcp"]["tool_count"] is None
    assert server["mcp"]["error"] == "nothing listens on http://157.230.1.2:40000/mcp (connection refused)"
    assert server["error"] == ("the MCP endpoint does not answer: nothing listens on http://157.230.1.2:40000/mcp "
                               "(connection refused).")
    assert server["tools"] == []


@pytest.mark.parametrize("check", [None, probe(True, current=False), probe(False, current=False)],
                         ids=["never checked", "answered before it restarted", "failed before it restarted"])
def test_a_running_server_not_checked_in_this_run_reads_unknown(check: dict[str, Any] | None) -> None:
    server = shown(row(probe=check))
    assert (server["effective_status"], server["health"]) == ("running", "unknown")
    assert server["mcp"]["ready"] is None and server["mcp"]["checked_at"] is None
    assert server["mcp"]["error"].startswith("MCP endpoint not checked yet since github started")
    assert server["error"] == server["mcp"]["error"] + "."
    assert server["tools"] == []


@pytest.mark.parametrize(("fields", "says"), [
    ({"transport": "stdio"}, "speaks MCP over stdio"),
    ({"port_mapping": {"publish": "loopback", "host_ip": "127.0.0.1"}}, "published on 127.0.0.1 (loopback)"),
    ({"port_mapping": {"publish": "private", "host_ip": "10.0.0.5"}}, "10.0.0.5 (a private address)"),
    ({"toolbox": {"public_ip_address": "10.1.2.3"}}, "10.1.2.3 is a loopback, private or link-local one"),
], ids=["stdio", "loopback", "private", "private toolbox address"])
def test_servers_the_backend_cannot_reach_keep_dockers_health_and_say_why(fields: dict[str, Any], says: str) -> None:
    server = shown(row(**fields))
    assert (server["effective_status"], server["health"], server["error"]) == ("running", "healthy", None)
    assert server["mcp"]["ready"] is None and says in server["mcp"]["error"]
    assert "health comes from Docker's state of the container alone" in server["mcp"]["error"]


def test_a_loopback_server_is_not_a_public_one_whatever_an_old_check_said() -> None:
    item = row(probe=probe(False), port_mapping={"publish": "loopback", "host_ip": "127.0.0.1"})
    assert shown(item)["health"] == "healthy"


def test_late_heartbeats_stay_degraded_whatever_the_check() -> None:
    for check in (probe(), None):
        server = shown(row(probe=check, toolbox={"heartbeat_age_seconds": 170}))
        assert server["health"] == "degraded"


@pytest.mark.parametrize(("stored", "box", "health"), [
    ("stopped", {}, "unknown"),
    ("error", {}, "unhealthy"),
    ("running", {"status": "unresponsive"}, "unknown"),
    ("running", {"docker_error": "Cannot connect to the Docker daemon"}, "unhealthy"),
])
def test_a_server_that_is_not_running_is_not_checked(stored: str, box: dict[str, Any], health: str) -> None:
    server = shown(row(stored, probe=probe(), toolbox=box, error_message="it exited" if stored == "error" else None))
    assert server["health"] == health
    assert server["mcp"]["ready"] is None and server["mcp"]["error"].startswith("not checked while github is")
    assert server["tools"] == []


def test_lists_carry_the_mcp_block_but_not_the_tools() -> None:
    server = shown(row(probe=probe(), one=False))
    assert server["mcp"]["tool_count"] == 2 and server["tools"] is None


# --- unit: what of a server's answer is kept ----------------------------------------------------------

TARGET = mcp_health.Target(str(uuid.uuid4()), "github", "157.230.1.2", 40000, "/mcp", "streamable_http")


def as_probe_target(target: mcp_health.Target) -> ProbeTarget:
    return ProbeTarget(target.instance_id, target.host, target.port, target.path, target.transport)


def test_a_hostile_answer_is_cleaned_and_bounded() -> None:
    nasty = "evil\x00name\ud800<script>alert(1)</script>"
    tools = [{"name": nasty + "x" * 500, "description": "d" * 5000 + "\x00", "input_schema": {
        "type": "object", "default": float("nan"), "k\x00": "v\udfff", "deep": json.loads("[" * 60 + "]" * 60)}},
        {"name": None, "description": "nameless"}, "not a tool"]
    tools += [{"name": f"t{n}", "description": "y" * 1000, "input_schema": {"type": "object"}} for n in range(300)]
    result = replace(answer(as_probe_target(TARGET), tools=tools), server_name=nasty * 100,
                     protocol_version="v" * 1000, capabilities={"x": "y" * 10_000})
    made = mcp_health.entry(result, TARGET, Settings(), 5.0)
    assert made is not None
    text = json.dumps(made, ensure_ascii=False, allow_nan=False)  # what jsonb can hold: no NaN ...
    assert "\x00" not in text and "\\u0000" not in text
    text.encode("utf-8")  # ... and no lone surrogate
    first = made["tools"][0]
    assert len(first["name"]) <= MAX_TOOL_NAME and len(first["description"]) <= MAX_TOOL_DESCRIPTION
    assert first["input_schema"]["default"] is None
    assert made["tool_count"] == len(tools)  # the real count ...
    assert len(json.dumps(made["tools"]).encode()) <= mcp_health.MAX_TOOLS_BYTES  # ... the tools kept, bounded
    assert all(isinstance(t["name"], str) and t["name"] for t in made["tools"])
    assert len(made["result"]["server_name"]) <= 200 and len(made["result"]["protocol_version"]) <= 200
    assert made["result"]["capabilities"] == {}  # over 4 KiB: not kept
    assert made["message"].startswith(f"MCP endpoint answers: {len(tools)} tools (")


def test_a_failed_check_keeps_the_adapters_sentence_and_no_tools() -> None:
    result = answer(as_probe_target(TARGET), ok=False, kind="wrong_transport",
                    error="http://157.230.1.2:40000/mcp answered 405 to an MCP POST: wrong transport or path")
    made = mcp_health.entry(result, TARGET, Settings(), 5.0)
    assert made is not None and made["ok"] is False and made["tools"] == [] and made["tool_count"] is None
    assert made["message"] == made["result"]["sentence"] == result.error
    assert made["result"]["error_kind"] == "wrong_transport"


@pytest.mark.parametrize("kind", ["address_refused", "stdio"])
def test_a_verdict_about_the_backend_not_the_server_is_not_recorded(kind: str) -> None:
    assert mcp_health.entry(answer(as_probe_target(TARGET), ok=False, kind=kind), TARGET, Settings(), 5.0) is None


def test_the_sweeps_batch_fits_its_time_budget() -> None:
    size = mcp_health.sweep_batch_size
    assert size(Settings()) == 200  # 32 at once x 7 rounds of 5 s fit 35 s
    assert size(Settings(MCP_SWEEP_PROBE_BUDGET_SECONDS=10)) == 64
    assert size(Settings(MCP_SWEEP_PROBE_BUDGET_SECONDS=1)) == 32  # at least one round
    assert size(Settings(MCP_SWEEP_PROBE_BATCH=0)) == 0


# --- database: recording, events, the sweep's batch ---------------------------------------------------

def record(pg: psycopg.Connection, *items: dict[str, Any], source: str = "api") -> dict[str, int]:
    return pg.execute("select public.cp_record_mcp_probes(%s, %s)", (Jsonb(list(items)), source)).fetchone()[0]


def check(instance: str, ok: bool = True, tools: int = 2, message: str | None = None) -> dict[str, Any]:
    return {"instance_id": instance, "ok": ok, "tool_count": tools if ok else None,
            "tools": TOOLS[:tools] if ok else [],
            "result": {"endpoint": "http://x", "sentence": None if ok else message},
            "message": (f"MCP endpoint answers: {tools} tools" if ok else message)}


def mcp_events(factory: Factory, instance: str) -> list[tuple[str | None, str | None, str, str]]:
    return [e for e in factory.events(instance) if "MCP endpoint" in e[3]]


def stored_probe(pg: psycopg.Connection, instance: str) -> tuple[Any, ...] | None:
    return pg.execute("select ready, tool_count, jsonb_array_length(tools), checked_at is not null, claimed_at "
                      "from mcp_endpoint_probes where account_tool_instance_id = %s", (instance,)).fetchone()


def test_one_event_when_readiness_flips_and_none_per_check(factory: Factory, pg: psycopg.Connection) -> None:
    box = factory.toolbox()
    inst = factory.instance(box, status="running")
    assert record(pg, check(inst, ok=False, message="nothing listens")) == {"recorded": 1, "ignored": 0,
                                                                            "events": 0}
    assert mcp_events(factory, inst) == []  # a first failure is the server's `error`, not an event
    record(pg, check(inst, tools=12))
    record(pg, check(inst, tools=12), source="sweep")
    record(pg, check(inst, ok=False, message="it hangs"), source="sweep")
    record(pg, check(inst, ok=False, message="it still hangs"), source="sweep")
    record(pg, check(inst, tools=3), source="sweep")
    assert mcp_events(factory, inst) == [
        ("running", "running", "api", "MCP endpoint answers: 12 tools"),
        ("running", "running", "sweep", "MCP endpoint stopped answering: it hangs"),
        ("running", "running", "sweep", "MCP endpoint answers: 3 tools")]
    assert stored_probe(pg, inst)[:4] == (True, 3, 2, True)


def test_a_new_run_is_not_checked_until_its_own_check(factory: Factory, pg: psycopg.Connection) -> None:
    box = factory.toolbox()
    inst = factory.instance(box, status="running")
    record(pg, check(inst))
    pg.execute("update account_tool_instances set status_changed_at = clock_timestamp() where id = %s", (inst,))
    record(pg, check(inst))  # the first answer of the new run: an event again
    assert [e[3] for e in mcp_events(factory, inst)] == ["MCP endpoint answers: 2 tools"] * 2


def test_answers_for_gone_stopped_or_other_rows_are_ignored(factory: Factory, pg: psycopg.Connection) -> None:
    box = factory.toolbox()
    stopped = factory.instance(box, status="stopped")
    plain = factory.instance(box, status="running", mcp=False)
    counts = record(pg, check(stopped), check(plain), check(str(uuid.uuid4())),
                    {"instance_id": "not-a-uuid", "ok": True}, "not an object")
    assert counts == {"recorded": 0, "ignored": 3, "events": 0}
    assert stored_probe(pg, stopped) is None and factory.events(stopped) == []


@pytest.mark.parametrize(("results", "source"), [({"a": 1}, "api"), ([], "user"), ([], None)])
def test_the_record_refuses_what_is_not_a_list_or_a_source(pg: psycopg.Connection, results: Any,
                                                           source: str | None) -> None:
    with pytest.raises(psycopg.Error) as raised:
        pg.execute("select public.cp_record_mcp_probes(%s, %s)", (Jsonb(results), source))
    assert raised.value.sqlstate == "MC400"


def batch(pg: psycopg.Connection, limit: int, **kwargs: int) -> list[str]:
    params = {"stale": 210, "age": 30, "lease": 120, **kwargs}
    got = pg.execute("select public.cp_mcp_probe_batch(%s, %s, %s, %s, true)",
                     (limit, params["stale"], params["age"], params["lease"])).fetchone()[0]
    return [t["instance_id"] for t in got["targets"]]


def checked_ago(pg: psycopg.Connection, instance: str, seconds: int, ready: bool = True) -> None:
    pg.execute("""insert into mcp_endpoint_probes (account_tool_instance_id, ready, checked_at)
                  values (%s, %s, now() - make_interval(secs => %s))
                  on conflict (account_tool_instance_id) do update set ready = excluded.ready,
                     checked_at = excluded.checked_at, claimed_at = null""", (instance, ready, seconds))


def test_the_sweeps_batch_is_bounded_and_stalest_first(factory: Factory, pg: psycopg.Connection) -> None:
    box = factory.toolbox()
    fresh, old, older, never = (factory.instance(box, status="running") for _ in range(4))
    checked_ago(pg, fresh, 5)  # within the minimum age: not in any batch
    checked_ago(pg, old, 100)
    checked_ago(pg, older, 500, ready=False)
    assert batch(pg, 2) == [never, older]
    assert batch(pg, 10) == [old]  # the first two are claimed: an overlapping sweep takes the others
    assert batch(pg, 10) == []  # claims younger than the lease stay
    pg.execute("update mcp_endpoint_probes set claimed_at = now() - interval '1 hour'")
    assert batch(pg, 10) == [never, older, old]  # a sweep that died: its claims expire
    assert stored_probe(pg, never)[0] is None  # a claim is not a check
    record(pg, check(never))
    pg.execute("update mcp_endpoint_probes set claimed_at = now() - interval '1 hour', "
               "checked_at = checked_at - interval '1 minute'")
    assert batch(pg, 1) == [older]  # recorded: no longer never-checked


def test_the_batch_takes_only_servers_the_backend_can_check(factory: Factory, pg: psycopg.Connection) -> None:
    live, silent, no_ip = factory.toolbox(), factory.toolbox(heartbeat_age_seconds=600), factory.toolbox(ip=None)
    good = factory.instance(live, status="running", host_port=40001, mcp_endpoint_path="/api/mcp")
    left_out = [factory.instance(live, status="stopped"), factory.instance(live, status="deploying"),
                factory.instance(live, status="running", mcp_transport_type="stdio"),
                factory.instance(live, status="running", port_mapping_json={"publish": "loopback",
                                                                            "host_ip": "127.0.0.1"}),
                factory.instance(silent, status="running"), factory.instance(no_ip, status="running"),
                factory.instance(live, status="running", mcp=False)]
    docker_down = factory.toolbox()
    pg.execute("update account_tool_environments set dtma_report_details_json = "
               "'{\"docker\": {\"healthy\": false}}' where id = %s", (docker_down.id,))
    left_out.append(factory.instance(docker_down, status="running"))
    got = pg.execute("select public.cp_mcp_probe_batch(100, 210, 30, 120, true)").fetchone()[0]["targets"]
    assert [(t["instance_id"], t["host"], t["port"], t["path"], t["transport"]) for t in got] == [
        (good, "127.0.0.1", 40001, "/api/mcp", "streamable_http")]
    assert not set(left_out) & {t["instance_id"] for t in got}
    pg.execute("update mcp_endpoint_probes set claimed_at = null")
    # 127.0.0.1 is an address the backend keeps away from unless ALLOW_PRIVATE_TOOLBOX_IPS.
    assert pg.execute("select public.cp_mcp_probe_batch(100, 210, 30, 120)").fetchone()[0]["targets"] == []


# --- database: nobody but the service role writes a check -----------------------------------------------

@pytest.fixture
def two_checked(factory: Factory, pg: psycopg.Connection) -> dict[str, str]:
    a, b = factory.user(), factory.user()
    inst_a, inst_b = factory.instance(factory.toolbox(a)), factory.instance(factory.toolbox(b))
    record(pg, check(inst_a, ok=False, message="down"), check(inst_b, ok=False, message="down"))
    return {"a": a, "b": b, "inst_a": inst_a, "inst_b": inst_b}


def test_an_owner_reads_their_checks_only(pg: psycopg.Connection, two_checked: dict[str, str]) -> None:
    with as_role(pg, "authenticated", two_checked["a"]) as conn:
        rows = conn.execute("select account_tool_instance_id, ready from mcp_endpoint_probes").fetchall()
        assert [(str(r[0]), r[1]) for r in rows] == [(two_checked["inst_a"], False)]
    with as_role(pg, "anon") as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("select count(*) from mcp_endpoint_probes")


@pytest.mark.parametrize("statement", [
    "update mcp_endpoint_probes set ready = true, checked_at = now() + interval '1 day' "
    "where account_tool_instance_id = %(inst)s",
    "delete from mcp_endpoint_probes where account_tool_instance_id = %(inst)s",
    "insert into mcp_endpoint_probes (account_tool_instance_id, ready, checked_at) values (%(other)s, true, now())",
    "select public.cp_record_mcp_probes(jsonb_build_array(jsonb_build_object('instance_id', %(inst)s::text, "
    "'ok', true)), 'api')",
])
def test_an_owner_cannot_forge_health_through_postgrest(pg: psycopg.Connection, two_checked: dict[str, str],
                                                       statement: str) -> None:
    other = pg.execute("insert into account_tool_instances (account_tool_environment_id, tool_catalog_id, "
                       "instance_name_on_toolbox, status_on_toolbox, mcp_server_type, mcp_transport_type) "
                       "select account_tool_environment_id, tool_catalog_id, 'second', 'running', 'mcp_server', "
                       "'streamable_http' from account_tool_instances where id = %s returning id",
                       (two_checked["inst_a"],)).fetchone()[0]
    with as_role(pg, "authenticated", two_checked["a"]) as conn, \
            pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(statement, {"inst": two_checked["inst_a"], "other": other})
    assert stored_probe(pg, two_checked["inst_a"])[0] is False


def test_annotating_discovery_metadata_does_not_touch_health(pg: psycopg.Connection, two_checked: dict[str, str],
                                                            function_client: Any) -> None:
    with as_role(pg, "authenticated", two_checked["a"]) as conn:
        assert conn.execute("update account_tool_instances set mcp_discovery_metadata = "
                            "'{\"ready\": true, \"tools\": [\"forged\"]}' where id = %s",
                            (two_checked["inst_a"],)).rowcount == 1
    pg.execute("update account_tool_instances set mcp_discovery_metadata = '{\"ready\": true}' where id = %s",
               (two_checked["inst_a"],))  # as the owner would have, had the test's transaction not rolled back
    seen = function_client(STATUS).get(f"/{two_checked['inst_a']}", headers=auth(two_checked["a"])).json["server"]
    assert (seen["health"], seen["mcp"]["ready"], seen["tools"]) == ("degraded", False, [])


# --- through the functions, the prober replaced ------------------------------------------------------

def deploy(client: FlaskClient, box: Toolbox, **overrides: Any) -> str:
    response = client.post("/", json=spec(box, host_port=free_port(), **overrides), headers=auth(box.user_id))
    assert response.status_code in (201, 202), response.json
    settle()
    return response.json["id"]


def read(client: FlaskClient, user: str, server: str, **params: Any) -> dict[str, Any]:
    response = client.get(f"/{server}", query_string=params, headers=auth(user))
    assert response.status_code == 200, response.json
    return response.json["server"]


def test_a_deploy_is_checked_right_after_it_runs(function_client: Any, toolbox_agent: Any,
                                                 prober: FakeProber) -> None:
    box, _ = toolbox_agent()
    deployed = deploy(function_client(DEPLOY), box)
    ((target,), kwargs), = prober.calls
    assert (target.instance_id, target.host, target.path, target.transport) == (deployed, "127.0.0.1", "/mcp",
                                                                               "streamable_http")
    assert kwargs == {"timeout": 5.0, "max_bytes": 1_048_576, "allow_private": True, "concurrency": 1}
    seen = read(function_client(STATUS), box.user_id, deployed)
    assert (seen["health"], seen["mcp"]["ready"], seen["mcp"]["tool_count"]) == ("healthy", True, 2)
    assert seen["progress"][-1]["message"] == "MCP endpoint answers: 2 tools (github-mcp 1.2.0)"


def test_the_worker_waits_for_a_slow_listener(factory: Factory, postgres_db: Any, prober: FakeProber,
                                              pg: psycopg.Connection) -> None:
    box = factory.toolbox()
    inst = factory.instance(box, status="running", name="slow")
    instance = pg.execute("select to_jsonb(i) from account_tool_instances i where id = %s", (inst,)).fetchone()[0]
    toolbox = {"id": box.id, "public_ip_address": "127.0.0.1"}
    ports = SimpleNamespace(settings=Settings(MCP_PROBE_STARTUP_SECONDS=5, ALLOW_PRIVATE_TOOLBOX_IPS=True),
                            db=postgres_db)
    prober.then(inst, refused, refused, answer)  # nothing listens twice, then it answers
    mcp_health.after_start(ports, instance, toolbox)
    assert prober.asked == [inst] * 3 and stored_probe(pg, inst)[:2] == (True, 2)
    prober.then(inst, refused, answer)
    mcp_health.after_start(ports, instance, toolbox, wait=False)  # inline: once
    assert prober.asked == [inst] * 4 and stored_probe(pg, inst)[0] is False
    prober.default = lambda target: answer(target, ok=False, kind="not_mcp", error="404 text/html")
    mcp_health.after_start(ports, instance, toolbox)  # an answer that is not MCP is not "not listening yet"
    assert len(prober.asked) == 5


def test_a_server_that_does_not_listen_is_degraded_with_the_sentence(
        function_client: Any, toolbox_agent: Any, prober: FakeProber) -> None:
    box, _ = toolbox_agent()
    prober.default = refused
    deployed = deploy(function_client(DEPLOY), box)
    assert len(prober.calls) == 1
    seen = read(function_client(STATUS), box.user_id, deployed)
    assert (seen["status"], seen["health"], seen["mcp"]["ready"]) == ("running", "degraded", False)
    assert "nothing listens on" in seen["error"]


def test_a_failing_prober_never_fails_the_command(function_client: Any, toolbox_agent: Any,
                                                  prober: FakeProber, pg: psycopg.Connection) -> None:
    box, _ = toolbox_agent()
    prober.fail_with = RuntimeError("the prober broke")
    deployed = deploy(function_client(DEPLOY), box)
    outcome = pg.execute("select status, outcome->>'code' from dtma_commands where account_tool_instance_id = %s",
                         (deployed,)).fetchone()
    assert outcome == ("done", "created")
    seen = read(function_client(STATUS), box.user_id, deployed)
    assert (seen["status"], seen["health"]) == ("running", "unknown")


def test_stop_and_start_check_again_only_after_the_start(function_client: Any, toolbox_agent: Any,
                                                         prober: FakeProber, factory: Factory) -> None:
    box, _ = toolbox_agent()
    deployed = deploy(function_client(DEPLOY), box)
    manage = function_client(MANAGE, DTMA_DEPLOY_BUDGET_SECONDS="5")
    assert manage.post(f"/{deployed}/stop", headers=auth(box.user_id)).status_code == 200
    settle()
    assert len(prober.calls) == 1
    assert manage.post(f"/{deployed}/start", headers=auth(box.user_id)).status_code == 200
    settle()
    assert len(prober.calls) == 2
    assert [e[3] for e in mcp_events(factory, deployed)] == ["MCP endpoint answers: 2 tools (github-mcp 1.2.0)"] * 2


def test_refresh_checks_the_running_servers_it_reads_longest_unchecked_first(
        function_client: Any, toolbox_agent: Any, prober: FakeProber, factory: Factory,
        pg: psycopg.Connection) -> None:
    box, _ = toolbox_agent()
    client = function_client(STATUS, DTMA_STATUS_TIMEOUT_SECONDS="2")
    servers = [factory.instance(box, status="running", name=f"srv-{n}") for n in range(REFRESH_MAX + 3)]
    stdio = factory.instance(box, status="running", name="stdio-one", mcp_transport_type="stdio")
    stopped = factory.instance(box, status="stopped", name="stopped-one")
    pg.execute("update account_tool_instances set status_changed_at = now() - interval '1 hour'")
    never = servers[-3:]
    for age, server in enumerate(servers[:-3]):  # servers[0] was checked most recently
        checked_ago(pg, server, 60 + age)
    response = client.get("/", query_string={"refresh": "true"}, headers=auth(box.user_id))
    assert response.status_code == 200
    ((targets, kwargs),) = prober.calls
    assert len(targets) == REFRESH_MAX and kwargs["timeout"] == 2.0 and kwargs["concurrency"] == REFRESH_MAX
    assert set(prober.asked) == set(never) | set(servers[3:-3])  # the three checked last wait
    assert stdio not in prober.asked and stopped not in prober.asked
    seen = {s["id"]: s for s in response.json["servers"]}
    assert all(seen[s]["health"] == "healthy" and seen[s]["mcp"]["tool_count"] == 2 for s in prober.asked)
    assert seen[stdio]["health"] == "healthy" and seen[stdio]["mcp"]["ready"] is None


REFRESH_MAX = mcp_health.REFRESH_MAX_CHECKS


def test_a_refresh_checks_no_more_than_it_runs_at_once(function_client: Any, toolbox_agent: Any,
                                                       prober: FakeProber, factory: Factory) -> None:
    box, _ = toolbox_agent()
    for n in range(6):
        factory.instance(box, status="running", name=f"srv-{n}")
    client = function_client(STATUS, MCP_PROBE_CONCURRENCY="4", MCP_PROBE_TIMEOUT_SECONDS="1")
    assert client.get("/", query_string={"refresh": "true"}, headers=auth(box.user_id)).status_code == 200
    ((targets, kwargs),) = prober.calls
    assert len(targets) == kwargs["concurrency"] == 4 and kwargs["timeout"] == 1.0  # one round, in budget
    assert client.get("/", headers=auth(box.user_id)).status_code == 200 and len(prober.calls) == 1  # no refresh


def test_each_sweep_checks_a_bounded_batch_and_answers_as_before(
        function_client: Any, factory: Factory, prober: FakeProber, pg: psycopg.Connection) -> None:
    box = factory.toolbox()
    servers = [factory.instance(box, status="running") for _ in range(5)]
    prober.then(servers[0], refused)
    sweep = function_client(SWEEP, MCP_SWEEP_PROBE_BATCH="3", MCP_PROBE_CONCURRENCY="2")
    response = sweep.post("/")
    assert response.status_code == 200 and "mcp_checked" not in response.json  # the documented answer
    ((targets, kwargs),) = prober.calls
    assert len(targets) == 3 and kwargs["concurrency"] == 2
    second = sweep.post("/")
    assert second.status_code == 200
    assert len(prober.asked) == 5 and set(prober.asked) == set(servers)  # the rest, not the same three again
    ready = pg.execute("select count(*) filter (where ready), count(*) filter (where not ready) "
                       "from mcp_endpoint_probes").fetchone()
    assert tuple(ready) == (4, 1)


def test_a_sweep_whose_checks_fail_still_answers(function_client: Any, factory: Factory, prober: FakeProber) -> None:
    factory.instance(factory.toolbox(), status="running")
    prober.fail_with = RuntimeError("the prober broke")
    response = function_client(SWEEP).post("/")
    assert response.status_code == 200 and response.json["guard_tripped"] is False


# --- end to end: the DTMA stand-in's real MCP servers --------------------------------------------------

@pytest.fixture
def world(function_client: Any, toolbox_agent: Any) -> SimpleNamespace:
    """A user's toolbox with its stand-in agent, and the functions the web app and Google call."""
    box, agent = toolbox_agent()
    return SimpleNamespace(box=box, agent=agent, deploy=function_client(DEPLOY), status=function_client(STATUS),
                           sweep=function_client(SWEEP))


def test_deploy_then_the_real_server_answers_healthy_with_its_tools(world: Any, factory: Factory) -> None:
    server = deploy(world.deploy, world.box)
    seen = read(world.status, world.box.user_id, server)
    assert (seen["status"], seen["effective_status"], seen["health"], seen["error"]) == (
        "running", "running", "healthy", None)
    assert seen["mcp"]["ready"] is True and seen["mcp"]["server"] == {"name": "mcp-github", "version": "latest"}
    assert seen["mcp"]["endpoint"] == seen["endpoint"] and seen["mcp"]["protocol_version"]
    assert sorted(t["name"] for t in seen["tools"]) == ["mcp-github_add", "mcp-github_echo", "mcp-github_now"]
    echo = next(t for t in seen["tools"] if t["name"] == "mcp-github_echo")
    assert echo["input_schema"]["required"] == ["text"] and "mcp-github" in echo["description"]
    assert seen["progress"][-1]["message"] == "MCP endpoint answers: 3 tools (mcp-github latest)"
    listed = world.status.get("/", headers=auth(world.box.user_id)).json["servers"]
    assert listed[0]["mcp"] == seen["mcp"] and listed[0]["tools"] is None


def test_a_container_that_stops_answering_is_degraded_then_healthy_again(world: Any, factory: Factory,
                                                                         pg: psycopg.Connection) -> None:
    server = deploy(world.deploy, world.box)
    world.agent.set_container_mcp("mcp-github", "closed")
    seen = read(world.status, world.box.user_id, server, refresh="true")
    assert (seen["status"], seen["effective_status"], seen["health"]) == ("running", "running", "degraded")
    assert seen["mcp"]["ready"] is False and seen["tools"] == []
    assert seen["error"].startswith("the MCP endpoint does not answer: ") and seen["endpoint"] in seen["error"]
    assert seen["progress"][-1]["message"].startswith("MCP endpoint stopped answering: ")
    world.agent.set_container_mcp("mcp-github", None)
    pg.execute("update account_tool_instances set status_changed_at = status_changed_at - interval '1 hour'")
    pg.execute("update mcp_endpoint_probes set checked_at = checked_at - interval '1 minute'")  # the sweep's turn
    assert world.sweep.post("/").status_code == 200
    back = read(world.status, world.box.user_id, server)
    assert (back["health"], back["mcp"]["ready"], back["mcp"]["tool_count"]) == ("healthy", True, 3)
    assert [e[3].split(":")[0] for e in mcp_events(factory, server)] == [
        "MCP endpoint answers", "MCP endpoint stopped answering", "MCP endpoint answers"]


def test_a_port_that_is_not_mcp_is_degraded_with_what_to_fix(world: Any) -> None:
    server = deploy(world.deploy, world.box, image="example/no-mcp:latest")
    seen = read(world.status, world.box.user_id, server)
    assert (seen["status"], seen["health"], seen["mcp"]["ready"]) == ("running", "degraded", False)
    assert seen["mcp"]["error"] and seen["endpoint"] in seen["mcp"]["error"]


def test_a_loopback_server_is_not_checked_and_keeps_dockers_health(world: Any, pg: psycopg.Connection) -> None:
    server = deploy(world.deploy, world.box, publish="loopback")
    seen = read(world.status, world.box.user_id, server, refresh="true")
    assert (seen["status"], seen["health"], seen["mcp"]["ready"]) == ("running", "healthy", None)
    assert "loopback" in seen["mcp"]["error"] and seen["error"] is None
    assert pg.execute("select count(*) from mcp_endpoint_probes").fetchone()[0] == 0


def test_another_user_cannot_read_the_tools(world: Any, factory: Factory) -> None:
    server = deploy(world.deploy, world.box)
    stranger = factory.user()
    response = world.status.get(f"/{server}", headers=auth(stranger))
    missing = world.status.get(f"/{uuid.uuid4()}", headers=auth(stranger))
    assert response.status_code == missing.status_code == 404
    assert response.json["error"]["code"] == missing.json["error"]["code"]
    assert "mcp-github_echo" not in response.get_data(as_text=True)
    assert world.status.get("/", headers=auth(stranger)).json["servers"] == []
