"""What the authority answers, as typed, frozen dataclasses.

Money fields are :class:`decimal.Decimal`, parsed from the wire's decimal strings; no
amount ever passes through a float. Every object keeps the JSON it was built from in
``raw`` (not shown in its repr), so fields the server adds later stay reachable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from paymaster.errors import PaymasterError
from paymaster.money import Money

__all__ = [
    "Agent",
    "AmountLike",
    "AuditVerification",
    "Budget",
    "BudgetRemaining",
    "Commit",
    "LedgerEntry",
    "Principal",
    "ProtocolError",
    "Refund",
    "Release",
    "Reservation",
    "Task",
    "format_amount",
]

AmountLike = str | Decimal | int | Money
"""An amount the SDK accepts: a decimal string (``"0.02"``), a ``Decimal``, a whole number
or a :class:`paymaster.Money`. Never a float: ``0.1`` is not one tenth."""


class ProtocolError(PaymasterError):
    """The authority answered something that is not what PROTOCOL.md says it answers."""


def format_amount(value: AmountLike, *, field_name: str = "amount") -> str:
    """An amount as the wire carries it: a plain decimal string, no exponent.

    The server validates the value (sign, decimals, size); this only refuses what can
    never be an exact amount: floats, booleans, NaN and infinities.
    """
    if isinstance(value, bool | float):
        raise TypeError(f"{field_name} must be a decimal string or Decimal, not {type(value).__name__}")
    if isinstance(value, str):
        return value
    if isinstance(value, Money):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"{field_name} must be finite, not {value}")
        return format(value, "f")
    raise TypeError(f"{field_name} must be a decimal string or Decimal, not {type(value).__name__}")


def _decimal(value: Any, name: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ProtocolError(f"{name} should be a decimal string, got {type(value).__name__}")
    try:
        result = Decimal(value)
    except InvalidOperation as exc:
        raise ProtocolError(f"{name} {value!r} is not a decimal") from exc
    if not result.is_finite():
        raise ProtocolError(f"{name} {value!r} is not finite")
    return result


def _opt_decimal(value: Any, name: str) -> Decimal | None:
    return None if value is None else _decimal(value, name)


def _str(body: Mapping[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str):
        raise ProtocolError(f"the answer has no {name}")
    return value


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _obj(body: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise ProtocolError(f"expected a JSON object for {what}, got {type(body).__name__}")
    return body


@dataclass(frozen=True)
class Agent:
    """An agent as the authority stores it (never its private key)."""

    id: str
    name: str
    status: str
    public_key: str
    parent: str | None
    metadata: Mapping[str, Any]
    policy: Mapping[str, Any] | None
    policy_version: int
    created_at: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, body: Any) -> Agent:
        data = _obj(body, "an agent")
        policy = data.get("policy")
        return cls(
            id=_str(data, "id"),
            name=str(data.get("name", "")),
            status=str(data.get("status", "")),
            public_key=str(data.get("public_key", "")),
            parent=_opt_str(data.get("parent")),
            metadata=dict(data.get("metadata") or {}),
            policy=dict(policy) if isinstance(policy, Mapping) else None,
            policy_version=int(data.get("policy_version") or 0),
            created_at=_opt_str(data.get("created_at")),
            raw=dict(data),
        )


@dataclass(frozen=True)
class Budget:
    """One budget window: ``remaining = limit - spent - reserved`` (negative after an overrun)."""

    id: str
    kind: str | None
    owner: str | None
    scope: str | None
    limit: Decimal
    spent: Decimal
    reserved: Decimal
    remaining: Decimal
    used: Decimal | None
    currency: str | None
    period: str | None
    mode: str | None
    window_start: str | None = None
    window_end: str | None = None
    tz: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, body: Any) -> Budget:
        data = _obj(body, "a budget")
        return cls(
            id=_str(data, "id"),
            kind=_opt_str(data.get("kind")),
            owner=_opt_str(data.get("owner")),
            scope=_opt_str(data.get("scope")),
            limit=_decimal(data.get("limit"), "limit"),
            spent=_decimal(data.get("spent", "0"), "spent"),
            reserved=_decimal(data.get("reserved", "0"), "reserved"),
            remaining=_decimal(data.get("remaining"), "remaining"),
            used=_opt_decimal(data.get("used"), "used"),
            currency=_opt_str(data.get("currency")),
            period=_opt_str(data.get("period")),
            mode=_opt_str(data.get("mode")),
            window_start=_opt_str(data.get("window_start")),
            window_end=_opt_str(data.get("window_end")),
            tz=_opt_str(data.get("tz")),
            raw=dict(data),
        )


@dataclass(frozen=True)
class BudgetRemaining:
    """A budget on a reservation's path; ``remaining`` is known right after the reserve."""

    id: str
    remaining: Decimal | None = None


@dataclass(frozen=True)
class Reservation:
    """A hold: the answer to a reserve (``status`` ``held``) or to a reservation query."""

    reservation_id: str
    amount: Decimal
    status: str
    decision: str | None
    expires_at: str | None
    charged: Decimal | None = None
    estimated: bool = False
    overrun: bool = False
    currency: str | None = None
    budgets: tuple[BudgetRemaining, ...] = ()
    warnings: tuple[str, ...] = ()
    ledger_entry_id: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def id(self) -> str:
        return self.reservation_id

    @classmethod
    def from_json(cls, body: Any) -> Reservation:
        data = _obj(body, "a reservation")
        budgets: list[BudgetRemaining] = []
        for item in data.get("budgets") or ():
            if isinstance(item, Mapping):
                budgets.append(
                    BudgetRemaining(str(item.get("id")), _opt_decimal(item.get("remaining"), "remaining"))
                )
            else:
                budgets.append(BudgetRemaining(str(item)))
        return cls(
            reservation_id=_str(data, "reservation_id"),
            amount=_decimal(data.get("amount"), "amount"),
            status=str(data.get("status") or "held"),
            decision=_opt_str(data.get("decision")),
            expires_at=_opt_str(data.get("expires_at")),
            charged=_opt_decimal(data.get("charged"), "charged"),
            estimated=bool(data.get("estimated", False)),
            overrun=bool(data.get("overrun", False)),
            currency=_opt_str(data.get("currency")),
            budgets=tuple(budgets),
            warnings=tuple(str(w) for w in data.get("warnings") or ()),
            ledger_entry_id=_opt_str(data.get("ledger_entry_id")),
            raw=dict(data),
        )


@dataclass(frozen=True)
class Commit:
    """A settled hold: ``charged`` spent, ``released`` given back."""

    reservation_id: str
    charged: Decimal
    released: Decimal
    overrun: bool
    estimated: bool
    ledger_entry_id: str | None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, body: Any) -> Commit:
        data = _obj(body, "a commit")
        return cls(
            reservation_id=_str(data, "reservation_id"),
            charged=_decimal(data.get("charged"), "charged"),
            released=_decimal(data.get("released", "0"), "released"),
            overrun=bool(data.get("overrun", False)),
            estimated=bool(data.get("estimated", False)),
            ledger_entry_id=_opt_str(data.get("ledger_entry_id")),
            raw=dict(data),
        )


@dataclass(frozen=True)
class Release:
    """A hold given back in full."""

    reservation_id: str
    released: Decimal
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, body: Any) -> Release:
        data = _obj(body, "a release")
        return cls(
            reservation_id=_str(data, "reservation_id"),
            released=_decimal(data.get("released", "0"), "released"),
            raw=dict(data),
        )


@dataclass(frozen=True)
class Refund:
    refund_id: str
    amount: Decimal
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, body: Any) -> Refund:
        data = _obj(body, "a refund")
        return cls(
            refund_id=_str(data, "refund_id"), amount=_decimal(data.get("amount"), "amount"), raw=dict(data)
        )


@dataclass(frozen=True)
class Task:
    """A delegation budget (period ``total``)."""

    task_id: str
    budget_id: str
    limit: Decimal
    parent_task: str | None
    agents: tuple[str, ...]
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def id(self) -> str:
        return self.task_id

    @classmethod
    def from_json(cls, body: Any) -> Task:
        data = _obj(body, "a task")
        task_id = _str(data, "task_id")
        return cls(
            task_id=task_id,
            budget_id=str(data.get("budget_id") or task_id),
            limit=_decimal(data.get("limit"), "limit"),
            parent_task=_opt_str(data.get("parent_task")),
            agents=tuple(str(a) for a in data.get("agents") or ()),
            raw=dict(data),
        )


@dataclass(frozen=True)
class Principal:
    """A team or tenant above agents; ``created`` is true when the PUT made it."""

    name: str
    parent: str | None
    policy: Mapping[str, Any] | None
    created: bool
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, body: Any, *, created: bool = False) -> Principal:
        data = _obj(body, "a principal")
        name = data.get("principal", data.get("name"))
        if not isinstance(name, str):
            raise ProtocolError("the answer names no principal")
        policy = data.get("policy")
        return cls(
            name=name,
            parent=_opt_str(data.get("parent")),
            policy=dict(policy) if isinstance(policy, Mapping) else None,
            created=created,
            raw=dict(data),
        )


@dataclass(frozen=True)
class LedgerEntry:
    """One ledger line: a charge (``total`` > 0) or a refund (``total`` < 0)."""

    id: str
    kind: str | None
    time: str | None
    agent_id: str | None
    connector: str | None
    total: Decimal
    currency: str | None
    reservation_id: str | None
    refunded: Decimal | None
    task: str | None
    session: str | None
    estimated: bool
    overrun: bool
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, body: Any) -> LedgerEntry:
        data = _obj(body, "a ledger entry")
        return cls(
            id=_str(data, "id"),
            kind=_opt_str(data.get("kind")),
            time=_opt_str(data.get("time")),
            agent_id=_opt_str(data.get("agent_id")),
            connector=_opt_str(data.get("connector")),
            total=_decimal(data.get("total"), "total"),
            currency=_opt_str(data.get("currency")),
            reservation_id=_opt_str(data.get("reservation_id")),
            refunded=_opt_decimal(data.get("refunded"), "refunded"),
            task=_opt_str(data.get("task")),
            session=_opt_str(data.get("session")),
            estimated=bool(data.get("estimated", False)),
            overrun=bool(data.get("overrun", False)),
            raw=dict(data),
        )


@dataclass(frozen=True)
class AuditVerification:
    """The audit chain check: ``ok``, or where it first breaks and why."""

    ok: bool
    events: int | None = None
    head_seq: int | None = None
    first_bad_seq: int | None = None
    reason: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, body: Any) -> AuditVerification:
        data = _obj(body, "an audit verification")

        def opt_int(name: str) -> int | None:
            value = data.get(name)
            return None if value is None else int(value)

        return cls(
            ok=bool(data.get("ok")),
            events=opt_int("events"),
            head_seq=opt_int("head_seq"),
            first_bad_seq=opt_int("first_bad_seq"),
            reason=_opt_str(data.get("reason")),
            raw=dict(data),
        )
