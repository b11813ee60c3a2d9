"""Fixtures for the HTTP server: an authority on a temporary SQLite file with an injected
clock, the app, an httpx client over ASGITransport, and helpers to make agents and tokens."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from starlette.applications import Starlette

from paymaster.authority import Authority
from paymaster.bootstrap import open_authority
from paymaster.config import Settings, load_settings
from paymaster.core.tokens import generate_private_key, public_key_b64, sign_spend_token
from paymaster.server.app import create_app

ADMIN_KEY = "pm_admin_test-key-for-the-server-suite"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
START = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


class Clock:
    """A clock the tests move by hand; the store, the authority and tokens all read it."""

    def __init__(self, start: datetime = START) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class Agent:
    id: str
    key: Ed25519PrivateKey


class Api:
    """The client, with the admin key at hand and agent helpers."""

    def __init__(self, client: httpx.AsyncClient, clock: Clock, authority: Authority) -> None:
        self.client = client
        self.clock = clock
        self.authority = authority

    async def create_agent(
        self, *, policy: dict[str, Any] | None = None, fund: str | None = None, **fields: Any
    ) -> Agent:
        key = generate_private_key()
        body: dict[str, Any] = {"name": "agent", "public_key": public_key_b64(key), **fields}
        if policy is not None:
            body["policy"] = policy
        r = await self.client.post("/v1/agents", json=body, headers=ADMIN)
        assert r.status_code == 201, r.text
        agent = Agent(r.json()["id"], key)
        if fund is not None:
            r = await self.client.post(f"/v1/agents/{agent.id}/fund", json={"amount": fund}, headers=ADMIN)
            assert r.status_code == 200, r.text
        return agent

    def token(self, agent: Agent, **claims: Any) -> str:
        claims.setdefault("now", self.clock().timestamp())
        return sign_spend_token(agent.key, agent_id=agent.id, aud="paymaster", **claims)

    def headers(self, agent: Agent, **claims: Any) -> dict[str, str]:
        return {"x-paymaster-agent-id": agent.id, "x-paymaster-spend-token": self.token(agent, **claims)}

    async def reserve(
        self, agent: Agent, *, headers: dict[str, str] | None = None, **body: Any
    ) -> httpx.Response:
        body.setdefault("connector", "tool")
        body.setdefault("amount", "0.10")
        body.setdefault("idempotency_key", uuid.uuid4().hex)
        return await self.client.post(
            "/v1/reservations", json=body, headers=headers if headers is not None else self.headers(agent)
        )

    async def commit(self, agent: Agent, reservation_id: str, **body: Any) -> httpx.Response:
        body.setdefault("idempotency_key", uuid.uuid4().hex)
        return await self.client.post(
            f"/v1/reservations/{reservation_id}/commit", json=body, headers=self.headers(agent)
        )

    async def wallet(self, agent: Agent) -> dict[str, Any]:
        r = await self.client.get(f"/v1/budgets/{agent.id}/total", headers=ADMIN)
        assert r.status_code == 200, r.text
        result: dict[str, Any] = r.json()
        return result

    def written(self) -> tuple[int, int]:
        """(ledger entries, audit events): what a refused request must leave unchanged."""
        return len(self.authority.ledger()), len(self.authority.events())


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(db=f"sqlite:///{tmp_path}/pm.db", env={"PAYMASTER_ADMIN_KEY": ADMIN_KEY})


@pytest.fixture
def authority(settings: Settings, clock: Clock) -> Iterator[Authority]:
    authority = open_authority(settings, clock=clock)
    yield authority
    authority.store.close()


@pytest.fixture
def app(authority: Authority) -> Starlette:
    return create_app(authority)


@pytest.fixture
async def client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    # raise_app_exceptions=False: a 500 must come back as a response, as a real server sends it
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


@pytest.fixture
def api(client: httpx.AsyncClient, clock: Clock, authority: Authority) -> Api:
    return Api(client, clock, authority)
