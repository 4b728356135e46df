"""Job lifecycle: submission, cancellation and finalisation."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from agents.base import JobKind, StepSpec
from agents.registry import get_kind, kind_names
from core.errors import InvalidInput, NotFound, TooManyRequests
from core.ids import new_id
from core.models import Job, Step, Tenant, utcnow
from core.settings import get_settings
from orchestrator.events import append_event
from orchestrator.outbox import enqueue

ACTIVE = ("queued", "running", "cancelling")


class TooManyJobs(TooManyRequests):
    code = "too_many_jobs_in_flight"
TERMINAL = ("completed", "failed", "cancelled", "budget_exhausted")
STEP_OPEN = ("pending", "queued", "running")
RUN_STEP_TASK = "steps.run"


def kind_of(job: Job) -> JobKind:
    kind = get_kind(job.kind)
    if kind is None:
        raise InvalidInput(f"unknown job kind {job.kind!r}")
    return kind


def add_steps(session: Session, job: Job, specs: list[StepSpec]) -> None:
    """Insert steps; those whose dependencies are all complete are queued at once."""
    if not specs:
        return
    done = set(session.scalars(select(Step.key).where(Step.job_id == job.id,
                                                      Step.status == "completed")))
    per_role: dict[str, int] = dict((job.budget or {}).get("step_max_tokens") or {})
    for spec in specs:
        depends_on = list(dict.fromkeys(spec.depends_on))
        remaining = len([d for d in depends_on if d not in done])
        step = Step(
            id=new_id("stp"), job_id=job.id, key=spec.key, role=spec.role,
            depends_on=depends_on, deps_remaining=remaining,
            status="queued" if remaining == 0 else "pending",
            input=dict(spec.input), max_tokens=per_role.get(spec.role, spec.max_tokens),
            enqueued_at=utcnow() if remaining == 0 else None,
        )
        session.add(step)
        session.flush()
        if remaining == 0:
            enqueue(session, RUN_STEP_TASK, step_id=step.id)
    session.execute(update(Job).where(Job.id == job.id)
                    .values(steps_total=Job.steps_total + len(specs)))


def create_job(
    session: Session,
    *,
    tenant_id: str,
    kind_name: str,
    raw_input: Mapping[str, Any],
    budget: Mapping[str, Any],
    metadata: Mapping[str, Any],
    idempotency_key: str | None = None,
    webhook: dict[str, Any] | None = None,
) -> Job:
    kind = get_kind(kind_name)
    if kind is None:
        raise InvalidInput(f"kind: unknown job kind {kind_name!r}; known kinds: "
                           f"{', '.join(kind_names())}")
    try:
        job_input = kind.parse_input(raw_input)
    except ValidationError as exc:
        problems = "; ".join(
            f"input.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
        raise InvalidInput(problems) from exc
    kind.check(session, tenant_id, job_input)
    settings = get_settings()
    # One submission at a time per tenant past this point: the in-flight count is exact. The
    # lock is FOR NO KEY UPDATE, which does not conflict with the key-share locks that inserts
    # referencing the tenant take (workers writing its jobs' rows never wait for submissions).
    session.execute(select(Tenant.id).where(Tenant.id == tenant_id)
                    .with_for_update(key_share=True))
    in_flight = session.scalar(select(func.count()).select_from(Job).where(
        Job.tenant_id == tenant_id, Job.status.in_(ACTIVE))) or 0
    if in_flight >= settings.max_jobs_in_flight:
        raise TooManyJobs(f"this tenant already has {in_flight} jobs queued or running (the "
                          f"limit is {settings.max_jobs_in_flight}); retry when some finish")
    budget = dict(budget)
    budget.setdefault("max_total_tokens", settings.default_job_max_total_tokens)
    unknown = sorted(set(budget.get("step_max_tokens") or {}) - set(kind.phases))
    if unknown:
        raise InvalidInput(f"budget.step_max_tokens: {kind_name} jobs have no role "
                           f"{unknown[0]!r}; their roles are {', '.join(sorted(kind.phases))}")
    max_seconds = budget.get("max_seconds")
    job = Job(
        id=new_id("job"), tenant_id=tenant_id, kind=kind_name, status="queued",
        input=job_input.model_dump(mode="json", exclude_none=True), budget=budget,
        job_metadata=dict(metadata), phase="queued", idempotency_key=idempotency_key,
        webhook=webhook,
        deadline_at=utcnow() + timedelta(seconds=max_seconds) if max_seconds else None,
    )
    session.add(job)
    session.flush()
    append_event(session, job.id, "job.created", {"kind": kind_name})
    add_steps(session, job, kind.initial_steps(job_input))
    session.flush()
    session.refresh(job)
    return job


_ID = re.compile(r"[A-Za-z0-9_-]{1,40}")


def get_job(session: Session, tenant_id: str, job_id: str) -> Job:
    if not _ID.fullmatch(job_id):
        raise NotFound(f"no job {job_id[:60]!r}")
    job = session.get(Job, job_id)
    if job is None or job.tenant_id != tenant_id:
        raise NotFound(f"no job {job_id!r}")
    return job


def _open_steps(session: Session, job_id: str, statuses: tuple[str, ...]) -> int:
    return int(session.scalar(select(func.count()).select_from(Step)
                              .where(Step.job_id == job_id, Step.status.in_(statuses))) or 0)


def _cancel_unstarted(session: Session, job_id: str) -> None:
    session.execute(update(Step).where(Step.job_id == job_id,
                                       Step.status.in_(("pending", "queued")))
                    .values(status="cancelled", finished_at=utcnow()))


def finish(session: Session, job: Job, status: str, *, result: dict[str, Any] | None = None,
           error: tuple[str, str] | None = None) -> None:
    """Move a job to a terminal state, once; unstarted steps are cancelled."""
    if job.status in TERMINAL:
        return
    now = utcnow()
    job.status = status
    job.phase = status
    job.finished_at = now
    if result is not None:
        job.result = result
    if error is not None:
        job.error_code, job.error_message = error
    _cancel_unstarted(session, job.id)
    data: dict[str, Any] = {"status": status}
    if error is not None:
        data["error"] = {"code": error[0], "message": error[1]}
    append_event(session, job.id, f"job.{status}", data)


def cancel_job(session: Session, tenant_id: str, job_id: str) -> Job:
    if not _ID.fullmatch(job_id):
        raise NotFound(f"no job {job_id[:60]!r}")
    job = session.get(Job, job_id, with_for_update=True)
    if job is None or job.tenant_id != tenant_id:
        raise NotFound(f"no job {job_id!r}")
    if job.status in TERMINAL or job.status == "cancelling":
        return job
    _cancel_unstarted(session, job.id)
    if _open_steps(session, job.id, ("running",)) == 0:
        finish(session, job, "cancelled")
    else:
        job.status = "cancelling"
        job.phase = "cancelling"
        append_event(session, job.id, "job.cancelling", {})
    session.flush()
    return job


def maybe_finish_stopping(session: Session, job: Job) -> None:
    """A job that is cancelling ends once no step of it runs any more."""
    if job.status == "cancelling" and _open_steps(session, job.id, ("running",)) == 0:
        finish(session, job, "cancelled")


def open_steps(session: Session, job_id: str) -> int:
    return _open_steps(session, job_id, STEP_OPEN)


def _encode_cursor(job: Job) -> str:
    raw = json.dumps([job.created_at.isoformat(), job.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, job_id = json.loads(raw)
        if not isinstance(created, str) or not isinstance(job_id, str) \
                or not _ID.fullmatch(job_id):
            raise ValueError("bad cursor fields")
        when = datetime.fromisoformat(created)
        if when.tzinfo is None:
            raise ValueError("cursor time has no zone")
        return when.astimezone(UTC), job_id
    except (ValueError, TypeError, OverflowError) as exc:
        raise ValueError("not a cursor this API returned") from exc


def list_jobs(session: Session, tenant_id: str, *, limit: int, cursor: str | None,
              status: str | None) -> tuple[list[Job], str | None]:
    """The tenant's jobs, newest first; keyset pagination with an opaque cursor."""
    q = select(Job).where(Job.tenant_id == tenant_id)
    if status is not None:
        q = q.where(Job.status == status)
    if cursor:
        created, job_id = _decode_cursor(cursor)
        q = q.where(or_(Job.created_at < created,
                        and_(Job.created_at == created, Job.id < job_id)))
    rows = list(session.scalars(q.order_by(Job.created_at.desc(), Job.id.desc())
                                .limit(limit + 1)))
    next_cursor = _encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return rows[:limit], next_cursor


def list_steps(session: Session, job_id: str) -> list[Step]:
    return list(session.scalars(select(Step).where(Step.job_id == job_id)
                                .order_by(Step.created_at, Step.key)))


def expire_deadlines(limit: int = 200) -> int:
    """End the active jobs that ran past their `max_seconds`."""
    from orchestrator.uow import unit_of_work

    now = utcnow()
    ended = 0
    with unit_of_work() as s:
        ids = list(s.scalars(select(Job.id).where(Job.status.in_(ACTIVE),
                                                  Job.deadline_at < now).limit(limit)))
        for job_id in ids:
            job = s.get(Job, job_id, with_for_update=True)
            if job is None or job.status in TERMINAL:
                continue
            finish(s, job, "failed", error=(
                "deadline_exceeded",
                f"the job ran past its budget of {job.budget.get('max_seconds')} seconds"))
            ended += 1
    return ended
