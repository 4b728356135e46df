"""Routing: affinity versus round robin over two model servers, for jobs whose calls share long
prefixes. Prefix-cache hit rate and throughput side by side.

    python -m bench.routing [--endpoints URL1,URL2] [--start-servers] [--jobs 16]
                            [--calls-per-job 8] [--prefix-words 300] [--concurrency 64]
                            [--max-tokens 32] [--repeat] [--seed N] [--serve-args ARGS]

Without `--endpoints` (or with `--start-servers`) two vLLM servers with the embedded model are
started side by side (`python -m inference.serve --port P`, each in its own process group,
`VLLM_CPU_KVCACHE_SPACE=2` unless already set) and stopped at the end. On a GPU, pass e.g.
`--serve-args "--gpu-memory-utilization 0.4"` so that both fit on one device.

The workload: `--jobs` synthetic jobs, each with a long prefix of its own (about
`--prefix-words` words of pseudo-text, different for every job) followed by `--calls-per-job`
short, distinct questions (the job's steps). The calls are interleaved across jobs, one call of
each job per round, the jobs in a shuffled order in each round (a fixed order would let round
robin over two endpoints keep an even number of jobs on one endpoint each by accident). Every
call goes through `inference.pool.Pool` in this process, with `affinity_key` and `job_id` set to
the job's id, temperature 0 and `--max-tokens`, from `--concurrency` threads.

The same workload runs against the same servers with `pool_routing="round_robin"`, then with
`pool_routing="affinity"` (`--repeat`: then again in the opposite order). Each run uses fresh
prefix text, so no run is helped by the cache an earlier one left behind. Before and after
each run both servers' `/metrics` are read; the hit rate is the growth of
`vllm:prefix_cache_hits_total` over that of `vllm:prefix_cache_queries_total`, summed over the
servers (in tokens). Also from the pool's returned usage: output tokens/s over the run's wall
time, cached over prompt tokens; p50/p95 call latency and time to first token; calls per
endpoint; distinct endpoints per job. Prints the runs side by side, the ratios
affinity / round robin for throughput and hit rate, and `os.cpu_count()`.
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx

from bench.common import Proc, percentile, tail, wait_until
from bench.standin import free_port
from core.settings import Settings
from inference.calls import CallSpec
from inference.pool import Completion, CompletionRequest, Pool

Routing = Literal["affinity", "round_robin"]

HITS = "vllm:prefix_cache_hits_total"
QUERIES = "vllm:prefix_cache_queries_total"

VOCABULARY = (
    "river stone bridge lantern harbor meadow copper signal garden window orchard valley "
    "engine ledger market candle forest letter mirror thunder island compass archive tower "
    "winter summer canal quarry pigeon violin granite saddle beacon cellar furnace glacier "
    "harvest kettle ladder marble needle oyster pepper quilt ribbon spindle timber umbrella "
    "velvet wagon yarn anchor barley cactus dolphin ember falcon gravel hazel ivory jasmine "
    "kelp lemon mango nickel olive pebble quartz raven salmon tulip walnut zinc amber basket "
    "cedar drum feather ginger honey iron jacket kite lily maple nest onion paper rope silver "
    "thread whistle apron blanket chimney desert fountain goblet helmet inlet jungle "
    "keel lagoon mill notebook oven parcel railway shelter tunnel village workshop"
).split()
VERBS = (
    "carries holds follows crosses guards shapes turns lifts measures records opens keeps "
    "finds mends gathers sorts weighs marks covers warms"
).split()
QUESTION_WORDS = ("Which", "Where", "Why", "How", "When", "What")


def pseudo_text(rng: random.Random, words: int) -> str:
    """`words` words of plain pseudo-sentences drawn from `rng`."""
    out: list[str] = []
    while len(out) < words:
        n = min(rng.randint(8, 14), words - len(out))
        sentence = [rng.choice(VOCABULARY) for _ in range(n)]
        if n >= 3:
            sentence[1] = rng.choice(VERBS)
        sentence[0] = sentence[0].capitalize()
        sentence[-1] += "."
        out.extend(sentence)
    return " ".join(out)


@dataclass(frozen=True)
class Call:
    job_id: str
    step: int
    prompt: str


def workload(seed: int, jobs: int, calls_per_job: int, prefix_words: int) -> list[Call]:
    """The calls of `jobs` jobs, one round per step, jobs shuffled within each round."""
    rng = random.Random(seed)
    ids = [f"bench-{seed}-job{j:03d}" for j in range(jobs)]
    prefixes = [f"{pseudo_text(rng, prefix_words)}\n\nNotes of job {i}.\n" for i in ids]
    calls: list[Call] = []
    for step in range(calls_per_job):
        order = list(range(jobs))
        rng.shuffle(order)
        for j in order:
            question = (f"Question {step + 1}: {rng.choice(QUESTION_WORDS)} "
                        f"{pseudo_text(rng, rng.randint(6, 10)).rstrip('.')}?\nAnswer:")
            calls.append(Call(ids[j], step, prefixes[j] + question))
    return calls


# -- server counters ---------------------------------------------------------------------------


def prefix_counters(url: str) -> tuple[float, float] | None:
    """(hits, queries) of the server's prefix cache, summed over label sets; None when the
    server does not expose them."""
    try:
        resp = httpx.get(f"{url}/metrics", timeout=10)
    except httpx.HTTPError:
        return None
    if resp.status_code != 200:
        return None
    sums: dict[str, float] = {}
    for line in resp.text.splitlines():
        if not line or line.startswith("#"):
            continue
        if "{" in line:
            name, rest = line.split("{", 1)[0], line.rsplit("}", 1)[-1].split()
        else:
            name, *rest = line.split()
        if name in (HITS, QUERIES) and rest:
            sums[name] = sums.get(name, 0.0) + float(rest[0])
    if HITS not in sums or QUERIES not in sums:
        return None
    return sums[HITS], sums[QUERIES]


def settled_counters(urls: Sequence[str], timeout: float = 5.0
                     ) -> dict[str, tuple[float, float] | None]:
    """Counters read until two readings half a second apart agree (a server may record a
    finished request's statistics just after its last chunk has gone out)."""
    last = {u: prefix_counters(u) for u in urls}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = {u: prefix_counters(u) for u in urls}
        if now == last:
            break
        last = now
    return last


# -- one run -----------------------------------------------------------------------------------


@dataclass
class RunResult:
    routing: str
    calls: int
    wall_s: float
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    cached_reported: bool = False
    latencies_ms: list[float] = field(default_factory=list)
    ttfts_ms: list[float] = field(default_factory=list)
    per_endpoint: Counter[str] = field(default_factory=Counter)
    endpoints_per_job: float = 0.0
    failed: int = 0
    retried: int = 0
    first_error: str | None = None
    # Growth of the servers' counters over the run, summed; None where a server lacks them.
    hits: float | None = None
    queries: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def hit_rate(self) -> float | None:
        if self.hits is None or not self.queries:
            return None
        return self.hits / self.queries


def pool_for(endpoints: Sequence[str], routing: Routing) -> Pool:
    settings = Settings(pool_endpoints=list(endpoints), pool_routing=routing,
                        pool_admission=False, models=None, models_file=None,
                        energy_nvml=False, request_timeout_s=600.0)
    return Pool(list(endpoints), settings)


def run(endpoints: Sequence[str], routing: Routing, calls: Sequence[Call], concurrency: int,
        max_tokens: int) -> RunResult:
    pool = pool_for(endpoints, routing)
    try:
        before = settled_counters(endpoints, timeout=0)

        def one(call: Call) -> Completion:
            return pool.complete(CompletionRequest(
                call=CallSpec(prompt=call.prompt, max_tokens=max_tokens),
                request_id=f"{call.job_id}-step{call.step}", tenant_id="bench",
                job_id=call.job_id, affinity_key=call.job_id))

        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency) as executor:
            futures = [(call, executor.submit(one, call)) for call in calls]
            outcomes: list[tuple[Call, Completion | BaseException]] = []
            for call, future in futures:
                exc = future.exception()
                outcomes.append((call, exc if exc is not None else future.result()))
        wall = time.perf_counter() - start
        after = settled_counters(endpoints)
    finally:
        pool.close()

    result = RunResult(routing=routing, calls=len(calls), wall_s=wall)
    jobs: dict[str, set[str]] = {}
    for call, outcome in outcomes:
        if isinstance(outcome, BaseException):
            result.failed += 1
            result.first_error = result.first_error or f"{type(outcome).__name__}: {outcome}"
            continue
        result.completion_tokens += outcome.usage.completion_tokens
        result.prompt_tokens += outcome.usage.prompt_tokens
        if outcome.usage.cached_tokens is not None:
            result.cached_tokens += outcome.usage.cached_tokens
            result.cached_reported = True
        result.latencies_ms.append(outcome.latency_ms)
        if outcome.ttft_ms is not None:
            result.ttfts_ms.append(outcome.ttft_ms)
        result.per_endpoint[outcome.endpoint] += 1
        result.retried += outcome.attempts > 1
        jobs.setdefault(call.job_id, set()).add(outcome.endpoint)
    if jobs:
        result.endpoints_per_job = sum(len(s) for s in jobs.values()) / len(jobs)
    pairs = [(before[u], after[u]) for u in endpoints]
    if all(b is not None and a is not None for b, a in pairs):
        result.hits = sum(a[0] - b[0] for b, a in pairs if a is not None and b is not None)
        result.queries = sum(a[1] - b[1] for b, a in pairs if a is not None and b is not None)
    return result


# -- servers -----------------------------------------------------------------------------------


def start_servers(n: int, workdir: Path, serve_args: Sequence[str]) -> list[tuple[str, Proc]]:
    """`n` vLLM servers with the embedded model, started side by side; returns when all
    answer `/v1/models` (at most 20 minutes)."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    # Prepare the embedded model once, so the servers do not both convert it.
    subprocess.run([sys.executable, "-m", "inference.serve", "--prepare-only"], env=env,
                   check=True, stdout=subprocess.DEVNULL)
    servers: list[tuple[str, Proc]] = []
    ports: set[int] = set()
    try:
        for i in range(n):
            port = free_port()
            while port in ports:
                port = free_port()
            ports.add(port)
            args = [sys.executable, "-m", "inference.serve", "--port", str(port)]
            if serve_args:
                args += ["--", *serve_args]
            servers.append((f"http://127.0.0.1:{port}",
                            Proc(args, env, workdir / f"vllm{i + 1}.log")))
        print(f"starting {n} vLLM servers: {', '.join(u for u, _ in servers)} …", flush=True)

        def up(url: str, proc: Proc) -> bool:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"the vLLM server at {url} exited:\n{tail(proc, 4000)}")
            try:
                return httpx.get(f"{url}/v1/models", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        started = time.monotonic()
        for url, proc in servers:
            remaining = max(1.0, 1200 - (time.monotonic() - started))
            wait_until(lambda u=url, p=proc: up(u, p), remaining,  # type: ignore[misc]
                       interval=1, what=f"the vLLM server at {url}")
        print(f"servers up after {time.monotonic() - started:.0f} s", flush=True)
        return servers
    except BaseException:
        for _, proc in servers:
            proc.stop(timeout=30)
        raise


# -- report ------------------------------------------------------------------------------------


def _ms(values: Sequence[float], p: float) -> str:
    return f"{percentile(values, p):.0f}" if values else "n/a"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return "n/a"
    if b == 0:
        return "inf" if a > 0 else "n/a"
    return f"{a / b:.2f}x"


def pooled(results: Sequence[RunResult]) -> tuple[float, float | None]:
    """Output tokens/s and hit rate over several runs of one routing."""
    wall = sum(r.wall_s for r in results)
    tps = sum(r.completion_tokens for r in results) / wall if wall > 0 else 0.0
    if any(r.hits is None for r in results):
        return tps, None
    queries = sum(r.queries or 0.0 for r in results)
    return tps, (sum(r.hits or 0.0 for r in results) / queries) if queries else None


def report(results: Sequence[RunResult], endpoints: Sequence[str], args: argparse.Namespace,
           seed: int) -> str:
    names = [f"{r.routing} #{sum(1 for q in results[: i + 1] if q.routing == r.routing)}"
             for i, r in enumerate(results)]
    labels = {u: f"ep{i + 1}" for i, u in enumerate(endpoints)}
    rows: list[tuple[str, list[str]]] = [
        ("wall time, s", [f"{r.wall_s:.2f}" for r in results]),
        ("output tokens", [str(r.completion_tokens) for r in results]),
        ("output tokens/s", [f"{r.tokens_per_s:.1f}" for r in results]),
        ("prefix-cache hit rate (/metrics)", [_pct(r.hit_rate) for r in results]),
        ("cached / prompt tokens (usage)",
         [_pct(r.cached_tokens / r.prompt_tokens) if r.cached_reported and r.prompt_tokens
          else "n/a" for r in results]),
        ("latency p50 / p95, ms",
         [f"{_ms(r.latencies_ms, 50)} / {_ms(r.latencies_ms, 95)}" for r in results]),
        ("TTFT p50 / p95, ms",
         [f"{_ms(r.ttfts_ms, 50)} / {_ms(r.ttfts_ms, 95)}" for r in results]),
        ("calls per endpoint (" + " / ".join(labels.values()) + ")",
         [" / ".join(str(r.per_endpoint.get(u, 0)) for u in endpoints) for r in results]),
        ("endpoints per job, mean", [f"{r.endpoints_per_job:.2f}" for r in results]),
        ("failed / retried calls", [f"{r.failed} / {r.retried}" for r in results]),
    ]
    width = max(len(label) for label, _ in rows)
    col = max(18, *(len(n) for n in names), *(len(c) for _, cells in rows for c in cells))
    lines = [
        "",
        f"{args.jobs} jobs x {args.calls_per_job} calls, a ~{args.prefix_words}-word prefix "
        f"per job, {args.concurrency} in flight, max_tokens {args.max_tokens}, seed {seed}, "
        f"os.cpu_count() = {os.cpu_count()}",
        "endpoints: " + ", ".join(f"{labels[u]} = {u}" for u in endpoints),
        "",
        f"{'':{width}s}  " + "  ".join(f"{n:>{col}s}" for n in names),
    ]
    lines += [f"{label:{width}s}  " + "  ".join(f"{c:>{col}s}" for c in cells)
              for label, cells in rows]
    lines.append("")
    rr = [r for r in results if r.routing == "round_robin"]
    aff = [r for r in results if r.routing == "affinity"]
    for i, (a, b) in enumerate(zip(aff, rr, strict=False)):
        tag = f"run pair {i + 1}" if len(rr) > 1 else "affinity / round robin"
        lines.append(f"{tag:{width}s}  throughput {_ratio(a.tokens_per_s, b.tokens_per_s)}, "
                     f"hit rate {_ratio(a.hit_rate, b.hit_rate)} "
                     f"({_pct(a.hit_rate)} vs {_pct(b.hit_rate)})")
    if len(rr) > 1:
        (a_tps, a_hit), (b_tps, b_hit) = pooled(aff), pooled(rr)
        lines.append(f"{'affinity / round robin, pooled':{width}s}  throughput "
                     f"{_ratio(a_tps, b_tps)}, hit rate {_ratio(a_hit, b_hit)} "
                     f"({_pct(a_hit)} vs {_pct(b_hit)})")
    errors = [f"{n}: {r.first_error}" for n, r in zip(names, results, strict=True)
              if r.first_error]
    if errors:
        lines += ["", "first error of each run with failures:", *errors]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.routing", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--endpoints",
                        help="comma-separated base URLs of two servers already running")
    parser.add_argument("--start-servers", action="store_true",
                        help="start two vLLM servers with the embedded model (the default "
                             "without --endpoints)")
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--calls-per-job", type=int, default=8)
    parser.add_argument("--prefix-words", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeat", action="store_true",
                        help="run again in the opposite order (affinity, then round robin)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the prefix text (default: a random one, printed)")
    parser.add_argument("--serve-args", default="",
                        help="arguments passed on to vLLM by each started server, e.g. "
                             "\"--gpu-memory-utilization 0.4\"")
    args = parser.parse_args()
    if args.endpoints and args.start_servers:
        parser.error("--endpoints and --start-servers exclude each other")
    if min(args.jobs, args.calls_per_job, args.concurrency, args.max_tokens) < 1:
        parser.error("--jobs, --calls-per-job, --concurrency and --max-tokens must be >= 1")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 10**6)
    order: list[Routing] = ["round_robin", "affinity"]
    if args.repeat:
        order += ["affinity", "round_robin"]

    with tempfile.TemporaryDirectory(prefix="agentq-bench-routing-") as tmp:
        servers: list[tuple[str, Proc]] = []
        if args.endpoints:
            endpoints = [u.strip().rstrip("/") for u in args.endpoints.split(",") if u.strip()]
            if len(endpoints) < 2:
                parser.error("--endpoints needs at least two URLs")
        else:
            servers = start_servers(2, Path(tmp), shlex.split(args.serve_args))
            endpoints = [u for u, _ in servers]
        try:
            # First-call costs (connections, model listing, warm-up of the engines) are not
            # measured: a few short calls of their own on every endpoint.
            warm = workload(seed * 100, max(len(endpoints), args.concurrency), 1, 20)
            run(endpoints, "round_robin", warm, args.concurrency, args.max_tokens)
            results: list[RunResult] = []
            for i, routing in enumerate(order):
                calls = workload(seed * 100 + i + 1, args.jobs, args.calls_per_job,
                                 args.prefix_words)
                print(f"run {i + 1}/{len(order)}: {routing}, {len(calls)} calls …", flush=True)
                results.append(run(endpoints, routing, calls, args.concurrency,
                                   args.max_tokens))
        except BaseException:
            for _, proc in servers:
                print(f"--- {proc.log.name} ---\n{tail(proc)}", file=sys.stderr)
            raise
        finally:
            for _, proc in servers:
                proc.stop(timeout=30)
    print(report(results, endpoints, args, seed))
    if any(r.failed for r in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
