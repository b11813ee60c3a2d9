"""Over a real socket (uvicorn with uvloop and httptools): a client that disconnects in the
middle of a stream, and the SDK's governed httpx client end to end."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import paymaster
from paymaster.money import parse_nanos
from paymaster.server.app import create_app

from .conftest import FAKE_KEY, KG, OPENAI, Env
from .fake_provider import COMPLETION_TOKENS, PROMPT_TOKENS, ServerThread

pytestmark = pytest.mark.anyio

GPT_COST = PROMPT_TOKENS * 2500 + COMPLETION_TOKENS * 10_000


@pytest.fixture
def served(env: Env) -> Iterator[ServerThread]:
    server = ServerThread(create_app(env.authority), lifespan="on").start()
    yield server
    server.stop()


async def wait_settled(env: Env, reservation_id: str, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        held = env.authority.query_reservation(reservation_id)
        if held["status"] != "held":
            return held
        await asyncio.sleep(0.05)
    raise AssertionError(f"{reservation_id} was not settled")


async def test_client_disconnect_mid_stream_still_charges_the_usage(env: Env, served: ServerThread) -> None:
    agent = env.agent()
    path = "/v1/slow/chat/completions"
    body = {
        "model": "gpt-test",
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 50,
        "stream": True,
    }
    headers = env.headers(agent, "POST", OPENAI, path)
    async with httpx.AsyncClient(base_url=served.url) as client:
        async with client.stream("POST", f"/proxy/{OPENAI}{path}", json=body, headers=headers) as r:
            assert r.status_code == 200
            reservation_id = r.headers["x-paymaster-reservation"]
            async for _ in r.aiter_raw():
                break  # the first chunk, then hang up
    held = await wait_settled(env, reservation_id)
    # the gateway kept reading the upstream in the background, to its usage
    assert held["status"] == "committed"
    assert held["estimated"] is False
    assert parse_nanos(held["charged"]) == GPT_COST
    assert env.provider.count == 1


async def test_client_disconnect_then_stream_cut_charges_the_hold(env: Env, served: ServerThread) -> None:
    agent = env.agent()
    path = "/v1/slowcut/chat/completions"
    body = {
        "model": "gpt-test",
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 50,
        "stream": True,
    }
    headers = env.headers(agent, "POST", OPENAI, path)
    async with httpx.AsyncClient(base_url=served.url) as client:
        async with client.stream("POST", f"/proxy/{OPENAI}{path}", json=body, headers=headers) as r:
            reservation_id = r.headers["x-paymaster-reservation"]
            async for _ in r.aiter_raw():
                break
    held = await wait_settled(env, reservation_id)
    assert held["status"] == "committed"
    assert held["estimated"] is True
    assert held["charged"] == held["amount"]
    assert env.authority.ledger(agent=agent.id)[-1]["reason"] == "client_disconnected"


async def test_governed_httpx_client_end_to_end(env: Env, served: ServerThread) -> None:
    agent = env.agent(fund="0.25")
    http = paymaster.async_governed_httpx_client(served.url, agent_id=agent.id, key=agent.key)
    async with http:
        r = await http.post(
            f"https://{OPENAI}/v1/chat/completions",
            json={"model": "gpt-test", "messages": [{"role": "user", "content": "x"}], "max_tokens": 20},
            headers={"Authorization": "Bearer held-by-the-gateway"},
        )
        assert r.status_code == 200
        assert parse_nanos(r.headers["x-paymaster-charged"]) == GPT_COST
        assert env.provider.requests[0].headers["authorization"] == f"Bearer {FAKE_KEY}"
        for i in range(3):
            r = await http.get(f"https://{KG}/kg/query", params={"q": str(i)})
        # 0.25 - 0.0001 holds two 0.10 queries; the third is an ordinary 402 response
        assert r.status_code == 402
        assert r.json()["error"]["code"] == "balance_insufficient"
    assert env.provider.count == 3


async def test_sync_governed_httpx_client(env: Env, served: ServerThread) -> None:
    agent = env.agent()

    def call() -> httpx.Response:
        with paymaster.governed_httpx_client(served.url, agent_id=agent.id, key=agent.key) as http:
            return http.get(f"https://{KG}/kg/query", params={"q": "sync"})

    r = await asyncio.to_thread(call)
    assert r.status_code == 200
    assert r.headers["x-paymaster-charged"] == "0.10"
    assert env.provider.requests[0].query == "q=sync"
