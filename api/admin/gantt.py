"""A job's timeline as an inline SVG Gantt chart (`orchestrator.timeline`): a row per step,
its queue wait and its run, the model calls and tool time drawn over the run. Each bar has a
tooltip (`<title>`) and data attributes (`data-phase`, `data-call-id`, `data-start-ms`,
`data-ms`) that tests read."""

from __future__ import annotations

import math
from html import escape

from markupsafe import Markup

from orchestrator.timeline import PHASES, Segment, Timeline

WIDTH, LABEL_W, PAD_R = 1000, 170, 16
TOP, ROW_H = 48, 22
COLOURS = {"queue": "#9ca3af", "run": "#dbeafe", "wait": "#f59e0b", "ttft": "#a855f7",
           "generation": "#2563eb", "tool": "#16a34a", "cached": "#6b7280"}
# Bar heights: the queue a thin line, the run a band, calls and tools over it.
HEIGHTS = {"queue": 4, "run": 16}
CALL_H = 10


def _tick_step(end_ms: float) -> float:
    """A round step (1, 2 or 5 times a power of ten) for at most about 8 ticks."""
    raw = max(end_ms, 1.0) / 8
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def _fmt_ms(ms: float, seconds: bool) -> str:
    return f"{ms / 1000:g} s" if seconds else f"{ms:g} ms"


def _bar(seg: Segment, y_mid: float, scale: float) -> str:
    height = HEIGHTS.get(seg.phase, CALL_H)
    x = LABEL_W + seg.start_ms * scale
    width = max(1.0, seg.ms * scale)
    call = f' data-call-id="{escape(seg.call_id)}"' if seg.call_id else ""
    return (f'<rect data-phase="{seg.phase}"{call} data-start-ms="{seg.start_ms:.3f}" '
            f'data-ms="{seg.ms:.3f}" x="{x:.1f}" y="{y_mid - height / 2:.1f}" '
            f'width="{width:.1f}" height="{height}" fill="{COLOURS[seg.phase]}">'
            f'<title>{escape(PHASES[seg.phase])}: {escape(seg.label)}</title></rect>')


def gantt(timeline: Timeline) -> Markup:
    lanes = timeline.lanes
    height = TOP + ROW_H * max(1, len(lanes)) + 8
    head = (f'<svg data-chart="timeline" data-job-id="{escape(timeline.job_id)}" role="img" '
            f'aria-label="Timeline of job {escape(timeline.job_id)}" '
            f'viewBox="0 0 {WIDTH} {height}" width="100%">')
    parts = [head]
    x = 8
    for phase, label in PHASES.items():  # the legend
        parts.append(f'<rect x="{x}" y="4" width="10" height="10" fill="{COLOURS[phase]}"/>'
                     f'<text x="{x + 14}" y="13" font-size="11" fill="#374151">'
                     f'{escape(label)}</text>')
        x += 26 + 7 * len(label)
    if not lanes:
        parts.append(f'<text x="{WIDTH / 2}" y="{TOP + 12}" text-anchor="middle" '
                     'fill="#6b7280">no steps</text></svg>')
        return Markup("".join(parts))
    end = max(timeline.end_ms, 1.0)
    scale = (WIDTH - LABEL_W - PAD_R) / end
    step = _tick_step(end)
    tick = 0.0
    while tick <= end + 1e-9:
        tx = LABEL_W + tick * scale
        parts.append(f'<line x1="{tx:.1f}" x2="{tx:.1f}" y1="{TOP - 6}" y2="{height - 8}" '
                     f'stroke="#e5e7eb"/><text x="{tx:.1f}" y="{TOP - 10}" '
                     f'text-anchor="middle" font-size="11" fill="#6b7280">'
                     f'{escape(_fmt_ms(round(tick, 6), step >= 1000 or end >= 2000))}</text>')
        tick += step
    for i, lane in enumerate(lanes):
        y_mid = TOP + ROW_H * i + ROW_H / 2
        label = lane.key if len(lane.key) <= 24 else lane.key[:23] + "…"
        parts.append(f'<g data-step-id="{escape(lane.step_id)}" data-step-key="{escape(lane.key)}">'
                     f'<text x="{LABEL_W - 6}" y="{y_mid + 4:.1f}" text-anchor="end" '
                     f'font-size="12" fill="#111827">{escape(label)}'
                     f'<title>{escape(lane.key)} ({escape(lane.role)}): '
                     f'{escape(lane.status)}</title></text>')
        order = sorted(lane.segments, key=lambda s: (s.phase != "queue", s.phase != "run"))
        parts.extend(_bar(seg, y_mid, scale) for seg in order)
        parts.append("</g>")
    parts.append("</svg>")
    return Markup("".join(parts))
