"""`bench.step_cost` runs and counts: the harness, on SQLite, with a few steps."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_step_cost_counts_the_statements_and_transactions_of_each_kind() -> None:
    # The benchmark's own Redis database (it flushes it), never the suite's: a worker of the
    # suite would take the messages its steps publish.
    out = subprocess.run(
        [sys.executable, "-m", "bench.step_cost", "--steps", "10", "--rounds", "1"],
        cwd=ROOT, env={**os.environ}, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for kind in ("batch", "research"):
        section = out.stdout.split(f"\n{kind}: ", 1)[1]
        statements = _figure(section, r"statements per step")
        transactions = _figure(section, r"transactions per step")
        cpu = _figure(section, r"CPU per step \(ms\)")
        # A step claims, reserves, settles and completes: several statements, in at least
        # three transactions (claim, reservation, completion).
        assert statements >= 5
        assert transactions >= 3
        assert cpu > 0
        assert "UPDATE steps" in section


def _figure(section: str, label: str) -> float:
    found = re.search(label + r"\s+([\d.]+)", section)
    assert found is not None, section
    return float(found[1])
