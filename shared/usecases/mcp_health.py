"""Running means answering: when the backend checks that an MCP server's endpoint answers the MCP
handshake, and what the answer means for what users see.

Docker saying a container runs is not a server that works: the process may not listen, listen on
another port or path, speak another transport, or hang. So a running server reads `healthy` only
while its endpoint answers (`shared/adapters/mcp_probe.py` runs `initialize`, then `tools/list`),
and the answer, with the tools it offers, is stored (`cp_record_mcp_probes`,
sql/migrations/0009_mcp_health.sql). It is checked:

* right after the command worker saw it start (a deploy's answer, or a start/restart it confirmed
  by looking): `after_start`, retrying for MCP_PROBE_STARTUP_SECONDS while nothing accepts
  connections yet (a server takes a moment to listen; commands run inline check once);
* on `mcp_status?refresh=true`, for the running servers read, alongside the DTMA read and within
  the same budget: `begin_refresh` / `finish_refresh`;
* by each sweep, a bounded batch, never-checked and longest-unchecked first: `sweep`.

What it means (`assess`, used by shared/usecases/view.py):

* answered in the container's current run: `ready`; health stays what the container's state and
  the heartbeats say (healthy when fresh);
* did not answer: not ready; a healthy server reads `degraded`, with the check's sentence in `error`;
* not checked yet in this run: a healthy server reads `unknown`, "MCP endpoint not checked yet";
  `unknown` rather than `degraded`, because nothing is known to be wrong: the worker checks at once
  after a start, so this lasts until the next sweep only when a heartbeat saw it start;
* the backend cannot reach it (stdio, no network endpoint; published on loopback or a private
  address, which only the droplet reaches; a private toolbox address the backend refuses): never
  checked, health from Docker's state as before, and `mcp.error` says so. Not a failure of the server.

Everything the server says is its own text: it is cleaned (no NUL, no lone surrogates, no
non-finite numbers) and cut to bounds before it is stored or returned, and this service only ever
returns it as JSON strings, never as HTML.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import math
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any

from shared.core.addresses import is_internal
from shared.core.config import Settings
from shared.usecases.ports import Ports
from shared.usecases.view_models import (
    MAX_SENTENCE,
    MAX_SERVER_TEXT,
    MAX_TOOL_DESCRIPTION,
    MAX_TOOL_NAME,
    McpCheck,
    McpTool,
)

log = logging.getLogger("mcp.health")

HTTP_TRANSPORTS = frozenset({"streamable_http", "sse"})
# The adapter's verdicts that say nothing about the server: the backend would not, or could not, ask.
NOT_THE_SERVERS_FAULT = frozenset({"address_refused", "stdio"})
# Worth asking again right after a start: nothing listens yet, or the connection was cut while it came up.
NOT_LISTENING_YET = frozenset({"refused", "failed"})

MAX_SCHEMA_BYTES = 16_384  # one tool's input schema
MAX_TOOLS_BYTES = 131_072  # all of one server's stored tools; tool_count keeps the real count
MAX_CAPABILITIES_BYTES = 4_096
MAX_DEPTH = 32
MAX_RECORD_BYTES = 4_194_304  # one cp_record_mcp_probes call; more results go in further calls
REFRESH_MAX_CHECKS = 20  # servers one mcp_status?refresh=true checks (a page holds up to 100)
SWEEP_MIN_AGE_SECONDS = 30  # a server checked this recently (a start, a refresh) waits for a later sweep


# --- where a server can be checked -----------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """One server's endpoint as the backend reaches it."""

    instance_id: str
    name: str
    host: str
    port: int
    path: str
    transport: str

    @property
    def endpoint(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{self.path}"


def unreachable_reason(*, name: str, transport: str | None, host_port: int | None,
                       port_mapping: dict[str, Any] | None, public_ip: str | None,
                       settings: Settings) -> str | None:
    """Why the backend does not check this server's endpoint, as a sentence; None when it does.

    The publish rule is shared/usecases/view.py `_published`'s: a binding without an address is on
    every address of the droplet, whatever else the row says."""
    docker = "its health comes from Docker's state of the container alone"
    if transport not in HTTP_TRANSPORTS:
        return (f"not checked: {name} speaks MCP over stdio, which has no network endpoint to check; {docker}")
    mapping = port_mapping or {}
    publish, host_ip = mapping.get("publish") or "public", mapping.get("host_ip")
    if publish != "public" and host_ip:
        where = "loopback" if publish == "loopback" else "a private address"
        return (f"not checked: {name} is published on {host_ip} ({where}), which only the droplet reaches, not the "
                f"backend; {docker}")
    if not host_port:
        return f"not checked: {name} has no host port; {docker}"
    if not public_ip:
        return f"not checked: its toolbox has no public IP address yet; {docker}"
    internal = _internal(public_ip)
    if internal is None:
        return f"not checked: its toolbox's address {public_ip} is not an IP address; {docker}"
    if internal and not settings.ALLOW_PRIVATE_TOOLBOX_IPS:
        return (f"not checked: its toolbox's address {public_ip} is a loopback, private or link-local one, which the "
                f"backend does not connect to; {docker}")
    return None


@functools.lru_cache(maxsize=1024)
def _internal(address: str) -> bool | None:
    """Whether the backend keeps away from `address` (shared/core/addresses.py); None: not an address.
    Cached: every server of every mcp_status page asks."""
    try:
        return is_internal(ipaddress.ip_address(address.split("/")[0]))
    except ValueError:
        return None


def target_of_row(row: dict[str, Any], settings: Settings) -> Target | None:
    """A server as cp_list_mcp_servers returns it, if the backend can check it."""
    box = row["toolbox"]
    if unreachable_reason(name=row["name"], transport=row.get("transport"), host_port=row.get("host_port"),
                          port_mapping=row.get("port_mapping"), public_ip=box.get("public_ip_address"),
                          settings=settings):
        return None
    return Target(row["id"], row["name"], box["public_ip_address"], row["host_port"], row.get("endpoint_path") or "",
                  row["transport"])


def target_of_claim(instance: dict[str, Any], toolbox: dict[str, Any], settings: Settings) -> Target | None:
    """A server as the command worker holds it (the instance row and cp_toolbox_json)."""
    name = instance["instance_name_on_toolbox"]
    if instance.get("mcp_server_type") != "mcp_server" or unreachable_reason(
            name=name, transport=instance.get("mcp_transport_type"), host_port=instance.get("host_port"),
            port_mapping=instance.get("port_mapping_json"), public_ip=toolbox.get("public_ip_address"),
            settings=settings):
        return None
    return Target(instance["id"], name, toolbox["public_ip_address"], instance["host_port"],
                  instance.get("mcp_endpoint_path") or "", instance["mcp_transport_type"])


# --- asking -------------------------------------------------------------------------------------------

def _probe(targets: Sequence[Target], settings: Settings, *, timeout: float, concurrency: int) -> list[Any]:
    """The adapter's answers (ProbeResult), one per target."""
    from shared.adapters import mcp_probe

    asked = [mcp_probe.ProbeTarget(instance_id=t.instance_id, host=t.host, port=t.port, path=t.path,
                                   transport=t.transport) for t in targets]
    return list(mcp_probe.probe_many(asked, timeout=timeout, max_bytes=settings.MCP_PROBE_MAX_BYTES,
                                     allow_private=settings.ALLOW_PRIVATE_TOOLBOX_IPS,
                                     concurrency=max(1, min(concurrency, len(asked)))))


# --- cleaning what a server said ------------------------------------------------------------------

def _text(value: Any, limit: int) -> str | None:
    """A string PostgreSQL's jsonb can hold (no NUL, no lone surrogate), at most `limit` characters."""
    if not isinstance(value, str):
        return None
    clean = value.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")
    return clean if len(clean) <= limit else clean[:limit - 1] + "…"


def _plain(value: Any, depth: int = 0) -> Any:
    """JSON data jsonb can hold: strings cleaned, non-finite numbers null, nesting bounded."""
    if depth > MAX_DEPTH:
        return None
    if isinstance(value, str):
        return _text(value, MAX_SCHEMA_BYTES)
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {_text(str(k), MAX_TOOL_NAME * 2) or "": _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v, depth + 1) for v in value]
    return None


def _size(value: Any) -> int:
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())


def _bounded(value: Any, limit: int) -> dict[str, Any] | None:
    """A JSON object of at most `limit` bytes, or None."""
    if not isinstance(value, dict):
        return None
    clean = _plain(value)
    return clean if isinstance(clean, dict) and _size(clean) <= limit else None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def clean_tools(tools: Any) -> list[McpTool]:
    """The tools as stored and returned: named ones only, each cut to its bounds, in the server's order,
    until MAX_TOOLS_BYTES."""
    kept: list[McpTool] = []
    total = 2
    for tool in tools if isinstance(tools, list) else []:
        if not isinstance(tool, dict):
            continue
        name = _text(tool.get("name"), MAX_TOOL_NAME)
        if not name:
            continue
        schema = tool.get("input_schema", tool.get("inputSchema"))
        item: McpTool = {"name": name, "description": _text(tool.get("description"), MAX_TOOL_DESCRIPTION),
                         "input_schema": _bounded(schema, MAX_SCHEMA_BYTES)}
        total += _size(item) + 1
        if total > MAX_TOOLS_BYTES:
            break
        kept.append(item)
    return kept


# --- what an answer means -------------------------------------------------------------------------

def failure_sentence(kind: str | None, error: Any, target: Target, settings: Settings, timeout: float) -> str:
    """Why the endpoint is not ready, as something the user can check: the adapter's own sentence (it
    names the endpoint and what to fix), or one made from its verdict when it gave none."""
    said = _text(error, MAX_SENTENCE)
    if said and said.strip():
        return said.strip()
    endpoint = target.endpoint
    sentence = {
        "refused": f"nothing listens on {endpoint}: the container runs, but its MCP server is not up or listens on "
                   f"another port; check container_port and docker logs {target.name}",
        "timeout": f"{endpoint} did not answer the MCP handshake within {timeout:g} s; see docker logs {target.name}",
        "needs_auth": f"{endpoint} needs authentication, which the backend does not send",
        "not_mcp": f"{endpoint} is not an MCP endpoint; check endpoint_path and transport",
        "wrong_transport": f"{endpoint} does not speak {target.transport}; check endpoint_path and transport",
        "too_large": f"{endpoint} sent more than {settings.MCP_PROBE_MAX_BYTES} bytes during the MCP handshake",
    }.get(kind or "", f"{endpoint} did not complete the MCP handshake; see docker logs {target.name}")
    return _text(sentence, MAX_SENTENCE) or sentence


def _answered(tool_count: int, name: str | None, version: str | None) -> str:
    tools = f"{tool_count} tool{'' if tool_count == 1 else 's'}"
    server = " ".join(part for part in (name, version) if part)
    return f"MCP endpoint answers: {tools}" + (f" ({server})" if server else "")


def entry(result: Any, target: Target, settings: Settings, timeout: float) -> dict[str, Any] | None:
    """One adapter answer as cp_record_mcp_probes takes it; None for an answer that says nothing about
    the server (the backend refused the address, or a stdio server)."""
    kind = _text(getattr(result, "error_kind", None), 40)
    ok = getattr(result, "ok", False) is True
    if not ok and kind in NOT_THE_SERVERS_FAULT:
        return None
    tools = clean_tools(getattr(result, "tools", None)) if ok else []
    tool_count = len(getattr(result, "tools", None) or []) if ok else None
    name = _text(getattr(result, "server_name", None), MAX_SERVER_TEXT)
    version = _text(getattr(result, "server_version", None), MAX_SERVER_TEXT)
    duration = getattr(result, "duration_ms", None)
    sentence = None if ok else failure_sentence(kind, getattr(result, "error", None), target, settings, timeout)
    return {
        "instance_id": target.instance_id,
        "ok": ok,
        "message": _answered(tool_count or 0, name, version) if ok else sentence,
        "tool_count": tool_count,
        "tools": tools,
        "result": {
            "endpoint": target.endpoint,
            "sentence": sentence,
            "error_kind": None if ok else kind,
            "protocol_version": _text(getattr(result, "protocol_version", None), MAX_SERVER_TEXT),
            "server_name": name,
            "server_version": version,
            "capabilities": _bounded(getattr(result, "capabilities", None), MAX_CAPABILITIES_BYTES) or {},
            "resources_count": _count(getattr(result, "resources_count", None)),
            "prompts_count": _count(getattr(result, "prompts_count", None)),
            "duration_ms": round(duration, 1) if isinstance(duration, int | float) and math.isfinite(duration)
            else None,
            "probed_at": _text(getattr(result, "checked_at", None), 64),
        },
    }


def _entries(results: Iterable[Any], targets: Sequence[Target], settings: Settings,
             timeout: float) -> list[dict[str, Any]]:
    by_id = {t.instance_id: t for t in targets}
    found = []
    for result in results:
        target = by_id.get(str(getattr(result, "instance_id", "")))
        made = entry(result, target, settings, timeout) if target else None
        if made is not None:
            found.append(made)
    return found


def record(ports: Ports, entries: Sequence[dict[str, Any]], source: str) -> dict[str, int]:
    """Store the answers: one round trip, or a few when their tools are large."""
    totals = {"recorded": 0, "ignored": 0, "events": 0}
    chunk: list[dict[str, Any]] = []
    size = 0
    for item in [*entries, None]:
        item_size = _size(item) if item is not None else 0
        if chunk and (item is None or size + item_size > MAX_RECORD_BYTES):
            counts = ports.db.call("cp_record_mcp_probes", p_results=chunk, p_source=source)
            for key in totals:
                totals[key] += int(counts.get(key) or 0)
            chunk, size = [], 0
        if item is not None:
            chunk.append(item)
            size += item_size
    return totals


# --- when: after a start, on refresh, in the sweep -------------------------------------------------

def after_start(ports: Ports, instance: dict[str, Any], toolbox: dict[str, Any], *, wait: bool = True) -> None:
    """The command worker saw the server start: check its endpoint now and, with `wait`, again while
    nothing accepts connections yet, for up to MCP_PROBE_STARTUP_SECONDS (a server takes a moment to
    listen; one that fetches its packages at start, `npx -y ...`, several). Without `wait` (commands
    run inline by the serving process's bounded pool, which a sleeping check would hold up) it checks
    once. Never raises: the command's outcome is already recorded, and the sweep checks again."""
    settings = ports.settings
    try:
        target = target_of_claim(instance, toolbox, settings)
        if target is None:
            return
        timeout = settings.MCP_PROBE_TIMEOUT_SECONDS
        deadline = time.monotonic() + (settings.MCP_PROBE_STARTUP_SECONDS if wait else 0.0)
        pause = 0.25
        while True:
            [result] = _probe([target], settings, timeout=timeout, concurrency=1)
            if (getattr(result, "ok", False) is True or getattr(result, "error_kind", None) not in NOT_LISTENING_YET
                    or time.monotonic() + pause > deadline):
                break
            time.sleep(pause)
            pause = min(pause * 2, 2.0)
        record(ports, _entries([result], [target], settings, timeout), "api")
    except Exception:
        log.exception("checking the MCP endpoint of %s after its start failed", instance.get("id"))


@dataclass
class Pending:
    """Checks running alongside a refresh's DTMA read."""

    targets: list[Target]
    future: Future[list[Any]]
    timeout: float
    started: float


def begin_refresh(items: Sequence[dict[str, Any]], ports: Ports, pool: Executor) -> Pending | None:
    """Start checking the running servers of a mcp_status?refresh=true page: at most REFRESH_MAX_CHECKS
    (and MCP_PROBE_CONCURRENCY), those checked longest ago first, all at once, each within
    min(MCP_PROBE_TIMEOUT_SECONDS, DTMA_STATUS_TIMEOUT_SECONDS): the refresh's own budget, like its
    DTMA read."""
    settings = ports.settings
    most = min(REFRESH_MAX_CHECKS, settings.MCP_PROBE_CONCURRENCY)
    running = sorted((row for row in items if row.get("status") == "running"), key=_last_checked)
    targets = [t for t in (target_of_row(row, settings) for row in running) if t is not None][:most]
    if not targets:
        return None
    timeout = min(settings.MCP_PROBE_TIMEOUT_SECONDS, settings.DTMA_STATUS_TIMEOUT_SECONDS)
    future = pool.submit(_probe, targets, settings, timeout=timeout, concurrency=len(targets))
    return Pending(targets, future, timeout, time.monotonic())


def _last_checked(row: dict[str, Any]) -> str:
    probe = row.get("mcp_probe") or {}
    return str(probe.get("checked_at") or "") if probe.get("current") else ""


def finish_refresh(pending: Pending | None, ports: Ports) -> int:
    """Record what the refresh's checks found (the DTMA's answers are applied first, so a server it
    found stopped is not recorded as answering); how many were recorded. Waits no longer than the
    checks' budget from their start."""
    if pending is None:
        return 0
    settings = ports.settings
    left = pending.timeout + 1.0 - (time.monotonic() - pending.started)
    try:
        results = pending.future.result(timeout=max(left, 0.0))
        return record(ports, _entries(results, pending.targets, settings, pending.timeout), "api")["recorded"]
    except TimeoutError:
        log.warning("MCP endpoint checks of a refresh did not finish within %.1f s; not recorded", pending.timeout)
    except Exception:
        log.exception("MCP endpoint checks of a refresh failed")
    return 0


def sweep_batch_size(settings: Settings) -> int:
    """MCP_SWEEP_PROBE_BATCH, cut so the checks fit MCP_SWEEP_PROBE_BUDGET_SECONDS: at most
    MCP_PROBE_CONCURRENCY at once, each within MCP_PROBE_TIMEOUT_SECONDS."""
    rounds = max(1, int(settings.MCP_SWEEP_PROBE_BUDGET_SECONDS // settings.MCP_PROBE_TIMEOUT_SECONDS))
    return min(settings.MCP_SWEEP_PROBE_BATCH, settings.MCP_PROBE_CONCURRENCY * rounds)


def sweep(ports: Ports) -> dict[str, int]:
    """One sweep's checks: a bounded batch of running servers, never-checked and longest-unchecked
    first (cp_mcp_probe_batch claims them, so overlapping sweeps split the work). Counts for the log;
    never raises (the sweep's own work is done and answered either way)."""
    settings = ports.settings
    counts = {"mcp_checked": 0, "mcp_ready": 0, "mcp_events": 0}
    limit = sweep_batch_size(settings)
    if limit < 1:
        return counts
    timeout = settings.MCP_PROBE_TIMEOUT_SECONDS
    try:
        batch = ports.db.call("cp_mcp_probe_batch", p_limit=limit, p_stale_after_seconds=settings.stale_after_seconds,
                              p_min_age_seconds=SWEEP_MIN_AGE_SECONDS,
                              p_lease_seconds=int(settings.MCP_SWEEP_PROBE_BUDGET_SECONDS + timeout) + 30,
                              p_allow_internal=settings.ALLOW_PRIVATE_TOOLBOX_IPS)
        targets = [Target(t["instance_id"], t["name"], t["host"], t["port"], t["path"], t["transport"])
                   for t in batch["targets"]
                   if not unreachable_reason(name=t["name"], transport=t["transport"], host_port=t["port"],
                                             port_mapping=None, public_ip=t["host"], settings=settings)]
        if not targets:
            return counts
        results = _probe(targets, settings, timeout=timeout, concurrency=settings.MCP_PROBE_CONCURRENCY)
        entries = _entries(results, targets, settings, timeout)
        recorded = record(ports, entries, "sweep")
        counts.update(mcp_checked=len(entries), mcp_ready=sum(1 for e in entries if e["ok"]),
                      mcp_events=recorded["events"])
    except Exception:
        log.exception("the sweep's MCP endpoint checks failed")
    return counts


# --- what users see ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Assessment:
    """What the last check means now. verdict: `ready`, `not_ready`, `unchecked` (running, not checked in
    this run), `unreachable` (the backend does not check it), `idle` (not running)."""

    verdict: str
    block: McpCheck
    tools: list[McpTool]

    @property
    def sentence(self) -> str | None:
        return self.block["error"]


def _block(endpoint: str | None, error: str | None) -> McpCheck:
    return {"ready": None, "checked_at": None, "endpoint": endpoint, "protocol_version": None,
            "server": {"name": None, "version": None}, "tool_count": None, "error": error}


def assess(row: dict[str, Any], *, effective: str, endpoint: str | None, settings: Settings) -> Assessment:
    """The `mcp` block of one server (and its tools), from its row and its effective status."""
    name = row["name"]
    reason = unreachable_reason(name=name, transport=row.get("transport"), host_port=row.get("host_port"),
                                port_mapping=row.get("port_mapping"),
                                public_ip=(row.get("toolbox") or {}).get("public_ip_address"), settings=settings)
    if reason:
        return Assessment("unreachable", _block(endpoint, reason), [])
    if effective != "running":
        state = "unknown" if effective == "unknown" else effective
        return Assessment("idle", _block(endpoint, f"not checked while {name} is {state}"), [])
    probe = row.get("mcp_probe") or {}
    result = probe.get("result") or {}
    if not probe.get("current") or probe.get("ready") is None:
        return Assessment("unchecked", _block(endpoint, (
            f"MCP endpoint not checked yet since {name} started; the next sweep checks it within a minute, or read "
            "it with refresh=true")), [])
    if result.get("error_kind") in NOT_THE_SERVERS_FAULT:
        return Assessment("unreachable", _block(endpoint, result.get("sentence")), [])
    ready = probe["ready"] is True
    block: McpCheck = {
        "ready": ready,
        "checked_at": probe.get("checked_at"),
        "endpoint": result.get("endpoint") or endpoint,
        "protocol_version": result.get("protocol_version"),
        "server": {"name": result.get("server_name"), "version": result.get("server_version")},
        "tool_count": probe.get("tool_count") if ready else None,
        "error": None if ready else (result.get("sentence") or f"{endpoint} did not complete the MCP handshake"),
    }
    tools = row.get("tools") if ready else None
    return Assessment("ready" if ready else "not_ready", block, tools if isinstance(tools, list) else [])
