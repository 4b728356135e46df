"""What each worker's sandbox can do, said in Redis so that the API can refuse jobs no worker
may run.

A worker finds its sandbox mode when it starts, logs it, and announces it (with its refusal,
if its `AGENTQ_SANDBOX_WEAKEST_MODE` rules that mode out) in one Redis hash, with an expiry
(judged on Redis's clock) that it pushes back every sweep interval. The API refuses a coding job
only when every worker up refuses untrusted commands; with none up, the job waits in the queue,
and a worker that cannot run it safely fails it with the same message.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from typing import cast

import redis
from redis.exceptions import RedisError

from agents.base import WorkerSandbox

__all__ = ["KEY", "LiveDeployment", "WorkerSandbox", "announce", "live", "log_mode",
           "withdraw", "worker_name"]
from agents.sandbox import host_refusal, isolation
from core.redis import get_redis
from core.settings import get_settings

log = logging.getLogger(__name__)

KEY = "agentq:sandbox:workers"  # a hash: worker -> {"mode", "refusal", "until"}


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _ttl_s() -> int:
    return max(3, int(3 * get_settings().outbox_sweep_interval_s))


def _now(client: redis.Redis) -> float:
    seconds, micros = cast(tuple[int, int], client.time())  # one clock for every machine
    return seconds + micros / 1e6


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
    try:
        client = get_redis()
        ttl = _ttl_s()
        body = json.dumps({"mode": mine.mode, "refusal": mine.refusal,
                           "until": _now(client) + ttl})
        pipe = client.pipeline(transaction=False)
        pipe.hset(KEY, mine.worker, body)
        pipe.expire(KEY, ttl)
        pipe.execute()
    except RedisError as exc:
        log.warning("could not announce the sandbox mode: %s", exc)


def withdraw(mine: WorkerSandbox) -> None:
    with contextlib.suppress(RedisError):
        get_redis().hdel(KEY, mine.worker)


def live() -> list[WorkerSandbox]:
    """What the workers that are up said (empty when none has, or Redis does not answer)."""
    try:
        client = get_redis()
        entries = cast(dict[bytes, bytes], client.hgetall(KEY))
        now = _now(client)
    except RedisError as exc:
        log.warning("could not read the workers' sandbox modes: %s", exc)
        return []
    found: list[WorkerSandbox] = []
    gone: list[str] = []
    for key, raw in entries.items():
        worker = key.decode(errors="replace")
        try:
            data = json.loads(raw)
            if float(data["until"]) < now:
                gone.append(worker)
                continue
            found.append(WorkerSandbox(worker=worker, mode=str(data["mode"]),
                                       refusal=data.get("refusal")))
        except (ValueError, KeyError, TypeError):
            gone.append(worker)
    if gone:
        with contextlib.suppress(RedisError):
            client.hdel(KEY, *gone)
    return sorted(found, key=lambda w: w.worker)


class LiveDeployment:
    """`agents.base.Deployment` as the workers announced it."""

    def worker_sandboxes(self) -> list[WorkerSandbox]:
        return live()
