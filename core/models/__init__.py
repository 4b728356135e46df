"""ORM models. The schema itself is created only by Alembic migrations.

Every table is a class on one declarative `Base` (its metadata is what Alembic compares
against); they are grouped by concern in this package's modules and all importable from here.
"""

from __future__ import annotations

from typing import cast

from sqlalchemy import Table

from core.models.accounts import ApiKey, AppSecret, Tenant
from core.models.base import NAMING_CONVENTION, Base, JSONType, Money, UTCDateTime, utcnow
from core.models.corpora import Corpus, CorpusChunk, CorpusDocument, StoredFile
from core.models.enums import (
    JOB_ACTIVE,
    JOB_TERMINAL,
    TIER_ORDER,
    DeliveryStatus,
    JobStatus,
    ServiceTier,
    StepStatus,
)
from core.models.jobs import IdempotencyKey, Job, JobEvent, OutboxMessage, Step
from core.models.ledger import LedgerTotal, ModelCall, Reservation
from core.models.webhooks import WebhookAttempt, WebhookDelivery, WebhookEndpoint

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

__all__ = [
    "JOB_ACTIVE", "JOB_TERMINAL", "NAMING_CONVENTION", "TIER_ORDER",
    "ApiKey", "AppSecret", "Base", "Corpus", "CorpusChunk", "CorpusDocument", "DeliveryStatus",
    "IdempotencyKey", "Job", "JobEvent", "JobStatus", "JSONType", "LedgerTotal", "ModelCall",
    "Money", "OutboxMessage", "Reservation", "ServiceTier", "Step", "StepStatus", "StoredFile",
    "Tenant", "UTCDateTime", "WebhookAttempt", "WebhookDelivery", "WebhookEndpoint",
    "job_events_table", "jobs_table", "ledger_totals_table", "model_calls_table",
    "outbox_table", "reservations_table", "steps_table", "tenants_table", "utcnow",
]
