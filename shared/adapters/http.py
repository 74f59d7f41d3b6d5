"""HTTP plumbing shared by every function: routing inside a function, strict JSON bodies, CORS
for supabase-js, request ids, and rendering every outcome in the one error shape.

functions-framework sends every path and method of a deployment to one Python function, and the
same code runs standalone (`/`), mounted in the local stack (`/functions/v1/<name>` or
`/<name>`), and behind Cloud Run's URL. `serve()` hides those differences: handlers see the
path *below* the function, a parsed body, and raise ApiError for anything that is not a
success.
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

import flask
from pydantic_core import from_json, to_json
from werkzeug.exceptions import ClientDisconnected, HTTPException

from shared.core.config import Settings
from shared.core.errors import ApiError, ServiceUnavailable

log = logging.getLogger("mcp.http")

# What supabase-js sends (tests/test_supabase_js.py runs the real client) plus what our API reads. A wildcard
# does not cover `authorization`, so the list is explicit.
ALLOW_HEADERS = ("authorization, x-client-info, apikey, content-type, x-retry-count, idempotency-key, "
                 "x-region, traceparent, tracestate, baggage, x-request-id")
ALLOW_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
EXPOSE_HEADERS = "x-request-id, retry-after"
MAX_JSON_DEPTH = 32
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


@dataclass(frozen=True)
class Reply:
    """A successful answer. `body=None` means no body (e.g. 204, which must carry no JSON type)."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Stream:
    """A streamed success (Server-Sent Events): `chunks` is sent as the client reads it, unbuffered.

    The server closes `chunks` when it ends or when the client goes (the next write fails), and
    closing must release whatever the stream holds: give it a `close()` that works even before
    the first chunk (a generator that never started runs no `finally`). The request's log line is
    written when the stream closes, with its real duration."""

    chunks: Iterable[bytes]
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    mimetype: str = "text/event-stream"


@dataclass
class Call:
    """One request as a handler sees it."""

    request: flask.Request
    settings: Settings
    request_id: str
    path: str
    log_fields: dict[str, Any] = field(default_factory=dict)
    # A routine success (a heartbeat that changed nothing) is logged at DEBUG: at fleet scale one
    # INFO line per beat is most of the log volume, and Cloud Run logs every request anyway.
    routine: bool = False
    # Whether the body was read to its end: if not, the answer closes the connection (see serve).
    body_complete: bool = False

    @property
    def method(self) -> str:
        return self.request.method

    def header(self, name: str) -> str | None:
        return self.request.headers.get(name)

    def json(self, *, required: bool = True) -> Any:
        """The body parsed as strict JSON (see `parse_json`)."""
        raw = read_body(self.request, self.settings.MAX_BODY_BYTES)
        self.body_complete = True
        return decode_json(self.request, raw, required=required)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # dict() in C, and a key-by-key scan only when a key repeated (then the first repeat is named).
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r}")
            seen.add(key)
    return result


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of a parsed value (a scalar is 1, `{"a": 1}` is 2), or the first depth past
    `limit`. Only containers are pushed: a heartbeat's ~300 scalars cost one isinstance each."""
    if not isinstance(value, dict | list):
        return 1
    stack = [(value, 1)]
    deepest = 1
    while stack:
        item, depth = stack.pop()
        if not item:
            continue
        if depth >= deepest:
            deepest = depth + 1
            if deepest > limit:
                return deepest
        for child in item.values() if isinstance(item, dict) else item:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return deepest


def read_body(request: flask.Request, max_bytes: int) -> bytes:
    """The body, at most `max_bytes` of it held in memory at any time.

    A declared length over the limit is refused before a byte is read; a chunked body is counted
    while it is read and cut one byte past the limit. A client that ends the body before its
    declared length (or breaks the chunking) gets a 400: it has usually gone already, but the
    answer and the log then agree on what happened.
    """
    length = request.content_length
    if length is not None and length > max_bytes:
        raise ApiError(413, "payload_too_large", f"request body is larger than {max_bytes} bytes")
    chunks: list[bytes] = []
    total = 0
    try:
        # Streams may answer short reads before their end: read until the end or one past the limit.
        while total <= max_bytes:
            chunk = request.stream.read(max_bytes + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except (ClientDisconnected, OSError, ValueError):
        raise ApiError(400, "incomplete_body", "the request body ended before its declared length "
                       "(or its chunked encoding broke off)") from None
    if total > max_bytes:
        raise ApiError(413, "payload_too_large", f"request body is larger than {max_bytes} bytes")
    if length is not None and total < length:
        # gunicorn hands over its own stream, which ends quietly where werkzeug's would raise.
        raise ApiError(400, "incomplete_body", "the request body ended before its declared length")
    return b"".join(chunks)


def _unstorable(value: Any) -> str | None:
    """The first string (key or value) PostgreSQL's jsonb cannot hold, as a field path.

    jsonb refuses U+0000 and unpaired UTF-16 surrogates, which Python's json module accepts from
    their escapes; letting them through would turn a bad request into a database error."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if "\x00" in item or (not item.isascii() and _has_surrogate(item)):
                return path.lstrip(".") or "body"
        elif isinstance(item, dict):
            for key, child in item.items():
                if "\x00" in key or (not key.isascii() and _has_surrogate(key)):
                    return f"{path}.{key[:40].encode('utf-8', 'replace').decode()}".lstrip(".")
                stack.append((child, f"{path}.{key}"))
        elif isinstance(item, list):
            stack.extend((child, f"{path}[{i}]") for i, child in enumerate(item))
    return None


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


_SLOW = object()
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_INNERMOST = re.compile(rb"\{\}|\[\]")


def _fast_loads(raw: bytes) -> Any:
    """`raw` parsed by pydantic-core's JSON parser (Rust, ~6x faster than `json` with the hooks below),
    or `_SLOW` when the strict path must decide (and word the refusal).

    The parser itself refuses invalid UTF-8, NaN/Infinity, control characters and trailing data. A
    body with a `\\u` escape (the only way to write U+0000 or a lone surrogate) goes the slow way.
    Duplicate keys, which this parser silently collapses, are found by counting colons: outside
    strings, each `:` of a body separates one key from its value, and an escape cannot write a
    colon here (bodies with `\\u` never come this way), so the body has as many colons as the parsed
    value written back as JSON unless a key was repeated.
    """
    if b"\\u" in raw:
        return _SLOW
    try:
        value = from_json(raw, allow_inf_nan=False)
    except ValueError:
        return _SLOW
    if not isinstance(value, dict | list):
        return value if b":" not in raw else _SLOW
    written = to_json(value)
    if raw.count(b":") != written.count(b":"):
        return _SLOW
    # Depth: the value written back has no escaped quote unless a string holds one, so splitting it at
    # quotes leaves the text outside strings; of that, the brackets; each pass below removes the
    # innermost pairs, one nesting level. Near the limit the strict path measures it exactly.
    if b'\\"' in written:
        return _SLOW
    shape = b"".join(written.split(b'"')[0::2]).translate(None, _NOT_BRACKETS)
    levels = 0
    while shape:
        levels += 1
        if levels >= MAX_JSON_DEPTH - 1:
            return _SLOW
        shape = _INNERMOST.sub(b"", shape)
    return value


def decode_json(request: flask.Request, raw: bytes, *, required: bool = True) -> Any:
    """`raw` parsed as JSON, refusing what a lenient parser would let through.

    Refused: bodies that are not UTF-8, use NaN/Infinity, repeat a key (which value would win is
    parser-dependent), nest deeper than any real request does, or hold text jsonb cannot store.
    """
    if not raw.strip():
        if required:
            raise ApiError(400, "invalid_json", "request body must be a JSON object")
        return None
    mimetype = request.mimetype or ""
    if mimetype and mimetype != "application/json" and not mimetype.endswith("+json"):
        raise ApiError(415, "unsupported_media_type", f"Content-Type must be application/json, not {mimetype}")
    fast = _fast_loads(raw)
    if fast is not _SLOW:
        return fast
    try:
        text = raw.decode("utf-8")
        value = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_json", "request body is not valid UTF-8") from None
    except RecursionError:
        raise ApiError(400, "invalid_json", "request body is nested too deeply") from None
    except ValueError as exc:
        raise ApiError(400, "invalid_json", f"request body is not valid JSON: {exc}") from None
    if _depth(value, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise ApiError(400, "invalid_json", f"request body is nested deeper than {MAX_JSON_DEPTH} levels")
    # Only an escape can produce U+0000 or a lone surrogate (raw UTF-8 cannot): skip the walk otherwise.
    if "\\u" in text:
        where = _unstorable(value)
        if where is not None:
            raise ApiError(400, "invalid_json", f"{where}: contains \\u0000 or an unpaired surrogate escape, "
                           "which cannot be stored", {"field": where})
    return value


def parse_json(request: flask.Request, max_bytes: int, *, required: bool = True) -> Any:
    """Read the body (`read_body`) and parse it as strict JSON (`decode_json`)."""
    return decode_json(request, read_body(request, max_bytes), required=required)


def subpath(request: flask.Request, function_name: str) -> str:
    """The path below the function, whichever way the function is mounted."""
    path = request.path or "/"
    for name in {function_name, function_name.replace("_", "-")}:
        for prefix in (f"/functions/v1/{name}", f"/{name}"):
            if path == prefix or path.startswith(prefix + "/"):
                return path[len(prefix):] or "/"
    return path


def cors_headers(request: flask.Request, origins: Collection[str]) -> dict[str, str]:
    """CORS response headers. With an allowlist, only listed origins are echoed back."""
    headers = {"Access-Control-Allow-Headers": ALLOW_HEADERS, "Access-Control-Allow-Methods": ALLOW_METHODS,
               "Access-Control-Expose-Headers": EXPOSE_HEADERS, "Access-Control-Max-Age": "3600"}
    if "*" in origins:
        headers["Access-Control-Allow-Origin"] = "*"
    else:
        origin = request.headers.get("Origin")
        headers["Vary"] = "Origin"
        if origin and origin in origins:
            headers["Access-Control-Allow-Origin"] = origin
    return headers


def _render(status: int, body: Any, headers: dict[str, str]) -> flask.Response:
    if body is None:
        response = flask.Response(status=status, headers=headers)
        # An empty answer must not claim a type: supabase-js tries to parse a JSON-typed 204.
        del response.headers["Content-Type"]
        return response
    payload = json.dumps(body, separators=(",", ":"), default=str)
    return flask.Response(payload, status=status, headers=headers, mimetype="application/json")


# The codes of the refusals functions-framework makes before a function runs (others: bad_request).
FRAMEWORK_ERROR_CODES = {404: "not_found", 405: "method_not_allowed"}


def json_error_pages() -> None:
    """Answer the requests functions-framework refuses before the function runs in the one error
    shape too (a path its route cannot take, such as one holding a newline; `/robots.txt`):
    werkzeug's default is an HTML page. Registered on the app whose context imports the function,
    which is how functions-framework loads it; elsewhere (a plain import) there is no app."""
    if not flask.has_app_context():
        return

    def render(error: HTTPException) -> flask.Response:
        if (error.code or 500) >= 500:
            return error.get_response()  # functions-framework's crash handler keeps its own 500s
        code = FRAMEWORK_ERROR_CODES.get(error.code or 0, "bad_request")
        body = ApiError(error.code or 400, code, f"{error.name.lower()}: no function route takes this request").body()
        return _render(error.code or 400, body, {})

    flask.current_app.register_error_handler(HTTPException, render)


def _seal_body(call: Call, response: flask.Response) -> None:
    """Make sure nothing reads the body after we have answered.

    functions-framework reads the whole body after every answer (its `read_request`
    after_request hook): for a 300 MB body declared to a request refused with 401 or 413, that
    read would be the process's memory, and a client that stops sending would turn our answer into
    a 500. Replacing the request's stream with an empty one makes that read a no-op. A body left
    unread also closes the connection instead of keeping it alive (werkzeug's server honours
    `Connection: close`; gunicorn drains a bounded amount before reusing a connection, or closes).
    """
    request = call.request
    if not call.body_complete and (request.content_length or request.environ.get("wsgi.input_terminated")):
        response.headers["Connection"] = "close"
    request.stream = io.BytesIO()


def serve(
    request: flask.Request,
    function_name: str,
    settings: Settings,
    handler: Callable[[Call], Reply | Stream],
    *,
    methods: Collection[str],
    cors: bool = True,
) -> flask.Response:
    """Run `handler` for one request and render whatever happens.

    OPTIONS is answered before any authentication (a preflight carries no credentials, and
    refusing it blocks every browser call). Unexpected exceptions become a 500 that names the
    request id, with the traceback only in the log.
    """
    started = time.perf_counter()
    incoming = request.headers.get("X-Request-Id", "")
    request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
    headers = {"X-Request-Id": request_id}
    if cors:
        headers.update(cors_headers(request, settings.cors_origins))
    call = Call(request, settings, request_id, subpath(request, function_name))
    streaming = False
    if request.method == "OPTIONS" and cors:
        response = _render(204, None, headers)
    elif request.method not in methods:
        allowed = ", ".join(sorted(methods))
        err = ApiError(405, "method_not_allowed", f"{request.method} is not allowed here; use {allowed}")
        response = _render(err.status, err.body(), {**headers, "Allow": allowed})
    else:
        try:
            reply = handler(call)
            if isinstance(reply, Stream):
                response = flask.Response(reply.chunks, status=reply.status, headers={**headers, **reply.headers},
                                          mimetype=reply.mimetype)
                streaming = True
            else:
                response = _render(reply.status, reply.body, {**headers, **reply.headers})
        except ApiError as err:
            if isinstance(err, ServiceUnavailable):
                log.warning("%s unavailable: %s", function_name, err.message)
            response = _render(err.status, err.body(), {**headers, **err.headers})
        except Exception:
            log.exception("%s failed", function_name, extra={"json_fields": {"request_id": request_id}})
            err = ApiError(500, "internal", f"internal error; quote request id {request_id} when reporting it")
            response = _render(500, err.body(), headers)
    _seal_body(call, response)
    method, status = request.method, response.status_code

    def log_line() -> None:
        elapsed_ms = round((time.perf_counter() - started) * 1000, 2)
        fields = {"request_id": request_id, "function": function_name, "method": method,
                  "path": call.path, "status": status, "duration_ms": elapsed_ms, **call.log_fields}
        level = logging.DEBUG if call.routine and status < 400 else logging.INFO
        log.log(level, "%s %s %s -> %s in %.1f ms", function_name, method, call.path, status,
                elapsed_ms, extra={"json_fields": fields})

    if streaming:
        response.call_on_close(log_line)  # when the stream ends or its client goes
    else:
        log_line()
    return response
