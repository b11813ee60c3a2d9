"""What the pages show, read from the authority. Blocking: call from a worker thread.

The authority answers the ledger oldest first, a page at a time, and the audit log by
sequence number; the helpers here walk both so the pages can show the newest entries and
today's totals without the store growing a query of its own.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from paymaster.authority import Authority
from paymaster.core.audit import VerifyResult, iso_time
from paymaster.money import parse_nanos

__all__ = [
    "AgentView",
    "AuditCache",
    "AuditStatus",
    "BudgetsOf",
    "Overview",
    "Spend",
    "agent_view",
    "iter_ledger",
    "overview",
]

LEDGER_PAGE = 1000
EVENTS_SHOWN = 50
ENTRIES_SHOWN = 50
AGENT_EVENT_SCAN = 2000  # the agent page looks for its events among the latest this many
MAX_SCAN = 200_000  # a chart stops summing past this many entries (and says so)
AUDIT_TTL_SECONDS = 10.0
# The agent page widens its look-back until it has ENTRIES_SHOWN entries.
_LOOK_BACK = (timedelta(hours=1), timedelta(days=1), timedelta(days=7), timedelta(days=31), None)


@dataclass(frozen=True)
class BudgetsOf:
    agent: Mapping[str, Any]
    budgets: Sequence[Mapping[str, Any]]


@dataclass(frozen=True)
class Spend:
    """Net spend (charges less refunds) in nanos, by connector and by hour."""

    by_connector: list[tuple[str, int]]
    by_hour: list[int]
    total: int
    entries: int
    truncated: bool


@dataclass(frozen=True)
class AuditStatus:
    result: VerifyResult
    checked_at: datetime


@dataclass(frozen=True)
class Overview:
    authority_id: str
    currency: str
    now: datetime
    agents: Sequence[BudgetsOf]
    spend: Spend
    events: Sequence[Mapping[str, Any]]
    audit: AuditStatus


@dataclass(frozen=True)
class AgentView:
    authority_id: str
    currency: str
    now: datetime
    agent: BudgetsOf
    spend: Spend
    entries: Sequence[Mapping[str, Any]]
    events: Sequence[Mapping[str, Any]]


class AuditCache:
    """``verify_audit`` reads the whole chain; a page load reuses a result younger than
    ``ttl`` seconds (by the monotonic clock) instead of verifying again."""

    def __init__(self, ttl: float = AUDIT_TTL_SECONDS, clock: Callable[[], float] | None = None) -> None:
        self.ttl = ttl
        self._clock = clock or time.monotonic
        self._lock = threading.Lock()
        self._last: tuple[float, AuditStatus] | None = None

    def status(self, authority: Authority) -> AuditStatus:
        with self._lock:
            if self._last is not None and self._clock() - self._last[0] < self.ttl:
                return self._last[1]
            status = AuditStatus(authority.verify_audit(), authority.clock())
            self._last = (self._clock(), status)
            return status


# ---------------------------------------------------------------- ledger


def iter_ledger(
    authority: Authority, *, since: str | None = None, until: str | None = None, agent: str | None = None
) -> Iterator[dict[str, Any]]:
    """Every ledger entry in ``[since, until)``, oldest first, a page at a time.

    The authority pages by ``since`` (inclusive), so each next page starts at the last time
    seen and skips the entries of that instant already yielded; a page that is all one
    instant makes the next one larger, so the walk always advances.
    """
    cursor = since
    seen: set[str] = set()
    while True:
        size = LEDGER_PAGE + len(seen)
        rows = authority.ledger(agent=agent, since=cursor, until=until, limit=size)
        for row in rows:
            if str(row["id"]) not in seen:
                yield row
        if len(rows) < size:
            return
        last = str(rows[-1]["time"])
        at_last = {str(r["id"]) for r in rows if r["time"] == last}
        seen = seen | at_last if last == cursor else at_last
        cursor = last


def amount(entry: Mapping[str, Any]) -> int:
    """An entry's total in nanos (a refund's is negative already)."""
    return parse_nanos(str(entry["total"]), field="total", allow_negative=True)


def _entry_time(entry: Mapping[str, Any]) -> datetime:
    return datetime.fromisoformat(str(entry["time"]))


def spend_since(authority: Authority, start: datetime, *, agent: str | None = None) -> Spend:
    """Net spend from ``start`` on, by connector (largest first) and by hour (24 buckets)."""
    by_connector: dict[str, int] = {}
    by_hour = [0] * 24
    count = 0
    truncated = False
    for entry in iter_ledger(authority, since=iso_time(start), agent=agent):
        if count >= MAX_SCAN:
            truncated = True
            break
        count += 1
        value = amount(entry)
        connector = str(entry["connector"])
        by_connector[connector] = by_connector.get(connector, 0) + value
        hour = int((_entry_time(entry) - start) // timedelta(hours=1))
        if 0 <= hour < 24:
            by_hour[hour] += value
    ranked = sorted(by_connector.items(), key=lambda kv: (-kv[1], kv[0]))
    return Spend(ranked, by_hour, sum(by_connector.values()), count, truncated)


def recent_entries(
    authority: Authority, agent: str, now: datetime, n: int = ENTRIES_SHOWN
) -> list[dict[str, Any]]:
    """The agent's newest ``n`` ledger entries, newest first."""
    tail: deque[dict[str, Any]] = deque(maxlen=n)
    for back in _LOOK_BACK:
        tail.clear()
        since = iso_time(now - back) if back is not None else None
        for entry in iter_ledger(authority, since=since, agent=agent):
            tail.append(entry)
        if len(tail) >= n:
            break
    return list(reversed(tail))


# ---------------------------------------------------------------- events


def count_events(authority: Authority) -> int:
    """How many events the log holds: ``events(after_seq=k)`` is empty from ``k = count``
    on; found by doubling, then bisection (one cheap indexed read per probe)."""

    def more_after(k: int) -> bool:
        return bool(authority.events(after_seq=k, limit=1))

    if not more_after(0):
        return 0
    low, high = 0, 1  # more_after(low) holds
    while more_after(high):
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        if more_after(middle):
            low = middle
        else:
            high = middle
    return high


def tail_events(authority: Authority, n: int) -> list[dict[str, Any]]:
    """The last ``n`` events, in log order."""
    tail: deque[dict[str, Any]] = deque(maxlen=n)
    cursor = max(0, count_events(authority) - n)
    while True:
        page = authority.events(after_seq=cursor, limit=LEDGER_PAGE)
        tail.extend(page)
        if len(page) < LEDGER_PAGE:
            return list(tail)
        cursor += len(page)


def concerns(event: Mapping[str, Any], agent_id: str) -> bool:
    """Whether an event is about the agent: its subject, or an id in its data."""
    if event.get("subject") == agent_id:
        return True
    data = event.get("data")
    if not isinstance(data, Mapping):
        return False
    if agent_id in (data.get("agent_id"), data.get("owner"), data.get("principal")):
        return True
    budget = data.get("budget_id")
    return isinstance(budget, str) and budget.startswith(agent_id + "/")


# ---------------------------------------------------------------- pages


def _budgets_of(authority: Authority, agent: Mapping[str, Any]) -> BudgetsOf:
    budgets = authority.agent_budgets(str(agent["id"]))["budgets"]
    return BudgetsOf(agent, list(budgets))


def overview(authority: Authority, audit: AuditCache) -> Overview:
    now = authority.clock()
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    agents = [_budgets_of(authority, a) for a in authority.list_agents()]
    return Overview(
        authority_id=authority.settings.authority_id,
        currency=authority.currency,
        now=now,
        agents=agents,
        spend=spend_since(authority, midnight),
        events=list(reversed(tail_events(authority, EVENTS_SHOWN))),
        audit=audit.status(authority),
    )


def agent_view(authority: Authority, agent_id: str) -> AgentView:
    """Raises ``NotFound`` for an unknown agent."""
    now = authority.clock()
    agent = authority.get_agent(agent_id)
    events = [e for e in tail_events(authority, AGENT_EVENT_SCAN) if concerns(e, agent_id)]
    start = (now - timedelta(hours=23)).replace(minute=0, second=0, microsecond=0)
    return AgentView(
        authority_id=authority.settings.authority_id,
        currency=authority.currency,
        now=now,
        agent=_budgets_of(authority, agent),
        spend=spend_since(authority, start, agent=agent_id),
        entries=recent_entries(authority, agent_id, now),
        events=list(reversed(events[-EVENTS_SHOWN:])),
    )
