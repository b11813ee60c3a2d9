"""A storm of ledger verbs on several threads, run as a child process and killed at random
by tests/ledger/test_crash.py.

    python tests/ledger/_storm.py --db URL --home DIR --config FILE --agents A,B,C \\
        --seed N --start ISO --log FILE [--threads 4]

Its clock is ``--start`` plus the time it has run. Every acknowledged verb (the store
committed it) is appended to ``--log`` as one line, with a single ``write`` so that a kill
never leaves half a line: ``R res`` reserve, ``C res entry amount`` commit, ``X res``
release, ``F entry amount refund`` refund, ``S res`` request sent, ``D code`` a denied
reserve, ``U agent amount`` a wallet funded. The log is a lower bound: a verb may commit
just before the kill and never reach it. It prints ``ready`` once its authority is open,
and runs until it is killed.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time
from datetime import datetime, timedelta

from paymaster.authority import Authority, Caller, ReserveRequest
from paymaster.bootstrap import open_authority
from paymaster.config import load_settings
from paymaster.errors import SpendDenied

CENT = 10_000_000


class Log:
    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, *fields: object) -> None:
        os.write(self._fd, (" ".join(str(f) for f in fields) + "\n").encode())


def storm(authority: Authority, agents: list[str], rng: random.Random, log: Log) -> None:
    """Reserve, then commit (less, equal or more), release, or abandon the hold; now and
    then mark the request sent, refund part of an earlier charge, or top a wallet up."""
    charges: list[tuple[str, int]] = []
    admin = Caller.admin()
    while True:
        agent = rng.choice(agents)
        if rng.random() < 0.05:
            authority.fund(agent, 200 * CENT)
            log.write("U", agent, 200 * CENT)
        amount = rng.randint(1, 60) * CENT
        request = ReserveRequest(
            connector=rng.choice(["llm", "tool"]),
            idempotency_key=None,
            agent_id=agent,
            amount=amount,
            ttl_seconds=rng.choice([30, 300, 3600]),
        )
        try:
            res = authority.reserve(request, Caller("agent", agent_id=agent))
        except SpendDenied as denied:
            log.write("D", denied.code)
            continue
        rid = res["reservation_id"]
        log.write("R", rid)
        if rng.random() < 0.3:
            authority.mark_request_sent(rid)
            log.write("S", rid)
        roll = rng.random()
        try:
            if roll < 0.55:
                charge = rng.choice(
                    [amount * rng.randint(0, 99) // 100, amount, amount + rng.randint(1, 30) * CENT]
                )
                out = authority.commit(rid, amount=charge, caller=admin)
                log.write("C", rid, out["ledger_entry_id"], charge)
                if charge:
                    charges.append((out["ledger_entry_id"], charge))
            elif roll < 0.8:
                authority.release(rid, caller=admin)
                log.write("X", rid)
            # else: abandoned; the sweeper will find it
            if charges and rng.random() < 0.15:
                entry, total = charges.pop(rng.randrange(len(charges)))
                part = rng.randint(1, total)
                out = authority.refund(entry, part, "storm", None)
                log.write("F", entry, part, out["refund_id"])
        except SpendDenied:
            continue


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    for name in ("--db", "--home", "--config", "--agents", "--start", "--log"):
        parser.add_argument(name, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args(argv)

    start = datetime.fromisoformat(args.start)
    began = time.monotonic()

    def clock() -> datetime:
        return start + timedelta(seconds=time.monotonic() - began)

    settings = load_settings(db=args.db, config=args.config, env={}, home=args.home)
    authority = open_authority(settings, clock=clock)
    agents = args.agents.split(",")
    log = Log(args.log)
    errors: list[BaseException] = []

    def run(seed: int) -> None:
        try:
            storm(authority, agents, random.Random(seed), log)
        except BaseException as exc:  # report it: the parent fails the test
            errors.append(exc)
            raise

    threads = [
        threading.Thread(target=run, args=(args.seed * 100 + i,), daemon=True) for i in range(args.threads)
    ]
    for t in threads:
        t.start()
    print("ready", flush=True)
    while not errors:
        time.sleep(0.05)
    print(f"storm failed: {errors[0]!r}", file=sys.stderr, flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
