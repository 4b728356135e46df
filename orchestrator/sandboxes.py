"""What each worker's sandbox can do, said in Redis so that the API can refuse jobs no worker
may run.

A worker finds its sandbox mode when it starts, logs it, and announces it (with its refusal,
if its `AGENTQ_SANDBOX_WEAKEST_MODE` rules that mode out) under a key that expires unless the
worker renews it every sweep interval. The API refuses a coding job only when every worker up
refuses untrusted commands; with none up, the job waits in the queue, and a worker that cannot
run it safely fails it with the same message.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from typing import cast

from redis.exceptions import RedisError

from agents.base import WorkerSandbox

__all__ = ["KEY_PREFIX", "LiveDeployment", "WorkerSandbox", "announce", "live", "log_mode",
           "withdraw", "worker_name"]
from agents.sandbox import host_refusal, isolation
from core.redis import get_redis
from core.settings import get_settings

log = logging.getLogger(__name__)

KEY_PREFIX = "agentq:sandbox:"


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _ttl_s() -> int:
    return max(3, int(3 * get_settings().outbox_sweep_interval_s))


def this_worker() -> WorkerSandbox:
    found = isolation()
    return WorkerSandbox(worker=worker_name(), mode=found.mode, refusal=host_refusal())


def log_mode() -> WorkerSandbox:
    """Find this worker's sandbox mode and say it in the log (a warning where coding jobs
    will be refused)."""
    mine = this_worker()
    found = isolation()
    if mine.refusal is None:
        log.info("sandbox mode %s (gives up: %s): coding jobs run here", mine.mode,
                 found.gives_up)
    else:
        log.warning("sandbox mode %s: coding jobs are refused here: %s", mine.mode,
                    mine.refusal)
    return mine


def announce(mine: WorkerSandbox) -> None:
    """Say (again) what this worker's sandbox can do; it expires unless said again."""
    body = json.dumps({"worker": mine.worker, "mode": mine.mode, "refusal": mine.refusal})
    try:
        get_redis().set(KEY_PREFIX + mine.worker, body, ex=_ttl_s())
    except RedisError as exc:
        log.warning("could not announce the sandbox mode: %s", exc)


def withdraw(mine: WorkerSandbox) -> None:
    try:
        get_redis().delete(KEY_PREFIX + mine.worker)
    except RedisError:
        pass


def live() -> list[WorkerSandbox]:
    """What the workers that are up said (empty when none has, or Redis does not answer)."""
    found: list[WorkerSandbox] = []
    try:
        client = get_redis()
        keys = list(client.scan_iter(match=KEY_PREFIX + "*", count=500))
        values = cast(list[bytes | None], client.mget(keys)) if keys else []
    except RedisError as exc:
        log.warning("could not read the workers' sandbox modes: %s", exc)
        return []
    for raw in values:
        if not raw:
            continue
        try:
            data = json.loads(raw)
            found.append(WorkerSandbox(worker=str(data["worker"]), mode=str(data["mode"]),
                                       refusal=data.get("refusal")))
        except (ValueError, KeyError, TypeError):
            continue
    return sorted(found, key=lambda w: w.worker)


class LiveDeployment:
    """`agents.base.Deployment` as the workers announced it."""

    def worker_sandboxes(self) -> list[WorkerSandbox]:
        return live()
