"""The governed httpx client: every request to https://HOST/… goes to {gateway}/proxy/HOST/…
with a fresh spend token bound to the original method and URL; responses (denials and
streams included) come back untouched."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

import paymaster
from paymaster.core.tokens import SpendClaims, check_request_binding, load_public_key, verify_spend_token
from paymaster.sdk.governed import GovernedTransport

GATEWAY = "http://gateway.test:8787"
AGENT = "ag_test0001"
DENIAL = {
    "error": {
        "code": "policy_cap_exceeded",
        "message": "the day cap is spent",
        "decision_id": "dec_1",
        "budget_id": f"{AGENT}/day/2026-11-24",
        "requested": "0.12",
        "remaining": "0.05",
        "currency": "USD",
        "retryable": False,
    }
}


@pytest.fixture
def key() -> paymaster.AgentKey:
    return paymaster.AgentKey.generate()


def claims_of(request: httpx.Request, key: paymaster.AgentKey, aud: str) -> SpendClaims:
    token = request.headers["x-paymaster-spend-token"]
    return verify_spend_token(token, load_public_key(key.public_key), audience=aud, now=time.time())


class Recorder:
    """A MockTransport handler that keeps what it was sent."""

    def __init__(self, response: httpx.Response | None = None) -> None:
        self.requests: list[httpx.Request] = []
        self.response = response

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.response is not None:
            return self.response
        return httpx.Response(200, json={"ok": True})


def governed(key: paymaster.AgentKey, recorder: Recorder, **kwargs: Any) -> httpx.Client:
    return paymaster.governed_httpx_client(
        GATEWAY, agent_id=AGENT, key=key, transport=httpx.MockTransport(recorder), **kwargs
    )


def test_rewrites_to_the_gateway_and_binds_the_token_to_the_original_request(key: paymaster.AgentKey) -> None:
    recorder = Recorder()
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    with governed(key, recorder) as http:
        response = http.post(
            "https://api.openai.com/v1/chat/completions?api-version=2",
            json=body,
            headers={"authorization": "Bearer held-by-the-gateway"},
        )
    assert response.status_code == 200
    # The response still names the request the caller made.
    assert str(response.request.url) == "https://api.openai.com/v1/chat/completions?api-version=2"

    (sent,) = recorder.requests
    assert str(sent.url) == f"{GATEWAY}/proxy/api.openai.com/v1/chat/completions?api-version=2"
    assert sent.method == "POST"
    assert sent.headers["host"] == "gateway.test:8787"
    assert sent.headers["x-paymaster-agent-id"] == AGENT
    assert json.loads(sent.content) == body
    assert sent.headers["content-type"] == "application/json"
    assert sent.headers["x-paymaster-idempotency-key"]
    assert "x-paymaster-session" not in sent.headers
    assert "x-paymaster-task" not in sent.headers
    # The wrapped SDK's placeholder credential is left for the gateway to strip.
    assert sent.headers["authorization"] == "Bearer held-by-the-gateway"

    claims = claims_of(sent, key, "api.openai.com")
    assert claims.agent_id == AGENT
    assert claims.htm == "POST"
    assert claims.htu == "https://api.openai.com/v1/chat/completions"  # the query stays out of the token
    assert claims.exp - claims.iat == 60
    assert claims.max_amount is None
    check_request_binding(
        claims, method="POST", url="https://api.openai.com/v1/chat/completions?api-version=2"
    )
    with pytest.raises(paymaster.SpendTokenInvalid):
        check_request_binding(claims, method="GET", url="https://api.openai.com/v1/chat/completions")
    with pytest.raises(paymaster.SpendTokenInvalid):
        check_request_binding(claims, method="POST", url="https://api.openai.com/v1/embeddings")
    with pytest.raises(paymaster.SpendTokenInvalid):  # aud is the provider's host
        claims_of(sent, key, "paymaster")


def test_each_request_gets_a_fresh_token_and_idempotency_key(key: paymaster.AgentKey) -> None:
    recorder = Recorder()
    with governed(key, recorder) as http:
        for _ in range(3):
            http.get("https://api.tavily.com/search?q=paymaster")
    tokens = {r.headers["x-paymaster-spend-token"] for r in recorder.requests}
    jtis = {claims_of(r, key, "api.tavily.com").jti for r in recorder.requests}
    keys = {r.headers["x-paymaster-idempotency-key"] for r in recorder.requests}
    assert len(tokens) == len(jtis) == len(keys) == 3
    for sent in recorder.requests:
        assert sent.url.path == "/proxy/api.tavily.com/search"
        assert sent.url.params["q"] == "paymaster"
        assert claims_of(sent, key, "api.tavily.com").htm == "GET"


def test_session_task_and_max_go_in_the_token_and_headers(key: paymaster.AgentKey) -> None:
    recorder = Recorder()
    with governed(key, recorder, session="sess-1", task="task_1", max_amount="0.50", token_ttl=30) as http:
        http.post("https://api.anthropic.com/v1/messages", json={})
        http.post(
            "https://api.anthropic.com/v1/messages",
            json={},
            headers={"x-paymaster-session": "sess-2", "idempotency-key": "sdk-retry-key"},
        )
    first, second = recorder.requests
    claims = claims_of(first, key, "api.anthropic.com")
    assert (claims.session, claims.task, claims.max_amount) == ("sess-1", "task_1", "0.50")
    assert claims.exp - claims.iat == 30
    assert first.headers["x-paymaster-session"] == "sess-1"
    assert first.headers["x-paymaster-task"] == "task_1"
    # A request may name its own session; token and header agree.
    assert claims_of(second, key, "api.anthropic.com").session == "sess-2"
    assert second.headers["x-paymaster-session"] == "sess-2"
    # An SDK's own idempotency key (kept across its retries) is reused.
    assert second.headers["x-paymaster-idempotency-key"] == "sdk-retry-key"


def test_gateway_path_prefix_ports_and_encoding_are_kept(key: paymaster.AgentKey) -> None:
    recorder = Recorder()
    http = paymaster.governed_httpx_client(
        "https://pm.example.com/gw/", agent_id=AGENT, key=key, transport=httpx.MockTransport(recorder)
    )
    with http:
        http.get("https://tools.example.com:8443/a%2Fb/c d?x=1&y=%20")
        http.get("https://API.Example.COM:443/v1")
    odd_port, default_port = recorder.requests
    assert odd_port.url.raw_path == b"/gw/proxy/tools.example.com:8443/a%2Fb/c%20d?x=1&y=%20"
    assert odd_port.url.host == "pm.example.com"
    assert claims_of(odd_port, key, "tools.example.com").htu == "https://tools.example.com:8443/a%2Fb/c%20d"
    assert default_port.url.raw_path == b"/gw/proxy/api.example.com/v1"
    assert claims_of(default_port, key, "api.example.com").aud == "api.example.com"


def test_requests_to_the_gateway_itself_are_not_rewritten(key: paymaster.AgentKey) -> None:
    recorder = Recorder()
    with governed(key, recorder) as http:
        http.get(f"{GATEWAY}/healthz")
    (sent,) = recorder.requests
    assert str(sent.url) == f"{GATEWAY}/healthz"
    assert "x-paymaster-spend-token" not in sent.headers


def test_plain_http_to_another_host_is_refused(key: paymaster.AgentKey) -> None:
    recorder = Recorder()
    with governed(key, recorder) as http, pytest.raises(httpx.UnsupportedProtocol):
        http.get("http://api.openai.com/v1/models")
    assert recorder.requests == []


def test_a_gateway_denial_is_an_ordinary_response(key: paymaster.AgentKey) -> None:
    recorder = Recorder(httpx.Response(402, json=DENIAL))
    with governed(key, recorder) as http:
        response = http.post("https://api.openai.com/v1/chat/completions", json={})
    assert response.status_code == 402
    assert response.json() == DENIAL
    # What a wrapped SDK would do with it is its own business; the SDK's errors read the same body.
    denial = paymaster.errors.error_from_body(response.status_code, response.json())
    assert isinstance(denial, paymaster.PolicyCapExceeded)


class TrackedStream(httpx.SyncByteStream):
    def __init__(self) -> None:
        self.chunks_read = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in (b"data: one\n\n", b"data: two\n\n", b": paymaster charged=0.01\n\n"):
            self.chunks_read += 1
            yield chunk


def test_streams_pass_through_unread(key: paymaster.AgentKey) -> None:
    stream = TrackedStream()
    recorder = Recorder(httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=stream))
    with governed(key, recorder) as http:
        with http.stream(
            "POST", "https://api.openai.com/v1/chat/completions", json={"stream": True}
        ) as response:
            assert response.status_code == 200
            assert stream.chunks_read == 0  # nothing was read on the way through
            lines = [line for line in response.iter_lines() if line]
            assert stream.chunks_read == 3
    assert lines == ["data: one", "data: two", ": paymaster charged=0.01"]


def test_arguments_that_would_bypass_the_gateway_are_refused(key: paymaster.AgentKey) -> None:
    for kwargs in ({"proxy": "http://proxy.test:3128"}, {"mounts": {"all://": httpx.HTTPTransport()}}):
        with pytest.raises(TypeError, match="around the gateway"):
            paymaster.governed_httpx_client(GATEWAY, agent_id=AGENT, key=key, **kwargs)
    with pytest.raises(ValueError, match="gateway_url"):
        paymaster.governed_httpx_client("gateway.test", agent_id=AGENT, key=key)
    with pytest.raises(ValueError, match="ttl"):
        paymaster.governed_httpx_client(GATEWAY, agent_id=AGENT, key=key, token_ttl=301)
    with pytest.raises(TypeError):
        paymaster.governed_httpx_client(GATEWAY, agent_id=AGENT, key=key.public_key)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        paymaster.governed_httpx_client(GATEWAY, agent_id=AGENT, key=key, max_amount=0.5)  # type: ignore[arg-type]


def test_the_transport_closes_its_inner_transport(key: paymaster.AgentKey) -> None:
    closed: list[bool] = []

    class Inner(httpx.MockTransport):
        def close(self) -> None:
            closed.append(True)

    transport = GovernedTransport(GATEWAY, agent_id=AGENT, key=key, transport=Inner(Recorder()))
    with httpx.Client(transport=transport):
        pass
    assert closed == [True]


# The async twin


class TrackedAsyncStream(httpx.AsyncByteStream):
    def __init__(self) -> None:
        self.chunks_read = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in (b"data: one\n\n", b"data: two\n\n"):
            self.chunks_read += 1
            yield chunk


def test_async_client_rewrites_signs_and_passes_denials_and_streams(key: paymaster.AgentKey) -> None:
    sent: list[httpx.Request] = []
    stream = TrackedAsyncStream()

    async def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        if request.url.path.endswith("/stream"):
            return httpx.Response(200, stream=stream)
        if request.url.path.endswith("/denied"):
            return httpx.Response(402, json=DENIAL)
        return httpx.Response(200, json={"ok": True})

    async def main() -> None:
        async with paymaster.async_governed_httpx_client(
            GATEWAY, agent_id=AGENT, key=key, task="task_9", transport=httpx.MockTransport(handler)
        ) as http:
            ok = await http.post("https://api.openai.com/v1/responses", json={"input": "hi"})
            assert ok.json() == {"ok": True}
            denied = await http.post("https://api.openai.com/v1/denied", json={})
            assert (denied.status_code, denied.json()) == (402, DENIAL)
            async with http.stream("POST", "https://api.openai.com/v1/stream") as streamed:
                assert stream.chunks_read == 0
                assert [chunk async for chunk in streamed.aiter_bytes()] == [
                    b"data: one\n\n",
                    b"data: two\n\n",
                ]

    asyncio.run(main())
    assert [r.url.path for r in sent] == [
        "/proxy/api.openai.com/v1/responses",
        "/proxy/api.openai.com/v1/denied",
        "/proxy/api.openai.com/v1/stream",
    ]
    jtis = set()
    for request, path in zip(sent, ("/v1/responses", "/v1/denied", "/v1/stream"), strict=True):
        claims = claims_of(request, key, "api.openai.com")
        assert claims.htu == f"https://api.openai.com{path}"
        assert claims.htm == "POST"
        assert claims.task == "task_9"
        assert request.headers["x-paymaster-task"] == "task_9"
        jtis.add(claims.jti)
    assert len(jtis) == 3


def test_openai_sdk_raises_its_own_error_for_a_denial(key: paymaster.AgentKey) -> None:
    openai = pytest.importorskip("openai")
    recorder = Recorder(httpx.Response(402, json=DENIAL))
    http = governed(key, recorder)
    llm = openai.OpenAI(api_key="held-by-the-gateway", http_client=http, max_retries=0)
    with pytest.raises(openai.APIStatusError) as caught:
        llm.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 402
    assert recorder.requests[0].url.path == "/proxy/api.openai.com/v1/chat/completions"
