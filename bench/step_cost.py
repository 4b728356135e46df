"""What one step costs, counted: the statements, transactions and CPU of the step path, run in
one thread of one process, where nothing else competes for the cores.

    python -m bench.step_cost [--database-url postgresql://postgres@127.0.0.1:5432/postgres]
                              [--steps 100] [--rounds 3] [--baseline DIR] [--top 12]

`bench.overhead` measures the platform under load, where a run's figures move by ±20 % with
whatever else the machine does. This benchmark measures the path itself: jobs are created in a
fresh database, and their steps are run one after another by `orchestrator.runner.run_step` in
this process's thread (a completed step's next step runs in the same thread, as in a worker),
against a stand-in model server in a process of its own that answers at once. It counts the
SQL statements and the commits each step makes (exact, the same on every run) and the process's
CPU time per step (user + system, all of its threads: the watchers a worker runs too).

Two kinds: one `batch` job of `--steps` prompts (one model call a step, every step settled
against the same job row), and `--steps / 5` `research` jobs (plan, three investigators,
synthesis). A warm-up job of each kind runs first and is not counted.

`--baseline DIR`: another checkout of agentq (a `git worktree` of an earlier commit) measured
the same way in the same run, rounds interleaved, and the ratios this checkout / baseline
printed beside the medians. The baseline is run with this file, importing its own packages.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

KINDS = ("batch", "research")


def _child(kind: str, steps: int, admin_url: str | None, redis_url: str, endpoint: str) -> None:
    """Run in the checkout under test (its root first on `sys.path`): print one JSON line."""
    from bench.common import fresh_database

    with tempfile.TemporaryDirectory() as tmp, fresh_database(admin_url, Path(tmp)) as url:
        os.environ.update(AGENTQ_DATABASE_URL=url, AGENTQ_REDIS_URL=redis_url,
                          AGENTQ_BROKER_URL=redis_url, AGENTQ_POOL_ENDPOINTS=endpoint)
        from core.settings import get_settings

        get_settings.cache_clear()
        import redis

        redis.Redis.from_url(redis_url).flushdb()
        from sqlalchemy import event, func, select

        from core.db import get_engine, session_factory, transaction
        from core.keys import create_key
        from core.models import Step
        from orchestrator import jobs, runner

        with session_factory(url)() as s:
            _, key = create_key(s, "bench-step-cost")
            s.commit()
            tenant = key.tenant_id

        def create(n: int) -> None:
            with transaction() as s:
                if kind == "batch":
                    jobs.create_job(s, tenant_id=tenant, kind_name="batch", raw_input={
                        "prompts": [f"Prompt {i} of the job" for i in range(n)],
                        "max_tokens": 8}, budget={"max_total_tokens": 10_000_000},
                        metadata={})
                    return
                for i in range(max(1, n // 5)):
                    jobs.create_job(s, tenant_id=tenant, kind_name="research", raw_input={
                        "query": f"How do tides work? (#{i})", "max_subquestions": 3},
                        budget={}, metadata={})

        def run_queued() -> float:
            cpu = 0.0
            while True:
                with transaction() as s:
                    ids = list(s.scalars(select(Step.id).where(Step.status == "queued")
                                         .order_by(Step.created_at)))
                if not ids:
                    return cpu
                for step_id in ids:
                    before = time.process_time()
                    runner.run_step(step_id)
                    cpu += time.process_time() - before

        def completed() -> int:
            with transaction() as s:
                return int(s.scalar(select(func.count()).select_from(Step)
                                    .where(Step.status == "completed")) or 0)

        create(1 if kind == "batch" else 5)  # warm-up: imports, connections, caches
        run_queued()
        warm = completed()

        statements: collections.Counter[str] = collections.Counter()
        commits = [0]

        def on_statement(_c: Any, _cur: Any, statement: str, *_: Any) -> None:
            statements[" ".join(statement.split())[:110]] += 1

        def on_commit(_c: Any) -> None:
            commits[0] += 1

        engine = get_engine()
        create(steps)
        wall = time.perf_counter()
        event.listen(engine, "before_cursor_execute", on_statement)
        event.listen(engine, "commit", on_commit)
        cpu = run_queued()
        event.remove(engine, "before_cursor_execute", on_statement)
        event.remove(engine, "commit", on_commit)
        wall = time.perf_counter() - wall
        n = completed() - warm
        print(json.dumps({"kind": kind, "steps": n, "cpu_ms": cpu / n * 1000,
                          "wall_ms": wall / n * 1000,
                          "statements": sum(statements.values()) / n,
                          "commits": commits[0] / n,
                          "by_statement": {k: v / n for k, v in statements.items()}}))


def _measure(checkout: Path, kind: str, args: argparse.Namespace, endpoint: str
             ) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--steps",
         str(args.steps), "--redis-url", args.redis_url, "--endpoint", endpoint,
         *(["--database-url", args.database_url] if args.database_url else [])],
        cwd=checkout, env=env, capture_output=True, text=True, timeout=1800)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"the run in {checkout} failed ({out.returncode}):\n"
                         f"{out.stderr[-3000:]}")
    return dict(json.loads(lines[-1]))


def _median(runs: list[dict[str, Any]], field: str) -> float:
    return statistics.median(float(r[field]) for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.step_cost")
    parser.add_argument("--database-url", default=None,
                        help="a Postgres server to create the databases on (default: SQLite)")
    parser.add_argument("--redis-url", default=os.environ.get(
        "AGENTQ_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14"),
                        help="flushed: the outbox publishes there, nothing consumes")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", type=Path, default=None,
                        help="another checkout, measured side by side")
    parser.add_argument("--top", type=int, default=12, help="statements listed per kind")
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.steps, args.database_url, args.redis_url, args.endpoint)
        return

    from bench.common import wait_until
    from bench.standin import free_port

    here = Path(__file__).resolve().parent.parent
    port = free_port()
    standin = subprocess.Popen([sys.executable, "-m", "bench.standin", "--port", str(port)],
                               cwd=here, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    checkouts = {"this": here, **({"baseline": args.baseline.resolve()}
                                  if args.baseline else {})}
    runs: dict[tuple[str, str], list[dict[str, Any]]] = collections.defaultdict(list)
    try:
        import httpx

        wait_until(lambda: _up(httpx, endpoint), 30, what="the stand-in")
        for r in range(args.rounds):
            for kind in KINDS:
                for name, path in checkouts.items():
                    runs[(name, kind)].append(_measure(path, kind, args, endpoint))
            print(f"round {r + 1} of {args.rounds} done", file=sys.stderr)
    finally:
        standin.terminate()
        standin.wait()
    _report(args, checkouts, runs)


def _up(httpx: Any, endpoint: str) -> bool:
    try:
        return bool(httpx.get(f"{endpoint}/v1/models").status_code == 200)
    except httpx.HTTPError:
        return False


def _report(args: argparse.Namespace, checkouts: dict[str, Path],
            runs: dict[tuple[str, str], list[dict[str, Any]]]) -> None:
    db = "postgresql" if args.database_url else "sqlite"
    print(f"\nstep cost, one thread, {db}, medians of {args.rounds} round(s), "
          f"os.cpu_count() = {os.cpu_count()}")
    fields = (("cpu_ms", "CPU per step (ms)"), ("wall_ms", "wall per step (ms)"),
              ("statements", "statements per step"), ("commits", "transactions per step"))
    for kind in KINDS:
        this = runs[("this", kind)]
        print(f"\n{kind}: {this[0]['steps']} steps a run")
        for field, label in fields:
            line = f"  {label:<24}{_median(this, field):9.2f}"
            if "baseline" in checkouts:
                base = runs[("baseline", kind)]
                b = _median(base, field)
                line += f"   baseline {b:9.2f}   ratio {_median(this, field) / b:5.2f}"
            print(line)
        print("  statements per step, this checkout:")
        for text, n in sorted(this[-1]["by_statement"].items(), key=lambda kv: -kv[1]
                              )[:args.top]:
            print(f"    {n:5.2f}  {text}")


if __name__ == "__main__":
    if __package__ in (None, ""):
        # Run as a file in the checkout under test: its packages come first.
        sys.path.insert(0, os.getcwd())
    main()
