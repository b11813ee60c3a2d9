"""Fixtures for the gateway: a fake provider on a loopback port (one for the session, its
record cleared before each test), settings whose connectors point at it, the authority and
the app, driven in process through ``httpx.ASGITransport``; agents sign their own tokens."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from paymaster.authority import Authority, Caller
from paymaster.bootstrap import open_authority
from paymaster.config import load_settings
from paymaster.money import parse_nanos
from paymaster.sdk.keys import AgentKey
from paymaster.server import gateway as gateway_routes
from paymaster.server.app import create_app

from .fake_provider import FakeProvider, closed_port

ADMIN_KEY = "pm_admin_gateway-suite-key"
FAKE_KEY = "sk-fake-provider-SECRET-0123456789"
FAKE_ANTHROPIC_KEY = "sk-ant-fake-SECRET-9876543210"

OPENAI = "api.openai.test"
ANTHROPIC = "api.anthropic.test"
GEO = "geo.example.test"
TRANSLATE = "translate.example.test"
PREMIUM = "premium-translate.example.test"
KG = "kg.example.test"
COST = "cost.example.test"
EU = "eu.example.test"
GBP = "gbp.example.test"
DOWN = "down.example.test"
WILD = "api.wild.test"

PRICES = """
[prices]
updated_at = "{updated_at}"
max_age = "{max_age}"
[prices.models."gpt-test"]
input = "2.50"
output = "10.00"
max_output = 1000
[prices.models."claude-test"]
input = "3.00"
output = "15.00"
cached_input = "0.30"
cache_write = "3.75"
max_output = 4096
[prices.models."embed-test"]
input = "0.10"
[prices.models."unbounded-test"]
input = "1.00"
output = "2.00"
"""

CONNECTORS = """
[fx]
"EUR/USD" = "1.08"

[[connectors]]
id = "openai"
hosts = ["{openai}"]
category = "llm"
usage = "openai"
upstream = "{up}"
credentials = {{ header = "Authorization", value = "Bearer ${{FAKE_KEY}}" }}

[[connectors]]
id = "anthropic"
hosts = ["{anthropic}"]
category = "llm"
usage = "anthropic"
upstream = "{up}"
credentials = {{ header = "x-api-key", value = "${{FAKE_ANTHROPIC_KEY}}" }}

[[connectors]]
id = "geocode"
hosts = ["{geo}"]
category = "tool"
upstream = "{up}"
credentials = {{ header = "x-api-key", value = "${{FAKE_KEY}}" }}
pricing = {{ per_call = [{{ up_to = 5, price = "0.005" }}, {{ price = "0.012" }}], period = "month" }}

[[connectors]]
id = "translate"
hosts = ["{translate}"]
category = "translation"
upstream = "{up}"
pricing = {{ per_unit = {{ field = "text", per = 1000, unit = "characters", price = "0.02" }} }}

[[connectors]]
id = "translate-premium"
hosts = ["{premium}"]
category = "translation"
upstream = "{up}"
pricing = {{ per_unit = {{ field = "text", per = 1000, unit = "characters", price = "0.25" }} }}

[[connectors]]
id = "kg"
hosts = ["{kg}"]
category = "tool"
upstream = "{up}"
pricing = {{ per_call = "0.10" }}

[[connectors]]
id = "costly"
hosts = ["{cost}"]
category = "tool"
usage = "header:x-cost"
upstream = "{up}"
pricing = {{ per_call = "0.05" }}

[[connectors]]
id = "eu-tool"
hosts = ["{eu}"]
category = "tool"
upstream = "{up}"
pricing = {{ per_call = "0.10", currency = "EUR" }}

[[connectors]]
id = "gbp-tool"
hosts = ["{gbp}"]
category = "tool"
upstream = "{up}"
pricing = {{ per_call = "0.10", currency = "GBP" }}

[[connectors]]
id = "down"
hosts = ["{down}"]
category = "tool"
upstream = "http://127.0.0.1:{closed}"
pricing = {{ per_call = "0.01" }}

[[connectors]]
id = "wild"
hosts = ["*.wild.test"]
category = "tool"
upstream = "{up}"
pricing = {{ per_call = "0.01" }}

[[connectors]]
id = "loopback-by-name"
hosts = ["localhost", "127.0.0.1"]
category = "tool"
pricing = {{ per_call = "0.01" }}
"""


@dataclass
class Agent:
    id: str
    key: AgentKey


class Env:
    """One authority + app + client over the fake provider."""

    def __init__(
        self, authority: Authority, app: Starlette, client: httpx.AsyncClient, provider: FakeProvider
    ) -> None:
        self.authority = authority
        self.app = app
        self.client = client
        self.provider = provider

    def agent(self, *, policy: Any = None, fund: str | None = "10.00", parent: str | None = None) -> Agent:
        key = AgentKey.generate()
        record = self.authority.create_agent("agent", key.public_key, policy=policy, parent=parent)
        if fund is not None:
            self.authority.fund(record["id"], parse_nanos(fund))
        return Agent(record["id"], key)

    def headers(
        self, agent: Agent, method: str, host: str, path: str, *, bind: bool = True, **claims: Any
    ) -> dict[str, str]:
        token = agent.key.sign(
            agent_id=agent.id,
            aud=host,
            htm=method if bind else None,
            htu=f"https://{host}{path}" if bind else None,
            **claims,
        )
        return {"x-paymaster-agent-id": agent.id, "x-paymaster-spend-token": token}

    async def call(
        self,
        agent: Agent,
        method: str,
        host: str,
        path: str,
        *,
        json: Any = None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        claims: dict[str, Any] | None = None,
    ) -> httpx.Response:
        sent = self.headers(agent, method, host, path, **(claims or {}))
        sent.update(headers or {})
        return await self.client.request(
            method, f"/proxy/{host}{path}", json=json, content=content, headers=sent
        )

    def reservation(self, response: httpx.Response) -> dict[str, Any]:
        return self.authority.query_reservation(response.headers["x-paymaster-reservation"])

    def budget(self, budget_id: str) -> dict[str, Any]:
        return self.authority.budget(budget_id)

    def wallet_spent(self, agent: Agent) -> int:
        return parse_nanos(self.budget(f"{agent.id}/total")["spent"])

    def task(
        self, limit: str, agents: list[Agent], parent: str | None = None, by: Agent | None = None
    ) -> str:
        caller = Caller("agent", agent_id=by.id) if by is not None else Caller.admin()
        body: dict[str, Any] = {"limit": limit, "agents": [a.id for a in agents]}
        if parent is not None:
            body["parent_task"] = parent
        return str(self.authority.create_task(body, caller)["task_id"])


def write_config(path: Path, provider_url: str, *, updated_at: str, max_age: str, extra: str = "") -> Path:
    text = PRICES.format(updated_at=updated_at, max_age=max_age) + CONNECTORS.format(
        up=provider_url, openai=OPENAI, anthropic=ANTHROPIC, geo=GEO, translate=TRANSLATE, premium=PREMIUM,
        kg=KG, cost=COST, eu=EU, gbp=GBP, down=DOWN, closed=closed_port(),
    ) + extra  # fmt: skip
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def provider() -> Iterator[FakeProvider]:
    fake = FakeProvider().start()
    yield fake
    fake.stop()


@pytest.fixture(autouse=True)
def _clean_provider(provider: FakeProvider) -> None:
    provider.recorder.reset()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _provider_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    # credentials are ${ENV}-expanded at the moment of use, from the process environment
    monkeypatch.setenv("FAKE_KEY", FAKE_KEY)
    monkeypatch.setenv("FAKE_ANTHROPIC_KEY", FAKE_ANTHROPIC_KEY)


MakeEnv = Callable[..., Any]


@pytest.fixture
async def make_env(tmp_path: Path, provider: FakeProvider) -> AsyncIterator[MakeEnv]:
    opened: list[tuple[Authority, Starlette, httpx.AsyncClient]] = []

    async def make(
        *, updated_at: str = "2020-01-01T00:00:00Z", max_age: str = "100000d", extra: str = ""
    ) -> Env:
        name = uuid.uuid4().hex[:8]
        config = write_config(
            tmp_path / f"{name}.toml", provider.url, updated_at=updated_at, max_age=max_age, extra=extra
        )
        settings = load_settings(
            db=f"sqlite:///{tmp_path}/{name}.db",
            config=str(config),
            env={"PAYMASTER_ADMIN_KEY": ADMIN_KEY, "FAKE_KEY": FAKE_KEY},
        )
        authority = open_authority(settings)
        app = create_app(authority)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        client = httpx.AsyncClient(transport=transport, base_url="http://gateway.test")
        opened.append((authority, app, client))
        return Env(authority, app, client, provider)

    yield make
    for authority, app, client in opened:
        await client.aclose()
        await gateway_routes.shutdown(app)
        authority.store.close()


@pytest.fixture
async def env(make_env: MakeEnv) -> Env:
    made: Env = await make_env()
    return made
