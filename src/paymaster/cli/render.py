"""Everything the command line prints, and the only module of ours that imports Rich.

People get tables (a usage bar per budget, coloured by how much of it is used); programs
get ``--json`` (plain ``json.dumps``, never Rich's colouring) or CSV; errors are one line,
``error: <code>: <message>``, on stderr. Every function takes plain JSON-shaped data, so
rendering never reaches into the authority.

Consoles are made per call, on whatever ``sys.stdout``/``sys.stderr`` are at that moment,
so output redirected by a caller (a test runner, ``contextlib.redirect_stdout``) is honoured.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

BAR_WIDTH = 10
# Terminal width from which the ledger table has room for whole entry ids.
WIDE = 100
# Colours follow the default alert thresholds of a policy (0.5, 0.75, 0.9).
_BANDS: tuple[tuple[Decimal, str], ...] = (
    (Decimal("0.5"), "green"),
    (Decimal("0.75"), "yellow"),
    (Decimal("0.9"), "dark_orange"),
    (Decimal("1"), "red"),
)
_STATUS_STYLES = {"active": "green", "frozen": "yellow", "revoked": "red"}


def _out() -> Console:
    return Console(file=sys.stdout, highlight=False)


def _line(text: Text, console: Console | None = None) -> None:
    # One message, one line: never broken at the terminal's width (a terminal wraps it anyway).
    (console or _out()).print(text, soft_wrap=True)


def _table(title: Text | str | None = None) -> Table:
    # No vertical rules: an 80-column terminal keeps room for the data.
    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)


def _err() -> Console:
    return Console(file=sys.stderr, highlight=False, soft_wrap=True)


def _text(value: Any) -> Text:
    # Text, not markup: an agent name or a metadata value containing "[" is shown as typed.
    return Text("" if value is None else str(value))


# ---------------------------------------------------------------- programs


def json_out(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def raw_out(text: str) -> None:
    sys.stdout.write(text)


def error(code: str, message: str) -> None:
    """The one-line error every command ends with on bad input or a refusal."""
    line = " ".join(str(message).split())  # never more than one line, whatever the message
    text = Text("error:", style="bold red")
    text.append(f" {code}: {line}")
    _err().print(text, soft_wrap=True)


def warn(message: str) -> None:
    _err().print(Text(f"warning: {message}", style="yellow"), soft_wrap=True)


# ---------------------------------------------------------------- helpers


def _fields(rows: Iterable[tuple[str, Any]], width: int | None = None) -> None:
    """``label  value`` lines, labels aligned. Lines, not a table: a path, an id or a key
    is never folded, so it can be copied from the terminal whole."""
    rows = list(rows)
    width = width or max(len(label) for label, _ in rows) + 2
    console = _out()
    for label, value in rows:
        line = Text(label.ljust(width), style="bold")
        line.append(value if isinstance(value, Text) else _text(value))
        _line(line, console)


def _fraction(used: Any) -> Decimal:
    try:
        value = Decimal(str(used))
    except InvalidOperation:
        return Decimal(0)
    return value if value.is_finite() and value > 0 else Decimal(0)


def _band(fraction: Decimal) -> str:
    for bound, style in _BANDS:
        if fraction < bound:
            return style
    return "bold red"


def percent(used: Any) -> str:
    """``"0.355"`` → ``"35.5%"``; at most one decimal, rounded up like ``used`` itself."""
    pct = (_fraction(used) * 100).quantize(Decimal("0.1"), rounding=ROUND_CEILING)
    text = f"{pct:f}"
    return (text[:-2] if text.endswith(".0") else text) + "%"


def usage_bar(used: Any) -> Text:
    """A bar of ``BAR_WIDTH`` cells and the percentage; any use at all fills one cell.

    Full and empty cells are different characters, so the bar reads without colour too.
    """
    fraction = _fraction(used)
    style = _band(fraction)
    filled = min(BAR_WIDTH, int((fraction * BAR_WIDTH).to_integral_value(rounding=ROUND_CEILING)))
    bar = Text("█" * filled, style=style)
    bar.append("░" * (BAR_WIDTH - filled), style="dim")
    bar.append(f" {percent(used)}", style=style)
    return bar


def _status(status: Any) -> Text:
    return Text(str(status), style=_STATUS_STYLES.get(str(status), ""))


def _agent_label(agent: Mapping[str, Any]) -> str:
    return f"{agent['name']} ({agent['id']})"


# ---------------------------------------------------------------- init / serve


def init_done(info: Mapping[str, Any]) -> None:
    key_note = "created, mode 0600" if info["signing_key_created"] else "kept"
    rows: list[tuple[str, Any]] = [
        ("database", info["db"]),
        ("authority key", f"{info['signing_key_path']} ({key_note})"),
    ]
    if info.get("admin_key"):
        rows.append(("admin key", Text(str(info["admin_key"]), style="bold green")))
        note = "shown once: store it now (export PAYMASTER_ADMIN_KEY=…); only its hash is kept"
        rows.append(("", Text(note, style="yellow")))
    elif info["admin_key_source"] == "environment":
        rows.append(("admin key", "from PAYMASTER_ADMIN_KEY (its hash is stored; not printed)"))
    else:
        rows.append(("admin key", "made by an earlier init (shown only then)"))
    _fields(rows)


def serving(url: str, db: str, workers: int) -> None:
    _line(Text(f"paymaster serving {url} ({workers} worker{'s' if workers != 1 else ''}, {db})"))


# ---------------------------------------------------------------- agents and keys


def agent_detail(agent: Mapping[str, Any]) -> None:
    meta = agent.get("metadata") or {}
    _fields(
        [
            ("id", agent["id"]),
            ("name", agent["name"]),
            ("status", _status(agent["status"])),
            ("parent", agent.get("parent") or "-"),
            ("public key", agent["public_key"]),
            ("metadata", ", ".join(f"{k}={v}" for k, v in meta.items()) or "-"),
            ("policy", f"version {agent.get('policy_version', 0)}"),
            ("created", agent.get("created_at")),
        ],
        width=14,
    )
    policy_summary(agent.get("policy"))


def policy_summary(policy: Mapping[str, Any] | None) -> None:
    console = _out()
    if not policy:
        _line(Text("no policy: the defaults apply (no caps, no per-call maximum)", style="dim"), console)
        return
    hosts = policy.get("allow_hosts")
    per_call = policy.get("per_call_max") or {}
    _fields(
        [
            (
                "allow hosts",
                ", ".join(hosts) if hosts is not None else "the hosts of every configured connector",
            ),
            ("per-call max", ", ".join(f"{k} {v}" for k, v in per_call.items()) or "-"),
        ],
        width=14,
    )
    caps = policy.get("caps") or []
    if caps:
        table = _table("caps")
        for name in ("scope", "period", "limit", "mode", "tz"):
            table.add_column(name, justify="right" if name == "limit" else "left")
        for cap in caps:
            table.add_row(
                *(
                    _text(cap.get(name) or ("UTC" if name == "tz" else ""))
                    for name in ("scope", "period", "limit", "mode", "tz")
                )
            )
        console.print(table)


def agent_created(agent: Mapping[str, Any], key_file: str | None) -> None:
    console = _out()
    _line(Text(f"created agent {_agent_label(agent)}", style="bold green"), console)
    if key_file is not None:
        console.print(
            Text(f"private key written to {key_file} (mode 0600); the authority keeps only the public key"),
            soft_wrap=True,
        )
    agent_detail(agent)


def agents_table(agents: Sequence[Mapping[str, Any]]) -> None:
    console = _out()
    if not agents:
        console.print(Text("no agents yet: paymaster agents create NAME --key-out FILE", style="dim"))
        return
    table = _table()
    table.add_column("id", no_wrap=True)
    table.add_column("name", overflow="ellipsis", min_width=6)
    table.add_column("status", no_wrap=True)
    table.add_column("parent", overflow="ellipsis", min_width=6)
    table.add_column("policy", justify="right", no_wrap=True)
    table.add_column("created", no_wrap=True)
    for agent in agents:
        table.add_row(
            _text(agent["id"]),
            _text(agent["name"]),
            _status(agent["status"]),
            _text(agent.get("parent") or "-"),
            _text(f"v{agent.get('policy_version', 0)}"),
            _text(str(agent.get("created_at", ""))[:10]),
        )
    console.print(table)


def status_changed(agent: Mapping[str, Any]) -> None:
    text = Text(f"{_agent_label(agent)} is now ")
    text.append(_status(agent["status"]))
    _out().print(text, soft_wrap=True)


def service_key(principal: str, key: str) -> None:
    console = _out()
    console.print(Text(f"service key for {principal}:", style="bold"))
    console.print(Text(key, style="bold green"), soft_wrap=True)
    console.print(Text("shown once: store it now; only its hash is kept", style="yellow"))


# ---------------------------------------------------------------- money


def funded(agent: Mapping[str, Any], amount: str, wallet: Mapping[str, Any]) -> None:
    _out().print(
        Text(
            f"funded {_agent_label(agent)} with {amount} {wallet['currency']}:"
            f" wallet limit {wallet['limit']}, spent {wallet['spent']}, remaining {wallet['remaining']}"
        ),
        soft_wrap=True,
    )


def limits(agent: Mapping[str, Any], changed: bool) -> None:
    console = _out()
    if changed:
        _line(Text(f"limits of {_agent_label(agent)} set: policy version {agent['policy_version']}"), console)
    else:
        _line(
            Text(f"no limit named: the limits of {_agent_label(agent)} are unchanged", style="dim"), console
        )
    policy_summary(agent.get("policy"))


def budget_label(budget: Mapping[str, Any], agent_id: str) -> str:
    """A budget as its agent's row names it: ``wallet``, ``day``, ``connector:openai day``,
    ``team:growth month`` (a parent's cap); the current window is implied."""
    if budget.get("kind") == "wallet":
        label = "wallet"
    elif budget.get("kind") == "task":
        label = f"task {budget['id']}"
    else:
        parts = [] if budget.get("owner") == agent_id else [str(budget.get("owner"))]
        if budget.get("scope") not in (None, "all"):
            parts.append(str(budget["scope"]))
        parts.append(str(budget.get("period")))
        label = " ".join(parts)
    return f"{label} (shadow)" if budget.get("mode") == "shadow" else label


def budgets(agent: Mapping[str, Any], view: Mapping[str, Any]) -> None:
    """One agent's budgets (what ``GET /v1/agents/{id}/budgets`` returns), one row each."""
    console = _out()
    title = Text(f"{agent['name']}  {agent['id']}  ", style="bold")
    title.append(_status(agent["status"]))
    rows = view.get("budgets") or []
    if not rows:
        console.print(title)
        console.print(
            Text(
                "  no budget configured: every billable call is denied (fund it or set a limit)", style="dim"
            ),
            soft_wrap=True,
        )
        return
    currency = rows[0].get("currency", "")
    table = _table(title)
    table.add_column("budget", overflow="fold")
    for name in ("limit", "spent", "reserved", "remaining"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("used", no_wrap=True)
    for budget in rows:
        remaining = str(budget["remaining"])
        table.add_row(
            _text(budget_label(budget, str(agent["id"]))),
            _text(budget["limit"]),
            _text(budget["spent"]),
            _text(budget["reserved"]),
            Text(remaining, style="bold red" if remaining.startswith("-") else ""),
            usage_bar(budget.get("used")),
        )
    table.caption = f"amounts in {currency}; each cap in its current window"
    console.print(table)


# ---------------------------------------------------------------- records


def ledger_table(
    entries: Sequence[Mapping[str, Any]],
    totals: Mapping[str, str],
    names: Mapping[str, str] | None = None,
    title: str = "ledger",
    ids: bool = True,
) -> None:
    """Entries oldest first; ``names`` maps agent ids to names, which read better than ids.

    Entry ids are whole or absent, never folded (an id cut in two cannot be pasted); on a
    narrow terminal the agent and connector names give way first.
    """
    console = _out()
    if not entries:
        console.print(Text("no ledger entries", style="dim"))
        return
    names = names or {}
    # An entry id is 29 characters and is useless cut in two: it is shown when the terminal
    # has room for it whole, and always available from --format csv or --json.
    ids_hidden = ids and console.width < WIDE
    ids = ids and not ids_hidden
    currencies = {str(e["currency"]) for e in entries}
    single = currencies.pop() if len(currencies) == 1 else None
    table = _table(title)
    table.add_column("time (UTC)", no_wrap=True)
    if ids:
        table.add_column("entry", no_wrap=True)
    # Wrappable (so Rich narrows these first) but cut with an ellipsis rather than folded.
    table.add_column("agent", overflow="ellipsis", min_width=6)
    table.add_column("connector", overflow="ellipsis", min_width=6)
    # Flags go in the amount's cell, before it: a column of their own is the first thing a
    # narrow terminal would squeeze out, and "refund -0.15" must never lose its "refund".
    table.add_column(f"amount ({single})" if single else "amount", justify="right", no_wrap=True)
    for entry in entries:
        total = str(entry["total"])
        agent_id = entry.get("agent_id")
        flags = ["refund"] if entry.get("kind") == "refund" else []
        flags += [name for name in ("estimated", "overrun") if entry.get(name)]
        amount = Text(" ".join(flags) + " " if flags else "", style="yellow")
        amount.append(
            total if single else f"{total} {entry['currency']}",
            style="green" if total.startswith("-") else "",
        )
        cells = [_text(str(entry["time"])[:16].replace("T", " "))]
        if ids:
            cells.append(_text(entry["id"]))
        cells += [
            _text(names.get(agent_id, agent_id) if agent_id else entry.get("principal")),
            _text(entry["connector"]),
            amount,
        ]
        table.add_row(*cells)
    table.caption = f"{len(entries)} entries; net " + ", ".join(f"{v} {k}" for k, v in sorted(totals.items()))
    if ids_hidden:
        table.caption += "; ids: --json or --format csv"
    console.print(table)


def audit(result: Mapping[str, Any]) -> None:
    if result["ok"]:
        _line(
            Text(
                f"ok: audit log intact, {result['events']} events, signed head at seq {result['head_seq']}",
                style="green",
            )
        )
    else:
        _line(
            Text(
                f"broken: first bad event at seq {result['first_bad_seq']}: {result['reason']}"
                f" ({result['events']} events read)",
                style="bold red",
            )
        )


def report_written(path: str, rows: int) -> None:
    _line(Text(f"wrote {rows} FOCUS row{'s' if rows != 1 else ''} to {path}"))


# ---------------------------------------------------------------- demo


def demo_intro(agent: Mapping[str, Any], db: str, temporary: bool, cap: str, wallet: str, price: str) -> None:
    _line(Text("paymaster demo: a runaway agent loop, and the cap that stops it", style="bold"))
    _line(Text(f"database {db}{' (temporary)' if temporary else ''}", style="dim"))
    _line(
        Text(
            f"agent {_agent_label(agent)}: wallet {wallet}, daily cap {cap}; each iteration holds {price}"
            " for a web search, then is charged what the call really cost",
            style="dim",
        )
    )


def demo_call(call: Mapping[str, Any]) -> None:
    text = Text(f"call {call['n']:>3}  ")
    if call["decision"] == "deny":
        text.append("DENY ", style="bold red")
        text.append(f" {call['code']}: {call['message']}", style="red")
    else:
        text.append("allow", style="green")
        # budget ids without the agent id: "total", "day/2026-11-24"
        left = ", ".join(f"{b['id'].split('/', 1)[-1]} {b['remaining']}" for b in call["budgets"])
        text.append(f"  held {call['held']}  charged {call['charged']}  remaining: {left}")
    _line(text)


def demo_stopped(calls: int, spent: str, cap: str) -> None:
    _line(
        Text(
            f"stopped after {calls} calls: {spent} spent against a {cap} daily cap, not a cent over",
            style="bold",
        )
    )
