"""Scheduling: service tiers and the per-tenant cap at the queue, job-aware admission at the
pool. One run, every figure side by side, against the stand-in model server whose per-call
latency grows with the number of calls it is running (`--delay` plus `--batch-delay` per call
in flight).

    python -m bench.scheduling [--pg postgresql://postgres@127.0.0.1:5432/postgres]
                               [--flood-jobs 10] [--flood-prompts 40] [--interactive 5]
                               [--concurrency 16] [--cap 32]
                               [--only queue|admission|windows|deadlines]
                               [--deadline-jobs 60] [--deadline-window 60]
                               [--deadline-spread 3,30] [--probes 8] [--sweep-s 1]
                               [--deadline-safety 2] [--default-estimate 60]

1. The queue (a real API process and a Celery worker, a Redis server and a database of the
   run's own). Five one-call jobs of one tenant, their latency from submission to end (p95):
   alone; behind a flood of `batch` jobs another tenant submitted just before, as today
   (everything `standard`, no cap: first come, first served); and with the interactive tier
   and the per-tenant cap, the flood submitted as `flex`.
2. Admission (in this process: `inference.pool.Pool` with Redis admission, an endpoint cap of
   4): mean job completion time on a replayed trace of jobs arriving over time, short jobs
   behind long ones' fan-outs (`bench.jct`), under first come first served, per-job round
   robin, least attained service (no levels), and attained service in levels whose bounds
   double or grow sixteenfold (as deployed).
3. Fairness: three tenants sharing the endpoint, one with 48 calls in flight, two with 8;
   the calls each was served while all three had calls waiting, and Jain's index of them.
4. Cheap and clean hours (a simulated clock): flex jobs submitted through a sample day with
   deadlines 4 to 20 hours ahead, planned by the platform's own planner; the mean price of
   power and carbon intensity of their start hours against starting at submission.
5. Deadlines, measured (`bench.deadlines`, a deployment of its own like part 1): one-call flex
   jobs with deadlines submitted over a minute behind another tenant's `standard` flood that
   outlasts them all, their deadlines spread from 3 to 30 times what a one-call job takes
   there when it goes first; deadline misses (from the jobs and from `/metrics`, which must
   agree) against the target of under 1 %, their slack, how many were promoted and when, and
   the same jobs' twins without a deadline (never promoted) against the same deadlines.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import redis

from bench import deadlines, jct
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
from core.settings import Settings
from inference.admission import Admission
from inference.calls import CallSpec
from inference.pool import CompletionRequest, Pool


def _latencies(api: str, key: str, ids: list[str]) -> list[float]:
    def ended() -> list[dict[str, Any]] | None:
        jobs = [httpx.get(f"{api}/v1/jobs/{i}", headers={"Authorization": f"Bearer {key}"},
                          timeout=30).json() for i in ids]
        return jobs if all(j["status"] in TERMINAL for j in jobs) else None

    jobs = wait_until(ended, 900, interval=0.2, what="the jobs")
    from datetime import datetime
    return [(datetime.fromisoformat(j["finished_at"]) - datetime.fromisoformat(j["created_at"])
             ).total_seconds() for j in jobs]


def queue_run(args: argparse.Namespace, endpoint: str, tmp: Path, name: str,
              flood: bool, tiers: bool) -> float:
    """p95 latency of the interactive tenant's jobs in one scenario (a fresh deployment)."""
    redis_proc, redis_url = redis_server(tmp)
    try:
        with fresh_database(args.pg, tmp / name) as db:
            env = {**base_env(), "AGENTQ_DATABASE_URL": db, "AGENTQ_REDIS_URL": redis_url,
                   "AGENTQ_POOL_ENDPOINTS": endpoint,
                   "AGENTQ_TENANT_QUEUED_STEPS_MAX": str(args.cap if tiers else 0),
                   "AGENTQ_ENDPOINT_MAX_IN_FLIGHT": str(args.concurrency)}
            api, api_proc = start_api(env, tmp / f"{name}-api.log")
            worker = start_worker(env, tmp / f"{name}-worker.log", args.concurrency)
            try:
                big, small = create_tenant_key(db, "flood"), create_tenant_key(db, "asker")
                if flood:
                    body = {"kind": "batch", "service_tier": "flex" if tiers else "standard",
                            "input": {"prompts": [f"p{i}" for i in range(args.flood_prompts)],
                                      "max_tokens": 8}}
                    submit_jobs(api, big, [body] * args.flood_jobs, 8)
                ask = {"kind": "completion", "service_tier": "interactive" if tiers
                       else "standard", "input": {"prompt": "Quick question", "max_tokens": 8}}
                ids = submit_jobs(api, small, [ask] * args.interactive, 8)
                return percentile(_latencies(api, small, ids), 95)
            finally:
                worker.stop()
                api_proc.stop()
    finally:
        redis_proc.terminate()
        redis_proc.wait(timeout=10)


def _pool(redis_url: str, standin: StandinServer, aging: float, quantum: int) -> Pool:
    # Admission as deployed (levels growing sixteenfold), the aging and quantum given.
    settings = Settings(pool_endpoints=[standin.url], endpoint_max_in_flight=4,
                        redis_url=redis_url, admission_aging_tokens_per_s=aging,
                        admission_quantum_tokens=quantum)
    admission = Admission(redis.Redis.from_url(redis_url), lease_s=120, poll_s=0.05,
                          aging_tokens_per_s=aging, quantum_tokens=quantum)
    return Pool(settings=settings, admission=admission)


def _call(pool: Pool, tenant: str, job: str) -> None:
    pool.complete(CompletionRequest(call=CallSpec(prompt=f"{job} asks", max_tokens=16),
                                    request_id=f"{job}:{time.monotonic_ns()}",
                                    tenant_id=tenant, job_id=job))


def jain(redis_url: str, standin: StandinServer, quantum: int = 50
         ) -> tuple[float, dict[str, int]]:
    redis.Redis.from_url(redis_url).flushdb()
    pool = _pool(redis_url, standin, 2000.0, quantum)  # levels as deployed
    served: Counter[str] = Counter()
    stop = threading.Event()
    lock = threading.Lock()

    def caller(tenant: str, job: str) -> None:
        while not stop.is_set():
            _call(pool, tenant, job)
            with lock:
                if not stop.is_set():
                    served[tenant] += 1
                    if served[tenant] >= 60:  # the window ends when any tenant is served 60
                        stop.set()

    work = [_bind(caller, "flood", f"f{j}") for j in range(48)]
    work += [_bind(caller, t, f"{t}{j}") for t in ("a", "b") for j in range(8)]
    _threads(work)
    pool.close()
    xs = [served[t] for t in ("flood", "a", "b")]
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs)), dict(served)


def _bind(fn: Callable[..., None], *args: Any) -> Callable[[], None]:
    return lambda: fn(*args)


# A sample day (UTC hours): power cheap at night and dear in the evening peak; the grid
# cleanest at midday (solar) and dirtiest at night.
SAMPLE_PRICE = [0.08] * 6 + [0.14] * 4 + [0.12] * 6 + [0.18] + [0.30] * 5 + [0.14] * 2
SAMPLE_CARBON = [450.0] * 6 + [350.0] * 4 + [150.0] * 6 + [300.0] + [420.0] * 5 + [450.0] * 2


def windows(jobs: int = 500, estimate_h: float = 1.0, safety: float = 2.0
            ) -> dict[str, tuple[float, float]]:
    """Flex jobs submitted at random times of a simulated day, with deadlines 4 to 20 hours
    ahead: the mean price (cost-optimised) and carbon intensity (carbon-optimised) of their
    start hour, windowed (`core.grid.best_start`, the platform's own planner) against at
    submission, from the same schedule."""
    import random
    from datetime import UTC, datetime, timedelta

    from core.grid import GridHour, best_start

    hours = tuple(GridHour(price=p, carbon=c)
                  for p, c in zip(SAMPLE_PRICE, SAMPLE_CARBON, strict=True))
    rng = random.Random(14)
    day = datetime(2026, 12, 1, tzinfo=UTC)
    out: dict[str, tuple[float, float]] = {}
    for optimize in ("cost", "carbon"):
        now_v, win_v = [], []
        for _ in range(jobs):
            submitted = day + timedelta(minutes=rng.randrange(24 * 60))
            due = submitted + timedelta(hours=rng.uniform(4, 20))
            start = best_start(hours, submitted, due - timedelta(hours=safety * estimate_h),
                               "cost" if optimize == "cost" else "carbon")
            pick = (lambda h: h.price) if optimize == "cost" else (lambda h: h.carbon)
            now_v.append(pick(hours[submitted.hour]))
            win_v.append(pick(hours[start.hour]))
            assert start + timedelta(hours=estimate_h) <= due
        out[optimize] = (statistics.mean(now_v), statistics.mean(win_v))
    return out


def _threads(work: list[Callable[[], None]]) -> None:
    threads = [threading.Thread(target=w) for w in work]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def vllm_run(args: argparse.Namespace) -> None:
    """The queue's three scenarios against the embedded model on vLLM."""
    from bench.throughput import start_server

    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        url, server = start_server(tmp)
        try:
            alone = queue_run(args, url, tmp, "alone", flood=False, tiers=True)
            fifo = queue_run(args, url, tmp, "fifo", flood=True, tiers=False)
            tiered = queue_run(args, url, tmp, "tiered", flood=True, tiers=True)
        finally:
            server.stop()
    print(f"embedded vLLM; worker threads {args.concurrency}; cap {args.cap}; interactive p95 "
          f"({args.interactive} one-call jobs), flood of {args.flood_jobs} batch jobs x "
          f"{args.flood_prompts} prompts:")
    print(f"  alone                   {alone:8.2f} s")
    print(f"  flood, today's FIFO     {fifo:8.2f} s   ({fifo / alone:.1f}x alone)")
    print(f"  flood, tiers + cap      {tiered:8.2f} s   ({tiered / alone:.2f}x alone, "
          f"{fifo / tiered:.1f}x better than FIFO)")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scheduling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pg", default=None, help="Postgres admin URL (default: SQLite)")
    parser.add_argument("--flood-jobs", type=int, default=10)
    parser.add_argument("--flood-prompts", type=int, default=40)
    parser.add_argument("--interactive", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--cap", type=int, default=32)
    parser.add_argument("--delay", type=float, default=0.15)
    parser.add_argument("--batch-delay", type=float, default=0.005)
    parser.add_argument("--trace-s", type=float, default=40.0,
                        help="seconds of job arrivals in the admission trace")
    parser.add_argument("--load", type=float, default=0.8,
                        help="the trace's calls per second over the endpoint's capacity")
    parser.add_argument("--quantum", type=int, default=50,
                        help="admission's quantum in the stand-in's tokens (its calls are ~17)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="replays of the trace under each policy, interleaved (medians)")
    parser.add_argument("--only", choices=("queue", "admission", "windows", "deadlines"),
                        default=None, help="only part 1, parts 2 and 3 (admission: the trace "
                                           "and Jain's index), part 4 or part 5")
    parser.add_argument("--vllm", action="store_true",
                        help="only the queue's figures, against the embedded vLLM server "
                             "(started here); keep the flood small on a CPU")
    deadlines.add_arguments(parser)
    args = parser.parse_args()
    if args.vllm:
        vllm_run(args)
        return
    if args.only in (None, "queue", "admission"):
        standin = StandinServer(delay_s=args.delay, batch_delay_s=args.batch_delay).start()
        print(f"stand-in: {args.delay * 1000:.0f} ms + {args.batch_delay * 1000:.0f} ms per "
              f"call in flight")
        with tempfile.TemporaryDirectory() as tmp_:
            if args.only in (None, "queue"):
                queue_part(args, standin, Path(tmp_))
            if args.only in (None, "admission"):
                admission_part(args, standin, Path(tmp_))
        standin.stop()
    if args.only in (None, "windows"):
        windows_part()
    if args.only in (None, "deadlines"):
        standin = StandinServer(delay_s=args.delay, batch_delay_s=args.batch_delay).start()
        with tempfile.TemporaryDirectory() as tmp_:
            deadlines.deadline_part(args, standin, Path(tmp_))
        standin.stop()


def queue_part(args: argparse.Namespace, standin: StandinServer, tmp: Path) -> None:
    alone = queue_run(args, standin.url, tmp, "alone", flood=False, tiers=True)
    fifo = queue_run(args, standin.url, tmp, "fifo", flood=True, tiers=False)
    tiered = queue_run(args, standin.url, tmp, "tiered", flood=True, tiers=True)
    if math.isnan(alone):
        raise SystemExit("no figures")
    flood = f"{args.flood_jobs} batch jobs x {args.flood_prompts} prompts"
    print(f"interactive p95 ({args.interactive} one-call jobs), flood of {flood}; worker "
          f"threads {args.concurrency}; cap {args.cap}:")
    print(f"  alone                   {alone:8.2f} s")
    print(f"  flood, today's FIFO     {fifo:8.2f} s   ({fifo / alone:.1f}x alone)")
    print(f"  flood, tiers + cap      {tiered:8.2f} s   ({tiered / alone:.2f}x alone, "
          f"{fifo / tiered:.1f}x better than FIFO)")


def admission_part(args: argparse.Namespace, standin: StandinServer, tmp: Path) -> None:
    redis_proc, redis_url = redis_server(tmp)
    try:
        jobs = jct.trace(args.trace_s, args.load, args.delay, args.batch_delay)
        runs: dict[str, list[jct.JctResult]] = {p: [] for p in jct.POLICIES}
        for _ in range(args.rounds):  # interleaved, so a busy machine weighs on every policy
            for p in jct.POLICIES:
                runs[p].append(jct.replay(redis_url, standin, p, jobs, quantum=args.quantum))
        jcts = {p: jct.median(rs) for p, rs in runs.items()}
        index, served = jain(redis_url, standin, args.quantum)
    finally:
        redis_proc.terminate()
        redis_proc.wait(timeout=10)
    n_long = sum(j.long for j in jobs)
    print(f"mean job completion time, {len(jobs)} jobs arriving over {args.trace_s:.0f} s at "
          f"{args.load:.0%} of capacity ({len(jobs) - n_long} short of 2 calls in turn, "
          f"{n_long} long of 24 parallel calls then 1), endpoint cap {jct.CAP}, quantum "
          f"{args.quantum} tokens; median of {args.rounds} round(s):")
    fcfs, rr = jcts["fcfs"], jcts["round_robin"]
    names = {"fcfs": "first come first served", "round_robin": "per-job round robin",
             "las": "least attained service", "levels_x2": "levels, bounds x2",
             "levels": "levels x16 (deployed)"}
    for p, r in jcts.items():
        print(f"  {names[p]:<24}{r.mean_s:6.2f} s  short {r.short_mean_s:5.2f} s  long "
              f"{r.long_mean_s:5.2f} s  p95 {r.p95_s:5.2f} s  ({fcfs.mean_s / r.mean_s:.2f}x "
              f"FCFS, {rr.mean_s / r.mean_s:.2f}x round robin; short "
              f"{rr.short_mean_s / r.short_mean_s:.2f}x)")
    print(f"Jain's index, 3 tenants (48/8/8 callers): {index:.3f}  served {served}")


def windows_part() -> None:
    w = windows()
    print("flex jobs with windows, 500 per objective on a sample day (simulated clock; "
          "counterfactual: started at submission, same schedule):")
    (c0, c1), (g0, g1) = w["cost"], w["carbon"]
    print(f"  optimize=cost    ${c0:.3f}/kWh at submission, ${c1:.3f}/kWh windowed "
          f"({(1 - c1 / c0) * 100:.0f}% less)")
    print(f"  optimize=carbon  {g0:.0f} gCO2/kWh at submission, {g1:.0f} gCO2/kWh windowed "
          f"({(1 - g1 / g0) * 100:.0f}% less); every planned start leaves the run time "
          f"before its deadline (simulated: misses are measured in part 5, deadlines)")


if __name__ == "__main__":
    main()
