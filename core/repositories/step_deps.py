"""Steps' dependencies: fan-in as steps complete, a run that ends waiting on the children it
spawned, the spawned steps themselves, and the reopening of a stopped job's steps (each waits
again on the dependencies it has left)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import String, and_, bindparam, case, func, or_, select, update
from sqlalchemy.orm import Session

from core.db import Prebuilt, db_now, is_postgres, now_param, one_of
from core.models import Step, StepStatus, steps_table, utcnow

S = steps_table.c


def completed_keys(session: Session, job_id: str) -> set[str]:
    return set(session.scalars(select(S.key).where(S.job_id == job_id,
                                                      S.status == StepStatus.COMPLETED)))


def _fan_in(_: bool) -> Any:
    remaining = S.deps_remaining - 1
    return update(steps_table).where(
        S.job_id == bindparam("p_job"), S.status == StepStatus.PENDING,
        S.depends_on.op("@>")(func.jsonb_build_array(bindparam("p_key", type_=String))),
    ).values(
        deps_remaining=remaining,
        status=case((remaining <= 0, StepStatus.QUEUED.value), else_=S.status),
        enqueued_at=case((remaining <= 0, now_param(False)), else_=S.enqueued_at),
    ).returning(S.id, S.status)


_FAN_IN = Prebuilt(_fan_in)  # Postgres only


def fan_in(session: Session, job_id: str, done_key: str) -> list[str]:
    """Count the completion of `done_key` in the steps that wait for it; queue those that
    wait for nothing more. Returns the ids of the steps it queued. On Postgres one statement
    (each row's count and status are re-read under its lock), elsewhere three."""
    if is_postgres(session):
        return [sid for sid, status in _FAN_IN.execute(session, {
            "p_job": job_id, "p_key": done_key, "p_now": utcnow()})
            if status == StepStatus.QUEUED]
    waiting = [sid for sid, deps in session.execute(
        select(S.id, S.depends_on).where(S.job_id == job_id,
                                               S.status == StepStatus.PENDING))
        if done_key in (deps or [])]
    if not waiting:
        return []
    left = session.execute(update(steps_table).where(one_of(session, S.id, waiting)).values(
        deps_remaining=S.deps_remaining - 1).returning(S.id, S.deps_remaining)
        ).all()
    ready = [sid for sid, n in left if n <= 0]
    if not ready:
        return []
    return list(session.scalars(update(steps_table).where(
        one_of(session, S.id, ready), S.status == StepStatus.PENDING,
    ).values(status=StepStatus.QUEUED, enqueued_at=utcnow()).returning(S.id)
        ))


def reopen(session: Session, job_id: str) -> list[str]:
    """Every step of a stopped job that did not complete (failed, cancelled, never started,
    or `running` under a lease that expired: its run is gone) waits again: queued when its
    dependencies have all completed, else pending with its fan-in counted afresh. The attempt
    is kept, so the next claim takes the next one and the runs before it stay fenced out.
    Returns the ids of the queued steps."""
    now = db_now(session)
    reopenable = or_(S.status.in_((StepStatus.PENDING, StepStatus.QUEUED, StepStatus.HELD,
                                   StepStatus.DEFERRED, StepStatus.FAILED,
                                   StepStatus.CANCELLED)),
                     and_(S.status == StepStatus.RUNNING, S.lease_expires_at < now))
    done = completed_keys(session, job_id)
    rows = session.execute(select(S.id, S.depends_on).where(S.job_id == job_id, reopenable)
                           .with_for_update()).all()
    if not rows:
        return []
    waiting = {sid: len([d for d in (deps or []) if d not in done]) for sid, deps in rows}
    ready = [sid for sid, n in waiting.items() if n == 0]
    fresh = {"error": None, "output": None, "finished_at": None, "lease_expires_at": None}
    by_count: dict[int, list[str]] = {}
    for sid, n in waiting.items():
        if n:
            by_count.setdefault(n, []).append(sid)
    for n, ids in by_count.items():
        session.execute(update(steps_table).where(one_of(session, S.id, ids)).values(
            status=StepStatus.PENDING, deps_remaining=n, enqueued_at=None, **fresh))
    if not ready:
        return []
    return list(session.scalars(update(steps_table).where(one_of(session, S.id, ready)).values(
        status=StepStatus.QUEUED, deps_remaining=0, enqueued_at=utcnow(), **fresh,
    ).returning(S.id)))


@dataclass(frozen=True)
class SpawnedStep:
    """A step an agent spawned: its key, the key of the step that spawned it, its role, its
    input, status and output."""

    key: str
    spawned_by: str
    role: str
    input: dict[str, Any]
    status: str
    output: dict[str, Any] | None


def spawned(session: Session, job_id: str) -> list[SpawnedStep]:
    """The job's spawned steps, in the order they were added."""
    return [SpawnedStep(str(k), str(b), str(r), dict(i or {}), str(st), o)
            for k, b, r, i, st, o in session.execute(
                select(S.key, S.spawned_by, S.role, S.input, S.status, S.output)
                .where(S.job_id == job_id, S.spawned_by.is_not(None))
                .order_by(S.created_at, S.key))]


def count_spawned(session: Session, job_id: str, besides: str | None = None) -> int:
    """The job's spawned steps (`besides`: leaving out those that step spawned)."""
    q = select(func.count()).select_from(Step).where(S.job_id == job_id,
                                                     S.spawned_by.is_not(None))
    if besides is not None:
        q = q.where(S.spawned_by != besides)
    return int(session.scalar(q) or 0)


def wait_for(session: Session, step_id: str, attempt: int, depends_on: Sequence[str],
             deps_remaining: int) -> bool:
    """Run `attempt` of the step ends waiting: the step is `pending` on `depends_on` (its
    children added), with `deps_remaining` of them still to complete, and holds no lease
    (`finished_at` says when the run ended; the next claim clears it).
    False when the run no longer holds the step (the write is refused)."""
    res = session.execute(update(steps_table).where(
        S.id == step_id, S.attempt == attempt, S.status == StepStatus.RUNNING,
    ).values(status=StepStatus.PENDING, depends_on=list(depends_on),
             deps_remaining=deps_remaining, lease_expires_at=None, enqueued_at=None,
             finished_at=db_now(session)))
    return res.rowcount == 1  # type: ignore[attr-defined]
