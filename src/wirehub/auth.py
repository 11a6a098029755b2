"""Who a connection is and what it may do: JWT verification and channel claims.

A token's claims become a ``Principal``::

    {"sub": "alice", "exp": 1795000000,
     "subscribe": ["runner:*", "logs:**"],      # channel patterns it may read
     "publish": ["telemetry.*"],                 # ... and write
     "permissions": ["runners:delete"]}          # custom message types; "admin" is all

A reserved channel (``$sys:metrics``) is read with a permission instead
(``sys:metrics``): no ``subscribe`` pattern covers it (``protocol.patterns``).

Verification is pyjwt with an explicit algorithm list that always matches the
key type (never ``none``, never an HMAC algorithm when the key is a public
key: the classic "HS256 signed with the RSA public key" confusion).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt

from .clock import Clock
from .protocol.errors import AuthCode, AuthError
from .protocol.patterns import (
    RESERVED_PREFIX,
    PatternError,
    compile_pattern,
    reserved_permission,
)

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
EC_ALGORITHMS = {"secp256r1": ("ES256",), "secp384r1": ("ES384",), "secp521r1": ("ES512",)}
ADMIN = "admin"
SUBPROTOCOL = "wirehub"
BEARER_SUBPROTOCOL_PREFIX = "bearer."
_REQUIRED_CLAIMS = ["sub", "exp"]
_CACHE_LIMIT = 1024


class Principal:
    """The identity behind a connection and the channels and permissions its token grants.

    Args:
        sub: the token's subject (``None`` for an anonymous connection).
        subscribe, publish: channel patterns (``protocol.patterns``).
        permissions: custom-message permissions; ``"admin"`` grants every one.
        exp: expiry, seconds since the epoch, or ``None``.
        unrestricted: every channel allowed (a gateway with no key configured).
    """

    __slots__ = ("sub", "exp", "permissions", "unrestricted", "_subscribe", "_publish",
                 "_can_subscribe", "_can_publish")

    def __init__(self, sub: str | None, *, subscribe: Iterable[str] = (), publish: Iterable[str] = (),
                 permissions: Iterable[str] = (), exp: int | None = None,
                 unrestricted: bool = False) -> None:
        self.sub = sub
        self.exp = exp
        self.permissions = frozenset(permissions)
        self.unrestricted = unrestricted
        self._subscribe = [compile_pattern(p) for p in subscribe]
        self._publish = [compile_pattern(p) for p in publish]
        self._can_subscribe: dict[str, bool] = {}
        self._can_publish: dict[str, bool] = {}

    @classmethod
    def open_gateway(cls) -> Principal:
        """The principal of every connection when no key is configured."""
        return cls(None, unrestricted=True)

    def can_subscribe(self, channel: str) -> bool:
        """Whether the claims cover ``channel``; for a reserved channel, whether
        the principal holds the permission that reads it."""
        if channel[:1] == RESERVED_PREFIX:
            permission = reserved_permission(channel)
            return permission is not None and (self.unrestricted or self.has_permission(permission))
        return self.unrestricted or _allowed(self._subscribe, self._can_subscribe, channel)

    def can_publish(self, channel: str) -> bool:
        return self.unrestricted or _allowed(self._publish, self._can_publish, channel)

    def has_permission(self, permission: str) -> bool:
        return permission in self.permissions or ADMIN in self.permissions

    def __repr__(self) -> str:
        return f"Principal(sub={self.sub!r}, exp={self.exp})"


def _allowed(patterns: list[Any], cache: dict[str, bool], channel: str) -> bool:
    # Publishing to one channel again and again is the common case: remember
    # the answer (bounded, so a client cycling names cannot grow it).
    answer = cache.get(channel)
    if answer is None:
        answer = any(p.fullmatch(channel) is not None for p in patterns)
        if len(cache) >= _CACHE_LIMIT:
            cache.clear()
        cache[channel] = answer
    return answer


class TokenVerifier:
    """Checks tokens against the configured keys and turns claims into a ``Principal``.

    Args:
        secret: shared secret for HMAC algorithms.
        public_key_pem: PEM public key (RSA or EC).
        jwks_json: a JWKS document; the token's ``kid`` picks the key.
        algorithms: accepted algorithms; empty means every algorithm the
            configured keys support. Must agree with the key types.
        audience, issuer: required ``aud`` / ``iss`` values, if set.
        leeway_s: clock skew tolerated on ``exp``, ``nbf`` and ``iat``.
        default_subscribe, default_publish: patterns every principal gets
            on top of its claims (namespaces open to anyone authenticated).
        clock: the wall clock ``exp``, ``nbf`` and ``iat`` are checked
            against (``wirehub.clock``), the gateway's own.

    Raises:
        ValueError: no key, an unreadable key, or algorithms that no
            configured key can verify.
    """

    def __init__(self, *, secret: str | None = None, public_key_pem: bytes | None = None,
                 jwks_json: str | None = None, algorithms: Sequence[str] = (),
                 audience: str | None = None, issuer: str | None = None, leeway_s: float = 0.0,
                 default_subscribe: Sequence[str] = (), default_publish: Sequence[str] = (),
                 clock: Clock | None = None) -> None:
        self._clock = clock or Clock()
        self._keys: dict[str, Any] = {}  # algorithm -> key
        self._jwks: jwt.PyJWKSet | None = None
        if secret:
            for alg in HMAC_ALGORITHMS:
                self._keys[alg] = secret
        if public_key_pem:
            key = _load_public_key(public_key_pem)
            for alg in _algorithms_for(key):
                self._keys[alg] = key
        supported = set(self._keys)
        if jwks_json:
            try:
                self._jwks = jwt.PyJWKSet.from_json(jwks_json)
            except (jwt.PyJWKSetError, json.JSONDecodeError) as exc:
                raise ValueError(f"invalid JWKS: {exc}") from None
            supported.update(k.algorithm_name for k in self._jwks.keys if k.algorithm_name)
        if not supported:
            raise ValueError("no verification key: set a secret, a public key or a JWKS")
        unusable = [alg for alg in algorithms if alg not in supported]
        if unusable:
            raise ValueError(f"algorithm(s) {', '.join(unusable)} cannot be verified with the "
                             f"configured key(s), which support {', '.join(sorted(supported))}")
        self.algorithms = list(algorithms) or sorted(supported)
        self._audience = audience
        self._issuer = issuer
        self._leeway_s = leeway_s
        self._default_subscribe = tuple(default_subscribe)
        self._default_publish = tuple(default_publish)

    def verify(self, token: str) -> Principal:
        """The principal a valid ``token`` grants.

        Raises:
            AuthError: bad signature, algorithm, claims or format; code
                ``token_expired`` for an expired token.
        """
        try:
            header = jwt.get_unverified_header(token)
            alg = header.get("alg")
            if alg not in self.algorithms:
                raise AuthError(f"algorithm {str(alg)[:16]!r} is not accepted")
            claims = jwt.decode(
                token, self._key_for(alg, header.get("kid")), algorithms=[alg],
                audience=self._audience, issuer=self._issuer,
                options={"require": _REQUIRED_CLAIMS, "verify_aud": self._audience is not None,
                         # checked below against the gateway's clock, not pyjwt's
                         "verify_exp": False, "verify_nbf": False, "verify_iat": False})
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"invalid token: {exc}") from None
        _check_times(claims, self._clock.wall(), self._leeway_s)
        return self._principal(claims)

    def anonymous(self) -> Principal:
        """A connection without a token, when anonymous access is allowed."""
        return Principal(None, subscribe=self._default_subscribe, publish=self._default_publish)

    def _key_for(self, alg: str, kid: Any) -> Any:
        key = self._keys.get(alg)
        if key is not None:
            return key
        if self._jwks is not None:
            for jwk in self._jwks.keys:
                if jwk.algorithm_name == alg and (kid is None or jwk.key_id == kid):
                    return jwk.key
        raise AuthError(f"no key for algorithm {alg} and key id {str(kid)[:32]!r}")

    def _principal(self, claims: dict[str, Any]) -> Principal:
        sub = claims["sub"]
        if not isinstance(sub, str) or not sub:
            raise AuthError("claim 'sub' must be a non-empty string")
        try:
            return Principal(
                sub, exp=int(claims["exp"]), permissions=_strings(claims, "permissions"),
                subscribe=self._default_subscribe + _strings(claims, "subscribe"),
                publish=self._default_publish + _strings(claims, "publish"))
        except PatternError as exc:
            raise AuthError(f"invalid token: {exc}") from None


def _check_times(claims: dict[str, Any], now: float, leeway_s: float) -> None:
    """RFC 7519's time claims, as pyjwt checks them, at ``now``: ``exp``
    passed, ``nbf`` or ``iat`` still ahead (each with ``leeway_s``)."""
    times = {}
    for name in ("exp", "nbf", "iat"):
        value = claims.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise AuthError(f"invalid token: claim {name!r} must be a number (seconds since the epoch)")
        times[name] = value
    if times["exp"] <= now - leeway_s:
        raise AuthError("token expired", AuthCode.TOKEN_EXPIRED)
    for name in ("nbf", "iat"):
        if times.get(name, now) > now + leeway_s:
            raise AuthError(f"invalid token: the token is not yet valid ({name})")


def _strings(claims: dict[str, Any], name: str) -> tuple[str, ...]:
    value = claims.get(name, ())
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise AuthError(f"claim {name!r} must be a list of strings")
    return tuple(value)


def _load_public_key(pem: bytes) -> Any:
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        return load_pem_public_key(pem)
    except ValueError as exc:
        raise ValueError(f"not a PEM public key: {exc}") from None


def _algorithms_for(key: Any) -> tuple[str, ...]:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if isinstance(key, rsa.RSAPublicKey):
        return RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        algorithms = EC_ALGORITHMS.get(key.curve.name)
        if algorithms:
            return algorithms
    raise ValueError(f"unsupported public key type {type(key).__name__}")


def mint_token(secret: str, *, sub: str, subscribe: Iterable[str] = (), publish: Iterable[str] = (),
               permissions: Iterable[str] = (), ttl_s: float = 3600.0, algorithm: str = "HS256",
               now: float | None = None, **claims: Any) -> str:
    """An HMAC-signed token for development and tests (``wirehub token``),
    issued at ``now`` (default: the current time; a test passes its clock's)."""
    now = int(time.time() if now is None else now)
    payload = {"sub": sub, "iat": now, "exp": now + int(ttl_s), "subscribe": list(subscribe),
               "publish": list(publish), "permissions": list(permissions), **claims}
    return jwt.encode(payload, secret, algorithm=algorithm)


def offered_subprotocols(headers: Any) -> list[str]:
    return [p.strip() for value in headers.getall("Sec-WebSocket-Protocol", []) for p in value.split(",")]


def accepted_subprotocol(headers: Any) -> str | None:
    """``wirehub`` when the client offered it: the only subprotocol ever answered."""
    return SUBPROTOCOL if SUBPROTOCOL in offered_subprotocols(headers) else None


def token_from_request(path: str, headers: Any) -> str | None:
    """The token an upgrade request carries, if any.

    Sources, first found wins: ``Authorization: Bearer``, the ``token`` query
    parameter, a ``bearer.<token>`` entry in ``Sec-WebSocket-Protocol``
    (browsers cannot set headers; they offer ``["wirehub", "bearer.<token>"]``
    and the server answers ``wirehub``, never echoing the token).

    Raises:
        AuthError: a malformed ``Authorization`` header, or a bearer
            subprotocol offered without ``wirehub`` (the browser would fail
            the handshake for want of a subprotocol to accept).
    """
    authorization = headers.get("Authorization")
    if authorization is not None:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            raise AuthError("Authorization header must be 'Bearer <token>'")
        return credentials.strip()
    query = parse_qs(urlsplit(path).query)
    if "token" in query:
        return query["token"][0]
    offered = offered_subprotocols(headers)
    for entry in offered:
        if entry.startswith(BEARER_SUBPROTOCOL_PREFIX):
            if SUBPROTOCOL not in offered:
                raise AuthError(f"offer the {SUBPROTOCOL!r} subprotocol along with bearer.<token>")
            return entry[len(BEARER_SUBPROTOCOL_PREFIX):]
    return None
