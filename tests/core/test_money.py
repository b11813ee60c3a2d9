"""Exact money (paymaster.money): decimal strings in, integer nanos inside, never a float."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from paymaster.errors import InvalidAmount
from paymaster.money import (
    MAX_NANOS,
    NANOS_PER_UNIT,
    Money,
    ceil_div,
    check_currency,
    decimal_to_nanos_ceil,
    format_nanos,
    fraction_string,
    parse_nanos,
)

nanos = st.integers(min_value=-MAX_NANOS, max_value=MAX_NANOS)
decimal_texts = st.from_regex(r"\A(0|[1-9][0-9]{0,8})(\.[0-9]{1,9})?\Z", fullmatch=True)


# ---------------------------------------------------------------- round trips


@given(nanos)
def test_format_then_parse_is_the_identity(value: int) -> None:
    text = format_nanos(value)
    assert parse_nanos(text, allow_negative=True) == value
    assert Decimal(text) == Decimal(value) / NANOS_PER_UNIT  # exactly: no float on the way


@given(decimal_texts)
def test_parse_then_format_keeps_the_value(text: str) -> None:
    value = parse_nanos(text)
    assert value == Decimal(text) * NANOS_PER_UNIT
    formatted = format_nanos(value)
    assert Decimal(formatted) == Decimal(text)
    assert parse_nanos(formatted) == value


@given(nanos)
def test_format_has_at_least_two_decimals_and_no_trailing_zero_beyond(value: int) -> None:
    whole, _, frac = format_nanos(value).lstrip("-").partition(".")
    assert whole.isdigit()
    assert 2 <= len(frac) <= 9
    assert len(frac) == 2 or not frac.endswith("0")


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("0.0075", 7_500_000),
        ("20.00", 20 * NANOS_PER_UNIT),
        ("0.000000001", 1),
        ("1000000000", MAX_NANOS),
        ("007.5", 7_500_000_000),
    ],
)
def test_known_values(text: str, value: int) -> None:
    assert parse_nanos(text) == value


@pytest.mark.parametrize(
    ("value", "text"), [(0, "0.00"), (1, "0.000000001"), (7_500_000, "0.0075"), (-1_500_000_000, "-1.50")]
)
def test_known_formats(value: int, text: str) -> None:
    assert format_nanos(value) == text


# ---------------------------------------------------------------- what is refused


@pytest.mark.parametrize(
    "value",
    [
        0.1,  # a JSON number, even a "nice" one
        1,
        0,
        True,
        None,
        Decimal("0.1"),
        [],
        {"amount": "1"},
    ],
)
def test_anything_but_a_string_is_refused(value: Any) -> None:
    with pytest.raises(InvalidAmount) as exc:
        parse_nanos(value)
    assert (exc.value.code, exc.value.status) == ("invalid_amount", 422)


@pytest.mark.parametrize(
    "text",
    [
        "NaN",
        "nan",
        "Infinity",
        "-Infinity",
        "inf",
        "1e3",
        "1E3",
        "1.5e-3",
        "0x10",
        "1.0000000001",  # ten decimals
        "0.0000000001",
        " 1",
        "1 ",
        "1\n",
        "\t1",
        "1 000",
        "\u00a01",
        "",
        ".",
        ".5",
        "5.",
        "+1",
        "--1",
        "1,5",
        "1.2.3",
        "١٢",  # digits, but not ASCII ones
        "1_000",
    ],
)
def test_malformed_strings_are_refused(text: str) -> None:
    with pytest.raises(InvalidAmount):
        parse_nanos(text)


@pytest.mark.parametrize(
    "text", ["1000000000.000000001", "1000000001", "9" * 13, "1" + "0" * 30, "9" * 10_000 + ".5"]
)
def test_absurd_sizes_are_refused(text: str) -> None:
    with pytest.raises(InvalidAmount):
        parse_nanos(text)


@given(st.integers(min_value=1, max_value=MAX_NANOS))
def test_negative_amounts_only_where_allowed(value: int) -> None:
    text = format_nanos(-value)
    with pytest.raises(InvalidAmount):
        parse_nanos(text)
    assert parse_nanos(text, allow_negative=True) == -value


def test_zero_only_where_allowed() -> None:
    assert parse_nanos("0.00") == 0
    for text in ("0", "0.000000000", "-0"):
        with pytest.raises(InvalidAmount):
            parse_nanos(text, allow_zero=False)
    assert parse_nanos("0.000000001", allow_zero=False) == 1


def test_the_error_names_the_field() -> None:
    with pytest.raises(InvalidAmount, match="limit"):
        parse_nanos("1e3", field="limit")


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_floats_are_always_refused(value: float) -> None:
    with pytest.raises(InvalidAmount):
        parse_nanos(value)


# ---------------------------------------------------------------- rounding goes against the spender


@given(st.integers(min_value=0, max_value=10**30), st.integers(min_value=1, max_value=10**12))
def test_ceil_div_rounds_up_and_never_more(numerator: int, denominator: int) -> None:
    q = ceil_div(numerator, denominator)
    assert q >= Fraction(numerator, denominator) > q - 1


@pytest.mark.parametrize("denominator", [0, -1])
def test_ceil_div_needs_a_positive_denominator(denominator: int) -> None:
    with pytest.raises(ValueError):
        ceil_div(1, denominator)


@given(
    st.decimals(
        min_value=Decimal("-1e6"), max_value=Decimal("1e6"), allow_nan=False, allow_infinity=False, places=15
    )
)
def test_decimal_to_nanos_rounds_up(value: Decimal) -> None:
    result = decimal_to_nanos_ceil(value)
    exact = value * NANOS_PER_UNIT
    assert result >= exact > result - 1
    assert decimal_to_nanos_ceil(str(value)) == result


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0.0000000001", 1), ("0.0000000019", 2), ("2.50", 2_500_000_000), ("-0.0000000019", -1), ("0", 0)],
)
def test_decimal_to_nanos_examples(value: str, expected: int) -> None:
    assert decimal_to_nanos_ceil(value) == expected


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "abc"])
def test_decimal_to_nanos_refuses_what_is_not_a_finite_decimal(value: str) -> None:
    with pytest.raises(InvalidAmount):
        decimal_to_nanos_ceil(value)


@given(st.integers(min_value=0, max_value=10**15), st.integers(min_value=1, max_value=10**12))
def test_fraction_string_rounds_up(numerator: int, denominator: int) -> None:
    text = fraction_string(numerator, denominator)
    assert Decimal(text) >= Decimal(numerator) / Decimal(denominator) - Decimal("1e-30")
    assert Fraction(text) >= Fraction(numerator, denominator)
    assert Fraction(text) - Fraction(numerator, denominator) < Fraction(1, 10**4)


@pytest.mark.parametrize(
    ("args", "expected"),
    [((1, 3), "0.3334"), ((2, 4), "0.5"), ((91, 100), "0.91"), ((5, 5), "1"), ((0, 7), "0")],
)
def test_fraction_string_examples(args: tuple[int, int], expected: str) -> None:
    assert fraction_string(*args) == expected


# ---------------------------------------------------------------- Money and currencies


def test_money_parses_formats_and_goes_on_the_wire() -> None:
    money = Money.parse("0.0075", "EUR")
    assert (money.nanos, money.currency) == (7_500_000, "EUR")
    assert str(money) == "0.0075"
    assert money.to_wire() == {"amount": "0.0075", "currency": "EUR"}
    with pytest.raises(InvalidAmount):
        Money.parse(0.0075)


@pytest.mark.parametrize("code", ["usd", "US", "USDT", "", 840, None, "U5D"])
def test_currencies_are_iso_4217_codes(code: Any) -> None:
    with pytest.raises(InvalidAmount):
        check_currency(code)
    assert check_currency("USD") == "USD"
