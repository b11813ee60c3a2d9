"""What the gateway charges for each upstream outcome: JSON and streams charged exactly from
their usage, cut streams and failures after sending charged at the hold (estimated),
redirects and errors without usage released, unreachable providers released."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from paymaster.money import parse_nanos

from .conftest import ANTHROPIC, COST, DOWN, EU, KG, OPENAI, Env
from .fake_provider import ANTHROPIC_USAGE, COMPLETION_TOKENS, EMBED_TOKENS, PROMPT_TOKENS, RESPONSES_USAGE

pytestmark = pytest.mark.anyio

CHAT = "/v1/chat/completions"
GPT_IN, GPT_OUT = 2500, 10_000  # nanos per token: 2.50 and 10.00 per million


def chat_body(**extra: Any) -> dict[str, Any]:
    return {
        "model": "gpt-test",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 100,
        **extra,
    }


def gpt_cost(prompt: int = PROMPT_TOKENS, completion: int = COMPLETION_TOKENS) -> int:
    return prompt * GPT_IN + completion * GPT_OUT


def sse_events(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]


async def test_json_response_charged_from_usage_with_headers(env: Env) -> None:
    agent = env.agent(fund="10.00")
    r = await env.call(agent, "POST", OPENAI, CHAT, json=chat_body())
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == COMPLETION_TOKENS
    assert parse_nanos(r.headers["x-paymaster-charged"]) == gpt_cost()
    assert parse_nanos(r.headers["x-paymaster-remaining"]) == parse_nanos("10.00") - gpt_cost()
    assert r.headers["x-paymaster-budget"] == f"{agent.id}/total"
    held = env.reservation(r)
    assert held["status"] == "committed"
    assert held["estimated"] is False
    assert parse_nanos(held["charged"]) == gpt_cost()
    # the hold was the worst case: the input bound in bytes plus max_tokens
    assert parse_nanos(held["amount"]) > gpt_cost()
    assert env.wallet_spent(agent) == gpt_cost()
    assert env.provider.count == 1


async def test_openai_stream_usage_read_on_the_side_and_withheld(env: Env) -> None:
    agent = env.agent()
    r = await env.call(agent, "POST", OPENAI, CHAT, json=chat_body(stream=True))
    assert r.status_code == 200
    assert "x-paymaster-charged" not in r.headers
    assert r.headers["content-type"].startswith("text/event-stream")
    # the gateway asked the provider for usage; the client, which did not, does not get it
    sent = env.provider.requests[0].json()
    assert sent["stream_options"] == {"include_usage": True}
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert not any('"usage"' in e for e in events)
    last = r.text.rstrip("\n").splitlines()[-1]
    assert last.startswith(": paymaster charged=")
    assert parse_nanos(last.split("charged=")[1].split()[0]) == gpt_cost()
    held = env.reservation(r)
    assert held["status"] == "committed"
    assert held["estimated"] is False
    assert parse_nanos(held["charged"]) == gpt_cost()


async def test_openai_stream_client_that_asked_for_usage_gets_it(env: Env) -> None:
    agent = env.agent()
    body = chat_body(stream=True, stream_options={"include_usage": True})
    r = await env.call(agent, "POST", OPENAI, CHAT, json=body)
    usage_chunks = [json.loads(e) for e in sse_events(r.text) if '"usage"' in e]
    assert usage_chunks[0]["usage"]["completion_tokens"] == COMPLETION_TOKENS
    assert parse_nanos(env.reservation(r)["charged"]) == gpt_cost()


def claude_cost() -> int:
    u = ANTHROPIC_USAGE
    return u["input"] * 3000 + u["cache_read"] * 300 + u["cache_write"] * 3750 + u["output"] * 15_000


async def test_anthropic_stream_charged_from_start_and_last_delta(env: Env) -> None:
    agent = env.agent()
    body = {
        "model": "claude-test",
        "max_tokens": 200,
        "stream": True,
        "messages": [{"role": "user", "content": "x"}],
    }
    r = await env.call(agent, "POST", ANTHROPIC, "/v1/messages", json=body)
    assert r.status_code == 200
    assert "event: message_stop" in r.text
    assert "x-paymaster-charged" not in r.headers
    assert r.text.rstrip("\n").splitlines()[-1].startswith(": paymaster charged=")
    held = env.reservation(r)
    assert parse_nanos(held["charged"]) == claude_cost()
    assert held["estimated"] is False
    # the agent's placeholder key never reached the provider; the connector's did
    seen = env.provider.requests[0].headers
    assert seen["x-api-key"] == "sk-ant-fake-SECRET-9876543210"


async def test_anthropic_json_charged_with_cache_tokens(env: Env) -> None:
    agent = env.agent()
    body = {"model": "claude-test", "max_tokens": 200, "messages": [{"role": "user", "content": "x"}]}
    r = await env.call(agent, "POST", ANTHROPIC, "/v1/messages", json=body)
    assert parse_nanos(r.headers["x-paymaster-charged"]) == claude_cost()


async def test_responses_and_embeddings_are_priced_and_charged(env: Env) -> None:
    agent = env.agent()
    r = await env.call(agent, "POST", OPENAI, "/v1/responses",
                       json={"model": "gpt-test", "input": "hi", "max_output_tokens": 50})  # fmt: skip
    assert r.status_code == 200
    expected = RESPONSES_USAGE["input"] * GPT_IN + RESPONSES_USAGE["output"] * GPT_OUT
    assert parse_nanos(r.headers["x-paymaster-charged"]) == expected
    r = await env.call(agent, "POST", OPENAI, "/v1/embeddings", json={"model": "embed-test", "input": "abc"})
    assert r.status_code == 200
    assert parse_nanos(r.headers["x-paymaster-charged"]) == EMBED_TOKENS * 100


async def test_stream_cut_before_usage_charged_at_hold_estimated(env: Env) -> None:
    agent = env.agent()
    r = await env.call(agent, "POST", OPENAI, "/v1/cut/chat/completions", json=chat_body(stream=True))
    assert r.status_code == 200
    assert "estimated=true" in r.text
    held = env.reservation(r)
    assert held["status"] == "committed"
    assert held["estimated"] is True
    assert held["charged"] == held["amount"]
    entry = env.authority.ledger(agent=agent.id)[-1]
    assert entry["reason"] == "stream_cut"
    assert entry["estimated"] is True


async def test_redirect_passed_back_not_followed_and_released(env: Env) -> None:
    agent = env.agent()
    r = await env.call(agent, "GET", KG, "/redirect")
    assert r.status_code == 302
    assert r.headers["location"] == "/elsewhere"
    assert r.headers["x-paymaster-charged"] == "0.00"
    assert env.provider.count == 1  # /elsewhere was never asked for
    assert env.reservation(r)["status"] == "released"
    assert env.wallet_spent(agent) == 0


async def test_error_with_usage_is_charged_from_it(env: Env) -> None:
    agent = env.agent()
    r = await env.call(agent, "POST", OPENAI, "/v1/fail/usage", json=chat_body())
    assert r.status_code == 500
    assert r.json()["error"]["message"] == "boom"  # passed through
    assert parse_nanos(r.headers["x-paymaster-charged"]) == gpt_cost()
    assert env.reservation(r)["status"] == "committed"


async def test_error_without_usage_is_released(env: Env) -> None:
    agent = env.agent()
    r = await env.call(agent, "POST", OPENAI, "/v1/fail/plain", json=chat_body())
    assert r.status_code == 500
    assert r.headers["x-paymaster-charged"] == "0.00"
    assert env.reservation(r)["status"] == "released"
    assert env.wallet_spent(agent) == 0


async def test_unreachable_provider_is_502_and_released(env: Env) -> None:
    agent = env.agent()
    r = await env.call(agent, "GET", DOWN, "/anything")
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "upstream_unavailable"
    assert env.reservation(r)["status"] == "released"
    assert env.wallet_spent(agent) == 0


async def test_header_cost_is_charged(env: Env) -> None:
    agent = env.agent()
    r = await env.call(agent, "GET", COST, "/cost")
    assert r.status_code == 200
    assert r.headers["x-paymaster-charged"] == "0.0123"


async def test_foreign_currency_converted_before_hold(env: Env) -> None:
    agent = env.agent()
    r = await env.call(agent, "GET", EU, "/anything")
    assert r.status_code == 200
    assert r.headers["x-paymaster-charged"] == "0.108"  # 0.10 EUR at 1.08


async def test_upstream_cannot_speak_for_the_authority(env: Env) -> None:
    agent = env.agent()
    r = await env.call(agent, "GET", KG, "/echo")
    assert r.headers.get_list("x-paymaster-charged") == ["0.10"]
    assert "set-cookie" not in r.headers


async def test_non_json_success_without_usage_is_charged_at_hold(env: Env) -> None:
    agent = env.agent(policy={"on_price_unknown": "0.03"})
    # no model in the body, no pricing: held at on_price_unknown and charged that, estimated
    r = await env.call(agent, "POST", OPENAI, "/v1/files", content=b"binary")
    assert r.status_code == 200
    assert r.headers["x-paymaster-charged"] == "0.03"
    assert r.headers["x-paymaster-estimated"] == "true"
    assert env.provider.count == 1


async def test_client_sdk_stream_parses_through_gateway(env: Env) -> None:
    """The trailing SSE comment does not disturb an SSE client."""
    agent = env.agent()
    headers = env.headers(agent, "POST", OPENAI, CHAT)
    events: list[str] = []
    async with env.client.stream(
        "POST", f"/proxy/{OPENAI}{CHAT}", json=chat_body(stream=True), headers=headers
    ) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    assert isinstance(httpx.Response(200), httpx.Response)


async def test_no_hold_is_left_behind_whatever_the_outcome(env: Env) -> None:
    agent = env.agent()
    calls = [
        ("POST", OPENAI, CHAT, chat_body()),
        ("POST", OPENAI, CHAT, chat_body(stream=True)),
        ("POST", OPENAI, "/v1/cut/chat/completions", chat_body(stream=True)),
        ("POST", OPENAI, "/v1/fail/usage", chat_body()),
        ("POST", OPENAI, "/v1/fail/plain", chat_body()),
        ("GET", KG, "/redirect", None),
        ("GET", DOWN, "/x", None),
        ("GET", COST, "/cost", None),
    ]
    statuses = {"committed", "released"}
    for method, host, path, body in calls:
        r = await env.call(agent, method, host, path, json=body)
        assert env.reservation(r)["status"] in statuses
    wallet = env.budget(f"{agent.id}/total")
    assert parse_nanos(wallet["reserved"]) == 0
    assert parse_nanos(wallet["spent"]) == sum(
        parse_nanos(e["total"]) for e in env.authority.ledger(agent=agent.id)
    )
