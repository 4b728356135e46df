"""The Celery application shared by producers (outbox relay) and consumers (workers).

Reliability settings follow Celery's own advice for Redis: late acknowledgement, re-delivery when a
worker dies, prefetch of one per execution slot, and a visibility timeout longer than any step.
Celery's result backend is not used; the database holds all state.
"""

from __future__ import annotations

import threading
from typing import Any

from celery import Celery
from kombu import Queue
from kombu.transport import redis as kombu_redis

from core.settings import get_settings

QUEUE = "agentq"
# Webhook deliveries have a queue of their own: a worker consumes both by default (and hands
# deliveries to threads of their own, see `orchestrator.webhook_pool`); `-Q` can split them.
WEBHOOK_QUEUE = "agentq.webhooks"
WEBHOOK_TASKS = ("webhooks.deliver",)


class _RedisChannel(kombu_redis.Channel):
    """Kombu's Redis channel, with one synchronous client kept for the channel's pool.

    Kombu builds a new `redis.Redis` for every acknowledgement and every delivery it records
    in its unacked index, and building one costs more than the commands it then sends. A
    client only borrows a connection from the pool per command, so one is safe to share
    between threads; pipelines are still made one per use."""

    _sync: tuple[Any, Any] | None = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)
        pool, cached = self.pool, self._sync
        if cached is None or cached[0] is not pool:
            cached = self._sync = (pool, super()._create_client())
        return cached[1]


class RedisTransport(kombu_redis.Transport):
    Channel = _RedisChannel

_app: Celery | None = None
_lock = threading.Lock()


def celery_config(queue: str, concurrency: int) -> dict[str, Any]:
    """How agentq runs Celery: late acknowledgement (a task whose worker dies is delivered
    again), one prefetched message per slot, the threads pool (steps wait on model calls, not
    on the CPU), JSON only, no result backend."""
    return {
        "task_default_queue": queue,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_prefetch_multiplier": 1,
        "worker_pool": "threads",
        "worker_concurrency": concurrency,
        "worker_hijack_root_logger": False,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {"visibility_timeout": 7200,
                                     "priority_steps": list(PRIORITY_STEPS)},
    }


# The order of the step queue, declared here only. A step's message carries a priority that
# says its job's service tier and whether it moves a running job on (its next steps) or starts
# a new one (its first steps); lower is served first. Kombu's Redis transport keeps one list
# per priority step and reads them lowest first, so the order is strict across tiers. (A
# broker that serves higher numbers first, as AMQP does, takes `MAX_PRIORITY - p` and a
# queue declared with that maximum priority.) Deliveries use priority 0 on their own queue.
# A flex job promoted to meet its deadline ("promoted") goes after interactive work and
# before every standard step.
STEP_PRIORITIES: dict[tuple[str, bool], int] = {
    ("interactive", True): 0, ("interactive", False): 1,
    ("promoted", True): 2, ("promoted", False): 2,
    ("standard", True): 3, ("standard", False): 5,
    ("flex", True): 8, ("flex", False): 9,
}
MAX_PRIORITY = 9
PRIORITY_STEPS = tuple(range(MAX_PRIORITY + 1))


def step_priority(tier: str, continuing: bool) -> int:
    """The broker priority of a step of a job of `tier`: a job's next steps (`continuing`) go
    before new jobs' first steps of the same tier, every tier after the ones above it."""
    return STEP_PRIORITIES[(tier, continuing)]


def queue_keys(queue: str) -> list[str]:
    """The Redis lists that hold a queue's messages, one per priority step."""
    return [queue if p == 0 else f"{queue}\x06\x16{p}" for p in PRIORITY_STEPS]


def get_celery() -> Celery:
    global _app
    with _lock:
        if _app is None:
            settings = get_settings()
            app = Celery("agentq", broker=settings.redis_url, set_as_current=True)
            if settings.redis_url.split("://", 1)[0] in ("redis", "rediss"):
                app.conf.broker_transport = f"{__name__}:RedisTransport"
            app.conf.update(
                **celery_config(QUEUE, settings.worker_concurrency),
                task_queues=(Queue(QUEUE, routing_key=QUEUE),
                             Queue(WEBHOOK_QUEUE, routing_key=WEBHOOK_QUEUE)),
                task_routes={name: {"queue": WEBHOOK_QUEUE} for name in WEBHOOK_TASKS},
                task_publish_retry=True,
                task_publish_retry_policy={"max_retries": 2, "interval_start": 0.2,
                                           "interval_step": 0.5, "interval_max": 1.0},
            )
            _app = app
        return _app
