"""Audit events: CloudEvents 1.0 over RFC 8785 canonical JSON, hash-chained, signed.

Each event carries the extensions ``seq`` and ``prevhash``; its hash is SHA-256 over the
canonical JSON of the whole event (extensions included). The authority signs a head
record ``(seq, hash)`` in the same transaction as the events it covers, so verification
checks the head too and a truncated tail is caught. Pure: no I/O, clock passed in.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

GENESIS_HASH = "0" * 64
# The one chain of a store whose writers are serialised (SQLite); a multi-writer store (PostgreSQL)
# keeps one chain per writer, each named in its events' ``chain`` extension and sealed by its own head.
MAIN_CHAIN = "main"
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


_SAFE_INT = 2**53


def _json_compatible(obj: Any) -> bool:
    """True when the standard library's sorted, compact JSON of ``obj`` is byte for byte
    its RFC 8785 form: no floats, integers within I-JSON's exact range, and ASCII keys (so
    that sorting by code point equals RFC 8785's sorting by UTF-16 code unit). Strings need
    no check: both escape exactly the control characters, ``"`` and ``\\``, in lower-case
    hex, and leave every other character as UTF-8."""
    if isinstance(obj, str) or obj is None or obj is True or obj is False:
        return True
    if isinstance(obj, int):
        return -_SAFE_INT < obj < _SAFE_INT
    if isinstance(obj, dict):
        return all(isinstance(k, str) and k.isascii() and _json_compatible(v) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return all(_json_compatible(v) for v in obj)
    return False


def canonical(obj: Any) -> bytes:
    """RFC 8785 canonical JSON bytes.

    The audit chain hashes every event, so this is on the hot path: events made of strings,
    booleans and exact integers under ASCII keys (all of ours) take the C encoder of the
    standard library, whose output for them is identical (a property test pins it); anything
    else goes through the ``rfc8785`` package."""
    if _json_compatible(obj):
        try:
            return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            pass  # a lone surrogate: let rfc8785 refuse it the same way
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
    chain: str | None = None,
) -> dict[str, Any]:
    """A chained CloudEvent (without its own hash, which is derived). ``chain`` names the
    chain the event belongs to when a store keeps several (then ``seq`` counts within it)."""
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {event_type}")
    event = {
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
    if chain is not None:
        event["chain"] = chain
    return event


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
    chain: str = MAIN_CHAIN


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    events: int
    head_seq: int
    first_bad_seq: int | None = None
    reason: str | None = None
    chain: str | None = None  # the chain that broke, when a store keeps several
    chains: int = 1

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any]
        if self.ok:
            out = {"ok": True, "events": self.events, "head_seq": self.head_seq}
        else:
            out = {
                "ok": False,
                "events": self.events,
                "head_seq": self.head_seq,
                "first_bad_seq": self.first_bad_seq,
                "reason": self.reason,
            }
        if self.chain is not None:
            out["chain"] = self.chain
        if self.chains != 1:
            out["chains"] = self.chains
        return out


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
    stream = iter(events)
    for ev in stream:
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
                _departure(ev, expected_seq, hashes, next(stream, None), head),
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


def _departure(
    ev: Mapping[str, Any],
    seq: int,
    hashes: Mapping[int, str],
    following: Mapping[str, Any] | None,
    head: Head | None,
) -> int:
    """The first event that a broken link between ``seq - 1`` and ``seq`` leaves untrusted.

    The link alone cannot tell which side changed; its neighbours can. When ``ev`` names an
    earlier event as its predecessor, the events after that one were inserted. When ``ev`` is
    still confirmed by what follows it (the next event's ``prevhash``, or the signed head), it
    is intact and the event before it was edited. Otherwise ``ev`` itself changed.
    """
    earlier = next((s for s, h in hashes.items() if h == ev.get("prevhash")), None)
    if earlier is not None:
        return earlier + 1
    own = event_hash(ev)
    if following is not None:
        confirmed = following.get("prevhash") == own
    else:
        confirmed = head is not None and head.hash == own
    return seq - 1 if confirmed and seq > 1 else seq


def verify_chains(
    chains: Iterable[tuple[str, Head | None, Iterable[Mapping[str, Any]]]],
    public_keys: Iterable[Ed25519PublicKey],
    *,
    sink_heads: Iterable[Head] = (),
    unsealed: Mapping[str, int] | None = None,
    total_events: int | None = None,
) -> VerifyResult:
    """Verify each chain ``(name, signed head, the events its head covers, in seq order)``
    against its own head, and the exported heads against the chains they name. One chain named
    ``main`` gives :func:`verify_chain`'s answer. With several, ``events`` and ``head_seq`` add
    up over the chains and a failure names its chain. ``unsealed`` maps each chain holding
    events that no signed head covers (appended after it, or a head deleted or rolled back) to
    the first such seq; the store reads it in one snapshot, so live writers raise no alarm.
    ``total_events``, the number of events the store held when it read the chains (same
    snapshot), catches events that no verified chain accounts for."""
    keys = list(public_keys)
    exported: dict[str, list[Head]] = {}
    for sink_head in sink_heads:
        exported.setdefault(sink_head.chain, []).append(sink_head)
    items = list(chains)
    single = len(items) == 1 and items[0][0] == MAIN_CHAIN
    count = covered = 0
    for name, head, events in items:
        result = verify_chain(events, head, keys, sink_heads=exported.pop(name, ()))
        if not result.ok:
            if single:
                return result
            return VerifyResult(
                False,
                count + result.events,
                result.head_seq,
                result.first_bad_seq,
                f"chain {name}: {result.reason}",
                chain=name,
                chains=len(items),
            )
        count += result.events
        covered += result.head_seq
    n_chains = 1 if single else len(items)
    if exported:
        name = sorted(exported)[0]
        return VerifyResult(
            False,
            count,
            covered,
            1,
            f"exported heads name chain {name}, which the store does not hold (deleted with its head?)",
            chain=name,
            chains=n_chains,
        )
    if unsealed:
        name = sorted(unsealed)[0]
        reason = f"the events from seq {unsealed[name]} on are not covered by a signed head"
        return VerifyResult(
            False,
            count,
            covered,
            unsealed[name],
            reason if name == MAIN_CHAIN and single else f"chain {name}: {reason}",
            chain=None if name == MAIN_CHAIN and single else name,
            chains=n_chains,
        )
    if total_events is not None and total_events != count:
        return VerifyResult(
            False,
            count,
            covered,
            None,
            f"{total_events - count} events belong to no signed chain head (a head deleted?)",
            chains=n_chains,
        )
    return VerifyResult(True, count, covered, chains=n_chains)


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
