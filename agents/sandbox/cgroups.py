"""Per-run cgroups (root only, where the memory and pids controllers are writable): caps on all
of a run's processes together, an OOM counter the launcher watches, and a list of the run's
processes to kill."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Mapping

from agents.sandbox.launcher import kernel


class Cgroups:
    def __init__(self, name: str, memory_bytes: int, processes: int) -> None:
        self.dirs: list[str] = []
        self.oom_file: str | None = None
        v1 = [
            ("/sys/fs/cgroup/memory", {"memory.limit_in_bytes": memory_bytes}),
            ("/sys/fs/cgroup/pids", {"pids.max": processes}),
        ]
        v2 = ("/sys/fs/cgroup", {"memory.max": memory_bytes, "memory.swap.max": 0,
                                 "pids.max": processes})
        for root, values in v1:
            made = self._make(root, name, values)
            if made and root.endswith("/memory"):
                self.oom_file = os.path.join(made, "memory.oom_control")
        if not self.dirs and _v2_controllers() >= {"memory", "pids"}:
            made = self._make(v2[0], name, v2[1])
            if made:
                self.oom_file = os.path.join(made, "memory.events")
        self.procs_files = [os.path.join(d, "cgroup.procs") for d in self.dirs]

    def _make(self, root: str, name: str, values: Mapping[str, int]) -> str | None:
        if not os.path.exists(os.path.join(root, "cgroup.procs")):
            return None
        path = os.path.join(root, name)
        try:
            os.mkdir(path, 0o755)
        except OSError:
            return None
        try:
            for key, value in values.items():
                if os.path.exists(os.path.join(path, key)):
                    with open(os.path.join(path, key), "w") as fh:
                        fh.write(str(value))
        except OSError:
            os.rmdir(path)
            return None
        self.dirs.append(path)
        return path

    def join(self) -> None:
        """Called in the forked child before exec: only os-level calls (no locks)."""
        for procs in self.procs_files:
            try:
                fd = os.open(procs, os.O_WRONLY)
                try:
                    os.write(fd, b"0")
                finally:
                    os.close(fd)
            except OSError:
                pass

    def oom_kills(self) -> int:
        """How many processes the cgroup's OOM killer has ended (the cgroup is the run's own:
        any at all means the run went past its memory limit)."""
        if not self.oom_file:
            return 0
        try:
            with open(self.oom_file) as fh:
                return kernel.oom_kills(fh.read())
        except OSError:
            return 0

    def kill(self) -> None:
        """SIGKILL every process in the cgroups until none is left."""
        for _ in range(500):
            found = False
            for procs in self.procs_files:
                try:
                    with open(procs) as fh:
                        members = [int(line) for line in fh if line.strip()]
                except (OSError, ValueError):
                    continue
                for pid in members:
                    found = True
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
            if not found:
                return
            time.sleep(0.01)

    def remove(self, attempts: int = 100) -> bool:
        """Remove the cgroups; False if one is still busy (try again later)."""
        left = []
        for path in self.dirs:
            for attempt in range(attempts):
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if attempt == attempts - 1:
                        left.append(path)
                    else:
                        time.sleep(0.02)  # the last processes are still being torn down
        self.dirs = left
        self.procs_files = [os.path.join(d, "cgroup.procs") for d in self.dirs]
        return not left


def _v2_controllers() -> set[str]:
    try:
        with open("/sys/fs/cgroup/cgroup.subtree_control") as fh:
            return set(fh.read().split())
    except OSError:
        return set()
