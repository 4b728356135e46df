"""Small SVG charts rendered on the server: the admin page loads nothing from elsewhere."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from markupsafe import Markup

WIDTH, HEIGHT = 640, 220
PAD_L, PAD_R, PAD_T, PAD_B = 64, 16, 16, 40
COLOURS = ("#2563eb", "#dc2626", "#16a34a", "#9333ea")


def _scale(max_value: float) -> float:
    return max_value if max_value > 0 else 1.0


def _axis(max_value: float, fmt: str) -> list[str]:
    parts = []
    for i in range(5):
        v = max_value * i / 4
        y = PAD_T + (HEIGHT - PAD_T - PAD_B) * (1 - i / 4)
        parts.append(f'<line x1="{PAD_L}" x2="{WIDTH - PAD_R}" y1="{y:.1f}" y2="{y:.1f}" '
                     'stroke="#e5e7eb"/>')
        parts.append(f'<text x="{PAD_L - 6}" y="{y + 4:.1f}" text-anchor="end" '
                     f'font-size="11" fill="#6b7280">{escape(format(v, fmt))}</text>')
    return parts


def _x_labels(labels: Sequence[str], xs: Sequence[float]) -> list[str]:
    step = max(1, len(labels) // 8)
    return [f'<text x="{x:.1f}" y="{HEIGHT - PAD_B + 16}" text-anchor="middle" font-size="11" '
            f'fill="#6b7280">{escape(label)}</text>'
            for i, (label, x) in enumerate(zip(labels, xs, strict=True)) if i % step == 0]


def _empty(name: str, title: str) -> Markup:
    return Markup(
        f'<svg data-chart="{escape(name)}" role="img" aria-label="{escape(title)}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" width="100%"><text x="{WIDTH / 2}" y="{HEIGHT / 2}" '
        'text-anchor="middle" fill="#6b7280">no data in this range</text></svg>')


def bar_chart(name: str, title: str, labels: Sequence[str], values: Sequence[float],
              fmt: str = ".4g") -> Markup:
    """Vertical bars, one per label (for example spend per day)."""
    if not labels:
        return _empty(name, title)
    top = _scale(max(values))
    inner_w, inner_h = WIDTH - PAD_L - PAD_R, HEIGHT - PAD_T - PAD_B
    slot = inner_w / len(labels)
    bar_w = max(1.0, slot * 0.7)
    parts = [f'<svg data-chart="{escape(name)}" role="img" aria-label="{escape(title)}" '
             f'viewBox="0 0 {WIDTH} {HEIGHT}" width="100%">', *_axis(top, fmt)]
    xs = []
    for i, (label, v) in enumerate(zip(labels, values, strict=True)):
        h = inner_h * (v / top)
        x = PAD_L + slot * i + (slot - bar_w) / 2
        xs.append(x + bar_w / 2)
        parts.append(f'<rect x="{x:.1f}" y="{PAD_T + inner_h - h:.1f}" width="{bar_w:.1f}" '
                     f'height="{h:.1f}" fill="{COLOURS[0]}"><title>{escape(label)}: '
                     f'{escape(format(v, fmt))}</title></rect>')
    parts += _x_labels(labels, xs)
    parts.append("</svg>")
    return Markup("".join(parts))


def line_chart(name: str, title: str, labels: Sequence[str],
               series: dict[str, Sequence[float | None]], fmt: str = ".0f") -> Markup:
    """One line per series over the labels (for example p50 and p95 latency per day)."""
    known = [v for vs in series.values() for v in vs if v is not None]
    if not labels or not known:
        return _empty(name, title)
    top = _scale(max(known))
    inner_w, inner_h = WIDTH - PAD_L - PAD_R, HEIGHT - PAD_T - PAD_B
    slot = inner_w / len(labels)
    xs = [PAD_L + slot * i + slot / 2 for i in range(len(labels))]
    parts = [f'<svg data-chart="{escape(name)}" role="img" aria-label="{escape(title)}" '
             f'viewBox="0 0 {WIDTH} {HEIGHT}" width="100%">', *_axis(top, fmt)]
    for n, (series_name, values) in enumerate(series.items()):
        colour = COLOURS[n % len(COLOURS)]
        points = [(x, PAD_T + inner_h * (1 - v / top))
                  for x, v in zip(xs, values, strict=True) if v is not None]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" '
                     'stroke-width="2"/>')
        for x, y in points:
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"/>')
        parts.append(f'<text x="{PAD_L + 8 + 90 * n}" y="{PAD_T + 12}" font-size="12" '
                     f'fill="{colour}">{escape(series_name)}</text>')
    parts += _x_labels(labels, xs)
    parts.append("</svg>")
    return Markup("".join(parts))
