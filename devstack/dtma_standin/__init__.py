"""A stand-in for the DTMA agent: a real HTTP server on loopback that behaves like a toolbox.

Each toolbox (droplet) runs the DTMA agent on port 30000; the control plane deploys MCP
servers through it and the agent pushes a heartbeat every 60 s. This package answers the
same requests with the same status codes, content types, JSON bodies and quirks as the
real agent at commit ``82a6bec``, against an in-memory Docker engine, so integration tests,
the local dev stack, demos and load benchmarks need no droplet. Answers recorded from the
real agent live in ``tests/fixtures/real-dtma-*.json``; ``tests/test_standin_vs_real.py``
replays the recorded scenario against the stand-in and fails on any drift.

Quick start::

    from devstack.dtma_standin import StandInAgent

    with StandInAgent("tok", heartbeat_url="http://127.0.0.1:54321/functions/v1") as agent:
        httpx.post(f"{agent.url}/tools", headers={"Authorization": "Bearer tok"}, json={...})

or, from a shell: ``DTMA_AUTH_TOKEN=tok python -m devstack.dtma_standin --port 30000``.

Routes (as the real agent)
    ``GET /health`` (text ``OK``), ``GET /status`` (unauthenticated), and behind
    ``Authorization: Bearer <token>``: ``POST /tools``, ``DELETE /tools/<name>``,
    ``POST /tools/<name>/start``, ``POST /tools/<name>/stop``, ``GET /tools/status``.
    Everything else is 404 ``{"error":"Not Found"}``. The agent's other unauthenticated
    routes (``/restart``, ``/ssh/execute``, ``/diagnostics/*``, ``/mcp/*``) are left out on
    purpose: the control plane must not depend on them.

Reproduced quirks (as the real agent shows them)
    malformed JSON is a 500 even without a token; deploy is synchronous (the pull happens
    inside the request) and answers 201 even when the container exited at once; a second
    stop is a 500 ``(HTTP code 304) container already stopped -  ``; after
    :meth:`StandInAgent.restart_agent` the agent forgets what it deployed (404 on
    stop/start/delete, ``account_tool_instance_id: null`` in ``/tools/status``, 500 name
    conflict on redeploy, 500 "port is already allocated" leaving a ``created`` container);
    the port pre-check sees only the agent's own map, so a container it did not create
    (:meth:`StandInAgent.add_unmanaged_container`) holding a port gives that same 500; an
    error inside a pull's progress stream goes unnoticed until create fails with
    "No such image"; ``/status`` says "healthy" while Docker is down and its ``has*`` flags
    are false (they read environment variables, the token comes from ``/etc/dtma.conf``);
    ``/tools/status`` hard-codes version ``1.0.0`` and port ``30000``; heartbeats list
    *every* container, including the agent's own ``dtma_manager`` and unmanaged ones, and
    never name the toolbox. Docker error texts are dockerode's, trailing space included.

Image conventions (no configuration needed; any other image deploys and runs)
    ``standin/exit-<N>[:tag]``
        the container exits at once with code N (mod 256); deploy still answers 201 with
        ``state.Running: false, Status: "exited", ExitCode: N``; start runs it and it exits again.
    ``standin/pull-denied[:tag]``
        deploy answers 500 at once: ``(HTTP code 404) unexpected - pull access denied for
        standin/pull-denied, repository does not exist or may require 'docker login': ...``.
    ``standin/stream-error[:tag]``
        the pull takes the agent's ``pull_delay``, then fails inside the progress stream,
        which the real agent misses: deploy answers 500 ``(HTTP code 404) no such container
        - No such image: standin/stream-error:latest `` and leaves no container.
    ``standin/slow-<S>[:tag]``
        the pull takes S seconds (instead of the agent's ``pull_delay``).

    Any other name can be given these behaviours: the ``pull_denied_images``,
    ``pull_stream_error_images`` and ``exit_images`` options of :class:`StandInAgent`,
    :meth:`StandInAgent.set_image_behaviour`, ``POST /_standin/images`` or the CLI's
    ``--pull-denied-image``, ``--stream-error-image`` and ``--exit-image IMAGE[=CODE]``.

MCP on the containers' ports
    Every running container created through ``POST /tools`` serves a real MCP server (the ``mcp``
    SDK's, streamable HTTP at ``/mcp`` and SSE at ``/sse``) on its published host port, on loopback,
    until it stops: images named ``no-mcp`` (``example/no-mcp:latest``) answer 404 HTML instead, and
    :meth:`StandInAgent.set_container_mcp` / ``POST /_standin/containers/<n>/mcp`` make a server
    stop answering. The rule, the modes and the knobs: :mod:`devstack.dtma_standin.mcp_servers`.

Control surface
    Besides the Python methods of :class:`StandInAgent`, a running agent serves
    ``/_standin/*`` (see :mod:`devstack.dtma_standin.control`) so that other processes can
    drive it. Those routes are unauthenticated, which is acceptable only because they are
    served solely on loopback binds; on any other address they do not exist.

Secrets
    The token is compared with :func:`hmac.compare_digest`, never logged, and kept out of
    ``repr`` and of the request log. Deployed ``Env`` values stay in memory: they are never
    logged, and ``/_standin/state`` shows variable names only.
"""

from devstack.dtma_standin.agent import ContainerSnapshot, StandInAgent
from devstack.dtma_standin.cli import main
from devstack.dtma_standin.fleet import StandInFleet
from devstack.dtma_standin.heartbeat import HeartbeatScheduler
from devstack.dtma_standin.mcp_servers import McpServerInfo
from devstack.dtma_standin.routes import RequestRecord, Route

__all__ = [
    "ContainerSnapshot",
    "HeartbeatScheduler",
    "McpServerInfo",
    "RequestRecord",
    "Route",
    "StandInAgent",
    "StandInFleet",
    "main",
]
