"""Spend read from the ledger (`model_calls`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from core.repositories import reports, reports_counts
from core.repositories.reports import ReportFilter


def tenant_usage(session: Session, tenant_id: str, since: datetime | None,
                 until: datetime | None) -> dict[str, Any]:
    f = ReportFilter(since=since, until=until, tenant_id=tenant_id)
    by_model = [{"model": m, "model_calls": t.calls, "prompt_tokens": t.prompt_tokens,
                 "completion_tokens": t.completion_tokens,
                 "total_tokens": t.prompt_tokens + t.completion_tokens}
                for m, t in reports.token_counts(session, f, "model").items()]
    jobs = reports_counts.job_counts(session, tenant_id=tenant_id, since=since, until=until)
    return {
        "prompt_tokens": sum(r["prompt_tokens"] for r in by_model),
        "completion_tokens": sum(r["completion_tokens"] for r in by_model),
        "total_tokens": sum(r["total_tokens"] for r in by_model),
        "model_calls": sum(r["model_calls"] for r in by_model),
        "by_model": by_model,
        "jobs": jobs,
    }
