"""Contract test: the DTMA stand-in answers call for call like the real DTMA agent.

``tests/fixtures/real-dtma-responses.json`` holds answers recorded from the real DTMA agent at
commit 82a6bec (its Node/Express program, run on loopback against a Docker Engine API): every
call of one scenario, in order, with the request, the status, the content type and the whole
body. This module replays the same calls in the same order against a :class:`StandInAgent`,
including the agent restart between phases and Docker becoming unreachable, and compares each
answer. ``tests/fixtures/real-dtma-heartbeat-*.json`` are heartbeats the same agent sent; the
stand-in's heartbeats at the same points of the scenario are compared with them, headers included.

Only values that legitimately differ between two runs are normalised, the same way on both
sides: container ids and image digests, timestamps, pids, ``created`` seconds, the listening
port in ``/status``, system metrics (compared by shape), the address in Docker's "connect ..."
error, and (for containers created during the test) the duration in a Docker ``Status``
text. Everything else (status codes, content types, keys and their order, messages, Docker
error texts) must be identical, so changing any of it in the stand-in fails this module.

The recorded engine starts empty, so the stand-in runs without its own ``dtma_manager``
container (``include_self=False``), and the images the recording made fail are configured by
name, as the recording configured them (``pull_denied_images`` and so on).
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.dtma_standin import StandInAgent
from devstack.dtma_standin.engine import ZERO_TIME

FIXTURES = Path(__file__).resolve().parent / "fixtures"
RECORDED = json.loads((FIXTURES / "real-dtma-responses.json").read_text())
CALLS: list[dict[str, Any]] = RECORDED["calls"]
TOKEN = "contract-test-token-7d2e"
#: The backend base URL the recording used; heartbeats go to ``<base>/heartbeat``.
INGEST_PREFIX = "/functions/v1/dtma_heartbeat_ingest"
#: The images the recording made fail, configured on the stand-in the same way.
AGENT_OPTIONS: dict[str, Any] = {
    "include_self": False,
    "pull_denied_images": ["mcp/does-not-exist:latest"],
    "pull_stream_error_images": ["mcp/stream-error:latest"],
    "exit_images": {"mcp/exits-immediately:latest": 1},
}
#: The recording's phases, in order; ``replay`` knows what happened to the agent before each.
PHASES = ("A", "B", "B, after restart", "D, Docker down")

_CONTAINER_ID = re.compile(r"\b[0-9a-f]{64}\b")
_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z$")
_DOCKER_UNREACHABLE = re.compile(r"^connect (?:ECONNREFUSED|ENOENT) \S+$")
_UP = re.compile(r"^Up .+$")
_EXITED = re.compile(r"^Exited \((\d+)\) .+ ago$")
_METRICS_KEYS = frozenset({"system_metrics", "system_status"})


# -- normalisation -----------------------------------------------------------------------------


def normalise(value: Any, *, key: str | None = None, durations: bool = False) -> Any:
    """Replace values that differ between any two runs by placeholders; keep everything else.

    ``durations`` also replaces the "2 seconds" in "Up 2 seconds" / "Exited (0) 2 seconds ago",
    which depends on how long a scenario took.
    """
    if key in _METRICS_KEYS:
        return shape(value)
    if isinstance(value, dict):
        return {k: normalise(v, key=k, durations=durations) for k, v in value.items()}
    if isinstance(value, list):
        return [normalise(item, durations=durations) for item in value]
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and key == "Pid" and value != 0:
        return "<pid>"
    if isinstance(value, int) and key == "created":
        return "<unix seconds>"
    if isinstance(value, str):
        return _normalise_text(value, key=key, durations=durations)
    return value


def _normalise_text(text: str, *, key: str | None, durations: bool) -> str:
    if _TIME.match(text) and text != ZERO_TIME:
        return "<time>"
    if _DOCKER_UNREACHABLE.match(text):
        return "connect <Docker endpoint unreachable>"
    if durations and key == "status":
        if _UP.match(text):
            return "Up <duration>"
        if match := _EXITED.match(text):
            return f"Exited ({match[1]}) <duration> ago"
    return _CONTAINER_ID.sub("<id>", text)


def shape(value: Any) -> Any:
    """System metrics are the host's: compare keys, strings and the kinds of numbers only."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return "<number>"
    return value


def normalised_answer(path: str, body: Any) -> Any:
    """A whole answer body, normalised; ``/status`` reports the agent's real listening port."""
    document = normalise(body)
    if path == "/status" and isinstance(document, dict):
        port = document["environment"]["port"]
        assert isinstance(port, str) and port.isdigit(), port
        document["environment"]["port"] = "<port>"
    return document


def assert_same_json(replayed: Any, recorded: Any) -> None:
    """Equal, and with keys in the same order (what a client that prints raw JSON would see)."""
    assert replayed == recorded
    assert json.dumps(replayed) == json.dumps(recorded)


# -- a backend that receives the stand-in's heartbeats ------------------------------------------


class HeartbeatCapture:
    """Records every request (path, headers, parsed body) and answers 204 like the ingest function."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        capture = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with capture._lock:
                    capture.requests.append(
                        {"method": "POST", "path": self.path, "headers": dict(self.headers), "body": json.loads(body)}
                    )
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{INGEST_PREFIX}"

    def wait_for(self, count: int, timeout: float = 5.0) -> dict[str, Any]:
        """The ``count``-th request (1-based), once it has arrived."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.requests) >= count:
                    return self.requests[count - 1]
            time.sleep(0.01)
        raise AssertionError(f"heartbeat #{count} did not arrive")

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


@pytest.fixture(scope="module")
def capture() -> Iterator[HeartbeatCapture]:
    backend = HeartbeatCapture()
    yield backend
    backend.close()


# -- the replay --------------------------------------------------------------------------------


@dataclass
class Replay:
    """What the stand-in answered to each recorded call, and the heartbeats it sent on the way."""

    answers: list[tuple[int, str, Any]] = field(default_factory=list)
    heartbeats: dict[str, dict[str, Any]] = field(default_factory=dict)


def _send(http: httpx.Client, call: dict[str, Any]) -> tuple[int, str, Any]:
    authorization = {"none": None, "wrong": "Bearer wrong-token", "token": f"Bearer {TOKEN}"}[call["auth"]]
    request_headers = {} if authorization is None else {"Authorization": authorization}
    body = call["request_body"]
    content: bytes | None = None
    if body is not None:  # a string is sent as it is: the recording's malformed JSON
        content = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        request_headers["Content-Type"] = "application/json"
    response = http.request(call["method"], call["path"], content=content, headers=request_headers)
    content_type = response.headers["content-type"]
    answer = response.json() if content_type.startswith("application/json") else response.text
    return response.status_code, content_type, answer


@pytest.fixture(scope="module")
def replay(capture: HeartbeatCapture) -> Iterator[Replay]:
    """Run the recorded scenario once against one stand-in; the tests below compare its parts."""
    result = Replay()
    agent = StandInAgent(TOKEN, heartbeat_url=capture.base_url, heartbeat_interval=600, **AGENT_OPTIONS)
    seen = len(capture.requests)

    def next_heartbeat() -> dict[str, Any]:
        nonlocal seen
        seen += 1
        return capture.wait_for(seen)

    def enter(phase: str) -> None:
        """What the recording did to the agent and its Docker before the phase's first call."""
        match phase:
            case "A":  # a fresh start: its heartbeat comes at once
                result.heartbeats["first"] = next_heartbeat()
            case "B":  # the same process goes on
                pass
            case "B, after restart":
                agent.restart_agent()
                result.heartbeats["with-containers"] = next_heartbeat()
            case "D, Docker down":
                agent.set_docker_down(True)
                agent.restart_agent()
                result.heartbeats["docker-down"] = next_heartbeat()
            case _:
                pytest.fail(f"the recording has a phase this replay does not know: {phase!r}")

    with agent, httpx.Client(base_url=agent.url, timeout=10, trust_env=False) as http:
        phase = None
        for call in CALLS:
            if call["phase"] != phase:
                phase = call["phase"]
                enter(phase)
            result.answers.append(_send(http, call))
    yield result


# -- the comparisons ---------------------------------------------------------------------------


def test_the_recording_is_the_scenario_this_module_replays() -> None:
    assert RECORDED["dtma_commit"].startswith("82a6bec")
    assert len(CALLS) == 34
    assert tuple(dict.fromkeys(call["phase"] for call in CALLS)) == PHASES


@pytest.mark.parametrize(
    "index", range(len(CALLS)), ids=[f"{n:02d}-{call['label']}" for n, call in enumerate(CALLS, 1)]
)
def test_each_answer_matches_the_real_agent(replay: Replay, index: int) -> None:
    call = CALLS[index]
    status, content_type, body = replay.answers[index]
    assert (status, content_type) == (call["status"], call["content_type"]), call["label"]
    assert_same_json(normalised_answer(call["path"], body), normalised_answer(call["path"], call["body"]))


@pytest.mark.parametrize(
    ("name", "durations"), [("first", False), ("with-containers", True), ("docker-down", False)]
)
def test_heartbeats_match_the_real_agent(replay: Replay, name: str, durations: bool) -> None:
    assert_same_heartbeat(replay.heartbeats[name], _heartbeat_fixture(name), durations=durations)


def test_heartbeat_with_unmanaged_containers_matches_the_real_agent(capture: HeartbeatCapture) -> None:
    """The recording's engine had the DTMA's own container and an old failed job, neither deployed by it."""
    agent = StandInAgent(TOKEN, heartbeat_url=capture.base_url, heartbeat_interval=600, include_self=False)
    seen = len(capture.requests)
    with agent, httpx.Client(base_url=agent.url, timeout=10, trust_env=False) as http:
        capture.wait_for(seen + 1)  # the heartbeat at start, engine still empty
        manager = {
            "name": "dtma_manager",
            "image": "ghcr.io/maverick-software/dtma-agent:latest",
            "host_port": 30000,
            "command": "docker-entrypoint.sh npm start",
            "age_seconds": 2 * 3600,
        }
        job = {
            "name": "old-job",
            "image": "alpine:3.19",
            "running": False,
            "exit_code": 1,
            "command": "sh -c exit 1",
            "age_seconds": 3 * 3600,
        }
        for body in (manager, job):
            assert http.post("/_standin/containers", json=body).status_code == 200
        assert http.post("/_standin/restart").status_code == 200  # the agent starts again and beats at once
        heartbeat = capture.wait_for(seen + 2)
    assert_same_heartbeat(heartbeat, _heartbeat_fixture("seeded"), durations=False)


def assert_same_heartbeat(sent: dict[str, Any], recorded: dict[str, Any], *, durations: bool) -> None:
    """Method, path, headers (but Host and Content-Length, which belong to one capture) and body."""
    assert (sent["method"], sent["path"]) == (recorded["method"], recorded["path"])
    assert _comparable_headers(sent["headers"], TOKEN) == _comparable_headers(recorded["headers"], "<TOKEN>")
    assert_same_json(normalise(sent["body"], durations=durations), normalise(recorded["body"], durations=durations))


def _comparable_headers(headers: dict[str, str], token: str) -> dict[str, str]:
    lowered = {name.lower(): value for name, value in headers.items()}
    for name in ("host", "content-length"):
        lowered.pop(name)
    lowered["authorization"] = lowered["authorization"].replace(token, "<token>")
    return lowered


def _heartbeat_fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"real-dtma-heartbeat-{name}.json").read_text())


# -- the comparison itself must not hide drift ----------------------------------------------------


def _string_leaves(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _string_leaves(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _string_leaves(v, (*path, i))
    elif isinstance(value, str):
        yield path


def _replace_leaf(document: Any, path: tuple[Any, ...], new: str) -> Any:
    changed = copy.deepcopy(document)
    if not path:
        return new
    parent = changed
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = new
    return changed


def test_normalisation_keeps_every_message_that_could_drift() -> None:
    """Changing any recorded text that is not an id, a time or Docker's address changes the comparison."""
    placeholders = ("<id>", "<time>", ZERO_TIME)
    checked = 0
    for call in CALLS:
        for path in _string_leaves(call["body"]):
            original = _leaf(call["body"], path)
            listening_port = call["path"] == "/status" and path[-1:] == ("port",)
            if any(p in original for p in placeholders) or _DOCKER_UNREACHABLE.match(original) or listening_port:
                continue
            drifted = _replace_leaf(call["body"], path, original + " (drifted)")
            assert normalised_answer(call["path"], drifted) != normalised_answer(call["path"], call["body"]), path
            checked += 1
    assert checked > 100


def _leaf(document: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        document = document[step]
    return document
