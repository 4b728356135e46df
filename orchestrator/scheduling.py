"""Scheduling: service tiers, each tenant's cap on steps in the broker, flex jobs' deadlines
(promotion) and their windows (cheap or clean hours).

A job's tier (`interactive`, `standard`, `flex`) sets the broker priority of its steps
(`core.queue.step_priority`: strict across tiers), its calls' order at admission
(`inference.admission`) and its price (`AGENTQ_TIER_DISCOUNTS`). A tenant may be limited to
some tiers (`AGENTQ_TENANT_TIERS`).

No tenant can flood the broker: at most `AGENTQ_TENANT_QUEUED_STEPS_MAX` of a tenant's steps
are queued there at once. Steps that become runnable beyond it are `held` in the database; the
transaction that completes one of the tenant's steps queues as many held ones as there is room
for (highest tier, then oldest, first), and the sweeper does the same for every tenant, taking
its rows with `FOR UPDATE SKIP LOCKED` so that workers never queue the same steps twice. A
dispatch costs one statement when the tenant has nothing held: the tenant's count and whether
any step is held (from a partial index of waiting steps); more only to hold the excess or to
release held steps. The count is read without a lock, so
concurrent transactions of one tenant may overshoot the cap by the number of them: it bounds
the broker's share of a tenant, not an exact count.

A step run again is queued at once, outside the cap: one handed back by its run
(`runner._hand_back`, `dag._requeue`, a stopped run whose job was continued) or whose lease
ran out (`sweeps.requeue_expired`). Each held a worker slot, so such steps of a tenant are
bounded by its runs in flight, not by its backlog; holding them would only delay work already
started.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from decimal import Decimal

from sqlalchemy.orm import Session

from core import grid
from core.db import transaction
from core.errors import Forbidden
from core.models import ServiceTier, StepStatus, utcnow
from core.queue import step_priority
from core.repositories import events, jobs, outbox, step_queue
from core.settings import get_settings

log = logging.getLogger(__name__)

RUN_STEP_TASK = "steps.run"


class TierNotAllowed(Forbidden):
    code = "tier_not_allowed"


def check_tier(tenant_name: str, tier: ServiceTier) -> None:
    """Refuse a tier the operator has not allowed this tenant (403, saying which it may use)."""
    allowed = get_settings().tenant_tiers.get(tenant_name)
    if allowed is not None and tier.value not in allowed:
        raise TierNotAllowed(
            f"service_tier: this tenant may not use the {tier.value!r} tier; it may use "
            f"{', '.join(repr(t) for t in allowed) or 'none'}")


def discount(tier: str | None) -> Decimal:
    """The fraction taken off the catalogue's price for calls of this tier."""
    return Decimal(str(get_settings().tier_discounts.get(tier or "", 0.0)))


def priced(cost: Decimal, tier: str | None) -> Decimal:
    """A call's cost after its tier's discount."""
    off = discount(tier)
    return cost if not off else cost * (Decimal(1) - off)


PROMOTED = "promoted"


def scheduled_tier(tier: str, promoted: bool) -> str:
    """The tier that orders a job's work: a flex job promoted to meet its deadline is
    scheduled as `promoted` (at the queue after interactive work and before standard; at
    admission as standard) and still priced as flex."""
    return PROMOTED if promoted and tier == ServiceTier.FLEX else tier


def priority(tier: str, continuing: bool) -> int:
    return step_priority(tier if tier == PROMOTED else ServiceTier(tier).value, continuing)


def dispatch(session: Session, tenant_id: str, ids: Sequence[str], prio: int) -> None:
    """Publish steps just queued (by this transaction) within the tenant's cap: those beyond it
    are held; when there is room to spare, held steps are queued to fill it."""
    cap = get_settings().tenant_queued_steps_max
    if not cap:
        outbox.enqueue_many(session, RUN_STEP_TASK, [{"step_id": i} for i in ids], prio)
        return
    queued, any_held = step_queue.queued_count(session, tenant_id)
    room = cap - queued
    publish = list(ids)
    if room < 0:
        keep_back = min(-room, len(publish))
        step_queue.hold(session, publish[len(publish) - keep_back:])
        publish = publish[:len(publish) - keep_back]
    outbox.enqueue_many(session, RUN_STEP_TASK, [{"step_id": i} for i in publish], prio)
    if room > 0 and any_held:
        enqueue(session, step_queue.release(session, tenant_id, room))


def enqueue(session: Session, found: Sequence[tuple[str, int | None]]) -> None:
    """Publish steps at their own priorities."""
    by_priority: dict[int, list[str]] = {}
    for step_id, prio in found:
        by_priority.setdefault(prio if prio is not None else outbox.CONTINUE,
                               []).append(step_id)
    for prio, ids in sorted(by_priority.items()):
        outbox.enqueue_many(session, RUN_STEP_TASK, [{"step_id": i} for i in ids], prio)


def estimate_s(session: Session, kind: str, left: float = 1.0,
               now: datetime | None = None) -> float:
    """A job's estimated seconds to finish: the mean run time of its kind's jobs completed in
    the last day (`AGENTQ_DEADLINE_DEFAULT_ESTIMATE_S` when none), times the share of its
    steps still to run."""
    rates = jobs.mean_run_s(session, (now or utcnow()) - timedelta(days=1))
    return rates.get(kind, get_settings().deadline_default_estimate_s) * max(left, 0.05)


def lead_s(estimate: float) -> float:
    """How long before its deadline a flex job estimated to take `estimate` seconds must be
    promoted (or started): `AGENTQ_DEADLINE_SAFETY` times the estimate, plus the sweeper's
    interval, since its passes are that far apart (a job just short of the margin at one
    pass would otherwise be promoted up to an interval late, or only past its deadline)."""
    settings = get_settings()
    return settings.deadline_safety * estimate + settings.outbox_sweep_interval_s


def plan_start(session: Session, kind: str, due_at: datetime, optimize: grid.Optimize,
               now: datetime | None = None) -> datetime | None:
    """When a flex job with `optimize` should start: the cheapest (or cleanest) hour of the
    grid's schedule that still leaves its lead (`lead_s`) before its deadline. None: start
    now (no better hour, or no schedule)."""
    hours = grid.schedule()
    if hours is None:
        return None
    now = now or utcnow()
    latest = due_at - timedelta(seconds=lead_s(estimate_s(session, kind, now=now)))
    start = grid.best_start(hours, now, latest, optimize)
    return start if start > now else None


def start_deferred(now: datetime | None = None, limit: int = 200) -> int:
    """The sweeper's pass over jobs waiting for their planned start: those whose start has
    come have their first steps queued (within the tenant's cap). `now` may be injected."""
    started = 0
    with transaction() as s:
        for job_id, tenant_id, tier, promoted in jobs.due_to_start(s, now or utcnow(), limit):
            found = step_queue.undefer(s, job_id)
            if found:
                dispatch(s, tenant_id, [i for i, _ in found],
                         priority(scheduled_tier(tier, promoted), False))
                started += 1
    if started:
        log.info("started %d job(s) in their planned window", started)
    return started


def promote_due(now: datetime | None = None, limit: int = 200) -> int:
    """The sweeper's pass over flex jobs with a deadline: each whose time left is under its
    lead (`lead_s`: `AGENTQ_DEADLINE_SAFETY` times its estimated time to finish, plus the
    sweeper's interval) is promoted: its steps still to run move to the promoted priority,
    after interactive work and before standard (queued ones are published again at it; the
    earlier message finds the step taken), and its calls are admitted as standard. Estimated
    from the measured mean run time of its kind's completed jobs (the last day), scaled by
    the share of its steps still to run. A job already within its lead when submitted is
    promoted then (`orchestrator.jobs.create_job`). `now` may be injected (tests)."""
    settings = get_settings()
    now = now or utcnow()
    promoted = 0
    with transaction() as s:
        due = jobs.flex_with_deadlines(s, limit)
        if not due:
            return 0
        rates = jobs.mean_run_s(s, now - timedelta(days=1))
        for job_id, kind, due_at, done, total, _created, tenant_id in due:
            left = 1.0 - done / total if total else 1.0
            estimate = rates.get(kind, settings.deadline_default_estimate_s) * max(left, 0.05)
            if (due_at - now).total_seconds() > lead_s(estimate):
                continue
            if not jobs.promote(s, job_id):
                continue
            found = step_queue.reprioritise(s, job_id, {
                priority("flex", c): priority(PROMOTED, c) for c in (False, True)})
            enqueue(s, [(i, p) for i, p, status in found if status == StepStatus.QUEUED])
            # A job still waiting for a cheaper hour starts now, within the tenant's cap.
            started = step_queue.undefer(s, job_id)
            if started:
                dispatch(s, tenant_id, [i for i, _ in started], priority(PROMOTED, False))
            events.append(s, job_id, "job.promoted", {
                "deadline": due_at.isoformat(), "estimate_s": round(estimate, 1)})
            promoted += 1
    if promoted:
        log.info("promoted %d flex job(s) to meet their deadlines", promoted)
    return promoted


def release_held() -> int:
    """The sweeper's pass: queue held steps of every tenant with room under its cap (steps
    whose completion could not release them: failures, stopped jobs, a lower cap)."""
    cap = get_settings().tenant_queued_steps_max
    released = 0
    with transaction() as s:
        waiting = step_queue.waiting_by_tenant(s)
    for tenant_id, (queued, _held) in waiting.items():
        room = cap - queued if cap else _held
        if room <= 0:
            continue
        with transaction() as s:
            found = step_queue.release(s, tenant_id, room)
            enqueue(s, found)
        released += len(found)
    if released:
        log.info("released %d held step(s)", released)
    return released
