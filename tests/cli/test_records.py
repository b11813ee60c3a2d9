"""``paymaster ledger``, ``audit verify`` and ``report focus``."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from paymaster.money import parse_nanos
from paymaster.reports.focus import FOCUS_COLUMNS

from .conftest import Cli, spend

# FOCUS 1.0's mandatory columns, written out here rather than imported, so that the test
# checks the report against the specification and not against itself.
MANDATORY = {
    "BilledCost",
    "BillingAccountId",
    "BillingAccountName",
    "BillingCurrency",
    "BillingPeriodEnd",
    "BillingPeriodStart",
    "ChargeCategory",
    "ChargeClass",
    "ChargeDescription",
    "ChargePeriodEnd",
    "ChargePeriodStart",
    "ContractedCost",
    "EffectiveCost",
    "InvoiceIssuerName",
    "ListCost",
    "PricingQuantity",
    "PricingUnit",
    "ProviderName",
    "PublisherName",
    "ServiceCategory",
    "ServiceName",
}


@pytest.fixture
def books(ready: Cli) -> dict[str, Any]:
    """Two agents' spend: charges on two connectors, one refund, one hold still open."""
    writer = ready.agent("writer", "--meta", "team=growth", "--meta", "cost center=42")
    other = ready.agent("other")
    ready.ok("fund", writer, "--amount", "20")
    ready.ok("fund", other, "--amount", "5")
    with ready.authority() as authority:
        first = spend(authority, writer, "0.50", "0.40", connector="openai")
        spend(authority, writer, "0.10", "0.10", connector="search")
        spend(authority, other, "1.00", "0.75", connector="openai", task=None)
        spend(authority, writer, "0.30", None)  # held, not charged: not in the ledger
        refund = authority.refund(first["ledger_entry_id"], parse_nanos("0.15"), "bad answer", None)
        ledger = authority.ledger()
    return {"writer": writer, "other": other, "ledger": ledger, "refund": refund, "charge": first}


# ---------------------------------------------------------------- ledger


def test_ledger_json_is_the_authority_ledger(ready: Cli, books: dict[str, Any]) -> None:
    assert len(books["ledger"]) == 4
    assert ready.json("ledger") == {"entries": books["ledger"]}
    assert json.loads(ready.ok("ledger", "--format", "json").stdout) == {"entries": books["ledger"]}


def test_ledger_filters(ready: Cli, books: dict[str, Any]) -> None:
    by_agent = ready.json("ledger", "--agent", "writer")["entries"]
    assert [e["agent_id"] for e in by_agent] == [books["writer"]] * 3
    by_connector = ready.json("ledger", "--connector", "openai")["entries"]
    assert {e["connector"] for e in by_connector} == {"openai"}
    assert len(by_connector) == 3  # two charges and the refund
    times = [e["time"] for e in books["ledger"]]
    since = ready.json("ledger", "--since", times[1])["entries"]
    assert [e["id"] for e in since] == [e["id"] for e in books["ledger"][1:]]
    until = ready.json("ledger", "--until", times[1])["entries"]  # exclusive
    assert [e["id"] for e in until] == [books["ledger"][0]["id"]]
    day = times[0][:10]
    assert len(ready.json("ledger", "--since", day)["entries"]) == 4
    assert ready.json("ledger", "--until", day)["entries"] == []
    assert len(ready.json("ledger", "--limit", "2")["entries"]) == 2


def test_ledger_csv_and_table(ready: Cli, books: dict[str, Any]) -> None:
    rows = list(csv.DictReader(io.StringIO(ready.ok("ledger", "--format", "csv").stdout)))
    assert [r["id"] for r in rows] == [e["id"] for e in books["ledger"]]
    assert [r["total"] for r in rows] == ["0.40", "0.10", "0.75", "-0.15"]
    assert json.loads(rows[0]["budgets"]) == books["ledger"][0]["budgets"]
    wide = ready("ledger", env={"COLUMNS": "120"})
    assert wide.exit_code == 0
    for entry in books["ledger"]:
        assert entry["id"] in wide.stdout
    narrow = ready.ok("ledger").stdout  # 80 columns: ids are left out whole, never cut
    assert "le_" not in narrow
    assert "--format csv" in narrow
    for table in (wide.stdout, narrow):
        assert "refund -0.15" in table
        assert "net 1.10 USD" in table


def test_ledger_refuses_bad_input(ready: Cli, books: dict[str, Any]) -> None:
    ready.fails("ledger", "--since", "yesterday", code="invalid_request")
    ready.fails("ledger", "--json", "--format", "csv", code="invalid_request")
    ready.fails("ledger", "--format", "xml", code="invalid_request")
    ready.fails("ledger", "--agent", "nobody", code="not_found")


# ---------------------------------------------------------------- audit


def test_audit_verify_ok(ready: Cli, books: dict[str, Any]) -> None:
    with ready.authority() as authority:
        count = len(authority.events())
    assert ready.json("audit", "verify") == {"ok": True, "events": count, "head_seq": count}
    assert f"ok: audit log intact, {count} events" in ready.ok("audit", "verify").stdout


def tamper(db_file: Path, seq: int) -> None:
    """Edit one event's data in place, as someone with write access to the file could."""
    with sqlite3.connect(db_file) as conn:
        (text,) = conn.execute("SELECT event FROM events WHERE seq = ?", (seq,)).fetchone()
        event = json.loads(text)
        event["data"]["tampered"] = True
        conn.execute("UPDATE events SET event = ? WHERE seq = ?", (json.dumps(event), seq))
    conn.close()


@pytest.mark.parametrize("where", ["middle", "last"])
def test_audit_verify_fails_after_an_event_is_edited(ready: Cli, books: dict[str, Any], where: str) -> None:
    with ready.authority() as authority:
        count = len(authority.events())
    seq = count if where == "last" else 3
    tamper(ready.home / "pm.db", seq)
    result = ready("audit", "verify", "--json")
    assert result.exit_code == 3
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert report["first_bad_seq"] == seq
    assert report["reason"]
    table = ready("audit", "verify")
    assert table.exit_code == 3
    assert f"broken: first bad event at seq {seq}" in table.stdout


def test_audit_verify_against_a_sink(ready: Cli, tmp_path: Path) -> None:
    sink = tmp_path / "heads.jsonl"
    env = {"PAYMASTER_AUDIT_SINK": str(sink)}
    result = ready("agents", "create", "w", "--key-out", str(tmp_path / "w.pem"), env=env)
    assert result.exit_code == 0, result.stderr
    assert sink.read_text().strip()
    assert ready.json("audit", "verify", "--against", str(sink))["ok"] is True
    ready.fails("audit", "verify", "--against", str(tmp_path / "missing.jsonl"), code="invalid_request")


# ---------------------------------------------------------------- report focus


def focus(ready: Cli, *args: str) -> tuple[list[str], list[dict[str, str]]]:
    text = ready.ok("report", "focus", *args).stdout
    reader = csv.DictReader(io.StringIO(text))
    rows = list(reader)
    return list(reader.fieldnames or []), rows


def test_report_focus_columns_and_signs(ready: Cli, books: dict[str, Any]) -> None:
    header, rows = focus(ready, "--from", "2000-01-01", "--to", "2100-01-01")
    assert MANDATORY <= set(header)
    assert list(FOCUS_COLUMNS) == header[: len(FOCUS_COLUMNS)]
    for column in ("ChargeFrequency", "x_AgentId", "x_TaskId", "x_ReservationId", "x_Estimated"):
        assert column in header
    assert "x_team" in header
    assert "x_cost_center" in header  # a metadata key, made a column name
    # one row per ledger entry (funding is not cost; a hold is not a charge)
    assert [r["x_LedgerEntryId"] for r in rows] == [e["id"] for e in books["ledger"]]
    by_id = {r["x_LedgerEntryId"]: r for r in rows}
    charge = by_id[books["charge"]["ledger_entry_id"]]
    assert charge["ChargeCategory"] == "Usage"
    assert charge["BilledCost"] == "0.40"
    assert charge["ServiceName"] == "openai"
    assert charge["x_AgentId"] == books["writer"]
    assert charge["x_team"] == "growth"
    assert charge["x_cost_center"] == "42"
    assert charge["x_Estimated"] == "false"
    assert charge["x_ReservationId"] == books["charge"]["reservation_id"]
    assert charge["ChargeFrequency"] == "Usage-Based"
    refund = by_id[books["refund"]["refund_id"]]
    assert refund["ChargeCategory"] == "Credit"
    assert refund["BilledCost"] == "-0.15"
    assert refund["ServiceName"] == "openai"
    for row in rows:
        assert row["BilledCost"] == row["EffectiveCost"] == row["ListCost"] == row["ContractedCost"]
        assert row["BillingCurrency"] == "USD"
        assert row["BillingAccountId"] == "paymaster.local"
        assert row["ChargePeriodStart"] < row["ChargePeriodEnd"]
        assert row["BillingPeriodStart"] <= row["ChargePeriodStart"] < row["BillingPeriodEnd"]
        assert (row["ChargeCategory"] == "Credit") == row["BilledCost"].startswith("-")
    other = next(r for r in rows if r["x_AgentId"] == books["other"])
    assert other["x_team"] == ""
    total = sum(parse_nanos(r["BilledCost"], allow_negative=True) for r in rows)
    assert total == parse_nanos("1.10")


def test_report_focus_covers_from_inclusive_to_exclusive(ready: Cli, books: dict[str, Any]) -> None:
    times = [e["time"] for e in books["ledger"]]
    _, rows = focus(ready, "--from", times[1], "--to", times[3])
    assert [r["x_LedgerEntryId"] for r in rows] == [e["id"] for e in books["ledger"][1:3]]
    header, none = focus(ready, "--from", "2000-01-01", "--to", "2000-02-01")
    assert none == []
    assert MANDATORY <= set(header)  # an empty report still has its header
    ready.fails("report", "focus", "--from", "2026-02-01", "--to", "2026-01-01", code="invalid_request")
    ready.fails("report", "focus", "--from", "2026-02-01", "--to", "2026-02-01", code="invalid_request")
    ready.fails("report", "focus", "--from", "last week", "--to", "2026-02-01", code="invalid_request")


def test_report_focus_out_file_and_json(ready: Cli, books: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "focus.csv"
    printed = ready.ok("report", "focus", "--from", "2000-01-01", "--to", "2100-01-01").stdout
    result = ready.ok("report", "focus", "--from", "2000-01-01", "--to", "2100-01-01", "--out", str(out))
    assert out.read_text() == printed
    assert "wrote 4 FOCUS rows" in result.stdout
    as_json = ready.json("report", "focus", "--from", "2000-01-01", "--to", "2100-01-01")
    assert as_json["rows"] == list(csv.DictReader(io.StringIO(printed)))
    assert as_json["columns"] == next(csv.reader(io.StringIO(printed)))
    ready.fails(
        "report",
        "focus",
        "--from",
        "2000-01-01",
        "--to",
        "2100-01-01",
        "--out",
        str(tmp_path / "no" / "x.csv"),
        code="invalid_request",
    )
