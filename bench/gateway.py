"""Gateway overhead: a direct call to the fake provider, a bare ungoverned proxy on the same
stack (Starlette + the gateway's aiohttp upstream client, no token, no reserve, no commit —
the reference), the same bare proxy on httpx's async client (the choice of upstream client
is measured here), and the governed gateway — all in one run, all served by uvicorn with
uvloop and httptools in their own processes, one worker each.

    .venv/bin/python -m bench.gateway [--seconds 5] [--latency-calls 1500] [--clients 32]

Latency (p50/p99) is measured with one client calling in a loop; calls per second with
``--clients`` concurrent clients. Overheads are differences from the direct call, and
calls per second are compared with the bare aiohttp proxy as ratios.
The request is an OpenAI-style chat completion (JSON, not streamed): the governed gateway
verifies a fresh spend token bound to the request, prices the call from the rate card,
reserves on the agent's wallet and a day cap, forwards, reads the usage and commits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FAKE = ROOT / "tests" / "gateway" / "fake_provider.py"
HOST = "api.openai.test"
PATH = "/v1/chat/completions"
BODY = json.dumps(
    {"model": "gpt-test", "messages": [{"role": "user", "content": "ping"}], "max_tokens": 16}
).encode()
CONFIG = """
[prices]
updated_at = "2020-01-01T00:00:00Z"
[prices.models."gpt-test"]
input = "2.50"
output = "10.00"
max_output = 1000

[[connectors]]
id = "openai"
hosts = ["{host}"]
category = "llm"
usage = "openai"
upstream = "{upstream}"
credentials = {{ header = "Authorization", value = "Bearer sk-bench" }}
"""
UVICORN = {"loop": "uvloop", "http": "httptools", "log_level": "warning", "access_log": False}


# ---------------------------------------------------------------- the servers (subprocesses)


def bare_app(upstream: str, client: str) -> Any:
    """The reference: the gateway's forwarding with nothing governed."""
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from paymaster.gateway.forward import Upstream, downstream_headers, upstream_headers

    pool = Upstream(frozenset({"127.0.0.1"}))
    holder: dict[str, httpx.AsyncClient] = {}

    async def proxy(request: Request) -> Response:
        path = "/" + request.path_params["path"]
        body = await request.body()
        headers = upstream_headers(request.scope["headers"], ("Authorization", "Bearer sk-bench"))
        if client == "httpx":
            http = holder.get("c") or holder.setdefault(
                "c", httpx.AsyncClient(limits=httpx.Limits(max_connections=512), timeout=30)
            )
            r = await http.request(
                request.method, upstream + path, headers=list(headers.items()), content=body
            )
            response = Response(r.content, status_code=r.status_code)
            response.raw_headers.extend(downstream_headers(r.headers.items(), None))
            return response
        upstream_response = await pool.send(request.method, upstream + path, headers, body, timeout=30)
        data = await upstream_response.read()
        upstream_response.release()
        response = Response(data, status_code=upstream_response.status)
        response.raw_headers.extend(downstream_headers(upstream_response.headers.items(), None))
        return response

    return Starlette(routes=[Route("/proxy/{host}/{path:path}", proxy, methods=["GET", "POST"])])


def serve(argv: Sequence[str]) -> None:
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["bare", "bare-httpx", "governed"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", default="")
    parser.add_argument("--db", default="")
    parser.add_argument("--config", default="")
    args = parser.parse_args(argv)
    if args.what == "governed":
        from paymaster.bootstrap import open_authority
        from paymaster.config import load_settings
        from paymaster.server.app import create_app

        app = create_app(open_authority(load_settings(db=args.db, config=args.config, env={})))
    else:
        app = bare_app(args.upstream, "httpx" if args.what == "bare-httpx" else "aiohttp")
    uvicorn.run(app, host="127.0.0.1", port=args.port, **UVICORN)  # type: ignore[arg-type]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def start(args: list[str], port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'src'}"}
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env)
    wait_port(port, proc)
    return proc


# ---------------------------------------------------------------- the load


@dataclass
class Figures:
    name: str
    p50_ms: float
    p99_ms: float
    calls_per_s: float
    errors: int


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


async def drive(
    url: str,
    headers_for: Callable[[], dict[str, str]],
    *,
    clients: int,
    seconds: float | None,
    calls: int | None,
) -> tuple[list[float], int, float]:
    """(latencies in seconds, errors, elapsed) of ``clients`` loops calling ``url``."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds if seconds else None
    remaining = [calls or 0]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def loop() -> None:
            nonlocal errors
            while True:
                if stop_at is not None and time.perf_counter() >= stop_at:
                    return
                if stop_at is None:
                    if remaining[0] <= 0:
                        return
                    remaining[0] -= 1
                headers = headers_for()
                began = time.perf_counter()
                async with session.post(url, data=BODY, headers=headers) as r:
                    await r.read()
                    ok = r.status == 200
                latencies.append(time.perf_counter() - began)
                errors += 0 if ok else 1

        began = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(clients)))
        return latencies, errors, time.perf_counter() - began


def measure(
    name: str,
    url: str,
    headers_for: Callable[[], dict[str, str]],
    *,
    clients: int,
    seconds: float,
    calls: int,
) -> Figures:
    import uvloop

    presign = getattr(headers_for, "presign", None)
    # warm up (pools, caches, the rate card), then one client for latency, then the crowd
    uvloop.run(drive(url, headers_for, clients=4, seconds=None, calls=300))
    if presign is not None:
        presign(calls)
    latencies, errors, _ = uvloop.run(drive(url, headers_for, clients=1, seconds=None, calls=calls))
    if presign is not None:
        presign(int(seconds * 6000))
    crowd, crowd_errors, elapsed = uvloop.run(
        drive(url, headers_for, clients=clients, seconds=seconds, calls=None)
    )
    return Figures(
        name,
        percentile(latencies, 0.50) * 1000,
        percentile(latencies, 0.99) * 1000,
        len(crowd) / elapsed,
        errors + crowd_errors,
    )


# ---------------------------------------------------------------- the run


def governed_setup(workdir: Path, upstream: str) -> tuple[str, str, Callable[[], dict[str, str]]]:
    """A database with one funded agent (wallet + day cap), and a token source for it."""
    from paymaster.bootstrap import open_authority
    from paymaster.config import load_settings
    from paymaster.money import parse_nanos
    from paymaster.sdk.keys import AgentKey

    config = workdir / "paymaster.toml"
    config.write_text(CONFIG.format(host=HOST, upstream=upstream))
    db = f"sqlite:///{workdir}/bench.db"
    authority = open_authority(load_settings(db=db, config=str(config), env={}))
    key = AgentKey.generate()
    policy = {"caps": [{"scope": "all", "period": "day", "limit": "100000.00"}]}
    agent = authority.create_agent("bench", key.public_key, policy=policy)["id"]
    authority.fund(agent, parse_nanos("100000.00"))
    authority.store.close()
    htu = f"https://{HOST}{PATH}"
    # tokens are signed ahead, so the load generator spends its CPU on requests, not signatures
    tokens: list[str] = []

    def headers() -> dict[str, str]:
        token = (
            tokens.pop()
            if tokens
            else key.sign(agent_id=agent, aud=HOST, htm="POST", htu=htu, ttl_seconds=300)
        )
        return {
            "x-paymaster-agent-id": agent,
            "x-paymaster-spend-token": token,
            "content-type": "application/json",
        }

    def presign(count: int) -> None:
        tokens.extend(
            key.sign(agent_id=agent, aud=HOST, htm="POST", htu=htu, ttl_seconds=300) for _ in range(count)
        )

    headers.presign = presign  # type: ignore[attr-defined]
    return db, str(config), headers


def run(seconds: float = 5.0, calls: int = 1500, clients: int = 32) -> list[Figures]:
    procs: list[subprocess.Popen[bytes]] = []
    plain = {"content-type": "application/json", "authorization": "Bearer agent-placeholder"}
    try:
        with tempfile.TemporaryDirectory(prefix="pm-bench-") as tmp:
            fake_port = free_port()
            procs.append(start([str(FAKE), "--port", str(fake_port)], fake_port))
            upstream = f"http://127.0.0.1:{fake_port}"
            db, config, governed_headers = governed_setup(Path(tmp), upstream)
            ports = {name: free_port() for name in ("bare", "bare-httpx", "governed")}
            for name, port in ports.items():
                extra = ["--db", db, "--config", config] if name == "governed" else ["--upstream", upstream]
                procs.append(start(["-m", "bench.gateway", "serve", name, "--port", str(port), *extra], port))
            figures = [
                measure(
                    "direct", upstream + PATH, lambda: plain, clients=clients, seconds=seconds, calls=calls
                )
            ]
            for name, label in (("bare", "bare proxy (aiohttp)"), ("bare-httpx", "bare proxy (httpx)")):
                url = f"http://127.0.0.1:{ports[name]}/proxy/{HOST}{PATH}"
                figures.append(
                    measure(label, url, lambda: plain, clients=clients, seconds=seconds, calls=calls)
                )
            url = f"http://127.0.0.1:{ports['governed']}/proxy/{HOST}{PATH}"
            figures.append(
                measure(
                    "governed gateway", url, governed_headers, clients=clients, seconds=seconds, calls=calls
                )
            )
            return figures
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def report(figures: Sequence[Figures], clients: int) -> str:
    by = {f.name: f for f in figures}
    direct, bare, governed = by["direct"], by["bare proxy (aiohttp)"], by["governed gateway"]
    lines = [
        f"{'gateway':<24} {'p50 ms':>8} {'p99 ms':>8} {f'calls/s @{clients}':>14} {'errors':>7}",
    ]
    for f in figures:
        lines.append(f"{f.name:<24} {f.p50_ms:>8.3f} {f.p99_ms:>8.3f} {f.calls_per_s:>14.0f} {f.errors:>7}")
    lines += [
        "",
        f"governed overhead over direct: p50 {governed.p50_ms - direct.p50_ms:+.3f} ms (target <= 1),"
        f" p99 {governed.p99_ms - direct.p99_ms:+.3f} ms (target <= 5)",
        f"bare proxy overhead over direct: p50 {bare.p50_ms - direct.p50_ms:+.3f} ms,"
        f" p99 {bare.p99_ms - direct.p99_ms:+.3f} ms",
        f"governance alone (governed - bare): p50 {governed.p50_ms - bare.p50_ms:+.3f} ms",
        f"calls/s governed / bare proxy = {governed.calls_per_s / bare.calls_per_s:.2f} (target >= 0.70);"
        f" httpx / aiohttp bare = {by['bare proxy (httpx)'].calls_per_s / bare.calls_per_s:.2f}",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        serve(argv[1:])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--latency-calls", type=int, default=1500)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    figures = run(args.seconds, args.latency_calls, args.clients)
    if args.json:
        print(json.dumps([f.__dict__ for f in figures], indent=2))
    else:
        print(report(figures, args.clients))


if __name__ == "__main__":
    main()
