"""Audit events: CloudEvents 1.0 over RFC 8785 canonical JSON, hash-chained, signed.

Each event carries the extensions ``seq`` and ``prevhash``; its hash is SHA-256 over the
canonical JSON of the whole event (extensions included). The authority signs a head
record ``(seq, hash)`` in the same transaction as the events it covers, so verification
checks the head too and a truncated tail is caught. Pure: no I/O, clock passed in.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

GENESIS_HASH = "0" * 64
EVENT_PREFIX = "dev.paymaster."

EVENT_TYPES = frozenset(
    {
        "dev.paymaster.reservation.allowed",
        "dev.paymaster.reservation.denied",
        "dev.paymaster.reservation.committed",
        "dev.paymaster.reservation.released",
        "dev.paymaster.reservation.expired",
        "dev.paymaster.refund.created",
        "dev.paymaster.budget.funded",
        "dev.paymaster.budget.threshold_crossed",
        "dev.paymaster.budget.tightened",
        "dev.paymaster.agent.created",
        "dev.paymaster.agent.frozen",
        "dev.paymaster.agent.unfrozen",
        "dev.paymaster.agent.revoked",
        "dev.paymaster.agent.velocity_tripped",
        "dev.paymaster.policy.changed",
        "dev.paymaster.task.created",
        "dev.paymaster.principal.changed",
    }
)


def canonical(obj: Any) -> bytes:
    """RFC 8785 canonical JSON bytes."""
    out: bytes = rfc8785.dumps(obj)
    return out


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def iso_time(at: datetime) -> str:
    """RFC 3339 UTC with microseconds and a ``Z``."""
    return at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def build_event(
    *,
    authority_id: str,
    event_id: str,
    event_type: str,
    subject: str,
    data: Mapping[str, Any],
    at: datetime,
    seq: int,
    prevhash: str,
) -> dict[str, Any]:
    """A chained CloudEvent (without its own hash, which is derived)."""
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {event_type}")
    return {
        "specversion": "1.0",
        "id": event_id,
        "source": f"paymaster://{authority_id}",
        "type": event_type,
        "time": iso_time(at),
        "subject": subject,
        "datacontenttype": "application/json",
        "data": dict(data),
        "seq": seq,
        "prevhash": prevhash,
    }


def event_hash(event: Mapping[str, Any]) -> str:
    body = {k: v for k, v in event.items() if k != "sig"}
    return hashlib.sha256(canonical(body)).hexdigest()


def head_message(seq: int, head_hash: str) -> bytes:
    return canonical({"seq": seq, "hash": head_hash})


def sign_head(key: Ed25519PrivateKey, seq: int, head_hash: str) -> str:
    return b64url(key.sign(head_message(seq, head_hash)))


def sign_bytes(key: Ed25519PrivateKey, body: bytes) -> str:
    return b64url(key.sign(body))


@dataclass(frozen=True, slots=True)
class Head:
    seq: int
    hash: str
    sig: str


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    events: int
    head_seq: int
    first_bad_seq: int | None = None
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        if self.ok:
            return {"ok": True, "events": self.events, "head_seq": self.head_seq}
        return {
            "ok": False,
            "events": self.events,
            "head_seq": self.head_seq,
            "first_bad_seq": self.first_bad_seq,
            "reason": self.reason,
        }


def verify_chain(
    events: Iterable[Mapping[str, Any]],
    head: Head | None,
    public_keys: Iterable[Ed25519PublicKey],
    *,
    sink_heads: Iterable[Head] = (),
) -> VerifyResult:
    """Walk the chain: contiguous ``seq`` from 1, each ``prevhash`` the previous hash,
    the last hash equal to the signed head. Reports the first event that breaks it.

    An edited event breaks the next event's ``prevhash`` (or the head when it is last); a
    dropped, reordered or inserted event breaks ``seq`` contiguity or ``prevhash``. Heads
    exported to a sink outside the database must all lie on the chain, so a tail deleted
    together with its signed head is still caught.
    """
    keys = list(public_keys)
    expected_seq = 1
    prev = GENESIS_HASH
    hashes: dict[int, str] = {}
    count = 0
    for ev in events:
        seq = ev.get("seq")
        if seq != expected_seq:
            bad = expected_seq if isinstance(seq, int) and seq > expected_seq else seq
            return VerifyResult(
                False,
                count,
                expected_seq - 1,
                bad if isinstance(bad, int) else expected_seq,
                f"sequence broken: expected {expected_seq}, found {seq}",
            )
        if ev.get("prevhash") != prev:
            return VerifyResult(
                False,
                count,
                expected_seq - 1,
                expected_seq,
                "prevhash does not match the previous event (edited, dropped or reordered)",
            )
        prev = event_hash(ev)
        hashes[expected_seq] = prev
        count += 1
        expected_seq += 1
    last_seq = expected_seq - 1
    if head is None:
        if last_seq == 0:
            return VerifyResult(True, 0, 0)
        return VerifyResult(False, count, last_seq, 1, "no signed head covers the events")
    if not _signature_ok(keys, head_message(head.seq, head.hash), head.sig):
        return VerifyResult(False, count, last_seq, head.seq, "head signature invalid")
    if head.seq != last_seq:
        bad = min(head.seq, last_seq) + 1
        return VerifyResult(
            False, count, last_seq, bad, f"signed head is at seq {head.seq} but the chain ends at {last_seq}"
        )
    if last_seq and head.hash != prev:
        return VerifyResult(
            False, count, last_seq, last_seq, "last event does not match the signed head (edited)"
        )
    for sink_head in sink_heads:
        if not _signature_ok(keys, head_message(sink_head.seq, sink_head.hash), sink_head.sig):
            return VerifyResult(False, count, last_seq, sink_head.seq, "exported head signature invalid")
        if sink_head.seq > last_seq:
            return VerifyResult(
                False,
                count,
                last_seq,
                last_seq + 1,
                f"exported head at seq {sink_head.seq} is past the end of the chain",
            )
        if hashes.get(sink_head.seq) != sink_head.hash:
            return VerifyResult(
                False, count, last_seq, sink_head.seq, "exported head does not match the chain"
            )
    return VerifyResult(True, count, last_seq)


def _signature_ok(keys: list[Ed25519PublicKey], message: bytes, sig: str) -> bool:
    try:
        raw = b64url_decode(sig)
    except ValueError:
        return False
    for key in keys:
        try:
            key.verify(raw, message)
        except InvalidSignature:
            continue
        return True
    return False
