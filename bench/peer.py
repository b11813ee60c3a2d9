"""Peer: the LiteLLM proxy's budget against Paymaster's governed gateway, one scenario, one run.

    .venv/bin/python -m bench --only peer            # needs /tmp/litellm-peer/venv (see below)
    .venv/bin/python -m bench --only peer --peer     # installs the peer venv first if missing

The scenario of /work/shared/peers/litellm/: a budget of $0.01, calls that each cost $0.00011
(10 prompt + 20 completion tokens at $5 and $3 per million, reported by the fake upstream
after 50 ms), 500 calls at concurrency 50, ``max_tokens: 20`` in every request. 90 calls fit.

- **Peer**: LiteLLM proxy 1.108.7 (in its own venv, never in ours), one worker, no database,
  ``num_retries: 0``, with the budget as a deployment budget (``max_budget``) and, separately,
  as a provider budget (``provider_budget_config``). Spent is the peer's own record: the sum
  of its ``x-litellm-response-cost`` headers (and ``/provider/budgets`` for the provider mode).
- **Paymaster**: the governed gateway (``bench.gateway serve governed``, SQLite), the same fake
  upstream process, an agent whose wallet is $0.01. Spent is the sum of the ledger.

Both are driven by the same load generator (aiohttp, one session, 50 in flight). The upstream's
own count of completions served is the cross-check: spent = upstream calls x $0.00011.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

from bench.gateway import ROOT, free_port, percentile, start

PEER_SRC = Path("/work/shared/peers/litellm")
PEER_DIR = Path(os.environ.get("PEER_DIR", "/tmp/litellm-peer"))
LITELLM = PEER_DIR / "venv" / "bin" / "litellm"
PEER_PIN = "litellm[proxy]==1.108.7"
FAKE_UPSTREAM = PEER_SRC / "fake_upstream.py"
MASTER = "sk-peer-master-1234"
WORKERS = ("--num_workers", "1")
HOST = "api.openai.test"
PATH = "/v1/chat/completions"
BUDGET = Decimal("0.01")
CALL_COST = Decimal("0.00011")  # 10 x 5e-6 + 20 x 3e-6
BODY = json.dumps(
    {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
).encode()

PEER_CONFIG = """model_list:
  - model_name: fake-model
    litellm_params:
      model: openai/fake-model
      api_base: {upstream}/v1
      api_key: fake-key
      input_cost_per_token: 0.000005
      output_cost_per_token: 0.000003
{deployment_budget}    model_info:
      id: fake-deployment-1
general_settings:
  master_key: {master}
litellm_settings:
  drop_params: true
  telemetry: false
router_settings:
  num_retries: 0
{provider_budget}"""
DEPLOYMENT_BUDGET = "      max_budget: 0.01\n      budget_duration: 1d\n"
PROVIDER_BUDGET = "  provider_budget_config:\n    openai:\n      budget_limit: 0.01\n      time_period: 1d\n"

PAYMASTER_CONFIG = """
[prices]
updated_at = "2020-01-01T00:00:00Z"
[prices.models."fake-model"]
input = "5.00"
output = "3.00"
max_output = 20

[[connectors]]
id = "openai"
hosts = ["{host}"]
category = "llm"
usage = "openai"
upstream = "{upstream}"
credentials = {{ header = "Authorization", value = "Bearer fake-key" }}
"""


@dataclass
class Outcome:
    name: str
    admitted: int
    spent: Decimal
    upstream_calls: int
    p50_ms: float | None
    p99_ms: float | None
    denied_p50_ms: float | None
    wall_s: float
    statuses: dict[str, int] = field(default_factory=dict)
    note: str = ""

    @property
    def overshoot(self) -> Decimal:
        return self.spent - BUDGET


# ---------------------------------------------------------------- load


@dataclass
class Load:
    ok: list[float]
    denied: list[float]
    statuses: dict[str, int]
    cost_header_sum: Decimal
    wall_s: float


async def _fire(
    url: str, headers_for: Callable[[], dict[str, str]], cost_header: str, total: int, concurrency: int
) -> Load:
    import aiohttp

    ok: list[float] = []
    denied: list[float] = []
    statuses: dict[str, int] = {}
    cost = Decimal(0)
    sem = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency), timeout=timeout
    ) as session:

        async def one() -> None:
            nonlocal cost
            async with sem:
                headers = headers_for()
                began = time.perf_counter()
                try:
                    async with session.post(url, data=BODY, headers=headers) as r:
                        await r.read()
                        status, charged = str(r.status), r.headers.get(cost_header)
                except aiohttp.ClientError as exc:
                    status, charged = f"exc:{type(exc).__name__}", None
                elapsed = time.perf_counter() - began
            statuses[status] = statuses.get(status, 0) + 1
            if status == "200":
                ok.append(elapsed)
                if charged:
                    cost += Decimal(charged)
            else:
                denied.append(elapsed)

        began = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(total)))
        return Load(ok, denied, statuses, cost, time.perf_counter() - began)


def fire(
    url: str, headers_for: Callable[[], dict[str, str]], cost_header: str, total: int, concurrency: int
) -> Load:
    return asyncio.run(_fire(url, headers_for, cost_header, total, concurrency))


def ms(values: list[float], q: float) -> float | None:
    return percentile(values, q) * 1000 if values else None


# ---------------------------------------------------------------- processes and the upstream


def http_json(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> object:
    request = urllib.request.Request(url, method=method, headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.loads(r.read())


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited ({proc.returncode}); see {log}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer in {timeout:.0f} s; see {log}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def upstream_calls(upstream: str) -> int:
    stats = http_json(upstream + "/stats")
    assert isinstance(stats, dict)
    return int(stats["chat_calls"])


def reset_upstream(upstream: str) -> None:
    http_json(upstream + "/stats/reset", method="POST")


def install_peer() -> None:
    """The recipe's own install: a throwaway venv under PEER_DIR, the pinned peer, nothing in ours."""
    PEER_DIR.mkdir(parents=True, exist_ok=True)
    python = shutil.which("python3") or sys.executable
    subprocess.run([python, "-m", "venv", str(PEER_DIR / "venv")], check=True)
    print(f"installing {PEER_PIN} into {PEER_DIR / 'venv'} (a few minutes)", flush=True)
    with open(PEER_DIR / "pip-install.log", "wb") as log:
        subprocess.run(
            [str(PEER_DIR / "venv" / "bin" / "pip"), "install", PEER_PIN], stdout=log, stderr=log, check=True
        )


# ---------------------------------------------------------------- the peer


def run_peer(mode: str, upstream: str, workdir: Path, total: int, concurrency: int) -> Outcome:
    config = workdir / f"litellm-{mode}.yaml"
    config.write_text(
        PEER_CONFIG.format(
            upstream=upstream,
            master=MASTER,
            deployment_budget=DEPLOYMENT_BUDGET if mode == "deployment" else "",
            provider_budget=PROVIDER_BUDGET if mode == "provider" else "",
        )
    )
    port = free_port()
    log = workdir / f"litellm-{mode}.log"
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "NO_PROXY": "127.0.0.1,localhost"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(LITELLM), "--config", str(config), "--host", "127.0.0.1", "--port", str(port), *WORKERS],
            stdout=out,
            stderr=out,
            env=env,
            cwd=workdir,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/health/liveliness", proc, 180, log)
        reset_upstream(upstream)
        headers = {"Authorization": f"Bearer {MASTER}", "content-type": "application/json"}
        load = fire(base + PATH, lambda: headers, "x-litellm-response-cost", total, concurrency)
        note = "spent = sum of x-litellm-response-cost"
        if mode == "provider":
            try:
                budgets = http_json(base + "/provider/budgets", headers=headers)
                note += f"; /provider/budgets: {json.dumps(budgets, separators=(',', ':'))}"
            except OSError as exc:
                note += f"; /provider/budgets unreadable: {exc}"
        return Outcome(
            f"litellm {mode} budget",
            load.statuses.get("200", 0),
            load.cost_header_sum,
            upstream_calls(upstream),
            ms(load.ok, 0.50),
            ms(load.ok, 0.99),
            ms(load.denied, 0.50),
            load.wall_s,
            load.statuses,
            note,
        )
    finally:
        stop(proc)


# ---------------------------------------------------------------- Paymaster


def run_paymaster(upstream: str, workdir: Path, total: int, concurrency: int) -> Outcome:
    from paymaster.bootstrap import open_authority
    from paymaster.config import load_settings
    from paymaster.money import parse_nanos
    from paymaster.sdk.keys import AgentKey

    config = workdir / "paymaster.toml"
    config.write_text(PAYMASTER_CONFIG.format(host=HOST, upstream=upstream))
    db = f"sqlite:///{workdir}/peer.db"
    settings = load_settings(db=db, config=str(config), env={})
    authority = open_authority(settings)
    key = AgentKey.generate()
    policy = {"caps": [{"scope": "all", "period": "day", "limit": "100000.00"}]}
    agent = authority.create_agent("peer-bench", key.public_key, policy=policy)["id"]
    authority.fund(agent, parse_nanos(str(BUDGET)))
    authority.store.close()

    htu = f"https://{HOST}{PATH}"
    tokens = [key.sign(agent_id=agent, aud=HOST, htm="POST", htu=htu, ttl_seconds=300) for _ in range(total)]

    def headers() -> dict[str, str]:
        return {
            "x-paymaster-agent-id": agent,
            "x-paymaster-spend-token": tokens.pop(),
            "x-paymaster-idempotency-key": uuid.uuid4().hex,
            "content-type": "application/json",
        }

    port = free_port()
    proc = start(
        [
            "-m",
            "bench.gateway",
            "serve",
            "governed",
            "--port",
            str(port),
            "--db",
            db,
            "--config",
            str(config),
        ],
        port,
    )
    try:
        reset_upstream(upstream)
        load = fire(
            f"http://127.0.0.1:{port}/proxy/{HOST}{PATH}", headers, "x-paymaster-charged", total, concurrency
        )
    finally:
        stop(proc)

    authority = open_authority(settings)
    try:
        rows = authority.ledger(agent=agent, limit=100_000)
        wallet = next(b for b in authority.agent_budgets(agent)["budgets"] if b["id"].endswith("/total"))
    finally:
        authority.store.close()
    spent = sum((Decimal(r["total"]) for r in rows if r["kind"] == "charge"), Decimal(0)) - sum(
        (Decimal(r["total"]) for r in rows if r["kind"] == "refund"), Decimal(0)
    )
    estimated = sum(1 for r in rows if r["estimated"])
    return Outcome(
        "paymaster gateway",
        load.statuses.get("200", 0),
        spent,
        upstream_calls(upstream),
        ms(load.ok, 0.50),
        ms(load.ok, 0.99),
        ms(load.denied, 0.50),
        load.wall_s,
        load.statuses,
        f"spent = sum of the ledger ({len(rows)} entries, {estimated} estimated;"
        f" x-paymaster-charged sum {load.cost_header_sum}); wallet {json.dumps(wallet, default=str)}",
    )


# ---------------------------------------------------------------- the run and the table


def run(total: int = 500, concurrency: int = 50, delay_ms: int = 50) -> list[Outcome]:
    with tempfile.TemporaryDirectory(prefix="pm-peer-") as tmp:
        workdir = Path(tmp)
        port = free_port()
        log = workdir / "fake.log"
        with open(log, "wb") as out:
            fake = subprocess.Popen(
                [sys.executable, str(FAKE_UPSTREAM), str(port)],
                stdout=out,
                stderr=out,
                env={**os.environ, "FAKE_DELAY_MS": str(delay_ms)},
                cwd=ROOT,
            )
        upstream = f"http://127.0.0.1:{port}"
        try:
            wait_http(upstream + "/stats", fake, 30, log)
            outcomes = [
                run_peer(mode, upstream, workdir, total, concurrency) for mode in ("deployment", "provider")
            ]
            outcomes.append(run_paymaster(upstream, workdir, total, concurrency))
            return outcomes
        finally:
            stop(fake)


def _num(value: float | Decimal | int | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def report(outcomes: list[Outcome], total: int, concurrency: int) -> str:
    pm = outcomes[-1]
    peers = outcomes[:-1]
    fit = int(BUDGET / CALL_COST)
    head = (
        f"{'':<22}"
        + "".join(f"{o.name:>26}" for o in outcomes)
        + "".join(f"{'÷ paymaster (' + o.name.split()[1] + ')':>26}" for o in peers)
    )

    def row(label: str, get: Callable[[Outcome], float | Decimal | int | None], spec: str) -> str:
        cells = "".join(f"{_num(get(o), spec):>26}" for o in outcomes)
        base = get(pm)
        for o in peers:
            value = get(o)
            # a ratio of numbers of opposite signs (an overshoot against a margin) means nothing
            meaningful = value is not None and base is not None and float(value) * float(base) > 0
            ratio = f"{float(value) / float(base):.2f}x" if meaningful else "-"  # type: ignore[arg-type]
            cells += f"{ratio:>26}"
        return f"{label:<22}{cells}"

    lines = [
        f"budget ${BUDGET}, ${CALL_COST}/call -> {fit} calls fit; {total} calls at concurrency {concurrency}",
        head,
        row("calls admitted (200)", lambda o: o.admitted, "d"),
        row("upstream calls", lambda o: o.upstream_calls, "d"),
        row("spent $", lambda o: o.spent, ".5f"),
        row("overshoot $", lambda o: o.overshoot, "+.5f"),
        f"{'overshoot % of budget':<22}"
        + "".join(f"{float(o.overshoot / BUDGET * 100):>25.1f}%" for o in outcomes),
        row("p50 ms (admitted)", lambda o: o.p50_ms, ".1f"),
        row("p99 ms (admitted)", lambda o: o.p99_ms, ".1f"),
        row("p50 ms (refused)", lambda o: o.denied_p50_ms, ".1f"),
        row("wall s", lambda o: o.wall_s, ".2f"),
        "",
    ]
    for o in outcomes:
        lines.append(f"{o.name}: statuses {o.statuses}; {o.note}")
    return "\n".join(lines)


def section(args: argparse.Namespace) -> None:
    if not LITELLM.exists():
        if not getattr(args, "peer", False):
            print(
                f"skipped: the peer venv is missing ({LITELLM}). Run\n"
                "    .venv/bin/python -m bench --only peer --peer\n"
                f"(installs {PEER_PIN} into its own venv under {PEER_DIR}, a few minutes), or\n"
                f"    bash {PEER_SRC / 'run_peer.sh'}"
            )
            return
        install_peer()
    total = int(os.environ.get("TOTAL", "500"))
    concurrency = int(os.environ.get("CONC", "50"))
    delay_ms = int(os.environ.get("DELAY_MS", "50"))
    print(report(run(total, concurrency, delay_ms), total, concurrency))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--peer", action="store_true", help="install the peer venv if it is missing")
    section(parser.parse_args())
