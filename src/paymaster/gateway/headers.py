"""The ``x-paymaster-*`` response headers and the closing SSE comment of a stream.

- ``x-paymaster-reservation``: every forwarded response;
- ``x-paymaster-charged``, ``x-paymaster-remaining``, ``x-paymaster-budget``: a response
  settled before its headers left (never a stream's: its charge is known only at its end);
  ``remaining`` is the smallest remaining over the enforced budgets of the path after the
  settlement, and ``budget`` the id of the budget that has it;
- ``x-paymaster-warning: low_balance; budget=…; used=…``: one header per budget on the path
  that was past an alert threshold when the call was reserved;
- ``x-paymaster-capped-max-tokens``: the output bound ``allow_with_caps`` lowered the call to.

The remaining amounts are computed from the reserve answer (each budget's remaining after
the hold) plus what the settlement gave back, with no further store read; calls settled
concurrently on the same budgets are not reflected (``GET /v1/budgets/{id}`` is exact).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from paymaster.money import format_nanos, parse_nanos

__all__ = [
    "CAPPED",
    "CHARGED",
    "RESERVATION",
    "reserve_headers",
    "settled_headers",
    "smallest_remaining",
    "stream_trailer",
]

RESERVATION: Final = "x-paymaster-reservation"
CHARGED: Final = "x-paymaster-charged"
REMAINING: Final = "x-paymaster-remaining"
BUDGET: Final = "x-paymaster-budget"
WARNING: Final = "x-paymaster-warning"
CAPPED: Final = "x-paymaster-capped-max-tokens"
ESTIMATED: Final = "x-paymaster-estimated"


def _h(name: str, value: str) -> tuple[bytes, bytes]:
    return name.encode("latin-1"), value.encode("latin-1", "replace")


def reserve_headers(answer: Mapping[str, Any]) -> list[tuple[bytes, bytes]]:
    """The headers a reserve answer alone decides (sent on streams too)."""
    out = [_h(RESERVATION, str(answer["reservation_id"]))]
    for warning in answer.get("warnings") or ():
        out.append(_h(WARNING, str(warning)))
    capped = answer.get("capped_max_tokens")
    if capped is not None:
        out.append(_h(CAPPED, str(capped)))
    return out


def smallest_remaining(budgets: Sequence[Mapping[str, Any]], given_back: int) -> tuple[str, int] | None:
    """(budget id, remaining) of the enforced budget with the least left after the settlement
    gave ``given_back`` nanos back to every budget of the path (shadow budgets when all are)."""
    enforced = [b for b in budgets if b.get("mode") != "shadow"] or list(budgets)
    best: tuple[str, int] | None = None
    for budget in enforced:
        left = parse_nanos(str(budget["remaining"]), allow_negative=True) + given_back
        if best is None or left < best[1]:
            best = (str(budget["id"]), left)
    return best


def settled_headers(
    answer: Mapping[str, Any], hold: int, charged: int, *, estimated: bool
) -> list[tuple[bytes, bytes]]:
    out = [_h(CHARGED, format_nanos(charged))]
    smallest = smallest_remaining(answer.get("budgets") or (), hold - charged)
    if smallest is not None:
        out.append(_h(REMAINING, format_nanos(smallest[1])))
        out.append(_h(BUDGET, smallest[0]))
    if estimated:
        out.append(_h(ESTIMATED, "true"))
    return out


def stream_trailer(answer: Mapping[str, Any], hold: int, charged: int | None, *, estimated: bool) -> bytes:
    """The SSE comment that ends a stream: ``: paymaster charged=… remaining=… budget=…``.

    ``charged`` None: the settlement could not be recorded now; the hold is settled when
    it expires (charged at the hold, ``estimated``)."""
    if charged is None:
        return f": paymaster reservation={answer['reservation_id']} settlement=pending\n\n".encode()
    parts = [f"charged={format_nanos(charged)}"]
    smallest = smallest_remaining(answer.get("budgets") or (), hold - charged)
    if smallest is not None:
        parts.append(f"remaining={format_nanos(smallest[1])}")
        parts.append(f"budget={smallest[0]}")
    parts.append(f"reservation={answer['reservation_id']}")
    if estimated:
        parts.append("estimated=true")
    return (": paymaster " + " ".join(parts) + "\n\n").encode()
