"""A worker process's step slots: shared by the steps the broker delivers and the steps its own
completions claim to run here.

A completion that makes several steps ready claims, in its own transaction, one to run next in
the same thread and as many more as this process has free slots (up to
`AGENTQ_WORKER_LOCAL_FANOUT`); those run in threads of this process, and only the rest are
published to the broker for other slots. A job's fan-out thus starts at once, on the worker
that already holds its input and its model's prefix cache, without a broker message per step,
and it never takes more of the process than is free: a delivery from the broker waits for a
slot (its message, not yet acknowledged, stays this worker's meanwhile), so the process never
runs more steps at once than its concurrency.

Flex jobs' steps always go through the broker, behind the tiers above them. Should the process
die, a step it claimed keeps its lease until it runs out and the sweeper queues it again, as
for a step it took from the broker.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)


class Slots:
    """`size` slots: `take` waits for one (a delivery), `try_take` takes what is free (a
    completion's fan-out), `run` runs work in a thread of the process on a slot taken before
    and gives it back after."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free = size
        self._closed = False
        self._cond = threading.Condition()
        self._threads = ThreadPoolExecutor(max_workers=max(1, size),
                                           thread_name_prefix="agentq-step")

    @property
    def free(self) -> int:
        with self._cond:
            return self._free

    def take(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._free > 0)
            self._free -= 1

    def try_take(self, n: int) -> int:
        """Take up to `n` slots, of those free now (none once closing); how many were taken."""
        with self._cond:
            got = 0 if self._closed else max(0, min(n, self._free))
            self._free -= got
            return got

    def give(self, n: int = 1) -> None:
        if n <= 0:
            return
        with self._cond:
            self._free = min(self.size, self._free + n)
            self._cond.notify(n)

    def run(self, work: Callable[[], None]) -> None:
        """Run `work` in a thread of the process, on one slot the caller took; the slot is
        given back when it ends, however it ends."""
        def on_slot() -> None:
            try:
                work()
            except Exception:
                log.exception("a step run on a local slot failed")
            finally:
                self.give()

        try:
            self._threads.submit(on_slot)
        except RuntimeError:  # shut down meanwhile: the step's lease runs out, then it is queued
            self.give()
            log.warning("a claimed step was not run: the worker is shutting down")

    def close(self, wait: bool = True) -> None:
        """Take no more fan-out; with `wait`, until the steps running here have ended."""
        with self._cond:
            self._closed = True
        self._threads.shutdown(wait=wait)


_current: Slots | None = None


def configure(size: int) -> Slots:
    """This process's slots (a worker's concurrency)."""
    global _current
    _current = Slots(size)
    return _current


def current() -> Slots | None:
    """The process's slots; None outside a worker (its completions keep one step, no more)."""
    return _current


def reset() -> None:
    global _current
    if _current is not None:
        _current.close(wait=False)
    _current = None
