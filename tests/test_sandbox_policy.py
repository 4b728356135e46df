"""The sandbox never falls back silently: a real unprivileged process (`nobody`) on a host where
user namespaces are disabled gets `plain`, and a Sandbox refuses to be made there unless the
operator accepts that mode by name. Where user namespaces work, `nobody` gets `userns`, and the
harm `plain` allows (the worker's secrets in /proc/PPID/environ, other jobs' workspaces) is
out of reach.

Needs no Redis, Postgres or model server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.geteuid() != 0,
    reason="drops to nobody: needs Linux and root")

ROOT = Path(__file__).resolve().parents[1]
SECRET = "postgresql+psycopg://agentq:s3cret-pw-9f2a@db.internal/agentq"

# A worker process: what mode it finds, whether a Sandbox is refused, and what a command in it
# can see of the worker and of other workspaces.
WORKER = """
import json, os, shutil, tempfile
from agents.sandbox import Sandbox, SandboxLimits, SandboxUnavailable, host_refusal, isolation
out = {"uid": os.getuid(), "mode": isolation().mode, "refusal": host_refusal()}
try:
    box = Sandbox({"t.txt": "x"}, SandboxLimits(wall_seconds=20.0))
except SandboxUnavailable as exc:
    out["refused"] = str(exc)
else:
    other = tempfile.mkdtemp(prefix="agentq-sandbox-other-job-")
    with box, open(os.path.join(other, "other.txt"), "w") as fh:
        fh.write("another job's file")
        fh.flush()
        result = box.run(f"cat /proc/{os.getpid()}/environ; echo; ls {tempfile.gettempdir()}; "
                         f"cat {other}/other.txt")
        out["output"] = result.output
        out["network_isolated"] = result.network_isolated
    shutil.rmtree(other)
print(json.dumps(out))
"""


def as_nobody(no_userns: bool, **env: str) -> dict[str, Any]:
    args = [sys.executable, str(ROOT / "tests" / "unprivileged.py"),
            *(["--no-userns"] if no_userns else []), "--", sys.executable, "-c", WORKER]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("AGENTQ_")}
    proc = subprocess.run(
        args, capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={**environ, "PYTHONPATH": str(ROOT), "AGENTQ_DATABASE_URL": SECRET, **env})
    assert proc.returncode == 0, proc.stderr
    found: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["uid"] == 65534  # really unprivileged
    return found


def test_without_user_namespaces_an_unprivileged_worker_is_refused() -> None:
    found = as_nobody(no_userns=True)
    assert found["mode"] == "plain"
    for message in (found["refused"], found["refusal"]):
        assert "AGENTQ_SANDBOX_WEAKEST_MODE" in message
        assert "'plain'" in message
        assert "userns" in message  # why the stronger modes failed
    assert "output" not in found, "nothing ran"


def test_plain_runs_only_when_the_operator_accepts_it_by_name() -> None:
    found = as_nobody(no_userns=True, AGENTQ_SANDBOX_WEAKEST_MODE="plain")
    assert found["mode"] == "plain"
    assert found["refusal"] is None
    assert "refused" not in found
    # What the setting's documentation says plain gives up is real: the worker's secrets and
    # other jobs' files are readable, and the network is not isolated.
    assert SECRET in found["output"]
    assert [name for name in found["output"].splitlines()
            if name.startswith("agentq-sandbox-other-job-")]
    assert "another job's file" in found["output"]
    assert found["network_isolated"] is False


def test_netns_is_not_enough_by_default() -> None:
    found = as_nobody(no_userns=True, AGENTQ_SANDBOX_WEAKEST_MODE="netns")
    assert "refused" in found
    assert "AGENTQ_SANDBOX_WEAKEST_MODE=plain" in found["refused"]


def test_with_user_namespaces_an_unprivileged_worker_is_isolated() -> None:
    found = as_nobody(no_userns=False)
    assert found["mode"] == "userns"
    assert found["refusal"] is None
    assert found["network_isolated"] is True
    assert SECRET not in found["output"]
    listed = found["output"].splitlines()
    assert not [name for name in listed if name.startswith("agentq-sandbox-other-job-")]
    assert "another job's file" not in found["output"]
    assert "No such file or directory" in found["output"]
