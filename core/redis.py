"""Redis clients (sync and asyncio) for notifications, shared per process."""

from __future__ import annotations

import threading

import redis
import redis.asyncio as aioredis

from core.settings import get_settings

EVENTS_CHANNEL_PREFIX = "agentq:events:"

_client: redis.Redis | None = None
_lock = threading.Lock()


def get_redis() -> redis.Redis:
    global _client
    with _lock:
        if _client is None:
            _client = redis.Redis.from_url(get_settings().redis_url, socket_timeout=2,
                                           socket_connect_timeout=2)
        return _client


def new_async_redis() -> aioredis.Redis:
    return aioredis.Redis.from_url(get_settings().redis_url, socket_connect_timeout=2)
