"""mcp_status: the web app reads the caller's MCP servers here (user JWT): effective status,
freshness, endpoint and progress. GET (query parameters or `/<id>`) or POST (what
`supabase.functions.invoke` sends). The logic is in shared/usecases/status.py."""

import flask
import functions_framework

from shared import runtime
from shared.adapters.http import serve
from shared.usecases import status

FUNCTION = "mcp_status"
RUNTIME = runtime.load(FUNCTION)


@functions_framework.http
def mcp_status(request: flask.Request) -> flask.Response:
    return serve(request, FUNCTION, RUNTIME.settings, lambda call: status.handle(call, RUNTIME),
                 methods={"GET", "POST"})
