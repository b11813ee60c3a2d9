"""The asynchronous client of the authority API: :class:`AsyncClient`, the twin of
:class:`~paymaster.Client` with the same calls (described once in
``paymaster.sdk._common``), awaited. Runs on asyncio or trio (through anyio, as httpx does).
"""

from __future__ import annotations

import builtins
from collections.abc import Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Self, TypeVar

import anyio
import httpx

from paymaster.sdk import _common as calls
from paymaster.sdk._common import UNSET, Call, Credentials, HoldState, S, _Unset
from paymaster.sdk.keys import AgentKey
from paymaster.sdk.models import (
    Agent,
    AmountLike,
    AuditVerification,
    Budget,
    Commit,
    LedgerEntry,
    Principal,
    Refund,
    Release,
    Reservation,
    Task,
)

__all__ = ["AsyncAgents", "AsyncBudgets", "AsyncClient", "AsyncHold", "AsyncPrincipals", "AsyncTasks"]

T = TypeVar("T")

# How long a hold abandoned by a cancelled task may take to be released before it is left
# to expire on its own.
_RELEASE_ON_CANCEL_SECONDS = 10.0


class AsyncClient:
    """An asynchronous client of one Paymaster authority; see :class:`paymaster.Client`.

    ``transport`` may be ``httpx.ASGITransport(app)`` to talk to an app in process.
    """

    def __init__(
        self,
        base_url: str | httpx.URL,
        *,
        admin_key: str | None = None,
        service_key: str | None = None,
        timeout: float | httpx.Timeout = calls.DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
        max_retries: int = calls.DEFAULT_MAX_RETRIES,
        token_ttl: int = calls.DEFAULT_TOKEN_TTL,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._credentials = Credentials(
            admin_key=admin_key, service_key=service_key, token_ttl=token_ttl, max_retries=max_retries
        )
        self._http = httpx.AsyncClient(
            base_url=base_url,
            timeout=timeout,
            transport=transport,
            headers={"user-agent": calls.user_agent(), **(headers or {})},
            follow_redirects=False,
        )
        self.agents = AsyncAgents(self)
        self.budgets = AsyncBudgets(self)
        self.principals = AsyncPrincipals(self)
        self.tasks = AsyncTasks(self)

    @property
    def base_url(self) -> httpx.URL:
        return self._http.base_url

    async def _run(self, call: Call[T]) -> T:
        attempt = 0
        while True:
            try:
                response = await self._http.request(
                    call.method, call.path, **call.request_kwargs(self._credentials)
                )
            except httpx.TransportError as error:
                delay = calls.retry_delay(call, error, attempt, self._credentials)
                if delay is None:
                    raise calls.unavailable(self.base_url, error) from error
                await anyio.sleep(delay)
                attempt += 1
                continue
            return calls.finish(call, response.status_code, response.content)

    # The verbs

    async def reserve_raw(
        self,
        agent_id: str | None,
        key: AgentKey | None = None,
        *,
        connector: str,
        amount: AmountLike | None = None,
        usage_estimate: Mapping[str, Any] | None = None,
        session: str | None = None,
        task: str | None = None,
        ttl_seconds: int | None = None,
        input_hash: str | None = None,
        idempotency_key: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        principal: str | None = None,
    ) -> Reservation:
        """See :meth:`paymaster.Client.reserve_raw`."""
        return await self._run(
            calls.reserve(
                agent_id,
                key,
                connector=connector,
                amount=amount,
                usage_estimate=usage_estimate,
                session=session,
                task=task,
                ttl_seconds=ttl_seconds,
                input_hash=input_hash,
                idempotency_key=idempotency_key,
                metadata=metadata,
                principal=principal,
            )
        )

    def reserve(
        self,
        agent_id: str | None,
        key: AgentKey | None = None,
        *,
        connector: str,
        amount: AmountLike | None = None,
        usage_estimate: Mapping[str, Any] | None = None,
        session: str | None = None,
        task: str | None = None,
        ttl_seconds: int | None = None,
        input_hash: str | None = None,
        idempotency_key: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        principal: str | None = None,
    ) -> AsyncHold:
        """``async with aclient.reserve(...) as hold:``; see :meth:`paymaster.Client.reserve`."""
        call = calls.reserve(
            agent_id,
            key,
            connector=connector,
            amount=amount,
            usage_estimate=usage_estimate,
            session=session,
            task=task,
            ttl_seconds=ttl_seconds,
            input_hash=input_hash,
            idempotency_key=idempotency_key,
            metadata=metadata,
            principal=principal,
        )
        return AsyncHold(self, call, agent_id, key)

    async def commit(
        self,
        reservation_id: str,
        amount: AmountLike | None = None,
        *,
        usage: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        agent_id: str | None = None,
        key: AgentKey | None = None,
    ) -> Commit:
        """See :meth:`paymaster.Client.commit`."""
        auth = calls.agent_or_bearer(agent_id, key)
        return await self._run(calls.commit(reservation_id, amount, usage, idempotency_key, auth))

    async def release(
        self,
        reservation_id: str,
        *,
        reason: str | None = None,
        agent_id: str | None = None,
        key: AgentKey | None = None,
    ) -> Release:
        return await self._run(calls.release(reservation_id, reason, calls.agent_or_bearer(agent_id, key)))

    async def refund(
        self, ledger_entry_id: str, amount: AmountLike, reason: str, *, idempotency_key: str | None = None
    ) -> Refund:
        return await self._run(calls.refund(ledger_entry_id, amount, reason, idempotency_key))

    async def reservation(
        self, reservation_id: str, *, agent_id: str | None = None, key: AgentKey | None = None
    ) -> Reservation:
        return await self._run(calls.get_reservation(reservation_id, calls.agent_or_bearer(agent_id, key)))

    # Queries

    async def ledger(
        self,
        *,
        agent: str | None = None,
        connector: str | None = None,
        since: str | datetime | None = None,
        until: str | datetime | None = None,
    ) -> list[LedgerEntry]:
        return await self._run(calls.ledger(agent, connector, since, until))

    async def events(self, after_seq: int = 0) -> list[dict[str, Any]]:
        return await self._run(calls.events(after_seq))

    async def audit_verify(self) -> AuditVerification:
        return await self._run(calls.audit_verify())

    # Lifetime

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<paymaster.AsyncClient {self.base_url}>"


class AsyncAgents:
    """``aclient.agents``; see :class:`paymaster.sdk.client.Agents`."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def create(
        self,
        name: str,
        *,
        public_key: str | AgentKey,
        policy: Mapping[str, Any] | None = None,
        parent: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Agent:
        return await self._client._run(calls.create_agent(name, public_key, policy, parent, metadata))

    async def list(self) -> builtins.list[Agent]:
        return await self._client._run(calls.list_agents())

    async def get(self, agent_id: str) -> Agent:
        return await self._client._run(calls.get_agent(agent_id))

    async def set_policy(self, agent_id: str, policy: Mapping[str, Any]) -> Agent:
        return await self._client._run(calls.set_policy(agent_id, policy))

    async def fund(self, agent_id: str, amount: AmountLike, *, idempotency_key: str | None = None) -> Budget:
        """Raise the agent's wallet by ``amount``; returns the wallet. Retried safely: the
        idempotency key (made when not given) makes a repeated fund count once."""
        return await self._client._run(calls.fund(agent_id, amount, idempotency_key))

    async def freeze(self, agent_id: str) -> Agent:
        return await self._client._run(calls.set_status(agent_id, "freeze"))

    async def unfreeze(self, agent_id: str) -> Agent:
        return await self._client._run(calls.set_status(agent_id, "unfreeze"))

    async def revoke(self, agent_id: str) -> Agent:
        return await self._client._run(calls.set_status(agent_id, "revoke"))

    async def budgets(self, agent_id: str, *, key: AgentKey | None = None) -> builtins.list[Budget]:
        """Every budget on the agent's path in its current window: wallet, caps, parents' caps.
        With the agent's ``key``, the agent reads its own (no admin key needed)."""
        auth = calls.agent_or_bearer(agent_id, key, otherwise="admin")
        return await self._client._run(calls.agent_budgets(agent_id, auth))


class AsyncBudgets:
    """``aclient.budgets``."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def get(
        self, budget_id: str, *, agent_id: str | None = None, key: AgentKey | None = None
    ) -> Budget:
        """A budget by id (``ag_…/total``, ``team:x/day``…); an id without a window means the
        current one. An agent reads its own budgets with its ``agent_id`` and ``key``."""
        auth = calls.agent_or_bearer(agent_id, key, otherwise="admin")
        return await self._client._run(calls.get_budget(budget_id, auth))

    async def create(
        self,
        owner: str,
        limit: AmountLike,
        *,
        period: str,
        scope: str | None = None,
        mode: str | None = None,
        tz: str | None = None,
    ) -> Budget:
        """Add (or replace) the cap ``{scope, period, limit, mode, tz}`` on ``owner``'s policy
        (an agent or a principal); returns the cap's budget in its current window."""
        return await self._client._run(
            calls.create_budget(owner, limit, period=period, scope=scope, mode=mode, tz=tz)
        )


class AsyncPrincipals:
    """``aclient.principals``."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def put(
        self,
        name: str,
        *,
        parent: str | _Unset | None = UNSET,
        policy: Mapping[str, Any] | _Unset | None = UNSET,
    ) -> Principal:
        return await self._client._run(calls.put_principal(name, parent, policy))


class AsyncTasks:
    """``aclient.tasks``."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def create(
        self,
        limit: AmountLike,
        *,
        agents: Sequence[str],
        parent_task: str | None = None,
        key: AgentKey | None = None,
        agent_id: str | None = None,
    ) -> Task:
        auth = calls.agent_or_bearer(agent_id, key, otherwise="admin")
        return await self._client._run(calls.create_task(limit, agents, parent_task, auth))


class AsyncHold(HoldState):
    """``async with aclient.reserve(...) as hold:``; ``await hold.commit("0.015")``."""

    def __init__(
        self, client: AsyncClient, reserve_call: Call[Reservation], agent_id: str | None, key: AgentKey | None
    ) -> None:
        super().__init__(reserve_call, agent_id, key)
        self._client = client

    async def commit(
        self, actual: AmountLike | None = None, *, usage: Mapping[str, Any] | None = None
    ) -> Commit:
        """See :meth:`paymaster.sdk.client.Hold.commit`."""
        return await self._settle(self._commit_call(actual, usage))

    async def release(self, reason: str | None = None) -> Release:
        return await self._settle(self._release_call(reason))

    async def _settle(self, call: Call[S]) -> S:
        try:
            result = await self._client._run(call)
        except BaseException as error:
            self._settle_failed(error)
            raise
        self._record(result)
        return result

    async def __aenter__(self) -> Self:
        if self._reservation is not None:
            raise RuntimeError("this hold was already entered; call aclient.reserve(...) again")
        self._reservation = await self._client._run(self._reserve_call)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._open_on_exit:
            return
        if exc is None:
            await self._settle(self._commit_call(None, None))
            return
        # Shielded, so a cancelled task still gives its hold back (within a bound).
        with anyio.move_on_after(_RELEASE_ON_CANCEL_SECONDS, shield=True):
            try:
                await self._settle(self._release_call(self._release_reason(exc)))
            except Exception as failure:
                self._note_release_failure(exc, failure)
