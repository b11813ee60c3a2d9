"""Many real threads and real processes reserving against one budget at once: exactly what
fits is allowed, nothing more, and the audit chain still verifies."""

from __future__ import annotations

import multiprocessing
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from paymaster.authority import Authority, Caller, ReserveRequest
from paymaster.bootstrap import open_authority
from paymaster.errors import BalanceInsufficient, PolicyCapExceeded
from paymaster.money import format_nanos

from .conftest import AuthorityFactory, Backend, FakeClock, Ledger, check_invariants, n, settings_for

pytestmark = pytest.mark.slow

AMOUNT = n("0.25")
N = 40  # the wallet (or cap) holds exactly N reserves of AMOUNT


def hammer(
    authority: Authority, agents: list[str], threads: int, attempts: int, start: Callable[[], Any]
) -> Counter[str]:
    """``threads`` real threads, released together, each making ``attempts`` reserves of
    AMOUNT for the agents in turn; counts the outcomes by code."""
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()

    def worker(index: int) -> None:
        start()
        for attempt in range(attempts):
            agent = agents[(index + attempt) % len(agents)]
            request = ReserveRequest(connector="tool", idempotency_key=None, agent_id=agent, amount=AMOUNT)
            try:
                authority.reserve(request, Caller("agent", agent_id=agent))
                code = "allowed"
            except (BalanceInsufficient, PolicyCapExceeded) as exc:
                code = exc.code
            except Exception as exc:  # anything else is a failure of the test
                code = f"error: {exc!r}"
            with lock:
                outcomes[code] += 1

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in pool), "a reserving thread hung"
    return outcomes


def test_64_threads_get_exactly_what_one_wallet_holds(ledger: Ledger) -> None:
    agent = ledger.agent(fund=format_nanos(N * AMOUNT))
    barrier = threading.Barrier(64)

    outcomes = hammer(ledger.authority, [agent], threads=64, attempts=2, start=barrier.wait)

    assert outcomes == {"allowed": N, "balance_insufficient": 128 - N}
    assert ledger.state(f"{agent}/total") == (N * AMOUNT, 0, N * AMOUNT)
    snap = check_invariants(ledger.authority)
    assert snap.allowed_events == N


def test_64_threads_of_many_agents_get_exactly_what_a_shared_parent_cap_holds(ledger: Ledger) -> None:
    ledger.authority.put_principal(
        "team-race",
        {"policy": {"caps": [{"scope": "all", "period": "day", "limit": format_nanos(N * AMOUNT)}]}},
    )
    agents = [ledger.agent(fund="100.00", parent="team-race") for _ in range(8)]
    barrier = threading.Barrier(64)

    outcomes = hammer(ledger.authority, agents, threads=64, attempts=2, start=barrier.wait)

    assert outcomes == {"allowed": N, "policy_cap_exceeded": 128 - N}
    assert ledger.state(ledger.day("team-race")) == (N * AMOUNT, 0, N * AMOUNT)
    assert sum(ledger.state(f"{a}/total")[2] for a in agents) == N * AMOUNT
    assert check_invariants(ledger.authority).allowed_events == N


def _race_processes(
    backend: Backend,
    tmp_path: Path,
    agents: list[str],
    processes: int = 4,
    threads: int = 8,
    attempts: int = 3,
) -> Counter[str]:
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(processes)
    results = ctx.Queue()
    home = str(tmp_path / "home")

    pool = [
        ctx.Process(
            target=_process_start, args=(backend.url, home, agents, threads, attempts, start, results)
        )
        for _ in range(processes)
    ]
    for p in pool:
        p.start()
    outcomes: Counter[str] = Counter()
    for _ in pool:
        outcomes.update(results.get(timeout=120))
    for p in pool:
        p.join(timeout=60)
        assert p.exitcode == 0
    return outcomes


def _process_start(
    url: str, home: str, agents: list[str], threads: int, attempts: int, start: Any, results: Any
) -> None:
    """Open the authority first, then wait for every process, then race."""
    authority = open_authority(settings_for(url, Path(home)), clock=FakeClock())
    try:
        authority.agent(agents[0])  # warm: the race measures the store, not the imports
        start.wait(timeout=60)
        results.put(dict(hammer(authority, agents, threads, attempts, start=lambda: None)))
    finally:
        authority.store.close()


def test_4_processes_get_exactly_what_one_wallet_holds(
    backend: Backend, make_authority: AuthorityFactory, tmp_path: Path
) -> None:
    authority = make_authority()
    ledger = Ledger(authority, FakeClock())
    agent = ledger.agent(fund=format_nanos(N * AMOUNT))

    outcomes = _race_processes(backend, tmp_path, [agent])

    assert outcomes == {"allowed": N, "balance_insufficient": 4 * 8 * 3 - N}
    assert ledger.state(f"{agent}/total") == (N * AMOUNT, 0, N * AMOUNT)
    snap = check_invariants(authority)
    assert snap.allowed_events == N
    assert len(snap.reservations) == N


def test_4_processes_of_many_agents_get_exactly_what_a_shared_parent_cap_holds(
    backend: Backend, make_authority: AuthorityFactory, tmp_path: Path
) -> None:
    authority = make_authority()
    ledger = Ledger(authority, FakeClock())
    authority.put_principal(
        "team-procs",
        {"policy": {"caps": [{"scope": "all", "period": "day", "limit": format_nanos(N * AMOUNT)}]}},
    )
    agents = [ledger.agent(fund="100.00", parent="team-procs") for _ in range(6)]

    outcomes = _race_processes(backend, tmp_path, agents)

    assert outcomes == {"allowed": N, "policy_cap_exceeded": 4 * 8 * 3 - N}
    assert ledger.state(ledger.day("team-procs")) == (N * AMOUNT, 0, N * AMOUNT)
    assert check_invariants(authority).allowed_events == N


def test_the_chain_verifies_while_others_write(ledger: Ledger) -> None:
    """A verification running beside live traffic sees a consistent chain, never a
    false alarm."""
    agent = ledger.agent(fund="1000000.00")
    stop = threading.Event()
    failures: list[str] = []

    def traffic() -> None:
        while not stop.is_set():
            res = ledger.reserve(agent, "0.01")
            ledger.commit(res["reservation_id"], "0.005")

    writers = [threading.Thread(target=traffic) for _ in range(4)]
    for t in writers:
        t.start()
    try:
        for _ in range(30):
            result = ledger.authority.verify_audit()
            if not result.ok:
                failures.append(str(result))
    finally:
        stop.set()
        for t in writers:
            t.join(timeout=60)
    assert failures == []
    check_invariants(ledger.authority)
