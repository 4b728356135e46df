"""Real vLLM servers with the embedded model (two, started side by side), and the platform
around them: the API under uvicorn, a Celery worker process, Redis and the SQLite default."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from bench.standin import free_port
from tests.conftest import REDIS_URL, migrate
from tests.helpers import TERMINAL, Proc, start_worker, wait_until

E2E_REDIS_URL = os.environ.get("AGENTQ_TEST_E2E_REDIS_URL",
                               REDIS_URL.rsplit("/", 1)[0] + "/10")
# The vLLM servers are waited for up to SERVER_START_S (a fresh install compiles the model
# first: minutes on a CPU); the test that starts them holds that wait in its own time, so the
# e2e tests get it on top of the suite's per-test timeout.
SERVER_START_S = 1200


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("e2e") is not None \
                and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(
                SERVER_START_S + float(item.config.getini("timeout") or 600)))


class VllmServer:
    def __init__(self, proc: Proc, url: str) -> None:
        self.proc, self.url = proc, url

    def kill(self) -> None:
        import signal

        os.killpg(self.proc.popen.pid, signal.SIGKILL)
        self.proc.popen.wait(timeout=30)


@pytest.fixture(scope="session")
def vllm_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[VllmServer]]:
    logs = tmp_path_factory.mktemp("vllm")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"}
    servers = []
    for i in range(2):
        port = free_port()
        proc = Proc([sys.executable, "-m", "inference.serve", "--port", str(port)], env,
                    logs / f"vllm{i}.log")
        servers.append(VllmServer(proc, f"http://127.0.0.1:{port}"))

    def up(server: VllmServer) -> bool:
        if server.proc.popen.poll() is not None:
            raise AssertionError(f"vLLM exited:\n{server.proc.output()[-4000:]}")
        try:
            return httpx.get(f"{server.url}/v1/models", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        for server in servers:
            wait_until(lambda s=server: up(s), timeout=SERVER_START_S,  # type: ignore[misc]
                       interval=1,
                       what="a vLLM server")
        yield servers
    finally:
        for server in servers:
            server.proc.stop(timeout=30)


class Platform:
    def __init__(self, api: str, key: str, db_url: str, worker: Proc) -> None:
        self.api, self.key, self.db_url, self.worker = api, key, db_url, worker


@pytest.fixture(scope="module")
def platform(vllm_servers: list[VllmServer], tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[Platform]:
    tmp: Path = tmp_path_factory.mktemp("embedded")
    db_url = f"sqlite:///{tmp / 'agentq.db'}"
    migrate(db_url)
    redis.Redis.from_url(E2E_REDIS_URL).flushdb()
    env = {**os.environ, "AGENTQ_DATABASE_URL": db_url, "AGENTQ_REDIS_URL": E2E_REDIS_URL,
           "AGENTQ_BROKER_URL": "",  # the broker is that Redis
           "AGENTQ_POOL_ENDPOINTS": ",".join(s.url for s in vllm_servers),
           "AGENTQ_STEP_LEASE_SECONDS": "10", "AGENTQ_RETRY_MAX_SECONDS": "120"}
    key = subprocess.run([sys.executable, "-m", "api.cli", "keys", "create", "--tenant", "e2e"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    worker = start_worker(env, tmp / "worker.log")
    port = free_port()
    api = Proc([sys.executable, "-m", "uvicorn", "api.app:app", "--port", str(port)], env,
               tmp / "api.log")
    api.wait_for_output("Application startup complete", timeout=60)
    try:
        yield Platform(f"http://127.0.0.1:{port}", key, db_url, worker)
    finally:
        api.stop()
        worker.stop()


def wait_for_job(http: httpx.Client, job_id: str, timeout: float) -> dict[str, Any]:
    """Poll the job until it ends (a real server on the CPU: minutes, not seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = http.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in TERMINAL:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.5)


def make_corpus(http: httpx.Client, name: str, documents: Mapping[str, str]) -> str:
    corpus_id = str(http.post("/v1/corpora", json={"name": name}).json()["id"])
    for filename, body in documents.items():
        resp = http.post(f"/v1/corpora/{corpus_id}/documents",
                         files={"file": (filename, body.encode(), "text/plain")})
        assert resp.status_code in (200, 201), resp.text
    return corpus_id
