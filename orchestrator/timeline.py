"""A job's timeline, from the step table and the ledger: for each step, its wait in the queue
and its run; within the run, each model call's wait (for a slot at its endpoint, and any
retries), its time to first token and its generation; and the time between a call that asked
for a tool and the step's next call (the tool's run, with the step's own work around it).

Times are milliseconds from the job's submission. A call's end is its ledger row's
`created_at`, its generation the last `latency_ms` before that, its start the row's
`started_at`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy.orm import Session

from agents.loop import ANSWER_TOOL
from core.models import Job, Step, utcnow
from core.repositories import ledger
from core.repositories import steps as step_repo
from core.repositories.ledger import TimedCall

# Phases, in the order the legend shows them.
PHASES = {"queue": "queued", "run": "step running", "wait": "waiting for a slot",
          "ttft": "time to first token", "generation": "generating", "tool": "tool",
          "cached": "answered from the call cache"}
MAX_STEPS = 300


@dataclass(frozen=True)
class Segment:
    phase: str
    start_ms: float
    end_ms: float
    label: str
    call_id: str | None = None

    @property
    def ms(self) -> float:
        return self.end_ms - self.start_ms


@dataclass(frozen=True)
class Lane:
    step_id: str
    key: str
    role: str
    status: str
    segments: list[Segment] = field(default_factory=list)


@dataclass(frozen=True)
class Timeline:
    job_id: str
    end_ms: float
    lanes: list[Lane]
    calls: int
    steps_left_out: int = 0


def _ms(at: datetime, origin: datetime) -> float:
    return (at - origin).total_seconds() * 1000


def _call_segments(c: TimedCall, origin: datetime) -> list[Segment]:
    end = _ms(c.ended_at, origin)
    generating = end - c.latency_ms
    start = min(_ms(c.started_at, origin), generating) if c.started_at else generating
    what = f"{c.model}: {c.prompt_tokens} prompt + {c.completion_tokens} completion tokens"
    if c.cached_from is not None:
        return [Segment("cached", start, max(start, end), f"{what} (from {c.cached_from})",
                        c.request_id)]
    out = []
    if generating > start:
        out.append(Segment("wait", start, generating,
                           f"{c.model}: {generating - start:.0f} ms before generating",
                           c.request_id))
    first = generating + c.ttft_ms if c.ttft_ms is not None else None
    if first is not None:
        out.append(Segment("ttft", generating, first,
                           f"{c.model}: first token after {c.ttft_ms:.0f} ms", c.request_id))
    out.append(Segment("generation", first if first is not None else generating, end,
                       f"{what}, {c.finish_reason or 'no finish reason'}, "
                       f"{c.latency_ms:.0f} ms", c.request_id))
    return out


def _tool_segments(calls: list[TimedCall], origin: datetime) -> list[Segment]:
    """The time from a call that asked for a tool to the step's next call in the same run."""
    out = []
    for before, after in zip(calls, calls[1:], strict=False):
        tools = [t for t in before.tools if t and t != ANSWER_TOOL]
        if not tools or before.attempt != after.attempt or after.started_at is None:
            continue
        start, end = _ms(before.ended_at, origin), _ms(after.started_at, origin)
        if end > start:
            out.append(Segment("tool", start, end, f"{', '.join(tools)}: {end - start:.0f} ms",
                               before.request_id))
    return out


def _lane(st: Step, calls: list[TimedCall], origin: datetime, now: datetime) -> Lane:
    lane = Lane(st.id, st.key, st.role, st.status)
    if st.started_at is not None:
        if st.enqueued_at is not None and st.enqueued_at < st.started_at:
            lane.segments.append(Segment("queue", _ms(st.enqueued_at, origin),
                                         _ms(st.started_at, origin),
                                         f"queued {_ms(st.started_at, st.enqueued_at):.0f} ms"))
        end = st.finished_at or now
        lane.segments.append(Segment("run", _ms(st.started_at, origin), _ms(end, origin),
                                     f"{st.key} ({st.role}), attempt {st.attempt}: {st.status}, "
                                     f"{_ms(end, st.started_at):.0f} ms"))
    elif st.enqueued_at is not None:  # never ran: queued until now, or until cancelled
        lane.segments.append(Segment("queue", _ms(st.enqueued_at, origin),
                                     _ms(st.finished_at or now, origin), "queued"))
    ordered = sorted(calls, key=lambda c: (c.attempt or 0, c.call_index or 0))
    for c in ordered:
        lane.segments.extend(_call_segments(c, origin))
    lane.segments.extend(_tool_segments(ordered, origin))
    return lane


def job_timeline(session: Session, job: Job) -> Timeline:
    steps = step_repo.list_for_job(session, job.id)
    calls = ledger.timed_calls(session, job.id)
    by_step: dict[str, list[TimedCall]] = {}
    for c in calls:
        by_step.setdefault(c.step_id, []).append(c)
    origin, now = job.created_at, utcnow()
    lanes = [_lane(st, by_step.get(st.id, []), origin, now) for st in steps[:MAX_STEPS]]
    ends = [s.end_ms for lane in lanes for s in lane.segments]
    if job.finished_at is not None:
        ends.append(_ms(job.finished_at, origin))
    return Timeline(job.id, max(ends, default=0.0), lanes, len(calls),
                    max(0, len(steps) - MAX_STEPS))
