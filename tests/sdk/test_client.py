"""Client and AsyncClient: the requests they build (against httpx.MockTransport), and the
whole SDK against the real server app in process (httpx.ASGITransport)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio.from_thread
import httpx
import pytest

import paymaster
from paymaster.core.tokens import SpendClaims, load_public_key, verify_spend_token
from paymaster.sdk import Budget, Reservation
from paymaster.sdk._common import UNSET

BASE = "http://authority.test"
ADMIN_KEY = "pm_admin_test"
AGENT = "ag_unit0001"

# --------------------------------------------------------------------------- unit: MockTransport

RESERVATION = {
    "reservation_id": "res_1",
    "decision": "allow",
    "amount": "0.02",
    "expires_at": "2026-11-24T13:05:00.000000Z",
    "budgets": [
        {"id": f"{AGENT}/total", "remaining": "0.98"},
        {"id": f"{AGENT}/day/2026-11-24", "remaining": "4.98"},
    ],
    "warnings": [],
}
COMMIT = {
    "reservation_id": "res_1",
    "charged": "0.015",
    "released": "0.005",
    "overrun": False,
    "estimated": False,
    "ledger_entry_id": "led_1",
}
RELEASE = {"reservation_id": "res_1", "released": "0.02"}
AGENT_JSON = {
    "id": AGENT,
    "name": "crew-writer",
    "status": "active",
    "public_key": "x" * 43,
    "parent": "team:growth",
    "metadata": {"env": "test"},
    "policy": {"daily_cap": "8.00"},
    "policy_version": 1,
    "created_at": "2026-11-24T00:00:00.000000Z",
}
WALLET = {
    "id": f"{AGENT}/total",
    "kind": "wallet",
    "owner": AGENT,
    "scope": "all",
    "limit": "20.00",
    "spent": "0.015",
    "reserved": "0.00",
    "remaining": "19.985",
    "used": "0.0008",
    "currency": "USD",
    "period": "total",
    "mode": "enforce",
    "window_start": None,
    "window_end": None,
}


def denial_body(code: str, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "code": code,
        "message": code,
        "decision_id": "dec_1",
        "budget_id": None,
        "requested": None,
        "remaining": None,
        "currency": None,
        "retryable": False,
    }
    body.update(fields)
    return {"error": body}


Route = Callable[[httpx.Request], httpx.Response]


class Fake:
    """A MockTransport handler: answers by (method, path) and keeps every request."""

    def __init__(self, routes: dict[tuple[str, str], Route | httpx.Response] | None = None) -> None:
        self.routes = dict(routes or {})
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.routes.get((request.method, request.url.path))
        if answer is None:
            return httpx.Response(404, json=denial_body("not_found"))
        if isinstance(answer, httpx.Response):
            return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)
        return answer(request)

    def bodies(self) -> list[Any]:
        return [json.loads(r.content) if r.content else None for r in self.requests]


def make_client(fake: Fake, **kwargs: Any) -> paymaster.Client:
    return paymaster.Client(BASE, transport=httpx.MockTransport(fake), **kwargs)


def claims(request: httpx.Request, key: paymaster.AgentKey) -> SpendClaims:
    token = request.headers["x-paymaster-spend-token"]
    return verify_spend_token(token, load_public_key(key.public_key), audience="paymaster", now=time.time())


@pytest.fixture
def key() -> paymaster.AgentKey:
    return paymaster.AgentKey.generate()


@pytest.fixture
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    return slept


def test_admin_calls_send_the_admin_key_and_parse_typed_answers(key: paymaster.AgentKey) -> None:
    fake = Fake({("POST", "/v1/agents"): httpx.Response(201, json=AGENT_JSON)})
    fake.routes[("POST", f"/v1/agents/{AGENT}/fund")] = httpx.Response(200, json=WALLET)
    with make_client(fake, admin_key=ADMIN_KEY) as client:
        agent = client.agents.create(
            "crew-writer", public_key=key, policy={"daily_cap": "8.00"}, parent="team:growth"
        )
        wallet = client.agents.fund(agent.id, Decimal("20.00"))
    create, fund = fake.requests
    assert create.headers["authorization"] == f"Bearer {ADMIN_KEY}"
    assert create.headers["user-agent"].startswith("paymaster-python/")
    assert json.loads(create.content) == {
        "name": "crew-writer",
        "public_key": key.public_key,
        "policy": {"daily_cap": "8.00"},
        "parent": "team:growth",
    }
    assert agent.id == AGENT and agent.parent == "team:growth" and agent.policy_version == 1
    assert agent.metadata == {"env": "test"}
    fund_body = json.loads(fund.content)
    assert fund_body["amount"] == "20.00"
    uuid.UUID(fund_body["idempotency_key"])  # made, so a retried fund counts once
    assert isinstance(wallet, Budget)
    assert wallet.limit == Decimal("20.00") and wallet.remaining == Decimal("19.985")
    assert wallet.used == Decimal("0.0008")
    for amount in (wallet.limit, wallet.spent, wallet.reserved, wallet.remaining):
        assert type(amount) is Decimal


def test_agent_verbs_sign_a_fresh_token_each_and_send_money_as_strings(key: paymaster.AgentKey) -> None:
    fake = Fake({("POST", "/v1/reservations"): httpx.Response(201, json=RESERVATION)})
    fake.routes[("POST", "/v1/reservations/res_1/commit")] = httpx.Response(200, json=COMMIT)
    with make_client(fake) as client:
        hold = client.reserve_raw(
            AGENT, key, connector="local-ocr", amount="0.02", session="s1", task="task_1", ttl_seconds=60,
            metadata={"page": 3},
        )  # fmt: skip
        done = client.commit(hold.reservation_id, "0.015", agent_id=AGENT, key=key)
    reserve, commit = fake.requests
    for request in (reserve, commit):
        assert request.headers["x-paymaster-agent-id"] == AGENT
        assert "authorization" not in request.headers
    first, second = claims(reserve, key), claims(commit, key)
    assert first.jti != second.jti
    assert (first.session, first.task) == ("s1", "task_1")
    assert first.exp - first.iat == 60
    body = json.loads(reserve.content)
    assert body["amount"] == "0.02" and body["agent_id"] == AGENT and body["connector"] == "local-ocr"
    assert body["metadata"] == {"page": 3} and body["ttl_seconds"] == 60
    uuid.UUID(body["idempotency_key"])
    assert isinstance(hold, Reservation)
    assert hold.amount == Decimal("0.02") and hold.status == "held"
    assert [b.remaining for b in hold.budgets] == [Decimal("0.98"), Decimal("4.98")]
    assert json.loads(commit.content)["amount"] == "0.015"
    assert done.charged == Decimal("0.015") and done.released == Decimal("0.005")
    assert done.ledger_entry_id == "led_1"


def test_amounts_are_never_floats(key: paymaster.AgentKey) -> None:
    fake = Fake({("POST", "/v1/reservations"): httpx.Response(201, json=RESERVATION)})
    with make_client(fake) as client:
        with pytest.raises(TypeError, match="not float"):
            client.reserve_raw(AGENT, key, connector="c", amount=0.02)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            client.agents.fund(AGENT, True)
        with pytest.raises(ValueError, match="finite"):
            client.reserve_raw(AGENT, key, connector="c", amount=Decimal("NaN"))
        assert fake.requests == []
        client.reserve_raw(AGENT, key, connector="c", amount=Decimal("0.0200"))
        client.reserve_raw(AGENT, key, connector="c", amount=paymaster.Money.parse("0.5"))
        client.reserve_raw(AGENT, key, connector="c", amount=Decimal("1E-3"))
    assert [b["amount"] for b in fake.bodies()] == ["0.0200", "0.50", "0.001"]


def test_a_retried_verb_keeps_its_idempotency_key_with_a_new_token(
    key: paymaster.AgentKey, no_sleep: list[float]
) -> None:
    failures = iter([httpx.ConnectError("refused"), httpx.ReadTimeout("slow")])

    def flaky(request: httpx.Request) -> httpx.Response:
        error = next(failures, None)
        if error is not None:
            raise error
        return httpx.Response(201, json=RESERVATION)

    fake = Fake({("POST", "/v1/reservations"): flaky})
    with make_client(fake) as client:
        client.reserve_raw(AGENT, key, connector="local-ocr", amount="0.02")
    assert len(fake.requests) == 3
    assert len({b["idempotency_key"] for b in fake.bodies()}) == 1
    assert len({claims(r, key).jti for r in fake.requests}) == 3
    assert no_sleep == [0.2, 0.4]


def test_a_call_that_may_have_arrived_is_not_resent_without_an_idempotency_key(no_sleep: list[float]) -> None:
    def timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow")

    fake = Fake({("POST", "/v1/agents"): timeout})
    with make_client(fake, admin_key=ADMIN_KEY) as client, pytest.raises(paymaster.AuthorityUnavailable):
        client.agents.create("a", public_key="k" * 43)
    assert len(fake.requests) == 1


def test_a_connection_failure_raises_authority_unavailable(no_sleep: list[float]) -> None:
    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    fake = Fake({("GET", f"/v1/agents/{AGENT}"): refused})
    with make_client(fake, admin_key=ADMIN_KEY, max_retries=1) as client:
        with pytest.raises(paymaster.AuthorityUnavailable) as caught:
            client.agents.get(AGENT)
    assert isinstance(caught.value, paymaster.SpendDenied)
    assert caught.value.code == "authority_unavailable" and caught.value.status == 503
    assert isinstance(caught.value.__cause__, httpx.ConnectError)
    assert len(fake.requests) == 2


def test_a_real_socket_that_refuses_is_authority_unavailable(no_sleep: list[float]) -> None:
    with paymaster.Client("http://127.0.0.1:9", admin_key=ADMIN_KEY, timeout=2) as client:
        with pytest.raises(paymaster.AuthorityUnavailable):
            client.agents.list()


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (402, "balance_insufficient", paymaster.BalanceInsufficient),
        (402, "policy_cap_exceeded", paymaster.PolicyCapExceeded),
        (403, "agent_frozen", paymaster.AgentFrozen),
        (409, "idempotency_conflict", paymaster.IdempotencyConflict),
        (404, "not_found", paymaster.NotFound),
        (429, "loop_detected", paymaster.LoopDetected),
        (401, "spend_token_replayed", paymaster.SpendTokenReplayed),
    ],
)
def test_every_denial_is_raised_as_its_class(
    key: paymaster.AgentKey, status: int, code: str, cls: type[paymaster.SpendDenied]
) -> None:
    body = denial_body(code, budget_id=f"{AGENT}/total", remaining="0.01", requested="0.02", currency="USD")
    fake = Fake({("POST", "/v1/reservations"): httpx.Response(status, json=body)})
    with make_client(fake) as client, pytest.raises(cls) as caught:
        client.reserve_raw(AGENT, key, connector="local-ocr", amount="0.02")
    denial = caught.value
    assert denial.code == code
    assert denial.status == denial.status_code == status
    assert denial.budget_id == f"{AGENT}/total"
    assert denial.remaining == "0.01"
    assert denial.decision_id == "dec_1"
    assert len(fake.requests) == 1  # a denial is an answer: never retried


def test_odd_answers_still_raise() -> None:
    fake = Fake(
        {
            ("GET", "/v1/agents/ag_1"): httpx.Response(503, text="<html>bad gateway</html>"),
            ("GET", "/v1/agents/ag_2"): httpx.Response(500, json=denial_body("internal_error")),
            ("GET", "/v1/agents/ag_3"): httpx.Response(418, text="teapot"),
            ("GET", "/v1/agents/ag_4"): httpx.Response(200, text="not json"),
        }
    )
    with make_client(fake, admin_key=ADMIN_KEY) as client:
        with pytest.raises(paymaster.AuthorityUnavailable):
            client.agents.get("ag_1")
        with pytest.raises(paymaster.SpendDenied) as caught:
            client.agents.get("ag_2")
        assert (caught.value.code, caught.value.status) == ("internal_error", 500)
        with pytest.raises(paymaster.SpendDenied) as caught:
            client.agents.get("ag_3")
        assert caught.value.status == 418
        with pytest.raises(paymaster.PaymasterError, match="not JSON"):
            client.agents.get("ag_4")


def test_paths_ids_and_query_parameters() -> None:
    fake = Fake(
        {
            ("GET", f"/v1/budgets/{AGENT}/category:llm/session/session:s1"): httpx.Response(200, json=WALLET),
            ("GET", "/v1/ledger"): httpx.Response(200, json={"entries": []}),
            ("GET", "/v1/events"): httpx.Response(200, json={"events": [{"seq": 4}], "next_after_seq": 4}),
        }
    )
    with make_client(fake, admin_key=ADMIN_KEY) as client:
        client.budgets.get(f"{AGENT}/category:llm/session/session:s1")
        since = datetime(2026, 11, 24, 1, 0, tzinfo=UTC) + timedelta(hours=0)
        assert client.ledger(agent=AGENT, connector="openai", since=since, until="2026-11-25") == []
        assert client.events(after_seq=3) == [{"seq": 4}]
        for bad in ("", "../agents", "a//b"):
            with pytest.raises(ValueError):
                client.budgets.get(bad)
        with pytest.raises(ValueError, match="aware"):
            client.ledger(since=datetime(2026, 11, 24))
    budget, ledger, events = fake.requests
    assert budget.url.raw_path == f"/v1/budgets/{AGENT}/category:llm/session/session:s1".encode()
    assert dict(ledger.url.params) == {
        "agent": AGENT,
        "connector": "openai",
        "since": "2026-11-24T01:00:00.000000Z",
        "until": "2026-11-25",
    }
    assert events.url.params["after_seq"] == "3"


def test_principals_put_keeps_what_is_not_given() -> None:
    fake = Fake()
    fake.routes[("PUT", "/v1/principals/team:growth")] = lambda r: httpx.Response(
        201 if len(fake.requests) == 1 else 200, json={"principal": "team:growth", **json.loads(r.content)}
    )
    with make_client(fake, admin_key=ADMIN_KEY) as client:
        made = client.principals.put("team:growth", parent="org:acme", policy={"daily_cap": "50.00"})
        changed = client.principals.put("team:growth", parent=None)
        same = client.principals.put("team:growth", parent=UNSET)
        with pytest.raises(ValueError):
            client.principals.put("team/growth")
    assert fake.bodies() == [{"parent": "org:acme", "policy": {"daily_cap": "50.00"}}, {"parent": None}, {}]
    assert made.created and not changed.created and not same.created
    assert made.name == "team:growth" and made.parent == "org:acme" and changed.parent is None


def test_audit_verify_reports_a_broken_chain_as_an_answer() -> None:
    fake = Fake(
        {
            ("GET", "/v1/audit/verify"): httpx.Response(
                409, json={"ok": False, "first_bad_seq": 7, "reason": "hash"}
            )
        }
    )
    with make_client(fake, admin_key=ADMIN_KEY) as client:
        result = client.audit_verify()
        assert (result.ok, result.first_bad_seq, result.reason) == (False, 7, "hash")
        fake.routes[("GET", "/v1/audit/verify")] = httpx.Response(409, json=denial_body("admin_key_required"))
        with pytest.raises(paymaster.SpendDenied):
            client.audit_verify()


def test_tasks_are_made_by_the_admin_or_by_an_agent_with_its_key(key: paymaster.AgentKey) -> None:
    task = {
        "task_id": "task_1",
        "budget_id": "task_1",
        "limit": "5.00",
        "parent_task": None,
        "agents": [AGENT],
    }
    fake = Fake({("POST", "/v1/tasks"): httpx.Response(201, json=task)})
    with make_client(fake, admin_key=ADMIN_KEY) as client:
        made = client.tasks.create("5.00", agents=[AGENT])
        client.tasks.create("1.00", agents=[AGENT], parent_task="task_1", key=key, agent_id=AGENT)
        with pytest.raises(TypeError):
            client.tasks.create("1.00", agents=AGENT)
    admin, agent = fake.requests
    assert admin.headers["authorization"] == f"Bearer {ADMIN_KEY}"
    assert "authorization" not in agent.headers and claims(agent, key).agent_id == AGENT
    assert fake.bodies() == [
        {"limit": "5.00", "agents": [AGENT]},
        {"limit": "1.00", "parent_task": "task_1", "agents": [AGENT]},
    ]
    assert made.task_id == made.id == "task_1" and made.limit == Decimal("5.00") and made.agents == (AGENT,)


def test_a_service_key_reserves_for_an_agent_and_settles_without_an_agent_key() -> None:
    fake = Fake({("POST", "/v1/reservations"): httpx.Response(201, json=RESERVATION)})
    fake.routes[("POST", "/v1/reservations/res_1/release")] = httpx.Response(200, json=RELEASE)
    with make_client(fake, service_key="pm_svc_x", admin_key=ADMIN_KEY) as client:
        hold = client.reserve_raw(AGENT, connector="local-ocr", amount="0.02")
        client.release(hold.reservation_id, reason="cancelled")
    for request in fake.requests:
        assert request.headers["authorization"] == "Bearer pm_svc_x"
    assert fake.bodies()[1] == {"reason": "cancelled"}


# The reserve context manager, on a fake authority


def hold_fake(
    commit: Route | httpx.Response | None = None, release: Route | httpx.Response | None = None
) -> Fake:
    fake = Fake({("POST", "/v1/reservations"): httpx.Response(201, json=RESERVATION)})
    fake.routes[("POST", "/v1/reservations/res_1/commit")] = commit or httpx.Response(200, json=COMMIT)
    fake.routes[("POST", "/v1/reservations/res_1/release")] = release or httpx.Response(200, json=RELEASE)
    return fake


def paths(fake: Fake) -> list[str]:
    return [r.url.path for r in fake.requests]


def test_hold_commits_the_amount_held_on_a_normal_exit(key: paymaster.AgentKey) -> None:
    fake = hold_fake()
    with make_client(fake) as client:
        with client.reserve(AGENT, key, connector="local-ocr", amount="0.02") as hold:
            assert hold.amount == Decimal("0.02") and hold.reservation_id == "res_1"
            assert paths(fake) == ["/v1/reservations"]  # nothing settled yet
        assert hold.committed is not None and hold.settled
    assert paths(fake) == ["/v1/reservations", "/v1/reservations/res_1/commit"]
    assert fake.bodies()[1]["amount"] == "0.02"
    assert claims(fake.requests[1], key).agent_id == AGENT  # settled with the agent's own token


def test_hold_commit_now_settles_once(key: paymaster.AgentKey) -> None:
    fake = hold_fake()
    with make_client(fake) as client:
        with client.reserve(AGENT, key, connector="local-ocr", amount="0.02") as hold:
            result = hold.commit("0.015")
            assert result.charged == Decimal("0.015")
            with pytest.raises(paymaster.ReservationSettled):
                hold.commit("0.01")
            with pytest.raises(paymaster.ReservationSettled):
                hold.release()
    assert paths(fake) == ["/v1/reservations", "/v1/reservations/res_1/commit"]


def test_hold_releases_on_an_exception_and_reraises_it(key: paymaster.AgentKey) -> None:
    fake = hold_fake()
    with make_client(fake) as client:
        with (
            pytest.raises(ZeroDivisionError),
            client.reserve(AGENT, key, connector="c", amount="0.02") as hold,
        ):
            _ = 1 / 0
    assert paths(fake) == ["/v1/reservations", "/v1/reservations/res_1/release"]
    assert fake.bodies()[1] == {"reason": "exception: ZeroDivisionError"}
    assert hold.released is not None and hold.committed is None


def test_a_failed_release_does_not_hide_the_blocks_exception(
    key: paymaster.AgentKey, no_sleep: list[float]
) -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("gone")

    fake = hold_fake(release=down)
    with make_client(fake) as client:
        with pytest.raises(KeyError) as caught, client.reserve(AGENT, key, connector="c", amount="0.02"):
            raise KeyError("tool failed")
    assert any("releasing the hold failed" in note for note in caught.value.__notes__)


def test_a_refused_exit_commit_is_raised(key: paymaster.AgentKey) -> None:
    fake = hold_fake(commit=httpx.Response(409, json=denial_body("reservation_expired")))
    with make_client(fake) as client:
        with (
            pytest.raises(paymaster.ReservationExpired),
            client.reserve(AGENT, key, connector="c", amount="0.02"),
        ):
            pass


def test_a_commit_that_could_not_be_sent_is_sent_again_on_exit(
    key: paymaster.AgentKey, no_sleep: list[float]
) -> None:
    attempts: list[str] = []

    def once_down(request: httpx.Request) -> httpx.Response:
        attempts.append(json.loads(request.content)["idempotency_key"])
        if len(attempts) <= 3:  # the first commit() and its two retries
            raise httpx.ConnectError("gone")
        return httpx.Response(200, json=COMMIT)

    fake = hold_fake(commit=once_down)
    with make_client(fake) as client:
        with client.reserve(AGENT, key, connector="c", amount="0.02") as hold:
            with pytest.raises(paymaster.AuthorityUnavailable):
                hold.commit("0.015")
            assert not hold.settled
    assert hold.committed is not None
    assert len(attempts) == 4 and len(set(attempts)) == 1  # one commit, one idempotency key


def test_a_denied_reserve_raises_on_enter_and_runs_nothing(key: paymaster.AgentKey) -> None:
    fake = Fake({("POST", "/v1/reservations"): httpx.Response(402, json=denial_body("balance_insufficient"))})
    ran = False
    with make_client(fake) as client:
        with (
            pytest.raises(paymaster.BalanceInsufficient),
            client.reserve(AGENT, key, connector="c", amount="9"),
        ):
            ran = True
    assert not ran
    assert paths(fake) == ["/v1/reservations"]


def test_async_hold_on_a_fake(key: paymaster.AgentKey) -> None:
    fake = hold_fake()

    async def main() -> None:
        async with paymaster.AsyncClient(BASE, transport=httpx.MockTransport(fake)) as client:
            async with client.reserve(AGENT, key, connector="c", amount="0.02") as hold:
                assert hold.amount == Decimal("0.02")
                await hold.commit("0.015")
                with pytest.raises(paymaster.ReservationSettled):
                    await hold.commit()
            with pytest.raises(RuntimeError):
                async with client.reserve(AGENT, key, connector="c", amount="0.02"):
                    raise RuntimeError("boom")

    asyncio.run(main())
    assert paths(fake) == [
        "/v1/reservations",
        "/v1/reservations/res_1/commit",
        "/v1/reservations",
        "/v1/reservations/res_1/release",
    ]


def test_async_hold_releases_when_its_task_is_cancelled(key: paymaster.AgentKey) -> None:
    fake = hold_fake()
    entered = asyncio.Event()

    async def work(client: paymaster.AsyncClient) -> None:
        async with client.reserve(AGENT, key, connector="c", amount="0.02"):
            entered.set()
            await asyncio.sleep(30)

    async def main() -> None:
        async with paymaster.AsyncClient(BASE, transport=httpx.MockTransport(fake)) as client:
            task = asyncio.create_task(work(client))
            await entered.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())
    assert paths(fake)[-1] == "/v1/reservations/res_1/release"


# --------------------------------------------------------------------------- the real server


class PortalTransport(httpx.BaseTransport):
    """A synchronous transport into an ASGI app (httpx's ASGITransport is async only),
    driving it on an event loop in a background thread."""

    def __init__(self, app: Any) -> None:
        self._inner = httpx.ASGITransport(app=app)
        self._portal_cm = anyio.from_thread.start_blocking_portal()
        self._portal = self._portal_cm.__enter__()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        content = request.read()

        async def send() -> tuple[int, list[tuple[bytes, bytes]], bytes]:
            forwarded = httpx.Request(request.method, request.url, headers=request.headers, content=content)
            response = await self._inner.handle_async_request(forwarded)
            body = await response.aread()
            return response.status_code, response.headers.raw, body

        status, headers, body = self._portal.call(send)
        return httpx.Response(status, headers=headers, content=body)

    def close(self) -> None:
        self._portal_cm.__exit__(None, None, None)


@dataclass
class Server:
    app: Any
    authority: Any


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    app_module = pytest.importorskip("paymaster.server.app")
    from paymaster.bootstrap import open_authority
    from paymaster.config import load_settings

    monkeypatch.chdir(tmp_path)  # no stray paymaster.toml
    settings = load_settings(db=f"sqlite:///{tmp_path / 'pm.db'}", env={"PAYMASTER_ADMIN_KEY": ADMIN_KEY})
    authority = open_authority(settings)
    try:
        yield Server(app_module.create_app(authority), authority)
    finally:
        authority.store.close()


@pytest.fixture
def admin(server: Server) -> Iterator[paymaster.Client]:
    with paymaster.Client(BASE, admin_key=ADMIN_KEY, transport=PortalTransport(server.app)) as client:
        yield client


@pytest.fixture
def agent_client(server: Server) -> Iterator[paymaster.Client]:
    """A client with no key at all: an agent's, which signs its own calls."""
    with paymaster.Client(BASE, transport=PortalTransport(server.app)) as client:
        yield client


def new_agent(
    admin: paymaster.Client, fund: str | None = "1.00", policy: dict[str, Any] | None = None
) -> tuple[paymaster.sdk.Agent, paymaster.AgentKey]:
    key = paymaster.AgentKey.generate()
    agent = admin.agents.create("worker", public_key=key.public_key, policy=policy, metadata={"team": "sdk"})
    if fund is not None:
        admin.agents.fund(agent.id, fund)
    return agent, key


def wallet(admin: paymaster.Client, agent_id: str) -> Budget:
    return admin.budgets.get(f"{agent_id}/total")


def test_server_reserve_commit_round_trip(admin: paymaster.Client, agent_client: paymaster.Client) -> None:
    agent, key = new_agent(admin)
    assert agent.status == "active" and agent.metadata == {"team": "sdk"}
    assert admin.agents.get(agent.id) == agent
    assert agent.id in [a.id for a in admin.agents.list()]

    held = agent_client.reserve_raw(agent.id, key, connector="local-ocr", amount="0.02")
    assert held.amount == Decimal("0.02") and held.decision == "allow"
    assert wallet(admin, agent.id).reserved == Decimal("0.02")
    assert agent_client.reservation(held.reservation_id, agent_id=agent.id, key=key).status == "held"

    done = agent_client.commit(held.reservation_id, "0.015", agent_id=agent.id, key=key)
    assert (done.charged, done.released) == (Decimal("0.015"), Decimal("0.005"))
    state = wallet(admin, agent.id)
    assert (state.spent, state.reserved, state.remaining) == (
        Decimal("0.015"),
        Decimal("0"),
        Decimal("0.985"),
    )
    settled = admin.reservation(held.reservation_id)
    assert settled.status == "committed" and settled.charged == Decimal("0.015")

    (entry,) = admin.ledger(agent=agent.id)
    assert entry.total == Decimal("0.015") and entry.reservation_id == held.reservation_id
    refund = admin.refund(entry.id, "0.005", "partial outage")
    assert refund.amount == Decimal("0.005")
    assert wallet(admin, agent.id).spent == Decimal("0.01")

    # The agent reads its own budgets with its key; the admin sees the same.
    own = agent_client.agents.budgets(agent.id, key=key)
    assert [b.id for b in own] == [b.id for b in admin.agents.budgets(agent.id)]
    assert admin.events()  # every change is an audit event
    assert admin.audit_verify().ok


def test_server_context_manager_commits_on_success(
    admin: paymaster.Client, agent_client: paymaster.Client
) -> None:
    agent, key = new_agent(admin)
    with agent_client.reserve(agent.id, key, connector="local-ocr", amount="0.02") as hold:
        assert wallet(admin, agent.id).reserved == Decimal("0.02")
    state = wallet(admin, agent.id)
    assert (state.spent, state.reserved) == (Decimal("0.02"), Decimal("0"))
    assert hold.committed is not None and hold.committed.charged == Decimal("0.02")
    assert admin.reservation(hold.reservation_id).status == "committed"


def test_server_context_manager_releases_on_error(
    admin: paymaster.Client, agent_client: paymaster.Client
) -> None:
    agent, key = new_agent(admin)
    with pytest.raises(RuntimeError, match="tool failed"):
        with agent_client.reserve(agent.id, key, connector="local-ocr", amount="0.02") as hold:
            assert wallet(admin, agent.id).reserved == Decimal("0.02")
            raise RuntimeError("tool failed")
    state = wallet(admin, agent.id)
    assert (state.spent, state.reserved, state.remaining) == (Decimal("0"), Decimal("0"), Decimal("1.00"))
    assert admin.reservation(hold.reservation_id).status == "released"


def test_server_hold_commit_now(admin: paymaster.Client, agent_client: paymaster.Client) -> None:
    agent, key = new_agent(admin)
    with agent_client.reserve(agent.id, key, connector="local-ocr", amount="0.02") as hold:
        done = hold.commit("0.015")
        assert done.released == Decimal("0.005")
        assert wallet(admin, agent.id).spent == Decimal("0.015")
    state = wallet(admin, agent.id)
    assert (state.spent, state.reserved) == (Decimal("0.015"), Decimal("0"))  # not committed twice


def test_server_admin_context_manager_settles_with_the_admin_key(admin: paymaster.Client) -> None:
    agent, key = new_agent(admin)
    with admin.reserve(agent.id, key, connector="local-ocr", amount="0.02") as hold:
        hold.commit("0.01")
    assert wallet(admin, agent.id).spent == Decimal("0.01")


def test_server_denials_are_raised_as_their_classes(
    admin: paymaster.Client, agent_client: paymaster.Client
) -> None:
    poor, poor_key = new_agent(admin, fund="0.01")
    with pytest.raises(paymaster.BalanceInsufficient) as caught:
        agent_client.reserve_raw(poor.id, poor_key, connector="local-ocr", amount="0.02")
    assert caught.value.status == 402 and caught.value.budget_id == f"{poor.id}/total"
    assert Decimal(caught.value.remaining or "") == Decimal("0.01")
    with pytest.raises(paymaster.BalanceInsufficient):  # the context manager raises it on enter
        with agent_client.reserve(poor.id, poor_key, connector="local-ocr", amount="0.02"):
            pytest.fail("the block must not run")

    capped, capped_key = new_agent(admin, policy={"daily_cap": "0.01"})
    with pytest.raises(paymaster.PolicyCapExceeded) as caught_cap:
        agent_client.reserve_raw(capped.id, capped_key, connector="local-ocr", amount="0.02")
    assert caught_cap.value.status_code == 402
    assert (caught_cap.value.budget_id or "").startswith(f"{capped.id}/day/")

    frozen, frozen_key = new_agent(admin)
    assert admin.agents.freeze(frozen.id).status == "frozen"
    with pytest.raises(paymaster.AgentFrozen) as caught_frozen:
        agent_client.reserve_raw(frozen.id, frozen_key, connector="local-ocr", amount="0.01")
    assert caught_frozen.value.status == 403
    assert admin.agents.unfreeze(frozen.id).status == "active"
    agent_client.reserve_raw(frozen.id, frozen_key, connector="local-ocr", amount="0.01")

    agent, key = new_agent(admin)
    first = agent_client.reserve_raw(
        agent.id, key, connector="local-ocr", amount="0.01", idempotency_key="once"
    )
    again = agent_client.reserve_raw(
        agent.id, key, connector="local-ocr", amount="0.01", idempotency_key="once"
    )
    assert again.reservation_id == first.reservation_id  # a replay answers the first answer
    with pytest.raises(paymaster.IdempotencyConflict) as caught_conflict:
        agent_client.reserve_raw(agent.id, key, connector="local-ocr", amount="0.02", idempotency_key="once")
    assert caught_conflict.value.status == 409

    with pytest.raises(paymaster.NotFound) as caught_missing:
        admin.agents.get("ag_doesnotexist")
    assert caught_missing.value.status == 404
    with pytest.raises(paymaster.NotFound):
        admin.reservation("res_doesnotexist")
    with pytest.raises(paymaster.AdminKeyRequired):
        agent_client.agents.list()
    assert admin.agents.revoke(agent.id).status == "revoked"
    with pytest.raises(paymaster.AgentRevoked):
        agent_client.reserve_raw(agent.id, key, connector="local-ocr", amount="0.01")


def test_server_principals_caps_and_tasks(admin: paymaster.Client, agent_client: paymaster.Client) -> None:
    team = admin.principals.put("team-sdk", policy={"daily_cap": "5.00"})
    assert team.created and team.name == "team-sdk"
    assert not admin.principals.put("team-sdk", parent="org-sdk").created
    key = paymaster.AgentKey.generate()
    agent = admin.agents.create("member", public_key=key, parent="team-sdk")
    admin.agents.fund(agent.id, "1.00")
    cap = admin.budgets.create(agent.id, "0.50", period="week")
    assert cap.limit == Decimal("0.50") and cap.period == "week"
    assert admin.budgets.get(f"{agent.id}/week").limit == Decimal("0.50")

    task = admin.tasks.create("0.30", agents=[agent.id])
    sub = agent_client.tasks.create(
        "0.10", agents=[agent.id], parent_task=task.task_id, key=key, agent_id=agent.id
    )
    assert sub.parent_task == task.task_id
    with agent_client.reserve(agent.id, key, connector="local-ocr", amount="0.05", task=sub.task_id):
        pass
    assert admin.budgets.get(task.task_id).spent == Decimal("0.05")
    assert {b.owner for b in admin.agents.budgets(agent.id)} >= {agent.id, "team-sdk"}


# The async twins, on the same app through httpx.ASGITransport


@pytest.fixture
def async_clients(
    server: Server,
) -> Callable[[], AsyncIterator[tuple[paymaster.AsyncClient, paymaster.AsyncClient]]]:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def make() -> AsyncIterator[tuple[paymaster.AsyncClient, paymaster.AsyncClient]]:
        transport = httpx.ASGITransport(app=server.app)
        async with (
            paymaster.AsyncClient(BASE, admin_key=ADMIN_KEY, transport=transport) as admin,
            paymaster.AsyncClient(BASE, transport=transport) as agent,
        ):
            yield admin, agent

    return make  # type: ignore[return-value]


async def anew_agent(
    admin: paymaster.AsyncClient, fund: str | None = "1.00", policy: dict[str, Any] | None = None
) -> tuple[paymaster.sdk.Agent, paymaster.AgentKey]:
    key = paymaster.AgentKey.generate()
    agent = await admin.agents.create("async-worker", public_key=key.public_key, policy=policy)
    if fund is not None:
        await admin.agents.fund(agent.id, fund)
    return agent, key


def test_async_server_round_trip_and_context_manager(async_clients: Any) -> None:
    async def main() -> None:
        async with async_clients() as (admin, client):
            agent, key = await anew_agent(admin)
            held = await client.reserve_raw(agent.id, key, connector="local-ocr", amount="0.02")
            assert (await admin.budgets.get(f"{agent.id}/total")).reserved == Decimal("0.02")
            done = await client.commit(held.reservation_id, "0.015", agent_id=agent.id, key=key)
            assert done.charged == Decimal("0.015")
            assert (await admin.reservation(held.reservation_id)).status == "committed"

            async with client.reserve(agent.id, key, connector="local-ocr", amount="0.02"):
                pass
            assert (await admin.budgets.get(f"{agent.id}/total")).spent == Decimal("0.035")

            async with client.reserve(agent.id, key, connector="local-ocr", amount="0.02") as hold:
                await hold.commit("0.015")
            assert (await admin.budgets.get(f"{agent.id}/total")).spent == Decimal("0.05")

            with pytest.raises(ValueError, match="tool failed"):
                async with client.reserve(agent.id, key, connector="local-ocr", amount="0.02") as failed:
                    raise ValueError("tool failed")
            state = await admin.budgets.get(f"{agent.id}/total")
            assert (state.spent, state.reserved) == (Decimal("0.05"), Decimal("0"))
            assert (await admin.reservation(failed.reservation_id)).status == "released"
            assert [e.total for e in await admin.ledger(agent=agent.id)] == [
                Decimal(x) for x in ("0.015", "0.02", "0.015")
            ]
            assert (await admin.audit_verify()).ok

    asyncio.run(main())


def test_async_server_denials_are_raised_as_their_classes(async_clients: Any) -> None:
    async def main() -> None:
        async with async_clients() as (admin, client):
            poor, poor_key = await anew_agent(admin, fund="0.01")
            with pytest.raises(paymaster.BalanceInsufficient):
                await client.reserve_raw(poor.id, poor_key, connector="local-ocr", amount="0.02")
            with pytest.raises(paymaster.BalanceInsufficient):
                async with client.reserve(poor.id, poor_key, connector="local-ocr", amount="0.02"):
                    pytest.fail("the block must not run")

            capped, capped_key = await anew_agent(admin, policy={"daily_cap": "0.01"})
            with pytest.raises(paymaster.PolicyCapExceeded):
                await client.reserve_raw(capped.id, capped_key, connector="local-ocr", amount="0.02")

            frozen, frozen_key = await anew_agent(admin)
            await admin.agents.freeze(frozen.id)
            with pytest.raises(paymaster.AgentFrozen):
                await client.reserve_raw(frozen.id, frozen_key, connector="local-ocr", amount="0.01")

            agent, key = await anew_agent(admin)
            await client.reserve_raw(agent.id, key, connector="local-ocr", amount="0.01", idempotency_key="k")
            with pytest.raises(paymaster.IdempotencyConflict):
                await client.reserve_raw(
                    agent.id, key, connector="local-ocr", amount="0.02", idempotency_key="k"
                )

            with pytest.raises(paymaster.NotFound):
                await admin.agents.get("ag_doesnotexist")

    asyncio.run(main())
