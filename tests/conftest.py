"""Test fixtures: a fresh Postgres database built by `alembic upgrade head`, a Redis database of
its own, a stand-in model server, and real Celery worker processes."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from alembic import command
from alembic.config import Config
from fastapi.testclient import TestClient

from tests.helpers import ROOT, Proc, start_worker

PG_ADMIN_URL = os.environ.get("AGENTQ_TEST_PG_ADMIN_URL",
                              "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("AGENTQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")


def migrate(url: str) -> None:
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.attributes["url"] = url
    cfg.attributes["skip_logging"] = True
    command.upgrade(cfg, "head")


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    name = f"agentq_test_{os.getpid()}_{secrets.token_hex(3)}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    yield f"{base}/{name}"
    from core.db import dispose_engines

    dispose_engines()
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def standin_server() -> Iterator[Any]:
    from bench.standin import StandinServer

    server = StandinServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def agentq_env(database_url: str, standin_server: Any,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Point every agentq component (this process and its children) at the test services."""
    env = {
        "AGENTQ_DATABASE_URL": database_url,
        "AGENTQ_REDIS_URL": REDIS_URL,
        "AGENTQ_POOL_ENDPOINTS": standin_server.url,
        "AGENTQ_OUTBOX_SWEEP_AFTER_S": "2",
        "AGENTQ_OUTBOX_SWEEP_INTERVAL_S": "1",
        "AGENTQ_RETRY_MAX_SECONDS": "10",
        "AGENTQ_SSE_HEARTBEAT_S": "1",
        # Tests poll hard; the rate-limit test sets its own limit.
        "AGENTQ_RATE_LIMIT": "100000/minute",
        # Short leases so that recovery from a killed worker shows within seconds.
        "AGENTQ_STEP_LEASE_SECONDS": "5",
        "AGENTQ_STEP_REQUEUE_AFTER_S": "5",
        # Tests deliver webhooks to receivers on this machine, on a fast retry schedule.
        "AGENTQ_WEBHOOKS_ALLOW_PRIVATE_NETWORKS": "true",
        "AGENTQ_WEBHOOK_RETRY_SCHEDULE_S": "1,1,1",
        # Energy is the share of the endpoint's busy time at a declared power.
        "AGENTQ_ENDPOINT_WATTS": '{"*": 120}',
        "AGENTQ_MODEL_CACHE_DIR": str(Path.home() / ".cache" / "agentq" / "models"),
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from core.catalogue import get_catalogue
    from core.db import dispose_engines
    from core.settings import get_settings

    get_settings.cache_clear()
    get_catalogue.cache_clear()
    dispose_engines()
    redis.Redis.from_url(REDIS_URL).flushdb()
    migrate(database_url)
    yield {**os.environ, **env}
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    get_settings.cache_clear()


@pytest.fixture
def standin(standin_server: Any, agentq_env: dict[str, str]) -> Iterator[Any]:
    """The stand-in server, reset to its defaults after each test."""
    yield standin_server
    from bench.standin import DEFAULT_PLAN, StandinState

    defaults = StandinState()
    st = standin_server.state
    with st.lock:
        st.delay_s, st.fail_next, st.fail_status = defaults.delay_s, 0, defaults.fail_status
        st.omit_usage, st.token_delay_s = False, defaults.token_delay_s
        st.hold_until_running, st.hold_timeout_s = 0, defaults.hold_timeout_s
        st.plan_text, st.replies = defaults.plan_text, {}
        st.scripts, st.delay_by_index, st.bodies, st.slow = {}, {}, [], {}
        st.tokenize_status, st.context = None, defaults.context
    assert DEFAULT_PLAN


@pytest.fixture(scope="session")
def client(agentq_env: dict[str, str]) -> Iterator[TestClient]:
    from api.app import app

    with TestClient(app) as c:
        yield c


@pytest.fixture
def tenant_key(agentq_env: dict[str, str]) -> str:
    from core.db import transaction
    from core.keys import create_key

    with transaction() as s:
        raw, _ = create_key(s, f"tenant-{secrets.token_hex(4)}")
    return raw


_session_workers: list[Proc] = []


@pytest.fixture(scope="session")
def worker(agentq_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Proc]:
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    proc = start_worker(agentq_env, log)
    _session_workers.append(proc)
    yield proc
    _session_workers.remove(proc)
    proc.stop()


@pytest.fixture
def quiet_workers() -> Iterator[None]:
    """Pause the session's worker (if one was started) so that jobs stay where the API put
    them; it resumes, and catches up, after the test."""
    import signal

    paused = [p for p in _session_workers if p.popen.poll() is None]
    for p in paused:
        os.kill(p.popen.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for p in paused:
            os.kill(p.popen.pid, signal.SIGCONT)


@pytest.fixture(scope="session")
def api_server(agentq_env: dict[str, str]) -> Iterator[str]:
    """The API under a real uvicorn server (on a thread of this process)."""
    import threading

    import uvicorn

    from api.app import app
    from bench.standin import free_port
    from tests.helpers import wait_until

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 10, what="the API server")
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
