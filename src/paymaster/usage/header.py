"""Cost reported by the provider in a response header (connector ``usage = "header:NAME"``)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

from paymaster.money import MAX_NANOS, decimal_to_nanos_ceil

__all__ = ["read_cost_header"]

_AMOUNT = re.compile(r"^\d{1,12}(?:\.\d{1,30})?$", re.ASCII)
_CURRENCY = re.compile(r"^[A-Za-z]{3}$")
_MAX_HEADER: Final = 128


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is not None:
        return value
    wanted = name.lower()
    for key, item in headers.items():
        if isinstance(key, str) and key.lower() == wanted:
            return item
    return None


def read_cost_header(headers: Mapping[str, str], name: str, currency: str) -> int | None:
    """The cost in the header ``name``, in nanos of ``currency``, rounded up; None when unreadable.

    Accepts a plain non-negative decimal (``"0.0123"``), optionally with the currency code before
    or after it (``"0.0123 USD"``); a different currency, a sign, an exponent, a list of values or
    anything else is unreadable (the gateway then charges the hold, flagged ``estimated``).
    """
    raw = _header(headers, name)
    if not isinstance(raw, str) or len(raw) > _MAX_HEADER:
        return None
    parts = raw.split()
    if len(parts) == 2:
        amount, code = (parts[1], parts[0]) if _CURRENCY.match(parts[0]) else (parts[0], parts[1])
        if not _CURRENCY.match(code) or code.upper() != currency.upper():
            return None
    elif len(parts) == 1:
        amount = parts[0]
    else:
        return None
    if not _AMOUNT.match(amount):
        return None
    nanos = decimal_to_nanos_ceil(amount)
    if nanos > MAX_NANOS:
        return None
    return nanos
