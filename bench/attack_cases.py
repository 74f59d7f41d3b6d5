"""What `python -m bench.attack` sends: forged tokens, hostile bodies and the fuzzer's mutations.

Pure data builders (no I/O): bench/attack.py sends them and judges the answers. Every random
choice comes from a `random.Random` seeded by the caller, so a run is repeatable.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
import time
import uuid
import warnings
from dataclasses import dataclass
from typing import Any

import jwt

#: What a refusal must be: `auth` 401/403 (2xx = auth bypass), `deny` not 2xx (cross-tenant access),
#: `refuse` a 4xx (2xx = hostile input accepted), `any` whatever (still checked for 5xx, DB text...).
AUTH, DENY, REFUSE, ANY = "auth", "deny", "refuse", "any"

DASHES = "-" * 36
ISSUER = "mcp-control-plane-local"  # devstack.seed.ISSUER


def b64url(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _segments(header: dict[str, Any], claims: dict[str, Any]) -> str:
    return f"{b64url(json.dumps(header, separators=(',', ':')))}.{b64url(json.dumps(claims, separators=(',', ':')))}"


def hs_sign(header: dict[str, Any], claims: dict[str, Any], key: bytes) -> str:
    """A JWT with whatever header we like, HMAC-SHA256-signed with `key` (PyJWT would refuse some)."""
    signing_input = _segments(header, claims)
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def user_claims(sub: str, lifetime: int = 3600, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"iss": ISSUER, "sub": sub, "role": "authenticated", "aud": "authenticated", "iat": now,
            "exp": now + lifetime, "email": "", **extra}


#: Tokens signed with the real secret whose only oddity is a claim's type or an unlisted HMAC
#: algorithm: only the secret's holder can make them, so accepting one is lenient, not a bypass.
LENIENT_ONLY = frozenset({"alg HS512 right secret", "alg HS384 right secret", "iat in 1 h", "exp a string",
                          "exp 10**30", "20 KB token", "two tokens"})


def forged_jwts(secret: str, victim: str, anon_key: str, other_token: str) -> list[tuple[str, str | None, str]]:
    """(label, Authorization header value or None, expectation): AUTH for what must be a 401
    (forged without the secret, expired, another kind of key, claims a user session must not
    have), REFUSE for LENIENT_ONLY.

    `victim` is the user id the forgeries claim to be; `other_token` a valid token of another user
    (for splicing signatures).
    """
    with warnings.catch_warnings():  # HS384/HS512 with a 64-byte secret: PyJWT warns, and that is the point
        warnings.simplefilter("ignore")
        return _forged_jwts(secret, victim, anon_key, other_token)


def _forged_jwts(secret: str, victim: str, anon_key: str, other_token: str) -> list[tuple[str, str | None, str]]:
    good = user_claims(victim)
    now = int(time.time())
    wrong = "not-the-secret-" + "x" * 40
    header, payload, _ = jwt.encode(good, secret, algorithm="HS256").split(".")
    o_header, o_payload, o_signature = other_token.split(".")
    cases: list[tuple[str, str | None]] = [
        ("no Authorization header", None),
        ("empty Bearer", "Bearer "),
        ("scheme only", "Bearer"),
        ("Basic scheme", "Basic " + base64.b64encode(b"admin:admin").decode()),
        ("not a JWT", "Bearer not-a-jwt"),
        ("three empty segments", "Bearer .."),
        ("wrong HS256 secret", jwt.encode(good, wrong, algorithm="HS256")),
        ("expired 1 h ago", jwt.encode({**good, "iat": now - 7200, "exp": now - 3600}, secret, algorithm="HS256")),
        ("nbf in 1 h", jwt.encode({**good, "nbf": now + 3600}, secret, algorithm="HS256")),
        ("iat in 1 h", jwt.encode({**good, "iat": now + 3600}, secret, algorithm="HS256")),
        ("alg none", f"{_segments({'alg': 'none', 'typ': 'JWT'}, good)}."),
        ("alg None", f"{_segments({'alg': 'None', 'typ': 'JWT'}, good)}."),
        ("alg NONE with signature", f"{_segments({'alg': 'NONE'}, good)}.{b64url(b'x')}"),
        ("alg HS512 right secret", jwt.encode(good, secret, algorithm="HS512")),
        ("alg HS384 right secret", jwt.encode(good, secret, algorithm="HS384")),
        ("alg RS256 header, HMAC-signed (confusion)", hs_sign({"alg": "RS256", "kid": "k1", "typ": "JWT"}, good,
                                                               secret.encode())),
        ("alg ES256 header, no kid", hs_sign({"alg": "ES256", "typ": "JWT"}, good, secret.encode())),
        ("HS256 keyed with the anon key (public value)", jwt.encode(good, anon_key, algorithm="HS256")),
        ("HS256 keyed with empty secret, kid=../../dev/null", hs_sign({"alg": "HS256", "kid": "../../../../dev/null"},
                                                                        good, b"")),
        ("jku/x5u headers, wrong secret", hs_sign({"alg": "HS256", "jku": "http://127.0.0.1:9/jwks.json",
                                                   "x5u": "http://127.0.0.1:9/x"}, good, wrong.encode())),
        ("embedded jwk header, signed with it", hs_sign({"alg": "HS256", "jwk": {"kty": "oct", "k": b64url(b"k" * 32)}},
                                                        good, b"k" * 32)),
        ("signature stripped", f"{header}.{payload}."),
        ("another user's signature", f"{header}.{payload}.{o_signature}"),
        ("another user's token, sub swapped", f"{o_header}.{b64url(json.dumps({**json.loads(base64.urlsafe_b64decode(o_payload + '==')), 'sub': victim}))}.{o_signature}"),  # noqa: E501
        ("anon key", anon_key),
        ("service_role key", jwt.encode({"iss": "supabase", "role": "service_role", "iat": now, "exp": now + 3600},
                                        secret, algorithm="HS256")),
        ("role service_role with sub", jwt.encode({**good, "role": "service_role"}, secret, algorithm="HS256")),
        ("role anon with sub", jwt.encode({**good, "role": "anon"}, secret, algorithm="HS256")),
        ("aud anon", jwt.encode({**good, "aud": "anon"}, secret, algorithm="HS256")),
        ("no aud", jwt.encode({k: v for k, v in good.items() if k != "aud"}, secret, algorithm="HS256")),
        ("no exp", jwt.encode({k: v for k, v in good.items() if k != "exp"}, secret, algorithm="HS256")),
        ("no sub", jwt.encode({k: v for k, v in good.items() if k != "sub"}, secret, algorithm="HS256")),
        ("sub not a UUID", jwt.encode({**good, "sub": "admin"}, secret, algorithm="HS256")),
        ("sub SQL", jwt.encode({**good, "sub": "' or '1'='1"}, secret, algorithm="HS256")),
        ("sub 36 dashes", jwt.encode({**good, "sub": DASHES}, secret, algorithm="HS256")),
        ("sub with NUL", jwt.encode({**good, "sub": victim[:-1] + "\u0000"}, secret, algorithm="HS256")),
        ("exp a string", hs_sign({"alg": "HS256", "typ": "JWT"}, {**good, "exp": "99999999999"}, secret.encode())),
        ("exp 10**30", hs_sign({"alg": "HS256", "typ": "JWT"}, {**good, "exp": 10 ** 30}, secret.encode())),
        ("20 KB token", jwt.encode({**good, "pad": "x" * 20000}, secret, algorithm="HS256")),
        ("two tokens", f"{jwt.encode(good, secret, algorithm='HS256')} {jwt.encode(good, secret, algorithm='HS256')}"),
        ("header not JSON", f"{b64url(b'{not json')}.{payload}.{b64url(b'x')}"),
        ("header a JSON list", f"{b64url(b'[1,2]')}.{payload}.{b64url(b'x')}"),
        ("payload a JSON list", hs_sign({"alg": "HS256"}, [1, 2], secret.encode())),  # type: ignore[arg-type]
    ]
    return [(label, value if value is None or value.split(" ")[0] in ("Bearer", "Basic") else f"Bearer {value}",
             REFUSE if label in LENIENT_ONLY else AUTH) for label, value in cases]


def bad_toolbox_tokens(real: str, jwt_token: str, wrong_master_key: str, other_version_key: str) -> list[
        tuple[str, str | None]]:
    """(label, Authorization header) for the heartbeat: all must be 401."""
    return [
        ("no Authorization header", None),
        ("empty Bearer", "Bearer "),
        ("Basic scheme", "Basic " + base64.b64encode(f"x:{real}".encode()).decode()),
        ("wrong token (64 hex)", "Bearer " + "0" * 64),
        ("real token, last char changed", "Bearer " + real[:-1] + ("0" if real[-1] != "0" else "1")),
        ("real token upper-cased", "Bearer " + real.upper()),
        ("real token truncated to 32", "Bearer " + real[:32]),
        ("real token + suffix", "Bearer " + real + "00"),
        ("derived with the wrong master secret", "Bearer " + wrong_master_key),
        ("derived for key version 2 (not issued)", "Bearer " + other_version_key),
        ("the user's JWT", "Bearer " + jwt_token),
        ("SHA-256 of the real token", "Bearer " + hashlib.sha256(real.encode()).hexdigest()),
        ("SQL in token", "Bearer ' OR 1=1 --"),
        ("16 KB token", "Bearer " + "a" * 16384),
        ("token twice", f"Bearer {real} {real}"),
    ]


# --- hostile JSON -----------------------------------------------------------------------------------

def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def with_field(body: dict[str, Any], key: str, raw_value: str) -> bytes:
    """`body` with `key` set to `raw_value`, spliced as raw JSON text (NaN, lone surrogates, 1e400...)."""
    rest = {k: v for k, v in body.items() if k != key}
    text = dumps(rest).decode()
    inner = text[1:-1]
    return ("{" + f"{json.dumps(key)}:{raw_value}" + ("," + inner if inner else "") + "}").encode()


def deep_array(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def deep_object(depth: int, key: str = "a") -> bytes:
    return (f'{{"{key}":' * depth + "1" + "}" * depth).encode()


def common_json_attacks(base: dict[str, Any], string_key: str) -> list[tuple[str, bytes, str]]:
    """(label, body, expectation) every JSON-taking function gets: structure and encoding attacks."""
    first = next(iter(base)) if base else "x"
    return [
        ("deep array nesting 100k", deep_array(100_000), REFUSE),
        ("deep object nesting 40", deep_object(40), REFUSE),
        ("duplicate keys", ("{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in base.items())
                            + f",{json.dumps(first)}:{json.dumps(base.get(first))}}}").encode(), REFUSE),
        ("NaN", with_field(base, string_key, "NaN"), REFUSE),
        ("Infinity", with_field(base, string_key, "-Infinity"), REFUSE),
        ("1e400 number", with_field(base, string_key, "1e400"), REFUSE),
        ("lone surrogate \\ud800", with_field(base, string_key, '"a\\ud800b"'), REFUSE),
        ("NUL \\u0000 in a string", with_field(base, string_key, '"a\\u0000b"'), REFUSE),
        ("invalid UTF-8 bytes", dumps(base)[:-1] + b',"zz":"\xff\xfe"}', REFUSE),
        ("UTF-8 BOM prefix", b"\xef\xbb\xbf" + dumps(base), REFUSE),
        ("JSON array", dumps([base]), REFUSE),
        ("JSON string", b'"hello"', REFUSE),
        ("JSON null", b"null", REFUSE),
        ("JSON number", b"12345678901234567890123456789", REFUSE),
        ("truncated JSON", dumps(base)[:-3], REFUSE),
        ("trailing garbage", dumps(base) + b"}}}", REFUSE),
        ("single quotes", dumps(base).replace(b'"', b"'"), REFUSE),
        ("1 MiB + 1 byte", b'{"padding":"' + b"A" * (1024 * 1024 - 13) + b'"}', REFUSE),
    ]


def heartbeat(containers: int = 0, **extra: Any) -> dict[str, Any]:
    """A heartbeat in the real DTMA's format (docs/real-agent.md) with `containers` container summaries."""
    items = [{"id": hashlib.sha256(str(n).encode()).hexdigest(), "names": [f"/fake-container-{n}"],
              "image": "mcp/everything:latest", "image_id": "sha256:" + "0" * 64, "command": "node dist/index.js",
              "created": 1_700_000_000 + n, "state": "running", "status": "Up 5 minutes",
              "ports": [{"ip": "0.0.0.0", "private_port": 3001, "public_port": 40000 + n % 20000, "type": "tcp"}]}
             for n in range(containers)]
    body = {"dtma_version": "0.1.0", "system_status": {"cpu_load_percent": 3.5, "memory": {"total": 1024},
                                                       "disk": {"free": 10}},
            "tool_statuses": items}
    body.update(extra)
    return body


def heartbeat_of_size(target: int) -> bytes:
    """A valid heartbeat of about `target` bytes (container summaries), under 1 MiB."""
    per = len(dumps(heartbeat(1))) - len(dumps(heartbeat(0)))
    body = dumps(heartbeat(max(1, (target - 200) // per)))
    while len(body) > target:
        count = len(json.loads(body)["tool_statuses"]) - 10
        body = dumps(heartbeat(count))
    return body


# --- the fuzzer -------------------------------------------------------------------------------------

EVIL_VALUES: list[Any] = [
    None, True, False, 0, -1, 1, 2 ** 31, 2 ** 63, 2 ** 64, -2 ** 63 - 1, 10 ** 30, 1.5, -0.0, 1e308, "", " ",
    "\u0000", "a\u0000b", "\ud800", "\udfff\ud800", "\u202e", "\ufeff", "😀" * 10, "a" * 5000, "../../etc/passwd",
    "'; drop table account_tool_instances; --", "$(id)", "`id`", "%00", "{{7*7}}", "${jndi:ldap://x}", [], {},
    [[[]]], {"$ne": 1}, {"a": {"b": {"c": {}}}}, DASHES, "00000000-0000-0000-0000-000000000000",
    "ffffffff-ffff-ffff-ffff-ffffffffffff", "1e400", "NaN", "true", "null", "\r\nX-Injected: 1", "\\", '"', "<script>",
    "registry:99999/x", "localhost:0/x", "x" * 256, "-", "0x10", "\u0663", "\uff11",
    "12345678-1234-1234-1234-1234567890ab",
]


@dataclass(frozen=True)
class Mutant:
    label: str
    body: bytes
    content_type: str = "application/json"


def evil_value(rng: random.Random, fresh_uuid: str) -> Any:
    value = rng.choice(EVIL_VALUES)
    if value == "12345678-1234-1234-1234-1234567890ab":
        return fresh_uuid
    return value


def mutate(base: dict[str, Any], rng: random.Random) -> Mutant:
    """One structural or value mutation of a valid body."""
    fresh = str(uuid.UUID(int=rng.getrandbits(128)))
    keys = list(base)
    op = rng.randrange(12)
    if op <= 3 and keys:  # replace a field's value
        key = rng.choice(keys)
        value = evil_value(rng, fresh)
        return Mutant(f"{key}={json.dumps(value)[:40]}", dumps({**base, key: value}))
    if op == 4 and keys:  # nested replacement inside a dict/list field
        key = rng.choice(keys)
        inner = base[key]
        if isinstance(inner, dict):
            inner = {**inner, rng.choice([*inner, "x"]) if inner else "x": evil_value(rng, fresh)}
        elif isinstance(inner, list):
            inner = [*inner[:3], evil_value(rng, fresh)]
        else:
            inner = [inner, evil_value(rng, fresh)]
        return Mutant(f"{key} nested", dumps({**base, key: inner}))
    if op == 5 and keys:  # drop a field
        key = rng.choice(keys)
        return Mutant(f"without {key}", dumps({k: v for k, v in base.items() if k != key}))
    if op == 6:  # unknown field
        return Mutant("unknown field", dumps({**base, rng.choice(["__proto__", "constructor", "x" * 64, "id",
                                                                  "user_id", "status"]): evil_value(rng, fresh)}))
    if op == 7:  # raw text splice
        key = rng.choice(keys) if keys else "x"
        raw = rng.choice(["NaN", "Infinity", "1e999", "-0", "0e0", '"\\ud800"', '"\\u0000"', "[", "tru",
                          '"\\x41"', "01", "+1", ".5", '"\\uDFFF"'])
        return Mutant(f"{key}=<raw {raw}>", with_field(base, key, raw))
    if op == 8:  # truncate or corrupt the text
        text = dumps(base)
        cut = rng.randrange(1, max(2, len(text)))
        if rng.random() < 0.5:
            return Mutant(f"truncated at {cut}", text[:cut])
        return Mutant(f"byte {cut} flipped", text[:cut] + bytes([rng.randrange(256)]) + text[cut + 1:])
    if op == 9:  # a wrong content type
        return Mutant("content-type", dumps(base), rng.choice(["text/plain", "application/x-www-form-urlencoded",
                                                               "multipart/form-data; boundary=x", "application/xml",
                                                               "application/json; charset=latin-1", ""]))
    if op == 10:  # wrap or replace the whole document
        return Mutant("document", dumps(rng.choice([[base], {"data": base}, evil_value(rng, fresh), [], {}])))
    # op 11: swap two fields' values
    if len(keys) >= 2:
        a, b = rng.sample(keys, 2)
        return Mutant(f"swap {a}/{b}", dumps({**base, a: base[b], b: base[a]}))
    return Mutant("empty object", b"{}")


def query_mutant(params: dict[str, str], rng: random.Random) -> tuple[str, dict[str, str] | list[tuple[str, str]]]:
    """A hostile query string for mcp_status (label, params)."""
    fresh = str(uuid.UUID(int=rng.getrandbits(128)))
    key = rng.choice(["id", "toolbox_id", "status", "limit", "cursor", "refresh", "forceFunctionRegion"])
    value = evil_value(rng, fresh)
    text = value if isinstance(value, str) else json.dumps(value)
    if rng.random() < 0.15:
        return f"{key} twice", [*params.items(), (key, text), (key, text)]
    if rng.random() < 0.15 and key == "cursor":
        forged = {"created_at": rng.choice(["9999-12-31T23:59:59+14:00", "0001-01-01T00:00:00-23:59", "2020-13-45",
                                            "\u0000", "2020-01-01T00:00:00"]), "id": rng.choice([fresh, DASHES, 0])}
        text = b64url(json.dumps(forged))
    return f"{key}={text[:40]!r}", {**params, key: text}


def forged_invoker_tokens(valid: str, other_audience: str, wrong_account: str, public_pem: bytes | None,
                          user_jwt: str) -> list[tuple[str, str | None, str]]:
    """(label, Authorization header, expectation) for a function that checks its caller's OIDC ID token.

    `valid` is a real token for this function; `other_audience` a real token of the same issuer for
    another URL; `wrong_account` one for this URL but another service account; `public_pem` the
    issuer's public key (for the HS256-keyed-with-the-public-key confusion).
    """
    header_b64, payload_b64, signature = valid.split(".")
    header = json.loads(base64.urlsafe_b64decode(header_b64 + "=="))
    claims = json.loads(base64.urlsafe_b64decode(payload_b64 + "=="))
    cases_: list[tuple[str, str | None, str]] = [
        ("no Authorization header", None, AUTH),
        ("a user's HS256 JWT", f"Bearer {user_jwt}", AUTH),
        ("token for another function's URL", f"Bearer {other_audience}", AUTH),
        ("token for another service account", f"Bearer {wrong_account}", AUTH),
        ("signature stripped", f"Bearer {header_b64}.{payload_b64}.", AUTH),
        ("alg none", f"Bearer {_segments({**header, 'alg': 'none'}, claims)}.", AUTH),
        ("email changed, signature kept", f"Bearer {_segments(header, {**claims, 'email': 'attacker@evil.test'})}."
                                          f"{signature}", AUTH),
        ("expired claims, signature kept", f"Bearer {_segments(header, {**claims, 'exp': 1})}.{signature}", AUTH),
        ("unknown kid", f"Bearer {_segments({**header, 'kid': 'nope'}, claims)}.{signature}", AUTH),
        ("the token twice", f"Bearer {valid} {valid}", REFUSE),
    ]
    if public_pem:
        cases_.append(("HS256 keyed with the issuer's public key (confusion)",
                       f"Bearer {hs_sign({**header, 'alg': 'HS256'}, claims, public_pem)}", AUTH))
    return cases_
