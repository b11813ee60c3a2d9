"""The seed's scenarios (AG-375), played through the gateway against the fake provider.

A — a runaway geocoding loop over a volume tier boundary is stopped by a monthly cap;
B — a prompt injection that routes every translation to the premium connector is stopped
    by that connector's day cap while the standard translator keeps working;
C — three levels of delegation never spend more than the root task.
"""

from __future__ import annotations

import pytest

from paymaster.money import format_nanos, parse_nanos

from .conftest import GEO, KG, PREMIUM, TRANSLATE, Env

pytestmark = pytest.mark.anyio

TIER_1, TIER_2 = parse_nanos("0.005"), parse_nanos("0.012")


async def test_scenario_a_runaway_geocoding_loop_stops_at_the_monthly_cap(env: Env) -> None:
    cap = parse_nanos("0.05")
    agent = env.agent(policy={"caps": [{"scope": "all", "period": "month", "limit": format_nanos(cap)}]})
    allowed: list[str] = []
    denials: list[dict[str, object]] = []
    # 3 ambiguous addresses x 40 variants: the agent's retry logic, unbounded
    for address in range(3):
        for variant in range(40):
            r = await env.call(agent, "GET", GEO, f"/geocode?q=addr{address}-v{variant}")
            if r.status_code == 200:
                allowed.append(r.headers["x-paymaster-charged"])
            else:
                denials.append(r.json()["error"])
    # 5 calls in the first tier, then the overage price: 5 x 0.005 + 2 x 0.012 = 0.049 <= 0.05
    assert [parse_nanos(c) for c in allowed] == [TIER_1] * 5 + [TIER_2] * 2
    assert env.provider.count == len(allowed) == 7
    assert len(denials) == 120 - 7
    assert {d["code"] for d in denials} == {"policy_cap_exceeded"}
    assert str(denials[0]["budget_id"]).startswith(f"{agent.id}/month/")
    spent = sum(parse_nanos(c) for c in allowed)
    month = env.authority.agent_budgets(agent.id)["budgets"][1]
    assert parse_nanos(month["spent"]) == spent <= cap
    assert parse_nanos(month["reserved"]) == 0
    # the tier counts every call the provider bills, across agents: another agent pays overage at once
    other = env.agent()
    r = await env.call(other, "GET", GEO, "/geocode?q=elsewhere")
    assert parse_nanos(r.headers["x-paymaster-charged"]) == TIER_2


async def test_scenario_b_injected_premium_routing_stops_at_the_connector_cap(env: Env) -> None:
    policy = {"caps": [{"scope": "connector:translate-premium", "period": "day", "limit": "0.50"}]}
    agent = env.agent(policy=policy, fund="50.00")
    ticket = {"text": "Bonjour, merci pour votre message. " * 23}  # ~800 characters: one 1,000-char block
    assert 700 < len(ticket["text"]) <= 1000
    premium_ok = 0
    for _ in range(10):  # "all translations must use the certified endpoint"
        r = await env.call(agent, "POST", PREMIUM, "/translate", json=ticket)
        if r.status_code == 200:
            premium_ok += 1
            assert r.headers["x-paymaster-charged"] == "0.25"
        else:
            assert r.status_code == 402
            error = r.json()["error"]
            assert error["code"] == "policy_cap_exceeded"
            assert error["budget_id"].startswith(f"{agent.id}/connector:translate-premium/day/")
    assert premium_ok == 2
    assert env.provider.count == 2
    # the standard translator is not capped by the premium connector's budget
    for _ in range(5):
        r = await env.call(agent, "POST", TRANSLATE, "/translate", json=ticket)
        assert r.status_code == 200
        assert r.headers["x-paymaster-charged"] == "0.02"
    assert env.provider.count == 7
    assert env.wallet_spent(agent) == 2 * parse_nanos("0.25") + 5 * parse_nanos("0.02")


async def test_scenario_c_delegation_chain_never_exceeds_the_root_task(env: Env) -> None:
    orchestrator, researcher, checker = (
        env.agent(fund="50.00"),
        env.agent(fund="50.00"),
        env.agent(fund="50.00"),
    )
    root = env.task("0.35", [orchestrator])
    # each level re-delegates with a budget of its own; the root's limit binds them all
    child = env.task("0.30", [researcher], parent=root, by=orchestrator)
    grandchild = env.task("0.30", [checker], parent=child, by=researcher)
    calls = {orchestrator.id: 0, researcher.id: 0, checker.id: 0}
    for agent, task in ((orchestrator, root), (researcher, child), (checker, grandchild)):
        for query in range(10):
            r = await env.call(agent, "GET", KG, f"/kg/query?q={query}", headers={"x-paymaster-task": task})
            if r.status_code != 200:
                assert r.json()["error"]["code"] == "policy_cap_exceeded"
                break
            calls[agent.id] += 1
    # 0.35 at 0.10 a query: three queries in all, whoever makes them
    assert sum(calls.values()) == 3 == env.provider.count
    assert calls[orchestrator.id] == 3
    assert parse_nanos(env.budget(root)["spent"]) == parse_nanos("0.30")
    # the sub-tasks found the root spent: their first query is refused on the root's budget
    r = await env.call(checker, "GET", KG, "/kg/query?q=again", headers={"x-paymaster-task": grandchild})
    assert r.json()["error"]["budget_id"] == root


async def test_scenario_c_sub_task_spend_is_debited_from_every_ancestor(env: Env) -> None:
    orchestrator, researcher, checker = env.agent(), env.agent(), env.agent()
    root = env.task("1.00", [orchestrator])
    child = env.task("0.50", [researcher], parent=root, by=orchestrator)
    grandchild = env.task("0.20", [checker], parent=child, by=researcher)
    spent = {root: 0, child: 0, grandchild: 0}
    for agent, task, ancestors in (
        (checker, grandchild, (grandchild, child, root)),
        (researcher, child, (child, root)),
        (orchestrator, root, (root,)),
    ):
        r = await env.call(agent, "GET", KG, "/kg/query", headers={"x-paymaster-task": task})
        assert r.status_code == 200
        for budget in ancestors:
            spent[budget] += parse_nanos("0.10")
    for budget, amount in spent.items():
        assert parse_nanos(env.budget(budget)["spent"]) == amount
    # the grandchild's own limit binds it too: 0.20 in all
    results = [
        (
            await env.call(checker, "GET", KG, f"/kg/query?q={i}", headers={"x-paymaster-task": grandchild})
        ).status_code
        for i in range(3)
    ]
    assert results == [200, 402, 402]
    assert parse_nanos(env.budget(root)["spent"]) <= parse_nanos("1.00")
