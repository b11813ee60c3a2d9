"""Alerts: signed webhook delivery of CloudEvents from the outbox (docs/alerts.md).

Events to alert on are written to the ``outbox`` table in the same transaction as the
change they record (:func:`paymaster.store.ops.enqueue_webhook`): a threshold crossed
(once per threshold per budget window, whatever the number of replicas), a velocity guard
tripped, and any other type ``[alerts] events`` names. A :class:`WebhookDeliverer` — one
per process, on a background thread — POSTs each to ``[alerts] webhook``:

- body: the CloudEvent JSON, byte for byte as stored; ``content-type:
  application/cloudevents+json``; ``ce-id``, ``ce-type``, ``ce-source``, ``ce-time``;
- ``x-paymaster-signature: ed25519=<base64url>``, the authority's ed25519 signature over
  the exact body bytes (its public key is at ``GET /v1/authority/keys``;
  ``x-paymaster-key-id`` is that key's ``kid``). Receivers check it with
  :func:`verify_webhook`;
- a 2xx answer is delivery. Anything else (another status, a timeout, a refused
  connection, a redirect) is retried with exponential backoff and jitter, capped at
  ``max_delay`` (``Retry-After`` is honoured up to the cap), until ``max_attempts``; then
  the row is kept, undelivered, with its ``last_error``, for inspection.

Several deliverers (worker processes, replicas) may share one database: a row is claimed
by a conditional ``UPDATE`` that counts the attempt and moves ``next_attempt_at`` past a
lease *before* the row is sent, so two deliverers never send it at once. A deliverer that
dies mid-send leaves the row to be sent again when its lease ends: delivery is
at-least-once, and the CloudEvent ``id`` (also in ``ce-id``) is the receiver's dedupe key.
Pending rows survive a restart: they live in the database.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import threading
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeAlias

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from paymaster.core.audit import b64url, b64url_decode, canonical, iso_time, sign_bytes
from paymaster.store import ops
from paymaster.store.base import Tx

if TYPE_CHECKING:
    from paymaster.authority import Authority

logger = logging.getLogger("paymaster.alerts")

__all__ = [
    "CONTENT_TYPE",
    "KEY_ID_HEADER",
    "SIGNATURE_HEADER",
    "WebhookDeliverer",
    "key_id",
    "sign_webhook",
    "start_deliverer",
    "verify_webhook",
]

CONTENT_TYPE = "application/cloudevents+json"
SIGNATURE_HEADER = "x-paymaster-signature"
KEY_ID_HEADER = "x-paymaster-key-id"
SIGNATURE_SCHEME = "ed25519="
USER_AGENT = "paymaster-webhook/1"
MAX_ERROR_CHARS = 500

PublicKeyLike: TypeAlias = Ed25519PublicKey | str | bytes | Mapping[str, Any]


# ---------------------------------------------------------------- signatures


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    """The key's RFC 7638 JWK thumbprint: its ``kid`` at ``GET /v1/authority/keys``."""
    jwk = {"crv": "Ed25519", "kty": "OKP", "x": b64url(_raw_public(key))}
    return b64url(hashlib.sha256(canonical(jwk)).digest())


def sign_webhook(authority: Authority, body: bytes) -> str:
    """The ``x-paymaster-signature`` value for ``body``: ``ed25519=<base64url signature>``."""
    return SIGNATURE_SCHEME + sign_bytes(authority.signing_key, body)


def _public_keys(spec: PublicKeyLike | Sequence[PublicKeyLike]) -> list[Ed25519PublicKey]:
    """Keys from an ``Ed25519PublicKey``, the base64url of its 32 raw bytes (the JWK ``x``),
    the raw bytes, a JWK, a JWK Set (what ``GET /v1/authority/keys`` answers), or a list of
    any of these. What cannot be read as an ed25519 key is skipped."""
    if isinstance(spec, Ed25519PublicKey):
        return [spec]
    if isinstance(spec, bytes):
        try:
            return [Ed25519PublicKey.from_public_bytes(spec)]
        except ValueError:
            return []
    if isinstance(spec, str):
        try:
            return [Ed25519PublicKey.from_public_bytes(b64url_decode(spec.strip()))]
        except ValueError:
            return []
    if isinstance(spec, Mapping):
        if "keys" in spec and isinstance(spec["keys"], list):
            return [k for jwk in spec["keys"] if isinstance(jwk, Mapping) for k in _public_keys(jwk)]
        if spec.get("kty") == "OKP" and spec.get("crv") == "Ed25519" and isinstance(spec.get("x"), str):
            return _public_keys(str(spec["x"]))
        return []
    return [k for item in spec for k in _public_keys(item)]


def verify_webhook(
    body: bytes | str, header: str | None, public_key: PublicKeyLike | Sequence[PublicKeyLike]
) -> bool:
    """For receivers: whether ``header`` (the ``x-paymaster-signature`` value) holds a valid
    signature by ``public_key`` over ``body``, the request body *exactly as received*
    (verify before parsing the JSON). ``public_key`` may be the authority's key object, its
    base64url form, a JWK, the JWK Set of ``GET /v1/authority/keys``, or a list (during a
    key rotation). The header may carry several comma-separated ``ed25519=`` signatures;
    one valid signature is enough. Never raises: anything malformed is ``False``.

    Receivers should also drop a ``ce-id`` they have already processed (delivery is
    at-least-once) and may refuse an event whose ``time`` is too old to be fresh."""
    if not header:
        return False
    data = body.encode("utf-8") if isinstance(body, str) else bytes(body)
    keys = _public_keys(public_key)
    for part in header.split(","):
        part = part.strip()
        if not part.lower().startswith(SIGNATURE_SCHEME):
            continue
        try:
            sig = b64url_decode(part[len(SIGNATURE_SCHEME) :])
        except ValueError:
            continue
        for key in keys:
            try:
                key.verify(sig, data)
            except InvalidSignature:
                continue
            return True
    return False


# ---------------------------------------------------------------- delivery


@dataclass(frozen=True, slots=True)
class _Claim:
    id: int
    event_id: str
    body: str
    attempts: int  # including this one


@dataclass(frozen=True, slots=True)
class _Outcome:
    ok: bool
    error: str | None = None
    retry_after: float | None = None
    final: bool = False  # not worth retrying: give the row up now


class WebhookDeliverer:
    """Sends the due outbox rows of ``authority``'s database to ``url``.

    ``events``: the event types this deliverer sends (``None``: every row). A pending row
    of another type — enqueued under an older ``[alerts] events`` — is given up with a
    ``last_error`` saying so. ``client``: an ``httpx.Client`` to use (not closed here);
    one is made otherwise. The retry delay after the n-th failed attempt is
    ``min(max_delay, base_delay * 2**(n-1))`` with equal jitter (uniformly between half
    and all of it). A claim is a lease of ``lease_seconds`` (past the request timeout):
    when the sender dies, the row is due again once it ends. By default it covers a whole
    batch (``timeout * batch_size + 60`` seconds), sent one row after the other."""

    def __init__(
        self,
        authority: Authority,
        *,
        url: str,
        events: set[str] | AbstractSet[str] | None,
        client: httpx.Client | None = None,
        max_attempts: int = 12,
        base_delay: float = 1.0,
        max_delay: float = 600,
        timeout: float = 10.0,
        lease_seconds: float | None = None,
        batch_size: int = 10,
        poll_interval: float = 1.0,
        retention: timedelta | None = timedelta(days=7),
        rng: Callable[[], float] = random.random,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if base_delay <= 0 or max_delay < base_delay:
            raise ValueError("need 0 < base_delay <= max_delay")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if lease_seconds is None:
            # a claimed batch is sent one row after the other: the lease covers them all
            lease_seconds = timeout * batch_size + 60.0
        if lease_seconds <= timeout:
            raise ValueError("lease_seconds must be longer than the request timeout")
        self.authority = authority
        self.url = url
        self.events = frozenset(events) if events is not None else None
        self.max_attempts = max_attempts
        self.base_delay = float(base_delay)
        self.max_delay = float(max_delay)
        self.timeout = timeout
        self.lease_seconds = lease_seconds
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.retention = retention
        self._rng = rng
        self._own_client = client is None
        self._client = client if client is not None else httpx.Client(timeout=timeout, follow_redirects=False)
        self._key_id = key_id(authority.public_key)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_prune: datetime | None = None

    @classmethod
    def from_settings(
        cls, authority: Authority, *, client: httpx.Client | None = None, **options: Any
    ) -> WebhookDeliverer | None:
        """The deliverer ``[alerts]`` asks for; ``None`` when no webhook is configured.
        It sends what this authority enqueues: threshold crossings, velocity trips and the
        types ``[alerts] events`` names."""
        url = authority.settings.alerts.get("webhook")
        if not url:
            return None
        events = set(ops.ALWAYS_ALERTED) | set(ops.outbox_types(authority.settings.alerts))
        return cls(authority, url=str(url), events=events, client=client, **options)

    # ------------------------------------------------------------ one pass

    def deliver_due(self, now: datetime | None = None) -> int:
        """Claim the rows due at ``now`` (default: the authority's clock) and send each
        once; return how many were delivered (answered 2xx)."""
        return self._pass(now if now is not None else self.authority.clock())[1]

    def backoff(self, attempts: int) -> float:
        """Seconds to wait after ``attempts`` failed attempts (jittered, capped)."""
        ceiling = min(self.max_delay, self.base_delay * float(1 << min(max(attempts - 1, 0), 62)))
        return ceiling / 2 + self._rng() * ceiling / 2

    def pending(self) -> list[dict[str, Any]]:
        """Undelivered rows (given up included), oldest first: for operators and tests."""
        rows = self.authority.store.read(
            lambda tx: tx.all(
                "SELECT id, event_id, attempts, next_attempt_at, last_error FROM outbox"
                " WHERE delivered_at IS NULL ORDER BY id"
            )
        )
        return [dict(r) for r in rows]

    def _pass(self, now: datetime) -> tuple[int, int]:
        store = self.authority.store
        due = store.read(lambda tx: self._any_due(tx, now))
        if not due:
            return 0, 0
        claims = store.write(lambda tx: self._claim(tx, now)).result()
        delivered = 0
        for claim in claims:
            outcome = self._send(claim)
            store.write(lambda tx, c=claim, o=outcome: self._record(tx, c, o, now)).result()  # type: ignore[misc]
            delivered += int(outcome.ok)
        return len(claims), delivered

    def _any_due(self, tx: Tx, now: datetime) -> bool:
        row = tx.one(
            "SELECT 1 AS x FROM outbox WHERE delivered_at IS NULL AND attempts < ? AND next_attempt_at <= ?"
            " LIMIT 1",
            (self.max_attempts, iso_time(now)),
        )
        return row is not None

    def _claim(self, tx: Tx, now: datetime) -> list[_Claim]:
        """Count the attempt and lease the row before sending it. The conditions are
        repeated outside the sub-select so that a row another transaction claimed in the
        meantime is skipped (PostgreSQL re-checks them on the row it waited for)."""
        at = iso_time(now)
        lease = iso_time(now + timedelta(seconds=self.lease_seconds))
        rows = tx.all(
            "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?"
            " WHERE id IN (SELECT id FROM outbox WHERE delivered_at IS NULL AND attempts < ?"
            " AND next_attempt_at <= ? ORDER BY next_attempt_at, id LIMIT ?)"
            " AND delivered_at IS NULL AND attempts < ? AND next_attempt_at <= ?"
            " RETURNING id, event_id, body, attempts",
            (lease, self.max_attempts, at, self.batch_size, self.max_attempts, at),
        )
        claims = [_Claim(int(r["id"]), str(r["event_id"]), str(r["body"]), int(r["attempts"])) for r in rows]
        return sorted(claims, key=lambda c: c.id)

    def _send(self, claim: _Claim) -> _Outcome:
        body = claim.body.encode("utf-8")
        try:
            event = json.loads(claim.body)
            event_type = str(event["type"])
        except (ValueError, KeyError, TypeError):
            return _Outcome(False, "unreadable outbox body: not a CloudEvent", final=True)
        if self.events is not None and event_type not in self.events:
            return _Outcome(False, f"not sent: {event_type} is not among the alerted event types", final=True)
        headers = {
            "content-type": CONTENT_TYPE,
            SIGNATURE_HEADER: sign_webhook(self.authority, body),
            KEY_ID_HEADER: self._key_id,
            "ce-id": str(event.get("id", claim.event_id)),
            "ce-type": event_type,
            "ce-source": str(event.get("source", "")),
            "ce-specversion": str(event.get("specversion", "1.0")),
            "ce-time": str(event.get("time", "")),
            "user-agent": USER_AGENT,
        }
        try:
            response = self._client.post(self.url, content=body, headers=headers, timeout=self.timeout)
        except httpx.HTTPError as exc:
            return _Outcome(False, f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS])
        if 200 <= response.status_code < 300:
            return _Outcome(True)
        detail = response.text.strip().replace("\n", " ")[:200]
        error = f"HTTP {response.status_code}" + (f": {detail}" if detail else "")
        return _Outcome(False, error[:MAX_ERROR_CHARS], _retry_after(response))

    def _record(self, tx: Tx, claim: _Claim, outcome: _Outcome, now: datetime) -> None:
        if outcome.ok:
            tx.execute(
                "UPDATE outbox SET delivered_at = ?, last_error = NULL WHERE id = ? AND delivered_at IS NULL",
                (iso_time(now), claim.id),
            )
            return
        error = outcome.error or "failed"
        if outcome.final or claim.attempts >= self.max_attempts:
            given_up = error if outcome.final else f"gave up after {claim.attempts} attempts: {error}"
            # attempts at the maximum: never claimed again; the row stays for inspection
            tx.execute(
                "UPDATE outbox SET attempts = ?, next_attempt_at = ?, last_error = ?"
                " WHERE id = ? AND attempts = ? AND delivered_at IS NULL",
                (max(claim.attempts, self.max_attempts), iso_time(now), given_up, claim.id, claim.attempts),
            )
            logger.error("webhook delivery of %s: %s", claim.event_id, given_up)
            return
        delay = self.backoff(claim.attempts)
        if outcome.retry_after is not None:
            delay = max(delay, min(outcome.retry_after, self.max_delay))
        tx.execute(
            "UPDATE outbox SET next_attempt_at = ?, last_error = ?"
            " WHERE id = ? AND attempts = ? AND delivered_at IS NULL",
            (iso_time(now + timedelta(seconds=delay)), error, claim.id, claim.attempts),
        )
        logger.warning(
            "webhook delivery of %s failed (attempt %d): %s; retry in %.1fs",
            claim.event_id,
            claim.attempts,
            error,
            delay,
        )

    def prune(self, now: datetime) -> int:
        """Forget rows delivered more than ``retention`` ago (given-up rows are kept)."""
        if self.retention is None:
            return 0
        before = iso_time(now - self.retention)
        return self.authority.store.write(
            lambda tx: tx.execute(
                "DELETE FROM outbox WHERE delivered_at IS NOT NULL AND delivered_at < ?", (before,)
            )
        ).result()

    # ------------------------------------------------------------ background thread

    def run_forever(self, stop_event: threading.Event) -> None:
        """Deliver until ``stop_event`` is set: a full batch is followed at once by the
        next; otherwise the loop waits ``poll_interval``. Errors (the store unavailable,
        say) are logged and the pass is tried again at the next tick."""
        while not stop_event.is_set():
            claimed = 0
            try:
                now = self.authority.clock()
                claimed = self._pass(now)[0]
                if self._last_prune is None or now - self._last_prune >= timedelta(hours=1):
                    self._last_prune = now
                    self.prune(now)
            except Exception:
                logger.exception("webhook delivery pass failed")
            if claimed < self.batch_size:
                stop_event.wait(self.poll_interval)

    def start(self) -> None:
        """Run :meth:`run_forever` on a daemon thread (``paymaster-webhooks``)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self.run_forever, args=(self._stop,), name="paymaster-webhooks", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the thread (a send in flight finishes or times out first) and close the
        client this deliverer made. What is still pending stays in the outbox."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
            self._thread = None
        self.close()

    def close(self) -> None:
        if self._own_client:
            self._client.close()


def start_deliverer(authority: Authority, *, client: httpx.Client | None = None) -> WebhookDeliverer | None:
    """For the server's lifespan: start the webhook thread when ``[alerts] webhook`` is set
    (``None`` otherwise); call ``.stop()`` on shutdown, before closing the store. Safe in
    every worker process and every replica."""
    deliverer = WebhookDeliverer.from_settings(authority, client=client)
    if deliverer is not None:
        deliverer.start()
    return deliverer


def _retry_after(response: httpx.Response) -> float | None:
    if response.status_code not in (429, 503):
        return None
    value = response.headers.get("retry-after", "").strip()
    if value.isdigit():
        return float(value)
    return None
