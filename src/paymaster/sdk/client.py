"""The synchronous client of the authority API (``/v1``).

``Client(base_url, admin_key=...)`` for operators, or with no key at all for an agent that
signs its own calls with its :class:`~paymaster.AgentKey`. Every non-2xx answer raises its
:class:`~paymaster.SpendDenied` subclass; a connection failure raises
:class:`~paymaster.AuthorityUnavailable`. The calls themselves are described once in
``paymaster.sdk._common`` and shared with :class:`~paymaster.AsyncClient`.
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Self, TypeVar

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

__all__ = ["Agents", "Budgets", "Client", "Hold", "Principals", "Tasks"]

T = TypeVar("T")


class Client:
    """A synchronous client of one Paymaster authority.

    ``admin_key`` (``pm_admin_…``) authorizes the admin API and settling any hold;
    ``service_key`` (``pm_svc_…``) lets a trusted service reserve for the agents and
    principals below its own. Agent-authenticated verbs take the agent's id and key and
    sign a fresh spend token (``aud`` ``paymaster``) for every request they send.

    ``transport`` replaces httpx's network transport (e.g. ``httpx.MockTransport``, or a
    WSGI/ASGI bridge in tests). Calls that are safe to resend (GETs, verbs carrying an
    idempotency key, release, freeze…) are retried ``max_retries`` times after a transport
    error, with the same idempotency key and a new spend token; any call is retried when
    the connection failed before the request left.
    """

    def __init__(
        self,
        base_url: str | httpx.URL,
        *,
        admin_key: str | None = None,
        service_key: str | None = None,
        timeout: float | httpx.Timeout = calls.DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
        max_retries: int = calls.DEFAULT_MAX_RETRIES,
        token_ttl: int = calls.DEFAULT_TOKEN_TTL,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._credentials = Credentials(
            admin_key=admin_key, service_key=service_key, token_ttl=token_ttl, max_retries=max_retries
        )
        self._http = httpx.Client(
            base_url=base_url,
            timeout=timeout,
            transport=transport,
            headers={"user-agent": calls.user_agent(), **(headers or {})},
            follow_redirects=False,
        )
        self.agents = Agents(self)
        self.budgets = Budgets(self)
        self.principals = Principals(self)
        self.tasks = Tasks(self)

    @property
    def base_url(self) -> httpx.URL:
        return self._http.base_url

    def _run(self, call: Call[T]) -> T:
        attempt = 0
        while True:
            try:
                response = self._http.request(
                    call.method, call.path, **call.request_kwargs(self._credentials)
                )
            except httpx.TransportError as error:
                delay = calls.retry_delay(call, error, attempt, self._credentials)
                if delay is None:
                    raise calls.unavailable(self.base_url, error) from error
                time.sleep(delay)
                attempt += 1
                continue
            return calls.finish(call, response.status_code, response.content)

    # The verbs

    def reserve_raw(
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
        """Hold ``amount`` (or the authority's price of ``usage_estimate``) on every budget of
        the call's path, or raise the denial. Signed with ``key`` when given, else sent
        with the service key (``agent_id`` or ``principal`` names whom to charge). Settle
        it with :meth:`commit` or :meth:`release`; prefer :meth:`reserve`, which does."""
        return self._run(
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
    ) -> Hold:
        """A hold to use as a context manager: reserves on enter (raising the denial),
        commits ``hold.amount`` on a normal exit unless ``hold.commit(actual)`` or
        ``hold.release()`` settled it already, and releases it when the block raises."""
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
        return Hold(self, call, agent_id, key)

    def commit(
        self,
        reservation_id: str,
        amount: AmountLike | None = None,
        *,
        usage: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        agent_id: str | None = None,
        key: AgentKey | None = None,
    ) -> Commit:
        """Charge ``amount`` (or the price of ``usage``) and give the rest of the hold back.
        With neither, the authority charges the hold. Signed by the reserving agent when
        ``agent_id`` and ``key`` are given, else with the service or admin key."""
        auth = calls.agent_or_bearer(agent_id, key)
        return self._run(calls.commit(reservation_id, amount, usage, idempotency_key, auth))

    def release(
        self,
        reservation_id: str,
        *,
        reason: str | None = None,
        agent_id: str | None = None,
        key: AgentKey | None = None,
    ) -> Release:
        """Give the whole hold back."""
        return self._run(calls.release(reservation_id, reason, calls.agent_or_bearer(agent_id, key)))

    def refund(
        self, ledger_entry_id: str, amount: AmountLike, reason: str, *, idempotency_key: str | None = None
    ) -> Refund:
        """Give (part of) a charge back to every budget it was debited from (admin only)."""
        return self._run(calls.refund(ledger_entry_id, amount, reason, idempotency_key))

    def reservation(
        self, reservation_id: str, *, agent_id: str | None = None, key: AgentKey | None = None
    ) -> Reservation:
        """A hold's state: ``held``, ``committed``, ``released`` or ``expired``."""
        return self._run(calls.get_reservation(reservation_id, calls.agent_or_bearer(agent_id, key)))

    # Queries

    def ledger(
        self,
        *,
        agent: str | None = None,
        connector: str | None = None,
        since: str | datetime | None = None,
        until: str | datetime | None = None,
    ) -> list[LedgerEntry]:
        """Ledger entries in ``[since, until)``, oldest first."""
        return self._run(calls.ledger(agent, connector, since, until))

    def events(self, after_seq: int = 0) -> list[dict[str, Any]]:
        """Audit events (CloudEvents, as JSON objects) after ``after_seq``."""
        return self._run(calls.events(after_seq))

    def audit_verify(self) -> AuditVerification:
        """Check the audit chain. A broken chain is an answer (``ok`` false, with
        ``first_bad_seq`` and ``reason``), not an exception."""
        return self._run(calls.audit_verify())

    # Lifetime

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<paymaster.Client {self.base_url}>"


class Agents:
    """``client.agents``: the admin API of agents."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def create(
        self,
        name: str,
        *,
        public_key: str | AgentKey,
        policy: Mapping[str, Any] | None = None,
        parent: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Agent:
        """Register an agent by its public key (the private key never leaves the agent)."""
        return self._client._run(calls.create_agent(name, public_key, policy, parent, metadata))

    def list(self) -> builtins.list[Agent]:
        return self._client._run(calls.list_agents())

    def get(self, agent_id: str) -> Agent:
        return self._client._run(calls.get_agent(agent_id))

    def set_policy(self, agent_id: str, policy: Mapping[str, Any]) -> Agent:
        """Replace the agent's policy (a new version; current windows keep their spend)."""
        return self._client._run(calls.set_policy(agent_id, policy))

    def fund(self, agent_id: str, amount: AmountLike, *, idempotency_key: str | None = None) -> Budget:
        """Raise the agent's wallet by ``amount``; returns the wallet. Retried safely: the
        idempotency key (made when not given) makes a repeated fund count once."""
        return self._client._run(calls.fund(agent_id, amount, idempotency_key))

    def freeze(self, agent_id: str) -> Agent:
        return self._client._run(calls.set_status(agent_id, "freeze"))

    def unfreeze(self, agent_id: str) -> Agent:
        return self._client._run(calls.set_status(agent_id, "unfreeze"))

    def revoke(self, agent_id: str) -> Agent:
        """Revoke the agent for good (revoke is final)."""
        return self._client._run(calls.set_status(agent_id, "revoke"))

    def budgets(self, agent_id: str, *, key: AgentKey | None = None) -> builtins.list[Budget]:
        """Every budget on the agent's path in its current window: wallet, caps, parents' caps.
        With the agent's ``key``, the agent reads its own (no admin key needed)."""
        auth = calls.agent_or_bearer(agent_id, key, otherwise="admin")
        return self._client._run(calls.agent_budgets(agent_id, auth))


class Budgets:
    """``client.budgets``."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def get(self, budget_id: str, *, agent_id: str | None = None, key: AgentKey | None = None) -> Budget:
        """A budget by id (``ag_…/total``, ``team:x/day``…); an id without a window means the
        current one. An agent reads its own budgets with its ``agent_id`` and ``key``."""
        auth = calls.agent_or_bearer(agent_id, key, otherwise="admin")
        return self._client._run(calls.get_budget(budget_id, auth))

    def create(
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
        return self._client._run(
            calls.create_budget(owner, limit, period=period, scope=scope, mode=mode, tz=tz)
        )


class Principals:
    """``client.principals``: teams and tenants above agents."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def put(
        self,
        name: str,
        *,
        parent: str | _Unset | None = UNSET,
        policy: Mapping[str, Any] | _Unset | None = UNSET,
    ) -> Principal:
        """Create or change a principal; an argument not given is kept as it is."""
        return self._client._run(calls.put_principal(name, parent, policy))


class Tasks:
    """``client.tasks``: delegation budgets."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def create(
        self,
        limit: AmountLike,
        *,
        agents: Sequence[str],
        parent_task: str | None = None,
        key: AgentKey | None = None,
        agent_id: str | None = None,
    ) -> Task:
        """A task budget for ``agents``. An admin makes any task; an agent listed on
        ``parent_task`` makes a sub-task with its own key (``agent_id`` and ``key``)."""
        auth = calls.agent_or_bearer(agent_id, key, otherwise="admin")
        return self._client._run(calls.create_task(limit, agents, parent_task, auth))


class Hold(HoldState):
    """``with client.reserve(...) as hold:`` — see :meth:`Client.reserve`."""

    def __init__(
        self, client: Client, reserve_call: Call[Reservation], agent_id: str | None, key: AgentKey | None
    ) -> None:
        super().__init__(reserve_call, agent_id, key)
        self._client = client

    def commit(self, actual: AmountLike | None = None, *, usage: Mapping[str, Any] | None = None) -> Commit:
        """Charge ``actual`` now (or the price of ``usage``; with neither, the amount held).
        Once: a second settle raises ``ReservationSettled``."""
        call = self._commit_call(actual, usage)
        return self._settle(call)

    def release(self, reason: str | None = None) -> Release:
        """Give the whole hold back now."""
        return self._settle(self._release_call(reason))

    def _settle(self, call: Call[S]) -> S:
        try:
            result = self._client._run(call)
        except BaseException as error:
            self._settle_failed(error)
            raise
        self._record(result)
        return result

    def __enter__(self) -> Self:
        if self._reservation is not None:
            raise RuntimeError("this hold was already entered; call client.reserve(...) again")
        self._reservation = self._client._run(self._reserve_call)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._open_on_exit:
            return
        if exc is None:
            self._settle(self._commit_call(None, None))
            return
        try:
            self._settle(self._release_call(self._release_reason(exc)))
        except Exception as failure:
            # The block's own exception is what the caller must see; the hold expires.
            self._note_release_failure(exc, failure)
