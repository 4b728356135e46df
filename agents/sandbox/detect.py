"""Which modes work on this machine, found by starting `true` in each (once per process), and
which one a Sandbox gets by default."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import tempfile
import threading
from pathlib import Path

from agents.sandbox.execute import TMP_DIR, execute, unshare_binary
from agents.sandbox.model import MODES, Isolation, Mode, SandboxLimits

log = logging.getLogger(__name__)

# Sandboxed uids/gids (root mode): random, one per Sandbox, far above any real account.
UID_BASE = 1_500_000_000
UID_SPAN = 100_000_000

_lock = threading.Lock()
_detect_lock = threading.Lock()
_probed: dict[Mode, str | None] = {}
_detected: Isolation | None = None


def new_uid() -> int:
    return UID_BASE + secrets.randbelow(UID_SPAN)


def describe(mode: Mode, reason: str = "") -> Isolation:
    root = os.geteuid() == 0
    return Isolation(
        mode=mode,
        network=mode != "plain",
        filesystem=mode in ("root", "userns"),
        processes=mode in ("root", "userns"),
        separate_user=mode == "root" or (mode == "plain" and root),
        contained=mode != "plain" or root,
        reason=reason,
    )


def probe(mode: Mode) -> str | None:
    """None if `true` runs in `mode` here, else what went wrong (remembered)."""
    with _lock:
        if mode not in _probed:
            _probed[mode] = _probe(mode)
        return _probed[mode]


def available_modes() -> list[Mode]:
    """The modes that work here, strongest first."""
    return [mode for mode in MODES if probe(mode) is None]


def isolation() -> Isolation:
    """The strongest isolation this machine gives a Sandbox by default, found on first use.

    A root worker uses `root` (or `plain`, where the command still runs as a uid of its own):
    in `userns` and `netns` its command would run as uid 0, owner of the host's root-only
    files."""
    global _detected
    with _detect_lock:
        if _detected is None:
            _detected = _detect()
        return _detected


def _detect() -> Isolation:
    reasons: list[str] = []
    if unshare_binary() is None:
        reasons.append("unshare (util-linux) not found")
        candidates: list[Mode] = []
    elif os.geteuid() == 0:
        candidates = ["root"]
    else:
        candidates = ["userns", "netns"]
    chosen: Mode = "plain"
    for mode in candidates:
        problem = probe(mode)
        if problem is None:
            chosen = mode
            break
        reasons.append(f"{mode}: {problem}")
    found = describe(chosen, "; ".join(reasons))
    (log.info if found.filesystem else log.warning)(
        "sandbox isolation: %s (network isolated: %s)%s", found.mode, found.network,
        f"; {found.reason}" if found.reason else "")
    return found


def _probe(mode: Mode) -> str | None:
    if mode != "plain" and unshare_binary() is None:
        return "unshare (util-linux) not found"
    if mode == "root" and os.geteuid() != 0:
        return "not root"
    workspace = Path(tempfile.mkdtemp(prefix="agentq-sandbox-probe-"))
    try:
        uid = new_uid()
        if describe(mode).separate_user:
            os.chown(workspace, uid, uid)
        (workspace / TMP_DIR).mkdir()
        run = execute(mode, workspace, "true", SandboxLimits(wall_seconds=30.0), uid, uid, None)
        if run.launcher_error:
            return run.launcher_error
        if run.exit_code != 0:
            detail = run.output.decode(errors="replace").strip()[-300:]
            return f"exit {run.exit_code}: {detail}"
        return None
    except OSError as exc:
        return str(exc)
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
