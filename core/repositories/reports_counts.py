"""Reports: jobs and steps counted by status, and the tenants and jobs that label report rows.

The ledger's sums and percentiles are in `core.repositories.reports`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from core.models import Job, Step, Tenant


def _created(since: datetime | None, until: datetime | None) -> list[ColumnElement[bool]]:
    cond: list[ColumnElement[bool]] = []
    if since is not None:
        cond.append(Job.created_at >= since)
    if until is not None:
        cond.append(Job.created_at < until)
    return cond


def job_counts(session: Session, *, tenant_id: str | None = None,
               since: datetime | None = None, until: datetime | None = None) -> dict[str, int]:
    """Jobs by status: the tenant's if given, created in the range if given."""
    cond = _created(since, until)
    if tenant_id is not None:
        cond.insert(0, Job.tenant_id == tenant_id)
    return {str(s): int(n) for s, n in session.execute(
        select(Job.status, func.count()).where(*cond).group_by(Job.status))}


def job_counts_by_tenant(session: Session, since: datetime | None = None,
                         until: datetime | None = None) -> dict[str, dict[str, int]]:
    """Each tenant's jobs by status (tenants with none are left out), created in the range."""
    out: dict[str, dict[str, int]] = defaultdict(dict)
    for t, status, n in session.execute(select(Job.tenant_id, Job.status, func.count())
                                        .where(*_created(since, until))
                                        .group_by(Job.tenant_id, Job.status)):
        out[t][str(status)] = int(n)
    return dict(out)


def step_counts(session: Session) -> dict[str, int]:
    """Steps by status."""
    return {str(s): int(n) for s, n in session.execute(
        select(Step.status, func.count()).group_by(Step.status))}


def tenants(session: Session) -> list[Tenant]:
    """Every tenant, by name."""
    return list(session.scalars(select(Tenant).order_by(Tenant.name)))


def tenant_names(session: Session, ids: Sequence[str] | None = None) -> dict[str, str]:
    """Tenants' names by id: those of `ids`, or every tenant's."""
    q = select(Tenant.id, Tenant.name)
    if ids is not None:
        q = q.where(Tenant.id.in_(list(ids)))
    return {i: n for i, n in session.execute(q)}


def jobs_by_id(session: Session, ids: Sequence[str]) -> dict[str, Job]:
    return {j.id: j for j in session.scalars(select(Job).where(Job.id.in_(list(ids))))}
