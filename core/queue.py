"""The Celery application shared by producers (outbox relay) and consumers (workers), and the one
place where agentq's queues are declared.

The broker is `AGENTQ_BROKER_URL` (by default the Redis of `AGENTQ_REDIS_URL`). Either way:
late acknowledgement and prefetch of one per execution slot. On Redis, priorities as kombu's
lists per priority step, and the messages a worker holds are tracked in its memory only
(kombu's `ack_emulation` off): they go back to the queue when it shuts down, and no Redis
bookkeeping is written per message (half a Celery task's cost). A worker that dies loses
the messages it held; the database, not the broker, brings their steps back: a step still
`queued` is published again after `AGENTQ_STEP_REQUEUE_AFTER_S`, a `running` one when its lease
runs out (Redis's own re-delivery came only after a two-hour visibility timeout). On
RabbitMQ (`amqp://`), durable quorum queues, publisher confirms (a publish returns only once
the broker has the message; the outbox marks a row sent only then), and one queue per priority
instead of message priorities (quorum queues have none before RabbitMQ 4.0).
Celery's result backend is not used; the database holds all state.
"""

from __future__ import annotations

import threading
from typing import Any, cast

from celery import Celery
from kombu import Connection, Exchange, Queue
from kombu.transport import redis as kombu_redis

from core.settings import get_settings

QUEUE = "agentq"
# Webhook deliveries have a queue of their own: a worker consumes both by default (and hands
# deliveries to threads of their own, see `orchestrator.webhook_pool`); `-Q` can split them.
WEBHOOK_QUEUE = "agentq.webhooks"
WEBHOOK_TASKS = ("webhooks.deliver",)
# RabbitMQ only: quorum queues have no message priorities before RabbitMQ 4.0, so each band of
# step priorities (`STEP_PRIORITIES`) has a queue of its own: interactive and promoted work
# (and messages without a priority) in `agentq`, standard in `agentq.standard`, flex in
# `agentq.flex`. A worker consumes every queue and the broker shares its slots among them: a
# flood of one tier never stands in front of another tier's steps, but the order across tiers is
# a fair share, not Redis's strict order.
STANDARD_QUEUE = "agentq.standard"
FLEX_QUEUE = "agentq.flex"
AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")


class _RedisChannel(kombu_redis.Channel):
    """Kombu's Redis channel, with one synchronous client kept for the channel's pool.

    Kombu builds a new `redis.Redis` for every command it sends outside the event loop (a
    publish, a restore), and building one costs more than the command itself. A
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


def is_amqp(url: str) -> bool:
    return url.split("://", 1)[0] in AMQP_SCHEMES


def celery_config(queue: str, concurrency: int, broker_url: str = "") -> dict[str, Any]:
    """How agentq runs Celery: late acknowledgement (a task whose worker dies is delivered
    again), one prefetched message per slot, the threads pool (steps wait on model calls, not
    on the CPU), JSON only, no result backend; and what each broker needs (see the module)."""
    config: dict[str, Any] = {
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
        # Redis: acknowledgements kept in the worker's memory (see the module).
        "broker_transport_options": {"ack_emulation": False,
                                     "priority_steps": list(PRIORITY_STEPS)},
    }
    if is_amqp(broker_url):
        config.update({
            # Publisher confirms: `send_task` returns once the broker has the message.
            "broker_transport_options": {"confirm_publish": True},
            # Quorum queues, bound to a topic exchange, so that Celery's native delayed
            # delivery carries retries' countdowns (a quorum queue has no global QoS to hold
            # them in a worker).
            "task_default_queue_type": "quorum",
            "task_default_exchange": queue,
            "task_default_exchange_type": "topic",
            "task_default_routing_key": queue,
            "broker_native_delayed_delivery_queue_type": "quorum",
            # A task whose broker connection was lost is delivered again anyway (late
            # acknowledgement); the step's claim keeps the second delivery from running it
            # twice, so running tasks are left to finish.
            "worker_cancel_long_running_tasks_on_connection_loss": False,
        })
    return config


def declared_queues(broker_url: str) -> tuple[Queue, ...]:
    """Every queue agentq's workers consume, as the broker declares them."""
    if not is_amqp(broker_url):
        return (Queue(QUEUE, routing_key=QUEUE), Queue(WEBHOOK_QUEUE, routing_key=WEBHOOK_QUEUE))
    exchange = Exchange(QUEUE, type="topic", durable=True)
    quorum = {"x-queue-type": "quorum"}
    return tuple(Queue(name, exchange, routing_key=name, durable=True, queue_arguments=quorum)
                 for name in (QUEUE, STANDARD_QUEUE, FLEX_QUEUE, WEBHOOK_QUEUE))


def publish_options(task: str, priority: int, broker_url: str) -> dict[str, Any]:
    """`send_task`'s options for a message of `task` at `priority` (0 first, see
    `core.repositories.outbox`): a priority on Redis, a queue on RabbitMQ."""
    if not is_amqp(broker_url):
        return {"priority": priority}
    if task in WEBHOOK_TASKS:
        return {"queue": WEBHOOK_QUEUE}
    if priority <= STEP_PRIORITIES[("promoted", True)]:
        return {"queue": QUEUE}
    if priority <= STEP_PRIORITIES[("standard", False)]:
        return {"queue": STANDARD_QUEUE}
    return {"queue": FLEX_QUEUE}


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


def queue_depths() -> dict[str, int]:
    """Messages waiting in each of agentq's queues."""
    url = get_settings().broker_url
    depths: dict[str, int] = {}
    if not is_amqp(url):
        import redis

        client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        try:
            for queue in declared_queues(url):
                depths[queue.name] = sum(int(cast(int, client.llen(k)))
                                         for k in queue_keys(queue.name))
            return depths
        finally:
            client.close()
    with Connection(url, connect_timeout=2) as conn:
        conn.ensure_connection(max_retries=0)
        channel = conn.channel()
        for queue in declared_queues(url):
            # Declared as the workers declare it (a no-op when it exists): a passive declare
            # of a queue no worker has made yet would close the channel.
            depths[queue.name] = queue.bind(channel).queue_declare().message_count
    return depths


def ping_broker() -> None:
    """Connect to the broker once; raises if it does not answer within seconds."""
    with Connection(get_settings().broker_url, connect_timeout=2) as conn:
        conn.ensure_connection(max_retries=0)


def get_celery() -> Celery:
    global _app
    with _lock:
        if _app is None:
            settings = get_settings()
            url = settings.broker_url
            app = Celery("agentq", broker=url, set_as_current=True)
            if url.split("://", 1)[0] in ("redis", "rediss"):
                app.conf.broker_transport = f"{__name__}:RedisTransport"
            app.conf.update(
                **celery_config(QUEUE, settings.worker_concurrency, url),
                task_queues=declared_queues(url),
                task_routes={name: {"queue": WEBHOOK_QUEUE} for name in WEBHOOK_TASKS},
                task_publish_retry=True,
                task_publish_retry_policy={"max_retries": 2, "interval_start": 0.2,
                                           "interval_step": 0.5, "interval_max": 1.0},
            )
            _app = app
        return _app
