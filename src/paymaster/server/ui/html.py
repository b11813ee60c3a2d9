"""HTML building blocks: escaping, the page frame, tables, badges, the login form.

Every value that reaches a page goes through :func:`e` (``html.escape`` with quotes), so a
name such as ``<script>alert(1)</script>`` is shown, never run. Functions that return HTML
take HTML only where their parameter says so (``*_html``, ``cells``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from typing import Any
from urllib.parse import quote

from paymaster.money import format_nanos

__all__ = ["Chrome", "agent_href", "badge", "e", "layout", "login_form", "table", "when"]


def e(value: Any) -> str:
    """Escape any value for text or a quoted attribute; ``None`` is empty."""
    return escape("" if value is None else str(value), quote=True)


def agent_href(agent_id: str) -> str:
    return "/agents/" + quote(agent_id, safe="")


def nanos(value: int) -> str:
    return format_nanos(value)


def when(text: Any) -> str:
    """An RFC 3339 time as ``2026-11-24 13:05:09``, in a ``<time>`` element."""
    if not text:
        return ""
    raw = str(text)
    shown = f"{raw[:10]} {raw[11:19]}" if len(raw) >= 19 and raw[10] == "T" else raw
    return f'<time datetime="{e(raw)}">{e(shown)}</time>'


def badge(text: str, kind: str) -> str:
    return f'<span class="badge {e(kind)}">{e(text)}</span>'


def table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], *, empty: str, cls: str = "", numeric: int = 0
) -> str:
    """A table of already-escaped ``rows``; ``headers`` are text. The ``numeric`` columns
    counted from ``headers``' second are right-aligned."""
    if not rows:
        return f'<p class="empty">{e(empty)}</p>'

    def attr(i: int) -> str:
        return ' class="num"' if 0 < i <= numeric else ""

    head = "".join(f'<th scope="col"{attr(i)}>{e(h)}</th>' for i, h in enumerate(headers))
    body = "".join(
        "<tr>" + "".join(f"<td{attr(i)}>{c}</td>" for i, c in enumerate(row)) + "</tr>" for row in rows
    )
    return (
        f'<div class="scroll"><table class="{e(cls)}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )


@dataclass(frozen=True)
class Chrome:
    """What frames every page: the authority's name, the stylesheet, and the logout form's
    CSRF token (``None``: no logout button, e.g. when the bearer header authenticated)."""

    authority_id: str
    stylesheet: str
    csrf: str | None = None
    signed_in: bool = False


def _logout(chrome: Chrome) -> str:
    if chrome.csrf is None:
        return '<span class="who">admin key</span>' if chrome.signed_in else ""
    return (
        '<form class="logout" method="post" action="/logout">'
        f'<input type="hidden" name="csrf" value="{e(chrome.csrf)}">'
        '<button type="submit">Log out</button></form>'
    )


def layout(title: str, main_html: str, chrome: Chrome) -> str:
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="referrer" content="no-referrer">'
        f"<title>{e(title)} · Paymaster</title>"
        f'<link rel="stylesheet" href="{e(chrome.stylesheet)}"></head><body>'
        '<header class="top"><a class="brand" href="/">Paymaster</a>'
        f'<span class="authority">{e(chrome.authority_id) if chrome.signed_in else ""}</span>'
        f"{_logout(chrome)}</header>"
        f"<main>{main_html}</main></body></html>"
    )


def login_form(csrf: str, *, error: str | None = None, next_path: str | None = None) -> str:
    alert = f'<p class="error" role="alert">{e(error)}</p>' if error else ""
    after = f'<input type="hidden" name="next" value="{e(next_path)}">' if next_path else ""
    return (
        '<section class="login"><h1>Sign in</h1>'
        "<p>Paste an admin key (<code>pm_admin_…</code>). It is checked once; the browser then "
        "keeps a signed session cookie for 12 hours, never the key.</p>"
        f"{alert}"
        '<form method="post" action="/login">'
        f'<input type="hidden" name="csrf" value="{e(csrf)}">{after}'
        '<label for="admin_key">Admin key</label>'
        '<input id="admin_key" name="admin_key" type="password" autocomplete="current-password"'
        ' required autofocus spellcheck="false">'
        '<button type="submit">Sign in</button></form></section>'
    )
