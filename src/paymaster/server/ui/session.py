"""Browser sessions of the dashboard and the CSRF tokens of its forms.

A session token is ``v1.{expires}.{nonce}.{mac}``: an expiry (Unix seconds), 128 random
bits, and an HMAC-SHA256 over both. The admin key is checked once, at login, and never
stored: the cookie only proves that someone who held a valid admin key logged in less than
12 hours ago. The HMAC keys are derived (HKDF-SHA256) from the authority's signing key, so
every worker and replica that shares that key accepts the same sessions, and nothing new has
to be stored or configured.

The login and logout forms carry a double-submit token: the same signed value in a
``SameSite=Strict`` cookie and in a hidden field; a POST is accepted only when both are
present, equal, and signed by this authority.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from paymaster.core.audit import b64url

__all__ = ["CSRF_COOKIE", "CSRF_FIELD", "SESSION_COOKIE", "SESSION_TTL_SECONDS", "Sessions", "derive_key"]

SESSION_COOKIE = "pm_session"
CSRF_COOKIE = "pm_csrf"
CSRF_FIELD = "csrf"
SESSION_TTL_SECONDS = 12 * 3600
_VERSION = "v1"
_SALT = b"paymaster dashboard"
_MAX_TOKEN = 200


def derive_key(signing_key: Ed25519PrivateKey, purpose: str) -> bytes:
    """A 256-bit HMAC key for ``purpose``, derived from the authority's ed25519 key bytes."""
    raw = signing_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT, info=purpose.encode("ascii"))
    return hkdf.derive(raw)


def _mac(key: bytes, message: str) -> str:
    return b64url(hmac.new(key, message.encode("utf-8"), hashlib.sha256).digest())


def _same(a: str, b: str) -> bool:
    """Constant-time equality of two texts (any characters: a cookie is attacker-controlled)."""
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


class Sessions:
    """Issues and checks session and CSRF tokens; remembers logged-out sessions until they
    would have expired anyway (in this process: see docs/dashboard.md)."""

    def __init__(self, signing_key: Ed25519PrivateKey, *, ttl_seconds: int = SESSION_TTL_SECONDS) -> None:
        self.ttl_seconds = ttl_seconds
        self._session_key = derive_key(signing_key, f"session {_VERSION}")
        self._csrf_key = derive_key(signing_key, f"csrf {_VERSION}")
        self._revoked: dict[str, int] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------ sessions

    def issue(self, now: int) -> str:
        expires = now + self.ttl_seconds
        nonce = b64url(secrets.token_bytes(16))
        body = f"{_VERSION}.{expires}.{nonce}"
        return f"{body}.{_mac(self._session_key, body)}"

    def _parse(self, token: str | None) -> tuple[int, str] | None:
        """``(expires, nonce)`` of a token this authority signed, else ``None``."""
        if not token or len(token) > _MAX_TOKEN:
            return None
        parts = token.split(".")
        if (
            len(parts) != 4
            or parts[0] != _VERSION
            or not (parts[1].isascii() and parts[1].isdigit())
            or len(parts[1]) > 12
        ):
            return None
        body = ".".join(parts[:3])
        if not _same(_mac(self._session_key, body), parts[3]):
            return None
        return int(parts[1]), parts[2]

    def valid(self, token: str | None, now: int) -> bool:
        parsed = self._parse(token)
        if parsed is None:
            return False
        expires, nonce = parsed
        if not now < expires <= now + self.ttl_seconds:
            return False
        with self._lock:
            return nonce not in self._revoked

    def revoke(self, token: str | None, now: int) -> None:
        parsed = self._parse(token)
        with self._lock:
            for nonce, expires in list(self._revoked.items()):
                if expires <= now:
                    del self._revoked[nonce]
            if parsed is not None and parsed[0] > now:
                self._revoked[parsed[1]] = parsed[0]

    # ------------------------------------------------------------ CSRF

    def new_csrf(self) -> str:
        nonce = b64url(secrets.token_bytes(16))
        return f"{nonce}.{_mac(self._csrf_key, 'csrf.' + nonce)}"

    def csrf_signed(self, token: str | None) -> bool:
        if not token or len(token) > _MAX_TOKEN:
            return False
        nonce, sep, mac = token.partition(".")
        if not sep or not nonce:
            return False
        return _same(_mac(self._csrf_key, "csrf." + nonce), mac)

    def csrf_ok(self, cookie: str | None, field: str | None) -> bool:
        """The double submit: the form's token equals the cookie's, and is ours."""
        if not cookie or not field or not self.csrf_signed(cookie):
            return False
        return _same(cookie, field)
