"""No call leaves without a decision: every denial stops before the provider, credentials
stay where they belong, SSRF targets are refused, and a missing authority fails closed."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

import httpx
import pytest

from paymaster.money import parse_nanos

from .conftest import FAKE_ANTHROPIC_KEY, FAKE_KEY, GBP, GEO, KG, OPENAI, TRANSLATE, Agent, Env, MakeEnv

pytestmark = pytest.mark.anyio

DENIAL_FIELDS = {
    "code",
    "message",
    "decision_id",
    "budget_id",
    "requested",
    "remaining",
    "currency",
    "retryable",
}
CHAT = "/v1/chat/completions"


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, **extra}


def assert_denied(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error: dict[str, Any] = r.json()["error"]
    assert set(error) >= DENIAL_FIELDS
    assert error["code"] == code
    assert error["message"]
    return error


# ---------------------------------------------------------------- credentials


async def test_provider_key_injected_and_agent_credentials_stripped(env: Env) -> None:
    agent = env.agent()
    agent_own = {
        "authorization": "Bearer sk-agent-own-key",
        "x-api-key": "agent-key",
        "api-key": "agent-azure-key",
        "cookie": "session=agent",
        "proxy-authorization": "Basic Zm9vOmJhcg==",
        "x-paymaster-extra": "nope",
        "x-custom": "kept",
    }
    r = await env.call(agent, "POST", OPENAI, CHAT, json=chat(), headers=agent_own)
    assert r.status_code == 200
    seen = env.provider.requests[0].headers
    assert seen["authorization"] == f"Bearer {FAKE_KEY}"
    for name in ("x-api-key", "api-key", "cookie", "proxy-authorization"):
        assert name not in seen
    assert not any(name.startswith("x-paymaster-") for name in seen)
    assert seen["x-custom"] == "kept"
    # nothing the agent receives carries a provider key
    everything = r.text + repr(r.headers.raw)
    assert FAKE_KEY not in everything
    assert FAKE_ANTHROPIC_KEY not in everything


async def test_agent_never_holds_the_key_even_when_upstream_echoes_it(env: Env) -> None:
    agent = env.agent()
    r = await env.call(agent, "GET", GEO, "/geocode?q=x")
    assert r.status_code == 200
    assert env.provider.requests[0].headers["x-api-key"] == FAKE_KEY
    assert FAKE_KEY not in repr(r.headers.raw)


# ---------------------------------------------------------------- SSRF


@pytest.mark.parametrize(
    ("raw_path", "status", "code"),
    [
        ("/proxy/127.0.0.1/admin", 403, "policy_domain_blocked"),  # named without upstream, loopback
        ("/proxy/localhost/admin", 403, "policy_domain_blocked"),  # resolves to loopback
        ("/proxy/169.254.169.254/latest/meta-data", 403, "policy_domain_blocked"),  # not configured
        ("/proxy/user@kg.example.test/kg/query", 403, "policy_domain_blocked"),
        ("/proxy/kg.example.test%2F@evil.test/kg/query", 403, "policy_domain_blocked"),
        ("/proxy/evil.test/kg/query", 403, "policy_domain_blocked"),
        ("/proxy/[::1]/x", 403, "policy_domain_blocked"),
        ("/proxy/kg.example.test%40evil.test/x", 403, "policy_domain_blocked"),
        ("/proxy/kg.example.test/%2e%2e/%2e%2e/secret", 422, "invalid_request"),
        ("/proxy/kg.example.test/kg/../../x", 422, "invalid_request"),
        ("/proxy/kg.example.test/kg/%2E%2E/x", 422, "invalid_request"),
    ],
)
async def test_ssrf_targets_refused_without_upstream_call(
    env: Env, raw_path: str, status: int, code: str
) -> None:
    agent = env.agent()
    raw_host = raw_path.split("/")[2]
    token = agent.key.sign(agent_id=agent.id, aud=raw_host)
    headers = {"x-paymaster-agent-id": agent.id, "x-paymaster-spend-token": token}
    # straight into the ASGI app: an HTTP client would normalise the path before sending it
    r = await raw_request(env, "GET", raw_path, headers)
    assert_denied(r, status, code)
    assert env.provider.count == 0
    # still after the token check: without a token the answer is 401
    r = await raw_request(env, "GET", raw_path, {})
    assert_denied(r, 401, "spend_token_missing")
    assert env.provider.count == 0


async def raw_request(env: Env, method: str, raw_path: str, headers: dict[str, str]) -> httpx.Response:
    """One request with exactly this raw path, through the app's ASGI interface."""
    path, _, query = raw_path.partition("?")
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
        "method": method, "scheme": "http", "server": ("gateway.test", 80), "client": ("127.0.0.1", 5000),
        "root_path": "", "path": unquote(path), "raw_path": path.encode(), "query_string": query.encode(),
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }  # fmt: skip
    sent: list[dict[str, Any]] = []
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await env.app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return httpx.Response(start["status"], headers=start["headers"], content=body)


async def test_unconfigured_host_denial_is_recorded(env: Env) -> None:
    agent = env.agent()
    r = await env.call(agent, "GET", "unknown.test", "/x")
    error = assert_denied(r, 403, "policy_domain_blocked")
    events = [e for e in env.authority.events() if e["type"] == "dev.paymaster.reservation.denied"]
    assert events[-1]["data"]["reason_code"] == "policy_domain_blocked"
    assert error["decision_id"] == events[-1]["data"]["decision_id"]


# ---------------------------------------------------------------- fail closed


async def test_authority_down_is_503_and_no_upstream_call(env: Env) -> None:
    agent = env.agent()
    r = await env.call(agent, "GET", KG, "/kg/query")
    assert r.status_code == 200
    env.authority.store.close()
    r = await env.call(agent, "GET", KG, "/kg/query")
    assert_denied(r, 503, "authority_unavailable")
    assert env.provider.count == 1


# ---------------------------------------------------------------- every denial stops before the provider

Setup = Callable[[Env], Awaitable[httpx.Response]]


async def _missing_token(env: Env) -> httpx.Response:
    return await env.client.get(f"/proxy/{KG}/kg/query")


async def _bound_elsewhere(env: Env) -> httpx.Response:
    agent = env.agent()
    headers = env.headers(agent, "GET", KG, "/kg/other")
    return await env.client.get(f"/proxy/{KG}/kg/query", headers=headers)


async def _wrong_audience(env: Env) -> httpx.Response:
    agent = env.agent()
    headers = env.headers(agent, "GET", GEO, "/kg/query", bind=False)
    return await env.client.get(f"/proxy/{KG}/kg/query", headers=headers)


async def _replayed(env: Env) -> httpx.Response:
    agent = env.agent(fund=None)  # the first use is denied (no budget): the token is spent anyway
    headers = env.headers(agent, "GET", KG, "/kg/query")
    await env.client.get(f"/proxy/{KG}/kg/query", headers=headers)
    return await env.client.get(f"/proxy/{KG}/kg/query", headers=headers)


async def _frozen(env: Env) -> httpx.Response:
    agent = env.agent()
    env.authority.set_status(agent.id, "frozen")
    return await env.call(agent, "GET", KG, "/kg/query")


async def _revoked(env: Env) -> httpx.Response:
    agent = env.agent()
    env.authority.set_status(agent.id, "revoked")
    return await env.call(agent, "GET", KG, "/kg/query")


async def _host_not_allowed(env: Env) -> httpx.Response:
    return await env.call(env.agent(policy={"allow_hosts": [GEO]}), "GET", KG, "/kg/query")


async def _host_denied(env: Env) -> httpx.Response:
    return await env.call(env.agent(policy={"deny_hosts": ["*.example.test"]}), "GET", KG, "/kg/query")


async def _connector_blocked(env: Env) -> httpx.Response:
    return await env.call(env.agent(policy={"connectors": ["geocode"]}), "GET", KG, "/kg/query")


async def _category_blocked(env: Env) -> httpx.Response:
    return await env.call(env.agent(policy={"categories": ["llm"]}), "GET", KG, "/kg/query")


async def _task_forbidden(env: Env) -> httpx.Response:
    owner, other = env.agent(), env.agent()
    task = env.task("1.00", [owner])
    return await env.call(other, "GET", KG, "/kg/query", headers={"x-paymaster-task": task})


async def _price_unknown(env: Env) -> httpx.Response:
    return await env.call(env.agent(), "GET", OPENAI, "/v1/models")


async def _fx_unknown(env: Env) -> httpx.Response:
    return await env.call(env.agent(), "GET", GBP, "/x")


async def _per_call(env: Env) -> httpx.Response:
    agent = env.agent(policy={"per_call_max": {"connector:kg": "0.05"}})
    return await env.call(agent, "GET", KG, "/kg/query")


async def _token_max(env: Env) -> httpx.Response:
    return await env.call(env.agent(), "GET", KG, "/kg/query", claims={"max_amount": "0.01"})


async def _loop(env: Env) -> httpx.Response:
    agent = env.agent(policy={"loop_guard": {"window_seconds": 60, "max_repeats": 2}})
    for _ in range(2):
        r = await env.call(agent, "GET", KG, "/kg/query?q=same")
        assert r.status_code == 200
    env.provider.recorder.reset()
    return await env.call(agent, "GET", KG, "/kg/query?q=same")


async def _no_budget(env: Env) -> httpx.Response:
    return await env.call(env.agent(fund=None), "GET", KG, "/kg/query")


async def _balance(env: Env) -> httpx.Response:
    return await env.call(env.agent(fund="0.05"), "GET", KG, "/kg/query")


async def _cap(env: Env) -> httpx.Response:
    agent = env.agent(policy={"caps": [{"scope": "all", "period": "day", "limit": "0.05"}]})
    return await env.call(agent, "GET", KG, "/kg/query")


async def _too_large(env: Env) -> httpx.Response:
    return await env.call(env.agent(), "POST", TRANSLATE, "/translate", content=b"x" * (10 * 1024 * 1024 + 1))


async def _bad_session(env: Env) -> httpx.Response:
    return await env.call(env.agent(), "GET", KG, "/kg/query", headers={"x-paymaster-session": "a/b"})


async def _idempotency_reused(env: Env) -> httpx.Response:
    agent = env.agent()
    key = {"x-paymaster-idempotency-key": uuid.uuid4().hex}
    r = await env.call(agent, "GET", KG, "/kg/query", headers=key)
    assert r.status_code == 200
    env.provider.recorder.reset()
    return await env.call(agent, "GET", KG, "/kg/query", headers=key)


async def _idempotency_other_body(env: Env) -> httpx.Response:
    agent = env.agent()
    key = {"x-paymaster-idempotency-key": uuid.uuid4().hex}
    r = await env.call(agent, "GET", KG, "/kg/query?q=1", headers=key)
    assert r.status_code == 200
    env.provider.recorder.reset()
    return await env.call(agent, "GET", KG, "/kg/query?q=2", headers=key)


DENIALS: list[tuple[str, Setup, int, str]] = [
    ("missing token", _missing_token, 401, "spend_token_missing"),
    ("token bound to another URL", _bound_elsewhere, 401, "spend_token_invalid"),
    ("token for another host", _wrong_audience, 401, "spend_token_invalid"),
    ("replayed token", _replayed, 401, "spend_token_replayed"),
    ("frozen", _frozen, 403, "agent_frozen"),
    ("revoked", _revoked, 401, "agent_revoked"),
    ("host not allowed", _host_not_allowed, 403, "policy_domain_blocked"),
    ("host denied", _host_denied, 403, "policy_domain_blocked"),
    ("connector blocked", _connector_blocked, 403, "connector_blocked"),
    ("category blocked", _category_blocked, 403, "connector_blocked"),
    ("task forbidden", _task_forbidden, 403, "task_forbidden"),
    ("price unknown", _price_unknown, 422, "price_unknown"),
    ("fx rate unknown", _fx_unknown, 422, "fx_rate_unknown"),
    ("per-call maximum", _per_call, 402, "per_call_limit_exceeded"),
    ("token max", _token_max, 402, "spend_token_amount_exceeded"),
    ("loop guard", _loop, 429, "loop_detected"),
    ("no budget", _no_budget, 403, "no_budget_configured"),
    ("wallet", _balance, 402, "balance_insufficient"),
    ("cap", _cap, 402, "policy_cap_exceeded"),
    ("body too large", _too_large, 413, "invalid_request"),
    ("bad session header", _bad_session, 422, "invalid_request"),
    ("idempotency key reused", _idempotency_reused, 409, "idempotency_conflict"),
    ("idempotency key, other request", _idempotency_other_body, 409, "idempotency_conflict"),
]


@pytest.mark.parametrize(("setup", "status", "code"), [d[1:] for d in DENIALS], ids=[d[0] for d in DENIALS])
async def test_denied_call_never_reaches_the_provider(env: Env, setup: Setup, status: int, code: str) -> None:
    r = await setup(env)
    assert_denied(r, status, code)
    assert env.provider.count == 0
    assert "x-paymaster-reservation" not in r.headers


async def test_price_stale_denied_before_the_provider(make_env: MakeEnv) -> None:
    env: Env = await make_env(updated_at="2020-01-01T00:00:00Z", max_age="1h")
    agent = env.agent()
    r = await env.call(agent, "POST", OPENAI, CHAT, json=chat())
    assert_denied(r, 422, "price_stale")
    assert env.provider.count == 0
    # a connector's own pricing table is the operator's price: not subject to [prices] max_age
    r = await env.call(agent, "GET", KG, "/kg/query")
    assert r.status_code == 200


async def test_freeze_between_calls_stops_the_next(env: Env) -> None:
    agent = env.agent()
    r = await env.call(agent, "GET", KG, "/kg/query")
    assert r.status_code == 200
    env.authority.set_status(agent.id, "frozen")
    r = await env.call(agent, "GET", KG, "/kg/query")
    assert_denied(r, 403, "agent_frozen")
    assert env.provider.count == 1
    env.authority.set_status(agent.id, "active")
    r = await env.call(agent, "GET", KG, "/kg/query")
    assert r.status_code == 200


async def test_denial_names_the_budget_and_amounts(env: Env) -> None:
    agent = env.agent(policy={"caps": [{"scope": "connector:kg", "period": "day", "limit": "0.15"}]})
    r = await env.call(agent, "GET", KG, "/kg/query")
    assert r.status_code == 200
    r = await env.call(agent, "GET", KG, "/kg/query?q=2")
    error = assert_denied(r, 402, "policy_cap_exceeded")
    assert error["budget_id"].startswith(f"{agent.id}/connector:kg/day/")
    assert parse_nanos(error["requested"]) == parse_nanos("0.10")
    assert parse_nanos(error["remaining"]) == parse_nanos("0.05")
    assert error["currency"] == "USD"
    assert error["decision_id"].startswith("dec_")


async def test_every_method_is_gated(env: Env) -> None:
    agent: Agent = env.agent(fund=None)
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND"):
        r = await env.call(agent, method, KG, "/kg/query")
        assert_denied(r, 403, "no_budget_configured")
    assert env.provider.count == 0


async def test_replayed_key_after_a_policy_change_is_not_sent_again(env: Env) -> None:
    agent = env.agent()
    key = {"x-paymaster-idempotency-key": uuid.uuid4().hex}
    r = await env.call(agent, "GET", KG, "/kg/query", headers=key)
    assert r.status_code == 200
    env.authority.set_agent_policy(agent.id, {"connectors": ["geocode"]})
    r = await env.call(agent, "GET", KG, "/kg/query", headers=key)
    assert_denied(r, 409, "idempotency_conflict")
    assert env.provider.count == 1
