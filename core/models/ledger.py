"""The ledger of model calls, its running totals, and the reservations calls in flight hold
against their job's budget."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
)
from sqlalchemy.orm import Mapped, mapped_column

from core.models.base import Base, JSONType, Money, UTCDateTime, utcnow


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
