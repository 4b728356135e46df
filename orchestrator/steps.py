"""Running one step: claim it, run its agent with metered model calls, save its output, fan in.

- A guarded update (`status = 'queued'`, or `running` with an expired lease) decides who runs a
  step, so a message delivered twice yields one run.
- Every model call has a request id derived from the step and the call's position in it. A call
  already in the ledger (a step re-run after a crash) is answered from the ledger: never made or
  billed twice.
- Before a call, prompt tokens (an upper bound) plus `max_tokens` are reserved against the job's
  token budget with one conditional update; after it, the reservation is settled to real usage.
  A call that cannot be reserved is not made.
- Fan-in is counted in the database: each completed step decrements `deps_remaining` of the steps
  that wait for it, and a step is queued by the update that brings it to zero.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from decimal import Decimal
from typing import Any, cast

from pydantic import BaseModel
from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from agents.base import ModelReply
from core.db import session_scope
from core.errors import AgentqError
from core.models import Job, ModelCall, Step, utcnow
from core.pricing import highest_price, price_for
from core.settings import get_settings
from inference.pool import CallCancelled, Completion, CompletionRequest, Pool, get_pool
from orchestrator.events import append_event
from orchestrator.jobs import (
    RUN_STEP_TASK,
    TERMINAL,
    add_steps,
    finish,
    kind_of,
    maybe_finish_stopping,
    open_steps,
)
from orchestrator.outbox import enqueue
from orchestrator.uow import unit_of_work

log = logging.getLogger(__name__)


def _db_retrying() -> Retrying:
    """Transient database errors (a dropped connection, SQLite's lock timeout) are retried in
    place, so that a finished model call is settled and a finished step is saved."""
    return Retrying(retry=retry_if_exception_type(OperationalError), stop=stop_after_attempt(6),
                    wait=wait_exponential_jitter(multiplier=0.2, max=5.0), reraise=True)


def call_key(prompt: str, max_tokens: int, size: str | None, regex: str | None,
             choice: Sequence[str] | None, json_schema: dict[str, Any] | None,
             stop: Sequence[str] | None) -> str:
    """What determines a temperature-0 call's answer, as a digest."""
    spec = json.dumps([prompt, max_tokens, size, regex, list(choice) if choice else None,
                       json_schema, list(stop) if stop else None, 0.0],
                      sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(spec.encode()).hexdigest()


CALL_LEADER_PREFIX = "agentq:callkey:"


def _leader_key(job_id: str, key: str) -> str:
    return f"{CALL_LEADER_PREFIX}{job_id}:{key}"


# The key holds the request id of the call being made ("lead"), or "done:<request id>" once it
# has an answer. One script decides atomically: lead (also when the key names this very call, a
# re-run after a crash, or a done marker whose row is gone), wait, or use the done answer.
_LEAD = """
local v = redis.call('GET', KEYS[1])
if (not v) or v == ARGV[1] or (ARGV[3] ~= '' and v == ARGV[3]) then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2]))
  return {'lead', ARGV[1]}
end
if string.sub(v, 1, 5) == 'done:' then return {'done', string.sub(v, 6)} end
return {'wait', v}
"""
# Compare-and-set, or compare-and-delete when the new value is empty.
_SWAP = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  if ARGV[2] == '' then return redis.call('DEL', KEYS[1]) end
  redis.call('SET', KEYS[1], ARGV[2], 'EX', tonumber(ARGV[3]))
  return 1
end
return 0
"""
DONE_TTL_S = 86_400


def _ttl() -> int:
    return int(get_settings().request_timeout_s + 60)


def _lead(job_id: str, key: str, request_id: str, replace_done: str | None = None
          ) -> tuple[str, str | None]:
    """("lead", _): make the call; ("wait", holder): another step is making it; ("done",
    request id): its answer is in the ledger; ("unknown", None): Redis did not answer."""
    from core.redis import get_redis

    try:
        answer = cast(list[Any], get_redis().eval(
            _LEAD, 1, _leader_key(job_id, key), request_id, _ttl(),
            f"done:{replace_done}" if replace_done else ""))
        state, value = answer[0], answer[1]
    except Exception as exc:  # noqa: BLE001 - the cache only saves money; never fail a call
        log.debug("call cache key unavailable: %s", exc)
        return "unknown", None
    return _text(state), _text(value)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _take_over(job_id: str, key: str, holder: str, request_id: str) -> bool:
    from core.redis import get_redis

    try:
        return bool(get_redis().eval(_SWAP, 1, _leader_key(job_id, key), holder, request_id,
                                     _ttl()))
    except Exception:  # noqa: BLE001
        return False


def _unlead(job_id: str, key: str, request_id: str, answered: bool) -> None:
    """Mark the call answered (later twins read its row), or let another step lead."""
    from core.redis import get_redis

    try:
        get_redis().eval(_SWAP, 1, _leader_key(job_id, key), request_id,
                         f"done:{request_id}" if answered else "", DONE_TTL_S)
    except Exception as exc:  # noqa: BLE001 - the key expires on its own
        log.debug("could not update a call cache key: %s", exc)


def _still_running(request_id: str) -> bool:
    """Whether the step that made `request_id` is running under a live lease."""
    step_id = request_id.rsplit(":", 1)[0]
    with session_scope(read_only=True) as s:
        row = s.execute(select(Step.status, Step.lease_expires_at)
                        .where(Step.id == step_id)).first()
    return row is not None and row[0] == "running" and row[1] is not None \
        and row[1] > utcnow()


def _reply(row: ModelCall, replayed: bool = False) -> ModelReply:
    return ModelReply(row.output_text, row.finish_reason, row.prompt_tokens,
                      row.completion_tokens, replayed=replayed, model=row.model,
                      cached=row.cached_from is not None, escalated_from=row.escalated_from)


class StepStopped(Exception):
    """The job stopped (cancelled, failed elsewhere) while this step ran."""


class BudgetExhausted(AgentqError):
    code = "budget_exhausted"


# How long a call waits for other calls of its job to settle before the budget counts as spent.
RESERVATION_WAIT_S = 120.0


def reservation_for(prompt: str, max_tokens: int) -> int:
    """An upper bound on a call's tokens: every token is at least one byte, plus special tokens."""
    return len(prompt.encode("utf-8")) + 8 + max_tokens


@dataclass
class _Claim:
    step_id: str
    job_id: str
    tenant_id: str
    role: str
    attempt: int
    max_tokens: int


@dataclass(frozen=True)
class _Hold:
    """What one call holds reserved against its job."""

    tokens: int
    cost: Decimal


class MeteredContext:
    """The `StepContext` given to agents: every call is reserved, made, priced and recorded."""

    def __init__(self, claim: _Claim, pool: Pool, budget: dict[str, Any] | None) -> None:
        self._claim = claim
        self._pool = pool
        budget = budget or {}
        self._max_total: int | None = budget.get("max_total_tokens")
        max_cost = budget.get("max_cost_usd")
        self._max_cost: Decimal | None = Decimal(str(max_cost)) if max_cost is not None else None
        self._index = 0
        self.step_max_tokens = claim.max_tokens

    def complete(
        self,
        prompt: str,
        *,
        max_tokens: int | None = None,
        regex: str | None = None,
        choice: Sequence[str] | None = None,
        json_schema: dict[str, Any] | None = None,
        stop: Sequence[str] | None = None,
        size: str | None = None,
        validate: Callable[[str], bool] | None = None,
    ) -> ModelReply:
        args: dict[str, Any] = {"max_tokens": max_tokens, "regex": regex, "choice": choice,
                                "json_schema": json_schema, "stop": stop}
        reply = self._call(prompt, size=size, escalated_from=None, **args)
        if validate is None:
            return reply
        catalogue = self._pool.catalogue
        current = size or catalogue.for_size(None)[0].size
        while not validate(reply.text):
            spec = catalogue.spec(reply.model or "")
            bigger = catalogue.larger_than(spec.size if spec is not None else current)
            if bigger is None:
                return replace(reply, valid=False)
            log.info("step %s: the %s answer failed validation; escalating to %s",
                     self._claim.step_id, reply.model, bigger)
            reply = self._call(prompt, size=bigger, escalated_from=reply.model or current,
                               **args)
            current = bigger
        return replace(reply, valid=True)

    def _call(self, prompt: str, *, max_tokens: int | None, regex: str | None,
              choice: Sequence[str] | None, json_schema: dict[str, Any] | None,
              stop: Sequence[str] | None, size: str | None,
              escalated_from: str | None) -> ModelReply:
        c = self._claim
        request_id = f"{c.step_id}:{self._index}"
        self._index += 1
        limit = min(max_tokens or c.max_tokens, c.max_tokens)
        if c.attempt > 1:
            # A run of this step before this one may have made this call: replay its answer
            # from the ledger instead of making (and billing) it again. A first run has none.
            with session_scope(read_only=True) as s:
                done = s.get(ModelCall, request_id)
                if done is not None:
                    return _reply(done, replayed=True)
        key = call_key(prompt, limit, size, regex, choice, json_schema, stop)
        state, other = _lead(c.job_id, key, request_id)
        if state == "unknown":
            # Without Redis the ledger is asked directly, and parallel twins may both call.
            earlier = self._earlier_answer(key)
            if earlier is not None:
                return self._answer_from_cache(request_id, limit, key, earlier)
        elif state == "done":
            earlier = self._answer_row(other)
            if earlier is not None:
                return self._answer_from_cache(request_id, limit, key, earlier)
            state, other = _lead(c.job_id, key, request_id, replace_done=other)
        if state == "wait":
            earlier, state = self._wait_for_leader(key, request_id, other)
            if earlier is not None:
                return self._answer_from_cache(request_id, limit, key, earlier)
        answered = False
        try:
            reply = self._make_call(prompt, request_id, limit, key, regex, choice, json_schema,
                                    stop, size, escalated_from)
            answered = True
            return reply
        finally:
            if state == "lead":
                _unlead(c.job_id, key, request_id, answered)

    def _earlier_answer(self, key: str) -> ModelCall | None:
        with session_scope(read_only=True) as s:
            return s.scalars(select(ModelCall).where(
                ModelCall.job_id == self._claim.job_id, ModelCall.call_key == key,
                ModelCall.cached_from.is_(None),
                or_(ModelCall.finish_reason.is_(None), ModelCall.finish_reason != "cancelled"))
                .order_by(ModelCall.created_at).limit(1)).first()

    @staticmethod
    def _answer_row(request_id: str | None) -> ModelCall | None:
        if not request_id:
            return None
        with session_scope(read_only=True) as s:
            row = s.get(ModelCall, request_id)
        if row is None or row.finish_reason == "cancelled":
            return None
        return row

    def _wait_for_leader(self, key: str, request_id: str, holder: str | None
                         ) -> tuple[ModelCall | None, str]:
        """Another step of the job is making the identical call: wait for its answer. If that
        step stops running (its worker died, it failed), take the call over. Returns the answer,
        or None and this step's state ("lead", or "unknown" when it calls without leading)."""
        c = self._claim
        deadline = time.monotonic() + get_settings().request_timeout_s + 60
        checked = time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            if stopping.is_stopping(c.job_id):
                raise StepStopped("job stopped while waiting for an identical call")
            state, other = _lead(c.job_id, key, request_id)
            if state == "done":
                earlier = self._answer_row(other)
                if earlier is not None:
                    return earlier, "done"
                state, other = _lead(c.job_id, key, request_id, replace_done=other)
            if state in ("lead", "unknown"):
                return None, state
            if other != holder:
                holder, checked = other, time.monotonic()
            elif time.monotonic() - checked >= 1.0:
                checked = time.monotonic()
                if holder and not _still_running(holder) \
                        and _take_over(c.job_id, key, holder, request_id):
                    return None, "lead"
        return None, "unknown"

    def _answer_from_cache(self, request_id: str, limit: int, key: str,
                           earlier: ModelCall) -> ModelReply:
        """Record the call as answered from the job's call cache: no tokens, no cost."""
        c = self._claim
        for attempt in _db_retrying():
            with attempt, unit_of_work() as s:
                s.add(ModelCall(
                    request_id=request_id, tenant_id=c.tenant_id, job_id=c.job_id,
                    step_id=c.step_id, role=c.role, model=earlier.model,
                    endpoint=earlier.endpoint, prompt_tokens=0, cached_tokens=None,
                    completion_tokens=0, max_tokens=limit, finish_reason=earlier.finish_reason,
                    latency_ms=0.0, ttft_ms=None, attempts=0, output_text=earlier.output_text,
                    cost_usd=Decimal(0), call_key=key, cached_from=earlier.request_id,
                    escalated_from=earlier.escalated_from))
                s.execute(update(Job).where(Job.id == c.job_id).values(
                    model_calls=Job.model_calls + 1, updated_at=utcnow()))
                s.execute(update(Step).where(Step.id == c.step_id).values(
                    model_calls=Step.model_calls + 1, model=earlier.model))
        return replace(_reply(earlier), prompt_tokens=0, completion_tokens=0, cached=True)

    def _make_call(self, prompt: str, request_id: str, limit: int, key: str,
                   regex: str | None, choice: Sequence[str] | None,
                   json_schema: dict[str, Any] | None, stop: Sequence[str] | None,
                   size: str | None, escalated_from: str | None) -> ModelReply:
        c = self._claim
        tokens = reservation_for(prompt, limit)
        hold = _Hold(tokens, highest_price().cost(tokens - limit, limit))
        self._reserve_when_possible(hold)
        try:
            completion = self._pool.complete(CompletionRequest(
                prompt=prompt, max_tokens=limit, request_id=request_id, regex=regex,
                choice=choice, json_schema=json_schema, stop=stop, size=size,
                tenant_id=c.tenant_id, job_id=c.job_id, affinity_key=c.job_id,
                cancelled=lambda: stopping.is_stopping(c.job_id),
            ))
        except CallCancelled as exc:
            if exc.usage is not None and exc.model is not None:
                # What the server generated before the abort was spent: it is billed.
                self._record(request_id, limit, hold, Completion(
                    text="", usage=exc.usage, finish_reason="cancelled", model=exc.model,
                    endpoint=exc.endpoint or "", latency_ms=exc.latency_ms, attempts=1),
                    key, escalated_from)
            else:
                self._release_now(hold)
            raise StepStopped("job stopped during a model call") from exc
        except BaseException:
            self._release_now(hold)
            raise
        self._record(request_id, limit, hold, completion, key, escalated_from)
        return ModelReply(completion.text, completion.finish_reason, completion.usage.prompt_tokens,
                          completion.usage.completion_tokens, model=completion.model,
                          escalated_from=escalated_from)

    def _release_now(self, hold: _Hold) -> None:
        for attempt in _db_retrying():
            with attempt, unit_of_work() as s:
                self._release(s, hold)

    def _record(self, request_id: str, limit: int, hold: _Hold, completion: Completion,
                key: str | None, escalated_from: str | None) -> None:
        """Write the ledger row, settle the reservation and add the usage to step and job."""
        c = self._claim
        u = completion.usage
        cost = price_for(completion.model).cost(u.prompt_tokens, u.completion_tokens,
                                                u.cached_tokens or 0)
        for attempt in _db_retrying():
            with attempt, unit_of_work() as s:
                s.add(ModelCall(
                    request_id=request_id, tenant_id=c.tenant_id, job_id=c.job_id,
                    step_id=c.step_id, role=c.role, model=completion.model[:200],
                    endpoint=completion.endpoint[:300], prompt_tokens=u.prompt_tokens,
                    cached_tokens=u.cached_tokens, completion_tokens=u.completion_tokens,
                    max_tokens=limit, finish_reason=(completion.finish_reason or "")[:40] or None,
                    latency_ms=completion.latency_ms, ttft_ms=completion.ttft_ms,
                    attempts=completion.attempts,
                    cache_hit=None if u.cached_tokens is None else u.cached_tokens > 0,
                    energy_wh=completion.energy_wh, energy_method=completion.energy_method,
                    output_text=completion.text, cost_usd=cost, call_key=key,
                    escalated_from=escalated_from,
                ))
                self._release(s, hold)
                totals = s.execute(update(Job).where(Job.id == c.job_id).values(
                    prompt_tokens=Job.prompt_tokens + u.prompt_tokens,
                    completion_tokens=Job.completion_tokens + u.completion_tokens,
                    model_calls=Job.model_calls + 1,
                    cost_usd=Job.cost_usd + cost,
                    updated_at=utcnow(),
                ).returning(Job.prompt_tokens, Job.completion_tokens, Job.model_calls,
                            Job.cost_usd)).one()
                spent_tokens = int(totals[0]) + int(totals[1])
                spent_cost = Decimal(totals[3])
                append_event(s, c.job_id, "job.usage", {
                    "prompt_tokens": totals[0], "completion_tokens": totals[1],
                    "total_tokens": spent_tokens, "model_calls": totals[2],
                    "cost_usd": float(spent_cost)})
                self._thresholds(s, "tokens", Decimal(spent_tokens - u.total_tokens),
                                 Decimal(spent_tokens), self._max_total)
                self._thresholds(s, "cost_usd", spent_cost - cost, spent_cost, self._max_cost)
                s.execute(update(Step).where(Step.id == c.step_id).values(
                    prompt_tokens=Step.prompt_tokens + u.prompt_tokens,
                    completion_tokens=Step.completion_tokens + u.completion_tokens,
                    model_calls=Step.model_calls + 1,
                    model=completion.model[:200],
                ))

    def _thresholds(self, s: Session, budget: str, before: Decimal, after: Decimal,
                    limit: int | Decimal | None) -> None:
        """Append `budget.threshold` for each threshold this call crossed (settlements of one
        job are serialised by its row lock, so exactly one call crosses each)."""
        if not limit:
            return
        for fraction in get_settings().budget_thresholds:
            mark = Decimal(str(fraction)) * Decimal(limit)
            if before < mark <= after:
                append_event(s, self._claim.job_id, "budget.threshold", {
                    "budget": budget, "threshold": fraction, "spent": float(after),
                    "limit": float(limit)})

    def _release(self, s: Session, hold: _Hold) -> None:
        c = self._claim
        s.execute(update(Job).where(Job.id == c.job_id).values(
            reserved_tokens=Job.reserved_tokens - hold.tokens,
            reserved_cost_usd=Job.reserved_cost_usd - hold.cost))
        s.execute(update(Step).where(Step.id == c.step_id).values(
            reserved_tokens=Step.reserved_tokens - hold.tokens,
            reserved_cost_usd=Step.reserved_cost_usd - hold.cost))

    def _reserve_when_possible(self, hold: _Hold) -> None:
        """Reserve; while other calls of the job hold reservations that may yet settle below
        their bound, wait for them instead of giving up on budget that is not really spent."""
        deadline = time.monotonic() + RESERVATION_WAIT_S
        delay = 0.02
        while True:
            try:
                with unit_of_work() as s:
                    self._reserve(s, hold)
                return
            except BudgetExhausted:
                with session_scope(read_only=True) as s:
                    in_flight = s.scalar(select(Job.reserved_tokens)
                                         .where(Job.id == self._claim.job_id))
                if not in_flight or time.monotonic() > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def _reserve(self, s: Session, hold: _Hold) -> None:
        c = self._claim
        cond = [Job.id == c.job_id, Job.status == "running"]
        if self._max_total is not None:
            cond.append(Job.prompt_tokens + Job.completion_tokens + Job.reserved_tokens
                        + hold.tokens <= self._max_total)
        if self._max_cost is not None:
            cond.append(Job.cost_usd + Job.reserved_cost_usd + hold.cost <= self._max_cost)
        res = s.execute(update(Job).where(*cond).values(
            reserved_tokens=Job.reserved_tokens + hold.tokens,
            reserved_cost_usd=Job.reserved_cost_usd + hold.cost))
        if res.rowcount == 1:  # type: ignore[attr-defined]
            s.execute(update(Step).where(Step.id == c.step_id).values(
                reserved_tokens=Step.reserved_tokens + hold.tokens,
                reserved_cost_usd=Step.reserved_cost_usd + hold.cost))
            return
        job = s.execute(select(Job.status, Job.prompt_tokens + Job.completion_tokens,
                               Job.cost_usd).where(Job.id == c.job_id)).one()
        if job[0] != "running":
            raise StepStopped(f"job is {job[0]}")
        spent = [f"{job[1]} of {self._max_total} tokens"] if self._max_total else []
        if self._max_cost is not None:
            spent.append(f"${Decimal(job[2]):.6f} of ${self._max_cost}")
        raise BudgetExhausted(
            f"budget exhausted: spent {' and '.join(spent)}; the next model call could need "
            f"up to {hold.tokens} tokens (${hold.cost:.6f})")


def _claim(step_id: str) -> tuple[_Claim, Any, dict[str, Any], dict[str, Any] | None] | None:
    """Claim the step and load what running it needs; None when there is nothing to run."""
    settings = get_settings()
    now = utcnow()
    with unit_of_work() as s:
        job_id = s.scalar(select(Step.job_id).where(Step.id == step_id))
        if job_id is None:
            log.warning("step %s does not exist; nothing to run", step_id)
            return None
        # Locks are always taken job row first, then step rows, so that claims, completions
        # and cancellations of the same job never deadlock.
        job = s.get(Job, job_id, with_for_update=True)
        assert job is not None
        claimable = or_(Step.status == "queued",
                        and_(Step.status == "running", Step.lease_expires_at < now))
        res = s.execute(update(Step).where(Step.id == step_id, claimable).values(
            status="running", attempt=Step.attempt + 1, started_at=now,
            lease_expires_at=now + timedelta(seconds=settings.step_lease_seconds)))
        if res.rowcount != 1:  # type: ignore[attr-defined]
            return None
        step = s.get(Step, step_id)
        assert step is not None
        if step.reserved_tokens or step.reserved_cost_usd:
            # An earlier run of this step died between reserving and settling.
            s.execute(update(Job).where(Job.id == job.id).values(
                reserved_tokens=Job.reserved_tokens - step.reserved_tokens,
                reserved_cost_usd=Job.reserved_cost_usd - step.reserved_cost_usd))
            step.reserved_tokens, step.reserved_cost_usd = 0, Decimal(0)
        if job.status in TERMINAL or job.status == "cancelling":
            step.status, step.finished_at = "cancelled", now
            s.flush()
            maybe_finish_stopping(s, job)
            return None
        kind = kind_of(job)
        if job.status == "queued":
            job.status, job.started_at = "running", now
            append_event(s, job.id, "job.started", {})
        job.phase = kind.phases.get(step.role, step.role)
        append_event(s, job.id, "step.started", {"step": step.key, "role": step.role})
        deps: dict[str, Any] = {}
        if step.depends_on:
            for key, output in s.execute(select(Step.key, Step.output).where(
                    Step.job_id == job.id, Step.key.in_(step.depends_on))):
                deps[key] = output or {}
        claim = _Claim(step.id, job.id, job.tenant_id, step.role, step.attempt, step.max_tokens)
        payload = {"kind": job.kind, "input": dict(job.input), "step_input": dict(step.input),
                   "deps": deps}
        return claim, kind, payload, dict(job.budget)


def run_step(step_id: str, pool: Pool | None = None) -> None:
    claimed = _claim(step_id)
    if claimed is None:
        return
    claim, kind, payload, budget = claimed
    leases.add(claim.step_id, claim.attempt)
    stopping.add(claim.job_id)
    try:
        _run_claimed(claim, kind, payload, budget, pool)
    finally:
        stopping.remove(claim.job_id)
        leases.remove(claim.step_id)


def _run_claimed(claim: _Claim, kind: Any, payload: dict[str, Any],
                 budget: dict[str, Any] | None, pool: Pool | None) -> None:
    try:
        ctx = MeteredContext(claim, pool or get_pool(), budget)
        job_input: BaseModel = kind.parse_input(payload["input"])
        output = kind.run_step(ctx, job_input, claim.role, payload["step_input"], payload["deps"])
    except StepStopped:
        _retry_db(_end_step, claim, "cancelled", None)
    except BudgetExhausted as exc:
        _retry_db(_end_step, claim, "failed", (exc.code, exc.message),
                  job_status="budget_exhausted")
    except AgentqError as exc:
        log.warning("step %s failed: %s", claim.step_id, exc.message)
        _retry_db(_end_step, claim, "failed",
                  (exc.code, f"step {claim.role} failed: {exc.message}"), job_status="failed")
    except Exception as exc:
        log.exception("step %s crashed", claim.step_id)
        _retry_db(_end_step, claim, "failed",
                  ("internal_error", f"step {claim.role} failed: {exc!r}"), job_status="failed")
    else:
        _retry_db(_complete_step, claim, kind, job_input, output)


def _retry_db(fn: Any, *args: Any, **kwargs: Any) -> None:
    for attempt in _db_retrying():
        with attempt:
            fn(*args, **kwargs)


def requeue_expired(limit: int = 200) -> int:
    """Queue again the steps whose run vanished (worker killed, finalisation lost): a step
    still `running` after its lease expired. Its earlier model calls are replayed from the
    ledger, not made again."""
    now = utcnow()
    requeued = 0
    with unit_of_work() as s:
        rows = s.execute(select(Step.id, Step.job_id).where(
            Step.status == "running", Step.lease_expires_at < now).limit(limit)).all()
        for step_id, job_id in rows:
            s.get(Job, job_id, with_for_update=True)  # job row first, as everywhere
            res = s.execute(update(Step).where(Step.id == step_id, Step.status == "running",
                                               Step.lease_expires_at < now)
                            .values(status="queued", lease_expires_at=None, enqueued_at=now))
            if res.rowcount == 1:  # type: ignore[attr-defined]
                enqueue(s, RUN_STEP_TASK, step_id=step_id)
                requeued += 1
    if requeued:
        log.warning("re-queued %d step(s) whose lease had expired", requeued)
    return requeued


def republish_stale_queued(limit: int = 200) -> int:
    """Publish again the steps queued long ago and never claimed (their message was lost)."""
    now = utcnow()
    cutoff = now - timedelta(seconds=get_settings().step_requeue_after_s)
    with unit_of_work() as s:
        ids = list(s.scalars(select(Step.id).where(
            Step.status == "queued", or_(Step.enqueued_at.is_(None), Step.enqueued_at < cutoff))
            .limit(limit)))
        for step_id in ids:
            s.execute(update(Step).where(Step.id == step_id).values(enqueued_at=now))
            enqueue(s, RUN_STEP_TASK, step_id=step_id)
    if ids:
        log.warning("published %d long-queued step(s) again", len(ids))
    return len(ids)


class StoppingWatcher:
    """Tells running steps, within about a second, that their job stopped (cancelled, failed,
    out of budget), so their in-flight model calls are closed and the server aborts them. One
    query per tick covers every job with a step running in this process."""

    TICK_S = 0.5

    def __init__(self) -> None:
        self._jobs: dict[str, int] = {}
        self._stopping: set[str] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, job_id: str) -> None:
        with self._lock:
            self._jobs[job_id] = self._jobs.get(job_id, 0) + 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="agentq-stopping",
                                                daemon=True)
                self._thread.start()

    def remove(self, job_id: str) -> None:
        with self._lock:
            left = self._jobs.get(job_id, 0) - 1
            if left > 0:
                self._jobs[job_id] = left
            else:
                self._jobs.pop(job_id, None)
                self._stopping.discard(job_id)

    def is_stopping(self, job_id: str) -> bool:
        return job_id in self._stopping

    def _run(self) -> None:
        while True:
            time.sleep(self.TICK_S)
            with self._lock:
                jobs = list(self._jobs)
            if not jobs:
                continue
            try:
                with unit_of_work() as s:
                    stopped = set(s.scalars(select(Job.id).where(
                        Job.id.in_(jobs), Job.status.not_in(("queued", "running")))))
            except Exception as exc:  # noqa: BLE001 - the next tick tries again
                log.warning("could not check for stopped jobs: %s", exc)
                continue
            with self._lock:
                self._stopping = {j for j in stopped if j in self._jobs}


stopping = StoppingWatcher()


class LeaseKeeper:
    """Renews the leases of the steps this process is running, in one update per tick."""

    def __init__(self) -> None:
        self._running: dict[str, int] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, step_id: str, attempt: int) -> None:
        with self._lock:
            self._running[step_id] = attempt
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="agentq-leases",
                                                daemon=True)
                self._thread.start()

    def remove(self, step_id: str) -> None:
        with self._lock:
            self._running.pop(step_id, None)

    def _run(self) -> None:
        lease = get_settings().step_lease_seconds
        while True:
            time.sleep(lease / 4)
            with self._lock:
                ids = list(self._running)
            if not ids:
                continue
            try:
                with unit_of_work() as s:
                    s.execute(update(Step).where(Step.id.in_(ids), Step.status == "running")
                              .values(lease_expires_at=utcnow() + timedelta(seconds=lease)))
            except Exception as exc:  # the database may be briefly away; try next tick
                log.warning("could not renew step leases: %s", exc)


leases = LeaseKeeper()


def _owned(s: Session, claim: _Claim) -> Step | None:
    step = s.get(Step, claim.step_id)
    if step is None or step.status != "running" or step.attempt != claim.attempt:
        return None  # the lease passed to another run
    return step


def _end_step(claim: _Claim, status: str, error: tuple[str, str] | None,
              job_status: str | None = None) -> None:
    with unit_of_work() as s:
        job = s.get(Job, claim.job_id, with_for_update=True)
        step = _owned(s, claim)
        if job is None or step is None:
            return
        step.status, step.finished_at = status, utcnow()
        step.error = error[1] if error else None
        step.lease_expires_at = None
        append_event(s, job.id, f"step.{status}", {"step": step.key, "role": step.role,
                                                   **({"error": error[1]} if error else {})})
        s.flush()
        if job_status == "budget_exhausted" and job.status == "running":
            kind = kind_of(job)
            outputs = _outputs(s, job.id)
            finish(s, job, "budget_exhausted",
                   result=kind.partial_result(kind.parse_input(job.input), outputs), error=error)
        elif job_status is not None and job.status == "running" and error is not None:
            finish(s, job, job_status, error=error)
        maybe_finish_stopping(s, job)


def _outputs(s: Session, job_id: str) -> dict[str, dict[str, Any]]:
    return {k: o or {} for k, o in s.execute(select(Step.key, Step.output).where(
        Step.job_id == job_id, Step.status == "completed"))}


def _complete_step(claim: _Claim, kind: Any, job_input: BaseModel, output: dict[str, Any]
                   ) -> None:
    with unit_of_work() as s:
        job = s.get(Job, claim.job_id, with_for_update=True)
        step = _owned(s, claim)
        if job is None or step is None:
            return
        now = utcnow()
        step.status, step.output, step.finished_at = "completed", output, now
        step.lease_expires_at = None
        job.steps_done += 1
        append_event(s, job.id, "step.completed", {
            "step": step.key, "role": step.role,
            "usage": {"prompt_tokens": step.prompt_tokens,
                      "completion_tokens": step.completion_tokens,
                      "model_calls": step.model_calls}})
        s.flush()
        if job.status != "running":
            maybe_finish_stopping(s, job)
            return
        added = kind.expand(job_input, step.key, output)
        if added:
            add_steps(s, job, added)
            append_event(s, job.id, "plan.ready", {"after": step.key, "steps": [
                {"key": a.key, "role": a.role, "depends_on": list(a.depends_on)}
                for a in added]})
        # Fan-in: this step no longer holds back the steps that wait for it.
        waiting = s.scalars(select(Step).where(Step.job_id == job.id,
                                               Step.status == "pending")).all()
        for dep in waiting:
            if step.key not in dep.depends_on:
                continue
            s.execute(update(Step).where(Step.id == dep.id)
                      .values(deps_remaining=Step.deps_remaining - 1))
            res = s.execute(update(Step).where(Step.id == dep.id, Step.status == "pending",
                                               Step.deps_remaining <= 0)
                            .values(status="queued", enqueued_at=utcnow()))
            if res.rowcount == 1:  # type: ignore[attr-defined]
                enqueue(s, RUN_STEP_TASK, step_id=dep.id)
        s.flush()
        if open_steps(s, job.id) == 0:
            s.refresh(job)
            result = kind.result(job_input, _outputs(s, job.id))
            finish(s, job, "completed", result=result)
