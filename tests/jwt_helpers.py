"""Mint real, signed Supabase-style access tokens for tests, and serve a real JWKS over HTTP.

Nothing here is a mock. Tokens are signed with real keys (HMAC secrets, P-256 and RSA keys made
by ``cryptography``). :class:`JwksServer` is a real HTTP server on 127.0.0.1, so the verifier
under test runs its production code paths: urllib fetches, JSON parsing, PyJWK construction.

Typical use::

    from tests.jwt_helpers import DEFAULT_HS256_SECRET, EcKeyPair, JwksServer, mint_hs256

    token = mint_hs256(DEFAULT_HS256_SECRET, sub=user_id)
    headers = {"Authorization": f"Bearer {token}"}

    pair = EcKeyPair()
    with JwksServer([pair.jwk]) as server:
        verifier = JwtVerifier(jwks_url=server.url)
        verifier.verify(pair.mint_es256(sub=user_id))
        assert server.request_count == 1

Claims follow what Supabase Auth puts into an access token (``aud``, ``exp``, ``iat``, ``sub``,
``role``, ``email``, ``session_id``, ``aal``, ``is_anonymous``...). Tests can then check the
same shapes the web app will send.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, Self

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

__all__ = [
    "DEFAULT_HS256_SECRET",
    "OMIT",
    "EcKeyPair",
    "JwksServer",
    "RsaKeyPair",
    "closed_port_url",
    "encode_compact",
    "mint_alg_none",
    "mint_hs256",
    "mint_hs256_with_public_key",
    "new_user_id",
    "supabase_claims",
]

#: 40 bytes. JwtVerifier refuses secrets under 32 bytes (RFC 7518 §3.2), like Supabase does.
DEFAULT_HS256_SECRET = "test-only-supabase-jwt-secret-0123456789"

_JWKS_PATH = "/.well-known/jwks.json"


class _Omit:
    """Type of :data:`OMIT`."""

    def __repr__(self) -> str:
        return "OMIT"


#: Pass as a claim value in ``extra=`` (or as ``sub=``), or as a header value in ``headers=``,
#: to leave that field out of the token entirely, e.g. ``mint_hs256(s, sub=OMIT)``.
OMIT: Any = _Omit()


def new_user_id() -> str:
    """A random user id in the form Supabase uses (lower-case hyphenated UUID v4)."""
    return str(uuid.uuid4())


def supabase_claims(
    *,
    sub: str | None = None,
    role: str | None = "authenticated",
    aud: str | list[str] | None = "authenticated",
    exp_in: int | None = 3600,
    iss: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Claims shaped like a Supabase Auth access token.

    ``sub=None`` generates a fresh user id, and ``sub=OMIT`` leaves the claim out. ``role``,
    ``aud``, ``exp_in`` or ``iss`` set to None leave that claim out. ``exp_in`` counts seconds
    from now, and a negative value mints an already-expired token. ``extra`` is merged last, so
    it can override any claim. An ``extra`` value of :data:`OMIT` deletes that claim.
    """
    now = int(time.time())
    claims: dict[str, Any] = {
        "iat": now,
        "sub": new_user_id() if sub is None else sub,
        "email": "user@example.test",
        "phone": "",
        "app_metadata": {"provider": "email", "providers": ["email"]},
        "user_metadata": {},
        "aal": "aal1",
        "amr": [{"method": "password", "timestamp": now}],
        "session_id": str(uuid.uuid4()),
        "is_anonymous": False,
    }
    if aud is not None:
        claims["aud"] = aud
    if exp_in is not None:
        claims["exp"] = now + exp_in
    if role is not None:
        claims["role"] = role
    if iss is not None:
        claims["iss"] = iss
    claims.update(extra or {})
    return {name: value for name, value in claims.items() if value is not OMIT}


def _merge_headers(base: Mapping[str, Any], headers: Mapping[str, Any] | None) -> dict[str, Any]:
    merged = {**base, **(headers or {})}
    return {name: value for name, value in merged.items() if value is not OMIT}


def mint_hs256(
    secret: str,
    *,
    sub: str | None = None,
    role: str | None = "authenticated",
    aud: str | list[str] | None = "authenticated",
    exp_in: int | None = 3600,
    iss: str | None = None,
    extra: Mapping[str, Any] | None = None,
    headers: Mapping[str, Any] | None = None,
) -> str:
    """An HS256 token signed with ``secret``, the way Supabase's legacy JWT secret signs.

    ``headers`` adds JOSE header fields (e.g. ``{"kid": "abc"}``). PyJWT sets ``alg`` and
    ``typ`` itself.
    """
    claims = supabase_claims(sub=sub, role=role, aud=aud, exp_in=exp_in, iss=iss, extra=extra)
    return jwt.encode(claims, secret, algorithm="HS256", headers=_merge_headers({}, headers))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def encode_compact(
    header: Mapping[str, Any], claims: Mapping[str, Any], sign: Callable[[bytes], bytes] | None = None
) -> str:
    """Assemble a compact JWS by hand, for tokens PyJWT refuses to make.

    ``sign`` receives the signing input (``b64(header).b64(payload)``) and returns the raw
    signature. Without it the signature segment is empty, as in an ``alg: none`` token.
    """
    signing_input = (
        _b64url(json.dumps(dict(header), separators=(",", ":")).encode())
        + "."
        + _b64url(json.dumps(dict(claims), separators=(",", ":")).encode())
    )
    signature = sign(signing_input.encode("ascii")) if sign is not None else b""
    return signing_input + "." + _b64url(signature)


def mint_alg_none(*, alg: str = "none", headers: Mapping[str, Any] | None = None, **claim_kwargs: Any) -> str:
    """An unsigned token (``alg: none``, empty signature), the classic forgery.

    ``alg`` may be changed to spelling variants such as ``"None"`` or ``"NONE"``.
    ``claim_kwargs`` go to :func:`supabase_claims`.
    """
    header = _merge_headers({"alg": alg, "typ": "JWT"}, headers)
    return encode_compact(header, supabase_claims(**claim_kwargs))


def mint_hs256_with_public_key(
    pair: _AsymmetricKeyPair, *, headers: Mapping[str, Any] | None = None, **claim_kwargs: Any
) -> str:
    """The algorithm-confusion forgery. HS256 is signed with the *public* key as HMAC secret.

    An attacker can download the public key from the JWKS. A verifier that lets the token
    header choose the algorithm, and feeds "the key for this kid" to it, would then accept this
    token. The HMAC secret is the public key's PEM bytes, the form naive verifiers load. By
    default the header carries the genuine key's ``kid``. PyJWT refuses to make this token
    (it won't use an asymmetric key as an HMAC secret), so it is built by hand.
    """
    secret = pair.public_pem
    header = _merge_headers({"alg": "HS256", "typ": "JWT", "kid": pair.kid}, headers)
    return encode_compact(
        header,
        supabase_claims(**claim_kwargs),
        lambda signing_input: hmac.new(secret, signing_input, hashlib.sha256).digest(),
    )


class _AsymmetricKeyPair:
    """A private key plus its public JWK, able to mint tokens like a Supabase signing key."""

    alg: ClassVar[str]

    def __init__(self, kid: str | None = None) -> None:
        self.kid: str = kid if kid is not None else f"test-{self.alg.lower()}-{uuid.uuid4().hex[:12]}"
        self.private_key: Any = self._generate()

    def _generate(self) -> Any:
        raise NotImplementedError

    def _public_jwk(self) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def public_pem(self) -> bytes:
        """The public key as SubjectPublicKeyInfo PEM."""
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def jwk(self) -> dict[str, Any]:
        """The public JWK as Supabase publishes it: kid, alg, ``use: sig``, ``key_ops: [verify]``."""
        return {
            **self._public_jwk(),
            "kid": self.kid,
            "alg": self.alg,
            "use": "sig",
            "key_ops": ["verify"],
            "ext": True,
        }

    def mint(
        self,
        *,
        sub: str | None = None,
        role: str | None = "authenticated",
        aud: str | list[str] | None = "authenticated",
        exp_in: int | None = 3600,
        iss: str | None = None,
        extra: Mapping[str, Any] | None = None,
        headers: Mapping[str, Any] | None = None,
    ) -> str:
        """A token signed with this key. The header carries ``kid`` (``headers={"kid": OMIT}`` drops it)."""
        claims = supabase_claims(sub=sub, role=role, aud=aud, exp_in=exp_in, iss=iss, extra=extra)
        header = _merge_headers({"kid": self.kid}, headers)
        return jwt.encode(claims, self.private_key, algorithm=self.alg, headers=header)

    def impostor(self) -> Self:
        """A *different* key of the same type that claims this key's ``kid``.

        Tokens it mints name a kid the verifier knows, but their signature does not verify
        under the published key.
        """
        return type(self)(kid=self.kid)


class EcKeyPair(_AsymmetricKeyPair):
    """A P-256 key pair for ES256, the signing key type Supabase recommends."""

    alg = "ES256"

    def _generate(self) -> Any:
        return ec.generate_private_key(ec.SECP256R1())

    def _public_jwk(self) -> dict[str, Any]:
        return ECAlgorithm.to_jwk(self.private_key.public_key(), as_dict=True)

    def mint_es256(self, **kwargs: Any) -> str:
        """Same as :meth:`mint`, with the name tests expect."""
        return self.mint(**kwargs)


class RsaKeyPair(_AsymmetricKeyPair):
    """An RSA-2048 key pair for RS256 (key generation takes tens of milliseconds)."""

    alg = "RS256"

    def _generate(self) -> Any:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def _public_jwk(self) -> dict[str, Any]:
        return RSAAlgorithm.to_jwk(self.private_key.public_key(), as_dict=True)

    def mint_rs256(self, **kwargs: Any) -> str:
        """Same as :meth:`mint`, with the name tests expect."""
        return self.mint(**kwargs)


class JwksServer:
    """A real JWKS endpoint on 127.0.0.1 (random port), served from a daemon thread.

    * ``keys`` is a plain mutable list of JWK dicts. Append to it or remove from it to
      simulate key rotation or revocation (``add_key``/``remove_key`` are shortcuts).
    * ``request_count`` counts every request received. Tests use it to prove caching and the
      single refetch.
    * ``status`` (default 200) makes the endpoint fail, e.g. ``server.status = 503``.
      ``body`` (bytes) replaces the response body, e.g. to serve HTML. ``delay_seconds``
      slows each response, so concurrent callers overlap. ``drip_seconds`` sends the body
      16 bytes at a time with that pause between pieces (an endpoint that trickles).
      ``redirect_to`` (a URL) answers ``302 Found`` with that ``Location`` instead.

    Use it as a context manager, or call :meth:`close`. ``url`` is the full JWKS URL.
    """

    def __init__(self, keys: Iterable[Mapping[str, Any]] = ()) -> None:
        self.keys: list[dict[str, Any]] = [dict(key) for key in keys]
        self.status = 200
        self.body: bytes | None = None
        self.delay_seconds = 0.0
        self.drip_seconds = 0.0
        self.redirect_to: str | None = None
        self._count = 0
        self._count_lock = threading.Lock()
        self._closed = False

        server = self

        class Handler(BaseHTTPRequestHandler):
            # Without this, every response costs ~40 ms of Nagle/delayed-ACK stall.
            disable_nagle_algorithm = True

            def do_GET(self) -> None:
                with server._count_lock:
                    server._count += 1
                if server.delay_seconds:
                    time.sleep(server.delay_seconds)
                if self.path.split("?", 1)[0] != _JWKS_PATH:
                    self.send_error(404)
                    return
                if server.redirect_to is not None:
                    self.send_response(302)
                    self.send_header("Location", server.redirect_to)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                payload = server.body if server.body is not None else json.dumps({"keys": list(server.keys)}).encode()
                self.send_response(server.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                piece = 16 if server.drip_seconds else len(payload) or 1
                try:
                    for start in range(0, len(payload), piece):
                        self.wfile.write(payload[start : start + piece])
                        self.wfile.flush()
                        time.sleep(server.drip_seconds)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout and size-limit tests expect that)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, name="jwks-server", daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{_JWKS_PATH}"

    @property
    def request_count(self) -> int:
        with self._count_lock:
            return self._count

    def add_key(self, jwk: Mapping[str, Any]) -> None:
        self.keys.append(dict(jwk))

    def remove_key(self, kid: str) -> None:
        self.keys[:] = [key for key in self.keys if key.get("kid") != kid]

    def close(self) -> None:
        """Stop serving and free the port. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=2)

    def __enter__(self) -> JwksServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def closed_port_url(path: str = _JWKS_PATH) -> str:
    """A 127.0.0.1 URL where nothing listens, so connecting fails at once (connection refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"
