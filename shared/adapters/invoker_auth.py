"""Who may call the sweep and the command worker: the caller's Google OIDC ID token, checked in code.

mcp_status_sweep (called by Cloud Scheduler) and dtma_command_worker (called by Cloud Tasks) are
deployed without public access, so Cloud Run's IAM already lets only their invoker service
accounts through. They do not rely on that alone: one `--allow-unauthenticated` by mistake would
open them to anyone. Every request must also carry `Authorization: Bearer <ID token>`, the token
Google mints for the job's or the task's service account (`oidcToken`), and this module checks it:

* the signature: RS256 only, by the key of Google's JWKS (INVOKER_JWKS_URL) that the token's
  `kid` names. The keys are fetched and cached by :class:`shared.adapters.jwks.RemoteJwks`, under
  the same rules as the keys of the user tokens (shared.adapters.auth);
* `iss`: Google (`https://accounts.google.com` or `accounts.google.com`; INVOKER_ISSUER locally);
* `aud`: the function's own URL (SWEEP_INVOKER_AUDIENCE, WORKER_INVOKER_AUDIENCE), the audience
  the scheduler job and the queued tasks name; a trailing slash more or less is the same URL;
* `exp` and `iat`, with 30 s of clock skew;
* `email`: the invoker service account (SWEEP_INVOKER_SA, WORKER_INVOKER_SA), and
  `email_verified` true.

A refusal is a 401 in the one error shape, saying which check failed; the token and its claims
are neither echoed nor logged. If the keys cannot be fetched, the answer is 503 and the caller
retries. With neither of a function's two settings the check is off: local stacks and tests only,
since on Google Cloud the function does not start without them (shared/core/config.py).

PyJWT (with cryptography) is imported only once a check is configured: these two functions import
nothing else that needs it.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shared.core.config import GOOGLE_OIDC_ISSUERS, INVOKED_BY_GOOGLE, Settings
from shared.core.errors import ApiError, ServiceUnavailable

if TYPE_CHECKING:
    from shared.adapters.jwks import RemoteJwks

__all__ = ["Invoker", "authenticate", "expected_invoker"]

log = logging.getLogger("mcp.invoker_auth")

_ALGORITHM = "RS256"  # Google signs its ID tokens with RS256 only
_LEEWAY_SECONDS = 30
#: Google ID tokens are about 1 KB; the header is parsed before the signature is checked.
_MAX_TOKEN_CHARS = 16 * 1024
# The JWKS cache rules of the user tokens' verifier (shared.adapters.auth.JwtVerifier's defaults):
# 10 min cache, at most one fetch per 30 s (per 5 s after a failure), 5 s per fetch.
_JWKS_CACHE_SECONDS = 600
_JWKS_REFETCH_INTERVAL_SECONDS = 30.0
_JWKS_FETCH_TIMEOUT_SECONDS = 5.0
_REQUIRED_CLAIMS = ["exp", "iat", "iss", "aud", "email"]
_ONLY = "this function accepts only its invoker service account's Google OIDC ID token"


@dataclass(frozen=True)
class Invoker:
    """What the token of a function's caller must say."""

    function: str
    service_account: str
    audience: str
    jwks_url: str
    issuers: tuple[str, ...]


def expected_invoker(settings: Settings, function: str) -> Invoker | None:
    """Who may call `function` (the sweep or the worker), or None when the check is off."""
    sa_setting, audience_setting = INVOKED_BY_GOOGLE[function]
    service_account, audience = getattr(settings, sa_setting), getattr(settings, audience_setting)
    if not (service_account and audience):
        return None  # config.problems_for refuses this on Google Cloud, and one of the two anywhere
    issuers = (settings.INVOKER_ISSUER,) if settings.INVOKER_ISSUER else GOOGLE_OIDC_ISSUERS
    return Invoker(function, service_account, audience, settings.INVOKER_JWKS_URL, issuers)


def authenticate(authorization: str | None, settings: Settings, function: str) -> dict[str, Any] | None:
    """The verified claims of the caller's token (None when the check is off), or the ApiError to
    answer with: 401 naming the failed check, or 503 when the signing keys are out of reach."""
    invoker = expected_invoker(settings, function)
    if invoker is None:
        return None
    from shared.adapters.auth import AuthError, AuthUnavailable

    try:
        return _verifier(invoker).verify(authorization)
    except AuthUnavailable as exc:
        raise ServiceUnavailable(f"cannot verify the caller's token right now: {exc.reason}", 10) from None
    except AuthError as exc:
        log.warning("%s refused a call: %s", function, exc.reason)
        raise ApiError(401, "unauthenticated", f"{exc.reason}; {_ONLY}",
                       headers={"WWW-Authenticate": "Bearer"}) from None


@functools.lru_cache(maxsize=8)
def _signing_keys(jwks_url: str) -> RemoteJwks:
    """One key cache per JWKS URL and process (the sweep and the worker share Google's)."""
    from shared.adapters.jwks import RemoteJwks

    return RemoteJwks(jwks_url, algorithms=frozenset({_ALGORITHM}), cache_seconds=_JWKS_CACHE_SECONDS,
                      refetch_interval_seconds=_JWKS_REFETCH_INTERVAL_SECONDS,
                      fetch_timeout_seconds=_JWKS_FETCH_TIMEOUT_SECONDS)


@functools.lru_cache(maxsize=8)
def _verifier(invoker: Invoker) -> _Verifier:
    return _Verifier(invoker)


def _audiences(audience: str) -> list[str]:
    """The audience as configured, and the same URL with or without its trailing slash."""
    stripped = audience.rstrip("/")
    return list(dict.fromkeys([audience, stripped, stripped + "/"])) if stripped else [audience]


class _Verifier:
    """Checks one function's caller tokens (see the module docstring). Raises shared.adapters.auth's
    AuthError (401) or AuthUnavailable (503); neither's reason quotes the token."""

    def __init__(self, invoker: Invoker) -> None:
        self._invoker = invoker
        self._keys = _signing_keys(invoker.jwks_url)  # refuses a JWKS URL that is not https (or loopback http)
        self._audiences = _audiences(invoker.audience)
        self._service_account = invoker.service_account.casefold()

    def verify(self, authorization: str | None) -> dict[str, Any]:
        import jwt

        from shared.adapters.auth import AuthError, AuthUnavailable, bearer_token
        from shared.adapters.jwks import JwksUnavailable

        token = bearer_token(authorization)
        if len(token) > _MAX_TOKEN_CHARS:
            raise AuthError(f"token is too large (over {_MAX_TOKEN_CHARS} characters)")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("token is malformed") from None
        if header.get("alg") != _ALGORITHM:
            raise AuthError(f"token algorithm is not {_ALGORITHM}")  # HS256, none, ...: never a Google ID token
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthError("token has no 'kid' header")
        try:
            key = self._keys.get(kid)
        except JwksUnavailable as exc:
            raise AuthUnavailable(f"could not fetch the signing keys ({exc})") from None
        if key is None:
            raise AuthError("token signing key is unknown")
        try:
            claims = jwt.decode(token, key=key, algorithms=[_ALGORITHM], audience=self._audiences,
                                issuer=self._invoker.issuers, leeway=_LEEWAY_SECONDS,
                                options={"require": _REQUIRED_CLAIMS})
        except jwt.PyJWTError as exc:
            raise AuthError(_reason(exc)) from None
        email = claims.get("email")
        if not isinstance(email, str) or email.casefold() != self._service_account:
            raise AuthError("token is not the invoker service account's (its 'email' differs)")
        if claims.get("email_verified") is not True:
            raise AuthError("token's 'email_verified' is not true")
        return claims


def _reason(exc: Exception) -> str:
    """Which check a PyJWT exception reports; subclasses before their bases."""
    from jwt import exceptions as errors

    if isinstance(exc, errors.ExpiredSignatureError):
        return "token has expired"
    if isinstance(exc, errors.ImmatureSignatureError):
        return "token is not yet valid (its 'iat' or 'nbf' is in the future)"
    if isinstance(exc, errors.InvalidAudienceError):
        return "token audience is not this function's URL"
    if isinstance(exc, errors.InvalidIssuerError):
        return "token issuer is not Google"
    if isinstance(exc, errors.MissingRequiredClaimError):
        return f"token is missing the '{exc.claim}' claim"
    if isinstance(exc, errors.InvalidSignatureError):
        return "token signature is invalid"
    if isinstance(exc, errors.InvalidIssuedAtError):
        return "token 'iat' claim is not a number"
    if isinstance(exc, errors.DecodeError):
        return "token is malformed"
    return "token is invalid"
