"""Mean job completion time under job-aware admission, on a replayed trace of jobs arriving
over time (part of `bench.scheduling`).

The trace: jobs arrive as a Poisson process for `seconds` at `load` of the endpoint's nominal
capacity (its cap of calls in flight over the stand-in's latency at that batch). Most are short
(two calls one after the other: a question and a follow-up); some are long and fan out (a
batch or a research job: `fan_out` parallel calls, then one that combines them). Short jobs
thus arrive behind long ones' fan-outs, the case job-aware admission exists for (Autellix);
started all at once, as a single wave, least attained service gains little over round robin.
The same trace (seeded) is replayed under each policy:

- `fcfs`: one queue in order of arrival (a server's own queue, or admission blind to jobs);
- `round_robin`: per-job turns, no attained service;
- `las`: least attained service with aging, no levels (quantum 0: each token counts);
- `levels_x2`: attained service in levels (a multi-level feedback queue, Autellix's
  discretised least attained service) whose bounds double: 1, 2, 4... quanta;
- `levels`: as deployed (`inference.admission`): levels whose bounds grow sixteenfold.

In every policy but FCFS jobs of one level take turns (the fewest calls in flight first),
then the oldest job. The stand-in's calls are about 17 tokens (a real call is some hundreds):
the aging and the quantum are scaled from their defaults (200 tokens per second waited, 500
tokens) by a tenth: 20 tokens per second waited (about one call's worth), a quantum of 50
tokens (about three calls).
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from bench.standin import StandinServer
from core.settings import Settings
from inference.admission import Admission
from inference.calls import CallSpec
from inference.pool import CompletionRequest, Pool

CAP = 4  # the endpoint's calls in flight


@dataclass(frozen=True)
class TraceJob:
    arrival_s: float
    long: bool
    turns: tuple[int, ...]  # parallel calls per turn, turn after turn


@dataclass(frozen=True)
class JctResult:
    mean_s: float
    short_mean_s: float
    long_mean_s: float
    p95_s: float
    wall_s: float


def trace(seconds: float, load: float, delay_s: float, batch_delay_s: float,
          long_share: float = 0.15, fan_out: int = 24, seed: int = 14) -> list[TraceJob]:
    capacity = CAP / (delay_s + batch_delay_s * CAP)  # calls per second at a full batch
    mean_calls = long_share * (fan_out + 1) + (1 - long_share) * 2
    rate = load * capacity / mean_calls  # jobs per second
    rng = random.Random(seed)
    jobs, t = [], rng.expovariate(rate)
    while t < seconds:
        long = rng.random() < long_share
        jobs.append(TraceJob(t, long, (fan_out, 1) if long else (1, 1)))
        t += rng.expovariate(rate)
    return jobs


POLICIES = ("fcfs", "round_robin", "las", "levels_x2", "levels")


def _pool(redis_url: str, standin: StandinServer, aging: float, quantum: int,
          growth: float) -> Pool:
    settings = Settings(pool_endpoints=[standin.url], endpoint_max_in_flight=CAP,
                        redis_url=redis_url, admission_aging_tokens_per_s=aging,
                        admission_quantum_tokens=quantum, admission_level_growth=growth)
    admission = Admission(redis.Redis.from_url(redis_url), lease_s=120, poll_s=0.05,
                          aging_tokens_per_s=aging, quantum_tokens=quantum,
                          level_growth=growth)
    return Pool(settings=settings, admission=admission)


def replay(redis_url: str, standin: StandinServer, policy: str, jobs: list[TraceJob],
           aging: float = 20.0, quantum: int = 50, growth: float = 16.0) -> JctResult:
    """Replay the trace under `policy`; each job's completion time runs from its arrival to
    the end of its last call."""
    redis.Redis.from_url(redis_url).flushdb()
    # Round robin: every job's service ages to nothing at once, so jobs take turns.
    pool = _pool(redis_url, standin, 1e12 if policy == "round_robin" else aging,
                 0 if policy == "las" else quantum, 2.0 if policy == "levels_x2" else growth)
    done: dict[int, float] = {}
    start = time.monotonic()

    def call(job: str) -> None:
        pool.complete(CompletionRequest(
            call=CallSpec(prompt=f"{job} asks", max_tokens=16),
            request_id=f"{job}:{time.monotonic_ns()}:{threading.get_ident()}",
            tenant_id="t", job_id="all" if policy == "fcfs" else job))

    def run_job(i: int, job: TraceJob) -> None:
        delay = start + job.arrival_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # the trace's arrival time, not a wait on a condition
        for width in job.turns:
            _together([_bind(call, f"job{i}") for _ in range(width)])
        done[i] = time.monotonic() - (start + job.arrival_s)

    _together([_bind(run_job, i, j) for i, j in enumerate(jobs)])
    wall = time.monotonic() - start
    pool.close()
    times = [done[i] for i in range(len(jobs))]
    short = [done[i] for i, j in enumerate(jobs) if not j.long]
    long = [done[i] for i, j in enumerate(jobs) if j.long]
    ordered = sorted(times)
    return JctResult(statistics.mean(times), statistics.mean(short) if short else 0.0,
                     statistics.mean(long) if long else 0.0,
                     ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], wall)


def median(results: list[JctResult]) -> JctResult:
    """Each figure's median over replays."""
    return JctResult(*(statistics.median(getattr(r, f) for r in results)
                       for f in ("mean_s", "short_mean_s", "long_mean_s", "p95_s", "wall_s")))


def _bind(fn: Callable[..., None], *args: object) -> Callable[[], None]:
    return lambda: fn(*args)


def _together(work: list[Callable[[], None]]) -> None:
    threads = [threading.Thread(target=w) for w in work]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
