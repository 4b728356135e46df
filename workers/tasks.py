"""Task entry points: thin wrappers that take ids and call the orchestrator."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from celery import Task
from celery.signals import worker_ready, worker_shutdown
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

from agents.registry import kind_names
from core.queue import get_celery
from core.settings import get_settings
from core.tracing import TRACEPARENT
from orchestrator import idempotency, runner, sandboxes, slots, sweeps, webhook_pool, webhooks

log = logging.getLogger(__name__)
app = get_celery()
# Celery logs every message it receives at INFO ("Task ... received"): formatting that line cost
# a twentieth of a step's worker CPU. Steps have their own event log and traces; what a task
# did (succeeded, retried, failed) is still logged by Celery's tracer.
logging.getLogger("celery.worker.strategy").setLevel(logging.WARNING)

# Load every job kind (and the libraries they use) when the worker starts, not in its first step.
kind_names()


# Database or broker hiccups outside a model call are retried with backoff (a new message; the
# task is idempotent). Failures inside a step are recorded on the step by the orchestrator.
# A message may carry the W3C traceparent of the span that sent it (`core.tracing`).
@app.task(name="steps.run", bind=True, acks_late=True, reject_on_worker_lost=True,
          autoretry_for=(SQLAlchemyError, RedisError), retry_backoff=1, retry_backoff_max=60,
          retry_jitter=True, max_retries=12)
def run_step(self: Task, step_id: str) -> None:
    link = self.request.get(TRACEPARENT)
    # A delivery waits for one of the process's slots: the steps its own completions claimed
    # (`orchestrator.slots`) may hold some.
    mine = slots.current()
    if mine is not None:
        mine.take()
    try:
        runner.run_step(step_id, link=link if isinstance(link, str) else None)
    finally:
        if mine is not None:
            mine.give()


# Deliveries come on their own queue (`agentq.webhooks`). The task only hands the delivery to
# the worker's webhook threads (or puts it back for later) and returns at once, so an attempt
# never holds a step's slot; the delivery row's claim, not the message, guards the attempt.
@app.task(name="webhooks.deliver", acks_late=True, reject_on_worker_lost=True,
          autoretry_for=(SQLAlchemyError, RedisError), retry_backoff=1, retry_backoff_max=60,
          retry_jitter=True, max_retries=12)
def deliver_webhook(delivery_id: str) -> None:
    webhooks.hand_off(delivery_id)


_stop = threading.Event()


def _sweep() -> None:
    try:
        sweeps.all_sweeps()
        webhooks.sweep_due()
        idempotency.sweep_expired()
    except Exception as exc:  # the database or broker may be briefly away
        log.warning("sweep failed: %s", exc)


def every(interval: float, work: Callable[[], None], stop: threading.Event) -> None:
    """Run `work` every `interval` seconds, from one start to the next (a run longer than the
    interval is followed at once by the next), until `stop` is set. From start to start, not
    an interval after each run ends: the promotion of flex jobs counts on passes that far
    apart (`orchestrator.scheduling.lead_s`)."""
    next_at = time.monotonic() + interval
    while not stop.wait(max(0.0, next_at - time.monotonic())):
        next_at = max(next_at, time.monotonic()) + interval
        work()


def _sweeper() -> None:
    every(get_settings().outbox_sweep_interval_s, _sweep, _stop)


# A consumer that has not been running this long (its broker connection lost and never
# re-established) makes the worker exit, so that its supervisor starts a fresh one.
CONSUMER_STALL_S = 120.0


def _watchdog(consumer: Any) -> None:
    from celery import bootsteps

    stalled_since: float | None = None
    while not _stop.wait(5.0):
        blueprint = getattr(consumer, "blueprint", None)
        running = getattr(blueprint, "state", None) == bootsteps.RUN \
            and getattr(consumer, "connection", None) is not None
        if running:
            stalled_since = None
            continue
        stalled_since = stalled_since or time.monotonic()
        if time.monotonic() - stalled_since > CONSUMER_STALL_S:
            log.critical("the Celery consumer has not run for %.0f s; exiting so that a fresh "
                         "worker takes over", CONSUMER_STALL_S)
            os._exit(70)


_announced: list[sandboxes.WorkerSandbox] = []


def _announcer(mine: sandboxes.WorkerSandbox) -> None:
    """Say what this worker's sandbox can do, again every sweep interval (it expires)."""
    sandboxes.announce(mine)
    while not _stop.wait(get_settings().outbox_sweep_interval_s):
        sandboxes.announce(mine)


@worker_ready.connect
def _start_sweeper(sender: Any = None, **_: Any) -> None:
    # The process's step slots, as many as Celery's (`-c` or AGENTQ_WORKER_CONCURRENCY).
    controller = getattr(sender, "controller", None)
    slots.configure(int(getattr(controller, "concurrency", None)
                        or get_settings().worker_concurrency))
    mine = sandboxes.log_mode()
    _announced.append(mine)
    threading.Thread(target=_announcer, args=(mine,), name="agentq-sandbox-announcer",
                     daemon=True).start()
    threading.Thread(target=_sweeper, name="agentq-outbox-sweeper", daemon=True).start()
    if sender is not None:
        threading.Thread(target=_watchdog, args=(sender,), name="agentq-watchdog",
                         daemon=True).start()


@worker_shutdown.connect
def _stop_sweeper(**_: Any) -> None:
    _stop.set()
    # Steps this process claimed for itself finish (as Celery's own do in a warm shutdown).
    running = slots.current()
    if running is not None:
        running.close(wait=True)
    # Attempts under way end by their deadline; deliveries not yet started are left to the
    # sweeper (their rows say so).
    webhook_pool.shutdown(wait=True)
    for mine in _announced:
        sandboxes.withdraw(mine)
