"""Background watchers of the runs in this process, one query per tick each.

- `LeaseKeeper` renews the leases of the steps this process runs, and the reservations of their
  calls in flight, in one transaction per tick (fenced on each run's attempt); a run whose step
  passed to another run is told so (its calls stop).
- `StoppingWatcher` tells running steps, within about a second, that their job stopped
  (cancelled, failed, out of budget) or that their step was cancelled (another step decided
  the job), so their in-flight model calls are closed and the server aborts them. The same
  read tells them that their flex job was promoted to meet its deadline, so a run claimed
  before the promotion has its later calls admitted at the promoted tier.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter

from core.db import db_now, transaction
from core.models import JobStatus
from core.repositories import jobs, ledger, steps
from core.settings import get_settings
from orchestrator.budget import CARRY_FLUSH_S, Carry

log = logging.getLogger(__name__)


class PeriodicThread:
    """A daemon thread that calls `tick` every `interval_s` while there is something to
    watch; started on first use."""

    name = "agentq-watcher"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def interval_s(self) -> float:
        raise NotImplementedError

    def tick(self) -> None:
        raise NotImplementedError

    def _ensure_started(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        stop = threading.Event()
        while not stop.wait(self.interval_s()):
            try:
                self.tick()
            except Exception as exc:  # noqa: BLE001 - the database may be briefly away
                log.warning("%s: %s", self.name, exc)


class LeaseKeeper(PeriodicThread):
    name = "agentq-leases"

    def __init__(self) -> None:
        super().__init__()
        # Runs by (step id, attempt): two runs of one step may live in one process (the
        # first lost its lease, the second claimed the step here).
        self._running: set[tuple[str, int]] = set()
        self._lost: set[tuple[str, int]] = set()

    def interval_s(self) -> float:
        return get_settings().step_lease_seconds / 4

    def add(self, step_id: str, attempt: int) -> None:
        with self._lock:
            self._running.add((step_id, attempt))
            self._ensure_started()

    def remove(self, step_id: str, attempt: int) -> None:
        with self._lock:
            self._running.discard((step_id, attempt))
            self._lost.discard((step_id, attempt))

    def is_lost(self, step_id: str, attempt: int) -> bool:
        return (step_id, attempt) in self._lost

    def tick(self) -> None:
        with self._lock:
            runs = sorted(self._running)
        if not runs:
            return
        with transaction() as s:
            until = db_now(s, get_settings().step_lease_seconds)
            held = steps.renew_leases(s, runs, until)
            ledger.renew(s, [r for r in runs if r in held], until)
        with self._lock:
            for run in runs:
                if run not in held and run in self._running and run not in self._lost:
                    log.warning("step %s (run %d) passed to another run; stopping it", *run)
                    self._lost.add(run)


class StoppingWatcher(PeriodicThread):
    name = "agentq-stopping"
    TICK_S = 0.5

    def __init__(self) -> None:
        super().__init__()
        self._jobs: Counter[str] = Counter()
        self._stopping: set[str] = set()
        self._promoted: set[str] = set()
        self._runs: set[tuple[str, int]] = set()
        self._dropped: set[tuple[str, int]] = set()

    def interval_s(self) -> float:
        return self.TICK_S

    def add(self, job_id: str, run: tuple[str, int] | None = None) -> None:
        with self._lock:
            self._jobs[job_id] += 1
            if run is not None:
                self._runs.add(run)
            self._ensure_started()

    def remove(self, job_id: str, run: tuple[str, int] | None = None) -> None:
        with self._lock:
            if run is not None:
                self._runs.discard(run)
                self._dropped.discard(run)
            self._jobs[job_id] -= 1
            if self._jobs[job_id] <= 0:
                del self._jobs[job_id]
                self._stopping.discard(job_id)
                self._promoted.discard(job_id)

    def is_stopping(self, job_id: str) -> bool:
        return job_id in self._stopping

    def is_promoted(self, job_id: str) -> bool:
        """Whether the job was promoted to meet its deadline (as of the last tick)."""
        return job_id in self._promoted

    def is_dropped(self, step_id: str, attempt: int) -> bool:
        """Whether the run no longer holds its step (it was cancelled, or passed on)."""
        return (step_id, attempt) in self._dropped

    def tick(self) -> None:
        with self._lock:
            watched = list(self._jobs)
            runs = sorted(self._runs)
        if not watched:
            return
        with transaction(read_only=True) as s:
            found = jobs.statuses(s, watched)
            held = steps.held(s, runs)
        stopped = {j for j, (st, _) in found.items()
                   if st not in (JobStatus.QUEUED, JobStatus.RUNNING)}
        with self._lock:
            self._stopping = {j for j in stopped if j in self._jobs}
            self._promoted = {j for j, (_, p) in found.items() if p and j in self._jobs}
            self._dropped = {r for r in runs if r not in held and r in self._runs}


class CarryFlusher(PeriodicThread):
    """Writes the settlements a run has carried for longer than `CARRY_FLUSH_S` (its agent is
    busy between calls), so a finished call is in the ledger within a fraction of a second."""

    name = "agentq-carries"

    def __init__(self) -> None:
        super().__init__()
        self._carries: list[Carry] = []

    def interval_s(self) -> float:
        return CARRY_FLUSH_S / 2

    def watch(self, carry: Carry) -> None:
        """Watch a run's carry until `unwatch` (its run has ended and written it)."""
        with self._lock:
            if not any(c is carry for c in self._carries):
                self._carries.append(carry)
            self._ensure_started()

    def unwatch(self, carry: Carry) -> None:
        with self._lock:
            self._carries = [c for c in self._carries if c is not carry]

    def tick(self) -> None:
        now = time.monotonic()
        with self._lock:
            self._carries = [c for c in self._carries if not c.closed or c.rows or c.after]
            due = [c for c in self._carries if c.due(now)]
        for carry in due:
            try:
                with transaction() as s:
                    carry.write(s)
            except Exception as exc:  # noqa: BLE001 - it is given back; the next tick retries
                log.warning("could not write a carried settlement: %s", exc)


leases = LeaseKeeper()
stopping = StoppingWatcher()
carries = CarryFlusher()
