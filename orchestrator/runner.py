"""Running one step: claim it, run its agent in a metered context, save its output.

1. The claim is one guarded update (`queued`, or `running` with an expired lease) that takes
   the next attempt (the run's fencing token) and returns what the run needs of step and job;
   the same transaction appends `step.started` and reads the parents' outputs.
2. The agent runs; its model calls are metered by `orchestrator.metering`.
3. One transaction saves the output, counts fan-in and queues the dependants
   (`orchestrator.dag.complete`), fenced on the attempt. A step that spawned sub-agents
   instead ends waiting for them (`orchestrator.dag.suspend`): it is `pending` on its
   children, and their fan-in queues it again.
4. Steps that became ready are claimed in that same transaction: one runs next in the same
   thread, straight after the commit, and as many more as the process has free slots run in
   threads of its own (`orchestrator.slots`); the rest are published to the broker for other
   workers. A job's chain of steps, and its fan-out, thus move on without a trip through the
   broker and without a transaction of their own for the claim: a dependant starts in the
   transaction that finishes its last dependency.

A transient database error never fails the job: the step is handed back (or its lease left to
expire) and run again, replaying the calls it had finished.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from threading import Lock
from typing import TypeVar

from pydantic import BaseModel
from sqlalchemy.orm import Session

from agents.base import AgentError, AnyKind, StepOutputs, StepSuspended
from agents.registry import get_kind
from core import tracing
from core.db import transaction
from core.db_errors import TRANSIENT_DB_ERRORS, db_retrying
from core.errors import AgentqError
from core.models import JobStatus, StepStatus
from core.repositories import events, jobs, ledger, outbox, steps
from core.repositories.ledger import Budget
from core.repositories.steps import ClaimedStep
from core.settings import get_settings
from inference.pool import Pool, get_pool
from orchestrator import dag, scheduling, traces
from orchestrator import slots as local_slots
from orchestrator.budget import BudgetExhausted, Carry, Run, StepStopped
from orchestrator.metering import MeteredContext
from orchestrator.watchers import carries, leases, stopping

log = logging.getLogger(__name__)
T = TypeVar("T")


Claimed = tuple[ClaimedStep, StepOutputs]


def _claim(step_id: str) -> Claimed | None:
    """Claim the step; None when there is nothing to run (taken, done, or its job stopped)."""
    with transaction() as s:
        found = _claim_in(s, [step_id])
    return found[0] if found else None


def _claim_in(s: Session, step_ids: Sequence[str]) -> list[Claimed]:
    """Claim these steps in the caller's transaction: those there is something to run for.
    The steps of one job have their `step.started` events in one insert (one update of the job
    row for their cursors) and their parents' outputs read in one query."""
    taken: dict[str, list[ClaimedStep]] = {}
    for step_id in step_ids:
        c = steps.claim(s, step_id, get_settings().step_lease_seconds)
        if c is None:
            continue
        if c.attempt > 1:
            # An earlier run died: its reservations that expired are released now.
            ledger.release_expired(s, 1000, step_id=step_id)
        if c.job_status not in (JobStatus.QUEUED, JobStatus.RUNNING):
            # Read again under the job row's lock: a claim that waited for a continuation
            # of the job to commit saw the job as it was before.
            found = jobs.get(s, c.job_id, lock=True)
            if found is None or found.status not in (JobStatus.QUEUED, JobStatus.RUNNING):
                steps.mark_cancelled(s, step_id, c.attempt)
                dag.maybe_finish_stopping(s, c.job_id)
                continue
            c = replace(c, job_status=found.status, budget=dict(found.budget or {}))
        taken.setdefault(c.job_id, []).append(c)
    claimed: list[Claimed] = []
    for job_id, group in taken.items():
        kind = get_kind(group[-1].kind)
        role = group[-1].role
        phase = kind.phases.get(role, role) if kind is not None else role
        seq, hooks, started = jobs.started_step(
            s, job_id, phase, any(c.job_status == JobStatus.QUEUED for c in group), len(group))
        new: list[events.Event] = [("job.started", {})] if started else []
        new += [("step.started", {"step": c.key, "role": c.role}) for c in group]
        events.write(s, job_id, hooks, seq, new)
        wanted = list(dict.fromkeys(k for c in group for k in c.depends_on))
        outputs = steps.outputs(s, job_id, wanted) if wanted else {}
        for c in group:
            mine = set(c.depends_on)
            claimed.append((c, StepOutputs({k: v for k, v in outputs.items() if k in mine})))
    return claimed


_inputs: OrderedDict[tuple[str, str], BaseModel] = OrderedDict()
_inputs_lock = Lock()


def _job_input(kind: AnyKind, c: ClaimedStep) -> BaseModel:
    """The job's parsed input, kept for the job's other steps in this process."""
    key = (c.job_id, c.kind)
    with _inputs_lock:
        found = _inputs.get(key)
        if found is not None:
            _inputs.move_to_end(key)
            return found
    parsed = kind.parse_input(c.job_input)
    with _inputs_lock:
        _inputs[key] = parsed
        while len(_inputs) > 256:
            _inputs.popitem(last=False)
    return parsed


def run_step(step_id: str, pool: Pool | None = None, link: str | None = None) -> None:
    """Run the step, then, in the same thread, a step its completion made ready and claimed,
    and so on (the others it claimed run on this process's free slots, the rest go through
    the broker). `link`: the traceparent of the span that published the step, if its message
    had one."""
    claiming = tracing.now_ns()
    _run_chain(_claim(step_id), claiming, pool or get_pool(), link)


def _run_chain(claimed: Claimed | None, claiming: int, pool: Pool, link: str | None) -> None:
    while claimed is not None:
        claimed, claiming, link = _run_one(claimed, claiming, pool, link)


def _run_one(claimed: Claimed, claiming: int, pool: Pool, link: str | None
             ) -> tuple[Claimed | None, int, str | None]:
    """Run a claimed step; the next one its completion claimed, when it did."""
    c, parents = claimed
    leases.add(c.step_id, c.attempt)
    stopping.add(c.job_id, (c.step_id, c.attempt))
    try:
        with traces.step(c, claiming, link):
            following = _run(c, parents, pool)
            # The step made ready here (if any) is linked to this one.
            return following, tracing.now_ns(), tracing.current_traceparent()
    finally:
        stopping.remove(c.job_id, (c.step_id, c.attempt))
        leases.remove(c.step_id, c.attempt)


def _run(c: ClaimedStep, parents: StepOutputs, pool: Pool) -> Claimed | None:
    kind = get_kind(c.kind)
    run = Run(c.job_id, c.step_id, c.attempt, Budget.of(c.budget))
    carry = Carry(run)
    carries.watch(carry)
    try:
        return _run_agent(c, parents, pool, run, carry, kind)
    finally:
        # What its last transaction could not write stays with the flusher until written.
        carry.closed = True
        if not (carry.rows or carry.after):
            carries.unwatch(carry)


def _run_agent(c: ClaimedStep, parents: StepOutputs, pool: Pool, run: Run, carry: Carry,
               kind: AnyKind | None) -> Claimed | None:
    """Run the agent and record how the run ended; the step claimed to run next here."""
    try:
        if kind is None:
            raise AgentError(f"this worker does not know job kind {c.kind!r}")
        job_input = _job_input(kind, c)
        role = kind.role(c.role)
        ctx = MeteredContext(
            run=run,
            tenant_id=c.tenant_id, step_key=c.key, role=c.role, step_input=c.input,
            max_tokens=c.max_tokens, parents=parents, pool=pool,
            job_tokens_committed=c.job_tokens_committed, spawns=role.spawns,
            step_budgets=c.budget.get("step_max_tokens"), service_tier=c.service_tier,
            scheduled_tier=c.scheduled_tier)
        ctx.carry = carry
        output = kind.run_step(ctx, job_input)
        if not isinstance(output, role.output):
            raise AgentError(f"a {c.role} step returned {type(output).__name__}, not "
                             f"{role.output.__name__}")
    except StepSuspended as waits:
        # It spawned children: it waits for them, holding no lease and no worker.
        children, waiting_for = waits.children, waits.waiting_for
        before = waits.spawned_before
        traces.step_outcome("suspended")
        return _move_on(run, carry, pool, lambda s, keep: dag.suspend(
            s, c, kind, children, waiting_for, before, keep=keep))
    except StepStopped:
        _end(c, run, carry, StepStatus.CANCELLED, None, None, kind)
    except BudgetExhausted as exc:
        _end(c, run, carry, StepStatus.FAILED, (exc.code, exc.message),
             JobStatus.BUDGET_EXHAUSTED, kind)
    except TRANSIENT_DB_ERRORS as exc:
        if c.attempt >= get_settings().step_db_retries:
            log.error("step %s met database errors in %d runs: %s", c.step_id, c.attempt, exc)
            _end(c, run, carry, StepStatus.FAILED, (
                "database_unavailable", f"step {c.role} failed: the database kept failing "
                f"({exc.__class__.__name__})"), JobStatus.FAILED, kind)
        else:
            log.warning("step %s met a database error; running it again: %s", c.step_id, exc)
            traces.step_outcome("requeued")
            _hand_back(c, run, carry)
    except (AgentqError, AgentError) as exc:
        code = exc.code
        message = exc.message if isinstance(exc, AgentqError) else str(exc)
        log.warning("step %s failed: %s", c.step_id, message)
        _end(c, run, carry, StepStatus.FAILED, (code, f"step {c.role} failed: {message}"),
             JobStatus.FAILED, kind)
    except Exception as exc:
        log.exception("step %s crashed", c.step_id)
        _end(c, run, carry, StepStatus.FAILED,
             ("internal_error", f"step {c.role} failed: {exc!r}"), JobStatus.FAILED, kind)
    else:
        assert kind is not None
        traces.step_outcome(StepStatus.COMPLETED)
        return _move_on(run, carry, pool, lambda s, keep: dag.complete(
            s, c, kind, job_input, output, carry, keep=keep), write_carry=False)
    return None


def _move_on(run: Run, carry: Carry, pool: Pool, moves: Callable[[Session, int], list[str]],
             write_carry: bool = True) -> Claimed | None:
    """A run's last transaction (`moves`, given how many of the steps it makes ready to keep),
    claiming in it the steps it kept: the first is returned, to run next in this thread; the
    others run on free slots of this process (`orchestrator.slots`), taken before."""
    slots = local_slots.current()
    extra = slots.try_take(get_settings().worker_local_fanout) if slots is not None else 0
    try:
        claimed = _in_transaction(run, carry, lambda s: _claim_in(s, moves(s, 1 + extra)),
                                  write_carry)
    except BaseException:
        if slots is not None:
            slots.give(extra)
        raise
    if slots is None:
        return claimed[0] if claimed else None
    others = claimed[1:]
    slots.give(extra - len(others))
    link = tracing.current_traceparent()
    for other in others:
        slots.run(partial(_run_chain, other, tracing.now_ns(), pool, link))
    return claimed[0] if claimed else None


def _end(c: ClaimedStep, run: Run, carry: Carry, status: StepStatus,
         error: tuple[str, str] | None, job_status: JobStatus | None,
         kind: AnyKind | None) -> None:
    traces.step_outcome(status, error[1] if error else None)
    _in_transaction(run, carry, lambda s: dag.end(s, c, status, error, job_status, kind))


def _in_transaction(run: Run, carry: Carry, work: Callable[[Session], T],
                    write_carry: bool = True) -> T:
    """A run's last write, with the settlements it carries, kept through a database outage
    for up to `settle_retry_s`."""
    for attempt in db_retrying(get_settings().settle_retry_s):
        with attempt, transaction() as s:
            if write_carry:
                carry.write(s)
            result = work(s)
    return result


def _hand_back(c: ClaimedStep, run: Run, carry: Carry) -> None:
    """Queue the step again (fenced on this run), to run once the database answers; if it
    does not answer now, the lease runs out and the sweeper queues it."""
    try:
        for attempt in db_retrying(get_settings().settle_retry_s):
            with attempt, transaction() as s:
                carry.write(s)
                if steps.requeue_run(s, c.step_id, c.attempt):
                    tier = dag.promoted_since(s, c).scheduled_tier
                    outbox.enqueue_many(s, dag.RUN_STEP_TASK, [{"step_id": c.step_id}],
                                        scheduling.priority(tier, True))
    except TRANSIENT_DB_ERRORS as exc:
        log.warning("could not hand step %s back (%s); its lease will run out", c.step_id, exc)
