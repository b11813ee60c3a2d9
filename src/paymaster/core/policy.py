"""The policy model (PROTOCOL.md, "Policy"): parse, serialize, edit and query.

Pure: no I/O. Amounts are integer nanos (:mod:`paymaster.money`). ``parse_policy`` is
strict — an unknown field, a wrong type or a meaningless value is refused with a message
naming the field — because a typo in a spend policy must not silently widen it.

Where several policies apply to one call (an agent's and each parent principal's up the
chain) the strictest wins: every policy must allow the host, the connector and the
category; the smallest per-call maximum holds; each policy's matching caps are on the
budget path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

from paymaster.core.budgets import (
    check_id,
    check_period,
    check_scope,
    check_tz,
    parse_fraction,
)
from paymaster.errors import InvalidRequest
from paymaster.money import format_nanos, parse_nanos

__all__ = [
    "DEFAULT_ALERT_THRESHOLDS",
    "Cap",
    "LoopGuard",
    "Policy",
    "VelocityGuard",
    "connector_allowed",
    "host_allowed",
    "host_matches",
    "matching_caps",
    "parse_policy",
    "per_call_limit",
    "policy_to_json",
    "velocity_exceeded",
    "with_limits",
]

Wildcard: TypeAlias = Literal["*"]
Mode: TypeAlias = Literal["enforce", "shadow"]
VelocityAction: TypeAlias = Literal["freeze", "tighten"]

MODES: tuple[str, ...] = ("enforce", "shadow")
VELOCITY_ACTIONS: tuple[str, ...] = ("freeze", "tighten")
DEFAULT_ALERT_THRESHOLDS: tuple[str, ...] = ("0.5", "0.75", "0.9")
# Bounds that keep the guards' bookkeeping finite: a guard that remembers calls for more
# than a week is a cap in disguise.
MAX_GUARD_SECONDS = 7 * 24 * 3600
MAX_REPEATS = 1_000_000
_MAX_LIST = 1000
# Characters a host (name, IPv4, or bracketed IPv6, with an optional port) may contain.
# Anything else — "/", "@", "\\", spaces — means the text is not a bare host, and a glob
# must not match it ("evil.com/x.tavily.com").
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-._:[]")


@dataclass(frozen=True, slots=True)
class Cap:
    """A spending cap: at most ``limit`` nanos per window of ``period`` on ``scope``."""

    scope: str
    period: str
    limit: int
    mode: str = "enforce"
    tz: str | None = None


@dataclass(frozen=True, slots=True)
class LoopGuard:
    """At most ``max_repeats`` identical calls within ``window_seconds``."""

    window_seconds: int
    max_repeats: int


@dataclass(frozen=True, slots=True)
class VelocityGuard:
    """This project's addition to the policy JSON (field ``velocity_guard``).

    Trips when the spend of the last ``window_seconds`` is at least ``min_spend`` and its
    rate is at least ``multiple`` times the rate over the last ``trailing_seconds`` (a
    span that includes the short window). Then ``freeze`` freezes the agent, or
    ``tighten`` lowers its per-call maximum to ``tighten_to``. See :func:`velocity_exceeded`.
    """

    window_seconds: int
    trailing_seconds: int
    multiple: str
    min_spend: int
    action: str
    tighten_to: int | None = None


@dataclass(frozen=True, slots=True)
class Policy:
    """A parsed policy. Defaults are PROTOCOL.md's values for omitted fields.

    ``allow_hosts`` None means "the hosts of every configured connector". ``per_call_max``
    is keyed by ``*``, a category or ``connector:ID``; treat it as read-only (it is left
    out of the hash so that a policy stays hashable).
    """

    allow_hosts: tuple[str, ...] | None = None
    deny_hosts: tuple[str, ...] = ()
    connectors: Wildcard | tuple[str, ...] = "*"
    categories: Wildcard | tuple[str, ...] = "*"
    per_call_max: dict[str, int] = field(default_factory=dict, hash=False)
    caps: tuple[Cap, ...] = ()
    alert_thresholds: tuple[str, ...] = DEFAULT_ALERT_THRESHOLDS
    loop_guard: LoopGuard | None = None
    allow_with_caps: bool = False
    on_price_unknown: Literal["deny"] | int = "deny"
    velocity_guard: VelocityGuard | None = None


_DEFAULT_POLICY = Policy()

_POLICY_FIELDS = frozenset(f.name for f in dataclasses.fields(Policy))
_SHORTHAND_FIELDS = frozenset({"daily_cap", "allowlist"})
_CAP_FIELDS = frozenset({"scope", "period", "limit", "mode", "tz"})
_LOOP_FIELDS = frozenset({"window_seconds", "max_repeats"})
_VELOCITY_FIELDS = frozenset(
    {"window_seconds", "trailing_seconds", "multiple", "min_spend", "action", "tighten_to"}
)


# --------------------------------------------------------------------------- parsing helpers


def _object(value: Any, where: str, allowed: frozenset[str]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidRequest(f"{where} must be a JSON object, not {type(value).__name__}")
    for key in value:
        if key not in allowed:
            raise InvalidRequest(f"{where}: unknown field {key!r}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list | tuple):
        raise InvalidRequest(f"{where} must be a JSON array, not {type(value).__name__}")
    if len(value) > _MAX_LIST:
        raise InvalidRequest(f"{where} has more than {_MAX_LIST} entries")
    return list(value)


def _dedupe(items: Sequence[str]) -> tuple[str, ...]:
    # Order is kept (it is how the user wrote it); repeats carry no meaning.
    return tuple(dict.fromkeys(items))


def _int(value: Any, where: str, *, low: int, high: int) -> int:
    # bool is an int subclass; `true` is not a number of seconds.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{where} must be an integer, not {type(value).__name__}")
    if not low <= value <= high:
        raise InvalidRequest(f"{where} must be between {low} and {high}, got {value}")
    return value


def _normalize_host(text: str) -> str:
    # One trailing dot names the same host ("evil.com." is "evil.com"); without this a
    # deny entry could be sidestepped.
    text = text.lower()
    return text[:-1] if text.endswith(".") else text


def _valid_host(host: str) -> bool:
    if not host or not set(host) <= _HOST_CHARS:
        return False
    name, port = _split_port(host)
    if port is not None and not (port.isascii() and port.isdigit()):
        return False
    if name.startswith("["):
        return name.endswith("]") and len(name) > 2
    return all(name.split("."))  # no empty label: "a..b", ".b"


def _split_port(host: str) -> tuple[str, str | None]:
    """``("example.com", "8443")`` from ``example.com:8443``; IPv6 literals are bracketed."""
    if host.startswith("["):
        end = host.find("]")
        if end != -1 and host[end + 1 : end + 2] == ":":
            return host[: end + 1], host[end + 2 :]
        return host, None
    if host.count(":") == 1:
        name, port = host.split(":")
        return name, port
    return host, None


def _host_pattern(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f"{where} must be a string, not {type(value).__name__}")
    if value == "*":
        return value
    # Normalized after the "*" check, so that "*." cannot become the match-all pattern.
    pattern = _normalize_host(value)
    body = pattern[2:] if pattern.startswith("*.") else pattern
    if "*" in body or not _valid_host(body):
        raise InvalidRequest(f'{where} {value!r} must be a host ("api.openai.com"), "*.domain" or "*"')
    return pattern


def _host_list(value: Any, where: str) -> tuple[str, ...]:
    return _dedupe([_host_pattern(v, f"{where}[{i}]") for i, v in enumerate(_list(value, where))])


def _star_or_ids(value: Any, where: str) -> Wildcard | tuple[str, ...]:
    if value == "*":
        return "*"
    if not isinstance(value, list | tuple):
        raise InvalidRequest(f'{where} must be "*" or a JSON array of ids')
    return _dedupe([check_id(v, f"{where}[{i}]") for i, v in enumerate(_list(value, where))])


def _per_call_key(key: Any, where: str) -> str:
    if key == "*":
        return "*"
    if not isinstance(key, str):
        raise InvalidRequest(f"{where} key {key!r} must be a string")
    if key.startswith("connector:"):
        return check_scope(key, f"{where} key")
    if ":" in key:
        # Only `connector:` is a prefix here; a category is written bare ("llm").
        raise InvalidRequest(f'{where} key {key!r} must be "*", a category or "connector:ID"')
    return check_id(key, f"{where} key")


def _per_call_max(value: Any, where: str) -> dict[str, int]:
    if not isinstance(value, Mapping):
        raise InvalidRequest(f"{where} must be a JSON object")
    return {_per_call_key(k, where): parse_nanos(v, field=f"{where}.{k}") for k, v in value.items()}


def _cap(value: Any, where: str) -> Cap:
    obj = _object(value, where, _CAP_FIELDS)
    for required in ("scope", "period", "limit"):
        if required not in obj:
            raise InvalidRequest(f"{where}.{required} is required")
    scope = check_scope(obj["scope"], f"{where}.scope")
    period = check_period(obj["period"], f"{where}.period")
    limit = parse_nanos(obj["limit"], field=f"{where}.limit")
    mode = obj.get("mode", "enforce")
    if mode not in MODES:
        raise InvalidRequest(f'{where}.mode {mode!r} must be "enforce" or "shadow"')
    tz = obj.get("tz")
    if tz is not None:
        if period in ("session", "total"):
            raise InvalidRequest(f"{where}.tz applies only to hour, day, week and month caps")
        check_tz(tz, f"{where}.tz")
    return Cap(scope=scope, period=period, limit=limit, mode=mode, tz=tz)


def _caps(value: Any, where: str) -> tuple[Cap, ...]:
    caps = [_cap(v, f"{where}[{i}]") for i, v in enumerate(_list(value, where))]
    seen: set[tuple[str, str]] = set()
    for i, cap in enumerate(caps):
        # One budget per (scope, period): the budget id holds nothing else, so two caps
        # there would be the same budget with two limits.
        if (cap.scope, cap.period) in seen:
            raise InvalidRequest(f"{where}[{i}]: a second cap on scope {cap.scope!r} period {cap.period!r}")
        seen.add((cap.scope, cap.period))
    return tuple(caps)


def _canonical_fraction(text: Any, where: str) -> tuple[str, int, int]:
    """``("0.5", 5, 10)`` from ``"0.50"``: the canonical string and the exact ratio."""
    numerator, denominator = parse_fraction(text, where)
    while denominator > 1 and numerator % 10 == 0:
        numerator //= 10
        denominator //= 10
    digits = len(str(denominator)) - 1
    whole, frac = divmod(numerator, denominator)
    canonical = f"{whole}.{frac:0{digits}d}" if digits else str(whole)
    return canonical, numerator, denominator


def _thresholds(value: Any, where: str) -> tuple[str, ...]:
    found: dict[str, tuple[int, int]] = {}
    for i, item in enumerate(_list(value, where)):
        canonical, num, den = _canonical_fraction(item, f"{where}[{i}]")
        if num == 0 or num > den:
            raise InvalidRequest(f"{where}[{i}] {item!r} must be above 0 and at most 1")
        found[canonical] = (num, den)
    # Ascending, so the crossing events of one hold come out in order.
    return tuple(sorted(found, key=lambda k: _ratio_key(found[k])))


def _ratio_key(ratio: tuple[int, int]) -> int:
    # Every threshold is at most 1 with at most 9 decimals: compare on a 1e9 grid, exactly.
    num, den = ratio
    return num * (10**9 // den)


def _loop_guard(value: Any, where: str) -> LoopGuard | None:
    if value is None:
        return None
    obj = _object(value, where, _LOOP_FIELDS)
    for required in _LOOP_FIELDS:
        if required not in obj:
            raise InvalidRequest(f"{where}.{required} is required")
    return LoopGuard(
        window_seconds=_int(obj["window_seconds"], f"{where}.window_seconds", low=1, high=MAX_GUARD_SECONDS),
        max_repeats=_int(obj["max_repeats"], f"{where}.max_repeats", low=1, high=MAX_REPEATS),
    )


def _velocity_guard(value: Any, where: str) -> VelocityGuard | None:
    if value is None:
        return None
    obj = _object(value, where, _VELOCITY_FIELDS)
    for required in ("window_seconds", "trailing_seconds", "multiple", "min_spend", "action"):
        if required not in obj:
            raise InvalidRequest(f"{where}.{required} is required")
    window = _int(obj["window_seconds"], f"{where}.window_seconds", low=1, high=MAX_GUARD_SECONDS)
    trailing = _int(obj["trailing_seconds"], f"{where}.trailing_seconds", low=1, high=MAX_GUARD_SECONDS)
    if trailing <= window:
        raise InvalidRequest(f"{where}.trailing_seconds must be longer than window_seconds")
    multiple, num, _ = _canonical_fraction(obj["multiple"], f"{where}.multiple")
    if num == 0:
        raise InvalidRequest(f"{where}.multiple must be above 0")
    min_spend = parse_nanos(obj["min_spend"], field=f"{where}.min_spend")
    action = obj["action"]
    if action not in VELOCITY_ACTIONS:
        raise InvalidRequest(f'{where}.action {action!r} must be "freeze" or "tighten"')
    raw_tighten = obj.get("tighten_to")
    tighten_to: int | None = None
    if action == "tighten":
        if raw_tighten is None:
            raise InvalidRequest(f'{where}.tighten_to is required when action is "tighten"')
        tighten_to = parse_nanos(raw_tighten, field=f"{where}.tighten_to")
    elif raw_tighten is not None:
        raise InvalidRequest(f'{where}.tighten_to applies only when action is "tighten"')
    return VelocityGuard(
        window_seconds=window,
        trailing_seconds=trailing,
        multiple=multiple,
        min_spend=min_spend,
        action=action,
        tighten_to=tighten_to,
    )


def _on_price_unknown(value: Any, where: str) -> Literal["deny"] | int:
    if value == "deny":
        return "deny"
    # A zero hold would let every unpriceable call through for free: say "deny" or an amount.
    return parse_nanos(value, field=where, allow_zero=False)


def _with_cap(caps: Sequence[Cap], scope: str, period: str, limit: int) -> tuple[Cap, ...]:
    """Replace the limit of the cap on (scope, period), keeping its place, mode and zone;
    or append a new enforcing cap."""
    out = list(caps)
    for i, cap in enumerate(out):
        if cap.scope == scope and cap.period == period:
            out[i] = dataclasses.replace(cap, limit=limit)
            return tuple(out)
    out.append(Cap(scope=scope, period=period, limit=limit))
    return tuple(out)


# --------------------------------------------------------------------------- parse / serialize


def parse_policy(obj: Any) -> Policy:
    """Parse a policy's JSON (a dict) strictly into a :class:`Policy`.

    Raises ``InvalidRequest`` naming the field for anything unknown or malformed, and
    ``InvalidAmount`` for a bad amount (a JSON number included). The seeds' shorthand is
    merged: ``daily_cap`` sets the limit of the ``{scope: all, period: day}`` cap (added at
    the end when absent) and ``allowlist`` joins ``allow_hosts``.
    """
    data = _object(obj, "policy", _POLICY_FIELDS | _SHORTHAND_FIELDS)

    allow_hosts: tuple[str, ...] | None = None
    if data.get("allow_hosts") is not None:
        allow_hosts = _host_list(data["allow_hosts"], "policy.allow_hosts")
    if data.get("allowlist") is not None:
        # An explicit null allow_hosts is the same as leaving it out; with the shorthand
        # beside it, the allowlist is then the whole list.
        extra = _host_list(data["allowlist"], "policy.allowlist")
        allow_hosts = _dedupe((*(allow_hosts or ()), *extra))

    caps = _caps(data.get("caps", []), "policy.caps")
    if "daily_cap" in data:
        daily = parse_nanos(data["daily_cap"], field="policy.daily_cap")
        caps = _with_cap(caps, "all", "day", daily)

    allow_with_caps = data.get("allow_with_caps", False)
    if not isinstance(allow_with_caps, bool):
        raise InvalidRequest("policy.allow_with_caps must be true or false")

    return Policy(
        allow_hosts=allow_hosts,
        deny_hosts=_host_list(data.get("deny_hosts", []), "policy.deny_hosts"),
        connectors=_star_or_ids(data.get("connectors", "*"), "policy.connectors"),
        categories=_star_or_ids(data.get("categories", "*"), "policy.categories"),
        per_call_max=_per_call_max(data.get("per_call_max", {}), "policy.per_call_max"),
        caps=caps,
        alert_thresholds=_thresholds(
            data.get("alert_thresholds", list(DEFAULT_ALERT_THRESHOLDS)), "policy.alert_thresholds"
        ),
        loop_guard=_loop_guard(data.get("loop_guard"), "policy.loop_guard"),
        allow_with_caps=allow_with_caps,
        on_price_unknown=_on_price_unknown(data.get("on_price_unknown", "deny"), "policy.on_price_unknown"),
        velocity_guard=_velocity_guard(data.get("velocity_guard"), "policy.velocity_guard"),
    )


def policy_to_json(p: Policy) -> dict[str, Any]:
    """The canonical JSON form: every field present, amounts as decimal strings, no shorthand."""
    return {
        "allow_hosts": None if p.allow_hosts is None else list(p.allow_hosts),
        "deny_hosts": list(p.deny_hosts),
        "connectors": p.connectors if p.connectors == "*" else list(p.connectors),
        "categories": p.categories if p.categories == "*" else list(p.categories),
        "per_call_max": {k: format_nanos(v) for k, v in p.per_call_max.items()},
        "caps": [
            {
                "scope": c.scope,
                "period": c.period,
                "limit": format_nanos(c.limit),
                "mode": c.mode,
                "tz": c.tz,
            }
            for c in p.caps
        ],
        "alert_thresholds": list(p.alert_thresholds),
        "loop_guard": None
        if p.loop_guard is None
        else {"window_seconds": p.loop_guard.window_seconds, "max_repeats": p.loop_guard.max_repeats},
        "allow_with_caps": p.allow_with_caps,
        "on_price_unknown": format_nanos(p.on_price_unknown)
        if isinstance(p.on_price_unknown, int)
        else p.on_price_unknown,
        "velocity_guard": None
        if p.velocity_guard is None
        else {
            "window_seconds": p.velocity_guard.window_seconds,
            "trailing_seconds": p.velocity_guard.trailing_seconds,
            "multiple": p.velocity_guard.multiple,
            "min_spend": format_nanos(p.velocity_guard.min_spend),
            "action": p.velocity_guard.action,
            "tighten_to": None
            if p.velocity_guard.tighten_to is None
            else format_nanos(p.velocity_guard.tighten_to),
        },
    }


def with_limits(
    p: Policy,
    *,
    daily: int | None = None,
    monthly: int | None = None,
    session: int | None = None,
    per_call: int | None = None,
    connector: Mapping[str, tuple[int, str]] | None = None,
    category: Mapping[str, tuple[int, str]] | None = None,
) -> Policy:
    """``paymaster limits``: change only the limits named.

    ``daily``/``monthly``/``session`` set the ``all`` cap of that period; ``connector``
    and ``category`` map an id to ``(limit, period)``; ``per_call`` sets
    ``per_call_max["*"]``. A cap already on the same scope and period keeps its place, mode
    and time zone and takes the new limit; otherwise an enforcing cap is appended.
    """
    caps = p.caps
    for limit, period in ((daily, "day"), (monthly, "month"), (session, "session")):
        if limit is not None:
            caps = _with_cap(caps, "all", period, limit)
    for prefix, entries in (("connector", connector), ("category", category)):
        for ident, (limit, period) in (entries or {}).items():
            scope = check_scope(f"{prefix}:{ident}", f"--{prefix}")
            caps = _with_cap(caps, scope, check_period(period, f"--{prefix} {ident} period"), limit)
    per_call_max = dict(p.per_call_max)
    if per_call is not None:
        per_call_max["*"] = per_call
    changed = dataclasses.replace(p, caps=caps, per_call_max=per_call_max)
    # The round trip re-checks everything with the parser's messages: a negative or
    # absurd amount comes back as invalid_amount, a bad id or period as invalid_request.
    return parse_policy(policy_to_json(changed))


# --------------------------------------------------------------------------- queries


def host_matches(pattern: str, host: str) -> bool:
    """Whether ``host`` matches ``pattern``, case-insensitively.

    ``*`` matches any host; ``*.tavily.com`` matches any subdomain at any depth
    (``api.tavily.com``, ``a.b.tavily.com``) but not ``tavily.com`` itself; anything else
    is an exact name. A pattern without a port ignores the host's port. Text that is not a
    bare host (``evil.com/x.tavily.com``) matches nothing.
    """
    host = _normalize_host(host)
    pattern = _normalize_host(pattern)
    if not _valid_host(host):
        return False
    if pattern == "*":
        return True
    name, port = _split_port(host)
    if port is not None and _split_port(pattern.removeprefix("*."))[1] is None:
        host = name
    if pattern.startswith("*."):
        suffix = pattern[1:]  # ".tavily.com"
        return host.endswith(suffix) and len(host) > len(suffix)
    return host == pattern


def host_allowed(policies: Sequence[Policy], host: str, connector_hosts: Sequence[str]) -> bool:
    """Every policy allows ``host`` (its ``allow_hosts``, or ``connector_hosts`` when that is
    None) and none denies it. No policy at all is the default policy."""
    for policy in policies or (_DEFAULT_POLICY,):
        allow = connector_hosts if policy.allow_hosts is None else policy.allow_hosts
        if not any(host_matches(pattern, host) for pattern in allow):
            return False
        if any(host_matches(pattern, host) for pattern in policy.deny_hosts):
            return False
    return True


def connector_allowed(policies: Sequence[Policy], connector_id: str, category: str | None) -> bool:
    """Every policy allows both the connector and its category.

    A connector without a category (one absent from the configuration) passes only the
    policies whose ``categories`` is ``"*"``: a list of categories is an allowlist, and an
    unknown category is not on it.
    """
    for policy in policies:
        if policy.connectors != "*" and connector_id not in policy.connectors:
            return False
        if policy.categories != "*" and (category is None or category not in policy.categories):
            return False
    return True


def per_call_limit(policies: Sequence[Policy], connector_id: str, category: str | None) -> int | None:
    """The per-call maximum for a call: in each policy the most specific key applies
    (``connector:ID``, then the category, then ``*``), then the smallest over policies.
    None when no policy sets one."""
    limits: list[int] = []
    for policy in policies:
        table = policy.per_call_max
        for key in (f"connector:{connector_id}", category, "*"):
            if key is not None and key in table:
                limits.append(table[key])
                break
    return min(limits) if limits else None


def matching_caps(policy: Policy, connector_id: str, category: str | None, has_session: bool) -> list[Cap]:
    """The caps of ``policy`` that a call counts against, in policy order (shadow caps
    included: the caller records them without enforcing). A ``session`` cap matches only
    a call that names a session."""
    scopes = {"all", f"connector:{connector_id}"}
    if category is not None:
        scopes.add(f"category:{category}")
    return [cap for cap in policy.caps if cap.scope in scopes and (cap.period != "session" or has_session)]


def velocity_exceeded(guard: VelocityGuard, window_spend: int, trailing_spend: int) -> bool:
    """Whether the velocity guard trips, exactly in integers.

    ``window_spend`` is the spend of the last ``window_seconds``, ``trailing_spend`` that of
    the last ``trailing_seconds`` (which include the window). Trips when the window spend
    is positive, at least ``min_spend``, and its rate is at least ``multiple`` times the
    trailing rate: ``w / W ≥ m * t / T`` ⇔ ``w * T * den ≥ num * t * W``.
    """
    if window_spend <= 0 or window_spend < guard.min_spend:
        return False
    num, den = parse_fraction(guard.multiple, "velocity_guard.multiple")
    return window_spend * guard.trailing_seconds * den >= num * trailing_spend * guard.window_seconds
