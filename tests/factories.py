"""Test data: users, toolboxes with real credentials, instances in any status.

Rows are inserted directly (as the table owner) because they are the *arrangement* of a
test; the behaviour under test always goes through the SQL functions or the HTTP functions.
"""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from ops.rows import insert_toolbox
from shared.core.toolbox_keys import derive_key

MASTER_SECRET = "test-master-secret-for-dtma-keys-0123456789"
IDEMPOTENCY_SECRET = "test-idempotency-secret-0123456789abcdef"
GENERIC_MCP_CATALOG_ID = "00000000-0000-0000-0000-000000000001"
_counter = itertools.count(1)


@dataclass
class Toolbox:
    id: str
    user_id: str
    token: str
    ip: str
    port: int | None


class Factory:
    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn

    def user(self, email: str | None = None) -> str:
        n = next(_counter)
        row = self.conn.execute("insert into auth.users (email) values (%s) returning id",
                                (email or f"user{n}@example.test",)).fetchone()
        return str(row[0])

    def toolbox(self, user_id: str | None = None, *, status: str = "active", ip: str | None = "127.0.0.1",
                port: int | None = None, heartbeat_age_seconds: float | None = 5, key_version: int = 1,
                name: str | None = None) -> Toolbox:
        user_id = user_id or self.user()
        toolbox_id = str(uuid.uuid4())
        token = derive_key(MASTER_SECRET, toolbox_id, key_version)
        insert_toolbox(self.conn, toolbox_id=toolbox_id, user_id=user_id, name=name or f"toolbox-{toolbox_id[:8]}",
                       status=status, address=ip, dtma_port=port, token=token, key_version=key_version,
                       heartbeat_age_seconds=heartbeat_age_seconds)
        return Toolbox(toolbox_id, user_id, token, ip or "", port)

    def instance(self, toolbox: Toolbox, *, status: str = "running", name: str | None = None,
                 host_port: int | None = None, mcp: bool = True, **columns: Any) -> str:
        n = next(_counter)
        values = {
            "account_tool_environment_id": toolbox.id,
            "tool_catalog_id": GENERIC_MCP_CATALOG_ID,
            "status_on_toolbox": status,
            "instance_name_on_toolbox": name or f"mcp-server-{n}",
            "host_port": host_port if host_port is not None else 49152 + n % 800,
            "container_port": 8080,
            "docker_image_url": "mcp/everything:latest",
            "mcp_server_type": "mcp_server" if mcp else None,
            "mcp_transport_type": "streamable_http" if mcp else None,
            "mcp_endpoint_path": "/mcp" if mcp else None,
            **columns,
        }
        values = {k: Jsonb(v) if isinstance(v, dict | list) and k != "env_var_names" else v
                  for k, v in values.items()}
        cols = ", ".join(values)
        marks = ", ".join(["%s"] * len(values))
        row = self.conn.execute(f"insert into public.account_tool_instances ({cols}) values ({marks}) returning id",
                                list(values.values())).fetchone()
        return str(row[0])

    def status_of(self, instance_id: str) -> str | None:
        row = self.conn.execute("select status_on_toolbox::text from public.account_tool_instances where id = %s",
                                (instance_id,)).fetchone()
        return row[0] if row else None

    def events(self, instance_id: str) -> list[tuple[str | None, str | None, str, str]]:
        return self.conn.execute(
            """select from_status::text, to_status::text, source::text, message
                 from public.account_tool_instance_events where account_tool_instance_id = %s order by id""",
            (instance_id,)).fetchall()
