"""Random verb sequences against a plain Python model of the ledger (Hypothesis).

Three agents share a parent principal's day cap; each has a wallet and a day cap of its
own. The machine reserves, commits (less, equal, more, zero), releases, refunds, marks
requests sent, lets time pass (expiring holds through the sweeper and rolling the day
windows), funds wallets and changes caps. After every step the stored state must equal the
model's, and the rules of ARCHITECTURE.md hold (conftest.check_invariants).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from paymaster.authority import Authority
from paymaster.bootstrap import open_authority
from paymaster.errors import InvalidAmount, ReservationExpired, ReservationSettled
from paymaster.money import format_nanos
from paymaster.store.ops import Answer

from .conftest import Backend, FakeClock, Ledger, check_invariants, n, settings_for

CENT = 10_000_000
# Late in the evening, so that a few steps of passing time roll the day windows over.
EVENING = datetime(2026, 3, 10, 20, 0, 0, tzinfo=UTC)
AGENT_CAP = n("5.00")
TEAM_CAP = n("8.00")
WALLET = n("6.00")

# mostly calls that fit, now and then a large one
amounts = (st.integers(min_value=0, max_value=120) | st.integers(min_value=0, max_value=600)).map(
    lambda c: c * CENT
)
limits = st.integers(min_value=50, max_value=1200).map(lambda c: c * CENT)
ttls = st.sampled_from([None, 1, 30, 300, 3600])
picks = st.integers(min_value=0, max_value=1_000)


@dataclass
class MBudget:
    kind: str
    limit: int
    spent: int = 0
    reserved: int = 0


@dataclass
class MReservation:
    id: str
    amount: int
    path: list[str]
    expires_at: datetime
    status: str = "held"
    sent: bool = False
    charged: int | None = None
    estimated: bool = False
    overrun: bool = False
    refunded: int = 0


@dataclass
class Replay:
    agent: str
    amount: str
    key: str
    ttl: int | None
    at: datetime
    answer: Answer


@dataclass
class Model:
    budgets: dict[str, MBudget] = field(default_factory=dict)
    reservations: dict[str, MReservation] = field(default_factory=dict)
    excused: set[str] = field(default_factory=set)  # limits lowered under their use

    def apply(self, res: MReservation, charge: int | None) -> None:
        """End a held reservation: charge ``charge`` (None: release)."""
        for budget_id in res.path:
            budget = self.budgets[budget_id]
            budget.reserved -= res.amount
            budget.spent += charge or 0
        res.charged = charge or 0


class LedgerMachine(RuleBasedStateMachine):
    backend: Backend
    home: Path

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock(EVENING)
        self.authority: Authority = open_authority(
            settings_for(self.backend.new_url(), self.home), clock=self.clock
        )
        self.h = Ledger(self.authority, self.clock)
        self.model = Model()
        self.replays: list[Replay] = []
        self.team = f"team-{secrets.token_hex(3)}"
        self.agent_caps: dict[str, int] = {}
        self.team_cap = TEAM_CAP
        self.agents: list[str] = []

    def teardown(self) -> None:
        self.authority.store.close()

    # ------------------------------------------------------------ set-up

    @initialize()
    def setup(self) -> None:
        self.authority.put_principal(self.team, {"policy": self.cap_policy(self.team_cap)})
        for i in range(3):
            agent = self.h.agent(name=f"a{i}", parent=self.team, policy=self.cap_policy(AGENT_CAP))
            self.h.fund(agent, format_nanos(WALLET))
            self.agents.append(agent)
            self.agent_caps[agent] = AGENT_CAP
            self.model.budgets[f"{agent}/total"] = MBudget("wallet", WALLET)

    @staticmethod
    def cap_policy(limit: int) -> dict[str, Any]:
        return {"caps": [{"scope": "all", "period": "day", "limit": format_nanos(limit)}]}

    # ------------------------------------------------------------ model helpers

    def day(self, owner: str) -> str:
        return f"{owner}/day/{self.clock.now:%Y-%m-%d}"

    def path(self, agent: str) -> list[tuple[str, str, int]]:
        """(id, kind, limit for a new window) in the order of the budget path."""
        return [
            (f"{agent}/total", "wallet", 0),
            (self.day(agent), "cap", self.agent_caps[agent]),
            (self.day(self.team), "cap", self.team_cap),
        ]

    def due(self) -> list[MReservation]:
        return [
            r
            for r in self.model.reservations.values()
            if r.status == "held" and r.expires_at <= self.clock.now
        ]

    def expire(self, res: MReservation) -> None:
        self.model.apply(res, res.amount if res.sent else None)
        res.status = "expired"
        res.estimated = res.sent

    def pick(self, index: int, status: str | None = None) -> MReservation | None:
        pool = [r for r in self.model.reservations.values() if status is None or r.status == status]
        return pool[index % len(pool)] if pool else None

    # ------------------------------------------------------------ rules

    @rule(who=picks, amount=amounts, ttl=ttls, keyed=st.booleans())
    def reserve(self, who: int, amount: int, ttl: int | None, keyed: bool) -> None:
        self.reserve_and_check(self.agents[who % len(self.agents)], amount, ttl, keyed)

    @rule(who=picks, over=st.booleans(), ttl=ttls)
    def reserve_exactly_what_is_left(self, who: int, over: bool, ttl: int | None) -> None:
        """The boundary: the smallest remaining on the path fits exactly; one nano more does not."""
        agent = self.agents[who % len(self.agents)]
        left = min(
            (b.limit - b.spent - b.reserved) if (b := self.model.budgets.get(i)) else limit
            for i, _, limit in self.path(agent)
        )
        self.reserve_and_check(agent, max(left, 0) + (1 if over else 0), ttl, keyed=False)

    def first_that_cannot_hold(self, path: list[tuple[str, str, int]], amount: int) -> tuple[str, str] | None:
        """(code, budget id) of the first budget on the path that cannot hold ``amount``."""
        for budget_id, kind, limit in path:
            budget = self.model.budgets.get(budget_id) or MBudget(kind, limit)
            if budget.limit - budget.spent - budget.reserved < amount:
                return ("balance_insufficient" if kind == "wallet" else "policy_cap_exceeded", budget_id)
        return None

    def reserve_and_check(self, agent: str, amount: int, ttl: int | None, keyed: bool) -> None:
        key = self.h.key("rsv") if keyed else None
        answer = self.h.reserve_answer(agent, format_nanos(amount), ttl=ttl, key=key)
        path = self.path(agent)
        expected = self.first_that_cannot_hold(path, amount)
        if expected is not None and self.due():
            # a hold that fails expires the holds past their expiry and tries once more:
            # a due hold never causes a denial
            for res in self.due():
                self.expire(res)
            expected = self.first_that_cannot_hold(path, amount)
        if expected is not None:
            assert answer.status == 402, answer
            assert (answer.body["error"]["code"], answer.body["error"]["budget_id"]) == expected
        else:
            assert answer.status == 201, answer
            for budget_id, kind, limit in path:
                budget = self.model.budgets.setdefault(budget_id, MBudget(kind, limit))
                budget.reserved += amount
                assert budget.spent + budget.reserved <= budget.limit or budget_id in self.model.excused
            assert [(b["id"], b["remaining"]) for b in answer.body["budgets"]] == [
                (
                    i,
                    format_nanos(
                        self.model.budgets[i].limit
                        - self.model.budgets[i].spent
                        - self.model.budgets[i].reserved
                    ),
                )
                for i, _, _ in path
            ]
            expires = self.clock.now + timedelta(seconds=ttl if ttl is not None else 300)
            rid = answer.body["reservation_id"]
            self.model.reservations[rid] = MReservation(rid, amount, [i for i, _, _ in path], expires)
        if key is not None:
            self.replays.append(Replay(agent, format_nanos(amount), key, ttl, self.clock.now, answer))

    @precondition(lambda self: bool(self.replays))
    @rule(index=picks)
    def replay_reserve(self, index: int) -> None:
        first = self.replays[index % len(self.replays)]
        if self.clock.now - first.at > timedelta(hours=23):
            return  # idempotency records are kept 24 h
        answer = self.h.reserve_answer(first.agent, first.amount, ttl=first.ttl, key=first.key)
        assert answer == first.answer

    @precondition(lambda self: bool(self.model.reservations))
    @rule(
        index=picks,
        how=st.sampled_from(["less", "equal", "more", "held", "zero"]),
        part=st.integers(1, 99),
        held=st.booleans(),
    )
    def commit(self, index: int, how: str, part: int, held: bool) -> None:
        res = self.pick(index, "held" if held else None) or self.pick(index)
        assert res is not None
        amount = {
            "less": res.amount * part // 100,
            "equal": res.amount,
            "more": res.amount + part * CENT,
            "held": res.amount,
            "zero": 0,
        }[how]
        expected = self.settle_outcome(res)
        try:
            out = self.h.commit(res.id, None if how == "held" else format_nanos(amount))
        except (ReservationExpired, ReservationSettled) as exc:
            assert exc.code == expected, (exc, expected)
            return
        assert expected == "ok", (out, expected)
        self.model.apply(res, amount)
        res.status, res.overrun = "committed", amount > res.amount
        assert (out["charged"], out["released"], out["overrun"]) == (
            format_nanos(amount),
            format_nanos(max(res.amount - amount, 0)),
            amount > res.amount,
        )

    @precondition(lambda self: any(r.status == "held" for r in self.model.reservations.values()))
    @rule(index=picks, percent=st.integers(0, 150))
    def commit_a_held_one(self, index: int, percent: int) -> None:
        """Commit a held reservation at ``percent`` of its hold (0: zero, 100: equal, more: overrun)."""
        res = self.pick(index, "held")
        assert res is not None
        self.commit(
            index,
            {0: "zero", 100: "equal"}.get(percent, "less" if percent < 100 else "more"),
            max(1, min(99, percent % 100)),
            held=True,
        )

    @precondition(lambda self: bool(self.model.reservations))
    @rule(index=picks, held=st.booleans())
    def release(self, index: int, held: bool) -> None:
        res = self.pick(index, "held" if held else None) or self.pick(index)
        assert res is not None
        expected = "ok" if res.status == "released" else self.settle_outcome(res)
        was_released = res.status == "released"
        try:
            out = self.h.release(res.id)
        except (ReservationExpired, ReservationSettled) as exc:
            assert exc.code == expected, (exc, expected)
            return
        assert expected == "ok", (out, expected)
        assert out == {"reservation_id": res.id, "released": format_nanos(res.amount)}
        if not was_released:
            self.model.apply(res, None)
            res.status = "released"

    def settle_outcome(self, res: MReservation) -> str:
        """What a commit or release of ``res`` must answer; expires it in the model when due."""
        if res.status == "held" and res.expires_at <= self.clock.now:
            self.expire(res)
            return "reservation_expired"
        if res.status == "expired":
            return "reservation_expired"
        return "ok" if res.status == "held" else "reservation_settled"

    def charged(self) -> list[MReservation]:
        return [
            r
            for r in self.model.reservations.values()
            if r.status == "committed" or (r.status == "expired" and r.estimated)
        ]

    @precondition(lambda self: bool(self.charged()))
    @rule(index=picks, how=st.sampled_from(["all", "half", "too_much", "tiny"]))
    def refund(self, index: int, how: str) -> None:
        charged = self.charged()
        res = charged[index % len(charged)]
        assert res.charged is not None
        left = res.charged - res.refunded
        amount = {"all": left, "half": left // 2, "too_much": left + 1, "tiny": 1}[how]
        entry = self.authority.query_reservation(res.id)["ledger_entry_id"]
        assert entry is not None
        if 0 < amount <= left:
            out = self.h.refund(entry, format_nanos(amount))
            assert out["amount"] == format_nanos(amount)
            res.refunded += amount
            for budget_id in res.path:
                self.model.budgets[budget_id].spent -= amount
        else:
            try:
                self.h.refund(entry, format_nanos(amount))
            except InvalidAmount:
                return
            raise AssertionError(f"a refund of {amount} of the {left} left was accepted")

    @precondition(lambda self: any(r.status == "held" for r in self.model.reservations.values()))
    @rule(index=picks)
    def mark_request_sent(self, index: int) -> None:
        res = self.pick(index, "held")
        assert res is not None
        self.authority.mark_request_sent(res.id)
        res.sent = True

    @rule(seconds=st.sampled_from([1, 30, 300, 3600]))
    def let_time_pass(self, seconds: int) -> None:
        """No sweep: due holds stay held until a verb or the sweeper finds them."""
        self.clock.advance(seconds)

    @rule(seconds=st.sampled_from([1, 29, 30, 299, 300, 1800, 3600, 4 * 3600]))
    def expire_due(self, seconds: int) -> None:
        self.clock.advance(seconds)
        due = self.due()
        assert self.authority.expire_due() == len(due)
        for res in due:
            self.expire(res)

    @rule(who=picks, amount=st.integers(1, 500).map(lambda c: c * CENT))
    def fund(self, who: int, amount: int) -> None:
        agent = self.agents[who % len(self.agents)]
        out = self.h.fund(agent, format_nanos(amount))
        self.model.budgets[f"{agent}/total"].limit += amount
        assert out["limit"] == format_nanos(self.model.budgets[f"{agent}/total"].limit)

    @rule(who=picks, limit=limits, team=st.booleans())
    def change_cap(self, who: int, limit: int, team: bool) -> None:
        if team:
            owner = self.team
            self.authority.put_principal(self.team, {"policy": self.cap_policy(limit)})
            self.team_cap = limit
        else:
            owner = self.agents[who % len(self.agents)]
            self.authority.set_agent_policy(owner, self.cap_policy(limit))
            self.agent_caps[owner] = limit
        budget = self.model.budgets.get(self.day(owner))
        if budget is not None:
            budget.limit = limit
            if budget.spent + budget.reserved > limit:
                self.model.excused.add(self.day(owner))

    # ------------------------------------------------------------ invariants

    @invariant()
    def stored_state_is_the_models(self) -> None:
        if not self.agents:
            return
        snap = check_invariants(self.authority, excused=self.model.excused)
        stored = {
            i: (int(b["limit_n"]), int(b["spent_n"]), int(b["reserved_n"])) for i, b in snap.budgets.items()
        }
        assert stored == {i: (b.limit, b.spent, b.reserved) for i, b in self.model.budgets.items()}
        for rid, res in self.model.reservations.items():
            row = snap.reservations[rid]
            assert (row["status"], row["charged_n"], bool(row["estimated"]), bool(row["overrun"])) == (
                res.status,
                res.charged,
                res.estimated,
                res.overrun,
            ), rid
            assert snap.terminal_events[rid] == (0 if res.status == "held" else 1)
        assert set(snap.reservations) == set(self.model.reservations)


def run_machine(backend: Backend, tmp_path: Path, examples: int, steps: int) -> None:
    machine = type("Machine", (LedgerMachine,), {"backend": backend, "home": tmp_path / "home"})
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=steps,
            deadline=None,
            database=None,
            suppress_health_check=[
                HealthCheck.too_slow,
                HealthCheck.filter_too_much,
                HealthCheck.data_too_large,
            ],
        ),
    )


def test_ledger_matches_the_model(backend: Backend, tmp_path: Path) -> None:
    if backend.name == "sqlite":
        run_machine(backend, tmp_path, examples=60, steps=40)
    else:  # a database per example: fewer of them
        run_machine(backend, tmp_path, examples=10, steps=30)
