"""``StandInFleet``: many simulated toolboxes in one process, for load tests.

Each agent has its own port, token and engine, exactly like separate droplets; all of
them share one :class:`~devstack.dtma_standin.heartbeat.HeartbeatScheduler`, i.e. one
heartbeat thread and one connection pool. Per agent the cost is one listening socket and
one accept thread (idle in ``select`` until a connection arrives); keep an eye on the
process's open-file limit above a few hundred agents. Unlike a lone :class:`StandInAgent`, fleet
agents serve no MCP on their containers' ports unless ``mcp_servers=True`` (a server costs a thread
per running container, and the agents' containers would compete for the same loopback ports).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Sequence
from typing import Self

from devstack.closing import StartStop
from devstack.dtma_standin.agent import StandInAgent
from devstack.dtma_standin.heartbeat import HeartbeatScheduler

#: Upper bound on agents per fleet, to keep sockets and threads bounded.
MAX_AGENTS = 1000


class StandInFleet(StartStop):
    """``count`` stand-in agents whose heartbeats are all pushed from one scheduler thread.

    Tokens are random (``secrets.token_urlsafe``) unless given; read them back from
    ``fleet[i].token`` to register the toolboxes with the backend. Agent options are
    those of :class:`StandInAgent` and apply to every agent.
    """

    def __init__(
        self,
        count: int,
        *,
        tokens: Sequence[str] | None = None,
        host: str = "127.0.0.1",
        heartbeat_url: str | None = None,
        heartbeat_interval: float = 60.0,
        pull_delay: float = 0.0,
        send_boot_id_seq: bool = False,
        dtma_version: str = "0.1.0",
        unmanaged_containers: int = 0,
        include_self: bool = True,
        mcp_servers: bool = False,
    ) -> None:
        if not 1 <= count <= MAX_AGENTS:
            raise ValueError(f"count must be between 1 and {MAX_AGENTS}")
        if tokens is not None and len(tokens) != count:
            raise ValueError("give exactly one token per agent")
        self._scheduler = HeartbeatScheduler() if heartbeat_url is not None else None
        self._agents = tuple(
            StandInAgent(
                token,
                host=host,
                heartbeat_url=heartbeat_url,
                heartbeat_interval=heartbeat_interval,
                pull_delay=pull_delay,
                send_boot_id_seq=send_boot_id_seq,
                dtma_version=dtma_version,
                unmanaged_containers=unmanaged_containers,
                include_self=include_self,
                scheduler=self._scheduler,
                mcp_servers=mcp_servers,
            )
            for token in (tokens or [secrets.token_urlsafe(32) for _ in range(count)])
        )

    def __len__(self) -> int:
        return len(self._agents)

    def __iter__(self) -> Iterator[StandInAgent]:
        return iter(self._agents)

    def __getitem__(self, index: int) -> StandInAgent:
        return self._agents[index]

    @property
    def agents(self) -> tuple[StandInAgent, ...]:
        """The agents, in creation order."""
        return self._agents

    def start(self) -> Self:
        """Start every agent; if one fails to bind, the ones already started are stopped again."""
        try:
            for agent in self._agents:
                agent.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every agent, then the shared heartbeat thread; idempotent."""
        for agent in self._agents:
            agent.stop()
        if self._scheduler is not None:
            self._scheduler.close()

