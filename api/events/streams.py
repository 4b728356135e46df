"""How many event streams each API key holds open, over every API process: a Redis sorted set
per key of its open streams, each with an expiry that the stream renews while it is open (so a
process that dies does not hold its streams' places for long). Past
`AGENTQ_SSE_MAX_STREAMS_PER_KEY` a new stream is refused (429). When Redis is away each process
counts its own streams against the same limit."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import Counter
from typing import cast

from redis.exceptions import RedisError

from core.redis import get_redis
from core.settings import get_settings

log = logging.getLogger(__name__)

PREFIX = "agentq:streams:"
# A stream's place expires this long after it was last renewed; streams renew every third.
SLOT_TTL_S = 60.0
RENEW_EVERY_S = SLOT_TTL_S / 3

# Drop expired places, then add this one if the key has room: atomically.
_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""

_local_lock = threading.Lock()
_local: Counter[str] = Counter()


class Slot:
    """One open stream's place among its key's streams."""

    def __init__(self, key_id: str, token: str, local: bool) -> None:
        self.key_id = key_id
        self.token = token
        self.local = local

    def renew(self) -> None:
        if self.local:
            return
        try:
            get_redis().zadd(PREFIX + self.key_id, {self.token: time.time() + SLOT_TTL_S},
                             xx=True)
        except RedisError as exc:
            log.warning("could not renew an event stream's place: %s", exc)

    def release(self) -> None:
        if self.local:
            with _local_lock:
                _local[self.key_id] -= 1
                if _local[self.key_id] <= 0:
                    del _local[self.key_id]
            return
        try:
            get_redis().zrem(PREFIX + self.key_id, self.token)
        except RedisError as exc:
            log.warning("could not release an event stream's place: %s", exc)


def acquire(key_id: str) -> Slot | None:
    """A place for a new stream of this key, or None when it holds the most it may."""
    limit = get_settings().sse_max_streams_per_key
    token = secrets.token_hex(8)
    now = time.time()
    try:
        ok = cast(int, get_redis().eval(_ACQUIRE, 1, PREFIX + key_id, now, limit,
                                        now + SLOT_TTL_S, token, int(SLOT_TTL_S * 2)))
        return Slot(key_id, token, local=False) if ok else None
    except RedisError as exc:
        log.warning("Redis away; event streams are counted per process: %s", exc)
    with _local_lock:
        if _local[key_id] >= limit:
            return None
        _local[key_id] += 1
    return Slot(key_id, token, local=True)
