"""Faults injected for real: a worker killed mid-step, a process that dies between commit and
publish, a job past its deadline, and a database from an older schema version."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from core.db import transaction
from core.models import ModelCall, OutboxMessage, Step
from tests.broker import own_broker
from tests.helpers import ROOT, auth, start_worker, wait_for_job, wait_until
from tests.stack import drop_database, fresh_database, start_redis

pytestmark = pytest.mark.usefixtures("worker")


def test_a_job_past_its_deadline_fails_clearly(client: TestClient, tenant_key: str,
                                               standin: Any) -> None:
    standin.state.delay_s = 4
    resp = client.post("/v1/jobs", headers=auth(tenant_key), json={
        "kind": "research", "input": {"query": "How do tides work?"},
        "budget": {"max_seconds": 1}})
    assert resp.status_code == 202
    job = wait_for_job(client, tenant_key, resp.json()["id"], timeout=30)
    assert job["status"] == "failed"
    assert job["error"]["code"] == "deadline_exceeded"
    assert "1 seconds" in job["error"]["message"]

    def settled() -> bool:
        with transaction() as s:
            return not s.scalar(select(func.count()).select_from(Step).where(
                Step.job_id == job["id"], Step.status.in_(("pending", "queued", "running"))))

    wait_until(settled, 30, what="no step left running or queued")


def test_a_worker_killed_mid_step_loses_nothing(
        client: TestClient, tenant_key: str, standin: Any, worker: Any,
        agentq_env: dict[str, str], tmp_path: Path) -> None:
    """The session worker is paused (SIGSTOP) so a second worker takes the job; that worker is
    killed with SIGKILL while its model calls are in flight; the first resumes, re-queues the
    orphaned steps once their lease runs out, and finishes the job. Calls that had finished
    are never made again."""
    standin.state.delay_s = 2.0
    second = start_worker(agentq_env, tmp_path / "second.log")
    os.kill(worker.popen.pid, signal.SIGSTOP)
    # A worker stopped while blocked in BRPOP would still be handed the next message until that
    # blocking read times out (1 s); wait that out so the new job's steps go to `second`.
    time.sleep(2)
    try:
        resp = client.post("/v1/jobs", headers=auth(tenant_key), json={
            "kind": "research", "input": {"query": "Why do cats purr?", "max_subquestions": 3}})
        job_id = resp.json()["id"]
        try:
            wait_until(lambda: client.get(f"/v1/jobs/{job_id}", headers=auth(tenant_key)).json()[
                "progress"]["phase"] == "investigating", 60, what="the investigators to start")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nsecond worker:\n{second.output()[-3000:]}") from None
        time.sleep(0.5)  # their model calls are now in flight at the stand-in
        os.killpg(second.popen.pid, signal.SIGKILL)
        second.popen.wait(timeout=10)
        with transaction() as s:
            finished_before = set(s.scalars(select(ModelCall.request_id)
                                            .where(ModelCall.job_id == job_id)))
            orphaned = s.scalar(select(func.count()).select_from(Step).where(
                Step.job_id == job_id, Step.status == "running"))
    finally:
        os.kill(worker.popen.pid, signal.SIGCONT)
        second.stop()
    assert orphaned, "the killed worker held no running step"
    job = wait_for_job(client, tenant_key, job_id, timeout=60)
    assert job["status"] == "completed", job
    sent = standin.state.request_ids
    for request_id in finished_before:
        assert sent.count(request_id) == 1, request_id
    with transaction() as s:
        attempts = list(s.scalars(select(Step.attempt).where(Step.job_id == job_id,
                                                             Step.role == "investigator")))
        ledger_rows = s.scalar(select(func.count()).select_from(ModelCall)
                               .where(ModelCall.job_id == job_id))
    assert max(attempts) == 2  # the orphaned steps ran again
    assert ledger_rows == job["usage"]["model_calls"]
    # What the server saw against the ledger: every billed call was made once; a call made but
    # not billed is one the killed worker had in flight (a first attempt of an orphaned step).
    with transaction() as s:
        steps = {step_id: attempt for step_id, attempt in s.execute(
            select(Step.id, Step.attempt).where(Step.job_id == job_id))}
        billed = list(s.scalars(select(ModelCall.request_id).where(ModelCall.job_id == job_id)))
    seen = [r for r in sent if r.split(":", 1)[0] in steps]
    assert len(billed) == len(set(billed))
    assert all(seen.count(request_id) == 1 for request_id in billed)
    unbilled = set(seen) - set(billed)
    assert unbilled, "no call was in flight when the worker was killed"
    for request_id in unbilled:
        step_id, attempt, _ = request_id.split(":")
        assert attempt == "1", request_id
        assert steps[step_id] == 2, request_id


CRASHER = textwrap.dedent("""
    import os, sys
    from core.db import transaction
    from core.keys import authenticate
    from core.repositories import outbox
    from orchestrator.jobs import create_job

    mode, key = sys.argv[1], sys.argv[2]

    def crash_before_publish(messages):
        os._exit(17)  # the transaction has committed; nothing was sent

    def crash_before_marking_sent(messages):
        from core.queue import get_celery, publish_options
        from core.settings import get_settings
        for _, task, payload, priority, _headers in messages:
            get_celery().send_task(task, kwargs=payload, **publish_options(
                task, priority or 0, get_settings().broker_url))
        os._exit(17)  # sent, but the outbox rows still look unsent

    outbox.publish = crash_before_publish if mode == "commit" else crash_before_marking_sent
    with transaction() as s:
        tenant_id = authenticate(s, key).tenant_id
    with transaction() as s:
        job = create_job(s, tenant_id=tenant_id, kind_name="completion",
                         raw_input={"prompt": "crash " + mode}, budget={}, metadata={})
        print(job.id, flush=True)
""")


@pytest.mark.parametrize("mode", ["commit", "publish"])
def test_a_crash_around_publishing_runs_the_job_once(
        client: TestClient, tenant_key: str, standin: Any, agentq_env: dict[str, str],
        mode: str) -> None:
    proc = subprocess.run([sys.executable, "-c", CRASHER, mode, tenant_key], env=agentq_env,
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 17, proc.stderr
    job_id = proc.stdout.strip()
    job = wait_for_job(client, tenant_key, job_id, timeout=30)
    assert job["status"] == "completed"
    with transaction() as s:
        step_id = s.scalars(select(Step.id).where(Step.job_id == job_id)).one()
        calls = s.scalar(select(func.count()).select_from(ModelCall)
                         .where(ModelCall.job_id == job_id))

    def marked_sent() -> bool:
        with transaction() as s:
            unsent = s.scalars(select(OutboxMessage).where(OutboxMessage.sent_at.is_(None)))
            return all(m.payload.get("step_id") != step_id for m in unsent)

    wait_until(marked_sent, 30, what="the sweeper to mark the outbox row sent")
    assert calls == 1  # ran once in effect
    assert standin.state.request_ids.count(f"{step_id}:1:0") == 1


def test_a_half_finished_job_from_an_older_schema_resumes(
        database_url: str, agentq_env: dict[str, str], tmp_path: Path, standin: Any) -> None:
    """A job stored by schema 0001 (plan done, investigators queued, their messages long gone)
    resumes after `alembic upgrade head` with today's code and a worker of today."""
    import psycopg
    import redis
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine, text

    from tests.conftest import PG_ADMIN_URL, REDIS_URL, migrate

    name = database_url.rsplit("/", 1)[1] + "_old"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"'.encode())
        admin.execute(f'CREATE DATABASE "{name}"'.encode())
    old_url = database_url.rsplit("/", 1)[0] + "/" + name
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.attributes["url"] = old_url
    cfg.attributes["skip_logging"] = True
    command.upgrade(cfg, "0001")
    fixture = (Path(__file__).parent / "fixtures" / "schema_0001_half_finished_job.sql")
    with psycopg.connect(old_url.replace("+psycopg", ""), autocommit=True) as pg:
        pg.execute(fixture.read_text().encode())
    migrate(old_url)  # to head
    redis_url = REDIS_URL.rsplit("/", 1)[0] + "/13"
    redis.Redis.from_url(redis_url).flushdb()
    env = {**agentq_env, "AGENTQ_DATABASE_URL": old_url, "AGENTQ_REDIS_URL": redis_url,
           **own_broker("upgrade")}
    upgraded = start_worker(env, tmp_path / "upgraded.log")
    engine = create_engine(old_url)
    try:
        def status() -> str:
            with engine.connect() as conn:
                return str(conn.execute(text(
                    "SELECT status FROM jobs WHERE id = 'job_upgrade'")).scalar_one())

        wait_until(lambda: status() in {"completed", "failed"}, 60, what="the old job to end")
        with engine.connect() as conn:
            assert status() == "completed"
            calls = conn.execute(text(
                "SELECT COUNT(*) FROM model_calls WHERE job_id = 'job_upgrade'")).scalar_one()
            result = conn.execute(text(
                "SELECT result FROM jobs WHERE id = 'job_upgrade'")).scalar_one()
            seqs = [r[0] for r in conn.execute(text(
                "SELECT seq FROM job_events WHERE job_id = 'job_upgrade' ORDER BY seq"))]
    finally:
        upgraded.stop()
        engine.dispose()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())
    assert calls == 4  # the stored plan call, two investigators, the synthesiser
    assert [s["question"] for s in result["sections"]] == [
        "What pulls the oceans?", "Why are there two tides a day?"]
    assert seqs == list(range(1, len(seqs) + 1))


def test_twenty_jobs_survive_a_redis_restart(database_url: str, agentq_env: dict[str, str],
                                             standin: Any, tmp_path: Path) -> None:
    """Redis (no persistence: every queued message is lost) is stopped for 30 seconds in the
    middle of 20 jobs and started again: all 20 complete."""
    import httpx
    from sqlalchemy import create_engine, text

    from bench.standin import free_port
    from tests.helpers import Proc

    standin.state.delay_s = 0.5
    db_url = fresh_database(database_url, "_redis")
    redis_port = free_port()
    redis_proc = start_redis(redis_port, tmp_path / "redis.log")
    env = {**agentq_env, "AGENTQ_DATABASE_URL": db_url,
           "AGENTQ_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", **own_broker("redis")}
    key = subprocess.run([sys.executable, "-m", "api.cli", "keys", "create", "--tenant", "r"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    worker = start_worker(env, tmp_path / "worker.log")
    api_port = free_port()
    api = Proc([sys.executable, "-m", "uvicorn", "api.app:app", "--port", str(api_port)], env,
               tmp_path / "api.log")
    engine = create_engine(db_url)
    try:
        api.wait_for_output("Application startup complete", 60)
        with httpx.Client(base_url=f"http://127.0.0.1:{api_port}", headers=auth(key),
                          timeout=30) as http:
            ids = [http.post("/v1/jobs", json={"kind": "research", "input": {
                "query": f"Question {i} about the sea?", "max_subquestions": 3}}).json()["id"]
                for i in range(20)]
        time.sleep(1.0)
        redis_proc.terminate()
        redis_proc.wait(timeout=10)
        down_since = time.monotonic()
        with engine.connect() as conn:
            done_while_up = conn.execute(text(
                "SELECT COUNT(*) FROM jobs WHERE status = 'completed'")).scalar_one()
        time.sleep(30)
        redis_proc = start_redis(redis_port, tmp_path / "redis.log")
        assert time.monotonic() - down_since >= 30

        restarts = 0

        def all_done() -> bool:
            # As a supervisor would (systemd, Kubernetes): a worker whose Celery consumer gave
            # up on the broker connection and exited is started again.
            nonlocal worker, restarts
            if worker.popen.poll() is not None and restarts < 3:
                restarts += 1
                worker = start_worker(env, tmp_path / f"worker-{restarts}.log")
            with engine.connect() as conn:
                return int(conn.execute(text(
                    "SELECT COUNT(*) FROM jobs WHERE status = 'completed'")).scalar_one()) == 20

        try:
            wait_until(all_done, 120, interval=0.5, what="all 20 jobs to complete")
        except AssertionError as exc:
            with engine.connect() as conn:
                states = conn.execute(text(
                    "SELECT j.status, s.role, s.status, COUNT(*) FROM jobs j JOIN steps s "
                    "ON s.job_id = j.id GROUP BY 1, 2, 3 ORDER BY 1, 2, 3")).all()
            raise AssertionError(f"{exc}\nsteps: {states}\nworker log:\n"
                                 f"{worker.output()[-6000:]}") from None
        with engine.connect() as conn:
            per_job = conn.execute(text(
                "SELECT job_id, COUNT(*) FROM model_calls GROUP BY job_id")).all()
    finally:
        engine.dispose()
        api.stop()
        worker.stop()
        redis_proc.terminate()
        redis_proc.wait(timeout=10)
        drop_database(db_url)
    assert done_while_up < 20  # the outage really hit jobs in flight
    assert len(per_job) == 20
    assert all(n == 5 for _, n in per_job)  # plan, 3 investigators, synthesis: once each
    assert set(ids) == {j for j, _ in per_job}


@pytest.mark.parametrize("kill_one", [False, True], ids=["steady", "worker-killed"])
def test_scale_out_runs_200_jobs_once(database_url: str, agentq_env: dict[str, str],
                                      standin: Any, tmp_path: Path, kill_one: bool) -> None:
    """Three worker processes and two API processes against one Postgres and one Redis: 200
    small jobs, none lost, none billed twice; and the same with a worker killed halfway."""
    import threading

    import httpx
    import redis
    from sqlalchemy import create_engine, text

    from bench.standin import free_port
    from tests.conftest import REDIS_URL
    from tests.helpers import Proc

    standin.state.delay_s = 0.3
    db_url = fresh_database(database_url, "_scale")
    redis_url = REDIS_URL.rsplit("/", 1)[0] + "/14"
    redis.Redis.from_url(redis_url).flushdb()
    env = {**agentq_env, "AGENTQ_DATABASE_URL": db_url, "AGENTQ_REDIS_URL": redis_url,
           **own_broker("scale"),
           "AGENTQ_WORKER_CONCURRENCY": "16"}
    key = subprocess.run([sys.executable, "-m", "api.cli", "keys", "create", "--tenant", "s"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    workers = [start_worker(env, tmp_path / f"worker{i}.log") for i in range(3)]
    ports = [free_port(), free_port()]
    apis = [Proc([sys.executable, "-m", "uvicorn", "api.app:app", "--port", str(p),
                  "--log-level", "warning"], env, tmp_path / f"api{i}.log")
            for i, p in enumerate(ports)]
    engine = create_engine(db_url)
    ids: list[str] = []
    lock = threading.Lock()
    try:
        for p in ports:
            url = f"http://127.0.0.1:{p}/healthz"
            wait_until(lambda url=url: _answers(url), 60,  # type: ignore[misc]
                       what="an API process")

        def submit_batch(port: int, start: int) -> None:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=auth(key),
                              timeout=60) as http:
                for i in range(start, start + 50):
                    r = http.post("/v1/jobs", json={"kind": "completion",
                                                    "input": {"prompt": f"job {i}"}})
                    assert r.status_code == 202, r.text
                    with lock:
                        ids.append(r.json()["id"])

        threads = [threading.Thread(target=submit_batch, args=(ports[i % 2], i * 50))
                   for i in range(4)]
        for t in threads:
            t.start()
        if kill_one:
            wait_until(lambda: len(ids) >= 100, 60, what="half the jobs submitted")
            os.killpg(workers[0].popen.pid, signal.SIGKILL)
        for t in threads:
            t.join(timeout=120)
        assert len(ids) == 200

        def all_done() -> bool:
            with engine.connect() as conn:
                return int(conn.execute(text(
                    "SELECT COUNT(*) FROM jobs WHERE status = 'completed'")).scalar_one()) == 200

        wait_until(all_done, 180, interval=0.5, what="all 200 jobs to complete")
        with engine.connect() as conn:
            calls: dict[str, int] = dict(conn.execute(text(
                "SELECT job_id, COUNT(*) FROM model_calls GROUP BY job_id")).all())
            steps = conn.execute(text("SELECT id, attempt FROM steps")).all()
    finally:
        engine.dispose()
        for a in apis:
            a.stop()
        for w in workers:
            w.stop()
        drop_database(db_url)
    assert set(calls) == set(ids)
    assert set(calls.values()) == {1}  # each job's one model call is in the ledger once
    sent = standin.state.request_ids
    reruns = [sid for sid, attempt in steps if attempt > 1]
    for sid, _ in steps:
        # a call is sent again only if its step was re-run after the kill
        assert sent.count(f"{sid}:1:0") == 1 or sid in reruns
    if not kill_one:
        assert reruns == []


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
