"""The broker setting, RabbitMQ's queue declarations, and a RabbitMQ restart in the middle of a
run: nothing is lost and no model call is made or billed twice."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from bench.common import start_api, submit_jobs
from core import queue
from core.settings import Settings
from tests.broker import RabbitNode
from tests.helpers import start_worker, wait_until
from tests.stack import drop_database, fresh_database

AMQP = "amqp://guest:guest@127.0.0.1:5672/agentq"


def test_the_broker_is_the_redis_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AGENTQ_BROKER_URL", raising=False)
    monkeypatch.setenv("AGENTQ_REDIS_URL", "redis://10.0.0.9:6379/3")
    assert Settings().broker_url == "redis://10.0.0.9:6379/3"
    monkeypatch.setenv("AGENTQ_BROKER_URL", "")
    assert Settings().broker_url == "redis://10.0.0.9:6379/3"
    monkeypatch.setenv("AGENTQ_BROKER_URL", AMQP)
    settings = Settings()
    assert (settings.broker_url, settings.redis_url) == (AMQP, "redis://10.0.0.9:6379/3")


def test_rabbitmq_gets_quorum_queues_confirms_and_a_queue_per_priority() -> None:
    config = queue.celery_config(queue.QUEUE, 8, AMQP)
    assert config["broker_transport_options"] == {"confirm_publish": True}
    assert config["task_acks_late"]
    assert config["task_reject_on_worker_lost"]
    assert config["worker_prefetch_multiplier"] == 1
    queues: list[Any] = list(queue.declared_queues(AMQP))
    assert [q.name for q in queues] == [queue.QUEUE, queue.STANDARD_QUEUE, queue.FLEX_QUEUE,
                                        queue.WEBHOOK_QUEUE]
    assert all(q.queue_arguments == {"x-queue-type": "quorum"} and q.durable for q in queues)
    assert {q.exchange.type for q in queues} == {"topic"}
    assert queue.publish_options("steps.run", 0, AMQP) == {"queue": queue.QUEUE}
    tiers = {tier: queue.publish_options("steps.run", queue.step_priority(tier, continuing),
                                         AMQP)["queue"]
             for tier in ("interactive", "promoted", "standard", "flex")
             for continuing in (True, False)}
    assert tiers == {"interactive": queue.QUEUE, "promoted": queue.QUEUE,
                     "standard": queue.STANDARD_QUEUE, "flex": queue.FLEX_QUEUE}
    assert queue.publish_options("webhooks.deliver", 0, AMQP) == {"queue": queue.WEBHOOK_QUEUE}
    # Redis keeps message priorities; acknowledgements stay in the worker (the database
    # brings back a dead worker's steps).
    redis_url = "redis://127.0.0.1:6379/0"
    assert queue.publish_options("steps.run", 6, redis_url) == {"priority": 6}
    assert queue.celery_config(queue.QUEUE, 8, redis_url)["broker_transport_options"] == {
        "ack_emulation": False, "priority_steps": list(queue.PRIORITY_STEPS)}
    assert [q.name for q in queue.declared_queues(redis_url)] == [queue.QUEUE, queue.WEBHOOK_QUEUE]


def test_twenty_jobs_survive_a_rabbitmq_restart(database_url: str, agentq_env: dict[str, str],
                                                standin: Any, tmp_path: Path) -> None:
    """A RabbitMQ node of the test's own is stopped while 20 research jobs run, two more jobs
    are submitted while it is down, and it is started again: every job completes, the outbox
    is empty, and the stand-in served exactly the calls the ledger bills, each once."""
    standin.state.delay_s = 1.0
    node = RabbitNode(tmp_path / "rabbitmq").start()
    db_url = fresh_database(database_url, "_rabbit")
    env = {**agentq_env, "AGENTQ_DATABASE_URL": db_url, "AGENTQ_BROKER_URL": node.url}
    engine = create_engine(db_url)

    def scalar(sql: str) -> int:
        with engine.connect() as conn:
            return int(conn.execute(text(sql)).scalar_one())

    key = subprocess.run([sys.executable, "-m", "api.cli", "keys", "create", "--tenant", "rmq"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    worker = start_worker(env, tmp_path / "worker.log")
    api, api_proc = start_api(env, tmp_path / "api.log")
    restarts = 0
    try:
        body = {"kind": "research", "input": {"query": "Why is the sea salty?",
                                              "max_subquestions": 3}}
        ids = submit_jobs(api, key, [body] * 20, concurrency=4)
        wait_until(lambda: scalar("SELECT COUNT(*) FROM model_calls") >= 10, 60,
                   what="the jobs to be under way")
        node.stop()
        done_while_up = scalar("SELECT COUNT(*) FROM jobs WHERE status = 'completed'")
        # Steps that finish while the broker is away leave their next steps in the outbox.
        wait_until(lambda: scalar("SELECT COUNT(*) FROM outbox WHERE sent_at IS NULL"), 60,
                   what="an outbox row left unsent while the broker is down")
        ids += submit_jobs(api, key, [body] * 2, concurrency=2)
        down = httpx.get(f"{api}/readyz", timeout=30)
        assert (down.status_code, down.json()["checks"]["broker"]["ok"]) == (503, False)
        assert "agentq_broker_up 0.0" in httpx.get(f"{api}/metrics", timeout=30).text
        node.start()

        def all_done() -> bool:
            # As a supervisor would: a worker whose consumer gave up on the broker is restarted.
            nonlocal worker, restarts
            if worker.popen.poll() is not None and restarts < 3:
                restarts += 1
                worker = start_worker(env, tmp_path / f"worker-{restarts}.log")
            return scalar("SELECT COUNT(*) FROM jobs WHERE status = 'completed'") == 22

        try:
            wait_until(all_done, 120, interval=0.5, what="all 22 jobs to complete")
        except AssertionError as exc:
            with engine.connect() as conn:
                states = conn.execute(text(
                    "SELECT j.status, s.role, s.status, COUNT(*) FROM jobs j JOIN steps s "
                    "ON s.job_id = j.id GROUP BY 1, 2, 3 ORDER BY 1, 2, 3")).all()
            raise AssertionError(f"{exc}\nsteps: {states}\nworker log:\n"
                                 f"{worker.output()[-6000:]}") from None
        wait_until(lambda: scalar("SELECT COUNT(*) FROM outbox WHERE sent_at IS NULL") == 0,
                   30, what="every outbox row to be sent")
        assert httpx.get(f"{api}/readyz", timeout=30).json()["checks"]["broker"] == {"ok": True}
        scrape = httpx.get(f"{api}/metrics", timeout=30).text
        for name in ("agentq", "agentq.standard", "agentq.flex", "agentq.webhooks"):
            assert f'agentq_queue_depth{{queue="{name}"}}' in scrape
        assert "agentq_broker_up 1.0" in scrape
        with engine.connect() as conn:
            per_job: dict[str, int] = dict(conn.execute(text(
                "SELECT job_id, COUNT(*) FROM model_calls GROUP BY job_id")).all())
            billed = list(conn.execute(text("SELECT request_id FROM model_calls")).scalars())
            steps = set(conn.execute(text("SELECT id FROM steps")).scalars())
            reruns = scalar("SELECT COUNT(*) FROM steps WHERE attempt > 1")
    finally:
        engine.dispose()
        api_proc.stop()
        worker.stop()
        node.kill()
        drop_database(db_url)
    assert done_while_up < 20  # the restart really hit jobs in flight
    assert set(per_job) == set(ids)
    assert set(per_job.values()) == {5}  # plan, 3 investigators, synthesis: once each
    served = [r for r in standin.state.request_ids if r.split(":", 1)[0] in steps]
    assert sorted(served) == sorted(billed)  # every call served was billed, none twice
    assert reruns == 0  # redelivered messages found their steps done or running
