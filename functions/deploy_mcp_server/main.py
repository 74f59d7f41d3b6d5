"""deploy_mcp_server: the web app deploys an MCP server onto one of the caller's toolboxes.
Supabase user JWT; `POST` JSON (also `supabase.functions.invoke('deploy_mcp_server', {body})`).
The logic is in shared/usecases/deploy.py."""

import flask
import functions_framework

from shared import runtime
from shared.adapters.http import serve
from shared.usecases import deploy

FUNCTION = "deploy_mcp_server"
RUNTIME = runtime.load(FUNCTION)


@functions_framework.http
def deploy_mcp_server(request: flask.Request) -> flask.Response:
    return serve(request, FUNCTION, RUNTIME.settings, lambda call: deploy.handle(call, RUNTIME), methods={"POST"})
