"""A Supabase project's published signing keys (its JWKS), fetched with PyJWT's ``PyJWKClient``.

This module answers one question for :mod:`shared.adapters.auth`: which :class:`jwt.PyJWK` has this
``kid``? It knows nothing about tokens, claims or HTTP answers.

:class:`jwt.PyJWKClient` does the JWKS job: it holds the URL, headers and timeout, turns the
fetched document into a :class:`jwt.PyJWKSet` (building each :class:`jwt.PyJWK`, skipping the
entries it cannot build) and reports failures as ``PyJWKClientError``. What it lacks is added
here:

* **Its caches stay off**, and :class:`RemoteJwks` caches instead. ``cache_keys=True`` is an LRU
  with no expiry: a key removed from the JWKS (revoked) would verify tokens until evicted. Its
  JWK-set cache has no back-off after a failed fetch (in an outage every request fetches and
  blocks a worker thread for the timeout), serves nothing once expired if the refresh fails
  (every request then fails at once), and reads ``time.monotonic`` itself (tests inject a
  clock). RemoteJwks has a lock-free hot path, one fetch at a time, one rate limit for every
  fetch (the unknown-``kid`` refetch included), and bounded use of stale keys.
* :class:`_JwksClient` overrides ``fetch_data``, the hook ``get_jwk_set`` calls, because
  PyJWKClient reads the whole body (``json.load``). Here the body is capped at 1 MiB and must
  arrive before a deadline, redirects are refused (as recent PyJWT does), and each failure is a
  short cause without secrets (``HTTP 503``, ``response is not JSON``).
* :func:`check_jwks_url`: ``https`` only, plain ``http`` only to a loopback host (tests, local
  stacks). Keys fetched over plain HTTP from elsewhere could be swapped on the path, and whoever
  swaps them can sign tokens for any user.
* Entries we must not use are dropped before PyJWKSet sees them (no string ``kid``, ``use`` not
  ``sig``, key type not EC/RSA, ``alg`` outside the allow-list). Some odd entries (``oct``
  without ``k``, a list as ``alg``) make PyJWKSet raise instead of skipping, and one odd entry
  must never take down authentication.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import math
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from jwt import PyJWK, PyJWKClient, PyJWKClientConnectionError, PyJWKClientError, PyJWKSet, PyJWTError
from jwt.exceptions import PyJWKSetError

__all__ = ["JwksUnavailable", "RemoteJwks", "check_jwks_url", "parse_jwks"]

logger = logging.getLogger(__name__)

#: A JWKS with a few keys is about 1 KB. Reading at most this much means a hostile or broken
#: endpoint cannot exhaust memory.
_MAX_JWKS_BYTES = 1024 * 1024

#: After a *failed* fetch, retry sooner than the normal refetch interval. This keeps a short
#: network blip at cold start from turning into half a minute of 503s. It still caps the
#: request rate against a struggling endpoint.
_FAILURE_BACKOFF_SECONDS = 5.0

#: For how many cache lifetimes expired keys may still be used while a refresh keeps failing.
#: The default gives 2 x 600 s = 20 min, the same bound Supabase gives for its own JWKS caching
#: (edge cache plus client cache). So a JWKS outage does not log everyone out, and a revoked key
#: is not honoured for longer than Supabase already warns it may be.
_MAX_STALE_FACTOR = 2

#: Key types that can carry an asymmetric signing key we accept (ES256: EC, RS256: RSA).
#: Symmetric ``oct`` entries in particular never become keys: see shared.adapters.auth on algorithm
#: confusion.
_KEY_TYPES = frozenset({"EC", "RSA"})

_HEADERS = {"Accept": "application/json", "User-Agent": "mcp-control-plane-auth"}

_LOOPBACK_NAMES = frozenset({"localhost", "localhost."})


class JwksUnavailable(Exception):
    """No usable keys: the fetch failed, or the cached keys are too old. ``str()`` is the cause."""


def check_jwks_url(url: str) -> None:
    """Raise ValueError unless ``url`` is ``https``, or ``http`` to a loopback host."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "https":
        return
    if scheme != "http":
        # urllib would also open file:// and ftp:// URLs. A config typo must never make us read
        # keys from the local filesystem.
        raise ValueError(f"jwks_url must be an https URL, got scheme {scheme!r}")
    host = (parts.hostname or "").lower()
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host in _LOOPBACK_NAMES
    if not loopback:
        raise ValueError(
            f"jwks_url must be an https URL; plain http is allowed only to a loopback host, got host {host!r}"
        )


def _candidates(document: object, algorithms: frozenset[str]) -> list[dict[str, Any]]:
    """The entries of a JWKS document that may become signing keys. Cheap checks; PyJWK does the rest.

    Raises ValueError if ``document`` is not a JWKS (an object with a ``keys`` list).
    """
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS document (an object with a 'keys' list)")
    return [entry for entry in document["keys"] if _is_candidate(entry, algorithms)]


def _is_candidate(entry: object, algorithms: frozenset[str]) -> bool:
    if not isinstance(entry, dict):
        return False
    kid = entry.get("kid")
    if not isinstance(kid, str) or not kid:
        return False  # we select by kid only
    if entry.get("use", "sig") != "sig" or entry.get("kty") not in _KEY_TYPES:
        return False
    alg = entry.get("alg")
    return alg is None or (isinstance(alg, str) and alg in algorithms)


def _by_kid(make_set: Callable[[], PyJWKSet], algorithms: frozenset[str]) -> Mapping[str, PyJWK]:
    """``kid -> PyJWK`` of the set ``make_set`` builds; the first usable key for a kid wins.

    An empty result is valid: projects still on the legacy HS256 secret publish ``{"keys": []}``.
    """
    try:
        jwk_set = make_set()
    except PyJWKSetError:
        return MappingProxyType({})  # nothing usable (PyJWKSet refuses to be empty)
    keys: dict[str, PyJWK] = {}
    for key in jwk_set.keys:
        # An "alg"-less entry gets its algorithm from kty/crv (e.g. EC P-384 -> ES384): check it.
        if key.algorithm_name in algorithms:
            keys.setdefault(key.key_id, key)
    return MappingProxyType(keys)


def parse_jwks(document: object, algorithms: frozenset[str]) -> Mapping[str, PyJWK]:
    """``kid -> PyJWK`` for an inline JWKS document. Raises ValueError if it is not a JWKS."""
    candidates = _candidates(document, algorithms)
    return _by_kid(lambda: PyJWKSet(candidates), algorithms)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Turn a redirect into an HTTPError: the keys come from the configured URL or not at all."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class _JwksClient(PyJWKClient):
    """PyJWKClient without its caches, with a bounded download and short failure causes."""

    def __init__(self, uri: str, *, algorithms: frozenset[str], timeout: float) -> None:
        super().__init__(uri, cache_keys=False, cache_jwk_set=False, headers=dict(_HEADERS), timeout=timeout)
        self.algorithms = algorithms

    def fetch_data(self) -> Any:
        """GET the JWKS: at most 1 MiB, within ``timeout`` seconds. Return the usable entries.

        ``timeout`` bounds each socket operation (connect, waiting for headers) and the body as
        a whole, so an endpoint that trickles bytes cannot hold a request for long.
        """
        request = urllib.request.Request(self.uri, headers=self.headers)  # noqa: S310 - check_jwks_url
        deadline = time.monotonic() + self.timeout
        try:
            with urllib.request.build_opener(_NoRedirect()).open(request, timeout=self.timeout) as response:
                body = self._read_bounded(response, deadline)
        except urllib.error.HTTPError as exc:
            exc.close()
            raise PyJWKClientConnectionError(f"HTTP {exc.code}") from None
        except urllib.error.URLError as exc:
            raise PyJWKClientConnectionError(f"{type(exc.reason).__name__}: {exc.reason}") from None
        except (OSError, ValueError, http.client.HTTPException) as exc:  # timeouts, resets, bad responses
            raise PyJWKClientConnectionError(f"{type(exc).__name__}: {exc}") from None
        try:
            document = json.loads(body)
        except ValueError:
            raise PyJWKClientError("response is not JSON") from None
        try:
            return {"keys": _candidates(document, self.algorithms)}
        except ValueError:
            raise PyJWKClientError("response is not a JWKS document") from None

    def _read_bounded(self, response: http.client.HTTPResponse, deadline: float) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while chunk := response.read1(64 * 1024):  # one recv at most, bounded by the socket timeout
            size += len(chunk)
            if size > _MAX_JWKS_BYTES:
                raise PyJWKClientError(f"response is larger than {_MAX_JWKS_BYTES} bytes")
            if time.monotonic() > deadline:
                raise PyJWKClientConnectionError(f"TimeoutError: response took over {self.timeout:g} s")
            chunks.append(chunk)
        return b"".join(chunks)


@dataclass(frozen=True)
class _KeySnapshot:
    """An immutable view of the fetched keys.

    The hot path reads ``RemoteJwks._snapshot`` once, without a lock. Because the snapshot is
    replaced as a whole and never mutated, a reader always sees one consistent set of keys and
    its timestamps, even while another thread is refreshing.
    """

    keys: Mapping[str, PyJWK]
    #: ``clock()`` time of the last successful fetch, or None if no fetch has succeeded yet.
    fetched_at: float | None
    #: Goes up by one on every fetch attempt. Threads that queued behind a fetch use it to see
    #: that the fetch already happened, so they do not fetch again.
    generation: int
    #: Cause of the most recent attempt if it failed. None if it succeeded or none was made.
    last_error: str | None


class RemoteJwks:
    """The signing keys published at one JWKS URL, fetched lazily and cached.

    The JWKS is fetched on first use (never in the constructor) and cached for
    ``cache_seconds``. Once keys are cached, a lookup does no network I/O and takes no lock.
    An unknown ``kid`` triggers one refetch to pick up a rotated key. All fetches share one
    limit: at most one request per ``refetch_interval_seconds``, or per 5 s after a failed
    attempt. Without it, an attacker spraying random ``kid`` values would turn every bogus
    request into a request to Supabase, each blocking a worker thread. When the cache expires
    under load, one thread fetches and the others wait for its result. If a refresh fails, the
    expired keys stay usable for up to one more cache lifetime (at least one refetch interval);
    after that, :meth:`get` raises :class:`JwksUnavailable`. ``clock`` (monotonic seconds) can
    be injected so tests can move time.
    """

    def __init__(
        self,
        url: str,
        *,
        algorithms: frozenset[str],
        cache_seconds: float,
        refetch_interval_seconds: float,
        fetch_timeout_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_jwks_url(url)
        self._url = url
        self._algorithms = algorithms
        self._client = _JwksClient(url, algorithms=algorithms, timeout=fetch_timeout_seconds)
        self._cache_seconds = float(cache_seconds)
        # max(): with a cache shorter than the refetch interval (e.g. 0 to "always refetch"),
        # the rate limit would otherwise make the only keys we have count as too old.
        self._max_stale_seconds = max(
            float(cache_seconds) * _MAX_STALE_FACTOR, float(cache_seconds) + refetch_interval_seconds
        )
        self._refetch_interval = float(refetch_interval_seconds)
        self._clock = clock
        self._snapshot = _KeySnapshot(MappingProxyType({}), None, 0, None)
        self._next_fetch_at = -math.inf
        self._fetch_lock = threading.Lock()

    def get(self, kid: str) -> PyJWK | None:
        """The key for ``kid``, or None if the JWKS does not have it.

        Raises :class:`JwksUnavailable` when the keys could not be fetched (the kid may well be
        a new key we failed to download) or the cached ones are too old to trust.
        """
        snap = self._snapshot
        if snap.fetched_at is not None and self._clock() - snap.fetched_at < self._cache_seconds:
            key = snap.keys.get(kid)
            if key is not None:
                return key  # hot path: fresh cache hit, no lock, no I/O
        # The cache is empty or expired, or the kid is unknown (maybe a rotated key). Refresh
        # if the rate limit allows. Otherwise use what we have.
        snap = self._refresh(seen_generation=snap.generation)

        usable = snap.fetched_at is not None and self._clock() - snap.fetched_at < self._max_stale_seconds
        if usable:
            key = snap.keys.get(kid)
            if key is not None:
                return key
        if snap.last_error is not None:
            raise JwksUnavailable(snap.last_error)
        if not usable:
            raise JwksUnavailable("cached keys are too old")
        return None

    def _refresh(self, *, seen_generation: int) -> _KeySnapshot:
        """Fetch the JWKS unless another thread just did, or the rate limit says wait."""
        with self._fetch_lock:
            snap = self._snapshot
            if snap.generation != seen_generation:
                return snap  # another thread fetched while we waited for the lock
            now = self._clock()
            if now < self._next_fetch_at:
                return snap  # rate limited: answer from what we have
            try:
                keys = self._fetch()
            except PyJWTError as exc:
                # Our fetch_data words every PyJWKClientError. Anything else PyJWT raises may
                # quote a JWK, so only its type is kept.
                cause = str(exc) if isinstance(exc, PyJWKClientError) else type(exc).__name__
                logger.warning("could not fetch JWKS from %s: %s", self._url, cause)
                self._next_fetch_at = now + min(self._refetch_interval, _FAILURE_BACKOFF_SECONDS)
                snap = _KeySnapshot(snap.keys, snap.fetched_at, snap.generation + 1, cause)
            else:
                logger.info("fetched JWKS from %s: kids %s", self._url, sorted(keys))
                self._next_fetch_at = now + self._refetch_interval
                snap = _KeySnapshot(keys, self._clock(), snap.generation + 1, None)
            self._snapshot = snap
            return snap

    def _fetch(self) -> Mapping[str, PyJWK]:
        # get_jwk_set(refresh=True): our fetch_data, then PyJWKSet. No cache of its own is on.
        return _by_kid(lambda: self._client.get_jwk_set(refresh=True), self._algorithms)
