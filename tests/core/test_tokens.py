"""Spend tokens: signing, every rejection of PROTOCOL.md's identity rules, request binding."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from paymaster.core import tokens
from paymaster.core.tokens import (
    SpendClaims,
    check_request_binding,
    generate_private_key,
    load_public_key,
    private_key_from_pem,
    private_key_to_pem,
    public_key_b64,
    sign_spend_token,
    token_key_id,
    verify_spend_token,
)
from paymaster.errors import (
    InvalidRequest,
    SpendDenied,
    SpendTokenExpired,
    SpendTokenInvalid,
    SpendTokenMissing,
)

AGENT = "ag_writer"
AUD = "api.openai.com"
NOW = 1_800_000_000.0
# Fixed keys keep the table's ids stable and failures reproducible.
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
PUB = KEY.public_key()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(value: Any) -> str:
    return b64(json.dumps(value, separators=(",", ":")).encode())


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": AGENT,
        "aud": AUD,
        "iat": int(NOW),
        "exp": int(NOW) + 60,
        "jti": "0123456789abcdef0123456789abcdef",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not _DROP}


_DROP = object()


def forge(
    payload: Any = None,
    *,
    header: dict[str, Any] | None = None,
    key: Ed25519PrivateKey | None = KEY,
    raw_payload: str | None = None,
) -> str:
    """A token built by hand, so that each malformation is exactly the one under test."""
    head = {"alg": "EdDSA", "typ": "JWT", "kid": AGENT} if header is None else header
    body = raw_payload if raw_payload is not None else b64json(claims() if payload is None else payload)
    signing_input = f"{b64json(head)}.{body}"
    signature = key.sign(signing_input.encode()) if key is not None else b""
    return f"spt_{signing_input}.{b64(signature)}"


def hs256(secret: bytes) -> str:
    signing_input = f"{b64json({'alg': 'HS256', 'typ': 'JWT', 'kid': AGENT})}.{b64json(claims())}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"spt_{signing_input}.{b64(mac)}"


def flip_signature(token: str) -> str:
    head, body, sig = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(sig + "=="))
    raw[0] ^= 1
    return f"{head}.{body}.{b64(bytes(raw))}"


def swap_payload(token: str, payload: dict[str, Any]) -> str:
    head, _, sig = token.split(".")
    return f"{head}.{b64json(payload)}.{sig}"


def good(**kwargs: Any) -> str:
    kwargs.setdefault("now", NOW)
    return sign_spend_token(KEY, agent_id=AGENT, aud=AUD, **kwargs)


def verify(token: str | None, *, now: float = NOW, audience: str | set[str] = AUD) -> SpendClaims:
    return verify_spend_token(token, PUB, audience=audience, now=now)


def by(key: Ed25519PrivateKey = KEY, *, aud: str = AUD, **kwargs: Any) -> str:
    return sign_spend_token(key, agent_id=AGENT, aud=aud, now=NOW, **kwargs)


def ed25519_header(**extra: Any) -> dict[str, Any]:
    return {"alg": "EdDSA", "kid": AGENT, **extra}


def raw_json(text: str) -> str:
    return forge(raw_payload=b64(text.encode()))


PUB_RAW = PUB.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
PUB_PEM = PUB.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
INVALID, EXPIRED, MISSING = SpendTokenInvalid, SpendTokenExpired, SpendTokenMissing
LATE = NOW + 3600

# Every rejection: (id, token, clock, expected error, a fragment of its message).
REJECTIONS: list[tuple[str, Callable[[], str | None], float, type[SpendDenied], str]] = [
    ("none", lambda: None, NOW, MISSING, ""),
    ("empty", lambda: "", NOW, MISSING, ""),
    ("no-prefix", lambda: good()[len("spt_") :], NOW, INVALID, "spt_"),
    ("bearer-prefix", lambda: "Bearer " + good(), NOW, INVALID, "spt_"),
    ("prefix-only", lambda: "spt_", NOW, INVALID, "JWS"),
    ("one-segment", lambda: "spt_abc", NOW, INVALID, "JWS"),
    ("two-segments", lambda: good().rsplit(".", 1)[0], NOW, INVALID, ""),
    ("bad-base64", lambda: "spt_!!!!." + good().split(".", 1)[1], NOW, INVALID, "JWS"),
    ("header-not-json", lambda: f"spt_{b64(b'not json')}.{b64json(claims())}.AAAA", NOW, INVALID, ""),
    ("header-array", lambda: f"spt_{b64json(['EdDSA'])}.{b64json(claims())}.AAAA", NOW, INVALID, ""),
    ("too-long", lambda: good(task="t" * 9000), NOW, INVALID, "too long"),
    ("payload-not-json", lambda: raw_json("{nope"), NOW, INVALID, "JSON"),
    ("payload-array", lambda: forge(["iss", AGENT]), NOW, INVALID, "JSON"),
    ("payload-duplicate-claim", lambda: raw_json('{"iss":"x","iss":"ag_writer"}'), NOW, INVALID, ""),
    ("exp-nan", lambda: raw_json(json.dumps(claims(exp=float("nan")))), NOW, INVALID, ""),
    ("no-kid", lambda: forge(header={"alg": "EdDSA", "typ": "JWT"}), NOW, INVALID, "kid"),
    ("empty-kid", lambda: forge(header={"alg": "EdDSA", "kid": ""}), NOW, INVALID, "kid"),
    ("kid-not-string", lambda: forge(header={"alg": "EdDSA", "kid": 7}), NOW, INVALID, ""),
    ("no-alg", lambda: forge(header={"kid": AGENT}), NOW, INVALID, "alg"),
    ("alg-none", lambda: forge(header=ed25519_header(alg="none"), key=None), NOW, INVALID, "alg"),
    ("alg-none-signed", lambda: forge(header=ed25519_header(alg="none")), NOW, INVALID, "alg"),
    ("alg-ed448", lambda: forge(header=ed25519_header(alg="Ed448")), NOW, INVALID, "alg"),
    ("hs256-raw-public-key", lambda: hs256(PUB_RAW), NOW, INVALID, "alg"),
    ("hs256-pem-public-key", lambda: hs256(PUB_PEM), NOW, INVALID, "alg"),
    ("hs256-b64-public-key", lambda: hs256(public_key_b64(PUB).encode()), NOW, INVALID, "alg"),
    ("crit-unknown", lambda: forge(header=ed25519_header(crit=["exp"])), NOW, INVALID, ""),
    ("bad-signature", lambda: flip_signature(good()), NOW, INVALID, "signature"),
    ("short-signature", lambda: good()[:-10], NOW, INVALID, ""),
    ("empty-signature", lambda: good().rsplit(".", 1)[0] + ".", NOW, INVALID, "signature"),
    (
        "tampered-max",
        lambda: swap_payload(good(max_amount="0.01"), claims(max="99")),
        NOW,
        INVALID,
        "signature",
    ),
    ("another-agents-key", lambda: by(OTHER_KEY), NOW, INVALID, "signature"),
    ("another-agents-key-ed25519", lambda: by(OTHER_KEY, alg="Ed25519"), NOW, INVALID, "signature"),
    ("missing-iss", lambda: forge(claims(iss=_DROP)), NOW, INVALID, "iss"),
    ("missing-aud", lambda: forge(claims(aud=_DROP)), NOW, INVALID, "aud"),
    ("missing-iat", lambda: forge(claims(iat=_DROP)), NOW, INVALID, "iat"),
    ("missing-exp", lambda: forge(claims(exp=_DROP)), NOW, INVALID, "exp"),
    ("missing-jti", lambda: forge(claims(jti=_DROP)), NOW, INVALID, "jti"),
    ("empty-jti", lambda: forge(claims(jti="")), NOW, INVALID, "jti"),
    ("huge-jti", lambda: forge(claims(jti="j" * 300)), NOW, INVALID, "jti"),
    ("aud-list", lambda: forge(claims(aud=[AUD])), NOW, INVALID, "aud"),
    ("iat-string", lambda: forge(claims(iat=str(int(NOW)))), NOW, INVALID, "iat"),
    ("exp-bool", lambda: forge(claims(exp=True)), NOW, INVALID, "exp"),
    ("iss-kid-mismatch", lambda: forge(claims(iss="ag_other")), NOW, INVALID, "kid"),
    ("kid-iss-mismatch", lambda: forge(header=ed25519_header(kid="ag_other")), NOW, INVALID, "kid"),
    ("max-exponent", lambda: forge(claims(max="1e3")), NOW, INVALID, "max"),
    ("max-negative", lambda: forge(claims(max="-1.00")), NOW, INVALID, "max"),
    ("max-number", lambda: forge(claims(max=1.5)), NOW, INVALID, "max"),
    ("max-ten-decimals", lambda: forge(claims(max="0.0000000001")), NOW, INVALID, "max"),
    ("max-unicode-digits", lambda: forge(claims(max="\u0661.5")), NOW, INVALID, "max"),
    ("max-empty", lambda: forge(claims(max="")), NOW, INVALID, "max"),
    ("cur-lowercase", lambda: forge(claims(cur="usd")), NOW, INVALID, "cur"),
    ("task-number", lambda: forge(claims(task=3)), NOW, INVALID, "task"),
    ("htu-relative", lambda: forge(claims(htu="/v1/chat")), NOW, INVALID, "htu"),
    ("htu-ftp", lambda: forge(claims(htu="ftp://api.openai.com/x")), NOW, INVALID, "htu"),
    ("ttl-over-300", lambda: forge(claims(exp=int(NOW) + 301)), NOW, INVALID, "lifetime"),
    ("ttl-huge", lambda: forge(claims(exp=2**53)), NOW, INVALID, "lifetime"),
    ("exp-beyond-floats", lambda: forge(claims(iat=NOW + 0.5, exp=10**400)), NOW, INVALID, "exp"),
    ("exp-infinite", lambda: raw_json(json.dumps(claims(exp=1e400))), NOW, INVALID, ""),
    ("exp-before-iat", lambda: forge(claims(exp=int(NOW) - 1)), NOW, INVALID, "iat"),
    ("exp-equals-iat", lambda: forge(claims(exp=int(NOW))), NOW, INVALID, "iat"),
    ("expired-exactly-now", lambda: good(ttl_seconds=60), NOW + 60, EXPIRED, "expired"),
    ("expired-long-ago", lambda: good(), NOW + 86_400, EXPIRED, "expired"),
    ("iat-too-far-ahead", lambda: good(now=NOW + 6), NOW, INVALID, "not yet valid"),
    ("iat-far-future", lambda: good(now=NOW + 10**6), NOW, INVALID, "not yet valid"),
    ("wrong-audience", lambda: by(aud="evil.example"), NOW, INVALID, "audience"),
    ("paymaster-audience-at-host", lambda: by(aud="paymaster"), NOW, INVALID, "audience"),
    ("audience-suffix", lambda: by(aud="api.openai.com.evil"), NOW, INVALID, "audience"),
    # When several things are wrong, the order of checks decides the answer.
    ("forged-and-expired", lambda: flip_signature(good()), LATE, INVALID, "signature"),
    ("expired-and-wrong-audience", lambda: by(aud="x.example"), LATE, EXPIRED, ""),
]


@pytest.mark.parametrize(
    ("make", "now", "error", "fragment"), [r[1:] for r in REJECTIONS], ids=[r[0] for r in REJECTIONS]
)
def test_every_rejection(
    make: Callable[[], str | None], now: float, error: type[SpendDenied], fragment: str
) -> None:
    with pytest.raises(error) as info:
        verify(make(), now=now)
    assert type(info.value) is error  # not merely a subclass: each code is its own answer
    assert fragment.lower() in info.value.message.lower()
    assert info.value.status == 401


@pytest.mark.parametrize("alg", ["EdDSA", "Ed25519"])
def test_both_algorithm_names_accepted(alg: str) -> None:
    token = sign_spend_token(KEY, agent_id=AGENT, aud=AUD, now=NOW, alg=alg)
    header = json.loads(base64.urlsafe_b64decode(token[4:].split(".")[0] + "=="))
    assert header == {"alg": alg, "typ": "JWT", "kid": AGENT}
    assert verify(token).agent_id == AGENT


@pytest.mark.parametrize("alg", ["EdDSA", "Ed25519"])
def test_hand_built_token_accepted(alg: str) -> None:
    """Interoperability: a token from another library (plain JWS, no PyJWT) verifies."""
    token = forge(claims(max="0.50", cur="USD"), header={"alg": alg, "kid": AGENT})
    result = verify(token)
    assert (result.max_amount, result.currency) == ("0.50", "USD")


def test_claims_round_trip() -> None:
    token = good(
        ttl_seconds=120,
        max_amount="0.25",
        currency="USD",
        htm="POST",
        htu="https://api.openai.com/v1/chat/completions?key=secret#frag",
        task="tk_1",
        session="s-9",
        jti="my-jti",
    )
    assert verify(token, now=NOW + 119.5) == SpendClaims(
        agent_id=AGENT,
        aud=AUD,
        iat=int(NOW),
        exp=int(NOW) + 120,
        jti="my-jti",
        max_amount="0.25",
        currency="USD",
        htm="POST",
        htu="https://api.openai.com/v1/chat/completions",  # query and fragment never signed
        task="tk_1",
        session="s-9",
    )


def test_optional_claims_only_when_given() -> None:
    payload = json.loads(base64.urlsafe_b64decode(good().split(".")[1] + "=="))
    assert set(payload) == {"iss", "aud", "iat", "exp", "jti"}
    assert payload["exp"] - payload["iat"] == tokens.DEFAULT_TTL_SECONDS == 60


def test_null_optional_claims_read_as_absent() -> None:
    result = verify(forge(claims(max=None, task=None, htu=None)))
    assert (result.max_amount, result.task, result.htu) == (None, None, None)


def test_jti_is_fresh_and_128_bits() -> None:
    jtis = {verify(good()).jti for _ in range(50)}
    assert len(jtis) == 50
    for jti in jtis:
        assert len(base64.urlsafe_b64decode(jti + "==")) == 16


@pytest.mark.parametrize(
    ("token_now", "verify_now"),
    [
        (NOW + 5, NOW),  # iat at the edge of the allowed skew
        (NOW, NOW + 59.999),  # one instant before exp
        (NOW + 0.9, NOW),  # iat is floored to whole seconds
    ],
)
def test_clock_edges_accepted(token_now: float, verify_now: float) -> None:
    verify(good(now=token_now), now=verify_now)


def test_ttl_300_is_the_maximum_accepted() -> None:
    verify(good(ttl_seconds=300), now=NOW + 299)
    verify(forge(claims(exp=int(NOW) + 300)))


def test_audience_set_and_case() -> None:
    token = sign_spend_token(KEY, agent_id=AGENT, aud="API.OpenAI.com", now=NOW)
    assert verify(token, audience={"paymaster", "api.openai.com"}).aud == "API.OpenAI.com"
    assert verify_spend_token(good(), PUB, audience=frozenset({AUD}), now=NOW).aud == AUD
    with pytest.raises(SpendTokenInvalid, match="audience"):
        verify(good(), audience=set())


def test_max_ttl_and_skew_are_the_callers() -> None:
    with pytest.raises(SpendTokenInvalid, match="lifetime"):
        verify_spend_token(good(ttl_seconds=120), PUB, audience=AUD, now=NOW, max_ttl=60)
    with pytest.raises(SpendTokenInvalid, match="not yet valid"):
        verify_spend_token(good(now=NOW + 1), PUB, audience=AUD, now=NOW, skew=0)


def test_verify_needs_an_ed25519_public_key() -> None:
    ec_key: Any = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(TypeError):
        verify_spend_token(good(), ec_key, audience=AUD, now=NOW)


def test_global_pyjwt_registrations_do_not_widen_the_allow_list() -> None:
    import jwt

    jwt.api_jws._jws_global_obj.register_algorithm("Ed25519", jwt.algorithms.OKPAlgorithm())
    try:
        with pytest.raises(SpendTokenInvalid, match="alg"):
            verify(hs256(public_key_b64(PUB).encode()))
    finally:
        jwt.api_jws._jws_global_obj.unregister_algorithm("Ed25519")


# token_key_id


def test_token_key_id_reads_kid_without_verifying() -> None:
    assert token_key_id(good()) == AGENT
    expired_and_foreign = sign_spend_token(OTHER_KEY, agent_id="ag_x", aud=AUD, now=0)
    assert token_key_id(expired_and_foreign) == "ag_x"


@pytest.mark.parametrize(
    ("token", "error"),
    [
        (None, SpendTokenMissing),
        ("", SpendTokenMissing),
        ("eyJhbGciOiJFZERTQSJ9.e30.AA", SpendTokenInvalid),
        ("spt_", SpendTokenInvalid),
        ("spt_%%%.e30.AA", SpendTokenInvalid),
        (f"spt_{b64(b'[1')}.e30.AA", SpendTokenInvalid),
        (f"spt_{b64json({'alg': 'EdDSA'})}.e30.AA", SpendTokenInvalid),
        (f"spt_{b64json({'alg': 'HS256', 'kid': AGENT})}.e30.AA", SpendTokenInvalid),
        (f"spt_{b64json({'alg': 'none', 'kid': AGENT})}.e30.", SpendTokenInvalid),
        (f"spt_{b64json({'kid': AGENT})}.e30.AA", SpendTokenInvalid),
        ("spt_" + "A" * 9000, SpendTokenInvalid),
    ],
)
def test_token_key_id_rejections(token: str | None, error: type[SpendDenied]) -> None:
    with pytest.raises(error):
        token_key_id(token)


# signing arguments


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ttl_seconds": 0},
        {"ttl_seconds": 301},
        {"ttl_seconds": -5},
        {"ttl_seconds": 1.5},
        {"ttl_seconds": True},
        {"alg": "HS256"},
        {"alg": "none"},
        {"max_amount": "1e3"},
        {"max_amount": "-1"},
        {"currency": "usd"},
        {"htu": "/relative"},
        {"task": ""},
        {"jti": ""},
        {"jti": "j" * 257},
    ],
)
def test_sign_rejects_bad_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        good(**kwargs)


@pytest.mark.parametrize("kwargs", [{"agent_id": ""}, {"aud": ""}])
def test_sign_rejects_empty_identity(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        sign_spend_token(KEY, **{"agent_id": AGENT, "aud": AUD, **kwargs})


def test_sign_uses_the_real_clock_by_default() -> None:
    import time

    claims_ = verify_spend_token(
        sign_spend_token(KEY, agent_id=AGENT, aud=AUD), PUB, audience=AUD, now=time.time()
    )
    assert abs(claims_.iat - time.time()) < 5


# keys

_B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def test_public_key_round_trip() -> None:
    text = public_key_b64(KEY)
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", text)
    assert public_key_b64(load_public_key(text)) == text == public_key_b64(PUB)


@pytest.mark.parametrize(
    "text",
    [
        "",
        public_key_b64(PUB) + "=",  # padding
        public_key_b64(PUB)[:-1],  # 31.x bytes
        public_key_b64(PUB) + "A",  # too long
        public_key_b64(PUB)[:-1] + "+",  # base64, not base64url
        public_key_b64(PUB)[:-1] + _B64URL[_B64URL.index(public_key_b64(PUB)[-1]) | 1],  # unused bits set
        " " + public_key_b64(PUB)[1:],
    ],
)
def test_load_public_key_rejects(text: str) -> None:
    with pytest.raises(InvalidRequest):
        load_public_key(text)


_P = 2**255 - 19
_Y8 = 2707385501144840649318225287225658788936804267575313519463743609750303402022
# Every small-order point (by y, both x signs) and every non-canonical y >= p.
WEAK_KEYS = [
    (y | sign << 255).to_bytes(32, "little")
    for y in [0, 1, _P - 1, _Y8, _P - _Y8, *range(_P, 2**255)]
    for sign in (0, 1)
]


def test_small_order_y_is_right() -> None:
    d = -121665 * pow(121666, -1, _P) % _P
    assert (d * _Y8**4 + 2 * _Y8**2 - 1) % _P == 0  # 2P has y = 0: P has order 8


def test_why_weak_keys_are_refused() -> None:
    """With the identity point as public key, one signature verifies for every message."""
    identity = Ed25519PublicKey.from_public_bytes(bytes([1]) + bytes(31))
    forged_signature = bytes([1]) + bytes(63)
    for message in (b"a", b"b", b"any spend token"):
        identity.verify(forged_signature, message)  # does not raise: cryptography accepts it


@pytest.mark.parametrize("raw", WEAK_KEYS, ids=lambda raw: raw.hex()[:8] + "…" + raw.hex()[-4:])
def test_weak_public_keys_refused(raw: bytes) -> None:
    with pytest.raises(InvalidRequest, match="weak"):
        load_public_key(b64(raw))
    # And at verification, for a key object made some other way.
    key = Ed25519PublicKey.from_public_bytes(raw)
    header = b64json({"alg": "EdDSA", "kid": AGENT})
    forged = f"spt_{header}.{b64json(claims())}.{b64(bytes([1]) + bytes(63))}"
    with pytest.raises(SpendTokenInvalid, match="weak"):
        verify_spend_token(forged, key, audience=AUD, now=NOW)


@pytest.mark.parametrize("value", [None, 42, b"bytes"])
def test_load_public_key_rejects_non_strings(value: Any) -> None:
    with pytest.raises(InvalidRequest):
        load_public_key(value)


def test_pem_round_trip() -> None:
    key = generate_private_key()
    pem = private_key_to_pem(key)
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public_key_b64(private_key_from_pem(pem)) == public_key_b64(key)
    assert public_key_b64(private_key_from_pem(pem.decode())) == public_key_b64(key)


@pytest.mark.parametrize(
    "pem",
    [
        b"",
        b"not a key",
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        KEY.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        ),
    ],
    ids=["empty", "garbage", "ec-key", "encrypted"],
)
def test_private_key_from_pem_rejects(pem: bytes) -> None:
    with pytest.raises(ValueError):
        private_key_from_pem(pem)


# request binding (htm / htu)


def bound(
    htm: str | None = "POST", htu: str | None = "https://api.openai.com/v1/chat/completions"
) -> SpendClaims:
    return verify(good(htm=htm, htu=htu))


@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("POST", "https://api.openai.com/v1/chat/completions"),
        ("post", "https://api.openai.com/v1/chat/completions"),
        ("POST", "https://api.openai.com/v1/chat/completions?stream=true"),
        ("POST", "https://api.openai.com/v1/chat/completions#x"),
        ("POST", "HTTPS://API.OPENAI.COM/v1/chat/completions"),
        ("POST", "https://api.openai.com:443/v1/chat/completions"),
        ("POST", "https://api.openai.com/v1/chat/%63ompletions"),  # unreserved char percent-encoded
    ],
)
def test_binding_matches(method: str, url: str) -> None:
    check_request_binding(bound(), method=method, url=url)


@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("GET", "https://api.openai.com/v1/chat/completions"),
        ("PUT", "https://api.openai.com/v1/chat/completions"),
        ("POST", "http://api.openai.com/v1/chat/completions"),
        ("POST", "https://api.openai.com:8443/v1/chat/completions"),
        ("POST", "https://evil.example/v1/chat/completions"),
        ("POST", "https://api.openai.com/v1/embeddings"),
        ("POST", "https://api.openai.com/V1/chat/completions"),  # paths are case-sensitive
        ("POST", "https://api.openai.com/v1/chat/completions/"),
        ("POST", "/v1/chat/completions"),
        ("POST", "https://api.openai.com:notaport/v1/chat/completions"),
    ],
)
def test_binding_mismatches(method: str, url: str) -> None:
    with pytest.raises(SpendTokenInvalid):
        check_request_binding(bound(), method=method, url=url)


def test_binding_absent_accepts_any_request() -> None:
    check_request_binding(bound(htm=None, htu=None), method="DELETE", url="https://anything.example/x")
    check_request_binding(bound(htu=None), method="POST", url="https://anything.example/x")
    with pytest.raises(SpendTokenInvalid, match="method"):
        check_request_binding(bound(htu=None), method="GET", url="https://anything.example/x")


def test_binding_ipv6_and_root_path() -> None:
    claims_ = verify(good(htu="http://[::1]:80"))
    check_request_binding(claims_, method="GET", url="http://[::1]/")
    with pytest.raises(SpendTokenInvalid):
        check_request_binding(claims_, method="GET", url="http://[::2]/")


# properties

private_keys = st.binary(min_size=32, max_size=32).map(Ed25519PrivateKey.from_private_bytes)
hosts = st.from_regex(r"[a-z0-9]{1,12}(\.[a-z0-9]{1,12}){0,3}", fullmatch=True) | st.just("paymaster")
agent_ids = st.from_regex(r"ag_[A-Za-z0-9]{1,20}", fullmatch=True)
clock = st.integers(min_value=0, max_value=4_000_000_000)
ttls = st.integers(min_value=1, max_value=300)
algs = st.sampled_from(["EdDSA", "Ed25519"])
PROPERTY_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(signer=private_keys, holder=private_keys, agent=agent_ids, aud=hosts, iat=clock, ttl=ttls, alg=algs)
def test_property_another_key_never_accepted(
    signer: Ed25519PrivateKey, holder: Ed25519PrivateKey, agent: str, aud: str, iat: int, ttl: int, alg: str
) -> None:
    assume(public_key_b64(signer) != public_key_b64(holder))
    token = sign_spend_token(signer, agent_id=agent, aud=aud, ttl_seconds=ttl, now=iat, alg=alg)
    with pytest.raises(SpendTokenInvalid):
        verify_spend_token(token, holder.public_key(), audience=aud, now=iat)


@PROPERTY_SETTINGS
@given(
    key=private_keys,
    agent=agent_ids,
    aud=hosts,
    other=st.sets(hosts, max_size=3),
    iat=clock,
    ttl=ttls,
    alg=algs,
)
def test_property_another_audience_never_accepted(
    key: Ed25519PrivateKey, agent: str, aud: str, other: set[str], iat: int, ttl: int, alg: str
) -> None:
    assume(aud.lower() not in {o.lower() for o in other})
    token = sign_spend_token(key, agent_id=agent, aud=aud, ttl_seconds=ttl, now=iat, alg=alg)
    with pytest.raises(SpendTokenInvalid, match="audience"):
        verify_spend_token(token, key.public_key(), audience=other, now=iat)


@PROPERTY_SETTINGS
@given(
    key=private_keys,
    agent=agent_ids,
    aud=hosts,
    iat=clock,
    ttl=ttls,
    late=st.floats(min_value=0, max_value=1e9, allow_nan=False),
    alg=algs,
)
def test_property_never_accepted_after_expiry(
    key: Ed25519PrivateKey, agent: str, aud: str, iat: int, ttl: int, late: float, alg: str
) -> None:
    token = sign_spend_token(key, agent_id=agent, aud=aud, ttl_seconds=ttl, now=iat, alg=alg)
    with pytest.raises(SpendTokenExpired):
        verify_spend_token(token, key.public_key(), audience=aud, now=iat + ttl + late)


@PROPERTY_SETTINGS
@given(
    key=private_keys,
    agent=agent_ids,
    aud=hosts,
    iat=clock,
    ttl=ttls,
    at=st.floats(min_value=0, max_value=1, exclude_max=True),
    alg=algs,
)
def test_property_valid_tokens_accepted_throughout_their_life(
    key: Ed25519PrivateKey, agent: str, aud: str, iat: int, ttl: int, at: float, alg: str
) -> None:
    """The counterpart of the three above, so that they are not passing vacuously."""
    token = sign_spend_token(key, agent_id=agent, aud=aud, ttl_seconds=ttl, now=iat, alg=alg)
    now = iat - 5 + at * (ttl + 5)  # from the skew allowance up to just before exp
    assume(now < iat + ttl)
    result = verify_spend_token(token, key.public_key(), audience=aud, now=now)
    assert (result.agent_id, result.aud, result.exp - result.iat) == (agent, aud, ttl)
    assert token_key_id(token) == agent
