"""The store conformance suite, through the Authority, once per backend.

Each test drives the verbs of PROTOCOL.md ("Principals and budgets", "Authority API") and
checks the stored budgets, the answers and the audit events; every test ends with the
ledger invariants of conftest.check_invariants.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from paymaster.authority import Caller
from paymaster.errors import (
    AgentFrozen,
    AgentRevoked,
    BalanceInsufficient,
    IdempotencyConflict,
    InvalidAmount,
    InvalidRequest,
    NoBudgetConfigured,
    NotFound,
    PolicyCapExceeded,
    ReservationExpired,
    ReservationSettled,
    SpendDenied,
    TaskForbidden,
)

from .conftest import Ledger, check_invariants, n

THRESHOLD = "dev.paymaster.budget.threshold_crossed"


def day_cap(limit: str, scope: str = "all", **extra: Any) -> dict[str, Any]:
    return {"scope": scope, "period": "day", "limit": limit, **extra}


def policy(*caps: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"caps": list(caps), **extra}


@pytest.fixture(autouse=True)
def _invariants_hold_after_each_test(ledger: Ledger) -> Iterator[None]:
    yield
    check_invariants(ledger.authority, excused=getattr(ledger, "excused", ()))


def denial(exc_info: pytest.ExceptionInfo[SpendDenied]) -> tuple[str, int, str | None]:
    exc = exc_info.value
    return exc.code, exc.status, exc.budget_id


def path_states(ledger: Ledger, ids: list[str]) -> dict[str, tuple[int, int, int]]:
    return {i: ledger.state(i) for i in ids}


# ---------------------------------------------------------------- the budget path


def test_reserve_holds_on_every_budget_of_the_path(ledger: Ledger) -> None:
    ledger.authority.put_principal("team-a", {"policy": policy(day_cap("4.00"))})
    agent = ledger.agent(
        fund="10.00", parent="team-a", policy=policy(day_cap("5.00"), day_cap("3.00", "connector:tool"))
    )
    path = [f"{agent}/total", ledger.day(agent), ledger.day(agent, "connector:tool"), ledger.day("team-a")]

    res = ledger.reserve(agent, "2.00")

    assert [b["id"] for b in res["budgets"]] == path
    assert [b["remaining"] for b in res["budgets"]] == ["8.00", "3.00", "1.00", "2.00"]
    assert {i: ledger.state(i)[2] for i in path} == dict.fromkeys(path, n("2.00"))


def test_a_denied_reserve_holds_nothing_and_names_the_first_budget_that_cannot_hold(ledger: Ledger) -> None:
    ledger.authority.put_principal("team-b", {"policy": policy(day_cap("4.00"))})
    agent = ledger.agent(
        fund="10.00", parent="team-b", policy=policy(day_cap("5.00"), day_cap("3.00", "connector:tool"))
    )
    ledger.reserve(agent, "2.00")
    path = [f"{agent}/total", ledger.day(agent), ledger.day(agent, "connector:tool"), ledger.day("team-b")]
    before = path_states(ledger, path)

    with pytest.raises(PolicyCapExceeded) as exc:
        ledger.reserve(agent, "2.50")  # the wallet and the all-cap could; the connector cap cannot

    assert denial(exc) == ("policy_cap_exceeded", 402, ledger.day(agent, "connector:tool"))
    assert exc.value.remaining == "1.00"
    assert exc.value.requested == "2.50"
    assert path_states(ledger, path) == before
    denied = ledger.events("dev.paymaster.reservation.denied")[-1]["data"]
    assert (denied["reason_code"], denied["budget_id"]) == (
        "policy_cap_exceeded",
        ledger.day(agent, "connector:tool"),
    )


def test_the_wallet_is_checked_first(ledger: Ledger) -> None:
    agent = ledger.agent(fund="1.00", policy=policy(day_cap("0.50")))
    with pytest.raises(BalanceInsufficient) as exc:
        ledger.reserve(agent, "2.00")  # neither the wallet nor the cap can: the wallet is named
    assert denial(exc) == ("balance_insufficient", 402, f"{agent}/total")
    assert exc.value.remaining == "1.00"
    assert ledger.state(ledger.day(agent)) == (0, 0, 0)


@pytest.mark.parametrize("first", ["all", "connector:tool"])
def test_agent_caps_are_checked_in_policy_order(ledger: Ledger, first: str) -> None:
    other = "connector:tool" if first == "all" else "all"
    agent = ledger.agent(fund="10.00", policy=policy(day_cap("1.00", first), day_cap("1.00", other)))
    with pytest.raises(PolicyCapExceeded) as exc:
        ledger.reserve(agent, "1.50")
    assert exc.value.budget_id == ledger.day(agent, None if first == "all" else first)


def test_parents_are_checked_nearest_first_and_after_the_agent(ledger: Ledger) -> None:
    ledger.authority.put_principal("org-c", {"policy": policy(day_cap("1.00"))})
    ledger.authority.put_principal("team-c", {"parent": "org-c", "policy": policy(day_cap("1.00"))})
    agent = ledger.agent(fund="10.00", parent="team-c", policy=policy(day_cap("5.00")))
    with pytest.raises(PolicyCapExceeded) as exc:
        ledger.reserve(agent, "2.00")
    assert exc.value.budget_id == ledger.day("team-c")

    capped = ledger.agent(fund="10.00", parent="team-c", policy=policy(day_cap("1.50")))
    with pytest.raises(PolicyCapExceeded) as exc:
        ledger.reserve(capped, "2.00")
    assert exc.value.budget_id == ledger.day(capped)


def test_tasks_are_checked_from_the_calls_task_up(ledger: Ledger) -> None:
    agent = ledger.agent(fund="10.00")
    root = ledger.authority.create_task({"limit": "1.00", "agents": [agent]}, Caller.admin())["task_id"]
    child = ledger.authority.create_task(
        {"limit": "1.00", "parent_task": root, "agents": [agent]}, Caller.admin()
    )["task_id"]
    with pytest.raises(PolicyCapExceeded) as exc:
        ledger.reserve(agent, "2.00", task=child)
    assert exc.value.budget_id == child
    assert ledger.state(child)[2] == ledger.state(root)[2] == 0
    with pytest.raises(PolicyCapExceeded) as exc:
        ledger.reserve(agent, "2.00", task=root)
    assert exc.value.budget_id == root


# ---------------------------------------------------------------- default deny


def test_no_wallet_and_no_cap_is_no_budget_configured(ledger: Ledger) -> None:
    agent = ledger.agent()
    with pytest.raises(NoBudgetConfigured) as exc:
        ledger.reserve(agent, "0.01")
    assert denial(exc)[:2] == ("no_budget_configured", 403)


def test_zero_amount_without_budget_is_still_denied(ledger: Ledger) -> None:
    agent = ledger.agent()
    with pytest.raises(NoBudgetConfigured):
        ledger.reserve(agent, "0")


def test_a_task_alone_is_not_a_budget_configuration(ledger: Ledger) -> None:
    agent = ledger.agent()
    task = ledger.authority.create_task({"limit": "5.00", "agents": [agent]}, Caller.admin())["task_id"]
    with pytest.raises(NoBudgetConfigured):
        ledger.reserve(agent, "0.10", task=task)
    assert ledger.state(task) == (n("5.00"), 0, 0)


def test_a_cap_alone_or_a_parents_cap_alone_is_a_budget_configuration(ledger: Ledger) -> None:
    capped = ledger.agent(policy=policy(day_cap("1.00")))
    assert [b["id"] for b in ledger.reserve(capped, "0.10")["budgets"]] == [ledger.day(capped)]
    ledger.authority.put_principal("team-d", {"policy": policy(day_cap("1.00"))})
    child = ledger.agent(parent="team-d")
    assert [b["id"] for b in ledger.reserve(child, "0.10")["budgets"]] == [ledger.day("team-d")]


@pytest.mark.parametrize("capped", [False, True])
def test_a_reserve_that_fits_exactly_is_allowed_and_one_nano_more_is_not(
    ledger: Ledger, capped: bool
) -> None:
    agent = ledger.agent(
        fund="100.00" if capped else "1.00", policy=policy(day_cap("1.00")) if capped else None
    )
    budget = ledger.day(agent) if capped else f"{agent}/total"
    ledger.reserve(agent, "0.999999999")
    with pytest.raises((BalanceInsufficient, PolicyCapExceeded)) as exc:
        ledger.reserve(agent, "0.000000002")
    assert (exc.value.budget_id, exc.value.remaining) == (budget, "0.000000001")
    ledger.reserve(agent, "0.000000001")
    with pytest.raises((BalanceInsufficient, PolicyCapExceeded)):
        ledger.reserve(agent, "0.000000001")
    ledger.reserve(agent, "0")  # nothing left, and nothing asked: fits
    assert ledger.state(budget) == (n("1.00"), 0, n("1.00"))


def test_a_hold_past_its_expiry_no_longer_counts_even_before_the_sweeper(ledger: Ledger) -> None:
    agent = ledger.agent(fund="1.00")
    first = ledger.reserve(agent, "1.00", ttl=30)
    ledger.clock.advance(30)
    second = ledger.reserve(agent, "1.00")  # the due hold is expired on the way, then this one fits
    assert ledger.reservation(first["reservation_id"])["status"] == "expired"
    assert ledger.state(f"{agent}/total") == (n("1.00"), 0, n("1.00"))
    assert second["budgets"][0]["remaining"] == "0.00"


# ---------------------------------------------------------------- commit and release


def test_commit_less_charges_it_and_releases_the_rest(ledger: Ledger) -> None:
    agent = ledger.agent(fund="10.00", policy=policy(day_cap("5.00")))
    res = ledger.reserve(agent, "1.00")
    out = ledger.commit(res["reservation_id"], "0.40")
    assert (out["charged"], out["released"], out["overrun"], out["estimated"]) == (
        "0.40",
        "0.60",
        False,
        False,
    )
    assert ledger.state(f"{agent}/total") == (n("10.00"), n("0.40"), 0)
    assert ledger.state(ledger.day(agent)) == (n("5.00"), n("0.40"), 0)
    view = ledger.reservation(res["reservation_id"])
    assert (view["status"], view["charged"], view["ledger_entry_id"]) == (
        "committed",
        "0.40",
        out["ledger_entry_id"],
    )
    [entry] = ledger.authority.ledger(agent=agent)
    assert (entry["id"], entry["total"], entry["kind"]) == (out["ledger_entry_id"], "0.40", "charge")


def test_commit_equal_and_commit_without_amount_charge_the_hold(ledger: Ledger) -> None:
    agent = ledger.agent(fund="10.00")
    first = ledger.commit(ledger.reserve(agent, "1.00")["reservation_id"], "1.00")
    second = ledger.commit(ledger.reserve(agent, "2.00")["reservation_id"])
    assert (first["charged"], first["released"], first["overrun"]) == ("1.00", "0.00", False)
    assert (second["charged"], second["released"], second["overrun"]) == ("2.00", "0.00", False)
    assert ledger.state(f"{agent}/total") == (n("10.00"), n("3.00"), 0)


def test_commit_more_is_charged_in_full_flagged_overrun_and_remaining_goes_negative(ledger: Ledger) -> None:
    agent = ledger.agent(fund="1.20", policy=policy(day_cap("1.00")))
    res = ledger.reserve(agent, "1.00")
    out = ledger.commit(res["reservation_id"], "1.50")
    assert (out["charged"], out["released"], out["overrun"]) == ("1.50", "0.00", True)
    wallet = ledger.budget(f"{agent}/total")
    assert (wallet["spent"], wallet["reserved"], wallet["remaining"]) == ("1.50", "0.00", "-0.30")
    assert ledger.budget(ledger.day(agent))["remaining"] == "-0.50"
    assert ledger.reservation(res["reservation_id"])["overrun"] is True
    # later calls see the budget as it truly stands
    with pytest.raises(BalanceInsufficient) as exc:
        ledger.reserve(agent, "0")
    assert exc.value.remaining == "-0.30"


def test_commit_of_zero_writes_a_ledger_entry_that_cannot_be_refunded(ledger: Ledger) -> None:
    agent = ledger.agent(fund="1.00")
    res = ledger.reserve(agent, "0.50")
    out = ledger.commit(res["reservation_id"], "0")
    assert (out["charged"], out["released"]) == ("0.00", "0.50")
    [entry] = ledger.authority.ledger(agent=agent)
    assert (entry["id"], entry["total"]) == (out["ledger_entry_id"], "0.00")
    with pytest.raises(InvalidAmount):
        ledger.refund(out["ledger_entry_id"], "0.01")
    assert ledger.state(f"{agent}/total") == (n("1.00"), 0, 0)


def test_release_gives_the_hold_back_once(ledger: Ledger) -> None:
    agent = ledger.agent(fund="1.00", policy=policy(day_cap("1.00")))
    res = ledger.reserve(agent, "0.70")
    assert ledger.release(res["reservation_id"]) == {
        "reservation_id": res["reservation_id"],
        "released": "0.70",
    }
    assert ledger.state(f"{agent}/total") == ledger.state(ledger.day(agent)) == (n("1.00"), 0, 0)
    assert ledger.reservation(res["reservation_id"])["status"] == "released"
    # a repeated release answers the same and changes nothing; a commit after it is refused
    assert ledger.release(res["reservation_id"])["released"] == "0.70"
    with pytest.raises(ReservationSettled) as exc:
        ledger.commit(res["reservation_id"], "0.10")
    assert exc.value.status == 409
    assert ledger.state(f"{agent}/total") == (n("1.00"), 0, 0)
    assert len(ledger.events("dev.paymaster.reservation.released")) == 1


def test_double_commit_is_reservation_settled(ledger: Ledger) -> None:
    agent = ledger.agent(fund="5.00")
    res = ledger.reserve(agent, "1.00")
    ledger.commit(res["reservation_id"], "0.50")
    with pytest.raises(ReservationSettled) as exc:
        ledger.commit(res["reservation_id"], "0.50")
    assert (exc.value.code, exc.value.status) == ("reservation_settled", 409)
    with pytest.raises(ReservationSettled):
        ledger.release(res["reservation_id"])
    assert ledger.state(f"{agent}/total") == (n("5.00"), n("0.50"), 0)
    assert len(ledger.authority.ledger(agent=agent)) == 1


def test_commit_after_expiry_is_reservation_expired_and_the_hold_is_released(ledger: Ledger) -> None:
    agent = ledger.agent(fund="5.00", policy=policy(day_cap("2.00")))
    res = ledger.reserve(agent, "1.00", ttl=60)
    ledger.clock.advance(60)
    with pytest.raises(ReservationExpired) as exc:
        ledger.commit(res["reservation_id"], "1.00")
    assert (exc.value.code, exc.value.status) == ("reservation_expired", 409)
    assert ledger.state(f"{agent}/total") == (n("5.00"), 0, 0)
    assert ledger.state(ledger.day(agent)) == (n("2.00"), 0, 0)
    view = ledger.reservation(res["reservation_id"])
    assert (view["status"], view["charged"]) == ("expired", "0.00")
    with pytest.raises(ReservationExpired):
        ledger.release(res["reservation_id"])
    assert ledger.authority.expire_due() == 0
    assert len(ledger.events("dev.paymaster.reservation.expired")) == 1
    assert ledger.authority.ledger(agent=agent) == []


def test_expiry_sweep_charges_a_sent_request_at_the_hold_flagged_estimated(ledger: Ledger) -> None:
    agent = ledger.agent(fund="5.00", policy=policy(day_cap("3.00")))
    sent = ledger.reserve(agent, "1.00", ttl=30)
    ledger.authority.mark_request_sent(sent["reservation_id"])
    unsent = ledger.reserve(agent, "0.50", ttl=30)
    later = ledger.reserve(agent, "0.25", ttl=3600)
    ledger.clock.advance(29)
    assert ledger.authority.expire_due() == 0
    ledger.clock.advance(1)

    assert ledger.authority.expire_due() == 2

    charged = ledger.reservation(sent["reservation_id"])
    assert (charged["status"], charged["charged"], charged["estimated"]) == ("expired", "1.00", True)
    [entry] = ledger.authority.ledger(agent=agent)
    assert (entry["id"], entry["total"], entry["estimated"]) == (charged["ledger_entry_id"], "1.00", True)
    released = ledger.reservation(unsent["reservation_id"])
    assert (released["status"], released["charged"], released["ledger_entry_id"]) == ("expired", "0.00", None)
    assert ledger.reservation(later["reservation_id"])["status"] == "held"
    assert ledger.state(f"{agent}/total") == (n("5.00"), n("1.00"), n("0.25"))
    assert ledger.state(ledger.day(agent)) == (n("3.00"), n("1.00"), n("0.25"))
    assert ledger.authority.expire_due() == 0
    expired = Counter(e["subject"] for e in ledger.events("dev.paymaster.reservation.expired"))
    assert expired == {sent["reservation_id"]: 1, unsent["reservation_id"]: 1}


# ---------------------------------------------------------------- refunds


def test_refund_gives_back_to_every_budget_in_the_window_of_the_charge(ledger: Ledger) -> None:
    ledger.authority.put_principal("team-e", {"policy": policy(day_cap("10.00"))})
    agent = ledger.agent(fund="20.00", parent="team-e", policy=policy(day_cap("5.00")))
    task = ledger.authority.create_task({"limit": "8.00", "agents": [agent]}, Caller.admin())["task_id"]
    res = ledger.reserve(agent, "2.00", task=task)
    charge = ledger.commit(res["reservation_id"], "1.50")
    charged_in = [f"{agent}/total", ledger.day(agent), ledger.day("team-e"), task]
    ledger.clock.advance(86400)  # the next day: the refund goes back to yesterday's windows
    ledger.reserve(agent, "0.10")

    out = ledger.refund(charge["ledger_entry_id"], "0.50")

    assert out["amount"] == "0.50"
    assert [ledger.state(i)[1] for i in charged_in] == [n("1.00")] * 4
    assert ledger.state(ledger.day(agent)) == (n("5.00"), 0, n("0.10"))
    assert ledger.state(ledger.day("team-e")) == (n("10.00"), 0, n("0.10"))
    refunds = [e for e in ledger.authority.ledger(agent=agent) if e["kind"] == "refund"]
    assert [(e["id"], e["total"], e["refund_of"]) for e in refunds] == [
        (out["refund_id"], "-0.50", charge["ledger_entry_id"])
    ]
    event = ledger.events("dev.paymaster.refund.created")[-1]["data"]
    assert (event["amount"], sorted(event["budgets"])) == ("0.50", sorted(charged_in))


def test_refund_is_at_most_what_is_left_of_the_charge(ledger: Ledger) -> None:
    agent = ledger.agent(fund="5.00")
    charge = ledger.commit(ledger.reserve(agent, "1.00")["reservation_id"], "1.00")["ledger_entry_id"]
    ledger.refund(charge, "0.30")
    with pytest.raises(InvalidAmount) as exc:
        ledger.refund(charge, "0.71")
    assert (exc.value.code, exc.value.status, exc.value.remaining) == ("invalid_amount", 422, "0.70")
    ledger.refund(charge, "0.70")
    with pytest.raises(InvalidAmount):
        ledger.refund(charge, "0.000000001")
    assert ledger.state(f"{agent}/total") == (n("5.00"), 0, 0)


# ---------------------------------------------------------------- idempotency


def test_a_replayed_reserve_returns_the_first_answer_and_holds_once(ledger: Ledger) -> None:
    agent = ledger.agent(fund="5.00")
    first = ledger.reserve(agent, "1.00", key="r-1")
    again = ledger.reserve(agent, "1.00", key="r-1")
    assert again == first
    assert ledger.state(f"{agent}/total")[2] == n("1.00")
    assert len(ledger.events("dev.paymaster.reservation.allowed")) == 1


def test_a_replayed_denial_stays_denied(ledger: Ledger) -> None:
    agent = ledger.agent(fund="1.00")
    first = ledger.reserve_answer(agent, "2.00", key="r-2")
    assert (first.status, first.body["error"]["code"]) == (402, "balance_insufficient")
    ledger.fund(agent, "5.00")  # the same call would fit now; its key still answers the denial
    assert ledger.reserve_answer(agent, "2.00", key="r-2") == first
    assert ledger.state(f"{agent}/total") == (n("6.00"), 0, 0)
    assert len(ledger.events("dev.paymaster.reservation.denied")) == 1


def test_the_same_key_with_a_different_body_is_idempotency_conflict(ledger: Ledger) -> None:
    agent = ledger.agent(fund="5.00")
    ledger.reserve(agent, "1.00", key="r-3")
    with pytest.raises(IdempotencyConflict) as exc:
        ledger.reserve(agent, "1.01", key="r-3")
    assert (exc.value.code, exc.value.status) == ("idempotency_conflict", 409)
    assert ledger.state(f"{agent}/total")[2] == n("1.00")


def test_replayed_commit_and_refund_return_the_first_answer(ledger: Ledger) -> None:
    agent = ledger.agent(fund="5.00")
    res = ledger.reserve(agent, "1.00")["reservation_id"]
    first = ledger.commit(res, "0.60", key="c-1")
    assert ledger.commit(res, "0.60", key="c-1") == first
    with pytest.raises(IdempotencyConflict):
        ledger.commit(res, "0.70", key="c-1")
    with pytest.raises(ReservationSettled):
        ledger.commit(res, "0.60", key="c-2")
    refund = ledger.refund(first["ledger_entry_id"], "0.10", key="f-1")
    assert ledger.refund(first["ledger_entry_id"], "0.10", key="f-1") == refund
    with pytest.raises(IdempotencyConflict):
        ledger.refund(first["ledger_entry_id"], "0.20", key="f-1")
    assert ledger.state(f"{agent}/total") == (n("5.00"), n("0.50"), 0)


# ---------------------------------------------------------------- TTL


@pytest.mark.parametrize("ttl", [0, -5, 3601])
def test_ttl_outside_1_to_3600_is_invalid_request(ledger: Ledger, ttl: int) -> None:
    agent = ledger.agent(fund="5.00")
    with pytest.raises(InvalidRequest) as exc:
        ledger.reserve(agent, "1.00", ttl=ttl)
    assert (exc.value.code, exc.value.status) == ("invalid_request", 422)
    assert ledger.state(f"{agent}/total") == (n("5.00"), 0, 0)


def test_ttl_bounds_and_default(ledger: Ledger) -> None:
    agent = ledger.agent(fund="5.00")
    longest = ledger.reserve(agent, "0.10", ttl=3600)
    default = ledger.reserve(agent, "0.10")
    start = ledger.clock.now
    assert longest["expires_at"] == f"{start.replace(hour=10):%Y-%m-%dT%H:%M:%S.%fZ}"
    assert default["expires_at"] == f"{start.replace(minute=5):%Y-%m-%dT%H:%M:%S.%fZ}"
    ledger.clock.advance(300)
    assert ledger.authority.expire_due() == 1
    ledger.clock.advance(3300)
    assert ledger.authority.expire_due() == 1


# ---------------------------------------------------------------- shadow caps


def test_shadow_caps_record_shadow_denials_and_deny_nothing(ledger: Ledger) -> None:
    agent = ledger.agent(fund="10.00", policy=policy(day_cap("1.00", mode="shadow")))
    cap = ledger.day(agent)
    within = ledger.reserve(agent, "0.80")
    assert "shadow_denials" not in within
    over = ledger.reserve(agent, "0.50")
    assert over["shadow_denials"] == [cap]
    assert ledger.budget(cap)["remaining"] == "-0.30"
    allowed = ledger.events("dev.paymaster.reservation.allowed")
    assert "shadow_denials" not in allowed[0]["data"]
    assert allowed[1]["data"]["shadow_denials"] == [cap]
    assert ledger.events("dev.paymaster.reservation.denied") == []
    # an enforce cap beside it still denies
    ledger.authority.set_agent_policy(
        agent, policy(day_cap("1.00", mode="shadow"), day_cap("0.50", "connector:tool"))
    )
    with pytest.raises(PolicyCapExceeded) as exc:
        ledger.reserve(agent, "0.60")
    assert exc.value.budget_id == ledger.day(agent, "connector:tool")


# ---------------------------------------------------------------- alert thresholds


def crossings(ledger: Ledger, budget_id: str) -> list[str]:
    return [e["data"]["threshold"] for e in ledger.events(THRESHOLD) if e["data"]["budget_id"] == budget_id]


def test_thresholds_are_crossed_once_each_per_window(ledger: Ledger) -> None:
    agent = ledger.agent(fund="1000.00", policy=policy(day_cap("10.00")))
    cap = ledger.day(agent)
    ledger.reserve(agent, "4.99")
    assert crossings(ledger, cap) == []
    first = ledger.reserve(agent, "0.01")
    assert crossings(ledger, cap) == ["0.5"]
    assert first["warnings"] == [f"low_balance; budget={cap}; used=0.50"]
    second = ledger.reserve(agent, "2.50")
    assert crossings(ledger, cap) == ["0.5", "0.75"]
    ledger.release(second["reservation_id"])
    ledger.reserve(agent, "2.50")  # back over 0.75: not again in this window
    assert crossings(ledger, cap) == ["0.5", "0.75"]
    last = ledger.reserve(agent, "1.00")
    ledger.commit(last["reservation_id"], "1.50")  # a commit crosses too: 9.50 / 10
    assert crossings(ledger, cap) == ["0.5", "0.75", "0.9"]
    assert crossings(ledger, f"{agent}/total") == []

    ledger.clock.advance(86400)
    next_cap = ledger.day(agent)
    assert next_cap != cap
    ledger.reserve(agent, "9.50")
    assert crossings(ledger, next_cap) == ["0.5", "0.75", "0.9"]
    assert len(ledger.events(THRESHOLD)) == 6


def test_wallet_thresholds(ledger: Ledger) -> None:
    agent = ledger.agent(fund="10.00", policy={"alert_thresholds": ["0.8"]})
    ledger.reserve(agent, "7.00")
    assert crossings(ledger, f"{agent}/total") == []
    ledger.reserve(agent, "1.00")
    ledger.reserve(agent, "1.00")
    assert crossings(ledger, f"{agent}/total") == ["0.8"]


# ---------------------------------------------------------------- session caps


def test_session_caps_apply_only_when_the_call_names_a_session(ledger: Ledger) -> None:
    agent = ledger.agent(fund="10.00", policy=policy({"scope": "all", "period": "session", "limit": "1.00"}))
    plain = ledger.reserve(agent, "2.00")
    assert [b["id"] for b in plain["budgets"]] == [f"{agent}/total"]
    with pytest.raises(PolicyCapExceeded) as exc:
        ledger.reserve(agent, "2.00", session="s1")
    assert exc.value.budget_id == f"{agent}/session/session:s1"
    ledger.reserve(agent, "0.60", session="s1")
    with pytest.raises(PolicyCapExceeded):
        ledger.reserve(agent, "0.60", session="s1")
    other = ledger.reserve(agent, "0.60", session="s2")
    assert [b["id"] for b in other["budgets"]] == [f"{agent}/total", f"{agent}/session/session:s2"]
    assert ledger.state(f"{agent}/session/session:s1") == (n("1.00"), 0, n("0.60"))


# ---------------------------------------------------------------- policy changes


def test_a_policy_change_applies_at_once_and_keeps_spent_and_reserved(ledger: Ledger) -> None:
    agent = ledger.agent(fund="10.00", policy=policy(day_cap("1.00")))
    cap = ledger.day(agent)
    ledger.commit(ledger.reserve(agent, "0.60")["reservation_id"])
    ledger.reserve(agent, "0.20")

    ledger.authority.set_agent_policy(agent, policy(day_cap("0.70")))

    assert ledger.state(cap) == (n("0.70"), n("0.60"), n("0.20"))
    assert ledger.budget(cap)["remaining"] == "-0.10"
    with pytest.raises(PolicyCapExceeded):
        ledger.reserve(agent, "0.01")
    ledger.excused = {cap}  # type: ignore[attr-defined]  # lowered under its use on purpose

    ledger.authority.set_agent_policy(agent, policy(day_cap("2.00")))
    ledger.reserve(agent, "1.20")
    assert ledger.state(cap) == (n("2.00"), n("0.60"), n("1.40"))
    with pytest.raises(PolicyCapExceeded):
        ledger.reserve(agent, "0.01")
    changes = [e for e in ledger.events("dev.paymaster.policy.changed") if e["subject"] == agent]
    assert [e["data"]["version"] for e in changes] == [1, 2, 3]


def test_a_parents_policy_change_applies_at_once(ledger: Ledger) -> None:
    ledger.authority.put_principal("team-f", {"policy": policy(day_cap("1.00"))})
    agent = ledger.agent(fund="10.00", parent="team-f")
    ledger.reserve(agent, "0.90")
    status, _ = ledger.authority.put_principal("team-f", {"policy": policy(day_cap("3.00"))})
    assert status == 200
    ledger.reserve(agent, "2.00")
    assert ledger.state(ledger.day("team-f")) == (n("3.00"), 0, n("2.90"))


# ---------------------------------------------------------------- parent principals


def test_parent_principals_caps_are_on_the_path(ledger: Ledger) -> None:
    status, _ = ledger.authority.put_principal("org-g", {"policy": policy(day_cap("5.00"))})
    assert status == 201
    ledger.authority.put_principal("team-g1", {"parent": "org-g", "policy": policy(day_cap("3.00"))})
    ledger.authority.put_principal("team-g2", {"parent": "org-g"})
    a = ledger.agent(fund="100.00", parent="team-g1")
    b = ledger.agent(fund="100.00", parent="team-g2")

    res = ledger.reserve(a, "2.50")
    assert [x["id"] for x in res["budgets"]] == [f"{a}/total", ledger.day("team-g1"), ledger.day("org-g")]
    with pytest.raises(PolicyCapExceeded) as exc:
        ledger.reserve(a, "1.00")
    assert exc.value.budget_id == ledger.day("team-g1")
    ledger.reserve(b, "2.00")
    with pytest.raises(PolicyCapExceeded) as exc:
        ledger.reserve(b, "1.00")
    assert exc.value.budget_id == ledger.day("org-g")
    assert ledger.state(ledger.day("org-g")) == (n("5.00"), 0, n("4.50"))


def test_a_principal_loop_is_invalid_request(ledger: Ledger) -> None:
    ledger.authority.put_principal("loop-a", {})
    ledger.authority.put_principal("loop-b", {"parent": "loop-a"})
    with pytest.raises(InvalidRequest):
        ledger.authority.put_principal("loop-a", {"parent": "loop-b"})


# ---------------------------------------------------------------- tasks


def test_a_task_chain_debits_every_ancestor(ledger: Ledger) -> None:
    lead = ledger.agent(fund="10.00")
    worker = ledger.agent(fund="10.00")
    root = ledger.authority.create_task({"limit": "5.00", "agents": [lead]}, Caller.admin())
    mid = ledger.authority.create_task(
        {"limit": "4.00", "parent_task": root["task_id"], "agents": [lead, worker]},
        Caller("agent", agent_id=lead),
    )
    leaf = ledger.authority.create_task(
        {"limit": "3.00", "parent_task": mid["task_id"], "agents": [worker]}, Caller.admin()
    )
    tasks = [leaf["task_id"], mid["task_id"], root["task_id"]]

    res = ledger.reserve(worker, "1.00", task=leaf["task_id"])
    assert [b["id"] for b in res["budgets"]] == [f"{worker}/total", *tasks]
    ledger.commit(res["reservation_id"], "0.80")
    assert [ledger.state(t)[1] for t in tasks] == [n("0.80")] * 3
    ledger.reserve(lead, "3.00", task=root["task_id"])
    with pytest.raises(PolicyCapExceeded) as exc:
        ledger.reserve(worker, "1.50", task=leaf["task_id"])  # leaf and mid could; root cannot
    assert exc.value.budget_id == root["task_id"]


def test_only_the_agents_listed_on_a_task_may_charge_it(ledger: Ledger) -> None:
    lead = ledger.agent(fund="10.00")
    worker = ledger.agent(fund="10.00")
    stranger = ledger.agent(fund="10.00")
    root = ledger.authority.create_task({"limit": "5.00", "agents": [lead]}, Caller.admin())["task_id"]
    leaf = ledger.authority.create_task(
        {"limit": "3.00", "parent_task": root, "agents": [worker]}, Caller.admin()
    )["task_id"]
    for agent, task in ((lead, leaf), (stranger, root), (worker, root)):
        with pytest.raises(TaskForbidden) as exc:
            ledger.reserve(agent, "0.10", task=task)
        assert (exc.value.code, exc.value.status) == ("task_forbidden", 403)
    with pytest.raises(TaskForbidden):
        ledger.authority.create_task(
            {"limit": "1.00", "parent_task": leaf, "agents": [stranger]}, Caller("agent", agent_id=stranger)
        )
    assert [ledger.state(t)[2] for t in (leaf, root)] == [0, 0]
    assert [e["data"]["reason_code"] for e in ledger.events("dev.paymaster.reservation.denied")] == [
        "task_forbidden"
    ] * 3


# ---------------------------------------------------------------- agent status


def test_freeze_unfreeze_and_revoke(ledger: Ledger) -> None:
    agent = ledger.agent(fund="5.00")
    held = ledger.reserve(agent, "1.00")
    ledger.authority.set_status(agent, "frozen")
    with pytest.raises(AgentFrozen) as frozen:
        ledger.reserve(agent, "0.10")
    assert (frozen.value.code, frozen.value.status) == ("agent_frozen", 403)
    ledger.commit(held["reservation_id"], "0.50")  # what was held before the freeze still settles
    ledger.authority.set_status(agent, "active")
    ledger.reserve(agent, "0.10")

    ledger.authority.set_status(agent, "revoked")
    with pytest.raises(AgentRevoked) as exc:
        ledger.reserve(agent, "0.10")
    assert exc.value.status == 401
    with pytest.raises(AgentRevoked) as exc:
        ledger.fund(agent, "1.00")
    assert (exc.value.code, exc.value.status) == ("agent_revoked", 409)
    for status in ("active", "frozen"):
        with pytest.raises(AgentRevoked) as exc:
            ledger.authority.set_status(agent, status)
        assert exc.value.status == 409
    assert ledger.authority.get_agent(agent)["status"] == "revoked"
    assert ledger.state(f"{agent}/total") == (n("5.00"), n("0.50"), n("0.10"))
    types = [
        e["type"].rsplit(".", 1)[1] for e in ledger.events() if e["type"].startswith("dev.paymaster.agent.")
    ]
    assert types == ["created", "frozen", "unfrozen", "revoked"]


def test_an_agent_settles_only_its_own_reservations(ledger: Ledger) -> None:
    owner = ledger.agent(fund="1.00", name="owner")
    other = ledger.agent(fund="1.00", name="other")
    res = ledger.reserve(owner, "0.40")
    intruder = Caller("agent", agent_id=other)
    with pytest.raises(NotFound):
        ledger.authority.commit(res["reservation_id"], amount=n("0.10"), caller=intruder)
    with pytest.raises(NotFound):
        ledger.authority.release(res["reservation_id"], caller=intruder)
    with pytest.raises(NotFound):
        ledger.authority.check_reservation_access(res["reservation_id"], intruder)
    assert ledger.reservation(res["reservation_id"])["status"] == "held"
    assert ledger.state(f"{owner}/total") == (n("1.00"), 0, n("0.40"))
    committed = ledger.authority.commit(
        res["reservation_id"], amount=n("0.10"), caller=Caller("agent", agent_id=owner)
    )
    assert committed["charged"] == "0.10"
