"""Spend read from the ledger (`model_calls`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.models import Job, ModelCall


def tenant_usage(session: Session, tenant_id: str, since: datetime | None,
                 until: datetime | None) -> dict[str, Any]:
    cond = [ModelCall.tenant_id == tenant_id]
    if since is not None:
        cond.append(ModelCall.created_at >= since)
    if until is not None:
        cond.append(ModelCall.created_at < until)
    rows = session.execute(
        select(ModelCall.model, func.count(), func.coalesce(func.sum(ModelCall.prompt_tokens), 0),
               func.coalesce(func.sum(ModelCall.completion_tokens), 0))
        .where(*cond).group_by(ModelCall.model).order_by(ModelCall.model)).all()
    by_model = [{"model": m, "model_calls": int(n), "prompt_tokens": int(p),
                 "completion_tokens": int(c), "total_tokens": int(p) + int(c)}
                for m, n, p, c in rows]
    job_cond = [Job.tenant_id == tenant_id]
    if since is not None:
        job_cond.append(Job.created_at >= since)
    if until is not None:
        job_cond.append(Job.created_at < until)
    jobs = {s: int(n) for s, n in session.execute(
        select(Job.status, func.count()).where(*job_cond).group_by(Job.status))}
    return {
        "prompt_tokens": sum(r["prompt_tokens"] for r in by_model),
        "completion_tokens": sum(r["completion_tokens"] for r in by_model),
        "total_tokens": sum(r["total_tokens"] for r in by_model),
        "model_calls": sum(r["model_calls"] for r in by_model),
        "by_model": by_model,
        "jobs": jobs,
    }


def tenants_usage(session: Session, since: datetime | None, until: datetime | None
                  ) -> list[dict[str, Any]]:
    """Every tenant with its spend from the ledger and its jobs by status (for operators)."""
    from core.models import Tenant

    cond = []
    if since is not None:
        cond.append(ModelCall.created_at >= since)
    if until is not None:
        cond.append(ModelCall.created_at < until)
    spend = {t: (int(n), int(p), int(c)) for t, n, p, c in session.execute(
        select(ModelCall.tenant_id, func.count(),
               func.coalesce(func.sum(ModelCall.prompt_tokens), 0),
               func.coalesce(func.sum(ModelCall.completion_tokens), 0))
        .where(*cond).group_by(ModelCall.tenant_id))}
    jobs: dict[str, dict[str, int]] = {}
    for t, status, n in session.execute(select(Job.tenant_id, Job.status, func.count())
                                        .group_by(Job.tenant_id, Job.status)):
        jobs.setdefault(t, {})[status] = int(n)
    out = []
    for tenant in session.scalars(select(Tenant).order_by(Tenant.name)):
        n, p, c = spend.get(tenant.id, (0, 0, 0))
        out.append({"id": tenant.id, "name": tenant.name, "model_calls": n,
                    "prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
                    "jobs": jobs.get(tenant.id, {})})
    return out
