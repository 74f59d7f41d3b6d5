"""An in-memory model of the Docker Engine, as the DTMA sees it through dockerode.

Only what the DTMA's routes and heartbeat touch is modelled: pull, create, start, stop,
force-remove, inspect (``State`` and published ports) and list (``docker ps -a`` summaries).
Failures raise :class:`DockerError` carrying the exact ``Error.message`` dockerode builds,
because the real agent copies that text verbatim into its 500 answers (as recorded in
``tests/fixtures/real-dtma-responses.json``).

Images are only a set of pulled references: create needs the image to have been pulled,
which is how an error inside a pull's progress stream surfaces (as "No such image" at create).

Port bindings are published on their ``HostIp`` (an IP address, checked at create; empty means
every IPv4 address, ``0.0.0.0``) and reported with it, as ``IP`` in ``docker ps`` and ``HostIp`` in
inspect, so a heartbeat says where each port is reachable. Two containers may hold one host port
on addresses that do not overlap (127.0.0.1 and a VPC address), as with Docker.

Deliberately not modelled: the ``::`` binding Docker adds for an empty ``HostIp`` on hosts with
IPv6, restart policies (the DTMA asks for ``unless-stopped``, but a
container that exits here stays exited so tests can observe it), image layers, networks,
volumes, and the 10 s grace period of ``docker stop``.

Not thread-safe on its own: the agent serialises every call with its lock.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

#: What dockerode reports when the Docker socket is unreachable.
SOCKET_ERROR = "connect ENOENT /var/run/docker.sock"
#: Docker's value for "all interfaces" in port bindings; nothing binds to it here.
ANY_ADDRESS = "0.0.0.0"  # noqa: S104
#: Docker's zero time, used for StartedAt/FinishedAt of containers that never started/stopped.
ZERO_TIME = "0001-01-01T00:00:00Z"
#: The Linux ephemeral range Docker picks from when HostPort is empty.
EPHEMERAL_PORTS = range(32768, 61000)
#: The kinds of pull a configured image can have (see :meth:`Engine.set_image_rule`).
PULL_OK, PULL_DENIED, PULL_STREAM_ERROR = "ok", "denied", "stream-error"
PULL_OUTCOMES = (PULL_OK, PULL_DENIED, PULL_STREAM_ERROR)
#: What a container run on the droplet without the DTMA uses when no image is given.
DEFAULT_FOREIGN_IMAGE = "busybox:latest"
#: Registry prefixes Docker drops from the familiar form of a reference.
_HUB_PREFIXES = ("docker.io/", "index.docker.io/", "registry-1.docker.io/")

_TAG = r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"
_NAME = re.compile(r"^/?[a-zA-Z0-9][a-zA-Z0-9_.-]+$")
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REFERENCE = re.compile(
    rf"^(?:(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+|localhost)(?::\d+)?/)?"
    rf"{_COMPONENT}(?:/{_COMPONENT})*{_TAG}(?:@sha256:[a-f0-9]{{64}})?$"
)
_EXIT_IMAGE = re.compile(rf"^standin/exit-(\d+){_TAG}$")
_SLOW_IMAGE = re.compile(rf"^standin/slow-(\d+(?:\.\d+)?){_TAG}$")
_DENIED_IMAGE = re.compile(rf"^standin/pull-denied{_TAG}$")
_STREAM_ERROR_IMAGE = re.compile(rf"^standin/stream-error{_TAG}$")
_PORT_SPEC = re.compile(r"^(\d{1,5})(?:/(tcp|udp|sctp))?$")


class DockerError(Exception):
    """A failed Docker call, worded exactly as dockerode words it."""

    @classmethod
    def http(cls, status: int, cause: str, reason: str = "unexpected") -> DockerError:
        """docker-modem's message format, trailing space included: ``(HTTP code N) <reason> - <cause> ``.

        ``reason`` is dockerode's per-call label for the status code; codes a call does not
        list are labelled ``unexpected`` (hence "(HTTP code 404) unexpected - pull access denied").
        """
        return cls(f"(HTTP code {status}) {reason} - {cause} ")

    @property
    def message(self) -> str:
        """The text the DTMA puts in the ``error`` field of its JSON answer."""
        return str(self.args[0])


@dataclass(frozen=True)
class ImageBehaviour:
    """What pulling and running an image does: from a ``standin/...`` name or a configured rule.

    ``pull`` is one of :data:`PULL_OUTCOMES`: ``denied`` fails before any progress is
    streamed (404 "pull access denied"), ``stream-error`` streams for the pull time and
    then reports an error inside the stream, so the image is never stored.
    """

    pull_seconds: float | None = None
    pull: str = PULL_OK
    exit_code: int | None = None


def image_behaviour(image: str) -> ImageBehaviour:
    """Decode the image conventions, so tests and demos steer behaviour without configuration."""
    if match := _EXIT_IMAGE.match(image):
        return ImageBehaviour(exit_code=int(match[1]) % 256)  # exit statuses are one byte, as on Unix
    if match := _SLOW_IMAGE.match(image):
        return ImageBehaviour(pull_seconds=float(match[1]))
    if _DENIED_IMAGE.match(image):
        return ImageBehaviour(pull=PULL_DENIED)
    if _STREAM_ERROR_IMAGE.match(image):
        return ImageBehaviour(pull=PULL_STREAM_ERROR)
    return ImageBehaviour()


def normalize_image(image: str) -> str:
    """Docker's familiar form with a tag: ``docker.io/library/alpine`` -> ``alpine:latest``.

    dockerode pulls ``:latest`` when the reference has no tag, and Docker's "No such image"
    names the reference in this form.
    """
    for prefix in _HUB_PREFIXES:
        if image.startswith(prefix):
            image = image.removeprefix(prefix)
            break
    if image.startswith("library/") and image.count("/") == 1:
        image = image.removeprefix("library/")
    if "@" in image or ":" in image.rsplit("/", 1)[-1]:
        return image
    return f"{image}:latest"


def image_repository(image: str) -> str:
    """``mcp/github:latest`` -> ``mcp/github``: how "pull access denied for ..." names an image."""
    full = normalize_image(image)
    return full.split("@", 1)[0] if "@" in full else full.rsplit(":", 1)[0]


def image_matches(image: str, pattern: str) -> bool:
    """Whether ``pattern`` names ``image``; a pattern without tag or digest matches every tag."""
    tagged = "@" in pattern or ":" in pattern.rsplit("/", 1)[-1]
    if tagged:
        return normalize_image(pattern) == normalize_image(image)
    return image_repository(pattern) == image_repository(image)


@dataclass(frozen=True)
class PublishedPort:
    """One host port a running container holds."""

    container_port: int
    protocol: str
    host_ip: str
    host_port: int


@dataclass
class Container:
    """A container's mutable engine-side record."""

    id: str
    name: str
    image: str
    command: str
    env: list[str]
    port_bindings: dict[str, list[dict[str, str]]]
    created_ns: int
    state: str = "created"
    exit_code: int = 0
    pid: int = 0
    started_ns: int = 0
    finished_ns: int = 0
    published: list[PublishedPort] = field(default_factory=list)
    #: Run on the droplet without the DTMA (:meth:`Engine.add_foreign`); such containers serve no MCP.
    foreign: bool = False

    @property
    def running(self) -> bool:
        """Docker's ``State.Running``."""
        return self.state == "running"


class Engine:
    """The containers and pulled images on one toolbox, plus a switch that makes Docker unreachable."""

    def __init__(self) -> None:
        self.down = False
        self._containers: dict[str, Container] = {}
        self._images: set[str] = set()
        self._rules: dict[str, ImageBehaviour] = {}
        self._last_pid = 1000

    # -- image rules (configuration of the simulation, not Docker state) ------------------------

    def set_image_rule(self, pattern: str, behaviour: ImageBehaviour | None) -> None:
        """Make images named by ``pattern`` behave as ``behaviour`` (None drops the rule).

        A pattern without a tag matches every tag; a tagged rule wins over an untagged one.
        Rules win over the ``standin/...`` name conventions.
        """
        if behaviour is None:
            self._rules.pop(pattern, None)
        else:
            self._rules[pattern] = behaviour

    def image_rules(self) -> dict[str, ImageBehaviour]:
        """A copy of the configured rules, pattern -> behaviour."""
        return dict(self._rules)

    def behaviour(self, image: str) -> ImageBehaviour:
        """What pulling and running ``image`` does."""
        matching = [pattern for pattern in self._rules if image_matches(image, pattern)]
        if matching:
            exact = [pattern for pattern in matching if normalize_image(pattern) == normalize_image(image)]
            return self._rules[(exact or matching)[0]]
        return image_behaviour(image)

    # -- calls the DTMA makes (each fails with SOCKET_ERROR while the engine is down) --------

    def pull(self, image: str) -> ImageBehaviour:
        """Start a pull: refuse it at once (bad reference, access denied) or say how it goes.

        The caller waits for the pull time and then calls :meth:`finish_pull`.
        """
        self._require_up()
        if not _REFERENCE.match(image):
            raise DockerError.http(400, "invalid reference format")
        behaviour = self.behaviour(image)
        if behaviour.pull == PULL_DENIED:
            raise DockerError.http(
                404,
                f"pull access denied for {image_repository(image)}, repository does not exist or may "
                "require 'docker login': denied: requested access to the resource is denied",
            )
        return behaviour

    def finish_pull(self, image: str, behaviour: ImageBehaviour) -> None:
        """The progress stream ended: the image is stored, unless the stream carried an error.

        dockerode's ``followProgress`` does not report an error inside the stream, so the
        DTMA carries on and its create fails with "No such image" instead.
        """
        if behaviour.pull != PULL_STREAM_ERROR:
            self._images.add(normalize_image(image))

    def create(
        self,
        name: str,
        image: str,
        *,
        env: object,
        port_bindings: object,
        command: str = "docker-entrypoint.sh",
    ) -> Container:
        """``POST /containers/create``: rejects bad bodies, missing images and names like Docker, never pulls."""
        self._require_up()
        checked_env = _checked_env(env)
        checked_bindings = _checked_bindings(port_bindings)
        if normalize_image(image) not in self._images:
            raise DockerError.http(404, f"No such image: {normalize_image(image)}", "no such container")
        if not _NAME.match(name):
            raise DockerError.http(
                400, f"Invalid container name ({name}), only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed"
            )
        name = name.removeprefix("/")
        if existing := self._containers.get(name):
            raise DockerError.http(
                409,
                f'Conflict. The container name "/{name}" is already in use by container "{existing.id}". '
                "You have to remove (or rename) that container to be able to reuse that name.",
            )
        container = Container(
            id=secrets.token_hex(32),
            name=name,
            image=image,
            command=command,
            env=checked_env,
            port_bindings=checked_bindings,
            created_ns=time.time_ns(),
        )
        self._containers[name] = container
        return container

    def start(self, name: str) -> None:
        """Publish ports (failing like Docker when one is taken), run, and exit at once for exit-N images."""
        container = self._find(name)
        if container.running:
            raise DockerError.http(304, "", "container already started")
        container.published = self._publish(container)
        self._last_pid += 1
        container.state, container.pid, container.exit_code = "running", self._last_pid, 0
        container.started_ns = time.time_ns()
        if (exit_code := self.behaviour(container.image).exit_code) is not None:
            self._exit(container, exit_code)

    def stop(self, name: str) -> None:
        """Docker answers 304 for a container that is not running, which dockerode turns into an error."""
        container = self._find(name)
        if not container.running:
            raise DockerError.http(304, "", "container already stopped")
        self._exit(container, 0)

    def remove(self, name: str) -> None:
        """Force-remove (the only way the DTMA removes)."""
        del self._containers[self._find(name).name]

    def inspect(self, name: str) -> dict[str, Any]:
        """The parts of ``docker inspect`` the DTMA reads: Config.Image, State, NetworkSettings.Ports."""
        container = self._find(name)
        return {
            "Config": {"Image": container.image},
            "State": _state(container),
            "NetworkSettings": {"Ports": _network_ports(container)},
        }

    def list_all(self) -> list[dict[str, Any]]:
        """``docker ps -a`` summaries, newest first, as dockerode's listContainers returns them."""
        self._require_up()
        now_ns = time.time_ns()
        newest_first = sorted(self._containers.values(), key=lambda c: c.created_ns, reverse=True)
        return [_summary(container, now_ns) for container in newest_first]

    # -- things that happen on the droplet outside the DTMA (never blocked by `down`) ---------

    def add_foreign(
        self,
        name: str,
        image: str,
        *,
        command: str,
        port_bindings: dict[str, list[dict[str, str]]],
        running: bool,
        exit_code: int = 0,
        age_seconds: float = 0.0,
    ) -> Container:
        """A container someone ran on the droplet without the DTMA (``docker run``, the DTMA's own).

        Its image is on the droplet by definition. A running one publishes its ports (and
        fails like Docker if one is taken, leaving nothing behind); a stopped one exited with
        ``exit_code``. ``age_seconds`` back-dates it, for "Up 2 hours" / "Exited (1) 3 hours ago".
        """
        self._images.add(normalize_image(image))
        container = self.create(name, image, env=[], port_bindings=port_bindings, command=command)
        container.foreign = True
        if running:
            try:
                self.start(container.name)
            except DockerError:
                del self._containers[container.name]
                raise
        else:
            container.started_ns = container.created_ns
            self._exit(container, exit_code)
        shift = int(age_seconds * 1e9)
        container.created_ns -= shift
        container.started_ns -= shift
        if container.finished_ns:
            container.finished_ns -= shift
        return container

    def containers(self) -> list[Container]:
        """Live records, oldest first; callers must hold the agent lock while reading them."""
        return sorted(self._containers.values(), key=lambda c: c.created_ns)

    def running_count(self) -> int:
        """How many containers run, which drives the simulated system load."""
        return sum(container.running for container in self._containers.values())

    def crash(self, name: str, exit_code: int) -> None:
        """The process inside a running container dies; raises KeyError/ValueError for misuse."""
        container = self._containers[name]
        if not container.running:
            raise ValueError(f"container {name!r} is not running")
        self._exit(container, exit_code)

    def vanish(self, name: str) -> None:
        """Someone ran ``docker rm -f`` on the droplet; raises KeyError for an unknown name."""
        del self._containers[name]

    def restart(self, name: str) -> None:
        """The container's main process restarted in place (same id, new pid and StartedAt)."""
        container = self._containers[name]
        self._last_pid += 1
        container.state, container.pid, container.exit_code = "running", self._last_pid, 0
        container.started_ns = time.time_ns()

    # -- internals --------------------------------------------------------------------------

    def _require_up(self) -> None:
        if self.down:
            raise DockerError(SOCKET_ERROR)

    def _find(self, name: str) -> Container:
        self._require_up()
        container = self._containers.get(name.removeprefix("/"))
        if container is None:
            raise DockerError.http(404, f"No such container: {name}", "no such container")
        return container

    def _exit(self, container: Container, exit_code: int) -> None:
        container.state, container.exit_code, container.pid = "exited", exit_code, 0
        container.finished_ns = time.time_ns()
        container.published = []

    def _publish(self, container: Container) -> list[PublishedPort]:
        """Bind every PortBinding on its HostIp (every address when empty), as Docker does.

        Two bindings of one host port collide when their addresses overlap: the same address, or
        one of them is the wildcard of the same family (``0.0.0.0`` holds the port on 127.0.0.1
        and on every other IPv4 address). 127.0.0.1:N and 10.0.0.5:N can both be held.
        """
        taken = [(p.host_ip, p.host_port) for c in self._containers.values() if c.running for p in c.published]
        published: list[PublishedPort] = []
        for spec, bindings in container.port_bindings.items():
            port, protocol = _parse_port_spec(spec)
            for binding in bindings:
                host_ip = binding.get("HostIp") or ANY_ADDRESS
                host_port = int(binding.get("HostPort") or 0) or _free_port({p for _, p in taken})
                if any(p == host_port and _overlap(ip, host_ip) for ip, p in taken):
                    raise DockerError.http(
                        500,
                        f"driver failed programming external connectivity on endpoint {container.name} "
                        f"({secrets.token_hex(32)}): Bind for {host_ip}:{host_port} failed: "
                        "port is already allocated",
                        "server error",
                    )
                taken.append((host_ip, host_port))
                published.append(PublishedPort(port, protocol, host_ip, host_port))
        return published


# -- request-body checks Docker performs on container create ---------------------------------


def _go_kind(value: object) -> str:
    """The JSON kind Go's encoding/json names in "cannot unmarshal <kind>" errors."""
    kinds: tuple[tuple[type, str], ...] = ((bool, "bool"), (str, "string"), (dict, "object"), (list, "array"))
    return next((kind for cls, kind in kinds if isinstance(value, cls)), "number")


def _unmarshal_error(value: object, field_path: str, go_type: str) -> DockerError:
    """Docker's 400 for a body field of the wrong JSON type (field path approximated)."""
    return DockerError.http(
        400, f"json: cannot unmarshal {_go_kind(value)} into Go struct field {field_path} of type {go_type}"
    )


def _checked_env(env: object) -> list[str]:
    """``Env`` must be a list of strings: catches clients sending ``{"KEY": "value"}`` objects."""
    if env is None:
        return []
    if not isinstance(env, list):
        raise _unmarshal_error(env, "ContainerConfigWrapper.Env", "[]string")
    for item in env:
        if item is not None and not isinstance(item, str):
            raise _unmarshal_error(item, "ContainerConfigWrapper.Env", "string")
    return [item for item in env if isinstance(item, str)]


def _checked_bindings(bindings: object) -> dict[str, list[dict[str, str]]]:
    """``PortBindings`` must be a Docker PortMap whose HostPort values are strings of digits."""
    if bindings is None:
        return {}
    if not isinstance(bindings, dict):
        raise _unmarshal_error(bindings, "ContainerConfigWrapper.HostConfig.PortBindings", "nat.PortMap")
    checked: dict[str, list[dict[str, str]]] = {}
    for spec, entries in bindings.items():
        _parse_port_spec(spec)
        if entries is not None and not isinstance(entries, list):
            raise _unmarshal_error(
                entries, "ContainerConfigWrapper.HostConfig.PortBindings", "[]nat.PortBinding"
            )
        checked[spec] = [_checked_binding(entry) for entry in entries or []]
    return checked


def _checked_binding(entry: object) -> dict[str, str]:
    if entry is None:
        return {}
    if not isinstance(entry, dict):
        raise _unmarshal_error(entry, "ContainerConfigWrapper.HostConfig.PortBindings", "nat.PortBinding")
    checked: dict[str, str] = {}
    for key in ("HostIp", "HostPort"):
        value = entry.get(key)
        if value is not None and not isinstance(value, str):
            raise _unmarshal_error(value, f"PortBinding.HostConfig.PortBindings.{key}", "string")
        if value:
            checked[key] = value
    host_port = checked.get("HostPort", "")
    if host_port and not (host_port.isdigit() and int(host_port) <= 65535):
        raise DockerError.http(400, f"invalid port specification: {host_port!r}")
    if "HostIp" in checked:
        checked["HostIp"] = _checked_host_ip(checked["HostIp"])
    return checked


def _checked_host_ip(value: str) -> str:
    """``HostIp`` must be an IP address: the current engine decodes it as Go's ``netip.Addr`` (no host
    names, no leading zeros, no prefix length) and refuses the create otherwise (message
    approximated). It is kept, and reported, in its canonical form.

    Older engines (HostIp a plain string in their API) parsed it with ``net.ParseIP`` only when
    publishing, so an unparsable value became "no address", which binds every address: a typo there
    publishes the port everywhere. The stand-in takes the current engine's side.
    """
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise DockerError.http(400, f'invalid JSON: ParseAddr("{value}"): unable to parse IP') from None


def _overlap(held: str, wanted: str) -> bool:
    """Whether binding ``wanted`` conflicts with a binding already holding ``held`` (same port)."""
    if held == wanted:
        return True
    held_ip, wanted_ip = ipaddress.ip_address(held), ipaddress.ip_address(wanted)
    return held_ip.version == wanted_ip.version and (held_ip.is_unspecified or wanted_ip.is_unspecified)


def _parse_port_spec(spec: str) -> tuple[int, str]:
    match = _PORT_SPEC.match(spec)
    if match is None or int(match[1]) > 65535:
        raise DockerError.http(400, f"invalid port specification: {spec!r}")
    return int(match[1]), match[2] or "tcp"


def _free_port(taken: set[int]) -> int:
    """Docker's pick for an empty HostPort: the first free port of the ephemeral range."""
    return next(port for port in EPHEMERAL_PORTS if port not in taken)


# -- Docker's JSON views of a container -------------------------------------------------------


def image_id(image: str) -> str:
    """A stable fake image digest, so ``image_id`` looks like Docker's and repeats per image."""
    return "sha256:" + hashlib.sha256(image.encode()).hexdigest()


def rfc3339(ns: int) -> str:
    """Go's RFC3339Nano (trailing zeros of the fraction trimmed); 0 is Docker's zero time."""
    if not ns:
        return ZERO_TIME
    seconds, fraction = divmod(ns, 1_000_000_000)
    digits = f"{fraction:09d}".rstrip("0")
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{stamp}.{digits}Z" if digits else f"{stamp}Z"


def human_duration(seconds: float) -> str:
    """go-units ``HumanDuration``, which Docker uses for "Up 2 minutes" / "Exited (1) 5 seconds ago"."""
    whole = int(seconds)
    minutes = whole // 60
    hours = round(seconds / 3600)
    if whole < 1:
        return "Less than a second"
    if whole == 1:
        return "1 second"
    if whole < 60:
        return f"{whole} seconds"
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{int(seconds // 3600) // 24 // 365} years"


def status_text(container: Container, now_ns: int) -> str:
    """The ``Status`` column of ``docker ps``."""
    if container.state == "running":
        return f"Up {human_duration((now_ns - container.started_ns) / 1e9)}"
    if container.state == "exited":
        return f"Exited ({container.exit_code}) {human_duration((now_ns - container.finished_ns) / 1e9)} ago"
    return "Created"


def _state(container: Container) -> dict[str, Any]:
    return {
        "Status": container.state,
        "Running": container.running,
        "Paused": False,
        "Restarting": False,
        "OOMKilled": False,
        "Dead": False,
        "Pid": container.pid,
        "ExitCode": container.exit_code,
        "Error": "",
        "StartedAt": rfc3339(container.started_ns),
        "FinishedAt": rfc3339(container.finished_ns),
    }


def _network_ports(container: Container) -> dict[str, list[dict[str, str]]]:
    """Inspect's ``NetworkSettings.Ports``: empty once the container no longer runs."""
    ports: dict[str, list[dict[str, str]]] = {}
    for port in container.published:
        binding = {"HostIp": port.host_ip, "HostPort": str(port.host_port)}
        ports.setdefault(f"{port.container_port}/{port.protocol}", []).append(binding)
    return ports


def _summary(container: Container, now_ns: int) -> dict[str, Any]:
    return {
        "Id": container.id,
        "Names": [f"/{container.name}"],
        "Image": container.image,
        "ImageID": image_id(container.image),
        "Command": container.command,
        "Created": container.created_ns // 1_000_000_000,
        "Ports": [
            {"IP": p.host_ip, "PrivatePort": p.container_port, "PublicPort": p.host_port, "Type": p.protocol}
            for p in container.published
        ],
        "State": container.state,
        "Status": status_text(container, now_ns),
    }
