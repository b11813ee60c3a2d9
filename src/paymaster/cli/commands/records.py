"""``paymaster ledger``, ``paymaster audit verify`` and ``paymaster report focus``."""

from __future__ import annotations

import csv
import io
import json as jsonlib
import sys
from collections.abc import Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from paymaster.cli import render
from paymaster.cli.commands import common
from paymaster.errors import InvalidRequest
from paymaster.money import format_nanos, parse_nanos
from paymaster.reports import focus

audit_app = typer.Typer(
    help="The signed, hash-chained audit log.", no_args_is_help=True, rich_markup_mode="markdown"
)
report_app = typer.Typer(help="Cost reports.", no_args_is_help=True, rich_markup_mode="markdown")

# `audit verify` found the chain broken: distinct from bad input (2) and an unavailable
# database (1), so a cron job can tell tampering from a typo.
EXIT_AUDIT_BROKEN = 3


class LedgerFormat(StrEnum):
    table = "table"
    json = "json"
    csv = "csv"


def ledger(
    agent: Annotated[str | None, typer.Option("--agent", help="Only this agent (id or unique name).")] = None,
    connector: Annotated[str | None, typer.Option("--connector", help="Only this connector.")] = None,
    since: Annotated[
        str | None, typer.Option("--since", metavar="TIME", help="From (inclusive): date or RFC 3339.")
    ] = None,
    until: Annotated[
        str | None, typer.Option("--until", metavar="TIME", help="To (exclusive): date or RFC 3339.")
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", min=1, help="At most this many entries, oldest first.")
    ] = 1000,
    fmt: Annotated[LedgerFormat, typer.Option("--format", help="table, json or csv.")] = LedgerFormat.table,
    db: common.DbOption = None,
    config: common.ConfigOption = None,
    json: common.JsonOption = False,
) -> None:
    """Charges and refunds, oldest first (funding changes a limit and is not a ledger entry)."""
    if json and fmt is LedgerFormat.csv:
        raise InvalidRequest("--json and --format csv contradict each other")
    start, end = common.time_bound(since, "--since"), common.time_bound(until, "--until")
    with common.opened(common.settings(db, config)) as authority:
        agent_id = common.resolve_agent(authority, agent) if agent is not None else None
        entries = authority.ledger(agent=agent_id, connector=connector, since=start, until=end, limit=limit)
        table = not json and fmt is LedgerFormat.table
        names = {a["id"]: a["name"] for a in authority.list_agents()} if table else {}
    if json or fmt is LedgerFormat.json:
        render.json_out({"entries": entries})
    elif fmt is LedgerFormat.csv:
        render.raw_out(_ledger_csv(entries))
    else:
        render.ledger_table(entries, net_totals(entries), names)


def net_totals(entries: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Charges less refunds, per currency, summed exactly in nanos."""
    sums: dict[str, int] = {}
    for entry in entries:
        sums[entry["currency"]] = sums.get(entry["currency"], 0) + parse_nanos(
            str(entry["total"]), allow_negative=True
        )
    return {currency: format_nanos(total) for currency, total in sums.items()}


def _ledger_csv(entries: Sequence[Mapping[str, Any]]) -> str:
    buffer = io.StringIO()
    if not entries:
        return ""
    writer = csv.DictWriter(buffer, fieldnames=list(entries[0]), lineterminator="\n")
    writer.writeheader()
    for entry in entries:
        # Lists (the budgets an entry was debited from) as JSON, so a cell stays one value.
        writer.writerow(
            {k: jsonlib.dumps(v) if isinstance(v, list | dict) else _csv_scalar(v) for k, v in entry.items()}
        )
    return buffer.getvalue()


def _csv_scalar(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


@audit_app.command("verify")
def verify(
    against: Annotated[
        Path | None,
        typer.Option(
            "--against", metavar="SINK", help="The append-only file of exported heads to check too."
        ),
    ] = None,
    db: common.DbOption = None,
    config: common.ConfigOption = None,
    json: common.JsonOption = False,
) -> None:
    """Check every event's hash chain and the signed head; exit 3 when broken."""
    if against is not None and not against.is_file():
        raise InvalidRequest(f"--against {against}: no such file")
    with common.opened(common.settings(db, config)) as authority:
        result = authority.verify_audit(str(against) if against is not None else None).to_json()
    if json:
        render.json_out(result)
    else:
        render.audit(result)
    if not result["ok"]:
        raise typer.Exit(EXIT_AUDIT_BROKEN)


@report_app.command("focus")
def report_focus(
    start: Annotated[
        str, typer.Option("--from", metavar="DATE", help="First day (inclusive), or an RFC 3339 time.")
    ],
    end: Annotated[
        str, typer.Option("--to", metavar="DATE", help="Last bound (exclusive), or an RFC 3339 time.")
    ],
    out: Annotated[Path | None, typer.Option("--out", metavar="FILE", help="Write the CSV here.")] = None,
    db: common.DbOption = None,
    config: common.ConfigOption = None,
    json: common.JsonOption = False,
) -> None:
    """FOCUS 1.0 CSV of the ledger entries in [--from, --to): one row per charge or refund.

    Only the CSV goes to stdout (or to --out), so the output can be piped straight into a
    FinOps tool.
    """
    if common.instant(start, "--from") >= common.instant(end, "--to"):
        raise InvalidRequest(f"--from {start} must be before --to {end}")
    since, until = common.time_bound(start, "--from"), common.time_bound(end, "--to")
    settings = common.settings(db, config)
    with common.opened(settings) as authority:
        agents = {a["id"]: a for a in authority.list_agents()}
        header = focus.columns(agents)
        rows = focus.focus_rows(
            common.iter_ledger(authority, since=since, until=until),
            agents,
            billing_account_id=settings.authority_id,
        )
        if json:
            render.json_out({"columns": header, "rows": list(rows)})
        elif out is not None:
            count = _write_report(out, header, rows)
            render.report_written(str(out), count)
        else:
            # Streamed row by row: a year of ledger never has to fit in memory as text.
            focus.write_csv(sys.stdout, header, rows)


def _write_report(path: Path, header: list[str], rows: Any) -> int:
    # Written beside the target and renamed over it: a failed report never leaves half a file.
    temp = path.with_name(f".{path.name}.partial")
    try:
        with temp.open("w", encoding="utf-8", newline="") as fh:
            count = focus.write_csv(fh, header, rows)
        temp.replace(path)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise InvalidRequest(f"cannot write {path}: {exc.strerror or exc}") from None
    return count
