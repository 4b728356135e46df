"""Jobs: every query on the job rows."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from core.models import JOB_ACTIVE, JOB_TERMINAL, Job, JobStatus, Tenant, utcnow

_NO_SYNC = {"synchronize_session": False}


def get(session: Session, job_id: str, lock: bool = False) -> Job | None:
    return session.get(Job, job_id, with_for_update=lock or None)


def lock_tenant(session: Session, tenant_id: str) -> None:
    """Serialise a tenant's submissions from here to commit (the in-flight count is exact)."""
    session.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update())


def count_active(session: Session, tenant_id: str) -> int:
    return int(session.scalar(select(func.count()).select_from(Job).where(
        Job.tenant_id == tenant_id, Job.status.in_(list(JOB_ACTIVE)))) or 0)


def add(session: Session, job: Job) -> None:
    session.add(job)
    session.flush()


def started_step(session: Session, job_id: str, phase: str, first: bool, events: int
                 ) -> tuple[int, str, dict[str, Any] | None]:
    """A step of the job started: its phase, the job `running` if it was `queued` (`first`),
    and `events` cursors taken. Returns the first cursor, the tenant and the job's webhook."""
    values: dict[str, Any] = {"phase": phase, "event_seq": Job.event_seq + events}
    cond = [Job.id == job_id]
    if first:
        values.update(status=JobStatus.RUNNING, started_at=utcnow())
        cond.append(Job.status == JobStatus.QUEUED)
    row = session.execute(update(Job).where(*cond).values(**values).returning(
        Job.event_seq, Job.tenant_id, Job.webhook).execution_options(**_NO_SYNC)).first()
    if row is None:  # another step started it first
        return started_step(session, job_id, phase, False, events)
    return int(row[0]) - events + 1, str(row[1]), row[2]


def step_completed(session: Session, job_id: str, events: int
                   ) -> tuple[str, int, int, int, str, dict[str, Any] | None]:
    """Count a completed step and take `events` cursors. Returns the job's status, steps done
    and total, the first cursor, the tenant and the job's webhook. Locks the job row: the
    completions of a job are counted one at a time."""
    row = session.execute(update(Job).where(Job.id == job_id).values(
        steps_done=Job.steps_done + 1, event_seq=Job.event_seq + events, updated_at=utcnow(),
    ).returning(Job.status, Job.steps_done, Job.steps_total, Job.event_seq, Job.tenant_id,
                Job.webhook).execution_options(**_NO_SYNC)).one()
    return (str(row[0]), int(row[1]), int(row[2]), int(row[3]) - events + 1, str(row[4]),
            row[5])


def add_steps_total(session: Session, job_id: str, n: int) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(
        steps_total=Job.steps_total + n).execution_options(**_NO_SYNC))


def statuses(session: Session, job_ids: Sequence[str]) -> dict[str, str]:
    return {i: s for i, s in session.execute(select(Job.id, Job.status)
                                             .where(Job.id.in_(list(job_ids))))}


def past_deadline(session: Session, now: datetime, limit: int) -> list[str]:
    return list(session.scalars(select(Job.id).where(
        Job.status.in_(list(JOB_ACTIVE)), Job.deadline_at < now).limit(limit)
        .with_for_update(skip_locked=True)))


def list_for_tenant(session: Session, tenant_id: str, *, limit: int,
                    after: tuple[datetime, str] | None, status: str | None) -> list[Job]:
    """The tenant's jobs, newest first, after a keyset position."""
    q = select(Job).where(Job.tenant_id == tenant_id)
    if status is not None:
        q = q.where(Job.status == status)
    if after is not None:
        created, job_id = after
        q = q.where(or_(Job.created_at < created,
                        and_(Job.created_at == created, Job.id < job_id)))
    return list(session.scalars(q.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)))


def finish(session: Session, job_id: str, status: JobStatus, *,
           result: dict[str, Any] | None = None, error: tuple[str, str] | None = None) -> bool:
    """Move a job to a terminal state, once; False when it was terminal already."""
    values: dict[str, Any] = {"status": status, "phase": status, "finished_at": utcnow(),
                              "updated_at": utcnow()}
    if result is not None:
        values["result"] = result
    if error is not None:
        values["error_code"], values["error_message"] = error
    res = session.execute(update(Job).where(
        Job.id == job_id, Job.status.not_in([str(s) for s in JOB_TERMINAL]),
    ).values(**values).execution_options(**_NO_SYNC))
    return res.rowcount == 1  # type: ignore[attr-defined]


def set_status(session: Session, job_id: str, status: JobStatus) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(
        status=status, phase=status, updated_at=utcnow()).execution_options(**_NO_SYNC))


def status_of(session: Session, job_id: str, lock: bool = False) -> str | None:
    q = select(Job.status).where(Job.id == job_id)
    if lock:
        q = q.with_for_update()
    return session.scalar(q)
