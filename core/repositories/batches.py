"""Queries particular to OpenAI batches, which are jobs of the `openai_batch` kind: listing
them, their progress from their finished steps, and when cancelling began."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from core.models import Job, JobEvent, StepStatus, jobs_table, steps_table, utcnow

J = jobs_table.c
S = steps_table.c


def list_jobs(session: Session, tenant_id: str, kind: str, *, limit: int, after: str | None
              ) -> list[Job]:
    """The tenant's jobs of `kind`, newest first, after the job `after`."""
    q = select(Job).where(Job.tenant_id == tenant_id, Job.kind == kind)
    if after is not None:
        pos = session.execute(select(Job.created_at, Job.id).where(
            Job.id == after, Job.tenant_id == tenant_id)).first()
        if pos is not None:
            created, job_id = pos
            q = q.where(or_(Job.created_at < created,
                            and_(Job.created_at == created, Job.id < job_id)))
    return list(session.scalars(q.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)))


def progress(session: Session, job_id: str) -> tuple[int, int]:
    """Lines run and lines failed, summed over the job's completed steps' outputs (`done`,
    `failed`)."""
    done = func.coalesce(func.sum(S.output["done"].as_integer()), 0)
    failed = func.coalesce(func.sum(S.output["failed"].as_integer()), 0)
    row = session.execute(select(done, failed).where(
        S.job_id == job_id, S.status == StepStatus.COMPLETED)).one()
    return int(row[0]), int(row[1])


def cancelling_at(session: Session, job_id: str) -> datetime | None:
    return session.scalar(select(func.min(JobEvent.created_at)).where(
        JobEvent.job_id == job_id, JobEvent.type == "job.cancelling"))


def finished_row(session: Session, job_id: str) -> tuple[str, dict[str, Any],
                                                          dict[str, Any] | None, str | None]:
    """(tenant, input, result, error code) of a job, read afresh."""
    row = session.execute(select(J.tenant_id, J.input, J.result, J.error_code)
                          .where(J.id == job_id)).one()
    return str(row[0]), dict(row[1] or {}), row[2], row[3]


def set_result(session: Session, job_id: str, result: dict[str, Any]) -> None:
    session.execute(update(jobs_table).where(J.id == job_id).values(
        result=result, updated_at=utcnow()))


__all__ = ["cancelling_at", "finished_row", "list_jobs", "progress", "set_result"]
