"""Exact money: integer nano-units (1e-9 of the currency unit) and a currency.

Amounts never pass through a float. On the wire they are plain decimal strings
(``"0.0075"``); inside they are integers. Rounding always goes against the spender:
estimates and charges round up (see :func:`ceil_div`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from paymaster.errors import InvalidAmount

NANOS_PER_UNIT = 1_000_000_000
MAX_DECIMALS = 9
# The largest amount the ledger accepts: one billion currency units. Sums of many such
# amounts still fit a signed 64-bit integer column (9.2e18 nanos = 9.2e9 units).
MAX_UNITS = 1_000_000_000
MAX_NANOS = MAX_UNITS * NANOS_PER_UNIT

_DECIMAL_RE = re.compile(r"^(-)?([0-9]+)(?:\.([0-9]+))?$")
_CURRENCY_RE = re.compile(r"^[A-Z]{3}$")


def parse_nanos(
    value: Any,
    *,
    field: str = "amount",
    allow_zero: bool = True,
    allow_negative: bool = False,
) -> int:
    """Parse a decimal string into nano-units, or raise ``invalid_amount``.

    Rejects JSON numbers (ints and floats alike: money is a string on the wire), NaN,
    infinities, exponents, signs where they make no sense, more than nine decimals and
    amounts beyond :data:`MAX_UNITS`.
    """
    if isinstance(value, bool) or not isinstance(value, str):
        raise InvalidAmount(f'{field} must be a decimal string such as "0.12", not {type(value).__name__}')
    text = value.strip()
    match = _DECIMAL_RE.match(text)
    if match is None or text != value:
        raise InvalidAmount(f"{field} {value!r} is not a plain decimal string (no exponent, no spaces)")
    negative, whole, frac = match.group(1), match.group(2), match.group(3) or ""
    if len(frac) > MAX_DECIMALS:
        raise InvalidAmount(f"{field} {value!r} has more than {MAX_DECIMALS} decimals")
    if len(whole) > 12:
        raise InvalidAmount(f"{field} {value!r} is absurdly large")
    nanos = int(whole) * NANOS_PER_UNIT + int(frac.ljust(MAX_DECIMALS, "0") or "0")
    if nanos > MAX_NANOS:
        raise InvalidAmount(f"{field} {value!r} is above the maximum of {MAX_UNITS}")
    if negative:
        if not allow_negative and nanos != 0:
            raise InvalidAmount(f"{field} {value!r} must not be negative")
        nanos = -nanos
    if nanos == 0 and not allow_zero:
        raise InvalidAmount(f"{field} must be greater than zero")
    return nanos


def format_nanos(nanos: int) -> str:
    """Format nano-units as a decimal string with at least two decimals: ``"20.00"``, ``"0.0075"``."""
    sign = "-" if nanos < 0 else ""
    whole, frac = divmod(abs(nanos), NANOS_PER_UNIT)
    digits = f"{frac:09d}".rstrip("0")
    if len(digits) < 2:
        digits = digits.ljust(2, "0")
    return f"{sign}{whole}.{digits}"


def ceil_div(numerator: int, denominator: int) -> int:
    """Integer division rounding up (against the spender) for non-negative numerators."""
    if denominator <= 0:
        raise ValueError("denominator must be positive")
    return -((-numerator) // denominator)


def decimal_to_nanos_ceil(value: Decimal | str) -> int:
    """Convert an exact decimal (e.g. a rate-card price) to nanos, rounding up."""
    try:
        dec = Decimal(value)
    except InvalidOperation as exc:
        raise InvalidAmount(f"{value!r} is not a decimal") from exc
    if not dec.is_finite():
        raise InvalidAmount(f"{value!r} is not finite")
    scaled = dec * NANOS_PER_UNIT
    return int(scaled.to_integral_value(rounding="ROUND_CEILING"))


def fraction_string(numerator: int, denominator: int, places: int = 4) -> str:
    """``numerator / denominator`` as a decimal string, rounded up, trailing zeros trimmed."""
    if denominator <= 0:
        return "1" if numerator > 0 else "0"
    scale = 10**places
    q = ceil_div(numerator * scale, denominator) if numerator >= 0 else -((-numerator * scale) // denominator)
    whole, frac = divmod(abs(q), scale)
    sign = "-" if q < 0 else ""
    digits = f"{frac:0{places}d}".rstrip("0")
    return f"{sign}{whole}.{digits}" if digits else f"{sign}{whole}"


def check_currency(code: Any) -> str:
    if not isinstance(code, str) or not _CURRENCY_RE.match(code):
        raise InvalidAmount(f'currency {code!r} is not an ISO 4217 code such as "USD"')
    return code


@dataclass(frozen=True, slots=True)
class Money:
    """An exact amount: nano-units and a currency."""

    nanos: int
    currency: str = "USD"

    @classmethod
    def parse(cls, value: Any, currency: str = "USD", **kwargs: Any) -> Money:
        return cls(parse_nanos(value, **kwargs), check_currency(currency))

    def __str__(self) -> str:
        return format_nanos(self.nanos)

    def to_wire(self) -> dict[str, str]:
        return {"amount": format_nanos(self.nanos), "currency": self.currency}
