"""Opening an authority from settings: the signing key, the store, the admin keys.

``init`` is idempotent: it creates what is missing and never replaces a key.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from paymaster.authority import Authority, utcnow
from paymaster.config import Settings
from paymaster.core import tokens
from paymaster.errors import InvalidRequest
from paymaster.store import ops
from paymaster.store.base import Store, Tx

ADMIN_PREFIX = "pm_admin_"
SERVICE_PREFIX = "pm_svc_"


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def load_or_create_signing_key(path: Path) -> tuple[Ed25519PrivateKey, bool]:
    """The authority's ed25519 key, created with mode 0600 when missing; never overwritten."""
    if path.exists():
        return tokens.private_key_from_pem(path.read_bytes()), False
    path.parent.mkdir(parents=True, exist_ok=True)
    key = tokens.generate_private_key()
    pem = tokens.private_key_to_pem(key)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        # another process created it first: use theirs
        return tokens.private_key_from_pem(path.read_bytes()), False
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    return key, True


def open_store(settings: Settings, key: Ed25519PrivateKey, clock: Callable[[], datetime] = utcnow) -> Store:
    url = settings.db_url
    if url.startswith("sqlite:"):
        from paymaster.store.sqlite import SqliteStore, sqlite_path

        return SqliteStore(
            sqlite_path(url),
            authority_id=settings.authority_id,
            signing_key=key,
            clock=clock,
            audit_sink=settings.audit_sink,
        )
    if url.startswith(("postgresql:", "postgres:")):
        from paymaster.store.postgres import PostgresStore  # type: ignore[import-not-found,unused-ignore]

        store: Store = PostgresStore(
            url,
            authority_id=settings.authority_id,
            signing_key=key,
            clock=clock,
            audit_sink=settings.audit_sink,
        )
        return store
    raise InvalidRequest(f"unsupported database URL {url!r}: use sqlite:///PATH or postgresql://…")


def open_authority(settings: Settings, clock: Callable[[], datetime] = utcnow) -> Authority:
    key, _ = load_or_create_signing_key(settings.signing_key_path)
    store = open_store(settings, key, clock)
    pricer = None
    try:
        from paymaster.pricer import Pricer  # type: ignore[import-not-found,unused-ignore]

        pricer = Pricer(settings)
    except ImportError:
        pricer = None
    authority = Authority(settings, store, key, clock=clock, pricer=pricer)
    if settings.admin_key:
        register_admin_key(authority, settings.admin_key)
    return authority


def register_admin_key(authority: Authority, key: str) -> None:
    digest = key_hash(key)
    authority.store.write(lambda tx: ops.add_api_key(tx, digest, "admin", None)).result()


@dataclass(frozen=True)
class InitResult:
    db_url: str
    signing_key_path: str
    signing_key_created: bool
    admin_key: str | None  # printed once, when made now
    admin_key_source: str  # created | environment | existing


def init(settings: Settings) -> InitResult:
    key, created = load_or_create_signing_key(settings.signing_key_path)
    store = open_store(settings, key)
    try:
        admin_key: str | None = None
        if settings.admin_key:
            digest = key_hash(settings.admin_key)
            store.write(lambda tx: ops.add_api_key(tx, digest, "admin", None)).result()
            store.write(lambda tx: ops.meta_set_once(tx, "admin_key_made", "environment")).result()
            source = "environment"
        else:
            candidate = ADMIN_PREFIX + secrets.token_urlsafe(32)
            digest = key_hash(candidate)

            def make(tx: Tx) -> bool:
                if not ops.meta_set_once(tx, "admin_key_made", "created"):
                    return False
                ops.add_api_key(tx, digest, "admin", None)
                return True

            made = store.write(make).result()
            admin_key = candidate if made else None
            source = "created" if made else "existing"
        return InitResult(settings.db_url, str(settings.signing_key_path), created, admin_key, source)
    finally:
        store.close()


def create_service_key(authority: Authority, principal: str) -> str:
    key = SERVICE_PREFIX + secrets.token_urlsafe(32)
    digest = key_hash(key)
    authority.store.write(lambda tx: ops.add_api_key(tx, digest, "service", principal)).result()
    return key


def lookup_api_key(authority: Authority, key: str) -> tuple[str, str | None] | None:
    """``(kind, principal)`` for a stored admin or service key, ``None`` otherwise."""
    if authority.settings.admin_key and secrets.compare_digest(key, authority.settings.admin_key):
        return "admin", None
    digest = key_hash(key)
    row = authority.store.read(
        lambda tx: tx.one("SELECT kind, principal FROM api_keys WHERE key_hash = ?", (digest,))
    )
    if row is None:
        return None
    return str(row["kind"]), row["principal"]
