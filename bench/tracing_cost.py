"""What tracing costs: the platform of `bench.overhead` run with tracing off (no `OTEL_*`
variable, as a default install runs) and on (OTLP/HTTP to a receiver in this process),
side by side, `--rounds` times interleaved (off, on, off, on, ...), each run on a fresh
database.

    python -m bench.tracing_cost [--jobs 30] [--rounds 2] [--concurrency 64]
                                 [--database-url URL] [--redis-url URL] [--no-profile]

Prints, off and on (medians over the rounds), worker CPU per step, API CPU per submission,
platform steps/s and the hand-off p50/p95, their ratios on / off, and the spans the receiver
got. With py-spy installed (`pip install py-spy`; `--no-profile` to skip), every run's worker
is sampled, and the share of its samples inside tracing code (`core/tracing.py`,
`orchestrator/traces.py` and the OpenTelemetry SDK) is printed: with tracing off it is what the
hooks themselves cost, measured in the run rather than argued.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from bench.common import fresh_database, percentile
from bench.otlp_receiver import OtlpReceiver
from bench.overhead import PlatformResult, run_platform
from bench.standin import StandinServer

OTEL_PREFIX = "OTEL_"
TRACING_FRAMES = ("core/tracing.py", "orchestrator/traces.py", "opentelemetry/")


def tracing_share(collapsed: Path) -> tuple[int, int]:
    """(samples with a tracing frame on the stack, all samples) of a py-spy raw profile."""
    inside = total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        total += int(count)
        if any(f in stack for f in TRACING_FRAMES):
            inside += int(count)
    return inside, total


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _row(name: str, off: list[float], on: list[float], unit: str = "") -> str:
    a, b = _median(off), _median(on)
    ratio = f"{b / a:8.3f}" if a else "       -"
    return f"{name:38s}{a:10.2f}{b:10.2f}  {ratio}   {unit}"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tracing_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=30)
    parser.add_argument("--max-subquestions", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--database-url", help="a Postgres server for temporary databases "
                                               "(default: temporary SQLite files)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/13",
                        help="a Redis database for this benchmark alone; flushed")
    parser.add_argument("--no-profile", action="store_true", help="do not sample with py-spy")
    args = parser.parse_args()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(OTEL_PREFIX)}
    os.environ.clear()
    os.environ.update(base_env)
    profile = not args.no_profile and bool(
        shutil.which("py-spy") or (Path(sys.executable).parent / "py-spy").exists())

    plan = [f"What is part {i + 1} of it, in some detail?" for i in range(args.max_subquestions)]
    runs: dict[str, list[PlatformResult]] = {"off": [], "on": []}
    shares: dict[str, list[tuple[int, int]]] = {"off": [], "on": []}
    receiver = OtlpReceiver("127.0.0.1", 0).start()
    standin = StandinServer(delay_s=0.0, plan_text=json.dumps(plan)).start()
    try:
        with tempfile.TemporaryDirectory(prefix="agentq-bench-tracing-") as tmp:
            for n in range(args.rounds):
                for mode in ("off", "on"):
                    workdir = Path(tmp) / f"{mode}-{n}"
                    workdir.mkdir()
                    extra = {} if mode == "off" else {
                        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
                        "OTEL_SERVICE_NAME": "agentq-bench"}
                    if profile:
                        os.environ["AGENTQ_BENCH_PROFILE_DIR"] = str(workdir)
                    print(f"round {n + 1}, tracing {mode}: {args.jobs} research jobs …",
                          flush=True)
                    with fresh_database(args.database_url, workdir) as db_url:
                        runs[mode].append(run_platform(
                            db_url, args.redis_url, standin.url, args.jobs,
                            args.max_subquestions, 1, args.concurrency, 8, workdir,
                            batch_prompts=50, lone_jobs=3, extra_env=extra))
                        from core.db import dispose_engines

                        dispose_engines()
                    found = workdir / "platform-worker-1.txt"
                    if profile and found.exists():
                        shares[mode].append(tracing_share(found))
    finally:
        standin.stop()
        spans = len(receiver.spans())
        receiver.stop()
    print(report(runs, shares, spans, args))


def report(runs: dict[str, list[PlatformResult]], shares: dict[str, list[tuple[int, int]]],
           spans: int, args: argparse.Namespace) -> str:
    def each(f: Callable[[PlatformResult], float | None]) -> tuple[list[float], list[float]]:
        return tuple([v for r in runs[m] if (v := f(r)) is not None]  # type: ignore[return-value]
                     for m in ("off", "on"))

    lines = ["", f"{args.jobs} research jobs a run ({args.max_subquestions + 2} steps each), "
             f"{args.rounds} round(s) off/on interleaved, 1 worker x {args.concurrency} slots, "
             f"{'Postgres' if args.database_url else 'SQLite'}, os.cpu_count() = "
             f"{os.cpu_count()}; medians", "",
             f"{'':38s}{'off':>10s}{'on':>10s}  {'on / off':>8s}"]
    lines.append(_row("worker CPU per step (ms)", *each(
        lambda r: r.worker_cpu_s * 1000 / r.steps if r.worker_cpu_s else None)))
    lines.append(_row("API CPU per submission (ms)", *each(
        lambda r: r.api_cpu_s * 1000 / r.jobs if r.api_cpu_s else None)))
    lines.append(_row("platform steps/s", *each(lambda r: r.steps / r.wall_s)))
    lines.append(_row("hand-off p50 (ms)", *each(lambda r: percentile(r.handoffs_ms, 50))))
    lines.append(_row("hand-off p95 (ms)", *each(lambda r: percentile(r.handoffs_ms, 95))))
    lines.append(f"{'spans received (all on runs)':38s}{spans:10d}")
    for mode in ("off", "on"):
        inside = sum(i for i, _ in shares[mode])
        total = sum(t for _, t in shares[mode])
        if total:
            lines.append(f"{'worker samples in tracing code, ' + mode:38s}{inside:10d} of "
                         f"{total} ({100 * inside / total:.2f} %, py-spy --gil)")
    if not any(shares.values()):
        lines.append("(no py-spy samples: install py-spy for the share of tracing code)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
