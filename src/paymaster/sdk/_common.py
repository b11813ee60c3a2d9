"""The I/O-free half of :class:`~paymaster.Client` and :class:`~paymaster.AsyncClient`.

Every API call is described once, here, as a :class:`Call`: method, path, JSON body,
query, who signs it, whether it may be sent again, and how its answer is parsed. The sync
and async clients only send a ``Call`` (with a fresh spend token per attempt) and hand the
answer back to :func:`finish`; the reserve context managers share :class:`HoldState`.
So the protocol logic is written once and the two clients cannot drift apart.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final, Generic, Literal, TypeVar
from urllib.parse import quote

import httpx

from paymaster.errors import (
    AuthorityUnavailable,
    ReservationSettled,
    SpendDenied,
    error_from_body,
)
from paymaster.sdk.keys import AgentKey
from paymaster.sdk.models import (
    Agent,
    AmountLike,
    AuditVerification,
    Budget,
    Commit,
    LedgerEntry,
    Principal,
    ProtocolError,
    Refund,
    Release,
    Reservation,
    Task,
    format_amount,
)

T = TypeVar("T")
S = TypeVar("S", Commit, Release)

AUTHORITY_AUDIENCE: Final = "paymaster"
DEFAULT_TIMEOUT: Final = 10.0
DEFAULT_MAX_RETRIES: Final = 2
DEFAULT_RETRY_BACKOFF: Final = 0.2
DEFAULT_TOKEN_TTL: Final = 60

AGENT_HEADER: Final = "x-paymaster-agent-id"
TOKEN_HEADER: Final = "x-paymaster-spend-token"  # noqa: S105 - a header name, not a secret
SESSION_HEADER: Final = "x-paymaster-session"
TASK_HEADER: Final = "x-paymaster-task"
IDEMPOTENCY_HEADER: Final = "x-paymaster-idempotency-key"

# Errors after which the request certainly never reached the server: always safe to resend.
_UNSENT_ERRORS: Final = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
_GATEWAY_STATUSES: Final = frozenset({502, 503, 504})


class _Unset:
    """Marks an argument that was not given (``None`` may mean "clear it")."""

    _instance: _Unset | None = None

    def __new__(cls) -> _Unset:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNSET"

    def __bool__(self) -> bool:
        return False


UNSET: Final = _Unset()


@functools.cache
def user_agent() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"paymaster-python/{version('paymaster')}"
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "paymaster-python"


def new_idempotency_key() -> str:
    return str(uuid.uuid4())


# Who signs a call


@dataclass(frozen=True)
class Auth:
    """How a call authenticates: ``agent`` (a fresh spend token per attempt), ``admin``
    (the admin key, else the service key) or ``bearer`` (the service key, else the admin key)."""

    kind: Literal["agent", "admin", "bearer"]
    agent_id: str | None = None
    key: AgentKey | None = field(default=None, repr=False)
    session: str | None = None
    task: str | None = None


ADMIN: Final = Auth("admin")


def agent_or_bearer(
    agent_id: str | None,
    key: AgentKey | None,
    *,
    session: str | None = None,
    task: str | None = None,
    otherwise: Literal["bearer", "admin"] = "bearer",
) -> Auth:
    """The agent's own spend token when it gave its key, else the client's service key
    (``otherwise="bearer"``, falling back to the admin key) or admin key."""
    if key is None:
        return Auth(otherwise)
    if not agent_id:
        raise ValueError("an agent key needs the agent's id (agent_id=...) to sign with")
    if not isinstance(key, AgentKey):
        raise TypeError(f"key must be a paymaster.AgentKey, not {type(key).__name__}")
    return Auth("agent", agent_id=agent_id, key=key, session=session, task=task)


@dataclass(frozen=True)
class Credentials:
    admin_key: str | None = field(default=None, repr=False)
    service_key: str | None = field(default=None, repr=False)
    token_ttl: int = DEFAULT_TOKEN_TTL
    max_retries: int = DEFAULT_MAX_RETRIES
    retry_backoff: float = DEFAULT_RETRY_BACKOFF

    def headers(self, auth: Auth) -> dict[str, str]:
        """The authentication headers for one attempt: a spend token is never reused."""
        if auth.kind == "agent":
            assert auth.key is not None
            assert auth.agent_id is not None
            token = auth.key.sign(
                agent_id=auth.agent_id,
                aud=AUTHORITY_AUDIENCE,
                ttl_seconds=self.token_ttl,
                task=auth.task,
                session=auth.session,
            )
            return {AGENT_HEADER: auth.agent_id, TOKEN_HEADER: token}
        if auth.kind == "admin":
            bearer = self.admin_key or self.service_key
        else:
            bearer = self.service_key or self.admin_key
        return {"authorization": f"Bearer {bearer}"} if bearer else {}


# One API call, described


@dataclass(frozen=True)
class Call(Generic[T]):
    method: str
    path: str
    parse: Callable[[int, Any], T]
    auth: Auth = ADMIN
    json: Any = None
    params: Mapping[str, str] | None = None
    # May be sent again after it possibly reached the server (GETs, calls carrying an
    # idempotency key, naturally idempotent verbs). Anything may be resent after a
    # connection failure that happened before the request left.
    replay_safe: bool = False
    # Non-2xx statuses whose body is an answer, not a denial (the audit check's 409).
    answer_statuses: frozenset[int] = frozenset()

    def request_kwargs(self, credentials: Credentials) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"headers": credentials.headers(self.auth)}
        if self.json is not None:
            kwargs["json"] = self.json
        if self.params:
            kwargs["params"] = dict(self.params)
        return kwargs


def retry_delay(
    call: Call[Any], error: httpx.TransportError, attempt: int, credentials: Credentials
) -> float | None:
    """Seconds to wait before sending ``call`` again after ``error``, or ``None`` to give up."""
    if attempt >= credentials.max_retries:
        return None
    if not isinstance(error, _UNSENT_ERRORS) and not call.replay_safe:
        return None
    return float(credentials.retry_backoff * (2**attempt))


def unavailable(base_url: httpx.URL, error: httpx.TransportError) -> AuthorityUnavailable:
    return AuthorityUnavailable(
        f"the authority at {base_url} did not answer: {type(error).__name__}: {error}"
    )


def _is_error_body(body: Any) -> bool:
    return isinstance(body, dict) and isinstance(body.get("error"), dict) and "code" in body["error"]


_NOT_JSON: Final = object()


def _decode(content: bytes) -> Any:
    if not content:
        return None
    try:
        return json.loads(content)
    except ValueError:
        return _NOT_JSON


def denial(status: int, body: Any) -> SpendDenied:
    """The exception for a non-2xx answer. A bare 502/503/504 from something in front of the
    authority (a load balancer) is the authority being unavailable."""
    if status in _GATEWAY_STATUSES and not _is_error_body(body):
        return AuthorityUnavailable(
            f"the authority answered {status} without a Paymaster error body", status=status
        )
    return error_from_body(status, body if body is not _NOT_JSON else None)


def finish(call: Call[T], status: int, content: bytes) -> T:
    """Parse an answer, or raise its denial: no non-2xx answer is ever returned as a value."""
    body = _decode(content)
    if 200 <= status < 300 or (status in call.answer_statuses and not _is_error_body(body)):
        if body is _NOT_JSON:
            raise ProtocolError(f"{call.method} {call.path} answered {status} with a body that is not JSON")
        return call.parse(status, body)
    raise denial(status, body)


# Paths and parameters


def segment(value: str, *, name: str = "id", slashes: bool = False) -> str:
    """One path segment (or a budget id with its slashes), percent-encoded."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string")
    parts = value.split("/") if slashes else [value]
    if any(part in ("", ".", "..") for part in parts) or (not slashes and "/" in value):
        raise ValueError(f"{name} {value!r} is not a valid identifier")
    return "/".join(quote(part, safe=":@!$&'()*+,;=-._~") for part in parts)


def time_param(value: str | datetime) -> str:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("give an aware datetime (e.g. datetime.now(UTC)): a naive one has no time zone")
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return value


def _items(body: Any, *keys: str) -> list[Any]:
    """A list answer, bare or wrapped in an object under one of ``keys``."""
    if isinstance(body, list):
        return body
    if isinstance(body, dict):
        for key in keys:
            if isinstance(body.get(key), list):
                return list(body[key])
    raise ProtocolError(f"expected a list (or an object with {', '.join(keys)}), got {type(body).__name__}")


def _compact(**fields: Any) -> dict[str, Any]:
    return {name: value for name, value in fields.items() if value is not None}


def _one(parser: Callable[[Any], T]) -> Callable[[int, Any], T]:
    return lambda _status, body: parser(body)


def _many(parser: Callable[[Any], T], *keys: str) -> Callable[[int, Any], list[T]]:
    return lambda _status, body: [parser(item) for item in _items(body, *keys)]


# The calls: admin API


def create_agent(
    name: str,
    public_key: str | AgentKey,
    policy: Mapping[str, Any] | None,
    parent: str | None,
    metadata: Mapping[str, Any] | None,
) -> Call[Agent]:
    key_text = public_key.public_key if isinstance(public_key, AgentKey) else public_key
    body = _compact(name=name, public_key=key_text, policy=policy, parent=parent, metadata=metadata)
    return Call("POST", "/v1/agents", _one(Agent.from_json), json=body)


def list_agents() -> Call[list[Agent]]:
    return Call("GET", "/v1/agents", _many(Agent.from_json, "agents"), replay_safe=True)


def get_agent(agent_id: str) -> Call[Agent]:
    return Call("GET", f"/v1/agents/{segment(agent_id)}", _one(Agent.from_json), replay_safe=True)


def set_policy(agent_id: str, policy: Mapping[str, Any]) -> Call[Agent]:
    return Call("PUT", f"/v1/agents/{segment(agent_id)}/policy", _one(Agent.from_json), json=dict(policy))


def fund(agent_id: str, amount: AmountLike, idempotency_key: str | None) -> Call[Budget]:
    body = {"amount": format_amount(amount), "idempotency_key": idempotency_key or new_idempotency_key()}
    return Call(
        "POST", f"/v1/agents/{segment(agent_id)}/fund", _one(Budget.from_json), json=body, replay_safe=True
    )


def set_status(agent_id: str, action: Literal["freeze", "unfreeze", "revoke"]) -> Call[Agent]:
    return Call(
        "POST", f"/v1/agents/{segment(agent_id)}/{action}", _one(Agent.from_json), json={}, replay_safe=True
    )


def agent_budgets(agent_id: str, auth: Auth) -> Call[list[Budget]]:
    path = f"/v1/agents/{segment(agent_id)}/budgets"
    return Call("GET", path, _many(Budget.from_json, "budgets"), auth=auth, replay_safe=True)


def get_budget(budget_id: str, auth: Auth) -> Call[Budget]:
    path = f"/v1/budgets/{segment(budget_id, name='budget_id', slashes=True)}"
    return Call("GET", path, _one(Budget.from_json), auth=auth, replay_safe=True)


def create_budget(
    owner: str, limit: AmountLike, *, period: str, scope: str | None, mode: str | None, tz: str | None
) -> Call[Budget]:
    """A cap on an owner's policy (a new policy version), answered as its current window."""
    limit_text = format_amount(limit, field_name="limit")
    body = _compact(owner=owner, limit=limit_text, period=period, scope=scope, mode=mode, tz=tz)
    return Call("POST", "/v1/budgets", _one(Budget.from_json), json=body)


def put_principal(
    name: str, parent: str | _Unset | None, policy: Mapping[str, Any] | _Unset | None
) -> Call[Principal]:
    body: dict[str, Any] = {}
    if not isinstance(parent, _Unset):
        body["parent"] = parent
    if not isinstance(policy, _Unset):
        body["policy"] = None if policy is None else dict(policy)
    return Call(
        "PUT",
        f"/v1/principals/{segment(name, name='principal')}",
        lambda status, data: Principal.from_json(data, created=status == 201),
        json=body,
    )


def create_task(limit: AmountLike, agents: Sequence[str], parent_task: str | None, auth: Auth) -> Call[Task]:
    if isinstance(agents, str):
        raise TypeError("agents must be a list of agent ids, not one string")
    body = _compact(limit=format_amount(limit, field_name="limit"), parent_task=parent_task)
    body["agents"] = list(agents)
    return Call("POST", "/v1/tasks", _one(Task.from_json), auth=auth, json=body)


def ledger(
    agent: str | None, connector: str | None, since: str | datetime | None, until: str | datetime | None
) -> Call[list[LedgerEntry]]:
    params = _compact(
        agent=agent,
        connector=connector,
        since=None if since is None else time_param(since),
        until=None if until is None else time_param(until),
    )
    return Call(
        "GET",
        "/v1/ledger",
        _many(LedgerEntry.from_json, "entries", "ledger", "items"),
        params=params,
        replay_safe=True,
    )


def events(after_seq: int) -> Call[list[dict[str, Any]]]:
    def parse(_status: int, body: Any) -> list[dict[str, Any]]:
        return [dict(item) for item in _items(body, "events", "items")]

    return Call("GET", "/v1/events", parse, params={"after_seq": str(int(after_seq))}, replay_safe=True)


def audit_verify() -> Call[AuditVerification]:
    return Call(
        "GET",
        "/v1/audit/verify",
        _one(AuditVerification.from_json),
        replay_safe=True,
        answer_statuses=frozenset({409}),
    )


# The calls: the verbs


def reserve(
    agent_id: str | None,
    key: AgentKey | None,
    *,
    connector: str,
    amount: AmountLike | None,
    usage_estimate: Mapping[str, Any] | None,
    session: str | None,
    task: str | None,
    ttl_seconds: int | None,
    input_hash: str | None,
    idempotency_key: str | None,
    metadata: Mapping[str, Any] | None,
    principal: str | None,
) -> Call[Reservation]:
    """A reserve; its idempotency key is fixed here, so every retry of it carries the same one."""
    if not isinstance(connector, str) or not connector:
        raise ValueError("connector must be a non-empty string")
    if agent_id is None and principal is None:
        raise ValueError("name whom to charge: agent_id (or, with a service key, principal)")
    body = _compact(
        agent_id=agent_id,
        principal=principal,
        connector=connector,
        amount=None if amount is None else format_amount(amount),
        usage_estimate=None if usage_estimate is None else dict(usage_estimate),
        session=session,
        task=task,
        ttl_seconds=ttl_seconds,
        input_hash=input_hash,
        metadata=None if metadata is None else dict(metadata),
    )
    body["idempotency_key"] = idempotency_key or new_idempotency_key()
    auth = agent_or_bearer(agent_id, key, session=session, task=task)
    return Call(
        "POST", "/v1/reservations", _one(Reservation.from_json), auth=auth, json=body, replay_safe=True
    )


def commit(
    reservation_id: str,
    amount: AmountLike | None,
    usage: Mapping[str, Any] | None,
    idempotency_key: str | None,
    auth: Auth,
) -> Call[Commit]:
    body = _compact(
        amount=None if amount is None else format_amount(amount),
        usage=None if usage is None else dict(usage),
    )
    body["idempotency_key"] = idempotency_key or new_idempotency_key()
    path = f"/v1/reservations/{segment(reservation_id, name='reservation_id')}/commit"
    return Call("POST", path, _one(Commit.from_json), auth=auth, json=body, replay_safe=True)


def release(reservation_id: str, reason: str | None, auth: Auth) -> Call[Release]:
    # Releasing a released hold answers the same again: safe to resend.
    path = f"/v1/reservations/{segment(reservation_id, name='reservation_id')}/release"
    return Call(
        "POST", path, _one(Release.from_json), auth=auth, json=_compact(reason=reason), replay_safe=True
    )


def refund(
    ledger_entry_id: str, amount: AmountLike, reason: str, idempotency_key: str | None
) -> Call[Refund]:
    body = {
        "ledger_entry_id": ledger_entry_id,
        "amount": format_amount(amount),
        "reason": reason,
        "idempotency_key": idempotency_key or new_idempotency_key(),
    }
    return Call("POST", "/v1/refunds", _one(Refund.from_json), json=body, replay_safe=True)


def get_reservation(reservation_id: str, auth: Auth) -> Call[Reservation]:
    path = f"/v1/reservations/{segment(reservation_id, name='reservation_id')}"
    return Call("GET", path, _one(Reservation.from_json), auth=auth, replay_safe=True)


# The reserve context manager's state, shared by Hold and AsyncHold


class HoldState:
    """What a hold knows and decides; the sync and async holds only do the I/O.

    A hold commits or releases at most once. A settle that fails because the authority
    could not be reached does not count (a retry, or the exit, sends it again with the same
    idempotency key); a settle the authority refused does.
    """

    def __init__(self, reserve_call: Call[Reservation], agent_id: str | None, key: AgentKey | None) -> None:
        self._reserve_call = reserve_call
        self._settle_auth = agent_or_bearer(agent_id, key)
        self._reservation: Reservation | None = None
        self._commit: Commit | None = None
        self._release: Release | None = None
        self._refused: SpendDenied | None = None
        self._commit_key = new_idempotency_key()

    @property
    def reservation(self) -> Reservation:
        """The reserve's answer (``decision``, ``expires_at``, ``budgets``, ``warnings``)."""
        if self._reservation is None:
            raise RuntimeError("the hold is not reserved yet: use it as a context manager")
        return self._reservation

    @property
    def reservation_id(self) -> str:
        return self.reservation.reservation_id

    @property
    def amount(self) -> Decimal:
        """The amount held (what a plain exit commits)."""
        return self.reservation.amount

    @property
    def committed(self) -> Commit | None:
        return self._commit

    @property
    def released(self) -> Release | None:
        return self._release

    @property
    def settled(self) -> bool:
        return self._commit is not None or self._release is not None or self._refused is not None

    def _check_open(self) -> str:
        reservation_id = self.reservation_id
        if self._commit is not None:
            raise ReservationSettled(f"reservation {reservation_id} is already committed", status=409)
        if self._release is not None:
            raise ReservationSettled(f"reservation {reservation_id} is already released", status=409)
        if self._refused is not None:
            raise ReservationSettled(
                f"reservation {reservation_id} could not be settled: {self._refused.code}", status=409
            )
        return reservation_id

    def _commit_call(self, actual: AmountLike | None, usage: Mapping[str, Any] | None) -> Call[Commit]:
        reservation_id = self._check_open()
        amount: AmountLike | None = actual
        if actual is None and usage is None:
            amount = self.reservation.raw.get("amount") or self.amount
        return commit(reservation_id, amount, usage, self._commit_key, self._settle_auth)

    def _release_call(self, reason: str | None) -> Call[Release]:
        return release(self._check_open(), reason, self._settle_auth)

    def _settle_failed(self, error: BaseException) -> None:
        if isinstance(error, SpendDenied) and not isinstance(error, AuthorityUnavailable):
            self._refused = error

    @property
    def _open_on_exit(self) -> bool:
        return self._reservation is not None and not self.settled

    @staticmethod
    def _release_reason(error: BaseException) -> str:
        return f"exception: {type(error).__name__}"

    def _record(self, result: Commit | Release) -> None:
        if isinstance(result, Commit):
            self._commit = result
        else:
            self._release = result

    @staticmethod
    def _note_release_failure(error: BaseException, failure: BaseException) -> None:
        error.add_note(
            f"paymaster: releasing the hold failed too ({type(failure).__name__}: {failure}); "
            "it is released when it expires"
        )

    def __repr__(self) -> str:
        if self._reservation is None:
            return f"<{type(self).__name__} not reserved>"
        state = "committed" if self._commit else "released" if self._release else "held"
        return (
            f"<{type(self).__name__} {self._reservation.reservation_id} {self._reservation.amount} {state}>"
        )
