"""dtma_heartbeat_ingest: DTMA agents push their heartbeat here, on any path below the function
(the agent posts to `<AGENTOPIA_API_BASE_URL>/heartbeat`). Authenticated by the toolbox token;
answers 204 like the original. The logic is in shared/usecases/heartbeat.py."""

import flask
import functions_framework

from shared import runtime
from shared.adapters.http import serve
from shared.usecases import heartbeat

FUNCTION = "dtma_heartbeat_ingest"
RUNTIME = runtime.load(FUNCTION)


@functions_framework.http
def dtma_heartbeat_ingest(request: flask.Request) -> flask.Response:
    return serve(request, FUNCTION, RUNTIME.settings, lambda call: heartbeat.handle(call, RUNTIME),
                 methods={"POST"})
