"""Issue a toolbox's DTMA credentials: `mcp-toolbox-credentials <toolbox-id> [--rotate]`.

Derived mode (default): the key is HMAC(DTMA_KEY_SECRET, toolbox id, key version). The DTMA
build in use reads ONE token, `DTMA_AUTH_TOKEN` in /etc/dtma.conf, for both directions
(reference §3.8-3.9), so that key is also the toolbox's heartbeat token; the database keeps
only its SHA-256. `--rotate` bumps the key version: the old key stops opening the DTMA (the
backend derives the new one) and stops authenticating heartbeats (its digest is replaced) at
the same moment.

Legacy mode (DTMA_KEY_MODE=legacy): the backend sends one global BACKEND_TO_DTMA_API_KEY, so
the heartbeat token must be a separate random per-toolbox token, and only the env-var lineage
of the DTMA (DTMA_BEARER_TOKEN + BACKEND_TO_DTMA_API_KEY) can hold two tokens.

The printed key is the only copy: it is not stored anywhere and not logged.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import sys
from collections.abc import Sequence

import psycopg

from shared.toolbox_keys import derive_key


def issue(conninfo: str, toolbox_id: str, *, rotate: bool, key_mode: str, master_secret: str | None,
          legacy_key: str | None) -> tuple[str, int]:
    """Record the new token's digest; return (heartbeat token, key version)."""
    with psycopg.connect(conninfo) as conn, conn.transaction():
        row = conn.execute("select dtma_key_version from public.account_tool_environments where id = %s for update",
                           (toolbox_id,)).fetchone()
        if row is None:
            raise LookupError(f"no toolbox {toolbox_id}")
        version = row[0] + 1 if rotate else row[0]
        if key_mode == "derived":
            if not master_secret:
                raise ValueError("DTMA_KEY_SECRET is not set")
            token = derive_key(master_secret, toolbox_id, version)
        else:
            if not legacy_key:
                raise ValueError("BACKEND_TO_DTMA_API_KEY is not set (DTMA_KEY_MODE=legacy)")
            token = secrets.token_hex(32)
        conn.execute("update public.account_tool_environments set dtma_key_version = %s, dtma_token_sha256 = %s "
                     "where id = %s", (version, hashlib.sha256(token.encode()).digest(), toolbox_id))
    return token, version


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mcp-toolbox-credentials", description=__doc__.split("\n\n")[0])
    parser.add_argument("toolbox_id")
    parser.add_argument("--rotate", action="store_true", help="bump the key version; the old key stops working")
    parser.add_argument("--heartbeat-url", default=os.environ.get("HEARTBEAT_FUNCTION_URL", ""),
                        help="URL of dtma_heartbeat_ingest (AGENTOPIA_API_BASE_URL on the droplet)")
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"))
    args = parser.parse_args(argv)
    if not args.database_url:
        parser.error("no database: pass --database-url or set DATABASE_URL")
    mode = os.environ.get("DTMA_KEY_MODE", "derived")
    legacy = os.environ.get("BACKEND_TO_DTMA_API_KEY")
    try:
        token, version = issue(args.database_url, args.toolbox_id, rotate=args.rotate, key_mode=mode,
                               master_secret=os.environ.get("DTMA_KEY_SECRET"), legacy_key=legacy)
    except (LookupError, ValueError) as exc:
        print(f"mcp-toolbox-credentials: {exc}", file=sys.stderr)
        return 1
    base = args.heartbeat_url or "<URL of the dtma_heartbeat_ingest function>"
    print(f"# toolbox {args.toolbox_id}, key version {version}")
    if mode == "derived":
        print("# /etc/dtma.conf (chmod 600) for the DTMA that reads its config file:")
        print(f"DTMA_AUTH_TOKEN={token}")
        print(f"AGENTOPIA_API_BASE_URL={base}")
        print("# environment form, for the DTMA lineage that reads env vars:")
        print(f"DTMA_BEARER_TOKEN={token}")
        print(f"BACKEND_TO_DTMA_API_KEY={token}")
    else:
        print("# legacy mode: only the env-var DTMA lineage can hold two tokens")
        print(f"DTMA_BEARER_TOKEN={token}")
        print("BACKEND_TO_DTMA_API_KEY=<the global BACKEND_TO_DTMA_API_KEY>")
    print(f"AGENTOPIA_API_BASE_URL={base}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
