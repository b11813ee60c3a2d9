"""Budget windows, budget ids and the arithmetic of ``used`` (PROTOCOL.md, "Principals and budgets").

Pure: no I/O and no clock. Every instant is passed in as an aware datetime and every
instant returned is in UTC.

A calendar window (``hour``, ``day``, ``week``, ``month``) is named by its *local* wall
time in the budget's time zone (UTC unless the cap names an IANA zone) and spans the UTC
instants from the first moment its wall time is reached up to the first moment the next
window's is. So windows tile time without gaps or overlaps: a local day is 23 or 25 hours
long across a DST change, a local hour that a spring-forward gap skips is an empty window
(``start == end``), and a wall time repeated when clocks fall back stays in the window
already current (New York's 01:00-02:00 on 2026-11-01 is one two-hour window).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo
from typing import NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from paymaster.errors import InvalidRequest

__all__ = [
    "PERIODS",
    "ParsedBudgetId",
    "Window",
    "budget_id",
    "check_id",
    "check_scope",
    "check_tz",
    "parse_budget_id",
    "parse_fraction",
    "threshold_reached",
    "used_fraction",
    "window_for",
    "window_from_key",
]

PERIODS: tuple[str, ...] = ("session", "hour", "day", "week", "month", "total")
CALENDAR_PERIODS: tuple[str, ...] = ("hour", "day", "week", "month")
SCOPE_PREFIXES: tuple[str, ...] = ("connector:", "category:")
TASK_PREFIX = "task_"
SESSION_PREFIX = "session:"

# Owners, connector and category ids and session ids all end up as one segment of a
# budget id, which travels in a URL path (`GET /v1/budgets/{id}`): no slash, no
# whitespace, no control characters, and a bound on the length.
_ID_RE = re.compile(r"[^\s/\x00-\x1f\x7f]{1,256}")
# ASCII digits only: `\d` and `int()` would also accept other scripts' digits.
_HOUR_RE = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2})")
_DAY_RE = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})")
_WEEK_RE = re.compile(r"([0-9]{4})-W([0-9]{2})")
_MONTH_RE = re.compile(r"([0-9]{4})-([0-9]{2})")
_TZ_RE = re.compile(r"[A-Za-z][A-Za-z0-9_+\-]*(?:/[A-Za-z0-9_+\-]+)*")
_FRACTION_RE = re.compile(r"([0-9]{1,12})(?:\.([0-9]{1,9}))?")
# Zone files that exist on some hosts but whose meaning depends on the host: two replicas
# could disagree about a window, so they are refused.
_HOST_DEPENDENT_ZONES = frozenset({"localtime", "posixrules", "Factory"})

_USED_PLACES = 4


@dataclass(frozen=True, slots=True)
class Window:
    """One window of a budget: its key and its UTC bounds ``[start, end)``.

    ``start`` and ``end`` are ``None`` for ``total`` (key ``""``) and ``session``
    (key ``session:{id}``), which are not bounded in time.
    """

    key: str
    start: datetime | None
    end: datetime | None

    def contains(self, at: datetime) -> bool:
        """Whether the instant ``at`` falls in this window (always true when unbounded)."""
        if self.start is None or self.end is None:
            return True
        return self.start <= at < self.end


class ParsedBudgetId(NamedTuple):
    """A budget id taken apart. ``window_key`` is ``None`` when the id names no window
    (meaning the current one); it is ``""`` for ``total``, which has a single window."""

    owner: str
    scope: str
    period: str
    window_key: str | None


# --------------------------------------------------------------------------- validation


def check_id(value: object, what: str) -> str:
    """Return ``value`` if it can be one segment of a budget id, else raise InvalidRequest."""
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise InvalidRequest(f"{what} {value!r} must be 1-256 characters without '/', spaces or controls")
    return value


def check_scope(value: object, what: str = "scope") -> str:
    """Return a valid scope (``all``, ``connector:ID``, ``category:CAT``) or raise InvalidRequest."""
    if value == "all":
        return "all"
    if isinstance(value, str):
        for prefix in SCOPE_PREFIXES:
            if value.startswith(prefix):
                check_id(value[len(prefix) :], what)
                return value
    raise InvalidRequest(f'{what} {value!r} must be "all", "connector:ID" or "category:CAT"')


def check_period(value: object, what: str = "period") -> str:
    if not isinstance(value, str) or value not in PERIODS:
        raise InvalidRequest(f"{what} {value!r} must be one of {', '.join(PERIODS)}")
    return value


def check_tz(value: object, what: str = "tz") -> ZoneInfo:
    """Load the IANA zone ``value`` or raise InvalidRequest naming ``what``."""
    if (
        not isinstance(value, str)
        or not _TZ_RE.fullmatch(value)
        or value in _HOST_DEPENDENT_ZONES
        or len(value) > 64
    ):
        raise InvalidRequest(f'{what} {value!r} is not an IANA time zone name such as "Europe/Paris"')
    try:
        return ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        # ZoneInfoNotFoundError for unknown names, IsADirectoryError (an OSError) for
        # "Europe", ValueError for keys that are not normalized relative paths.
        raise InvalidRequest(f"{what} {value!r} is not a known IANA time zone") from exc


def _zone(tz: str | None) -> tzinfo:
    return UTC if tz is None else check_tz(tz)


def _utc(at: datetime) -> datetime:
    if at.tzinfo is None or at.utcoffset() is None:
        # A naive datetime is a programming error, not a bad request: nothing on the wire
        # can produce one.
        raise ValueError("window_for needs an aware datetime (UTC), got a naive one")
    return at.astimezone(UTC)


# --------------------------------------------------------------------------- windows


def _first_instant_at_or_after(wall: datetime, zone: tzinfo) -> datetime:
    """The first UTC instant whose local wall time in ``zone`` is ``wall`` or later.

    That is where a local window that starts at ``wall`` begins. Usually ``wall`` maps to
    one instant. When it is repeated (clocks fall back) the earlier one is the start.
    When a spring-forward gap skips it, the window starts at the transition itself.
    """
    if zone is UTC:
        return wall.replace(tzinfo=UTC)
    # PEP 495: fold=0 maps a repeated wall time to its first instant, and a skipped one
    # with the offset from before the transition; fold=1 to the second instant, or with
    # the offset from after. So a skipped wall time gives fold=1 < fold=0, with the
    # transition between them.
    fold0 = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
    fold1 = wall.replace(tzinfo=zone, fold=1).astimezone(UTC)
    if fold1 >= fold0:
        return fold0
    # Gap: bisect the whole seconds between the two for the transition instant (zone
    # transitions fall on whole seconds, and a window's wall start has no fraction).
    before, after = fold1, fold0
    step = timedelta(seconds=1)
    while after - before > step:
        mid = before + (after - before) // 2
        mid -= timedelta(microseconds=mid.microsecond)
        if mid.astimezone(zone).replace(tzinfo=None) >= wall:
            after = mid
        else:
            before = mid
    return after


def _bounds(start_wall: datetime, end_wall: datetime, zone: tzinfo) -> tuple[datetime, datetime]:
    try:
        return (
            _first_instant_at_or_after(start_wall, zone),
            _first_instant_at_or_after(end_wall, zone),
        )
    except (OverflowError, ValueError) as exc:
        raise InvalidRequest("window is outside the supported range of dates") from exc


def _next_month(year: int, month: int) -> datetime:
    return datetime(year + 1, 1, 1) if month == 12 else datetime(year, month + 1, 1)


def _walls_for(period: str, local: datetime) -> tuple[str, datetime, datetime]:
    """Key and local wall bounds of the calendar window holding the local wall time ``local``."""
    day = datetime(local.year, local.month, local.day)
    if period == "hour":
        start = day.replace(hour=local.hour)
        return (
            f"{local.year:04d}-{local.month:02d}-{local.day:02d}T{local.hour:02d}",
            start,
            start + timedelta(hours=1),
        )
    if period == "day":
        return f"{local.year:04d}-{local.month:02d}-{local.day:02d}", day, day + timedelta(days=1)
    if period == "week":
        # ISO 8601: weeks start on Monday, and a week belongs to the year of its Thursday,
        # so 2027-01-01 is in 2026-W53 and 2024-12-30 in 2025-W01.
        iso = local.date().isocalendar()
        monday = day - timedelta(days=iso.weekday - 1)
        return f"{iso.year:04d}-W{iso.week:02d}", monday, monday + timedelta(days=7)
    # month
    start = datetime(local.year, local.month, 1)
    return f"{local.year:04d}-{local.month:02d}", start, _next_month(local.year, local.month)


def _session_window(session: object) -> Window:
    return Window(SESSION_PREFIX + check_id(session, "session"), None, None)


def window_for(period: str, at: datetime, tz: str | None = None, session: str | None = None) -> Window:
    """The window of ``period`` that holds the instant ``at``.

    Calendar periods are aligned in UTC, or in the IANA zone ``tz`` when given. ``session``
    names the session for the ``session`` period (required there, ignored elsewhere).
    """
    check_period(period)
    zone = _zone(tz)
    if period == "total":
        return Window("", None, None)
    if period == "session":
        if session is None:
            raise InvalidRequest("a session cap applies only to a call that names a session")
        return _session_window(session)
    utc = _utc(at)
    try:
        local = utc.astimezone(zone).replace(tzinfo=None)
        key, start_wall, end_wall = _walls_for(period, local)
        start, end = _bounds(start_wall, end_wall, zone)
        while utc >= end:
            # The second pass of a fall-back longer than the window (clocks back two
            # hours repeat two hour keys): the repeated wall time reads an earlier key,
            # but time has moved on. Windows start where their wall time is first
            # reached, so the instant belongs to the latest window already begun.
            key, start_wall, end_wall = _walls_for(period, end_wall)
            start, end = _bounds(start_wall, end_wall, zone)
    except (OverflowError, ValueError) as exc:
        # Only at the very ends of datetime's range (year 1 or 9999).
        raise InvalidRequest("instant is outside the supported range of dates") from exc
    return Window(key, start, end)


def _parse_walls(period: str, key: str) -> tuple[datetime, datetime]:
    """Local wall bounds of the calendar window named ``key``; ValueError when malformed."""
    if period == "hour":
        m = _HOUR_RE.fullmatch(key)
        if m is None:
            raise ValueError("expected YYYY-MM-DDTHH")
        start = datetime(int(m[1]), int(m[2]), int(m[3]), int(m[4]))
        return start, start + timedelta(hours=1)
    if period == "day":
        m = _DAY_RE.fullmatch(key)
        if m is None:
            raise ValueError("expected YYYY-MM-DD")
        start = datetime(int(m[1]), int(m[2]), int(m[3]))
        return start, start + timedelta(days=1)
    if period == "week":
        m = _WEEK_RE.fullmatch(key)
        if m is None:
            raise ValueError("expected YYYY-Www")
        # fromisocalendar refuses week 53 of a year that has only 52.
        monday = date.fromisocalendar(int(m[1]), int(m[2]), 1)
        start = datetime(monday.year, monday.month, monday.day)
        return start, start + timedelta(days=7)
    m = _MONTH_RE.fullmatch(key)
    if m is None:
        raise ValueError("expected YYYY-MM")
    year, month = int(m[1]), int(m[2])
    return datetime(year, month, 1), _next_month(year, month)


def _check_window_key(period: str, key: object) -> str:
    """Validate the shape and the calendar of a window key without computing its bounds."""
    if not isinstance(key, str):
        raise InvalidRequest(f"window {key!r} of a {period} budget must be a string")
    if period == "total":
        if key != "":
            raise InvalidRequest(f"a total budget has no window, got {key!r}")
        return key
    if period == "session":
        if not key.startswith(SESSION_PREFIX):
            raise InvalidRequest(f"window {key!r} of a session budget must be session:ID")
        _session_window(key[len(SESSION_PREFIX) :])
        return key
    try:
        _parse_walls(period, key)
    except (ValueError, OverflowError) as exc:
        raise InvalidRequest(f"window {key!r} is not a valid {period} window: {exc}") from exc
    return key


def window_from_key(period: str, key: str, tz: str | None = None) -> Window:
    """The window of ``period`` named ``key`` (the inverse of :func:`window_for`)."""
    check_period(period)
    zone = _zone(tz)
    _check_window_key(period, key)
    if period in ("total", "session"):
        return Window(key, None, None)
    start_wall, end_wall = _parse_walls(period, key)
    start, end = _bounds(start_wall, end_wall, zone)
    return Window(key, start, end)


# --------------------------------------------------------------------------- budget ids


def budget_id(owner: str, scope: str, period: str, window_key: str) -> str:
    """The id of a budget window: ``{owner}[/{scope}]/{period}/{window}``.

    The scope is left out for ``all``; ``total`` has no window (``ag_x/total`` is an
    agent's wallet). A task's budget (a ``task_…`` owner, scope ``all``, period
    ``total``) is the bare task id, as PROTOCOL.md names it.
    """
    check_id(owner, "owner")
    check_scope(scope)
    check_period(period)
    _check_window_key(period, window_key)
    if owner.startswith(TASK_PREFIX) and scope == "all" and period == "total":
        return owner
    head = owner if scope == "all" else f"{owner}/{scope}"
    return f"{head}/total" if period == "total" else f"{head}/{period}/{window_key}"


def _is_scope(segment: str) -> bool:
    return segment.startswith(SCOPE_PREFIXES)


def parse_budget_id(text: object) -> ParsedBudgetId:
    """Take a budget id apart (the inverse of :func:`budget_id`); InvalidRequest if malformed.

    Accepted forms: ``task_…``; ``owner[/scope]/period[/window]``. Without a window, a
    calendar or session budget means the current window (``window_key`` None).
    """
    if not isinstance(text, str):
        raise InvalidRequest(f"budget id {text!r} must be a string")
    parts = text.split("/")
    owner = parts[0]
    check_id(owner, "budget id owner")
    rest = parts[1:]
    if not rest:
        if owner.startswith(TASK_PREFIX) and len(owner) > len(TASK_PREFIX):
            return ParsedBudgetId(owner, "all", "total", "")
        raise InvalidRequest(f"budget id {text!r} names no period")
    scope = "all"
    if _is_scope(rest[0]):
        scope = check_scope(rest[0], "budget id scope")
        rest = rest[1:]
    if not rest or rest[0] not in PERIODS:
        raise InvalidRequest(f"budget id {text!r} must name a period ({', '.join(PERIODS)})")
    period, rest = rest[0], rest[1:]
    if period == "total":
        if rest:
            raise InvalidRequest(f"budget id {text!r}: a total budget has no window")
        return ParsedBudgetId(owner, scope, period, "")
    if not rest:
        return ParsedBudgetId(owner, scope, period, None)
    if len(rest) > 1:
        raise InvalidRequest(f"budget id {text!r} has too many segments")
    return ParsedBudgetId(owner, scope, period, _check_window_key(period, rest[0]))


# --------------------------------------------------------------------------- used


def parse_fraction(text: object, what: str = "fraction") -> tuple[int, int]:
    """Parse a plain decimal string (``"0.9"``) into ``(numerator, 10**k)``, exactly."""
    if not isinstance(text, str):
        raise InvalidRequest(f'{what} must be a decimal string such as "0.9", not {type(text).__name__}')
    m = _FRACTION_RE.fullmatch(text)
    if m is None:
        raise InvalidRequest(f'{what} {text!r} is not a plain decimal string such as "0.9"')
    decimals = m[2] or ""
    return int(m[1] + decimals), 10 ** len(decimals)


def used_fraction(limit: int, spent: int, reserved: int) -> str:
    """``(spent + reserved) / limit`` as a decimal string, rounded up to 4 places.

    Trailing zeros are trimmed but two decimals are kept (``"0.91"``, ``"0.50"``,
    ``"1.00"``, ``"0.1235"``). Rounding up is against the spender: a budget never looks
    emptier than it is. A limit of zero (or less) is ``"1.00"`` used as soon as anything
    is, else ``"0.00"``. Past an overrun the fraction exceeds 1.
    """
    used = spent + reserved
    if limit <= 0:
        return "1.00" if used > 0 else "0.00"
    scale = 10**_USED_PLACES
    q = -((-used * scale) // limit)  # ceiling division, also right for negatives
    whole, frac = divmod(abs(q), scale)
    digits = f"{frac:0{_USED_PLACES}d}".rstrip("0").ljust(2, "0")
    return f"{'-' if q < 0 else ''}{whole}.{digits}"


def threshold_reached(limit: int, spent: int, reserved: int, threshold: str) -> bool:
    """Whether ``used ≥ threshold`` exactly, in integers (``threshold`` is ``"0.9"``-like).

    ``(spent + reserved) / limit ≥ n / 10**k`` ⇔ ``(spent + reserved) * 10**k ≥ n * limit``.
    A limit of zero is reached as soon as anything is used, as :func:`used_fraction` says.
    """
    numerator, denominator = parse_fraction(threshold, "threshold")
    used = spent + reserved
    if limit <= 0:
        return used > 0
    return used * denominator >= numerator * limit
