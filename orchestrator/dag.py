"""A job's DAG: adding steps, completing a step (expansion, fan-in, finalisation), ending a
step that failed or stopped, and ending the job.

Fan-in is counted in the database: each completed step decrements `deps_remaining` of the steps
that wait for it, and the update that brings one to zero queues it; its message is written to
the outbox in the same transaction and published right after commit. Locks are taken step row
first, then the job row; the job row serialises the completions of one job, so exactly one of
them sees the last step done and finalises.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from decimal import Decimal
from typing import Any

from pydantic import BaseModel
from sqlalchemy.orm import Session

from agents.base import AnyKind, StepOutputs, StepSpec
from core.errors import Conflict
from core.models import JobStatus, ServiceTier, StepStatus
from core.repositories import events, jobs, ledger, outbox, step_deps, steps
from core.repositories.steps import ClaimedStep
from core.settings import get_settings
from orchestrator import scheduling, traces
from orchestrator.budget import Carry, settle_in, usage_events

log = logging.getLogger(__name__)

RUN_STEP_TASK = scheduling.RUN_STEP_TASK
OPENAI_BATCH = "openai_batch"


def add_steps(session: Session, job_id: str, budget: dict[str, Any], specs: list[StepSpec],
              *, tenant_id: str, tier: str, continuing: bool = True, keep: int = 0,
              publish: bool = True, deferred: bool = False) -> tuple[list[str], list[str]]:
    """Insert steps; those whose dependencies are all complete are queued at once, at their
    tier's priority (a new job's first steps after the steps of running jobs of that tier),
    within the tenant's cap (`orchestrator.scheduling`). The others are stored at a running
    job's priority (they become runnable once the job runs; a release from `held` publishes
    them at it). With `keep`, up to that many of the first runnable ones are not published but
    returned, for the caller to run. Without `publish`, the others are returned too, for the
    caller to dispatch. `deferred`: the runnable ones wait for the job's planned start
    (`orchestrator.scheduling.start_deferred`). Returns (kept, queued and not published)."""
    if not specs:
        return [], []
    done = step_deps.completed_keys(session, job_id) if any(s.depends_on for s in specs) else set()
    per_role: dict[str, int] = dict(budget.get("step_max_tokens") or {})
    rows = []
    for spec in specs:
        depends_on = list(dict.fromkeys(spec.depends_on))
        rows.append({"key": spec.key, "role": spec.role.name, "depends_on": depends_on,
                     "deps_remaining": len([d for d in depends_on if d not in done]),
                     "input": dict(spec.input), "spawned_by": spec.spawned_by,
                     "max_tokens": per_role.get(spec.role.name, spec.max_tokens)})
    prio = scheduling.priority(tier, continuing)
    queued = steps.add(session, job_id, rows, tenant_id, prio, deferred,
                       pending_priority=scheduling.priority(tier, True))
    jobs.add_steps_total(session, job_id, len(specs))
    kept, queued = queued[:keep], queued[keep:]
    if not publish:
        return kept, queued
    scheduling.dispatch(session, tenant_id, queued, prio)
    return kept, []


def finish(session: Session, job_id: str, status: JobStatus, *,
           result: dict[str, Any] | None = None, error: tuple[str, str] | None = None) -> None:
    """Move a job to a terminal state, once; unstarted steps are cancelled. An OpenAI batch
    has its output and error files written in the same transaction."""
    kind = jobs.finish(session, job_id, status, result=result, error=error)
    if kind is None:
        return
    if steps.cancel_unstarted(session, job_id):
        # Its queued steps leave the tenant's room in the broker: held steps take it now.
        tenant_id, tier = jobs.tenant_and_tier(session, job_id)
        scheduling.dispatch(session, tenant_id, [], scheduling.priority(tier, True))
    traces.job_ended(session, job_id)
    data: dict[str, Any] = {"status": str(status)}
    if error is not None:
        data["error"] = {"code": error[0], "message": error[1]}
    events.append(session, job_id, f"job.{status}", data)
    if kind == OPENAI_BATCH:
        from orchestrator import openai_batches

        openai_batches.finished(session, job_id, status)


def maybe_finish_stopping(session: Session, job_id: str) -> None:
    """A job that is cancelling ends once no step of it runs any more. An OpenAI batch that
    ended while steps still ran (past its window, out of budget) writes its files once the
    last of them has stopped (with what it finished)."""
    status = jobs.status_of(session, job_id, lock=True)
    if status == JobStatus.CANCELLING \
            and steps.count(session, job_id, [StepStatus.RUNNING]) == 0:
        finish(session, job_id, JobStatus.CANCELLED)
    elif status is not None and JobStatus(status).terminal \
            and jobs.kind_of(session, job_id) == OPENAI_BATCH:
        from orchestrator import openai_batches

        openai_batches.step_stopped(session, job_id)


def complete(session: Session, c: ClaimedStep, kind: AnyKind, job_input: BaseModel,
             output: BaseModel, carry: Carry, keep: int = 0) -> list[str]:
    """Save a run's output, settle the calls it carries, and move the job on. A run that no
    longer holds its step has its calls settled (they were made) but its output refused.

    With `keep`, up to that many steps this completion makes ready are left queued but not
    published, and their ids returned: the caller claims them in this transaction and runs
    them (`orchestrator.runner`; no trip through the broker). A flex job's are all
    published."""
    run = carry.run
    rows = carry.take(session)
    done = steps.finish(session, c.step_id, c.attempt, StepStatus.COMPLETED,
                        output=output.model_dump(mode="json"),
                        usage=(sum(int(r["prompt_tokens"]) for r in rows),
                               sum(int(r["completion_tokens"]) for r in rows), len(rows),
                               rows[-1]["model"] if rows else None))
    if done is None:
        log.warning("step %s: run %d had lost its step; its output is dropped", c.step_id,
                    c.attempt)
        for row in rows:
            settle_in(session, run, row)
        return []
    # The calls settle with the completion: their reservations released, their rows written,
    # their usage added in the same update of the job row that counts the step.
    held: list[tuple[int, Decimal]] = []
    on_time: list[dict[str, Any]] = []
    for row in rows:
        taken = ledger.take(session, row["request_id"])
        if taken is None:  # released with an expired lease: billed only if there is room
            settle_in(session, run, row, step_usage=False)
        else:
            held.append(taken)
            on_time.append(row)
    ledger.insert_calls(session, on_time)
    key, role, prompt_tokens, completion_tokens, model_calls = done
    usage = ledger.Usage.of(on_time, held)
    counted = jobs.step_completed(session, c.job_id, events=len(on_time) + 1,
                                  usage=usage.deltas() if on_time else None)
    new = usage_events(run, on_time, counted.totals) if on_time else []
    if len(new) > len(on_time):  # thresholds crossed: their own cursors
        events.append_many(session, c.job_id, new[len(on_time):])
    events.write(session, c.job_id, counted.hooks, counted.first_seq, [
        *new[:len(on_time)], ("step.completed", {
            "step": key, "role": role,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "model_calls": model_calls}})])
    status, steps_done, total = counted.status, counted.steps_done, counted.steps_total
    if status != JobStatus.RUNNING:
        maybe_finish_stopping(session, c.job_id)
        return []
    c = promoted_since(session, c)
    if kind.decides(job_input, key, kind.role(role), output):
        decide(session, c.job_id, c.step_id, key, kind, job_input)
        # The steps it cancelled leave room for the tenant's held steps.
        scheduling.dispatch(session, c.tenant_id, [], scheduling.priority(c.scheduled_tier, True))
        return []
    # Fan-in first: the steps this completion adds count it as done already. A flex job's
    # next steps go through the broker, behind the work of the tiers above it.
    keep = keep if c.scheduled_tier != ServiceTier.FLEX else 0
    ready = step_deps.fan_in(session, c.job_id, key)
    kept, ready = ready[:keep], ready[keep:]
    try:
        added = kind.expand(job_input, key, kind.role(role), output)
    except Exception as exc:  # noqa: BLE001 - a kind's bug fails its job, not the worker
        log.exception("job %s: expanding after %s failed", c.job_id, key)
        finish(session, c.job_id, JobStatus.FAILED, error=(
            "internal_error", f"planning after step {key} failed: {exc!r}"))
        return []
    if added:
        kept_added, queued = add_steps(session, c.job_id, c.budget, added,
                                       tenant_id=c.tenant_id, tier=c.scheduled_tier,
                                       keep=keep - len(kept), publish=False)
        ready += queued
        kept += kept_added
        total += len(added)
        events.append(session, c.job_id, "plan.ready", {"after": key, "steps": [
            {"key": a.key, "role": a.role.name, "depends_on": list(a.depends_on)}
            for a in added]})
    if steps_done >= total:
        finalise(session, c.job_id, kind, job_input)
        return []
    # One dispatch for all: within the tenant's cap, and releasing held steps into the room
    # this completion made.
    scheduling.dispatch(session, c.tenant_id, ready,
                        scheduling.priority(c.scheduled_tier, True))
    return kept


def suspend(session: Session, c: ClaimedStep, kind: AnyKind | None,
            children: Sequence[StepSpec], waiting_for: Sequence[str],
            spawned_before: int, keep: int = 1) -> list[str]:
    """A run ends waiting for the children it spawned: they are added (queued at once), the
    step depends on them as well and is `pending` until the fan-in of their completions
    queues it again; it holds no lease and no worker meanwhile. The job's cap on spawned
    steps is checked again under the job row's lock, counting the other steps' spawned steps
    and the `spawned_before` this step's transcript holds (as the spawn counted them). Of two
    steps spawning at once, one may find the cap full, and is queued again (its next run,
    replaying its calls, is refused the spawn and tells its model). Returns up to `keep`
    children for the caller to claim and run (none of a flex job's)."""
    if steps.lease_of(session, c.step_id, c.attempt, lock=True) is None:
        return []  # the run lost its step
    status = jobs.status_of(session, c.job_id, lock=True)
    if status != JobStatus.RUNNING:
        traces.step_outcome(StepStatus.CANCELLED)
        end(session, c, StepStatus.CANCELLED, None, None, kind)
        return []
    c = promoted_since(session, c)
    cap = get_settings().spawn_max_per_job
    others = step_deps.count_spawned(session, c.job_id, besides=c.key)
    if children and others + spawned_before + len(children) > cap:
        log.info("step %s: the job's %d spawned steps are taken meanwhile; running it again",
                 c.step_id, cap)
        _requeue(session, c)
        return []
    done = step_deps.completed_keys(session, c.job_id)
    depends_on = list(dict.fromkeys([*c.depends_on, *waiting_for]))
    remaining = len([k for k in depends_on if k not in done])
    if remaining == 0 and not children:  # nothing to wait for after all: run again
        _requeue(session, c)
        return []
    step_deps.wait_for(session, c.step_id, c.attempt, depends_on, remaining)
    kept, _ = add_steps(session, c.job_id, c.budget, list(children), tenant_id=c.tenant_id,
                        tier=c.scheduled_tier,
                        keep=keep if c.scheduled_tier != ServiceTier.FLEX else 0)
    if children:
        events.append(session, c.job_id, "plan.ready", {"after": c.key, "steps": [
            {"key": a.key, "role": a.role.name, "depends_on": list(a.depends_on),
             "spawned_by": a.spawned_by} for a in children]})
    events.append(session, c.job_id, "step.waiting", {
        "step": c.key, "role": c.role, "waiting_for": list(waiting_for)})
    return kept


def promoted_since(session: Session, c: ClaimedStep) -> ClaimedStep:
    """The run's step as its job is scheduled now: a flex job promoted while the step ran
    has the steps it queues or adds, and the step itself queued again, at the promoted
    priority."""
    if c.service_tier == ServiceTier.FLEX and not c.promoted \
            and jobs.is_promoted(session, c.job_id):
        return replace(c, promoted=True)
    return c


def _requeue(session: Session, c: ClaimedStep) -> None:
    """Queue the run's step again, at its tier's priority (fenced on the run)."""
    traces.step_outcome("requeued")
    if steps.requeue_run(session, c.step_id, c.attempt):
        outbox.enqueue_many(session, RUN_STEP_TASK, [{"step_id": c.step_id}],
                            scheduling.priority(c.scheduled_tier, True))


def decide(session: Session, job_id: str, step_id: str, key: str, kind: AnyKind,
           job_input: BaseModel) -> None:
    """Step `key` decided the job: its other steps still to run or running are cancelled
    (a running one's worker notices within a second and aborts its model call) and the job
    ends with its result. Its step total is then the steps it completed: neither those the
    decision cancels nor those a stop ended before (a job continued after a step decided
    it while it was stopping) are counted."""
    cancelled = steps.cancel_others(session, job_id, step_id)
    if cancelled:
        events.append_many(session, job_id, [("step.cancelled", {
            "step": k, "role": r, "reason": f"step {key} decided the job"})
            for k, r in cancelled])
    jobs.recount_steps(session, job_id, decided=True)
    finalise(session, job_id, kind, job_input)


def finalise(session: Session, job_id: str, kind: AnyKind, job_input: BaseModel) -> None:
    """Every step has completed: the job ends `completed` with the result built from all
    of their outputs."""
    outputs = StepOutputs(steps.outputs(session, job_id))
    try:
        result = kind.result(job_input, outputs).model_dump(mode="json")
    except Exception as exc:  # noqa: BLE001 - a kind's bug fails its job, not the worker
        log.exception("job %s: building the result failed", job_id)
        finish(session, job_id, JobStatus.FAILED, error=(
            "internal_error", f"building the result failed: {exc!r}"))
        return
    finish(session, job_id, JobStatus.COMPLETED, result=result)


def reopen(session: Session, job_id: str, kind: AnyKind, job_input: BaseModel,
           budget: dict[str, Any], *, tenant_id: str, tier: str) -> int:
    """Move the DAG of a stopped job on again, once the job (its row locked) is `running` again (or
    `queued`, if it had never started). A step that completed while its job was stopped was
    neither counted in its dependants' fan-in nor expanded: each completed step is expanded now
    (a kind's expansion depends only on the step's output, so the steps it names that exist
    already are left as they are), the fan-in of every step that did not complete is counted
    afresh, and those with nothing left to wait for are queued. A job with nothing left to run
    is finalised, and so is one whose step that completed while it was stopped decides it (the
    first candidate to pass): nothing else runs again. Returns how many steps were queued."""
    completed = StepOutputs(steps.outputs(session, job_id))
    for key in completed.keys():
        role = kind.role(completed.role_of(key))
        output = completed.get(role, key)
        if output is not None and kind.decides(job_input, key, role, output):
            step_id = next(st.id for st in steps.list_for_job(session, job_id) if st.key == key)
            decide(session, job_id, step_id, key, kind, job_input)
            return 0
    ready = step_deps.reopen(session, job_id)
    scheduling.dispatch(session, tenant_id, ready, scheduling.priority(tier, False))
    outputs = StepOutputs(steps.outputs(session, job_id))
    known = steps.keys(session, job_id)
    for key in outputs.keys():
        try:
            role = kind.role(outputs.role_of(key))
            output = outputs.get(role, key)
            assert output is not None
            added = [a for a in kind.expand(job_input, key, role, output) if a.key not in known]
        except Exception as exc:  # noqa: BLE001 - a kind's bug is told, not a 500
            log.exception("job %s: expanding after %s failed", job_id, key)
            raise Conflict(f"the job cannot be continued: planning after step {key} failed: "
                           f"{exc!r}", code="job_not_continuable") from exc
        if not added:
            continue
        known.update(a.key for a in added)
        add_steps(session, job_id, budget, added, tenant_id=tenant_id, tier=tier,
                  continuing=False)
        events.append(session, job_id, "plan.ready", {"after": key, "steps": [
            {"key": a.key, "role": a.role.name, "depends_on": list(a.depends_on)}
            for a in added]})
    done, total = jobs.recount_steps(session, job_id)
    if done >= total:
        finalise(session, job_id, kind, job_input)
    return steps.count(session, job_id, [StepStatus.QUEUED, StepStatus.HELD])


def end(session: Session, c: ClaimedStep, status: StepStatus, error: tuple[str, str] | None,
        job_status: JobStatus | None, kind: AnyKind | None) -> None:
    """End a run that failed or stopped; the job fails (or runs out of budget) with it when
    `job_status` says so. Nothing when the run no longer holds its step."""
    done = steps.finish(session, c.step_id, c.attempt, status,
                        error=error[1] if error else None)
    if done is None:
        return
    if status is StepStatus.CANCELLED and job_status is None \
            and jobs.status_of(session, c.job_id, lock=True) == JobStatus.RUNNING:
        # Stopped because its job stopped, which has been continued since: the step runs
        # again (the next attempt, its finished calls replayed from the ledger).
        if steps.requeue_stopped(session, c.step_id):
            outbox.enqueue_many(session, RUN_STEP_TASK, [{"step_id": c.step_id}],
                                scheduling.priority(promoted_since(session, c).scheduled_tier,
                                                    True))
        return
    events.append(session, c.job_id, f"step.{status}", {
        "step": c.key, "role": c.role, **({"error": error[1]} if error else {})})
    current = jobs.status_of(session, c.job_id, lock=True)
    if job_status is JobStatus.BUDGET_EXHAUSTED and current == JobStatus.RUNNING \
            and kind is not None:
        job_input = kind.parse_input(c.job_input)
        try:
            partial: dict[str, Any] | None = kind.partial_result(
                job_input, StepOutputs(steps.outputs(session, c.job_id)))
        except Exception:  # noqa: BLE001 - a kind's bug must not keep the step running
            log.exception("job %s: building the partial result failed", c.job_id)
            partial = None
        finish(session, c.job_id, JobStatus.BUDGET_EXHAUSTED, result=partial, error=error)
    elif job_status is not None and current == JobStatus.RUNNING and error is not None:
        finish(session, c.job_id, job_status, error=error)
    maybe_finish_stopping(session, c.job_id)
