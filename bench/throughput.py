"""Throughput: the whole platform versus the raw vLLM server, same prompts, same concurrency,
and versus the same server called one request at a time.

    python -m bench.throughput [--endpoint URL] [--jobs 256] [--concurrency 64]
                               [--sequential-prompts 32] [--submit-concurrency 1]
                               [--database-url URL] [--redis-url URL]

Runs, in one process and against one vLLM server (embedded, or `--endpoint`):
  1. raw: the prompts sent straight to `/v1/completions`, `concurrency` in flight;
  2. one at a time: the first `--sequential-prompts` prompts sent straight to the server, one
     request in flight (0 leaves this out);
  3. platform: one `completion` job per prompt through the API (uvicorn; submitted one after
     another, or `--submit-concurrency` at a time), a Celery worker with `concurrency` slots,
     a fresh database (a temporary SQLite file, or a temporary database on the Postgres server
     of `--database-url`) and Redis;
  4. raw again (so both sides see the same warm server and prefix cache).
Prints output tokens/s of each, the ratio platform / raw, and the ratio platform / one at a
time (what batching many jobs' calls buys over calling the model one request at a time).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis
from sqlalchemy import create_engine, text

from bench.common import (
    Proc,
    create_tenant_key,
    fresh_database,
    http_ok,
    start_api,
    start_worker,
    submit_jobs,
    tail,
    wait_until,
)
from bench.standin import free_port

TOPICS = ["rivers", "bees", "volcanoes", "bread", "comets", "glaciers", "owls", "copper",
          "tides", "maple trees", "lighthouses", "deserts", "coral", "thunder", "salt", "wolves"]


def prompts(n: int) -> list[str]:
    return [f"Fact {i}: a short paragraph about {TOPICS[i % len(TOPICS)]}.\n"
            for i in range(n)]


async def _raw(endpoint: str, model: str, items: list[str], concurrency: int,
               max_tokens: int) -> tuple[int, float]:
    sem = asyncio.Semaphore(concurrency)
    tokens = 0
    async with httpx.AsyncClient(timeout=600,
                                 limits=httpx.Limits(max_connections=concurrency)) as http:
        async def one(p: str) -> None:
            nonlocal tokens
            async with sem:
                r = await http.post(f"{endpoint}/v1/completions", json={
                    "model": model, "prompt": p, "max_tokens": max_tokens, "temperature": 0})
                r.raise_for_status()
                tokens += int(r.json()["usage"]["completion_tokens"])

        start = time.perf_counter()
        await asyncio.gather(*(one(p) for p in items))
        return tokens, time.perf_counter() - start


def raw(endpoint: str, items: list[str], concurrency: int, max_tokens: int) -> tuple[int, float]:
    model = httpx.get(f"{endpoint}/v1/models", timeout=10).json()["data"][0]["id"]
    return asyncio.run(_raw(endpoint, model, items, concurrency, max_tokens))


def platform(endpoint: str, items: list[str], concurrency: int, max_tokens: int,
             submit_concurrency: int, db_url: str, redis_url: str,
             workdir: Path) -> tuple[int, float]:
    redis.Redis.from_url(redis_url).flushdb()
    env = {**os.environ, "AGENTQ_DATABASE_URL": db_url, "AGENTQ_REDIS_URL": redis_url,
           "AGENTQ_POOL_ENDPOINTS": endpoint, "AGENTQ_WORKER_CONCURRENCY": str(concurrency),
           "AGENTQ_RATE_LIMIT": "1000000/minute"}
    key = create_tenant_key(db_url, "bench")
    procs: list[Proc] = []
    engine = create_engine(db_url)
    try:
        procs.append(start_worker(env, workdir / "worker.log", concurrency=concurrency))
        base, api = start_api(env, workdir / "api.log")
        procs.append(api)
        start = time.perf_counter()
        submit_jobs(base, key, [{"kind": "completion", "input": {
            "prompt": prompt, "max_tokens": max_tokens}} for prompt in items],
            submit_concurrency)

        def finished() -> bool:
            with engine.connect() as conn:
                n = conn.execute(text("SELECT COUNT(*) FROM jobs WHERE status IN "
                                      "('completed','failed','cancelled','budget_exhausted')"
                                      )).scalar_one()
            return int(n) >= len(items)

        wait_until(finished, 1800, interval=0.05, what="all jobs")
        elapsed = time.perf_counter() - start
        with engine.connect() as conn:
            failed = conn.execute(text("SELECT COUNT(*) FROM jobs WHERE status != 'completed'"
                                       )).scalar_one()
            tokens = conn.execute(text("SELECT SUM(completion_tokens) FROM model_calls")
                                  ).scalar_one()
        if failed:
            for proc in procs:
                print(f"--- {proc.log.name} ---\n{tail(proc)}", file=sys.stderr)
            raise SystemExit(f"{failed} jobs did not complete")
        return int(tokens), elapsed
    finally:
        engine.dispose()
        for proc in reversed(procs):
            proc.stop()
        redis.Redis.from_url(redis_url).flushdb()


def start_server(workdir: Path) -> tuple[str, Proc]:
    port = free_port()
    proc = Proc([sys.executable, "-m", "inference.serve", "--port", str(port)], dict(os.environ),
                workdir / "vllm.log")
    url = f"http://127.0.0.1:{port}"
    print(f"starting the embedded vLLM server on {url} …", flush=True)
    wait_until(lambda: http_ok(f"{url}/v1/models"), 900, interval=1, what="the vLLM server")
    return url, proc


def _line(label: str, run: tuple[int, float]) -> str:
    return (f"{label:34s}: {run[0]:6d} tokens in {run[1]:7.2f}s = "
            f"{run[0] / run[1]:7.1f} tok/s")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--endpoint", help="an OpenAI-compatible server already running")
    parser.add_argument("--jobs", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--submit-concurrency", type=int, default=1,
                        help="job submissions in flight to the API (1: one after another)")
    parser.add_argument("--sequential-prompts", type=int, default=32,
                        help="how many of the prompts to also send one at a time (0: none)")
    parser.add_argument("--database-url",
                        help="a Postgres server to create a temporary database on, e.g. "
                             "postgresql+psycopg://postgres@127.0.0.1:5432/postgres "
                             "(default: a temporary SQLite file)")
    parser.add_argument("--redis-url", default=os.environ.get(
        "AGENTQ_BENCH_REDIS_URL", "redis://127.0.0.1:6379/12"),
                        help="a Redis database for this benchmark alone; flushed")
    args = parser.parse_args()
    sequential_n = max(0, min(args.sequential_prompts, args.jobs))
    with tempfile.TemporaryDirectory(prefix="agentq-bench-") as tmp:
        workdir = Path(tmp)
        server = None
        endpoint = args.endpoint
        if endpoint is None:
            endpoint, server = start_server(workdir)
        try:
            items = prompts(args.jobs)
            raw(endpoint, items[: args.concurrency], args.concurrency, args.max_tokens)  # warm
            r1 = raw(endpoint, items, args.concurrency, args.max_tokens)
            seq = (raw(endpoint, items[:sequential_n], 1, args.max_tokens)
                   if sequential_n else None)
            with fresh_database(args.database_url, workdir) as db_url:
                p = platform(endpoint, items, args.concurrency, args.max_tokens,
                             args.submit_concurrency, db_url, args.redis_url, workdir)
                from core.db import dispose_engines

                dispose_engines()
            r2 = raw(endpoint, items, args.concurrency, args.max_tokens)
        finally:
            if server is not None:
                server.stop(timeout=30)
    raw_tps = (r1[0] + r2[0]) / (r1[1] + r2[1])
    plat_tps = p[0] / p[1]
    print(f"\n{args.jobs} prompts, {args.concurrency} in flight, max_tokens {args.max_tokens}, "
          f"os.cpu_count() = {os.cpu_count()}")
    print(_line(f"raw, {args.concurrency} in flight, run 1", r1))
    if seq is not None:
        print(_line(f"raw, 1 in flight (first {sequential_n})", seq))
    print(_line(f"platform ({args.jobs} completion jobs)", p))
    print(_line(f"raw, {args.concurrency} in flight, run 2", r2))
    print(f"{'ratio platform / raw':34s}: {plat_tps / raw_tps:.3f}")
    if seq is not None:
        print(f"{'ratio platform / one at a time':34s}: {plat_tps / (seq[0] / seq[1]):.2f}x  "
              f"(one at a time measured on the first {sequential_n} prompts; target >= 6x)")


if __name__ == "__main__":
    main()
