"""The ledger of model calls and the reservations of calls in flight.

A reservation is a row per call: inserted with the conditional update that takes its tokens
and dollars from the job's budget, deleted when the call settles. It expires with its run's
lease (and is renewed with it), so a run that died or lost its step does not hold the budget:
the next claim of the step, or the sweeper, releases it. The deletion is the release, so it
happens exactly once, whoever gets there first. A call that settles after its reservation was
released (a run that was stopped past its lease) is billed only if the budget still has room.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    DateTime,
    Integer,
    Numeric,
    String,
    bindparam,
    cast,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.orm import Session

from core.db import Prebuilt, PrebuiltInsert, db_now, is_postgres
from core.models import (
    JobStatus,
    ModelCall,
    StepStatus,
    jobs_table,
    model_calls_table,
    reservations_table,
    steps_table,
    utcnow,
)
from core.repositories import ledger_totals, steps
from core.repositories.webhooks import HOOK_COLUMNS, Hooks, hooks_of

J = jobs_table.c
R = reservations_table.c
S = steps_table.c
_INSERT_CALL = PrebuiltInsert(lambda _: insert(model_calls_table))


@dataclass(frozen=True)
class Budget:
    max_total_tokens: int | None
    max_cost_usd: Decimal | None

    @staticmethod
    def of(raw: dict[str, Any]) -> Budget:
        cost = raw.get("max_cost_usd")
        return Budget(raw.get("max_total_tokens"),
                      Decimal(str(cost)) if cost is not None else None)

    def fits(self, tokens: int, cost: Decimal) -> list[Any]:
        """Conditions on the job row under which `tokens` and `cost` more still fit."""
        cond: list[Any] = []
        if self.max_total_tokens is not None:
            cond.append(J.prompt_tokens + J.completion_tokens + J.reserved_tokens
                        + tokens <= self.max_total_tokens)
        if self.max_cost_usd is not None:
            cond.append(J.cost_usd + J.reserved_cost_usd + cost <= self.max_cost_usd)
        return cond


class Reserved(StrEnum):
    OK = "ok"
    NO_ROOM = "no_room"  # the budget has no room for it now
    STALE = "stale"  # the run no longer holds its step
    STOPPED = "stopped"  # the job is not running


def _reserve(_: bool) -> Any:
    """Postgres, one statement: lock the run's lease (shared), take from the job's budget
    (`p_max_tokens` and `p_max_cost`, either None for no limit), insert the reservation."""
    request, job, step = (bindparam(n, type_=String) for n in ("p_request", "p_job", "p_step"))
    attempt, tokens = bindparam("p_attempt", type_=Integer), bindparam("p_tokens", type_=Integer)
    cost = bindparam("p_cost", type_=Numeric())
    max_tokens = bindparam("p_max_tokens", type_=Integer)
    max_cost = cast(bindparam("p_max_cost", type_=Numeric()), Numeric())  # typed when None
    held = select(S.lease_expires_at.label("until")).where(
        S.id == step, S.attempt == attempt, S.status == StepStatus.RUNNING,
    ).with_for_update(read=True).cte("lease")
    took = update(jobs_table).where(
        J.id == job, J.status == JobStatus.RUNNING,
        or_(max_tokens.is_(None),
            J.prompt_tokens + J.completion_tokens + J.reserved_tokens + tokens <= max_tokens),
        or_(max_cost.is_(None), J.cost_usd + J.reserved_cost_usd + cost <= max_cost),
        exists(select(held.c.until)),
    ).values(reserved_tokens=J.reserved_tokens + tokens,
             reserved_cost_usd=J.reserved_cost_usd + cost).returning(
        (J.prompt_tokens + J.completion_tokens + J.reserved_tokens).label("committed"),
    ).cte("took")
    row = select(request, job, step, attempt, tokens, cost,
                 bindparam("p_now", type_=DateTime(timezone=True)),
                 select(held.c.until).scalar_subquery(),
                 ).where(exists(select(took.c.committed)))
    return insert(reservations_table).from_select(
        ["request_id", "job_id", "step_id", "attempt", "tokens", "cost_usd",
         "created_at", "expires_at"], row).returning(select(took.c.committed).scalar_subquery())


_RESERVE = Prebuilt(_reserve)


def reserve(session: Session, *, request_id: str, job_id: str, step_id: str, attempt: int,
            tokens: int, cost: Decimal, budget: Budget, again: bool = False
            ) -> tuple[Reserved, int | None]:
    """Hold `tokens` and `cost` against the job for one call of run `attempt`. The
    reservation expires with the run's lease, and is renewed with it. `again`: a retry of a
    transaction whose commit may have gone through (then the reservation is there already).
    With `Reserved.OK` comes the job's committed tokens (spent and reserved, this call's
    included) as the update left them, when it was made now."""
    if again and session.scalar(select(R.request_id).where(R.request_id == request_id)):
        return Reserved.OK, None
    if is_postgres(session):
        committed = _RESERVE.execute(session, {
            "p_request": request_id, "p_job": job_id, "p_step": step_id, "p_attempt": attempt,
            "p_tokens": tokens, "p_cost": cost, "p_now": utcnow(),
            "p_max_tokens": budget.max_total_tokens, "p_max_cost": budget.max_cost_usd}
        ).scalar()
        if committed is not None:
            return Reserved.OK, int(committed)
        if steps.lease_of(session, step_id, attempt) is None:
            return Reserved.STALE, None
        status = session.scalar(select(J.status).where(J.id == job_id))
        return (Reserved.NO_ROOM if status == JobStatus.RUNNING else Reserved.STOPPED), None
    lease = steps.lease_of(session, step_id, attempt, lock=True)
    if lease is None:
        return Reserved.STALE, None
    committed = session.scalar(update(jobs_table).where(
        J.id == job_id, J.status == JobStatus.RUNNING, *budget.fits(tokens, cost),
    ).values(reserved_tokens=J.reserved_tokens + tokens,
             reserved_cost_usd=J.reserved_cost_usd + cost
             ).returning(J.prompt_tokens + J.completion_tokens + J.reserved_tokens))
    if committed is None:
        status = session.scalar(select(J.status).where(J.id == job_id))
        return (Reserved.NO_ROOM if status == JobStatus.RUNNING else Reserved.STOPPED), None
    session.execute(insert(reservations_table).values(
        request_id=request_id, job_id=job_id, step_id=step_id, attempt=attempt, tokens=tokens,
        cost_usd=cost, created_at=utcnow(), expires_at=lease))
    return Reserved.OK, int(committed)


_TAKE = Prebuilt(lambda _: delete(reservations_table).where(
    R.request_id == bindparam("p_request")).returning(R.tokens, R.cost_usd))


def take(session: Session, request_id: str) -> tuple[int, Decimal] | None:
    """Delete a reservation; its tokens and cost, or None when it was released already."""
    row = _TAKE.execute(session, {"p_request": request_id}).first()
    return None if row is None else (int(row[0]), Decimal(row[1]))


def release(session: Session, request_id: str, job_id: str) -> tuple[int, Decimal] | None:
    """Release one reservation; None when it was already released."""
    taken = take(session, request_id)
    if taken is not None:
        session.execute(update(jobs_table).where(J.id == job_id).values(
            reserved_tokens=J.reserved_tokens - taken[0],
            reserved_cost_usd=J.reserved_cost_usd - taken[1]))
    return taken


def renew(session: Session, runs: list[tuple[str, int]], until: Any) -> None:
    """Extend the reservations of these runs with their leases."""
    if runs:
        session.execute(update(reservations_table).where(
            tuple_(R.step_id, R.attempt).in_(runs),
        ).values(expires_at=until))


def release_expired(session: Session, limit: int, step_id: str | None = None) -> int:
    """Release reservations past their expiry (their run died); those of one step, if given."""
    q = select(R.request_id).where(R.expires_at < db_now(session))
    if step_id is not None:
        q = q.where(R.step_id == step_id)
    rows = session.execute(q.add_columns(R.job_id).limit(limit)
                           .with_for_update(skip_locked=True)).all()
    return sum(1 for request_id, job_id in rows
               if release(session, request_id, job_id) is not None)


def reserved_in_flight(session: Session, job_id: str) -> int:
    return int(session.scalar(select(J.reserved_tokens).where(J.id == job_id)) or 0)


def committed_cost(session: Session, job_id: str) -> Decimal:
    """The job's dollars spent and reserved."""
    return Decimal(session.scalar(select(J.cost_usd + J.reserved_cost_usd)
                                  .where(J.id == job_id)) or 0)


def spent(session: Session, job_id: str) -> tuple[str, int, Decimal]:
    row = session.execute(select(J.status, J.prompt_tokens + J.completion_tokens,
                                 J.cost_usd).where(J.id == job_id)).one()
    return str(row[0]), int(row[1]), Decimal(row[2])


@dataclass(frozen=True)
class Totals:
    prompt_tokens: int
    completion_tokens: int
    model_calls: int
    cost_usd: Decimal
    first_seq: int
    hooks: Hooks


@dataclass(frozen=True)
class Usage:
    """What finished calls used, summed; and what their reservations held."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0
    cost_usd: Decimal = Decimal(0)
    held_tokens: int = 0
    held_cost_usd: Decimal = Decimal(0)

    @staticmethod
    def of(rows: list[dict[str, Any]], held: list[tuple[int, Decimal]] | None = None) -> Usage:
        return Usage(sum(int(r["prompt_tokens"]) for r in rows),
                     sum(int(r["completion_tokens"]) for r in rows), len(rows),
                     sum((Decimal(r["cost_usd"] or 0) for r in rows), Decimal(0)),
                     sum(h[0] for h in held or []),
                     sum((h[1] for h in held or []), Decimal(0)))

    def deltas(self) -> tuple[int, int, int, Decimal, int, Decimal]:
        """What the job row gains (prompt and completion tokens, calls, dollars) and releases
        (the tokens and dollars held), for `jobs.step_completed`."""
        return (self.prompt_tokens, self.completion_tokens, self.calls, self.cost_usd,
                self.held_tokens, self.held_cost_usd)


def insert_calls(session: Session, rows: list[dict[str, Any]]) -> None:
    if rows:
        _INSERT_CALL.execute(session, rows)
        ledger_totals.add(session, rows)


def settle(session: Session, row: dict[str, Any], events: int, budget: Budget,
           step_usage: bool = True) -> Totals | None:
    """Write a finished call's ledger row, release its reservation and add its usage to the
    job (taking `events` cursors). A call whose reservation was already released (its run had
    lost its step long ago) is added to the job only if the budget still has room; otherwise
    its row is kept, marked unbilled, and None is returned."""
    tokens = int(row["prompt_tokens"]) + int(row["completion_tokens"])
    cost = Decimal(row["cost_usd"] or 0)
    if step_usage:  # first: rows are locked step, reservation, job, as everywhere
        steps.add_usage(session, row["step_id"], row["prompt_tokens"],
                        row["completion_tokens"], row["model"])
    released = take(session, row["request_id"])
    cond: list[Any] = [J.id == row["job_id"]]
    held_tokens, held_cost = released or (0, Decimal(0))
    if released is None:
        if session.get(ModelCall, row["request_id"]) is not None:
            return None  # written already (a commit whose answer was lost, then a retry)
        cond += budget.fits(tokens, cost)
    totals = session.execute(update(jobs_table).where(*cond).values(
        prompt_tokens=J.prompt_tokens + row["prompt_tokens"],
        completion_tokens=J.completion_tokens + row["completion_tokens"],
        model_calls=J.model_calls + 1, cost_usd=J.cost_usd + cost,
        reserved_tokens=J.reserved_tokens - held_tokens,
        reserved_cost_usd=J.reserved_cost_usd - held_cost,
        event_seq=J.event_seq + events, updated_at=utcnow(),
    ).returning(J.prompt_tokens, J.completion_tokens, J.model_calls, J.cost_usd,
                J.event_seq, *HOOK_COLUMNS)
        ).first()
    if released is None:
        row = {**row, "settled_late": "billed" if totals is not None else "unbilled"}
    _INSERT_CALL.execute(session, [row])
    ledger_totals.add(session, [row])
    if totals is None:
        return None
    return Totals(int(totals[0]), int(totals[1]), int(totals[2]), Decimal(totals[3]),
                  int(totals[4]) - events + 1, hooks_of(totals))


def record_cached(session: Session, row: dict[str, Any], again: bool = False) -> None:
    """A call answered from an identical earlier call of the job: no tokens, no cost.
    `again`: a retry of a transaction whose commit may have gone through."""
    if again and session.get(ModelCall, row["request_id"]) is not None:
        return
    steps.add_usage(session, row["step_id"], 0, 0, row["model"])
    _INSERT_CALL.execute(session, [row])
    ledger_totals.add(session, [row])
    session.execute(update(jobs_table).where(J.id == row["job_id"]).values(
        model_calls=J.model_calls + 1, updated_at=utcnow()))


def replayable(session: Session, step_id: str, before_attempt: int
               ) -> dict[tuple[int, str | None], ModelCall]:
    """The finished calls of a step's earlier runs, by position and content; a later run's
    answer wins over an earlier run's at the same position."""
    found: dict[tuple[int, str | None], ModelCall] = {}
    for c in session.scalars(select(ModelCall).where(
            ModelCall.step_id == step_id, ModelCall.call_index.is_not(None),
            or_(ModelCall.attempt.is_(None), ModelCall.attempt < before_attempt),
            or_(ModelCall.finish_reason.is_(None), ModelCall.finish_reason != "cancelled"))
            .order_by(ModelCall.attempt, ModelCall.created_at)):
        assert c.call_index is not None
        found[(c.call_index, c.call_key)] = c
    return found


def answer(session: Session, request_id: str, job_id: str) -> ModelCall | None:
    """A finished call of this job by its request id (a call cache pointer); None when it is
    not a usable answer of this very job."""
    row = session.get(ModelCall, request_id)
    if row is None or row.job_id != job_id or row.finish_reason == "cancelled":
        return None
    return row


def earlier_answer(session: Session, job_id: str, key: str) -> ModelCall | None:
    """The first real (not cached, not cancelled) answer of the job to an identical call."""
    return session.scalars(select(ModelCall).where(
        ModelCall.job_id == job_id, ModelCall.call_key == key, ModelCall.cached_from.is_(None),
        or_(ModelCall.finish_reason.is_(None), ModelCall.finish_reason != "cancelled"))
        .order_by(ModelCall.created_at).limit(1)).first()


@dataclass(frozen=True)
class TimedCall:
    """A ledger row's timing: handed to the pool at `started_at`, answered at `ended_at`
    (the row's `created_at`), the last `latency_ms` of it generating, the first token
    `ttft_ms` into that."""

    request_id: str
    step_id: str
    attempt: int | None
    call_index: int | None
    model: str
    started_at: datetime | None
    ended_at: datetime
    latency_ms: float
    ttft_ms: float | None
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    cached_from: str | None
    tools: tuple[str, ...]


def timed_calls(session: Session, job_id: str, limit: int = 5000) -> list[TimedCall]:
    """The job's calls with their timings, in the order they were made."""
    M = model_calls_table.c
    rows = session.execute(select(
        M.request_id, M.step_id, M.attempt, M.call_index, M.model, M.started_at, M.created_at,
        M.latency_ms, M.ttft_ms, M.prompt_tokens, M.completion_tokens, M.finish_reason,
        M.cached_from, M.tool_calls).where(M.job_id == job_id)
        .order_by(func.coalesce(M.started_at, M.created_at), M.request_id).limit(limit)).all()
    return [TimedCall(r[0], r[1], r[2], r[3], r[4], r[5], r[6], float(r[7] or 0.0), r[8],
                      int(r[9]), int(r[10]), r[11], r[12],
                      tuple(str(t.get("name", "")) for t in r[13] or []))
            for r in rows]
