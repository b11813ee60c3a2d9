"""The policy model (paymaster.core.policy)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paymaster.core.policy import (
    Cap,
    LoopGuard,
    Policy,
    VelocityGuard,
    connector_allowed,
    host_allowed,
    host_matches,
    matching_caps,
    parse_policy,
    per_call_limit,
    policy_to_json,
    velocity_exceeded,
    with_limits,
)
from paymaster.errors import InvalidAmount, InvalidRequest
from paymaster.money import MAX_NANOS, format_nanos

N = 1_000_000_000  # nanos per unit

PROTOCOL_EXAMPLE: dict[str, Any] = {
    "allow_hosts": ["api.openai.com", "*.tavily.com"],
    "deny_hosts": [],
    "connectors": "*",
    "categories": "*",
    "per_call_max": {"*": "0.10", "commerce": "75.00", "connector:geocode": "0.02"},
    "caps": [
        {"scope": "all", "period": "day", "limit": "15.00"},
        {"scope": "connector:translate-premium", "period": "day", "limit": "50.00"},
        {"scope": "category:llm", "period": "session", "limit": "2.00", "mode": "shadow"},
    ],
    "alert_thresholds": ["0.5", "0.75", "0.9"],
    "loop_guard": {"window_seconds": 60, "max_repeats": 5},
    "allow_with_caps": True,
    "on_price_unknown": "deny",
}


# --------------------------------------------------------------------------- parse / serialize


def test_protocol_example() -> None:
    p = parse_policy(PROTOCOL_EXAMPLE)
    assert p == Policy(
        allow_hosts=("api.openai.com", "*.tavily.com"),
        per_call_max={"*": N // 10, "commerce": 75 * N, "connector:geocode": N // 50},
        caps=(
            Cap("all", "day", 15 * N),
            Cap("connector:translate-premium", "day", 50 * N),
            Cap("category:llm", "session", 2 * N, mode="shadow"),
        ),
        loop_guard=LoopGuard(60, 5),
        allow_with_caps=True,
    )
    assert parse_policy(policy_to_json(p)) == p


def test_defaults() -> None:
    p = parse_policy({})
    assert p == Policy()
    assert p.allow_hosts is None
    assert p.deny_hosts == ()
    assert p.connectors == "*" and p.categories == "*"
    assert p.per_call_max == {} and p.caps == ()
    assert p.alert_thresholds == ("0.5", "0.75", "0.9")
    assert p.loop_guard is None and p.velocity_guard is None
    assert p.allow_with_caps is False
    assert p.on_price_unknown == "deny"


def test_canonical_json_has_every_field() -> None:
    assert policy_to_json(Policy()) == {
        "allow_hosts": None,
        "deny_hosts": [],
        "connectors": "*",
        "categories": "*",
        "per_call_max": {},
        "caps": [],
        "alert_thresholds": ["0.5", "0.75", "0.9"],
        "loop_guard": None,
        "allow_with_caps": False,
        "on_price_unknown": "deny",
        "velocity_guard": None,
    }
    j = policy_to_json(parse_policy(PROTOCOL_EXAMPLE))
    assert j["caps"][0] == {"scope": "all", "period": "day", "limit": "15.00", "mode": "enforce", "tz": None}
    assert j["per_call_max"] == {"*": "0.10", "commerce": "75.00", "connector:geocode": "0.02"}


def test_policy_is_hashable() -> None:
    p = parse_policy(PROTOCOL_EXAMPLE)
    assert hash(p) == hash(parse_policy(copy.deepcopy(PROTOCOL_EXAMPLE)))


def test_normalization() -> None:
    p = parse_policy(
        {
            "allow_hosts": ["API.OpenAI.com.", "api.openai.com", "*.Tavily.COM"],
            "connectors": ["a", "b", "a"],
            "alert_thresholds": ["0.90", "0.5", "1.0", "0.9"],
            "on_price_unknown": "0.050",
        }
    )
    assert p.allow_hosts == ("api.openai.com", "*.tavily.com")
    assert p.connectors == ("a", "b")
    assert p.alert_thresholds == ("0.5", "0.9", "1")
    assert p.on_price_unknown == N // 20
    assert policy_to_json(p)["on_price_unknown"] == "0.05"


def test_cap_with_time_zone() -> None:
    p = parse_policy({"caps": [{"scope": "all", "period": "day", "limit": "1", "tz": "Europe/Paris"}]})
    assert p.caps == (Cap("all", "day", N, tz="Europe/Paris"),)


def test_velocity_guard() -> None:
    raw = {
        "window_seconds": 300,
        "trailing_seconds": 3600,
        "multiple": "5",
        "min_spend": "1.00",
        "action": "freeze",
    }
    p = parse_policy({"velocity_guard": raw})
    assert p.velocity_guard == VelocityGuard(300, 3600, "5", N, "freeze", None)
    assert policy_to_json(p)["velocity_guard"] == {**raw, "tighten_to": None}
    t = parse_policy(
        {"velocity_guard": {**raw, "multiple": "2.50", "action": "tighten", "tighten_to": "0.01"}}
    )
    assert t.velocity_guard == VelocityGuard(300, 3600, "2.5", N, "tighten", N // 100)
    assert parse_policy(policy_to_json(t)) == t


def test_zero_limits_are_allowed() -> None:
    p = parse_policy({"per_call_max": {"*": "0"}, "caps": [{"scope": "all", "period": "day", "limit": "0"}]})
    assert p.per_call_max == {"*": 0} and p.caps[0].limit == 0


# --------------------------------------------------------------------------- rejections

CAP = {"scope": "all", "period": "day", "limit": "1.00"}
VG = {
    "window_seconds": 300,
    "trailing_seconds": 3600,
    "multiple": "5",
    "min_spend": "1.00",
    "action": "freeze",
}

REJECTIONS: list[tuple[Any, type[Exception], str]] = [
    (None, InvalidRequest, "policy"),
    ([], InvalidRequest, "policy"),
    ("{}", InvalidRequest, "policy"),
    ({"dailyCap": "8.00"}, InvalidRequest, "dailyCap"),
    ({"frozen": True}, InvalidRequest, "frozen"),
    # hosts
    ({"allow_hosts": "api.openai.com"}, InvalidRequest, "allow_hosts"),
    ({"allow_hosts": [1]}, InvalidRequest, "allow_hosts[0]"),
    ({"allow_hosts": [""]}, InvalidRequest, "allow_hosts[0]"),
    ({"allow_hosts": ["evil.com/x"]}, InvalidRequest, "allow_hosts[0]"),
    ({"allow_hosts": ["api.*.com"]}, InvalidRequest, "allow_hosts[0]"),
    ({"allow_hosts": ["*tavily.com"]}, InvalidRequest, "allow_hosts[0]"),
    ({"allow_hosts": ["a..b"]}, InvalidRequest, "allow_hosts[0]"),
    ({"allow_hosts": ["user@host"]}, InvalidRequest, "allow_hosts[0]"),
    ({"allow_hosts": ["host:port"]}, InvalidRequest, "allow_hosts[0]"),
    ({"allowlist": ["ok.com", "bad host"]}, InvalidRequest, "allowlist[1]"),
    ({"deny_hosts": None}, InvalidRequest, "deny_hosts"),
    ({"deny_hosts": ["*.*.com"]}, InvalidRequest, "deny_hosts[0]"),
    ({"allow_hosts": ["*."]}, InvalidRequest, "allow_hosts[0]"),
    ({"allow_hosts": ["**"]}, InvalidRequest, "allow_hosts[0]"),
    ({"allow_hosts": ["*.com:x"]}, InvalidRequest, "allow_hosts[0]"),
    ({"allow_hosts": ["a.com"] * 1001}, InvalidRequest, "allow_hosts"),
    # connectors / categories
    ({"connectors": "all"}, InvalidRequest, "connectors"),
    ({"connectors": ["a/b"]}, InvalidRequest, "connectors[0]"),
    ({"connectors": [""]}, InvalidRequest, "connectors[0]"),
    ({"categories": None}, InvalidRequest, "categories"),
    ({"categories": [3]}, InvalidRequest, "categories[0]"),
    # per_call_max
    ({"per_call_max": []}, InvalidRequest, "per_call_max"),
    ({"per_call_max": {"*": 0.1}}, InvalidAmount, "per_call_max.*"),
    ({"per_call_max": {"*": "1e-1"}}, InvalidAmount, "per_call_max.*"),
    ({"per_call_max": {"*": "-1"}}, InvalidAmount, "per_call_max.*"),
    ({"per_call_max": {"*": "0.0000000001"}}, InvalidAmount, "per_call_max.*"),
    ({"per_call_max": {"category:llm": "1"}}, InvalidRequest, "per_call_max"),
    ({"per_call_max": {"connector:": "1"}}, InvalidRequest, "per_call_max"),
    ({"per_call_max": {"a b": "1"}}, InvalidRequest, "per_call_max"),
    # caps
    ({"caps": {}}, InvalidRequest, "caps"),
    ({"caps": ["x"]}, InvalidRequest, "caps[0]"),
    ({"caps": [{"period": "day", "limit": "1"}]}, InvalidRequest, "caps[0].scope"),
    ({"caps": [{"scope": "all", "limit": "1"}]}, InvalidRequest, "caps[0].period"),
    ({"caps": [{"scope": "all", "period": "day"}]}, InvalidRequest, "caps[0].limit"),
    ({"caps": [{**CAP, "extra": 1}]}, InvalidRequest, "extra"),
    ({"caps": [{**CAP, "scope": "everything"}]}, InvalidRequest, "caps[0].scope"),
    ({"caps": [{**CAP, "scope": "connector:"}]}, InvalidRequest, "caps[0].scope"),
    ({"caps": [{**CAP, "scope": "host:x"}]}, InvalidRequest, "caps[0].scope"),
    ({"caps": [{**CAP, "period": "daily"}]}, InvalidRequest, "caps[0].period"),
    ({"caps": [{**CAP, "period": "year"}]}, InvalidRequest, "caps[0].period"),
    ({"caps": [{**CAP, "limit": 15}]}, InvalidAmount, "caps[0].limit"),
    ({"caps": [{**CAP, "limit": "NaN"}]}, InvalidAmount, "caps[0].limit"),
    ({"caps": [{**CAP, "limit": "10000000000"}]}, InvalidAmount, "caps[0].limit"),
    ({"caps": [{**CAP, "mode": "warn"}]}, InvalidRequest, "caps[0].mode"),
    ({"caps": [{**CAP, "mode": None}]}, InvalidRequest, "caps[0].mode"),
    ({"caps": [{**CAP, "tz": "Mars/Olympus"}]}, InvalidRequest, "caps[0].tz"),
    ({"caps": [{**CAP, "tz": 1}]}, InvalidRequest, "caps[0].tz"),
    ({"caps": [{**CAP, "period": "total", "tz": "Europe/Paris"}]}, InvalidRequest, "caps[0].tz"),
    ({"caps": [{**CAP, "period": "session", "tz": "Europe/Paris"}]}, InvalidRequest, "caps[0].tz"),
    ({"caps": [CAP, {**CAP, "limit": "2", "tz": "Europe/Paris"}]}, InvalidRequest, "caps[1]"),
    # thresholds
    ({"alert_thresholds": "0.5"}, InvalidRequest, "alert_thresholds"),
    ({"alert_thresholds": [0.5]}, InvalidRequest, "alert_thresholds[0]"),
    ({"alert_thresholds": ["0"]}, InvalidRequest, "alert_thresholds[0]"),
    ({"alert_thresholds": ["0.5", "1.01"]}, InvalidRequest, "alert_thresholds[1]"),
    ({"alert_thresholds": ["-0.5"]}, InvalidRequest, "alert_thresholds[0]"),
    ({"alert_thresholds": ["50%"]}, InvalidRequest, "alert_thresholds[0]"),
    ({"alert_thresholds": ["0.1234567891"]}, InvalidRequest, "alert_thresholds[0]"),
    # loop guard
    ({"loop_guard": True}, InvalidRequest, "loop_guard"),
    ({"loop_guard": {"window_seconds": 60}}, InvalidRequest, "loop_guard.max_repeats"),
    ({"loop_guard": {"window_seconds": 0, "max_repeats": 5}}, InvalidRequest, "loop_guard.window_seconds"),
    ({"loop_guard": {"window_seconds": 60, "max_repeats": 0}}, InvalidRequest, "loop_guard.max_repeats"),
    ({"loop_guard": {"window_seconds": -1, "max_repeats": 5}}, InvalidRequest, "loop_guard.window_seconds"),
    ({"loop_guard": {"window_seconds": "60", "max_repeats": 5}}, InvalidRequest, "loop_guard.window_seconds"),
    ({"loop_guard": {"window_seconds": 60.0, "max_repeats": 5}}, InvalidRequest, "loop_guard.window_seconds"),
    ({"loop_guard": {"window_seconds": True, "max_repeats": 5}}, InvalidRequest, "loop_guard.window_seconds"),
    (
        {"loop_guard": {"window_seconds": 10**9, "max_repeats": 5}},
        InvalidRequest,
        "loop_guard.window_seconds",
    ),
    ({"loop_guard": {"window_seconds": 60, "max_repeats": 5, "x": 1}}, InvalidRequest, "x"),
    # allow_with_caps / on_price_unknown
    ({"allow_with_caps": "true"}, InvalidRequest, "allow_with_caps"),
    ({"allow_with_caps": 1}, InvalidRequest, "allow_with_caps"),
    ({"on_price_unknown": "allow"}, InvalidAmount, "on_price_unknown"),
    ({"on_price_unknown": 0.05}, InvalidAmount, "on_price_unknown"),
    ({"on_price_unknown": "0"}, InvalidAmount, "on_price_unknown"),
    ({"on_price_unknown": None}, InvalidAmount, "on_price_unknown"),
    # velocity guard
    ({"velocity_guard": "on"}, InvalidRequest, "velocity_guard"),
    (
        {"velocity_guard": {k: v for k, v in VG.items() if k != "multiple"}},
        InvalidRequest,
        "velocity_guard.multiple",
    ),
    ({"velocity_guard": {**VG, "window_seconds": 0}}, InvalidRequest, "velocity_guard.window_seconds"),
    ({"velocity_guard": {**VG, "trailing_seconds": 300}}, InvalidRequest, "velocity_guard.trailing_seconds"),
    ({"velocity_guard": {**VG, "multiple": 5}}, InvalidRequest, "velocity_guard.multiple"),
    ({"velocity_guard": {**VG, "multiple": "0"}}, InvalidRequest, "velocity_guard.multiple"),
    ({"velocity_guard": {**VG, "min_spend": 1}}, InvalidAmount, "velocity_guard.min_spend"),
    ({"velocity_guard": {**VG, "action": "pause"}}, InvalidRequest, "velocity_guard.action"),
    ({"velocity_guard": {**VG, "action": "tighten"}}, InvalidRequest, "velocity_guard.tighten_to"),
    ({"velocity_guard": {**VG, "tighten_to": "0.01"}}, InvalidRequest, "velocity_guard.tighten_to"),
    (
        {"velocity_guard": {**VG, "action": "tighten", "tighten_to": "x"}},
        InvalidAmount,
        "velocity_guard.tighten_to",
    ),
    ({"velocity_guard": {**VG, "other": 1}}, InvalidRequest, "other"),
    # shorthand
    ({"daily_cap": 8}, InvalidAmount, "daily_cap"),
    ({"daily_cap": "-8"}, InvalidAmount, "daily_cap"),
    ({"allowlist": "a.com"}, InvalidRequest, "allowlist"),
]


@pytest.mark.parametrize(("obj", "exc", "field"), REJECTIONS)
def test_rejections(obj: Any, exc: type[Exception], field: str) -> None:
    with pytest.raises(exc) as info:
        parse_policy(obj)
    assert field in str(info.value)


def test_amount_errors_are_not_request_errors() -> None:
    # invalid_amount and invalid_request are sibling codes; a JSON number is the former.
    with pytest.raises(InvalidAmount) as info:
        parse_policy({"caps": [{**CAP, "limit": 1.5}]})
    assert info.value.code == "invalid_amount"


# --------------------------------------------------------------------------- shorthand


def test_daily_cap_adds_a_cap() -> None:
    p = parse_policy(
        {"daily_cap": "8.00", "caps": [{"scope": "category:llm", "period": "hour", "limit": "1"}]}
    )
    assert p.caps == (Cap("category:llm", "hour", N), Cap("all", "day", 8 * N))


def test_daily_cap_overrides_the_all_day_cap_in_place() -> None:
    p = parse_policy(
        {
            "daily_cap": "8.00",
            "caps": [
                {"scope": "all", "period": "day", "limit": "15", "mode": "shadow", "tz": "Europe/Paris"},
                {"scope": "all", "period": "month", "limit": "100"},
            ],
        }
    )
    assert p.caps == (
        Cap("all", "day", 8 * N, mode="shadow", tz="Europe/Paris"),
        Cap("all", "month", 100 * N),
    )


def test_allowlist_is_allow_hosts() -> None:
    assert parse_policy({"allowlist": ["api.anthropic.com"]}).allow_hosts == ("api.anthropic.com",)
    both = parse_policy({"allow_hosts": ["a.com", "b.com"], "allowlist": ["b.com", "c.com"]})
    assert both.allow_hosts == ("a.com", "b.com", "c.com")
    assert parse_policy({"allow_hosts": None, "allowlist": ["c.com"]}).allow_hosts == ("c.com",)
    assert parse_policy({"allowlist": []}).allow_hosts == ()


def test_sdk_example_shorthand() -> None:
    p = parse_policy({"daily_cap": "8.00", "allowlist": ["api.anthropic.com"]})
    assert p == Policy(allow_hosts=("api.anthropic.com",), caps=(Cap("all", "day", 8 * N),))
    # The canonical form drops the shorthand.
    j = policy_to_json(p)
    assert "daily_cap" not in j and "allowlist" not in j
    assert parse_policy(j) == p


# --------------------------------------------------------------------------- with_limits


def test_with_limits_changes_only_what_it_names() -> None:
    base = parse_policy(PROTOCOL_EXAMPLE)
    assert with_limits(base) == base
    p = with_limits(base, daily=8 * N)
    assert p.caps[0] == Cap("all", "day", 8 * N)
    assert p.caps[1:] == base.caps[1:]
    assert p.per_call_max == base.per_call_max and p.allow_hosts == base.allow_hosts
    assert base.caps[0].limit == 15 * N  # the original is untouched


def test_with_limits_adds_and_replaces() -> None:
    base = parse_policy(PROTOCOL_EXAMPLE)
    p = with_limits(
        base,
        monthly=300 * N,
        session=3 * N,
        per_call=N // 5,
        connector={"translate-premium": (40 * N, "day"), "geocode": (N, "hour")},
        category={"llm": (5 * N, "session")},
    )
    assert p.caps == (
        Cap("all", "day", 15 * N),
        Cap("connector:translate-premium", "day", 40 * N),
        Cap("category:llm", "session", 5 * N, mode="shadow"),  # mode kept
        Cap("all", "month", 300 * N),
        Cap("all", "session", 3 * N),
        Cap("connector:geocode", "hour", N),
    )
    assert p.per_call_max == {"*": N // 5, "commerce": 75 * N, "connector:geocode": N // 50}


def test_with_limits_validates() -> None:
    with pytest.raises(InvalidRequest):
        with_limits(Policy(), connector={"a": (N, "daily")})
    with pytest.raises(InvalidRequest):
        with_limits(Policy(), category={"a/b": (N, "day")})
    with pytest.raises(InvalidAmount):
        with_limits(Policy(), daily=-1)
    with pytest.raises(InvalidAmount):
        with_limits(Policy(), per_call=MAX_NANOS + 1)


# --------------------------------------------------------------------------- hosts


@pytest.mark.parametrize(
    ("pattern", "host", "expected"),
    [
        ("*.tavily.com", "api.tavily.com", True),
        ("*.tavily.com", "a.b.tavily.com", True),
        ("*.tavily.com", "API.Tavily.COM", True),
        ("*.TAVILY.com", "api.tavily.com", True),
        ("*.tavily.com", "tavily.com", False),
        ("*.tavily.com", "evil.com/x.tavily.com", False),
        ("*.tavily.com", "eviltavily.com", False),
        ("*.tavily.com", ".tavily.com", False),
        ("*.tavily.com", "x.tavily.com.evil.com", False),
        ("*.tavily.com", "user@x.tavily.com", False),
        ("*.tavily.com", "x.tavily.com:8443", True),
        ("api.openai.com", "api.openai.com", True),
        ("api.openai.com", "API.OPENAI.COM", True),
        ("api.openai.com", "api.openai.com.", True),
        ("api.openai.com", "api.openai.com:443", True),
        ("api.openai.com", "x.api.openai.com", False),
        ("api.openai.com", "api.openai.com.evil.com", False),
        ("api.openai.com", "api.openai.co", False),
        ("127.0.0.1:9100", "127.0.0.1:9100", True),
        ("127.0.0.1:9100", "127.0.0.1:9101", False),
        ("127.0.0.1:9100", "127.0.0.1", False),
        ("api.openai.com", "api.openai.com:x", False),
        ("[::1]", "[::1]:8080", True),
        ("*", "anything.example", True),
        ("*", "not a host", False),
        ("*", "", False),
    ],
)
def test_host_matches(pattern: str, host: str, expected: bool) -> None:
    assert host_matches(pattern, host) is expected


def test_host_allowed_defaults_to_connector_hosts() -> None:
    hosts = ["api.openai.com", "geo.example.com"]
    assert host_allowed([Policy()], "api.openai.com", hosts)
    assert not host_allowed([Policy()], "evil.com", hosts)
    assert host_allowed([], "geo.example.com", hosts)
    assert not host_allowed([], "evil.com", hosts)


def test_host_allowed_needs_every_policy() -> None:
    agent = parse_policy({"allow_hosts": ["api.openai.com", "*.tavily.com"]})
    team = parse_policy({"allow_hosts": ["*.tavily.com"], "deny_hosts": ["bad.tavily.com"]})
    connector_hosts = ["api.openai.com", "api.tavily.com", "bad.tavily.com"]
    assert host_allowed([agent], "api.openai.com", connector_hosts)
    assert not host_allowed([agent, team], "api.openai.com", connector_hosts)
    assert host_allowed([agent, team], "api.tavily.com", connector_hosts)
    assert not host_allowed([agent, team], "bad.tavily.com", connector_hosts)
    assert not host_allowed([agent, team], "BAD.tavily.com.", connector_hosts)


def test_deny_wins_over_allow() -> None:
    p = parse_policy({"allow_hosts": ["*"], "deny_hosts": ["*.evil.com"]})
    assert host_allowed([p], "good.com", [])
    assert not host_allowed([p], "x.evil.com", [])
    assert not host_allowed([p], "x.evil.com:443", [])


def test_empty_allow_list_allows_nothing() -> None:
    assert not host_allowed([parse_policy({"allow_hosts": []})], "api.openai.com", ["api.openai.com"])


# --------------------------------------------------------------------------- connectors


def test_connector_allowed() -> None:
    anything = Policy()
    only_llm = parse_policy({"categories": ["llm"]})
    only_openai = parse_policy({"connectors": ["openai"]})
    assert connector_allowed([anything], "local-ocr", None)
    assert connector_allowed([], "x", None)
    assert connector_allowed([only_llm], "openai", "llm")
    assert not connector_allowed([only_llm], "geocode", "tool")
    # A connector without a category is on no list of categories.
    assert not connector_allowed([only_llm], "local-ocr", None)
    assert connector_allowed([only_openai], "openai", "llm")
    assert not connector_allowed([only_openai], "anthropic", "llm")
    assert not connector_allowed([only_openai, only_llm], "openai", "tool")
    assert not connector_allowed([parse_policy({"connectors": []})], "openai", "llm")
    # No substring matching on a list.
    assert not connector_allowed([parse_policy({"connectors": ["openai-eu"]})], "openai", None)


# --------------------------------------------------------------------------- per-call maximum


def test_per_call_most_specific_key() -> None:
    p = parse_policy(PROTOCOL_EXAMPLE)
    assert per_call_limit([p], "geocode", "tool") == N // 50  # connector:geocode
    assert per_call_limit([p], "shop", "commerce") == 75 * N  # category beats *
    assert per_call_limit([p], "openai", "llm") == N // 10  # *
    assert per_call_limit([p], "openai", None) == N // 10
    assert per_call_limit([Policy()], "openai", "llm") is None
    assert per_call_limit([], "openai", "llm") is None


def test_per_call_strictest_wins_across_policies() -> None:
    agent = parse_policy({"per_call_max": {"*": "0.10", "commerce": "75.00"}})
    team = parse_policy({"per_call_max": {"commerce": "20.00", "connector:geocode": "0.50"}})
    assert per_call_limit([agent, team], "shop", "commerce") == 20 * N
    # team's most specific key for geocode is 0.50, agent's is * = 0.10: the smaller holds.
    assert per_call_limit([agent, team], "geocode", "tool") == N // 10
    # team sets nothing for llm: only the agent's * applies.
    assert per_call_limit([agent, team], "openai", "llm") == N // 10
    assert per_call_limit([team, Policy()], "openai", "llm") is None


# --------------------------------------------------------------------------- caps


def test_matching_caps_in_policy_order() -> None:
    p = parse_policy(
        {
            "caps": [
                {"scope": "category:llm", "period": "session", "limit": "2"},
                {"scope": "all", "period": "day", "limit": "15"},
                {"scope": "connector:openai", "period": "month", "limit": "50"},
                {"scope": "connector:geocode", "period": "day", "limit": "5"},
                {"scope": "category:llm", "period": "day", "limit": "9", "mode": "shadow"},
                {"scope": "all", "period": "session", "limit": "3"},
            ]
        }
    )
    caps = p.caps
    assert matching_caps(p, "openai", "llm", has_session=True) == [
        caps[0],
        caps[1],
        caps[2],
        caps[4],
        caps[5],
    ]
    assert matching_caps(p, "openai", "llm", has_session=False) == [caps[1], caps[2], caps[4]]
    assert matching_caps(p, "geocode", "tool", has_session=False) == [caps[1], caps[3]]
    assert matching_caps(p, "local-ocr", None, has_session=True) == [caps[1], caps[5]]
    assert matching_caps(Policy(), "x", None, has_session=True) == []


# --------------------------------------------------------------------------- velocity


def test_velocity_exceeded() -> None:
    g = VelocityGuard(300, 3600, "5", N, "freeze")
    # 3.00 in 5 min against 3.00 in the hour: a rate 12x the trailing one.
    assert velocity_exceeded(g, 3 * N, 3 * N)
    # Below min_spend: never.
    assert not velocity_exceeded(g, N - 1, N - 1)
    # 1.00 in 5 min against 12.00 in the hour: the same rate as the hour (12 * 5 min).
    assert not velocity_exceeded(g, N, 12 * N)
    # Exactly 5x: 5/12 of the hour's spend in one twelfth of it.
    assert velocity_exceeded(g, 5 * N, 12 * N)
    assert not velocity_exceeded(g, 5 * N - 1, 12 * N)
    assert not velocity_exceeded(VelocityGuard(300, 3600, "5", 0, "freeze"), 0, 0)


# --------------------------------------------------------------------------- round trip


_ID = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=12)
_AMOUNT = st.integers(0, MAX_NANOS).map(format_nanos) | st.sampled_from(
    ["0", "1", "0.5000", "20.00", "0.000000001"]
)
_LABEL = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=8)
_HOST = st.lists(_LABEL, min_size=1, max_size=3).map(".".join)
_PATTERN = _HOST | _HOST.map(lambda h: "*." + h) | st.just("*")
_SCOPE = st.just("all") | _ID.map(lambda s: "connector:" + s) | _ID.map(lambda s: "category:" + s)
_THRESHOLD = st.integers(1, 10**9).map(lambda n: format_nanos(n).rstrip("0").rstrip("."))


@st.composite
def _caps(draw: st.DrawFn) -> list[dict[str, Any]]:
    keys = draw(
        st.lists(
            st.tuples(_SCOPE, st.sampled_from(["session", "hour", "day", "week", "month", "total"])),
            unique=True,
            max_size=5,
        )
    )
    caps = []
    for scope, period in keys:
        cap: dict[str, Any] = {"scope": scope, "period": period, "limit": draw(_AMOUNT)}
        if draw(st.booleans()):
            cap["mode"] = draw(st.sampled_from(["enforce", "shadow"]))
        if period not in ("session", "total") and draw(st.booleans()):
            cap["tz"] = draw(st.sampled_from(["UTC", "Europe/Paris", "America/New_York", None]))
        caps.append(cap)
    return caps


@st.composite
def policy_json(draw: st.DrawFn) -> dict[str, Any]:
    options: dict[str, Any] = {
        "allow_hosts": st.none() | st.lists(_PATTERN, max_size=4),
        "allowlist": st.lists(_PATTERN, max_size=3),
        "deny_hosts": st.lists(_PATTERN, max_size=3),
        "connectors": st.just("*") | st.lists(_ID, max_size=3),
        "categories": st.just("*") | st.lists(_ID, max_size=3),
        "per_call_max": st.dictionaries(
            st.just("*") | _ID | _ID.map(lambda s: "connector:" + s), _AMOUNT, max_size=3
        ),
        "caps": _caps(),
        "daily_cap": _AMOUNT,
        "alert_thresholds": st.lists(_THRESHOLD, max_size=4),
        "loop_guard": st.none()
        | st.fixed_dictionaries({"window_seconds": st.integers(1, 3600), "max_repeats": st.integers(1, 100)}),
        "allow_with_caps": st.booleans(),
        "on_price_unknown": st.just("deny") | st.integers(1, MAX_NANOS).map(format_nanos),
        "velocity_guard": st.none()
        | st.fixed_dictionaries(
            {
                "window_seconds": st.integers(1, 600),
                "trailing_seconds": st.integers(601, 86400),
                "multiple": st.sampled_from(["5", "2.50", "1", "0.5"]),
                "min_spend": _AMOUNT,
                "action": st.just("freeze"),
            }
        )
        | st.fixed_dictionaries(
            {
                "window_seconds": st.integers(1, 600),
                "trailing_seconds": st.integers(601, 86400),
                "multiple": st.just("3"),
                "min_spend": _AMOUNT,
                "action": st.just("tighten"),
                "tighten_to": _AMOUNT,
            }
        ),
    }
    chosen = draw(st.sets(st.sampled_from(sorted(options))))
    return {name: draw(options[name]) for name in sorted(chosen)}


@settings(max_examples=300, deadline=None)
@given(policy_json())
def test_round_trip(obj: dict[str, Any]) -> None:
    p = parse_policy(obj)
    j = policy_to_json(p)
    assert parse_policy(j) == p
    assert policy_to_json(parse_policy(j)) == j
    assert hash(parse_policy(j)) == hash(p)


@settings(max_examples=100, deadline=None)
@given(policy_json(), st.integers(0, MAX_NANOS), st.integers(0, MAX_NANOS))
def test_with_limits_keeps_the_rest(obj: dict[str, Any], daily: int, per_call: int) -> None:
    p = parse_policy(obj)
    q = with_limits(p, daily=daily, per_call=per_call)
    assert [c for c in q.caps if (c.scope, c.period) != ("all", "day")] == [
        c for c in p.caps if (c.scope, c.period) != ("all", "day")
    ]
    assert [c.limit for c in q.caps if (c.scope, c.period) == ("all", "day")] == [daily]
    assert q.per_call_max == {**p.per_call_max, "*": per_call}
    assert (q.allow_hosts, q.deny_hosts, q.loop_guard, q.velocity_guard) == (
        p.allow_hosts,
        p.deny_hosts,
        p.loop_guard,
        p.velocity_guard,
    )
