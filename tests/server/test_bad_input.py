"""Bad input gets a 4xx with its reason code and writes nothing; the router's 404 and 405
and unexpected failures keep the one error body; no 500 ever says what went wrong."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from paymaster.authority import Authority
from paymaster.server.body import MAX_BODY_BYTES
from paymaster.store.base import StoreUnavailable

from .conftest import ADMIN, Api

pytestmark = pytest.mark.anyio

GOOD = {"connector": "tool", "amount": "0.10", "idempotency_key": "k1"}

RAW_BODIES: list[tuple[str, bytes, str]] = [
    ("float amount", json.dumps({**GOOD, "amount": 0.1}).encode(), "invalid_amount"),
    ("integer amount", json.dumps({**GOOD, "amount": 1}).encode(), "invalid_amount"),
    ("exponent", json.dumps({**GOOD, "amount": "1e-2"}).encode(), "invalid_amount"),
    ("ten decimals", json.dumps({**GOOD, "amount": "0.0000000001"}).encode(), "invalid_amount"),
    ("absurd", json.dumps({**GOOD, "amount": "1" * 40}).encode(), "invalid_amount"),
    ("negative", json.dumps({**GOOD, "amount": "-0.10"}).encode(), "invalid_amount"),
    ("NaN literal", b'{"connector": "tool", "amount": NaN, "idempotency_key": "k1"}', "invalid_request"),
    ("malformed", b'{"connector": "tool",', "invalid_request"),
    ("not UTF-8", b'{"connector": "\xff"}', "invalid_request"),
    ("array", b'[{"connector": "tool"}]', "invalid_request"),
    ("string", b'"hello"', "invalid_request"),
    ("null", b"null", "invalid_request"),
    ("empty", b"", "invalid_request"),
    (
        "duplicate field",
        b'{"connector": "a", "connector": "b", "amount": "0.1", "idempotency_key": "k"}',
        "invalid_request",
    ),
    ("unknown field", json.dumps({**GOOD, "budget": "x"}).encode(), "invalid_request"),
    ("missing connector", json.dumps({"amount": "0.10", "idempotency_key": "k"}).encode(), "invalid_request"),
    ("connector with slash", json.dumps({**GOOD, "connector": "a/b"}).encode(), "invalid_request"),
    ("connector number", json.dumps({**GOOD, "connector": 7}).encode(), "invalid_request"),
    ("ttl string", json.dumps({**GOOD, "ttl_seconds": "60"}).encode(), "invalid_request"),
    ("ttl bool", json.dumps({**GOOD, "ttl_seconds": True}).encode(), "invalid_request"),
    ("ttl float", json.dumps({**GOOD, "ttl_seconds": 60.0}).encode(), "invalid_request"),
    ("metadata list", json.dumps({**GOOD, "metadata": [1]}).encode(), "invalid_request"),
    ("session space", json.dumps({**GOOD, "session": "a b"}).encode(), "invalid_request"),
    ("estimate unknown", json.dumps({**GOOD, "usage_estimate": {"tokens": 5}}).encode(), "invalid_request"),
    (
        "estimate float",
        json.dumps({**GOOD, "usage_estimate": {"units": 1.5, "unit": "x"}}).encode(),
        "invalid_request",
    ),
    (
        "huge integer",
        b'{"connector": "tool", "amount": "1", "idempotency_key": "k", "ttl_seconds": ' + b"9" * 5000 + b"}",
        "invalid_request",
    ),
    (
        "integer past 2**53",
        b'{"connector": "tool", "amount": "1", "idempotency_key": "k", '
        b'"metadata": {"n": -57508473650989842432}}',
        "invalid_request",
    ),
    (
        "infinite number",
        b'{"connector": "tool", "amount": "1", "idempotency_key": "k", "metadata": {"n": 1e400}}',
        "invalid_request",
    ),
    (
        "lone surrogate",
        b'{"connector": "tool", "amount": "1", "idempotency_key": "k", "metadata": {"\\ud800": 1}}',
        "invalid_request",
    ),
    (
        "deep nesting",
        b'{"connector": "tool", "metadata": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "invalid_request",
    ),
    (
        "nesting the store could not write",
        b'{"connector": "tool", "amount": "1", "idempotency_key": "k", '
        b'"metadata": {"a": ' + b"[" * 950 + b"]" * 950 + b"}}",
        "invalid_request",
    ),
]


@pytest.mark.parametrize(
    ("raw", "code"), [(r, c) for _, r, c in RAW_BODIES], ids=[n for n, _, _ in RAW_BODIES]
)
async def test_bad_reserve_bodies_write_nothing(api: Api, raw: bytes, code: str) -> None:
    agent = await api.create_agent(fund="5.00")
    before = api.written()
    r = await api.client.post(
        "/v1/reservations", content=raw, headers={**api.headers(agent), "content-type": "application/json"}
    )
    assert (r.status_code, r.json()["error"]["code"]) == (422, code), r.text
    assert api.written() == before
    wallet = await api.wallet(agent)
    assert (wallet["reserved"], wallet["spent"]) == ("0.00", "0.00")


async def test_oversized_body_is_413_and_writes_nothing(api: Api) -> None:
    agent = await api.create_agent(fund="5.00")
    before = api.written()
    big = json.dumps({**GOOD, "metadata": {"blob": "x" * MAX_BODY_BYTES}}).encode()
    r = await api.client.post("/v1/reservations", content=big, headers=api.headers(agent))
    assert (r.status_code, r.json()["error"]["code"]) == (413, "invalid_request")

    async def chunks() -> AsyncIterator[bytes]:  # no content-length: counted as it arrives
        for _ in range(3):
            yield b" " * (MAX_BODY_BYTES // 2)

    r = await api.client.post("/v1/reservations", content=chunks(), headers=api.headers(agent))
    assert (r.status_code, r.json()["error"]["code"]) == (413, "invalid_request")
    r = await api.client.post("/v1/agents", content=big, headers=ADMIN)
    assert r.status_code == 413
    assert api.written() == before


@pytest.mark.parametrize(
    ("path", "body", "code"),
    [
        ("/v1/agents/{agent}/fund", {"amount": 5.0}, "invalid_amount"),
        ("/v1/agents/{agent}/fund", {"amount": "5.00", "note": "x"}, "invalid_request"),
        ("/v1/agents/{agent}/fund", [], "invalid_request"),
        (
            "/v1/refunds",
            {"ledger_entry_id": "le_x", "amount": 0.05, "reason": "x", "idempotency_key": "k"},
            "invalid_amount",
        ),
        ("/v1/refunds", {"ledger_entry_id": "le_x", "amount": "0.05", "reason": "x"}, "invalid_request"),
        (
            "/v1/refunds",
            {"ledger_entry_id": "le_x", "amount": "0", "reason": "x", "idempotency_key": "k"},
            "invalid_amount",
        ),
        ("/v1/tasks", {"limit": 1}, "invalid_amount"),
        ("/v1/tasks", {"limit": "1.00", "agents": "all"}, "invalid_request"),
        ("/v1/tasks", {"limit": "1.00", "owner": "x"}, "invalid_request"),
        ("/v1/budgets", {"owner": "team:a", "period": "day", "limit": 2.5}, "invalid_amount"),
    ],
)
async def test_bad_admin_bodies_write_nothing(api: Api, path: str, body: Any, code: str) -> None:
    agent = await api.create_agent(fund="5.00")
    before = api.written()
    r = await api.client.post(path.format(agent=agent.id), json=body, headers=ADMIN)
    assert (r.status_code, r.json()["error"]["code"]) == (422, code), r.text
    assert api.written() == before


async def test_bad_commit_bodies(api: Api) -> None:
    agent = await api.create_agent(fund="5.00")
    rid = (await api.reserve(agent)).json()["reservation_id"]
    before = api.written()
    for body, code in (
        ({"amount": 0.05, "idempotency_key": "c"}, "invalid_amount"),
        ({"amount": "0.05"}, "invalid_request"),
        ({"amount": "0.05", "idempotency_key": "c", "extra": 1}, "invalid_request"),
        ({"usage": {"units": -1}, "idempotency_key": "c"}, "invalid_request"),
        ({"usage": {"model": "m", "output_tokens": "9"}, "idempotency_key": "c"}, "invalid_request"),
    ):
        r = (
            await api.commit(agent, rid, **body)
            if "idempotency_key" in body
            else await api.client.post(
                f"/v1/reservations/{rid}/commit", json=body, headers=api.headers(agent)
            )
        )
        assert (r.status_code, r.json()["error"]["code"]) == (422, code), body
    r = await api.client.post(
        f"/v1/reservations/{rid}/release", json={"reason": 5}, headers=api.headers(agent)
    )
    assert r.status_code == 422
    assert api.written() == before
    assert (await api.client.get(f"/v1/reservations/{rid}", headers=ADMIN)).json()["status"] == "held"


async def test_unknown_route_and_wrong_method(api: Api) -> None:
    r = await api.client.get("/v1/nothing-here")
    assert (r.status_code, set(r.json()["error"]), r.json()["error"]["code"]) == (
        404,
        {"code", "message", "decision_id", "budget_id", "requested", "remaining", "currency", "retryable"},
        "not_found",
    )
    r = await api.client.get("/v1/agents/")
    assert r.status_code == 404
    r = await api.client.delete("/v1/reservations", headers=ADMIN)
    assert r.status_code == 405
    assert r.headers["allow"] == "POST"
    assert r.json()["error"]["code"] == "invalid_request"
    r = await api.client.put("/healthz")
    assert r.status_code == 405


async def test_unexpected_exception_is_500_without_internals(
    api: Api, authority: Authority, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode() -> None:
        raise RuntimeError("secret: /var/lib/paymaster.db is on fire")

    monkeypatch.setattr(authority, "list_agents", explode)
    r = await api.client.get("/v1/agents", headers=ADMIN)
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "internal_error"
    assert set(r.json()["error"]) == {
        "code",
        "message",
        "decision_id",
        "budget_id",
        "requested",
        "remaining",
        "currency",
        "retryable",
    }
    assert "secret" not in r.text
    assert "fire" not in r.text


async def test_store_unavailable_is_503(
    api: Api, authority: Authority, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = await api.create_agent(fund="5.00")

    def down(*args: object, **kwargs: object) -> None:
        raise StoreUnavailable("database write failed: disk I/O error at /secret/path")

    monkeypatch.setattr(authority, "reserve", down)
    r = await api.reserve(agent)
    assert (r.status_code, r.json()["error"]["code"], r.json()["error"]["retryable"]) == (
        503,
        "authority_unavailable",
        True,
    )
    assert "secret" not in r.text


async def test_closed_store_fails_closed(api: Api, authority: Authority) -> None:
    agent = await api.create_agent(fund="5.00")
    headers = api.headers(agent)
    authority.store.close()
    r = await api.reserve(agent, headers=headers)
    assert (r.status_code, r.json()["error"]["code"]) == (503, "authority_unavailable")


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/v1/ledger", {"since": "0001-01-01T00:00:00+01:00"}),
        ("/v1/ledger", {"until": "9999-12-31T23:59:59-01:00"}),
        ("/v1/reports/focus", {"from": "0001-01-01T00:00:00+01:00", "to": "2026-01-01"}),
        ("/v1/reports/focus", {"from": "2026-01-01", "to": "9999-12-31T23:59:59-01:00"}),
    ],
)
async def test_times_at_the_ends_of_the_calendar_are_422(api: Api, path: str, params: dict[str, str]) -> None:
    r = await api.client.get(path, params=params, headers=ADMIN)
    assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_request")
