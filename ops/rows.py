"""Inserting a toolbox row: the one place that knows which columns a toolbox needs.

Operators (`mcp-toolbox register`), the local stack's seed, the tests' factory and the benchmarks
all make toolboxes; they all come through here, so a column added to the table is added once.
(Benchmarks that seed tens of thousands of rows with one `generate_series` statement are the
exception: one round trip per row would make their set-up the slowest part of the run.)
"""

from __future__ import annotations

import uuid
from typing import Any

from shared.core.toolbox_keys import token_digest


def insert_toolbox(conn: Any, *, user_id: str, name: str, toolbox_id: str | None = None, status: str = "active",
                   address: str | None = "127.0.0.1", dtma_port: int | None = None, region: str = "nyc3",
                   size: str = "s-1vcpu-1gb", token: str | None = None, key_version: int = 1,
                   heartbeat_age_seconds: float | None = None, description: str | None = None,
                   droplet_id: int | None = None) -> str:
    """Insert one toolbox and return its id. `token` is stored as its SHA-256 only; a heartbeat age
    of None means it never reported."""
    toolbox_id = toolbox_id or str(uuid.uuid4())
    conn.execute(
        """insert into public.account_tool_environments
             (id, user_id, name, description, do_droplet_id, status, public_ip_address, dtma_port, region_slug,
              size_slug, dtma_token_sha256, dtma_key_version, last_heartbeat_at)
           values (%s, %s, %s, %s, %s, %s, %s::inet, %s, %s, %s, %s, %s,
                   case when %s::float8 is null then null else now() - make_interval(secs => %s::float8) end)""",
        (toolbox_id, user_id, name, description, droplet_id, status, address, dtma_port, region, size,
         token_digest(token) if token else None, key_version, heartbeat_age_seconds, heartbeat_age_seconds))
    return toolbox_id
