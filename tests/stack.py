"""A whole agentq deployment of its own for one test: a fresh database, a Redis server of its
own and a broker of its own (so no other worker of the session takes its messages), an API
process and workers started with the settings the test chooses."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bench.common import start_api
from tests.broker import own_broker
from tests.helpers import Proc, start_worker, wait_until


def fresh_database(database_url: str, suffix: str) -> str:
    import psycopg

    from tests.conftest import PG_ADMIN_URL, migrate

    name = database_url.rsplit("/", 1)[1] + suffix
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())
        admin.execute(f'CREATE DATABASE "{name}"'.encode())
    url = database_url.rsplit("/", 1)[0] + "/" + name
    migrate(url)
    return url


def drop_database(url: str) -> None:
    import psycopg

    from tests.conftest import PG_ADMIN_URL

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)'.encode())


def start_redis(port: int, log: Path) -> subprocess.Popen[bytes]:
    import shutil

    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=log.open("ab"),
                            stderr=subprocess.STDOUT)
    client = redis.Redis(port=port)

    def up() -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    wait_until(up, 10, what="redis-server")
    return proc


@dataclass
class Stack:
    env: dict[str, str]
    api: str  # base URL
    tmp: Path
    workers: list[Proc] = field(default_factory=list)

    def key(self, tenant: str) -> str:
        """A new API key of a new tenant."""
        return subprocess.run([sys.executable, "-m", "api.cli", "keys", "create", "--tenant",
                               tenant], env=self.env, capture_output=True, text=True,
                              check=True).stdout.strip()

    def worker(self, name: str, concurrency: int | None = None, **env: str) -> Proc:
        """A worker (`celery -A workers.app worker`) with these settings on top."""
        proc = start_worker({**self.env, **env}, self.tmp / f"{name}.log", concurrency)
        self.workers.append(proc)
        return proc


@contextmanager
def isolated_stack(database_url: str, agentq_env: dict[str, str], tmp: Path, suffix: str,
                   **api_env: str) -> Iterator[Stack]:
    """A database, a Redis server and an API process (with `api_env` on top of the session's
    settings) for one test; workers are started through `Stack.worker`."""
    from bench.standin import free_port

    db_url = fresh_database(database_url, suffix)
    redis_port = free_port()
    redis_proc = start_redis(redis_port, tmp / "redis.log")
    env = {**agentq_env, "AGENTQ_DATABASE_URL": db_url,
           "AGENTQ_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", **own_broker("stack")}
    api_proc: Proc | None = None
    stack: Stack | None = None
    try:
        api, api_proc = start_api({**env, **api_env}, tmp / "api.log")
        stack = Stack(env, api, tmp)
        yield stack
    finally:
        for proc in (stack.workers if stack else []):
            proc.stop()
        if api_proc is not None:
            api_proc.stop()
        redis_proc.terminate()
        redis_proc.wait(timeout=10)
        drop_database(db_url)
