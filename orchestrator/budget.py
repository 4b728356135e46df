"""Budget reservation and settlement of model calls.

Before a call, an upper bound of its tokens (prompt bytes plus `max_tokens`) and of its cost is
reserved against the job with one conditional update, in the same transaction as the
reservation's own row and a fenced check that the run still holds its step. After the call, one
transaction writes the ledger row, releases the reservation, adds the usage to job and step and
appends the `job.usage` event. Spend can therefore never pass the budget, and a call is billed
once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from sqlalchemy.orm import Session

from agents.base import StepStopped
from core.db import after_commit, on_rollback, transaction
from core.db_errors import db_retrying
from core.errors import AgentqError
from core.pricing import highest_price
from core.repositories import events, ledger
from core.repositories.ledger import Budget, Reserved
from core.settings import get_settings
from inference.calls import CallSpec
from inference.transcript import plain_bound, prompt_bound

log = logging.getLogger(__name__)

# How long a call waits for other calls of its job to settle before the budget counts as spent.
RESERVATION_WAIT_S = 120.0


class BudgetExhausted(AgentqError):
    code = "budget_exhausted"


@dataclass(frozen=True)
class Hold:
    """What one call holds reserved against its job."""

    request_id: str
    tokens: int
    cost: Decimal

    @staticmethod
    def for_call(request_id: str, prompt: str, max_tokens: int) -> Hold:
        """A plain prompt's hold on a completions model."""
        call = CallSpec(prompt=prompt, max_tokens=max_tokens)
        return Hold.for_spec(request_id, call, plain_bound(call))

    @staticmethod
    def for_spec(request_id: str, call: CallSpec, bound: int | None = None) -> Hold:
        """`bound`: of the prompt's tokens, when known better than for any model (every token
        is at least one byte, plus special tokens: `prompt_bound`)."""
        assert call.max_tokens is not None
        tokens = (bound if bound is not None else prompt_bound(call)) + call.max_tokens
        return Hold(request_id, tokens,
                    highest_price().cost(tokens - call.max_tokens, call.max_tokens))


@dataclass(frozen=True)
class Run:
    """The run a call belongs to: its fencing token is `attempt`."""

    job_id: str
    step_id: str
    attempt: int
    budget: Budget


@dataclass
class Carry:
    """Settlements a run defers to its next transaction: a finished call's ledger row is
    written with the next call's reservation, or with the step's completion, instead of in a
    transaction of its own. A row that no transaction of its run takes within
    `CARRY_FLUSH_S` (the agent is busy with something else) is written by the flusher
    (`orchestrator.watchers.carries`). `after`: what to do once they are committed (mark a
    call cache entry answered)."""

    run: Run
    rows: list[dict[str, Any]] = field(default_factory=list)
    after: list[Callable[[], None]] = field(default_factory=list)
    since: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    # The run has ended: once written, nothing more comes.
    closed: bool = False

    def add(self, row: dict[str, Any]) -> None:
        with self.lock:
            if not self.rows:
                self.since = time.monotonic()
            self.rows.append(row)

    def add_after(self, action: Callable[[], None]) -> None:
        """Run `action` once what is carried now has been committed."""
        with self.lock:
            self.after.append(action)
            if not self.rows:
                self.since = time.monotonic()

    def write(self, session: Session) -> None:
        """Write what is carried in this transaction."""
        for row in self.take(session):
            settle_in(session, self.run, row)

    def take(self, session: Session) -> list[dict[str, Any]]:
        """The carried rows, for the transaction of `session` to write. What it takes is no
        longer carried (a concurrent writer does not take it too), and is given back if the
        transaction rolls back, to be written by the next."""
        with self.lock:
            rows, after = self.rows, self.after
            self.rows, self.after = [], []
        if not rows and not after:
            return []

        def undo() -> None:
            with self.lock:
                self.rows[:0], self.after[:0] = rows, after
                self.since = time.monotonic()

        def done() -> None:
            for action in after:
                action()

        on_rollback(session, f"carry.{id(self)}", undo)
        after_commit(session, f"carry.{id(self)}", done)
        return rows

    def due(self, now: float) -> bool:
        return bool(self.rows or self.after) and now - self.since >= CARRY_FLUSH_S


# How long a finished call's ledger row may wait for its run's next transaction.
CARRY_FLUSH_S = 0.2


def reserve(run: Run, hold: Hold, carry: Carry | None = None) -> int | None:
    """Reserve; while other calls of the job hold reservations that may yet settle below
    their bound, wait for them instead of giving up on budget that is not really spent.
    Returns the job's committed tokens (spent and reserved, this hold's included) as the
    reservation left them, when known."""
    deadline = time.monotonic() + RESERVATION_WAIT_S
    delay = 0.02
    while True:
        for attempt in db_retrying():
            with attempt, transaction() as s:
                if carry is not None:
                    carry.write(s)
                got, committed = ledger.reserve(
                    s, request_id=hold.request_id, job_id=run.job_id, step_id=run.step_id,
                    attempt=run.attempt, tokens=hold.tokens, cost=hold.cost,
                    budget=run.budget, again=attempt.retry_state.attempt_number > 1)
        if got is Reserved.OK:
            return committed
        if got is Reserved.STALE:
            raise StepStopped("this run no longer holds its step")
        with transaction(read_only=True) as s:
            status, spent_tokens, spent_cost = ledger.spent(s, run.job_id)
            in_flight = ledger.reserved_in_flight(s, run.job_id)
        if got is Reserved.STOPPED:
            raise StepStopped(f"job is {status}")
        b = run.budget
        if not in_flight and _fits(b, spent_tokens, spent_cost, hold) \
                and time.monotonic() <= deadline:
            continue  # a call settled between the attempt and this read: room came back
        if not in_flight or time.monotonic() > deadline:
            spent = [f"{spent_tokens} of {b.max_total_tokens} tokens"] \
                if b.max_total_tokens else []
            if b.max_cost_usd is not None:
                spent.append(f"${spent_cost:.6f} of ${b.max_cost_usd}")
            raise BudgetExhausted(
                f"budget exhausted: spent {' and '.join(spent)}; the next model call could "
                f"need up to {hold.tokens} tokens (${hold.cost:.6f})")
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


def _fits(budget: Budget, spent_tokens: int, spent_cost: Decimal, hold: Hold) -> bool:
    """Whether `hold` fits what the job has spent, with nothing else in flight."""
    return (budget.max_total_tokens is None
            or spent_tokens + hold.tokens <= budget.max_total_tokens) \
        and (budget.max_cost_usd is None or spent_cost + hold.cost <= budget.max_cost_usd)


def release(run: Run, hold: Hold, carry: Carry | None = None) -> None:
    """Give a reservation back unused (the call was not made, or failed without usage)."""
    for attempt in db_retrying(get_settings().settle_retry_s):
        with attempt, transaction() as s:
            if carry is not None:
                carry.write(s)
            ledger.release(s, hold.request_id, run.job_id)


def settle(run: Run, row: dict[str, Any], carry: Carry | None = None) -> None:
    """Write a finished call's ledger row and settle its reservation now. Retried through a
    database outage for up to `settle_retry_s`: the call is never made again meanwhile."""
    for attempt in db_retrying(get_settings().settle_retry_s):
        with attempt, transaction() as s:
            if carry is not None:
                carry.write(s)
            settle_in(s, run, row)


def settle_in(s: Session, run: Run, row: dict[str, Any], step_usage: bool = True) -> None:
    """Write a finished call's ledger row, settle its reservation and append `job.usage`, in
    the transaction of `s`."""
    totals = ledger.settle(s, row, events=1, budget=run.budget, step_usage=step_usage)
    if totals is None:
        log.error("call %s was not billed: it finished after its run had lost its "
                  "step, and the budget has no room (or it was written already)",
                  row["request_id"])
        return
    spent_tokens = totals.prompt_tokens + totals.completion_tokens
    usage = {"prompt_tokens": totals.prompt_tokens,
             "completion_tokens": totals.completion_tokens,
             "total_tokens": spent_tokens, "model_calls": totals.model_calls,
             "cost_usd": float(totals.cost_usd)}
    events.write(s, run.job_id, totals.hooks, totals.first_seq, [("job.usage", usage)])
    call_tokens = int(row["prompt_tokens"]) + int(row["completion_tokens"])
    crossed = _thresholds("tokens", Decimal(spent_tokens - call_tokens),
                          Decimal(spent_tokens), run.budget.max_total_tokens)
    crossed += _thresholds("cost_usd", totals.cost_usd - Decimal(row["cost_usd"] or 0),
                           totals.cost_usd, run.budget.max_cost_usd)
    if crossed:
        events.append_many(s, run.job_id, crossed)


def usage_events(run: Run, rows: list[dict[str, Any]],
                 totals: tuple[int, int, int, Decimal]) -> list[events.Event]:
    """`job.usage` after each of `rows` (settled together, ending at `totals`), then any
    `budget.threshold` they crossed."""
    prompt, completion, calls, cost = totals
    out: list[events.Event] = []
    for row in reversed(rows):
        out.append(("job.usage", {"prompt_tokens": prompt, "completion_tokens": completion,
                                  "total_tokens": prompt + completion, "model_calls": calls,
                                  "cost_usd": float(cost)}))
        prompt -= int(row["prompt_tokens"])
        completion -= int(row["completion_tokens"])
        calls -= 1
        cost -= Decimal(row["cost_usd"] or 0)
    out.reverse()
    end = totals[0] + totals[1]
    out += _thresholds("tokens", Decimal(prompt + completion), Decimal(end),
                       run.budget.max_total_tokens)
    out += _thresholds("cost_usd", cost, totals[3], run.budget.max_cost_usd)
    return out


def _thresholds(budget: str, before: Decimal, after: Decimal, limit: int | Decimal | None
                ) -> list[events.Event]:
    """A `budget.threshold` event for each threshold this call crossed (settlements of one
    job are serialised by its row lock, so exactly one call crosses each)."""
    if not limit:
        return []
    out: list[events.Event] = []
    for fraction in get_settings().budget_thresholds:
        mark = Decimal(str(fraction)) * Decimal(limit)
        if before < mark <= after:
            out.append(("budget.threshold", {"budget": budget, "threshold": fraction,
                                             "spent": float(after), "limit": float(limit)}))
    return out
