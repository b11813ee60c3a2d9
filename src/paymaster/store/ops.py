"""The ledger's verbs, written once against :class:`~paymaster.store.base.Tx`.

Each verb runs inside one transaction with the audit events it records. A refusal is not
an exception here: it is an :class:`Answer` with an error body, so the denial's audit
event and idempotency record commit with it. Exceptions mean "roll this operation back".
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from fractions import Fraction
from functools import lru_cache
from typing import Any

from paymaster.core.audit import EVENT_PREFIX, EVENT_TYPES, iso_time
from paymaster.errors import InvalidRequest, SpendDenied
from paymaster.ids import new_id
from paymaster.money import format_nanos, parse_nanos
from paymaster.store.base import Row, Tx

EXPIRE_BATCH = 200


class StaleSnapshot(Exception):
    """The policy or status snapshot a command was planned with has changed: re-plan."""


@dataclass(frozen=True, slots=True)
class Answer:
    """What a verb answers: an HTTP status and a JSON body (an error body when >= 400)."""

    status: int
    body: dict[str, Any]

    @property
    def ok(self) -> bool:
        return self.status < 400

    def to_json(self) -> str:
        return json.dumps({"status": self.status, "body": self.body}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Answer:
        obj = json.loads(text)
        return cls(int(obj["status"]), obj["body"])

    @classmethod
    def error(cls, exc: SpendDenied) -> Answer:
        return cls(exc.status, exc.to_body())


@dataclass(frozen=True, slots=True)
class BudgetSpec:
    """One budget on a call's path, in the window the call falls in."""

    id: str
    kind: str  # wallet | cap | task
    owner: str
    scope: str
    period: str
    window: str
    mode: str = "enforce"
    limit: int | None = None  # None: the stored limit (wallets, tasks)
    tz: str | None = None
    window_start: str | None = None
    window_end: str | None = None
    thresholds: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Idem:
    scope: str
    key: str
    body_hash: str


@dataclass(frozen=True, slots=True)
class ReserveCommand:
    reservation_id: str
    decision_id: str
    principal: str
    agent_id: str | None
    connector: str
    category: str | None
    amount: int
    currency: str
    decision: str  # allow | allow_with_caps
    path: tuple[BudgetSpec, ...]
    expires_at: datetime
    idem: Idem | None = None
    jti: tuple[str, int] | None = None
    versions: tuple[tuple[str, int], ...] = ()  # (owner, state version) the plan was made with
    session: str | None = None
    task: str | None = None
    input_hash: str | None = None
    tier_key: str | None = None
    quantity: str | None = None
    unit: str | None = None
    request_sent: bool = False
    loop_guards: tuple[tuple[str, int, int], ...] = ()  # (fingerprint, window seconds, max repeats)
    metadata: Mapping[str, Any] = field(default_factory=dict)
    extra_response: Mapping[str, Any] = field(default_factory=dict)
    denial: SpendDenied | None = None  # refused before the budgets: record it, hold nothing


@dataclass(frozen=True, slots=True)
class CommitCommand:
    reservation_id: str
    amount: int | None  # None: the held amount
    estimated: bool = False
    quantity: str | None = None
    unit: str | None = None
    idem: Idem | None = None
    jti: tuple[str, int] | None = None
    reason: str | None = None
    owner_agent: str | None = None  # an agent settling: only its own reservations


# ---------------------------------------------------------------- helpers


def now_text(tx: Tx) -> str:
    """The transaction's time as stored text, formatted once per transaction."""
    cached: str | None = getattr(tx, "_now_text", None)
    if cached is None:
        cached = iso_time(tx.now)
        setattr(tx, "_now_text", cached)  # noqa: B010 - Tx is a protocol; the adapters are plain objects
    return cached


def spend_jti(tx: Tx, jti: tuple[str, int]) -> bool:
    """Spend a token id; False when it was already spent (a replay)."""
    changed = tx.execute("INSERT INTO spent_jti (jti, exp) VALUES (?, ?) ON CONFLICT (jti) DO NOTHING", jti)
    return changed == 1


def idem_lookup(tx: Tx, idem: Idem | None) -> Answer | None:
    if idem is None:
        return None
    row = tx.one(
        "SELECT body_hash, status, response FROM idempotency WHERE scope = ? AND key = ?",
        (idem.scope, idem.key),
    )
    if row is None:
        return None
    if row["body_hash"] != idem.body_hash:
        return Answer(
            409,
            {
                "error": {
                    "code": "idempotency_conflict",
                    "message": "this idempotency key was used with a different request body",
                    "decision_id": None,
                    "budget_id": None,
                    "requested": None,
                    "remaining": None,
                    "currency": None,
                    "retryable": False,
                }
            },
        )
    return Answer(int(row["status"]), json.loads(row["response"]))


def idem_store(tx: Tx, idem: Idem | None, answer: Answer) -> None:
    if idem is None:
        return
    tx.execute(
        "INSERT INTO idempotency (scope, key, body_hash, status, response, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (scope, key) DO NOTHING",
        (
            idem.scope,
            idem.key,
            idem.body_hash,
            answer.status,
            json.dumps(answer.body, separators=(",", ":")),
            now_text(tx),
        ),
    )


@lru_cache(maxsize=256)
def _threshold_fraction(text: str) -> Fraction:
    return Fraction(text)


@lru_cache(maxsize=256)
def _sorted_thresholds(thresholds: tuple[str, ...]) -> tuple[tuple[str, Fraction], ...]:
    return tuple(sorted(((t, _threshold_fraction(t)) for t in thresholds), key=lambda pair: pair[1]))


def budget_row(tx: Tx, budget_id: str) -> Row | None:
    return tx.one("SELECT * FROM budgets WHERE id = ?", (budget_id,))


def remaining_of(row: Row) -> int:
    return int(row["limit_n"]) - int(row["spent_n"]) - int(row["reserved_n"])


def used_reached(row: Row, threshold: str) -> bool:
    limit = int(row["limit_n"])
    used = int(row["spent_n"]) + int(row["reserved_n"])
    frac = _threshold_fraction(threshold)
    if limit <= 0:
        return used > 0
    return used * frac.denominator >= frac.numerator * limit


def used_text(row: Row) -> str:
    limit = int(row["limit_n"])
    used = int(row["spent_n"]) + int(row["reserved_n"])
    if limit <= 0:
        return "1.00" if used > 0 else "0.00"
    # two decimals, rounded up: the fraction an operator reads ("0.91")
    hundredths = -((-used * 100) // limit)
    sign = "-" if hundredths < 0 else ""
    whole, frac = divmod(abs(hundredths), 100)
    return f"{sign}{whole}.{frac:02d}"


def check_thresholds(
    tx: Tx, budget_id: str, thresholds: Sequence[str], outbox: bool, row: Row | None = None
) -> list[str]:
    """Record each newly crossed threshold once per budget window; return warnings.
    ``row`` is the budget as this transaction left it, when the caller has it already."""
    if not thresholds:
        return []
    if row is None:
        row = budget_row(tx, budget_id)
        if row is None:
            return []
    limit = int(row["limit_n"])
    used = int(row["spent_n"]) + int(row["reserved_n"])
    warnings: list[str] = []
    for threshold, frac in _sorted_thresholds(tuple(thresholds)):
        reached = used > 0 if limit <= 0 else used * frac.denominator >= frac.numerator * limit
        if not reached:
            break
        changed = tx.execute(
            "INSERT INTO thresholds_crossed (budget_id, threshold, crossed_at) VALUES (?, ?, ?)"
            " ON CONFLICT (budget_id, threshold) DO NOTHING",
            (budget_id, threshold, now_text(tx)),
        )
        if changed == 1:
            event = tx.emit(
                "dev.paymaster.budget.threshold_crossed",
                budget_id,
                {
                    "budget_id": budget_id,
                    "threshold": threshold,
                    "used": used_text(row),
                    "limit": format_nanos(int(row["limit_n"])),
                    "spent": format_nanos(int(row["spent_n"])),
                    "reserved": format_nanos(int(row["reserved_n"])),
                    "currency": row["currency"],
                },
            )
            if outbox:
                enqueue_webhook(tx, event)
        warnings = [f"low_balance; budget={budget_id}; used={used_text(row)}"]
    return warnings


def enqueue_webhook(tx: Tx, event: Mapping[str, Any]) -> None:
    tx.execute(
        "INSERT INTO outbox (event_id, body, next_attempt_at) VALUES (?, ?, ?)",
        (event["id"], json.dumps(event, separators=(",", ":")), now_text(tx)),
    )


# Enqueued for the webhook where they are emitted, whenever alerts are on; the types that
# ``[alerts] events`` names beyond these are enqueued by :class:`OutboxTx`.
ALWAYS_ALERTED = frozenset({"dev.paymaster.budget.threshold_crossed", "dev.paymaster.agent.velocity_tripped"})


def outbox_types(alerts: Mapping[str, Any]) -> frozenset[str]:
    """The event types ``[alerts] events`` adds to the webhook's (none without a webhook).
    A name may leave out the ``dev.paymaster.`` prefix; an unknown one is refused."""
    if not alerts.get("webhook"):
        return frozenset()
    names = alerts.get("events", [])
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise InvalidRequest("[alerts] events must be a list of event types")
    types = {n if n.startswith(EVENT_PREFIX) else EVENT_PREFIX + n for n in names}
    unknown = sorted(types - EVENT_TYPES)
    if unknown:
        raise InvalidRequest(f"[alerts] events: unknown event types {unknown}")
    return frozenset(types - ALWAYS_ALERTED)


class OutboxTx:
    """A transaction whose :meth:`emit` also enqueues the events of ``types`` for the
    webhook, in the same transaction (so an alert is sent if and only if its change commits)."""

    def __init__(self, tx: Tx, types: AbstractSet[str]) -> None:
        self._tx = tx
        self._types = types

    @property
    def now(self) -> datetime:
        return self._tx.now

    @property
    def dialect(self) -> str:
        return self._tx.dialect

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._tx.execute(sql, params)

    def one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        return self._tx.one(sql, params)

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return self._tx.all(sql, params)

    def savepoint(self) -> AbstractContextManager[None]:
        return self._tx.savepoint()

    def lock_budgets(self, budget_ids: Sequence[str]) -> None:
        self._tx.lock_budgets(budget_ids)

    def emit(self, event_type: str, subject: str, data: Mapping[str, Any]) -> dict[str, Any]:
        event = self._tx.emit(event_type, subject, data)
        if event_type in self._types:
            enqueue_webhook(self._tx, event)
        return event


def _path_json(path: Sequence[BudgetSpec]) -> str:
    return json.dumps([[b.id, list(b.thresholds)] for b in path], separators=(",", ":"))


def _path_from_json(text: str) -> list[tuple[str, list[str]]]:
    return [(str(item[0]), [str(t) for t in item[1]]) for item in json.loads(text)]


def _ensure_budget(tx: Tx, spec: BudgetSpec, currency: str) -> bool:
    """Make sure the window row exists; apply the policy's current limit and mode to it.
    Returns False when a wallet or task named on the path does not exist."""
    if spec.limit is None:
        return tx.one("SELECT 1 AS x FROM budgets WHERE id = ?", (spec.id,)) is not None
    tx.execute(
        "INSERT INTO budgets (id, kind, owner, scope, period, window, tz, mode, currency, limit_n,"
        " window_start, window_end, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (id) DO UPDATE SET limit_n = excluded.limit_n, mode = excluded.mode"
        " WHERE budgets.limit_n <> excluded.limit_n OR budgets.mode <> excluded.mode",
        (
            spec.id,
            spec.kind,
            spec.owner,
            spec.scope,
            spec.period,
            spec.window,
            spec.tz,
            spec.mode,
            currency,
            spec.limit,
            spec.window_start,
            spec.window_end,
            now_text(tx),
        ),
    )
    return True


def _check_versions(
    tx: Tx, versions: Sequence[tuple[str, int]], agent_version: tuple[str, int] | None
) -> None:
    for owner, version in versions:
        if agent_version is not None and owner == agent_version[0]:
            if agent_version[1] != version:
                raise StaleSnapshot(owner)
            continue
        if owner.startswith("ag_"):
            row = tx.one("SELECT state_version AS v FROM agents WHERE id = ?", (owner,))
        else:
            row = tx.one("SELECT policy_version AS v FROM principals WHERE name = ?", (owner,))
        current = int(row["v"]) if row is not None else 0
        if current != version:
            raise StaleSnapshot(owner)


def _agent_gate(tx: Tx, agent_id: str | None) -> tuple[Answer | None, tuple[str, int] | None]:
    """Step 2 of the order of checks, read inside the transaction so that a freeze takes
    effect on the very next reserve in every worker and replica. Also returns the agent's
    state version, for the snapshot check."""
    if agent_id is None:
        return None, None
    row = tx.one("SELECT status, state_version FROM agents WHERE id = ?", (agent_id,))
    if row is None:
        return _error(401, "agent_unknown", f"agent {agent_id} is not registered"), None
    version = (agent_id, int(row["state_version"]))
    if row["status"] == "revoked":
        return _error(401, "agent_revoked", f"agent {agent_id} is revoked"), version
    if row["status"] == "frozen":
        return _error(403, "agent_frozen", f"agent {agent_id} is frozen"), version
    return None, version


def _error(status: int, code: str, message: str, **fields: Any) -> Answer:
    body = {
        "code": code,
        "message": message,
        "decision_id": None,
        "budget_id": None,
        "requested": None,
        "remaining": None,
        "currency": None,
        "retryable": False,
    }
    body.update(fields)
    return Answer(status, {"error": body})


# ---------------------------------------------------------------- reserve


def reserve(tx: Tx, cmd: ReserveCommand, *, outbox: bool = False) -> Answer:
    if cmd.jti is not None and not spend_jti(tx, cmd.jti):
        return _error(401, "spend_token_replayed", "this spend token was already used")
    gate, agent_version = _agent_gate(tx, cmd.agent_id)
    if gate is not None:
        if gate.status != 401:
            _record_denial(tx, cmd, gate)
        return gate
    replay = idem_lookup(tx, cmd.idem)
    if replay is not None:
        return replay
    _check_versions(tx, cmd.versions, agent_version)
    if cmd.denial is not None:
        answer = Answer.error(cmd.denial)
        _record_denial(tx, cmd, answer)
        idem_store(tx, cmd.idem, answer)
        return answer
    loop = _loop_guard(tx, cmd)
    if loop is not None:
        _record_denial(tx, cmd, loop)
        idem_store(tx, cmd.idem, loop)
        return loop
    answer = _hold(tx, cmd, outbox, record=False)
    if answer.status == 402 and expire_due(tx, limit=EXPIRE_BATCH):
        # holds past their expiry never cause a false denial: expire them and try again
        answer = _hold(tx, cmd, outbox, record=False)
    if not answer.ok:
        _record_denial(tx, cmd, answer)
    idem_store(tx, cmd.idem, answer)
    return answer


def _loop_guard(tx: Tx, cmd: ReserveCommand) -> Answer | None:
    """Step 9: the same call repeated past a policy's loop guard within its window."""
    for fingerprint, window_seconds, max_repeats in cmd.loop_guards:
        since = iso_time(tx.now - timedelta(seconds=window_seconds))
        row = tx.one(
            "SELECT COUNT(*) AS n FROM loop_calls WHERE fingerprint = ? AND at > ?", (fingerprint, since)
        )
        if row is not None and int(row["n"]) >= max_repeats:
            return _error(
                429,
                "loop_detected",
                f"the same call was made {int(row['n'])} times in {window_seconds}s (limit {max_repeats})",
                decision_id=cmd.decision_id,
                requested=format_nanos(cmd.amount),
                currency=cmd.currency,
                retryable=True,
            )
    for fingerprint, window_seconds, _ in cmd.loop_guards:
        tx.execute(
            "DELETE FROM loop_calls WHERE fingerprint = ? AND at <= ?",
            (fingerprint, iso_time(tx.now - timedelta(seconds=window_seconds))),
        )
        tx.execute("INSERT INTO loop_calls (fingerprint, at) VALUES (?, ?)", (fingerprint, now_text(tx)))
    return None


def _hold(tx: Tx, cmd: ReserveCommand, outbox: bool, *, record: bool = True) -> Answer:
    held: list[tuple[BudgetSpec, Row]] = []
    shadow_denials: list[str] = []
    denial: Answer | None = None
    try:
        with tx.savepoint():
            # in id order: on PostgreSQL the upsert locks the row, so every writer takes them in one order
            by_id = sorted(cmd.path, key=lambda s: s.id)
            ensured = {s.id for s in by_id if _ensure_budget(tx, s, cmd.currency)}
            present = [spec for spec in cmd.path if spec.id in ensured]
            if not any(spec.kind != "task" for spec in present):
                denial = _error(
                    403,
                    "no_budget_configured",
                    "no wallet and no cap applies to this call: fund the agent or set a cap",
                    decision_id=cmd.decision_id,
                    requested=format_nanos(cmd.amount),
                    currency=cmd.currency,
                )
                raise _Rollback
            tx.lock_budgets([spec.id for spec in present])
            for spec in present:
                row = tx.one(
                    "UPDATE budgets SET reserved_n = reserved_n + ? WHERE id = ?"
                    " AND (mode = 'shadow' OR limit_n - spent_n - reserved_n >= ?)"
                    " RETURNING id, limit_n, spent_n, reserved_n, mode, currency",
                    (cmd.amount, spec.id, cmd.amount),
                )
                if row is None:
                    current = budget_row(tx, spec.id)
                    remaining = remaining_of(current) if current is not None else 0
                    code = "balance_insufficient" if spec.kind == "wallet" else "policy_cap_exceeded"
                    what = "the wallet" if spec.kind == "wallet" else f"budget {spec.id}"
                    denial = _error(
                        402,
                        code,
                        f"{what} cannot hold {format_nanos(cmd.amount)} {cmd.currency}",
                        decision_id=cmd.decision_id,
                        budget_id=spec.id,
                        requested=format_nanos(cmd.amount),
                        remaining=format_nanos(remaining),
                        currency=cmd.currency,
                    )
                    raise _Rollback
                if row["mode"] == "shadow" and remaining_of(row) < 0:
                    shadow_denials.append(spec.id)
                held.append((spec, row))
    except _Rollback:
        assert denial is not None
        if record:
            _record_denial(tx, cmd, denial)
        return denial

    if cmd.tier_key is not None:
        tx.execute(
            "INSERT INTO tier_counters (tier_key, calls) VALUES (?, 1)"
            " ON CONFLICT (tier_key) DO UPDATE SET calls = tier_counters.calls + 1",
            (cmd.tier_key,),
        )
    path = [spec for spec, _ in held]
    tx.execute(
        "INSERT INTO reservations (id, agent_id, principal, connector, category, status, decision, currency,"
        " amount_n, request_sent, budgets, session, task, input_hash, tier_key, quantity, unit, metadata,"
        " created_at, expires_at) VALUES (?, ?, ?, ?, ?, 'held', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            cmd.reservation_id,
            cmd.agent_id,
            cmd.principal,
            cmd.connector,
            cmd.category,
            cmd.decision,
            cmd.currency,
            cmd.amount,
            int(cmd.request_sent),
            _path_json(path),
            cmd.session,
            cmd.task,
            cmd.input_hash,
            cmd.tier_key,
            cmd.quantity,
            cmd.unit,
            json.dumps(dict(cmd.metadata), separators=(",", ":")),
            now_text(tx),
            iso_time(cmd.expires_at),
        ),
    )
    data: dict[str, Any] = {
        "decision_id": cmd.decision_id,
        "reservation_id": cmd.reservation_id,
        "decision": cmd.decision,
        "agent_id": cmd.agent_id,
        "principal": cmd.principal,
        "connector": cmd.connector,
        "category": cmd.category,
        "amount": format_nanos(cmd.amount),
        "currency": cmd.currency,
        "budgets": [spec.id for spec in path],
        "session": cmd.session,
        "task": cmd.task,
        "input_hash": cmd.input_hash,
        "expires_at": iso_time(cmd.expires_at),
    }
    if shadow_denials:
        data["shadow_denials"] = shadow_denials
    tx.emit("dev.paymaster.reservation.allowed", cmd.reservation_id, data)
    warnings: list[str] = []
    budgets = []
    # each row is as this transaction leaves it: no budget is updated twice in one reserve
    for spec, row in held:
        warnings.extend(check_thresholds(tx, spec.id, spec.thresholds, outbox, row))
        budgets.append({"id": spec.id, "remaining": format_nanos(remaining_of(row)), "mode": row["mode"]})
    body: dict[str, Any] = {
        "reservation_id": cmd.reservation_id,
        "decision": cmd.decision,
        "amount": format_nanos(cmd.amount),
        "currency": cmd.currency,
        "expires_at": iso_time(cmd.expires_at),
        "budgets": budgets,
        "warnings": warnings,
        "decision_id": cmd.decision_id,
    }
    if shadow_denials:
        body["shadow_denials"] = shadow_denials
    body.update(cmd.extra_response)
    return Answer(201, body)


class _Rollback(Exception):
    pass


def _record_denial(tx: Tx, cmd: ReserveCommand, answer: Answer) -> None:
    err = answer.body["error"]
    tx.emit(
        "dev.paymaster.reservation.denied",
        cmd.decision_id,
        {
            "decision_id": cmd.decision_id,
            "decision": "deny",
            "reason_code": err["code"],
            "agent_id": cmd.agent_id,
            "principal": cmd.principal,
            "connector": cmd.connector,
            "category": cmd.category,
            "requested": format_nanos(cmd.amount),
            "currency": cmd.currency,
            "budget_id": err.get("budget_id"),
            "session": cmd.session,
            "task": cmd.task,
            "input_hash": cmd.input_hash,
        },
    )


# ---------------------------------------------------------------- settle


def _reservation(tx: Tx, reservation_id: str) -> Row | None:
    return tx.one("SELECT * FROM reservations WHERE id = ?", (reservation_id,))


def _not_found(what: str) -> Answer:
    return _error(404, "not_found", f"no such {what}")


def _settled(res: Row) -> Answer:
    return _error(409, "reservation_settled", f"reservation {res['id']} is already {res['status']}")


def _expired(res: Row) -> Answer:
    return _error(409, "reservation_expired", f"reservation {res['id']} expired at {res['expires_at']}")


def _is_due(tx: Tx, res: Row) -> bool:
    return res["status"] == "held" and str(res["expires_at"]) <= now_text(tx)


def commit(tx: Tx, cmd: CommitCommand, *, outbox: bool = False) -> Answer:
    if cmd.jti is not None and not spend_jti(tx, cmd.jti):
        return _error(401, "spend_token_replayed", "this spend token was already used")
    res = _reservation(tx, cmd.reservation_id)
    if res is None or (cmd.owner_agent is not None and res["agent_id"] != cmd.owner_agent):
        return _not_found("reservation")
    replay = idem_lookup(tx, cmd.idem)
    if replay is not None:
        return replay
    if _is_due(tx, res):
        expire_one(tx, res, outbox=outbox)
        answer = _expired(res)
    elif res["status"] == "expired":
        answer = _expired(res)
    elif res["status"] != "held":
        answer = _settled(res)
    else:
        amount = int(res["amount_n"]) if cmd.amount is None else cmd.amount
        answer = settle(
            tx,
            res,
            amount,
            estimated=cmd.estimated,
            status="committed",
            quantity=cmd.quantity,
            unit=cmd.unit,
            reason=cmd.reason,
            outbox=outbox,
        )
    idem_store(tx, cmd.idem, answer)
    return answer


def settle(
    tx: Tx,
    res: Row,
    amount: int,
    *,
    estimated: bool,
    status: str,
    quantity: str | None = None,
    unit: str | None = None,
    reason: str | None = None,
    outbox: bool = False,
) -> Answer:
    """Charge ``amount`` against a held reservation and release what is left of the hold."""
    held = int(res["amount_n"])
    overrun = amount > held
    path = _path_from_json(str(res["budgets"]))
    tx.lock_budgets([bid for bid, _ in path])
    after: dict[str, Row] = {}
    for budget_id, _ in path:
        row = tx.one(
            "UPDATE budgets SET reserved_n = reserved_n - ?, spent_n = spent_n + ? WHERE id = ?"
            " RETURNING limit_n, spent_n, reserved_n, currency",
            (held, amount, budget_id),
        )
        if row is not None:
            after[budget_id] = row
    quantity = quantity or res["quantity"] or "1"
    unit = unit or res["unit"] or "call"
    entry_id = new_id("le_")
    unit_cost = _unit_cost(amount, quantity)
    tx.execute(
        "INSERT INTO ledger (id, kind, time, agent_id, principal, connector, category, input_hash,"
        " quantity, unit,"
        " unit_cost, total_n, currency, reservation_id, task, session, budgets, estimated, overrun, reason)"
        " VALUES (?, 'charge', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            entry_id,
            now_text(tx),
            res["agent_id"],
            res["principal"],
            res["connector"],
            res["category"],
            res["input_hash"],
            quantity,
            unit,
            unit_cost,
            amount,
            res["currency"],
            res["id"],
            res["task"],
            res["session"],
            json.dumps([bid for bid, _ in path]),
            int(estimated),
            int(overrun),
            reason,
        ),
    )
    tx.execute(
        "UPDATE reservations SET status = ?, charged_n = ?, estimated = ?, overrun = ?, settled_at = ?,"
        " ledger_entry_id = ? WHERE id = ?",
        (status, amount, int(estimated), int(overrun), now_text(tx), entry_id, res["id"]),
    )
    released = max(held - amount, 0)
    event_type = (
        "dev.paymaster.reservation.committed"
        if status == "committed"
        else "dev.paymaster.reservation.expired"
    )
    tx.emit(
        event_type,
        str(res["id"]),
        {
            "reservation_id": res["id"],
            "ledger_entry_id": entry_id,
            "time": now_text(tx),
            "agent_id": res["agent_id"],
            "principal": res["principal"],
            "connector": res["connector"],
            "category": res["category"],
            "input_hash": res["input_hash"],
            "quantity": quantity,
            "unit": unit,
            "unit_cost": unit_cost,
            "total": format_nanos(amount),
            "held": format_nanos(held),
            "released": format_nanos(released),
            "currency": res["currency"],
            "decision": res["decision"],
            "reason_code": reason,
            "estimated": estimated,
            "overrun": overrun,
            "budgets": [bid for bid, _ in path],
            "task": res["task"],
            "session": res["session"],
        },
    )
    for budget_id, thresholds in path:
        if budget_id in after:
            check_thresholds(tx, budget_id, thresholds, outbox, after[budget_id])
    return Answer(
        200,
        {
            "reservation_id": res["id"],
            "agent_id": res["agent_id"],
            "charged": format_nanos(amount),
            "released": format_nanos(released),
            "overrun": overrun,
            "estimated": estimated,
            "ledger_entry_id": entry_id,
            "currency": res["currency"],
        },
    )


def _unit_cost(total: int, quantity: str) -> str:
    """``total / quantity`` as an exact decimal string (nine places, rounded up)."""
    try:
        qty = Fraction(quantity)
    except (ValueError, ZeroDivisionError):
        return format_nanos(total)
    if qty <= 0:
        return format_nanos(total)
    per = Fraction(total, 1) / qty
    nanos = -((-per.numerator) // per.denominator)
    return format_nanos(nanos)


def release(
    tx: Tx,
    reservation_id: str,
    reason: str | None,
    *,
    jti: tuple[str, int] | None = None,
    owner_agent: str | None = None,
) -> Answer:
    if jti is not None and not spend_jti(tx, jti):
        return _error(401, "spend_token_replayed", "this spend token was already used")
    res = _reservation(tx, reservation_id)
    if res is None or (owner_agent is not None and res["agent_id"] != owner_agent):
        return _not_found("reservation")
    if res["status"] == "released":
        return Answer(200, {"reservation_id": res["id"], "released": format_nanos(int(res["amount_n"]))})
    if _is_due(tx, res):
        expire_one(tx, res)
        return _expired(res)
    if res["status"] == "expired":
        return _expired(res)
    if res["status"] != "held":
        return _settled(res)
    return _release_hold(tx, res, "released", reason)


def _release_hold(tx: Tx, res: Row, status: str, reason: str | None) -> Answer:
    held = int(res["amount_n"])
    path = _path_from_json(str(res["budgets"]))
    tx.lock_budgets([bid for bid, _ in path])
    for budget_id, _ in path:
        tx.execute("UPDATE budgets SET reserved_n = reserved_n - ? WHERE id = ?", (held, budget_id))
    if res["tier_key"]:
        # a released call gives its place in the volume-tier count back
        tx.execute(
            "UPDATE tier_counters SET calls = calls - 1 WHERE tier_key = ? AND calls > 0", (res["tier_key"],)
        )
    tx.execute(
        "UPDATE reservations SET status = ?, charged_n = 0, settled_at = ? WHERE id = ?",
        (status, now_text(tx), res["id"]),
    )
    event_type = (
        "dev.paymaster.reservation.released" if status == "released" else "dev.paymaster.reservation.expired"
    )
    tx.emit(
        event_type,
        str(res["id"]),
        {
            "reservation_id": res["id"],
            "agent_id": res["agent_id"],
            "principal": res["principal"],
            "connector": res["connector"],
            "released": format_nanos(held),
            "currency": res["currency"],
            "reason": reason,
            "budgets": [bid for bid, _ in path],
        },
    )
    return Answer(200, {"reservation_id": res["id"], "released": format_nanos(held)})


def expire_one(tx: Tx, res: Row, *, outbox: bool = False) -> None:
    """Expire a held reservation: charge the hold, flagged ``estimated``, when the request
    reached the provider (spend is never lost); release it otherwise."""
    if int(res["request_sent"]):
        settle(
            tx, res, int(res["amount_n"]), estimated=True, status="expired", reason="expired", outbox=outbox
        )
    else:
        _release_hold(tx, res, "expired", "expired")


def expire_due(tx: Tx, *, limit: int = EXPIRE_BATCH, outbox: bool = False) -> int:
    rows = tx.all(
        "SELECT * FROM reservations WHERE status = 'held' AND expires_at <= ? ORDER BY expires_at LIMIT ?",
        (now_text(tx), limit),
    )
    for res in rows:
        expire_one(tx, res, outbox=outbox)
    return len(rows)


def mark_request_sent(tx: Tx, reservation_id: str) -> None:
    tx.execute("UPDATE reservations SET request_sent = 1 WHERE id = ? AND status = 'held'", (reservation_id,))


# ---------------------------------------------------------------- refund and fund


def refund(tx: Tx, ledger_entry_id: str, amount: int, reason: str, idem: Idem | None) -> Answer:
    replay = idem_lookup(tx, idem)
    if replay is not None:
        return replay
    entry = tx.one("SELECT * FROM ledger WHERE id = ? AND kind = 'charge'", (ledger_entry_id,))
    if entry is None:
        answer = _not_found("ledger entry")
    else:
        left = int(entry["total_n"]) - int(entry["refunded_n"])
        if amount <= 0 or amount > left:
            answer = _error(
                422,
                "invalid_amount",
                f"a refund of {format_nanos(amount)} is more than"
                f" the {format_nanos(left)} left of the charge",
                requested=format_nanos(amount),
                remaining=format_nanos(left),
                currency=entry["currency"],
            )
        else:
            budget_ids = [str(b) for b in json.loads(str(entry["budgets"]))]
            tx.lock_budgets(budget_ids)
            for budget_id in budget_ids:
                tx.execute("UPDATE budgets SET spent_n = spent_n - ? WHERE id = ?", (amount, budget_id))
            tx.execute(
                "UPDATE ledger SET refunded_n = refunded_n + ? WHERE id = ?", (amount, ledger_entry_id)
            )
            refund_id = new_id("rf_")
            tx.execute(
                "INSERT INTO ledger (id, kind, time, agent_id, principal, connector, category,"
                " input_hash, quantity, unit, unit_cost, total_n, currency, reservation_id,"
                " refund_of, task, session, budgets, reason)"
                " VALUES (?, 'refund', ?, ?, ?, ?, ?, ?, NULL, NULL, NULL, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    refund_id,
                    now_text(tx),
                    entry["agent_id"],
                    entry["principal"],
                    entry["connector"],
                    entry["category"],
                    entry["input_hash"],
                    -amount,
                    entry["currency"],
                    entry["reservation_id"],
                    ledger_entry_id,
                    entry["task"],
                    entry["session"],
                    entry["budgets"],
                    reason,
                ),
            )
            tx.emit(
                "dev.paymaster.refund.created",
                refund_id,
                {
                    "refund_id": refund_id,
                    "ledger_entry_id": ledger_entry_id,
                    "amount": format_nanos(amount),
                    "currency": entry["currency"],
                    "reason": reason,
                    "agent_id": entry["agent_id"],
                    "connector": entry["connector"],
                    "budgets": budget_ids,
                },
            )
            answer = Answer(
                201,
                {
                    "refund_id": refund_id,
                    "amount": format_nanos(amount),
                    "ledger_entry_id": ledger_entry_id,
                    "currency": entry["currency"],
                },
            )
    if idem is not None and answer.status != 404:
        idem_store(tx, idem, answer)
    return answer


def fund(tx: Tx, agent_id: str, amount: int, currency: str, idem: Idem | None = None) -> Answer:
    replay = idem_lookup(tx, idem)
    if replay is not None:
        return replay
    agent = tx.one("SELECT status FROM agents WHERE id = ?", (agent_id,))
    if agent is None:
        return _not_found("agent")
    if agent["status"] == "revoked":
        return _error(409, "agent_revoked", f"agent {agent_id} is revoked; revoke is final")
    wallet_id = f"{agent_id}/total"
    tx.execute(
        "INSERT INTO budgets (id, kind, owner, scope, period, window, mode, currency, limit_n, created_at)"
        " VALUES (?, 'wallet', ?, 'all', 'total', '', 'enforce', ?, ?, ?)"
        " ON CONFLICT (id) DO UPDATE SET limit_n = budgets.limit_n + excluded.limit_n",
        (wallet_id, agent_id, currency, amount, now_text(tx)),
    )
    row = budget_row(tx, wallet_id)
    assert row is not None
    tx.emit(
        "dev.paymaster.budget.funded",
        wallet_id,
        {
            "budget_id": wallet_id,
            "agent_id": agent_id,
            "amount": format_nanos(amount),
            "currency": currency,
            "limit": format_nanos(int(row["limit_n"])),
        },
    )
    answer = Answer(200, {"budget_id": wallet_id})
    idem_store(tx, idem, answer)
    return answer


# ---------------------------------------------------------------- agents, principals, policies, tasks


def create_agent(
    tx: Tx,
    *,
    agent_id: str,
    name: str,
    public_key: str,
    parent: str | None,
    metadata: Mapping[str, Any],
    policy: Mapping[str, Any] | None,
) -> None:
    if parent is not None:
        ensure_principal(tx, parent)
    tx.execute(
        "INSERT INTO agents (id, name, public_key, status, parent, metadata, policy_version, created_at)"
        " VALUES (?, ?, ?, 'active', ?, ?, 0, ?)",
        (agent_id, name, public_key, parent, json.dumps(dict(metadata), separators=(",", ":")), now_text(tx)),
    )
    tx.emit(
        "dev.paymaster.agent.created",
        agent_id,
        {
            "agent_id": agent_id,
            "name": name,
            "public_key": public_key,
            "parent": parent,
            "metadata": dict(metadata),
        },
    )
    if policy is not None:
        set_policy(tx, agent_id, policy)


def ensure_principal(tx: Tx, name: str) -> bool:
    changed = tx.execute(
        "INSERT INTO principals (name, parent, policy_version, created_at) VALUES (?, NULL, 0, ?)"
        " ON CONFLICT (name) DO NOTHING",
        (name, now_text(tx)),
    )
    return changed == 1


def set_policy(tx: Tx, owner: str, policy: Mapping[str, Any]) -> int:
    """Store a new policy version for an agent or principal; apply its caps' limits at once
    to the current windows of the caps it keeps (same scope and period)."""
    if owner.startswith("ag_"):
        row = tx.one("SELECT policy_version FROM agents WHERE id = ?", (owner,))
    else:
        row = tx.one("SELECT policy_version FROM principals WHERE name = ?", (owner,))
    if row is None:
        raise LookupError(owner)
    version = int(row["policy_version"]) + 1
    tx.execute(
        "INSERT INTO policies (owner, version, policy, created_at) VALUES (?, ?, ?, ?)",
        (owner, version, json.dumps(dict(policy), separators=(",", ":")), now_text(tx)),
    )
    if owner.startswith("ag_"):
        tx.execute(
            "UPDATE agents SET policy_version = ?, state_version = state_version + 1 WHERE id = ?",
            (version, owner),
        )
    else:
        tx.execute("UPDATE principals SET policy_version = ? WHERE name = ?", (version, owner))
    for cap in policy.get("caps", []):
        scope, period = cap.get("scope", "all"), cap.get("period")
        tx.execute(
            "UPDATE budgets SET limit_n = ?, mode = ?"
            " WHERE kind = 'cap' AND owner = ? AND scope = ? AND period = ?"
            " AND (window_end IS NULL OR window_end > ?)",
            (parse_nanos(cap["limit"]), cap.get("mode", "enforce"), owner, scope, period, now_text(tx)),
        )
    tx.emit(
        "dev.paymaster.policy.changed", owner, {"owner": owner, "version": version, "policy": dict(policy)}
    )
    return version


def set_agent_status(tx: Tx, agent_id: str, status: str) -> Answer:
    row = tx.one("SELECT status FROM agents WHERE id = ?", (agent_id,))
    if row is None:
        return _not_found("agent")
    current = str(row["status"])
    if current == "revoked" and status != "revoked":
        return _error(409, "agent_revoked", f"agent {agent_id} is revoked; revoke is final")
    if current != status:
        tx.execute(
            "UPDATE agents SET status = ?, state_version = state_version + 1 WHERE id = ?", (status, agent_id)
        )
        event = {
            "active": "dev.paymaster.agent.unfrozen",
            "frozen": "dev.paymaster.agent.frozen",
            "revoked": "dev.paymaster.agent.revoked",
        }[status]
        tx.emit(event, agent_id, {"agent_id": agent_id, "from": current, "to": status})
    return Answer(200, {"id": agent_id, "status": status})


def put_principal(
    tx: Tx, name: str, parent: str | None, parent_given: bool, policy: Mapping[str, Any] | None
) -> Answer:
    created = ensure_principal(tx, name)
    if parent_given:
        if parent is not None:
            # refuse a loop: walk up from the new parent
            seen = {name}
            cursor: str | None = parent
            while cursor is not None:
                if cursor in seen:
                    return _error(422, "invalid_request", f"parent {parent!r} would make a loop")
                seen.add(cursor)
                up = tx.one("SELECT parent FROM principals WHERE name = ?", (cursor,))
                cursor = None if up is None else up["parent"]
            ensure_principal(tx, parent)
        tx.execute("UPDATE principals SET parent = ? WHERE name = ?", (parent, name))
    if policy is not None:
        set_policy(tx, name, policy)
    tx.emit(
        "dev.paymaster.principal.changed", name, {"principal": name, "parent": parent, "created": created}
    )
    row = tx.one("SELECT * FROM principals WHERE name = ?", (name,))
    assert row is not None
    return Answer(
        201 if created else 200,
        {"principal": name, "parent": row["parent"], "policy_version": int(row["policy_version"])},
    )


def create_task(
    tx: Tx,
    *,
    task_id: str,
    limit: int,
    currency: str,
    parent_task: str | None,
    agents: Sequence[str],
    created_by: str,
) -> Answer:
    if parent_task is not None and tx.one("SELECT 1 AS x FROM tasks WHERE id = ?", (parent_task,)) is None:
        return _not_found("parent task")
    tx.execute(
        "INSERT INTO tasks (id, parent_task, agents, created_by, created_at) VALUES (?, ?, ?, ?, ?)",
        (task_id, parent_task, json.dumps(list(agents)), created_by, now_text(tx)),
    )
    tx.execute(
        "INSERT INTO budgets (id, kind, owner, scope, period, window, mode, currency, limit_n, created_at)"
        " VALUES (?, 'task', ?, 'all', 'total', '', 'enforce', ?, ?, ?)",
        (task_id, task_id, currency, limit, now_text(tx)),
    )
    tx.emit(
        "dev.paymaster.task.created",
        task_id,
        {
            "task_id": task_id,
            "limit": format_nanos(limit),
            "currency": currency,
            "parent_task": parent_task,
            "agents": list(agents),
            "created_by": created_by,
        },
    )
    return Answer(
        201,
        {
            "task_id": task_id,
            "budget_id": task_id,
            "limit": format_nanos(limit),
            "currency": currency,
            "parent_task": parent_task,
            "agents": list(agents),
        },
    )


def sweep(
    tx: Tx, *, outbox: bool = False, jti_before: int | None = None, idem_before: str | None = None
) -> int:
    """Housekeeping: expire due holds, forget spent token ids past their expiry and
    idempotency records past their 24 h."""
    count = expire_due(tx, outbox=outbox)
    if jti_before is not None:
        tx.execute("DELETE FROM spent_jti WHERE exp < ?", (jti_before,))
    if idem_before is not None:
        tx.execute("DELETE FROM idempotency WHERE created_at < ?", (idem_before,))
    return count


def day_ago(at: datetime) -> str:
    return iso_time(at - timedelta(days=1))


# ---------------------------------------------------------------- keys


def add_api_key(tx: Tx, key_hash: str, kind: str, principal: str | None) -> bool:
    changed = tx.execute(
        "INSERT INTO api_keys (key_hash, kind, principal, created_at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (key_hash) DO NOTHING",
        (key_hash, kind, principal, now_text(tx)),
    )
    return changed == 1


def meta_get(tx: Tx, key: str) -> str | None:
    row = tx.one("SELECT value FROM meta WHERE key = ?", (key,))
    return None if row is None else str(row["value"])


def meta_set_once(tx: Tx, key: str, value: str) -> bool:
    changed = tx.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING", (key, value)
    )
    return changed == 1
