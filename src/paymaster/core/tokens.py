"""Spend tokens and agent keys: sign and verify the EdDSA JWS of PROTOCOL.md.

A spend token is ``spt_`` + a JWS compact serialization signed with the agent's ed25519
key, ``kid`` = agent id. Pure domain code: no I/O, and every clock reading is the caller's
(``now``), so the gateway, the authority and the tests agree on what time it is.

The verifier's allow-list is pinned to the EdDSA family on a private :class:`jwt.PyJWS`
instance, so neither a token header nor another module's ``jwt.register_algorithm`` can
ever select ``none`` or an HMAC algorithm (the classic "public key as HS256 secret" forgery).
"""

from __future__ import annotations

import base64
import json
import math
import re
import secrets
import time
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from jwt.algorithms import OKPAlgorithm
from jwt.api_jws import PyJWS
from jwt.exceptions import PyJWTError

from paymaster.errors import InvalidRequest, SpendTokenExpired, SpendTokenInvalid, SpendTokenMissing

__all__ = [
    "ALGORITHMS",
    "CLOCK_SKEW_SECONDS",
    "DEFAULT_TTL_SECONDS",
    "MAX_TOKEN_LENGTH",
    "MAX_TTL_SECONDS",
    "TOKEN_PREFIX",
    "SpendClaims",
    "check_request_binding",
    "generate_private_key",
    "load_public_key",
    "private_key_from_pem",
    "private_key_to_pem",
    "public_key_b64",
    "sign_spend_token",
    "token_key_id",
    "verify_spend_token",
]

TOKEN_PREFIX: Final = "spt_"  # noqa: S105 - a type prefix, not a secret
# "Ed25519" is the fully specified name of RFC 9864; "EdDSA" the older polymorphic one.
ALGORITHMS: Final = ("EdDSA", "Ed25519")
DEFAULT_TTL_SECONDS: Final = 60
MAX_TTL_SECONDS: Final = 300
CLOCK_SKEW_SECONDS: Final = 5
# Everything before the signature check is work an anonymous caller can make us do; a real
# token is a few hundred bytes, so anything this long is refused before it is decoded.
MAX_TOKEN_LENGTH: Final = 8192
# The jti is stored in the replay cache, so its size is bounded like any other stored key.
_MAX_JTI_LENGTH: Final = 256
_MAX_NUMERIC_DATE: Final = 2**53

# The same bounds as paymaster.money.parse_nanos (<= 12 whole digits, <= 9 decimals, no
# sign): a `max` accepted here never fails to parse as money later. ASCII digits only,
# because `\d` also matches other scripts' digits.
_DECIMAL_RE: Final = re.compile(r"[0-9]{1,12}(?:\.[0-9]{1,9})?")
_CURRENCY_RE: Final = re.compile(r"[A-Z]{3}")
# 32 bytes are 43 base64url characters without padding.
_PUBLIC_KEY_RE: Final = re.compile(r"[A-Za-z0-9_-]{43}")
# Ed25519 public keys of small order. Under such a key one signature verifies for many or
# (the identity) all messages, so anyone could forge that agent's tokens; cryptography and
# OpenSSL accept these keys, so they are refused here, as libsodium does. Keys are compared
# on y mod p, sign bit ignored; the order-8 y is libsodium's (d*y^4 + 2*y^2 == 1 mod p).
_P: Final = 2**255 - 19
_Y_ORDER_8: Final = 2707385501144840649318225287225658788936804267575313519463743609750303402022
_SMALL_ORDER_Y: Final = frozenset({0, 1, _P - 1, _Y_ORDER_8, _P - _Y_ORDER_8})
_PERCENT_RE: Final = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_REQUIRED_CLAIMS: Final = ("iss", "aud", "iat", "exp", "jti")
# Wire name -> SpendClaims field, for the optional string claims.
_OPTIONAL_CLAIMS: Final = {
    "max": "max_amount",
    "cur": "currency",
    "htm": "htm",
    "htu": "htu",
    "task": "task",
    "session": "session",
}


def _make_jws() -> PyJWS:
    # PyJWT 2.15 does not know the RFC 9864 name, so it is registered as an alias of the
    # same OKP algorithm; the instance starts from an allow-list of one, so nothing else
    # (none, HS*, RS*, ES*) is even loaded.
    jws = PyJWS(algorithms=["EdDSA"])
    jws.register_algorithm("Ed25519", OKPAlgorithm())
    return jws


_JWS: Final = _make_jws()


# Keys


def generate_private_key() -> Ed25519PrivateKey:
    """A fresh ed25519 private key for an agent."""
    return Ed25519PrivateKey.generate()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _is_weak_key(raw: bytes) -> bool:
    y = int.from_bytes(raw, "little") & ((1 << 255) - 1)
    # y >= p is a non-canonical spelling of y - p: refused, so a key has one encoding.
    return y >= _P or y in _SMALL_ORDER_Y


def public_key_b64(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The agent's public key as the protocol carries it: base64url, no padding, of the raw 32 bytes."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return _b64url(public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def load_public_key(b64: str) -> Ed25519PublicKey:
    """Parse a public key from its protocol form, or raise ``invalid_request``.

    Only the canonical form is accepted (43 characters, no padding, unused bits zero), so
    one key has exactly one spelling in the store; small-order points are refused.
    """
    message = "public_key must be the base64url (no padding) of a raw 32-byte ed25519 public key"
    if not isinstance(b64, str) or _PUBLIC_KEY_RE.fullmatch(b64) is None:
        raise InvalidRequest(message)
    raw = base64.urlsafe_b64decode(b64 + "=")
    if _b64url(raw) != b64:
        raise InvalidRequest(message)
    if _is_weak_key(raw):
        raise InvalidRequest("public_key is a weak (small-order or non-canonical) ed25519 point")
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise InvalidRequest(message) from exc


def private_key_to_pem(key: Ed25519PrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted: the file's mode (0600) is what protects it."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def private_key_from_pem(pem: bytes | str) -> Ed25519PrivateKey:
    """Load an unencrypted PEM ed25519 private key; ``ValueError`` for anything else."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # TypeError is cryptography's answer to an encrypted key loaded without a password.
        raise ValueError("not an unencrypted PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"not an ed25519 private key ({type(key).__name__})")
    return key


# Signing


def _check_optional(name: str, value: str | None) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"{name} must be a non-empty string when given")


def sign_spend_token(
    key: Ed25519PrivateKey,
    *,
    agent_id: str,
    aud: str,
    ttl_seconds: int = DEFAULT_TTL_SECONDS,
    max_amount: str | None = None,
    currency: str | None = None,
    htm: str | None = None,
    htu: str | None = None,
    task: str | None = None,
    session: str | None = None,
    now: float | None = None,
    alg: str = "EdDSA",
    jti: str | None = None,
) -> str:
    """Sign a single-use spend token for one call: ``"spt_" + JWS``.

    ``htu`` is stored without its query and fragment (RFC 9449 compares without them, and a
    query can hold secrets that have no business in a token that ends up in logs). Bad
    arguments raise ``ValueError`` here rather than a 401 at the server.
    """
    if alg not in ALGORITHMS:
        raise ValueError(f"alg must be one of {ALGORITHMS}, not {alg!r}")
    if not isinstance(agent_id, str) or not agent_id:
        raise ValueError("agent_id must be a non-empty string")
    if not isinstance(aud, str) or not aud:
        raise ValueError("aud must be a non-empty string")
    if (
        isinstance(ttl_seconds, bool)
        or not isinstance(ttl_seconds, int)
        or not 1 <= ttl_seconds <= MAX_TTL_SECONDS
    ):
        raise ValueError(f"ttl_seconds must be an integer from 1 to {MAX_TTL_SECONDS}")
    for name, value in (
        ("max_amount", max_amount),
        ("currency", currency),
        ("htm", htm),
        ("htu", htu),
        ("task", task),
        ("session", session),
        ("jti", jti),
    ):
        _check_optional(name, value)
    if max_amount is not None and _DECIMAL_RE.fullmatch(max_amount) is None:
        raise ValueError(f"max_amount {max_amount!r} is not a plain non-negative decimal string")
    if currency is not None and _CURRENCY_RE.fullmatch(currency) is None:
        raise ValueError(f"currency {currency!r} is not an ISO 4217 code such as 'USD'")
    if htu is not None:
        if _normalize_url(htu) is None:
            raise ValueError(f"htu {htu!r} is not an absolute http(s) URL")
        htu = urlunsplit(urlsplit(htu)._replace(query="", fragment=""))
    if jti is not None and len(jti) > _MAX_JTI_LENGTH:
        raise ValueError(f"jti is longer than {_MAX_JTI_LENGTH} characters")

    # Whole seconds: the usual NumericDate, and exp - iat stays exactly ttl_seconds.
    iat = math.floor(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "iss": agent_id,
        "aud": aud,
        "iat": iat,
        "exp": iat + ttl_seconds,
        "jti": jti if jti is not None else secrets.token_urlsafe(16),
    }
    optional = {"max": max_amount, "cur": currency, "htm": htm, "htu": htu, "task": task, "session": session}
    claims.update({name: value for name, value in optional.items() if value is not None})
    payload = json.dumps(claims, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return TOKEN_PREFIX + _JWS.encode(payload, key, algorithm=alg, headers={"kid": agent_id})


# Verifying


@dataclass(frozen=True)
class SpendClaims:
    """The verified claims of a spend token. ``iat``/``exp`` are seconds since the epoch."""

    agent_id: str
    aud: str
    iat: float
    exp: float
    jti: str
    max_amount: str | None = None
    currency: str | None = None
    htm: str | None = None
    htu: str | None = None
    task: str | None = None
    session: str | None = None


def _compact(token: str | None) -> str:
    if token is None or token == "":
        raise SpendTokenMissing("no spend token")
    if not isinstance(token, str):
        raise SpendTokenInvalid("spend token must be a string")
    if len(token) > MAX_TOKEN_LENGTH:
        raise SpendTokenInvalid("spend token is too long")
    if not token.startswith(TOKEN_PREFIX):
        raise SpendTokenInvalid(f"spend token must start with {TOKEN_PREFIX!r}")
    return token[len(TOKEN_PREFIX) :]


def _header(compact: str) -> dict[str, Any]:
    try:
        header = _JWS.get_unverified_header(compact)
    except PyJWTError as exc:
        raise SpendTokenInvalid("spend token is not a well-formed JWS") from exc
    if header.get("alg") not in ALGORITHMS:
        raise SpendTokenInvalid(f"spend token alg must be one of {', '.join(ALGORITHMS)}")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise SpendTokenInvalid("spend token has no kid")
    return header


def token_key_id(token: str | None) -> str:
    """The ``kid`` (agent id) of a token, *unverified*: only for finding the key to verify it with."""
    kid: str = _header(_compact(token))["kid"]
    return kid


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # With duplicate names, parsers disagree on which one wins; refuse the ambiguity.
    claims = dict(pairs)
    if len(claims) != len(pairs):
        raise ValueError("duplicate claim")
    return claims


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse_claims(payload: bytes) -> dict[str, Any]:
    try:
        claims = json.loads(
            payload.decode("utf-8"),
            object_pairs_hook=_reject_duplicates,
            parse_constant=_reject_constant,
        )
    except (ValueError, RecursionError) as exc:
        raise SpendTokenInvalid("spend token claims are not a JSON object") from exc
    if not isinstance(claims, dict):
        raise SpendTokenInvalid("spend token claims are not a JSON object")
    return claims


def _is_numeric_date(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    # Within the exact range of a float, so that exp - iat cannot overflow whatever their
    # types (an int beyond a float's range overflows even math.isfinite); NaN and infinities
    # fail the comparison.
    return abs(value) <= _MAX_NUMERIC_DATE


def _claims_from(raw: dict[str, Any], kid: str) -> SpendClaims:
    missing = [name for name in _REQUIRED_CLAIMS if name not in raw]
    if missing:
        raise SpendTokenInvalid(f"spend token lacks required claims: {', '.join(missing)}")
    for name in ("iss", "aud", "jti"):
        if not isinstance(raw[name], str) or not raw[name]:
            raise SpendTokenInvalid(f"spend token claim {name} must be a non-empty string")
    if len(raw["jti"]) > _MAX_JTI_LENGTH:
        raise SpendTokenInvalid("spend token jti is too long")
    for name in ("iat", "exp"):
        if not _is_numeric_date(raw[name]):
            raise SpendTokenInvalid(f"spend token claim {name} must be a number of seconds")
    if raw["iss"] != kid:
        raise SpendTokenInvalid("spend token iss does not match its kid")

    optional: dict[str, str | None] = {}
    for wire, field in _OPTIONAL_CLAIMS.items():
        # null is read as absent: some encoders write every field.
        value = raw.get(wire)
        if value is not None and (not isinstance(value, str) or not value):
            raise SpendTokenInvalid(f"spend token claim {wire} must be a non-empty string")
        optional[field] = value
    max_amount, currency, htu = optional["max_amount"], optional["currency"], optional["htu"]
    if max_amount is not None and _DECIMAL_RE.fullmatch(max_amount) is None:
        raise SpendTokenInvalid('spend token claim max must be a decimal string such as "0.50"')
    if currency is not None and _CURRENCY_RE.fullmatch(currency) is None:
        raise SpendTokenInvalid('spend token claim cur must be a currency code such as "USD"')
    if htu is not None and _normalize_url(htu) is None:
        raise SpendTokenInvalid("spend token claim htu must be an absolute http(s) URL")

    return SpendClaims(
        agent_id=raw["iss"],
        aud=raw["aud"],
        iat=raw["iat"],
        exp=raw["exp"],
        jti=raw["jti"],
        max_amount=max_amount,
        currency=currency,
        htm=optional["htm"],
        htu=htu,
        task=optional["task"],
        session=optional["session"],
    )


def verify_spend_token(
    token: str | None,
    public_key: Ed25519PublicKey,
    *,
    audience: str | AbstractSet[str],
    now: float,
    max_ttl: int = MAX_TTL_SECONDS,
    skew: int = CLOCK_SKEW_SECONDS,
) -> SpendClaims:
    """Verify a spend token against the agent's public key and return its claims.

    Checks, in this order (the first failure is raised):

    1. present (``SpendTokenMissing``), ``spt_`` prefix, size, JWS structure, ``alg`` in
       {EdDSA, Ed25519}, a ``kid`` — ``SpendTokenInvalid``;
    2. the signature, with ``public_key`` (a small-order key verifies nothing) —
       ``SpendTokenInvalid``; no claim is looked at before this, so a forger learns nothing;
    3. required claims and their types, ``iss`` == ``kid``, ``max``/``cur``/``htu`` shape,
       a lifetime ``0 < exp - iat <= max_ttl`` — ``SpendTokenInvalid``;
    4. ``exp <= now`` — ``SpendTokenExpired``;
    5. ``iat > now + skew`` (not yet valid) — ``SpendTokenInvalid``;
    6. ``aud`` in ``audience`` (compared case-insensitively: it is a host name or
       ``paymaster``) — ``SpendTokenInvalid``.

    Replay is **not** checked here. The caller spends ``claims.jti`` in the store right
    after this returns (PROTOCOL.md: the jti is spent as soon as the signature verifies,
    whatever follows), keeping it at least until ``claims.exp``. Because expiry is raised
    here, an expired token is answered ``spend_token_expired`` and never reaches the replay
    cache, so that cache may forget a jti once its ``exp`` has passed: with step 3 and 5 a
    token is only ever accepted while ``iat - skew <= now < exp <= iat + max_ttl``.

    The caller must also verify that ``claims.agent_id`` names the agent whose key it
    passed (``token_key_id`` gives that id), and apply :func:`check_request_binding`.
    """
    if max_ttl < 1 or skew < 0:
        raise ValueError("max_ttl must be positive and skew non-negative")
    if not isinstance(public_key, Ed25519PublicKey):
        raise TypeError("public_key must be an Ed25519PublicKey")
    compact = _compact(token)
    kid: str = _header(compact)["kid"]
    # Again here, for a key that did not come through load_public_key.
    if _is_weak_key(public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)):
        raise SpendTokenInvalid("the agent's public key is a weak ed25519 point; register a new key")
    try:
        decoded = _JWS.decode_complete(compact, key=public_key, algorithms=list(ALGORITHMS))
    except PyJWTError as exc:
        raise SpendTokenInvalid("spend token signature does not verify") from exc

    claims = _claims_from(_parse_claims(decoded["payload"]), kid)
    lifetime = claims.exp - claims.iat
    if lifetime <= 0:
        raise SpendTokenInvalid("spend token exp is not after its iat")
    if lifetime > max_ttl:
        raise SpendTokenInvalid(f"spend token lifetime {lifetime:g}s is above the maximum of {max_ttl}s")
    if claims.exp <= now:
        raise SpendTokenExpired("spend token has expired")
    if claims.iat > now + skew:
        raise SpendTokenInvalid("spend token is not yet valid (iat is in the future)")
    accepted = {audience} if isinstance(audience, str) else set(audience)
    if claims.aud.lower() not in {a.lower() for a in accepted}:
        expected = " or ".join(sorted(accepted))
        raise SpendTokenInvalid(
            f"spend token audience {claims.aud!r} is not accepted here (expected {expected})"
        )
    return claims


# Request binding (DPoP-style htm / htu, RFC 9449 section 4.3)


def _normalize_percent(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else "%" + match.group(1).upper()


def _normalize_url(url: str) -> str | None:
    """``scheme://host[:port]/path`` after RFC 3986 syntax- and scheme-based normalization,
    without query and fragment; ``None`` if ``url`` is not an absolute http(s) URL."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = parts.hostname  # already lowercased by urllib
    if scheme not in _DEFAULT_PORTS or not host:
        return None
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None or port == _DEFAULT_PORTS[scheme] else f"{host}:{port}"
    path = _PERCENT_RE.sub(_normalize_percent, parts.path) or "/"
    return f"{scheme}://{netloc}{path}"


def check_request_binding(claims: SpendClaims, *, method: str, url: str) -> None:
    """Refuse a token bound (``htm``/``htu``) to another request than this one.

    ``url`` is the URL the agent asked for (for the gateway, ``https://{host}/{path}``, not
    the ``/proxy/…`` URL it arrived on). Methods compare case-insensitively; URLs without
    query and fragment, with scheme and host lowercased, default ports dropped and
    percent-encoding normalized. Unbound claims accept any request.
    """
    if claims.htm is not None and claims.htm.upper() != method.upper():
        raise SpendTokenInvalid(f"spend token is bound to method {claims.htm}, not {method}")
    if claims.htu is not None:
        bound = _normalize_url(claims.htu)
        if bound is None or bound != _normalize_url(url):
            raise SpendTokenInvalid("spend token is bound to another URL (htu)")
