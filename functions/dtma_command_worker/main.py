"""dtma_command_worker: Cloud Tasks delivers one agent command here (IAM-private, OIDC token from
the queue's service account, which the function also checks itself: shared/adapters/invoker_auth.py,
WORKER_INVOKER_SA, WORKER_INVOKER_AUDIENCE); it runs the command against the toolbox's DTMA and records
the outcome. The logic is in shared/usecases/commands.py and the SQL functions of 0008_commands.sql."""

import flask
import functions_framework

from shared import runtime
from shared.adapters.http import serve
from shared.usecases import commands

FUNCTION = "dtma_command_worker"
RUNTIME = runtime.load(FUNCTION)


@functions_framework.http
def dtma_command_worker(request: flask.Request) -> flask.Response:
    # No CORS: only the queue calls the worker.
    return serve(request, FUNCTION, RUNTIME.settings, lambda call: commands.handle(call, RUNTIME),
                 methods={"POST"}, cors=False)
