"""Report reads for scheduling: deadlines met, missed and promoted, and the ledger rows of flex
jobs that waited for a cheap or clean hour."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, and_, case, func, or_, select
from sqlalchemy.orm import Session

from core.models import Job, ModelCall
from core.repositories.reports import ReportFilter


@dataclass(frozen=True)
class DeadlineCounts:
    jobs: int  # jobs with a deadline, submitted in the range
    missed: int  # ended after it, or still active past it
    promoted: int


def deadline_counts(session: Session, f: ReportFilter, now: datetime) -> DeadlineCounts:
    cond: list[ColumnElement[bool]] = [Job.due_at.is_not(None)]
    if f.since is not None:
        cond.append(Job.created_at >= f.since)
    if f.until is not None:
        cond.append(Job.created_at < f.until)
    if f.tenant_id is not None:
        cond.append(Job.tenant_id == f.tenant_id)
    missed = or_(Job.finished_at > Job.due_at, and_(Job.finished_at.is_(None), Job.due_at < now))
    jobs, n_missed, promoted = session.execute(select(
        func.count(), func.coalesce(func.sum(case((missed, 1), else_=0)), 0),
        func.count(Job.promoted_at)).where(*cond)).one()
    return DeadlineCounts(int(jobs), int(n_missed), int(promoted))


@dataclass(frozen=True)
class WindowCall:
    """A call of a flex job that waited for a window (`optimize` set), with energy known."""

    job_id: str
    submitted_at: datetime
    endpoint: str
    energy_wh: float
    power_price: float | None
    carbon_intensity: float | None


def window_calls(session: Session, f: ReportFilter) -> list[WindowCall]:
    rows = session.execute(
        select(ModelCall.job_id, Job.created_at, ModelCall.endpoint, ModelCall.energy_wh,
               ModelCall.power_price, ModelCall.carbon_intensity)
        .join(Job, Job.id == ModelCall.job_id)
        .where(*f.call_conditions(), Job.optimize.is_not(None), ModelCall.energy_wh.is_not(None)))
    return [WindowCall(str(j), t, str(e or ""), float(w or 0.0), p, c)
            for j, t, e, w, p, c in rows]
