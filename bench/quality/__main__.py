"""Quality: research by effort, the naive way and coding, on fixtures of invented facts and
small tasks, through the whole platform; printed side by side.

    python -m bench.quality [--endpoint URL] [--efforts low,medium,high,max] [--questions N]
                            [--coding-tasks N] [--candidates 1,3] [--naive-context corpus|none]
                            [--no-naive] [--parallel 1] [--max-model-len 4096]
                            [--kv-cache-gib 1] [--job-timeout 3600]
                            [--database-url URL] [--redis-url URL]

Without `--endpoint`, one vLLM server with the embedded model is started
(`python -m inference.serve --max-model-len 4096 --kv-cache-gib 1`: room for the naive prompt
that holds the whole corpus, and a KV cache that leaves memory to the rest) and stopped at the
end. The platform runs as an operator runs it: the API under
uvicorn, a Celery worker, a fresh database (a temporary SQLite file, or a temporary database
on the Postgres server of `--database-url`) and a Redis database of its own (flushed). The
catalogue is the environment's (`AGENTQ_MODELS`), else the one model the endpoint serves.

1. Research: the corpus of `bench/fixtures/quality/documents/` is uploaded (`POST
   /v1/corpora`), then for each effort one research job per question (`corpus_id`, `effort`).
   Fact recall: the share of the questions' expected facts (regexes in `questions.json`) found
   in the brief's own words (its answer and sections, not the quoted snippets). Citation
   precision: the share of the result's citations whose document holds the facts asked for.
   Tokens, model calls and cost are the job's `usage`; wall time from its creation to its end.
2. Economics: the same questions asked naively (`bench.quality.naive`): one call each to the
   catalogue's largest size class, one at a time, no cache, no cascade, the whole corpus in the
   prompt (`--naive-context none`: the question alone). Side by side with `medium`.
3. Coding: the tasks of `bench/fixtures/coding/` (task text, files, test command) as coding jobs
   with 1 candidate and with each other `--candidates` value; pass rate, tokens and cost per
   solved task. A platform that refuses `candidates` (422) shows that row as unavailable.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import cast

import redis

from bench.common import (
    Proc,
    create_tenant_key,
    fresh_database,
    http_ok,
    start_api,
    start_worker,
    tail,
    wait_until,
)
from bench.quality.client import Platform
from bench.quality.harness import EFFORTS, Options, Results, render, run_all, say
from bench.quality.naive import Context
from bench.standin import free_port


def start_server(workdir: Path, max_model_len: int, kv_cache_gib: int) -> tuple[str, Proc]:
    port = free_port()
    # The KV cache through the engine's own variable, which takes whole GiB only.
    proc = Proc([sys.executable, "-m", "inference.serve", "--port", str(port),
                 "--max-model-len", str(max_model_len)],
                {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib)},
                workdir / "vllm.log")
    url = f"http://127.0.0.1:{port}"
    say(f"starting the embedded vLLM server on {url} …")

    def up() -> bool:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"the vLLM server exited early:\n{tail(proc)}")
        return http_ok(f"{url}/v1/models")

    wait_until(up, 1200, interval=1, what="the vLLM server")
    return url, proc


def _list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--endpoint", help="an OpenAI-compatible server already running")
    parser.add_argument("--efforts", default=",".join(EFFORTS),
                        help="research efforts to run, comma-separated ('' for none)")
    parser.add_argument("--questions", type=int, default=None, help="the first N questions")
    parser.add_argument("--coding-tasks", type=int, default=None,
                        help="the first N coding tasks (0: no coding)")
    parser.add_argument("--candidates", default="1,3", help="candidate counts, e.g. 1,3")
    parser.add_argument("--naive-context", choices=["corpus", "none"], default="corpus")
    parser.add_argument("--no-naive", action="store_true", help="leave out the naive calls")
    parser.add_argument("--parallel", type=int, default=1,
                        help="jobs in flight at once (1: one at a time, the cleanest wall "
                             "time per job)")
    parser.add_argument("--max-model-len", type=int, default=4096,
                        help="context of the embedded server started without --endpoint")
    parser.add_argument("--kv-cache-gib", type=int, default=1,
                        help="KV cache of the embedded server started without --endpoint")
    parser.add_argument("--job-timeout", type=float, default=3600)
    parser.add_argument("--database-url",
                        help="a Postgres server to create a temporary database on (default: a "
                             "temporary SQLite file)")
    parser.add_argument("--redis-url", default=os.environ.get(
        "AGENTQ_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14"),
                        help="a Redis database for this benchmark alone; flushed")
    args = parser.parse_args(argv)
    efforts = _list(args.efforts)
    unknown = [e for e in efforts if e not in EFFORTS]
    if unknown:
        parser.error(f"--efforts: unknown {', '.join(unknown)} (choose from "
                     f"{', '.join(EFFORTS)})")
    try:
        args.candidate_counts = [int(c) for c in _list(args.candidates)]
    except ValueError:
        parser.error("--candidates: comma-separated whole numbers, e.g. 1,3")
    args.effort_list = efforts
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    options = Options(efforts=args.effort_list, questions=args.questions,
                      coding_tasks=args.coding_tasks, candidates=args.candidate_counts,
                      naive=not args.no_naive, naive_context=cast(Context, args.naive_context),
                      parallel=args.parallel)
    with tempfile.TemporaryDirectory(prefix="agentq-quality-") as tmp:
        workdir = Path(tmp)
        procs: list[Proc] = []
        try:
            endpoint = args.endpoint
            if endpoint is None:
                endpoint, server = start_server(workdir, args.max_model_len, args.kv_cache_gib)
                procs.append(server)
            with fresh_database(args.database_url, workdir) as db_url:
                results = run_platform(endpoint, db_url, args, options, workdir, procs)
                from core.db import dispose_engines

                dispose_engines()
            for proc in procs:
                if proc.popen.poll() is not None:  # died during the run: say so, and why
                    say(f"--- {proc.log.name} ---\n{tail(proc, 6000)}")
                    results.notes.append(f"{proc.log.name.removesuffix('.log')} exited during "
                                         f"the run (exit status {proc.popen.returncode}); "
                                         "the figures after that are not the model's")
        finally:
            for proc in reversed(procs):
                proc.stop(timeout=30)
    print(f"\nendpoint {endpoint}; os.cpu_count() = {os.cpu_count()}\n")
    print(render(results))


def run_platform(endpoint: str, db_url: str, args: argparse.Namespace, options: Options,
                 workdir: Path, procs: list[Proc]) -> Results:
    redis.Redis.from_url(args.redis_url).flushdb()
    env = {"AGENTQ_DATABASE_URL": db_url, "AGENTQ_REDIS_URL": args.redis_url,
           "AGENTQ_POOL_ENDPOINTS": endpoint, "AGENTQ_RATE_LIMIT": "1000000/minute",
           "AGENTQ_REQUEST_TIMEOUT_S": os.environ.get("AGENTQ_REQUEST_TIMEOUT_S", "900")}
    os.environ.update(env)  # this process prices the naive calls with the same settings
    from core.catalogue import get_catalogue
    from core.settings import Settings, get_settings

    get_settings.cache_clear()
    get_catalogue.cache_clear()
    child_env = dict(os.environ)
    key = create_tenant_key(db_url, "quality-bench")
    worker = start_worker(child_env, workdir / "worker.log")
    procs.append(worker)
    base, api = start_api(child_env, workdir / "api.log")
    procs.append(api)
    platform = Platform(base, key, job_timeout_s=args.job_timeout)
    try:
        return run_all(platform, Settings(), options)
    except Exception:
        for proc in procs:
            say(f"--- {proc.log.name} ---\n{tail(proc)}")
        raise
    finally:
        platform.close()
        redis.Redis.from_url(args.redis_url).flushdb()


if __name__ == "__main__":
    main()
