"""mcp_status_sweep: Cloud Scheduler POSTs here (IAM-private, no user JWT) to mark silent toolboxes
unresponsive and fail transitions past their deadline. Besides IAM, the function checks the job's OIDC
token itself (shared/adapters/invoker_auth.py: SWEEP_INVOKER_SA, SWEEP_INVOKER_AUDIENCE). The logic is in
shared/usecases/sweep.py and the SQL function cp_sweep."""

import flask
import functions_framework

from shared import runtime
from shared.adapters.http import serve
from shared.usecases import sweep

FUNCTION = "mcp_status_sweep"
RUNTIME = runtime.load(FUNCTION)


@functions_framework.http
def mcp_status_sweep(request: flask.Request) -> flask.Response:
    # No CORS: no browser ever calls the sweep.
    return serve(request, FUNCTION, RUNTIME.settings, lambda call: sweep.handle(call, RUNTIME),
                 methods={"POST"}, cors=False)
