"""Deadlines, measured (`bench.scheduling`'s fifth part): flex jobs with deadlines on a real
deployment (the API, a Celery worker, a Redis server and a database of the run's own) kept
busy by another tenant's flood of `standard` `batch` jobs, against the stand-in whose latency
grows with the calls in flight.

1. The flood starts and is topped up for the whole run (another 200-prompt job whenever fewer
   than two jobs' steps are left), so it outlasts every deadline: a flex job that is not
   promoted waits behind it.
2. Probes: one-call `interactive` jobs under the flood, one at a time; their p95 from
   submission to end is what a job of the kind takes on this deployment when the queue is
   busy and the job goes first (promoted work goes right after interactive work). They are
   also the estimator's history: the promotion's estimate is the mean run time of the kind's
   jobs completed in the last day.
3. N one-call flex jobs with deadlines, submitted at even intervals over the window, their
   deadlines spread evenly (in a seeded order) from `tight` to `loose` times the probes' p95.
   Each has a twin from a third tenant, flex without a deadline (so never promoted), submitted
   right after it: the same work without promotion, judged against the same deadline.
4. Once every deadline job has ended or passed its deadline, and the last deadline has
   passed, the flood is cancelled and the twins run. A miss: a job that ended after its
   deadline, or was still running at it; read from the API's jobs and from its `/metrics`
   (`agentq_deadline_misses`), which must agree.

Every setting the run depends on is passed to its processes: the sweeper's interval (the
promotion pass runs in it), the safety factor, the default estimate, the tenant cap and the
endpoint cap.
"""

from __future__ import annotations

import argparse
import random
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    TERMINAL,
    base_env,
    create_tenant_key,
    fresh_database,
    percentile,
    redis_server,
    start_api,
    start_worker,
    submit_jobs,
    wait_until,
)
from bench.standin import StandinServer

FLOOD_PROMPTS = 200  # the most a batch job takes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("deadlines (part 5)")
    group.add_argument("--deadline-jobs", type=int, default=60,
                       help="flex jobs with deadlines (each with a twin without one)")
    group.add_argument("--deadline-window", type=float, default=60.0,
                       help="seconds over which they are submitted")
    group.add_argument("--deadline-spread", default="3,30",
                       help="tightest,loosest deadline in multiples of the probes' p95")
    group.add_argument("--probes", type=int, default=8,
                       help="one-call interactive jobs that measure the busy queue first")
    group.add_argument("--sweep-s", type=float, default=1.0,
                       help="AGENTQ_OUTBOX_SWEEP_INTERVAL_S: the sweeper's interval (the "
                            "promotion pass); deployed default 5")
    group.add_argument("--deadline-safety", type=float, default=2.0,
                       help="AGENTQ_DEADLINE_SAFETY (deployed default 2)")
    group.add_argument("--default-estimate", type=float, default=60.0,
                       help="AGENTQ_DEADLINE_DEFAULT_ESTIMATE_S (deployed default 60)")


@dataclass
class Outcome:
    """One deadline job's (or its twin's) end against the deadline."""

    deadline: datetime
    created: datetime
    finished: datetime | None
    status: str
    promoted: datetime | None

    def missed(self, now: datetime) -> bool:
        return (self.finished or now) > self.deadline

    def slack_s(self) -> float | None:
        return None if self.finished is None else (self.deadline - self.finished).total_seconds()


@dataclass
class DeadlineRun:
    busy_p95_s: float
    offsets_s: list[float]
    jobs: list[Outcome]
    twins: list[Outcome]
    metric_misses: float
    metric_promoted: float
    flood_jobs: int
    estimate_s: float | None  # the kind's measured mean after the last deadline


class Flood:
    """Another tenant's `standard` batch jobs, topped up (looked at every second) until
    cancelled."""

    def __init__(self, api: str, key: str, db: str) -> None:
        self.api, self.key, self.db = api, key, db
        self.ids: list[str] = []
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._top_up, daemon=True)

    def _submit(self, n: int) -> None:
        body = {"kind": "batch", "service_tier": "standard",
                "input": {"prompts": [f"p{i}" for i in range(FLOOD_PROMPTS)], "max_tokens": 8}}
        self.ids += submit_jobs(self.api, self.key, [body] * n, 4)

    def steps_left(self) -> int:
        from sqlalchemy import func, select

        from core.db import session_factory
        from core.models import Job

        with session_factory(self.db)() as s:
            return int(s.scalar(select(func.coalesce(func.sum(
                Job.steps_total - Job.steps_done), 0)).where(
                Job.id.in_(self.ids), Job.status.in_(["queued", "running"]))) or 0)

    def start(self) -> None:
        self._submit(3)
        self._thread.start()

    def _top_up(self) -> None:
        while not self._cancelled.wait(1.0):
            if self.steps_left() < 2 * FLOOD_PROMPTS:
                self._submit(1)

    def cancel(self) -> None:
        self._cancelled.set()
        self._thread.join(timeout=30)
        with httpx.Client(headers={"Authorization": f"Bearer {self.key}"}, timeout=30) as c:
            for i in self.ids:
                c.post(f"{self.api}/v1/jobs/{i}/cancel")


def _when(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _read(api: str, key: str, ids: list[str]) -> list[dict[str, Any]]:
    with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
        return [c.get(f"{api}/v1/jobs/{i}").json() for i in ids]


def _wait_ended(db: str, ids: list[str], timeout: float, interval: float = 0.5,
                or_past_deadline: bool = False) -> None:
    """Wait (reading the database: one query a poll) until every job has ended, or with
    `or_past_deadline`, each has ended or passed its deadline."""
    from sqlalchemy import select

    from core.db import session_factory
    from core.models import Job

    def ended() -> bool:
        now = datetime.now(UTC)
        with session_factory(db)() as s:
            rows = s.execute(select(Job.status, Job.due_at).where(Job.id.in_(ids))).all()
        return len(rows) == len(ids) and all(
            status in TERMINAL or (or_past_deadline and due is not None
                                   and (due if due.tzinfo else due.replace(tzinfo=UTC)) < now)
            for status, due in rows)

    wait_until(ended, timeout, interval=interval, what="the jobs to end")


def _metric(api: str, name: str) -> float:
    text = httpx.get(f"{api}/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith((name + " ", name + "{")))


def _estimate(db: str) -> float | None:
    from core.db import session_factory
    from core.models import utcnow
    from core.repositories import jobs

    with session_factory(db)() as s:
        return jobs.mean_run_s(s, utcnow() - timedelta(days=1)).get("completion")


def deadline_run(args: argparse.Namespace, endpoint: str, tmp: Path) -> DeadlineRun:
    tight, loose = (float(x) for x in args.deadline_spread.split(","))
    redis_proc, redis_url = redis_server(tmp)
    try:
        with fresh_database(args.pg, tmp / "deadlines") as db:
            env = {**base_env(), "AGENTQ_DATABASE_URL": db, "AGENTQ_REDIS_URL": redis_url,
                   "AGENTQ_POOL_ENDPOINTS": endpoint,
                   "AGENTQ_TENANT_QUEUED_STEPS_MAX": str(args.cap),
                   "AGENTQ_ENDPOINT_MAX_IN_FLIGHT": str(args.concurrency),
                   "AGENTQ_OUTBOX_SWEEP_INTERVAL_S": str(args.sweep_s),
                   "AGENTQ_DEADLINE_SAFETY": str(args.deadline_safety),
                   "AGENTQ_DEADLINE_DEFAULT_ESTIMATE_S": str(args.default_estimate)}
            api, api_proc = start_api(env, tmp / "deadlines-api.log")
            worker = start_worker(env, tmp / "deadlines-worker.log", args.concurrency)
            try:
                return _scenario(args, api, db, tight, loose)
            finally:
                worker.stop()
                api_proc.stop()
    finally:
        redis_proc.terminate()
        redis_proc.wait(timeout=10)


def _scenario(args: argparse.Namespace, api: str, db: str, tight: float, loose: float
              ) -> DeadlineRun:
    flood = Flood(api, create_tenant_key(db, "flood"), db)
    probe, patient, twin = (create_tenant_key(db, t) for t in ("probe", "patient", "twin"))
    one_call = {"kind": "completion", "input": {"prompt": "Later is fine", "max_tokens": 8}}
    flood.start()
    try:
        # The worker busy with the flood before anything is measured.
        wait_until(lambda: flood.steps_left() <= 3 * FLOOD_PROMPTS - args.concurrency, 120,
                   interval=0.5, what="the flood to start")
        busy: list[float] = []
        for _ in range(args.probes):
            [pid] = submit_jobs(api, probe, [{**one_call, "service_tier": "interactive"}], 1)
            _wait_ended(db, [pid], 120, interval=0.1)
            [j] = _read(api, probe, [pid])
            busy.append((_when(j["finished_at"]) - _when(j["created_at"])  # type: ignore[operator]
                         ).total_seconds())
        busy_p95 = percentile(busy, 95)
        n = args.deadline_jobs
        multiples = [tight + (loose - tight) * i / max(n - 1, 1) for i in range(n)]
        random.Random(14).shuffle(multiples)
        offsets = [m * busy_p95 for m in multiples]
        ids, twin_ids, deadlines = [], [], []
        t0 = time.monotonic()
        for i, offset in enumerate(offsets):
            time.sleep(max(0.0, t0 + i * args.deadline_window / n - time.monotonic()))
            due = datetime.now(UTC) + timedelta(seconds=offset)
            deadlines.append(due)
            ids += submit_jobs(api, patient, [{**one_call, "service_tier": "flex",
                                               "deadline": due.isoformat()}], 1)
            twin_ids += submit_jobs(api, twin, [{**one_call, "service_tier": "flex"}], 1)
        _wait_ended(db, ids, args.deadline_window + max(offsets) + 300, or_past_deadline=True)
        # The flood lasts past the last deadline, so that the twins could meet none by it.
        wait_until(lambda: datetime.now(UTC) > max(deadlines), max(offsets) + 60,
                   what="the last deadline")
        estimate = _estimate(db)  # before the twins run
    finally:
        flood.cancel()
    _wait_ended(db, ids + twin_ids, 300)
    jobs, twins = _read(api, patient, ids), _read(api, twin, twin_ids)
    return DeadlineRun(
        busy_p95_s=busy_p95, offsets_s=offsets,
        jobs=[_outcome(d, j) for d, j in zip(deadlines, jobs, strict=True)],
        twins=[_outcome(d, j) for d, j in zip(deadlines, twins, strict=True)],
        metric_misses=_metric(api, "agentq_deadline_misses_total"),
        metric_promoted=_metric(api, "agentq_jobs_promoted_total"),
        flood_jobs=len(flood.ids), estimate_s=estimate)


def _outcome(deadline: datetime, job: dict[str, Any]) -> Outcome:
    return Outcome(deadline, datetime.fromisoformat(job["created_at"]), _when(job["finished_at"]),
                   job["status"], _when(job["promoted_at"]))


def _misses(outcomes: list[Outcome]) -> str:
    now = datetime.now(UTC)
    x = sum(o.missed(now) for o in outcomes)
    return f"{x} of {len(outcomes)} ({x / len(outcomes) * 100:.1f} %)"


def _slack(outcomes: list[Outcome]) -> str:
    s = [v for o in outcomes if (v := o.slack_s()) is not None]
    return (f"slack p50 {percentile(s, 50):.2f} s, p5 {percentile(s, 5):.2f} s, "
            f"min {min(s):.2f} s")


def deadline_part(args: argparse.Namespace, standin: StandinServer, tmp: Path) -> None:
    r = deadline_run(args, standin.url, tmp)
    tight, loose = (float(x) for x in args.deadline_spread.split(","))
    promoted = [o for o in r.jobs if o.promoted is not None]
    at_once = sum(o.promoted == o.created for o in promoted)
    lead = [(o.deadline - p).total_seconds() for o in r.jobs if (p := o.promoted) is not None]
    statuses = sorted({o.status for o in r.jobs + r.twins})
    print(f"deadlines: {len(r.jobs)} one-call flex jobs over {args.deadline_window:.0f} s "
          f"behind a standard flood ({r.flood_jobs} batch jobs x {FLOOD_PROMPTS}, topped up "
          f"past the last deadline); sweeper every {args.sweep_s:g} s, safety "
          f"{args.deadline_safety:g}, worker threads {args.concurrency}, cap {args.cap}:")
    print(f"  busy queue: interactive one-call p95 {r.busy_p95_s:.2f} s ({args.probes} "
          f"probes); deadlines {tight:g}x to {loose:g}x that: {min(r.offsets_s):.1f} s to "
          f"{max(r.offsets_s):.1f} s after submission, evenly spread")
    print(f"  promoted {len(promoted)} of {len(r.jobs)} (metric {r.metric_promoted:.0f}; "
          f"{at_once} at submission, {len(promoted) - at_once} by the sweeper), at p50 "
          f"{percentile(lead, 50):.2f} s before the deadline (min "
          f"{min(lead, default=float('nan')):.2f} s); the kind's estimate after the last "
          f"deadline "
          f"{r.estimate_s or float('nan'):.2f} s; statuses {', '.join(statuses)}")
    missed = sum(o.missed(datetime.now(UTC)) for o in r.jobs)
    agree = "agrees" if missed == r.metric_misses else "DISAGREES"
    print(f"  deadline misses {_misses(r.jobs)}, target < 1 %; agentq_deadline_misses "
          f"{r.metric_misses:.0f} ({agree}); {_slack(r.jobs)}")
    for o in [o for o in r.jobs if o.missed(datetime.now(UTC))][:5]:
        ahead = (o.deadline - o.created).total_seconds()
        if o.promoted is None or o.finished is None:
            print(f"    missed: deadline {ahead:.1f} s ahead, never promoted or never ended")
            continue
        print(f"    missed: deadline {ahead:.1f} s ahead, promoted "
              f"{(o.deadline - o.promoted).total_seconds():.2f} s before it, ended "
              f"{(o.finished - o.promoted).total_seconds():.2f} s after its promotion")
    print(f"  without promotion (twins, flex without a deadline): misses {_misses(r.twins)}; "
          f"{_slack(r.twins)}")
