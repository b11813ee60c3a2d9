"""FOCUS 1.0 rows from ledger entries (PROTOCOL.md, "Command line": ``report focus``).

Pure: ledger entries (the JSON of ``Authority.ledger``) and agent records in, one FOCUS row
per charge or refund out; the caller reads the ledger and writes the CSV, so the CLI and
the server's ``GET /v1/reports/focus`` produce the same file.

Mapping choices (documented in docs/cli.md):
- a charge is ``ChargeCategory=Usage``; a refund is ``Credit`` with a negative cost; funding
  never reaches the ledger, and anything that is neither a charge nor a refund is skipped,
  because it is not cost;
- the four cost columns are equal: the ledger holds what was charged, and Paymaster knows
  no list price or negotiated discount beyond it;
- ``ServiceName``, ``ProviderName``, ``PublisherName`` and ``InvoiceIssuerName`` are the
  connector: the provider bills the account, Paymaster only records the spend;
- the billing account is the authority (``authority_id``); the billing period is the UTC
  calendar month of the entry and the charge period the UTC hour, as hourly cost data is;
- Paymaster's own fields are ``x_`` columns, then each agent metadata key as ``x_<key>``.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TextIO

__all__ = [
    "FOCUS_COLUMNS",
    "X_COLUMNS",
    "columns",
    "focus_rows",
    "metadata_columns",
    "service_category",
    "write_csv",
]

# Every column FOCUS 1.0 makes mandatory, then ChargeFrequency (recommended, and what tells
# a usage-based charge from a purchase), in the order the specification lists them.
FOCUS_COLUMNS: Final[tuple[str, ...]] = (
    "BilledCost",
    "BillingAccountId",
    "BillingAccountName",
    "BillingCurrency",
    "BillingPeriodEnd",
    "BillingPeriodStart",
    "ChargeCategory",
    "ChargeClass",
    "ChargeDescription",
    "ChargeFrequency",
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
)

X_COLUMNS: Final[tuple[str, ...]] = (
    "x_AgentId",
    "x_AgentName",
    "x_Principal",
    "x_TaskId",
    "x_SessionId",
    "x_ReservationId",
    "x_LedgerEntryId",
    "x_RefundOf",
    "x_Category",
    "x_Estimated",
    "x_Overrun",
)

# A connector's category, as configured, to the FOCUS ServiceCategory it belongs to;
# anything else is "Other", the value FOCUS keeps for what fits no category.
_SERVICE_CATEGORIES: Final[Mapping[str, str]] = {
    "llm": "AI and Machine Learning",
    "ai": "AI and Machine Learning",
    "ml": "AI and Machine Learning",
    "embedding": "AI and Machine Learning",
    "embeddings": "AI and Machine Learning",
    "image": "AI and Machine Learning",
    "speech": "AI and Machine Learning",
    "vision": "AI and Machine Learning",
    "analytics": "Analytics",
    "compute": "Compute",
    "database": "Databases",
    "storage": "Storage",
    "search": "Web",
    "web": "Web",
    "commerce": "Business Applications",
}
_FOCUS_SERVICE_CATEGORIES: Final[frozenset[str]] = frozenset(
    {
        "AI and Machine Learning",
        "Analytics",
        "Business Applications",
        "Compute",
        "Databases",
        "Developer Tools",
        "Multicloud",
        "Identity",
        "Integration",
        "Internet of Things",
        "Management and Governance",
        "Media",
        "Migration",
        "Mobile",
        "Networking",
        "Security",
        "Storage",
        "Web",
        "Other",
    }
)
_NOT_COLUMN_CHARS = re.compile(r"[^A-Za-z0-9_]")


def service_category(category: str | None) -> str:
    """The FOCUS ServiceCategory of a connector category (``llm`` → AI and Machine Learning)."""
    if category is None:
        return "Other"
    if category in _FOCUS_SERVICE_CATEGORIES:
        return category
    return _SERVICE_CATEGORIES.get(category.lower(), "Other")


def metadata_columns(agents: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Each agent metadata key (over all agents) to its column, ``x_`` + the key.

    Characters a column name cannot hold become ``_``. A key that would shadow one of
    FOCUS's or Paymaster's own columns goes to ``x_meta_<key>`` instead: the ledger's
    facts are never overwritten by free-form metadata.
    """
    reserved = set(FOCUS_COLUMNS) | set(X_COLUMNS)
    keys = sorted({str(k) for agent in agents.values() for k in (agent.get("metadata") or {})})
    out: dict[str, str] = {}
    for key in keys:
        name = "x_" + _NOT_COLUMN_CHARS.sub("_", key)
        out[key] = "x_meta_" + name[2:] if name in reserved else name
    return out


def columns(agents: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The header: FOCUS columns, Paymaster's ``x_`` columns, then the metadata columns."""
    meta = sorted(set(metadata_columns(agents).values()))
    return [*FOCUS_COLUMNS, *X_COLUMNS, *meta]


def _focus_time(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


def _month(at: datetime) -> tuple[datetime, datetime]:
    start = at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )
    return start, end


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _description(entry: Mapping[str, Any], who: str) -> str:
    connector = entry["connector"]
    if entry["kind"] == "refund":
        text = f"Refund of {entry.get('refund_of')} on {connector}"
        return f"{text}: {entry['reason']}" if entry.get("reason") else text
    text = f"{connector} call by {who}"
    if entry.get("quantity") is not None and entry.get("unit"):
        text += f", {entry['quantity']} {entry['unit']}"
    if entry.get("estimated"):
        text += " (estimated: usage could not be read, charged at the hold)"
    return text


def focus_row(
    entry: Mapping[str, Any],
    agents: Mapping[str, Mapping[str, Any]],
    meta_columns: Mapping[str, str],
    *,
    billing_account_id: str,
    billing_account_name: str,
) -> dict[str, str]:
    """One ledger entry (a charge or a refund) as a FOCUS row of strings."""
    at = datetime.fromisoformat(str(entry["time"])).astimezone(UTC)
    billing_start, billing_end = _month(at)
    hour = at.replace(minute=0, second=0, microsecond=0)
    agent_id = entry.get("agent_id")
    agent = agents.get(agent_id) if agent_id else None
    who = f"{agent['name']} ({agent_id})" if agent else str(agent_id or entry.get("principal") or "")
    refund = entry["kind"] == "refund"
    # The ledger stores a refund's total as negative already; the sign is kept as written.
    cost = str(entry["total"])
    if refund:
        quantity, unit = None, None  # a credit prices no units
    else:
        # Every usage row prices something: the call itself when no meter was recorded.
        quantity = entry.get("quantity") if entry.get("quantity") is not None else "1"
        unit = entry.get("unit") or "call"
    row: dict[str, str] = {
        "BilledCost": cost,
        "BillingAccountId": billing_account_id,
        "BillingAccountName": billing_account_name,
        "BillingCurrency": str(entry["currency"]),
        "BillingPeriodEnd": _focus_time(billing_end),
        "BillingPeriodStart": _focus_time(billing_start),
        "ChargeCategory": "Credit" if refund else "Usage",
        "ChargeClass": "",
        "ChargeDescription": _description(entry, who),
        "ChargeFrequency": "Usage-Based",
        "ChargePeriodEnd": _focus_time(hour + timedelta(hours=1)),
        "ChargePeriodStart": _focus_time(hour),
        "ContractedCost": cost,
        "EffectiveCost": cost,
        "InvoiceIssuerName": str(entry["connector"]),
        "ListCost": cost,
        "PricingQuantity": _cell(quantity),
        "PricingUnit": _cell(unit),
        "ProviderName": str(entry["connector"]),
        "PublisherName": str(entry["connector"]),
        "ServiceCategory": service_category(entry.get("category")),
        "ServiceName": str(entry["connector"]),
        "x_AgentId": _cell(agent_id),
        "x_AgentName": _cell(agent["name"] if agent else None),
        "x_Principal": _cell(entry.get("principal")),
        "x_TaskId": _cell(entry.get("task")),
        "x_SessionId": _cell(entry.get("session")),
        "x_ReservationId": _cell(entry.get("reservation_id")),
        "x_LedgerEntryId": _cell(entry.get("id")),
        "x_RefundOf": _cell(entry.get("refund_of")),
        "x_Category": _cell(entry.get("category")),
        "x_Estimated": _cell(bool(entry.get("estimated"))),
        "x_Overrun": _cell(bool(entry.get("overrun"))),
    }
    for column in meta_columns.values():
        row.setdefault(column, "")
    for key, value in ((agent or {}).get("metadata") or {}).items():
        target = meta_columns.get(str(key))
        if target is not None:
            row[target] = _cell(value)
    return row


def focus_rows(
    entries: Iterable[Mapping[str, Any]],
    agents: Mapping[str, Mapping[str, Any]],
    *,
    billing_account_id: str,
    billing_account_name: str | None = None,
) -> Iterator[dict[str, str]]:
    """FOCUS rows for the charges and refunds among ``entries``, lazily, in their order.

    ``agents`` maps agent ids to agent records (``{"name", "metadata", …}``); its metadata
    keys must be the ones ``columns(agents)`` was built from.
    """
    meta = metadata_columns(agents)
    for entry in entries:
        if entry.get("kind") not in ("charge", "refund"):
            continue
        yield focus_row(
            entry,
            agents,
            meta,
            billing_account_id=billing_account_id,
            billing_account_name=billing_account_name or billing_account_id,
        )


def csv_chunks(
    header: list[str], rows: Iterable[Mapping[str, str]], rows_per_chunk: int = 500
) -> Iterator[str]:
    """The header, then the rows, as CSV text in chunks of ``rows_per_chunk`` rows (so a
    server can stream a report without holding it whole)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    pending = 0
    for row in rows:
        writer.writerow(row)
        pending += 1
        if pending >= rows_per_chunk:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
            pending = 0
    yield buffer.getvalue()


def write_csv(out: TextIO, header: list[str], rows: Iterable[Mapping[str, str]]) -> int:
    """Write the header and rows as CSV; returns the number of rows written."""
    count = 0

    def counted() -> Iterator[Mapping[str, str]]:
        nonlocal count
        for row in rows:
            count += 1
            yield row

    for chunk in csv_chunks(header, counted()):
        out.write(chunk)
    return count
