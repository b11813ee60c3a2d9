"""PostgreSQL scale-out over HTTP: reserve+commit pairs per second and reserve latency with one
replica and with two (the same total client concurrency, spread over the replicas), and the
time from a freeze on one replica to the first reserve another replica denies.

    .venv/bin/python -m bench.postgres [--seconds 10] [--clients 64] [--workers 1] [--trials 20]
    .venv/bin/python -m bench --only postgres

Each replica is ``uvicorn --factory paymaster.server.run:app_from_env`` (uvloop, httptools, no
access log; what ``paymaster serve`` runs) with ``--workers`` processes, in a process group of its
own, on one fresh PostgreSQL database (from ``PAYMASTER_TEST_PG``, default
``postgresql://postgres@127.0.0.1:5432/test``; dropped afterwards) that ``paymaster init`` made.
The load generator is a separate process (asyncio + aiohttp): ``--clients`` loops, each an agent
of its own (wallet and day cap: two budgets per call), each sending a reserve then its commit,
both with a spend token signed ahead and an idempotency key, client ``i`` to replica
``i mod replicas``. Pairs count when both answered 201/200 within the measured window, after a
warm-up; the reserve latency is the reserve request's own.

Freeze: four loops reserve for one agent on replica B as fast as they can; at a random moment
the admin API on replica A freezes the agent; the figure is the time from the freeze's answer
to the first ``agent_frozen`` answer on B. Repeated ``--trials`` times (unfrozen in between).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
PG_BASE_URL = os.environ.get("PAYMASTER_TEST_PG") or "postgresql://postgres@127.0.0.1:5432/test"
ADMIN_KEY = "pm_admin_bench-" + secrets.token_hex(8)
WARMUP_SECONDS = 3.0
AMOUNT = "0.001"
TARGET_RATIO = 1.6
TARGET_PAIRS = 3000
TARGET_FREEZE_MS = 100


# ---------------------------------------------------------------- the load generator (its own process)


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def load_keys(path: str) -> list[tuple[str, Any]]:
    from paymaster.core.tokens import private_key_from_pem

    return [(a["id"], private_key_from_pem(a["pem"].encode())) for a in json.loads(Path(path).read_text())]


def sign(agent_id: str, key: Any) -> str:
    from paymaster.core.tokens import sign_spend_token

    return sign_spend_token(key, agent_id=agent_id, aud="paymaster", ttl_seconds=300)


TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pgids: Sequence[int]) -> dict[str, float]:
    """CPU seconds used so far by the replicas' process groups, by every PostgreSQL backend
    (the server may be shared: its other sessions count too), by this generator, and by the
    whole machine (busy, from /proc/stat)."""
    out = {"replicas": 0.0, "postgres": 0.0, "generator": time.process_time(), "machine": 0.0}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        used = (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime
        if int(fields[2]) in pgids:  # pgrp
            out["replicas"] += used
        elif comm == "postgres":
            out["postgres"] += used
    cpu = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    ticks = [int(x) for x in cpu]
    out["machine"] = (sum(ticks) - ticks[3] - ticks[4]) / TICKS  # all but idle and iowait
    return out


async def pairs_load(
    urls: list[str], keys_file: str, clients: int, seconds: float, presign: int, pgids: Sequence[int]
) -> dict[str, Any]:
    """``clients`` loops of reserve then commit; figures over ``seconds`` after the warm-up."""
    import aiohttp

    agents = load_keys(keys_file)
    per_client = max(1, presign // clients)
    # tokens are signed ahead: the generator's CPU goes to requests, not signatures
    pools = [[sign(*agents[i % len(agents)]) for _ in range(2 * per_client)] for i in range(clients)]
    reserve_ms: list[float] = []
    commit_ms: list[float] = []
    errors: dict[str, int] = {}
    pairs = 0
    began = time.perf_counter()
    measure_from = began + WARMUP_SECONDS
    stop_at = measure_from + seconds

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def client(i: int) -> None:
            nonlocal pairs
            agent_id, key = agents[i % len(agents)]
            base = urls[i % len(urls)]
            pool = pools[i]

            def headers() -> dict[str, str]:
                token = pool.pop() if pool else sign(agent_id, key)
                return {"x-paymaster-agent-id": agent_id, "x-paymaster-spend-token": token}

            while (t0 := time.perf_counter()) < stop_at:
                body = {"connector": "tool", "amount": AMOUNT, "idempotency_key": secrets.token_hex(12)}
                async with session.post(f"{base}/v1/reservations", json=body, headers=headers()) as r:
                    answer = await r.json()
                    status = r.status
                t1 = time.perf_counter()
                if status != 201:
                    code = answer.get("error", {}).get("code", str(status))
                    errors[code] = errors.get(code, 0) + 1
                    continue
                path = f"{base}/v1/reservations/{answer['reservation_id']}/commit"
                async with session.post(
                    path, json={"idempotency_key": secrets.token_hex(12)}, headers=headers()
                ) as r:
                    await r.read()
                    status = r.status
                t2 = time.perf_counter()
                if status != 200:
                    errors[f"commit {status}"] = errors.get(f"commit {status}", 0) + 1
                    continue
                if t0 >= measure_from and t2 <= stop_at:
                    pairs += 1
                    reserve_ms.append((t1 - t0) * 1000)
                    commit_ms.append((t2 - t1) * 1000)

        async def account() -> dict[str, float]:
            await asyncio.sleep(measure_from - time.perf_counter())
            first = cpu_seconds(pgids)
            await asyncio.sleep(stop_at - time.perf_counter())
            last = cpu_seconds(pgids)
            return {name: last[name] - first[name] for name in first}

        accounting = asyncio.create_task(account())
        await asyncio.gather(*(client(i) for i in range(clients)))
        cpu = await accounting
    return {
        "cpu_ms_per_pair": {name: 1000 * used / max(pairs, 1) for name, used in cpu.items()},
        "machine_busy": cpu["machine"] / seconds / (os.cpu_count() or 1),
        "pairs": pairs,
        "seconds": seconds,
        "pairs_per_s": pairs / seconds,
        "reserve_p50_ms": percentile(reserve_ms, 0.50),
        "reserve_p99_ms": percentile(reserve_ms, 0.99),
        "commit_p99_ms": percentile(commit_ms, 0.99),
        "errors": errors,
    }


async def freeze_trials(url_a: str, url_b: str, keys_file: str, trials: int, probes: int = 4) -> list[float]:
    """Milliseconds from a freeze answered by A to the first ``agent_frozen`` answered by B."""
    import aiohttp

    agent_id, key = load_keys(keys_file)[0]
    admin = {"authorization": f"Bearer {os.environ['PAYMASTER_ADMIN_KEY']}"}
    gaps: list[float] = []
    rng = random.Random(7)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def reserve_on_b() -> tuple[int, str | None, float]:
            body = {"connector": "tool", "amount": "0.000001", "idempotency_key": secrets.token_hex(12)}
            headers = {"x-paymaster-agent-id": agent_id, "x-paymaster-spend-token": sign(agent_id, key)}
            async with session.post(f"{url_b}/v1/reservations", json=body, headers=headers) as r:
                answer = await r.json()
                code = answer.get("error", {}).get("code") if r.status >= 400 else None
                return r.status, code, time.perf_counter()

        for _ in range(trials):
            async with session.post(f"{url_a}/v1/agents/{agent_id}/unfreeze", headers=admin) as r:
                assert r.status == 200, await r.text()
            while (await reserve_on_b())[0] != 201:  # B serves the agent again
                pass
            frozen = asyncio.Event()
            first_denied: list[float] = []

            async def probe() -> None:
                while not first_denied:
                    status, code, answered = await reserve_on_b()
                    if code == "agent_frozen" and frozen.is_set():
                        first_denied.append(answered)
                    elif status not in (201, 403):
                        raise AssertionError(f"probe answered {status} {code}")

            tasks = [asyncio.create_task(probe()) for _ in range(probes)]
            await asyncio.sleep(rng.uniform(0.02, 0.08))  # a random moment of the probing
            async with session.post(f"{url_a}/v1/agents/{agent_id}/freeze", headers=admin) as r:
                assert r.status == 200, await r.text()
                freeze_answered = time.perf_counter()
            frozen.set()
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
            gaps.append(max(0.0, (min(first_denied) - freeze_answered) * 1000))
    return gaps


def in_process(keys_file: str, clients: int, seconds: float, pgids: Sequence[int]) -> dict[str, Any]:
    """The same two requests without HTTP: ``clients`` threads call the API's reserve and commit
    handlers (token verification, parsing, the verbs) on one authority, as a replica's worker
    threads do. The difference from a replica's CPU per pair is the HTTP and ASGI layers'."""
    import threading

    from starlette.datastructures import Headers, QueryParams

    from paymaster.bootstrap import open_authority
    from paymaster.config import load_settings
    from paymaster.server import routes_authority
    from paymaster.server.context import Incoming

    agents = load_keys(keys_file)
    authority = open_authority(load_settings())
    reserve_ms: list[float] = []
    pairs = 0
    lock = threading.Lock()
    measuring, stop = threading.Event(), threading.Event()

    def incoming(
        agent_id: str, key: Any, path: str, body: dict[str, Any], rid: str | None = None
    ) -> Incoming:
        headers = Headers({"x-paymaster-agent-id": agent_id, "x-paymaster-spend-token": sign(agent_id, key)})
        params = {"id": rid} if rid else {}
        return Incoming(
            "POST", f"http://bench{path}", headers, QueryParams(""), params, json.dumps(body).encode()
        )

    def caller(i: int) -> None:
        nonlocal pairs
        agent_id, key = agents[i % len(agents)]
        while not stop.is_set():
            body = {"connector": "tool", "amount": AMOUNT, "idempotency_key": secrets.token_hex(12)}
            req = incoming(agent_id, key, "/v1/reservations", body)
            t0 = time.perf_counter()
            _, held = routes_authority.reserve(authority, req)
            t1 = time.perf_counter()
            rid = held["reservation_id"]
            req = incoming(
                agent_id,
                key,
                f"/v1/reservations/{rid}/commit",
                {"idempotency_key": secrets.token_hex(12)},
                rid,
            )
            routes_authority.commit(authority, req)
            if measuring.is_set() and not stop.is_set():
                with lock:
                    pairs += 1
                    reserve_ms.append((t1 - t0) * 1000)

    threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(WARMUP_SECONDS)
    first, signed_before = cpu_seconds(pgids), time.perf_counter()
    measuring.set()
    time.sleep(seconds)
    stop.set()
    last = cpu_seconds(pgids)
    elapsed = time.perf_counter() - signed_before
    for t in threads:
        t.join(timeout=60)
    authority.store.close()
    cpu = {name: last[name] - first[name] for name in first}
    return {
        "pairs": pairs,
        "pairs_per_s": pairs / elapsed,
        "reserve_p50_ms": percentile(reserve_ms, 0.50),
        "reserve_p99_ms": percentile(reserve_ms, 0.99),
        # the authority runs in this process: its CPU is the "generator" line; signing tokens included
        "cpu_ms_per_pair": {name: 1000 * used / max(pairs, 1) for name, used in cpu.items()},
        "machine_busy": cpu["machine"] / elapsed / (os.cpu_count() or 1),
    }


def load_main(argv: Sequence[str]) -> None:
    import uvloop

    parser = argparse.ArgumentParser(prog="bench.postgres load")
    parser.add_argument("what", choices=["pairs", "freeze", "inproc"])
    parser.add_argument("--urls", required=True)
    parser.add_argument("--keys", required=True)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--presign", type=int, default=60_000)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--pgids", default="")
    args = parser.parse_args(argv)
    urls = args.urls.split(",")
    pgids = [int(x) for x in args.pgids.split(",") if x]
    if args.what == "pairs":
        result: Any = uvloop.run(pairs_load(urls, args.keys, args.clients, args.seconds, args.presign, pgids))
    elif args.what == "inproc":
        result = in_process(args.keys, args.clients, args.seconds, pgids)
    else:
        result = uvloop.run(freeze_trials(urls[0], urls[1], args.keys, args.trials))
    print(json.dumps(result))


# ---------------------------------------------------------------- the replicas


def pg_problem() -> str | None:
    try:
        import psycopg

        with psycopg.connect(PG_BASE_URL, connect_timeout=3, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        return f"no PostgreSQL answers at {PG_BASE_URL}: {exc}"
    return None


def pg_admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(PG_BASE_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql)  # type: ignore[arg-type,unused-ignore]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Replica:
    def __init__(self, env: dict[str, str], workers: int, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable, "-m", "uvicorn", "--factory", "paymaster.server.run:app_from_env",
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(workers),
            "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning",
        ]  # fmt: skip
        self.log = open(workdir / f"replica-{self.port}.log", "wb")
        self.proc = subprocess.Popen(
            command, env=env, cwd=workdir, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self, timeout: float = 90.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"replica on port {self.port} exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"replica on port {self.port} did not become healthy")

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.log.close()


@dataclass
class Figures:
    replicas: int
    workers: int
    clients: int
    pairs_per_s: float
    reserve_p50_ms: float
    reserve_p99_ms: float
    commit_p99_ms: float
    errors: dict[str, int]
    cpu_ms_per_pair: dict[str, float]
    machine_busy: float


@dataclass
class Result:
    runs: list[Figures]
    freeze_ms: list[float]
    inproc: dict[str, Any]

    def by_replicas(self, n: int) -> list[Figures]:
        return [f for f in self.runs if f.replicas == n]


def run_load(what: str, urls: list[str], keys: Path, env: dict[str, str], **options: Any) -> Any:
    argv = [
        sys.executable,
        "-m",
        "bench.postgres",
        "load",
        what,
        "--urls",
        ",".join(urls),
        "--keys",
        str(keys),
    ]
    for name, value in options.items():
        argv += [f"--{name}", str(value)]
    done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"the load generator failed:\n{done.stderr}")
    return json.loads(done.stdout)


def make_agents(url: str, count: int, keys: Path) -> None:
    """``count`` agents, each with a wallet and a day cap, their keys written for the generator."""
    import httpx

    from paymaster.core import tokens

    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    out = []
    with httpx.Client(base_url=url, headers=admin, timeout=60) as client:
        for i in range(count):
            key = tokens.generate_private_key()
            policy = {"caps": [{"scope": "all", "period": "day", "limit": "1000000.00"}]}
            body = {"name": f"bench-{i}", "public_key": tokens.public_key_b64(key), "policy": policy}
            r = client.post("/v1/agents", json=body)
            r.raise_for_status()
            agent_id = r.json()["id"]
            client.post(f"/v1/agents/{agent_id}/fund", json={"amount": "1000000.00"}).raise_for_status()
            out.append({"id": agent_id, "pem": tokens.private_key_to_pem(key).decode()})
    keys.write_text(json.dumps(out))
    keys.chmod(0o600)


def run(seconds: float, clients: int, workers: int, trials: int, rounds: int = 1) -> Result:
    database = f"pm_bench_{secrets.token_hex(5)}"
    parts = urlsplit(PG_BASE_URL)
    db_url = urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))
    pg_admin(f'CREATE DATABASE "{database}"')
    replicas: list[Replica] = []
    try:
        with tempfile.TemporaryDirectory(prefix="pm-bench-pg-") as tmp:
            workdir = Path(tmp)
            config = workdir / "paymaster.toml"
            config.write_text('authority_id = "pm.bench"\n')
            env = {k: v for k, v in os.environ.items() if not k.startswith("PAYMASTER_")}
            env.update(
                PAYMASTER_DB=db_url,
                PAYMASTER_HOME=str(workdir / "home"),
                PAYMASTER_CONFIG=str(config),
                PAYMASTER_ADMIN_KEY=ADMIN_KEY,
                PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
            )
            init = [str(Path(sys.executable).with_name("paymaster")), "init"]
            subprocess.run(init, env=env, cwd=workdir, check=True, capture_output=True, timeout=120)
            keys = workdir / "agents.json"
            a = Replica(env, workers, workdir)
            replicas.append(a)
            a.wait_ready()
            make_agents(a.url, clients, keys)
            runs: list[Figures] = []
            b: Replica | None = None
            for _ in range(rounds):
                for n in (1, 2):
                    if n == 1 and b is not None:
                        b.stop()
                        replicas.remove(b)
                        b = None
                    if n == 2 and b is None:
                        b = Replica(env, workers, workdir)
                        replicas.append(b)
                        b.wait_ready()
                    urls = [r.url for r in replicas]
                    pgids = ",".join(str(r.proc.pid) for r in replicas)
                    got = run_load("pairs", urls, keys, env, clients=clients, seconds=seconds, pgids=pgids)
                    runs.append(
                        Figures(
                            n,
                            workers,
                            clients,
                            got["pairs_per_s"],
                            got["reserve_p50_ms"],
                            got["reserve_p99_ms"],
                            got["commit_p99_ms"],
                            got["errors"],
                            got["cpu_ms_per_pair"],
                            got["machine_busy"],
                        )
                    )
            assert b is not None
            freeze = run_load("freeze", [a.url, b.url], keys, env, trials=trials)
            inproc = run_load("inproc", [], keys, env, clients=clients, seconds=seconds)
            return Result(runs, freeze, inproc)
    finally:
        for replica in replicas:
            replica.stop()
        pg_admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def report(result: Result) -> str:
    lines = [
        f"{'replicas':<9} {'workers':>7} {'clients':>7} {'pairs/s':>9} {'reserve p50 ms':>15}"
        f" {'reserve p99 ms':>15} {'commit p99 ms':>14} {'CPU ms/pair: replicas':>22} {'postgres':>9}"
        f" {'generator':>10} {'machine busy':>13}  errors"
    ]
    for f in result.runs:
        cpu = f.cpu_ms_per_pair
        lines.append(
            f"{f.replicas:<9} {f.workers:>7} {f.clients:>7} {f.pairs_per_s:>9.0f} {f.reserve_p50_ms:>15.1f}"
            f" {f.reserve_p99_ms:>15.1f} {f.commit_p99_ms:>14.1f} {cpu['replicas']:>22.2f}"
            f" {cpu['postgres']:>9.2f} {cpu['generator']:>10.2f} {f.machine_busy:>13.0%}  {f.errors or '-'}"
        )
    ip = result.inproc
    cpu = ip["cpu_ms_per_pair"]
    lines.append(
        f"{'in process':<9} {'-':>7} {result.runs[0].clients:>7} {ip['pairs_per_s']:>9.0f}"
        f" {ip['reserve_p50_ms']:>15.1f} {ip['reserve_p99_ms']:>15.1f} {'-':>14} {cpu['generator']:>22.2f}"
        f" {cpu['postgres']:>9.2f} {'-':>10} {ip['machine_busy']:>13.0%}  (API handlers, no HTTP)"
    )
    one = statistics.median(f.pairs_per_s for f in result.by_replicas(1))
    two = statistics.median(f.pairs_per_s for f in result.by_replicas(2))
    freeze = result.freeze_ms
    lines += [
        "",
        f"pairs/s 2 replicas / 1 replica = {two / one:.2f} (target >= {TARGET_RATIO});"
        f" 2 replicas: {two:.0f} pairs/s (target >= {TARGET_PAIRS:,})",
        f"freeze on A -> first denial on B: median {statistics.median(freeze):.1f} ms,"
        f" p90 {percentile(freeze, 0.9):.1f} ms, max {max(freeze):.1f} ms over {len(freeze)} trials"
        f" (target < {TARGET_FREEZE_MS} ms)",
    ]
    return "\n".join(lines)


def section(args: argparse.Namespace) -> None:
    """The ``python -m bench`` section: 2 x the common ``--seconds`` per row, 64 clients."""
    problem = pg_problem()
    if problem is not None:
        print(f"skipped: {problem}")
        return
    print(report(run(seconds=max(2 * args.seconds, 5.0), clients=64, workers=1, trials=20)))


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["load"]:
        load_main(argv[1:])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per row")
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients, in total")
    parser.add_argument("--workers", type=int, default=1, help="worker processes per replica")
    parser.add_argument("--trials", type=int, default=20, help="freeze trials")
    parser.add_argument("--rounds", type=int, default=1, help="1-replica/2-replica rounds, alternated")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    problem = pg_problem()
    if problem is not None:
        raise SystemExit(problem)
    result = run(args.seconds, args.clients, args.workers, args.trials, args.rounds)
    if args.json:
        runs = [asdict(f) for f in result.runs]
        print(
            json.dumps({"runs": runs, "freeze_ms": result.freeze_ms, "in_process": result.inproc}, indent=2)
        )
    else:
        print(report(result))


if __name__ == "__main__":
    main()
