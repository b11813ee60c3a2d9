"""Reproducible benchmarks: ``python -m bench`` (``make bench``) runs every section, each
printing one table; ``python -m bench --only ledger`` runs one.

A section is a name, a line saying what it measures, and a function of the parsed
arguments that prints its table. Add a section by appending it to ``SECTIONS``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sqlite3
import sys
from collections.abc import Callable
from dataclasses import dataclass

from bench import gateway, http, ledger, peer, postgres


@dataclass(frozen=True)
class Section:
    name: str
    about: str
    run: Callable[[argparse.Namespace], None]


SECTIONS: list[Section] = [
    Section("ledger", "reserve+commit pairs per second in process, by concurrent callers", ledger.main),
    Section(
        "http",
        "reserve+commit pairs/s over HTTP (serve --workers 2, SQLite) and reserve p50/p99",
        http.section,
    ),
    Section(
        "gateway",
        "direct call vs bare proxy vs governed gateway: p50/p99 overhead and calls/s at 32 clients",
        lambda args: print(gateway.report(gateway.run(seconds=args.seconds), 32)),
    ),
    Section(
        "postgres",
        "pairs/s and reserve p99 over HTTP, 1 vs 2 replicas on PostgreSQL; freeze-to-denial across replicas",
        postgres.section,
    ),
    Section(
        "peer",
        "LiteLLM proxy budget vs governed gateway: $0.01, 500 calls at 50: admitted, spent, overshoot",
        peer.section,
    ),
]


def environment() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"python {platform.python_version()} · sqlite {sqlite3.sqlite_version} · {platform.machine()}"
        f" · {os.cpu_count()} CPUs · load average {load}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=[s.name for s in SECTIONS], help="run one section")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per row (default 5)")
    parser.add_argument("--profile", action="store_true", help="also profile where the time goes (cProfile)")
    parser.add_argument("--peer", action="store_true", help="peer: install the LiteLLM venv if missing")
    args = parser.parse_args(argv)
    print(environment())
    for section in SECTIONS:
        if args.only is None or args.only == section.name:
            print(f"\n== {section.name}: {section.about}")
            section.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
