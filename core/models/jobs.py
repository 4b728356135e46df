"""Jobs and their steps, the job's event log, the outbox of messages to publish, and the
submissions' idempotency keys."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from core.models.base import Base, JSONType, Money, UTCDateTime, utcnow
from core.models.enums import ServiceTier


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_tenant_created", "tenant_id", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(20), index=True)
    input: Mapped[dict[str, Any]] = mapped_column(JSONType)
    budget: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    job_metadata: Mapped[dict[str, Any]] = mapped_column("metadata", JSONType, default=dict)
    # The Idempotency-Key it was submitted with (keys live in idempotency_keys).
    idempotency_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    # Job-level webhook: {"url", "events", "secret"} (the secret is never shown after submission).
    webhook: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    # Usage, kept live while the job runs.
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    model_calls: Mapped[int] = mapped_column(Integer, default=0)
    # Tokens reserved by model calls in flight; settled after each call.
    reserved_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    # Dollars spent (settled) and reserved by calls in flight.
    cost_usd: Mapped[Decimal] = mapped_column(Money, default=Decimal(0))
    reserved_cost_usd: Mapped[Decimal] = mapped_column(Money, default=Decimal(0))
    # Progress.
    steps_total: Mapped[int] = mapped_column(Integer, default=0)
    steps_done: Mapped[int] = mapped_column(Integer, default=0)
    phase: Mapped[str] = mapped_column(String(40), default="queued")
    event_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(60), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # From budget.max_seconds: the job fails with `deadline_exceeded` after this.
    deadline_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True,
                                                         index=True)
    # The W3C traceparent of the job's span when tracing is on (`core.tracing`): every step,
    # whichever process runs it, is traced under it. None when tracing was off at submission.
    trace_context: Mapped[str | None] = mapped_column(String(64), nullable=True)
    service_tier: Mapped[str] = mapped_column(String(20), default=ServiceTier.STANDARD,
                                              server_default=ServiceTier.STANDARD.value)
    # A flex job's deadline: it is promoted (scheduled as `standard`, still priced as flex)
    # when its estimated time to finish no longer fits before it.
    due_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True, index=True)
    promoted_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # A flex job that waits for the cheapest (`optimize: cost`) or cleanest (`carbon`) hour
    # that still meets its deadline: when it is planned to start.
    optimize: Mapped[str | None] = mapped_column(String(10), nullable=True)
    planned_start_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class Step(Base):
    __tablename__ = "steps"
    __table_args__ = (UniqueConstraint("job_id", "key", name="uq_steps_job_key"),
                      Index("ix_steps_status_lease", "status", "lease_expires_at"),
                      # The steps waiting to run (in the broker or held back), by job: what a
                      # tenant's cap counts and releases.
                      Index("ix_steps_waiting", "tenant_id", "status", "priority", "created_at",
                            postgresql_where=text("status IN ('queued', 'held')"),
                            sqlite_where=text("status IN ('queued', 'held')")))

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    key: Mapped[str] = mapped_column(String(100))
    role: Mapped[str] = mapped_column(String(40))
    depends_on: Mapped[list[str]] = mapped_column(JSONType, default=list)
    # Fan-in: how many dependencies have not completed yet (counted in the database).
    deps_remaining: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(20))
    # The fencing token: every claim takes the next attempt, and every write a run makes is
    # conditional on the step still holding its attempt.
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    input: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    output: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    max_tokens: Mapped[int] = mapped_column(Integer)
    model: Mapped[str | None] = mapped_column(String(200), nullable=True)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    model_calls: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # When the step was last queued (published); a step queued long ago whose message was lost
    # (a Redis restart) is published again.
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # For a sub-agent: the key of the step that spawned it (which depends on it).
    spawned_by: Mapped[str | None] = mapped_column(String(100), nullable=True)
    # The job's tenant (copied, so that a tenant's waiting steps are counted from one index)
    # and the broker priority its message goes at (`core.queue.step_priority`).
    tenant_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    priority: Mapped[int | None] = mapped_column(Integer, nullable=True)


class JobEvent(Base):
    """Append-only event log per job; `seq` is the job's cursor."""

    __tablename__ = "job_events"
    __table_args__ = (UniqueConstraint("job_id", "seq", name="uq_job_events_job_seq"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(BigInteger)
    type: Mapped[str] = mapped_column(String(60))
    data: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class OutboxMessage(Base):
    """Work to publish after commit (Celery messages), written with the change that causes it."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    task: Mapped[str] = mapped_column(String(100))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONType)
    # The broker's priority, 0 first (Redis: then 3, 6, 9; RabbitMQ: a queue per priority, see
    # core/queue.py); None: 0.
    priority: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)


class IdempotencyKey(Base):
    """A submission's `Idempotency-Key`: the request's fingerprint and, once done, its response."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("tenant_id", "key", name="uq_idempotency_keys_tenant_key"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(255))
    request_hash: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(20))  # in_flight | done
    # The request that holds the key while it is in flight (a random token), and until when
    # (on the database's clock): the holder renews the lease while it runs; a lease that ran
    # out (its process died or froze) lets another request take the key over.
    owner: Mapped[str | None] = mapped_column(String(32), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    response_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    response_body: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    job_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
