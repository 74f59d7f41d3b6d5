"""Server-side verification of the Supabase user access token (``Authorization: Bearer <JWT>``).

Supabase Edge Functions could rely on the platform's built-in ``verify_jwt``. Our Cloud Functions
have no such gateway, so every function must check the token itself before it trusts ``sub`` as
the caller's user id. This module does that with PyJWT only (its ``PyJWKClient`` fetches the
JWKS, through :mod:`shared.adapters.jwks`), so it adds no HTTP client to a function's cold start. The
configuration code builds a :class:`JwtVerifier` (:func:`verifier_from_settings`), and the
request handlers call :func:`authenticate`.

Two kinds of signing key exist (see the Supabase signing-keys guide):

* legacy **HS256** with the project's shared JWT secret, and
* asymmetric **ES256** (recommended) or **RS256** keys, published at
  ``https://<ref>.supabase.co/auth/v1/.well-known/jwks.json`` and selected by the token's ``kid``.

Every failure raises :class:`AuthError`. Its ``reason`` says which check failed, so operators
and client developers can tell an expired session from a misconfigured issuer. A reason never
contains the token. If the signing keys cannot be fetched, the error is
:class:`AuthUnavailable`: the token may well be valid, so callers answer 503 instead of 401.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

import jwt
from jwt import PyJWK
from jwt import exceptions as jwt_errors

from shared.adapters.jwks import JwksUnavailable, RemoteJwks, parse_jwks
from shared.core.config import Settings
from shared.core.errors import ApiError, ServiceUnavailable

__all__ = [
    "AuthError",
    "AuthUnavailable",
    "JwtVerifier",
    "UserClaims",
    "authenticate",
    "bearer_token",
    "verifier_from_settings",
]

#: Asymmetric algorithms we accept from a JWKS. These are the ones Supabase issues (ES256 is
#: recommended, RS256 is an option). EdDSA is "coming soon" upstream. Add it here only after
#: testing it, because an allow-list that grows silently is no allow-list.
_ASYMMETRIC_ALGS = frozenset({"ES256", "RS256"})
_HS256 = "HS256"

#: RFC 7518 §3.2: an HS256 key must be at least as long as the hash output (256 bits). Supabase
#: enforces ≥ 32 characters for project secrets, so a shorter value is a configuration mistake.
_MIN_HS256_SECRET_BYTES = 32

#: Tokens are parsed before their signature is checked. This limit bounds the work an
#: unauthenticated caller can force. Real Supabase access tokens are about 1 KB, and user
#: metadata can grow them, so the limit is generous.
_MAX_TOKEN_CHARS = 16 * 1024

#: Claim failures that a legacy anon/service_role API key triggers. See _ClaimsPolicy.verify.
_CLAIM_SHAPE_ERRORS = (
    jwt_errors.MissingRequiredClaimError,
    jwt_errors.InvalidAudienceError,
    jwt_errors.InvalidIssuerError,
    jwt_errors.InvalidSubjectError,
)

_UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_BEARER_RE = re.compile(r"\s*(\S+)(?:\s+(\S+))?\s*")
_UNPRINTABLE_RE = re.compile(r"[^\x20-\x7e]")


class AuthError(Exception):
    """The request is not authenticated as a Supabase user. Callers answer **401**.

    ``reason`` is a short sentence that says which check failed. It is safe to return to the
    client and to log, because it never contains the token. Values taken from the token header
    (alg, kid) or from verified claims (role) are quoted, truncated and stripped of control
    characters, so they cannot inject into logs.
    """

    http_status: ClassVar[int] = 401

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class AuthUnavailable(AuthError):
    """The signing keys could not be fetched, so the token could not be checked. Callers answer **503**.

    This is a separate class because the fault is on our side (or Supabase's), not the caller's.
    A 401 would make the web app sign the user out. A 503 tells it to retry.
    """

    http_status: ClassVar[int] = 503


@dataclass(frozen=True)
class UserClaims:
    """The verified identity of the caller.

    ``user_id`` is the token's ``sub``, normalised to a lower-case hyphenated UUID (the form
    Supabase stores in ``auth.users.id``). ``raw`` is a read-only view of every verified claim
    (``aal``, ``is_anonymous``, ``app_metadata``...). It is left out of ``repr`` so that logging
    a ``UserClaims`` does not dump user metadata, and out of equality because it holds an
    unhashable mapping.
    """

    user_id: str
    role: str
    email: str | None
    session_id: str | None
    raw: Mapping[str, Any] = field(repr=False, compare=False)


def _quote(value: object, limit: int = 40) -> str:
    """Quote an untrusted value for a reason message: printable ASCII only, bounded length.

    A header value such as ``kid`` is attacker-controlled. It goes into messages that are
    logged and returned to clients, so it must not carry newlines or megabytes of text.
    """
    if not isinstance(value, str):
        return f"<{type(value).__name__}>"
    cleaned = _UNPRINTABLE_RE.sub("?", value)
    if len(cleaned) > limit:
        cleaned = cleaned[:limit] + "..."
    return f"'{cleaned}'"


def _role_reason(role: object) -> str | None:
    """The refusal reason for a ``role`` claim, or None when it is the user role."""
    if role == "authenticated":
        return None
    if role is None:
        return "token has no 'role' claim; a user session token is required"
    return f"token role is {_quote(role)}; a user session token is required"


def _unverified_claims(token: str) -> Mapping[str, Any]:
    """The payload without any checks. Use it only to word a refusal, never to accept a token."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return {}
    return claims if isinstance(claims, dict) else {}


class _SigningKeys:
    """Key lookup: which algorithms are allowed, and the key a token's header names.

    The allow-list follows from the configured sources: HS256 only with ``hs256_secret``,
    ES256/RS256 only with a JWKS (``jwks_url`` or inline ``jwks``). HS256 only ever uses the
    secret, and a JWKS key only ever verifies the one algorithm it was built for (see
    :class:`JwtVerifier` on algorithm confusion).
    """

    def __init__(
        self,
        *,
        hs256_secret: str | None,
        inline_keys: Mapping[str, PyJWK] | None,
        remote: RemoteJwks | None,
    ) -> None:
        self._hs256_secret = hs256_secret
        self._inline_keys: Mapping[str, PyJWK] = inline_keys or MappingProxyType({})
        self._remote = remote
        allowed: set[str] = set()
        if hs256_secret:
            allowed.add(_HS256)
        if remote is not None or inline_keys is not None:
            allowed |= _ASYMMETRIC_ALGS
        self.allowed_algorithms = frozenset(allowed)

    def key_for(self, header: Mapping[str, Any]) -> tuple[str, PyJWK | str]:
        """The token's algorithm and the key to check it with, or raise :class:`AuthError`."""
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.allowed_algorithms:
            if alg is None:
                raise AuthError("token header has no 'alg'")
            raise AuthError(f"token algorithm {_quote(alg)} is not allowed")
        if alg == _HS256:
            # A kid on an HS256 token is ignored. There is exactly one secret, and HS256 is
            # never checked against a JWKS entry.
            assert self._hs256_secret is not None  # alg is allowed only when a secret is set
            return alg, self._hs256_secret
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthError(f"token has no 'kid' header; {alg} tokens must name their signing key")
        key = self._asymmetric_key(kid)
        if key.algorithm_name != alg:
            raise AuthError(f"token algorithm {_quote(alg)} does not match signing key {_quote(kid)}")
        return alg, key

    def _asymmetric_key(self, kid: str) -> PyJWK:
        key = self._inline_keys.get(kid)
        if key is None and self._remote is not None:
            try:
                key = self._remote.get(kid)
            except JwksUnavailable as exc:
                # The kid may well be a new key that we failed to download. Say so, rather than
                # claim the token is bad.
                raise AuthUnavailable(f"could not fetch signing keys ({exc})") from None
        if key is None:
            raise AuthError(f"token signing key {_quote(kid)} is unknown")
        return key


class _ClaimsPolicy:
    """Claims verification: signature, time claims, audience, issuer, role and subject."""

    def __init__(self, *, issuer: str | None, audience: str, leeway_seconds: int) -> None:
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway_seconds

    def verify(self, token: str, alg: str, key: PyJWK | str) -> UserClaims:
        try:
            payload = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": ["exp", "sub", "aud"]},
            )
        except jwt.PyJWTError as exc:
            reason = self._reason_for(exc)
            if isinstance(exc, _CLAIM_SHAPE_ERRORS):
                # The legacy anon/service_role API keys are JWTs signed with the project secret,
                # but they have no sub or aud and their iss is "supabase". Sent where a user
                # session belongs, they would otherwise be refused as "missing the 'sub'
                # claim", which hides the real mistake. PyJWT checks claims only after the
                # signature verifies, so the role read here is authentic. Even if it were not,
                # it would only change the wording of a refusal.
                reason = _role_reason(_unverified_claims(token).get("role")) or reason
            # `from None`: the reason is the whole story. A chained PyJWT exception adds no
            # information for the client and only widens what ends up in logs.
            raise AuthError(reason) from None
        return _user_claims(payload)

    def _reason_for(self, exc: jwt.PyJWTError) -> str:
        """Turn a PyJWT exception into a reason that names the failed check.

        Subclasses come before their bases. For example, InvalidSignatureError is a
        DecodeError.
        """
        if isinstance(exc, jwt_errors.ExpiredSignatureError):
            return "token has expired"
        if isinstance(exc, jwt_errors.ImmatureSignatureError):
            return "token is not yet valid (its 'nbf' or 'iat' is in the future)"
        if isinstance(exc, jwt_errors.InvalidAudienceError):
            return f"token audience is not '{self._audience}'"
        if isinstance(exc, jwt_errors.InvalidIssuerError):
            return f"token issuer is not '{self._issuer}'"
        if isinstance(exc, jwt_errors.MissingRequiredClaimError):
            return f"token is missing the '{exc.claim}' claim"
        if isinstance(exc, jwt_errors.InvalidSignatureError):
            return "token signature is invalid"
        if isinstance(exc, jwt_errors.InvalidAlgorithmError):
            return "token algorithm is not allowed"
        if isinstance(exc, jwt_errors.InvalidIssuedAtError):
            return "token 'iat' claim is not a number"
        if isinstance(exc, jwt_errors.InvalidSubjectError):
            return "token subject ('sub') is not a user UUID"
        if isinstance(exc, jwt_errors.InvalidJTIError):
            return "token 'jti' claim is not a string"
        if isinstance(exc, jwt_errors.DecodeError):
            text = str(exc)
            for claim in ("exp", "nbf"):
                if f"({claim})" in text:
                    return f"token '{claim}' claim is not a number"
            return "token is malformed"
        if isinstance(exc, jwt_errors.InvalidKeyError):
            return "token signing key is unusable"
        return "token is invalid"


def _user_claims(payload: dict[str, Any]) -> UserClaims:
    role = payload.get("role")
    role_reason = _role_reason(role)
    if role_reason is not None:
        raise AuthError(role_reason)

    sub = payload.get("sub")
    if not isinstance(sub, str) or not _UUID_RE.fullmatch(sub):
        raise AuthError("token subject ('sub') is not a user UUID")

    # PyJWT reads a numeric string as a time; RFC 7519 says NumericDate, a JSON number.
    for claim in ("exp", "nbf", "iat"):
        value = payload.get(claim)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise AuthError(f"token claim '{claim}' is not a number")

    email = payload.get("email")
    session_id = payload.get("session_id")
    return UserClaims(
        user_id=sub.lower(),
        role=role,
        # Supabase sends "" for users without an email (phone sign-in). None says "absent"
        # more honestly.
        email=email if isinstance(email, str) and email else None,
        session_id=session_id if isinstance(session_id, str) and session_id else None,
        raw=MappingProxyType(payload),
    )


class JwtVerifier:
    """Verifies Supabase access tokens and returns the caller's :class:`UserClaims`.

    Key sources (at least one is required; an empty string counts as "not configured", so
    unset environment variables can be passed straight through):

    * ``hs256_secret``: the project's legacy JWT secret. With it, **HS256** is accepted.
    * ``jwks_url``: the project's JWKS endpoint (https; plain http only to a loopback host).
      With it, **ES256/RS256** are accepted and the key is chosen by ``kid``.
    * ``jwks``: an inline JWKS document (``{"keys": [...]}``), for local stacks that have no
      reachable JWKS endpoint. It is parsed once, here.

    Algorithm allow-list. Each algorithm is accepted only when the matching kind of key is
    configured. ``none`` and anything unknown are always refused. In particular, HS256 is
    refused when only JWKS keys are configured. This is the *algorithm-confusion* defence:
    an attacker who knows our public key could sign an HS256 token with the public key's bytes
    as the HMAC secret. A verifier that picks the algorithm from the token header would then
    accept it. HS256 only ever uses ``hs256_secret``. A JWKS key only ever verifies the one
    algorithm it was built for, and ``oct`` (symmetric) JWKS entries are ignored.

    Claims. ``exp``, ``sub`` and ``aud`` are required. ``exp``, ``nbf`` and ``iat`` are checked
    with ``leeway_seconds`` of clock skew. ``aud`` must include ``audience``. ``iss`` must equal
    ``issuer`` when one is configured. ``role`` must be ``authenticated``: the legacy
    ``anon``/``service_role`` API keys are JWTs signed with the same secret, and one of them
    must never pass as a user session. ``sub`` must be a UUID, since it becomes the user id in
    queries. Header fields ``jku``, ``x5u`` and ``jwk`` are ignored: keys come only from our
    configuration, never from the token.

    JWKS (:class:`shared.adapters.jwks.RemoteJwks`, around PyJWT's ``PyJWKClient``): fetched on first use,
    never here; cached for ``jwks_cache_seconds`` (600 s, like supabase-py), so verifying with
    cached keys does no network I/O and takes no lock; an unknown ``kid`` triggers one refetch,
    at most one fetch per ``refetch_interval_seconds`` (30 s; 5 s after a failure); a fetch
    gives up after ``fetch_timeout_seconds``. Supabase publishes standby keys before signing
    with them, so the refetch is a safety net. While refreshes fail, expired keys stay usable
    for one more cache lifetime; after that the error is :class:`AuthUnavailable`.

    The work is split by job: :class:`_SigningKeys` picks the key (allow-list, ``kid``),
    :class:`_ClaimsPolicy` checks the signature and claims, and :meth:`verify_header` /
    :func:`authenticate` face HTTP. ``clock`` (monotonic seconds) can be injected so tests can
    move time forward for cache expiry. Token ``exp``/``nbf``/``iat`` are always checked
    against the real wall clock.
    """

    def __init__(
        self,
        *,
        hs256_secret: str | None = None,
        jwks_url: str | None = None,
        jwks: Mapping[str, Any] | None = None,
        issuer: str | None = None,
        audience: str = "authenticated",
        leeway_seconds: int = 30,
        jwks_cache_seconds: int = 600,
        refetch_interval_seconds: float = 30.0,
        fetch_timeout_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not hs256_secret and not jwks_url and jwks is None:
            raise ValueError("JwtVerifier needs at least one key source: hs256_secret, jwks_url or jwks")
        if hs256_secret and len(hs256_secret.encode("utf-8")) < _MIN_HS256_SECRET_BYTES:
            # Refuse here, once, rather than letting PyJWT emit an InsecureKeyLengthWarning on
            # every request.
            raise ValueError(f"hs256_secret must be at least {_MIN_HS256_SECRET_BYTES} bytes (RFC 7518 §3.2)")
        if not audience:
            raise ValueError("audience must be a non-empty string")
        if leeway_seconds < 0 or jwks_cache_seconds < 0 or refetch_interval_seconds < 0:
            raise ValueError("leeway_seconds, jwks_cache_seconds and refetch_interval_seconds must be >= 0")
        if fetch_timeout_seconds <= 0:
            raise ValueError("fetch_timeout_seconds must be > 0")

        inline_keys = None
        if jwks is not None:
            try:
                inline_keys = parse_jwks(jwks, _ASYMMETRIC_ALGS)
            except ValueError as exc:
                raise ValueError(f"inline jwks is invalid: {exc}") from None
        remote = None
        if jwks_url:  # refuses a URL that is not https (plain http only to a loopback host)
            remote = RemoteJwks(
                jwks_url,
                algorithms=_ASYMMETRIC_ALGS,
                cache_seconds=jwks_cache_seconds,
                refetch_interval_seconds=refetch_interval_seconds,
                fetch_timeout_seconds=fetch_timeout_seconds,
                clock=clock,
            )
        self._keys = _SigningKeys(hs256_secret=hs256_secret or None, inline_keys=inline_keys, remote=remote)
        self._claims = _ClaimsPolicy(issuer=issuer or None, audience=audience, leeway_seconds=leeway_seconds)

    @property
    def allowed_algorithms(self) -> frozenset[str]:
        """The algorithms this verifier accepts. They follow from the configured key sources."""
        return self._keys.allowed_algorithms

    def verify_header(self, authorization: str | None) -> UserClaims:
        """Verify the value of an ``Authorization`` header, which must be ``Bearer <token>``."""
        return self.verify(bearer_token(authorization))

    def verify(self, token: str) -> UserClaims:
        """Verify a raw JWT and return the caller's claims, or raise :class:`AuthError`."""
        if not isinstance(token, str) or not token:
            raise AuthError("token is malformed")
        if len(token) > _MAX_TOKEN_CHARS:
            raise AuthError(f"token is too large (over {_MAX_TOKEN_CHARS} characters)")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("token is malformed") from None
        alg, key = self._keys.key_for(header)
        return self._claims.verify(token, alg, key)


def bearer_token(authorization: str | None) -> str:
    """The token in an ``Authorization: Bearer <token>`` header value, or raise :class:`AuthError`.

    The scheme is case-insensitive (RFC 7235), and surrounding or repeated whitespace is
    tolerated. Anything else is refused. A second word after the token would mean the header
    is not what we think it is.
    """
    if authorization is None or not authorization.strip():
        raise AuthError("missing Authorization header")
    match = _BEARER_RE.fullmatch(authorization)
    if match is None or match.group(2) is None or match.group(1).lower() != "bearer":
        raise AuthError("Authorization header must be 'Bearer <token>'")
    return match.group(2)


def verifier_from_settings(settings: Settings) -> JwtVerifier:
    """The verifier a user-facing function uses: HS256 with the legacy secret and/or the
    project's JWKS (asymmetric keys), issuer checked when known."""
    secret = settings.SUPABASE_JWT_SECRET.get_secret_value() if settings.SUPABASE_JWT_SECRET else None
    # With only the legacy secret configured there is no JWKS to fetch; with SUPABASE_URL the
    # project's JWKS is also accepted (new asymmetric signing keys).
    return JwtVerifier(hs256_secret=secret, jwks_url=settings.jwks_url, issuer=settings.jwt_issuer)


def authenticate(authorization: str | None, verifier: JwtVerifier) -> UserClaims:
    """The caller's claims, or the ApiError to answer with (401, or 503 if keys are unreachable)."""
    try:
        return verifier.verify_header(authorization)
    except AuthUnavailable as exc:
        raise ServiceUnavailable(f"cannot verify the session right now: {exc.reason}", 10) from None
    except AuthError as exc:
        raise ApiError(401, "unauthenticated", exc.reason, headers={"WWW-Authenticate": "Bearer"}) from None
