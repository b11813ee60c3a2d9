"""Every reason code the authority API can answer, each with its status and the one error
body of PROTOCOL.md's Denials (the exact key set is pinned here)."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

import httpx
import pytest

from paymaster.core.tokens import generate_private_key

from .conftest import ADMIN, Agent, Api

pytestmark = pytest.mark.anyio

ERROR_KEYS = {
    "code",
    "message",
    "decision_id",
    "budget_id",
    "requested",
    "remaining",
    "currency",
    "retryable",
}

Scenario = Callable[[Api], Awaitable[httpx.Response]]


async def spend_token_missing(api: Api) -> httpx.Response:
    agent = await api.create_agent(fund="5.00")
    return await api.reserve(agent, headers={"x-paymaster-agent-id": agent.id})


async def spend_token_invalid(api: Api) -> httpx.Response:
    agent = await api.create_agent(fund="5.00")
    return await api.reserve(
        agent, headers={"x-paymaster-agent-id": agent.id, "x-paymaster-spend-token": "spt_x"}
    )


async def spend_token_expired(api: Api) -> httpx.Response:
    agent = await api.create_agent(fund="5.00")
    old = api.clock().timestamp() - 120
    return await api.reserve(agent, headers=api.headers(agent, now=old, ttl_seconds=60))


async def spend_token_replayed(api: Api) -> httpx.Response:
    agent = await api.create_agent(fund="5.00")
    headers = api.headers(agent)
    assert (await api.reserve(agent, headers=headers)).status_code == 201
    return await api.reserve(agent, headers=headers)


async def agent_unknown(api: Api) -> httpx.Response:
    stranger = Agent("ag_" + "0" * 26, generate_private_key())
    return await api.reserve(stranger)


async def agent_revoked(api: Api) -> httpx.Response:
    agent = await api.create_agent(fund="5.00")
    assert (await api.client.post(f"/v1/agents/{agent.id}/revoke", headers=ADMIN)).status_code == 200
    return await api.reserve(agent)


async def agent_revoked_fund(api: Api) -> httpx.Response:
    agent = await api.create_agent(fund="5.00")
    await api.client.post(f"/v1/agents/{agent.id}/revoke", headers=ADMIN)
    return await api.client.post(f"/v1/agents/{agent.id}/fund", json={"amount": "1.00"}, headers=ADMIN)


async def agent_revoked_unfreeze(api: Api) -> httpx.Response:
    agent = await api.create_agent(fund="5.00")
    await api.client.post(f"/v1/agents/{agent.id}/revoke", headers=ADMIN)
    return await api.client.post(f"/v1/agents/{agent.id}/unfreeze", headers=ADMIN)


async def agent_frozen(api: Api) -> httpx.Response:
    agent = await api.create_agent(fund="5.00")
    assert (await api.client.post(f"/v1/agents/{agent.id}/freeze", headers=ADMIN)).status_code == 200
    return await api.reserve(agent)


async def admin_key_required(api: Api) -> httpx.Response:
    return await api.client.get("/v1/agents", headers={"Authorization": "Bearer pm_admin_wrong"})


async def not_found(api: Api) -> httpx.Response:
    return await api.client.post(
        "/v1/reservations/res_nope/commit", json={"idempotency_key": "k"}, headers=ADMIN
    )


async def idempotency_conflict(api: Api) -> httpx.Response:
    agent = await api.create_agent(fund="5.00")
    assert (await api.reserve(agent, idempotency_key="same", amount="0.10")).status_code == 201
    return await api.reserve(agent, idempotency_key="same", amount="0.20")


async def reservation_settled(api: Api) -> httpx.Response:
    agent = await api.create_agent(fund="5.00")
    reservation = (await api.reserve(agent)).json()["reservation_id"]
    assert (await api.commit(agent, reservation, amount="0.05")).status_code == 200
    return await api.commit(agent, reservation, amount="0.05")


async def reservation_expired(api: Api) -> httpx.Response:
    agent = await api.create_agent(fund="5.00")
    reservation = (await api.reserve(agent, ttl_seconds=10)).json()["reservation_id"]
    api.clock.advance(11)
    return await api.commit(agent, reservation, amount="0.05")


async def policy_cap_exceeded(api: Api) -> httpx.Response:
    agent = await api.create_agent(policy={"daily_cap": "0.05"}, fund="5.00")
    return await api.reserve(agent, amount="0.10")


async def balance_insufficient(api: Api) -> httpx.Response:
    agent = await api.create_agent(fund="0.05")
    return await api.reserve(agent, amount="0.10")


async def per_call_limit_exceeded(api: Api) -> httpx.Response:
    agent = await api.create_agent(policy={"per_call_max": {"*": "0.05"}}, fund="5.00")
    return await api.reserve(agent, amount="0.10")


async def spend_token_amount_exceeded(api: Api) -> httpx.Response:
    agent = await api.create_agent(fund="5.00")
    return await api.reserve(agent, amount="0.10", headers=api.headers(agent, max_amount="0.05"))


async def connector_blocked(api: Api) -> httpx.Response:
    agent = await api.create_agent(policy={"connectors": ["search"]}, fund="5.00")
    return await api.reserve(agent, connector="tool")


async def task_forbidden(api: Api) -> httpx.Response:
    agent = await api.create_agent(fund="5.00")
    task = await api.client.post("/v1/tasks", json={"limit": "1.00", "agents": []}, headers=ADMIN)
    assert task.status_code == 201, task.text
    return await api.reserve(agent, task=task.json()["task_id"])


async def no_budget_configured(api: Api) -> httpx.Response:
    agent = await api.create_agent()
    return await api.reserve(agent)


async def invalid_amount(api: Api) -> httpx.Response:
    agent = await api.create_agent(fund="5.00")
    return await api.reserve(agent, amount=0.1)


async def invalid_request(api: Api) -> httpx.Response:
    agent = await api.create_agent(fund="5.00")
    return await api.reserve(agent, surprise=True)


async def price_unknown(api: Api) -> httpx.Response:
    agent = await api.create_agent(fund="5.00")
    return await api.reserve(agent, amount=None)


async def loop_detected(api: Api) -> httpx.Response:
    agent = await api.create_agent(
        policy={"loop_guard": {"window_seconds": 60, "max_repeats": 2}}, fund="5.00"
    )
    for _ in range(2):
        assert (await api.reserve(agent, input_hash="h1")).status_code == 201
    return await api.reserve(agent, input_hash="h1")


SCENARIOS: list[tuple[Scenario, int, str]] = [
    (spend_token_missing, 401, "spend_token_missing"),
    (spend_token_invalid, 401, "spend_token_invalid"),
    (spend_token_expired, 401, "spend_token_expired"),
    (spend_token_replayed, 401, "spend_token_replayed"),
    (agent_unknown, 401, "agent_unknown"),
    (agent_revoked, 401, "agent_revoked"),
    (agent_revoked_fund, 409, "agent_revoked"),
    (agent_revoked_unfreeze, 409, "agent_revoked"),
    (agent_frozen, 403, "agent_frozen"),
    (admin_key_required, 401, "admin_key_required"),
    (not_found, 404, "not_found"),
    (idempotency_conflict, 409, "idempotency_conflict"),
    (reservation_settled, 409, "reservation_settled"),
    (reservation_expired, 409, "reservation_expired"),
    (policy_cap_exceeded, 402, "policy_cap_exceeded"),
    (balance_insufficient, 402, "balance_insufficient"),
    (per_call_limit_exceeded, 402, "per_call_limit_exceeded"),
    (spend_token_amount_exceeded, 402, "spend_token_amount_exceeded"),
    (connector_blocked, 403, "connector_blocked"),
    (task_forbidden, 403, "task_forbidden"),
    (no_budget_configured, 403, "no_budget_configured"),
    (invalid_amount, 422, "invalid_amount"),
    (invalid_request, 422, "invalid_request"),
    (price_unknown, 422, "price_unknown"),
    (loop_detected, 429, "loop_detected"),
]


@pytest.mark.parametrize(("scenario", "status", "code"), SCENARIOS, ids=[s[0].__name__ for s in SCENARIOS])
async def test_reason_code_status_and_body_shape(
    api: Api, scenario: Scenario, status: int, code: str
) -> None:
    response = await scenario(api)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == ERROR_KEYS
    error = body["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str)
    assert error["message"]
    assert isinstance(error["retryable"], bool)
    for field in ("decision_id", "budget_id", "requested", "remaining", "currency"):
        assert error[field] is None or isinstance(error[field], str)


async def test_budget_denials_name_the_budget_and_the_amounts(api: Api) -> None:
    agent = await api.create_agent(policy={"daily_cap": "0.05"}, fund="5.00")
    error = (await api.reserve(agent, amount="0.10")).json()["error"]
    assert error["budget_id"] == f"{agent.id}/day/2026-11-24"
    assert (error["requested"], error["remaining"], error["currency"]) == ("0.10", "0.05", "USD")
    assert error["decision_id"].startswith("dec_")
    poor = await api.create_agent(fund="0.05")
    error = (await api.reserve(poor, amount="0.10")).json()["error"]
    assert error["budget_id"] == f"{poor.id}/total"


async def test_loop_detected_is_retryable(api: Api) -> None:
    assert (await loop_detected(api)).json()["error"]["retryable"] is True


async def test_frozen_agent_gets_agent_frozen_before_a_parse_error(api: Api) -> None:
    """Step 2 (agent status) answers before step 3 (request parse), and the token is spent."""
    agent = await api.create_agent(fund="5.00")
    await api.client.post(f"/v1/agents/{agent.id}/freeze", headers=ADMIN)
    headers = api.headers(agent)
    r = await api.reserve(agent, headers=headers, amount=0.1)
    assert (r.status_code, r.json()["error"]["code"]) == (403, "agent_frozen")
    r = await api.reserve(agent, headers=headers)
    assert (r.status_code, r.json()["error"]["code"]) == (401, "spend_token_replayed")


async def test_parse_error_spends_the_token(api: Api) -> None:
    agent = await api.create_agent(fund="5.00")
    headers = api.headers(agent)
    assert (await api.reserve(agent, headers=headers, amount="nope")).status_code == 422
    r = await api.reserve(agent, headers=headers, idempotency_key=uuid.uuid4().hex)
    assert r.json()["error"]["code"] == "spend_token_replayed"
