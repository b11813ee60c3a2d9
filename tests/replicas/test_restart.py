"""Restarting every replica loses nothing the authority decides with: sessions and their
caps, caps set through the admin API, the spend-token replay cache, idempotency records,
agent status and the volume-tier counters all live in the database. One replica is stopped
as a service manager stops it (SIGTERM), the other crashes (SIGKILL); both start again."""

from __future__ import annotations

import secrets

import pytest

from .conftest import GEO, Agent, Cluster, ClusterFactory, Database, check_database, dec, error_code, reserve

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.xdist_group("replicas")]

POLICY = {
    "caps": [
        {"scope": "all", "period": "session", "limit": "0.30"},
        {"scope": "all", "period": "day", "limit": "5.00"},
    ]
}


def commit(cluster: Cluster, index: int, agent: Agent, reservation_id: str, amount: str) -> None:
    r = cluster[index].client.post(
        f"/v1/reservations/{reservation_id}/commit",
        json={"amount": amount, "idempotency_key": secrets.token_hex(8)},
        headers=agent.headers(),
    )
    assert r.status_code == 200, r.text


def geo_call(cluster: Cluster, index: int, agent: Agent) -> str:
    """One gateway call to the tiered connector; what it was charged."""
    r = cluster[index].client.get(
        f"/proxy/{GEO}/geocode", params={"q": "x"}, headers=agent.gateway_headers(GEO, "/geocode")
    )
    assert r.status_code == 200, r.text
    return r.headers["x-paymaster-charged"]


def test_restarting_every_replica_keeps_sessions_caps_replay_cache_and_tiers(
    make_cluster: ClusterFactory, provider: object
) -> None:
    cluster = make_cluster(replicas=2, workers=2, provider=provider)
    a0, a1 = cluster[0].client, cluster[1].client
    agent = cluster.create_agent(0, fund="10.00", policy=POLICY)
    frozen = cluster.create_agent(1, fund="1.00")
    session_budget = f"{agent.id}/session/session:s-1"

    # a session spends 0.20 of its 0.30 (held on one replica, committed on the other)
    r = reserve(a0, agent, "0.20", session="s-1")
    assert r.status_code == 201, r.text
    commit(cluster, 1, agent, r.json()["reservation_id"], "0.20")
    # a cap added through the admin API
    cap = cluster.admin_json(
        1,
        "POST",
        "/v1/budgets",
        expect=201,
        json={"owner": agent.id, "scope": "connector:search", "period": "day", "limit": "0.05"},
    )
    # a token spent on replica 0, an answered reserve, a frozen agent
    used = agent.token()
    first = a0.post(
        "/v1/reservations",
        json={"connector": "tool", "amount": "0.01", "idempotency_key": "kept"},
        headers=agent.headers(used),
    )
    assert first.status_code == 201, first.text
    cluster.admin_json(0, "POST", f"/v1/agents/{frozen.id}/freeze")
    # three calls at the first tier's price: the next one is dearer
    if provider is not None:
        assert [geo_call(cluster, i % 2, agent) for i in range(3)] == ["0.005"] * 3
    before = {index: cluster.budget(index, session_budget) for index in (0, 1)}
    assert before[0] == before[1] and dec(before[0]["spent"]) == dec("0.20")

    cluster[0].stop()
    cluster[1].kill()
    assert cluster.alive() == []
    cluster.start()
    a0, a1 = cluster[0].client, cluster[1].client

    # the replay cache: the token spent before the restart is refused on every replica
    for client in (a0, a1):
        again = client.post(
            "/v1/reservations",
            json={"connector": "tool", "amount": "0.01", "idempotency_key": secrets.token_hex(8)},
            headers=agent.headers(used),
        )
        assert (again.status_code, error_code(again)) == (401, "spend_token_replayed"), again.text
    # the idempotency record: the same key and body get the first answer back
    replay = a1.post(
        "/v1/reservations",
        json={"connector": "tool", "amount": "0.01", "idempotency_key": "kept"},
        headers=agent.headers(),
    )
    assert (replay.status_code, replay.json()) == (201, first.json())
    # the session: 0.10 is left of its cap, not 0.30
    r = reserve(a1, agent, "0.20", session="s-1")
    assert (r.status_code, error_code(r), r.json()["error"]["budget_id"]) == (
        402,
        "policy_cap_exceeded",
        session_budget,
    )
    r = reserve(a0, agent, "0.10", session="s-1")
    assert r.status_code == 201, r.text
    after = cluster.budget(1, session_budget)
    assert (dec(after["spent"]), dec(after["reserved"]), dec(after["remaining"])) == (
        dec("0.20"),
        dec("0.10"),
        dec("0"),
    )
    # a new session starts from its whole cap
    assert reserve(a1, agent, "0.30", session="s-2").status_code == 201
    # the cap set through the admin API
    r = reserve(a0, agent, "0.06", connector="search")
    assert (r.status_code, error_code(r), r.json()["error"]["budget_id"]) == (
        402,
        "policy_cap_exceeded",
        cap["id"],
    )
    assert reserve(a1, agent, "0.05", connector="search").status_code == 201
    # the agent's status
    r = reserve(a0, frozen, "0.01")
    assert (r.status_code, error_code(r)) == (403, "agent_frozen")
    # the tier counter: the fourth call of the month is at the second tier's price
    if provider is not None:
        assert [geo_call(cluster, i % 2, agent) for i in range(2)] == ["0.012"] * 2
    for index in (0, 1):
        cluster.verify(index)
    db = Database(cluster)
    try:
        check_database(db.snapshot())
    finally:
        db.close()
