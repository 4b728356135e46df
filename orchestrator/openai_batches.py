"""OpenAI batches as agentq jobs: creating one from an uploaded file (checked first: a bad
file makes a batch that is `failed` with its `errors`, nothing else lost), reading one as
OpenAI's batch, cancelling, listing, and writing its output and error files when its job
ends: in the transaction that ends it, or, when steps of it were still running (it ran past
its window, or out of budget), in the transaction in which the last of them stops, keeping
the lines they finished; the batch is `finalizing` meanwhile.

The job is the batch: its id is the batch's id, it appears in the job list, the event log and
the admin view like any other, and its end appends `batch.completed` (or `batch.failed`,
`batch.cancelled`, `batch.expired`) beside `job.*`, for webhooks. The completion window is
the job's deadline (`budget.max_seconds`); a job past it ends `failed` with
`deadline_exceeded`, which a batch shows as `expired`. The job's token budget is the sum of
its lines' upper bounds (prompt bytes and `max_tokens`), so it never binds before the lines
are done.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from agents.base import StepOutputs
from agents.openai_batch import (
    KIND,
    REQUESTS,
    BatchOutcome,
    OpenAIBatchInput,
    RequestCounts,
    counts,
    spec_of,
)
from agents.openai_lines import (
    ENDPOINTS,
    LineError,
    check_file,
    chunks,
    custom_id_of,
    lines_per_step,
    output_record,
    request_lines,
    unrun_record,
)
from core.errors import InvalidInput, NotFound
from core.models import Job, JobStatus, ServiceTier, StepStatus, utcnow
from core.repositories import batches, events, files, jobs, steps
from core.settings import get_settings
from orchestrator import dag
from orchestrator import jobs as job_service

WINDOWS = {"24h": 86_400}
STATUSES = {JobStatus.QUEUED: "validating", JobStatus.RUNNING: "in_progress",
            JobStatus.CANCELLING: "cancelling", JobStatus.COMPLETED: "completed",
            JobStatus.CANCELLED: "cancelled", JobStatus.BUDGET_EXHAUSTED: "failed",
            JobStatus.FAILED: "failed"}
UNRUN = {"cancelled": ("batch_cancelled", "The batch was cancelled before this request ran."),
         "expired": ("batch_expired", "This request could not be executed before the "
                                      "completion window expired.")}


class BatchRequestError(InvalidInput):
    """A request OpenAI's API would refuse with 400 `invalid_request_error`; `param` names
    the field."""

    status_code = 400

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None
                 ) -> None:
        super().__init__(message, code=code or "invalid_value")
        self.param = param


def batch_status(status: str, error_code: str | None) -> str:
    if status == JobStatus.FAILED and error_code == "deadline_exceeded":
        return "expired"
    return STATUSES.get(JobStatus(status), "failed")


def create_batch(session: Session, tenant_id: str, *, input_file_id: str, endpoint: str,
                 completion_window: str, metadata: Mapping[str, str],
                 trace_context: str | None = None,
                 service_tier: ServiceTier = ServiceTier.FLEX) -> Job:
    if endpoint not in ENDPOINTS:
        raise BatchRequestError(f"endpoint must be one of {', '.join(ENDPOINTS)}, not "
                                f"{endpoint[:100]!r}", param="endpoint")
    window = WINDOWS.get(completion_window)
    if window is None:
        raise BatchRequestError(f"completion_window must be one of {', '.join(WINDOWS)}, not "
                                f"{completion_window[:40]!r}", param="completion_window")
    found = files.get(session, tenant_id, input_file_id)
    if found is None:
        raise NotFound(f"No such File object: {input_file_id[:60]}")
    if found.purpose != "batch":
        raise BatchRequestError(f"file {input_file_id} was uploaded with purpose "
                                f"{found.purpose!r}; a batch's input needs purpose 'batch'",
                                param="input_file_id")
    settings = get_settings()
    data = files.content(session, tenant_id, input_file_id) or b""
    checked = check_file(data, endpoint, settings.batch_max_lines,
                         settings.batch_default_max_tokens)
    total = len(checked.spans)
    per = lines_per_step(total, settings.batch_target_steps, settings.batch_max_lines_per_step)
    raw_input = {"input_file_id": input_file_id, "endpoint": endpoint,
                 "completion_window": completion_window, "total": total,
                 "default_max_tokens": settings.batch_default_max_tokens,
                 "chunks": [] if checked.errors else
                 [spec_of(c).model_dump() for c in chunks(checked.spans, per)]}
    budget = {"max_total_tokens": max(100, checked.token_bound), "max_seconds": window}
    # Latency-tolerant work: the flex tier (priced at its discount), promoted should its
    # window come near.
    job = job_service.create_job(session, tenant_id=tenant_id, kind_name=KIND,
                                 raw_input=raw_input, budget=budget, metadata=dict(metadata),
                                 trace_context=trace_context, service_tier=service_tier,
                                 deadline=utcnow() + timedelta(seconds=window))
    if checked.errors:
        outcome = BatchOutcome(request_counts=RequestCounts(total=0, completed=0, failed=0),
                               errors=checked.errors)
        dag.finish(session, job.id, JobStatus.FAILED, result=outcome.model_dump(mode="json"),
                   error=("invalid_batch", checked.errors[0].message))
        session.refresh(job)
    return job


def get_batch(session: Session, tenant_id: str, batch_id: str) -> Job:
    job = job_service.get_job(session, tenant_id, batch_id)
    if job.kind != KIND:
        raise NotFound(f"No such Batch object: {batch_id[:60]}")
    return job


def cancel_batch(session: Session, tenant_id: str, batch_id: str) -> Job:
    get_batch(session, tenant_id, batch_id)
    return job_service.cancel_job(session, tenant_id, batch_id)


def list_batches(session: Session, tenant_id: str, *, limit: int, after: str | None
                 ) -> list[Job]:
    return batches.list_jobs(session, tenant_id, KIND, limit=limit, after=after)


@dataclass(frozen=True)
class BatchView:
    """A batch as OpenAI describes it, read from its job."""

    job: Job
    input: OpenAIBatchInput
    status: str
    request_counts: RequestCounts
    output_file_id: str | None
    error_file_id: str | None
    errors: list[LineError]
    expires_at: datetime
    cancelling_at: datetime | None


def view(session: Session, job: Job) -> BatchView:
    job_input = OpenAIBatchInput.model_validate(job.input)
    status = batch_status(job.status, job.error_code)
    outcome = BatchOutcome.model_validate(job.result) \
        if JobStatus(job.status).terminal and job.result else None
    if outcome is not None and not outcome.finalized:
        outcome = None
    if JobStatus(job.status).terminal and outcome is None:
        status = "finalizing"  # steps still stopping; then the files are written
    if outcome is not None:
        request_counts = outcome.request_counts
    else:
        done, failed = batches.progress(session, job.id)
        request_counts = RequestCounts(total=job_input.total, completed=done - failed,
                                       failed=failed)
    cancelling = batches.cancelling_at(session, job.id) \
        if status in ("cancelling", "cancelled") else None
    window = WINDOWS.get(job_input.completion_window, 0)
    return BatchView(job=job, input=job_input, status=status, request_counts=request_counts,
                     output_file_id=outcome.output_file_id if outcome else None,
                     error_file_id=outcome.error_file_id if outcome else None,
                     errors=outcome.errors if outcome else [],
                     expires_at=job.created_at + timedelta(seconds=window),
                     cancelling_at=cancelling)


def _jsonl(records: list[dict[str, object]]) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records)


def finished(session: Session, job_id: str, status: JobStatus) -> None:
    """The batch's job has just ended (its row is locked): finalise it now, or, while steps
    of it still run (they stop at their next call and keep the lines they finished), once
    the last of them has stopped (`step_stopped`)."""
    if steps.count(session, job_id, [StepStatus.RUNNING]) == 0:
        _finalise(session, job_id, status)


def step_stopped(session: Session, job_id: str) -> None:
    """A step of the batch's ended job stopped (its job row locked): finalise the batch if
    it was the last running one and the batch is not finalised yet."""
    if steps.count(session, job_id, [StepStatus.RUNNING]) > 0:
        return
    _, _, result, _ = batches.finished_row(session, job_id)
    if result and result.get("finalized"):
        return
    status = jobs.status_of(session, job_id)
    if status is not None:
        _finalise(session, job_id, JobStatus(status))


def _finalise(session: Session, job_id: str, status: JobStatus) -> None:
    """Write the batch's output file (the lines answered) and error file (the lines whose
    call failed and, for a batch cancelled or past its window, the lines never run), record
    them and the counts as the job's result, and append `batch.<status>`."""
    tenant_id, raw_input, result, error_code = batches.finished_row(session, job_id)
    job_input = OpenAIBatchInput.model_validate(raw_input)
    state = batch_status(status, error_code)
    earlier = BatchOutcome.model_validate(result) if result and "request_counts" in result \
        else None
    outputs = StepOutputs(steps.outputs(session, job_id))
    results = sorted((r for o in outputs.all(REQUESTS) for r in o.results),
                     key=lambda r: r.line)
    good = [output_record(job_id, job_input.endpoint, r) for r in results if r.ok]
    bad = [output_record(job_id, job_input.endpoint, r) for r in results if not r.ok]
    if state in UNRUN and job_input.total > len(results):
        code, message = UNRUN[state]
        ran = {r.line for r in results}
        data = files.content(session, tenant_id, job_input.input_file_id) or b""
        for line, (_, _, raw) in enumerate(request_lines(data)):
            custom_id = custom_id_of(raw)
            if line not in ran and custom_id is not None:
                bad.append(unrun_record(job_id, line, custom_id, code, message))
    output_id = error_id = None
    if good:
        output_id = files.add(session, tenant_id=tenant_id, purpose="batch_output",
                              filename=f"{job_id}_output.jsonl", content=_jsonl(good),
                              job_id=job_id, part="output").id
    if bad:
        error_id = files.add(session, tenant_id=tenant_id, purpose="batch_output",
                             filename=f"{job_id}_error.jsonl", content=_jsonl(bad),
                             job_id=job_id, part="error").id
    request_counts = counts(job_input.total, outputs) if results or earlier is None \
        else earlier.request_counts
    outcome = BatchOutcome(request_counts=request_counts, output_file_id=output_id,
                           error_file_id=error_id, errors=earlier.errors if earlier else [],
                           finalized=True)
    batches.set_result(session, job_id, outcome.model_dump(mode="json"))
    events.append(session, job_id, f"batch.{state}", {
        "batch_id": job_id, "status": state,
        "request_counts": request_counts.model_dump(), "output_file_id": output_id,
        "error_file_id": error_id})
