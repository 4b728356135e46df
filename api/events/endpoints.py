"""A job's event log: paged (`/events`) and streamed as Server-Sent Events (`/events/stream`)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Header, Query
from fastapi.concurrency import run_in_threadpool
from sse_starlette.sse import EventSourceResponse

from api.deps import CurrentPrincipal, DbSession
from api.events import streams
from api.events.hub import hub
from api.events.schemas import EventList, EventOut
from api.params import MAX_DB_INT
from api.responses import ERRORS, link
from core.db import read_session_factory
from core.db_errors import retry_transient
from core.errors import InvalidInput, TooManyRequests
from core.models import JobStatus
from core.repositories import events as event_service
from core.settings import get_settings
from orchestrator import jobs as job_service

router = APIRouter(prefix="/v1/jobs", tags=["events"], responses=ERRORS)

PAGE_MAX = 500
CONTINUED = "job.continued"


def _out(e: Any) -> EventOut:
    return EventOut(cursor=e.seq, type=e.type, data=dict(e.data or {}), created_at=e.created_at)


@router.get("/{job_id}/events", response_model=EventList, responses={200: {"links": {
    "NextPage": link("/v1/jobs/{job_id}/events", "get", "The events that follow",
                     job_id="$request.path.job_id", after="$response.body#/next_cursor")}}})
def list_events(
    job_id: str,
    session: DbSession,
    principal: CurrentPrincipal,
    after: Annotated[int, Query(ge=0, le=MAX_DB_INT,
                                description="Return events after this cursor.")] = 0,
    limit: Annotated[int, Query(ge=1, le=PAGE_MAX)] = 100,
) -> EventList:
    """The job's events in order, after a cursor."""
    job = job_service.get_job(session, principal.tenant_id, job_id)
    rows = event_service.list_events(session, job.id, after, limit + 1)
    page = [_out(e) for e in rows[:limit]]
    return EventList(data=page, next_cursor=page[-1].cursor if page else after,
                     has_more=len(rows) > limit)


def event_cursor(header: str) -> int:
    """The cursor a `Last-Event-ID` header names."""
    value = header.strip()
    if not value.isascii() or not value.isdigit() or int(value) > MAX_DB_INT:
        raise InvalidInput("Last-Event-ID: must be an event cursor (a whole number from 0 to "
                           f"{MAX_DB_INT})")
    return int(value)


def _load(job_id: str, after: int) -> list[EventOut]:
    def load() -> list[EventOut]:
        with read_session_factory()() as session:
            return [_out(e) for e in event_service.list_events(session, job_id, after,
                                                               PAGE_MAX)]

    return retry_transient(load)


async def _stream(job_id: str, after: int, slot: streams.Slot,
                  ended: bool) -> AsyncIterator[dict[str, Any]]:
    """The events after `after`, until the job's terminal event; a terminal event that a
    continuation (`job.continued`) follows does not end the stream. `ended`: the job had
    ended when the stream was asked for (a stream with nothing after it closes at once)."""
    settings = get_settings()
    woken = hub.watch(job_id)
    started = time.monotonic()
    renewed = started
    try:
        while True:
            woken.clear()
            batch = await run_in_threadpool(_load, job_id, after)
            for event in batch:
                after = event.cursor
                # The same JSON as the event log's page (`GET .../events`).
                yield {"id": str(event.cursor), "event": event.type,
                       "data": event.model_dump_json()}
                if event.type in event_service.TERMINAL_EVENTS:
                    ended = True
                elif event.type == CONTINUED:
                    ended = False
            if len(batch) == PAGE_MAX:
                continue
            if ended:
                return
            now = time.monotonic()
            left = settings.sse_max_stream_s - (now - started)
            if left <= 0:
                return  # long enough: the client resumes with Last-Event-ID
            if now - renewed >= streams.RENEW_EVERY_S:
                await run_in_threadpool(slot.renew)
                renewed = now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woken.wait(), timeout=min(
                    settings.sse_poll_fallback_s, streams.RENEW_EVERY_S, left))
    finally:
        hub.unwatch(job_id, woken)
        with anyio.CancelScope(shield=True):  # also when the client went away (cancelled)
            await run_in_threadpool(slot.release)


@router.get("/{job_id}/events/stream", response_class=EventSourceResponse, responses={200: {
    "content": {"text/event-stream": {}},
    "description": "Server-Sent Events: each event's `id` is its cursor; heartbeats are "
                   "comment lines; the stream ends after the job's terminal event (one "
                   "that `job.continued` follows does not end it), or after "
                   "AGENTQ_SSE_MAX_STREAM_S (reconnect with Last-Event-ID)."}})
def stream_events(
    job_id: str,
    session: DbSession,
    principal: CurrentPrincipal,
    after: Annotated[int, Query(ge=0, le=MAX_DB_INT,
                                description="Start after this cursor.")] = 0,
    last_event_id: Annotated[str | None, Header(max_length=20)] = None,
) -> EventSourceResponse:
    """Stream the job's events. Reconnect with `Last-Event-ID` (or `after`) to get exactly the
    events after the last one you saw. A key may hold AGENTQ_SSE_MAX_STREAMS_PER_KEY streams
    open at once (beyond that, 429); a stream is closed after AGENTQ_SSE_MAX_STREAM_S."""
    job = job_service.get_job(session, principal.tenant_id, job_id)
    if last_event_id is not None:
        after = event_cursor(last_event_id)
    ended = JobStatus(job.status).terminal
    slot = streams.acquire(principal.key_id)
    if slot is None:
        limit = get_settings().sse_max_streams_per_key
        raise TooManyRequests(f"this API key already has {limit} event streams open (the "
                              "most it may); close one, or poll /events instead",
                              retry_after=int(streams.RENEW_EVERY_S), code="too_many_streams")
    return EventSourceResponse(_stream(job.id, after, slot, ended),
                               ping=get_settings().sse_heartbeat_s,
                               headers={"Cache-Control": "no-cache",
                                        "X-Accel-Buffering": "no"})
