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

from rich.console import Console
from rich.table import Table
from rich.text import Text

BAR_WIDTH = 20
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


def _grid(rows: Iterable[tuple[str, Any]], label_width: int | None = None) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True, min_width=label_width)
    grid.add_column(overflow="fold")
    for label, value in rows:
        grid.add_row(label, value if isinstance(value, Text) else _text(value))
    return grid


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
    console = _out()
    key_note = "created, mode 0600" if info["signing_key_created"] else "kept"
    console.print(
        _grid(
            [
                ("database", info["db"]),
                ("authority key", f"{info['signing_key_path']} ({key_note})"),
            ]
        )
    )
    source = info["admin_key_source"]
    if info.get("admin_key"):
        console.print(Text("admin key      ", style="bold"), end="")
        # soft_wrap: the key is printed whole on one line, whatever the terminal's width.
        console.print(Text(str(info["admin_key"]), style="bold green"), soft_wrap=True)
        console.print(
            Text(
                " " * 15 + "shown once: store it now (export PAYMASTER_ADMIN_KEY=…); only its hash is kept",
                style="yellow",
            ),
            soft_wrap=True,
        )
    elif source == "environment":
        console.print(_grid([("admin key", "from PAYMASTER_ADMIN_KEY (its hash is stored; not printed)")], 13))
    else:
        console.print(_grid([("admin key", "made by an earlier init (shown only then)")], 13))


def serving(url: str, db: str, workers: int) -> None:
    _out().print(Text(f"paymaster serving {url} ({workers} worker{'s' if workers != 1 else ''}, {db})"))


# ---------------------------------------------------------------- agents and keys


def agent_detail(agent: Mapping[str, Any]) -> None:
    console = _out()
    meta = agent.get("metadata") or {}
    console.print(
        _grid(
            [
                ("id", agent["id"]),
                ("name", agent["name"]),
                ("status", _status(agent["status"])),
                ("parent", agent.get("parent") or "-"),
                ("public key", agent["public_key"]),
                ("metadata", ", ".join(f"{k}={v}" for k, v in meta.items()) or "-"),
                ("policy", f"version {agent.get('policy_version', 0)}"),
                ("created", agent.get("created_at")),
            ]
        )
    )
    policy_summary(agent.get("policy"))


def policy_summary(policy: Mapping[str, Any] | None) -> None:
    console = _out()
    if not policy:
        console.print(Text("no policy: the defaults apply (no caps, no per-call maximum)", style="dim"))
        return
    hosts = policy.get("allow_hosts")
    per_call = policy.get("per_call_max") or {}
    console.print(
        _grid(
            [
                (
                    "allow hosts",
                    ", ".join(hosts) if hosts is not None else "the hosts of every configured connector",
                ),
                ("per-call max", ", ".join(f"{k} {v}" for k, v in per_call.items()) or "-"),
            ]
        )
    )
    caps = policy.get("caps") or []
    if caps:
        table = Table(title="caps", title_justify="left")
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
    console.print(Text(f"created agent {_agent_label(agent)}", style="bold green"))
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
    table = Table()
    table.add_column("id", overflow="fold")
    table.add_column("name", overflow="fold")
    table.add_column("status")
    table.add_column("parent", overflow="fold")
    table.add_column("policy", justify="right")
    table.add_column("created")
    for agent in agents:
        table.add_row(
            _text(agent["id"]),
            _text(agent["name"]),
            _status(agent["status"]),
            _text(agent.get("parent") or "-"),
            _text(f"v{agent.get('policy_version', 0)}"),
            _text(str(agent.get("created_at", ""))[:19].replace("T", " ")),
        )
    console.print(table)


def status_changed(agent: Mapping[str, Any]) -> None:
    text = Text(f"{_agent_label(agent)} is now ")
    text.append(_status(agent["status"]))
    _out().print(text)


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
        )
    )


def limits(agent: Mapping[str, Any], changed: bool) -> None:
    console = _out()
    if changed:
        console.print(Text(f"limits of {_agent_label(agent)} set: policy version {agent['policy_version']}"))
    else:
        console.print(Text(f"no limit named: the limits of {_agent_label(agent)} are unchanged", style="dim"))
    policy_summary(agent.get("policy"))


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
            )
        )
        return
    table = Table(title=title, title_justify="left")
    table.add_column("budget", overflow="fold")
    table.add_column("period")
    for name in ("limit", "spent", "reserved", "remaining"):
        table.add_column(name, justify="right")
    table.add_column("used", no_wrap=True)
    for budget in rows:
        period = str(budget.get("period"))
        if budget.get("mode") == "shadow":
            period += " (shadow)"
        remaining = Text(
            str(budget["remaining"]), style="red" if str(budget["remaining"]).startswith("-") else ""
        )
        table.add_row(
            _text(budget["id"]),
            _text(period),
            _text(budget["limit"]),
            _text(budget["spent"]),
            _text(budget["reserved"]),
            remaining,
            usage_bar(budget.get("used")),
        )
    console.print(table)


# ---------------------------------------------------------------- records


def ledger_table(
    entries: Sequence[Mapping[str, Any]], totals: Mapping[str, str], title: str = "ledger"
) -> None:
    console = _out()
    if not entries:
        console.print(Text("no ledger entries", style="dim"))
        return
    table = Table(title=title, title_justify="left")
    table.add_column("time", no_wrap=True)
    table.add_column("entry", overflow="fold")
    table.add_column("kind")
    table.add_column("agent", overflow="fold")
    table.add_column("connector", overflow="fold")
    table.add_column("amount", justify="right")
    table.add_column("flags")
    for entry in entries:
        flags = [name for name in ("estimated", "overrun") if entry.get(name)]
        total = str(entry["total"])
        table.add_row(
            _text(str(entry["time"])[:19].replace("T", " ")),
            _text(entry["id"]),
            _text(entry["kind"]),
            _text(entry.get("agent_id") or entry.get("principal")),
            _text(entry["connector"]),
            Text(f"{total} {entry['currency']}", style="green" if total.startswith("-") else ""),
            _text(" ".join(flags)),
        )
    table.caption = f"{len(entries)} entries; net " + ", ".join(f"{v} {k}" for k, v in sorted(totals.items()))
    console.print(table)


def audit(result: Mapping[str, Any]) -> None:
    if result["ok"]:
        _out().print(
            Text(
                f"ok: audit log intact, {result['events']} events, signed head at seq {result['head_seq']}",
                style="green",
            )
        )
    else:
        _out().print(
            Text(
                f"broken: first bad event at seq {result['first_bad_seq']}: {result['reason']}"
                f" ({result['events']} events read)",
                style="bold red",
            ),
            soft_wrap=True,
        )


def report_written(path: str, rows: int) -> None:
    _out().print(Text(f"wrote {rows} FOCUS row{'s' if rows != 1 else ''} to {path}"))


# ---------------------------------------------------------------- demo


def demo_intro(agent: Mapping[str, Any], db: str, cap: str, wallet: str, price: str) -> None:
    console = _out()
    console.print(Text("paymaster demo: a runaway agent loop against a fresh database", style="bold"))
    console.print(
        Text(
            f"database {db}\nagent {_agent_label(agent)}: wallet {wallet}, daily cap {cap}; every loop"
            f" iteration holds {price} for a web search, then charges what it really cost",
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
        text.append(
            f"  held {call['held']}  charged {call['charged']}  remaining: "
            + ", ".join(f"{b['id'].split('/', 1)[1]} {b['remaining']}" for b in call["budgets"])
        )
    _out().print(text, soft_wrap=True)


def demo_stopped(calls: int, spent: str, cap: str) -> None:
    _out().print(
        Text(
            f"stopped after {calls} calls: {spent} spent against a {cap} daily cap, not a cent over",
            style="bold",
        )
    )
