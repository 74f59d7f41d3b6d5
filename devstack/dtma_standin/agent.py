"""``StandInAgent``: one simulated toolbox, i.e. a DTMA process plus the Docker engine it drives."""

from __future__ import annotations

import ipaddress
import logging
import threading
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Self

from devstack.closing import StartStop
from devstack.dtma_standin.control import ControlSurface
from devstack.dtma_standin.engine import (
    DEFAULT_FOREIGN_IMAGE,
    PULL_DENIED,
    PULL_OK,
    PULL_OUTCOMES,
    PULL_STREAM_ERROR,
    Container,
    DockerError,
    Engine,
    ImageBehaviour,
)
from devstack.dtma_standin.heartbeat import HeartbeatScheduler, ScheduleEntry, heartbeat_url
from devstack.dtma_standin.mcp_servers import McpHost, McpServerInfo, Wanted, check_mode
from devstack.dtma_standin.report import heartbeat_payload
from devstack.dtma_standin.routes import DtmaApp, ManagedInstance, RequestRecord, Route
from devstack.dtma_standin.server import Listener, Reply, Request

logger = logging.getLogger(__name__)

#: The DTMA's own container on a real droplet, always running and always in the heartbeat.
SELF_CONTAINER = "dtma_manager"
SELF_IMAGE = "ghcr.io/maverick-software/dtma-agent:latest"
#: The port the DTMA publishes inside its container (``EXPOSE 30000``).
DTMA_PORT = 30000
UNMANAGED_IMAGE = "standin/unmanaged:latest"
#: The container port a foreign container publishes when only a host port is given.
DEFAULT_CONTAINER_PORT = 8080


@dataclass(frozen=True)
class ContainerSnapshot:
    """A read-only copy of one container, for tests and tools to inspect.

    ``env`` holds the values the deploy passed; it is left out of ``repr`` and of
    :meth:`to_json` so that printing or serving a snapshot never exposes credentials.
    """

    name: str
    id: str
    image: str
    state: str
    exit_code: int
    host_ports: tuple[int, ...]
    port_bindings: dict[str, list[dict[str, str]]]
    managed: bool
    account_tool_instance_id: Any
    env: tuple[str, ...] = field(repr=False)

    @classmethod
    def of(cls, container: Container, instance: ManagedInstance | None) -> ContainerSnapshot:
        return cls(
            name=container.name,
            id=container.id,
            image=container.image,
            state=container.state,
            exit_code=container.exit_code,
            host_ports=tuple(port.host_port for port in container.published),
            port_bindings={
                spec: [dict(b) for b in bindings] for spec, bindings in container.port_bindings.items()
            },
            managed=instance is not None,
            account_tool_instance_id=instance.account_tool_instance_id if instance else None,
            env=tuple(container.env),
        )

    def env_dict(self) -> dict[str, str]:
        """``KEY=VALUE`` entries as a dict (an entry without ``=`` maps to an empty string)."""
        return dict(entry.partition("=")[::2] for entry in self.env)

    def to_json(self) -> dict[str, Any]:
        """JSON view for ``GET /_standin/state``: environment variable names only, never values."""
        return {
            "name": self.name,
            "id": self.id,
            "image": self.image,
            "state": self.state,
            "exit_code": self.exit_code,
            "host_ports": list(self.host_ports),
            "port_bindings": self.port_bindings,
            "managed": self.managed,
            "account_tool_instance_id": self.account_tool_instance_id,
            "env_keys": sorted(self.env_dict()),
        }


class StandInAgent(StartStop):
    """A real HTTP server on loopback that answers like the DTMA agent of one toolbox.

    Construct, then :meth:`start` (or use it as a context manager). The token plays the
    role of ``DTMA_AUTH_TOKEN`` in ``/etc/dtma.conf``: it authenticates the backend's
    ``/tools`` calls *and* signs the agent's own heartbeats, as the real agent's one token does.

    ``heartbeat_url`` is the backend *base* URL (``AGENTOPIA_API_BASE_URL``, e.g.
    ``http://127.0.0.1:54321/functions/v1``); heartbeats are posted to ``<base>/heartbeat``.
    Without it the agent sends none. ``scheduler`` lets many agents share one heartbeat
    thread (see :class:`~devstack.dtma_standin.fleet.StandInFleet`); by default an agent
    with a ``heartbeat_url`` gets its own.

    Images can be made to fail by name, like the ``standin/...`` conventions but for any
    name (a name without a tag matches all its tags): ``pull_denied_images`` fail their pull
    at once (404 "pull access denied"), ``pull_stream_error_images`` pull for the pull delay
    and then leave no image, so create fails with "No such image", and ``exit_images``
    (image -> exit code) start and exit at once. ``process_env`` is the DTMA process's
    environment, which only ``GET /status``'s ``has*`` flags read; empty by default because
    the real agent reads its token and base URL from ``/etc/dtma.conf``.

    Running containers answer MCP on their host ports (:mod:`devstack.dtma_standin.mcp_servers`
    has the rule and the modes): ``mcp_servers=False`` serves none, ``mcp_images`` maps image names
    to modes (``serve``, ``not-mcp``, ``hang``, ``closed``) like :meth:`set_image_mcp`.

    All control methods are thread-safe.
    """

    def __init__(
        self,
        token: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        pull_delay: float = 0.0,
        heartbeat_url: str | None = None,
        heartbeat_interval: float = 60.0,
        send_boot_id_seq: bool = False,
        dtma_version: str = "0.1.0",
        unmanaged_containers: int = 0,
        include_self: bool = True,
        scheduler: HeartbeatScheduler | None = None,
        pull_denied_images: Iterable[str] = (),
        pull_stream_error_images: Iterable[str] = (),
        exit_images: Mapping[str, int] | None = None,
        process_env: Mapping[str, str] | None = None,
        mcp_servers: bool = True,
        mcp_images: Mapping[str, str] | None = None,
    ) -> None:
        if not token:
            raise ValueError("token must be a non-empty string (the agent refuses to start without one)")
        _require(pull_delay >= 0, "pull_delay must be >= 0")
        _require(heartbeat_interval > 0, "heartbeat_interval must be > 0")
        _require(unmanaged_containers >= 0, "unmanaged_containers must be >= 0")
        self._token = token
        self._lock = threading.RLock()
        self._engine = Engine()
        for image in pull_denied_images:
            self.set_image_behaviour(image, pull=PULL_DENIED)
        for image in pull_stream_error_images:
            self.set_image_behaviour(image, pull=PULL_STREAM_ERROR)
        for image, exit_code in (exit_images or {}).items():
            self.set_image_behaviour(image, exit_code=exit_code)
        self._app = DtmaApp(
            token=token,
            engine=self._engine,
            lock=self._lock,
            dtma_version=dtma_version,
            pull_delay=pull_delay,
            process_env=process_env or {},
        )
        self._mcp = McpHost(enabled=mcp_servers, image_modes=(mcp_images or {}).items())
        self._listener = Listener(host, port, self._handle)
        self._heartbeat_url = _heartbeat_target(heartbeat_url)
        self._heartbeat_interval = heartbeat_interval
        self._send_boot_id_seq = send_boot_id_seq
        self._dtma_version = dtma_version
        self._unmanaged_containers = unmanaged_containers
        self._include_self = include_self
        self._scheduler = scheduler
        self._owns_scheduler = False
        self._schedule_entry: ScheduleEntry | None = None
        self._boot_id = str(uuid.uuid4())
        self._seq = 0
        self._paused = False
        self._heartbeats_sent = 0
        self._last_heartbeat_status: int | None = None
        self._phase = "new"

    def __repr__(self) -> str:
        return f"<StandInAgent {self._phase} on {self._listener.bound_host}:{self._listener.port}>"

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> Self:
        """Bind, serve from a daemon thread, and start heartbeats if a ``heartbeat_url`` was given."""
        with self._lock:
            if self._phase != "new":
                raise RuntimeError(f"agent is {self._phase}; start() works once")
            self._phase = "running"
        try:
            self._listener.open()
            self._app.listen_port = self._listener.port
            if ipaddress.ip_address(self._listener.bound_host).is_loopback:
                self._app.control = ControlSurface(self).handle  # unauthenticated, so loopback only
            self._populate_engine()
            self._mcp.start()
            self._sync_mcp()
            if self._heartbeat_url is not None:
                self._start_heartbeats()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop heartbeats, close the socket, cut open connections; idempotent."""
        with self._lock:
            if self._phase == "stopped":
                return
            self._phase = "stopped"
        self._app.interrupt()
        if self._scheduler is not None and self._schedule_entry is not None:
            self._scheduler.remove(self._schedule_entry)
        if self._owns_scheduler and self._scheduler is not None:
            self._scheduler.close()
        self._listener.close()
        self._mcp.close()

    # -- read-only views --------------------------------------------------------------------

    @property
    def token(self) -> str:
        """The agent's token (kept out of ``repr``, logs and the request log)."""
        return self._token

    @property
    def port(self) -> int:
        """The bound port; for ``port=0`` only known once started."""
        if not self._listener.port:
            raise RuntimeError("the agent has no port until start()")
        return self._listener.port

    @property
    def url(self) -> str:
        """Base URL of the agent's API, e.g. ``http://127.0.0.1:54321``."""
        host = self._listener.bound_host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    @property
    def heartbeat_target(self) -> str | None:
        """The full URL heartbeats go to, or None."""
        return self._heartbeat_url

    @property
    def boot_id(self) -> str:
        """Identifier of the current agent "process"; changes on :meth:`restart_agent`."""
        return self._boot_id

    @property
    def heartbeats_sent(self) -> int:
        """Heartbeats attempted so far, answered or not."""
        return self._heartbeats_sent

    @property
    def last_heartbeat_status(self) -> int | None:
        """Status of the last heartbeat: None before the first, 0 if it got no answer."""
        return self._last_heartbeat_status

    @property
    def requests(self) -> list[RequestRecord]:
        """Requests that reached the agent (method, path, had_valid_auth, status), oldest first."""
        return self._app.records()

    def containers(self) -> list[ContainerSnapshot]:
        """Every container on the simulated engine, oldest first (works even while Docker is "down")."""
        with self._lock:
            managed = self._app.managed()
            return [ContainerSnapshot.of(c, managed.get(c.name)) for c in self._engine.containers()]

    def heartbeat_payload(self) -> dict[str, Any]:
        """Exactly what the next heartbeat would carry (without consuming a ``seq`` number)."""
        with self._lock:
            return self._payload(self._seq + 1)

    def state(self) -> dict[str, Any]:
        """A JSON-ready summary, served as ``GET /_standin/state``."""
        with self._lock:
            return {
                "url": self.url,
                "accepting_connections": self._listener.is_open,
                "docker_down": self._engine.down,
                "pull_delay": self._app.pull_delay,
                "image_rules": {
                    pattern: {"pull": rule.pull, "exit_code": rule.exit_code}
                    for pattern, rule in self._engine.image_rules().items()
                },
                "boot_id": self._boot_id,
                "heartbeats": {
                    "target": self._heartbeat_url,
                    "interval": self._heartbeat_interval,
                    "paused": self._paused,
                    "sent": self._heartbeats_sent,
                    "last_status": self._last_heartbeat_status,
                    "seq": self._seq,
                },
                "containers": [snapshot.to_json() for snapshot in self.containers()],
                "mcp": {
                    "enabled": self._mcp.enabled,
                    "image_rules": self._mcp.image_rules(),
                    "servers": [info.to_json() for info in self._mcp.infos()],
                },
            }

    def mcp_servers(self) -> list[McpServerInfo]:
        """The MCP server of every running container that should have one, by container name.

        Also those left unserved (``serving`` false, with the ``error``: a port that could not be
        bound, a non-loopback ``HostIp``) and those in ``closed`` mode.
        """
        return self._mcp.infos()

    def mcp_server(self, name: str) -> McpServerInfo | None:
        """The MCP server of container ``name``; None while it has none (not running, foreign, no port)."""
        return self._mcp.info(name)

    # -- heartbeat control ------------------------------------------------------------------

    def pause_heartbeats(self) -> None:
        """Skip scheduled heartbeats (the schedule keeps running) until :meth:`resume_heartbeats`."""
        with self._lock:
            self._paused = True

    def resume_heartbeats(self) -> None:
        """Send scheduled heartbeats again, from the next due time on."""
        with self._lock:
            self._paused = False

    def send_heartbeat_now(self) -> int:
        """Send one heartbeat from the calling thread, even while paused; returns the answer's status.

        0 means no HTTP answer (refused, timed out). Raises RuntimeError without a
        ``heartbeat_url`` or outside the running phase.
        """
        if self._heartbeat_url is None:
            raise RuntimeError("no heartbeat_url configured")
        if self._phase != "running":
            raise RuntimeError(f"agent is {self._phase}")
        return self._send_heartbeat()

    # -- fault simulation -------------------------------------------------------------------

    def restart_agent(self) -> None:
        """The DTMA process restarts: its managed map is forgotten, containers keep running.

        A new ``boot_id`` is drawn, ``seq`` starts again at 1, the agent's own container
        shows a fresh "Up" time and, as after any start, a heartbeat is sent right away.
        The HTTP port stays open; combine with :meth:`refuse_connections` for downtime.
        """
        with self._lock:
            self._app.forget_managed()
            self._boot_id = str(uuid.uuid4())
            self._seq = 0
            if self._include_self and self._phase == "running":
                self._engine.restart(SELF_CONTAINER)
        self._sync_mcp()
        if self._scheduler is not None and self._schedule_entry is not None:
            self._scheduler.trigger(self._schedule_entry)

    def crash_container(self, name: str, exit_code: int = 1) -> None:
        """A running container's process dies with ``exit_code``.

        Raises KeyError for an unknown container and ValueError for one that is not running.
        """
        with self._lock:
            self._engine.crash(name, exit_code)
        self._sync_mcp()

    def remove_container_out_of_band(self, name: str) -> None:
        """The container disappears from Docker behind the DTMA's back; its map entry stays.

        Raises KeyError for an unknown container.
        """
        with self._lock:
            self._engine.vanish(name)
        self._sync_mcp()

    def add_unmanaged_container(
        self,
        name: str,
        image: str = DEFAULT_FOREIGN_IMAGE,
        *,
        host_port: int | None = None,
        container_port: int | None = None,
        running: bool = True,
        exit_code: int = 0,
        command: str = "docker-entrypoint.sh",
        age_seconds: float = 0.0,
    ) -> ContainerSnapshot:
        """Run a container on the droplet's Docker that the DTMA did not create (not in its map).

        Real droplets have them (the DTMA's own ``dtma_manager``, old jobs). A later deploy
        asking for the same ``host_port`` passes the DTMA's map-only port check, is created,
        and fails at start with Docker's "port is already allocated", leaving a ``created``
        container the DTMA then answers 404 for; a deploy with the same ``name`` fails with
        Docker's 409 name conflict. ``container_port`` defaults to ``host_port`` (8080 without
        one); a stopped container exited with ``exit_code``; ``age_seconds`` back-dates it.

        Raises ValueError for bad arguments and RuntimeError with Docker's text when Docker
        refuses (name taken, port allocated, Docker down).
        """
        _require(bool(name) and isinstance(name, str), "name must be a non-empty string")
        _require(bool(image) and isinstance(image, str), "image must be a non-empty string")
        _require(host_port is None or 1 <= host_port <= 65535, "host_port must be 1-65535 or null")
        port = container_port if container_port is not None else host_port or DEFAULT_CONTAINER_PORT
        _require(1 <= port <= 65535, "container_port must be 1-65535")
        _require(0 <= exit_code <= 255, "exit_code must be 0-255")
        _require(age_seconds >= 0, "age_seconds must be >= 0")
        binding = [{"HostPort": str(host_port)}] if host_port is not None else []
        with self._lock:
            try:
                container = self._engine.add_foreign(
                    name,
                    image,
                    command=command,
                    port_bindings={f"{port}/tcp": binding},
                    running=running,
                    exit_code=exit_code,
                    age_seconds=age_seconds,
                )
            except DockerError as error:
                raise RuntimeError(error.message.strip()) from None
            snapshot = ContainerSnapshot.of(container, None)
        self._sync_mcp()
        return snapshot

    def set_image_behaviour(self, image: str, *, pull: str = PULL_OK, exit_code: int | None = None) -> None:
        """Make every image ``image`` names fail its pull or exit at once; ``ok``/None drops the rule.

        ``pull`` is ``ok``, ``denied`` (404 "pull access denied", at once) or ``stream-error``
        (pulls for the pull delay, stores no image, so the deploy fails with Docker's
        "No such image", as the real agent answers); ``exit_code`` makes containers of the image
        exit at once after start. A name without a tag matches all its tags.
        """
        _require(bool(image) and isinstance(image, str), "image must be a non-empty string")
        _require(pull in PULL_OUTCOMES, f"pull must be one of {list(PULL_OUTCOMES)}")
        _require(exit_code is None or 0 <= exit_code <= 255, "exit_code must be 0-255 or null")
        rule = None if pull == PULL_OK and exit_code is None else ImageBehaviour(pull=pull, exit_code=exit_code)
        with self._lock:
            self._engine.set_image_rule(image, rule)

    def set_image_mcp(self, image: str, mode: str | None) -> None:
        """What containers of every image ``image`` names (no tag: all tags) serve; None drops the rule.

        ``mode`` is ``serve`` (a real MCP server), ``not-mcp`` (the port answers 404 HTML),
        ``hang`` (the port accepts requests and never answers) or ``closed`` (nothing listens).
        Without a rule an image named ``no-mcp`` (any namespace or tag) is ``not-mcp`` and any
        other is ``serve``. Takes effect at once, for running containers too (they restart their server).
        """
        self._mcp.set_image_mode(image, mode)
        self._sync_mcp()

    def set_container_mcp(self, name: str, mode: str | None) -> None:
        """Put the MCP server of running container ``name`` in ``mode`` (see :meth:`set_image_mcp`).

        Lasts until the container stops or restarts (a new process answers as its image does);
        None ends it at once. ``set_container_mcp(name, "hang")`` or ``"closed"`` makes a running
        server stop answering. Raises KeyError for an unknown container, ValueError for a bad mode,
        a container that is not running or one the agent did not create (it serves no MCP), and
        RuntimeError when the agent was built with ``mcp_servers=False``.
        """
        if mode is not None:
            check_mode(mode)
        if not self._mcp.enabled:
            raise RuntimeError("this stand-in serves no MCP (mcp_servers=False)")
        with self._lock:
            container = next((c for c in self._engine.containers() if c.name == name), None)
            if container is None:
                raise KeyError(name)
            if container.foreign:
                raise ValueError(f"container {name!r} was not deployed through the agent; it serves no MCP")
            if not container.running:
                raise ValueError(f"container {name!r} is not running")
            key = (container.id, container.started_ns)
        self._mcp.set_override(key, mode)
        self._sync_mcp()

    def set_pull_delay(self, seconds: float) -> None:
        """How long every later image pull takes (``standin/slow-<S>`` images excepted)."""
        _require(seconds >= 0, "pull delay must be >= 0")
        with self._lock:
            self._app.pull_delay = seconds

    def fail_next(
        self, route: Route | str, status: int = 500, body: object = None, *, times: int = 1
    ) -> None:
        """Answer the next ``times`` calls of ``route`` with ``status`` and JSON ``body``, doing nothing else.

        ``route`` is a :class:`Route` or its value: ``deploy``, ``delete``, ``start``, ``stop``,
        ``tools_status``, ``status`` or ``health``. ``/tools`` routes still check the token first.
        The default body is express's generic ``{"error": "Internal Server Error"}``.
        """
        _require(100 <= status <= 599, "status must be an HTTP status code")
        _require(times >= 1, "times must be >= 1")
        document = {"error": "Internal Server Error"} if body is None else body
        self._app.inject(Route(route), status, document, times)

    def set_docker_down(self, down: bool = True) -> None:
        """Make the Docker socket unreachable: heartbeats carry the error item, Docker calls answer 500."""
        with self._lock:
            self._engine.down = down

    def refuse_connections(self) -> None:
        """Close the listening socket and cut open connections: clients now get "connection refused"."""
        self._require_running()
        self._listener.close()

    def accept_connections(self) -> None:
        """Re-bind the same port and serve again."""
        self._require_running()
        self._listener.open()

    # -- internals --------------------------------------------------------------------------

    def _handle(self, request: Request) -> Reply:
        """Every request may have started or stopped a container: bring the MCP servers in line
        before answering, so a container is reachable (or refused) by the time its client hears back."""
        reply = self._app.handle(request)
        self._sync_mcp()
        return reply

    def _sync_mcp(self) -> None:
        """Serve MCP for exactly the containers that should serve it now; never raises."""

        def read() -> list[Wanted]:
            with self._lock:
                return self._mcp.wanted(self._engine.containers()) if self._phase == "running" else []

        try:
            self._mcp.sync(read)
        except Exception:
            logger.exception("could not bring the stand-in's MCP servers in line with its containers")

    def _require_running(self) -> None:
        if self._phase != "running":
            raise RuntimeError(f"agent is {self._phase}")

    def _populate_engine(self) -> None:
        """What runs on a fresh droplet: the DTMA's own container and any other software."""
        with self._lock:
            if self._include_self:
                bindings = {f"{DTMA_PORT}/tcp": [{"HostPort": str(self._listener.port)}]}
                self._engine.add_foreign(
                    SELF_CONTAINER,
                    SELF_IMAGE,
                    command="docker-entrypoint.sh npm start",
                    port_bindings=bindings,
                    running=True,
                )
            for number in range(1, self._unmanaged_containers + 1):
                self._engine.add_foreign(
                    f"unmanaged-{number}", UNMANAGED_IMAGE, command="sleep infinity", port_bindings={}, running=True
                )

    def _start_heartbeats(self) -> None:
        if self._scheduler is None:
            self._scheduler = HeartbeatScheduler()
            self._owns_scheduler = True
        self._schedule_entry = self._scheduler.add(self._scheduled_beat, self._heartbeat_interval)

    def _scheduled_beat(self) -> None:
        if self._phase == "running" and not self._paused:
            self._send_heartbeat()

    def _send_heartbeat(self) -> int:
        scheduler, url = self._scheduler, self._heartbeat_url
        if scheduler is None or url is None:
            raise RuntimeError("heartbeats are not configured")
        with self._lock:
            self._seq += 1
            payload = self._payload(self._seq)
        status = scheduler.post(url, self._token, payload)
        with self._lock:
            self._heartbeats_sent += 1
            self._last_heartbeat_status = status
        return status

    def _payload(self, seq: int) -> dict[str, Any]:
        boot = (self._boot_id, seq) if self._send_boot_id_seq else None
        return heartbeat_payload(self._engine, dtma_version=self._dtma_version, boot=boot)


def _heartbeat_target(base_url: str | None) -> str | None:
    return None if base_url is None else heartbeat_url(base_url)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
