"""The Authority API over HTTP: reserve, commit, release, refund, queries and tasks."""

from __future__ import annotations

import uuid
from pathlib import Path

import anyio
import httpx
import pytest
from starlette.applications import Starlette

from paymaster.bootstrap import create_service_key, open_authority
from paymaster.config import load_settings
from paymaster.server.app import create_app

from .conftest import ADMIN, ADMIN_KEY, Api, Clock

pytestmark = pytest.mark.anyio


async def test_reserve_commit_query_refund(api: Api) -> None:
    agent = await api.create_agent(policy={"daily_cap": "1.00"}, fund="5.00")
    r = await api.reserve(agent, amount="0.30", metadata={"run": "r1"})
    assert r.status_code == 201, r.text
    hold = r.json()
    assert hold["decision"] == "allow"
    assert hold["amount"] == "0.30"
    assert hold["expires_at"] == "2026-11-24T12:05:00.000000Z"
    assert {b["id"]: b["remaining"] for b in hold["budgets"]} == {
        f"{agent.id}/total": "4.70",
        f"{agent.id}/day/2026-11-24": "0.70",
    }
    assert hold["warnings"] == []

    r = await api.commit(agent, hold["reservation_id"], amount="0.25")
    assert r.status_code == 200, r.text
    charge = r.json()
    assert (charge["charged"], charge["released"], charge["overrun"], charge["estimated"]) == (
        "0.25",
        "0.05",
        False,
        False,
    )

    r = await api.client.get(f"/v1/reservations/{hold['reservation_id']}", headers=api.headers(agent))
    assert r.status_code == 200
    assert (r.json()["status"], r.json()["charged"], r.json()["metadata"]) == (
        "committed",
        "0.25",
        {"run": "r1"},
    )

    r = await api.client.post(
        "/v1/refunds",
        json={
            "ledger_entry_id": charge["ledger_entry_id"],
            "amount": "0.05",
            "reason": "bad answer",
            "idempotency_key": "rf1",
        },
        headers=ADMIN,
    )
    assert r.status_code == 201, r.text
    assert r.json()["amount"] == "0.05"
    assert r.json()["refund_id"].startswith("rf_")
    wallet = await api.wallet(agent)
    assert (wallet["spent"], wallet["reserved"], wallet["remaining"]) == ("0.20", "0.00", "4.80")
    # a refund above what is left of the charge
    r = await api.client.post(
        "/v1/refunds",
        json={
            "ledger_entry_id": charge["ledger_entry_id"],
            "amount": "0.50",
            "reason": "x",
            "idempotency_key": "2",
        },
        headers=ADMIN,
    )
    assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_amount")


async def test_refund_is_admin_only(api: Api) -> None:
    agent = await api.create_agent(fund="5.00")
    body = {"ledger_entry_id": "le_x", "amount": "0.05", "reason": "x", "idempotency_key": "k"}
    r = await api.client.post("/v1/refunds", json=body, headers=api.headers(agent))
    assert (r.status_code, r.json()["error"]["code"]) == (401, "admin_key_required")
    r = await api.client.post("/v1/refunds", json=body, headers=ADMIN)
    assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found")


async def test_commit_above_the_hold_is_an_overrun(api: Api) -> None:
    agent = await api.create_agent(fund="5.00")
    hold = (await api.reserve(agent, amount="0.10")).json()
    charge = (await api.commit(agent, hold["reservation_id"], amount="0.15")).json()
    assert (charge["charged"], charge["overrun"]) == ("0.15", True)
    assert (await api.wallet(agent))["spent"] == "0.15"


async def test_commit_without_amount_charges_the_hold(api: Api) -> None:
    agent = await api.create_agent(fund="5.00")
    hold = (await api.reserve(agent, amount="0.10")).json()
    charge = (await api.commit(agent, hold["reservation_id"])).json()
    assert (charge["charged"], charge["estimated"]) == ("0.10", False)


async def test_commit_with_usage_records_the_quantity(api: Api) -> None:
    agent = await api.create_agent(fund="5.00")
    hold = (await api.reserve(agent, amount="0.10")).json()
    r = await api.commit(agent, hold["reservation_id"], amount="0.06", usage={"units": 3, "unit": "page"})
    assert r.status_code == 200, r.text
    (entry,) = (await api.client.get("/v1/ledger", headers=ADMIN)).json()["entries"]
    assert (entry["quantity"], entry["unit"], entry["unit_cost"], entry["total"]) == (
        "3",
        "page",
        "0.02",
        "0.06",
    )


async def test_commit_is_idempotent(api: Api) -> None:
    agent = await api.create_agent(fund="5.00")
    hold = (await api.reserve(agent)).json()
    first = await api.commit(agent, hold["reservation_id"], amount="0.05", idempotency_key="c1")
    again = await api.commit(agent, hold["reservation_id"], amount="0.05", idempotency_key="c1")
    assert again.status_code == 200
    assert again.json() == first.json()
    assert len((await api.client.get("/v1/ledger", headers=ADMIN)).json()["entries"]) == 1


async def test_commit_by_header_idempotency_key(api: Api) -> None:
    agent = await api.create_agent(fund="5.00")
    hold = (await api.reserve(agent)).json()
    r = await api.client.post(
        f"/v1/reservations/{hold['reservation_id']}/commit",
        json={"amount": "0.05"},
        headers={**api.headers(agent), "x-paymaster-idempotency-key": "h1"},
    )
    assert r.status_code == 200, r.text


async def test_release(api: Api) -> None:
    agent = await api.create_agent(fund="5.00")
    hold = (await api.reserve(agent, amount="0.40")).json()
    rid = hold["reservation_id"]
    r = await api.client.post(
        f"/v1/reservations/{rid}/release", json={"reason": "not needed"}, headers=api.headers(agent)
    )
    assert r.status_code == 200, r.text
    assert r.json() == {"reservation_id": rid, "released": "0.40"}
    assert (await api.wallet(agent))["reserved"] == "0.00"
    # an empty body is a release without a reason; releasing again answers the same
    r = await api.client.post(f"/v1/reservations/{rid}/release", headers=api.headers(agent))
    assert r.status_code == 200
    r = await api.commit(agent, rid, amount="0.10")
    assert (r.status_code, r.json()["error"]["code"]) == (409, "reservation_settled")
    status = (await api.client.get(f"/v1/reservations/{rid}", headers=ADMIN)).json()
    assert (status["status"], status["charged"]) == ("released", "0.00")


async def test_held_reservation_reports_no_charge(api: Api) -> None:
    agent = await api.create_agent(fund="5.00")
    rid = (await api.reserve(agent)).json()["reservation_id"]
    status = (await api.client.get(f"/v1/reservations/{rid}", headers=ADMIN)).json()
    assert (status["status"], status["charged"]) == ("held", None)


async def test_another_agents_reservation_does_not_exist(api: Api) -> None:
    owner = await api.create_agent(fund="5.00")
    other = await api.create_agent(fund="5.00")
    rid = (await api.reserve(owner)).json()["reservation_id"]
    for call in (
        api.client.get(f"/v1/reservations/{rid}", headers=api.headers(other)),
        api.commit(other, rid, amount="0.01"),
        api.client.post(f"/v1/reservations/{rid}/release", headers=api.headers(other)),
    ):
        r = await call
        assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found")
    assert (await api.client.get(f"/v1/reservations/{rid}", headers=api.headers(owner))).status_code == 200


async def test_replayed_reserve_returns_the_first_answer(api: Api) -> None:
    agent = await api.create_agent(fund="5.00")
    first = await api.reserve(agent, idempotency_key="r1", amount="0.10")
    again = await api.reserve(agent, idempotency_key="r1", amount="0.10")
    assert (first.status_code, again.status_code) == (201, 201)
    assert again.json() == first.json()
    assert (await api.wallet(agent))["reserved"] == "0.10"


async def test_replayed_denial_returns_the_first_denial(api: Api) -> None:
    agent = await api.create_agent()
    first = await api.reserve(agent, idempotency_key="d1")
    assert first.json()["error"]["code"] == "no_budget_configured"
    await api.client.post(f"/v1/agents/{agent.id}/fund", json={"amount": "5.00"}, headers=ADMIN)
    again = await api.reserve(agent, idempotency_key="d1")
    assert again.status_code == 403
    assert again.json() == first.json()
    assert (await api.reserve(agent, idempotency_key="d2")).status_code == 201


async def test_idempotency_key_from_the_header(api: Api) -> None:
    agent = await api.create_agent(fund="5.00")
    body = {"connector": "tool", "amount": "0.10"}

    async def send() -> dict[str, str]:
        headers = {**api.headers(agent), "x-paymaster-idempotency-key": "hdr-1"}
        r = await api.client.post("/v1/reservations", json=body, headers=headers)
        assert r.status_code == 201, r.text
        result: dict[str, str] = r.json()
        return result

    assert (await send())["reservation_id"] == (await send())["reservation_id"]
    headers = {**api.headers(agent), "x-paymaster-idempotency-key": "other"}
    r = await api.client.post("/v1/reservations", json={**body, "idempotency_key": "hdr-1"}, headers=headers)
    assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_request")
    r = await api.client.post("/v1/reservations", json=body, headers=api.headers(agent))
    assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_request")


async def test_agent_ids_must_agree(api: Api) -> None:
    agent = await api.create_agent(fund="5.00")
    other = await api.create_agent(fund="5.00")
    r = await api.reserve(agent, agent_id=other.id)
    assert (r.status_code, r.json()["error"]["code"]) == (401, "spend_token_invalid")
    headers = {**api.headers(agent), "x-paymaster-agent-id": other.id}
    r = await api.reserve(agent, headers=headers)
    assert (r.status_code, r.json()["error"]["code"]) == (401, "spend_token_invalid")
    assert (await api.reserve(agent, agent_id=agent.id)).status_code == 201


async def test_token_session_and_task_bind_the_call(api: Api) -> None:
    agent = await api.create_agent(fund="5.00")
    r = await api.reserve(agent, session="s2", headers=api.headers(agent, session="s1"))
    assert (r.status_code, r.json()["error"]["code"]) == (401, "spend_token_invalid")
    r = await api.reserve(agent, headers=api.headers(agent, session="s1"))
    assert r.status_code == 201
    rid = r.json()["reservation_id"]
    assert (await api.client.get(f"/v1/reservations/{rid}", headers=ADMIN)).json()["session"] == "s1"
    r = await api.reserve(agent, headers={**api.headers(agent), "x-paymaster-session": "s3"})
    rid = r.json()["reservation_id"]
    assert (await api.client.get(f"/v1/reservations/{rid}", headers=ADMIN)).json()["session"] == "s3"
    task = (
        await api.client.post("/v1/tasks", json={"limit": "1.00", "agents": [agent.id]}, headers=ADMIN)
    ).json()
    r = await api.reserve(agent, task="task_other", headers=api.headers(agent, task=task["task_id"]))
    assert (r.status_code, r.json()["error"]["code"]) == (401, "spend_token_invalid")
    r = await api.reserve(agent, headers=api.headers(agent, task=task["task_id"]))
    assert r.status_code == 201
    assert task["task_id"] in {b["id"] for b in r.json()["budgets"]}


async def test_token_bound_to_another_request_is_refused(api: Api) -> None:
    agent = await api.create_agent(fund="5.00")
    r = await api.reserve(agent, headers=api.headers(agent, htm="GET"))
    assert (r.status_code, r.json()["error"]["code"]) == (401, "spend_token_invalid")
    bound = api.headers(agent, htm="POST", htu="http://testserver/v1/reservations")
    assert (await api.reserve(agent, headers=bound)).status_code == 201


async def test_freeze_takes_effect_on_the_next_reserve(api: Api) -> None:
    agent = await api.create_agent(fund="5.00")
    assert (await api.reserve(agent)).status_code == 201
    await api.client.post(f"/v1/agents/{agent.id}/freeze", headers=ADMIN)
    r = await api.reserve(agent)
    assert (r.status_code, r.json()["error"]["code"]) == (403, "agent_frozen")
    await api.client.post(f"/v1/agents/{agent.id}/unfreeze", headers=ADMIN)
    assert (await api.reserve(agent)).status_code == 201


async def test_service_key_charges_what_lies_below_its_principal(api: Api) -> None:
    key = create_service_key(api.authority, "team:growth")
    service = {"Authorization": f"Bearer {key}"}
    agent = await api.create_agent(fund="5.00", parent="team:growth")
    outsider = await api.create_agent(fund="5.00")
    body = {"connector": "tool", "amount": "0.10", "idempotency_key": "s1", "agent_id": agent.id}
    r = await api.client.post("/v1/reservations", json=body, headers=service)
    assert r.status_code == 201, r.text
    rid = r.json()["reservation_id"]
    r = await api.client.post(
        f"/v1/reservations/{rid}/commit", json={"amount": "0.05", "idempotency_key": "c"}, headers=service
    )
    assert r.status_code == 200, r.text
    r = await api.client.post(
        "/v1/reservations", json={**body, "agent_id": outsider.id, "idempotency_key": "s2"}, headers=service
    )
    assert r.status_code == 403
    # a principal's own caps
    await api.client.put("/v1/principals/team:growth", json={"policy": {"daily_cap": "1.00"}}, headers=ADMIN)
    body = {"connector": "tool", "amount": "0.10", "idempotency_key": "s3", "principal": "team:growth"}
    r = await api.client.post("/v1/reservations", json=body, headers=service)
    assert r.status_code == 201, r.text
    assert [b["id"] for b in r.json()["budgets"]] == ["team:growth/day/2026-11-24"]
    # exactly one of agent_id and principal; a service key is not an admin key
    r = await api.client.post("/v1/reservations", json={**body, "agent_id": agent.id}, headers=service)
    assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_request")
    assert (await api.client.get("/v1/agents", headers=service)).status_code == 401


async def test_agent_cannot_charge_a_principal(api: Api) -> None:
    agent = await api.create_agent(fund="5.00")
    r = await api.reserve(agent, principal="team:x")
    assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_request")


async def test_budgets_by_id_with_slashes(api: Api) -> None:
    agent = await api.create_agent(policy={"daily_cap": "1.00"}, fund="5.00")
    await api.reserve(agent, amount="0.25")
    wallet = await api.wallet(agent)
    assert (wallet["kind"], wallet["limit"], wallet["reserved"], wallet["remaining"]) == (
        "wallet",
        "5.00",
        "0.25",
        "4.75",
    )
    for path in (f"{agent.id}/day", f"{agent.id}/day/2026-11-24"):
        r = await api.client.get(f"/v1/budgets/{path}", headers=ADMIN)
        assert r.status_code == 200, r.text
        assert (r.json()["id"], r.json()["used"]) == (f"{agent.id}/day/2026-11-24", "0.25")
    # a window nobody spent in yet reads at zero
    r = await api.client.get(f"/v1/budgets/{agent.id}/day/2026-11-20", headers=ADMIN)
    assert (r.status_code, r.json()["spent"]) == (200, "0.00")
    # the agent may read its own budgets with a spend token, not another's
    r = await api.client.get(f"/v1/budgets/{agent.id}/total", headers=api.headers(agent))
    assert r.status_code == 200
    other = await api.create_agent(fund="1.00")
    r = await api.client.get(f"/v1/budgets/{agent.id}/total", headers=api.headers(other))
    assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found")
    r = await api.client.get("/v1/budgets/ag_nobody/total", headers=ADMIN)
    assert r.status_code == 404
    r = await api.client.get("/v1/budgets/nonsense", headers=ADMIN)
    assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_request")


async def test_agent_budgets(api: Api) -> None:
    await api.client.put(
        "/v1/principals/team:a",
        json={"policy": {"caps": [{"scope": "all", "period": "month", "limit": "100.00"}]}},
        headers=ADMIN,
    )
    agent = await api.create_agent(policy={"daily_cap": "1.00"}, fund="5.00", parent="team:a")
    r = await api.client.get(f"/v1/agents/{agent.id}/budgets", headers=ADMIN)
    assert r.status_code == 200
    assert r.json()["agent"] == agent.id
    assert [b["id"] for b in r.json()["budgets"]] == [
        f"{agent.id}/total",
        f"{agent.id}/day/2026-11-24",
        "team:a/month/2026-11",
    ]
    assert (
        await api.client.get(f"/v1/agents/{agent.id}/budgets", headers=api.headers(agent))
    ).status_code == 200
    assert (await api.client.get("/v1/agents/ag_nobody/budgets", headers=ADMIN)).status_code == 404


async def test_tasks(api: Api) -> None:
    lead = await api.create_agent(fund="5.00")
    helper = await api.create_agent(fund="5.00")
    outsider = await api.create_agent(fund="5.00")
    r = await api.client.post("/v1/tasks", json={"limit": "1.00", "agents": [lead.id]}, headers=ADMIN)
    assert r.status_code == 201, r.text
    task = r.json()
    assert (task["limit"], task["agents"], task["parent_task"]) == ("1.00", [lead.id], None)
    assert task["budget_id"] == task["task_id"]
    # an agent on the task delegates a sub-task with its own token
    sub = await api.client.post(
        "/v1/tasks",
        json={"limit": "0.50", "parent_task": task["task_id"], "agents": [helper.id]},
        headers=api.headers(lead),
    )
    assert sub.status_code == 201, sub.text
    r = await api.client.post(
        "/v1/tasks", json={"limit": "0.50", "parent_task": task["task_id"]}, headers=api.headers(outsider)
    )
    assert (r.status_code, r.json()["error"]["code"]) == (403, "task_forbidden")
    r = await api.reserve(helper, task=sub.json()["task_id"], amount="0.20")
    assert r.status_code == 201, r.text
    assert {b["id"] for b in r.json()["budgets"]} >= {task["task_id"], sub.json()["task_id"]}
    r = await api.reserve(helper, task=sub.json()["task_id"], amount="0.40")
    assert (r.status_code, r.json()["error"]["budget_id"]) == (402, sub.json()["task_id"])
    r = await api.client.get(f"/v1/budgets/{task['task_id']}", headers=ADMIN)
    assert (r.json()["kind"], r.json()["reserved"]) == ("task", "0.20")
    r = await api.client.post("/v1/tasks", json={"limit": "1.00", "parent_task": "task_nope"}, headers=ADMIN)
    assert r.status_code == 404


async def test_ttl_bounds(api: Api) -> None:
    agent = await api.create_agent(fund="5.00")
    for ttl in (0, 3601, "60"):
        r = await api.reserve(agent, ttl_seconds=ttl)
        assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_request")
    r = await api.reserve(agent, ttl_seconds=3600)
    assert r.json()["expires_at"] == "2026-11-24T13:00:00.000000Z"


async def test_the_sweeper_expires_holds_and_shutdown_closes_the_store(app: Starlette, api: Api) -> None:
    agent = await api.create_agent(fund="5.00")
    rid = (await api.reserve(agent, ttl_seconds=5, amount="1.00")).json()["reservation_id"]
    async with app.router.lifespan_context(app):
        api.clock.advance(6)
        with anyio.fail_after(10):
            while (await api.wallet(agent))["reserved"] != "0.00":
                await anyio.sleep(0.2)
        status = (await api.client.get(f"/v1/reservations/{rid}", headers=ADMIN)).json()
        assert (status["status"], status["charged"]) == ("expired", "0.00")
    r = await api.client.get("/healthz")
    assert (r.status_code, r.json()["error"]["code"]) == (503, "authority_unavailable")


async def test_many_concurrent_reserves_share_the_store(api: Api) -> None:
    """Many requests at once, through the thread limiter: exactly what fits is held."""
    agent = await api.create_agent(fund="1.00")
    results: list[int] = []

    async def one() -> None:
        results.append(
            (await api.reserve(agent, amount="0.10", idempotency_key=uuid.uuid4().hex)).status_code
        )

    async with anyio.create_task_group() as tg:
        for _ in range(40):
            tg.start_soon(one)
    assert results.count(201) == 10
    assert results.count(402) == 30
    wallet = await api.wallet(agent)
    assert (wallet["reserved"], wallet["remaining"]) == ("1.00", "0.00")


PRICED_CONFIG = """
[prices]
updated_at = "2026-11-24T00:00:00Z"
[prices.models."test-model"]
input = "1.00"
output = "2.00"
max_output = 1000

[[connectors]]
id = "geocode"
hosts = ["geo.example.com"]
category = "tool"
pricing = { per_call = [{ price = "0.005" }] }

[[connectors]]
id = "llm"
hosts = ["llm.example.com"]
category = "llm"
"""


async def test_usage_is_priced_by_the_authority(tmp_path: Path, clock: Clock) -> None:
    config = tmp_path / "paymaster.toml"
    config.write_text(PRICED_CONFIG)
    settings = load_settings(
        db=f"sqlite:///{tmp_path}/pm.db", config=str(config), env={"PAYMASTER_ADMIN_KEY": ADMIN_KEY}
    )
    authority = open_authority(settings, clock=clock)
    transport = httpx.ASGITransport(app=create_app(authority))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            api = Api(client, clock, authority)
            agent = await api.create_agent(fund="5.00")
            r = await api.reserve(
                agent, connector="geocode", amount=None, usage_estimate={"units": 2, "unit": "call"}
            )
            assert (r.status_code, r.json()["amount"]) == (201, "0.01"), r.text
            charge = (
                await api.commit(agent, r.json()["reservation_id"], usage={"units": 1, "unit": "call"})
            ).json()
            assert (charge["charged"], charge["estimated"]) == ("0.005", False)
            # 1,000 input and at most 1,000 output tokens: 0.001 + 0.002
            r = await api.reserve(
                agent,
                connector="llm",
                amount=None,
                usage_estimate={"model": "test-model", "input_tokens": 1000, "max_output_tokens": 1000},
            )
            assert (r.status_code, r.json()["amount"]) == (201, "0.003"), r.text
            usage = {"model": "test-model", "input_tokens": 1000, "output_tokens": 500}
            charge = (await api.commit(agent, r.json()["reservation_id"], usage=usage)).json()
            assert (charge["charged"], charge["estimated"]) == ("0.002", False)
            # usage nobody can price: the hold is charged, flagged estimated
            hold = (await api.reserve(agent, connector="llm", amount="0.04")).json()
            charge = (
                await api.commit(
                    agent, hold["reservation_id"], usage={"model": "mystery", "output_tokens": 9}
                )
            ).json()
            assert (charge["charged"], charge["estimated"]) == ("0.04", True)
            r = await api.reserve(agent, connector="llm", amount=None, usage_estimate={"model": "mystery"})
            assert (r.status_code, r.json()["error"]["code"]) == (422, "price_unknown")
    finally:
        authority.store.close()
