"""The Authority API (PROTOCOL.md, "Authority API"): reserve, commit, release, refund,
and the queries of reservations, budgets and tasks.

Each handler runs on a worker thread (see :mod:`paymaster.server.context`) and returns
``(status, json)``; a refusal is a raised ``SpendDenied``.
"""

from __future__ import annotations

from typing import Any, NoReturn

from starlette.datastructures import Headers
from starlette.routing import Route

from paymaster.authority import Authority, Caller, ReserveRequest, body_hash, check_principal_name
from paymaster.core.budgets import check_id, parse_budget_id
from paymaster.errors import InvalidRequest, NotFound, SpendDenied, SpendTokenInvalid
from paymaster.server import body as b
from paymaster.server.auth import authenticate, refuse_after_token, require_admin, spend_token
from paymaster.server.context import Incoming, endpoint

IDEMPOTENCY_HEADER = "x-paymaster-idempotency-key"
SESSION_HEADER = "x-paymaster-session"
TASK_HEADER = "x-paymaster-task"
MAX_KEY = 256

RESERVE_FIELDS = (
    "agent_id",
    "principal",
    "connector",
    "amount",
    "usage_estimate",
    "session",
    "task",
    "ttl_seconds",
    "input_hash",
    "idempotency_key",
    "metadata",
)


def idempotency_key(body: dict[str, Any], headers: Headers, *, required: bool) -> str | None:
    """From the body, else the ``x-paymaster-idempotency-key`` header; both must agree."""
    in_body = b.text(body, "idempotency_key", max_len=MAX_KEY)
    in_header = headers.get(IDEMPOTENCY_HEADER)
    if in_header is not None and not 0 < len(in_header) <= MAX_KEY:
        raise InvalidRequest(f"{IDEMPOTENCY_HEADER} must be 1 to {MAX_KEY} characters")
    if in_body is not None and in_header is not None and in_body != in_header:
        raise InvalidRequest(f"idempotency_key and {IDEMPOTENCY_HEADER} differ")
    key = in_body if in_body is not None else in_header
    if key is None and required:
        raise InvalidRequest(f"idempotency_key (or the {IDEMPOTENCY_HEADER} header) is required")
    return key


def _agreed(name: str, in_body: str | None, in_header: str | None, in_token: str | None) -> str | None:
    """A session or task named by body, header and token: the ones present must agree, and
    the token's applies when the request names none."""
    if in_body is not None and in_header is not None and in_body != in_header:
        raise InvalidRequest(f"{name} in the body and x-paymaster-{name} differ")
    named = in_body if in_body is not None else in_header
    if in_token is not None and named is not None and in_token != named:
        raise SpendTokenInvalid(f"the spend token is bound to another {name}")
    value = named if named is not None else in_token
    return None if value is None else check_id(value, name)


def parse_reserve(
    authority: Authority, body: dict[str, Any], headers: Headers, caller: Caller
) -> ReserveRequest:
    b.check_fields(body, RESERVE_FIELDS, required=("connector",))
    agent_id = b.text(body, "agent_id", max_len=MAX_KEY)
    principal = b.text(body, "principal", max_len=MAX_KEY)
    if caller.kind == "agent":
        if agent_id is not None and agent_id != caller.agent_id:
            raise SpendTokenInvalid("agent_id does not match the spend token's agent")
        if principal is not None:
            raise InvalidRequest("principal is for service keys; an agent charges its own budgets")
        agent_id = caller.agent_id
    elif (agent_id is None) == (principal is None):
        raise InvalidRequest("a service key names exactly one of agent_id or principal")
    elif principal is not None:
        check_principal_name(principal)
    claims = caller.claims
    session = _agreed(
        "session", b.ident(body, "session"), headers.get(SESSION_HEADER), claims.session if claims else None
    )
    task = _agreed("task", b.ident(body, "task"), headers.get(TASK_HEADER), claims.task if claims else None)
    ttl_max = authority.settings.reservation_ttl_max
    return ReserveRequest(
        connector=check_id(body["connector"], "connector"),
        idempotency_key=idempotency_key(body, headers, required=True),
        agent_id=agent_id,
        principal=principal,
        amount=b.money(body, "amount"),
        usage_estimate=b.usage_object(body, "usage_estimate", actual=False),
        session=session,
        task=task,
        ttl_seconds=b.integer(body, "ttl_seconds", low=1, high=ttl_max),
        input_hash=b.text(body, "input_hash", max_len=MAX_KEY),
        metadata=b.obj(body, "metadata") or {},
        body_hash=body_hash(body),
    )


def reserve(authority: Authority, req: Incoming) -> tuple[int, Any]:
    caller = authenticate(authority, req.headers, method=req.method, url=req.url, agent=True, service=True)
    try:
        parsed = parse_reserve(authority, b.parse_object(req.raw), req.headers, caller)
    except SpendDenied as denial:
        refuse_after_token(authority, caller, denial)
    # the store spends the token's jti in the reserve's own transaction
    return 201, authority.reserve(parsed, caller)


def _settler(authority: Authority, req: Incoming) -> Caller:
    """Commit, release and reads of a reservation: its agent's token, a service key over
    its principal, or the admin key. The token is spent before anything else happens."""
    return spend_token(authority, _settling_caller(authority, req))


def _settling_caller(authority: Authority, req: Incoming) -> Caller:
    """The same, with the token's ``jti`` still to spend: commit and release spend it in
    their own transaction (one write fewer per call), or :func:`_spent_then` on a refusal."""
    return authenticate(
        authority, req.headers, method=req.method, url=req.url, agent=True, service=True, admin=True
    )


def _spent_then(authority: Authority, caller: Caller, denial: SpendDenied) -> NoReturn:
    """A refusal before the verb ran: the token is spent all the same (step 1)."""
    spend_token(authority, caller)
    raise denial


def _usage_quantity(usage: dict[str, Any] | None) -> tuple[str | None, str | None]:
    if usage is None:
        return None, None
    if "units" in usage:
        return str(usage["units"]), str(usage.get("unit") or "unit")
    tokens = int(usage.get("input_tokens") or 0) + int(usage.get("output_tokens") or 0)
    return str(tokens), "tokens"


def _usage_cost(authority: Authority, reservation_id: str, usage: dict[str, Any]) -> int | None:
    """What reported usage costs on the reservation's connector; None when it cannot be
    priced (then the hold is charged, flagged ``estimated``)."""
    if authority.pricer is None:
        return None
    connector = authority.settings.connector(authority.query_reservation(reservation_id)["connector"])
    cost: int | None = authority.pricer.actual_cost(connector, usage, now=authority.clock())
    return cost


def commit(authority: Authority, req: Incoming) -> tuple[int, Any]:
    caller = _settling_caller(authority, req)
    reservation_id = req.param("id")
    try:
        body = b.parse_object(req.raw)
        b.check_fields(body, ("amount", "usage", "idempotency_key"))
        amount = b.money(body, "amount")
        usage = b.usage_object(body, "usage", actual=True)
        key = idempotency_key(body, req.headers, required=True)
        quantity, unit = _usage_quantity(usage)
        estimated = False
        if amount is None and usage is not None:
            if caller.kind != "admin":
                authority.check_reservation_access(reservation_id, caller)
            amount = _usage_cost(authority, reservation_id, usage)
            estimated = amount is None
    except SpendDenied as denial:
        _spent_then(authority, caller, denial)
    # the token's jti is spent in the commit's own transaction
    return 200, authority.commit(
        reservation_id,
        amount=amount,
        caller=caller,
        idempotency_key=key,
        body=body,
        estimated=estimated,
        quantity=quantity,
        unit=unit,
    )


def release(authority: Authority, req: Incoming) -> tuple[int, Any]:
    caller = _settling_caller(authority, req)
    try:
        body = b.parse_object(req.raw, allow_empty=True)
        b.check_fields(body, ("reason",))
        reason = b.text(body, "reason")
    except SpendDenied as denial:
        _spent_then(authority, caller, denial)
    # the token's jti is spent in the release's own transaction
    return 200, authority.release(req.param("id"), caller=caller, reason=reason)


def get_reservation(authority: Authority, req: Incoming) -> tuple[int, Any]:
    caller = _settler(authority, req)
    reservation_id = req.param("id")
    if caller.kind != "admin":
        # the rule commit and release apply: someone else's reservation does not exist
        authority.check_reservation_access(reservation_id, caller)
    return 200, authority.query_reservation(reservation_id)


def refund(authority: Authority, req: Incoming) -> tuple[int, Any]:
    require_admin(authority, req.headers)
    body = b.parse_object(req.raw)
    b.check_fields(
        body,
        ("ledger_entry_id", "amount", "reason", "idempotency_key"),
        required=("ledger_entry_id", "amount", "reason"),
    )
    entry = b.text(body, "ledger_entry_id", max_len=MAX_KEY)
    amount = b.money(body, "amount", allow_zero=False)
    reason = b.text(body, "reason")
    assert entry is not None
    assert amount is not None
    assert reason is not None
    key = idempotency_key(body, req.headers, required=True)
    return 201, authority.refund(entry, amount, reason, key, body=body)


def _reader(authority: Authority, req: Incoming) -> Caller:
    """Budget reads: the admin, or an agent (with a spend token) for its own budgets."""
    caller = authenticate(authority, req.headers, method=req.method, url=req.url, agent=True, admin=True)
    return spend_token(authority, caller)


def _owned(caller: Caller, owner: str) -> None:
    if caller.kind == "agent" and caller.agent_id != owner:
        raise NotFound("no such budget")  # someone else's budgets do not exist for an agent


def get_budget(authority: Authority, req: Incoming) -> tuple[int, Any]:
    caller = _reader(authority, req)
    budget_id = req.param("id")
    _owned(caller, parse_budget_id(budget_id).owner)
    return 200, authority.budget(budget_id)


def agent_budgets(authority: Authority, req: Incoming) -> tuple[int, Any]:
    caller = _reader(authority, req)
    agent_id = req.param("id")
    _owned(caller, agent_id)
    return 200, authority.agent_budgets(agent_id)


def create_task(authority: Authority, req: Incoming) -> tuple[int, Any]:
    caller = authenticate(authority, req.headers, method=req.method, url=req.url, agent=True, admin=True)
    caller = spend_token(authority, caller)
    body = b.parse_object(req.raw)
    b.check_fields(body, ("limit", "parent_task", "agents"), required=("limit",))
    return 201, authority.create_task(body, caller)


def routes() -> list[Route]:
    return [
        Route("/v1/reservations", endpoint(reserve, body=True, timed=True), methods=["POST"]),
        Route("/v1/reservations/{id}", endpoint(get_reservation), methods=["GET"]),
        Route("/v1/reservations/{id}/commit", endpoint(commit, body=True), methods=["POST"]),
        Route("/v1/reservations/{id}/release", endpoint(release, body=True), methods=["POST"]),
        Route("/v1/refunds", endpoint(refund, body=True), methods=["POST"]),
        Route("/v1/budgets/{id:path}", endpoint(get_budget), methods=["GET"]),
        Route("/v1/agents/{id}/budgets", endpoint(agent_budgets), methods=["GET"]),
        Route("/v1/tasks", endpoint(create_task, body=True), methods=["POST"]),
    ]
