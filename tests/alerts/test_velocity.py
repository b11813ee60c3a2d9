"""The runaway velocity guard, on the 02:47 story scaled down with a simulated clock: an
agent spending steadily, then a retry loop at many times its rate."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from paymaster import velocity
from paymaster.authority import Authority, Caller, ReserveRequest
from paymaster.bootstrap import open_authority
from paymaster.config import Settings
from paymaster.core import tokens
from paymaster.errors import AgentFrozen, PerCallLimitExceeded, PolicyCapExceeded
from paymaster.money import parse_nanos

START = datetime(2026, 11, 24, 1, 0, tzinfo=UTC)
TRIPPED = "dev.paymaster.agent.velocity_tripped"
FREEZE_GUARD = {
    "window_seconds": 60,
    "trailing_seconds": 3600,
    "multiple": "5",
    "min_spend": "1.00",
    "action": "freeze",
}


class Clock:
    def __init__(self, start: datetime = START) -> None:
        self.now = start
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> datetime:
        with self._lock:
            self.now += timedelta(seconds=seconds)
            return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def opened() -> Iterator[list[Authority]]:
    out: list[Authority] = []
    yield out
    for authority in out:
        authority.store.close()


def open_on(path: Path, clock: Clock, opened: list[Authority], webhook: bool = True) -> Authority:
    alerts = {"webhook": "http://127.0.0.1:9/hooks"} if webhook else {}
    settings = Settings(db_url=f"sqlite:///{path / 'pm.db'}", home=str(path), alerts=alerts)
    authority = open_authority(settings, clock=clock)
    opened.append(authority)
    return authority


def make_agent(
    authority: Authority, name: str, policy: dict[str, Any] | None, *, parent: str | None = None
) -> str:
    key = tokens.generate_private_key()
    agent = authority.create_agent(name, tokens.public_key_b64(key), policy=policy, parent=parent)
    authority.fund(agent["id"], parse_nanos("10000.00"))
    return str(agent["id"])


def reserve(authority: Authority, agent_id: str, amount: str) -> str:
    res = authority.reserve(
        ReserveRequest(
            connector="openai", idempotency_key=None, agent_id=agent_id, amount=parse_nanos(amount)
        ),
        Caller("agent", agent_id=agent_id),
    )
    return str(res["reservation_id"])


def spend(authority: Authority, agent_id: str, amount: str, *, as_admin: bool = False) -> dict[str, Any]:
    reservation = reserve(authority, agent_id, amount)
    caller = Caller.admin() if as_admin else Caller("agent", agent_id=agent_id)
    return authority.commit(reservation, amount=None, caller=caller)


def trips(authority: Authority) -> list[dict[str, Any]]:
    return [e for e in authority.events(limit=100_000) if e["type"] == TRIPPED]


def outbox_types(authority: Authority) -> list[str]:
    rows = authority.store.read(lambda tx: tx.all("SELECT body FROM outbox ORDER BY id"))
    return [json.loads(r["body"])["type"] for r in rows]


def steady(
    authority: Authority, clock: Clock, agents: dict[str, str], *, minutes: int, every: int = 30
) -> None:
    """Each agent spends its amount every ``every`` seconds for ``minutes`` minutes."""
    for _ in range(minutes * 60 // every):
        clock.advance(every)
        for agent_id, amount in agents.items():
            spend(authority, agent_id, amount)


# ---------------------------------------------------------------- freeze


def test_the_0247_runaway_is_frozen_and_others_keep_working(
    tmp_path: Path, clock: Clock, opened: list[Authority]
) -> None:
    authority = open_on(tmp_path, clock, opened)
    policy = {"velocity_guard": FREEZE_GUARD}
    support = make_agent(authority, "support-bot", policy)
    billing = make_agent(authority, "billing-bot", policy)
    # 01:00 to 02:47: both answer tickets at a steady 0.10 every 30 s (0.20 a minute)
    steady(authority, clock, {support: "0.10", billing: "0.10"}, minutes=107)
    assert clock() == datetime(2026, 11, 24, 2, 47, tzinfo=UTC)
    assert trips(authority) == []

    # 02:47: support-bot hits a rate-limited tool; each retry re-sends the whole history
    charged = 0
    with pytest.raises(AgentFrozen) as denied:
        for _ in range(100):
            clock.advance(2)
            spend(authority, support, "0.50")  # 15.00 a minute: 75 times its rate
            charged += 1
    assert denied.value.code == "agent_frozen" and denied.value.status == 403
    # stopped within the first minute, not at 09:00 the next morning
    assert charged == 2 and clock() - datetime(2026, 11, 24, 2, 47, tzinfo=UTC) <= timedelta(seconds=60)
    assert authority.get_agent(support)["status"] == "frozen"

    # the other tenant is not disturbed
    for _ in range(5):
        clock.advance(30)
        spend(authority, billing, "0.10")
    assert authority.get_agent(billing)["status"] == "active"

    (event,) = trips(authority)
    data = event["data"]
    assert event["subject"] == support
    assert data["agent_id"] == support and data["guard_owner"] == support
    assert data["action"] == "freeze" and data["multiple"] == "5"
    # the minute: two steady calls (0.20) and two retries (1.00); 1.20 x 3600 >= 5 x 13.00 x 60
    assert data["window_spend"] == "1.20"
    assert data["trailing_spend"] == "13.00"  # the steady hour (120 x 0.10) plus the retries
    assert data["window_seconds"] == 60 and data["trailing_seconds"] == 3600
    # the event is in the signed chain, right before the freeze it caused, and alerted
    types = [e["type"] for e in authority.events(limit=100_000)]
    assert types[types.index(TRIPPED) + 1] == "dev.paymaster.agent.frozen"
    assert authority.verify_audit().ok
    assert outbox_types(authority).count(TRIPPED) == 1


def test_held_calls_committed_after_the_freeze_do_not_trip_again(
    tmp_path: Path, clock: Clock, opened: list[Authority]
) -> None:
    authority = open_on(tmp_path, clock, opened)
    agent = make_agent(authority, "looper", {"velocity_guard": FREEZE_GUARD})
    steady(authority, clock, {agent: "0.10"}, minutes=60)
    in_flight = [reserve(authority, agent, "0.50") for _ in range(4)]
    for reservation in in_flight[:2]:
        clock.advance(1)
        authority.commit(reservation, amount=None, caller=Caller("agent", agent_id=agent))
    assert authority.get_agent(agent)["status"] == "frozen"
    for reservation in in_flight[2:]:
        clock.advance(1)
        authority.commit(reservation, amount=None, caller=Caller.admin())  # the money was spent
    assert len(trips(authority)) == 1

    # an operator unfreezes it at once: the burst still in the window does not re-trip it
    authority.set_status(agent, "active")
    clock.advance(5)
    spend(authority, agent, "0.50")
    assert authority.get_agent(agent)["status"] == "active"
    assert len(trips(authority)) == 1


def test_a_parents_guard_freezes_only_the_runaway(
    tmp_path: Path, clock: Clock, opened: list[Authority]
) -> None:
    authority = open_on(tmp_path, clock, opened, webhook=False)
    authority.put_principal("team:support", {"policy": {"velocity_guard": FREEZE_GUARD}})
    runaway = make_agent(authority, "a", None, parent="team:support")
    sibling = make_agent(authority, "b", None, parent="team:support")
    steady(authority, clock, {runaway: "0.10", sibling: "0.10"}, minutes=60)
    with pytest.raises(AgentFrozen):
        for _ in range(20):
            clock.advance(2)
            spend(authority, runaway, "0.50", as_admin=True)  # commits by admin: found by reservation
    (event,) = trips(authority)
    assert event["data"]["guard_owner"] == "team:support" and event["data"]["agent_id"] == runaway
    spend(authority, sibling, "0.10")
    assert authority.get_agent(sibling)["status"] == "active"
    assert authority.store.read(lambda tx: tx.one("SELECT COUNT(*) AS n FROM outbox"))["n"] == 0  # no webhook


# ---------------------------------------------------------------- tighten


def test_tighten_lowers_the_per_call_max_and_the_day_cap(
    tmp_path: Path, clock: Clock, opened: list[Authority]
) -> None:
    a = open_on(tmp_path, clock, opened)
    b = open_on(tmp_path, clock, opened)  # a second replica
    guard = {**FREEZE_GUARD, "action": "tighten", "tighten_to": "0.05"}
    policy = {
        "per_call_max": {"*": "1.00", "llm": "2.00", "connector:cheap": "0.01"},
        "caps": [{"scope": "all", "period": "day", "limit": "200.00"}],
        "velocity_guard": guard,
    }
    agent = make_agent(a, "crew-writer", policy)
    steady(a, clock, {agent: "0.10"}, minutes=60)
    version = a.get_agent(agent)["policy_version"]
    for _ in range(2):
        clock.advance(2)
        spend(a, agent, "0.50")  # the second trips the guard; its commit stands
    (event,) = trips(a)
    record = a.get_agent(agent)
    assert record["status"] == "active"
    assert record["policy_version"] == version + 1  # a new policy version
    assert record["policy"]["per_call_max"] == {"*": "0.05", "llm": "0.05", "connector:cheap": "0.01"}
    assert a.budget(f"{agent}/day")["spent"] == "13.00"  # 120 x 0.10 + 2 x 0.50, all today
    assert a.budget(f"{agent}/day")["limit"] == "13.05"  # spent today + tighten_to
    assert record["policy"]["velocity_guard"]["action"] == "tighten"  # the guard stays
    assert event["data"]["action"] == "tighten" and event["data"]["tighten_to"] == "0.05"
    assert event["data"]["policy_version"] == version + 1
    assert event["data"]["daily_limit"] == "13.05"

    # the replica sees the new policy at once; the next call is held to the new maximum
    with pytest.raises(PerCallLimitExceeded):
        reserve(b, agent, "0.50")
    clock.advance(2)
    spend(b, agent, "0.05")
    with pytest.raises(PolicyCapExceeded):  # nothing left today beyond tighten_to
        reserve(b, agent, "0.05")
    # once per trip, whichever replica looks again
    assert velocity.check_after_commit(b, agent) is None
    assert velocity.check_after_commit(a, agent) is None
    assert len(trips(b)) == 1
    assert outbox_types(a).count(TRIPPED) == 1
    assert a.verify_audit().ok


def test_tighten_adds_a_day_cap_when_there_is_none(
    tmp_path: Path, clock: Clock, opened: list[Authority]
) -> None:
    authority = open_on(tmp_path, clock, opened)
    guard = {**FREEZE_GUARD, "action": "tighten", "tighten_to": "0.02"}
    agent = make_agent(authority, "no-caps", {"velocity_guard": guard})
    steady(authority, clock, {agent: "0.10"}, minutes=60)
    for _ in range(2):
        clock.advance(2)
        spend(authority, agent, "0.50")
    policy = authority.get_agent(agent)["policy"]
    assert policy["per_call_max"] == {"*": "0.02"}
    assert [c for c in policy["caps"] if c["period"] == "day"] == [
        {"scope": "all", "period": "day", "limit": "13.02", "mode": "enforce", "tz": None}
    ]


# ---------------------------------------------------------------- never trips


def test_a_steady_agent_never_trips(tmp_path: Path, clock: Clock, opened: list[Authority]) -> None:
    authority = open_on(tmp_path, clock, opened)
    # busy from its first minute (6.00 a minute, far above min_spend), for two hours: while
    # younger than trailing_seconds it is measured over its lifetime, then over the hour
    busy = make_agent(authority, "busy", {"velocity_guard": FREEZE_GUARD})
    quiet = make_agent(authority, "quiet", {"velocity_guard": FREEZE_GUARD})
    for i in range(2 * 60 * 6):
        clock.advance(10)
        spend(authority, busy, "1.00")
        if i % 6 == 0:
            spend(authority, quiet, "0.01")
    assert trips(authority) == []
    assert authority.get_agent(busy)["status"] == "active"


def test_refunded_calls_are_not_spend(tmp_path: Path, clock: Clock, opened: list[Authority]) -> None:
    authority = open_on(tmp_path, clock, opened)
    agent = make_agent(authority, "refunded", {"velocity_guard": FREEZE_GUARD})
    steady(authority, clock, {agent: "0.10"}, minutes=60)
    for _ in range(10):
        clock.advance(2)
        reservation = reserve(authority, agent, "0.50")
        committed = authority.commit(reservation, amount=None, caller=Caller.admin())
        authority.refund(committed["ledger_entry_id"], parse_nanos("0.50"), "provider error", None)
    assert trips(authority) == []  # the net spend of the window is zero


def test_no_guard_no_check(tmp_path: Path, clock: Clock, opened: list[Authority]) -> None:
    authority = open_on(tmp_path, clock, opened)
    agent = make_agent(authority, "unguarded", {"daily_cap": "100.00"})
    for _ in range(20):
        clock.advance(2)
        spend(authority, agent, "1.00")
    assert velocity.check_after_commit(authority, agent) is None
    assert trips(authority) == []
    assert authority.get_agent(agent)["status"] == "active"
