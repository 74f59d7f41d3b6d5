"""`Idempotency-Key` for the write functions: the same key from the same user within the TTL
gets the first answer again, with no second instance and no second DTMA call, even when the
two requests race (the database's primary key decides who runs; the others wait for its
answer, then replay it).

The request fingerprint is an HMAC, not a plain hash: bodies carry env values, which are
secrets, and a plain SHA-256 of a short secret can be brute-forced from the table.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable
from typing import Any

from pydantic import SecretStr

from shared.adapters.db import Database
from shared.adapters.http import Call, Reply
from shared.core.config import Settings
from shared.core.errors import ApiError

HEADER = "Idempotency-Key"
REPLAY_HEADER = "Idempotent-Replayed"
_POLL_SECONDS = 0.05


def _key(call: Call) -> str | None:
    key = call.header(HEADER)
    if key is None:
        return None
    if not (1 <= len(key) <= 255) or not key.isascii() or not key.isprintable():
        raise ApiError(400, "invalid_idempotency_key", f"{HEADER} must be 1-255 printable ASCII characters")
    return key


def fingerprint(secret: SecretStr, call: Call, body: Any) -> str:
    key = hashlib.sha256(b"idempotency:" + secret.get_secret_value().encode()).digest()
    canonical = json.dumps([call.method, call.path, body], sort_keys=True, separators=(",", ":"), default=str)
    return hmac.new(key, canonical.encode(), hashlib.sha256).hexdigest()


def _claim(db: Database, settings: Settings, call: Call, *, user_id: str, scope: str, key: str,
           body: Any) -> dict[str, Any]:
    """Claim the key with the current secret's fingerprint; when that differs from the stored
    one and a rotation is under way, the same request may have been fingerprinted with the
    previous secret: try that before calling it a different request."""
    assert settings.IDEMPOTENCY_SECRET is not None  # a configuration problem at start otherwise
    args = {"p_user_id": user_id, "p_scope": scope, "p_key": key, "p_ttl_seconds": settings.IDEMPOTENCY_TTL_SECONDS}
    try:
        return db.call("cp_idempotency_claim", **args,
                       p_request_digest=fingerprint(settings.IDEMPOTENCY_SECRET, call, body))
    except ApiError as err:
        if err.status != 422 or settings.IDEMPOTENCY_SECRET_PREVIOUS is None:
            raise
    return db.call("cp_idempotency_claim", **args,
                   p_request_digest=fingerprint(settings.IDEMPOTENCY_SECRET_PREVIOUS, call, body))


def run(db: Database, settings: Settings, call: Call, *, user_id: str, scope: str, body: Any,
        work: Callable[[], Reply]) -> Reply:
    """Run `work` at most once per (user, scope, Idempotency-Key); see the module docstring."""
    key = _key(call)
    if key is None:
        return work()
    deadline = time.monotonic() + settings.DTMA_DEPLOY_BUDGET_SECONDS * 2 + 1
    while True:
        claim = _claim(db, settings, call, user_id=user_id, scope=scope, key=key, body=body)
        if claim.get("claimed"):
            break
        if claim.get("replay"):
            return Reply(claim["status"], claim["response"], {REPLAY_HEADER: "true"})
        if time.monotonic() > deadline:
            raise ApiError(409, "idempotency_in_progress",
                           f"a request with this {HEADER} is still being processed; retry shortly",
                           headers={"Retry-After": "1"})
        time.sleep(_POLL_SECONDS)
    call.log_fields["idempotency_key_claimed"] = True
    try:
        reply = work()
    except ApiError as err:
        # A refusal is the answer (replayed); an outage is not: forget the key so a retry runs.
        keep = err.status < 500
        db.call("cp_idempotency_complete", p_user_id=user_id, p_scope=scope, p_key=key,
                p_status=err.status if keep else None, p_response=err.body() if keep else None)
        raise
    except Exception:
        db.call("cp_idempotency_complete", p_user_id=user_id, p_scope=scope, p_key=key, p_status=None,
                p_response=None)
        raise
    db.call("cp_idempotency_complete", p_user_id=user_id, p_scope=scope, p_key=key, p_status=reply.status,
            p_response=reply.body)
    return reply
