"""Real sockets: `paymaster serve --workers 2` on one SQLite file, hit by 200 concurrent
reserves from real threads against a wallet that fits exactly N of them."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from paymaster.core.tokens import generate_private_key, public_key_b64, sign_spend_token

from .conftest import ADMIN, ADMIN_KEY

pytestmark = pytest.mark.slow

CALLS = 200
FITS = 37
PRICE = "0.10"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    db = f"sqlite:///{tmp_path}/pm.db"
    env = {**os.environ, "PAYMASTER_ADMIN_KEY": ADMIN_KEY, "PAYMASTER_DB": db}
    env.pop("PAYMASTER_CONFIG", None)
    if importlib.util.find_spec("paymaster.cli.main") is not None:
        command = [sys.executable, "-m", "paymaster.cli.main", "serve", "--workers", "2", "--port", str(port)]
    else:  # the CLI is not there: the same factory, through uvicorn itself
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "paymaster.server.run:app_from_env",
            "--workers",
            "2",
            "--port",
            str(port),
            "--loop",
            "uvloop",
            "--http",
            "httptools",
        ]
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.1)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_concurrent_reserves_over_two_workers_never_overdraw(server: str) -> None:
    key = generate_private_key()
    with httpx.Client(base_url=server, headers=ADMIN, timeout=30) as admin:
        r = admin.post("/v1/agents", json={"name": "crowd", "public_key": public_key_b64(key)})
        assert r.status_code == 201, r.text
        agent = r.json()["id"]
        r = admin.post(f"/v1/agents/{agent}/fund", json={"amount": f"{FITS * 0.1:.2f}"})
        assert (r.status_code, r.json()["limit"]) == (200, "3.70")

    tokens = [sign_spend_token(key, agent_id=agent, aud="paymaster") for _ in range(CALLS)]
    start = threading.Barrier(CALLS)
    limits = httpx.Limits(max_connections=CALLS, max_keepalive_connections=CALLS)

    with httpx.Client(base_url=server, timeout=60, limits=limits) as client:

        def reserve(token: str) -> tuple[int, str | None]:
            start.wait()  # every thread sends at once
            r = client.post(
                "/v1/reservations",
                json={"connector": "tool", "amount": PRICE, "idempotency_key": uuid.uuid4().hex},
                headers={"x-paymaster-agent-id": agent, "x-paymaster-spend-token": token},
            )
            return r.status_code, (r.json().get("error") or {}).get("code")

        with ThreadPoolExecutor(max_workers=CALLS) as pool:
            results = list(pool.map(reserve, tokens))

    assert sum(1 for status, _ in results if status == 201) == FITS
    assert sorted({result for result in results if result[0] != 201}) == [(402, "balance_insufficient")]
    with httpx.Client(base_url=server, headers=ADMIN, timeout=30) as admin:
        wallet = admin.get(f"/v1/budgets/{agent}/total").json()
        assert (wallet["reserved"], wallet["spent"], wallet["remaining"]) == ("3.70", "0.00", "0.00")
        # both processes wrote to one audit chain, and it verifies
        verify = admin.get("/v1/audit/verify")
        assert verify.status_code == 200, verify.text
        events = admin.get("/v1/events", params={"limit": 10000}).json()["events"]
        kinds = [e["type"] for e in events]
        assert kinds.count("dev.paymaster.reservation.allowed") == FITS
        assert kinds.count("dev.paymaster.reservation.denied") == CALLS - FITS
