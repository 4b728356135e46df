"""`bench.scheduling`'s deadline part, run small: on a deployment of its own (a database made
through the test server, its own redis-server, API and worker) it prints its figures, the
misses it counts from the jobs agree with the API's /metrics, every job is promoted (the flood
outlasts every deadline) and the twins without promotion miss theirs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.helpers import ROOT

PG_ADMIN_URL = os.environ.get("AGENTQ_TEST_PG_ADMIN_URL",
                              "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_the_deadline_part_runs_and_prints_its_figures() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTQ_")}
    out = subprocess.run(
        [sys.executable, "-m", "bench.scheduling", "--pg", PG_ADMIN_URL, "--only", "deadlines",
         "--deadline-jobs", "4", "--deadline-window", "2", "--probes", "2",
         "--deadline-spread", "4,8", "--concurrency", "8"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "busy queue: interactive one-call p95" in text, text
    assert re.search(r"promoted 4 of 4 \(metric 4;", text), text
    misses = re.search(r"deadline misses (\d+) of 4 \([\d.]+ %\), target < 1 %; "
                       r"agentq_deadline_misses (\d+) \(agrees\); slack p50", text)
    assert misses is not None, text
    assert re.search(r"without promotion \(twins, flex without a deadline\): misses 4 of 4",
                     text), text
