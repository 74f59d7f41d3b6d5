"""Logs: Cloud Logging JSON with trace correlation on Google Cloud, and no secrets anywhere."""

from __future__ import annotations

import io
import json
import logging

import flask
import pytest

from shared.adapters import logging as mcp_logging
from shared.core.config import load_settings


@pytest.fixture
def capture() -> io.StringIO:
    return io.StringIO()


def install(fmt: str, stream: io.StringIO) -> logging.Handler:
    """The production handler and filter (as setup_logging builds them), writing to `stream`."""
    settings = load_settings(environ={"LOG_FORMAT": fmt, "GOOGLE_CLOUD_PROJECT": "proj-1",
                                      "DTMA_KEY_SECRET": "configured-master-secret"})
    handler = mcp_logging._handler(settings)
    handler.setStream(stream)
    handler.addFilter(mcp_logging.RedactingFilter())
    mcp_logging.register_secrets(settings.secret_values())
    logger = logging.getLogger("test.logging." + fmt)
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return handler


def test_json_lines_carry_severity_fields_and_the_trace(capture: io.StringIO) -> None:
    install("json", capture)
    app = flask.Flask("t")
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    with app.test_request_context(headers={"traceparent": f"00-{trace}-00f067aa0ba902b7-01"}):
        logging.getLogger("test.logging.json").warning("deploy failed", extra={"json_fields": {"toolbox_id": "t1"}})
    lines = [json.loads(line) for line in capture.getvalue().splitlines() if line.strip().startswith("{")]
    record = next(line for line in lines if line.get("message") == "deploy failed")
    assert record["severity"] == "WARNING" and record["toolbox_id"] == "t1"
    assert record["logging.googleapis.com/trace"] == f"projects/proj-1/traces/{trace}"


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_secrets_are_redacted_in_both_formats(capture: io.StringIO, fmt: str) -> None:
    install(fmt, capture)
    log = logging.getLogger("test.logging." + fmt)
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.c2lnbmF0dXJlLXZhbHVl"
    with mcp_logging.request_secrets(["ghp_per_request_env_value"]):
        log.info("auth header Bearer abcdef0123456789 and %s", jwt)
        log.info("env ghp_per_request_env_value and configured-master-secret and postgres://u:pw123@db/x")
        try:
            raise RuntimeError("failed with sb_secret_abcdefghijkl")
        except RuntimeError:
            log.exception("boom")
    out = capture.getvalue()
    for secret in ("abcdef0123456789", jwt, "ghp_per_request_env_value", "configured-master-secret", "pw123",
                   "sb_secret_abcdefghijkl"):
        assert secret not in out, secret
    assert out.count(mcp_logging.REDACTED) >= 6


def test_request_secrets_do_not_outlive_the_request() -> None:
    with mcp_logging.request_secrets(["short-lived-secret"]):
        assert mcp_logging.redact("x short-lived-secret") == f"x {mcp_logging.REDACTED}"
    assert mcp_logging.redact("x short-lived-secret") == "x short-lived-secret"
