"""mcp_status: the caller's MCP servers as the web app shows them, truthfully.

Answers `{"servers": [...], "next_cursor": str|null, "as_of": ts}` for a list and
`{"server": {...}, "as_of": ts}` for one id; a server that does not exist or is not the caller's
is the same 404. Without `refresh` that is ONE database round trip (`cp_list_mcp_servers`). The
request is parsed in status_query.py, the answer rendered by view.py, and `refresh=true` reads the
agents in refresh.py.
"""

from __future__ import annotations

from typing import Any

from shared.adapters.auth import authenticate
from shared.adapters.db import Database
from shared.adapters.http import Call, Reply, Stream
from shared.usecases import watch
from shared.usecases.ports import Ports
from shared.usecases.refresh import refresh
from shared.usecases.status_query import Query, encode_cursor, parse_query
from shared.usecases.toolboxes import list_toolboxes
from shared.usecases.view import server_json


def _read(db: Database, user_id: str, query: Query) -> dict[str, Any]:
    return db.call("cp_list_mcp_servers", p_user_id=user_id, p_id=query.id, p_toolbox_id=query.toolbox_id,
                   p_status=query.status, p_limit=query.limit, p_cursor=query.cursor)


def handle(call: Call, ports: Ports) -> Reply | Stream:
    """Authenticate, validate, read (and refresh), render."""
    user = authenticate(call.header("Authorization"), ports.verifier)
    if call.path.strip("/") == "toolboxes":
        if call.method == "POST":
            call.json(required=False)  # nothing to read, but the body must be well-formed
        call.log_fields["user_id"] = user.user_id
        return Reply(200, list_toolboxes(ports.db, user.user_id, ports.settings))
    query = parse_query(call)
    if query.watch:
        return watch.handle(call, ports, user.user_id, query)
    page = _read(ports.db, user.user_id, query)
    refreshed = None
    if query.refresh and page["items"]:
        refreshed = refresh(page["items"], user.user_id, ports)
        page = _read(ports.db, user.user_id, query)
    servers = [server_json(row, ports.settings) for row in page["items"]]
    call.log_fields.update({"user_id": user.user_id, "servers": len(servers), "refresh": query.refresh})
    if query.id:
        body: dict[str, Any] = {"server": servers[0], "as_of": page["now"]}
    else:
        body = {"servers": servers, "next_cursor": encode_cursor(page["next_cursor"]), "as_of": page["now"]}
    if query.refresh:
        body["refresh"] = refreshed or {}
    return Reply(200, body)
