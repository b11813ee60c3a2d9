"""A tiny SVG chart library, rendered on the server: usage bars, bar charts, sparklines.

Dependency-free and script-free, so the pages read the same without JavaScript and under a
``default-src 'self'`` Content-Security-Policy: every size is an SVG attribute (never an
inline ``style``) and every colour a class of the stylesheet. Amounts are integers (nanos);
every coordinate is computed with integer arithmetic, never a float.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from html import escape

__all__ = ["bar_chart", "level", "percent", "sparkline", "usage_bar", "used_bp"]

FULL_BP = 10_000  # 100 % in basis points
# (threshold in basis points, CSS class): the first that `used` reaches wins.
LEVELS: tuple[tuple[int, str], ...] = ((9_000, "crit"), (7_500, "high"), (5_000, "warn"))
_BAR_WIDTH = 1_000


def used_bp(limit: int, spent: int, reserved: int) -> int | None:
    """``(spent + reserved) / limit`` in basis points, rounded down; ``None`` without a limit
    and nothing used. A limit of zero with something used is full."""
    used = spent + reserved
    if limit <= 0:
        return FULL_BP if used > 0 else None
    return max(0, used * FULL_BP // limit)


def level(bp: int | None) -> str:
    """The CSS class of a usage: ``ok`` below 50 %, ``warn`` from 50 %, ``high`` from 75 %,
    ``crit`` from 90 %."""
    if bp is None:
        return "none"
    for threshold, name in LEVELS:
        if bp >= threshold:
            return name
    return "ok"


def percent(bp: int | None) -> str:
    """``"91%"``; ``"<1%"`` for a use too small to round to one percent; ``"–"`` for none."""
    if bp is None:
        return "–"
    if 0 < bp < 100:
        return "<1%"
    return f"{bp // 100}%"


def usage_bar(bp: int | None, label: str) -> str:
    """A horizontal bar filled to ``bp`` (capped at 100 %), coloured by :func:`level`."""
    fill = min(bp or 0, FULL_BP) * _BAR_WIDTH // FULL_BP
    title = escape(f"{label}: {percent(bp)} used")
    return (
        f'<svg class="usage lvl-{level(bp)}" viewBox="0 0 {_BAR_WIDTH} 10" preserveAspectRatio="none"'
        f' role="img" aria-label="{title}"><title>{title}</title>'
        f'<rect class="track" width="{_BAR_WIDTH}" height="10"/>'
        f'<rect class="fill" width="{fill}" height="10"/></svg>'
    )


def _clip(text: str, size: int) -> str:
    return text if len(text) <= size else text[: size - 1] + "…"


def bar_chart(
    items: Sequence[tuple[str, int]], fmt: Callable[[int], str], *, label: str, label_chars: int = 22
) -> str:
    """One horizontal bar per ``(name, value)``, scaled to the largest value; negative values
    (more refunded than charged) draw no bar but keep their figure."""
    if not items:
        return ""
    row, label_w, bar_x, bar_w, width = 24, 170, 176, 300, 600
    top = max(max(value for _, value in items), 1)
    height = row * len(items)
    parts = [
        f'<svg class="bars" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label)}">',
        f"<title>{escape(label)}</title>",
    ]
    for i, (name, value) in enumerate(items):
        y = i * row
        length = max(value, 0) * bar_w // top
        if value > 0:
            length = max(length, 1)
        parts.append(
            f'<g class="bar"><title>{escape(name)}: {escape(fmt(value))}</title>'
            f'<text class="name" x="{label_w}" y="{y + 16}" text-anchor="end">'
            f"{escape(_clip(name, label_chars))}</text>"
            f'<rect x="{bar_x}" y="{y + 5}" width="{length}" height="{row - 10}"/>'
            f'<text class="value" x="{bar_x + length + 6}" y="{y + 16}">{escape(fmt(value))}</text></g>'
        )
    parts.append("</svg>")
    return "".join(parts)


def sparkline(values: Sequence[int], *, label: str, width: int = 240, height: int = 40) -> str:
    """A line through ``values`` (oldest first) over an area, scaled between their extremes."""
    if not values:
        return ""
    pad = 3
    low, high = min(0, *values), max(0, *values)
    span = max(high - low, 1)
    last = max(len(values) - 1, 1)
    points = []
    for i, value in enumerate(values):
        x = i * width // last
        y = height - pad - (value - low) * (height - 2 * pad) // span
        points.append(f"{x},{y}")
    baseline = height - pad - (0 - low) * (height - 2 * pad) // span
    line = " ".join(points)
    area = f"0,{baseline} {line} {width if len(values) > 1 else 0},{baseline}"
    return (
        f'<svg class="spark" viewBox="0 0 {width} {height}" preserveAspectRatio="none" role="img"'
        f' aria-label="{escape(label)}"><title>{escape(label)}</title>'
        f'<polygon class="area" points="{area}"/><polyline class="line" points="{line}"/></svg>'
    )
