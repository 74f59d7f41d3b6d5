"""A deploy's environment values, sealed for the time its command waits in the queue.

The values are secrets (API keys of the MCP server) and are never stored in the clear: the
command row holds them encrypted with AES-256-GCM under a key derived from the DTMA master secret,
which the database does not have, with the command id as associated data (a sealed value cannot
be moved to another command). The worker opens them to build the agent's request, and the row's
copy is erased when the command ends.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os

from shared.core.config import Settings

_LABEL = b"mcp-command-env:v1"


class SealError(Exception):
    """The sealed value cannot be opened (another master secret, or tampered with)."""


def _key(settings: Settings) -> bytes:
    secret = settings.DTMA_KEY_SECRET or settings.BACKEND_TO_DTMA_API_KEY
    if secret is None:
        raise RuntimeError("sealing a deploy's environment needs DTMA_KEY_SECRET (or BACKEND_TO_DTMA_API_KEY)")
    return hmac.new(secret.get_secret_value().encode(), _LABEL, hashlib.sha256).digest()


def seal(settings: Settings, command_id: str, env: dict[str, str]) -> str | None:
    """`env` as an opaque string for the command row, or None when there is nothing to hide."""
    if not env:
        return None
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = os.urandom(12)
    sealed = AESGCM(_key(settings)).encrypt(nonce, json.dumps(env).encode(), command_id.encode())
    return base64.b64encode(nonce + sealed).decode()


def unseal(settings: Settings, command_id: str, sealed: str | None) -> dict[str, str]:
    if not sealed:
        return {}
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    try:
        raw = base64.b64decode(sealed)
        plain = AESGCM(_key(settings)).decrypt(raw[:12], raw[12:], command_id.encode())
    except (InvalidTag, ValueError) as exc:
        raise SealError("the deploy's environment values cannot be opened (was DTMA_KEY_SECRET rotated?)") from exc
    values = json.loads(plain)
    return {str(k): str(v) for k, v in values.items()}
