"""A Celery app with empty tasks, the baseline for the platform's orchestration overhead:
`celery -A bench.celery_empty worker -P threads -c 64`.

Broker settings are agentq's own (`core.queue.celery_config`); the broker is
`AGENTQ_BROKER_URL`, or else `AGENTQ_REDIS_URL`. A task's only work is one Redis INCR (in
`AGENTQ_REDIS_URL`), so that the benchmark can count completions without a result backend.
"""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

from core.queue import celery_config

QUEUE = "bench_empty"
DONE_KEY = "bench:empty:done"
FINISHED_AT_KEY = "bench:empty:finished_at"
HOPS_KEY = "bench:empty:hops"

REDIS_URL = os.environ.get("AGENTQ_REDIS_URL", "redis://127.0.0.1:6379/13")
BROKER_URL = os.environ.get("AGENTQ_BROKER_URL") or REDIS_URL

app = Celery("bench_empty", broker=BROKER_URL, set_as_current=True)
app.conf.update(**celery_config(QUEUE, int(os.environ.get("AGENTQ_WORKER_CONCURRENCY", "64")),
                                BROKER_URL))

_redis = redis.Redis.from_url(REDIS_URL)


@app.task(name="bench.empty", acks_late=True, reject_on_worker_lost=True)
def empty(total: int) -> None:
    """Count one completion; the one that completes the batch notes the time."""
    if _redis.incr(DONE_KEY) == total:
        _redis.set(FINISHED_AT_KEY, repr(time.time()))


@app.task(name="bench.hop", acks_late=True, reject_on_worker_lost=True)
def hop(sent_at: float) -> None:
    """Note how long the message took from `send_task` to a worker slot running it."""
    _redis.rpush(HOPS_KEY, repr(time.time() - sent_at))
