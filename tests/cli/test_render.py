"""The pieces of output that carry meaning: percentages, bars, the error line."""

from __future__ import annotations

import pytest

from paymaster.cli import render


@pytest.mark.parametrize(
    ("used", "text"),
    [
        ("0.00", "0%"),
        ("0.5", "50%"),
        ("0.355", "35.5%"),
        ("0.3551", "35.6%"),
        ("1.00", "100%"),
        ("1.25", "125%"),
        ("-0.1", "0%"),
        ("junk", "0%"),
    ],
)
def test_percent(used: str, text: str) -> None:
    assert render.percent(used) == text


@pytest.mark.parametrize(
    ("used", "filled", "style"),
    [
        ("0.00", 0, "green"),
        ("0.01", 1, "green"),
        ("0.5", 5, "yellow"),
        ("0.75", 8, "dark_orange"),
        ("0.91", 10, "red"),
        ("1.00", 10, "bold red"),
        ("3", 10, "bold red"),
    ],
)
def test_usage_bar_fills_and_colours_by_use(used: str, filled: int, style: str) -> None:
    bar = render.usage_bar(used)
    assert bar.plain.startswith("█" * filled + "░" * (render.BAR_WIDTH - filled))
    assert bar.plain.endswith(render.percent(used))
    assert str(bar.spans[-1].style) == style  # the percentage, coloured like the fill


def test_budget_labels() -> None:
    agent = "ag_x"
    assert render.budget_label({"kind": "wallet", "owner": agent}, agent) == "wallet"
    cap = {"kind": "cap", "owner": agent, "scope": "all", "period": "day", "mode": "enforce"}
    assert render.budget_label(cap, agent) == "day"
    assert render.budget_label({**cap, "scope": "connector:openai"}, agent) == "connector:openai day"
    assert (
        render.budget_label({**cap, "owner": "team:growth", "mode": "shadow"}, agent)
        == "team:growth day (shadow)"
    )


def test_error_is_one_line_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    render.error("invalid_request", "first\nsecond   third " + "x" * 300)
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("error: invalid_request: first second third x")
