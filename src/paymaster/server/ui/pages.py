"""The pages, as pure functions from what :mod:`.data` read to an HTML string."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from paymaster.errors import InvalidAmount
from paymaster.money import format_nanos, parse_nanos
from paymaster.server.ui import charts
from paymaster.server.ui.data import AgentView, AuditStatus, BudgetsOf, Overview, Spend
from paymaster.server.ui.html import Chrome, agent_href, badge, e, layout, login_form, table, when

__all__ = ["agent_page", "login_page", "message_page", "overview_page"]

_STATUS_KIND = {"active": "ok", "frozen": "warn", "revoked": "crit"}
_EVENT_FIELDS = (
    "agent_id",
    "connector",
    "amount",
    "charged",
    "released",
    "reason_code",
    "budget_id",
    "threshold",
    "used",
    "version",
    "from",
    "to",
)


def _nanos(text: Any) -> int | None:
    try:
        return parse_nanos(str(text), allow_negative=True)
    except InvalidAmount:
        return None


def _budget_name(budget: Mapping[str, Any], agent_id: str) -> str:
    if budget.get("kind") == "wallet":
        name = "Wallet"
    elif budget.get("kind") == "task":
        name = f"task {budget.get('id')}"
    else:
        name = f"{budget.get('scope')} · {budget.get('period')}"
        if budget.get("owner") != agent_id:
            name = f"{budget.get('owner')}: {name}"
    out = e(name)
    if budget.get("mode") == "shadow":
        out += " " + badge("shadow", "muted")
    return out


def _used(budget: Mapping[str, Any]) -> tuple[int | None, str]:
    """The usage in basis points, and its bar and figure as HTML."""
    limit, spent, reserved = (_nanos(budget.get(k)) for k in ("limit", "spent", "reserved"))
    if limit is None or spent is None or reserved is None:
        return None, ""
    bp = charts.used_bp(limit, spent, reserved)
    bar = charts.usage_bar(bp, str(budget.get("id", "")))
    return (
        bp,
        f'<div class="used">{bar}<span class="pct lvl-{charts.level(bp)}">{charts.percent(bp)}</span></div>',
    )


def _amount(text: Any) -> str:
    value = _nanos(text)
    return f'<span class="neg">{e(text)}</span>' if value is not None and value < 0 else e(text)


def budgets_table(owned: BudgetsOf, currency: str, *, windows: bool = False) -> str:
    agent_id = str(owned.agent.get("id"))
    headers = ["Budget", f"Limit ({currency})", "Spent", "Reserved", "Remaining", "Used"]
    if windows:
        headers.append("Window (UTC)")
    rows = []
    for budget in owned.budgets:
        _, used = _used(budget)
        row = [
            _budget_name(budget, agent_id),
            _amount(budget.get("limit")),
            _amount(budget.get("spent")),
            _amount(budget.get("reserved")),
            _amount(budget.get("remaining")),
            used,
        ]
        if windows:
            start, end = budget.get("window_start"), budget.get("window_end")
            row.append(f"{when(start)} – {when(end)}" if start or end else "all time")
        rows.append(row)
    return table(
        headers, rows, empty="No wallet and no caps: every billable call is denied.", cls="budgets", numeric=4
    )


def _agent_head(agent: Mapping[str, Any], *, link: bool) -> str:
    status = str(agent.get("status"))
    name = e(agent.get("name"))
    if link:
        name = f'<a href="{e(agent_href(str(agent.get("id"))))}">{name}</a>'
    parent = f' <span class="muted">under {e(agent.get("parent"))}</span>' if agent.get("parent") else ""
    return (
        f"{name} {badge(status, _STATUS_KIND.get(status, 'muted'))} <code>{e(agent.get('id'))}</code>{parent}"
    )


def _agents_panel(data: Overview) -> str:
    if not data.agents:
        return (
            '<section class="panel"><h2>Agents</h2><p class="empty">No agents yet: '
            "<code>paymaster agents create NAME --key-out FILE</code>.</p></section>"
        )
    cards = "".join(
        f'<article class="agent"><h3>{_agent_head(owned.agent, link=True)}</h3>'
        f"{budgets_table(owned, data.currency)}</article>"
        for owned in data.agents
    )
    return f'<section class="panel wide"><h2>Agents ({len(data.agents)})</h2>{cards}</section>'


def _spend_panel(spend: Spend, currency: str, *, title: str, hours: str) -> str:
    def fmt(value: int) -> str:
        return f"{format_nanos(value)} {currency}"

    if not spend.entries:
        body = '<p class="empty">No charges or refunds yet.</p>'
    else:
        chart = charts.bar_chart(spend.by_connector, fmt, label=f"{title} by connector")
        spark = charts.sparkline(spend.by_hour, label=f"{title} by hour, {hours}")
        body = (
            f'<p class="total">{e(fmt(spend.total))} '
            f'<span class="muted">net, {spend.entries} entries</span></p>'
            f"{chart}<figure>{spark}<figcaption>by hour, {e(hours)}</figcaption></figure>"
        )
    if spend.truncated:
        body += f'<p class="note">Summed over the first {spend.entries} entries only.</p>'
    return f'<section class="panel"><h2>{e(title)}</h2>{body}</section>'


def _audit_panel(audit: AuditStatus) -> str:
    result = audit.result
    if result.ok:
        state = (
            f'<p class="audit ok">{badge("verified", "ok")} {result.events} events, '
            f"head seq {result.head_seq}</p>"
        )
    else:
        state = (
            f'<p class="audit bad">{badge("broken", "crit")} first bad seq '
            f"<strong>{e(result.first_bad_seq)}</strong>: {e(result.reason)}</p>"
        )
    checked = f'<p class="muted">checked {when(audit.checked_at.strftime("%Y-%m-%dT%H:%M:%SZ"))}</p>'
    return f'<section class="panel"><h2>Audit chain</h2>{state}{checked}</section>'


def _detail(data: Any) -> str:
    if not isinstance(data, Mapping):
        return ""
    parts = [f"{k}={data[k]}" for k in _EVENT_FIELDS if data.get(k) not in (None, "")]
    return e(" ".join(parts))


def events_table(events: Sequence[Mapping[str, Any]], *, empty: str) -> str:
    rows = []
    for event in events:
        kind = str(event.get("type", "")).removeprefix("dev.paymaster.")
        subject = str(event.get("subject", ""))
        # an agent, or one of its budgets (``ag_…/total``): link to the agent's page
        owner = subject.partition("/")[0]
        subject_html = (
            f'<a href="{e(agent_href(owner))}"><code>{e(subject)}</code></a>'
            if owner.startswith("ag_")
            else f"<code>{e(subject)}</code>"
        )
        rows.append(
            [e(event.get("seq")), when(event.get("time")), e(kind), subject_html, _detail(event.get("data"))]
        )
    return table(["Seq", "Time (UTC)", "Type", "Subject", "Details"], rows, empty=empty, cls="events")


def _reference(entry: Mapping[str, Any]) -> str:
    if entry.get("kind") == "refund" and entry.get("refund_of"):
        return f"refund of <code>{e(entry.get('refund_of'))}</code>"
    if entry.get("reservation_id"):
        return f"<code>{e(entry.get('reservation_id'))}</code>"
    return ""


def _entries_table(entries: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for entry in entries:
        flags = [badge(f, "warn") for f in ("estimated", "overrun") if entry.get(f)]
        quantity = (
            f"{entry.get('quantity')} {entry.get('unit') or ''}" if entry.get("quantity") is not None else ""
        )
        notes = " ".join(flags) + (f" {e(entry.get('reason'))}" if entry.get("reason") else "")
        rows.append(
            [
                when(entry.get("time")),
                _amount(entry.get("total")),
                e(entry.get("kind")),
                e(entry.get("connector")),
                e(quantity),
                f"<code>{e(entry.get('id'))}</code>",
                _reference(entry),
                notes.strip(),
            ]
        )
    headers = ["Time (UTC)", "Amount", "Kind", "Connector", "Quantity", "Entry", "Reservation", "Notes"]
    return table(headers, rows, empty="No ledger entries.", cls="ledger", numeric=1)


def overview_page(data: Overview, chrome: Chrome) -> str:
    main = (
        f'<h1>Overview <span class="muted">{when(data.now.strftime("%Y-%m-%dT%H:%M:%SZ"))}</span></h1>'
        '<div class="grid">'
        f"{_audit_panel(data.audit)}"
        f"{_spend_panel(data.spend, data.currency, title='Spend today (UTC)', hours='00–24 UTC')}"
        f"{_agents_panel(data)}"
        f'<section class="panel wide"><h2>Last {len(data.events)} audit events</h2>'
        f"{events_table(data.events, empty='No audit events yet.')}</section>"
        "</div>"
    )
    return layout("Overview", main, chrome)


def _metadata(agent: Mapping[str, Any]) -> str:
    items = [
        ("Created", when(agent.get("created_at"))),
        ("Parent", e(agent.get("parent") or "–")),
        ("Policy version", e(agent.get("policy_version"))),
    ]
    meta = agent.get("metadata")
    if isinstance(meta, Mapping):
        items += [(f"{k}", e(v)) for k, v in sorted(meta.items(), key=lambda kv: str(kv[0]))]
    return '<dl class="meta">' + "".join(f"<dt>{e(k)}</dt><dd>{v}</dd>" for k, v in items) + "</dl>"


def agent_page(view: AgentView, chrome: Chrome) -> str:
    agent = view.agent.agent
    main = (
        f'<p class="crumbs"><a href="/">Overview</a> /</p><h1>{_agent_head(agent, link=False)}</h1>'
        f"{_metadata(agent)}"
        '<div class="grid">'
        f'<section class="panel wide"><h2>Budgets</h2>'
        f"{budgets_table(view.agent, view.currency, windows=True)}</section>"
        f"{_spend_panel(view.spend, view.currency, title='Spend, last 24 hours', hours='last 24 h')}"
        f'<section class="panel wide"><h2>Recent ledger entries</h2>{_entries_table(view.entries)}</section>'
        f'<section class="panel wide"><h2>Recent events</h2>'
        f"{events_table(view.events, empty='No recent events about this agent.')}</section>"
        "</div>"
    )
    return layout(str(agent.get("name", "Agent")), main, chrome)


def login_page(chrome: Chrome, csrf: str, *, error: str | None = None, next_path: str | None = None) -> str:
    return layout("Sign in", login_form(csrf, error=error, next_path=next_path), chrome)


def message_page(title: str, text: str, chrome: Chrome) -> str:
    return layout(
        title,
        f'<section class="panel"><h1>{e(title)}</h1><p>{e(text)}</p><p><a href="/">Back</a></p></section>',
        chrome,
    )
