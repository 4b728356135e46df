"""One Redis subscription per API process that wakes the event streams of the jobs it hears about.

Each open stream registers an `asyncio.Event` for its job; the hub's single pattern subscription
(`agentq:events:*`) sets them. A stream reads the database only when woken (and, as a fallback if
Redis is away, once per `AGENTQ_SSE_POLL_FALLBACK_S`), so many open streams cost no query per
stream per second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict

from redis.exceptions import RedisError

from core.redis import EVENTS_CHANNEL_PREFIX, new_async_redis

log = logging.getLogger(__name__)


class EventHub:
    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.ready = asyncio.Event()

    def _ensure_running(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._loop is not loop:
            self._loop = loop
            self.ready = asyncio.Event()
            self._task = loop.create_task(self._run(), name="agentq-event-hub")

    def watch(self, job_id: str) -> asyncio.Event:
        self._ensure_running()
        event = asyncio.Event()
        self._waiters[job_id].add(event)
        return event

    def unwatch(self, job_id: str, event: asyncio.Event) -> None:
        waiters = self._waiters.get(job_id)
        if waiters is not None:
            waiters.discard(event)
            if not waiters:
                self._waiters.pop(job_id, None)

    def _wake(self, job_id: str) -> None:
        for event in self._waiters.get(job_id, ()):
            event.set()

    def _wake_all(self) -> None:
        for job_id in list(self._waiters):
            self._wake(job_id)

    async def _run(self) -> None:
        delay = 0.5
        while True:
            client = new_async_redis()
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.psubscribe(EVENTS_CHANNEL_PREFIX + "*")
                    self.ready.set()
                    delay = 0.5
                    # Anything published while we were (re)connecting: look once.
                    self._wake_all()
                    async for message in pubsub.listen():
                        if message.get("type") != "pmessage":
                            continue
                        channel = message["channel"]
                        if isinstance(channel, bytes):
                            channel = channel.decode()
                        self._wake(channel.removeprefix(EVENTS_CHANNEL_PREFIX))
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                self.ready.clear()
                log.warning("event hub lost Redis (%s); streams fall back to slow polling", exc)
            finally:
                with contextlib.suppress(Exception):
                    await client.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


hub = EventHub()
