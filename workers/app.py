"""The Celery worker application: `celery -A workers.app worker`.

Steps run in Celery's threads pool (64 execution slots by default, AGENTQ_WORKER_CONCURRENCY), so
one worker process keeps many steps, and so many model calls, in flight for the servers to batch.
The worker consumes two queues: `agentq` (steps) and `agentq.webhooks` (deliveries). A delivery's
task only hands it to the process's webhook threads (`orchestrator.webhook_pool`,
AGENTQ_WEBHOOK_CONCURRENCY), so one command runs both and a slow receiver never holds a step's
slot; `-Q agentq` or `-Q agentq.webhooks` splits them over separate workers (on RabbitMQ,
steps are in `agentq`, `agentq.standard` and `agentq.flex`: a steps-only worker takes all three).
"""

from __future__ import annotations

from celery import Celery

from core.queue import get_celery

app: Celery = get_celery()
app.conf.include = ["workers.tasks"]

# Import the task modules so that `celery -A workers.app` registers them.
from workers import tasks  # noqa: E402,F401
