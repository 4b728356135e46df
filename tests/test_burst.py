"""Bursts and database connections on Postgres.

A burst of submissions against real processes (one API under uvicorn, two Celery workers): every
submission is accepted, every job completes, and the processes together stay inside their
configured connection pools. An API whose pool has one connection still serves every request.
Transient database errors are retried where the work is safe to repeat, and only there."""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import httpx
import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session

from bench.common import start_api
from core.db import make_engine, transaction
from core.db_errors import CONNECT_ATTEMPTS, commit, is_transient, retry_transient
from core.keys import create_key
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
        async def one() -> tuple[int, str | None, float]:
            began = time.monotonic()
            try:
                r = await http.post("/v1/jobs", json=BODY)
            except httpx.HTTPError:
                return 0, None, time.monotonic() - began
            job_id = r.json().get("id") if r.status_code == 202 else None
            return r.status_code, job_id, time.monotonic() - began

        return list(await asyncio.gather(*(one() for _ in range(BURST))))


def _statuses(conn: psycopg.Connection[Any], ids: list[str]) -> Counter[str]:
    rows = conn.execute("SELECT status, count(*) FROM jobs WHERE id = ANY(%s) "
                        "GROUP BY status", (ids,)).fetchall()
    return Counter({str(status): int(n) for status, n in rows})


def _failures(conn: psycopg.Connection[Any], ids: list[str]) -> list[tuple[Any, ...]]:
    return conn.execute("SELECT status, error_code, error_message FROM jobs "
                        "WHERE id = ANY(%s) AND status <> 'completed' LIMIT 5",
                        (ids,)).fetchall()


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
        with psycopg.connect(conninfo, autocommit=True) as monitor, \
                ConnectionSampler(conninfo, (API_NAME, *WORKER_NAMES)) as sampler:
            began = time.monotonic()
            answers = asyncio.run(_burst(base, tenant_key))
            submitted_s = time.monotonic() - began
            codes = Counter(code for code, _, _ in answers)
            assert codes == {202: BURST}, f"answers by status: {dict(codes)}\n" \
                                          f"{api.output()[-3000:]}"
            ids = [job_id for _, job_id, _ in answers if job_id is not None]
            assert len(set(ids)) == BURST

            def all_ended() -> Counter[str] | None:
                counts = _statuses(monitor, ids)
                ended = sum(n for s, n in counts.items()
                            if s in ("completed", "failed", "cancelled", "budget_exhausted"))
                return counts if ended == BURST else None

            final = wait_until(all_ended, 75, interval=0.25, what="every job to end")
            finished_s = time.monotonic() - began
            failures = _failures(monitor, ids)
        assert sampler.error is None, repr(sampler.error)
        assert final == {"completed": BURST}, f"jobs by status: {dict(final)}; {failures}"
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


def _read_until(lines: Iterator[str], event_type: str) -> None:
    for line in lines:
        if line == f"event: {event_type}":
            return
    raise AssertionError(f"the stream ended before {event_type}")


@pytest.mark.usefixtures("quiet_workers")
def test_every_request_needs_only_one_connection(
        agentq_env: dict[str, str], tenant_key: str, tmp_path: Path) -> None:
    """An API process whose pool holds a single connection (and waits only briefly for it)
    serves every kind of request, many at once, and goes on answering while an event stream
    is open: no request holds a connection while it waits for another, and a stream holds
    none between its reads. (No worker runs the jobs: the one streamed ends when cancelled.)"""
    with transaction() as s:
        admin_key, _ = create_key(s, f"ops-{secrets.token_hex(3)}", admin=True)
    env = {**agentq_env, "AGENTQ_DB_POOL_SIZE": "1", "AGENTQ_DB_MAX_OVERFLOW": "0",
           "AGENTQ_DB_POOL_TIMEOUT_S": "5"}
    base, api = start_api(env, tmp_path / "api.log")
    try:
        with httpx.Client(base_url=base, headers=auth(tenant_key), timeout=30) as http:
            keyed = {"Idempotency-Key": f"burst-{secrets.token_hex(4)}"}
            first = http.post("/v1/jobs", json=BODY, headers=keyed)
            assert first.status_code == 202, first.text
            again = http.post("/v1/jobs", json=BODY, headers=keyed)
            assert again.status_code == 202, again.text
            assert again.headers["idempotent-replayed"] == "true"
            job_id = first.json()["id"]
            with http.stream("GET", f"/v1/jobs/{job_id}/events/stream") as stream:
                assert stream.status_code == 200
                lines = stream.iter_lines()
                _read_until(lines, "job.created")
                for path in (f"/v1/jobs/{job_id}", "/v1/jobs", f"/v1/jobs/{job_id}/steps",
                             f"/v1/jobs/{job_id}/events", f"/v1/jobs/{job_id}/webhook-deliveries",
                             "/v1/usage", "/v1/webhook-endpoints", "/readyz"):
                    r = http.get(path)
                    assert r.status_code == 200, (path, r.status_code, r.text)
                r = http.get("/v1/admin/tenants", headers=auth(admin_key))
                assert r.status_code == 200, r.text

                async def many() -> Counter[int]:
                    async with httpx.AsyncClient(base_url=base, headers=auth(tenant_key),
                                                 timeout=60) as h:
                        answers = await asyncio.gather(*(h.post("/v1/jobs", json=BODY)
                                                         for _ in range(20)))
                    return Counter(a.status_code for a in answers)

                assert asyncio.run(many()) == {202: 20}
                cancelled = http.post(f"/v1/jobs/{job_id}/cancel")
                assert cancelled.status_code == 202, cancelled.text
                _read_until(lines, "job.cancelled")
    finally:
        api.stop()
    assert "Traceback" not in api.output(), api.output()[-3000:]


def _deadlock() -> OperationalError:
    return OperationalError("INSERT INTO jobs ...", {}, psycopg.errors.DeadlockDetected(
        "deadlock detected"))


def test_a_submission_rolled_back_by_a_transient_error_is_run_again(
        client: TestClient, tenant_key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator import jobs as job_service

    real = job_service.create_job
    attempts: list[int] = []

    def flaky(*args: Any, **kwargs: Any) -> Any:
        attempts.append(1)
        if len(attempts) == 1:
            raise _deadlock()
        return real(*args, **kwargs)

    monkeypatch.setattr(job_service, "create_job", flaky)
    keyed = {**auth(tenant_key), "Idempotency-Key": f"retry-{secrets.token_hex(4)}"}
    r = client.post("/v1/jobs", json=BODY, headers=keyed)
    assert r.status_code == 202, r.text
    assert len(attempts) == 2
    listed = client.get("/v1/jobs", headers=auth(tenant_key)).json()["data"]
    assert [j["id"] for j in listed] == [r.json()["id"]]
    replay = client.post("/v1/jobs", json=BODY, headers=keyed)
    assert replay.json()["id"] == r.json()["id"]


class _FailingCommit:
    """A stand-in session whose COMMIT fails with `error`."""

    def __init__(self, error: OperationalError) -> None:
        self.error = error

    def flush(self) -> None:
        pass

    def commit(self) -> None:
        raise self.error


def test_a_commit_of_unknown_outcome_is_never_run_again() -> None:
    lost = OperationalError("COMMIT", {}, psycopg.OperationalError("server closed the "
                                                                   "connection unexpectedly"))
    with pytest.raises(OperationalError) as raised:
        commit(cast(Session, _FailingCommit(lost)))
    assert not is_transient(raised.value)
    with pytest.raises(OperationalError) as raised:
        commit(cast(Session, _FailingCommit(_deadlock())))
    assert is_transient(raised.value)
    runs: list[int] = []

    def lost_commit() -> None:
        runs.append(1)
        commit(cast(Session, _FailingCommit(OperationalError(
            "COMMIT", {}, psycopg.OperationalError("connection reset")))))

    with pytest.raises(OperationalError):
        retry_transient(lost_commit)
    assert len(runs) == 1
    assert not is_transient(PoolTimeout("QueuePool limit reached"))


def test_a_refused_connection_is_tried_again(database_url: str,
                                             agentq_env: dict[str, str]) -> None:
    """A role allowed one connection, already taken: the server refuses the next ("too many
    connections"). The engine tries again for a few seconds, then gives up with an error that
    is not tried again; and it gets in when the first connection closes while it tries."""
    role = f"agentq_probe_{secrets.token_hex(4)}"
    admin = _conninfo(database_url)
    with psycopg.connect(admin, autocommit=True) as conn:
        try:
            conn.execute(f'CREATE ROLE "{role}" LOGIN CONNECTION LIMIT 1')
        except psycopg.errors.InsufficientPrivilege:
            pytest.skip("the test database's user may not create roles")
    url = make_url(database_url).set(username=role).render_as_string(hide_password=False)
    held = psycopg.connect(_conninfo(url))
    refusals: list[str] = []
    release = threading.Event()

    class Refusals(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            refusals.append(record.getMessage())
            if release.is_set():
                held.close()

    handler = Refusals(level=logging.WARNING)
    logging.getLogger("core.db_errors").addHandler(handler)
    engine = make_engine(url)
    try:
        with pytest.raises(OperationalError) as refused, engine.connect():
            pass
        assert len(refusals) == CONNECT_ATTEMPTS - 1
        assert "too many connections" in refusals[0]
        assert not is_transient(refused.value)
        release.set()
        with engine.connect() as connection:
            assert connection.execute(text("SELECT 1")).scalar_one() == 1
        assert len(refusals) == CONNECT_ATTEMPTS
    finally:
        logging.getLogger("core.db_errors").removeHandler(handler)
        engine.dispose()
        held.close()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE usename = %s", (role,))
            conn.execute(f'DROP ROLE "{role}"')
