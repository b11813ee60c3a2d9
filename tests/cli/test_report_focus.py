"""``paymaster.reports.focus``, the pure part of ``report focus`` the server shares."""

from __future__ import annotations

import io
from typing import Any

from paymaster.reports import focus

ENTRY: dict[str, Any] = {
    "id": "le_1",
    "kind": "charge",
    "time": "2026-12-31T23:59:59.999999Z",
    "agent_id": "ag_1",
    "principal": "ag_1",
    "connector": "openai",
    "category": "llm",
    "quantity": "1200",
    "unit": "tokens",
    "total": "0.0123",
    "currency": "USD",
    "reservation_id": "res_1",
    "refund_of": None,
    "task": "task_1",
    "session": None,
    "estimated": True,
    "overrun": False,
    "reason": None,
}
AGENTS = {"ag_1": {"name": "writer", "metadata": {"team": "growth", "AgentId": "spoof", "a-b": 3}}}


def rows(*entries: dict[str, Any]) -> list[dict[str, str]]:
    return list(focus.focus_rows(entries, AGENTS, billing_account_id="pm.acme"))


def test_a_charge_is_usage_in_its_hour_and_month() -> None:
    (row,) = rows(ENTRY)
    assert row["ChargeCategory"] == "Usage"
    assert row["ChargeFrequency"] == "Usage-Based"
    assert row["BilledCost"] == "0.0123"
    assert (row["PricingQuantity"], row["PricingUnit"]) == ("1200", "tokens")
    assert row["ServiceCategory"] == "AI and Machine Learning"
    assert row["ChargePeriodStart"] == "2026-12-31T23:00:00Z"
    assert row["ChargePeriodEnd"] == "2027-01-01T00:00:00Z"
    assert row["BillingPeriodStart"] == "2026-12-01T00:00:00Z"
    assert row["BillingPeriodEnd"] == "2027-01-01T00:00:00Z"
    assert (row["BillingAccountId"], row["BillingAccountName"]) == ("pm.acme", "pm.acme")
    assert row["x_TaskId"] == "task_1"
    assert row["x_Estimated"] == "true"
    assert "estimated" in row["ChargeDescription"]


def test_a_refund_is_a_negative_credit_without_units() -> None:
    (row,) = rows(
        {
            **ENTRY,
            "id": "rf_1",
            "kind": "refund",
            "total": "-0.01",
            "refund_of": "le_1",
            "reason": "bad answer",
            "quantity": None,
            "unit": None,
            "estimated": False,
        }
    )
    assert row["ChargeCategory"] == "Credit"
    assert row["BilledCost"] == row["EffectiveCost"] == "-0.01"
    assert (row["PricingQuantity"], row["PricingUnit"]) == ("", "")
    assert row["x_RefundOf"] == "le_1"
    assert "bad answer" in row["ChargeDescription"]


def test_anything_but_charges_and_refunds_is_not_cost() -> None:
    assert rows({**ENTRY, "kind": "fund"}) == []


def test_metadata_columns_never_shadow_the_ledger() -> None:
    header = focus.columns(AGENTS)
    assert {"x_team", "x_a_b", "x_meta_AgentId"} <= set(header)
    assert len(header) == len(set(header))
    (row,) = rows(ENTRY)
    assert row["x_AgentId"] == "ag_1"
    assert row["x_meta_AgentId"] == "spoof"
    assert row["x_a_b"] == "3"
    assert row["x_team"] == "growth"


def test_service_categories() -> None:
    assert focus.service_category(None) == "Other"
    assert focus.service_category("LLM") == "AI and Machine Learning"
    assert focus.service_category("Databases") == "Databases"
    assert focus.service_category("weather") == "Other"


def test_write_csv_counts_rows() -> None:
    buffer = io.StringIO()
    assert focus.write_csv(buffer, focus.columns(AGENTS), rows(ENTRY, ENTRY)) == 2
    assert buffer.getvalue().splitlines()[0].startswith("BilledCost,BillingAccountId,")
