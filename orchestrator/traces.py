"""A job's trace: one per job, one connected tree over every process that works on it.

- `job {kind}`: the job's span. Its context is made at submission and kept on the job row
  (`jobs.trace_context`); it is recorded when the job first ends, from its submission to its
  end, by whichever process ends it. A continued job's later runs are `job {kind} continued`
  spans under it, from the continuation to the next end.
- `submit`: the API's part (validation, the transaction), under the job span; recorded only
  by the request that made the job (an idempotent replay's would hang under no span).
- `step {role}`: from the step's enqueue to its end, under the job span whichever process
  published it, with a `queued` child up to its claim (`agentq.step.queue_wait_ms`), and a
  link to the span that made it ready (the traceparent its Celery message carries);
  `agentq.step.status` says how the run ended (`suspended`: waiting for its children).
- `{gen_ai.operation.name} {model}`: each model call, with the GenAI semantic conventions
  (`gen_ai.request.model`, `gen_ai.request.max_tokens`, `gen_ai.usage.input_tokens`,
  `gen_ai.usage.output_tokens`, `gen_ai.response.finish_reasons`,
  `gen_ai.server.time_to_first_token` and a `gen_ai.first_token` event); its figures are
  those of its ledger row. Tool calls (`execute_tool {name}`) and sandbox runs
  (`sandbox run`) are spans of their own.

Cost, budget and ids are `agentq.*` attributes. With tracing off every function here returns
at once, and nothing is read or written for it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind
from sqlalchemy.orm import Session

from core import tracing
from core.db import after_commit
from core.repositories import events, jobs
from core.repositories.steps import ClaimedStep
from inference.calls import CallSpec

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def ns(at: datetime) -> int:
    """Nanoseconds since the epoch of a UTC datetime (exact to the microsecond)."""
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return (at - _EPOCH) // timedelta(microseconds=1) * 1000


def new_job() -> str | None:
    """The traceparent of a new job's span; None when tracing is off."""
    return tracing.new_root("job")


def budget_attributes(budget: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("max_total_tokens", "max_cost_usd", "max_seconds"):
        value = budget.get(name)
        if value is not None:
            out[f"agentq.budget.{name}"] = float(value) if name == "max_cost_usd" else value
    for role, tokens in (budget.get("step_max_tokens") or {}).items():
        out[f"agentq.budget.step_max_tokens.{role}"] = int(tokens)
    return out


# -- the job ----------------------------------------------------------------------------------

def job_ended(session: Session, job_id: str) -> None:
    """The job has just ended in this transaction: its span is recorded once it commits."""
    if not tracing.enabled():
        return
    facts = jobs.trace_facts(session, job_id)
    if facts is None or facts.trace_context is None or facts.finished_at is None:
        return
    continued = events.last_at(session, job_id, "job.continued")
    after_commit(session, f"agentq.trace.job.{job_id}",
                 lambda: _record_job(facts, continued))


def _record_job(f: jobs.TraceFacts, continued: datetime | None) -> None:
    assert f.trace_context is not None
    assert f.finished_at is not None
    attributes: dict[str, Any] = {
        "agentq.job.id": f.job_id, "agentq.job.kind": f.kind, "agentq.tenant.id": f.tenant_id,
        "agentq.job.status": f.status, "agentq.usage.prompt_tokens": f.prompt_tokens,
        "agentq.usage.completion_tokens": f.completion_tokens,
        "agentq.usage.model_calls": f.model_calls, "agentq.cost_usd": float(f.cost_usd),
        "agentq.service_tier": f.service_tier, **budget_attributes(f.budget)}
    error = f"{f.error_code}: {f.error_message}" if f.error_code else None
    if error is not None:
        attributes["error.type"] = f.error_code
    if continued is None:
        tracing.record(f.trace_context, f"job {f.kind}", ns(f.created_at), ns(f.finished_at),
                       attributes, error=error)
    else:
        tracing.record_child(f.trace_context, f"job {f.kind} continued", ns(continued),
                             ns(f.finished_at), attributes, error=error)


# -- steps ------------------------------------------------------------------------------------

@contextmanager
def step(c: ClaimedStep, claimed_ns: int, link: str | None) -> Iterator[Span | None]:
    """The step's span, current while it runs (its model and tool calls go under it)."""
    if c.trace_context is None or not tracing.enabled():
        yield None
        return
    queued_ns = min(ns(c.enqueued_at), claimed_ns) if c.enqueued_at else claimed_ns
    attributes = {
        "agentq.job.id": c.job_id, "agentq.job.kind": c.kind, "agentq.tenant.id": c.tenant_id,
        "agentq.step.id": c.step_id, "agentq.step.key": c.key, "agentq.step.role": c.role,
        "agentq.step.attempt": c.attempt, "agentq.step.max_tokens": c.max_tokens,
        "agentq.step.queue_wait_ms": (claimed_ns - queued_ns) / 1e6,
        "agentq.service_tier": c.service_tier, "agentq.scheduled_tier": c.scheduled_tier,
        **budget_attributes(c.budget)}
    with tracing.span(f"step {c.role}", attributes, parent=c.trace_context,
                      kind=SpanKind.CONSUMER, start_ns=queued_ns, links=[link]) as current:
        parent = tracing.current_traceparent()
        if parent is not None:
            tracing.record_child(parent, "queued", queued_ns, claimed_ns)
        yield current


def step_outcome(status: str, error: str | None = None) -> None:
    """How the current step's run ended."""
    if not tracing.enabled():
        return
    current = trace.get_current_span()
    if current.is_recording():
        current.set_attribute("agentq.step.status", status)
        if error is not None:
            tracing.fail(current, error)


# -- model calls ------------------------------------------------------------------------------

def call_started() -> Span | None:
    """A model call's span, started now under the current step (named once it is known)."""
    return tracing.start("model call", kind=SpanKind.CLIENT)


def call_ended(span: Span | None, spec: CallSpec, row: Mapping[str, Any] | None, *,
               chat: bool = False, error: str | None = None) -> None:
    """End a model call's span with its ledger row's figures (`row`: None when the call
    failed before it had any)."""
    if span is None:
        return
    end_ns = tracing.now_ns()
    operation = "chat" if chat else "text_completion"
    attributes: dict[str, Any] = {"gen_ai.operation.name": operation,
                                  "gen_ai.request.temperature": spec.temperature}
    if spec.max_tokens is not None:
        attributes["gen_ai.request.max_tokens"] = spec.max_tokens
    if spec.size is not None:
        attributes["agentq.request.size"] = spec.size
    if spec.turn is not None:
        attributes["agentq.turn"] = spec.turn
    if spec.model is not None:
        attributes["gen_ai.request.model"] = spec.model
    if row is not None:
        attributes.update(_row_attributes(row))
        model = str(row["model"])
        attributes.setdefault("gen_ai.request.model", model)
        span.update_name(f"{operation} {model}")
        ttft, latency = row.get("ttft_ms"), float(row.get("latency_ms") or 0.0)
        if ttft is not None:
            attributes["gen_ai.server.time_to_first_token"] = float(ttft) / 1000
            span.add_event("gen_ai.first_token", timestamp=int(
                end_ns - latency * 1e6 + float(ttft) * 1e6))
    span.set_attributes(attributes)
    if error is not None:
        tracing.fail(span, error)
    span.end(end_time=end_ns)


def _row_attributes(row: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "gen_ai.response.model": str(row["model"]),
        "gen_ai.usage.input_tokens": int(row["prompt_tokens"]),
        "gen_ai.usage.output_tokens": int(row["completion_tokens"]),
        "agentq.request_id": str(row["request_id"]),
        "agentq.step.id": str(row["step_id"]),
        "agentq.latency_ms": float(row.get("latency_ms") or 0.0),
        "agentq.attempts": int(row.get("attempts") or 0)}
    if row.get("finish_reason"):
        out["gen_ai.response.finish_reasons"] = [str(row["finish_reason"])]
    if row.get("cached_tokens") is not None:
        out["gen_ai.usage.cache_read.input_tokens"] = int(row["cached_tokens"])
    cost = row.get("cost_usd")
    if cost is not None:
        out["agentq.cost_usd"] = float(Decimal(cost))
    for key, name in (("cached_from", "cached_from"), ("escalated_from", "escalated_from"),
                      ("service_tier", "service_tier"), ("power_price", "power_price_usd_kwh"),
                      ("carbon_intensity", "carbon_g_kwh"),
                      ("energy_wh", "energy_wh"), ("cache_hit", "prefix_cache_hit")):
        if row.get(key) is not None:
            out[f"agentq.{name}"] = row[key]
    endpoint = urlsplit(str(row.get("endpoint") or ""))
    if endpoint.hostname:
        out["server.address"] = endpoint.hostname
        if endpoint.port:
            out["server.port"] = endpoint.port
    return out
