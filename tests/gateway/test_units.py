"""The gateway's pure parts: target parsing, the connector index, header hygiene, the SSRF
address rule, the metering decisions and the pricer's estimates."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from paymaster.config import ConnectorConfig, Settings
from paymaster.errors import FxRateUnknown, PriceStale, PriceUnknown
from paymaster.gateway.forward import downstream_headers, upstream_headers
from paymaster.gateway.headers import settled_headers, smallest_remaining, stream_trailer
from paymaster.gateway.metering import Meter, usage_kind
from paymaster.gateway.routing import BadTarget, ConnectorIndex, is_public_address, parse_host, parse_target
from paymaster.money import parse_nanos
from paymaster.pricer import Pricer, Quote
from paymaster.usage import Usage

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


# ---------------------------------------------------------------- routing


@pytest.mark.parametrize(
    ("raw", "host"),
    [
        ("api.openai.com", "api.openai.com"),
        ("API.OpenAI.com.", "api.openai.com"),
        ("api.openai.com:443", "api.openai.com"),
        ("api.openai.com:8443", "api.openai.com:8443"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("127.0.0.1", "127.0.0.1"),
    ],
)
def test_parse_host_normalises(raw: str, host: str) -> None:
    assert parse_host(raw) == host


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "user@host",
        "a%2Fb",
        "a/b",
        "[::1]",
        "a..b",
        "-a.com",
        "a.com:0",
        "a.com:99999",
        "a b",
        "a:b:c",
        "x" * 300,
    ],
)
def test_parse_host_refuses(raw: str) -> None:
    with pytest.raises(BadTarget) as info:
        parse_host(raw)
    assert info.value.kind == "host"


def test_parse_target_keeps_the_raw_path_and_query() -> None:
    target = parse_target(b"/proxy/API.example.com/v1/a%2Fb", b"q=1&r=%20")
    assert target.host == "api.example.com"
    assert target.path == "/v1/a%2Fb"
    assert target.url == "https://api.example.com/v1/a%2Fb?q=1&r=%20"
    assert target.asked_url == "https://API.example.com/v1/a%2Fb?q=1&r=%20"
    assert parse_target(b"/proxy/api.example.com", b"").path == "/"


@pytest.mark.parametrize(
    "path", [b"/proxy/h.com/../x", b"/proxy/h.com/a/%2e%2E/x", b"/proxy/h.com/a/./x", b"/proxy/h.com/a\\b"]
)
def test_parse_target_refuses_dot_segments(path: bytes) -> None:
    with pytest.raises(BadTarget) as info:
        parse_target(path, b"")
    assert info.value.kind == "path"


def test_connector_index_exact_then_globs() -> None:
    a = ConnectorConfig(id="a", hosts=("api.a.com",), upstream="http://127.0.0.1:1/base/")
    b = ConnectorConfig(id="b", hosts=("*.b.com",))
    index = ConnectorIndex([a, b])
    assert index.lookup("api.a.com") is a
    assert index.lookup("api.a.com:8443") is a
    assert index.lookup("x.y.b.com") is b
    assert index.lookup("b.com") is None
    assert index.lookup("evil.com") is None
    target = parse_target(b"/proxy/api.a.com/v1/x", b"k=v")
    assert index.upstream_url(a, target) == "http://127.0.0.1:1/base/v1/x?k=v"
    target = parse_target(b"/proxy/x.b.com/v1/x", b"")
    assert index.upstream_url(b, target) == "https://x.b.com/v1/x"
    assert index.private_upstreams == frozenset({"127.0.0.1"})


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("::1", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("::ffff:127.0.0.1", False),
        ("2606:4700::1111", True),
        ("not-an-ip", False),
    ],
)
def test_public_addresses(address: str, public: bool) -> None:
    assert is_public_address(address) is public


# ---------------------------------------------------------------- headers


def test_upstream_headers_strip_agent_credentials_and_inject_the_connectors() -> None:
    raw = [
        (b"Authorization", b"Bearer agent"),
        (b"x-api-key", b"agent"),
        (b"Cookie", b"a=b"),
        (b"x-paymaster-spend-token", b"spt_x"),
        (b"connection", b"keep-alive, x-drop-me"),
        (b"x-drop-me", b"1"),
        (b"host", b"gateway"),
        (b"content-type", b"application/json"),
        (b"accept-encoding", b"gzip"),
    ]
    out = upstream_headers(raw, ("Authorization", "Bearer provider"))
    assert out["authorization"] == "Bearer provider"
    assert out.getall("authorization") == ["Bearer provider"]
    assert out["accept-encoding"] == "identity"
    assert out["content-type"] == "application/json"
    for name in ("x-api-key", "cookie", "x-paymaster-spend-token", "connection", "x-drop-me", "host"):
        assert name not in out


def test_downstream_headers_drop_what_the_agent_must_not_get() -> None:
    items = [
        ("Content-Type", "application/json"),
        ("X-Paymaster-Charged", "0.00"),
        ("Set-Cookie", "s=1"),
        ("Transfer-Encoding", "chunked"),
        ("X-Echo", "Bearer sk-secret"),
        ("X-Request-Id", "r1"),
    ]
    out = dict(downstream_headers(items, "sk-secret"))
    assert out == {b"content-type": b"application/json", b"x-request-id": b"r1"}


def test_settled_headers_and_trailer() -> None:
    answer = {
        "reservation_id": "res_1",
        "budgets": [
            {"id": "ag/total", "remaining": "9.90", "mode": "enforce"},
            {"id": "ag/day/2026-11-24", "remaining": "0.40", "mode": "enforce"},
            {"id": "ag/shadow", "remaining": "-1.00", "mode": "shadow"},
        ],
    }
    hold, charged = parse_nanos("0.10"), parse_nanos("0.04")
    assert smallest_remaining(answer["budgets"], hold - charged) == ("ag/day/2026-11-24", parse_nanos("0.46"))
    headers = dict(settled_headers(answer, hold, charged, estimated=False))
    assert headers[b"x-paymaster-charged"] == b"0.04"
    assert headers[b"x-paymaster-remaining"] == b"0.46"
    assert headers[b"x-paymaster-budget"] == b"ag/day/2026-11-24"
    trailer = stream_trailer(answer, hold, charged, estimated=True)
    expected = b": paymaster charged=0.04 remaining=0.46 budget=ag/day/2026-11-24 reservation=res_1"
    assert trailer == expected + b" estimated=true\n\n"
    assert b"settlement=pending" in stream_trailer(answer, hold, None, estimated=False)


# ---------------------------------------------------------------- pricer


def pricer(**fields: object) -> Pricer:
    prices = {"models": {"m": {"input": "1.00", "output": "2.00", "max_output": 100}}}
    connectors = (
        ConnectorConfig(
            id="geo", hosts=("g",), pricing={"per_call": [{"up_to": 2, "price": "0.01"}, {"price": "0.02"}]}
        ),
        ConnectorConfig(
            id="tr", hosts=("t",), pricing={"per_unit": {"field": "text", "per": 1000, "price": "0.02"}}
        ),
        ConnectorConfig(id="eu", hosts=("e",), pricing={"per_call": "0.10", "currency": "EUR"}),
        ConnectorConfig(id="llm", hosts=("l",), usage="openai"),
    )
    settings = Settings(prices=prices, fx={"EUR/USD": "1.08"}, connectors=connectors, **fields)  # type: ignore[arg-type]
    return Pricer(settings, now=NOW)


def test_price_estimate_llm_and_units() -> None:
    p = pricer()
    llm = p.connectors.get("llm")
    assert llm is None
    conn = ConnectorConfig(id="llm", hosts=("l",), usage="openai")
    # 1,000 bytes in (each token at least a byte) + 50 out: 1000 x 1000 + 50 x 2000 nanos
    assert (
        p.price_estimate(conn, {"model": "m", "input_text_bytes": 1000, "max_output_tokens": 50}, NOW)
        == 1_100_000
    )
    # the card's max_output bounds an estimate without max_output_tokens
    assert p.price_estimate(conn, {"model": "m", "input_tokens": 0}, NOW) == 200_000
    with pytest.raises(PriceUnknown):
        p.price_estimate(conn, {"model": "nope-model-x", "input_tokens": 1}, NOW)
    geo = ConnectorConfig(id="geo", hosts=("g",))
    # an API reserve of a tiered connector holds the dearest tier
    assert p.price_estimate(geo, {"units": 3, "unit": "call"}, NOW) == parse_nanos("0.06")
    tr = ConnectorConfig(id="tr", hosts=("t",))
    assert p.price_estimate(tr, {"units": "1500", "unit": "characters"}, NOW) == parse_nanos("0.04")
    with pytest.raises(PriceUnknown):
        p.price_estimate(tr, {"units": 1, "unit": "bytes"}, NOW)
    eu = ConnectorConfig(id="eu", hosts=("e",))
    assert p.price_estimate(eu, {"units": 1, "unit": "call"}, NOW) == parse_nanos("0.108")


def test_actual_cost_from_usage() -> None:
    p = pricer()
    conn = ConnectorConfig(id="llm", hosts=("l",), usage="openai")
    usage = Usage(input_tokens=10, output_tokens=5, model="m")
    assert p.actual_cost(conn, usage, now=NOW) == 10 * 1000 + 5 * 2000
    assert p.actual_cost(conn, {"model": "m", "input_tokens": 10, "output_tokens": 5}, now=NOW) == 20_000
    assert p.actual_cost(conn, Usage(input_tokens=1, output_tokens=1, model="unknown-zz"), now=NOW) is None
    tr = ConnectorConfig(id="tr", hosts=("t",))
    assert p.actual_cost(tr, {"units": 999, "unit": "characters"}, now=NOW) == parse_nanos("0.02")


def test_fx_missing_rate_and_stale_card() -> None:
    p = pricer()
    with pytest.raises(FxRateUnknown):
        p.to_budget(100, "GBP", NOW)
    stale = Pricer(
        Settings(
            prices={"updated_at": "2020-01-01T00:00:00Z", "max_age": "1h", "models": {"m": {"input": "1.00"}}}
        ),
        now=NOW,
    )
    conn = ConnectorConfig(id="llm", hosts=("l",))
    with pytest.raises(PriceStale):
        stale.price_estimate(conn, {"model": "m", "input_tokens": 1, "max_output_tokens": 0}, NOW)


def test_connector_charge_counts_the_call_itself() -> None:
    p = pricer()
    quote = Quote(
        basis="connector", amount=parse_nanos("0.02"), quantity="1", unit="call",
        tier_key="geo/2026-11", pricing=p.connectors["geo"],
    )  # fmt: skip
    assert p.connector_charge(quote, 2, NOW) == parse_nanos("0.01")  # the 2nd call: first tier
    assert p.connector_charge(quote, 3, NOW) == parse_nanos("0.02")  # the 3rd: second tier
    assert p.connector_charge(quote, 1000, NOW) == parse_nanos("0.02")  # never above the hold


# ---------------------------------------------------------------- metering


def meter(quote: Quote, usage: str | None = None, pricing: dict[str, object] | None = None) -> Meter:
    connector = ConnectorConfig(id="c", hosts=("h",), usage=usage, pricing=pricing)
    kind = usage_kind(connector, quote, "/v1/chat/completions")
    return Meter(pricer(), connector, quote, kind, quote.amount, lambda: NOW)


def test_metering_decisions() -> None:
    flat = Quote(basis="connector", amount=100, quantity="1", unit="call", pricing=pricer().connectors["eu"])
    m = meter(flat)
    assert m.kind == "flat"
    assert m.from_body(500, {}, b"{}").commit is False  # an error without usage is released
    fallback = Quote(basis="fallback", amount=30, quantity="1", unit="call")
    m = meter(fallback, usage="openai")
    unread = m.from_body(200, {}, b"not json")
    assert (unread.commit, unread.amount, unread.estimated, unread.reason) == (
        True,
        30,
        True,
        "usage_unreadable",
    )
    assert m.from_body(404, {}, b"{}").commit is False
    header = meter(Quote(basis="connector", amount=10**8, quantity="1", unit="call"), usage="header:x-cost")
    settled = header.from_body(200, {"x-cost": "0.0123"}, b"")
    assert (settled.amount, settled.estimated) == (parse_nanos("0.0123"), False)
    assert header.from_body(200, {}, b"").estimated is True
