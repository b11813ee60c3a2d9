"""Exact admission across replicas: two ``paymaster serve --workers 2`` processes on one
PostgreSQL database, 400 reserves released at once from 400 threads (httpx, half to each
replica) against a wallet of exactly 100 calls."""

from __future__ import annotations

import threading
from collections import Counter
from decimal import Decimal
from typing import Any

import httpx
import pytest

from .conftest import Cluster, ClusterFactory, Database, Monitor, check_database, dec, error_code

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.xdist_group("replicas")]

CALLS = 400
PRICE = "0.01"
WALLET = "1.00"  # exactly 100 calls


def watch_wallet(cluster: Cluster, budget_id: str, stop: threading.Event, worst: list[Decimal]) -> None:
    """Read the wallet through both replicas while the reserves race: it is never over."""
    while not stop.is_set():
        for index in (0, 1):
            b = cluster.budget(index, budget_id)
            worst.append(dec(b["spent"]) + dec(b["reserved"]) - dec(b["limit"]))


def test_two_replicas_admit_exactly_what_the_wallet_holds(make_cluster: ClusterFactory) -> None:
    cluster = make_cluster(replicas=2, workers=2)
    agent = cluster.create_agent(0, fund=WALLET)
    wallet = f"{agent.id}/total"
    tokens = [agent.token() for _ in range(CALLS)]
    barrier = threading.Barrier(CALLS)
    answers: list[tuple[int, int, Any] | None] = [None] * CALLS

    def one(i: int) -> None:
        replica = i % 2
        body = {"connector": "tool", "amount": PRICE, "idempotency_key": f"race-{i}"}
        barrier.wait()
        try:
            r = cluster[replica].client.post("/v1/reservations", json=body, headers=agent.headers(tokens[i]))
            answers[i] = (replica, r.status_code, r.json())
        except httpx.HTTPError as exc:
            answers[i] = (replica, 0, repr(exc))

    stop = threading.Event()
    worst: list[Decimal] = []
    watcher = threading.Thread(target=watch_wallet, args=(cluster, wallet, stop, worst), daemon=True)
    with Monitor(cluster) as monitor:
        watcher.start()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(CALLS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        stop.set()
        watcher.join(timeout=60)

    assert all(a is not None for a in answers)
    done = [a for a in answers if a is not None]
    statuses = Counter(status for _, status, _ in done)
    assert statuses == {201: 100, 402: 300}, f"{statuses}: {[a for a in done if a[1] not in (201, 402)][:3]}"
    assert {body["error"]["code"] for _, status, body in done if status == 402} == {"balance_insufficient"}
    allowed = [(replica, body["reservation_id"]) for replica, status, body in done if status == 201]
    assert len({rid for _, rid in allowed}) == 100
    by_replica = Counter(replica for replica, _ in allowed)
    assert by_replica[0] > 0 and by_replica[1] > 0, f"the admissions were not spread: {by_replica}"

    assert worst and max(worst) <= 0, f"the wallet was read over its limit by {max(worst)}"
    for index in (0, 1):
        b = cluster.budget(index, wallet)
        assert (dec(b["limit"]), dec(b["spent"]), dec(b["reserved"]), dec(b["remaining"])) == (
            dec(WALLET),
            dec("0"),
            dec(WALLET),
            dec("0"),
        )
        # one more is refused wherever it lands
        r = cluster[index].client.post(
            "/v1/reservations",
            json={"connector": "tool", "amount": PRICE, "idempotency_key": f"after-{index}"},
            headers=agent.headers(),
        )
        assert (r.status_code, error_code(r)) == (402, "balance_insufficient")
        cluster.verify(index)
    db = Database(cluster)
    try:
        snap = db.snapshot()
        check_database(snap)
        assert len(snap.held) == 100
    finally:
        db.close()
    assert monitor.snapshots > 0
