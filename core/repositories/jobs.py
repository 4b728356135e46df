"""Jobs: every query on the job rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Numeric, String, and_, bindparam, func, or_, select, update
from sqlalchemy.orm import Session

from core.db import Prebuilt, now_param
from core.models import (
    JOB_ACTIVE,
    JOB_TERMINAL,
    Job,
    JobStatus,
    StepStatus,
    Tenant,
    jobs_table,
    steps_table,
    utcnow,
)
from core.repositories.webhooks import HOOK_COLUMNS, Hooks, hooks_of

J = jobs_table.c


def get(session: Session, job_id: str, lock: bool = False) -> Job | None:
    return session.get(Job, job_id, with_for_update=lock or None)


def lock_tenant(session: Session, tenant_id: str) -> None:
    """Serialise a tenant's submissions from here to commit (the in-flight count is exact).
    The lock is FOR NO KEY UPDATE, which does not conflict with the key-share locks that inserts
    referencing the tenant take (workers writing its jobs' rows never wait for submissions)."""
    session.execute(select(Tenant.id).where(Tenant.id == tenant_id)
                    .with_for_update(key_share=True))


def count_active(session: Session, tenant_id: str) -> int:
    return int(session.scalar(select(func.count()).select_from(Job).where(
        Job.tenant_id == tenant_id, Job.status.in_(list(JOB_ACTIVE)))) or 0)


def add(session: Session, job: Job) -> None:
    session.add(job)
    session.flush()


_FIRST_STEP = Prebuilt(lambda postgres: update(jobs_table).where(
    J.id == bindparam("p_job"), J.status == JobStatus.QUEUED,
).values(status=JobStatus.RUNNING, started_at=now_param(False),
         phase=bindparam("p_phase", type_=String),
         event_seq=J.event_seq + bindparam("p_events") + 1,
         ).returning(J.event_seq, *HOOK_COLUMNS))
_NEXT_STEP = Prebuilt(lambda postgres: update(jobs_table).where(J.id == bindparam("p_job")).values(
    phase=bindparam("p_phase", type_=String), event_seq=J.event_seq + bindparam("p_events"),
).returning(J.event_seq, *HOOK_COLUMNS))


def started_step(session: Session, job_id: str, phase: str, maybe_first: bool, steps: int = 1
                 ) -> tuple[int, Hooks, bool]:
    """`steps` steps of the job started: its phase (the last one's), their event cursors
    (`step.started`), and, when the job was still `queued` (`maybe_first`), the job `running`
    and a cursor before them (`job.started`). Returns the first cursor, who hears the events,
    and whether these steps started the job (one of several first steps claimed at once
    does)."""
    params = {"p_job": job_id, "p_phase": phase, "p_now": utcnow(), "p_events": steps}
    if maybe_first:
        row = _FIRST_STEP.execute(session, params).first()
        if row is not None:
            return int(row[0]) - steps, hooks_of(row), True
    row = _NEXT_STEP.execute(session, params).one()
    return int(row[0]) - steps + 1, hooks_of(row), False


@dataclass(frozen=True)
class Completed:
    """The job row after a step's completion was counted."""

    status: str
    steps_done: int
    steps_total: int
    first_seq: int
    hooks: Hooks
    # Usage totals: prompt tokens, completion tokens, model calls, dollars.
    totals: tuple[int, int, int, Decimal]


_STEP_COMPLETED = Prebuilt(lambda postgres: update(jobs_table).where(
    J.id == bindparam("p_job"),
).values(
    steps_done=J.steps_done + 1, event_seq=J.event_seq + bindparam("p_events"),
    updated_at=now_param(False),
    prompt_tokens=J.prompt_tokens + bindparam("p_prompt"),
    completion_tokens=J.completion_tokens + bindparam("p_completion"),
    model_calls=J.model_calls + bindparam("p_calls"),
    cost_usd=J.cost_usd + bindparam("p_cost", type_=Numeric()),
    reserved_tokens=J.reserved_tokens - bindparam("p_held"),
    reserved_cost_usd=J.reserved_cost_usd - bindparam("p_held_cost", type_=Numeric()),
).returning(J.status, J.steps_done, J.steps_total, J.event_seq,
            J.prompt_tokens, J.completion_tokens, J.model_calls, J.cost_usd, *HOOK_COLUMNS))


def step_completed(session: Session, job_id: str, events: int,
                   usage: tuple[int, int, int, Decimal, int, Decimal] | None = None
                   ) -> Completed:
    """Count a completed step, add the usage of calls settled with it (`usage`: prompt and
    completion tokens, calls and dollars, and the tokens and dollars their reservations held)
    and take `events` cursors. Locks the job row: the completions of a job are counted one at
    a time."""
    prompt, completion, calls, cost, held, held_cost = usage or (0, 0, 0, Decimal(0), 0,
                                                                 Decimal(0))
    row = _STEP_COMPLETED.execute(session, {
        "p_job": job_id, "p_events": events, "p_now": utcnow(), "p_prompt": prompt,
        "p_completion": completion, "p_calls": calls, "p_cost": cost, "p_held": held,
        "p_held_cost": held_cost}).one()
    return Completed(str(row[0]), int(row[1]), int(row[2]), int(row[3]) - events + 1,
                     hooks_of(row), (int(row[4]), int(row[5]), int(row[6]), Decimal(row[7])))


def add_steps_total(session: Session, job_id: str, n: int) -> None:
    session.execute(update(jobs_table).where(J.id == job_id).values(
        steps_total=J.steps_total + n))


def statuses(session: Session, job_ids: Sequence[str]) -> dict[str, tuple[str, bool]]:
    """Each job's status, and whether it is promoted (a flex job, to meet its deadline)."""
    return {i: (s, p is not None) for i, s, p in session.execute(
        select(J.id, J.status, J.promoted_at).where(J.id.in_(list(job_ids))))}


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


def _finish(with_result: bool, with_error: bool) -> Prebuilt[Any]:
    def build(postgres: bool) -> Any:
        values: dict[str, Any] = {
            "status": bindparam("p_status", type_=String),
            "phase": bindparam("p_status", type_=String),
            "finished_at": now_param(False), "updated_at": now_param(False)}
        if with_result:
            values["result"] = bindparam("p_result", type_=J.result.type)
        if with_error:
            values["error_code"] = bindparam("p_code", type_=String)
            values["error_message"] = bindparam("p_message", type_=String)
        return update(jobs_table).where(
            J.id == bindparam("p_job"), *(J.status != str(s) for s in JOB_TERMINAL),
        ).values(**values).returning(J.kind)
    return Prebuilt(build)


_FINISH = {(r, e): _finish(r, e) for r in (False, True) for e in (False, True)}


def finish(session: Session, job_id: str, status: JobStatus, *,
           result: dict[str, Any] | None = None, error: tuple[str, str] | None = None
           ) -> str | None:
    """Move a job to a terminal state, once; its kind, or None when it was terminal
    already."""
    code, message = error or (None, None)
    kind = _FINISH[(result is not None, error is not None)].execute(session, {
        "p_job": job_id, "p_status": str(status), "p_result": result, "p_code": code,
        "p_message": message, "p_now": utcnow()}).scalar()
    return None if kind is None else str(kind)


def set_status(session: Session, job_id: str, status: JobStatus) -> None:
    session.execute(update(jobs_table).where(J.id == job_id).values(
        status=status, phase=status, updated_at=utcnow()))


def tenant_and_tier(session: Session, job_id: str) -> tuple[str, str]:
    """The job's tenant and the tier its work is scheduled at (`promoted` once promoted)."""
    tenant, tier, promoted = session.execute(select(J.tenant_id, J.service_tier, J.promoted_at)
                                             .where(J.id == job_id)).one()
    return str(tenant), "promoted" if promoted is not None and tier == "flex" else str(tier)


def kind_of(session: Session, job_id: str) -> str | None:
    return session.scalar(select(J.kind).where(J.id == job_id))


def status_of(session: Session, job_id: str, lock: bool = False) -> str | None:
    q = select(J.status).where(J.id == job_id)
    if lock:
        q = q.with_for_update()
    return session.scalar(q)


def resume(session: Session, job_id: str, budget: dict[str, Any],
           deadline_at: datetime | None, started: bool = True) -> None:
    """A stopped job runs again under `budget`: its result and error are cleared until it
    ends again. One that never `started` (stopped while it waited for its planned hour, or
    in the queue) is `queued` again with no planned start: its first step's claim starts it
    (`started_at`, `job.started`), as a new job's does."""
    status = JobStatus.RUNNING if started else JobStatus.QUEUED
    session.execute(update(jobs_table).where(J.id == job_id).values(
        status=status, phase=status, budget=budget,
        deadline_at=deadline_at, result=None, error_code=None, error_message=None,
        finished_at=None, updated_at=utcnow(),
        **({} if started else {"planned_start_at": None})))


def recount_steps(session: Session, job_id: str, decided: bool = False) -> tuple[int, int]:
    """Set the job's step counts from its steps; returns (completed, total). `decided`: a
    step decided the job, so nothing else runs: its total is the steps it completed."""
    S = steps_table.c
    done = select(func.count()).where(S.job_id == job_id, S.status == StepStatus.COMPLETED)
    total = done if decided else select(func.count()).where(S.job_id == job_id)
    row = session.execute(update(jobs_table).where(J.id == job_id).values(
        steps_total=total.scalar_subquery(), steps_done=done.scalar_subquery(),
    ).returning(J.steps_done, J.steps_total)).one()
    return int(row[0]), int(row[1])


@dataclass(frozen=True)
class TraceFacts:
    """What a job's span says of it (`orchestrator.traces`)."""

    job_id: str
    tenant_id: str
    kind: str
    status: str
    trace_context: str | None
    budget: dict[str, Any]
    prompt_tokens: int
    completion_tokens: int
    model_calls: int
    cost_usd: Decimal
    error_code: str | None
    error_message: str | None
    created_at: datetime
    finished_at: datetime | None
    service_tier: str = "standard"


def trace_facts(session: Session, job_id: str) -> TraceFacts | None:
    row = session.execute(select(
        J.id, J.tenant_id, J.kind, J.status, J.trace_context, J.budget, J.prompt_tokens,
        J.completion_tokens, J.model_calls, J.cost_usd, J.error_code, J.error_message,
        J.created_at, J.finished_at, J.service_tier).where(J.id == job_id)).first()
    if row is None:
        return None
    return TraceFacts(str(row[0]), str(row[1]), str(row[2]), str(row[3]), row[4],
                      dict(row[5] or {}), int(row[6]), int(row[7]), int(row[8]),
                      Decimal(row[9] or 0), row[10], row[11], row[12], row[13],
                      str(row[14] or "standard"))


def flex_with_deadlines(session: Session, limit: int) -> list[tuple[str, str, datetime, int,
                                                                    int, datetime, str]]:
    """Active flex jobs with a deadline, not promoted yet: id, kind, deadline, steps done and
    total, created, tenant; rows another sweeper holds are skipped."""
    return [(str(i), str(k), d, int(done or 0), int(total or 0), c, str(t))
            for i, k, d, done, total, c, t in session.execute(
                select(J.id, J.kind, J.due_at, J.steps_done, J.steps_total, J.created_at,
                       J.tenant_id)
                .where(J.status.in_(list(JOB_ACTIVE)), J.due_at.is_not(None),
                       J.promoted_at.is_(None), J.service_tier == "flex")
                .order_by(J.due_at).limit(limit).with_for_update(skip_locked=True))]


def mean_run_s(session: Session, since: datetime) -> dict[str, float]:
    """The mean seconds each kind's jobs completed since took to finish once they were due to
    go: a flex job from its promotion, when it was promoted before it started (the time
    waiting for it under promotion counts), else from its start; other jobs from their
    submission. The time a flex job waited by design (behind other tiers, or for a cheaper
    hour) is not the time it takes: counted, it would grow the estimate with the deadlines
    given, and so promote later jobs ever earlier."""
    out: dict[str, list[float]] = {}
    for kind, tier, created, started, promoted, finished in session.execute(
            select(J.kind, J.service_tier, J.created_at, J.started_at, J.promoted_at,
                   J.finished_at)
            .where(J.status == JobStatus.COMPLETED, J.finished_at > since)
            .order_by(J.finished_at.desc()).limit(2000)):
        went = created
        if tier == "flex":
            went = promoted if promoted is not None and (started is None or promoted <= started) \
                else started or created
        out.setdefault(str(kind), []).append(max((finished - went).total_seconds(), 0.0))
    return {k: sum(v) / len(v) for k, v in out.items()}


def is_promoted(session: Session, job_id: str) -> bool:
    return session.scalar(select(J.promoted_at).where(J.id == job_id)) is not None


def promote(session: Session, job_id: str) -> bool:
    return session.execute(update(jobs_table).where(
        J.id == job_id, J.promoted_at.is_(None)).values(promoted_at=utcnow())
    ).rowcount == 1  # type: ignore[attr-defined]


def deadline_counts(session: Session, now: datetime) -> tuple[int, int]:
    """Jobs with a deadline that missed it (ended after it, or still active past it), and
    jobs promoted to meet theirs."""
    missed = session.scalar(select(func.count()).select_from(Job).where(
        J.due_at.is_not(None), or_(J.finished_at > J.due_at,
                                   and_(J.finished_at.is_(None), J.due_at < now))))
    promoted = session.scalar(select(func.count()).select_from(Job).where(
        J.promoted_at.is_not(None)))
    return int(missed or 0), int(promoted or 0)


def due_to_start(session: Session, now: datetime, limit: int) -> list[tuple[str, str, str,
                                                                    bool]]:
    """Jobs still queued whose planned start has come: id, tenant, tier, promoted; rows
    another sweeper holds are skipped."""
    return [(str(i), str(t), str(tier), p is not None) for i, t, tier, p in session.execute(
        select(J.id, J.tenant_id, J.service_tier, J.promoted_at).where(
            J.status == JobStatus.QUEUED, J.planned_start_at <= now)
        .order_by(J.planned_start_at).limit(limit).with_for_update(skip_locked=True))]
