"""Many gateway calls at once against a small cap: the holds are atomic, so the cap is
never overshot and the provider sees exactly the calls that were allowed."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from paymaster.money import parse_nanos

from .conftest import GEO, KG, OPENAI, Env

pytestmark = pytest.mark.anyio


async def test_hundred_concurrent_calls_overshoot_by_nothing(env: Env) -> None:
    cap = parse_nanos("1.00")
    agent = env.agent(policy={"caps": [{"scope": "all", "period": "day", "limit": "1.00"}]}, fund="50.00")
    responses = await asyncio.gather(*(env.call(agent, "GET", KG, f"/kg/query?q={i}") for i in range(100)))
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert len(ok) == 10
    assert {r.json()["error"]["code"] for r in refused} == {"policy_cap_exceeded"}
    assert env.provider.count == len(ok)
    charged = sum(parse_nanos(r.headers["x-paymaster-charged"]) for r in ok)
    assert charged <= cap
    day = env.authority.agent_budgets(agent.id)["budgets"][1]
    assert parse_nanos(day["spent"]) == charged
    assert parse_nanos(day["reserved"]) == 0


async def test_concurrent_tiered_calls_hold_enough_for_the_tier_they_land_in(env: Env) -> None:
    cap = parse_nanos("0.20")
    agent = env.agent(policy={"caps": [{"scope": "connector:geocode", "period": "day", "limit": "0.20"}]})
    responses = await asyncio.gather(*(env.call(agent, "GET", GEO, f"/geocode?q={i}") for i in range(60)))
    ok = [r for r in responses if r.status_code == 200]
    assert env.provider.count == len(ok) > 5
    reservations = [env.reservation(r) for r in ok]
    assert not any(res["overrun"] for res in reservations)
    charges = sorted(parse_nanos(res["charged"]) for res in reservations)
    assert sum(charges) <= cap
    # no call was charged less than the tier its number fell in: at most five at the first price
    assert charges.count(parse_nanos("0.005")) <= 5


async def test_concurrent_llm_streams_and_json_all_settle(env: Env) -> None:
    agent = env.agent(fund="5.00")
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": "x"}], "max_tokens": 20}

    async def one(i: int) -> httpx.Response:
        return await env.call(
            agent, "POST", OPENAI, "/v1/chat/completions", json={**body, "stream": i % 2 == 0}
        )

    responses = await asyncio.gather(*(one(i) for i in range(40)))
    assert all(r.status_code == 200 for r in responses)
    held = [env.reservation(r) for r in responses]
    assert all(h["status"] == "committed" and not h["estimated"] for h in held)
    wallet = env.budget(f"{agent.id}/total")
    assert parse_nanos(wallet["reserved"]) == 0
    assert parse_nanos(wallet["spent"]) == sum(parse_nanos(h["charged"]) for h in held)
