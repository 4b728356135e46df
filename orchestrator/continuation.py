"""Continuing a stopped job: one that ran out of budget (`budget_exhausted`), out of time
(`failed` with `deadline_exceeded`), or was cancelled, runs on under a new budget.

In one transaction, the tenant's row and then the job's row locked (so two continuations of a
job, or a continuation and a submission of the tenant, are one after the other):

- the new budget is merged into the job's: each limit given replaces the job's (a total over
  the whole job, what was spent so far included, never an addition), limits not given are
  kept; every limit must be above what the job has spent;
- the job becomes `running`, its result and error cleared, its deadline counted from now;
  `job.continued` is appended; a job that had never started (cancelled in the queue, or while
  it waited for its planned start) is `queued` instead, its planned start cleared: its first
  step's claim starts it (`started_at`, `job.started`) as a new job's does;
- its DAG moves on again (`orchestrator.dag.reopen`): completed steps keep their outputs and
  never run again; the others are queued again (a later attempt, replaying the finished calls
  of their earlier runs from the ledger) or wait for their dependencies.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy.orm import Session

from core.errors import Conflict, InvalidInput
from core.models import Job, JobStatus, utcnow
from core.repositories import events, jobs, steps
from core.settings import get_settings
from orchestrator import dag, scheduling
from orchestrator.jobs import TooManyJobs, get_job, kind_of

# Failed jobs that may be continued, by error code: those that ran out of time.
CONTINUABLE_FAILURES = frozenset({"deadline_exceeded"})


def _check_stopped(job: Job) -> None:
    """409 unless the job stopped in a way that continuing can undo."""
    if job.kind == dag.OPENAI_BATCH:
        # Its output and error files were written when it ended; a batch runs once.
        raise Conflict(f"job {job.id} is an OpenAI batch, which cannot be continued: create "
                       "a new batch of the lines its error file lists", code="job_failed")
    status = JobStatus(job.status)
    if status in (JobStatus.BUDGET_EXHAUSTED, JobStatus.CANCELLED):
        return
    if status is JobStatus.FAILED and job.error_code in CONTINUABLE_FAILURES:
        return
    stopped = "budget_exhausted, failed with deadline_exceeded, or cancelled"
    if status in (JobStatus.QUEUED, JobStatus.RUNNING):
        raise Conflict(f"job {job.id} is {status}: only a job that has stopped ({stopped}) "
                       "can be continued", code="job_not_stopped")
    if status is JobStatus.CANCELLING:
        raise Conflict(f"job {job.id} is still cancelling; continue it once it is cancelled",
                       code="job_stopping")
    if status is JobStatus.COMPLETED:
        raise Conflict(f"job {job.id} has completed: it has nothing left to run",
                       code="job_completed")
    raise Conflict(f"job {job.id} failed with {job.error_code} ({job.error_message}); only a "
                   f"job that has stopped ({stopped}) can be continued: submit a new job",
                   code="job_failed")


def merge_budget(job: Job, given: Mapping[str, Any]) -> dict[str, Any]:
    """The job's budget with the limits `given` put in place; 422 when a limit would not be
    above what the job has spent, or names a role the job's kind does not have."""
    budget = dict(job.budget or {})
    per_role = dict(given.get("step_max_tokens") or {})
    if per_role:
        roles = kind_of(job.kind).phases
        unknown = sorted(set(per_role) - set(roles))
        if unknown:
            raise InvalidInput(f"budget.step_max_tokens: {job.kind} jobs have no role "
                               f"{unknown[0]!r}; their roles are {', '.join(sorted(roles))}")
        per_role = {**(budget.get("step_max_tokens") or {}), **per_role}
    budget.update({k: v for k, v in given.items() if v is not None})
    if per_role:
        budget["step_max_tokens"] = per_role
    spent_tokens = job.prompt_tokens + job.completion_tokens
    limit = budget.get("max_total_tokens")
    if limit is not None and limit <= spent_tokens:
        raise InvalidInput(
            f"budget.max_total_tokens: the job has already spent {spent_tokens} tokens, so "
            f"{limit} leaves nothing to run on; give a limit above {spent_tokens} (the limit "
            "is the job's new total, not an addition)", code="budget_not_above_spent")
    cost = budget.get("max_cost_usd")
    spent_cost = Decimal(job.cost_usd or 0)
    if cost is not None and Decimal(str(cost)) <= spent_cost:
        raise InvalidInput(
            f"budget.max_cost_usd: the job has already spent ${spent_cost:.6f}, so ${cost} "
            f"leaves nothing to run on; give a limit above ${spent_cost:.6f} (the limit is the "
            "job's new total, not an addition)", code="budget_not_above_spent")
    return budget


def continue_job(session: Session, tenant_id: str, job_id: str,
                 budget: Mapping[str, Any]) -> Job:
    """Continue a stopped job under `budget` (limits to replace; see the module's note)."""
    settings = get_settings()
    # The tenant's row first, as a submission takes it: the in-flight count stays exact.
    jobs.lock_tenant(session, tenant_id)
    job = get_job(session, tenant_id, job_id)
    session.refresh(job, with_for_update=True)
    _check_stopped(job)
    running = steps.live_runs(session, job.id)
    if running:
        raise Conflict(f"job {job.id} stopped, but {running} of its steps are still "
                       "stopping; retry in a few seconds", code="job_stopping")
    merged = merge_budget(job, budget)
    in_flight = jobs.count_active(session, tenant_id)
    if in_flight >= settings.max_jobs_in_flight:
        raise TooManyJobs(f"this tenant already has {in_flight} jobs queued or running (the "
                          f"limit is {settings.max_jobs_in_flight}); retry when some finish")
    kind = kind_of(job.kind)
    job_input = kind.parse_input(job.input)
    previous = {"status": job.status, **({"error": {"code": job.error_code,
                                                    "message": job.error_message}}
                                         if job.error_code else {})}
    max_seconds = merged.get("max_seconds")
    deadline = utcnow() + timedelta(seconds=max_seconds) if max_seconds else None
    # One that never started is queued again (and no longer waits for its planned hour).
    jobs.resume(session, job.id, merged, deadline, started=job.started_at is not None)
    given_roles = dict(budget.get("step_max_tokens") or {})
    if given_roles:
        steps.set_max_tokens(session, job.id, given_roles)
    events.append(session, job.id, "job.continued", {
        "previous": previous, "budget": merged,
        "deadline_at": deadline.isoformat() if deadline else None})
    dag.reopen(session, job.id, kind, job_input, merged, tenant_id=job.tenant_id,
               tier=scheduling.scheduled_tier(job.service_tier, job.promoted_at is not None))
    session.refresh(job)
    return job
