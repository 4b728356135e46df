"""The threads that make webhook delivery attempts in a worker process, apart from the steps'.

A `webhooks.deliver` message is taken by the worker like any other task, but the task only
hands the delivery to this pool and returns: the attempt runs here. The pool has
`AGENTQ_WEBHOOK_CONCURRENCY` threads, of which one tenant may hold
`AGENTQ_WEBHOOK_TENANT_CONCURRENCY`; a delivery that finds no room is not queued in memory
(the caller puts it back in the database). Nothing waits for a thread, so a slow receiver, or a
tenant with many of them, costs webhook threads for at most one attempt's deadline each, and
never a step's slot.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from core.settings import get_settings

log = logging.getLogger(__name__)


class WebhookPool:
    def __init__(self, size: int, per_tenant: int) -> None:
        self.size, self.per_tenant = size, per_tenant
        self._lock = threading.Lock()
        self._by_tenant: dict[str, int] = {}
        self._busy = 0
        self._closed = False
        self._executor = ThreadPoolExecutor(max_workers=size,
                                            thread_name_prefix="agentq-webhook")

    def try_run(self, tenant_id: str, fn: Callable[[], None]) -> bool:
        """Run `fn` on a free thread of the pool if the tenant has room; False if not."""
        with self._lock:
            if self._closed or self._busy >= self.size \
                    or self._by_tenant.get(tenant_id, 0) >= self.per_tenant:
                return False
            self._busy += 1
            self._by_tenant[tenant_id] = self._by_tenant.get(tenant_id, 0) + 1
        try:
            self._executor.submit(self._run, tenant_id, fn)
        except RuntimeError:  # shut down meanwhile
            self._release(tenant_id)
            return False
        return True

    def busy(self) -> int:
        with self._lock:
            return self._busy

    def _run(self, tenant_id: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:  # noqa: BLE001 - the delivery row says what to do next (the sweeper)
            log.exception("a webhook delivery attempt failed")
        finally:
            self._release(tenant_id)

    def _release(self, tenant_id: str) -> None:
        with self._lock:
            self._busy -= 1
            left = self._by_tenant.get(tenant_id, 1) - 1
            if left > 0:
                self._by_tenant[tenant_id] = left
            else:
                self._by_tenant.pop(tenant_id, None)

    def shutdown(self, wait: bool) -> None:
        """Take no more work; attempts under way end by their deadline."""
        with self._lock:
            self._closed = True
        self._executor.shutdown(wait=wait, cancel_futures=True)


_pool: WebhookPool | None = None
_pool_lock = threading.Lock()


def get_pool() -> WebhookPool:
    global _pool
    with _pool_lock:
        if _pool is None:
            settings = get_settings()
            _pool = WebhookPool(settings.webhook_concurrency,
                                settings.webhook_tenant_concurrency)
        return _pool


def shutdown(wait: bool = True) -> None:
    with _pool_lock:
        pool = _pool
    if pool is not None:
        pool.shutdown(wait)
