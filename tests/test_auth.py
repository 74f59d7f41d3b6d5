"""Tests for shared.adapters.auth: Supabase user JWT verification.

Every token is really signed (tests/jwt_helpers.py), and JWKS tests talk to a real HTTP server
on 127.0.0.1. Each refusal asserts on the reason text, because the reason is the contract:
it must say which check failed, and it must never echo the token.

Cache and rate-limit timing uses an injected clock (``FakeClock``), so nothing sleeps.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import threading
import time
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from shared.adapters.auth import AuthError, AuthUnavailable, JwtVerifier, UserClaims
from tests.jwt_helpers import (
    DEFAULT_HS256_SECRET,
    OMIT,
    EcKeyPair,
    JwksServer,
    RsaKeyPair,
    closed_port_url,
    encode_compact,
    mint_alg_none,
    mint_hs256,
    mint_hs256_with_public_key,
    new_user_id,
)

SECRET = DEFAULT_HS256_SECRET
ISSUER = "https://abcdefghijklmnop.supabase.co/auth/v1"


class FakeClock:
    """Monotonic clock the test moves by hand (JWKS cache and rate-limit timing only)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def pair() -> EcKeyPair:
    return EcKeyPair()


@pytest.fixture
def server(pair: EcKeyPair) -> Iterator[JwksServer]:
    with JwksServer([pair.jwk]) as srv:
        yield srv


@pytest.fixture
def jwks_verifier(server: JwksServer, clock: FakeClock) -> JwtVerifier:
    return JwtVerifier(jwks_url=server.url, clock=clock)


@pytest.fixture
def hs_verifier() -> JwtVerifier:
    return JwtVerifier(hs256_secret=SECRET)


def refused(verifier: JwtVerifier, token: str) -> AuthError:
    """Verify ``token``, expecting a refusal. Check the reason never leaks the token."""
    with pytest.raises(AuthError) as info:
        verifier.verify(token)
    error = info.value
    assert str(error) == error.reason
    assert token not in error.reason
    for segment in token.split("."):
        if len(segment) >= 8:
            assert segment not in error.reason
    return error


# ---------------------------------------------------------------- happy paths


def test_valid_hs256_token_returns_user_claims(hs_verifier: JwtVerifier) -> None:
    user_id = new_user_id()
    token = mint_hs256(SECRET, sub=user_id, extra={"email": "ada@example.test", "session_id": "sess-1"})

    claims = hs_verifier.verify(token)

    assert claims == UserClaims(
        user_id=user_id, role="authenticated", email="ada@example.test", session_id="sess-1", raw={}
    )
    assert claims.raw["aal"] == "aal1"
    assert claims.raw["sub"] == user_id
    with pytest.raises(TypeError):
        claims.raw["sub"] = "someone-else"  # type: ignore[index]
    assert "raw" not in repr(claims)


def test_valid_es256_token_via_jwks_server(
    jwks_verifier: JwtVerifier, pair: EcKeyPair, server: JwksServer
) -> None:
    user_id = new_user_id()

    claims = jwks_verifier.verify(pair.mint_es256(sub=user_id))

    assert claims.user_id == user_id
    assert claims.role == "authenticated"
    assert server.request_count == 1


def test_valid_rs256_token_via_inline_jwks_needs_no_network() -> None:
    rsa_pair = RsaKeyPair()
    verifier = JwtVerifier(jwks={"keys": [rsa_pair.jwk]}, jwks_url=None)
    user_id = new_user_id()

    assert verifier.verify(rsa_pair.mint_rs256(sub=user_id)).user_id == user_id


def test_verifier_with_secret_and_jwks_accepts_both(server: JwksServer, pair: EcKeyPair) -> None:
    verifier = JwtVerifier(hs256_secret=SECRET, jwks_url=server.url)

    assert verifier.allowed_algorithms == {"HS256", "ES256", "RS256"}
    assert verifier.verify(mint_hs256(SECRET)).role == "authenticated"
    assert verifier.verify(pair.mint_es256()).role == "authenticated"


def test_empty_email_and_uppercase_sub_are_normalised(hs_verifier: JwtVerifier) -> None:
    user_id = new_user_id()
    token = mint_hs256(SECRET, sub=user_id.upper(), extra={"email": "", "session_id": OMIT})

    claims = hs_verifier.verify(token)

    assert claims.user_id == user_id
    assert claims.email is None
    assert claims.session_id is None


def test_audience_list_containing_authenticated_is_accepted(hs_verifier: JwtVerifier) -> None:
    assert hs_verifier.verify(mint_hs256(SECRET, aud=["other", "authenticated"])).role == "authenticated"


# ---------------------------------------------------------------- time claims


def test_expired_token_is_refused(hs_verifier: JwtVerifier) -> None:
    error = refused(hs_verifier, mint_hs256(SECRET, exp_in=-120))

    assert error.reason == "token has expired"
    assert error.http_status == 401
    assert not isinstance(error, AuthUnavailable)


def test_expiry_within_leeway_is_accepted(hs_verifier: JwtVerifier) -> None:
    assert hs_verifier.verify(mint_hs256(SECRET, exp_in=-5)).role == "authenticated"


def test_zero_leeway_refuses_just_expired_token() -> None:
    verifier = JwtVerifier(hs256_secret=SECRET, leeway_seconds=0)

    assert refused(verifier, mint_hs256(SECRET, exp_in=-5)).reason == "token has expired"


def test_not_yet_valid_token_is_refused(hs_verifier: JwtVerifier) -> None:
    token = mint_hs256(SECRET, extra={"nbf": int(time.time()) + 300})

    assert "not yet valid" in refused(hs_verifier, token).reason


def test_iat_in_the_future_is_refused(hs_verifier: JwtVerifier) -> None:
    token = mint_hs256(SECRET, extra={"iat": int(time.time()) + 300})

    assert "not yet valid" in refused(hs_verifier, token).reason


def test_non_numeric_exp_is_refused(hs_verifier: JwtVerifier) -> None:
    token = mint_hs256(SECRET, extra={"exp": "tomorrow"})

    assert refused(hs_verifier, token).reason == "token 'exp' claim is not a number"


# ---------------------------------------------------------------- audience / issuer


def test_wrong_audience_is_refused(hs_verifier: JwtVerifier) -> None:
    error = refused(hs_verifier, mint_hs256(SECRET, aud="some-other-api"))

    assert error.reason == "token audience is not 'authenticated'"


def test_wrong_issuer_is_refused_when_issuer_configured() -> None:
    verifier = JwtVerifier(hs256_secret=SECRET, issuer=ISSUER)

    error = refused(verifier, mint_hs256(SECRET, iss="https://evil.example/auth/v1"))

    assert error.reason == f"token issuer is not '{ISSUER}'"


def test_missing_issuer_is_refused_when_issuer_configured() -> None:
    verifier = JwtVerifier(hs256_secret=SECRET, issuer=ISSUER)

    assert refused(verifier, mint_hs256(SECRET)).reason == "token is missing the 'iss' claim"


def test_issuer_matches_when_configured_and_is_free_when_not(hs_verifier: JwtVerifier) -> None:
    verifier = JwtVerifier(hs256_secret=SECRET, issuer=ISSUER)

    assert verifier.verify(mint_hs256(SECRET, iss=ISSUER)).role == "authenticated"
    assert hs_verifier.verify(mint_hs256(SECRET, iss="https://anything.example")).role == "authenticated"


@pytest.mark.parametrize(
    ("kwargs", "claim"),
    [({"exp_in": None}, "exp"), ({"aud": None}, "aud"), ({"sub": OMIT}, "sub")],
)
def test_missing_required_claim_is_refused(hs_verifier: JwtVerifier, kwargs: dict, claim: str) -> None:
    error = refused(hs_verifier, mint_hs256(SECRET, **kwargs))

    assert error.reason == f"token is missing the '{claim}' claim"


# ---------------------------------------------------------------- signatures and algorithms


def test_hs256_signed_with_another_secret_is_refused(hs_verifier: JwtVerifier) -> None:
    token = mint_hs256("a-completely-different-secret-of-32-bytes+")

    assert refused(hs_verifier, token).reason == "token signature is invalid"


def test_tampered_payload_is_refused(hs_verifier: JwtVerifier) -> None:
    genuine = mint_hs256(SECRET, sub=new_user_id())
    forged_payload = mint_hs256(SECRET, sub=new_user_id()).split(".")[1]
    header, _, signature = genuine.split(".")
    tampered = f"{header}.{forged_payload}.{signature}"

    assert refused(hs_verifier, tampered).reason == "token signature is invalid"


def test_es256_signed_by_impostor_with_known_kid_is_refused(
    jwks_verifier: JwtVerifier, pair: EcKeyPair
) -> None:
    forged = pair.impostor().mint()

    assert refused(jwks_verifier, forged).reason == "token signature is invalid"


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_is_refused_by_every_verifier(alg: str, jwks_verifier: JwtVerifier) -> None:
    both = JwtVerifier(hs256_secret=SECRET, jwks={"keys": [EcKeyPair().jwk]})
    for verifier in (JwtVerifier(hs256_secret=SECRET), jwks_verifier, both):
        error = refused(verifier, mint_alg_none(alg=alg))
        assert error.reason == f"token algorithm '{alg}' is not allowed"


def test_missing_alg_header_is_refused(hs_verifier: JwtVerifier) -> None:
    token = encode_compact({"typ": "JWT"}, {"sub": new_user_id()}, lambda _: b"sig")

    assert refused(hs_verifier, token).reason == "token header has no 'alg'"


def test_unsupported_alg_is_refused_naming_it(jwks_verifier: JwtVerifier, pair: EcKeyPair) -> None:
    token = encode_compact({"alg": "PS512", "kid": pair.kid}, {"sub": new_user_id()}, lambda _: b"x" * 64)

    assert refused(jwks_verifier, token).reason == "token algorithm 'PS512' is not allowed"


def test_algorithm_confusion_hs256_signed_with_public_key_is_refused(
    pair: EcKeyPair, server: JwksServer, clock: FakeClock
) -> None:
    # Worst case: the JWKS even lists a symmetric key whose bytes are the public PEM. A naive
    # verifier would take "the key for this kid" and let the token header pick HMAC.
    pem_as_k = base64.urlsafe_b64encode(pair.public_pem).rstrip(b"=").decode()
    server.add_key({"kty": "oct", "kid": "sym", "k": pem_as_k, "alg": "HS256"})
    verifier = JwtVerifier(jwks_url=server.url, clock=clock)

    for kid in (pair.kid, "sym"):
        forged = mint_hs256_with_public_key(pair, headers={"kid": kid})
        assert refused(verifier, forged).reason == "token algorithm 'HS256' is not allowed"
    assert server.request_count == 0  # refused before any key lookup
    assert verifier.allowed_algorithms == {"ES256", "RS256"}


def test_algorithm_confusion_against_verifier_with_both_sources(pair: EcKeyPair) -> None:
    # HS256 is allowed here, but it is only ever checked against the real secret.
    verifier = JwtVerifier(hs256_secret=SECRET, jwks={"keys": [pair.jwk]})

    forged = mint_hs256_with_public_key(pair)

    assert refused(verifier, forged).reason == "token signature is invalid"


def test_es256_token_refused_by_hs256_only_verifier(hs_verifier: JwtVerifier, pair: EcKeyPair) -> None:
    assert refused(hs_verifier, pair.mint_es256()).reason == "token algorithm 'ES256' is not allowed"


def test_token_alg_must_match_the_selected_key(pair: EcKeyPair) -> None:
    rsa_pair = RsaKeyPair(kid=pair.kid)  # RS256 token naming the EC key's kid
    verifier = JwtVerifier(jwks={"keys": [pair.jwk]})

    error = refused(verifier, rsa_pair.mint_rs256())

    assert error.reason == f"token algorithm 'RS256' does not match signing key '{pair.kid}'"


def test_asymmetric_token_without_kid_is_refused(jwks_verifier: JwtVerifier, pair: EcKeyPair) -> None:
    error = refused(jwks_verifier, pair.mint_es256(headers={"kid": OMIT}))

    assert error.reason == "token has no 'kid' header; ES256 tokens must name their signing key"


# ---------------------------------------------------------------- JWKS: kid lookup, refetch, cache


def test_unknown_kid_triggers_exactly_one_refetch_then_refusal(
    jwks_verifier: JwtVerifier, pair: EcKeyPair, server: JwksServer, clock: FakeClock
) -> None:
    jwks_verifier.verify(pair.mint_es256())
    assert server.request_count == 1
    clock.advance(31)  # past the refetch rate limit, still inside the 600 s cache

    error = refused(jwks_verifier, EcKeyPair(kid="abc").mint_es256())

    assert error.reason == "token signing key 'abc' is unknown"
    assert server.request_count == 2


def test_unknown_kids_within_rate_window_cause_no_extra_fetch(
    jwks_verifier: JwtVerifier, pair: EcKeyPair, server: JwksServer, clock: FakeClock
) -> None:
    jwks_verifier.verify(pair.mint_es256())
    clock.advance(31)
    refused(jwks_verifier, EcKeyPair(kid="spray-0").mint_es256())
    assert server.request_count == 2

    for i in range(1, 20):  # an attacker spraying random kids
        clock.advance(1)
        assert "is unknown" in refused(jwks_verifier, EcKeyPair(kid=f"spray-{i}").mint_es256()).reason
    assert server.request_count == 2

    clock.advance(11)  # 30 s after the last fetch: one more is allowed
    refused(jwks_verifier, EcKeyPair(kid="spray-late").mint_es256())
    assert server.request_count == 3


def test_unknown_kid_right_after_a_fetch_is_refused_without_refetch(
    jwks_verifier: JwtVerifier, pair: EcKeyPair, server: JwksServer
) -> None:
    jwks_verifier.verify(pair.mint_es256())

    assert "is unknown" in refused(jwks_verifier, EcKeyPair(kid="new").mint_es256()).reason
    assert server.request_count == 1


def test_key_rotation_new_kid_is_picked_up_by_refetch(
    jwks_verifier: JwtVerifier, pair: EcKeyPair, server: JwksServer, clock: FakeClock
) -> None:
    jwks_verifier.verify(pair.mint_es256())
    rotated = EcKeyPair()
    server.add_key(rotated.jwk)
    clock.advance(31)
    user_id = new_user_id()

    assert jwks_verifier.verify(rotated.mint_es256(sub=user_id)).user_id == user_id
    assert server.request_count == 2
    for _ in range(10):
        jwks_verifier.verify(rotated.mint_es256())
        jwks_verifier.verify(pair.mint_es256())
    assert server.request_count == 2


def test_keys_are_cached_then_refreshed_after_cache_lifetime(
    jwks_verifier: JwtVerifier, pair: EcKeyPair, server: JwksServer, clock: FakeClock
) -> None:
    for _ in range(50):
        jwks_verifier.verify(pair.mint_es256())
        clock.advance(10)  # 500 s in total, under the 600 s lifetime
    assert server.request_count == 1

    clock.advance(101)
    jwks_verifier.verify(pair.mint_es256())
    assert server.request_count == 2


def test_revoked_key_is_refused_after_cache_refresh(
    jwks_verifier: JwtVerifier, pair: EcKeyPair, server: JwksServer, clock: FakeClock
) -> None:
    jwks_verifier.verify(pair.mint_es256())
    server.remove_key(pair.kid)
    clock.advance(601)

    error = refused(jwks_verifier, pair.mint_es256())

    assert error.reason == f"token signing key '{pair.kid}' is unknown"
    assert server.request_count == 2


def test_concurrent_cold_verifies_share_one_fetch(pair: EcKeyPair, server: JwksServer) -> None:
    server.delay_seconds = 0.1
    verifier = JwtVerifier(jwks_url=server.url)
    tokens = [pair.mint_es256() for _ in range(16)]
    results: list[object] = []
    barrier = threading.Barrier(len(tokens))

    def worker(token: str) -> None:
        barrier.wait()
        try:
            results.append(verifier.verify(token))
        except AuthError as exc:  # pragma: no cover - reported by the assertion below
            results.append(exc)

    threads = [threading.Thread(target=worker, args=(token,)) for token in tokens]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=5)

    assert all(isinstance(result, UserClaims) for result in results), results
    assert len(results) == 16
    assert server.request_count == 1


def test_jwks_entries_that_cannot_be_used_are_skipped(pair: EcKeyPair, server: JwksServer) -> None:
    server.keys[:] = [
        {"kty": "EC", "crv": "P-256", "x": "junk", "y": "junk", "kid": "broken"},
        {**EcKeyPair().jwk, "use": "enc", "kid": "encryption-key"},
        {k: v for k, v in EcKeyPair().jwk.items() if k != "kid"},
        "not-a-dict",
        pair.jwk,
    ]
    verifier = JwtVerifier(jwks_url=server.url)

    assert verifier.verify(pair.mint_es256()).role == "authenticated"
    assert "is unknown" in refused(verifier, EcKeyPair(kid="encryption-key").mint_es256()).reason


def test_jwks_entries_that_trip_pyjwkset_are_skipped(pair: EcKeyPair, server: JwksServer) -> None:
    # PyJWKSet raises on some entries instead of skipping them (KeyError for an oct key without
    # "k", TypeError for a list as "alg"). One odd entry must not take down authentication.
    server.keys[:] = [
        {"kty": "oct", "kid": "no-k"},
        {**EcKeyPair().jwk, "kid": "list-alg", "alg": ["ES256"]},
        {**EcKeyPair().jwk, "kid": "dict-alg", "alg": {}},
        {**EcKeyPair().jwk, "kid": 7},
        pair.jwk,
    ]
    verifier = JwtVerifier(jwks_url=server.url)

    assert verifier.verify(pair.mint_es256()).role == "authenticated"
    assert JwtVerifier(jwks={"keys": server.keys}).verify(pair.mint_es256()).role == "authenticated"


def test_jwks_key_of_another_algorithm_is_not_used(server: JwksServer) -> None:
    # An EC P-384 key without "alg" would verify ES384, which is not on the allow-list.
    p384 = ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP384R1()).public_key(), as_dict=True)
    server.keys[:] = [{**p384, "kid": "p384", "use": "sig"}]
    verifier = JwtVerifier(jwks_url=server.url)
    token = encode_compact({"alg": "ES256", "kid": "p384"}, {"sub": new_user_id()}, lambda _: b"x" * 64)

    assert refused(verifier, token).reason == "token signing key 'p384' is unknown"


def test_empty_jwks_is_valid_and_every_kid_is_unknown(server: JwksServer) -> None:
    server.keys.clear()  # what a project still on the legacy secret publishes
    verifier = JwtVerifier(jwks_url=server.url)

    assert refused(verifier, EcKeyPair(kid="k1").mint_es256()).reason == "token signing key 'k1' is unknown"


def test_inline_jwks_unknown_kid_is_refused_without_network() -> None:
    verifier = JwtVerifier(jwks={"keys": [EcKeyPair().jwk]})

    assert refused(verifier, EcKeyPair(kid="zzz").mint_es256()).reason == "token signing key 'zzz' is unknown"


# ---------------------------------------------------------------- JWKS unavailable


def test_jwks_server_down_raises_auth_unavailable(pair: EcKeyPair, clock: FakeClock) -> None:
    verifier = JwtVerifier(jwks_url=closed_port_url(), clock=clock)

    error = refused(verifier, pair.mint_es256())

    assert isinstance(error, AuthUnavailable)
    assert error.http_status == 503
    assert error.reason.startswith("could not fetch signing keys")
    assert "ConnectionRefusedError" in error.reason


def test_jwks_http_error_raises_auth_unavailable_and_backs_off(
    pair: EcKeyPair, server: JwksServer, clock: FakeClock
) -> None:
    server.status = 500
    verifier = JwtVerifier(jwks_url=server.url, clock=clock)

    first = refused(verifier, pair.mint_es256())
    second = refused(verifier, pair.mint_es256())

    assert isinstance(first, AuthUnavailable)
    assert first.reason == "could not fetch signing keys (HTTP 500)"
    assert isinstance(second, AuthUnavailable)
    assert server.request_count == 1  # the second call did not hammer the failing endpoint

    server.status = 200
    clock.advance(5)
    assert verifier.verify(pair.mint_es256()).role == "authenticated"
    assert server.request_count == 2


def test_jwks_response_that_is_not_a_jwks_raises_auth_unavailable(
    jwks_verifier: JwtVerifier, pair: EcKeyPair, server: JwksServer
) -> None:
    server.body = b"<html>maintenance</html>"

    error = refused(jwks_verifier, pair.mint_es256())

    assert isinstance(error, AuthUnavailable)
    assert error.reason == "could not fetch signing keys (response is not JSON)"


def test_jwks_redirect_is_not_followed(pair: EcKeyPair, server: JwksServer) -> None:
    # The keys come from the configured URL or not at all.
    with JwksServer([pair.jwk]) as elsewhere:
        server.redirect_to = elsewhere.url
        error = refused(JwtVerifier(jwks_url=server.url), pair.mint_es256())

        assert isinstance(error, AuthUnavailable)
        assert error.reason == "could not fetch signing keys (HTTP 302)"
        assert elsewhere.request_count == 0


def test_oversized_jwks_response_is_refused(pair: EcKeyPair, server: JwksServer) -> None:
    server.body = b'{"keys": [], "padding": "' + b"x" * (1024 * 1024) + b'"}'

    error = refused(JwtVerifier(jwks_url=server.url), pair.mint_es256())

    assert isinstance(error, AuthUnavailable)
    assert error.reason == "could not fetch signing keys (response is larger than 1048576 bytes)"


def test_slow_jwks_endpoint_is_given_up_after_the_fetch_timeout(pair: EcKeyPair, server: JwksServer) -> None:
    server.delay_seconds = 2.0
    verifier = JwtVerifier(jwks_url=server.url, fetch_timeout_seconds=0.2)

    started = time.monotonic()
    error = refused(verifier, pair.mint_es256())

    assert time.monotonic() - started < 1.5
    assert isinstance(error, AuthUnavailable)
    assert "timed out" in error.reason


def test_trickling_jwks_endpoint_is_given_up_after_the_fetch_timeout(pair: EcKeyPair, server: JwksServer) -> None:
    # Every piece arrives well within the socket timeout, but the whole body takes ~2 s.
    server.drip_seconds = 0.05
    verifier = JwtVerifier(jwks_url=server.url, fetch_timeout_seconds=0.3)

    started = time.monotonic()
    error = refused(verifier, pair.mint_es256())

    assert time.monotonic() - started < 1.5
    assert isinstance(error, AuthUnavailable)
    assert error.reason == "could not fetch signing keys (TimeoutError: response took over 0.3 s)"


def test_stale_keys_are_used_while_refresh_fails_then_unavailable(
    jwks_verifier: JwtVerifier, pair: EcKeyPair, server: JwksServer, clock: FakeClock
) -> None:
    jwks_verifier.verify(pair.mint_es256())
    server.status = 503
    clock.advance(601)  # cache expired: refresh fails, the stale key still verifies

    assert jwks_verifier.verify(pair.mint_es256()).role == "authenticated"
    assert server.request_count == 2

    clock.advance(600)  # older than two cache lifetimes: no longer trusted
    error = refused(jwks_verifier, pair.mint_es256())
    assert isinstance(error, AuthUnavailable)
    assert "could not fetch signing keys" in error.reason


def test_unknown_kid_when_refetch_fails_is_unavailable_not_unknown(
    jwks_verifier: JwtVerifier, pair: EcKeyPair, server: JwksServer, clock: FakeClock
) -> None:
    jwks_verifier.verify(pair.mint_es256())
    server.status = 502
    clock.advance(31)

    error = refused(jwks_verifier, EcKeyPair(kid="rotated").mint_es256())

    assert isinstance(error, AuthUnavailable)
    assert error.reason == "could not fetch signing keys (HTTP 502)"
    assert jwks_verifier.verify(pair.mint_es256()).role == "authenticated"  # known keys still work


# ---------------------------------------------------------------- subject and role


@pytest.mark.parametrize("sub", ["not-a-uuid", "", "12345678123456781234567812345678", f"{new_user_id()}\n"])
def test_non_uuid_sub_is_refused(hs_verifier: JwtVerifier, sub: str) -> None:
    error = refused(hs_verifier, mint_hs256(SECRET, sub=sub))

    assert error.reason in ("token subject ('sub') is not a user UUID", "token is missing the 'sub' claim")


def test_non_string_sub_is_refused(hs_verifier: JwtVerifier) -> None:
    error = refused(hs_verifier, mint_hs256(SECRET, extra={"sub": 42}))

    assert error.reason == "token subject ('sub') is not a user UUID"


@pytest.mark.parametrize("role", ["service_role", "anon", "supabase_admin", "Authenticated"])
def test_non_user_role_is_refused_naming_the_role(hs_verifier: JwtVerifier, role: str) -> None:
    error = refused(hs_verifier, mint_hs256(SECRET, role=role))

    assert error.reason == f"token role is '{role}'; a user session token is required"


@pytest.mark.parametrize("role", ["service_role", "anon"])
@pytest.mark.parametrize("issuer", [None, ISSUER])
def test_legacy_api_key_jwt_is_refused_naming_its_role(role: str, issuer: str | None) -> None:
    # The legacy anon/service_role API keys: signed with the project secret, iss "supabase",
    # a project ref, no sub and no aud. The reason must say "wrong kind of token", not
    # "missing sub".
    verifier = JwtVerifier(hs256_secret=SECRET, issuer=issuer)
    token = mint_hs256(
        SECRET,
        role=role,
        aud=None,
        sub=OMIT,
        exp_in=10 * 365 * 86400,
        extra={"iss": "supabase", "ref": "abc"},
    )

    assert refused(verifier, token).reason == f"token role is '{role}'; a user session token is required"


def test_forged_legacy_key_is_refused_on_its_signature(hs_verifier: JwtVerifier) -> None:
    token = mint_hs256("not-the-project-secret-but-long-enough!!", role="service_role", aud=None, sub=OMIT)

    assert refused(hs_verifier, token).reason == "token signature is invalid"


def test_missing_role_is_refused(hs_verifier: JwtVerifier) -> None:
    error = refused(hs_verifier, mint_hs256(SECRET, role=None))

    assert error.reason == "token has no 'role' claim; a user session token is required"


def test_hostile_role_value_is_sanitised_in_reason(hs_verifier: JwtVerifier) -> None:
    error = refused(hs_verifier, mint_hs256(SECRET, role="x\nINJECTED log line" + "y" * 200))

    assert "\n" not in error.reason
    assert len(error.reason) < 120


# ---------------------------------------------------------------- malformed tokens


@pytest.mark.parametrize(
    "token",
    ["", "abc", "a.b", "a.b.c", "!!!.@@@.###", "eyJhbGciOiJIUzI1NiJ9.!!.sig", "W10.e30.e30"],
)
def test_malformed_token_is_refused(hs_verifier: JwtVerifier, token: str) -> None:
    with pytest.raises(AuthError) as info:
        hs_verifier.verify(token)

    assert info.value.reason == "token is malformed"


def test_correctly_signed_non_json_payload_is_malformed(hs_verifier: JwtVerifier) -> None:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(b'{"alg":"HS256"}')
    signing_input = f"{header}.{b64(b'not json')}"
    signature = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()

    assert refused(hs_verifier, f"{signing_input}.{b64(signature)}").reason == "token is malformed"


def test_oversized_token_is_refused_before_parsing(hs_verifier: JwtVerifier) -> None:
    token = mint_hs256(SECRET, extra={"user_metadata": {"blob": "x" * 20000}})

    assert "token is too large" in refused(hs_verifier, token).reason


def test_non_string_kid_is_malformed(jwks_verifier: JwtVerifier, pair: EcKeyPair) -> None:
    token = encode_compact({"alg": "ES256", "kid": 7}, {"sub": new_user_id()}, lambda _: b"x" * 64)

    assert refused(jwks_verifier, token).reason == "token is malformed"


# ---------------------------------------------------------------- Authorization header


@pytest.mark.parametrize(
    "template",
    ["Bearer {t}", "bearer {t}", "BEARER {t}", "Bearer    {t}", "  Bearer {t}  ", "Bearer\t{t}"],
)
def test_header_accepts_bearer_variants(hs_verifier: JwtVerifier, template: str) -> None:
    user_id = new_user_id()
    header = template.format(t=mint_hs256(SECRET, sub=user_id))

    assert hs_verifier.verify_header(header).user_id == user_id


@pytest.mark.parametrize("header", [None, "", "   "])
def test_missing_header_is_refused(hs_verifier: JwtVerifier, header: str | None) -> None:
    with pytest.raises(AuthError) as info:
        hs_verifier.verify_header(header)

    assert info.value.reason == "missing Authorization header"


@pytest.mark.parametrize(
    "template",
    ["Basic {t}", "Bearer", "Bearer ", "Token {t}", "Bearer{t}", "Bearer {t} extra", "{t}", "Bearer: {t}"],
)
def test_malformed_header_is_refused(hs_verifier: JwtVerifier, template: str) -> None:
    token = mint_hs256(SECRET)
    with pytest.raises(AuthError) as info:
        hs_verifier.verify_header(template.format(t=token))

    assert info.value.reason == "Authorization header must be 'Bearer <token>'"
    assert token not in info.value.reason


def test_header_with_bad_token_reports_the_token_check(hs_verifier: JwtVerifier) -> None:
    with pytest.raises(AuthError) as info:
        hs_verifier.verify_header(f"Bearer {mint_hs256(SECRET, exp_in=-3600)}")

    assert info.value.reason == "token has expired"


# ---------------------------------------------------------------- reasons never leak the token


def test_no_reason_ever_contains_the_token(pair: EcKeyPair, server: JwksServer, clock: FakeClock) -> None:
    verifier = JwtVerifier(hs256_secret=SECRET, jwks_url=server.url, issuer=ISSUER, clock=clock)
    bad_tokens = [
        mint_hs256(SECRET, iss=ISSUER, exp_in=-999),
        mint_hs256(SECRET, iss=ISSUER, aud="x"),
        mint_hs256(SECRET, iss="https://other"),
        mint_hs256(SECRET, exp_in=None),  # no exp at all
        mint_hs256(SECRET, iss=ISSUER, role="service_role"),
        mint_hs256(SECRET, iss=ISSUER, sub="nope"),
        mint_alg_none(iss=ISSUER),
        pair.impostor().mint_es256(iss=ISSUER),
        EcKeyPair(kid="unknown-kid").mint_es256(iss=ISSUER),
        pair.mint_es256(iss=ISSUER, headers={"kid": OMIT}),
    ]
    reasons = set()
    for token in bad_tokens:
        reasons.add(refused(verifier, token).reason)
        with pytest.raises(AuthError) as info:
            verifier.verify_header(f"Bearer {token}")
        assert token not in repr(info.value)
    assert len(reasons) == len(bad_tokens)  # each failure names a different check


# ---------------------------------------------------------------- construction


def test_constructor_requires_a_key_source() -> None:
    with pytest.raises(ValueError, match="at least one key source"):
        JwtVerifier()


def test_constructor_refuses_short_hs256_secret() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        JwtVerifier(hs256_secret="short")


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/jwks.json"])
def test_constructor_refuses_non_http_jwks_url(url: str) -> None:
    with pytest.raises(ValueError, match="http"):
        JwtVerifier(jwks_url=url)


def test_constructor_refuses_invalid_inline_jwks() -> None:
    with pytest.raises(ValueError, match="inline jwks is invalid"):
        JwtVerifier(jwks={"not": "a jwks"})


def test_constructor_does_no_network_io(server: JwksServer, pair: EcKeyPair) -> None:
    # Building a verifier at import or config time must not fetch the JWKS: the first token does.
    verifier = JwtVerifier(hs256_secret=SECRET, jwks_url=server.url)
    assert server.request_count == 0

    verifier.verify(mint_hs256(SECRET))  # an HS256 token needs no JWKS either
    assert server.request_count == 0

    verifier.verify(pair.mint_es256())
    assert server.request_count == 1


@pytest.mark.parametrize(
    "url", ["http://example.com/jwks.json", "http://10.0.0.1/jwks.json", "http://127.0.0.1.example.com/jwks.json"]
)
def test_constructor_refuses_plain_http_jwks_url_off_loopback(url: str) -> None:
    # Keys fetched over plain HTTP could be swapped on the path, and whoever swaps them can
    # sign tokens for any user.
    with pytest.raises(ValueError, match="plain http is allowed only to a loopback host"):
        JwtVerifier(jwks_url=url)


@pytest.mark.parametrize(
    "url",
    [
        "https://abcdefghijklmnop.supabase.co/auth/v1/.well-known/jwks.json",
        "http://127.0.0.1:54321/auth/v1/.well-known/jwks.json",
        "http://localhost:54321/auth/v1/.well-known/jwks.json",
        "http://[::1]:54321/auth/v1/.well-known/jwks.json",
    ],
)
def test_constructor_accepts_https_and_loopback_http_jwks_url(url: str) -> None:
    assert JwtVerifier(jwks_url=url).allowed_algorithms == {"ES256", "RS256"}


def test_zero_cache_lifetime_still_respects_the_rate_limit(
    pair: EcKeyPair, server: JwksServer, clock: FakeClock
) -> None:
    verifier = JwtVerifier(jwks_url=server.url, jwks_cache_seconds=0, clock=clock)

    for _ in range(5):
        clock.advance(1)
        assert verifier.verify(pair.mint_es256()).role == "authenticated"
    assert server.request_count == 1

    clock.advance(30)
    verifier.verify(pair.mint_es256())
    assert server.request_count == 2


def test_empty_strings_count_as_not_configured(server: JwksServer, pair: EcKeyPair) -> None:
    verifier = JwtVerifier(hs256_secret="", jwks_url=server.url, issuer="")

    assert verifier.allowed_algorithms == {"ES256", "RS256"}
    assert verifier.verify(pair.mint_es256(iss="https://any")).role == "authenticated"
    with pytest.raises(ValueError, match="at least one key source"):
        JwtVerifier(hs256_secret="", jwks_url="")
