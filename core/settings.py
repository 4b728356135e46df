"""Settings for every agentq process, read once from `AGENTQ_*` environment variables.

The defaults are the embedded set-up: an SQLite file under the user's data folder, Redis on
localhost and one local vLLM server on port 8100.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from platformdirs import user_cache_dir, user_data_dir
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _default_database_url() -> str:
    path = Path(user_data_dir("agentq")) / "agentq.db"
    return f"sqlite:///{path}"


# The service tiers, first served first (`core.models.ServiceTier`).
TIERS = ("interactive", "standard", "flex")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AGENTQ_", extra="ignore")

    database_url: str = Field(
        default_factory=_default_database_url,
        description="SQLAlchemy URL: an SQLite file by default, or postgresql+psycopg://...",
    )
    # Each process's pool of database connections (Postgres; SQLite sizes its own): this many
    # kept open, this many more opened under load and closed when returned, and the longest a
    # unit of work waits for a free one before failing (503 in the API). Every process of a
    # deployment together must stay below Postgres's max_connections (see the README).
    db_pool_size: int = Field(default=10, ge=1)
    db_max_overflow: int = Field(default=10, ge=0)
    db_pool_timeout_s: float = Field(default=30.0, gt=0)
    # A connection idle in the pool for longer than this is checked (one round trip) before
    # use; one used more recently is trusted (a broken one fails its transaction, which is
    # retried on a fresh connection).
    db_ping_idle_s: float = Field(default=5.0, ge=0)
    # Shown in Postgres's pg_stat_activity, to tell which processes hold connections.
    db_application_name: str = Field(default="agentq", max_length=63)
    redis_url: str = "redis://127.0.0.1:6379/0"
    # The Celery broker: empty for the Redis above, or RabbitMQ
    # (`amqp://user:password@host:5672/vhost`: quorum queues, publisher confirms). Redis still
    # holds locks, admission counts, notifications and rate limits either way.
    broker_url: str = ""
    pool_endpoints: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["http://127.0.0.1:8100"],
        description="Comma-separated base URLs of OpenAI-compatible servers.",
    )
    # The model catalogue (see core/catalogue.py): a JSON list, or a file holding one.
    models: list[dict[str, Any]] | None = None
    models_file: Path | None = None
    # Admission control: calls in flight per endpoint, over every worker process (Redis); more
    # wait, served fairly across tenants and jobs, at most this long.
    pool_admission: bool = True
    # How calls pick an endpoint: "affinity" (a job's calls stay on one endpoint while it is not
    # much busier than the idlest), "least_loaded", or "round_robin" (for comparison).
    pool_routing: Literal["affinity", "least_loaded", "round_robin"] = "affinity"
    endpoint_max_in_flight: int = 64
    admission_timeout_s: float = 600.0
    # Circuit breaker: after this many transient failures in a row an endpoint is skipped, then
    # probed with one call after a pause that doubles each time a probe fails (up to 60 s).
    breaker_fail_max: int = 3
    breaker_reset_s: float = 2.0
    model_cache_dir: Path = Field(default_factory=lambda: Path(user_cache_dir("agentq")) / "models")

    # Worker concurrency: steps (and so model calls) one worker process keeps in flight.
    worker_concurrency: int = 64
    # Of the steps a completion makes ready, how many more than the one it runs next it may
    # claim to run on the process's free slots (`orchestrator.slots`); 0: the rest all go
    # through the broker.
    worker_local_fanout: int = Field(default=16, ge=0)
    # Model calls.
    request_timeout_s: float = 120.0
    connect_timeout_s: float = 5.0
    retry_max_attempts: int = 4
    retry_max_seconds: float = 60.0
    # Step budgets by role, for the steps that are one model call: that call's `max_tokens`.
    # An agent loop's step budget is the tokens, prompt and completion, of all its calls
    # together (research investigators over a corpus: by `effort`; coder loops:
    # `coder_step_tokens`). A job's `budget.step_max_tokens` overrides either, by role.
    planner_max_tokens: int = 160
    investigator_max_tokens: int = 128
    synthesiser_max_tokens: int = 256
    coder_max_tokens: int = 1024
    # Coding jobs' coder loops: the step budget of one round (the tokens of all its calls),
    # its turn limit unless the job sets one, and the most candidates a job may run at once.
    coder_step_tokens: int = Field(default=32_000, ge=1000, le=1_000_000)
    coder_turn_limit: int = Field(default=12, ge=2, le=100)
    coding_max_candidates: int = Field(default=4, ge=1, le=32)
    # Agent loops (a step of model calls and tool calls): the most turns (model calls) a step
    # takes, unless its job kind chooses (research `effort`); per role, a cap on that
    # ({"investigator": 4}); and the most bytes of a tool's result one turn shows the model.
    loop_turn_limit: int = Field(default=6, ge=1, le=100)
    loop_turn_limits: dict[str, int] = Field(default_factory=dict)
    loop_tool_result_bytes: int = Field(default=3000, ge=200, le=200_000)
    # Sub-agents (the `spawn` tool): the most child steps one step may spawn, and the most
    # spawned steps a job may have in all.
    spawn_max_children: int = Field(default=4, ge=0, le=64)
    spawn_max_per_job: int = Field(default=16, ge=0, le=1000)
    # The sandbox that runs a coding job's tests: CPU seconds (each process, and the whole
    # tree) and wall-clock seconds per run, the workspace's disk quota, and the most runs one
    # worker process has at once (more wait; default: the number of CPUs).
    sandbox_cpu_seconds: int = 60
    sandbox_wall_seconds: float = 120.0
    # A coding job's repository sent as an archive: at most this many bytes unpacked (a tar's
    # headers aside), this many members, and this many bytes unpacked per byte of the archive
    # (checked past the first 64 KiB). Past any of them the job is refused (422).
    archive_max_bytes: int = Field(default=4 * 1024 * 1024, ge=1)
    archive_max_members: int = Field(default=1000, ge=1)
    archive_max_ratio: float = Field(default=100.0, ge=1)
    sandbox_disk_bytes: int = Field(default=256 * 1024 * 1024, ge=1024 * 1024)
    sandbox_max_concurrent: int | None = Field(default=None, ge=1)
    # The weakest sandbox mode coding jobs may run in (strongest first: root, userns, netns,
    # plain; see agents/sandbox). Where this machine only manages a weaker one, coding jobs are
    # refused. "netns" gives up the file system and process isolation, "plain" every isolation.
    sandbox_weakest_mode: Literal["root", "userns", "netns", "plain"] = "userns"
    max_subquestions: int = 4
    default_job_max_total_tokens: int = 20_000
    # Dollars per million tokens by model ("*" for any other), e.g.
    # {"gemma-3-270m": {"input": 0.02, "cached_input": 0.01, "output": 0.04}}.
    model_prices: dict[str, dict[str, float]] = Field(default_factory=lambda: {
        "*": {"input": 0.05, "cached_input": 0.025, "output": 0.10}})
    # Power draw of each pool endpoint in watts, by base URL ("*" for any other), e.g.
    # {"http://10.0.0.5:8000": 700}; a call's energy is its share of the endpoint's busy time
    # at that power. Where none is declared and NVML answers (NVIDIA GPUs on the machine of a
    # local endpoint), the measured board power is used.
    endpoint_watts: dict[str, float] = Field(default_factory=dict)
    energy_nvml: bool = True
    # /readyz asks the pool endpoints at most once per this many seconds (per API process).
    readyz_pool_cache_s: float = Field(default=5.0, ge=0)
    # The admin page's sessions: how long one lasts, and the secret that signs them (by default
    # a random one the deployment makes once and keeps in the database).
    admin_session_hours: float = Field(default=12.0, gt=0)
    admin_session_secret: SecretStr | None = None
    # Proxies whose X-Forwarded-Proto and X-Forwarded-For are believed (comma-separated IPs or
    # networks, "*" for any): behind a TLS proxy the app then knows a request came over https.
    trusted_proxies: str = "127.0.0.1"
    # When set, scrapes of /metrics must send `Authorization: Bearer <token>`.
    metrics_token: str | None = None
    # Spend fractions of a budget that append a `budget.threshold` event when crossed.
    budget_thresholds: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [0.5, 0.8])
    # Limits: requests per tenant (limits' notation: "600/minute", "20/second"), jobs queued or
    # running per tenant, and request body size.
    rate_limit: str = "600/minute"
    max_jobs_in_flight: int = 1000
    max_body_bytes: int = 1_048_576
    # The deepest nesting a JSON request body may have (objects and arrays).
    max_json_depth: int = Field(default=32, ge=2, le=200)
    # Corpora. The largest document accepted, in bytes as uploaded: upload requests are held to
    # this (plus multipart framing) instead of max_body_bytes. The most text one document may
    # yield (a small PDF can hold a lot of compressed text). How many corpora's search indexes
    # one process keeps in memory (least recently used go first).
    corpus_max_document_bytes: int = 10 * 1024 * 1024
    corpus_max_document_chars: int = 10_000_000
    corpus_index_cache_size: int = 32
    # Each document is parsed in a child process: at most this long and this much more memory
    # (its address space), and at most this many at once per API process (more wait).
    corpus_parse_timeout_s: float = Field(default=60.0, gt=0)
    corpus_parse_max_memory_mb: int = Field(default=1024, ge=64)
    corpus_parse_concurrency: int = Field(default=2, ge=1)
    # OpenAI batches: the largest file `POST /v1/files` takes (uploads are held to this, not
    # max_body_bytes), the most requests one batch may hold, the `max_tokens` of a chat line
    # that sets none, and how lines are cut into steps: one line per step up to
    # batch_target_steps lines, then more per step to stay near that many steps, at most
    # batch_max_lines_per_step per step.
    batch_max_file_bytes: int = Field(default=100 * 1024 * 1024, ge=1024)
    batch_max_lines: int = Field(default=50_000, ge=1)
    batch_default_max_tokens: int = Field(default=256, ge=1)
    batch_target_steps: int = Field(default=256, ge=1)
    batch_max_lines_per_step: int = Field(default=32, ge=1)
    # Event streams (SSE): heartbeat comment interval, and the slow fallback poll used only when
    # no notification arrives (Redis away).
    sse_heartbeat_s: float = 15.0
    sse_poll_fallback_s: float = 30.0
    # Event streams one API key may hold open at once (over every API process), and the longest
    # a stream stays open: then the server closes it and the client resumes with Last-Event-ID.
    sse_max_streams_per_key: int = Field(default=20, ge=1)
    sse_max_stream_s: float = Field(default=3600.0, gt=0)
    # Webhooks.
    webhooks_allow_private_networks: bool = False
    # The whole of one delivery attempt (name lookup, connect, send, response headers and
    # body): an attempt still running at this deadline is cut off and counts as failed.
    webhook_timeout_s: float = Field(default=10.0, gt=0, le=300)
    # The most bytes of a receiver's response body read (the rest is never read).
    webhook_max_response_bytes: int = Field(default=4096, ge=0, le=1_048_576)
    # Delivery attempts one worker process makes at once, in threads of their own (never in
    # the steps' slots), and how many of those one tenant may hold.
    webhook_concurrency: int = Field(default=16, ge=1)
    webhook_tenant_concurrency: int = Field(default=4, ge=1)
    # Webhook endpoints one tenant may register.
    webhook_max_endpoints_per_tenant: int = Field(default=16, ge=0)
    # Seconds to wait before each retry (Standard Webhooks: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h,
    # 14 h, 20 h, 24 h), with jitter.
    webhook_retry_schedule_s: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 50400.0,
                                 72000.0, 86400.0])
    webhook_secret_grace_hours: float = 24.0
    # Idempotency keys are kept at least this long.
    idempotency_ttl_hours: float = 24.0
    # A request holds its Idempotency-Key under a lease of this many seconds, renewed every
    # third of it while the request runs; a key whose lease ran out (its process died or
    # froze) is taken over by the next request with it.
    idempotency_lease_s: float = Field(default=30.0, gt=0)
    # A running step's lease; the worker running it renews it every quarter of this. A step whose
    # lease ran out (its worker died) is queued again by the sweeper.
    step_lease_seconds: float = 60.0
    # A finished model call whose ledger write meets a database outage is kept in memory and
    # written when the database is back, for at most this long (never made again meanwhile).
    settle_retry_s: float = 600.0
    # A step that meets a transient database error outside a model call is run again this
    # many times (a new message; its finished calls are replayed) before the job fails.
    step_db_retries: int = 12
    # A step queued this long ago without being claimed is published again (its message may
    # have been lost, for example in a Redis restart); duplicates are harmless.
    step_requeue_after_s: float = 120.0
    # The outbox sweeper republishes rows left unsent for this long.
    outbox_sweep_after_s: float = 10.0
    # Each worker's sweeper starts a pass (these sweeps, held steps, promotions, planned
    # starts, expired leases and deadlines) this often, from one start to the next.
    outbox_sweep_interval_s: float = 5.0
    # Service tiers. The discount on the ledger's cost per tier, as a fraction
    # ({"flex": 0.5} prices flex calls at half); the tiers each tenant (by name) may use
    # ({"acme": ["standard", "flex"]}; a tenant not named may use every tier).
    tier_discounts: dict[str, float] = Field(default_factory=dict)
    tenant_tiers: dict[str, list[str]] = Field(default_factory=dict)
    # The most of one tenant's steps queued in the broker at once; its runnable steps beyond
    # it wait in the database (`held`) and are queued as its count falls. 0: no cap.
    tenant_queued_steps_max: int = Field(default=128, ge=0)
    # Admission within a tier serves jobs by the tokens served so far, in levels: below the
    # quantum first, then below `growth` times that, and so on (0: no levels, plain least
    # attained service); within a level, the fewest calls in flight, then turns (level 0) or
    # the oldest job (above). A job's waiting call earns this many tokens of credit per second
    # it waits (aging), so a long job always progresses.
    admission_quantum_tokens: int = Field(default=500, ge=0)
    admission_level_growth: float = Field(default=16.0, gt=1)
    admission_aging_tokens_per_s: float = Field(default=200.0, ge=0)
    # A flex job with a deadline is promoted (scheduled as standard, still priced as flex)
    # once the time left is under this factor times its estimated time to finish, plus the
    # sweeper's interval (`outbox_sweep_interval_s`: its passes are that far apart), or at
    # submission if it already is. The estimate: the mean run time of the kind's jobs
    # completed in the last day (not counting the time a flex job waited by design; this
    # many seconds when there are none), scaled by the share of its steps still to run.
    deadline_safety: float = Field(default=2.0, ge=1)
    deadline_default_estimate_s: float = Field(default=60.0, gt=0)
    # The grid's hourly price of power and carbon intensity (`core.grid`): a JSON list of 24
    # {"price": $/kWh, "carbon": gCO2/kWh}, hour 0 UTC first, or an object mapping endpoint
    # base URLs to such lists ("*": the others), or a file holding either.
    grid_schedule: list[dict[str, float]] | dict[str, list[dict[str, float]]] | None = None
    grid_schedule_file: Path | None = None

    @field_validator("pool_endpoints", mode="before")
    @classmethod
    def _split_endpoints(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip().rstrip("/") for part in value.split(",") if part.strip()]
        return value

    @field_validator("tier_discounts")
    @classmethod
    def _discounts(cls, value: dict[str, float]) -> dict[str, float]:
        for tier, discount in value.items():
            if tier not in TIERS:
                raise ValueError(f"{tier!r} is not a service tier ({', '.join(TIERS)})")
            if not 0 <= discount < 1:
                raise ValueError(f"{tier}: a discount is a fraction from 0 up to (not "
                                 f"including) 1, not {discount}")
        return value

    @field_validator("tenant_tiers")
    @classmethod
    def _tenant_tiers(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for tenant, tiers in value.items():
            unknown = sorted(set(tiers) - set(TIERS))
            if unknown:
                raise ValueError(f"{tenant}: {unknown[0]!r} is not a service tier "
                                 f"({', '.join(TIERS)})")
        return value

    @model_validator(mode="after")
    def _broker_defaults_to_redis(self) -> Settings:
        if not self.broker_url:
            self.broker_url = self.redis_url
        return self

    @field_validator("webhook_retry_schedule_s", "budget_thresholds", mode="before")
    @classmethod
    def _split_schedule(cls, value: object) -> object:
        if isinstance(value, str):
            return [float(part) for part in value.split(",") if part.strip()]
        return value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
