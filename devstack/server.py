"""Every function of `functions/` behind ONE local port, routed the way Supabase routes them.

The web app and supabase-js call `<SUPABASE_URL>/functions/v1/<name>`; Cloud Run gives each
function its own URL, where the function sees `/`. Here each function is mounted twice, under
`/functions/v1/<name>` and under `/<name>` (kebab-case spellings too, as deploy.sh names the
Cloud Run services), so an unmodified client only has to change its base URL.

Two traps of functions-framework shape this module:

* `functions_framework.create_app(target, source)` executes `main.py` as a module named
  `main` and leaves it in `sys.modules["main"]`, so five functions collide. Each app keeps a
  reference to its own function (whose globals are its own module), so the collision only
  matters to whoever looks the module up by name: we re-register each module under a unique
  name and check that the app really serves the function it was built for.
* mounted under a prefix, `POST /functions/v1/deploy_mcp_server` reaches the app with an empty
  `PATH_INFO`, which Flask answers with a 308 to the trailing-slash URL. A client that follows
  it re-sends the POST; supabase-js in a browser may not. The dispatcher hands the app `/`
  instead, exactly what Cloud Run hands a function.
"""

from __future__ import annotations

import inspect
import json
import logging
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

log = logging.getLogger("devstack.server")

PREFIX = "/functions/v1"
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


@dataclass(frozen=True)
class Mounted:
    """One function as the dispatcher serves it."""

    name: str
    app: WSGIApp
    module_name: str


def load_function(name: str, functions_dir: Path) -> Mounted:
    """Build the functions-framework app of `functions/<name>/main.py` without name collisions.

    The environment (DATABASE_URL, secrets, ...) must be set before this runs: each main.py
    validates its configuration at import, as a deployed instance does at start.
    """
    from functions_framework import create_app

    source = functions_dir / name / "main.py"
    if not source.is_file():
        raise FileNotFoundError(f"function {name}: {source} does not exist")
    app = create_app(target=name, source=str(source))
    module = sys.modules.pop("main", None)
    module_name = f"mcp_function_{name}"
    if module is not None:
        sys.modules[module_name] = module
    target = getattr(module, name, None)
    declared = getattr(module, "FUNCTION", name)
    if module is None or target is None or declared != name or inspect.unwrap(target).__globals__ is not vars(module):
        raise RuntimeError(f"function {name}: {source} did not load as its own module (declares {declared!r})")
    return Mounted(name=name, app=app, module_name=module_name)


def _json(
    status: str, body: Any, start_response: Callable[..., Any], extra: Mapping[str, str] | None = None
) -> list[bytes]:
    payload = json.dumps(body, indent=2).encode()
    headers = [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(payload))),
        ("Access-Control-Allow-Origin", "*"),
        *(extra or {}).items(),
    ]
    start_response(status, headers)
    return [payload]


class Dispatcher:
    """The one-port WSGI app: functions by name, plus `GET /` (an index) and `GET /openapi.json`.

    Functions are added after the server is bound (`mount`), so the port can be claimed before
    the slower start-up steps; until then a function path answers 503.
    """

    def __init__(self, names: Iterable[str], openapi: Callable[[], Mapping[str, Any]]) -> None:
        self.names = tuple(names)
        self._openapi = openapi
        self._apps: dict[str, WSGIApp] = {}
        self._aliases = {alias: name for name in self.names for alias in (name, name.replace("_", "-"))}
        self.base_url = ""
        #: The web console (devstack.web.WebConsole), set once the demo user exists; its paths never
        #: shadow a function's (functions are routed first).
        self.web: Any = None

    def mount(self, mounted: Mounted) -> None:
        self._apps[mounted.name] = mounted.app

    def route(self, path: str) -> tuple[str, str, str] | None:
        """(function name, mount prefix, path below it) for a function path, else None."""
        mount = ""
        rest = path
        if path == PREFIX or path.startswith(PREFIX + "/"):
            mount, rest = PREFIX, path[len(PREFIX) :]
        segment, _, _ = rest.lstrip("/").partition("/")
        name = self._aliases.get(segment)
        if name is None:
            return None
        prefix = f"{mount}/{segment}"
        return name, prefix, rest[len(f"/{segment}") :]

    def index(self) -> dict[str, Any]:
        base = self.base_url
        return {
            "service": "MCP control plane (local stack)",
            "functions": {
                name: {
                    "url": f"{base}{PREFIX}/{name}",
                    "also": f"{base}/{name}",
                    "loaded": name in self._apps,
                }
                for name in self.names
            },
            "openapi": f"{base}/openapi.json",
            "web_console": f"{base}/",
        }

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        found = self.route(path)
        if found is not None:
            name, prefix, rest = found
            app = self._apps.get(name)
            if app is None:
                return _json(
                    "503 Service Unavailable",
                    _error("starting", f"{name} is still starting"),
                    start_response,
                    {"Retry-After": "1"},
                )
            scoped = dict(environ)
            scoped["SCRIPT_NAME"] = environ.get("SCRIPT_NAME", "") + prefix
            scoped["PATH_INFO"] = rest or "/"  # never empty: Flask would answer 308 (module docstring)
            return app(scoped, start_response)
        method = environ.get("REQUEST_METHOD", "GET")
        if self.web is not None and self.web.handles(path, environ):
            return self.web(environ, start_response)
        if path in ("/", PREFIX, PREFIX + "/") and method in ("GET", "HEAD"):
            return _json("200 OK", self.index(), start_response)
        if path == "/openapi.json" and method in ("GET", "HEAD"):
            return _json("200 OK", self._openapi(), start_response)
        if path in ("/", "/openapi.json", PREFIX, PREFIX + "/"):
            return _json(
                "405 Method Not Allowed",
                _error("method_not_allowed", f"{method} is not allowed here"),
                start_response,
                {"Allow": "GET, HEAD"},
            )
        known = ", ".join(self.names)
        return _json(
            "404 Not Found",
            _error("not_found", f"no function at {path}; functions: {known} (under {PREFIX}/<name> or /<name>)"),
            start_response,
        )


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": {}}}


class _QuietHandler(WSGIRequestHandler):
    """The functions log every request themselves (with request id and timing); one line is enough."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


class HttpServer:
    """A threaded werkzeug server in a background thread, so the main thread keeps signals.

    `shutdown()` from a signal handler would deadlock if the main thread were inside
    `serve_forever()`; here it is called from the main thread while another thread serves.
    """

    def __init__(self, host: str, port: int, app: WSGIApp) -> None:
        self._server: BaseWSGIServer = make_server(host, port, app, threaded=True, request_handler=_QuietHandler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, name="stack-http", daemon=True
        )
        self._closed = False

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()
