"""Operator reports read from the ledger (`model_calls`) and the step table.

Every figure is computed from ledger rows, so the admin page, its JSON and its CSV agree with
what the jobs were charged. Sums are SQL aggregates; percentiles use `percentile_cont` on
Postgres and are computed from the sorted values on SQLite.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from sqlalchemy import ColumnElement, case, func, select
from sqlalchemy.orm import Session

from core.models import Job, ModelCall, Step, Tenant

GroupBy = Literal["tenant", "job", "model", "day"]
GROUPS: tuple[GroupBy, ...] = ("tenant", "job", "model", "day")


@dataclass(frozen=True)
class ReportFilter:
    """Which ledger rows a report covers: a time range (calls made at or after `since` and
    before `until`) and optionally one tenant, job or model."""

    since: datetime | None = None
    until: datetime | None = None
    tenant_id: str | None = None
    job_id: str | None = None
    model: str | None = None
    step_id: str | None = None

    def call_conditions(self) -> list[ColumnElement[bool]]:
        cond: list[ColumnElement[bool]] = []
        if self.since is not None:
            cond.append(ModelCall.created_at >= self.since)
        if self.until is not None:
            cond.append(ModelCall.created_at < self.until)
        if self.tenant_id is not None:
            cond.append(ModelCall.tenant_id == self.tenant_id)
        if self.job_id is not None:
            cond.append(ModelCall.job_id == self.job_id)
        if self.model is not None:
            cond.append(ModelCall.model == self.model)
        if self.step_id is not None:
            cond.append(ModelCall.step_id == self.step_id)
        return cond

    def step_conditions(self) -> list[ColumnElement[bool]]:
        cond: list[ColumnElement[bool]] = [Step.finished_at.is_not(None),
                                           Step.started_at.is_not(None)]
        if self.since is not None:
            cond.append(Step.finished_at >= self.since)
        if self.until is not None:
            cond.append(Step.finished_at < self.until)
        if self.tenant_id is not None:
            cond.append(Job.tenant_id == self.tenant_id)
        if self.job_id is not None:
            cond.append(Step.job_id == self.job_id)
        if self.model is not None:
            cond.append(Step.model == self.model)
        if self.step_id is not None:
            cond.append(Step.id == self.step_id)
        return cond


def day_range(since: date | None, until: date | None) -> ReportFilter:
    """Whole UTC days, `until` included."""
    from datetime import UTC

    start = datetime.combine(since, datetime.min.time(), UTC) if since else None
    end = datetime.combine(until + timedelta(days=1), datetime.min.time(), UTC) if until else None
    return ReportFilter(since=start, until=end)


def _day_expr(session: Session, column: Any) -> Any:
    if session.get_bind().dialect.name == "postgresql":
        return func.to_char(func.timezone("UTC", column), "YYYY-MM-DD")
    return func.strftime("%Y-%m-%d", column)


def _percentiles(session: Session, key: Any, value: Any, cond: Sequence[ColumnElement[bool]],
                 joins: Iterable[tuple[Any, Any]] = ()) -> dict[Any, tuple[float, float]]:
    """p50 and p95 of `value` for each `key` (None: over all rows), interpolated linearly as
    percentile_cont does."""
    keys = [] if key is None else [key]
    if session.get_bind().dialect.name == "postgresql":
        stmt = select(*keys, func.percentile_cont(0.5).within_group(value),
                      func.percentile_cont(0.95).within_group(value))
        for target, on in joins:
            stmt = stmt.join(target, on)
        stmt = stmt.where(*cond, value.is_not(None))
        if key is not None:
            stmt = stmt.group_by(key)
        out: dict[Any, tuple[float, float]] = {}
        for row in session.execute(stmt):
            k = None if key is None else row[0]
            p50, p95 = row[-2], row[-1]
            if p50 is not None:
                out[k] = (float(p50), float(p95))
        return out
    stmt = select(*keys, value)
    for target, on in joins:
        stmt = stmt.join(target, on)
    values: dict[Any, list[float]] = defaultdict(list)
    for row in session.execute(stmt.where(*cond, value.is_not(None))):
        k, v = (None, row[0]) if key is None else (row[0], row[1])
        values[k].append(float(v))
    return {k: (percentile(sorted(vs), 0.5), percentile(sorted(vs), 0.95))
            for k, vs in values.items()}


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-quantile with linear interpolation between closest ranks (percentile_cont)."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _step_seconds(session: Session) -> Any:
    if session.get_bind().dialect.name == "postgresql":
        return func.extract("epoch", Step.finished_at - Step.started_at) * 1000.0
    return (func.julianday(Step.finished_at) - func.julianday(Step.started_at)) * 86_400_000.0


def _call_key(session: Session, group: GroupBy) -> Any:
    return {"tenant": ModelCall.tenant_id, "job": ModelCall.job_id, "model": ModelCall.model,
            "day": _day_expr(session, ModelCall.created_at)}[group]


def _step_key(session: Session, group: GroupBy) -> Any:
    return {"tenant": Job.tenant_id, "job": Step.job_id, "model": Step.model,
            "day": _day_expr(session, Step.finished_at)}[group]


def _ratio(num: float, den: float, scale: float = 1.0) -> float | None:
    return num / den * scale if den else None


def _figures(calls: int, prompt: int, cached: int, cached_known: int, completion: int,
             cost: Decimal, energy_wh: float, energy_calls: int, latency_ms_sum: float,
             truncations: int, escalations: int, call_cache_hits: int) -> dict[str, Any]:
    total = prompt + completion
    return {
        "model_calls": calls,
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "completion_tokens": completion,
        "total_tokens": total,
        "cost_usd": float(cost),
        "usd_per_million_tokens": _ratio(float(cost), total, 1e6),
        "energy_wh": energy_wh if energy_calls else None,
        "calls_with_energy": energy_calls,
        "kwh_per_million_tokens": _ratio(energy_wh / 1000.0, total, 1e6) if energy_calls
        else None,
        # Output tokens per second of model-call time: how fast calls generate.
        "output_tokens_per_s": _ratio(completion, latency_ms_sum / 1000.0),
        # Prompt tokens served from the prefix cache, over prompt tokens of the calls whose
        # server reported it.
        "prefix_cache_hit_rate": _ratio(cached, cached_known),
        "budget_truncations": truncations,
        "escalations": escalations,
        # Calls answered from the job's call cache (an identical earlier call): no cost.
        "call_cache_hits": call_cache_hits,
    }


def _aggregates(key: Any) -> Any:
    cached_known = case((ModelCall.cached_tokens.is_not(None), ModelCall.prompt_tokens), else_=0)
    keys = [] if key is None else [key]
    return select(
        *keys,
        func.count(),
        func.coalesce(func.sum(ModelCall.prompt_tokens), 0),
        func.coalesce(func.sum(ModelCall.cached_tokens), 0),
        func.coalesce(func.sum(cached_known), 0),
        func.coalesce(func.sum(ModelCall.completion_tokens), 0),
        func.coalesce(func.sum(ModelCall.cost_usd), 0),
        func.coalesce(func.sum(ModelCall.energy_wh), 0.0),
        func.count(ModelCall.energy_wh),
        func.coalesce(func.sum(ModelCall.latency_ms), 0.0),
        func.coalesce(func.sum(case((ModelCall.finish_reason == "length", 1), else_=0)), 0),
        func.coalesce(func.sum(case((ModelCall.escalated_from.is_not(None), 1), else_=0)), 0),
        func.count(ModelCall.cached_from),
    )


def _row_figures(row: Sequence[Any]) -> dict[str, Any]:
    (calls, prompt, cached, cached_known, completion, cost, energy, energy_calls, latency,
     truncations, escalations, call_cache_hits) = row
    return _figures(int(calls), int(prompt), int(cached), int(cached_known), int(completion),
                    Decimal(cost), float(energy), int(energy_calls), float(latency),
                    int(truncations), int(escalations), int(call_cache_hits))


def _latency_fields(call_lat: tuple[float, float] | None, ttft: tuple[float, float] | None,
                    step_lat: tuple[float, float] | None) -> dict[str, float | None]:
    return {
        "call_latency_ms_p50": call_lat[0] if call_lat else None,
        "call_latency_ms_p95": call_lat[1] if call_lat else None,
        "ttft_ms_p50": ttft[0] if ttft else None,
        "ttft_ms_p95": ttft[1] if ttft else None,
        "step_latency_ms_p50": step_lat[0] if step_lat else None,
        "step_latency_ms_p95": step_lat[1] if step_lat else None,
    }


EMPTY_FIGURES: tuple[int, ...] = (0,) * 12


def totals(session: Session, f: ReportFilter) -> dict[str, Any]:
    """One row of figures over everything the filter covers."""
    cond = f.call_conditions()
    row = session.execute(_aggregates(None).where(*cond)).one()
    call_lat = _percentiles(session, None, ModelCall.latency_ms, cond)
    ttft = _percentiles(session, None, ModelCall.ttft_ms, cond)
    step_lat = _percentiles(session, None, _step_seconds(session), f.step_conditions(),
                            joins=[(Job, Job.id == Step.job_id)])
    return {**_row_figures(tuple(row)),
            **_latency_fields(call_lat.get(None), ttft.get(None), step_lat.get(None))}


def grouped(session: Session, f: ReportFilter, group: GroupBy = "tenant", *,
            limit: int | None = None) -> list[dict[str, Any]]:
    """Figures per tenant, job, model or day, largest spend first (days in date order)."""
    call_key, step_key = _call_key(session, group), _step_key(session, group)
    cond = f.call_conditions()
    rows = list(session.execute(_aggregates(call_key).where(*cond).group_by(call_key)))
    call_lat = _percentiles(session, call_key, ModelCall.latency_ms, cond)
    ttft = _percentiles(session, call_key, ModelCall.ttft_ms, cond)
    step_lat = _percentiles(session, step_key, _step_seconds(session), f.step_conditions(),
                            joins=[(Job, Job.id == Step.job_id)])
    out = []
    for row in rows:
        k = row[0]
        out.append({"key": k, **_row_figures(tuple(row[1:])),
                    **_latency_fields(call_lat.get(k), ttft.get(k), step_lat.get(k))})
    if group == "day":
        out.sort(key=lambda r: str(r["key"]))
    else:
        out.sort(key=lambda r: (-r["cost_usd"], -r["total_tokens"], str(r["key"])))
    if limit is not None:
        out = out[:limit]
    _label(session, group, out)
    return out


def _label(session: Session, group: GroupBy, rows: list[dict[str, Any]]) -> None:
    """Add names and context to keyed rows (tenant names; job kind, status and tenant)."""
    keys = [r["key"] for r in rows]
    if group == "tenant" and keys:
        names = {i: n for i, n in session.execute(
            select(Tenant.id, Tenant.name).where(Tenant.id.in_(keys)))}
        for r in rows:
            r["tenant_id"], r["tenant"] = r["key"], names.get(r["key"], r["key"])
    elif group == "job" and keys:
        info = {j.id: j for j in session.scalars(select(Job).where(Job.id.in_(keys)))}
        names = {i: n for i, n in session.execute(select(Tenant.id, Tenant.name))}
        for r in rows:
            job = info.get(r["key"])
            r["job_id"] = r["key"]
            if job is not None:
                r.update(kind=job.kind, status=job.status, tenant_id=job.tenant_id,
                         tenant=names.get(job.tenant_id, job.tenant_id),
                         created_at=job.created_at.isoformat())
    elif group == "model":
        for r in rows:
            r["model"] = r["key"]
    elif group == "day":
        for r in rows:
            r["day"] = r["key"]


def tenants_overview(session: Session, f: ReportFilter) -> list[dict[str, Any]]:
    """Every tenant (also those with no spend in range) with figures and jobs by status."""
    spend = {r["key"]: r for r in grouped(session, f, "tenant")}
    jobs: dict[str, dict[str, int]] = defaultdict(dict)
    job_cond = []
    if f.since is not None:
        job_cond.append(Job.created_at >= f.since)
    if f.until is not None:
        job_cond.append(Job.created_at < f.until)
    for t, status, n in session.execute(select(Job.tenant_id, Job.status, func.count())
                                        .where(*job_cond).group_by(Job.tenant_id, Job.status)):
        jobs[t][status] = int(n)
    empty = {**_row_figures(EMPTY_FIGURES), **_latency_fields(None, None, None)}
    out = []
    for tenant in session.scalars(select(Tenant).order_by(Tenant.name)):
        row = dict(spend.get(tenant.id) or {**empty})
        row.update(key=tenant.id, tenant_id=tenant.id, tenant=tenant.name,
                   jobs=jobs.get(tenant.id, {}))
        out.append(row)
    out.sort(key=lambda r: (-r["cost_usd"], -r["total_tokens"], r["tenant"]))
    return out


def job_steps(session: Session, job_id: str) -> list[dict[str, Any]]:
    """The job's steps in creation order, each with the figures of its ledger rows."""
    steps = list(session.scalars(select(Step).where(Step.job_id == job_id)
                                 .order_by(Step.created_at, Step.key)))
    by_step = {row[0]: _row_figures(row[1:]) for row in session.execute(
        _aggregates(ModelCall.step_id).where(ModelCall.job_id == job_id)
        .group_by(ModelCall.step_id))}
    empty = _row_figures(EMPTY_FIGURES)
    out = []
    for st in steps:
        seconds = ((st.finished_at - st.started_at).total_seconds()
                   if st.finished_at and st.started_at else None)
        out.append({"step_id": st.id, "key": st.key, "role": st.role, "status": st.status,
                    "attempt": st.attempt, "max_tokens": st.max_tokens, "model": st.model,
                    "step_latency_ms": seconds * 1000 if seconds is not None else None,
                    **by_step.get(st.id, empty)})
    return out


CALL_COLUMNS = ("request_id", "created_at", "tenant_id", "job_id", "step_id", "role", "model",
                "endpoint", "prompt_tokens", "cached_tokens", "completion_tokens",
                "total_tokens", "max_tokens", "finish_reason", "latency_ms", "ttft_ms",
                "attempts", "cache_hit", "escalated_from", "cached_from", "cost_usd",
                "energy_wh", "energy_method")


def calls(session: Session, f: ReportFilter, limit: int = 1000) -> list[dict[str, Any]]:
    """Ledger rows, oldest first."""
    cond = f.call_conditions()
    out = []
    for c in session.scalars(select(ModelCall).where(*cond)
                             .order_by(ModelCall.created_at, ModelCall.request_id).limit(limit)):
        out.append({
            "request_id": c.request_id, "created_at": c.created_at.isoformat(),
            "tenant_id": c.tenant_id, "job_id": c.job_id, "step_id": c.step_id, "role": c.role,
            "model": c.model, "endpoint": c.endpoint, "prompt_tokens": c.prompt_tokens,
            "cached_tokens": c.cached_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens, "max_tokens": c.max_tokens,
            "finish_reason": c.finish_reason, "latency_ms": c.latency_ms, "ttft_ms": c.ttft_ms,
            "attempts": c.attempts, "cache_hit": c.cache_hit, "escalated_from": c.escalated_from,
            "cached_from": c.cached_from,
            "cost_usd": float(c.cost_usd) if c.cost_usd is not None else None,
            "energy_wh": c.energy_wh, "energy_method": c.energy_method,
        })
    return out


def energy_methods(session: Session, f: ReportFilter) -> dict[str, int]:
    """How many calls had their energy known by each method ("unknown" for none)."""
    method = func.coalesce(ModelCall.energy_method, "unknown")
    return {str(m): int(n) for m, n in session.execute(
        select(method, func.count()).where(*f.call_conditions()).group_by(method))}
