"""SIGKILL one replica (the ``serve`` process and its workers) at a random moment of a storm
of reserves, commits, releases, refunds and gateway calls spread over every replica, then
check everything through the survivor (see :func:`conftest.kill_during_storm`):

- the invariants hold on every database snapshot taken during the storm, and through the
  survivor's API afterwards (spent = ledger charges − refunds, reserved = holds, no enforced
  budget over its limit beyond flagged overruns, the audit chains verify);
- every reservation ends exactly once; the holds the dead replica left expire through the
  survivor's sweeper (short TTLs), charged at the hold when their request was sent;
- the requests in flight at the kill, sent again to the survivor with the same idempotency
  keys, and the answered ones replayed there, charge nothing twice and call no provider twice.

On PostgreSQL: two replicas of ``serve --workers 2``; on SQLite: two ``serve`` processes of
two workers each on one database file. ``make soak`` runs many more seeds
(``PAYMASTER_SOAK_SEEDS``, default 16 on PostgreSQL and 10 on SQLite).
"""

from __future__ import annotations

import os

import pytest

from .conftest import TOTALS, ClusterFactory, kill_during_storm

pytestmark = [pytest.mark.xdist_group("replicas")]

STORM_TTL = 4  # the gateway's holds: the sweeper ends the dead replica's within seconds
SOAK_SEEDS = int(os.environ.get("PAYMASTER_SOAK_SEEDS", "0"))
PG_SOAK = range(5000, 5000 + (SOAK_SEEDS or 16))
SQLITE_SOAK = range(7000, 7000 + (SOAK_SEEDS or 10))


def run(make_cluster: ClusterFactory, provider: object, backend: str, seed: int) -> None:
    cluster = make_cluster(replicas=2, workers=2, backend=backend, provider=provider, ttl=STORM_TTL)
    figures = kill_during_storm(cluster, provider, seed)
    TOTALS.add(backend, figures)
    assert figures.snapshots > 0, "no snapshot was checked during the storm"


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.parametrize("seed", [1, 4, 6])  # kills replica 0, 1, 0
def test_postgres_replica_killed_in_a_storm(
    make_cluster: ClusterFactory, provider: object, seed: int
) -> None:
    run(make_cluster, provider, "postgresql", seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [2, 11])  # kills replica 0, 1
def test_sqlite_serve_process_killed_in_a_storm(
    make_cluster: ClusterFactory, provider: object, seed: int
) -> None:
    run(make_cluster, provider, "sqlite", seed)


@pytest.mark.soak
@pytest.mark.postgres
@pytest.mark.parametrize("seed", PG_SOAK)
def test_soak_postgres_replica_killed(make_cluster: ClusterFactory, provider: object, seed: int) -> None:
    run(make_cluster, provider, "postgresql", seed)


@pytest.mark.soak
@pytest.mark.parametrize("seed", SQLITE_SOAK)
def test_soak_sqlite_serve_process_killed(make_cluster: ClusterFactory, provider: object, seed: int) -> None:
    run(make_cluster, provider, "sqlite", seed)
