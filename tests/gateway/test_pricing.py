"""How the gateway prices a call: every path of a governed host is priced or denied
(never free), allow_with_caps lowers the output bound, on_price_unknown holds its amount,
host globs and deny lists apply, and low balances are announced."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from paymaster.core.pricing import llm_input_bound
from paymaster.money import parse_nanos
from paymaster.pricer import MIN_CAPPED_OUTPUT, TIER_HOLD_LOOKAHEAD

from .conftest import GEO, KG, OPENAI, WILD, Env

pytestmark = pytest.mark.anyio

CHAT = "/v1/chat/completions"
GPT_IN, GPT_OUT = 2500, 10_000


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-test", "messages": [{"role": "user", "content": "hello there"}], **extra}


def code(r: httpx.Response) -> str:
    return str(r.json()["error"]["code"])


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/v1/models", None),  # no model named
        ("POST", "/v1/batches", {"input_file_id": "f1", "endpoint": CHAT, "completion_window": "24h"}),
        ("POST", "/v1/images/generations", {"prompt": "a cat"}),
        ("POST", CHAT, {"model": "unknown-model", "messages": [], "max_tokens": 5}),
        ("POST", "/v1/audio/speech", {"model": "no-such-tts", "input": "hi"}),
    ],
)
async def test_unpriced_paths_of_a_governed_host_are_denied(
    env: Env, method: str, path: str, body: Any
) -> None:
    agent = env.agent()
    r = await env.call(agent, method, OPENAI, path, json=body)
    assert r.status_code == 422
    assert code(r) == "price_unknown"
    assert env.provider.count == 0


async def test_card_max_output_bounds_a_request_without_max_tokens(env: Env) -> None:
    r = await env.call(env.agent(), "POST", OPENAI, CHAT, json=chat())
    assert r.status_code == 200
    worst = llm_input_bound(chat()) * GPT_IN + 1000 * GPT_OUT  # max_output = 1000 in the card
    assert parse_nanos(env.reservation(r)["amount"]) == worst


async def test_no_output_bound_at_all_is_price_unknown(env: Env) -> None:
    body = {"model": "unbounded-test", "messages": [{"role": "user", "content": "hi"}]}
    r = await env.call(env.agent(), "POST", OPENAI, CHAT, json=body)
    assert (r.status_code, code(r)) == (422, "price_unknown")
    assert "max_output" in r.json()["error"]["message"]
    assert env.provider.count == 0


async def test_on_price_unknown_amount_holds_and_charges(env: Env) -> None:
    agent = env.agent(policy={"on_price_unknown": "0.02"})
    r = await env.call(agent, "GET", OPENAI, "/v1/models")
    assert r.status_code == 200
    assert r.headers["x-paymaster-charged"] == "0.02"
    assert env.reservation(r)["estimated"] is True


async def test_on_price_unknown_strictest_of_the_chain(env: Env) -> None:
    env.authority.put_principal("team-strict", {"policy": {"on_price_unknown": "deny"}})
    strict = env.agent(policy={"on_price_unknown": "0.02"}, parent="team-strict")
    r = await env.call(strict, "GET", OPENAI, "/v1/models")
    assert r.status_code == 422
    assert code(r) == "price_unknown"
    env.authority.put_principal("team-lenient", {"policy": {"on_price_unknown": "0.05"}})
    lenient = env.agent(policy={"on_price_unknown": "0.02"}, parent="team-lenient")
    r = await env.call(lenient, "GET", OPENAI, "/v1/models")
    assert r.status_code == 200
    assert r.headers["x-paymaster-charged"] == "0.05"  # the largest amount of the chain
    assert env.provider.count == 1


async def test_allow_with_caps_lowers_max_tokens_to_the_per_call_maximum(env: Env) -> None:
    agent = env.agent(policy={"allow_with_caps": True, "per_call_max": {"llm": "0.001"}})
    body = chat(max_tokens=1000)
    r = await env.call(agent, "POST", OPENAI, CHAT, json=body)
    assert r.status_code == 200, r.text
    expected = (parse_nanos("0.001") - llm_input_bound(body) * GPT_IN) // GPT_OUT
    assert r.headers["x-paymaster-capped-max-tokens"] == str(expected)
    assert env.provider.requests[0].json()["max_tokens"] == expected  # the provider saw the lower bound
    held = env.reservation(r)
    assert held["decision"] == "allow_with_caps"
    assert parse_nanos(held["amount"]) <= parse_nanos("0.001")


async def test_allow_with_caps_fits_the_remaining_budget(env: Env) -> None:
    agent = env.agent(policy={"allow_with_caps": True}, fund="0.002")
    body = chat(max_completion_tokens=5000, max_tokens=4000)
    r = await env.call(agent, "POST", OPENAI, CHAT, json=body)
    assert r.status_code == 200, r.text
    sent = env.provider.requests[0].json()
    capped = int(r.headers["x-paymaster-capped-max-tokens"])
    assert sent["max_tokens"] == sent["max_completion_tokens"] == capped
    assert llm_input_bound(body) * GPT_IN + capped * GPT_OUT <= parse_nanos("0.002")


async def test_allow_with_caps_denies_when_not_even_a_short_answer_fits(env: Env) -> None:
    tiny = llm_input_bound(chat(max_tokens=100)) * GPT_IN + (MIN_CAPPED_OUTPUT - 1) * GPT_OUT
    agent = env.agent(policy={"allow_with_caps": True}, fund=f"0.{tiny:09d}")
    r = await env.call(agent, "POST", OPENAI, CHAT, json=chat(max_tokens=100))
    assert r.status_code == 402
    assert code(r) == "balance_insufficient"
    assert env.provider.count == 0


async def test_without_allow_with_caps_the_call_is_denied(env: Env) -> None:
    agent = env.agent(policy={"per_call_max": {"llm": "0.001"}})
    r = await env.call(agent, "POST", OPENAI, CHAT, json=chat(max_tokens=1000))
    assert r.status_code == 402
    assert code(r) == "per_call_limit_exceeded"


async def test_host_globs_and_deny_hosts(env: Env) -> None:
    agent = env.agent(policy={"allow_hosts": ["*.wild.test"], "deny_hosts": ["deep.api.wild.test"]})
    r = await env.call(agent, "GET", WILD, "/x")
    assert r.status_code == 200
    r = await env.call(agent, "GET", "other.wild.test", "/x")
    assert r.status_code == 200
    r = await env.call(agent, "GET", "deep.api.wild.test", "/x")
    assert (r.status_code, code(r)) == (403, "policy_domain_blocked")
    r = await env.call(agent, "GET", "wild.test", "/x")  # the glob matches subdomains only
    assert (r.status_code, code(r)) == (403, "policy_domain_blocked")
    r = await env.call(agent, "GET", KG, "/kg/query")  # served, but not on this agent's list
    assert (r.status_code, code(r)) == (403, "policy_domain_blocked")
    assert env.provider.count == 2


async def test_host_is_case_and_dot_insensitive(env: Env) -> None:
    agent = env.agent()
    r = await env.call(agent, "GET", "KG.Example.Test.", "/kg/query")
    assert r.status_code == 200


async def test_low_balance_warning_header(env: Env) -> None:
    agent = env.agent(fund="0.11")
    r = await env.call(agent, "GET", KG, "/kg/query")
    assert r.status_code == 200
    assert r.headers["x-paymaster-warning"] == f"low_balance; budget={agent.id}/total; used=0.91"


async def test_no_warning_below_thresholds(env: Env) -> None:
    agent = env.agent(fund="10.00")
    r = await env.call(agent, "GET", KG, "/kg/query")
    assert "x-paymaster-warning" not in r.headers


async def test_tiered_hold_covers_the_next_tier_within_reach(env: Env) -> None:
    agent = env.agent()
    r = await env.call(agent, "GET", GEO, "/geocode?q=1")
    # call 1 of 5 at 0.005 — but concurrent reserves could land past the boundary: hold 0.012
    held = env.reservation(r)
    assert held["amount"] == "0.012"
    assert held["charged"] == "0.005"
    assert TIER_HOLD_LOOKAHEAD > 5
