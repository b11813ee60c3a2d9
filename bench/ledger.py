"""The ledger in process: reserve+commit pairs per second at 1, 8 and 64 concurrent callers.

Each caller is a real thread calling the Authority directly (no HTTP): a reserve of 0.01
with an idempotency key, then a commit of 0.008 with its own key, as the API would send
them. The store is the default embedded one with its full durability: SQLite in WAL mode,
``synchronous=NORMAL``, one writer thread per process committing in groups, every
transaction sealing the audit chain with a signed head. The budget path of every call
holds three budgets: the agent's wallet, its day cap and its team's day cap. Each row
uses a fresh database and its own agents (one per caller, sharing the team cap).

With ``--profile``, the writer thread is profiled with cProfile at the highest
concurrency and its top functions are printed.
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import pstats
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paymaster.authority import Authority, Caller, ReserveRequest, body_hash
from paymaster.bootstrap import open_authority
from paymaster.config import load_settings
from paymaster.core import tokens
from paymaster.money import parse_nanos

CALLERS = (1, 8, 64)
LATENCIES = ("reserve_p50_ms", "reserve_p99_ms", "commit_p50_ms", "commit_p99_ms")
WARMUP_SECONDS = 0.5


@dataclass
class Sample:
    pairs: int = 0
    reserve_ns: list[int] = field(default_factory=list)
    commit_ns: list[int] = field(default_factory=list)


def open_fresh(directory: Path) -> Authority:
    config = directory / "paymaster.toml"
    config.write_text("")
    settings = load_settings(
        db=f"sqlite:///{directory / 'bench.db'}", config=str(config), env={}, home=str(directory)
    )
    return open_authority(settings)


def setup(authority: Authority, callers: int) -> list[str]:
    team = "team-bench"
    authority.put_principal(
        team, {"policy": {"caps": [{"scope": "all", "period": "day", "limit": "1000000.00"}]}}
    )
    agents = []
    for i in range(callers):
        key = tokens.public_key_b64(tokens.generate_private_key())
        agent = authority.create_agent(f"bench-{i}", key, parent=team, policy={"daily_cap": "100000.00"})
        authority.fund(agent["id"], parse_nanos("100000.00"))
        agents.append(agent["id"])
    return agents


def caller(
    authority: Authority, agent: str, stop: threading.Event, measuring: threading.Event, out: Sample
) -> None:
    who = Caller("agent", agent_id=agent)
    admin = Caller.admin()
    amount, charge = parse_nanos("0.01"), parse_nanos("0.008")
    for i in itertools.count():
        if stop.is_set():
            return
        key = f"{agent}-{i}"
        body = {"agent_id": agent, "connector": "bench", "amount": "0.01", "idempotency_key": key}
        request = ReserveRequest(
            connector="bench", idempotency_key=key, agent_id=agent, amount=amount, body_hash=body_hash(body)
        )
        t0 = time.perf_counter_ns()
        res = authority.reserve(request, who)
        t1 = time.perf_counter_ns()
        authority.commit(
            res["reservation_id"],
            amount=charge,
            caller=admin,
            idempotency_key=f"c-{key}",
            body={"amount": "0.008"},
        )
        t2 = time.perf_counter_ns()
        if measuring.is_set() and not stop.is_set():
            out.pairs += 1
            out.reserve_ns.append(t1 - t0)
            out.commit_ns.append(t2 - t1)


def measure(callers: int, seconds: float, profile: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="pm-bench-") as tmp:
        authority = open_fresh(Path(tmp))
        try:
            agents = setup(authority, callers)
            profiler = cProfile.Profile() if profile else None
            if profiler is not None:
                run_batch = authority.store._run_batch  # type: ignore[attr-defined]

                def profiled(batch: Any) -> Any:
                    profiler.enable()
                    try:
                        return run_batch(batch)
                    finally:
                        profiler.disable()

                authority.store._run_batch = profiled  # type: ignore[attr-defined]
            stop, measuring = threading.Event(), threading.Event()
            samples = [Sample() for _ in range(callers)]
            threads = [
                threading.Thread(target=caller, args=(authority, agents[i], stop, measuring, samples[i]))
                for i in range(callers)
            ]
            for t in threads:
                t.start()
            time.sleep(WARMUP_SECONDS)
            measuring.set()
            started = time.perf_counter()
            time.sleep(seconds)
            stop.set()
            elapsed = time.perf_counter() - started
            for t in threads:
                t.join()
            if profiler is not None:
                print(f"\nwriter thread profile at {callers} callers (cumulative, top 25):")
                pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
            assert authority.verify_audit().ok
        finally:
            authority.store.close()
    reserves = sorted(itertools.chain.from_iterable(s.reserve_ns for s in samples))
    commits = sorted(itertools.chain.from_iterable(s.commit_ns for s in samples))
    pairs = sum(s.pairs for s in samples)
    return {
        "callers": callers,
        "pairs_per_s": pairs / elapsed,
        "pairs": pairs,
        "reserve_p50_ms": percentile(reserves, 50),
        "reserve_p99_ms": percentile(reserves, 99),
        "commit_p50_ms": percentile(commits, 50),
        "commit_p99_ms": percentile(commits, 99),
    }


def percentile(sorted_ns: list[int], p: int) -> float:
    if not sorted_ns:
        return float("nan")
    if len(sorted_ns) == 1:
        return sorted_ns[0] / 1e6
    return statistics.quantiles(sorted_ns, n=100, method="inclusive")[p - 1] / 1e6


def main(args: argparse.Namespace) -> None:
    print(
        "SQLite WAL, synchronous=NORMAL, group commit; path: wallet + agent day cap + team day cap;"
        f" {args.seconds:g} s per row after {WARMUP_SECONDS:g} s of warm-up"
    )
    header = (
        "callers",
        "pairs/s",
        "pairs",
        "reserve p50 ms",
        "reserve p99 ms",
        "commit p50 ms",
        "commit p99 ms",
    )
    print(" | ".join(header))
    print(" | ".join("-" * len(h) for h in header))
    for callers in CALLERS:
        row = measure(callers, args.seconds, profile=args.profile and callers == CALLERS[-1])
        cells = (
            f"{row['callers']:>7}",
            f"{row['pairs_per_s']:>7,.0f}",
            f"{row['pairs']:>5}",
            *(f"{row[k]:>{len(h)}.2f}" for k, h in zip(LATENCIES, header[3:], strict=True)),
        )
        print(" | ".join(cells), flush=True)
