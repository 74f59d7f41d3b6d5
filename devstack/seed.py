"""The local stack's identity: its secrets, its demo user and toolbox, and a ready user JWT.

Secrets are generated once and kept in the state directory (`.local/`, git-ignored) so that a
web app `.env` written from `stack.env` keeps working across restarts; the JWT is re-minted at
every start because it expires. Seeding is idempotent: the user is found by its fixed email and
the toolbox by its fixed name, so re-running reuses both (and their ids) instead of piling up
rows.
"""

from __future__ import annotations

import os
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import jwt
import psycopg
from psycopg.types.json import Jsonb

from ops.rows import insert_toolbox
from shared.core.toolbox_keys import derive_key, token_digest

DEMO_EMAIL = "demo@example.test"
DEMO_TOOLBOX_NAME = "demo-toolbox"
SECRETS_FILE = "secrets.env"
# Supabase's access tokens say who issued them; nothing checks it locally (no SUPABASE_URL).
ISSUER = "mcp-control-plane-local"


@dataclass(frozen=True)
class LocalSecrets:
    """What a real deployment keeps in Secret Manager, for this machine only."""

    jwt_secret: str
    dtma_key_secret: str
    idempotency_secret: str


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (blank lines and `#` comments skipped)."""
    values: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, _, value = line.partition("=")
                values[key.strip()] = value.strip()
    return values


def write_env_file(path: Path, values: dict[str, str], header: str) -> None:
    """Write KEY=VALUE lines readable only by the owner (they hold secrets), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    body = "".join(f"# {line}\n" for line in header.splitlines()) + "".join(f"{k}={v}\n" for k, v in values.items())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(body)
    os.replace(tmp, path)


def load_or_create_secrets(state_dir: Path) -> LocalSecrets:
    """The stack's JWT secret, DTMA master secret and idempotency key, generated on first use (>= 32 bytes
    each)."""
    path = state_dir / SECRETS_FILE
    values = read_env_file(path)
    changed = False
    for key in ("SUPABASE_JWT_SECRET", "DTMA_KEY_SECRET", "IDEMPOTENCY_SECRET"):
        if len(values.get(key, "")) < 32:
            values[key] = secrets.token_urlsafe(48)
            changed = True
    if changed:
        write_env_file(path, values, "Secrets of the local stack only (generated once; delete to rotate).")
    return LocalSecrets(jwt_secret=values["SUPABASE_JWT_SECRET"], dtma_key_secret=values["DTMA_KEY_SECRET"],
                        idempotency_secret=values["IDEMPOTENCY_SECRET"])


def mint_jwt(
    secret: str, *, sub: str | None, role: str, email: str | None = None, lifetime_seconds: int = 24 * 3600
) -> str:
    """An HS256 token shaped like a Supabase Auth access token (or, with role `anon`, an anon key)."""
    now = int(time.time())
    claims: dict[str, object] = {
        "iss": ISSUER,
        "iat": now,
        "exp": now + lifetime_seconds,
        "role": role,
        "aud": "authenticated" if role == "authenticated" else role,
    }
    if sub is not None:
        claims.update(
            {
                "sub": sub,
                "email": email or "",
                "aal": "aal1",
                "session_id": str(uuid.uuid4()),
                "app_metadata": {"provider": "email", "providers": ["email"]},
                "user_metadata": {},
                "is_anonymous": False,
            }
        )
    return jwt.encode(claims, secret, algorithm="HS256")


@dataclass(frozen=True)
class Seeded:
    user_id: str
    toolbox_id: str
    toolbox_token: str


def seed(conninfo: str, master_secret: str) -> Seeded:
    """Ensure the demo user and an `active` toolbox at 127.0.0.1 whose token digest matches.

    The toolbox's DTMA port is set later (`set_dtma_port`), once the stand-in has bound one.
    """
    with psycopg.connect(conninfo, autocommit=False) as conn, conn.transaction():
        conn.execute("select pg_advisory_xact_lock(hashtext('devstack.seed'))")
        row = conn.execute("select id from auth.users where email = %s", (DEMO_EMAIL,)).fetchone()
        if row is None:
            row = conn.execute(
                "insert into auth.users (email, raw_user_meta_data) values (%s, %s) returning id",
                (DEMO_EMAIL, Jsonb({"name": "Demo User"})),
            ).fetchone()
        assert row is not None
        user_id = str(row[0])
        box = conn.execute(
            "select id, dtma_key_version from public.account_tool_environments "
            "where user_id = %s and name = %s order by created_at limit 1",
            (user_id, DEMO_TOOLBOX_NAME),
        ).fetchone()
        if box is None:
            version = 1
            toolbox_id = insert_toolbox(conn, user_id=user_id, name=DEMO_TOOLBOX_NAME, region="local", size="standin",
                                        description="DTMA stand-in of the local stack")
        else:
            toolbox_id, version = str(box[0]), int(box[1])
        token = derive_key(master_secret, toolbox_id, version)
        # The master secret may have been regenerated (secrets.env deleted): re-derive every time.
        # Statuses a heartbeat cannot bring back (deprovisioned, ...) are reset to active.
        conn.execute(
            """update public.account_tool_environments
                  set dtma_token_sha256 = %s, public_ip_address = '127.0.0.1',
                      status = case when status in ('active', 'unresponsive') then status else 'active' end
                where id = %s""",
            (token_digest(token), toolbox_id),
        )
    return Seeded(user_id=user_id, toolbox_id=toolbox_id, toolbox_token=token)


def set_dtma_port(conninfo: str, toolbox_id: str, port: int) -> None:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("update public.account_tool_environments set dtma_port = %s where id = %s", (port, toolbox_id))
