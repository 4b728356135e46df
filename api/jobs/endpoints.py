"""`/v1/jobs`: submit, read, list, inspect steps, cancel, continue."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Response
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from api.deps import CurrentPrincipal, DbSession
from api.jobs.schemas import (
    ErrorResponse,
    JobContinue,
    JobCreate,
    JobList,
    JobOut,
    JobStatus,
    StepList,
    StepOut,
    UsageOut,
)
from api.jobs.serialize import job_out
from api.responses import ERRORS, job_links, link
from core import tracing
from core.db import transaction
from core.db_errors import retry_transient
from core.errors import InvalidInput
from core.models import ServiceTier
from core.repositories.webhooks import new_secret
from core.settings import get_settings
from core.webhook_http import check_url
from orchestrator import continuation, idempotency, scheduling, traces
from orchestrator import jobs as job_service
from orchestrator.dag import OPENAI_BATCH

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=ERRORS)


@router.post("", status_code=202, response_model=JobOut,
             responses={202: {"headers": {"Location": {"description": "The job's URL"}},
                              "links": job_links("$response.body#/id")},
                        409: {"model": ErrorResponse,
                              "description": "The first request with this Idempotency-Key "
                                             "is still in flight"}})
def submit_job(
    body: JobCreate,
    principal: CurrentPrincipal,
    idempotency_key: Annotated[str | None, Header(
        max_length=idempotency.MAX_KEY_LENGTH,
        description="Makes the submission safe to retry: the same key and body return the "
                    "first response (same job); another body is 422; kept 24 hours.")] = None,
) -> JSONResponse:
    """Submit a job. Answers at once with the queued job; poll its `Location`."""
    if body.kind == OPENAI_BATCH:
        raise InvalidInput(f"kind: {OPENAI_BATCH} jobs are made by POST /v1/batches, from an "
                           "uploaded file (see the OpenAI Batch API)")
    tier = ServiceTier(body.service_tier)
    scheduling.check_tier(principal.tenant_name, tier)
    key = idempotency.check_key(idempotency_key) if idempotency_key is not None else None
    webhook = None
    if body.webhook is not None:
        check_url(body.webhook.url, allow_private=get_settings().webhooks_allow_private_networks)
        # Made once: a transaction run again keeps the same secret.
        webhook = {"url": body.webhook.url, "events": list(body.webhook.events),
                   "secret": new_secret()}
    budget = body.budget.model_dump(exclude_none=True)

    # The job's trace: the submission (and the first steps' messages, sent as its
    # transaction commits) under the job's span.
    trace_context = traces.new_job()

    def create(session: Session) -> dict[str, Any]:
        job = job_service.create_job(
            session, tenant_id=principal.tenant_id, kind_name=body.kind, raw_input=body.input,
            budget=budget, metadata=body.metadata, idempotency_key=key, webhook=webhook,
            trace_context=trace_context, service_tier=tier,
            deadline=body.deadline, optimize=body.optimize)
        if submitting is not None:
            submitting.set_attributes({"agentq.job.id": job.id, "agentq.job.kind": job.kind,
                                       "agentq.tenant.id": job.tenant_id})
        out: dict[str, Any] = jsonable_encoder(job_out(job, show_secret=True))
        return out

    with tracing.open_span("submit", parent=trace_context) as submitting:
        outcome = idempotency.once(principal.tenant_id, key, body.model_dump(mode="json"),
                                   create)
    if submitting is not None and not outcome.replayed:
        # Recorded only when it made the job: a replay (or a refusal) made no job of this
        # trace, whose span would never be recorded.
        submitting.end()
    return _answer(outcome)


def _answer(outcome: idempotency.Outcome) -> JSONResponse:
    headers = {"Location": f"/v1/jobs/{outcome.body['id']}"}
    if outcome.replayed:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(outcome.body, status_code=outcome.status_code, headers=headers)


@router.get("", response_model=JobList, responses={200: {"links": {
    "NextPage": link("/v1/jobs", "get", "The next page (while next_cursor is not null)",
                     cursor="$response.body#/next_cursor")}}})
def list_jobs(
    session: DbSession,
    principal: CurrentPrincipal,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    status: Annotated[JobStatus | None, Query()] = None,
) -> JobList:
    """The tenant's jobs, newest first."""
    rows, next_cursor = job_service.list_jobs(session, principal.tenant_id, limit=limit,
                                              cursor=cursor, status=status)
    return JobList(data=[job_out(j) for j in rows], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: str, session: DbSession, principal: CurrentPrincipal) -> JobOut:
    return job_out(job_service.get_job(session, principal.tenant_id, job_id))


@router.get("/{job_id}/steps", response_model=StepList)
def list_steps(job_id: str, session: DbSession, principal: CurrentPrincipal) -> StepList:
    job = job_service.get_job(session, principal.tenant_id, job_id)
    data = []
    for s in job_service.list_steps(session, job.id):
        duration = ((s.finished_at - s.started_at).total_seconds() * 1000
                    if s.started_at and s.finished_at else None)
        data.append(StepOut(
            id=s.id, key=s.key, role=s.role, status=s.status,
            depends_on=list(s.depends_on), attempt=s.attempt, model=s.model,
            max_tokens=s.max_tokens,
            usage=UsageOut(prompt_tokens=s.prompt_tokens, completion_tokens=s.completion_tokens,
                           total_tokens=s.prompt_tokens + s.completion_tokens,
                           model_calls=s.model_calls),
            created_at=s.created_at, started_at=s.started_at, finished_at=s.finished_at,
            duration_ms=duration, error=s.error, spawned_by=s.spawned_by))
    return StepList(data=data)


@router.post("/{job_id}/cancel", status_code=202, response_model=JobOut,
             responses={202: {"links": job_links("$response.body#/id")}})
def cancel_job(job_id: str, principal: CurrentPrincipal, response: Response) -> JobOut:
    """Cancel a job. Steps that have not started never run; running steps stop at their next
    model call, and a running sandboxed command (a coding job's tests) is killed with its whole
    process tree within about a second. The job ends `cancelled` (a job already finished is
    returned as it is)."""
    def cancel() -> JobOut:
        with transaction() as session:
            return job_out(job_service.cancel_job(session, principal.tenant_id, job_id))

    out = retry_transient(cancel)
    response.headers["Location"] = f"/v1/jobs/{out.id}"
    return out


@router.post("/{job_id}/continue", status_code=202, response_model=JobOut, responses={
    202: {"headers": {"Location": {"description": "The job's URL"}}},
    409: {"model": ErrorResponse,
          "description": "The job has not stopped (queued, running, cancelling: "
                         "`job_not_stopped`, `job_stopping`), has completed "
                         "(`job_completed`), failed for another reason than its deadline "
                         "(`job_failed`), or its steps are still stopping (`job_stopping`, "
                         "retry shortly); or the first request with this Idempotency-Key is "
                         "still in flight"},
    422: {"model": ErrorResponse,
          "description": "A limit is not above what the job has already spent "
                         "(`budget_not_above_spent`), or the body is invalid"}})
def continue_job(
    job_id: str,
    principal: CurrentPrincipal,
    body: JobContinue | None = None,
    idempotency_key: Annotated[str | None, Header(
        max_length=idempotency.MAX_KEY_LENGTH,
        description="Makes the continuation safe to retry: the same key and body return the "
                    "first response; another body (or job) is 422; kept 24 hours.")] = None,
) -> JSONResponse:
    """Continue a job that stopped: `budget_exhausted`, `failed` with `deadline_exceeded`, or
    `cancelled`. The limits given in `budget` are the job's new totals (what it has spent so
    far counts against them), not amounts added; limits left out are kept. The job is
    `running` again at once (`queued`, if it had never started: its first step starts it),
    its `result` and `error` cleared until it ends again, and a `job.continued` event is
    appended. Completed steps are never run again; failed,
    cancelled and unstarted steps are queued again, replaying the model calls they had
    finished from the ledger instead of paying for them again. The deadline
    (`max_seconds`, given or kept) counts from now. The result it ends with is built from the
    outputs of every step, before and after the continuation."""
    body = body or JobContinue()
    key = idempotency.check_key(idempotency_key) if idempotency_key is not None else None
    budget = body.budget.model_dump(exclude_none=True)

    def resume(session: Session) -> dict[str, Any]:
        job = continuation.continue_job(session, principal.tenant_id, job_id, budget)
        out: dict[str, Any] = jsonable_encoder(job_out(job))
        return out

    return _answer(idempotency.once(
        principal.tenant_id, key, {"continue": job_id, "body": body.model_dump(mode="json")},
        resume))
