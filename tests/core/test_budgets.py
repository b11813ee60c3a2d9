"""Budget windows, budget ids and `used` (paymaster.core.budgets)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paymaster.core.budgets import (
    PERIODS,
    ParsedBudgetId,
    Window,
    budget_id,
    parse_budget_id,
    threshold_reached,
    used_fraction,
    window_for,
    window_from_key,
)
from paymaster.errors import InvalidRequest


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, micro: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, micro, tzinfo=UTC)


def hours(w: Window) -> float:
    assert w.start is not None and w.end is not None
    return (w.end - w.start) / timedelta(hours=1)


# --------------------------------------------------------------------------- UTC windows


def test_periods() -> None:
    assert PERIODS == ("session", "hour", "day", "week", "month", "total")


@pytest.mark.parametrize(
    ("period", "key", "start", "end"),
    [
        ("hour", "2026-11-24T13", utc(2026, 11, 24, 13), utc(2026, 11, 24, 14)),
        ("day", "2026-11-24", utc(2026, 11, 24), utc(2026, 11, 25)),
        ("week", "2026-W48", utc(2026, 11, 23), utc(2026, 11, 30)),
        ("month", "2026-11", utc(2026, 11, 1), utc(2026, 12, 1)),
    ],
)
def test_utc_calendar_windows(period: str, key: str, start: datetime, end: datetime) -> None:
    at = utc(2026, 11, 24, 13, 5, 7, 123)
    w = window_for(period, at)
    assert w == Window(key, start, end)
    assert w.contains(at)
    assert window_from_key(period, key) == w


def test_total_window() -> None:
    assert window_for("total", utc(2026, 1, 1)) == Window("", None, None)
    assert window_from_key("total", "") == Window("", None, None)


def test_other_offsets_are_converted_to_utc() -> None:
    from zoneinfo import ZoneInfo

    # 2026-11-25 00:30 in Paris is still 2026-11-24 in UTC.
    at = datetime(2026, 11, 25, 0, 30, tzinfo=ZoneInfo("Europe/Paris"))
    assert window_for("day", at).key == "2026-11-24"
    assert window_for("day", at).start == utc(2026, 11, 24)


def test_naive_datetime_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="aware"):
        window_for("day", datetime(2026, 11, 24))


def test_unknown_period() -> None:
    with pytest.raises(InvalidRequest, match="period"):
        window_for("daily", utc(2026, 1, 1))
    with pytest.raises(InvalidRequest, match="period"):
        window_from_key("year", "2026")


# --------------------------------------------------------------------------- calendar edges


def test_month_ends() -> None:
    jan = window_for("month", utc(2026, 1, 31, 23, 59, 59, 999_999))
    assert jan == Window("2026-01", utc(2026, 1, 1), utc(2026, 2, 1))
    feb = window_for("month", utc(2026, 2, 1))
    assert feb == Window("2026-02", utc(2026, 2, 1), utc(2026, 3, 1))
    assert window_for("day", utc(2026, 1, 31, 23, 59)).end == utc(2026, 2, 1)


def test_leap_day() -> None:
    assert window_for("day", utc(2024, 2, 29, 12)) == Window("2024-02-29", utc(2024, 2, 29), utc(2024, 3, 1))
    assert window_for("month", utc(2024, 2, 29)).end == utc(2024, 3, 1)
    assert hours(window_from_key("month", "2024-02")) == 29 * 24
    assert hours(window_from_key("month", "2026-02")) == 28 * 24
    assert window_from_key("day", "2024-02-29").end == utc(2024, 3, 1)
    with pytest.raises(InvalidRequest):
        window_from_key("day", "2026-02-29")


def test_year_end() -> None:
    at = utc(2026, 12, 31, 23, 59, 59)
    assert window_for("hour", at) == Window("2026-12-31T23", utc(2026, 12, 31, 23), utc(2027, 1, 1))
    assert window_for("day", at).end == utc(2027, 1, 1)
    assert window_for("month", at) == Window("2026-12", utc(2026, 12, 1), utc(2027, 1, 1))
    assert window_for("month", utc(2027, 1, 1)).key == "2027-01"


def test_iso_week_53() -> None:
    w53 = Window("2026-W53", utc(2026, 12, 28), utc(2027, 1, 4))
    assert window_for("week", utc(2026, 12, 31)) == w53
    # The first days of 2027 still belong to ISO year 2026.
    assert window_for("week", utc(2027, 1, 3, 23, 59)) == w53
    assert window_for("week", utc(2027, 1, 4)).key == "2027-W01"
    assert window_from_key("week", "2026-W53") == w53
    assert window_for("week", utc(2021, 1, 1)).key == "2020-W53"
    with pytest.raises(InvalidRequest):
        window_from_key("week", "2025-W53")  # 2025 has 52 ISO weeks


def test_iso_week_1_starts_in_the_previous_calendar_year() -> None:
    # 2024-12-30 (a Monday) opens ISO week 1 of 2025.
    w = window_for("week", utc(2024, 12, 30, 8))
    assert w == Window("2025-W01", utc(2024, 12, 30), utc(2025, 1, 6))
    assert window_from_key("week", "2025-W01") == w
    assert window_for("week", utc(2024, 12, 29, 23)).key == "2024-W52"


def test_week_starts_on_monday() -> None:
    sunday = window_for("week", utc(2026, 11, 29, 23, 59))
    monday = window_for("week", utc(2026, 11, 30))
    assert sunday.key == "2026-W48" and monday.key == "2026-W49"
    assert sunday.end == monday.start == utc(2026, 11, 30)


# --------------------------------------------------------------------------- time zones and DST


def test_paris_day_starts_at_23z_in_winter() -> None:
    w = window_for("day", utc(2026, 1, 15, 12), tz="Europe/Paris")
    assert w == Window("2026-01-15", utc(2026, 1, 14, 23), utc(2026, 1, 15, 23))
    # 23:30Z on the 14th is already the 15th in Paris.
    assert window_for("day", utc(2026, 1, 14, 23, 30), tz="Europe/Paris").key == "2026-01-15"
    # Summer time: 22:00Z.
    assert window_for("day", utc(2026, 7, 1, 12), tz="Europe/Paris").start == utc(2026, 6, 30, 22)


def test_paris_dst_days() -> None:
    assert hours(window_from_key("day", "2026-03-29", "Europe/Paris")) == 23
    assert hours(window_from_key("day", "2026-10-25", "Europe/Paris")) == 25


def test_new_york_spring_forward_is_23_hours() -> None:
    w = window_for("day", utc(2026, 3, 8, 12), tz="America/New_York")
    assert w == Window("2026-03-08", utc(2026, 3, 8, 5), utc(2026, 3, 9, 4))
    assert hours(w) == 23
    # 02:00-03:00 local does not exist that day: its hour window is empty, at the jump.
    skipped = window_from_key("hour", "2026-03-08T02", "America/New_York")
    assert skipped.start == skipped.end == utc(2026, 3, 8, 7)
    assert window_for("hour", utc(2026, 3, 8, 7), tz="America/New_York").key == "2026-03-08T03"


def test_new_york_fall_back_is_25_hours() -> None:
    w = window_for("day", utc(2026, 11, 1, 12), tz="America/New_York")
    assert w == Window("2026-11-01", utc(2026, 11, 1, 4), utc(2026, 11, 2, 5))
    assert hours(w) == 25
    # 01:00-02:00 local happens twice: one key, a two-hour window holding both passes.
    repeated = window_for("hour", utc(2026, 11, 1, 5, 30), tz="America/New_York")
    assert repeated == Window("2026-11-01T01", utc(2026, 11, 1, 5), utc(2026, 11, 1, 7))
    assert window_for("hour", utc(2026, 11, 1, 6, 30), tz="America/New_York") == repeated


def test_fall_back_longer_than_the_window_keeps_time_moving() -> None:
    # Catamarca, 1991-03-03 02:00Z: clocks went back two hours (-02 to -04), from 00:00 to
    # 22:00, so local 22:00-24:00 happened twice. The repeat stays in the hour already
    # current, so windows still tile time.
    tz = "America/Argentina/Catamarca"
    assert window_from_key("hour", "1991-03-02T22", tz) == Window(
        "1991-03-02T22", utc(1991, 3, 3, 0), utc(1991, 3, 3, 1)
    )
    late = Window("1991-03-02T23", utc(1991, 3, 3, 1), utc(1991, 3, 3, 4))
    for minute in (60, 120, 150, 239):
        assert window_for("hour", utc(1991, 3, 3) + timedelta(minutes=minute), tz=tz) == late
    assert window_for("day", utc(1991, 3, 3, 3), tz=tz).end == utc(1991, 3, 3, 4)


def test_month_and_week_in_a_zone() -> None:
    w = window_for("month", utc(2026, 10, 31, 23, 30), tz="Europe/Paris")
    # Already November in Paris; October's 25-hour day is in the previous window.
    assert w == Window("2026-11", utc(2026, 10, 31, 23), utc(2026, 11, 30, 23))
    assert hours(window_from_key("month", "2026-10", "Europe/Paris")) == 31 * 24 + 1
    assert window_for("week", utc(2026, 11, 29, 23, 30), tz="Europe/Paris").key == "2026-W49"


def test_whole_skipped_day() -> None:
    # Samoa skipped 2011-12-30 entirely.
    skipped = window_from_key("day", "2011-12-30", "Pacific/Apia")
    assert skipped.start == skipped.end
    before = window_from_key("day", "2011-12-29", "Pacific/Apia")
    after = window_from_key("day", "2011-12-31", "Pacific/Apia")
    assert before.end == skipped.start == after.start


def test_utc_zone_name_equals_default() -> None:
    at = utc(2026, 5, 5, 5)
    assert window_for("day", at, tz="UTC") == window_for("day", at)


@pytest.mark.parametrize(
    "tz", ["", "Europe", "Nope/Nope", "europe/paris", "../etc/passwd", "/etc/localtime", "localtime", "A b"]
)
def test_bad_time_zone(tz: str) -> None:
    with pytest.raises(InvalidRequest, match="tz"):
        window_for("day", utc(2026, 1, 1), tz=tz)


ZONES = [
    None,
    "Europe/Paris",
    "America/New_York",
    "Pacific/Apia",
    "Australia/Lord_Howe",  # 30-minute DST
    "Asia/Kolkata",  # +05:30
    "Asia/Kathmandu",  # +05:45
    "America/Santiago",  # DST changes at midnight
    "America/Sao_Paulo",
    "Pacific/Chatham",
    "Asia/Tehran",
    "America/St_Johns",
]


@settings(max_examples=400, deadline=None)
@given(
    at=st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2060, 1, 1), timezones=st.just(UTC)),
    period=st.sampled_from(["hour", "day", "week", "month"]),
    tz=st.sampled_from(ZONES),
)
def test_windows_tile_time(at: datetime, period: str, tz: str | None) -> None:
    w = window_for(period, at, tz=tz)
    assert w.start is not None and w.end is not None
    assert w.start <= at < w.end
    assert w.start.tzinfo is UTC and w.end.tzinfo is UTC
    assert window_from_key(period, w.key, tz) == w
    # Contiguous: the next window starts where this one ends, the previous ends at its start.
    assert window_for(period, w.end, tz=tz).start == w.end
    assert window_for(period, w.start - timedelta(microseconds=1), tz=tz).end == w.start


# --------------------------------------------------------------------------- sessions


def test_session_window() -> None:
    assert window_for("session", utc(2026, 1, 1), session="s-1") == Window("session:s-1", None, None)
    assert window_from_key("session", "session:s-1") == Window("session:s-1", None, None)
    assert window_for("session", utc(2026, 1, 1), session="s-1").contains(utc(1999, 1, 1))


@pytest.mark.parametrize("session", [None, "", "a/b", "has space", "x" * 257, "tab\t"])
def test_session_window_needs_a_valid_session(session: str | None) -> None:
    with pytest.raises(InvalidRequest, match="session"):
        window_for("session", utc(2026, 1, 1), session=session)


def test_session_is_ignored_by_other_periods() -> None:
    assert window_for("day", utc(2026, 1, 1), session="s").key == "2026-01-01"


# --------------------------------------------------------------------------- malformed keys


@pytest.mark.parametrize(
    ("period", "key"),
    [
        ("hour", "2026-11-24T24"),
        ("hour", "2026-11-24"),
        ("hour", "2026-11-24T1"),
        ("day", "2026-11-31"),
        ("day", "2026-11-24 "),
        ("day", "2026-11-24\n"),
        ("day", "26-11-24"),
        ("day", "2026-11"),
        ("day", "２０２６-11-24"),  # non-ASCII digits
        ("day", ""),
        ("day", "0000-01-01"),
        ("week", "2026-W00"),
        ("week", "2026-W54"),
        ("week", "2026-W5"),
        ("week", "2026-48"),
        ("month", "2026-13"),
        ("month", "2026-00"),
        ("month", "2026-1"),
        ("month", "9999-12"),  # its end is past datetime's range
        ("total", "2026"),
        ("session", "abc"),
        ("session", "session:"),
        ("session", "session:a/b"),
    ],
)
def test_malformed_window_keys(period: str, key: str) -> None:
    with pytest.raises(InvalidRequest):
        window_from_key(period, key)


# --------------------------------------------------------------------------- budget ids


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (("ag_x", "all", "total", ""), "ag_x/total"),
        (("ag_x", "all", "day", "2026-11-24"), "ag_x/day/2026-11-24"),
        (
            ("ag_x", "connector:translate-premium", "day", "2026-11-24"),
            "ag_x/connector:translate-premium/day/2026-11-24",
        ),
        (
            ("team:growth", "category:llm", "session", "session:s1"),
            "team:growth/category:llm/session/session:s1",
        ),
        (("ag_x", "all", "week", "2026-W48"), "ag_x/week/2026-W48"),
        (("ag_x", "all", "hour", "2026-11-24T13"), "ag_x/hour/2026-11-24T13"),
        (("ag_x", "all", "month", "2026-11"), "ag_x/month/2026-11"),
        (("ag_x", "connector:geo", "total", ""), "ag_x/connector:geo/total"),
        (("task_abc", "all", "total", ""), "task_abc"),
    ],
)
def test_budget_ids(args: tuple[str, str, str, str], text: str) -> None:
    assert budget_id(*args) == text
    assert parse_budget_id(text) == ParsedBudgetId(*args)


def test_parse_without_window_means_current() -> None:
    assert parse_budget_id("ag_x/day") == ParsedBudgetId("ag_x", "all", "day", None)
    assert parse_budget_id("ag_x/category:llm/month") == ParsedBudgetId("ag_x", "category:llm", "month", None)
    assert parse_budget_id("ag_x/session") == ParsedBudgetId("ag_x", "all", "session", None)


def test_task_total_written_out_parses_like_the_bare_task() -> None:
    assert parse_budget_id("task_abc/total") == parse_budget_id("task_abc")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "ag_x",
        "task_",
        "ag_x/",
        "/day",
        "ag_x/daily",
        "ag_x/day/2026-11-24/extra",
        "ag_x/total/2026",
        "ag_x/connector:/day",
        "ag_x/foo:bar/day",
        "ag_x/connector:a",
        "ag_x/all/day/2026-11-24",
        "ag_x/day/2026-11",
        "ag_x/week/2026-11-24",
        "ag_x/session/abc",
        "ag x/day",
        "ag_x//day",
    ],
)
def test_parse_rejects(text: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_budget_id(text)


def test_parse_rejects_non_strings() -> None:
    with pytest.raises(InvalidRequest):
        parse_budget_id(None)


@pytest.mark.parametrize(
    "args",
    [
        ("a/b", "all", "day", "2026-11-24"),
        ("ag_x", "everything", "day", "2026-11-24"),
        ("ag_x", "all", "daily", "2026-11-24"),
        ("ag_x", "all", "day", "2026-11"),
        ("ag_x", "all", "total", "2026"),
        ("ag_x", "all", "session", "s1"),
    ],
)
def test_budget_id_rejects(args: tuple[str, str, str, str]) -> None:
    with pytest.raises(InvalidRequest):
        budget_id(*args)


_ID = st.text(
    st.characters(blacklist_categories=("Cc", "Cs", "Zs", "Zl", "Zp"), blacklist_characters="/"),
    min_size=1,
    max_size=20,
).filter(lambda s: s == s.strip() and not any(c.isspace() for c in s))


@st.composite
def budget_parts(draw: st.DrawFn) -> tuple[str, str, str, str]:
    owner = draw(st.one_of(_ID.map(lambda s: "ag_" + s), _ID, _ID.map(lambda s: "task_" + s)))
    scope = draw(
        st.one_of(st.just("all"), _ID.map(lambda s: "connector:" + s), _ID.map(lambda s: "category:" + s))
    )
    period = draw(st.sampled_from(PERIODS))
    if period == "total":
        key = ""
    elif period == "session":
        key = "session:" + draw(_ID)
    else:
        at = draw(
            st.datetimes(
                min_value=datetime(1970, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
            )
        )
        key = window_for(period, at).key
    return owner, scope, period, key


@given(budget_parts())
def test_budget_id_round_trip(parts: tuple[str, str, str, str]) -> None:
    text = budget_id(*parts)
    parsed = parse_budget_id(text)
    assert parsed == ParsedBudgetId(*parts)
    assert parsed.window_key is not None
    assert budget_id(parsed.owner, parsed.scope, parsed.period, parsed.window_key) == text


# --------------------------------------------------------------------------- used


@pytest.mark.parametrize(
    ("limit", "spent", "reserved", "used"),
    [
        (100, 91, 0, "0.91"),
        (100, 50, 0, "0.50"),
        (100, 40, 10, "0.50"),
        (100, 100, 0, "1.00"),
        (100, 0, 0, "0.00"),
        (3, 1, 0, "0.3334"),  # rounded up, against the spender
        (100_000, 1, 0, "0.0001"),
        (1_000_000, 1, 0, "0.0001"),
        (10, 12, 0, "1.20"),  # after an overrun
        (8, 1, 0, "0.125"),
        (0, 0, 0, "0.00"),
        (0, 1, 0, "1.00"),
        (0, 0, 5, "1.00"),
    ],
)
def test_used_fraction(limit: int, spent: int, reserved: int, used: str) -> None:
    assert used_fraction(limit, spent, reserved) == used


@pytest.mark.parametrize(
    ("limit", "spent", "reserved", "threshold", "reached"),
    [
        (100, 90, 0, "0.9", True),
        (100, 89, 0, "0.9", False),
        (100, 80, 10, "0.90", True),
        (1_000_000_000, 899_999_999, 0, "0.9", False),
        (3, 2, 0, "0.6666", True),
        (3, 2, 0, "0.6667", False),  # exact, even though used_fraction shows "0.6667"
        (100, 100, 0, "1", True),
        (100, 120, 0, "1.0", True),
        (0, 0, 0, "0.5", False),
        (0, 1, 0, "0.5", True),
    ],
)
def test_threshold_reached(limit: int, spent: int, reserved: int, threshold: str, reached: bool) -> None:
    assert threshold_reached(limit, spent, reserved, threshold) is reached


@pytest.mark.parametrize("threshold", ["0.9.1", "1e-1", ".9", "-0.5", " 0.5", "0.5\n"])
def test_threshold_must_be_plain_decimal(threshold: str) -> None:
    with pytest.raises(InvalidRequest):
        threshold_reached(100, 1, 0, threshold)


def test_threshold_rejects_numbers() -> None:
    with pytest.raises(InvalidRequest):
        threshold_reached(100, 1, 0, 0.5)  # type: ignore[arg-type]
