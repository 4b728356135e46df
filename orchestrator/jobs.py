"""Jobs: submission, cancellation, reading and listing."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy.orm import Session

from agents.base import AnyKind
from agents.registry import get_kind, kind_names
from core import grid
from core.errors import InvalidInput, NotFound, TooManyRequests
from core.grid import Optimize
from core.ids import new_id
from core.models import Job, JobStatus, ServiceTier, Step, StepStatus, utcnow
from core.pagination import decode_cursor, encode_cursor
from core.repositories import corpora, events, jobs, steps
from core.settings import get_settings
from orchestrator import dag, scheduling
from orchestrator.sandboxes import LiveDeployment


class TooManyJobs(TooManyRequests):
    code = "too_many_jobs_in_flight"


class _Submission(LiveDeployment):
    """What a kind may check at submission (`agents.base.SubmissionContext`)."""

    def __init__(self, session: Session, tenant_id: str) -> None:
        self._session = session
        self._tenant_id = tenant_id

    def corpus_exists(self, corpus_id: str) -> bool:
        return corpora.corpus_exists(self._session, self._tenant_id, corpus_id)


def unavailable_kinds() -> dict[str, str]:
    """Why each kind that this deployment cannot run now cannot, by kind name."""
    deployment = LiveDeployment()
    out: dict[str, str] = {}
    for name in kind_names():
        kind = get_kind(name)
        reason = kind.unavailable(deployment) if kind is not None else None
        if reason:
            out[name] = reason
    return out


def kind_of(name: str) -> AnyKind:
    kind = get_kind(name)
    if kind is None:
        raise InvalidInput(f"kind: unknown job kind {name!r}; known kinds: "
                           f"{', '.join(kind_names())}")
    return kind


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
    trace_context: str | None = None,
    service_tier: ServiceTier = ServiceTier.STANDARD,
    deadline: datetime | None = None,
    optimize: Optimize | None = None,
) -> Job:
    kind = kind_of(kind_name)
    try:
        job_input = kind.parse_input(raw_input)
    except ValidationError as exc:
        problems = "; ".join(
            f"input.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
        raise InvalidInput(problems) from exc
    kind.check(_Submission(session, tenant_id), job_input)
    due_at = _check_deadline(deadline, service_tier)
    if optimize is not None:
        if due_at is None:
            raise InvalidInput("optimize: only a flex job with a deadline may wait for a "
                               "cheaper or cleaner hour; give a deadline")
        if grid.schedule() is None:
            raise InvalidInput("optimize: this deployment has no grid schedule "
                               "(AGENTQ_GRID_SCHEDULE)")
    settings = get_settings()
    budget = dict(budget)
    budget.setdefault("max_total_tokens", kind.default_max_total_tokens(job_input)
                      or settings.default_job_max_total_tokens)
    roles = kind.phases
    unknown = sorted(set(budget.get("step_max_tokens") or {}) - set(roles))
    if unknown:
        raise InvalidInput(f"budget.step_max_tokens: {kind_name} jobs have no role "
                           f"{unknown[0]!r}; their roles are {', '.join(sorted(roles))}")
    # One submission at a time per tenant past this point: the in-flight count is exact.
    jobs.lock_tenant(session, tenant_id)
    in_flight = jobs.count_active(session, tenant_id)
    if in_flight >= settings.max_jobs_in_flight:
        raise TooManyJobs(f"this tenant already has {in_flight} jobs queued or running (the "
                          f"limit is {settings.max_jobs_in_flight}); retry when some finish")
    max_seconds = budget.get("max_seconds")
    now = utcnow()
    job = Job(
        id=new_id("job"), tenant_id=tenant_id, kind=kind_name, status=JobStatus.QUEUED,
        input=job_input.model_dump(mode="json", exclude_none=True), budget=budget,
        job_metadata=dict(metadata), phase="queued", idempotency_key=idempotency_key,
        webhook=webhook, prompt_tokens=0, completion_tokens=0, model_calls=0,
        reserved_tokens=0, steps_total=0, steps_done=0, event_seq=0, created_at=now,
        updated_at=now, deadline_at=now + timedelta(seconds=max_seconds) if max_seconds else None,
        trace_context=trace_context,
        service_tier=service_tier.value, due_at=due_at, optimize=optimize,
    )
    if optimize is not None and due_at is not None:
        # The job must also finish within its max_seconds, counted from now.
        ends_by = min(due_at, job.deadline_at) if job.deadline_at is not None else due_at
        job.planned_start_at = scheduling.plan_start(session, kind_name, ends_by, optimize, now)
    # A deadline already within the job's lead: promoted now, not at the next sweep.
    promotion: dict[str, Any] | None = None
    if due_at is not None and job.planned_start_at is None:
        estimate = scheduling.estimate_s(session, kind_name, now=now)
        if (due_at - now).total_seconds() <= scheduling.lead_s(estimate):
            job.promoted_at = now
            promotion = {"deadline": due_at.isoformat(), "estimate_s": round(estimate, 1)}
    jobs.add(session, job)
    events.append(session, job.id, "job.created", {"kind": kind_name})
    if job.planned_start_at is not None:
        events.append(session, job.id, "job.deferred", {
            "planned_start": job.planned_start_at.isoformat(), "optimize": optimize})
    if promotion is not None:
        events.append(session, job.id, "job.promoted", promotion)
    dag.add_steps(session, job.id, budget, kind.initial_steps(job_input),
                  tenant_id=tenant_id, continuing=False,
                  tier=scheduling.scheduled_tier(service_tier.value, job.promoted_at is not None),
                  deferred=job.planned_start_at is not None)
    session.refresh(job)
    return job


MAX_DEADLINE = timedelta(days=7)


def _check_deadline(deadline: datetime | None, tier: ServiceTier) -> datetime | None:
    if deadline is None:
        return None
    if tier != ServiceTier.FLEX:
        raise InvalidInput(f"deadline: only flex jobs take a deadline (this one is "
                           f"{tier.value!r}); other tiers are served as soon as they can be")
    if deadline.tzinfo is None:
        raise InvalidInput("deadline: give a time zone (for example 2026-12-01T06:00:00Z)")
    now = utcnow()
    if deadline <= now:
        raise InvalidInput(f"deadline: {deadline.isoformat()} has passed")
    if deadline - now > MAX_DEADLINE:
        raise InvalidInput("deadline: at most 7 days ahead")
    return deadline


_ID = re.compile(r"[A-Za-z0-9_-]{1,40}")


def get_job(session: Session, tenant_id: str, job_id: str) -> Job:
    if not _ID.fullmatch(job_id):
        raise NotFound(f"no job {job_id[:60]!r}")
    job = jobs.get(session, job_id)
    if job is None or job.tenant_id != tenant_id:
        raise NotFound(f"no job {job_id!r}")
    return job


def cancel_job(session: Session, tenant_id: str, job_id: str) -> Job:
    if not _ID.fullmatch(job_id):
        raise NotFound(f"no job {job_id[:60]!r}")
    job = jobs.get(session, job_id, lock=True)
    if job is None or job.tenant_id != tenant_id:
        raise NotFound(f"no job {job_id!r}")
    if JobStatus(job.status).terminal or job.status == JobStatus.CANCELLING:
        return job
    steps.cancel_unstarted(session, job.id)
    # Its queued steps leave room under the tenant's cap: held steps of its other jobs take it.
    scheduling.dispatch(session, job.tenant_id, [], scheduling.priority(job.service_tier, True))
    if steps.count(session, job.id, [StepStatus.RUNNING]) == 0:
        dag.finish(session, job.id, JobStatus.CANCELLED)
    else:
        jobs.set_status(session, job.id, JobStatus.CANCELLING)
        events.append(session, job.id, "job.cancelling", {})
    session.refresh(job)
    return job


def list_jobs(session: Session, tenant_id: str, *, limit: int, cursor: str | None,
              status: str | None) -> tuple[list[Job], str | None]:
    """The tenant's jobs, newest first; keyset pagination with an opaque cursor."""
    after = decode_cursor(cursor) if cursor else None
    rows = jobs.list_for_tenant(session, tenant_id, limit=limit + 1, after=after,
                                status=status)
    next_cursor = (encode_cursor(rows[limit - 1].created_at, rows[limit - 1].id)
                   if len(rows) > limit else None)
    return rows[:limit], next_cursor


def list_steps(session: Session, job_id: str) -> list[Step]:
    return steps.list_for_job(session, job_id)
