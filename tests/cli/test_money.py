"""``paymaster fund``, ``limits`` and ``status``: amounts are decimal strings, limits change
only what they name, and ``--json`` prints the authority's own data."""

from __future__ import annotations

from typing import Any

import pytest

from paymaster.cli.render import percent

from .conftest import Cli, spend

BAD_AMOUNTS = ["1e3", "-1", "0.1234567891", "abc"]


@pytest.fixture
def writer(ready: Cli) -> str:
    return ready.agent("writer", "--allow", "api.openai.com", "--daily", "5.00")


def caps(agent: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(c["scope"], c["period"], c["limit"]) for c in agent["policy"]["caps"]]


def test_fund_adds_to_the_wallet_and_prints_it(ready: Cli, writer: str) -> None:
    first = ready.json("fund", writer, "--amount", "20")
    second = ready.json("fund", "writer", "--amount", "0.0075")
    assert first["limit"] == "20.00"
    assert second["limit"] == "20.0075"
    with ready.authority() as authority:
        assert second == authority.budget(f"{writer}/total")
    assert "wallet limit 20.0175" in ready.ok("fund", writer, "--amount", "0.01").stdout


@pytest.mark.parametrize("amount", BAD_AMOUNTS)
@pytest.mark.parametrize(
    "command",
    [
        ["fund", "writer", "--amount"],
        ["limits", "writer", "--daily"],
        ["limits", "writer", "--per-call"],
        ["agents", "create", "other", "--key-out", "other.pem", "--daily"],
    ],
    ids=["fund", "limits-daily", "limits-per-call", "create-daily"],
)
def test_bad_amounts_exit_2_naming_invalid_amount(
    ready: Cli, writer: str, command: list[str], amount: str
) -> None:
    line = ready.fails(*command, amount, code="invalid_amount")
    assert repr(amount) in line
    with ready.authority() as authority:
        agent = authority.get_agent(writer)
        assert agent["policy_version"] == 1  # nothing was written
        assert [a["name"] for a in authority.list_agents()] == ["writer"]


@pytest.mark.parametrize("amount", BAD_AMOUNTS)
def test_bad_amounts_in_limit_specs(ready: Cli, writer: str, amount: str) -> None:
    ready.fails("limits", writer, "--connector", f"openai={amount}/day", code="invalid_amount")
    ready.fails("limits", writer, "--category", f"llm={amount}/week", code="invalid_amount")


def test_fund_refuses_zero(ready: Cli, writer: str) -> None:
    assert "greater than zero" in ready.fails("fund", writer, "--amount", "0", code="invalid_amount")


def test_limits_change_only_what_they_name(ready: Cli, writer: str) -> None:
    before = ready.json("agents", "show", writer)
    after_per_call = ready.json("limits", writer, "--per-call", "0.50")
    assert after_per_call["policy"]["per_call_max"] == {"*": "0.50"}
    assert caps(after_per_call) == caps(before) == [("all", "day", "5.00")]
    assert after_per_call["policy"]["allow_hosts"] == ["api.openai.com"]

    # a connector nobody configured is fine: its cap still applies to calls naming it
    with_connector = ready.json(
        "limits", writer, "--connector", "not-configured=2.00/day", "--category", "llm=3/week"
    )
    assert caps(with_connector) == [
        ("all", "day", "5.00"),
        ("connector:not-configured", "day", "2.00"),
        ("category:llm", "week", "3.00"),
    ]
    assert with_connector["policy"]["per_call_max"] == {"*": "0.50"}

    daily = ready.json("limits", writer, "--daily", "7", "--monthly", "100", "--session", "1")
    assert caps(daily) == [
        ("all", "day", "7.00"),  # replaced in place
        ("connector:not-configured", "day", "2.00"),
        ("category:llm", "week", "3.00"),
        ("all", "month", "100.00"),
        ("all", "session", "1.00"),
    ]
    assert daily["policy"]["allow_hosts"] == ["api.openai.com"]
    assert daily["policy"]["per_call_max"] == {"*": "0.50"}
    assert daily["policy_version"] == before["policy_version"] + 3
    with ready.authority() as authority:
        assert authority.get_agent(writer) == daily


def test_limits_without_a_limit_changes_nothing(ready: Cli, writer: str) -> None:
    shown = ready.json("limits", writer)
    assert shown["policy_version"] == 1
    assert "unchanged" in ready.ok("limits", writer).stdout


@pytest.mark.parametrize(
    "spec", ["openai", "openai=2.00", "=2.00/day", "openai=2.00/", "openai=2.00/fortnight"]
)
def test_limits_refuse_a_malformed_spec(ready: Cli, writer: str, spec: str) -> None:
    ready.fails("limits", writer, "--connector", spec, code="invalid_request")
    assert ready.json("agents", "show", writer)["policy_version"] == 1


def test_status_json_is_what_the_authority_returns(ready: Cli, writer: str) -> None:
    other = ready.agent("other")
    ready.ok("fund", writer, "--amount", "20")
    ready.ok("limits", writer, "--connector", "openai=2/day")
    with ready.authority() as authority:
        spend(authority, writer, "1.50", "1.25", connector="openai")
        spend(authority, writer, "0.25", None)  # still held
        one = ready.json("status", writer)
        assert one == authority.agent_budgets(writer)
        assert ready.json("status") == {
            "agents": [authority.agent_budgets(writer), authority.agent_budgets(other)]
        }
    wallet = one["budgets"][0]
    assert (wallet["limit"], wallet["spent"], wallet["reserved"], wallet["remaining"]) == (
        "20.00",
        "1.25",
        "0.25",
        "18.50",
    )


def test_status_table_shows_each_budget_with_its_use(ready: Cli, writer: str) -> None:
    ready.ok("fund", writer, "--amount", "10")
    with ready.authority() as authority:
        spend(authority, writer, "4.55", "4.55")
    table = ready.ok("status", "writer").stdout
    for text in ("wallet", "day", "10.00", "4.55", "5.45", "91%", "█", "░"):
        assert text in table, text
    for budget in ready.json("status", "writer")["budgets"]:
        assert percent(budget["used"]) in table
    assert "no budget configured" in ready.ok("status", ready.agent("idle")).stdout
