"""Shared helpers for the test suite."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
TERMINAL = {"completed", "failed", "cancelled", "budget_exhausted"}


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.1,
               what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def wait_for_job(client: Any, key: str, job_id: str, timeout: float = 60,
                 statuses: set[str] | None = None) -> dict[str, Any]:
    wanted = statuses or TERMINAL

    def done() -> dict[str, Any] | None:
        body: dict[str, Any] = client.get(f"/v1/jobs/{job_id}", headers=auth(key)).json()
        return body if body.get("status") in wanted else None

    return dict(wait_until(done, timeout, what=f"job {job_id} to reach {sorted(wanted)}"))


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class Proc:
    """A child process with its output in a log file, stopped at the end."""

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
                raise AssertionError(f"process exited early:\n{self.output()[-4000:]}")
            return marker in self.output()

        wait_until(seen, timeout, interval=0.2, what=f"{marker!r} in {self.log.name}")

    def stop(self, timeout: float = 20) -> None:
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
        self._fh.close()


def start_worker(env: dict[str, str], log: Path, concurrency: int | None = None) -> Proc:
    """A Celery worker process, started as an operator would (`celery -A workers.app worker`)."""
    args = [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "--loglevel", "INFO",
            "--without-gossip", "--without-mingle", "--without-heartbeat"]
    if concurrency is not None:
        args += ["-c", str(concurrency)]
    proc = Proc(args, env, log)
    proc.wait_for_output("ready.", timeout=60)
    return proc


def metric(base_url: str, name: str) -> float:
    """Sum a Prometheus counter over its label sets."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total
