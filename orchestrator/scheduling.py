"""Scheduling: service tiers and each tenant's cap on steps in the broker.

A job's tier (`interactive`, `standard`, `flex`) sets the broker priority of its steps
(`core.queue.step_priority`: strict across tiers), its calls' order at admission
(`inference.admission`) and its price (`AGENTQ_TIER_DISCOUNTS`). A tenant may be limited to
some tiers (`AGENTQ_TENANT_TIERS`).

No tenant can flood the broker: at most `AGENTQ_TENANT_QUEUED_STEPS_MAX` of a tenant's steps
are queued there at once. Steps that become runnable beyond it are `held` in the database; the
transaction that completes one of the tenant's steps queues as many held ones as there is room
for (highest tier, then oldest, first), and the sweeper does the same for every tenant, taking
its rows with `FOR UPDATE SKIP LOCKED` so that workers never queue the same steps twice. Each
dispatch costs two statements: the tenant's count (from a partial index of waiting steps) and
one update that holds the excess or releases held steps. The count is read without a lock, so
concurrent transactions of one tenant may overshoot the cap by the number of them: it bounds
the broker's share of a tenant, not an exact count.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from decimal import Decimal

from sqlalchemy.orm import Session

from core.db import transaction
from core.errors import Forbidden
from core.models import ServiceTier
from core.queue import step_priority
from core.repositories import outbox, steps
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


def priority(tier: str, continuing: bool) -> int:
    return step_priority(ServiceTier(tier).value, continuing)


def dispatch(session: Session, tenant_id: str, ids: Sequence[str], prio: int) -> None:
    """Publish steps just queued (by this transaction) within the tenant's cap: those beyond it
    are held; when there is room to spare, held steps are queued to fill it."""
    cap = get_settings().tenant_queued_steps_max
    if not cap:
        outbox.enqueue_many(session, RUN_STEP_TASK, [{"step_id": i} for i in ids], prio)
        return
    room = cap - steps.queued_count(session, tenant_id)
    publish = list(ids)
    if room < 0:
        keep_back = min(-room, len(publish))
        steps.hold(session, publish[len(publish) - keep_back:])
        publish = publish[:len(publish) - keep_back]
    outbox.enqueue_many(session, RUN_STEP_TASK, [{"step_id": i} for i in publish], prio)
    if room > 0:
        enqueue(session, steps.release(session, tenant_id, room))


def enqueue(session: Session, found: Sequence[tuple[str, int | None]]) -> None:
    """Publish steps at their own priorities."""
    by_priority: dict[int, list[str]] = {}
    for step_id, prio in found:
        by_priority.setdefault(prio if prio is not None else outbox.CONTINUE,
                               []).append(step_id)
    for prio, ids in sorted(by_priority.items()):
        outbox.enqueue_many(session, RUN_STEP_TASK, [{"step_id": i} for i in ids], prio)


def release_held() -> int:
    """The sweeper's pass: queue held steps of every tenant with room under its cap (steps
    whose completion could not release them: failures, stopped jobs, a lower cap)."""
    cap = get_settings().tenant_queued_steps_max
    released = 0
    with transaction() as s:
        waiting = steps.waiting_by_tenant(s)
    for tenant_id, (queued, _held) in waiting.items():
        room = cap - queued if cap else _held
        if room <= 0:
            continue
        with transaction() as s:
            found = steps.release(s, tenant_id, room)
            enqueue(s, found)
        released += len(found)
    if released:
        log.info("released %d held step(s)", released)
    return released
