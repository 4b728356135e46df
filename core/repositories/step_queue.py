"""A tenant's steps in the broker: the cap on how many are queued there at once (steps beyond
it are `held` in the database and released as the count falls), a deferred job's steps, and the
broker priorities of a job's steps.

Each release takes held rows with `FOR UPDATE SKIP LOCKED` inside the update (Postgres), so
concurrent releasers never take the same rows. SQLite has one writer at a time: its releases are
serialised by the database lock, which gives the same guarantee.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import bindparam, exists, func, select, update
from sqlalchemy.orm import Session

from core.db import Prebuilt, one_of
from core.models import Step, StepStatus, steps_table, utcnow

S = steps_table.c


def undefer(session: Session, job_id: str) -> list[tuple[str, int | None]]:
    """Queue the job's steps that waited for its planned start; returns them, to publish."""
    return [(str(i), p) for i, p in session.execute(update(steps_table).where(
        S.job_id == job_id, S.status == StepStatus.DEFERRED,
    ).values(status=StepStatus.QUEUED, enqueued_at=utcnow()).returning(S.id, S.priority))]


def _queued_count(_: bool) -> Any:
    tenant = bindparam("p_tenant", type_=S.tenant_id.type)
    queued = select(func.count()).select_from(Step).where(
        S.tenant_id == tenant, S.status == StepStatus.QUEUED).scalar_subquery()
    any_held = exists().where(S.tenant_id == tenant, S.status == StepStatus.HELD)
    return select(queued, any_held)


_QUEUED_COUNT = Prebuilt(_queued_count)


def queued_count(session: Session, tenant_id: str) -> tuple[int, bool]:
    """How many of the tenant's steps are queued (in the broker), and whether any is held:
    one round trip, from the partial index."""
    row = _QUEUED_COUNT.execute(session, {"p_tenant": tenant_id}).one()
    return int(row[0] or 0), bool(row[1])


def hold(session: Session, ids: Sequence[str]) -> None:
    """Keep these queued steps in the database instead of publishing them."""
    if ids:
        session.execute(update(steps_table).where(
            one_of(session, S.id, ids), S.status == StepStatus.QUEUED,
        ).values(status=StepStatus.HELD, enqueued_at=None))


def release(session: Session, tenant_id: str, n: int) -> list[tuple[str, int | None]]:
    """Queue up to `n` of the tenant's held steps, highest priority (lowest number) and
    oldest first; returns them with their priorities, to publish. (The rows are chosen by a
    query of their own: a `LIMIT` inside the update's `IN` could be scanned again by the
    planner and release more than `n`.)"""
    if n <= 0:
        return []
    ids = list(session.scalars(
        select(S.id).where(S.tenant_id == tenant_id, S.status == StepStatus.HELD)
        .order_by(S.priority, S.created_at).limit(n).with_for_update(skip_locked=True)))
    if not ids:
        return []
    return [(str(i), p) for i, p in session.execute(update(steps_table).where(
        one_of(session, S.id, ids), S.status == StepStatus.HELD,
    ).values(status=StepStatus.QUEUED, enqueued_at=utcnow()).returning(S.id, S.priority))]


def waiting_by_tenant(session: Session) -> dict[str, tuple[int, int]]:
    """Each tenant that has held steps: its steps queued and held."""
    out: dict[str, list[int]] = {}
    for tenant, status, n in session.execute(
            select(S.tenant_id, S.status, func.count()).where(
                S.status.in_((StepStatus.QUEUED, StepStatus.HELD)), S.tenant_id.is_not(None))
            .group_by(S.tenant_id, S.status)):
        counts = out.setdefault(str(tenant), [0, 0])
        counts[0 if status == StepStatus.QUEUED else 1] += int(n)
    return {t: (q, h) for t, (q, h) in out.items() if h}


def reprioritise(session: Session, job_id: str, mapping: dict[int, int]
                 ) -> list[tuple[str, int | None, str]]:
    """Give the job's steps still to run or running new broker priorities (`{old: new}`; a
    running step is published at it should it be queued again); returns them (id, priority,
    status)."""
    out: list[tuple[str, int | None, str]] = []
    for old, new in mapping.items():
        out += [(str(i), p, str(st)) for i, p, st in session.execute(
            update(steps_table).where(
                S.job_id == job_id, S.priority == old,
                S.status.in_((StepStatus.PENDING, StepStatus.QUEUED, StepStatus.HELD,
                              StepStatus.DEFERRED, StepStatus.RUNNING)),
            ).values(priority=new).returning(S.id, S.priority, S.status))]
    return out
