"""``GET /v1/reports/focus?from=&to=``: the FOCUS 1.0 CSV of the ledger entries in
``[from, to)``, the same file as ``paymaster report focus`` (both build their rows with
:mod:`paymaster.reports.focus`).

The CSV is streamed a batch of rows at a time: a year of ledger never has to fit in memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from paymaster.authority import Authority
from paymaster.core.audit import iso_time
from paymaster.errors import InvalidRequest
from paymaster.reports import focus
from paymaster.server.ui.data import iter_ledger

__all__ = ["Period", "agents_by_id", "csv_chunks", "filename", "parse_period"]

ROWS_PER_CHUNK = 500


@dataclass(frozen=True)
class Period:
    start: datetime
    end: datetime


def parse_bound(text: str | None, name: str) -> datetime:
    """A date (``2026-11-24``: midnight UTC) or an RFC 3339 time; a time without an offset
    is UTC, the zone of every stored time."""
    if text is None or not text.strip():
        raise InvalidRequest(f"{name} is required: a date (YYYY-MM-DD) or an RFC 3339 time")
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            return datetime(day.year, day.month, day.day, tzinfo=UTC)
        at = datetime.fromisoformat(text)
        # astimezone overflows for an offset time at the ends of datetime's range
        return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    except (ValueError, OverflowError):
        raise InvalidRequest(
            f"{name} {text!r} is not a date (YYYY-MM-DD) or an RFC 3339 time (2026-11-24T13:00:00Z)"
        ) from None


def parse_period(query: Mapping[str, str]) -> Period:
    start = parse_bound(query.get("from"), "from")
    end = parse_bound(query.get("to"), "to")
    if start >= end:
        raise InvalidRequest(f"from {query.get('from')} must be before to {query.get('to')}")
    return Period(start, end)


def filename(period: Period) -> str:
    def part(at: datetime) -> str:
        return at.strftime("%Y-%m-%d") if at.time() == datetime.min.time() else at.strftime("%Y%m%dT%H%M%SZ")

    return f"focus-{part(period.start)}-{part(period.end)}.csv"


def agents_by_id(authority: Authority) -> dict[str, Mapping[str, Any]]:
    """Every agent record by id (their names and metadata columns). Blocking."""
    return {str(a["id"]): a for a in authority.list_agents()}


def csv_chunks(
    authority: Authority, period: Period, agents: Mapping[str, Mapping[str, Any]]
) -> Iterator[str]:
    """The header, then the rows, as CSV text in chunks. Blocking: Starlette iterates a
    synchronous body on a worker thread."""
    header = focus.columns(agents)
    rows = focus.focus_rows(
        iter_ledger(authority, since=iso_time(period.start), until=iso_time(period.end)),
        agents,
        billing_account_id=authority.settings.authority_id,
    )
    yield from focus.csv_chunks(header, rows, ROWS_PER_CHUNK)
