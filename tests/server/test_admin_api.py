"""The Admin API over HTTP, and the public routes: keys, health, metrics, OpenAPI."""

from __future__ import annotations

import base64
import hashlib
import json
import sqlite3

import pytest
from cryptography.hazmat.primitives import serialization
from starlette.applications import Starlette
from starlette.routing import Route

from paymaster.config import Settings
from paymaster.core.tokens import generate_private_key, public_key_b64
from paymaster.server.openapi import document

from .conftest import ADMIN, Api

pytestmark = pytest.mark.anyio


async def test_agents_create_list_show(api: Api) -> None:
    key = public_key_b64(generate_private_key())
    r = await api.client.post(
        "/v1/agents",
        json={
            "name": "writer",
            "public_key": key,
            "policy": {"daily_cap": "8.00"},
            "parent": "team:a",
            "metadata": {"owner": "ops"},
        },
        headers=ADMIN,
    )
    assert r.status_code == 201, r.text
    agent = r.json()
    assert set(agent) == {
        "id",
        "name",
        "status",
        "public_key",
        "parent",
        "metadata",
        "policy",
        "policy_version",
        "created_at",
    }
    assert (agent["name"], agent["status"], agent["public_key"], agent["parent"]) == (
        "writer",
        "active",
        key,
        "team:a",
    )
    assert agent["policy"]["caps"] == [
        {"scope": "all", "period": "day", "limit": "8.00", "mode": "enforce", "tz": None}
    ]
    assert (agent["metadata"], agent["policy_version"]) == ({"owner": "ops"}, 1)
    listed = (await api.client.get("/v1/agents", headers=ADMIN)).json()["agents"]
    assert [a["id"] for a in listed] == [agent["id"]]
    assert (await api.client.get(f"/v1/agents/{agent['id']}", headers=ADMIN)).json() == agent
    r = await api.client.get("/v1/agents/ag_nobody", headers=ADMIN)
    assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found")


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"name": "x", "public_key": "not-a-key"}, "invalid_request"),
        ({"name": "", "public_key": "A" * 43}, "invalid_request"),
        ({"public_key": "A" * 43}, "invalid_request"),
        ({"name": "x", "public_key": "K", "extra": 1}, "invalid_request"),
        ({"name": "x", "public_key": "K", "policy": {"daily_cap": 5}}, "invalid_amount"),
        ({"name": "x", "public_key": "K", "policy": {"nope": 1}}, "invalid_request"),
        ({"name": "x", "public_key": "K", "metadata": [1]}, "invalid_request"),
    ],
)
async def test_agent_create_refusals_write_nothing(api: Api, body: dict[str, object], code: str) -> None:
    if body.get("public_key") == "K":
        body["public_key"] = public_key_b64(generate_private_key())
    before = api.written()
    r = await api.client.post("/v1/agents", json=body, headers=ADMIN)
    assert (r.status_code, r.json()["error"]["code"]) == (422, code)
    assert api.written() == before


async def test_policy_versions(api: Api) -> None:
    agent = await api.create_agent(policy={"daily_cap": "1.00"})
    r = await api.client.put(
        f"/v1/agents/{agent.id}/policy", json={"daily_cap": "2.00", "connectors": ["a"]}, headers=ADMIN
    )
    assert r.status_code == 200, r.text
    assert (r.json()["policy_version"], r.json()["policy"]["connectors"]) == (2, ["a"])
    before = api.written()
    r = await api.client.put(f"/v1/agents/{agent.id}/policy", json={"caps": "lots"}, headers=ADMIN)
    assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_request")
    r = await api.client.put(f"/v1/agents/{agent.id}/policy", json=[], headers=ADMIN)
    assert r.status_code == 422
    assert api.written() == before
    r = await api.client.put("/v1/agents/ag_nobody/policy", json={}, headers=ADMIN)
    assert r.status_code == 404


async def test_fund_answers_the_wallet(api: Api) -> None:
    agent = await api.create_agent()
    r = await api.client.post(f"/v1/agents/{agent.id}/fund", json={"amount": "20.00"}, headers=ADMIN)
    assert r.status_code == 200, r.text
    wallet = r.json()
    assert (wallet["id"], wallet["kind"], wallet["period"], wallet["limit"], wallet["remaining"]) == (
        f"{agent.id}/total",
        "wallet",
        "total",
        "20.00",
        "20.00",
    )
    r = await api.client.post(
        f"/v1/agents/{agent.id}/fund", json={"amount": "5", "idempotency_key": "f1"}, headers=ADMIN
    )
    assert r.json()["limit"] == "25.00"
    r = await api.client.post(
        f"/v1/agents/{agent.id}/fund", json={"amount": "5", "idempotency_key": "f1"}, headers=ADMIN
    )
    assert r.json()["limit"] == "25.00"  # replayed, not funded twice
    before = api.written()
    for amount in ("0", "-1.00", 5, "1e3", "0.0000000001"):
        r = await api.client.post(f"/v1/agents/{agent.id}/fund", json={"amount": amount}, headers=ADMIN)
        assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_amount"), amount
    assert api.written() == before
    r = await api.client.post("/v1/agents/ag_nobody/fund", json={"amount": "1.00"}, headers=ADMIN)
    assert r.status_code == 404


async def test_freeze_unfreeze_revoke(api: Api) -> None:
    agent = await api.create_agent(fund="5.00")
    for verb, status in (("freeze", "frozen"), ("unfreeze", "active"), ("revoke", "revoked")):
        r = await api.client.post(f"/v1/agents/{agent.id}/{verb}", headers=ADMIN)
        assert (r.status_code, r.json()["status"]) == (200, status)
    r = await api.client.post(f"/v1/agents/{agent.id}/freeze", json={"why": "x"}, headers=ADMIN)
    assert r.status_code == 422
    r = await api.client.post("/v1/agents/ag_nobody/freeze", headers=ADMIN)
    assert r.status_code == 404
    events = [e["type"] for e in api.authority.events()]
    assert events[-3:] == [
        "dev.paymaster.agent.frozen",
        "dev.paymaster.agent.unfrozen",
        "dev.paymaster.agent.revoked",
    ]


async def test_principals(api: Api) -> None:
    r = await api.client.put("/v1/principals/team:growth", json={"parent": "org:acme"}, headers=ADMIN)
    assert (r.status_code, r.json()["parent"], r.json()["policy_version"]) == (201, "org:acme", 0)
    r = await api.client.put(
        "/v1/principals/team:growth", json={"policy": {"daily_cap": "3.00"}}, headers=ADMIN
    )
    assert (r.status_code, r.json()["parent"], r.json()["policy_version"]) == (200, "org:acme", 1)
    assert r.json()["policy"]["caps"][0]["limit"] == "3.00"
    r = await api.client.put("/v1/principals/org:acme", json={"parent": "team:growth"}, headers=ADMIN)
    assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_request")
    for name in ("ag_x", "a%2Fb"):
        r = await api.client.put(f"/v1/principals/{name}", json={}, headers=ADMIN)
        assert r.status_code in (404, 422), name
    r = await api.client.put("/v1/principals/team:x", json={"budget": 1}, headers=ADMIN)
    assert r.status_code == 422


async def test_add_cap_to_an_agent(api: Api) -> None:
    agent = await api.create_agent(policy={"daily_cap": "1.00"}, fund="5.00")
    r = await api.client.post(
        "/v1/budgets", json={"owner": agent.id, "period": "day", "limit": "2.50"}, headers=ADMIN
    )
    assert r.status_code == 201, r.text
    budget = r.json()
    assert (budget["id"], budget["limit"], budget["kind"]) == (f"{agent.id}/day/2026-11-24", "2.50", "cap")
    r = await api.client.post(
        "/v1/budgets",
        json={
            "owner": agent.id,
            "scope": "connector:search",
            "period": "month",
            "limit": "9.00",
            "mode": "shadow",
            "tz": "Europe/Paris",
        },
        headers=ADMIN,
    )
    assert r.status_code == 201, r.text
    assert (r.json()["id"], r.json()["mode"], r.json()["tz"]) == (
        f"{agent.id}/connector:search/month/2026-11",
        "shadow",
        "Europe/Paris",
    )
    policy = (await api.client.get(f"/v1/agents/{agent.id}", headers=ADMIN)).json()
    assert policy["policy_version"] == 3
    assert [(c["scope"], c["period"], c["limit"]) for c in policy["policy"]["caps"]] == [
        ("all", "day", "2.50"),
        ("connector:search", "month", "9.00"),
    ]
    r = await api.client.post(
        "/v1/budgets", json={"owner": agent.id, "period": "session", "limit": "0.50"}, headers=ADMIN
    )
    assert (r.status_code, r.json()["id"], r.json()["window_start"]) == (201, f"{agent.id}/session", None)


async def test_add_cap_to_a_principal_and_refusals(api: Api) -> None:
    r = await api.client.post(
        "/v1/budgets", json={"owner": "team:a", "period": "week", "limit": "10.00"}, headers=ADMIN
    )
    assert (r.status_code, r.json()["id"]) == (201, "team:a/week/2026-W48")
    r = await api.client.post(
        "/v1/budgets", json={"owner": "team:a", "period": "total", "limit": "10.00"}, headers=ADMIN
    )
    assert (r.status_code, r.json()["id"]) == (201, "team:a/total")
    agent = await api.create_agent()
    before = api.written()
    for body, status, code in (
        ({"owner": agent.id, "period": "total", "limit": "1.00"}, 422, "invalid_request"),
        ({"owner": "ag_nobody", "period": "day", "limit": "1.00"}, 404, "not_found"),
        ({"owner": "team:a", "period": "fortnight", "limit": "1.00"}, 422, "invalid_request"),
        ({"owner": "team:a", "period": "day", "limit": 1}, 422, "invalid_amount"),
        ({"owner": "team:a", "period": "day", "limit": "1", "mode": "loud"}, 422, "invalid_request"),
        ({"owner": "team:a", "period": "day", "limit": "1", "tz": "Mars/Base"}, 422, "invalid_request"),
        ({"owner": "team:a", "period": "day", "limit": "1", "scope": "everything"}, 422, "invalid_request"),
        ({"owner": "a/b", "period": "day", "limit": "1"}, 422, "invalid_request"),
        ({"period": "day", "limit": "1"}, 422, "invalid_request"),
    ):
        r = await api.client.post("/v1/budgets", json=body, headers=ADMIN)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), body
    assert api.written() == before


async def test_ledger_filters(api: Api) -> None:
    a = await api.create_agent(fund="5.00")
    b = await api.create_agent(fund="5.00")
    for agent, connector in ((a, "search"), (b, "llm"), (a, "llm")):
        hold = (await api.reserve(agent, connector=connector)).json()
        await api.commit(agent, hold["reservation_id"], amount="0.01")
        api.clock.advance(60)
    entries = (await api.client.get("/v1/ledger", headers=ADMIN)).json()["entries"]
    assert len(entries) == 3
    r = await api.client.get("/v1/ledger", params={"agent": a.id, "connector": "llm"}, headers=ADMIN)
    assert [(e["agent_id"], e["connector"]) for e in r.json()["entries"]] == [(a.id, "llm")]
    r = await api.client.get("/v1/ledger", params={"since": "2026-11-24T12:01:00Z"}, headers=ADMIN)
    assert len(r.json()["entries"]) == 2
    r = await api.client.get("/v1/ledger", params={"until": "2026-11-24T13:01:30+01:00"}, headers=ADMIN)
    assert len(r.json()["entries"]) == 2
    r = await api.client.get("/v1/ledger", params={"since": "2026-11-25", "limit": "5"}, headers=ADMIN)
    assert r.json()["entries"] == []
    for params in ({"since": "yesterday"}, {"limit": "0"}, {"limit": "x"}):
        r = await api.client.get("/v1/ledger", params=params, headers=ADMIN)
        assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_request")


async def test_events_pages(api: Api) -> None:
    await api.create_agent(policy={"daily_cap": "1.00"}, fund="5.00")
    all_events = (await api.client.get("/v1/events", headers=ADMIN)).json()
    assert [e["seq"] for e in all_events["events"]] == [1, 2, 3]
    assert all_events["next_after_seq"] == 3
    page = (await api.client.get("/v1/events", params={"after_seq": 1, "limit": 1}, headers=ADMIN)).json()
    assert ([e["seq"] for e in page["events"]], page["next_after_seq"]) == ([2], 2)
    assert page["events"][0]["specversion"] == "1.0"
    empty = (await api.client.get("/v1/events", params={"after_seq": 9}, headers=ADMIN)).json()
    assert empty == {"events": [], "next_after_seq": 9}
    r = await api.client.get("/v1/events", params={"after_seq": "-1"}, headers=ADMIN)
    assert r.status_code == 422


async def test_audit_verify_and_tampering(api: Api, settings: Settings) -> None:
    agent = await api.create_agent(fund="5.00")
    await api.reserve(agent)
    r = await api.client.get("/v1/audit/verify", headers=ADMIN)
    assert (r.status_code, r.json()) == (200, {"ok": True, "events": 3, "head_seq": 3})
    db = sqlite3.connect(settings.db_url.removeprefix("sqlite:///"))
    row = db.execute("SELECT event FROM events WHERE seq = 2").fetchone()
    event = json.loads(row[0])
    event["data"]["amount"] = "500.00"
    db.execute("UPDATE events SET event = ? WHERE seq = 2", (json.dumps(event),))
    db.commit()
    db.close()
    r = await api.client.get("/v1/audit/verify", headers=ADMIN)
    assert r.status_code == 409
    body = r.json()
    assert (body["ok"], body["first_bad_seq"]) == (False, 2)
    assert body["reason"]


async def test_admin_routes_need_the_admin_key(app: Starlette, api: Api) -> None:
    agent = await api.create_agent(fund="5.00")
    for route in app.routes:
        assert isinstance(route, Route)
        if not route.path.startswith("/v1/") and route.path not in ("/healthz", "/metrics", "/openapi.json"):
            continue  # the gateway and the dashboard authenticate their own way
        path = route.path.replace("{id}", agent.id).replace("{id:path}", f"{agent.id}/total")
        path = path.replace("{name}", "team:a")
        public = path in ("/healthz", "/metrics", "/openapi.json", "/v1/authority/keys")
        for method in route.methods or ():
            if method == "HEAD":
                continue
            r = await api.client.request(method, path, headers={"Authorization": "Bearer pm_admin_nope"})
            if public:
                assert r.status_code == 200, path
            else:
                assert r.status_code == 401, (method, path, r.text)
                assert r.json()["error"]["code"] in {"admin_key_required", "spend_token_missing"}


async def test_jwks(api: Api) -> None:
    r = await api.client.get("/v1/authority/keys")
    assert r.status_code == 200
    (jwk,) = r.json()["keys"]
    assert (jwk["kty"], jwk["crv"], jwk["alg"]) == ("OKP", "Ed25519", "EdDSA")
    raw = api.authority.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert base64.urlsafe_b64decode(jwk["x"] + "=") == raw
    thumbprint = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": jwk["x"]}, separators=(",", ":"))
    assert (
        jwk["kid"]
        == base64.urlsafe_b64encode(hashlib.sha256(thumbprint.encode()).digest()).rstrip(b"=").decode()
    )


async def test_healthz(api: Api) -> None:
    r = await api.client.get("/healthz")
    assert (r.status_code, r.json()) == (200, {"ok": True})
    api.authority.store.close()
    r = await api.client.get("/healthz")
    assert (r.status_code, r.json()["error"]["code"]) == (503, "authority_unavailable")


async def test_metrics(api: Api) -> None:
    agent = await api.create_agent(fund="0.10")
    await api.reserve(agent, amount="0.05")
    await api.reserve(agent, amount="0.50")
    await api.reserve(agent, headers={})
    await api.client.get("/v1/agents")
    r = await api.client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.text
    assert 'paymaster_http_requests_total{route="/v1/reservations",method="POST",status="201"} 1' in text
    assert 'paymaster_http_requests_total{route="/v1/reservations",method="POST",status="402"} 1' in text
    assert 'paymaster_denials_total{code="balance_insufficient"} 1' in text
    assert 'paymaster_unauthorized_total{code="spend_token_missing"} 1' in text
    assert 'paymaster_unauthorized_total{code="admin_key_required"} 1' in text
    assert 'paymaster_reserve_duration_seconds_bucket{le="+Inf"} 3' in text
    assert "paymaster_reserve_duration_seconds_count 3" in text
    for line in text.splitlines():
        assert line.startswith(("# HELP paymaster_", "# TYPE paymaster_", "paymaster_")), line


async def test_openapi_names_every_route(app: Starlette, api: Api) -> None:
    r = await api.client.get("/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    assert doc == document()
    assert doc["openapi"] == "3.1.0"
    served = {
        (route.path.replace("{id:path}", "{id}"), method.lower())
        for route in app.routes
        if isinstance(route, Route)
        and (route.path.startswith("/v1/") or route.path in ("/healthz", "/metrics"))
        for method in route.methods or ()
        if method != "HEAD"
    }
    documented = {(path, method) for path, item in doc["paths"].items() for method in item}
    assert served == documented
    for item in doc["paths"].values():
        for operation in item.values():
            request = operation.get("requestBody")
            if request is not None:
                ref = request["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
                assert doc["components"]["schemas"][ref]["additionalProperties"] is False
            for status, response in operation["responses"].items():
                # every error has the Error body, but a broken chain answers its VerifyResult
                if status.startswith(("4", "5")) and (operation["operationId"], status) != (
                    "verifyAudit",
                    "409",
                ):
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, (
                        operation["operationId"],
                        status,
                    )
