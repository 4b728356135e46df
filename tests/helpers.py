"""Shared helpers for the test suite."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

import bench.common
from bench.common import ROOT, TERMINAL, Proc, start_worker

__all__ = ["ROOT", "TERMINAL", "Proc", "auth", "metric", "start_worker", "wait_for_job",
           "wait_until"]


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.1,
               what: str = "condition") -> Any:
    """`bench.common.wait_until`, failing the test (AssertionError) on timeout."""
    return bench.common.wait_until(predicate, timeout, interval, what, error=AssertionError)


def wait_for_job(client: Any, key: str, job_id: str, timeout: float = 60,
                 statuses: set[str] | None = None) -> dict[str, Any]:
    wanted = statuses or TERMINAL

    def done() -> dict[str, Any] | None:
        body: dict[str, Any] = client.get(f"/v1/jobs/{job_id}", headers=auth(key)).json()
        return body if body.get("status") in wanted else None

    return dict(wait_until(done, timeout, what=f"job {job_id} to reach {sorted(wanted)}"))


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def metric(base_url: str, name: str) -> float:
    """Sum a Prometheus counter over its label sets."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def install_plugin(name: str, work: Path) -> str:
    """Install the kind package `tests/plugins/<name>` into a directory of its own (built from
    a copy, so that the build leaves nothing in the source tree); returns the PYTHONPATH that
    finds it, and agentq, and what the environment had."""
    source = work / name
    shutil.copytree(ROOT / "tests" / "plugins" / name, source)
    target = work / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                    "--no-index", "--disable-pip-version-check", "--quiet",
                    "--target", str(target), str(source)],
                   check=True, capture_output=True, timeout=300)
    old = os.environ.get("PYTHONPATH")
    return os.pathsep.join([str(target), str(ROOT), *([old] if old else [])])
