"""Rate cards, FX, connector tiers, the LLM worst case and the actual cost."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from paymaster.core.pricing import (
    UNBOUNDED_OUTPUT,
    ConnectorPricing,
    FxTable,
    ModelPrice,
    PriceTier,
    RateCard,
    llm_cost,
    llm_input_bound,
    llm_output_bound,
    llm_worst_case,
    max_output_that_fits,
    parse_duration,
    worst_case_nanos,
)
from paymaster.errors import FxRateUnknown, InvalidAmount, InvalidRequest, PriceStale, PriceUnknown
from paymaster.money import parse_nanos

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
M = 1_000_000


def usd(text: str) -> int:
    return parse_nanos(text)


@dataclass
class U:
    """A TokenUsage for the cost functions (paymaster.usage.Usage has the same fields)."""

    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cache_write_1h_tokens: int = 0


def card(models: dict[str, dict[str, object]] | None = None, **table: object) -> RateCard:
    prices: dict[str, object] = dict(table)
    if models is not None:
        prices["models"] = models
    return RateCard.from_config(prices, now_default=NOW)


# --------------------------------------------------------------------------- built-in defaults


def test_default_gpt4o_exists_and_matches_a_manual_override() -> None:
    default = card().lookup("gpt-4o")
    assert default is not None
    assert default.source == "genai-prices"
    manual = card({"gpt-4o": {"input": "2.50", "output": "10.00", "cached_input": "1.25"}}).lookup("gpt-4o")
    assert manual is not None
    assert manual.source == "config"
    for name in ("input", "output", "cached_input", "cache_write", "reasoning", "currency"):
        assert getattr(default, name) == getattr(manual, name), name
    assert default.input == 2_500_000_000  # nanos per million tokens: $2.50 / Mtok
    assert default.reasoning == default.output


def test_dated_snapshots_and_aliases_find_the_model() -> None:
    rates = card()
    base = rates.lookup("gpt-4o")
    assert rates.lookup("gpt-4o-2024-08-06") == base
    assert rates.lookup("GPT-4o") == base
    assert rates.lookup("openai/gpt-4o") == base
    assert rates.lookup("gpt-4o", provider="openai") == base
    sonnet = rates.lookup("claude-sonnet-4-5-20250929")
    assert sonnet is not None
    assert sonnet == rates.lookup("claude-sonnet-4-5")
    assert sonnet.cache_write is not None and sonnet.cache_write > sonnet.input  # 1.25x writes
    assert rates.lookup("text-embedding-3-small") is not None  # outside OpenAI's gpt-/o naming rule
    assert rates.lookup("no-such-model-anywhere") is None
    assert rates.lookup("") is None
    assert rates.lookup("x" * 1000) is None


def test_override_for_canonical_id_applies_to_its_dated_snapshots() -> None:
    rates = card({"gpt-4o": {"input": "3.00", "output": "12.00", "max_output": 16384}})
    snapshot = rates.lookup("gpt-4o-2024-08-06")
    assert snapshot is not None
    assert (snapshot.input, snapshot.output, snapshot.max_output) == (usd("3"), usd("12"), 16384)
    # Unset fields come from the default; reasoning follows the configured output price.
    assert snapshot.cached_input == usd("1.25")
    assert snapshot.reasoning == usd("12")


def test_override_of_an_unknown_model_by_date_suffix() -> None:
    rates = card({"acme-llm": {"input": "1", "output": "2"}})
    assert rates.lookup("acme-llm-2025-01-31") == rates.lookup("acme-llm")
    assert rates.lookup("acme-llm-20250131") == rates.lookup("acme-llm")
    assert rates.lookup("acme-llm-mini") is None


def test_max_output_alone_keeps_the_default_prices() -> None:
    rates = card({"gpt-4o": {"max_output": 16384}})
    price = rates.lookup("gpt-4o")
    default = card().lookup("gpt-4o")
    assert price is not None and default is not None
    assert price.max_output == 16384
    assert (price.input, price.output) == (default.input, default.output)


def test_without_builtin_defaults_only_the_card_prices() -> None:
    rates = RateCard.from_config(
        {"models": {"m": {"input": "1", "output": "1"}}}, now_default=NOW, builtin_defaults=False
    )
    assert rates.lookup("gpt-4o") is None
    assert rates.lookup("m") is not None


def test_service_tier_prices_from_the_defaults() -> None:
    rates = card()
    standard = rates.lookup("gpt-4o")
    priority = rates.lookup("gpt-4o", service_tier="priority")
    assert standard is not None and priority is not None
    assert priority.input > standard.input
    assert rates.lookup("gpt-4o", service_tier="auto") == standard
    assert rates.lookup("gpt-4o", service_tier="unheard-of") == standard


def test_defaults_are_read_offline_from_the_wheel() -> None:
    """Importing the module does not import genai-prices; a lookup with sockets disabled and a
    replaced process-wide genai-prices snapshot still finds the bundled prices."""
    code = """
import socket, sys
from datetime import UTC, datetime
import paymaster.core.pricing as pricing
assert "genai_prices" not in sys.modules, "genai_prices imported eagerly"
def refuse(*args, **kwargs):
    raise AssertionError("network access")
socket.socket.connect = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse
from genai_prices import data_snapshot
data_snapshot.set_custom_snapshot(data_snapshot.DataSnapshot(providers=[], from_auto_update=True))
import threading
before = threading.active_count()
price = pricing.RateCard.from_config(None, now_default=datetime(2026, 11, 24, tzinfo=UTC)).lookup("gpt-4o")
assert price is not None and price.input == 2_500_000_000, price
assert threading.active_count() == before, "a background thread was started"
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_genai_prices_conditional_and_time_of_day_prices() -> None:
    from genai_prices import types as gp

    from paymaster.core.pricing import _gp_resolve, _price_from_steps

    info = gp.ModelInfo(
        id="x",
        match=gp.ClauseEquals(equals="x"),
        prices=[
            gp.ConditionalPrice(prices=gp.ModelPrice(input_mtok=Decimal("1"), output_mtok=Decimal("2"))),
            gp.ConditionalPrice(
                constraint=gp.StartDateConstraint(start_date=datetime(2026, 6, 1).date()),
                prices=gp.ModelPrice(input_mtok=Decimal("0.5"), output_mtok=Decimal("1")),
            ),
            gp.ConditionalPrice(
                constraint=gp.TimeOfDateConstraint(
                    start_time=time(1, 0, tzinfo=UTC), end_time=time(4, 0, tzinfo=UTC)
                ),
                prices=gp.ModelPrice(input_mtok=Decimal("0.75"), output_mtok=Decimal("0.5")),
            ),
        ],
    )

    def resolve(at: datetime) -> ModelPrice:
        price = _price_from_steps(_gp_resolve(info, at, None), max_output=None, currency="USD", source="t")
        assert price is not None
        return price

    before = resolve(datetime(2026, 5, 31, tzinfo=UTC))
    assert (before.input, before.output) == (usd("1"), usd("2"))
    # After the new price starts: the dearest of it and the (later, time-of-day) peak price.
    after = resolve(datetime(2026, 6, 2, tzinfo=UTC))
    assert (after.input, after.output) == (usd("0.75"), usd("1"))


def test_genai_prices_tiers_become_price_tiers() -> None:
    from genai_prices import types as gp

    from paymaster.core.pricing import _gp_resolve, _price_from_steps

    info = gp.ModelInfo(
        id="t",
        match=gp.ClauseEquals(equals="t"),
        prices=gp.ModelPrice(
            input_mtok=gp.TieredPrices(base=Decimal("3"), tiers=[gp.Tier(start=200_000, price=Decimal("6"))]),
            output_mtok=Decimal("15"),
            cache_read_mtok=Decimal("0.3000000001"),  # rounds up to a whole nano
        ),
    )
    price = _price_from_steps(_gp_resolve(info, NOW, None), max_output=None, currency="USD", source="t")
    assert price is not None
    assert price.cached_input == 300_000_001
    assert price.tiers == (PriceTier(200_000, usd("6"), usd("15"), 300_000_001, None, None, usd("15")),)
    assert price.at(200_000).input == usd("3")
    assert price.at(200_001).input == usd("6")


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("value", [2.5, 2, True, "2.5e0", "-1", " 2.5", "1.0000000001"])
def test_model_prices_must_be_decimal_strings(value: object) -> None:
    with pytest.raises(InvalidAmount):
        card({"gpt-4o": {"input": value, "output": "10"}})


@pytest.mark.parametrize(
    "table",
    [
        {"models": {"gpt-4o": {"inputs": "1"}}},
        {"model": {}},
        {"models": {"acme": {"output": "1"}}},  # unknown to the defaults and no input price
        {"models": {"gpt-4o": {"max_output": "4096"}}},
        {"models": {"gpt-4o": {"max_output": 0}}},
        {"updated_at": "2026-11-24"},  # no offset
        {"updated_at": "yesterday"},
        {"max_age": "1 day"},
        {"max_age": 24},
        {"max_age": "0h"},
        {"max_age": "\u0663h"},
    ],
)
def test_bad_prices_tables_are_refused(table: dict[str, object]) -> None:
    with pytest.raises((InvalidRequest, InvalidAmount)):
        RateCard.from_config(table, now_default=NOW)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24h", timedelta(hours=24)),
        ("7d", timedelta(days=7)),
        ("90m", timedelta(minutes=90)),
        ("30s", timedelta(seconds=30)),
        ("2w", timedelta(weeks=2)),
        ("1h30m", timedelta(minutes=90)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


def test_toml_datetimes_are_accepted() -> None:
    rates = RateCard.from_config({"updated_at": NOW, "max_age": "1h"}, now_default=NOW)
    assert rates.updated_at == NOW


# --------------------------------------------------------------------------- freshness


def test_stale_card_raises_price_stale() -> None:
    rates = card(updated_at="2026-11-24T00:00:00Z", max_age="24h")
    rates.check_fresh(datetime(2026, 11, 24, 23, 59, tzinfo=UTC))
    rates.check_fresh(datetime(2026, 11, 25, 0, 0, tzinfo=UTC))  # exactly max_age old: still fresh
    with pytest.raises(PriceStale):
        rates.check_fresh(datetime(2026, 11, 25, 0, 0, 1, tzinfo=UTC))


def test_card_without_updated_at_is_fresh_as_of_loading() -> None:
    rates = card(max_age="1h")
    assert rates.updated_at == NOW
    rates.check_fresh(NOW + timedelta(minutes=59))
    with pytest.raises(PriceStale):
        rates.check_fresh(NOW + timedelta(hours=2))


def test_defaults_alone_never_go_stale() -> None:
    card().check_fresh(NOW + timedelta(days=3650))
    RateCard.from_config(None, now_default=NOW).check_fresh(NOW + timedelta(days=3650))


# --------------------------------------------------------------------------- FX


def fx(**extra: str) -> FxTable:
    return FxTable.from_config(
        {"updated_at": "2026-11-24T00:00:00Z", "max_age": "24h", "EUR/USD": "1.08", **extra}
    )


def test_fx_both_directions_round_up() -> None:
    table = fx()
    assert table.convert(usd("1"), "EUR", "USD", NOW) == usd("1.08")
    # 1 / 1.08 = 0.925925925925…: rounded up against the spender.
    assert table.convert(usd("1"), "USD", "EUR", NOW) == 925_925_926
    assert table.convert(0, "USD", "EUR", NOW) == 0
    assert table.convert(usd("5"), "USD", "USD", NOW) == usd("5")


@given(st.integers(min_value=0, max_value=10**18), st.sampled_from([("EUR", "USD"), ("USD", "EUR")]))
def test_fx_conversion_is_the_smallest_amount_not_below_the_exact_one(
    nanos: int, pair: tuple[str, str]
) -> None:
    table = fx()
    converted = table.convert(nanos, pair[0], pair[1], NOW)
    exact = Decimal(nanos) * Decimal("1.08") if pair == ("EUR", "USD") else Decimal(nanos) / Decimal("1.08")
    assert converted >= exact
    assert converted - 1 < exact


def test_fx_missing_and_stale() -> None:
    table = fx()
    with pytest.raises(FxRateUnknown):
        table.convert(usd("1"), "GBP", "USD", NOW)
    with pytest.raises(FxRateUnknown):
        FxTable.from_config(None).convert(usd("1"), "EUR", "USD", NOW)
    with pytest.raises(PriceStale):
        table.convert(usd("1"), "EUR", "USD", NOW + timedelta(days=2))
    # Same currency needs no rate and cannot be stale.
    assert table.convert(usd("1"), "USD", "USD", NOW + timedelta(days=2)) == usd("1")


@pytest.mark.parametrize(
    "table",
    [
        {"EUR/USD": 1.08},
        {"EUR/USD": "0"},
        {"EUR/USD": "1e3"},
        {"EURUSD": "1"},
        {"EUR/EUR": "1"},
        {"eur/usd": "1"},
        {"EUR/USD": "\u0661"},
    ],
)
def test_bad_fx_tables_are_refused(table: dict[str, object]) -> None:
    with pytest.raises((InvalidAmount, InvalidRequest)):
        FxTable.from_config(table)


def test_fx_max_age_needs_a_time() -> None:
    with pytest.raises(InvalidRequest):
        FxTable.from_config({"max_age": "1h", "EUR/USD": "1.08"})
    table = FxTable.from_config({"max_age": "1h", "EUR/USD": "1.08"}, now_default=NOW)
    with pytest.raises(PriceStale):
        table.convert(1, "EUR", "USD", NOW + timedelta(hours=2))


# --------------------------------------------------------------------------- connector pricing

GEOCODE = {"per_call": [{"up_to": 50000, "price": "0.005"}, {"price": "0.012"}], "period": "month"}


def test_tier_boundary_50000th_vs_50001st_call() -> None:
    pricing = ConnectorPricing.from_config(GEOCODE, default_currency="USD")
    assert pricing.tiered and pricing.period == "month" and pricing.currency == "USD"
    assert pricing.price_per_call(0) == usd("0.005")
    assert pricing.price_per_call(49_999) == usd("0.005")  # the 50,000th call
    assert pricing.price_per_call(50_000) == usd("0.012")  # the 50,001st call
    assert pricing.price_per_call(10**9) == usd("0.012")


def test_bounded_last_tier_and_flat_price() -> None:
    quota = ConnectorPricing.from_config({"per_call": [{"up_to": 10, "price": "0"}]}, default_currency="EUR")
    assert quota.currency == "EUR"
    assert quota.price_per_call(9) == 0
    with pytest.raises(PriceUnknown):
        quota.price_per_call(10)
    flat = ConnectorPricing.from_config({"per_call": "0.01", "currency": "GBP"}, default_currency="USD")
    assert not flat.tiered
    assert flat.price_per_call(123_456) == usd("0.01")
    assert flat.currency == "GBP"


@pytest.mark.parametrize(
    "table",
    [
        {"per_call": [{"up_to": 10, "price": "1"}, {"up_to": 10, "price": "2"}]},
        {"per_call": [{"price": "1"}, {"up_to": 10, "price": "2"}]},
        {"per_call": [{"up_to": 10, "price": 1}]},
        {"per_call": [{"up_to": "10", "price": "1"}]},
        {"per_call": []},
        {"per_call": "0.01", "period": "fortnight"},
        {"per_call": "0.01", "currency": "usd"},
        {"per_call": "0.01", "pre_unit": {}},
        {},
        {"per_unit": {"field": "text", "per": 0, "price": "1"}},
        {"per_unit": {"field": "text", "unit": "words", "price": "1"}},
        {"per_unit": {"field": "text", "price": 0.02}},
    ],
)
def test_bad_connector_pricing_is_refused(table: dict[str, object]) -> None:
    with pytest.raises((InvalidRequest, InvalidAmount)):
        ConnectorPricing.from_config(table, default_currency="USD")


def test_per_unit_rounds_up_to_whole_blocks() -> None:
    pricing = ConnectorPricing.from_config(
        {"per_unit": {"field": "text", "per": 1000, "unit": "characters", "price": "0.02"}},
        default_currency="USD",
    )
    assert pricing.price_per_call(5) == 0
    assert pricing.price_units({"text": ""}) == (0, 0, "characters")
    assert pricing.price_units({"text": "a"}) == (usd("0.02"), 1, "characters")
    assert pricing.price_units({"text": "a" * 1000}) == (usd("0.02"), 1000, "characters")
    assert pricing.price_units({"text": "a" * 1001}) == (usd("0.04"), 1001, "characters")
    assert pricing.price_units({"text": ["é" * 600, "b" * 600]}) == (usd("0.04"), 1200, "characters")
    assert pricing.price({"text": "a" * 1001}, calls_before=0) == usd("0.04")
    with pytest.raises(InvalidRequest):
        pricing.price_units({"txt": "a"})
    with pytest.raises(InvalidRequest):
        pricing.price_units({"text": 12})


def test_per_unit_bytes_items_and_dotted_fields() -> None:
    by_bytes = ConnectorPricing.from_config(
        {"per_unit": {"field": "q.text", "per": 4, "unit": "bytes", "price": "1"}}, default_currency="USD"
    )
    assert by_bytes.price_units({"q": {"text": "日本"}}) == (usd("2"), 6, "bytes")  # 6 bytes: 2 blocks of 4
    by_items = ConnectorPricing.from_config(
        {"per_call": "0.001", "per_unit": {"field": "addresses", "unit": "items", "price": "0.003"}},
        default_currency="USD",
    )
    assert by_items.price_units({"addresses": ["a", "b", "c"]}) == (usd("0.009"), 3, "items")
    assert by_items.price({"addresses": ["a"]}, calls_before=0) == usd("0.004")


# --------------------------------------------------------------------------- LLM bounds

BODY = {
    "model": "gpt-4o",
    "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Grüß dich, 日本"}],
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    "temperature": 0.2,
    "max_tokens": 256,
}


def test_input_bound_is_the_utf8_size_of_the_compact_json_of_the_prompt_fields() -> None:
    subset = {"messages": BODY["messages"], "tools": BODY["tools"]}
    expected = len(json.dumps(subset, separators=(",", ":"), ensure_ascii=False).encode())
    assert llm_input_bound(BODY) == expected
    assert llm_input_bound({"model": "m", "temperature": 1}) == 0
    assert llm_input_bound({"input": "ab"}) == len('{"input":"ab"}')
    assert llm_input_bound({"input": "日"}) == len('{"input":""}') + 3


def test_output_bound() -> None:
    price = ModelPrice(input=1, output=1, max_output=4096)
    assert llm_output_bound({"max_tokens": 10}, price) == 10
    assert llm_output_bound({"max_completion_tokens": 20}, price) == 20
    assert llm_output_bound({"max_output_tokens": 30}, price) == 30
    assert llm_output_bound({"max_tokens": 10, "max_completion_tokens": 40}, price) == 40
    assert llm_output_bound({"max_tokens": None}, price) == 4096
    assert llm_output_bound({}, ModelPrice(input=1, output=1)) is None
    assert llm_output_bound({}, ModelPrice(input=1, output=None)) == 0  # embeddings
    assert llm_output_bound({"max_tokens": 10, "n": 3}, price) == 30
    assert llm_output_bound({"n": 2}, price) == 8192


@pytest.mark.parametrize("value", [-1, 1.5, "10", True, [10]])
def test_output_bound_must_be_a_whole_number(value: object) -> None:
    with pytest.raises(InvalidRequest):
        llm_output_bound({"max_tokens": value}, ModelPrice(input=1, output=1))


def test_worst_case_of_a_request() -> None:
    rates = card(
        {"gpt-4o": {"input": "2.50", "output": "10.00", "cached_input": "1.25", "max_output": 16384}}
    )
    estimate = llm_worst_case(rates, BODY)
    assert estimate.model == "gpt-4o"
    assert estimate.input_tokens == llm_input_bound(BODY)
    assert estimate.output_tokens == 256
    assert estimate.amount_nanos == -(-(estimate.input_tokens * usd("2.5") + 256 * usd("10")) // M)
    assert estimate.currency == "USD"
    assert estimate.price == rates.lookup("gpt-4o")
    without_bound = {k: v for k, v in BODY.items() if k != "max_tokens"}
    assert llm_worst_case(rates, without_bound).output_tokens == 16384


def test_worst_case_refuses_what_it_cannot_price() -> None:
    rates = card()
    with pytest.raises(PriceUnknown):
        llm_worst_case(rates, {"model": "no-such-model", "max_tokens": 1})
    with pytest.raises(PriceUnknown):
        llm_worst_case(rates, {"messages": []})
    with pytest.raises(PriceUnknown):  # gpt-4o has no max_output among the defaults
        llm_worst_case(rates, {"model": "gpt-4o", "messages": []})
    embedding = llm_worst_case(rates, {"model": "text-embedding-3-small", "input": "hello"})
    assert embedding.output_tokens == 0


# --------------------------------------------------------------------------- actual cost

GPT = ModelPrice(input=usd("2.5"), output=usd("10"), cached_input=usd("1.25"))
CLAUDE = ModelPrice(
    input=usd("3"),
    output=usd("15"),
    cached_input=usd("0.3"),
    cache_write=usd("3.75"),
    cache_write_1h=usd("6"),
)


def test_cost_bills_cached_input_and_reasoning_once() -> None:
    usage = U(input_tokens=1000, output_tokens=500, cached_input_tokens=400, reasoning_tokens=200)
    # 600 x 2.5 + 400 x 1.25 + 500 x 10 (reasoning inside the output) per million.
    assert (
        llm_cost(GPT, usage) == (600 * usd("2.5") + 400 * usd("1.25") + 500 * usd("10")) // M == usd("0.007")
    )
    assert llm_cost(GPT, U(1000, 500, 400, 0, 500)) == llm_cost(GPT, U(1000, 500, 400, 0, 0))


def test_cost_bills_cache_writes_at_their_price() -> None:
    usage = U(input_tokens=10_000, output_tokens=100, cached_input_tokens=3000, cache_write_tokens=2000)
    expected = 5000 * usd("3") + 3000 * usd("0.3") + 2000 * usd("3.75") + 100 * usd("15")
    assert llm_cost(CLAUDE, usage) == -(-expected // M)
    one_hour = U(10_000, 100, 3000, 2000, 0, cache_write_1h_tokens=500)
    expected_1h = 5000 * usd("3") + 3000 * usd("0.3") + 1500 * usd("3.75") + 500 * usd("6") + 100 * usd("15")
    assert llm_cost(CLAUDE, one_hour) == -(-expected_1h // M)


def test_cost_rounds_up_and_uses_the_input_price_when_no_cache_price() -> None:
    assert llm_cost(ModelPrice(input=1, output=1), U(1, 0)) == 1
    assert (
        llm_cost(ModelPrice(input=usd("1"), output=usd("1")), U(100, 0, cached_input_tokens=50)) == 100 * 1000
    )
    with pytest.raises(PriceUnknown):
        llm_cost(ModelPrice(input=1, output=None), U(1, 1))
    assert llm_cost(ModelPrice(input=usd("0.02"), output=None), U(8, 0)) == 160


def test_cost_uses_the_tier_of_the_call() -> None:
    tiered = ModelPrice(input=usd("3"), output=usd("15"), tiers=(PriceTier(200_000, usd("6"), usd("22.5")),))
    assert llm_cost(tiered, U(200_000, 1000)) == (200_000 * usd("3") + 1000 * usd("15")) // M
    assert llm_cost(tiered, U(200_001, 1000)) == -(-(200_001 * usd("6") + 1000 * usd("22.5")) // M)
    assert worst_case_nanos(tiered, 200_000, 1000) == llm_cost(tiered, U(200_000, 1000))


# --------------------------------------------------------------------------- properties

prices_per_mtok = st.integers(min_value=0, max_value=200 * 10**9)
optional_prices = st.none() | prices_per_mtok


@st.composite
def model_prices(draw: st.DrawFn) -> ModelPrice:
    output = draw(optional_prices)
    tiers = tuple(
        PriceTier(
            above_input_tokens=above,
            input=draw(prices_per_mtok),
            output=draw(prices_per_mtok) if output is not None else None,
            cached_input=draw(optional_prices),
            cache_write=draw(optional_prices),
            cache_write_1h=draw(optional_prices),
            reasoning=draw(optional_prices) if output is not None else None,
        )
        for above in sorted(draw(st.sets(st.integers(min_value=0, max_value=300_000), max_size=2)))
    )
    return ModelPrice(
        input=draw(prices_per_mtok),
        output=output,
        cached_input=draw(optional_prices),
        cache_write=draw(optional_prices),
        reasoning=draw(optional_prices) if output is not None else None,
        cache_write_1h=draw(optional_prices),
        tiers=tiers,
    )


@st.composite
def price_bounds_and_usage(draw: st.DrawFn) -> tuple[ModelPrice, int, int, U]:
    price = draw(model_prices())
    input_bound = draw(st.integers(min_value=0, max_value=400_000))
    output_bound = draw(st.integers(min_value=0, max_value=200_000)) if price.output is not None else 0
    input_tokens = draw(st.integers(min_value=0, max_value=input_bound))
    cached = draw(st.integers(min_value=0, max_value=input_tokens))
    writes = draw(st.integers(min_value=0, max_value=input_tokens - cached))
    output_tokens = draw(st.integers(min_value=0, max_value=output_bound))
    usage = U(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cached_input_tokens=cached,
        cache_write_tokens=writes,
        reasoning_tokens=draw(st.integers(min_value=0, max_value=output_tokens)),
        cache_write_1h_tokens=draw(st.integers(min_value=0, max_value=writes)),
    )
    return price, input_bound, output_bound, usage


@given(price_bounds_and_usage())
def test_worst_case_covers_any_usage_within_the_bounds(case: tuple[ModelPrice, int, int, U]) -> None:
    price, input_bound, output_bound, usage = case
    assert worst_case_nanos(price, input_bound, output_bound) >= llm_cost(price, usage)


@given(
    model_prices(), st.integers(min_value=0, max_value=400_000), st.integers(min_value=0, max_value=10**10)
)
def test_max_output_that_fits_is_the_largest_that_fits(
    price: ModelPrice, input_tokens: int, budget: int
) -> None:
    fits = max_output_that_fits(price, input_tokens, budget)
    if price.output is None or worst_case_nanos(price, input_tokens, 0) > budget:
        assert fits == 0
        return
    assert worst_case_nanos(price, input_tokens, fits) <= budget
    if fits < UNBOUNDED_OUTPUT:  # else capped: output is (nearly) free
        assert worst_case_nanos(price, input_tokens, fits + 1) > budget


def test_max_output_that_fits_is_capped_by_max_output() -> None:
    price = ModelPrice(input=usd("1"), output=usd("1"), max_output=100)
    assert max_output_that_fits(price, 0, usd("1")) == 100
    assert max_output_that_fits(ModelPrice(input=usd("1"), output=usd("1")), 0, usd("1")) == M
    assert max_output_that_fits(ModelPrice(input=usd("1"), output=usd("1")), 2 * M, usd("1")) == 0
    assert max_output_that_fits(ModelPrice(input=usd("1"), output=0), 0, usd("1")) == 2**31 - 1
