"""`/v1/batches`: create, retrieve, list and cancel batches, as OpenAI's Batch API. A batch is
an agentq job of the `openai_batch` kind (its id is the job's id); see
`orchestrator.openai_batches`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import CurrentPrincipal, DbSession
from api.openai.schemas import OPENAI_ERRORS, BatchCreate, BatchList, BatchObject
from core import tracing
from core.db import transaction
from core.db_errors import retry_transient
from core.models import ServiceTier
from core.settings import get_settings
from orchestrator import openai_batches, scheduling, traces

router = APIRouter(prefix="/v1/batches", tags=["openai"], responses=OPENAI_ERRORS)


@router.post("", response_model=BatchObject)
def create_batch(body: BatchCreate, principal: CurrentPrincipal) -> BatchObject:
    """Create a batch from an uploaded file (`purpose=batch`). The file is checked at once: a
    malformed line, a line whose `url` is not the batch's `endpoint`, a repeated `custom_id`
    or more lines than AGENTQ_BATCH_MAX_LINES make a batch that is `failed` with `errors`;
    a wrong `endpoint` or `completion_window` is a 400."""
    # Latency-tolerant: the flex tier, or the standard one for a tenant the operator has not
    # allowed flex (`AGENTQ_TENANT_TIERS`).
    allowed = get_settings().tenant_tiers.get(principal.tenant_name)
    tier = ServiceTier.FLEX if allowed is None or "flex" in allowed else ServiceTier.STANDARD
    scheduling.check_tier(principal.tenant_name, tier)
    # The job's trace, as for any job: the submission under the job's span.
    trace_context = traces.new_job()

    def create() -> BatchObject:
        with transaction() as s:
            job = openai_batches.create_batch(
                s, principal.tenant_id, input_file_id=body.input_file_id,
                endpoint=body.endpoint, completion_window=body.completion_window,
                metadata=body.metadata or {}, trace_context=trace_context, service_tier=tier)
            return BatchObject.of(openai_batches.view(s, job))

    with tracing.open_span("submit", parent=trace_context) as submitting:
        made = retry_transient(create)
    if submitting is not None:
        submitting.end()  # only when it made the job: the job's span is recorded too
    return made


@router.get("", response_model=BatchList)
def list_batches(
    session: DbSession,
    principal: CurrentPrincipal,
    after: Annotated[str | None, Query(max_length=100)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> BatchList:
    """The tenant's batches, newest first."""
    rows = openai_batches.list_batches(session, principal.tenant_id, limit=limit + 1,
                                       after=after)
    data = [BatchObject.of(openai_batches.view(session, j)) for j in rows[:limit]]
    return BatchList(data=data, first_id=data[0].id if data else None,
                     last_id=data[-1].id if data else None, has_more=len(rows) > limit)


@router.get("/{batch_id}", response_model=BatchObject)
def retrieve_batch(batch_id: str, session: DbSession, principal: CurrentPrincipal
                   ) -> BatchObject:
    job = openai_batches.get_batch(session, principal.tenant_id, batch_id)
    return BatchObject.of(openai_batches.view(session, job))


@router.post("/{batch_id}/cancel", response_model=BatchObject)
def cancel_batch(batch_id: str, principal: CurrentPrincipal) -> BatchObject:
    """Cancel a batch: lines not started never run, lines running stop; the batch is
    `cancelling` until its running lines have stopped, then `cancelled`, and its output file
    holds the lines that finished (the error file, the others)."""
    def cancel() -> BatchObject:
        with transaction() as s:
            job = openai_batches.cancel_batch(s, principal.tenant_id, batch_id)
            return BatchObject.of(openai_batches.view(s, job))

    return retry_transient(cancel)
