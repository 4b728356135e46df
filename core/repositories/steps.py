"""Steps: claims under a lease, fenced writes, and the sweepers' queries (fan-in and the other
dependencies between steps: `core.repositories.step_deps`).

Every claim takes the next `attempt`, the run's fencing token; every write a run makes is
conditional on the step still being `running` at that attempt, so a run whose lease passed to
another is refused. Leases are judged on the database's clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import String, and_, bindparam, func, insert, or_, select, tuple_, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session

from core.db import Prebuilt, clock_param, db_now, is_postgres, now_param, now_params
from core.ids import new_id
from core.models import Step, StepStatus, jobs_table, steps_table, utcnow

_NO_SYNC = {"synchronize_session": False}


@dataclass(frozen=True)
class ClaimedStep:
    """A step claimed for a run, with what running it needs of its job."""

    step_id: str
    job_id: str
    key: str
    role: str
    attempt: int
    max_tokens: int
    input: dict[str, Any]
    depends_on: list[str]
    tenant_id: str
    kind: str
    job_status: str
    job_input: dict[str, Any]
    budget: dict[str, Any]
    # The job's tokens spent and reserved when the step was claimed.
    job_tokens_committed: int = 0
    # When the step was last queued, and the traceparent of its job's span (None: untraced).
    enqueued_at: datetime | None = None
    trace_context: str | None = None
    # The tier the job bought (its price) and whether it was promoted (to meet its deadline):
    # `scheduled_tier` is the one that orders its work.
    service_tier: str = "standard"
    promoted: bool = False

    @property
    def scheduled_tier(self) -> str:
        return "promoted" if self.promoted and self.service_tier == "flex" else self.service_tier


S = steps_table.c
_STEP_COLS = (S.job_id, S.key, S.role, S.attempt, S.max_tokens, S.input, S.depends_on,
              S.enqueued_at)
_JOB_COLS = (jobs_table.c.tenant_id, jobs_table.c.kind, jobs_table.c.status, jobs_table.c.input,
             jobs_table.c.budget, jobs_table.c.prompt_tokens + jobs_table.c.completion_tokens
             + jobs_table.c.reserved_tokens, jobs_table.c.trace_context,
             jobs_table.c.service_tier, jobs_table.c.promoted_at)
_N_STEP = len(_STEP_COLS)


def _claim(postgres: bool) -> Any:
    now = now_param(postgres)
    claimable = or_(S.status == StepStatus.QUEUED,
                    and_(S.status == StepStatus.RUNNING, S.lease_expires_at < now))
    stmt = update(steps_table).where(S.id == bindparam("p_id"), claimable).values(
        status=StepStatus.RUNNING, attempt=S.attempt + 1, started_at=clock_param(postgres),
        finished_at=None,
        lease_expires_at=now_param(postgres, "lease"))
    if postgres:
        return stmt.where(jobs_table.c.id == S.job_id).returning(*_STEP_COLS, *_JOB_COLS)
    return stmt.returning(*_STEP_COLS)  # SQLite's RETURNING sees only the updated table


_CLAIM = Prebuilt(_claim)
_JOB_OF_CLAIM = Prebuilt(lambda _: select(*_JOB_COLS).where(jobs_table.c.id == bindparam("p_job")))


def claim(session: Session, step_id: str, lease_s: float) -> ClaimedStep | None:
    """Take the step for a run: one guarded update (`queued`, or `running` with an expired
    lease) that returns what the run needs. None: someone else has it, or it is done."""
    row = _CLAIM.execute(session, {"p_id": step_id, **now_params(lease=lease_s)}
                          ).first()
    if row is None:
        return None
    if is_postgres(session):
        step, job = row[:_N_STEP], row[_N_STEP:]
    else:
        step = tuple(row)
        job = tuple(_JOB_OF_CLAIM.execute(session, {"p_job": step[0]}).one())
    return ClaimedStep(step_id, step[0], step[1], step[2], int(step[3]), int(step[4]),
                       dict(step[5] or {}), list(step[6] or []), job[0], job[1], job[2],
                       dict(job[3] or {}), dict(job[4] or {}), int(job[5] or 0),
                       step[7], job[6], str(job[7] or "standard"), job[8] is not None)


def lease_of(session: Session, step_id: str, attempt: int, lock: bool = False
             ) -> datetime | None:
    """When the lease of run `attempt` expires; None when the run no longer holds the step.
    `lock` keeps a share lock on the row to the end of the transaction, so no claim can take
    it meanwhile."""
    q = select(S.lease_expires_at).where(S.id == step_id, S.attempt == attempt,
                                            S.status == StepStatus.RUNNING)
    if lock:
        q = q.with_for_update(read=True)
    return session.scalar(q)


_FINISH = Prebuilt(lambda postgres: update(steps_table).where(
    S.id == bindparam("p_id"), S.attempt == bindparam("p_attempt"),
    S.status == StepStatus.RUNNING,
).values(status=bindparam("p_status", type_=String),
         output=bindparam("p_output", type_=S.output.type),
         error=bindparam("p_error", type_=String), finished_at=clock_param(postgres),
         lease_expires_at=None,
         prompt_tokens=S.prompt_tokens + bindparam("p_prompt"),
         completion_tokens=S.completion_tokens + bindparam("p_completion"),
         model_calls=S.model_calls + bindparam("p_calls"),
         model=func.coalesce(bindparam("p_model", type_=String), S.model),
         ).returning(S.key, S.role, S.prompt_tokens, S.completion_tokens, S.model_calls))


def finish(session: Session, step_id: str, attempt: int, status: StepStatus, *,
           output: dict[str, Any] | None = None, error: str | None = None,
           usage: tuple[int, int, int, str | None] = (0, 0, 0, None)
           ) -> tuple[str, str, int, int, int] | None:
    """End the run `attempt` of the step, adding `usage` (prompt tokens, completion tokens,
    calls, last model) of calls settled with it; None when the run no longer holds the step
    (the write is refused). Returns the step's key, role and usage."""
    prompt, completion, calls, model = usage
    row = _FINISH.execute(session, {
        "p_id": step_id, "p_attempt": attempt, "p_status": status.value, "p_output": output,
        "p_error": error, "p_prompt": prompt, "p_completion": completion, "p_calls": calls,
        "p_model": model if calls else None, **now_params()}).first()
    if row is None:
        return None
    return str(row[0]), str(row[1]), int(row[2]), int(row[3]), int(row[4])


def add_usage(session: Session, step_id: str, prompt_tokens: int, completion_tokens: int,
              model: str | None) -> None:
    session.execute(update(steps_table).where(S.id == step_id).values(
        prompt_tokens=S.prompt_tokens + prompt_tokens,
        completion_tokens=S.completion_tokens + completion_tokens,
        model_calls=S.model_calls + 1,
        **({"model": model} if model else {})))


def renew_leases(session: Session, runs: Sequence[tuple[str, int]], until: Any
                 ) -> set[tuple[str, int]]:
    """Extend the leases of these runs to `until`; returns the runs that still hold their
    steps (the others passed on)."""
    if not runs:
        return set()
    return {(str(i), int(a)) for i, a in session.execute(update(steps_table).where(
        tuple_(S.id, S.attempt).in_(list(runs)), S.status == StepStatus.RUNNING,
    ).values(lease_expires_at=until).returning(S.id, S.attempt))}


def add(session: Session, job_id: str, rows: Sequence[dict[str, Any]], tenant_id: str,
        priority: int, deferred: bool = False, pending_priority: int | None = None
        ) -> list[str]:
    """Insert steps (`key`, `role`, `depends_on`, `deps_remaining`, `input`, `max_tokens`)
    of the tenant's job, to be published at `priority`; those with nothing to wait for are
    queued (`deferred`: they wait for their job's planned start). Those that wait for other
    steps are published at `pending_priority` (when given) once those complete: their job
    has started by then. Returns the ids of the queued ones."""
    runnable = StepStatus.DEFERRED if deferred else StepStatus.QUEUED
    now = utcnow()
    values = []
    for i, r in enumerate(rows):
        ready = r["deps_remaining"] == 0
        # Distinct creation times keep the order the kind gave its steps.
        values.append({**r, "id": new_id("stp"), "job_id": job_id, "tenant_id": tenant_id,
                       "priority": priority if ready or pending_priority is None
                       else pending_priority,
                       "created_at": now + timedelta(microseconds=i),
                       "status": runnable if ready else StepStatus.PENDING,
                       "enqueued_at": now if ready and not deferred else None, "attempt": 0,
                       "prompt_tokens": 0, "completion_tokens": 0, "model_calls": 0})
    if values:
        session.execute(insert(Step), values)
    return [v["id"] for v in values if v["status"] == StepStatus.QUEUED]


def _outputs(postgres: bool) -> Any:
    # On Postgres `= ANY(array)`: one plan whatever the number of keys (`core.direct`).
    keys = S.key == func.any(bindparam("p_keys", type_=ARRAY(String))) if postgres \
        else S.key.in_(bindparam("p_keys", expanding=True))
    return select(S.key, S.role, S.output).where(
        S.job_id == bindparam("p_job"), S.status == StepStatus.COMPLETED, keys,
    ).order_by(S.created_at, S.key)


_OUTPUTS = Prebuilt(_outputs)


def outputs(session: Session, job_id: str, keys: Sequence[str] | None = None
            ) -> dict[str, tuple[str, dict[str, Any] | None]]:
    """Completed steps' outputs (`{key: (role, output)}`) in step order; only `keys` if given."""
    if keys is not None:
        if not keys:
            return {}
        found = _OUTPUTS.execute(session, {"p_job": job_id, "p_keys": list(keys)})
        return {k: (r, o) for k, r, o in found}
    q = select(S.key, S.role, S.output).where(S.job_id == job_id,
                                                       S.status == StepStatus.COMPLETED)
    return {k: (r, o) for k, r, o in session.execute(q.order_by(S.created_at, S.key))}


def count(session: Session, job_id: str, statuses: Sequence[StepStatus]) -> int:
    return int(session.scalar(select(func.count()).select_from(Step).where(
        S.job_id == job_id, S.status.in_(list(statuses)))) or 0)


_COUNT_QUEUED = Prebuilt(lambda _: select(func.count()).select_from(steps_table).where(
    S.job_id == bindparam("p_job"), S.status == StepStatus.QUEUED))
_CANCEL_UNSTARTED = Prebuilt(lambda postgres: update(steps_table).where(
    S.job_id == bindparam("p_job"),
    or_(*(S.status == s for s in (StepStatus.PENDING, StepStatus.QUEUED, StepStatus.HELD,
                                  StepStatus.DEFERRED))),
).values(status=StepStatus.CANCELLED, finished_at=clock_param(postgres)))


def cancel_unstarted(session: Session, job_id: str) -> int:
    """Cancel the job's steps that have not started; returns how many of them were queued
    (in the broker, counted against the tenant's cap)."""
    params = {"p_job": job_id, "p_now": utcnow()}
    queued = int(_COUNT_QUEUED.execute(session, params).scalar() or 0)
    _CANCEL_UNSTARTED.execute(session, params)
    return queued


def cancel_others(session: Session, job_id: str, step_id: str) -> list[tuple[str, str]]:
    """Cancel every step of the job but `step_id` that is still to run or running (a run
    then no longer holds its step: its writes are refused and it stops). Returns the keys
    and roles of the steps cancelled."""
    return [(str(k), str(r)) for k, r in session.execute(update(steps_table).where(
        S.job_id == job_id, S.id != step_id,
        S.status.in_((StepStatus.PENDING, StepStatus.QUEUED, StepStatus.HELD,
                      StepStatus.DEFERRED, StepStatus.RUNNING)),
    ).values(status=StepStatus.CANCELLED, finished_at=utcnow(), lease_expires_at=None)
        .returning(S.key, S.role))]


def held(session: Session, runs: Sequence[tuple[str, int]]) -> set[tuple[str, int]]:
    """Of these runs (step id, attempt), those that still hold their steps."""
    if not runs:
        return set()
    return {(str(i), int(a)) for i, a in session.execute(select(S.id, S.attempt).where(
        tuple_(S.id, S.attempt).in_(list(runs)), S.status == StepStatus.RUNNING))}


def mark_cancelled(session: Session, step_id: str, attempt: int) -> None:
    session.execute(update(steps_table).where(S.id == step_id, S.attempt == attempt).values(
        status=StepStatus.CANCELLED, finished_at=utcnow(), lease_expires_at=None)
        )


def requeue_expired(session: Session, limit: int) -> list[tuple[str, int | None]]:
    """Steps still `running` after their lease expired (their run vanished), queued again;
    rows another sweeper holds are skipped."""
    now = db_now(session)
    ids = list(session.scalars(select(Step.id).where(
        Step.status == StepStatus.RUNNING, Step.lease_expires_at < now)
        .limit(limit).with_for_update(skip_locked=True)))
    if not ids:
        return []
    return [(str(i), p) for i, p in session.execute(update(Step).where(
        Step.id.in_(ids), Step.status == StepStatus.RUNNING, Step.lease_expires_at < now,
    ).values(status=StepStatus.QUEUED, lease_expires_at=None, enqueued_at=utcnow())
        .returning(Step.id, Step.priority).execution_options(**_NO_SYNC))]


def take_stale_queued(session: Session, older_than_s: float, limit: int
                      ) -> list[tuple[str, int | None]]:
    """Steps queued long ago and never claimed (their message was lost), stamped as published
    again now; rows another sweeper holds are skipped."""
    cutoff = db_now(session, -older_than_s)
    rows = [(str(i), p) for i, p in session.execute(select(Step.id, Step.priority).where(
        Step.status == StepStatus.QUEUED,
        or_(Step.enqueued_at.is_(None), Step.enqueued_at < cutoff))
        .limit(limit).with_for_update(skip_locked=True))]
    if rows:
        session.execute(update(Step).where(Step.id.in_([r[0] for r in rows]))
                        .values(enqueued_at=utcnow()).execution_options(**_NO_SYNC))
    return rows


def list_for_job(session: Session, job_id: str) -> list[Step]:
    return list(session.scalars(select(Step).where(Step.job_id == job_id)
                                .order_by(Step.created_at, Step.key)))


def running_under_lease(session: Session, step_id: str, attempt: int | None = None) -> bool:
    """Whether run `attempt` (any run, if None) holds the step under a live lease."""
    q = select(S.id).where(S.id == step_id, S.status == StepStatus.RUNNING,
                              S.lease_expires_at > db_now(session))
    if attempt is not None:
        q = q.where(S.attempt == attempt)
    return session.scalar(q) is not None


def requeue_run(session: Session, step_id: str, attempt: int) -> bool:
    """Hand the step back to the queue from run `attempt` (which still holds it)."""
    res = session.execute(update(steps_table).where(
        S.id == step_id, S.attempt == attempt, S.status == StepStatus.RUNNING,
    ).values(status=StepStatus.QUEUED, lease_expires_at=None, enqueued_at=utcnow())
        )
    return res.rowcount == 1  # type: ignore[attr-defined]


def requeue_stopped(session: Session, step_id: str) -> bool:
    """Queue again a step that was just cancelled (its job stopped, and was continued)."""
    res = session.execute(update(steps_table).where(
        S.id == step_id, S.status == StepStatus.CANCELLED,
    ).values(status=StepStatus.QUEUED, finished_at=None, enqueued_at=utcnow()))
    return res.rowcount == 1  # type: ignore[attr-defined]


def live_runs(session: Session, job_id: str) -> int:
    """How many steps of the job a run holds under a live lease."""
    return int(session.scalar(select(func.count()).select_from(Step).where(
        S.job_id == job_id, S.status == StepStatus.RUNNING,
        S.lease_expires_at > db_now(session))) or 0)


def keys(session: Session, job_id: str) -> set[str]:
    return set(session.scalars(select(S.key).where(S.job_id == job_id)))


def set_max_tokens(session: Session, job_id: str, per_role: dict[str, int]) -> None:
    """New `max_tokens` for the steps of these roles that have not completed."""
    for role, tokens in per_role.items():
        session.execute(update(steps_table).where(
            S.job_id == job_id, S.role == role, S.status != StepStatus.COMPLETED,
        ).values(max_tokens=tokens))


def get(session: Session, step_id: str) -> Step | None:
    return session.get(Step, step_id)
