"""Turn stored jobs into API responses."""

from __future__ import annotations

from api.jobs.schemas import ErrorOut, JobOut, Progress, UsageOut, WebhookOut
from core.models import Job


def job_out(job: Job, *, show_secret: bool = False) -> JobOut:
    return JobOut(
        id=job.id, kind=job.kind, status=job.status,
        created_at=job.created_at, updated_at=job.updated_at,
        started_at=job.started_at, finished_at=job.finished_at,
        progress=Progress(steps_total=job.steps_total, steps_done=job.steps_done,
                          phase=job.phase),
        usage=UsageOut(prompt_tokens=job.prompt_tokens, completion_tokens=job.completion_tokens,
                       total_tokens=job.prompt_tokens + job.completion_tokens,
                       model_calls=job.model_calls, cost_usd=float(job.cost_usd or 0)),
        budget=dict(job.budget or {}), metadata=dict(job.job_metadata or {}),
        service_tier=job.service_tier or "standard", deadline=job.due_at,
        promoted_at=job.promoted_at, optimize=job.optimize,
        planned_start=job.planned_start_at,
        webhook=WebhookOut(url=job.webhook["url"], events=list(job.webhook["events"]),
                           secret=job.webhook["secret"] if show_secret else None)
        if job.webhook else None,
        result=job.result,
        error=ErrorOut(code=job.error_code, message=job.error_message or "")
        if job.error_code else None,
    )
