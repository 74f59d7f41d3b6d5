"""Toolbox credentials: the per-toolbox DTMA key and the digest the database keeps.

W4: the original sent one global key to every droplet, and every droplet owner has root on
their droplet, so any user could read the key that opens everyone else's DTMA. Here the key
for toolbox T is HMAC-SHA256(master secret, "dtma-key:v1:<T>:<version>"): a droplet only
ever holds its own key, the database holds nothing secret (only SHA-256 digests of what
agents present), and bumping the version revokes a key at once in both directions.
"""

from __future__ import annotations

import hashlib
import hmac


def derive_key(master_secret: str, toolbox_id: str, key_version: int) -> str:
    """The key the backend sends to toolbox `toolbox_id`'s DTMA (64 hex characters)."""
    message = f"dtma-key:v1:{toolbox_id.lower()}:{key_version}".encode()
    return hmac.new(master_secret.encode(), message, hashlib.sha256).hexdigest()


def token_digest(token: str) -> bytes:
    """What the database stores and looks up for a token an agent presents (W3)."""
    return hashlib.sha256(token.encode()).digest()
