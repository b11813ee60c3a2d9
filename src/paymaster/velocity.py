"""The runaway velocity guard: stop an agent whose spend rate jumps (docs/alerts.md).

A policy's ``velocity_guard`` (this project's addition to the policy JSON, parsed by
:mod:`paymaster.core.policy`) is checked after each commit of an agent that has one on its
policy chain (its own policy or a parent principal's). The spend of the agent's last
``window_seconds`` is compared with its spend over the last ``trailing_seconds`` (charges
minus refunds, from the ``ledger`` table); when :func:`~paymaster.core.policy.velocity_exceeded`
trips, in one transaction:

- ``freeze``: the agent is frozen (its next reserve is 403 ``agent_frozen``);
- ``tighten``: a new version of the agent's policy sets ``per_call_max["*"]`` to
  ``tighten_to`` (and lowers every other ``per_call_max`` entry to at most ``tighten_to``),
  and lowers its ``{scope: all, period: day}`` cap to what the agent has spent today plus
  ``tighten_to`` (adding that cap when it has none); a limit is never raised;
- a ``dev.paymaster.agent.velocity_tripped`` event is recorded and, when a webhook is
  configured, enqueued for it.

One trip per guard window: a guard that tripped does not trip again for ``window_seconds``
(nor while its agent is not active), whatever the number of replicas — the trip claims a
``meta`` row ``velocity_trip:{agent}:{guard owner}`` in the same transaction. Other agents
are never touched. An agent younger than ``trailing_seconds`` is measured over its lifetime
(its trailing rate is what it has really done, not a rate diluted by time before it
existed); an agent younger than ``window_seconds`` is not judged yet — caps cover it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Any

from paymaster.core import budgets as windows
from paymaster.core import policy as pol
from paymaster.core.audit import iso_time
from paymaster.money import format_nanos
from paymaster.store import ops
from paymaster.store.base import Tx

if TYPE_CHECKING:
    from paymaster.authority import AgentRecord, Authority

logger = logging.getLogger("paymaster.velocity")

EVENT_TYPE = "dev.paymaster.agent.velocity_tripped"
MARKER_PREFIX = "velocity_trip:"

__all__ = ["EVENT_TYPE", "Trip", "check_after_commit", "guards_for", "spend_since"]


@dataclass(frozen=True, slots=True)
class Trip:
    """What a tripped guard did."""

    agent_id: str
    guard_owner: str  # the agent id, or the principal whose policy holds the guard
    action: str  # freeze | tighten
    window_spend: int
    trailing_spend: int
    trailing_seconds: int  # the span measured (the guard's, or the agent's age when shorter)
    event: dict[str, Any]
    policy_version: int | None = None  # the tightened policy's version


def guards_for(authority: Authority, agent: AgentRecord) -> list[tuple[str, pol.VelocityGuard]]:
    """``(owner, guard)`` for every velocity guard on the agent's policy chain, nearest first."""
    guards: list[tuple[str, pol.VelocityGuard]] = []
    if agent.policy is not None and agent.policy.velocity_guard is not None:
        guards.append((agent.id, agent.policy.velocity_guard))
    for record in authority.principal_chain(agent.parent):
        if record.policy is not None and record.policy.velocity_guard is not None:
            guards.append((record.name, record.policy.velocity_guard))
    return guards


def spend_since(tx: Tx, agent_id: str, since: datetime) -> int:
    """The agent's net spend (charges minus refunds, in nanos) strictly after ``since``."""
    row = tx.one(
        "SELECT COALESCE(SUM(total_n), 0) AS n FROM ledger WHERE agent_id = ? AND time > ?",
        (agent_id, iso_time(since)),
    )
    return int(row["n"]) if row is not None else 0


def check_after_commit(
    authority: Authority, agent_id: str | None, *, reservation_id: str | None = None
) -> Trip | None:
    """Run after a successful commit. Cheap when no policy on the agent's chain has a
    velocity guard (cached records only; one primary-key read when the caller is not the
    agent and only the reservation is known). Never raises: the commit has happened, and a
    failed check is logged and made again at the next commit."""
    try:
        if agent_id is None:
            if reservation_id is None:
                return None
            agent_id = authority.store.read(lambda tx: _reservation_agent(tx, reservation_id))
            if agent_id is None:
                return None
        agent = authority.agent(agent_id)
        guards = guards_for(authority, agent)
        if not guards or agent.status != "active":
            return None
        first: Trip | None = None
        for owner, guard in guards:
            if authority.store.read(partial(_measure, agent=agent, owner=owner, guard=guard)) is None:
                continue
            act = partial(
                _trip,
                agent=agent,
                owner=owner,
                guard=guard,
                currency=authority.currency,
                alerts_enabled=authority.alerts_enabled,
            )
            trip = authority.submit(act).result()
            authority.invalidate(agent.id)
            if trip is None:
                continue
            logger.warning(
                "velocity guard of %s tripped for agent %s: %s in %ss against %s in %ss; action %s",
                owner,
                agent.id,
                format_nanos(trip.window_spend),
                guard.window_seconds,
                format_nanos(trip.trailing_spend),
                trip.trailing_seconds,
                trip.action,
            )
            first = first or trip
            if trip.action == "freeze":
                break
        return first
    except Exception:
        logger.exception("velocity check after the commit of %s failed", reservation_id or agent_id)
        return None


# ---------------------------------------------------------------- inside transactions


def _reservation_agent(tx: Tx, reservation_id: str) -> str | None:
    row = tx.one("SELECT agent_id FROM reservations WHERE id = ?", (reservation_id,))
    return None if row is None or row["agent_id"] is None else str(row["agent_id"])


def _marker_key(agent_id: str, owner: str) -> str:
    return f"{MARKER_PREFIX}{agent_id}:{owner}"


def _measure(tx: Tx, agent: AgentRecord, owner: str, guard: pol.VelocityGuard) -> tuple[int, int, int] | None:
    """``(window spend, trailing spend, trailing seconds)`` when the guard trips now."""
    now = tx.now
    cutoff = iso_time(now - timedelta(seconds=guard.window_seconds))
    marker = tx.one("SELECT value FROM meta WHERE key = ?", (_marker_key(agent.id, owner),))
    if marker is not None and str(marker["value"]) > cutoff:
        return None  # tripped within this guard window already
    age = int((now - datetime.fromisoformat(agent.created_at)).total_seconds())
    trailing_seconds = min(guard.trailing_seconds, age)
    if trailing_seconds <= guard.window_seconds:
        return None
    window_spend = spend_since(tx, agent.id, now - timedelta(seconds=guard.window_seconds))
    if window_spend <= 0 or window_spend < guard.min_spend:
        return None  # the common case: one short index range, no trailing sum
    trailing_spend = spend_since(tx, agent.id, now - timedelta(seconds=trailing_seconds))
    measured = dataclasses.replace(guard, trailing_seconds=trailing_seconds)
    if not pol.velocity_exceeded(measured, window_spend, trailing_spend):
        return None
    return window_spend, trailing_spend, trailing_seconds


def _trip(
    tx: Tx, agent: AgentRecord, owner: str, guard: pol.VelocityGuard, currency: str, alerts_enabled: bool
) -> Trip | None:
    """Re-check and act, in one write transaction (so two replicas never both trip)."""
    status = tx.one("SELECT status FROM agents WHERE id = ?", (agent.id,))
    if status is None or status["status"] != "active":
        return None
    measured = _measure(tx, agent, owner, guard)
    if measured is None:
        return None
    window_spend, trailing_spend, trailing_seconds = measured
    now = ops.now_text(tx)
    claimed = tx.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value WHERE meta.value <= ?",
        (_marker_key(agent.id, owner), now, iso_time(tx.now - timedelta(seconds=guard.window_seconds))),
    )
    if claimed != 1:
        return None
    data: dict[str, Any] = {
        "agent_id": agent.id,
        "guard_owner": owner,
        "window_seconds": guard.window_seconds,
        "trailing_seconds": trailing_seconds,
        "window_spend": format_nanos(window_spend),
        "trailing_spend": format_nanos(trailing_spend),
        "multiple": guard.multiple,
        "min_spend": format_nanos(guard.min_spend),
        "currency": currency,
        "action": guard.action,
    }
    tightened: tuple[int, dict[str, Any]] | None = None
    if guard.action == "tighten":
        assert guard.tighten_to is not None
        tightened = _tightened_policy(tx, agent.id, guard.tighten_to)
        policy_json = tightened[1]
        data["tighten_to"] = format_nanos(guard.tighten_to)
        data["per_call_max"] = policy_json["per_call_max"].get("*")
        data["daily_limit"] = next(
            c["limit"] for c in policy_json["caps"] if c["scope"] == "all" and c["period"] == "day"
        )
        data["policy_version"] = tightened[0]
    event = tx.emit(EVENT_TYPE, agent.id, data)
    if alerts_enabled:
        ops.enqueue_webhook(tx, event)
    version: int | None = None
    if tightened is not None:
        version = ops.set_policy(tx, agent.id, tightened[1])
        assert version == tightened[0]
    else:
        ops.set_agent_status(tx, agent.id, "frozen")
    return Trip(
        agent_id=agent.id,
        guard_owner=owner,
        action=guard.action,
        window_spend=window_spend,
        trailing_spend=trailing_spend,
        trailing_seconds=trailing_seconds,
        event=event,
        policy_version=version,
    )


def _tightened_policy(tx: Tx, agent_id: str, tighten_to: int) -> tuple[int, dict[str, Any]]:
    """``(next version, policy JSON)``: the agent's current policy with every
    ``per_call_max`` entry at most ``tighten_to`` (``*`` included, added when absent) and its
    ``{all, day}`` cap at most today's spend plus ``tighten_to``."""
    row = tx.one("SELECT policy_version FROM agents WHERE id = ?", (agent_id,))
    assert row is not None
    version = int(row["policy_version"])
    current = pol.parse_policy({})
    if version > 0:
        prow = tx.one("SELECT policy FROM policies WHERE owner = ? AND version = ?", (agent_id, version))
        if prow is not None:
            current = pol.parse_policy(json.loads(str(prow["policy"])))
    per_call = {key: min(value, tighten_to) for key, value in current.per_call_max.items()}
    per_call["*"] = min(per_call.get("*", tighten_to), tighten_to)
    day_cap = next((c for c in current.caps if c.scope == "all" and c.period == "day"), None)
    window = windows.window_for("day", tx.now, day_cap.tz if day_cap is not None else None)
    spent_today: int | None = None
    if day_cap is not None:
        budget = ops.budget_row(tx, windows.budget_id(agent_id, "all", "day", window.key))
        if budget is not None:
            spent_today = int(budget["spent_n"])
    if spent_today is None:
        assert window.start is not None
        spent_today = spend_since(tx, agent_id, window.start - timedelta(microseconds=1))
    daily = max(spent_today, 0) + tighten_to
    if day_cap is not None:
        daily = min(daily, day_cap.limit)
    tightened = pol.with_limits(dataclasses.replace(current, per_call_max=per_call), daily=daily)
    return version + 1, pol.policy_to_json(tightened)
