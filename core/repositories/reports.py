"""Reports: aggregate reads over the ledger (`model_calls`) and the step table, for operators.

Sums are SQL aggregates; percentiles use `percentile_cont` on Postgres and are computed from
the sorted values on SQLite. Counts of jobs and steps by status, and the listings that label
report rows (tenants, jobs), are in `core.repositories.reports_counts`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from sqlalchemy import ColumnElement, case, func, select
from sqlalchemy.orm import Session

from core.db import is_postgres
from core.models import Job, ModelCall, Step

GroupBy = Literal["tenant", "job", "model", "day"]
GROUPS: tuple[GroupBy, ...] = ("tenant", "job", "model", "day")
# What a percentile is taken of: a model call's latency or time to first token, a step's
# duration (from its start to its finish).
Measure = Literal["call_latency_ms", "ttft_ms", "step_latency_ms"]


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
    start = datetime.combine(since, datetime.min.time(), UTC) if since else None
    end = datetime.combine(until + timedelta(days=1), datetime.min.time(), UTC) if until else None
    return ReportFilter(since=start, until=end)


@dataclass(frozen=True)
class Sums:
    """The ledger's sums over a set of model calls."""

    calls: int
    prompt_tokens: int
    cached_tokens: int
    # Prompt tokens of the calls whose server reported its cached tokens.
    cached_known_tokens: int
    completion_tokens: int
    cost_usd: Decimal
    energy_wh: float
    calls_with_energy: int
    latency_ms: float
    truncations: int  # calls cut at their token limit
    escalations: int
    call_cache_hits: int
    # Grams of CO2 of the calls with both energy and the grid's carbon intensity recorded
    # (energy × the intensity of the hour and endpoint the call ran at), and their count.
    carbon_g: float
    calls_with_carbon: int

    @staticmethod
    def of(row: Sequence[Any]) -> Sums:
        (calls, prompt, cached, cached_known, completion, cost, energy, energy_calls, latency,
         truncations, escalations, call_cache_hits, carbon_g, carbon_calls) = row
        return Sums(int(calls), int(prompt), int(cached), int(cached_known), int(completion),
                    Decimal(cost), float(energy), int(energy_calls), float(latency),
                    int(truncations), int(escalations), int(call_cache_hits),
                    float(carbon_g), int(carbon_calls))


NO_SUMS = Sums.of((0,) * 14)


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
        func.coalesce(func.sum(ModelCall.energy_wh * ModelCall.carbon_intensity / 1000.0), 0.0),
        func.count(ModelCall.energy_wh * ModelCall.carbon_intensity),
    )


def _day_expr(session: Session, column: Any) -> Any:
    if is_postgres(session):
        return func.to_char(func.timezone("UTC", column), "YYYY-MM-DD")
    return func.strftime("%Y-%m-%d", column)


def _call_key(session: Session, group: GroupBy) -> Any:
    return {"tenant": ModelCall.tenant_id, "job": ModelCall.job_id, "model": ModelCall.model,
            "day": _day_expr(session, ModelCall.created_at)}[group]


def _step_key(session: Session, group: GroupBy) -> Any:
    return {"tenant": Job.tenant_id, "job": Step.job_id, "model": Step.model,
            "day": _day_expr(session, Step.finished_at)}[group]


def sums(session: Session, f: ReportFilter) -> Sums:
    """The sums over every call the filter covers."""
    return Sums.of(tuple(session.execute(_aggregates(None).where(*f.call_conditions())).one()))


def sums_by(session: Session, f: ReportFilter, group: GroupBy) -> dict[Any, Sums]:
    """The sums per tenant, job, model or day (`YYYY-MM-DD`, UTC)."""
    key = _call_key(session, group)
    return {row[0]: Sums.of(tuple(row[1:])) for row in session.execute(
        _aggregates(key).where(*f.call_conditions()).group_by(key))}


def sums_by_step(session: Session, job_id: str) -> dict[str, Sums]:
    """The sums of each step of the job that made calls."""
    return {row[0]: Sums.of(tuple(row[1:])) for row in session.execute(
        _aggregates(ModelCall.step_id).where(ModelCall.job_id == job_id)
        .group_by(ModelCall.step_id))}


def _step_ms(session: Session) -> Any:
    if is_postgres(session):
        return func.extract("epoch", Step.finished_at - Step.started_at) * 1000.0
    return (func.julianday(Step.finished_at) - func.julianday(Step.started_at)) * 86_400_000.0


def percentiles(session: Session, f: ReportFilter, measure: Measure,
                group: GroupBy | None = None) -> dict[Any, tuple[float, float]]:
    """p50 and p95 of `measure` over what the filter covers, per group (under the key None
    when `group` is None); groups with no values are left out."""
    if measure == "step_latency_ms":
        key = None if group is None else _step_key(session, group)
        return _percentiles(session, key, _step_ms(session), f.step_conditions(),
                            joins=[(Job, Job.id == Step.job_id)])
    key = None if group is None else _call_key(session, group)
    value = ModelCall.latency_ms if measure == "call_latency_ms" else ModelCall.ttft_ms
    return _percentiles(session, key, value, f.call_conditions())


def _percentiles(session: Session, key: Any, value: Any, cond: Sequence[ColumnElement[bool]],
                 joins: Iterable[tuple[Any, Any]] = ()) -> dict[Any, tuple[float, float]]:
    """p50 and p95 of `value` for each `key` (None: over all rows), interpolated linearly as
    percentile_cont does."""
    keys = [] if key is None else [key]
    if is_postgres(session):
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


@dataclass(frozen=True)
class TokenCounts:
    calls: int
    prompt_tokens: int
    completion_tokens: int


def token_counts(session: Session, f: ReportFilter, group: Literal["tenant", "model"]
                 ) -> dict[str, TokenCounts]:
    """Calls and tokens per tenant or model, in key order."""
    key = _call_key(session, group)
    return {str(k): TokenCounts(int(n), int(p), int(c)) for k, n, p, c in session.execute(
        select(key, func.count(), func.coalesce(func.sum(ModelCall.prompt_tokens), 0),
               func.coalesce(func.sum(ModelCall.completion_tokens), 0))
        .where(*f.call_conditions()).group_by(key).order_by(key))}


def calls(session: Session, f: ReportFilter, limit: int = 1000) -> list[ModelCall]:
    """Ledger rows, oldest first."""
    return list(session.scalars(select(ModelCall).where(*f.call_conditions())
                                .order_by(ModelCall.created_at, ModelCall.request_id)
                                .limit(limit)))


def energy_methods(session: Session, f: ReportFilter) -> dict[str, int]:
    """How many calls had their energy known by each method ("unknown" for none)."""
    method = func.coalesce(ModelCall.energy_method, "unknown")
    return {str(m): int(n) for m, n in session.execute(
        select(method, func.count()).where(*f.call_conditions()).group_by(method))}
