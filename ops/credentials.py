"""Issue a toolbox's DTMA credentials: `mcp-toolbox credentials <toolbox-id> [--rotate]`.

(Also installed as `mcp-toolbox-credentials`, with the same arguments.)

Derived mode (default): the key is HMAC(DTMA_KEY_SECRET, toolbox id, key version). The DTMA
build in use reads ONE token, `DTMA_AUTH_TOKEN` in /etc/dtma.conf, for both directions, so that
key is also the toolbox's heartbeat token; the database keeps only its SHA-256. `--rotate` bumps
the key version: the old key stops opening the DTMA (the backend derives the new one) and stops
authenticating heartbeats (its digest is replaced) at the same moment. Without `--rotate` the
same key is printed again (it is derived, not stored), and the digest is refreshed.

Legacy mode (DTMA_KEY_MODE=legacy): the backend sends one global BACKEND_TO_DTMA_API_KEY, so
the heartbeat token must be a separate random per-toolbox token, and only the env-var lineage
of the DTMA (DTMA_BEARER_TOKEN + BACKEND_TO_DTMA_API_KEY) can hold two tokens.

The printed key is not stored anywhere and not logged.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import psycopg

from shared.core.toolbox_keys import derive_key

KEY_MODES = ("derived", "legacy")
HEARTBEAT_PLACEHOLDER = "<URL of the dtma_heartbeat_ingest function>"


@dataclass(frozen=True)
class KeySettings:
    """How toolbox keys are made, read from the environment as the functions read it."""

    mode: str
    master_secret: str | None
    legacy_key: str | None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> KeySettings:
        env = os.environ if environ is None else environ
        return cls(mode=env.get("DTMA_KEY_MODE", "derived").strip().lower() or "derived",
                   master_secret=env.get("DTMA_KEY_SECRET") or None,
                   legacy_key=env.get("BACKEND_TO_DTMA_API_KEY") or None)

    def problem(self) -> str | None:
        """What is missing to issue a key, or None."""
        if self.mode not in KEY_MODES:
            return f"DTMA_KEY_MODE={self.mode!r} is not one of: {', '.join(KEY_MODES)}"
        if self.mode == "derived" and not self.master_secret:
            return ("DTMA_KEY_SECRET is not set (the master secret the functions derive toolbox keys from; "
                    "for the local stack it is in .local/secrets.env)")
        if self.mode == "legacy" and not self.legacy_key:
            return "BACKEND_TO_DTMA_API_KEY is not set (DTMA_KEY_MODE=legacy)"
        return None


def default_heartbeat_url(environ: Mapping[str, str] | None = None) -> str:
    """$HEARTBEAT_FUNCTION_URL, else the local stack's `$FUNCTIONS_URL/dtma_heartbeat_ingest` (stack.env)."""
    env = os.environ if environ is None else environ
    if env.get("HEARTBEAT_FUNCTION_URL"):
        return env["HEARTBEAT_FUNCTION_URL"]
    if env.get("FUNCTIONS_URL"):
        return env["FUNCTIONS_URL"].rstrip("/") + "/dtma_heartbeat_ingest"
    return ""


def issue_in(conn: psycopg.Connection, toolbox_id: str, *, rotate: bool, key_mode: str, master_secret: str | None,
             legacy_key: str | None) -> tuple[str, int]:
    """Record the new token's digest in the caller's transaction; return (token, key version)."""
    row = conn.execute("select dtma_key_version from public.account_tool_environments where id = %s for update",
                       (toolbox_id,)).fetchone()
    if row is None:
        raise LookupError(f"no toolbox {toolbox_id}")
    version = row[0] + 1 if rotate else row[0]
    if key_mode == "derived":
        if not master_secret:
            raise ValueError("DTMA_KEY_SECRET is not set")
        token = derive_key(master_secret, toolbox_id, version)
    elif key_mode == "legacy":
        if not legacy_key:
            raise ValueError("BACKEND_TO_DTMA_API_KEY is not set (DTMA_KEY_MODE=legacy)")
        token = secrets.token_hex(32)
    else:
        raise ValueError(f"DTMA_KEY_MODE={key_mode!r} is not one of: {', '.join(KEY_MODES)}")
    conn.execute("update public.account_tool_environments set dtma_key_version = %s, dtma_token_sha256 = %s "
                 "where id = %s", (version, hashlib.sha256(token.encode()).digest(), toolbox_id))
    return token, version


def issue(conninfo: str, toolbox_id: str, *, rotate: bool, key_mode: str, master_secret: str | None,
          legacy_key: str | None) -> tuple[str, int]:
    """Record the new token's digest (one transaction); return (heartbeat token, key version)."""
    with psycopg.connect(conninfo) as conn, conn.transaction():
        return issue_in(conn, toolbox_id, rotate=rotate, key_mode=key_mode, master_secret=master_secret,
                        legacy_key=legacy_key)


def credential_lines(token: str, key_mode: str, heartbeat_url: str) -> list[str]:
    """What goes onto the toolbox; each value appears once."""
    base = heartbeat_url or HEARTBEAT_PLACEHOLDER
    if key_mode == "derived":
        return [
            "# /etc/dtma.conf on the toolbox (mode 600, owned by the user that runs the agent):",
            f"DTMA_AUTH_TOKEN={token}",
            f"AGENTOPIA_API_BASE_URL={base}",
            "# for the DTMA build that reads environment variables instead: set DTMA_BEARER_TOKEN and",
            "# BACKEND_TO_DTMA_API_KEY both to the DTMA_AUTH_TOKEN value, and the same AGENTOPIA_API_BASE_URL",
        ]
    return [
        "# legacy mode: only the env-var DTMA lineage can hold two tokens",
        f"DTMA_BEARER_TOKEN={token}",
        "BACKEND_TO_DTMA_API_KEY=<the global BACKEND_TO_DTMA_API_KEY>",
        f"AGENTOPIA_API_BASE_URL={base}",
    ]


def main(argv: Sequence[str] | None = None, prog: str = "mcp-toolbox-credentials") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("toolbox_id")
    parser.add_argument("--rotate", action="store_true", help="bump the key version; the old key stops working")
    parser.add_argument("--heartbeat-url", default=default_heartbeat_url(),
                        help="URL of dtma_heartbeat_ingest (AGENTOPIA_API_BASE_URL on the droplet; "
                        "default $HEARTBEAT_FUNCTION_URL, else $FUNCTIONS_URL/dtma_heartbeat_ingest)")
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"),
                        help="PostgreSQL URL (default $DATABASE_URL)")
    args = parser.parse_args(argv)
    if not args.database_url:
        parser.error("no database: pass --database-url or set DATABASE_URL")
    try:
        toolbox_id = str(uuid.UUID(args.toolbox_id))
    except ValueError:
        parser.error(f"{args.toolbox_id!r} is not a toolbox id (a UUID; `mcp-toolbox list` shows them)")
    keys = KeySettings.from_env()
    if (problem := keys.problem()) is not None:
        parser.error(problem)
    try:
        token, version = issue(args.database_url, toolbox_id, rotate=args.rotate, key_mode=keys.mode,
                               master_secret=keys.master_secret, legacy_key=keys.legacy_key)
    except (LookupError, ValueError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except psycopg.OperationalError as exc:
        print(f"{prog}: cannot use the database: {str(exc).strip()}", file=sys.stderr)
        return 1
    print(f"# toolbox {toolbox_id}, key version {version}")
    for line in credential_lines(token, keys.mode, args.heartbeat_url.rstrip("/")):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
