"""The states a job, a step and a webhook delivery go through, and the service tiers."""

from __future__ import annotations

from enum import StrEnum


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
