"""Helpers shared by the benchmarks and the test suite: child processes, a fresh migrated
database, a Redis server of a run's own, the API under uvicorn, Celery workers, a tenant key
and percentiles."""

from __future__ import annotations

import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
TERMINAL = ("completed", "failed", "cancelled", "budget_exhausted")


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.1,
               what: str = "condition", error: type[Exception] = TimeoutError) -> Any:
    """Poll `predicate` until it returns something true (returned) or `timeout` passes
    (`error` is raised)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise error(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Proc:
    """A child process in its own session, its output in a log file, stopped at the end."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._fh = log.open("wb")
        self.popen = subprocess.Popen(args, env=env, cwd=ROOT, stdout=self._fh,
                                      stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_output(self, marker: str, timeout: float) -> None:
        def seen() -> bool:
            if self.popen.poll() is not None:
                raise RuntimeError(f"process exited early:\n{self.output()[-4000:]}")
            return marker in self.output()

        wait_until(seen, timeout, interval=0.2, what=f"{marker!r} in {self.log.name}")

    profiler: subprocess.Popen[bytes] | None = None

    def stop(self, timeout: float = 20) -> None:
        if self.profiler is not None:
            self.profiler.send_signal(signal.SIGINT)
            self.profiler.wait(timeout=30)
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
                self.popen.wait(timeout=timeout)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.popen.wait(timeout=10)
        if not self._fh.closed:
            self._fh.close()


def start_worker(env: dict[str, str], log: Path, concurrency: int | None = None,
                 app: str = "workers.app") -> Proc:
    """A Celery worker process in the threads pool, started as an operator would
    (`celery -A workers.app worker`)."""
    args = [sys.executable, "-m", "celery", "-A", app, "worker", "--loglevel", "INFO",
            "-P", "threads", "--without-gossip", "--without-mingle", "--without-heartbeat",
            "-n", f"{app.replace('.', '-')}-{log.stem}@%h"]
    if concurrency is not None:
        args += ["-c", str(concurrency)]
    proc = Proc(args, env, log)
    try:
        proc.wait_for_output("ready.", timeout=60)
        profile_dir = os.environ.get("AGENTQ_BENCH_PROFILE_DIR")
        if profile_dir and app == "workers.app":
            # py-spy samples the worker until it stops; collapsed stacks, one file per worker.
            out = Path(profile_dir) / f"{log.stem}.txt"
            py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            proc.profiler = subprocess.Popen(
                [py_spy, "record", "--pid", str(proc.popen.pid), "--format", "raw",
                 "--rate", "250", "--gil", "--output", str(out)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except BaseException:
        # A worker left running would take the next run's messages on the same Redis.
        proc.stop()
        raise
    return proc


def start_api(env: dict[str, str], log: Path) -> tuple[str, Proc]:
    """The API under a uvicorn process of its own; returns its base URL."""
    from bench.standin import free_port

    port = free_port()
    proc = Proc([sys.executable, "-m", "uvicorn", "api.app:app", "--host", "127.0.0.1",
                 "--port", str(port), "--log-level", "warning"], env, log)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"the API exited early:\n{proc.output()[-4000:]}")
        return http_ok(f"{base}/healthz")

    wait_until(up, 60, what="the API")
    return base, proc


def submit_jobs(base: str, key: str, bodies: Sequence[dict[str, Any]],
                concurrency: int) -> list[str]:
    """POST each body to `/v1/jobs`, `concurrency` requests in flight; returns the job ids in
    the order of `bodies`."""
    import asyncio

    async def run() -> list[str]:
        sem = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(
                base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60,
                limits=httpx.Limits(max_connections=concurrency)) as http:
            async def one(body: dict[str, Any]) -> str:
                async with sem:
                    r = await http.post("/v1/jobs", json=body)
                    r.raise_for_status()
                    return str(r.json()["id"])

            return list(await asyncio.gather(*(one(b) for b in bodies)))

    return asyncio.run(run())


def base_env() -> dict[str, str]:
    """This process's environment without agentq's settings (each run sets its own)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("AGENTQ_")}


def redis_server(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A redis-server of the run's own on a free port (no persistence), its log in `tmp`;
    returns the process and its URL."""
    from bench.standin import free_port

    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=(tmp / "redis.log").open("ab"),
                            stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    wait_until(lambda: _pings(url), 10, what="redis-server")
    return proc, url


def _pings(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url).ping())
    except redis.RedisError:
        return False


def http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def migrate(url: str) -> None:
    """`alembic upgrade head` on the database at `url`."""
    from alembic import command
    from alembic.config import Config

    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.attributes["url"] = url
    cfg.attributes["skip_logging"] = True
    command.upgrade(cfg, "head")


@contextmanager
def fresh_database(admin_url: str | None, workdir: Path) -> Iterator[str]:
    """A new, migrated database; yields its SQLAlchemy URL and removes it afterwards.

    No `admin_url`: an SQLite file in `workdir`. A Postgres URL: a temporary database created
    through that server (the URL's own database is only used to create and drop it)."""
    if admin_url is None:
        url = f"sqlite:///{workdir / 'bench.db'}"
        migrate(url)
        yield url
        return
    parsed = make_url(admin_url)
    if parsed.get_backend_name() == "sqlite":
        migrate(admin_url)
        yield admin_url
        return
    if parsed.get_backend_name() != "postgresql":
        raise SystemExit(f"unsupported database {parsed.get_backend_name()!r}")
    import psycopg

    conninfo = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
    name = f"agentq_bench_{os.getpid()}_{secrets.token_hex(3)}"
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = parsed.set(drivername="postgresql+psycopg", database=name).render_as_string(
        hide_password=False)
    try:
        migrate(url)
        yield url
    finally:
        from core.db import dispose_engines

        dispose_engines()
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def create_tenant_key(db_url: str, tenant: str) -> str:
    """A fresh API key for `tenant` in the database at `db_url`."""
    from core.db import session_factory
    from core.keys import create_key

    with session_factory(db_url)() as session:
        raw, _ = create_key(session, tenant)
        session.commit()
    return raw


def percentile(values: Sequence[float], p: float) -> float:
    """The nearest-rank percentile (`p` in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def cpu_seconds(procs: Sequence[Proc]) -> float | None:
    """User plus system CPU time of these processes (every thread), from /proc; None where
    there is no /proc."""
    total = 0.0
    for proc in procs:
        try:
            stat = Path(f"/proc/{proc.popen.pid}/stat").read_text()
        except OSError:
            return None
        fields = stat.rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def tail(proc: Proc, chars: int = 3000) -> str:
    try:
        return proc.output()[-chars:]
    except OSError:
        return ""
