"""The authority: composes policy, pricing, identity, store and audit for each verb.

Every verb is planned here in memory (policies cached, invalidated by version) and decided
in one store transaction, which re-reads the agent's status and the policy versions it was
planned with — so a freeze or a policy change takes effect on the very next call, in every
worker and replica, whatever the caches say.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from paymaster import velocity
from paymaster.config import ConnectorConfig, Settings
from paymaster.core import budgets as windows
from paymaster.core import policy as pol
from paymaster.core import tokens
from paymaster.core.audit import MAIN_CHAIN, Head, VerifyResult, iso_time, verify_chains
from paymaster.errors import (
    AgentRevoked,
    AgentUnknown,
    ConnectorBlocked,
    InvalidAmount,
    InvalidRequest,
    NotFound,
    PerCallLimitExceeded,
    PolicyDomainBlocked,
    PriceUnknown,
    SpendDenied,
    SpendTokenAmountExceeded,
    SpendTokenInvalid,
    SpendTokenMissing,
    TaskForbidden,
    error_from_body,
)
from paymaster.ids import new_id
from paymaster.money import format_nanos, parse_nanos
from paymaster.store import ops
from paymaster.store.base import Row, Store, Tx
from paymaster.store.ops import Answer, BudgetSpec, Idem

T = TypeVar("T")
MAX_REPLANS = 3


def utcnow() -> datetime:
    return datetime.now(UTC)


def body_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class Caller:
    """Who is calling: an agent (with its verified token), a service key bound to a
    principal, or an admin."""

    kind: str  # agent | service | admin
    agent_id: str | None = None
    principal: str | None = None
    jti: tuple[str, int] | None = None
    claims: tokens.SpendClaims | None = None

    @classmethod
    def admin(cls) -> Caller:
        return cls("admin")


@dataclass(frozen=True)
class AgentRecord:
    id: str
    name: str
    public_key: str
    status: str
    parent: str | None
    metadata: Mapping[str, Any]
    policy: pol.Policy | None
    policy_json: Mapping[str, Any] | None
    policy_version: int
    state_version: int
    created_at: str
    key: Ed25519PublicKey

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "status": self.status,
            "public_key": self.public_key,
            "parent": self.parent,
            "metadata": dict(self.metadata),
            "policy": dict(self.policy_json) if self.policy_json is not None else None,
            "policy_version": self.policy_version,
            "created_at": self.created_at,
        }


@dataclass(frozen=True)
class PrincipalRecord:
    name: str
    parent: str | None
    policy: pol.Policy | None
    policy_version: int


@dataclass
class ReserveRequest:
    """A reserve, from the API or the gateway, after parsing."""

    connector: str
    idempotency_key: str | None
    agent_id: str | None = None
    principal: str | None = None
    amount: int | None = None
    usage_estimate: Mapping[str, Any] | None = None
    session: str | None = None
    task: str | None = None
    ttl_seconds: int | None = None
    input_hash: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    body_hash: str = ""
    # set by the gateway, which prices the call itself
    category: str | None = None
    quantity: str | None = None
    unit: str | None = None
    tier_key: str | None = None
    decision: str = "allow"
    request_sent: bool = False
    extra_response: Mapping[str, Any] = field(default_factory=dict)
    # the gateway: the host asked for (step 4) and its own pricing step (step 7)
    host: str | None = None
    price: Callable[[PriceContext], Priced] | None = None


@dataclass(frozen=True)
class PriceContext:
    """What a pricing step may look at: the policies up the chain (strictest wins), the
    budget path the call will be held on, and the authority (for budget reads)."""

    authority: Authority
    agent: AgentRecord | None
    policies: Sequence[pol.Policy]
    path: Sequence[BudgetSpec]
    connector: ConnectorConfig | None
    category: str | None
    now: datetime

    def remaining(self) -> int | None:
        """The smallest remaining amount over the enforced budgets of the path (None: none)."""
        return self.authority.smallest_remaining(self.path)


@dataclass(frozen=True)
class Priced:
    amount: int
    quantity: str | None = None
    unit: str | None = None
    tier_key: str | None = None
    decision: str = "allow"
    extra_response: Mapping[str, Any] = field(default_factory=dict)


class Authority:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        signing_key: Ed25519PrivateKey,
        *,
        clock: Callable[[], datetime] = utcnow,
        pricer: Any = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.signing_key = signing_key
        self.public_key = signing_key.public_key()
        self.clock = clock
        self.pricer = pricer
        self._agents: dict[str, AgentRecord] = {}
        self._principals: dict[str, PrincipalRecord] = {}
        self._lock = threading.Lock()
        # a store shared by several replicas tells each of them when an agent, principal or
        # policy changed anywhere, so their caches drop the record at once
        on_invalidate = getattr(store, "on_invalidate", None)
        if callable(on_invalidate):
            on_invalidate(self.invalidate)
        # event types `[alerts] events` adds to the webhook's: enqueued wherever emitted
        self.outbox_types = ops.outbox_types(settings.alerts)

    @property
    def currency(self) -> str:
        return self.settings.currency

    @property
    def alerts_enabled(self) -> bool:
        return bool(self.settings.alerts.get("webhook"))

    # ------------------------------------------------------------ plumbing

    def _write(self, op: Callable[[Tx], T]) -> T:
        return self.submit(op).result()

    def submit(self, op: Callable[[Tx], T]) -> Future[T]:
        if self.outbox_types:
            types = self.outbox_types
            return self.store.write(lambda tx: op(ops.OutboxTx(tx, types)))
        return self.store.write(op)

    @staticmethod
    def _raise_or(answer: Answer) -> dict[str, Any]:
        if answer.ok:
            return answer.body
        raise error_from_body(answer.status, answer.body)

    def invalidate(self, owner: str | None = None) -> None:
        with self._lock:
            if owner is None:
                self._agents.clear()
                self._principals.clear()
            elif owner.startswith("ag_"):
                self._agents.pop(owner, None)
            else:
                self._principals.pop(owner, None)

    # ------------------------------------------------------------ records

    def agent(self, agent_id: str) -> AgentRecord:
        with self._lock:
            cached = self._agents.get(agent_id)
        if cached is not None:
            return cached
        record = self.store.read(lambda tx: _load_agent(tx, agent_id))
        if record is None:
            raise NotFound(f"no such agent {agent_id}")
        with self._lock:
            self._agents[agent_id] = record
        return record

    def principal(self, name: str) -> PrincipalRecord | None:
        with self._lock:
            cached = self._principals.get(name)
        if cached is not None:
            return cached
        record = self.store.read(lambda tx: _load_principal(tx, name))
        if record is not None:
            with self._lock:
                self._principals[name] = record
        return record

    def principal_chain(self, start: str | None) -> list[PrincipalRecord]:
        chain: list[PrincipalRecord] = []
        seen: set[str] = set()
        cursor = start
        while cursor is not None and cursor not in seen:
            seen.add(cursor)
            record = self.principal(cursor)
            if record is None:
                break
            chain.append(record)
            cursor = record.parent
        return chain

    # ------------------------------------------------------------ identity

    def verify_token(
        self,
        token: str | None,
        *,
        audience: str | set[str],
        agent_header: str | None = None,
        method: str | None = None,
        url: str | None = None,
    ) -> Caller:
        """Step 1 of the order of checks. The token's ``jti`` is returned for the store to
        spend in the same transaction as whatever follows."""
        if not token:
            raise SpendTokenMissing("x-paymaster-spend-token is missing")
        kid = tokens.token_key_id(token)
        if agent_header is not None and agent_header != kid:
            raise SpendTokenInvalid("x-paymaster-agent-id does not match the token's kid")
        try:
            record = self.agent(kid)
        except NotFound:
            raise AgentUnknown(f"agent {kid} is not registered") from None
        if record.status == "revoked":
            raise AgentRevoked(f"agent {kid} is revoked")
        claims = tokens.verify_spend_token(token, record.key, audience=audience, now=self.clock().timestamp())
        if method is not None and url is not None:
            tokens.check_request_binding(claims, method=method, url=url)
        return Caller("agent", agent_id=kid, jti=(claims.jti, int(claims.exp)), claims=claims)

    # ------------------------------------------------------------ reserve

    def reserve(self, req: ReserveRequest, caller: Caller) -> dict[str, Any]:
        return self._raise_or(self.reserve_answer(req, caller))

    def reserve_answer(self, req: ReserveRequest, caller: Caller) -> Answer:
        for _ in range(MAX_REPLANS):
            cmd = self.plan_reserve(req, caller)
            try:
                return self._write(lambda tx, c=cmd: ops.reserve(tx, c, outbox=self.alerts_enabled))  # type: ignore[misc]
            except ops.StaleSnapshot as stale:
                self.invalidate(str(stale))
        self.invalidate()
        cmd = self.plan_reserve(req, caller)
        return self._write(lambda tx: ops.reserve(tx, cmd, outbox=self.alerts_enabled))

    def plan_reserve(self, req: ReserveRequest, caller: Caller) -> ops.ReserveCommand:
        """Checks 3 to 9 of the order of checks, in memory; a refusal becomes a command
        that records the denial (and spends the token) without holding anything."""
        now = self.clock()
        decision_id = new_id("dec_")
        agent_id = req.agent_id if req.agent_id is not None else caller.agent_id
        principal = agent_id or req.principal or caller.principal or ""
        ttl = req.ttl_seconds if req.ttl_seconds is not None else self.settings.reservation_ttl
        expires_at = now + timedelta(seconds=max(1, ttl))
        scope = f"{principal}:reserve"
        request_hash = req.body_hash or body_hash(
            [
                req.connector,
                req.amount,
                req.usage_estimate,
                req.session,
                req.task,
                req.input_hash,
                req.ttl_seconds,
                dict(req.metadata),
                req.principal,
                req.agent_id,
            ]
        )
        idem = Idem(scope, req.idempotency_key, request_hash) if req.idempotency_key else None
        base: dict[str, Any] = {
            "reservation_id": new_id("res_"),
            "decision_id": decision_id,
            "principal": principal,
            "agent_id": agent_id,
            "connector": req.connector,
            "category": req.category,
            "currency": self.currency,
            "expires_at": expires_at,
            "idem": idem,
            "jti": caller.jti,
            "session": req.session,
            "task": req.task,
            "input_hash": req.input_hash,
            "tier_key": req.tier_key,
            "quantity": req.quantity,
            "unit": req.unit,
            "request_sent": req.request_sent,
            "metadata": req.metadata,
            "extra_response": req.extra_response,
        }
        amount = req.amount or 0
        versions: list[tuple[str, int]] = []
        try:
            agent: AgentRecord | None = None
            if agent_id is not None:
                try:
                    agent = self.agent(agent_id)
                except NotFound:
                    raise AgentUnknown(f"agent {agent_id} is not registered") from None
                versions.append((agent.id, agent.state_version))
                chain = self.principal_chain(agent.parent)
            else:
                chain = self.principal_chain(principal) if principal else []
            versions.extend((p.name, p.policy_version) for p in chain)
            if caller.kind == "service" and not self._service_may_charge(caller, agent, principal):
                raise InvalidRequest(f"this service key may not charge {principal}", status=403)
            policies = list([agent.policy] if agent and agent.policy else [])
            policies += [p.policy for p in chain if p.policy is not None]
            connector = self.settings.connector(req.connector)
            category = (
                req.category if req.category is not None else (connector.category if connector else None)
            )
            base["category"] = category
            if ttl <= 0 or ttl > self.settings.reservation_ttl_max:
                raise InvalidRequest(f"ttl_seconds must be between 1 and {self.settings.reservation_ttl_max}")
            # 4. host (gateway calls)
            if req.host is not None and (
                connector is None or not pol.host_allowed(policies, req.host, connector.hosts)
            ):
                raise PolicyDomainBlocked(
                    f"host {req.host} is not allowed by policy or served by no connector"
                )
            # 5. connector and category
            if not pol.connector_allowed(policies, req.connector, category):
                raise ConnectorBlocked(f"connector {req.connector} is not allowed by policy")
            # 6. task membership
            task_chain = self._task_chain(req.task, agent_id) if req.task else []
            path = self._budget_path(
                agent, chain, req.connector, category, req.session, task_chain, now, principal
            )
            # 7. price
            decision = req.decision
            if req.price is not None:
                priced = req.price(PriceContext(self, agent, policies, path, connector, category, now))
                amount = priced.amount
                decision = priced.decision
                base.update(
                    quantity=priced.quantity or req.quantity,
                    unit=priced.unit or req.unit,
                    tier_key=priced.tier_key or req.tier_key,
                    extra_response={**req.extra_response, **priced.extra_response},
                )
            else:
                amount = self._price(req, connector, now)
            if amount < 0:
                raise InvalidAmount("amount must not be negative")
            # 8. per-call maximum and token max
            limit = pol.per_call_limit(policies, req.connector, category)
            if limit is not None and amount > limit:
                raise PerCallLimitExceeded(
                    f"{format_nanos(amount)} is above the per-call maximum of {format_nanos(limit)}",
                    requested=format_nanos(amount),
                    remaining=format_nanos(limit),
                    currency=self.currency,
                )
            claims = caller.claims
            if (
                claims is not None
                and claims.max_amount is not None
                and amount > parse_nanos(claims.max_amount)
            ):
                raise SpendTokenAmountExceeded(
                    f"{format_nanos(amount)} is above the token's max of {claims.max_amount}",
                    requested=format_nanos(amount),
                    remaining=claims.max_amount,
                    currency=self.currency,
                )
        except SpendDenied as denial:
            if denial.status == 401:
                raise
            denial.decision_id = decision_id
            return ops.ReserveCommand(
                amount=amount, decision="deny", path=(), versions=tuple(versions), denial=denial, **base
            )
        loop = self._loop_guards(agent, chain, req)
        return ops.ReserveCommand(
            amount=amount,
            decision=decision,
            path=tuple(path),
            versions=tuple(versions),
            loop_guards=loop,
            **base,
        )

    def smallest_remaining(self, path: Sequence[BudgetSpec]) -> int | None:
        """The least any enforced budget of ``path`` can still hold (a read, not a hold)."""
        smallest: int | None = None
        for spec in path:
            if spec.mode == "shadow":
                continue
            row = self.store.read(lambda tx, b=spec.id: ops.budget_row(tx, b))  # type: ignore[misc]
            if row is not None:
                left = ops.remaining_of(row)
            elif spec.limit is not None:
                left = spec.limit
            else:
                continue
            smallest = left if smallest is None else min(smallest, left)
        return smallest

    def _service_may_charge(self, caller: Caller, agent: AgentRecord | None, principal: str) -> bool:
        """A service key is bound to one principal and what lies below it."""
        bound = caller.principal
        if bound is None:
            return False
        start = agent.parent if agent is not None else principal
        if agent is not None and agent.id == bound:
            return True
        return any(p.name == bound for p in self.principal_chain(start)) or start == bound

    def _price(self, req: ReserveRequest, connector: ConnectorConfig | None, now: datetime) -> int:
        if req.amount is not None:
            return req.amount
        if req.usage_estimate is not None and connector is not None and self.pricer is not None:
            amount: int = self.pricer.price_estimate(connector, req.usage_estimate, now)
            return amount
        if connector is None:
            raise PriceUnknown(f"connector {req.connector} is not configured: amount is required")
        raise PriceUnknown(f"connector {req.connector} cannot price this call: give amount or usage_estimate")

    def _task_chain(self, task_id: str, agent_id: str | None) -> list[str]:
        chain = self.store.read(lambda tx: _load_task_chain(tx, task_id))
        if not chain:
            raise NotFound(f"no such task {task_id}")
        first_agents = chain[0][1]
        if agent_id is None or agent_id not in first_agents:
            raise TaskForbidden(f"agent {agent_id} is not listed on task {task_id}")
        return [tid for tid, _ in chain]

    def _budget_path(
        self,
        agent: AgentRecord | None,
        chain: Sequence[PrincipalRecord],
        connector: str,
        category: str | None,
        session: str | None,
        task_chain: Sequence[str],
        now: datetime,
        principal: str,
    ) -> list[BudgetSpec]:
        path: list[BudgetSpec] = []
        if agent is not None:
            thresholds = agent.policy.alert_thresholds if agent.policy else pol.DEFAULT_ALERT_THRESHOLDS
            path.append(
                BudgetSpec(
                    id=f"{agent.id}/total",
                    kind="wallet",
                    owner=agent.id,
                    scope="all",
                    period="total",
                    window="",
                    thresholds=tuple(thresholds),
                )
            )
            if agent.policy is not None:
                path.extend(_cap_specs(agent.id, agent.policy, connector, category, session, now))
        for record in chain:
            if record.policy is not None:
                path.extend(_cap_specs(record.name, record.policy, connector, category, session, now))
        for task_id in task_chain:
            path.append(
                BudgetSpec(
                    id=task_id,
                    kind="task",
                    owner=task_id,
                    scope="all",
                    period="total",
                    window="",
                    thresholds=tuple(pol.DEFAULT_ALERT_THRESHOLDS),
                )
            )
        return path

    def _loop_guards(
        self, agent: AgentRecord | None, chain: Sequence[PrincipalRecord], req: ReserveRequest
    ) -> tuple[tuple[str, int, int], ...]:
        if req.input_hash is None:
            return ()
        policies = ([agent.policy] if agent and agent.policy else []) + [p.policy for p in chain if p.policy]
        who = agent.id if agent else req.principal or ""
        guards = []
        for i, p in enumerate(policies):
            if p.loop_guard is not None:
                fingerprint = f"{who}|{req.connector}|{req.input_hash}"
                guards.append((f"{i}|{fingerprint}", p.loop_guard.window_seconds, p.loop_guard.max_repeats))
        return tuple(guards)

    # ------------------------------------------------------------ commit / release / refund

    def commit(
        self,
        reservation_id: str,
        *,
        amount: int | None,
        caller: Caller,
        idempotency_key: str | None = None,
        body: Any = None,
        estimated: bool = False,
        quantity: str | None = None,
        unit: str | None = None,
        reason: str | None = None,
    ) -> dict[str, Any]:
        if amount is not None and amount < 0:
            raise InvalidAmount("amount must not be negative")
        self._check_settle_rights(reservation_id, caller)
        request = body if body is not None else [amount, estimated, quantity, unit, reason]
        idem = (
            Idem(f"commit:{reservation_id}", idempotency_key, body_hash(request)) if idempotency_key else None
        )
        cmd = ops.CommitCommand(
            reservation_id=reservation_id,
            amount=amount,
            estimated=estimated,
            quantity=quantity,
            unit=unit,
            idem=idem,
            jti=caller.jti,
            reason=reason,
            owner_agent=caller.agent_id if caller.kind == "agent" else None,
        )
        result = self._raise_or(self._write(lambda tx: ops.commit(tx, cmd, outbox=self.alerts_enabled)))
        agent_id = result.get("agent_id") or caller.agent_id
        if agent_id:
            velocity.check_after_commit(self, agent_id, reservation_id=reservation_id)
        return result

    def release(self, reservation_id: str, *, caller: Caller, reason: str | None = None) -> dict[str, Any]:
        self._check_settle_rights(reservation_id, caller)
        owner = caller.agent_id if caller.kind == "agent" else None
        return self._raise_or(
            self._write(lambda tx: ops.release(tx, reservation_id, reason, jti=caller.jti, owner_agent=owner))
        )

    def _check_settle_rights(self, reservation_id: str, caller: Caller) -> None:
        """Admins settle anything; an agent its own reservations (checked inside the verb's
        transaction: see ``owner_agent``); a service key what lies below its principal."""
        if caller.kind == "service":
            self.check_reservation_access(reservation_id, caller)

    def check_reservation_access(self, reservation_id: str, caller: Caller) -> None:
        """Raise ``not_found`` unless ``caller`` may see this reservation."""
        if caller.kind == "admin":
            return
        row = self.store.read(
            lambda tx: tx.one("SELECT agent_id, principal FROM reservations WHERE id = ?", (reservation_id,))
        )
        if row is None:
            raise NotFound(f"no such reservation {reservation_id}")
        if caller.kind == "agent" and row["agent_id"] == caller.agent_id:
            return
        if caller.kind == "service":
            agent = self.agent(row["agent_id"]) if row["agent_id"] else None
            if self._service_may_charge(caller, agent, str(row["principal"])):
                return
        raise NotFound(f"no such reservation {reservation_id}")

    def mark_request_sent(self, reservation_id: str) -> None:
        self._write(lambda tx: ops.mark_request_sent(tx, reservation_id))

    def refund(
        self, ledger_entry_id: str, amount: int, reason: str, idempotency_key: str | None, body: Any = None
    ) -> dict[str, Any]:
        idem = Idem("admin:refund", idempotency_key, body_hash(body)) if idempotency_key else None
        return self._raise_or(self._write(lambda tx: ops.refund(tx, ledger_entry_id, amount, reason, idem)))

    def expire_due(self) -> int:
        now = self.clock()
        return self._write(
            lambda tx: ops.sweep(
                tx,
                outbox=self.alerts_enabled,
                jti_before=int(now.timestamp()) - 60,
                idem_before=ops.day_ago(now),
            )
        )

    # ------------------------------------------------------------ admin

    def create_agent(
        self,
        name: str,
        public_key: str,
        *,
        policy: Any = None,
        parent: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        if not isinstance(name, str) or not name.strip():
            raise InvalidRequest("name must be a non-empty string")
        tokens.load_public_key(public_key)
        if parent is not None:
            check_principal_name(parent)
        if metadata is not None and not isinstance(metadata, Mapping):
            raise InvalidRequest("metadata must be an object")
        policy_json = pol.policy_to_json(pol.parse_policy(policy)) if policy is not None else None
        agent_id = new_id("ag_")
        self._write(
            lambda tx: ops.create_agent(
                tx,
                agent_id=agent_id,
                name=name,
                public_key=public_key,
                parent=parent,
                metadata=metadata or {},
                policy=policy_json,
            )
        )
        return self.get_agent(agent_id)

    def get_agent(self, agent_id: str) -> dict[str, Any]:
        self.invalidate(agent_id)
        return self.agent(agent_id).to_json()

    def list_agents(self) -> list[dict[str, Any]]:
        ids = self.store.read(
            lambda tx: [r["id"] for r in tx.all("SELECT id FROM agents ORDER BY created_at")]
        )
        return [self.get_agent(i) for i in ids]

    def set_agent_policy(self, agent_id: str, policy: Any) -> dict[str, Any]:
        self.agent(agent_id)
        policy_json = pol.policy_to_json(pol.parse_policy(policy))
        self._write(lambda tx: ops.set_policy(tx, agent_id, policy_json))
        return self.get_agent(agent_id)

    def set_limits(self, agent_id: str, **limits: Any) -> dict[str, Any]:
        record = self.agent(agent_id)
        current = record.policy or pol.parse_policy({})
        updated = pol.with_limits(current, **limits)
        policy_json = pol.policy_to_json(updated)
        self._write(lambda tx: ops.set_policy(tx, agent_id, policy_json))
        return self.get_agent(agent_id)

    def fund(self, agent_id: str, amount: int, idempotency_key: str | None = None) -> dict[str, Any]:
        idem = Idem(f"admin:fund:{agent_id}", idempotency_key, str(amount)) if idempotency_key else None
        self._raise_or(self._write(lambda tx: ops.fund(tx, agent_id, amount, self.currency, idem)))
        return self.budget(f"{agent_id}/total")

    def set_status(self, agent_id: str, status: str) -> dict[str, Any]:
        answer = self._write(lambda tx: ops.set_agent_status(tx, agent_id, status))
        self.invalidate(agent_id)
        self._raise_or(answer)
        return self.get_agent(agent_id)

    def put_principal(self, name: str, body: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        check_principal_name(name)
        unknown = set(body) - {"parent", "policy"}
        if unknown:
            raise InvalidRequest(f"unknown fields {sorted(unknown)}")
        parent = body.get("parent")
        if parent is not None:
            check_principal_name(parent)
        policy_json = (
            pol.policy_to_json(pol.parse_policy(body["policy"])) if body.get("policy") is not None else None
        )
        answer = self._write(lambda tx: ops.put_principal(tx, name, parent, "parent" in body, policy_json))
        self.invalidate(name)
        result = self._raise_or(answer)
        result["policy"] = policy_json if policy_json is not None else self._principal_policy_json(name)
        return answer.status, result

    def _principal_policy_json(self, name: str) -> Any:
        row = self.store.read(
            lambda tx: tx.one(
                "SELECT p.policy FROM policies p JOIN principals r"
                " ON r.name = p.owner AND r.policy_version = p.version WHERE r.name = ?",
                (name,),
            )
        )
        return json.loads(row["policy"]) if row else None

    def create_task(self, body: Mapping[str, Any], caller: Caller) -> dict[str, Any]:
        unknown = set(body) - {"limit", "parent_task", "agents"}
        if unknown:
            raise InvalidRequest(f"unknown fields {sorted(unknown)}")
        limit = parse_nanos(body.get("limit"), field="limit", allow_zero=False)
        parent_task = body.get("parent_task")
        agents = body.get("agents", [])
        if not isinstance(agents, list) or not all(isinstance(a, str) for a in agents):
            raise InvalidRequest("agents must be a list of agent ids")
        if parent_task is not None and not isinstance(parent_task, str):
            raise InvalidRequest("parent_task must be a task id")
        for agent_id in agents:
            self.agent(agent_id)
        if caller.kind == "agent":
            if parent_task is None:
                raise TaskForbidden("an agent may only create sub-tasks of a task it is listed on")
            self._task_chain(parent_task, caller.agent_id)
            creator = caller.agent_id or ""
        else:
            creator = caller.kind
        task_id = new_id("task_")
        return self._raise_or(
            self._write(
                lambda tx: ops.create_task(
                    tx,
                    task_id=task_id,
                    limit=limit,
                    currency=self.currency,
                    parent_task=parent_task,
                    agents=agents,
                    created_by=creator,
                )
            )
        )

    # ------------------------------------------------------------ queries

    def query_reservation(self, reservation_id: str) -> dict[str, Any]:
        row = self.store.read(lambda tx: tx.one("SELECT * FROM reservations WHERE id = ?", (reservation_id,)))
        if row is None:
            raise NotFound(f"no such reservation {reservation_id}")
        if row["status"] == "held" and str(row["expires_at"]) <= iso_time(self.clock()):
            self.expire_due()
            row = self.store.read(
                lambda tx: tx.one("SELECT * FROM reservations WHERE id = ?", (reservation_id,))
            )
            assert row is not None
        return reservation_json(row)

    def budget(self, budget_id: str) -> dict[str, Any]:
        parsed = windows.parse_budget_id(budget_id)
        if parsed.window_key is None:
            budget_id = self._current_window_id(parsed)
        row = self.store.read(lambda tx: ops.budget_row(tx, budget_id))
        if row is None:
            spec = self._virtual_budget(budget_id)
            if spec is None:
                raise NotFound(f"no such budget {budget_id}")
            return spec
        return budget_json(row)

    def _current_window_id(self, parsed: windows.ParsedBudgetId) -> str:
        owner_policy = self._owner_policy(parsed.owner)
        tz = None
        if owner_policy is not None:
            for cap in owner_policy.caps:
                if cap.scope == parsed.scope and cap.period == parsed.period:
                    tz = cap.tz
        window = windows.window_for(parsed.period, self.clock(), tz) if parsed.period != "session" else None
        if window is None:
            raise InvalidRequest("a session budget id must name its window: session:{id}")
        return windows.budget_id(parsed.owner, parsed.scope, parsed.period, window.key)

    def _owner_policy(self, owner: str) -> pol.Policy | None:
        if owner.startswith("ag_"):
            try:
                return self.agent(owner).policy
            except NotFound:
                return None
        record = self.principal(owner)
        return record.policy if record else None

    def _virtual_budget(self, budget_id: str) -> dict[str, Any] | None:
        """A cap window nobody has spent against yet: report it at zero use."""
        parsed = windows.parse_budget_id(budget_id)
        policy = self._owner_policy(parsed.owner)
        if policy is None:
            return None
        for cap in policy.caps:
            if cap.scope == parsed.scope and cap.period == parsed.period:
                if cap.period == "session":
                    window = windows.Window(parsed.window_key or "", None, None)
                else:
                    window = windows.window_from_key(cap.period, parsed.window_key or "", cap.tz)
                return _cap_json(parsed.owner, cap, window, self.currency)
        return None

    def agent_budgets(self, agent_id: str) -> dict[str, Any]:
        agent = self.agent(agent_id)
        now = self.clock()
        out: list[dict[str, Any]] = []
        wallet = self.store.read(lambda tx: ops.budget_row(tx, f"{agent_id}/total"))
        if wallet is not None:
            out.append(budget_json(wallet))
        owners: list[tuple[str, pol.Policy]] = []
        if agent.policy is not None:
            owners.append((agent.id, agent.policy))
        owners += [(p.name, p.policy) for p in self.principal_chain(agent.parent) if p.policy is not None]
        for owner, policy in owners:
            for cap in policy.caps:
                if cap.period == "session":
                    continue
                window = windows.window_for(cap.period, now, cap.tz)
                bid = windows.budget_id(owner, cap.scope, cap.period, window.key)
                row = self.store.read(lambda tx, b=bid: ops.budget_row(tx, b))  # type: ignore[misc]
                out.append(
                    budget_json(row) if row is not None else _cap_json(owner, cap, window, self.currency)
                )
        return {"agent": agent_id, "budgets": out}

    def ledger(
        self,
        *,
        agent: str | None = None,
        connector: str | None = None,
        since: str | None = None,
        until: str | None = None,
        limit: int = 1000,
    ) -> list[dict[str, Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        for column, value in (("agent_id", agent), ("connector", connector)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if since is not None:
            clauses.append("time >= ?")
            params.append(since)
        if until is not None:
            clauses.append("time < ?")
            params.append(until)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        params.append(limit)
        rows = self.store.read(
            lambda tx: tx.all(f"SELECT * FROM ledger{where} ORDER BY time, id LIMIT ?", params)
        )
        return [ledger_json(r) for r in rows]

    def events(self, after_seq: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        return list(self.store.events(after_seq, limit))

    def verify_audit(self, against: str | None = None) -> VerifyResult:
        """Verify each audit chain against its own signed head (one chain on SQLite, one per
        writer on PostgreSQL), and against the heads exported to ``against`` when given. Safe
        beside live writers: the sink is read first (so no exported head is newer than the
        heads read next), each chain is read up to its head, and the events past the heads are
        counted in one snapshot by the store."""
        sink_heads: list[Head] = []
        if against is not None:
            with open(against, encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        obj = json.loads(line)
                        sink_heads.append(
                            Head(
                                int(obj["seq"]),
                                str(obj["hash"]),
                                str(obj["sig"]),
                                str(obj.get("chain", MAIN_CHAIN)),
                            )
                        )
        heads = self.store.chain_heads()
        chains: list[tuple[str, Head | None, Iterator[dict[str, Any]]]] = [
            (h.chain, h, self.store.events(chain=h.chain, limit=h.seq)) for h in heads
        ] or [(MAIN_CHAIN, None, iter(()))]
        return verify_chains(
            chains, [self.public_key], sink_heads=sink_heads, unsealed=self.store.unsealed_events()
        )


# ---------------------------------------------------------------- helpers


def check_principal_name(name: Any) -> str:
    if (
        not isinstance(name, str)
        or not name
        or "/" in name
        or name.startswith(("ag_", "task_"))
        or len(name) > 200
        or any(c.isspace() for c in name)
    ):
        raise InvalidRequest(
            "a principal name is a non-empty string without '/' or spaces"
            " that does not start with ag_ or task_"
        )
    return name


def _cap_specs(
    owner: str, policy: pol.Policy, connector: str, category: str | None, session: str | None, now: datetime
) -> list[BudgetSpec]:
    specs = []
    for cap in pol.matching_caps(policy, connector, category, session is not None):
        window = windows.window_for(cap.period, now, cap.tz, session if cap.period == "session" else None)
        specs.append(
            BudgetSpec(
                id=windows.budget_id(owner, cap.scope, cap.period, window.key),
                kind="cap",
                owner=owner,
                scope=cap.scope,
                period=cap.period,
                window=window.key,
                mode=cap.mode,
                limit=cap.limit,
                tz=cap.tz,
                window_start=iso_time(window.start) if window.start else None,
                window_end=iso_time(window.end) if window.end else None,
                thresholds=tuple(policy.alert_thresholds),
            )
        )
    return specs


def _cap_json(owner: str, cap: pol.Cap, window: windows.Window, currency: str) -> dict[str, Any]:
    return {
        "id": windows.budget_id(owner, cap.scope, cap.period, window.key),
        "kind": "cap",
        "owner": owner,
        "scope": cap.scope,
        "limit": format_nanos(cap.limit),
        "spent": "0.00",
        "reserved": "0.00",
        "remaining": format_nanos(cap.limit),
        "used": "0.00",
        "currency": currency,
        "period": cap.period,
        "mode": cap.mode,
        "tz": cap.tz,
        "window_start": iso_time(window.start) if window.start else None,
        "window_end": iso_time(window.end) if window.end else None,
    }


def budget_json(row: Row) -> dict[str, Any]:
    limit, spent, reserved = int(row["limit_n"]), int(row["spent_n"]), int(row["reserved_n"])
    return {
        "id": row["id"],
        "kind": row["kind"],
        "owner": row["owner"],
        "scope": row["scope"],
        "limit": format_nanos(limit),
        "spent": format_nanos(spent),
        "reserved": format_nanos(reserved),
        "remaining": format_nanos(limit - spent - reserved),
        "used": ops.used_text(row),
        "currency": row["currency"],
        "period": row["period"],
        "mode": row["mode"],
        "tz": row["tz"],
        "window_start": row["window_start"],
        "window_end": row["window_end"],
    }


def reservation_json(row: Row) -> dict[str, Any]:
    return {
        "reservation_id": row["id"],
        "status": row["status"],
        "decision": row["decision"],
        "agent_id": row["agent_id"],
        "principal": row["principal"],
        "connector": row["connector"],
        "category": row["category"],
        "amount": format_nanos(int(row["amount_n"])),
        "charged": format_nanos(int(row["charged_n"])) if row["charged_n"] is not None else None,
        "currency": row["currency"],
        "estimated": bool(row["estimated"]),
        "overrun": bool(row["overrun"]),
        "budgets": [b[0] for b in json.loads(row["budgets"])],
        "session": row["session"],
        "task": row["task"],
        "input_hash": row["input_hash"],
        "created_at": row["created_at"],
        "expires_at": row["expires_at"],
        "settled_at": row["settled_at"],
        "ledger_entry_id": row["ledger_entry_id"],
        "metadata": json.loads(row["metadata"]),
    }


def ledger_json(row: Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "kind": row["kind"],
        "time": row["time"],
        "agent_id": row["agent_id"],
        "principal": row["principal"],
        "connector": row["connector"],
        "category": row["category"],
        "input_hash": row["input_hash"],
        "quantity": row["quantity"],
        "unit": row["unit"],
        "unit_cost": row["unit_cost"],
        "total": format_nanos(int(row["total_n"])),
        "currency": row["currency"],
        "reservation_id": row["reservation_id"],
        "refund_of": row["refund_of"],
        "refunded": format_nanos(int(row["refunded_n"])),
        "task": row["task"],
        "session": row["session"],
        "budgets": json.loads(row["budgets"]),
        "estimated": bool(row["estimated"]),
        "overrun": bool(row["overrun"]),
        "reason": row["reason"],
    }


def _load_agent(tx: Tx, agent_id: str) -> AgentRecord | None:
    row = tx.one("SELECT * FROM agents WHERE id = ?", (agent_id,))
    if row is None:
        return None
    policy_json = None
    if int(row["policy_version"]) > 0:
        prow = tx.one(
            "SELECT policy FROM policies WHERE owner = ? AND version = ?",
            (agent_id, int(row["policy_version"])),
        )
        policy_json = json.loads(prow["policy"]) if prow else None
    return AgentRecord(
        id=row["id"],
        name=row["name"],
        public_key=row["public_key"],
        status=row["status"],
        parent=row["parent"],
        metadata=json.loads(row["metadata"]),
        policy=pol.parse_policy(policy_json) if policy_json else None,
        policy_json=policy_json,
        policy_version=int(row["policy_version"]),
        state_version=int(row["state_version"]),
        created_at=row["created_at"],
        key=tokens.load_public_key(row["public_key"]),
    )


def _load_principal(tx: Tx, name: str) -> PrincipalRecord | None:
    row = tx.one("SELECT * FROM principals WHERE name = ?", (name,))
    if row is None:
        return None
    policy = None
    if int(row["policy_version"]) > 0:
        prow = tx.one(
            "SELECT policy FROM policies WHERE owner = ? AND version = ?", (name, int(row["policy_version"]))
        )
        policy = pol.parse_policy(json.loads(prow["policy"])) if prow else None
    return PrincipalRecord(
        name=name, parent=row["parent"], policy=policy, policy_version=int(row["policy_version"])
    )


def _load_task_chain(tx: Tx, task_id: str) -> list[tuple[str, list[str]]]:
    chain: list[tuple[str, list[str]]] = []
    cursor: str | None = task_id
    seen: set[str] = set()
    while cursor is not None and cursor not in seen:
        seen.add(cursor)
        row = tx.one("SELECT id, parent_task, agents FROM tasks WHERE id = ?", (cursor,))
        if row is None:
            break
        chain.append((str(row["id"]), list(json.loads(row["agents"]))))
        cursor = row["parent_task"]
    return chain
