"""ORM models. The schema itself is created only by Alembic migrations."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JSONType = JSON().with_variant(JSONB(), "postgresql")
# Dollars, exactly (to 1e-10).
Money = Numeric(20, 10)


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend (SQLite stores no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    BUDGET_EXHAUSTED = "budget_exhausted"

    @property
    def terminal(self) -> bool:
        return self in JOB_TERMINAL


JOB_TERMINAL = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED,
                          JobStatus.BUDGET_EXHAUSTED})
JOB_ACTIVE = frozenset({JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.CANCELLING})


class StepStatus(StrEnum):
    # Waiting for dependencies -> queued (published) -> running (claimed under a lease) -> ...
    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    # Runnable, but kept in the database while its tenant has its cap of steps in the broker
    # (AGENTQ_TENANT_QUEUED_STEPS_MAX); queued (published) as the tenant's count falls.
    HELD = "held"
    # A first step of a flex job waiting for its planned start (a cheaper or cleaner hour).
    DEFERRED = "deferred"


class ServiceTier(StrEnum):
    """How soon a job's work is served: interactive first, flex only on idle capacity."""

    INTERACTIVE = "interactive"
    STANDARD = "standard"
    FLEX = "flex"

    @property
    def rank(self) -> int:
        """0 is served first."""
        return TIER_ORDER.index(self)


TIER_ORDER = (ServiceTier.INTERACTIVE, ServiceTier.STANDARD, ServiceTier.FLEX)


class DeliveryStatus(StrEnum):
    # pending -> queued -> delivering -> succeeded | pending (retry) | failed
    PENDING = "pending"
    QUEUED = "queued"
    DELIVERING = "delivering"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # Bumped by every change to the tenant's webhook endpoints: processes keep the endpoints
    # in memory and read them again when the version they see on a job's row has moved.
    webhooks_version: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    scopes: Mapped[str] = mapped_column(String(100), default="jobs")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    @property
    def scope_set(self) -> set[str]:
        return {s for s in self.scopes.split(",") if s}


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


class ModelCall(Base):
    """The ledger: one row per model call, keyed by a request id stable across retries."""

    __tablename__ = "model_calls"
    __table_args__ = (Index("ix_model_calls_job_call_key", "job_id", "call_key"),)

    # `{step id}:{attempt}:{index}` (rows written before attempts were part of it:
    # `{step id}:{index}`).
    request_id: Mapped[str] = mapped_column(String(120), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step_id: Mapped[str] = mapped_column(ForeignKey("steps.id", ondelete="CASCADE"), index=True)
    # The run (step attempt) that made the call and the call's position in it: a re-run step
    # replays a finished call found at the same position with the same `call_key`.
    attempt: Mapped[int | None] = mapped_column(Integer, nullable=True)
    call_index: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # The call's turn in its step's agent loop, from 1 (None: a call outside a loop).
    turn: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Set when the run that made the call had lost its step (a stale run whose reservation had
    # expired): "billed" when the job's budget still had room, "unbilled" when it had not (the
    # tokens were spent at the server, and show here, but not in the job's usage).
    settled_late: Mapped[str | None] = mapped_column(String(20), nullable=True)
    role: Mapped[str] = mapped_column(String(40))
    model: Mapped[str] = mapped_column(String(200))
    endpoint: Mapped[str] = mapped_column(String(300))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    cached_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    max_tokens: Mapped[int] = mapped_column(Integer)
    finish_reason: Mapped[str | None] = mapped_column(String(40), nullable=True)
    latency_ms: Mapped[float] = mapped_column()
    # Time to the first generated text; None for rows written before it was measured.
    ttft_ms: Mapped[float | None] = mapped_column(nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    # The server reused part of the prompt from its prefix cache (None: it did not say).
    cache_hit: Mapped[bool | None] = mapped_column(nullable=True)
    # The smaller model whose answer was not good enough, when this call is an escalation.
    escalated_from: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # A digest of what determines a deterministic call's answer (model or size class, prompt,
    # parameters); an identical call later in the same job is answered from the first one's row
    # (`cached_from`), at no cost. None for calls that are not deterministic.
    call_key: Mapped[str | None] = mapped_column(String(64), nullable=True)
    cached_from: Mapped[str | None] = mapped_column(String(120), nullable=True)
    # Watt-hours: the call's share of its endpoint's busy time at the endpoint's power, and how
    # that power was known ("declared_watts" or "nvml"); None when it was not.
    energy_wh: Mapped[float | None] = mapped_column(nullable=True)
    energy_method: Mapped[str | None] = mapped_column(String(20), nullable=True)
    output_text: Mapped[str] = mapped_column(Text)
    # The tools the model chose to call ([{"id", "name", "arguments"}]); None when none.
    tool_calls: Mapped[list[dict[str, str]] | None] = mapped_column(JSONType, nullable=True)
    # Priced when the call was made (after its tier's discount): a later price change never
    # rewrites it.
    cost_usd: Mapped[Decimal | None] = mapped_column(Money, nullable=True)
    # When the call was handed to the pool (before waiting for a slot, and any retries), and
    # when it was written (its end): with `latency_ms` and `ttft_ms` the call's timeline.
    # None for rows written before it was recorded.
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # The job's service tier when the call was made (None for rows written before tiers).
    service_tier: Mapped[str | None] = mapped_column(String(20), nullable=True)
    # The grid's price of power ($/kWh) and carbon intensity (gCO2/kWh) in the call's hour
    # (`core.grid`; None without a schedule).
    power_price: Mapped[float | None] = mapped_column(nullable=True)
    carbon_intensity: Mapped[float | None] = mapped_column(nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)


class LedgerTotal(Base):
    """Running totals of the ledger per model, kept in the transactions that write ledger rows
    (`core.repositories.ledger_totals`), so that reading them costs the same however long the
    ledger grows. Each model's totals are split over a few shards (by job) so that concurrent
    transactions seldom wait for one another; a model's figures are the sums of its shards."""

    __tablename__ = "ledger_totals"

    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    shard: Mapped[int] = mapped_column(Integer, primary_key=True)
    calls: Mapped[int] = mapped_column(BigInteger, default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cached_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cost_usd: Mapped[Decimal] = mapped_column(Money, default=Decimal(0))
    energy_wh: Mapped[float] = mapped_column(default=0.0)


class AppSecret(Base):
    """A secret the deployment generated for itself once (for example the key that signs admin
    sessions when none is configured), shared by every process through the database."""

    __tablename__ = "app_secrets"

    name: Mapped[str] = mapped_column(String(60), primary_key=True)
    value: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Reservation(Base):
    """Tokens and dollars one model call holds against its job's budget while it is in flight.
    Deleted when the call settles (the deletion is what releases it, so it happens once), or
    by the sweeper once it expires on the database's clock (its run died)."""

    __tablename__ = "reservations"

    request_id: Mapped[str] = mapped_column(String(120), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step_id: Mapped[str] = mapped_column(ForeignKey("steps.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    tokens: Mapped[int] = mapped_column(BigInteger)
    cost_usd: Mapped[Decimal] = mapped_column(Money)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)


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


class WebhookEndpoint(Base):
    """A tenant's registered receiver of its jobs' events."""

    __tablename__ = "webhook_endpoints"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"),
                                           index=True)
    url: Mapped[str] = mapped_column(String(2048))
    events: Mapped[list[str]] = mapped_column(JSONType, default=list)
    description: Mapped[str | None] = mapped_column(String(500), nullable=True)
    secret: Mapped[str] = mapped_column(String(100))
    # During a rotation the previous secret keeps signing too, until it expires.
    previous_secret: Mapped[str | None] = mapped_column(String(100), nullable=True)
    previous_secret_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(),
                                                                        nullable=True)
    disabled_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    disabled_reason: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class WebhookDelivery(Base):
    """One event to one receiver; `message_id` is the `webhook-id`, stable across attempts."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    message_id: Mapped[str] = mapped_column(String(60))
    tenant_id: Mapped[str] = mapped_column(String(40))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    endpoint_id: Mapped[str | None] = mapped_column(
        ForeignKey("webhook_endpoints.id", ondelete="CASCADE"), nullable=True)
    url: Mapped[str] = mapped_column(String(2048))
    event_type: Mapped[str] = mapped_column(String(60))
    event_seq: Mapped[int] = mapped_column(BigInteger)
    payload: Mapped[dict[str, Any]] = mapped_column(JSONType)
    # pending -> queued -> delivering -> succeeded | pending (retry) | failed
    status: Mapped[str] = mapped_column(String(20))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    status_changed_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class WebhookAttempt(Base):
    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    delivery_id: Mapped[str] = mapped_column(
        ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    duration_ms: Mapped[float] = mapped_column()
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    response_excerpt: Mapped[str | None] = mapped_column(Text, nullable=True)


class Corpus(Base):
    """A tenant's documents, cut into chunks and searched lexically (BM25)."""

    __tablename__ = "corpora"
    __table_args__ = (Index("ix_corpora_tenant_created", "tenant_id", "created_at", "id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(String(1000), nullable=True)
    document_count: Mapped[int] = mapped_column(Integer, default=0)
    chunk_count: Mapped[int] = mapped_column(Integer, default=0)
    # Bumped by every change to the corpus's documents: a search index built in memory is
    # rebuilt when the revision it was built at is no longer the corpus's.
    revision: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class CorpusDocument(Base):
    """One uploaded document; its extracted text lives in its chunks."""

    __tablename__ = "corpus_documents"
    __table_args__ = (
        Index("ix_corpus_documents_corpus_created", "corpus_id", "created_at", "id"),
        UniqueConstraint("corpus_id", "sha256", name="uq_corpus_documents_corpus_sha256"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    corpus_id: Mapped[str] = mapped_column(ForeignKey("corpora.id", ondelete="CASCADE"))
    title: Mapped[str] = mapped_column(String(300))
    filename: Mapped[str | None] = mapped_column(String(300), nullable=True)
    # text/plain, text/markdown, text/html or application/pdf: what the text was extracted from.
    content_type: Mapped[str] = mapped_column(String(40))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    char_count: Mapped[int] = mapped_column(Integer)
    chunk_count: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class CorpusChunk(Base):
    """A passage of a document's extracted text: what retrieval returns and answers cite."""

    __tablename__ = "corpus_chunks"
    __table_args__ = (
        UniqueConstraint("document_id", "ordinal", name="uq_corpus_chunks_document_ordinal"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    corpus_id: Mapped[str] = mapped_column(ForeignKey("corpora.id", ondelete="CASCADE"),
                                           index=True)
    document_id: Mapped[str] = mapped_column(
        ForeignKey("corpus_documents.id", ondelete="CASCADE"))
    ordinal: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    # Where the chunk lies in the document's extracted text: text[char_start:char_end].
    char_start: Mapped[int] = mapped_column(Integer)
    char_end: Mapped[int] = mapped_column(Integer)


class StoredFile(Base):
    """A file of the OpenAI-compatible Files API: an uploaded batch input (`purpose` "batch"),
    or a batch's output or error file (`batch_output`, written when its job ends; `job_id` and
    `part`, "output" or "error", say whose)."""

    __tablename__ = "files"
    __table_args__ = (Index("ix_files_tenant_created", "tenant_id", "created_at", "id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    purpose: Mapped[str] = mapped_column(String(20))
    filename: Mapped[str] = mapped_column(String(300))
    size_bytes: Mapped[int] = mapped_column("bytes", BigInteger)
    content: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"),
                                               nullable=True, index=True)
    part: Mapped[str | None] = mapped_column(String(10), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


# The tables, for Core statements on hot paths (ORM-enabled DML with RETURNING goes through the
# ORM's row loading, which costs several times the statement itself).
jobs_table = cast(Table, Job.__table__)
steps_table = cast(Table, Step.__table__)
tenants_table = cast(Table, Tenant.__table__)
model_calls_table = cast(Table, ModelCall.__table__)
ledger_totals_table = cast(Table, LedgerTotal.__table__)
reservations_table = cast(Table, Reservation.__table__)
job_events_table = cast(Table, JobEvent.__table__)
outbox_table = cast(Table, OutboxMessage.__table__)
