"""``/_standin/*``: drive a running stand-in from another process (a demo script, a browser).

These routes are unauthenticated, which is acceptable only because they are served
solely when the agent is bound to a loopback address; on any other address they answer
404 like every unknown path. They mirror the Python control methods, JSON in and out:

======  ================================  ==========================================
POST    /_standin/heartbeats/pause        stop sending scheduled heartbeats
POST    /_standin/heartbeats/resume       send them again
POST    /_standin/heartbeats/send         send one now -> ``{"ok": true, "status": 204}``
POST    /_standin/restart                 the DTMA process restarts (managed map lost)
POST    /_standin/containers              run a container the DTMA does not manage (below)
POST    /_standin/containers/<n>/crash    ``{"exit_code": 1}`` the container exits
POST    /_standin/containers/<n>/remove   the container vanishes from Docker
POST    /_standin/containers/<n>/mcp      ``{"mode": "hang"}`` its MCP server until it stops (null: as its image)
POST    /_standin/mcp/images              ``{"image": "example/x", "mode": "not-mcp"}`` (null mode drops the rule)
POST    /_standin/images                  ``{"image": "mcp/x", "pull": "stream-error", "exit_code": null}``
POST    /_standin/docker                  ``{"down": true}`` Docker socket unreachable
POST    /_standin/pull_delay              ``{"seconds": 3}`` image pulls take that long
POST    /_standin/fail                    ``{"route": "deploy", "status": 500, "body": {...}, "times": 1}``
GET     /_standin/state                   everything above, plus the containers and their MCP servers
======  ================================  ==========================================

``POST /_standin/containers`` takes ``{"name": str, "image": str = "busybox:latest",
"host_port": int | null = null, "container_port": int = host_port or 8080, "running": bool = true,
"exit_code": int = 0, "command": str = "docker-entrypoint.sh", "age_seconds": number = 0}`` and
answers ``{"ok": true, "container": {...}}`` (see :meth:`StandInAgent.add_unmanaged_container`).
``POST /_standin/images`` takes ``pull`` = ``ok`` | ``denied`` | ``stream-error`` (default ``ok``)
and ``exit_code`` (default null); ``ok`` with a null exit code drops the image's rule.
MCP modes are ``serve``, ``not-mcp``, ``hang`` and ``closed`` (see :mod:`devstack.dtma_standin.mcp_servers`).

Errors: 400 for a bad body or an impossible request (crashing a container that is not
running), 404 for an unknown container or path, 409 for ``heartbeats/send`` on an agent
started without a heartbeat URL and for a container Docker refuses (name taken, port
allocated, Docker down), with Docker's text.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from devstack.dtma_standin.engine import DEFAULT_FOREIGN_IMAGE
from devstack.dtma_standin.routes import NOT_FOUND, Route
from devstack.dtma_standin.server import Reply

if TYPE_CHECKING:
    from devstack.dtma_standin.agent import ContainerSnapshot, StandInAgent

OK = Reply.json(200, {"ok": True})


class ControlSurface:
    """Maps ``/_standin/*`` requests onto a :class:`StandInAgent`'s control methods."""

    def __init__(self, agent: StandInAgent) -> None:
        self._agent = agent

    def handle(self, method: str, parts: list[str], body: object) -> Reply:
        """Answer one control request (``parts`` are the path segments after ``_standin``)."""
        fields = body if isinstance(body, dict) else {}
        try:
            return self._route(method, parts, fields)
        except LookupError as error:
            return Reply.json(404, {"error": f"No such container: {error.args[0]}"})
        except ValueError as error:
            return Reply.json(400, {"error": str(error)})
        except RuntimeError as error:
            return Reply.json(409, {"error": str(error)})

    def _route(self, method: str, parts: list[str], fields: dict[str, object]) -> Reply:
        agent = self._agent
        if method == "POST" and (action := _SIMPLE_ACTIONS.get(tuple(parts))) is not None:
            return _done(lambda: action(agent))
        match method, parts:
            case "GET", ["state"]:
                return Reply.json(200, agent.state())
            case "POST", ["heartbeats", "send"]:
                return Reply.json(200, {"ok": True, "status": agent.send_heartbeat_now()})
            case "POST", ["containers"]:
                return Reply.json(200, {"ok": True, "container": self._add_container(fields).to_json()})
            case "POST", ["images"]:
                return _done(lambda: self._image(fields))
            case "POST", ["containers", name, "crash"]:
                return _done(lambda: agent.crash_container(name, _integer(fields, "exit_code", default=1)))
            case "POST", ["containers", name, "remove"]:
                return _done(lambda: agent.remove_container_out_of_band(name))
            case "POST", ["containers", name, "mcp"]:
                return _done(lambda: agent.set_container_mcp(name, _optional_string(fields, "mode")))
            case "POST", ["mcp", "images"]:
                return _done(lambda: agent.set_image_mcp(_string(fields, "image"), _optional_string(fields, "mode")))
            case "POST", ["docker"]:
                return _done(lambda: agent.set_docker_down(_boolean(fields, "down")))
            case "POST", ["pull_delay"]:
                return _done(lambda: agent.set_pull_delay(_number(fields, "seconds")))
            case "POST", ["fail"]:
                return _done(lambda: self._fail(fields))
        return NOT_FOUND

    def _add_container(self, fields: dict[str, object]) -> ContainerSnapshot:
        host_port = _optional_integer(fields, "host_port")
        container_port = _optional_integer(fields, "container_port")
        return self._agent.add_unmanaged_container(
            _string(fields, "name"),
            _string(fields, "image", default=DEFAULT_FOREIGN_IMAGE),
            host_port=host_port,
            container_port=container_port,
            running=_boolean(fields, "running", default=True),
            exit_code=_integer(fields, "exit_code", default=0),
            command=_string(fields, "command", default="docker-entrypoint.sh"),
            age_seconds=_number(fields, "age_seconds", default=0.0),
        )

    def _image(self, fields: dict[str, object]) -> None:
        self._agent.set_image_behaviour(
            _string(fields, "image"),
            pull=_string(fields, "pull", default="ok"),
            exit_code=_optional_integer(fields, "exit_code"),
        )

    def _fail(self, fields: dict[str, object]) -> None:
        route = fields.get("route")
        routes = sorted(kind.value for kind in Route)
        if route not in routes:
            raise ValueError(f"route must be one of {routes}")
        self._agent.fail_next(
            str(route),
            _integer(fields, "status", default=500),
            fields.get("body"),
            times=_integer(fields, "times", default=1),
        )


_SIMPLE_ACTIONS: dict[tuple[str, ...], Callable[[StandInAgent], None]] = {
    ("heartbeats", "pause"): lambda agent: agent.pause_heartbeats(),
    ("heartbeats", "resume"): lambda agent: agent.resume_heartbeats(),
    ("restart",): lambda agent: agent.restart_agent(),
}


def _done(action: Callable[[], None]) -> Reply:
    action()
    return OK


def _integer(fields: dict[str, object], key: str, *, default: int) -> int:
    value = fields.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer")
    return value


def _optional_integer(fields: dict[str, object], key: str) -> int | None:
    value = fields.get(key)
    return None if value is None else _integer(fields, key, default=0)


def _number(fields: dict[str, object], key: str, default: float | None = None) -> float:
    value = fields.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} must be a number")
    return float(value)


def _boolean(fields: dict[str, object], key: str, default: bool | None = None) -> bool:
    value = fields.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false")
    return value


def _optional_string(fields: dict[str, object], key: str) -> str | None:
    return None if fields.get(key) is None else _string(fields, key)


def _string(fields: dict[str, object], key: str, default: str | None = None) -> str:
    value = fields.get(key, default)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key} must be a non-empty string")
    return value
