"""Shared helpers for the test suite."""

from __future__ import annotations

from collections.abc import Callable
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
