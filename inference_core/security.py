"""What the seed's section 5 asks of an API: TLS 1.3, bearer authentication (hashed API keys or JWTs with
scopes, 15-minute lifetime by default), and per-client rate limits (token bucket, 10 r/s with bursts of
20). Shared by the inference server and sentinel's API (sentinel imports it; this module imports neither).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import uvicorn

DEFAULT_TTL_S = 15 * 60  # the seed: tokens of 15 minutes
LEEWAY_S = 30.0


class AuthError(Exception):
    """Why a request is not let in: ``status`` 401 (who are you?) or 403 (not allowed to)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Tls13Config(uvicorn.Config):
    """uvicorn's config with an SSL context that refuses anything below TLS 1.3."""

    def load(self) -> None:
        super().load()
        if self.ssl is not None:
            self.ssl.minimum_version = ssl.TLSVersion.TLSv1_3


def server_config(app: Any, host: str, port: int, cert: Path | None = None, key: Path | None = None,
                  client_ca: Path | None = None, **kwargs: Any) -> uvicorn.Config:
    """A uvicorn config: plain HTTP without a certificate; with one, TLS 1.3 only, and with ``client_ca``
    mutual TLS (clients must present a certificate signed by it)."""
    # uvicorn would otherwise believe X-Forwarded-For from any local peer: rate limits per client rest on the
    # peer address, and a forwarded one is trusted only with a load balancer's token (Guard.proxy_token)
    kwargs.setdefault("proxy_headers", False)
    if (cert is None) != (key is None):
        raise ValueError("a TLS certificate needs its key, and a key its certificate")
    if client_ca is not None and cert is None:
        raise ValueError("mutual TLS (a client CA) needs a server certificate")
    if cert is None:
        return uvicorn.Config(app, host=host, port=port, **kwargs)
    return Tls13Config(app, host=host, port=port, ssl_certfile=str(cert), ssl_keyfile=str(key),
                       ssl_ca_certs=str(client_ca) if client_ca else None,
                       ssl_cert_reqs=ssl.CERT_REQUIRED if client_ca else ssl.CERT_NONE, **kwargs)


def hash_key(key: str) -> str:
    """How API keys are stored: their SHA-256, hex (never the key itself)."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass
class Authenticator:
    """Bearer credentials: a static API key (compared by its hash) or a JWT.

    JWTs: HS256 with ``secret``, or RS256/ES256 with a PEM ``public_key`` or a ``jwks`` file (keys picked
    by ``kid``); ``exp`` is required, ``nbf``/``aud``/``iss`` are checked when configured, with 30 s of
    clock leeway. Scopes come from the ``scope`` claim (space-separated, OAuth 2) or ``scp`` (a list).
    API keys carry every scope. No configuration at all means the API is open (the subject is "anonymous").
    """

    api_key_hashes: Collection[str] = ()
    secret: str | None = None
    public_key: str | None = None
    jwks: dict[str, Any] | None = None
    audience: str | None = None
    issuer: str | None = None
    leeway_s: float = LEEWAY_S
    _keys: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for k in (self.jwks or {}).get("keys", []):
            self._keys[str(k.get("kid", ""))] = jwt.PyJWK.from_dict(k).key

    @property
    def enabled(self) -> bool:
        return bool(self.api_key_hashes or self.secret or self.public_key or self.jwks)

    @classmethod
    def from_files(cls, api_key_hashes: Collection[str] = (), secret: str | None = None,
                   public_key_file: Path | None = None, jwks_file: Path | None = None, audience: str | None = None,
                   issuer: str | None = None) -> Authenticator:
        return cls(tuple(api_key_hashes), secret, public_key_file.read_text() if public_key_file else None,
                   json.loads(jwks_file.read_text()) if jwks_file else None, audience, issuer)

    def authenticate(self, authorization: str | None, scope: str) -> str:
        """The client's identity (the token's ``sub``, or ``key:<hash prefix>``) when ``authorization``
        grants ``scope``; else AuthError."""
        if not self.enabled:
            return "anonymous"
        if not authorization or not authorization.startswith("Bearer "):
            raise AuthError(401, "missing 'Authorization: Bearer <token>'")
        token = authorization[7:].strip()
        digest = hash_key(token)
        for h in self.api_key_hashes:
            if hmac.compare_digest(digest, h):
                return f"key:{h[:12]}"
        if token.count(".") != 2 or not (self.secret or self.public_key or self._keys):
            raise AuthError(401, "invalid API key or token")
        claims = self._decode(token)
        scopes = claims.get("scope", "").split() if isinstance(claims.get("scope"), str) else []
        scp = claims.get("scp")
        scopes += [s for s in scp if isinstance(s, str)] if isinstance(scp, list) else []
        if scope not in scopes:
            raise AuthError(403, f"the token lacks the '{scope}' scope")
        return str(claims.get("sub") or "token")

    def _decode(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
            alg = header.get("alg")
            if alg == "HS256" and self.secret:
                key: Any = self.secret
            elif alg in ("RS256", "ES256") and self.public_key:
                key = self.public_key
            elif alg in ("RS256", "ES256") and self._keys:
                key = self._keys.get(str(header.get("kid", "")))
                if key is None:
                    raise AuthError(401, "the token's key id is not in the JWKS")
            else:
                raise AuthError(401, f"tokens signed with {alg!r} are not accepted here")
            out: dict[str, Any] = jwt.decode(
                token, key, algorithms=[alg], audience=self.audience, issuer=self.issuer, leeway=self.leeway_s,
                options={"require": ["exp"], "verify_aud": self.audience is not None})
            return out
        except jwt.ExpiredSignatureError as exc:
            raise AuthError(401, "the token has expired") from exc
        except jwt.InvalidTokenError as exc:
            raise AuthError(401, f"invalid token: {exc}") from exc


def issue_token(secret: str, subject: str, scopes: Collection[str], ttl_s: float = DEFAULT_TTL_S,
                audience: str | None = None, issuer: str | None = None, now: float | None = None) -> str:
    """An HS256 token (what `sentinel token issue` prints)."""
    t = time.time() if now is None else now
    claims: dict[str, Any] = {"sub": subject, "scope": " ".join(scopes), "iat": int(t), "nbf": int(t),
                              "exp": int(t + ttl_s)}
    if audience:
        claims["aud"] = audience
    if issuer:
        claims["iss"] = issuer
    return jwt.encode(claims, secret, algorithm="HS256")


class RateLimiter:
    """A token bucket per client: ``rate`` requests per second, bursts of ``burst``. ``take`` answers 0 when
    the request may go, else the seconds to wait (for ``Retry-After``). At most ``max_clients`` buckets are
    kept (least recently used go first: a forgotten client starts with a full bucket)."""

    def __init__(self, rate: float = 10.0, burst: int = 20, max_clients: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a rate limit needs rate > 0 and burst >= 1")
        self.rate, self.burst, self.max_clients, self.clock = rate, burst, max_clients, clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, client: str) -> float:
        now = self.clock()
        with self._lock:
            tokens, last = self._buckets.pop(client, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            wait = 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate
            if wait == 0.0:
                tokens -= 1.0
            self._buckets[client] = (tokens, now)
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
        return wait
