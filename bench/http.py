"""The authority over HTTP on the embedded store: reserve+commit pairs per second at 1, 16
and 64 concurrent clients, and the p50/p99 latency of a reserve.

One run starts ``paymaster serve`` (uvicorn, uvloop, httptools; two worker processes on
one SQLite file, the default store) and a load generator in its own process (asyncio +
aiohttp, spend tokens signed ahead so its CPU goes to requests). Each pair is a reserve of
0.01 with a fresh idempotency key and the agent's spend token, then a commit with its own
key and token: exactly what an agent sends. Reuses the replica and generator machinery of
``bench.postgres``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.postgres import ADMIN_KEY, ROOT, Replica, make_agents, run_load

CLIENTS = (1, 16, 64)
TARGET_PAIRS = 3_000
TARGET_P99_MS = 10.0


def run(seconds: float, workers: int = 2) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="pm-bench-http-") as tmp:
        workdir = Path(tmp)
        config = workdir / "paymaster.toml"
        config.write_text('authority_id = "pm.bench"\n')
        env = {k: v for k, v in os.environ.items() if not k.startswith("PAYMASTER_")}
        env.update(
            PAYMASTER_DB=f"sqlite:///{workdir / 'pm.db'}",
            PAYMASTER_CONFIG=str(config),
            PAYMASTER_ADMIN_KEY=ADMIN_KEY,
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        )
        init = [str(Path(sys.executable).with_name("paymaster")), "init"]
        subprocess.run(init, env=env, cwd=workdir, check=True, capture_output=True, timeout=120)
        server = Replica(env, workers, workdir)
        try:
            server.wait_ready()
            keys = workdir / "agents.json"
            make_agents(server.url, max(CLIENTS), keys)
            rows = []
            for clients in CLIENTS:
                got = run_load(
                    "pairs", [server.url], keys, env, clients=clients, seconds=seconds, pgids=server.proc.pid
                )
                got["clients"] = clients
                rows.append(got)
            return rows
        finally:
            server.stop()


def report(rows: list[dict[str, Any]], workers: int) -> str:
    lines = [f"{'clients':>7} {'pairs/s':>9} {'reserve p50 ms':>15} {'reserve p99 ms':>15}  errors"]
    for r in rows:
        lines.append(
            f"{r['clients']:>7} {r['pairs_per_s']:>9.0f} {r['reserve_p50_ms']:>15.2f}"
            f" {r['reserve_p99_ms']:>15.2f}  {r['errors'] or '-'}"
        )
    best = max(r["pairs_per_s"] for r in rows)
    at16 = next(r for r in rows if r["clients"] == 16)
    lines += [
        "",
        f"serve --workers {workers}, SQLite: best {best:.0f} pairs/s (target >= {TARGET_PAIRS:,});"
        f" reserve p99 at 16 clients {at16['reserve_p99_ms']:.2f} ms (target < {TARGET_P99_MS} ms)",
    ]
    return "\n".join(lines)


def section(args: argparse.Namespace) -> None:
    print(report(run(seconds=args.seconds), workers=2))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.http")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    print(report(run(args.seconds, args.workers), args.workers))


if __name__ == "__main__":
    main()
