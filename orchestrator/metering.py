"""The context a step's agent sees: every model call is replayed, answered from the job's call
cache, or reserved, made, priced, recorded in the ledger and settled; storage is read through
it, never by the agent itself.

- A call's request id is `{step}:{attempt}:{index}`: stable across the pool's retries of it,
  distinct between runs of the step. A re-run step replays a finished call of an earlier run
  found at the same position with the same content (a changed prompt is a new call).
- Identical deterministic calls of one job are made once (`orchestrator.callcache`).
- The job's remaining token budget is known without a read of its own: from the claim, then
  from each reservation's update, then from each call's usage. A job with a dollar budget has
  its dollars read when a call is fitted to what the job has left: a call's `max_tokens` is
  cut to both, at the highest price any model may charge.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from decimal import Decimal
from typing import Any, TypeVar

from pydantic import BaseModel

from agents.base import (
    CallSpec,
    Child,
    Document,
    ModelReply,
    Passage,
    PromptSize,
    StepOutputs,
)
from agents.corpus import retrieve
from core import grid
from core.db import transaction
from core.db_errors import db_retrying
from core.models import ModelCall, ServiceTier, utcnow
from core.pricing import MILLION, highest_price, price_for
from core.repositories import files, ledger, steps
from core.repositories.corpora import SessionCorpusStore
from core.settings import get_settings
from inference.pool import CallCancelled, Completion, CompletionRequest, Pool, Usage
from inference.shapes import decode_tool_calls, encode_tool_calls
from orchestrator import budget, callcache, scheduling, traces
from orchestrator.budget import Carry, Hold, Run, StepStopped
from orchestrator.callcache import Lead
from orchestrator.spawning import Spawner
from orchestrator.watchers import leases, stopping

log = logging.getLogger(__name__)
OutputT = TypeVar("OutputT", bound=BaseModel)


def _reply(row: ModelCall, replayed: bool = False) -> ModelReply:
    return ModelReply(row.output_text, row.finish_reason, row.prompt_tokens,
                      row.completion_tokens, replayed=replayed, model=row.model,
                      cached=row.cached_from is not None, escalated_from=row.escalated_from,
                      tool_calls=decode_tool_calls(row.tool_calls))


class MeteredContext:
    """The `StepContext` given to agents."""

    def __init__(self, *, run: Run, tenant_id: str, step_key: str, role: str,
                 step_input: Mapping[str, Any], max_tokens: int, parents: StepOutputs,
                 pool: Pool, job_tokens_committed: int = 0,
                 spawns: Sequence[Child[Any, Any]] = (),
                 step_budgets: Mapping[str, int] | None = None,
                 service_tier: str = "standard", scheduled_tier: str | None = None) -> None:
        self._run = run
        # The tier priced (and recorded on the ledger) and the tier that orders its calls
        # (`promoted` for a flex job promoted to meet its deadline: `_admitted_tier`).
        self._tier = service_tier
        self._scheduled_tier = scheduled_tier or service_tier
        self._tenant_id = tenant_id
        self._step_key = step_key
        self._role = role
        self._step_input = step_input
        self._max_tokens = max_tokens
        self._parents = parents
        self._pool = pool
        self._index = 0
        self._replay: dict[tuple[int, str | None], ModelCall] | None = None
        # The job's tokens spent and reserved by others, as last seen.
        self._committed = job_tokens_committed
        # Finished calls whose ledger rows ride on the run's next transaction.
        self.carry = Carry(run)
        # What the step's role may spawn (`orchestrator.spawning`).
        self._spawner = Spawner(run, step_key, role, spawns, step_budgets or {},
                                self.job_tokens_left)

    @property
    def step_key(self) -> str:
        return self._step_key

    @property
    def role(self) -> str:
        return self._role

    @property
    def step_input(self) -> Mapping[str, Any]:
        return self._step_input

    @property
    def step_max_tokens(self) -> int:
        return self._max_tokens

    @property
    def parents(self) -> StepOutputs:
        return self._parents

    # -- storage --------------------------------------------------------------------------

    def search_corpus(self, corpus_id: str, query: str, k: int) -> list[Passage]:
        with transaction(read_only=True) as s:
            return retrieve(SessionCorpusStore(s, self._tenant_id), corpus_id, query, k=k)

    def read_passages(self, corpus_id: str, chunk_ids: Sequence[str]) -> dict[str, str]:
        with transaction(read_only=True) as s:
            return SessionCorpusStore(s, self._tenant_id).texts(corpus_id, chunk_ids)

    def read_document(self, corpus_id: str, document_id: str) -> Document | None:
        with transaction(read_only=True) as s:
            found = SessionCorpusStore(s, self._tenant_id).document(corpus_id, document_id)
        return None if found is None else Document(document_id, found[0], found[1])

    def read_file(self, file_id: str, start: int, end: int) -> bytes:
        with transaction(read_only=True) as s:
            return files.byte_range(s, self._tenant_id, file_id, start, end) or b""

    # -- sub-agents -----------------------------------------------------------------------

    def spawn(self, child: Child[Any, OutputT], tasks: Sequence[BaseModel]) -> list[OutputT]:
        return self._spawner.spawn(child, tasks)

    # -- budget ---------------------------------------------------------------------------

    def job_tokens_left(self) -> int | None:
        limit = self._run.budget.max_total_tokens
        left = None if limit is None else max(0, limit - self._committed)
        dollars = self._dollars_left()
        if dollars is not None:
            # What the dollars left buy of the dearer kind of token, at the highest price.
            price = highest_price()
            dearest = max(price.input, price.output)
            if dearest > 0:
                affordable = int(dollars * MILLION / dearest)
                left = affordable if left is None else min(left, affordable)
        return left

    def _dollars_left(self) -> Decimal | None:
        limit = self._run.budget.max_cost_usd
        if limit is None:
            return None
        with transaction(read_only=True) as s:
            committed = ledger.committed_cost(s, self._run.job_id)
        return max(Decimal(0), limit - committed)

    def prompt_size(self, call: CallSpec) -> PromptSize:
        return self._pool.prompt_size(call)

    def _fit_to_job(self, spec: CallSpec) -> CallSpec:
        """The call with `max_tokens` cut to what the job's budget has room for: its tokens,
        and its dollars at the highest price (its reservation holds the prompt's bound as
        well)."""
        assert spec.max_tokens is not None
        limit = self._run.budget
        if limit.max_total_tokens is None and limit.max_cost_usd is None:
            return spec
        prompt = self.prompt_size(spec).tokens
        max_tokens = spec.max_tokens
        if limit.max_total_tokens is not None:
            max_tokens = min(max_tokens, limit.max_total_tokens - self._committed - prompt)
        dollars = self._dollars_left()
        price = highest_price()
        if dollars is not None and price.output > 0:
            room = dollars - price.cost(prompt, 0)
            max_tokens = min(max_tokens, int(room * MILLION / price.output))
        return spec.settled(max(1, max_tokens))

    # -- model calls ----------------------------------------------------------------------

    def _admitted_tier(self) -> str:
        """A flex job promoted since the claim (the stop watcher reads it each tick) has
        its next calls admitted as promoted."""
        if self._scheduled_tier == ServiceTier.FLEX and stopping.is_promoted(self._run.job_id):
            return scheduling.PROMOTED
        return self._scheduled_tier

    def stopped(self) -> bool:
        run = self._run
        return stopping.is_stopping(run.job_id) or leases.is_lost(run.step_id, run.attempt) \
            or stopping.is_dropped(run.step_id, run.attempt)

    def complete(self, call: CallSpec) -> ModelReply:
        reply = self._call(call, escalated_from=None)
        if call.validate is None:
            return reply
        catalogue = self._pool.catalogue
        current = call.size or catalogue.for_size(None)[0].size
        while not call.validate(reply.text):
            spec = catalogue.spec(reply.model or "")
            bigger = catalogue.larger_than(spec.size if spec is not None else current)
            if bigger is None:
                return replace(reply, valid=False)
            log.info("step %s: the %s answer failed validation; escalating to %s",
                     self._run.step_id, reply.model, bigger)
            reply = self._call(replace(call, size=bigger), escalated_from=reply.model or current)
            current = bigger
        return replace(reply, valid=True)

    def _call(self, call: CallSpec, escalated_from: str | None) -> ModelReply:
        run = self._run
        index = self._index
        self._index += 1
        request_id = f"{run.step_id}:{run.attempt}:{index}"
        spec = call.settled(min(call.max_tokens or self._max_tokens, self._max_tokens))
        key = spec.key()
        if run.attempt > 1:
            # An earlier run of this step may have made this very call: replay its answer
            # instead of making (and billing) it again. A first run has none to look up.
            if self._replay is None:
                with transaction(read_only=True) as s:
                    self._replay = ledger.replayable(s, run.step_id, run.attempt)
            done = self._replay.get((index, key))
            if done is not None:
                return _reply(done, replayed=True)
        if call.fit_to_job:
            # After the key: a re-run finds this call whatever the job had left then.
            spec = self._fit_to_job(spec)
        if key is None:
            return self._make_call(spec, request_id, index, key, escalated_from)
        state, other = callcache.lead(run.job_id, key, request_id)
        if state is Lead.UNKNOWN:
            # Without Redis the ledger is asked directly, and parallel twins may both call.
            with transaction(read_only=True) as s:
                earlier = ledger.earlier_answer(s, run.job_id, key)
            if earlier is not None:
                return self._answer_from_cache(request_id, index, spec, key, earlier)
        elif state is Lead.DONE:
            earlier = self._answer_row(other)
            if earlier is not None:
                return self._answer_from_cache(request_id, index, spec, key, earlier)
            state, other = callcache.lead(run.job_id, key, request_id, replace_done=other)
        if state is Lead.WAIT:
            earlier, state = self._wait_for_leader(key, request_id, other)
            if earlier is not None:
                return self._answer_from_cache(request_id, index, spec, key, earlier)
        try:
            reply = self._make_call(spec, request_id, index, key, escalated_from)
        except BaseException:
            if state is Lead.LEAD:
                callcache.unlead(run.job_id, key, request_id, answered=False)
            raise
        if state is Lead.LEAD:
            # Twins may use the answer once its ledger row is committed.
            self.carry.add_after(
                lambda: callcache.unlead(run.job_id, key, request_id, answered=True))
        return reply

    def _answer_row(self, request_id: str | None) -> ModelCall | None:
        if not request_id:
            return None
        with transaction(read_only=True) as s:
            return ledger.answer(s, request_id, self._run.job_id)

    def _wait_for_leader(self, key: str, request_id: str, holder: str | None
                         ) -> tuple[ModelCall | None, Lead]:
        """Another step of the job is making the identical call: wait for its answer. If that
        step stops running (its worker died, it failed), take the call over."""
        job_id = self._run.job_id
        deadline = time.monotonic() + get_settings().request_timeout_s + 60
        checked = time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            if self.stopped():
                raise StepStopped("job stopped while waiting for an identical call")
            state, other = callcache.lead(job_id, key, request_id)
            if state is Lead.DONE:
                earlier = self._answer_row(other)
                if earlier is not None:
                    return earlier, state
                state, other = callcache.lead(job_id, key, request_id, replace_done=other)
            if state in (Lead.LEAD, Lead.UNKNOWN):
                return None, state
            if other != holder:
                holder, checked = other, time.monotonic()
            elif time.monotonic() - checked >= 1.0:
                checked = time.monotonic()
                if holder and not self._holder_running(holder) \
                        and callcache.take_over(job_id, key, holder, request_id):
                    return None, Lead.LEAD
        return None, Lead.UNKNOWN

    @staticmethod
    def _holder_running(request_id: str) -> bool:
        """Whether the run that leads a call (`{step}:{attempt}:{index}`) still holds its
        step under a live lease."""
        parts = request_id.split(":")
        attempt = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None
        with transaction(read_only=True) as s:
            return steps.running_under_lease(s, parts[0], attempt)

    def _row(self, request_id: str, index: int, spec: CallSpec, key: str | None,
             started_at: datetime | None = None, **fields: Any) -> dict[str, Any]:
        run = self._run
        now = utcnow()
        return {"request_id": request_id, "tenant_id": self._tenant_id, "job_id": run.job_id,
                "step_id": run.step_id, "attempt": run.attempt, "call_index": index,
                "role": self._role, "max_tokens": spec.max_tokens, "call_key": key,
                "turn": spec.turn, "started_at": started_at or now, "created_at": now,
                "settled_late": None, "tool_calls": None, "service_tier": self._tier,
                "power_price": None, "carbon_intensity": None, **fields}

    def _answer_from_cache(self, request_id: str, index: int, spec: CallSpec, key: str,
                           earlier: ModelCall) -> ModelReply:
        """Record the call as answered from the job's call cache: no tokens, no cost."""
        span = traces.call_started()
        row = self._row(request_id, index, spec, key, model=earlier.model,
                        endpoint=earlier.endpoint, prompt_tokens=0, cached_tokens=None,
                        completion_tokens=0, finish_reason=earlier.finish_reason,
                        latency_ms=0.0, ttft_ms=None, attempts=0, cache_hit=None,
                        energy_wh=None, energy_method=None, output_text=earlier.output_text,
                        cost_usd=Decimal(0), cached_from=earlier.request_id,
                        escalated_from=earlier.escalated_from, tool_calls=earlier.tool_calls)
        for attempt in db_retrying(get_settings().settle_retry_s):
            with attempt, transaction() as s:
                self.carry.write(s)
                ledger.record_cached(s, row, again=attempt.retry_state.attempt_number > 1)
        traces.call_ended(span, spec, row)
        return replace(_reply(earlier), prompt_tokens=0, completion_tokens=0, cached=True)

    def _make_call(self, spec: CallSpec, request_id: str, index: int, key: str | None,
                   escalated_from: str | None) -> ModelReply:
        size = self.prompt_size(spec)
        hold = Hold.for_spec(request_id, spec, size.tokens)
        committed = budget.reserve(self._run, hold, self.carry)
        if committed is not None:
            self._committed = committed - hold.tokens
        started_at, span = utcnow(), traces.call_started()
        try:
            completion = self._pool.complete(CompletionRequest(
                call=spec, request_id=request_id, tenant_id=self._tenant_id,
                job_id=self._run.job_id, affinity_key=self._run.job_id,
                cancelled=self.stopped, service_tier=self._admitted_tier()))
        except CallCancelled as exc:
            usage = exc.usage if exc.usage is not None else self._prompt_read(exc, size)
            if usage is not None and exc.model is not None:
                # What the server read and generated before the abort was spent: it is billed.
                row = self._row_of(
                    request_id, index, spec, key, escalated_from, Completion(
                        text="", usage=usage, finish_reason="cancelled", model=exc.model,
                        endpoint=exc.endpoint or "", latency_ms=exc.latency_ms, attempts=1),
                    started_at)
                traces.call_ended(span, spec, row, error="cancelled")
                budget.settle(self._run, row, self.carry)
            else:
                traces.call_ended(span, spec, None, error="cancelled")
                budget.release(self._run, hold, self.carry)
            raise StepStopped("job stopped during a model call") from exc
        except BaseException as exc:
            traces.call_ended(span, spec, None, error=f"{type(exc).__name__}: {exc}")
            budget.release(self._run, hold, self.carry)
            raise
        row = self._row_of(request_id, index, spec, key, escalated_from, completion, started_at)
        traces.call_ended(span, spec, row, chat=completion.chat)
        # Written with the run's next transaction (the next reservation, or the step's end).
        self.carry.add(row)
        self._committed += completion.usage.total_tokens
        return ModelReply(completion.text, completion.finish_reason,
                          completion.usage.prompt_tokens, completion.usage.completion_tokens,
                          model=completion.model, escalated_from=escalated_from,
                          tool_calls=completion.tool_calls)

    @staticmethod
    def _prompt_read(exc: CallCancelled, size: PromptSize) -> Usage | None:
        """What a call cancelled before any usage came is billed: nothing if it was never
        sent; if the server took it, its prompt (which the server may have read), counted
        exactly: by that server's tokenizer for the request it was sent, or as sized before
        the reservation when that count was exact. A prompt known only by its bound from
        bytes (a server without `/tokenize`) is not billed: the bound can be several times
        the real count. Never more than the prompt's part of the call's hold (`size`), so
        the reservation covers the row."""
        if not exc.sent:
            return None
        counted = exc.prompt_tokens if exc.prompt_tokens is not None \
            else size.tokens if size.exact else None
        if counted is None:
            log.info("a call cancelled after it was sent is not billed for its prompt: its "
                     "server could not count it")
            return None
        return Usage(min(counted, size.tokens), 0)

    def _row_of(self, request_id: str, index: int, spec: CallSpec, key: str | None,
                escalated_from: str | None, c: Completion,
                started_at: datetime | None = None) -> dict[str, Any]:
        u = c.usage
        hour = grid.at(utcnow(), c.endpoint)
        cost = scheduling.priced(price_for(c.model).cost(u.prompt_tokens, u.completion_tokens,
                                                         u.cached_tokens or 0), self._tier)
        return self._row(
            request_id, index, spec, key, started_at, model=c.model[:200],
            endpoint=c.endpoint[:300],
            prompt_tokens=u.prompt_tokens, cached_tokens=u.cached_tokens,
            completion_tokens=u.completion_tokens,
            finish_reason=(c.finish_reason or "")[:40] or None, latency_ms=c.latency_ms,
            ttft_ms=c.ttft_ms, attempts=c.attempts,
            cache_hit=None if u.cached_tokens is None else u.cached_tokens > 0,
            energy_wh=c.energy_wh, energy_method=c.energy_method, output_text=c.text,
            cost_usd=cost, cached_from=None, escalated_from=escalated_from,
            tool_calls=encode_tool_calls(c.tool_calls),
            power_price=hour.price if hour else None,
            carbon_intensity=hour.carbon if hour else None)
