"""The Admin API (PROTOCOL.md, "Admin API"): agents, policies, funding, principals, caps,
the ledger, the audit events and their verification. Every route needs the admin key."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from starlette.datastructures import QueryParams
from starlette.routing import Route

from paymaster.authority import Authority, check_principal_name
from paymaster.core import policy as pol
from paymaster.core.audit import iso_time
from paymaster.core.budgets import check_period, check_scope, check_tz
from paymaster.errors import InvalidRequest
from paymaster.money import format_nanos
from paymaster.server import body as b
from paymaster.server.auth import require_admin
from paymaster.server.context import Handler, Incoming, endpoint
from paymaster.server.routes_authority import idempotency_key

MAX_PAGE = 10_000
_UINT_RE = re.compile(r"[0-9]{1,15}")


# ---------------------------------------------------------------- query parameters


def query_int(query: QueryParams, name: str, *, default: int, low: int, high: int) -> int:
    value = query.get(name)
    if value is None or value == "":
        return default
    if not _UINT_RE.fullmatch(value) or not low <= int(value) <= high:
        raise InvalidRequest(f"{name} must be an integer from {low} to {high}")
    return int(value)


def query_time(query: QueryParams, name: str) -> str | None:
    """An RFC 3339 time (or a date), as the store's UTC text; a time without an offset is UTC."""
    value = query.get(name)
    if value is None or value == "":
        return None
    try:
        at = datetime.fromisoformat(value)
        if at.tzinfo is None:
            at = at.replace(tzinfo=UTC)
        return iso_time(at.astimezone(UTC))
    except (ValueError, OverflowError):
        raise InvalidRequest(f"{name} must be an RFC 3339 time such as 2026-11-24T00:00:00Z") from None


def query_text(query: QueryParams, name: str) -> str | None:
    value = query.get(name)
    if value is not None and len(value) > b.MAX_TEXT:
        raise InvalidRequest(f"{name} is longer than {b.MAX_TEXT} characters")
    return value or None


# ---------------------------------------------------------------- agents


def create_agent(authority: Authority, req: Incoming) -> tuple[int, Any]:
    body = b.parse_object(req.raw)
    b.check_fields(
        body, ("name", "public_key", "policy", "parent", "metadata"), required=("name", "public_key")
    )
    name = b.text(body, "name", max_len=200)
    public_key = b.text(body, "public_key", max_len=64)
    assert name is not None
    assert public_key is not None
    return 201, authority.create_agent(
        name,
        public_key,
        policy=b.obj(body, "policy"),
        parent=b.text(body, "parent", max_len=200),
        metadata=b.obj(body, "metadata"),
    )


def list_agents(authority: Authority, req: Incoming) -> tuple[int, Any]:
    return 200, {"agents": authority.list_agents()}


def get_agent(authority: Authority, req: Incoming) -> tuple[int, Any]:
    return 200, authority.get_agent(req.param("id"))


def put_policy(authority: Authority, req: Incoming) -> tuple[int, Any]:
    # the body is the policy itself; parse_policy refuses unknown fields
    return 200, authority.set_agent_policy(req.param("id"), b.parse_object(req.raw))


def fund(authority: Authority, req: Incoming) -> tuple[int, Any]:
    body = b.parse_object(req.raw)
    b.check_fields(body, ("amount", "idempotency_key"), required=("amount",))
    amount = b.money(body, "amount", allow_zero=False)
    assert amount is not None
    key = idempotency_key(body, req.headers, required=False)
    return 200, authority.fund(req.param("id"), amount, key)


def status_change(status: str) -> Handler:
    def change(authority: Authority, req: Incoming) -> tuple[int, Any]:
        b.check_fields(b.parse_object(req.raw, allow_empty=True), ())
        return 200, authority.set_status(req.param("id"), status)

    change.__name__ = {"frozen": "freeze", "active": "unfreeze", "revoked": "revoke"}[status]
    return change


# ---------------------------------------------------------------- principals and caps


def put_principal(authority: Authority, req: Incoming) -> tuple[int, Any]:
    body = b.parse_object(req.raw, allow_empty=True)
    b.check_fields(body, ("parent", "policy"))
    return authority.put_principal(req.param("name"), body)


def _with_cap(policy: dict[str, Any], cap: dict[str, Any]) -> dict[str, Any]:
    """The policy with ``cap`` in place of the one on the same scope and period, or appended."""
    caps = [dict(c) for c in policy.get("caps") or []]
    for i, old in enumerate(caps):
        if old.get("scope", "all") == cap["scope"] and old.get("period") == cap["period"]:
            caps[i] = cap
            break
    else:
        caps.append(cap)
    return {**policy, "caps": caps}


def add_cap(authority: Authority, req: Incoming) -> tuple[int, Any]:
    """``POST /v1/budgets``: add or replace one cap on an owner's policy (a new policy
    version) and answer the budget in its current window."""
    body = b.parse_object(req.raw)
    b.check_fields(
        body, ("owner", "scope", "period", "limit", "mode", "tz"), required=("owner", "period", "limit")
    )
    owner = b.text(body, "owner", max_len=200)
    assert owner is not None
    scope = check_scope(body.get("scope") or "all")
    period = check_period(body["period"])
    limit = b.money(body, "limit")
    assert limit is not None
    mode = body.get("mode") or "enforce"
    if mode not in ("enforce", "shadow"):
        raise InvalidRequest('mode must be "enforce" or "shadow"')
    tz = b.text(body, "tz", max_len=64)
    if tz is not None:
        check_tz(tz)
    cap = {"scope": scope, "period": period, "limit": format_nanos(limit), "mode": mode, "tz": tz}
    if owner.startswith("ag_"):
        if scope == "all" and period == "total":
            raise InvalidRequest("an agent's {scope: all, period: total} cap is its wallet: use /fund")
        current = authority.get_agent(owner)["policy"] or {}
        authority.set_agent_policy(owner, _with_cap(current, cap))
    else:
        check_principal_name(owner)
        authority.invalidate(owner)
        record = authority.principal(owner)
        current = pol.policy_to_json(record.policy) if record and record.policy else {}
        authority.put_principal(owner, {"policy": _with_cap(current, cap)})
    head = owner if scope == "all" else f"{owner}/{scope}"
    if period != "session":
        return 201, authority.budget(f"{head}/{period}")
    # a session cap has one window per session and none is current: describe the cap
    return 201, {
        "id": f"{head}/session",
        "kind": "cap",
        "owner": owner,
        "scope": scope,
        "limit": format_nanos(limit),
        "spent": "0.00",
        "reserved": "0.00",
        "remaining": format_nanos(limit),
        "used": "0.00",
        "currency": authority.currency,
        "period": period,
        "mode": mode,
        "tz": None,
        "window_start": None,
        "window_end": None,
    }


# ---------------------------------------------------------------- ledger and audit


def ledger(authority: Authority, req: Incoming) -> tuple[int, Any]:
    q = req.query
    entries = authority.ledger(
        agent=query_text(q, "agent"),
        connector=query_text(q, "connector"),
        since=query_time(q, "since"),
        until=query_time(q, "until"),
        limit=query_int(q, "limit", default=1000, low=1, high=MAX_PAGE),
    )
    return 200, {"entries": entries}


def events(authority: Authority, req: Incoming) -> tuple[int, Any]:
    after = query_int(req.query, "after_seq", default=0, low=0, high=10**15)
    limit = query_int(req.query, "limit", default=1000, low=1, high=MAX_PAGE)
    page = authority.events(after, limit)
    return 200, {"events": page, "next_after_seq": after + len(page)}


def audit_verify(authority: Authority, req: Incoming) -> tuple[int, Any]:
    result = authority.verify_audit()
    return (200 if result.ok else 409), result.to_json()


def admin(handler: Handler) -> Handler:
    """Check the admin key before anything else the handler does."""

    def guarded(authority: Authority, req: Incoming) -> tuple[int, Any]:
        require_admin(authority, req.headers)
        return handler(authority, req)

    guarded.__name__ = handler.__name__
    return guarded


def _route(path: str, handler: Handler, method: str) -> Route:
    return Route(path, endpoint(admin(handler), body=method in ("POST", "PUT")), methods=[method])


def routes() -> list[Route]:
    return [
        _route("/v1/agents", create_agent, "POST"),
        _route("/v1/agents", list_agents, "GET"),
        _route("/v1/agents/{id}", get_agent, "GET"),
        _route("/v1/agents/{id}/policy", put_policy, "PUT"),
        _route("/v1/agents/{id}/fund", fund, "POST"),
        _route("/v1/agents/{id}/freeze", status_change("frozen"), "POST"),
        _route("/v1/agents/{id}/unfreeze", status_change("active"), "POST"),
        _route("/v1/agents/{id}/revoke", status_change("revoked"), "POST"),
        _route("/v1/principals/{name}", put_principal, "PUT"),
        _route("/v1/budgets", add_cap, "POST"),
        _route("/v1/ledger", ledger, "GET"),
        _route("/v1/events", events, "GET"),
        _route("/v1/audit/verify", audit_verify, "GET"),
    ]
