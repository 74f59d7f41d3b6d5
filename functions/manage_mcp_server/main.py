"""manage_mcp_server: start, stop, restart or remove one of the caller's MCP servers.
`POST /<id>/start|stop|restart`, `DELETE /<id>`, or `POST {instance_id, action}`.
The logic is in shared/usecases/manage.py."""

import flask
import functions_framework

from shared import runtime
from shared.adapters.http import serve
from shared.usecases import manage

FUNCTION = "manage_mcp_server"
RUNTIME = runtime.load(FUNCTION)


@functions_framework.http
def manage_mcp_server(request: flask.Request) -> flask.Response:
    return serve(request, FUNCTION, RUNTIME.settings, lambda call: manage.handle(call, RUNTIME),
                 methods={"POST", "DELETE"})
