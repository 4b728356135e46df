"""A command that escapes its process group and kills what it can of its launcher cannot keep
its run going: the run ends by the wall clock (or at once on cancel), its output pump stops,
and no process of it survives. In every mode this machine has, and as a real unprivileged
worker (`nobody`) in `plain` mode."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agents.sandbox import (
    Mode,
    Sandbox,
    SandboxLimits,
    SandboxResult,
    available_modes,
    describe,
)
from tests.test_sandbox import processes_with

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")

MODES_HERE = available_modes()
WALL = 3.0
# The run ends by the wall clock plus the time to tear the tree down and stop the pump.
LATE = 6.0
ROOT = Path(__file__).resolve().parents[1]


def escape(marker: str, then: str) -> str:
    """A writer that leaves the session and process group, then an attempt on the launcher
    (PID 1 of the namespace, or a process of another uid: refused; in non-root `plain`, it
    works), then `then`."""
    return (f"setsid sh -c 'while :; do echo x; done # {marker}' & "
            f"sleep 0.2; kill -9 $PPID; {then}")


@pytest.mark.parametrize("mode", MODES_HERE)
def test_an_escaped_writer_dies_with_a_command_that_kills_itself(mode: Mode) -> None:
    marker = f"escape-{secrets.token_hex(6)}"
    with Sandbox({}, SandboxLimits(wall_seconds=WALL), mode=mode, weakest=mode) as box:
        started = time.monotonic()
        result = box.run(escape(marker, "kill $$"))
        assert time.monotonic() - started < LATE
        assert not result.timed_out
        assert processes_with(marker) == []
    assert "x\nx\n" in result.output  # the writer ran, and wrote into the pipe


@pytest.mark.parametrize("mode", MODES_HERE)
def test_an_escaped_writer_ends_at_the_wall_clock(mode: Mode) -> None:
    marker = f"escape-{secrets.token_hex(6)}"
    with Sandbox({}, SandboxLimits(wall_seconds=WALL), mode=mode, weakest=mode) as box:
        started = time.monotonic()
        result = box.run(escape(marker, f"sleep 60 # {marker}"))
        elapsed = time.monotonic() - started
        assert processes_with(marker) == []
    assert elapsed < WALL + LATE
    if describe(mode).contained:
        # The launcher survived the attempt (PID 1, or another uid): the wall clock ended it.
        assert result.timed_out, result
        assert elapsed >= WALL
    else:
        assert result.exit_code == -9, result  # the run ended with its launcher


@pytest.mark.parametrize("mode", MODES_HERE)
def test_cancel_ends_an_escaped_tree_at_once(mode: Mode) -> None:
    marker = f"escape-{secrets.token_hex(6)}"
    stop = threading.Event()
    results: list[SandboxResult] = []
    with Sandbox({}, SandboxLimits(wall_seconds=60.0), mode=mode, weakest=mode) as box:
        worker = threading.Thread(target=lambda: results.append(
            box.run(escape(marker, f"sleep 60 # {marker}"), cancelled=stop.is_set)))
        worker.start()
        deadline = time.monotonic() + 20
        while len(processes_with(marker)) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)  # the writer and the sleeper are both up
        assert len(processes_with(marker)) >= 2
        cancelled_at = time.monotonic()
        stop.set()
        worker.join(timeout=LATE)
        assert not worker.is_alive(), "the run did not end on cancel"
        assert time.monotonic() - cancelled_at < LATE
        assert processes_with(marker) == []
    assert results[0].cancelled
    assert results[0].exit_code is None


NOBODY_ESCAPES = """
import json, sys, time
from agents.sandbox import Sandbox, SandboxLimits
marker = sys.argv[1]
out = {}
with Sandbox({}, SandboxLimits(wall_seconds=3.0), weakest="plain") as box:
    out["mode"] = box.isolation.mode
    for name, then in (("exits", "kill $$"), ("sleeps", "sleep 60 # " + marker)):
        command = ("setsid sh -c 'while :; do echo x; done # " + marker + "' & "
                   "setsid sh -c 'sleep 60 # " + marker + "' & sleep 0.2; kill -9 $PPID; " + then)
        started = time.monotonic()
        result = box.run(command)
        out[name] = {"elapsed": time.monotonic() - started, "exit_code": result.exit_code}
print(json.dumps(out))
"""


def test_a_plain_worker_that_is_not_root_kills_escapes_that_killed_its_launcher() -> None:
    """As `nobody` with user namespaces disabled, `plain` (opted into) is the only mode: the
    command can kill its launcher. Writers and sleepers it started before are still killed."""
    marker = f"escape-{secrets.token_hex(6)}"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "unprivileged.py"), "--no-userns", "--",
         sys.executable, "-c", NOBODY_ESCAPES, marker],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["mode"] == "plain"
    for name in ("exits", "sleeps"):
        assert out[name]["elapsed"] < WALL + LATE, out
        assert out[name]["exit_code"] == -9, out  # the launcher itself was killed
    assert processes_with(marker) == []
