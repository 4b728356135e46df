"""A burst of submissions against real processes on Postgres: one API under uvicorn and two
Celery workers. Every submission is accepted (none waits past its pool into an error), every job
completes, and the processes together stay inside their configured connection pools."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psycopg
from sqlalchemy.engine import make_url

from bench.common import start_api
from core.settings import Settings
from tests.helpers import Proc, auth, start_worker, wait_until

BURST = 200
BODY = {"kind": "completion", "input": {"prompt": "hi", "max_tokens": 8}}
API_NAME = "agentq-burst-api"
WORKER_NAMES = ("agentq-burst-worker-0", "agentq-burst-worker-1")


def _conninfo(database_url: str) -> str:
    return make_url(database_url).set(drivername="postgresql").render_as_string(
        hide_password=False)


class ConnectionSampler:
    """Polls `pg_stat_activity` on a thread: the most connections each application name held
    at once (and the most of them in use: not idle in the pool), and the most all of them held
    together."""

    def __init__(self, conninfo: str, names: tuple[str, ...]) -> None:
        self._conninfo = conninfo
        self._names = list(names)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pg-sampler", daemon=True)
        self.peak: Counter[str] = Counter()
        self.peak_busy: Counter[str] = Counter()
        self.peak_total = 0
        self.samples = 0
        self.error: BaseException | None = None

    def __enter__(self) -> ConnectionSampler:
        self._thread.start()
        wait_until(lambda: self.samples > 0 or self.error is not None, 30,
                   interval=0.05, what="the first pg_stat_activity sample")
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            with psycopg.connect(self._conninfo, autocommit=True) as conn:
                while not self._stop.is_set():
                    rows = conn.execute(
                        "SELECT application_name, count(*), "
                        "count(*) FILTER (WHERE state <> 'idle') FROM pg_stat_activity "
                        "WHERE datname = current_database() AND application_name = ANY(%s) "
                        "GROUP BY application_name", (self._names,)).fetchall()
                    now = {str(name): int(n) for name, n, _ in rows}
                    for name, n, busy in rows:
                        self.peak[name] = max(self.peak[name], int(n))
                        self.peak_busy[name] = max(self.peak_busy[name], int(busy))
                    self.peak_total = max(self.peak_total, sum(now.values()))
                    self.samples += 1
                    self._stop.wait(0.02)
        except BaseException as exc:  # reported by the test
            self.error = exc


async def _burst(base: str, key: str) -> list[tuple[int, str | None, float]]:
    """BURST submissions at once, each on a connection of its own: (status, job id, seconds);
    status 0 for a request that got no answer."""
    limits = httpx.Limits(max_connections=BURST, max_keepalive_connections=BURST)
    async with httpx.AsyncClient(base_url=base, headers=auth(key), limits=limits,
                                 timeout=httpx.Timeout(60)) as http:
        start = asyncio.Event()

        async def one() -> tuple[int, str | None, float]:
            await start.wait()
            began = time.monotonic()
            try:
                r = await http.post("/v1/jobs", json=BODY)
            except httpx.HTTPError:
                return 0, None, time.monotonic() - began
            job_id = r.json().get("id") if r.status_code == 202 else None
            return r.status_code, job_id, time.monotonic() - began

        tasks = [asyncio.create_task(one()) for _ in range(BURST)]
        await asyncio.sleep(0)
        start.set()
        return list(await asyncio.gather(*tasks))


def _statuses(conninfo: str, ids: list[str]) -> Counter[str]:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        rows = conn.execute("SELECT status, count(*) FROM jobs WHERE id = ANY(%s) "
                            "GROUP BY status", (ids,)).fetchall()
    return Counter({str(status): int(n) for status, n in rows})


def test_a_burst_of_200_submissions_is_accepted_and_completed(
        agentq_env: dict[str, str], tenant_key: str, standin: Any, tmp_path: Path) -> None:
    settings = Settings()
    per_process = settings.db_pool_size + settings.db_max_overflow
    conninfo = _conninfo(agentq_env["AGENTQ_DATABASE_URL"])
    procs: list[Proc] = []
    with ThreadPoolExecutor(3) as pool:
        api_started = pool.submit(start_api, {**agentq_env, "AGENTQ_DB_APPLICATION_NAME":
                                              API_NAME}, tmp_path / "api.log")
        workers_started = [pool.submit(start_worker, {**agentq_env,
                                                      "AGENTQ_DB_APPLICATION_NAME": name},
                                       tmp_path / f"burst-{name}.log")
                           for name in WORKER_NAMES]
    started: list[Future[Any]] = [api_started, *workers_started]
    for future in started:
        if future.exception() is None:
            result = future.result()
            procs.append(result[1] if isinstance(result, tuple) else result)
    try:
        for future in started:
            future.result()
        base, api = api_started.result()
        with ConnectionSampler(conninfo, (API_NAME, *WORKER_NAMES)) as sampler:
            began = time.monotonic()
            answers = asyncio.run(_burst(base, tenant_key))
            submitted_s = time.monotonic() - began
            codes = Counter(code for code, _, _ in answers)
            assert codes == {202: BURST}, f"answers by status: {dict(codes)}\n" \
                                          f"{api.output()[-3000:]}"
            ids = [job_id for _, job_id, _ in answers if job_id is not None]
            assert len(set(ids)) == BURST

            def all_ended() -> Counter[str] | None:
                counts = _statuses(conninfo, ids)
                ended = sum(n for s, n in counts.items()
                            if s in ("completed", "failed", "cancelled", "budget_exhausted"))
                return counts if ended == BURST else None

            final = wait_until(all_ended, 75, interval=0.25, what="every job to end")
            finished_s = time.monotonic() - began
        assert sampler.error is None, repr(sampler.error)
        assert final == {"completed": BURST}, f"jobs by status: {dict(final)}"
        assert "Traceback" not in api.output(), api.output()[-3000:]
        slowest = max(seconds for _, _, seconds in answers)
        print(f"\nburst of {BURST}: answers {dict(codes)}; slowest answer {slowest:.2f} s; "
              f"all answered in {submitted_s:.2f} s; all completed in {finished_s:.2f} s; "
              f"peak connections {dict(sampler.peak)}, together {sampler.peak_total}, "
              f"in use at once {dict(sampler.peak_busy)} "
              f"({sampler.samples} samples)")
        for name in (API_NAME, *WORKER_NAMES):
            assert sampler.peak[name] <= per_process, dict(sampler.peak)
        assert sampler.peak_total <= per_process * 3, dict(sampler.peak)
    finally:
        for proc in procs:
            proc.stop()
