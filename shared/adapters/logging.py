"""Process-wide logging: Cloud Logging JSON on Google Cloud, readable lines elsewhere, and a
redaction filter in front of both so secrets never reach a log.

google-cloud-logging costs ~375 ms to import, most of a cold start, so it is imported only when
the process runs on Google Cloud. Its StructuredLogHandler reads `traceparent` /
`X-Cloud-Trace-Context` from the Flask request itself, which is how log lines get correlated
with the request's trace.

Redaction is defence in depth: code never logs tokens or env values on purpose, but an
exception message or a library's debug line might quote one. The filter scrubs bearer tokens,
JWT-shaped strings, every configured secret, and secrets registered for the current request
(e.g. the env values of a deploy).
"""

from __future__ import annotations

import contextvars
import logging
import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress

from shared.core.config import Settings

REDACTED = "[REDACTED]"
_PATTERNS = (
    re.compile(r"(?i)(bearer\s+)[^\s,;\"']+"),
    re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*"),
    re.compile(r"sb_(?:secret|publishable)_[A-Za-z0-9_-]{6,}"),
    re.compile(r"(?i)(postgres(?:ql)?://[^:/\s]+:)[^@\s]+(@)"),
)
_process_secrets: set[str] = set()
_request_secrets: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("request_secrets", default=())
_configured = False
# Where request_secrets leaves its values on an exception escaping it (see there).
_EXCEPTION_SECRETS = "_mcp_request_secrets"


# A piece this long of a secret value is treated as the secret itself (see quotes_secret).
SECRET_PIECE = 8
WITHHELD = "[REDACTED: this text quoted part of a secret value]"


def quotes_secret(text: str, secrets: Iterable[str]) -> bool:
    """Whether `text` holds any piece of SECRET_PIECE or more characters of a secret, in any
    letter case: an agent's error that echoes the first 20 characters, or an upper-cased copy, of
    an env value leaks it as surely as an exact copy. One set of the text's windows, then one
    lookup per window of each secret: linear in the sizes, however many secrets there are."""
    pieces = [s.lower() for s in secrets if len(s) >= SECRET_PIECE]
    if not pieces or len(text) < SECRET_PIECE:
        return False
    lowered = text.lower()
    windows = {lowered[i:i + SECRET_PIECE] for i in range(len(lowered) - SECRET_PIECE + 1)}
    return any(piece[i:i + SECRET_PIECE] in windows for piece in pieces
               for i in range(len(piece) - SECRET_PIECE + 1))


def redact(text: str, extra: Iterable[str] = ()) -> str:
    """`text` with every known secret and secret-shaped token replaced; withheld whole when it
    quotes part of a request's secret (a deploy's env values)."""
    for secret in (*_process_secrets, *_request_secrets.get(), *extra):
        if secret and secret in text:
            text = text.replace(secret, REDACTED)
    if quotes_secret(text, (*_request_secrets.get(), *extra)):
        return WITHHELD
    text = _PATTERNS[0].sub(r"\1" + REDACTED, text)
    text = _PATTERNS[1].sub(REDACTED, text)
    text = _PATTERNS[2].sub(REDACTED, text)
    return _PATTERNS[3].sub(r"\1" + REDACTED + r"\2", text)


def register_secrets(values: Iterable[str]) -> None:
    """Secrets known for the life of the process (configuration, derived keys)."""
    _process_secrets.update(v for v in values if v and len(v) >= 4)


@contextmanager
def request_secrets(values: Iterable[str]) -> Iterator[None]:
    """Secrets that exist only for one request (a deploy's env values, a toolbox token)."""
    secrets = tuple(v for v in values if v and len(v) >= 4)
    token = _request_secrets.set(secrets)
    try:
        yield
    except Exception as exc:
        # An unexpected exception is logged with its traceback after this block has ended (by
        # shared.adapters.http.serve), when these secrets are no longer current: it carries them along.
        with suppress(AttributeError):
            setattr(exc, _EXCEPTION_SECRETS, (*getattr(exc, _EXCEPTION_SECRETS, ()), *secrets))
        raise
    finally:
        _request_secrets.reset(token)


class RedactingFilter(logging.Filter):
    """Renders the record's message once, redacted, so handlers never see the raw arguments."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        extra = getattr(record.exc_info[1], _EXCEPTION_SECRETS, ()) if record.exc_info else ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, extra)
        record.msg, record.args = redact(message, extra), None
        fields = getattr(record, "json_fields", None)
        if isinstance(fields, dict):
            record.json_fields = {k: redact(v) if isinstance(v, str) else v for k, v in fields.items()}
        return True


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "json_fields", None)
        if isinstance(fields, dict) and fields.get("request_id"):
            line += f" [req {fields['request_id']}]"
        return line


def _handler(settings: Settings) -> logging.Handler:
    use_json = settings.LOG_FORMAT == "json" or (settings.LOG_FORMAT == "auto" and settings.on_google_cloud)
    if use_json:
        from google.cloud.logging.handlers import StructuredLogHandler

        return StructuredLogHandler(stream=sys.stdout, project_id=settings.GOOGLE_CLOUD_PROJECT)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return handler


def setup_logging(settings: Settings) -> None:
    """Install the handler once per process; later calls only refresh the known secrets."""
    global _configured
    register_secrets(settings.secret_values())
    if _configured:
        return
    root = logging.getLogger()
    handler = _handler(settings)
    handler.addFilter(RedactingFilter())
    root.addHandler(handler)
    root.setLevel(settings.LOG_LEVEL)
    # httpx logs every request URL at INFO; our own lines say what matters.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    # The MCP SDK logs tracebacks quoting what a probed (untrusted) server sent; the probe reports
    # each failure as its own sentence. Not "mcp" itself: the project's loggers share that prefix.
    for sdk in ("mcp.client", "mcp.shared", "mcp.server"):
        logging.getLogger(sdk).setLevel(logging.CRITICAL)
    _configured = True
