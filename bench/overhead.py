"""Orchestration overhead: the platform's step throughput and hand-off latency with a model
server that answers at once, next to raw Celery running empty tasks on the same machine.

    python -m bench.overhead [--jobs 50] [--workers 1] [--concurrency 64]
                             [--database-url URL] [--redis-url URL] [--broker-url URL]

In one run:
  1. platform: a stand-in model server (in this process, no delay), a fresh migrated database
     (a temporary SQLite file, or a temporary database on the Postgres server of
     `--database-url`), the API under uvicorn, `--workers` Celery worker processes with
     `--concurrency` slots each; `--jobs` research jobs submitted through the API. Steps/s is
     completed steps over the time from the first submission to the last job finishing. From
     the database's timestamps: the hand-off (a step's start minus the finish of the last
     dependency it waited for) and submission to first step start, over first attempts.
     Before them, `--lone-jobs` jobs one at a time: the hand-off with no queue to wait in.
     Then one `batch` job of 200 prompts: every step of one job runnable at once, each call
     reserved and settled against the same job row (its steps/s and worker CPU per step).
  2. raw Celery: the same number of worker processes and slots, on the same broker,
     running `bench.celery_empty` (an INCR per task). First the latency of single messages sent
     one at a time, then as many empty tasks as the platform ran steps, all sent at once;
     tasks/s is from the first send to the last completion.
Prints both rates, their ratio, the latencies and the machine's core count. With
`AGENTQ_BENCH_PROFILE_DIR=DIR` (and py-spy installed), each platform worker is sampled by
`py-spy record --gil` into DIR as collapsed stacks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import create_engine, func, literal_column, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from bench.common import (
    TERMINAL,
    Proc,
    cpu_seconds,
    create_tenant_key,
    fresh_database,
    percentile,
    start_api,
    start_worker,
    submit_jobs,
    tail,
    wait_until,
)

QUERIES = ["How do honey bees make honey?", "Why do glaciers move?", "How do tides work?",
           "What makes copper a good conductor?", "How do owls hunt at night?",
           "Why is the sea salty?", "How do volcanoes form?", "How does bread rise?"]


@dataclass
class PlatformResult:
    jobs: int
    steps: int
    submit_s: float
    wall_s: float
    handoffs_ms: list[float]
    submit_to_start_ms: list[float]
    job_latency_ms: list[float]
    retried_steps: int
    worker_cpu_s: float | None
    api_cpu_s: float | None
    batch_steps: int = 0
    batch_s: float = 0.0
    batch_worker_cpu_s: float | None = None
    lone_handoffs_ms: list[float] | None = None
    # Postgres only: the hand-offs of the dependants that went through the broker (the others
    # were claimed in their last dependency's completing transaction).
    broker_handoffs_ms: list[float] | None = None


@dataclass
class RawResult:
    tasks: int
    send_s: float
    wall_s: float
    hops_ms: list[float]
    worker_cpu_s: float | None


def _env(db_url: str | None, redis_url: str, endpoint: str | None,
         concurrency: int, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, **(extra or {}), "AGENTQ_REDIS_URL": redis_url,
           "AGENTQ_WORKER_CONCURRENCY": str(concurrency),
           # Submissions come as fast as the client can send them.
           "AGENTQ_RATE_LIMIT": "1000000/minute"}
    if db_url is not None:
        env["AGENTQ_DATABASE_URL"] = db_url
    if endpoint is not None:
        env["AGENTQ_POOL_ENDPOINTS"] = endpoint
    return env


def _bodies(n: int, subquestions: int) -> list[dict[str, object]]:
    return [{"kind": "research", "input": {"query": f"{QUERIES[i % len(QUERIES)]} (#{i})",
                                           "max_subquestions": subquestions}}
            for i in range(n)]


def _ms(a: datetime, b: datetime) -> float:
    return (a - b).total_seconds() * 1000


def run_platform(db_url: str, redis_url: str, endpoint: str, jobs: int, subquestions: int,
                 workers: int, concurrency: int, submit_concurrency: int,
                 workdir: Path, batch_prompts: int = 200, lone_jobs: int = 5,
                 extra_env: Mapping[str, str] | None = None) -> PlatformResult:
    """One run of the platform; `extra_env` goes to its processes (e.g. `OTEL_*`)."""
    from core.models import Job, Step

    redis.Redis.from_url(redis_url).flushdb()
    env = _env(db_url, redis_url, endpoint, concurrency, extra_env)
    key = create_tenant_key(db_url, "bench-overhead")
    worker_procs: list[Proc] = []
    api: Proc | None = None
    engine = create_engine(db_url)
    try:
        for i in range(workers):
            worker_procs.append(start_worker(env, workdir / f"platform-worker-{i + 1}.log",
                                         concurrency=concurrency))
        base, api = start_api(env, workdir / "api.log")

        def done(ids: list[str]) -> bool:
            with Session(engine) as s:
                n = s.scalar(select(func.count()).select_from(Job).where(
                    Job.id.in_(ids), Job.status.in_(TERMINAL)))
            return int(n or 0) >= len(ids)

        # One job first, so that imports, connections and first-call costs are not measured.
        warm = submit_jobs(base, key, _bodies(1, subquestions), 1)
        wait_until(lambda: done(warm), 120, interval=0.05, what="the warm-up job")
        # Jobs one at a time: the hand-off of the path itself, with no queue to wait in.
        lone: list[str] = []
        for body in _bodies(lone_jobs, subquestions):
            one = submit_jobs(base, key, [body], 1)
            wait_until(lambda one=one: done(one), 120,  # type: ignore[misc]
                       interval=0.01, what="a lone job")
            lone += one

        worker_cpu0, api_cpu0 = cpu_seconds(worker_procs), cpu_seconds([api])
        start = datetime.now(UTC)
        t0 = time.perf_counter()
        ids = submit_jobs(base, key, _bodies(jobs, subquestions), submit_concurrency)
        submit_s = time.perf_counter() - t0
        api_cpu1 = cpu_seconds([api])
        wait_until(lambda: done(ids), 600, interval=0.05, what=f"{jobs} jobs")
        worker_cpu1 = cpu_seconds(worker_procs)

        # One wide job: a `batch` of `batch_prompts` prompts, its steps all runnable at once,
        # each a model call settled against the same job row.
        batch_cpu0 = cpu_seconds(worker_procs)
        batch_ids = submit_jobs(base, key, [{"kind": "batch", "input": {
            "prompts": [f"Prompt {i} of the wide job" for i in range(batch_prompts)],
            "max_tokens": 8}, "budget": {"max_total_tokens": 1_000_000}}], 1)
        wait_until(lambda: done(batch_ids), 600, interval=0.05, what="the batch job")
        batch_cpu1 = cpu_seconds(worker_procs)
        with Session(engine) as s:
            batch = s.execute(select(Job.status, Job.created_at, Job.finished_at, Job.steps_done)
                              .where(Job.id == batch_ids[0])).one()
            if batch.status != "completed":
                raise SystemExit(f"the batch job ended {batch.status}")
            job_rows = s.execute(select(Job.id, Job.status, Job.created_at, Job.finished_at)
                                 .where(Job.id.in_(ids))).all()
            step_rows = s.execute(select(Step.job_id, Step.key, Step.depends_on, Step.status,
                                         Step.attempt, Step.started_at, Step.finished_at)
                                  .where(Step.job_id.in_(ids))).all()
            lone_rows = s.execute(select(Step.job_id, Step.key, Step.depends_on, Step.status,
                                         Step.attempt, Step.started_at, Step.finished_at)
                                  .where(Step.job_id.in_(lone))).all()
            inline = _claimed_in_completion(s, ids)
        bad = [(j.id, j.status) for j in job_rows if j.status != "completed"]
        if bad:
            for p in [*worker_procs, api]:
                print(f"--- {p.log.name} ---\n{tail(p)}", file=sys.stderr)
            raise SystemExit(f"{len(bad)} of {jobs} jobs did not complete: {bad[:5]}")
    finally:
        engine.dispose()
        if api is not None:
            api.stop()
        for p in worker_procs:
            p.stop()

    finished = max(j.finished_at for j in job_rows if j.finished_at is not None)
    first_start: dict[str, datetime] = {}
    for r in step_rows:
        if r.started_at is not None:
            prev = first_start.get(r.job_id)
            first_start[r.job_id] = r.started_at if prev is None else min(prev, r.started_at)
    first_attempt_jobs = {r.job_id for r in step_rows if r.attempt == 1 and not r.depends_on}
    return PlatformResult(
        jobs=jobs,
        steps=sum(1 for r in step_rows if r.status == "completed"),
        submit_s=submit_s,
        wall_s=(finished - start).total_seconds(),
        handoffs_ms=_handoffs(step_rows),
        lone_handoffs_ms=_handoffs(lone_rows),
        broker_handoffs_ms=None if inline is None else _handoffs(step_rows, skip=inline),
        submit_to_start_ms=[_ms(first_start[j.id], j.created_at) for j in job_rows
                            if j.id in first_start and j.id in first_attempt_jobs],
        job_latency_ms=[_ms(j.finished_at, j.created_at) for j in job_rows
                        if j.finished_at is not None],
        retried_steps=sum(1 for r in step_rows if r.attempt > 1),
        worker_cpu_s=_delta(worker_cpu0, worker_cpu1),
        api_cpu_s=_delta(api_cpu0, api_cpu1),
        batch_steps=int(batch.steps_done),
        batch_s=(batch.finished_at - batch.created_at).total_seconds(),
        batch_worker_cpu_s=_delta(batch_cpu0, batch_cpu1),
    )


def _claimed_in_completion(s: Session, job_ids: list[str]) -> set[tuple[str, str]] | None:
    """The dependants (job, key) claimed in the transaction that completed one of their
    dependencies: their `step.started` event and its `step.completed` have the same `xmin`
    (the writing transaction). None on SQLite, which has no such column."""
    if s.get_bind().dialect.name != "postgresql":
        return None
    from core.models import JobEvent

    started: dict[tuple[str, str], str] = {}
    completing: set[tuple[str, str]] = set()
    for job_id, xmin, type_, data in s.execute(
            select(JobEvent.job_id, literal_column("xmin::text"), JobEvent.type, JobEvent.data)
            .where(JobEvent.job_id.in_(job_ids),
                   JobEvent.type.in_(["step.started", "step.completed"]))):
        if type_ == "step.started":
            started[(job_id, str((data or {}).get("step")))] = xmin
        else:
            completing.add((job_id, xmin))
    return {key for key, xmin in started.items() if (key[0], xmin) in completing}


def _handoffs(step_rows: Sequence[Any], skip: AbstractSet[tuple[str, str]] = frozenset()
              ) -> list[float]:
    """Each dependant's start minus the finish of the last dependency it waited for (first
    attempts only: a step run again keeps only its last start); not those in `skip`."""
    by_key = {(r.job_id, r.key): r for r in step_rows}
    out: list[float] = []
    for r in step_rows:
        if not r.depends_on or r.attempt != 1 or r.started_at is None \
                or (r.job_id, r.key) in skip:
            continue
        deps = [by_key[(r.job_id, k)].finished_at for k in r.depends_on]
        if all(d is not None for d in deps):
            out.append(_ms(r.started_at, max(d for d in deps if d is not None)))
    return out


def _delta(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


def run_raw(redis_url: str, tasks: int, hops: int, workers: int, concurrency: int,
            workdir: Path) -> RawResult:
    from bench import celery_empty

    r = redis.Redis.from_url(redis_url)
    r.flushdb()
    celery_empty.app.conf.broker_url = os.environ.get("AGENTQ_BROKER_URL") or redis_url
    env = _env(None, redis_url, None, concurrency)
    procs: list[Proc] = []
    try:
        for i in range(workers):
            procs.append(start_worker(env, workdir / f"empty-worker-{i + 1}.log",
                                      concurrency=concurrency, app="bench.celery_empty"))
        # Single messages, one at a time: the broker's own hop, with nothing else queued.
        hop_ms: list[float] = []
        for _ in range(hops):
            celery_empty.app.send_task("bench.hop", args=[time.time()])
            got = r.blpop([celery_empty.HOPS_KEY], timeout=30)
            if not isinstance(got, list | tuple):
                raise SystemExit("an empty task did not run within 30 s")
            hop_ms.append(float(got[1]) * 1000)

        r.delete(celery_empty.DONE_KEY, celery_empty.FINISHED_AT_KEY)
        cpu0 = cpu_seconds(procs)
        t0 = time.time()
        for _ in range(tasks):
            celery_empty.app.send_task("bench.empty", args=[tasks])
        send_s = time.time() - t0
        finished_at = wait_until(lambda: r.get(celery_empty.FINISHED_AT_KEY), 600,
                                 interval=0.01, what=f"{tasks} empty tasks")
        wall_s = float(finished_at) - t0
        worker_cpu_s = _delta(cpu0, cpu_seconds(procs))
    finally:
        for p in reversed(procs):
            p.stop()
        r.flushdb()
        r.close()
    return RawResult(tasks=tasks, send_s=send_s, wall_s=wall_s, hops_ms=hop_ms,
                     worker_cpu_s=worker_cpu_s)


def _pct(values: list[float]) -> str:
    return f"{percentile(values, 50):8.1f} / {percentile(values, 95):8.1f}"


def _per(total_s: float | None, n: int) -> str:
    return f"{'n/a':>10s}" if total_s is None or not n else f"{total_s / n * 1000:10.1f}"


def _broker_line(p: PlatformResult) -> list[str]:
    if p.broker_handoffs_ms is None:
        return []
    inline = len(p.handoffs_ms) - len(p.broker_handoffs_ms)
    return [f"{'  of those, through the broker':40s}{_pct(p.broker_handoffs_ms)}   "
            f"({len(p.broker_handoffs_ms)}; the other {inline} were claimed in their last "
            "dependency's completing transaction)"]


def report(p: PlatformResult, raw: RawResult, args: argparse.Namespace, db_kind: str) -> str:
    steps_per_job = args.max_subquestions + 2
    plat_rate = p.steps / p.wall_s
    raw_rate = raw.tasks / raw.wall_s
    lines = [
        "",
        f"{p.jobs} research jobs ({args.max_subquestions} sub-questions: {steps_per_job} steps "
        f"each), stand-in model answering at once",
        f"{args.workers} worker process(es) x {args.concurrency} slots, {db_kind}, "
        f"Redis {args.redis_url}, broker {args.broker_url or 'that Redis'}, "
        f"os.cpu_count() = {os.cpu_count()}",
        "",
        f"{'platform steps/s':40s}{plat_rate:10.1f}   ({p.steps} steps in {p.wall_s:.2f} s, "
        f"first submit -> last job finished; submitting took {p.submit_s:.2f} s)",
        f"{'raw Celery empty tasks/s':40s}{raw_rate:10.1f}   ({raw.tasks} tasks in "
        f"{raw.wall_s:.2f} s, first send -> last done; sending took {raw.send_s:.2f} s)",
        f"{'ratio platform / raw Celery':40s}{plat_rate / raw_rate:10.3f}",
        f"{'hand-off p50 / p95 (ms)':40s}{_pct(p.handoffs_ms)}   ({len(p.handoffs_ms)} "
        f"dependants: start - last dependency's finish)",
        *_broker_line(p),
        f"{'hand-off, one job at a time p50 / p95':40s}{_pct(p.lone_handoffs_ms or [])}   "
        f"({len(p.lone_handoffs_ms or [])} dependants of {args.lone_jobs} jobs run alone)",
        f"{'submit -> first step start p50/p95 (ms)':40s}{_pct(p.submit_to_start_ms)}   "
        f"({len(p.submit_to_start_ms)} jobs: job created -> first step started)",
        f"{'job latency p50 / p95 (ms)':40s}{_pct(p.job_latency_ms)}   (job created -> "
        f"finished)",
        f"{'raw Celery hop p50 / p95 (ms)':40s}{_pct(raw.hops_ms)}   ({len(raw.hops_ms)} "
        f"single messages, send -> task running, nothing else queued)",
        f"{'worker CPU per step (ms)':40s}{_per(p.worker_cpu_s, p.steps)}   (platform "
        f"worker processes, user + system, while the jobs ran)",
        f"{'API CPU per submission (ms)':40s}{_per(p.api_cpu_s, p.jobs)}",
        f"{'one batch job: steps/s':40s}{p.batch_steps / p.batch_s:10.1f}   ({p.batch_steps} "
        f"steps of one job in {p.batch_s:.2f} s, created -> finished)",
        f"{'one batch job: worker CPU per step (ms)':40s}"
        f"{_per(p.batch_worker_cpu_s, p.batch_steps)}",
        f"{'worker CPU per empty task (ms)':40s}{_per(raw.worker_cpu_s, raw.tasks)}   (raw "
        f"Celery worker processes)",
        f"{'cores (os.cpu_count())':40s}{os.cpu_count():10d}",
    ]
    if p.retried_steps:
        lines.append(f"note: {p.retried_steps} step(s) ran more than once; their latencies "
                     "are left out (only the last start is recorded)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--max-subquestions", type=int, default=3,
                        help="investigators per job (2..8); steps per job = this + 2")
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--concurrency", type=int, default=64, help="slots per worker")
    parser.add_argument("--submit-concurrency", type=int, default=8,
                        help="submissions in flight to the API")
    parser.add_argument("--lone-jobs", type=int, default=5,
                        help="jobs run one at a time first, for the hand-off with no queue")
    parser.add_argument("--hops", type=int, default=20,
                        help="single empty messages timed one at a time")
    parser.add_argument("--database-url",
                        help="a Postgres server to create a temporary database on, e.g. "
                             "postgresql+psycopg://postgres@127.0.0.1:5432/postgres "
                             "(default: a temporary SQLite file)")
    parser.add_argument("--redis-url", default=os.environ.get(
        "AGENTQ_BENCH_OVERHEAD_REDIS_URL", "redis://127.0.0.1:6379/13"),
                        help="a Redis database for this benchmark alone; flushed")
    parser.add_argument("--broker-url", default=os.environ.get(
        "AGENTQ_BENCH_OVERHEAD_BROKER_URL", ""),
                        help="the Celery broker, e.g. a RabbitMQ virtual host for this "
                             "benchmark alone, amqp://guest:guest@127.0.0.1:5672/bench "
                             "(default: the Redis database)")
    args = parser.parse_args()
    # Every process of the run (workers, API, the raw Celery app) reads it from here.
    os.environ["AGENTQ_BROKER_URL"] = args.broker_url
    if not 2 <= args.max_subquestions <= 8:
        parser.error("--max-subquestions must be between 2 and 8")

    from bench.standin import StandinServer

    plan = [f"What is part {i + 1} of it, in some detail?" for i in range(args.max_subquestions)]
    with tempfile.TemporaryDirectory(prefix="agentq-bench-") as tmp:
        workdir = Path(tmp)
        standin = StandinServer(delay_s=0.0, plan_text=json.dumps(plan)).start()
        try:
            with fresh_database(args.database_url, workdir) as db_url:
                db_kind = f"database {make_url(db_url).get_backend_name()}"
                print(f"platform: {args.jobs} research jobs through the API …", flush=True)
                plat = run_platform(db_url, args.redis_url, standin.url, args.jobs,
                                    args.max_subquestions, args.workers, args.concurrency,
                                    args.submit_concurrency, workdir,
                                    lone_jobs=args.lone_jobs)
                from core.db import dispose_engines

                dispose_engines()
            print(f"raw Celery: {plat.steps} empty tasks …", flush=True)
            raw = run_raw(args.redis_url, plat.steps, args.hops, args.workers,
                          args.concurrency, workdir)
        finally:
            standin.stop()
    print(report(plat, raw, args, db_kind))


if __name__ == "__main__":
    main()
