"""Sweeps: what the workers' sweeper thread does every few seconds to recover from crashes and
lost messages. Each takes its rows with `SKIP LOCKED`, so several workers share the work
instead of repeating it."""

from __future__ import annotations

import logging

from core.db import transaction
from core.models import JobStatus, utcnow
from core.repositories import jobs, ledger, outbox, steps
from core.settings import get_settings
from inference.pool import get_pool
from orchestrator import dag, scheduling

log = logging.getLogger(__name__)


def requeue_expired(limit: int = 200) -> int:
    """Queue again the steps whose run vanished (worker killed, finalisation lost): a step
    still `running` after its lease expired. Its finished model calls are replayed from the
    ledger, not made again. Outside the tenant's cap: it held a worker slot (see
    `orchestrator.scheduling`)."""
    with transaction() as s:
        ids = steps.requeue_expired(s, limit)
        scheduling.enqueue(s, ids)
    if ids:
        log.warning("re-queued %d step(s) whose lease had expired", len(ids))
    return len(ids)


def republish_stale_queued(limit: int = 200) -> int:
    """Publish again the steps queued long ago and never claimed (their message was lost)."""
    with transaction() as s:
        ids = steps.take_stale_queued(s, get_settings().step_requeue_after_s, limit)
        scheduling.enqueue(s, ids)
    if ids:
        log.warning("published %d long-queued step(s) again", len(ids))
    return len(ids)


def release_expired_reservations(limit: int = 500) -> int:
    """Release the reservations of calls whose run died (past their expiry)."""
    with transaction() as s:
        n = ledger.release_expired(s, limit)
    if n:
        log.warning("released %d expired reservation(s)", n)
    return n


def expire_deadlines(limit: int = 200) -> int:
    """End the active jobs that ran past their `max_seconds`."""
    ended = 0
    with transaction() as s:
        for job_id in jobs.past_deadline(s, utcnow(), limit):
            job = jobs.get(s, job_id, lock=True)
            if job is None or JobStatus(job.status).terminal:
                continue
            dag.finish(s, job_id, JobStatus.FAILED, error=(
                "deadline_exceeded",
                f"the job ran past its budget of {job.budget.get('max_seconds')} seconds"))
            ended += 1
    return ended


def all_sweeps() -> None:
    settings = get_settings()
    requeue_expired()
    republish_stale_queued()
    scheduling.release_held()
    scheduling.promote_due()
    scheduling.start_deferred()
    release_expired_reservations()
    expire_deadlines()
    outbox.sweep(settings.outbox_sweep_after_s)
    outbox.purge_sent(3600.0)
    get_pool().prune_admission()
