"""The web console (web/) as the local stack serves it, and the sign-in it needs.

The console is static files; what differs between the local stack and production is only where
things are, so the page reads `/config.json` at start. Here that file is generated: the stack's
base URL as the Supabase URL, its anon key, its functions' base URL, Realtime off (the stack has
no Realtime server, so the console uses the mcp_status watch stream).

Sign-in: supabase-js's `auth.signInWithPassword` posts to `<supabaseUrl>/auth/v1/token?grant_type=
password`. The stack has no GoTrue, so this module answers the few GoTrue calls the console makes
(password and refresh-token grants, `GET /user`, `POST /logout`) for the seeded demo user only,
with a password generated once into `.local/secrets.env` and printed in the banner. Its access
tokens are minted exactly as DEMO_USER_JWT is (devstack.seed.mint_jwt), so the functions verify
them as they verify Supabase's. Anything else under `/auth/v1` answers GoTrue's error shape
saying it is not served locally, rather than pretending.
"""

from __future__ import annotations

import hmac
import json
import mimetypes
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
from werkzeug.exceptions import NotFound
from werkzeug.utils import send_from_directory
from werkzeug.wrappers import Request, Response

from devstack import seed

ROOT = Path(__file__).resolve().parents[1]
WEB_DIR = ROOT / "web"
#: The only file of node_modules the page loads: supabase-js's browser bundle (a global `supabase`).
SUPABASE_BUNDLE = "node_modules/@supabase/supabase-js/dist/umd/supabase.js"
#: Top-level files of web/ the page is made of; package.json and the rest are not served.
STATIC_SUFFIXES = (".html", ".js", ".css", ".svg", ".ico")
AUTH_PREFIX = "/auth/v1"
ACCESS_TOKEN_SECONDS = 3600
REFRESH_TOKEN_SECONDS = 7 * 24 * 3600
PASSWORD_KEY = "DEMO_USER_PASSWORD"  # noqa: S105 - the name of the secrets.env key, not a password
CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Allow-Headers": "apikey, authorization, content-type, x-client-info, x-supabase-api-version",
    "Access-Control-Max-Age": "600",
}

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def demo_password(state_dir: Path) -> str:
    """The demo user's password, generated once into secrets.env (kept across restarts, so a browser's
    saved password keeps working; delete the line to rotate it)."""
    path = state_dir / seed.SECRETS_FILE
    values = seed.read_env_file(path)
    if len(values.get(PASSWORD_KEY, "")) < 16:
        values[PASSWORD_KEY] = secrets.token_urlsafe(18)
        seed.write_env_file(path, values, "Secrets of the local stack only (generated once; delete to rotate).")
    return values[PASSWORD_KEY]


def bundle_missing() -> str | None:
    """A sentence saying how to install supabase-js for the console, or None when it is there."""
    if (WEB_DIR / SUPABASE_BUNDLE).is_file():
        return None
    return "web/node_modules is missing: run `npm ci` in web/ (Node.js >= 20) so the console can load supabase-js"


@dataclass(frozen=True)
class DemoUser:
    """Who may sign in locally, and with what."""

    user_id: str
    email: str
    password: str


class WebConsole:
    """Serves web/, `/config.json` and the demo user's GoTrue-compatible sign-in."""

    def __init__(self, *, base_url: str, anon_key: str, jwt_secret: str, user: DemoUser,
                 web_dir: Path = WEB_DIR) -> None:
        self.base_url = base_url
        self.anon_key = anon_key
        self.jwt_secret = jwt_secret
        self.user = user
        self.web_dir = web_dir
        self._refresh: dict[str, float] = {}  # refresh token -> expiry (monotonic); in memory: a restart signs out
        self._lock = threading.Lock()
        self._started = datetime.now(UTC).isoformat()

    def config(self) -> dict[str, Any]:
        """What the page needs to know about where it runs (docs/web-console.md lists the keys)."""
        return {
            "supabaseUrl": self.base_url,
            "supabaseAnonKey": self.anon_key,
            "functionsUrl": f"{self.base_url}/functions/v1",
            "realtime": False,
            "environment": "local",
            "signInHint": f"Local stack: sign in as {self.user.email} with the password the stack printed "
                          f"({PASSWORD_KEY} in .local/secrets.env).",
            "defaultEmail": self.user.email,
        }

    def handles(self, path: str, environ: dict[str, Any]) -> bool:
        """Whether a path is the console's. `/` is, for a browser (it asks for text/html); a program asking
        `/` for anything else still gets the stack's JSON index."""
        if path == "/":
            return "text/html" in environ.get("HTTP_ACCEPT", "")
        if path in ("/index.html", "/config.json", f"/{SUPABASE_BUNDLE}"):
            return True
        if path == AUTH_PREFIX or path.startswith(AUTH_PREFIX + "/"):
            return True
        name = path.lstrip("/")
        return "/" not in name and name.endswith(STATIC_SUFFIXES) and (self.web_dir / name).is_file()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        request = Request(environ)
        response = self._respond(request)
        return response(environ, start_response)

    def _respond(self, request: Request) -> Response:
        path = request.path
        if path == AUTH_PREFIX or path.startswith(AUTH_PREFIX + "/"):
            return self._auth(request, path[len(AUTH_PREFIX):])
        if request.method not in ("GET", "HEAD"):
            return _json(405, {"error": {"code": "method_not_allowed", "message": f"{request.method} is not allowed "
                                         "here", "details": {}}}, {"Allow": "GET, HEAD"})
        if path == "/config.json":
            return _json(200, self.config(), {"Cache-Control": "no-store"})
        name = "index.html" if path == "/" else path.lstrip("/")
        if name == SUPABASE_BUNDLE and bundle_missing():
            return _json(404, {"error": {"code": "not_found", "message": bundle_missing(), "details": {}}})
        try:
            response = send_from_directory(self.web_dir, name, request.environ, max_age=0)
        except NotFound:
            return _json(404, {"error": {"code": "not_found", "message": f"no file {path} in web/", "details": {}}})
        if name.endswith(".js"):  # ES modules must be served as JavaScript, whatever the system's mime table says
            response.mimetype = "text/javascript"
        response.headers["Cache-Control"] = "no-cache"
        return response

    # --- GoTrue, the few calls the console makes -------------------------------------------------------
    def _auth(self, request: Request, route: str) -> Response:
        if request.method == "OPTIONS":
            return Response(status=204, headers=CORS_HEADERS)
        if route == "/token" and request.method == "POST":
            grant = request.args.get("grant_type", "")
            body = request.get_json(silent=True)
            if not isinstance(body, dict):
                return _gotrue_error(400, "bad_json", "the body must be a JSON object")
            if grant == "password":
                return self._password_grant(body)
            if grant == "refresh_token":
                return self._refresh_grant(body)
            return _gotrue_error(400, "unsupported_grant_type",
                                 f"grant_type {grant!r} is not served by the local stack (password, refresh_token)")
        if route == "/user" and request.method == "GET":
            claims = self._claims(request)
            if claims is None:
                return _gotrue_error(401, "bad_jwt", "invalid JWT: sign in again")
            return _json(200, self._user_json(), CORS_HEADERS)
        if route == "/logout" and request.method == "POST":
            # Every refresh token of the demo user goes: the local stack has one user and no sessions table.
            with self._lock:
                self._refresh.clear()
            return Response(status=204, headers=CORS_HEADERS)
        return _gotrue_error(404, "not_found", f"{request.method} {AUTH_PREFIX}{route} is not served by the local "
                             "stack: it answers sign-in with a password, token refresh, /user and /logout only")

    def _password_grant(self, body: dict[str, Any]) -> Response:
        email = str(body.get("email") or "").strip().lower()
        password = str(body.get("password") or "")
        if not email or not password:
            return _gotrue_error(400, "validation_failed", "an email and a password are required")
        good_email = hmac.compare_digest(email.encode(), self.user.email.lower().encode())
        good_password = hmac.compare_digest(password.encode(), self.user.password.encode())
        if not (good_email and good_password):
            return _gotrue_error(400, "invalid_credentials", "Invalid login credentials")
        return _json(200, self._session(), CORS_HEADERS)

    def _refresh_grant(self, body: dict[str, Any]) -> Response:
        token = str(body.get("refresh_token") or "")
        now = time.monotonic()
        with self._lock:
            expiry = self._refresh.pop(token, None)
            self._refresh = {t: e for t, e in self._refresh.items() if e > now}
        if expiry is None or expiry <= now:
            return _gotrue_error(400, "refresh_token_not_found", "Invalid Refresh Token: Refresh Token Not Found")
        return _json(200, self._session(), CORS_HEADERS)

    def _session(self) -> dict[str, Any]:
        refresh = secrets.token_urlsafe(24)
        with self._lock:
            self._refresh[refresh] = time.monotonic() + REFRESH_TOKEN_SECONDS
        access = seed.mint_jwt(self.jwt_secret, sub=self.user.user_id, role="authenticated", email=self.user.email,
                               lifetime_seconds=ACCESS_TOKEN_SECONDS)
        return {
            "access_token": access,
            "token_type": "bearer",
            "expires_in": ACCESS_TOKEN_SECONDS,
            "expires_at": int(time.time()) + ACCESS_TOKEN_SECONDS,
            "refresh_token": refresh,
            "user": self._user_json(),
        }

    def _user_json(self) -> dict[str, Any]:
        return {
            "id": self.user.user_id,
            "aud": "authenticated",
            "role": "authenticated",
            "email": self.user.email,
            "email_confirmed_at": self._started,
            "phone": "",
            "app_metadata": {"provider": "email", "providers": ["email"]},
            "user_metadata": {},
            "identities": [],
            "created_at": self._started,
            "updated_at": self._started,
            "is_anonymous": False,
        }

    def _claims(self, request: Request) -> dict[str, Any] | None:
        header = request.headers.get("Authorization", "")
        if not header.lower().startswith("bearer "):
            return None
        try:
            claims = jwt.decode(header[7:].strip(), self.jwt_secret, algorithms=["HS256"], audience="authenticated")
        except jwt.PyJWTError:
            return None
        return claims if claims.get("sub") == self.user.user_id else None


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body, indent=2), status=status, headers=headers or {}, mimetype="application/json")


def _gotrue_error(status: int, code: str, message: str) -> Response:
    """GoTrue's error body, which auth-js turns into an AuthApiError carrying `message` and `code`."""
    return _json(status, {"code": status, "error_code": code, "msg": message}, CORS_HEADERS)


mimetypes.add_type("text/javascript", ".js")
