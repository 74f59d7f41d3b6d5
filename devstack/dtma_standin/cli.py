"""Command line: run one stand-in DTMA until SIGINT or SIGTERM.

    DTMA_AUTH_TOKEN=... python -m devstack.dtma_standin --port 30000 \\
        --heartbeat-url http://127.0.0.1:54321/functions/v1 --interval 60

Prefer the ``DTMA_AUTH_TOKEN`` environment variable to ``--token``: command lines are
visible to every user in ``ps``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence

from devstack.dtma_standin.agent import StandInAgent
from devstack.dtma_standin.mcp_servers import MODES

AUTH_ENV_VAR = "DTMA_AUTH_TOKEN"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m devstack.dtma_standin`` and ``mcp-dtma-standin``; returns the exit code."""
    args = _parser().parse_args(argv)
    token = args.token or os.environ.get(AUTH_ENV_VAR, "")
    if not token:
        print(f"dtma-standin: no token; set {AUTH_ENV_VAR} (or pass --token)", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    stop_requested = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda _signum, _frame: stop_requested.set())
    try:
        agent = StandInAgent(
            token,
            host=args.host,
            port=args.port,
            pull_delay=args.pull_delay,
            heartbeat_url=args.heartbeat_url,
            heartbeat_interval=args.interval,
            send_boot_id_seq=args.boot_seq,
            unmanaged_containers=args.unmanaged,
            pull_denied_images=args.pull_denied_image,
            pull_stream_error_images=args.stream_error_image,
            exit_images=dict(args.exit_image),
            mcp_servers=not args.no_mcp_servers,
            mcp_images=dict(args.mcp_image),
        ).start()
    except (ValueError, OSError) as error:
        print(f"dtma-standin: {error}", file=sys.stderr)
        return 1
    try:
        print(f"DTMA stand-in listening on {agent.url}", flush=True)
        stop_requested.wait()
    finally:
        agent.stop()
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m devstack.dtma_standin",
        description="A stand-in for the DTMA agent of one toolbox, for local development and tests.",
    )
    parser.add_argument("--token", help=f"DTMA_AUTH_TOKEN (default: ${AUTH_ENV_VAR}; prefer the variable)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument(
        "--port", type=int, default=30000, help="port to bind, 0 for any (default: %(default)s)"
    )
    parser.add_argument(
        "--heartbeat-url",
        help="backend base URL (AGENTOPIA_API_BASE_URL); heartbeats are posted to <URL>/heartbeat",
    )
    parser.add_argument(
        "--interval", type=_positive, default=60.0, help="seconds between heartbeats (default: %(default)s)"
    )
    parser.add_argument(
        "--pull-delay",
        type=_non_negative,
        default=0.0,
        help="seconds each image pull takes (default: %(default)s)",
    )
    parser.add_argument("--boot-seq", action="store_true", help="add boot_id and seq to heartbeats")
    parser.add_argument(
        "--unmanaged",
        type=_count,
        default=0,
        help="extra containers not deployed through the API (default: 0)",
    )
    parser.add_argument(
        "--pull-denied-image",
        action="append",
        default=[],
        metavar="IMAGE",
        help="pulls of IMAGE (no tag: any tag) fail at once with 404 'pull access denied'; repeatable",
    )
    parser.add_argument(
        "--stream-error-image",
        action="append",
        default=[],
        metavar="IMAGE",
        help="pulls of IMAGE report an error inside the progress stream, so deploy fails 'No such image'",
    )
    parser.add_argument(
        "--exit-image",
        action="append",
        default=[],
        type=_exit_image,
        metavar="IMAGE[=CODE]",
        help="containers of IMAGE exit at once after start with CODE (default 1); repeatable",
    )
    parser.add_argument(
        "--mcp-image",
        action="append",
        default=[],
        type=_mcp_image,
        metavar="IMAGE=MODE",
        help="what running containers of IMAGE serve on their host port: serve (a real MCP server), not-mcp "
        "(404 HTML), hang (never answers) or closed (nothing listens); repeatable",
    )
    parser.add_argument(
        "--no-mcp-servers", action="store_true", help="serve nothing on the containers' host ports"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log requests and heartbeats")
    return parser


def _exit_image(text: str) -> tuple[str, int]:
    image, _, code = text.partition("=")
    if not image:
        raise argparse.ArgumentTypeError("needs an image name")
    try:
        exit_code = int(code) if code else 1
    except ValueError:
        raise argparse.ArgumentTypeError(f"exit code must be an integer, got {code!r}") from None
    if not 0 <= exit_code <= 255:
        raise argparse.ArgumentTypeError("exit code must be 0-255")
    return image, exit_code


def _mcp_image(text: str) -> tuple[str, str]:
    image, _, mode = text.partition("=")
    if not image or mode not in MODES:
        raise argparse.ArgumentTypeError(f"expected IMAGE=MODE with MODE one of {', '.join(MODES)}")
    return image, mode


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value
