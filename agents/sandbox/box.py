"""`Sandbox`: a throwaway workspace, its files, and the runs of commands in it."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from types import TracebackType

from agents.sandbox.cgroups import Cgroups
from agents.sandbox.detect import describe, isolation, new_uid, probe
from agents.sandbox.execute import TMP_DIR, execute, kill_uid
from agents.sandbox.model import (
    Mode,
    SandboxError,
    SandboxLimits,
    SandboxResult,
    SandboxUnavailable,
    as_mode,
    refusal,
)
from core import tracing
from core.settings import get_settings

# Not returned by `files()`: caches, VCS metadata and the sandbox's own temp directory.
_MAX_DEPTH = 100
_SKIP_DIRS = frozenset({
    "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis", ".tox",
    ".nox", ".cache", ".git", ".hg", ".svn", TMP_DIR,
})


class _Slots:
    """At most `sandbox_max_concurrent` runs at once in this process; more wait their turn."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.running = 0
        self.waiting = 0

    @staticmethod
    def limit() -> int:
        return get_settings().sandbox_max_concurrent or os.cpu_count() or 1

    def acquire(self, cancelled: Callable[[], bool] | None) -> bool:
        """Wait for a slot; False if `cancelled()` said so first."""
        with self._cond:
            self.waiting += 1
            try:
                while self.running >= self.limit():
                    if cancelled is not None and cancelled():
                        return False
                    self._cond.wait(0.2)
                self.running += 1
                return True
            finally:
                self.waiting -= 1

    def release(self) -> None:
        with self._cond:
            self.running -= 1
            self._cond.notify()


slots = _Slots()


def host_refusal(weakest: Mode | None = None) -> str | None:
    """Why this machine must not run untrusted commands: its strongest mode is weaker than
    `weakest` (by default the `AGENTQ_SANDBOX_WEAKEST_MODE` setting). None: it may."""
    return refusal(isolation(), weakest or as_mode(get_settings().sandbox_weakest_mode))


class Sandbox:
    """A temporary workspace; `with Sandbox(files, limits) as box: result = box.run("pytest -q");
    files = box.files()`.

    `mode` is the strongest this machine allows unless given; a mode weaker than `weakest`
    (by default the `AGENTQ_SANDBOX_WEAKEST_MODE` setting) raises SandboxUnavailable."""

    def __init__(self, files: Mapping[str, str], limits: SandboxLimits = SandboxLimits(), *,
                 mode: Mode | None = None, weakest: Mode | None = None) -> None:
        if mode is None:
            self.isolation = isolation()
        else:
            problem = probe(mode)
            if problem is not None:
                raise SandboxError(f"sandbox mode {mode!r} does not work here: {problem}")
            self.isolation = describe(mode)
        refused = refusal(self.isolation, weakest or as_mode(get_settings().sandbox_weakest_mode))
        if refused is not None:
            raise SandboxUnavailable(refused)
        self.limits = limits
        self._uid = self._gid = new_uid()
        self._own_uid = self.isolation.separate_user
        self._path = Path(tempfile.mkdtemp(prefix="agentq-sandbox-")).resolve()
        self._closed = False
        self._busy_cgroups: list[Cgroups] = []
        try:
            os.chmod(self._path, 0o700)
            self._chown(self._path)
            self._ensure_tmp()
            self.write(files)
        except BaseException:
            self.close()
            raise

    @property
    def path(self) -> Path:
        return self._path

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Kill leftovers and remove the workspace (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._own_uid:
            kill_uid(self._uid)
        for cgroups in self._busy_cgroups:
            cgroups.remove()
        _rmtree(self._path)

    # -- files ----------------------------------------------------------------------------

    def _chown(self, path: Path | str, fd: int | None = None) -> None:
        if not self._own_uid:
            return
        if fd is not None:
            os.fchown(fd, self._uid, self._gid)
        else:
            os.chown(path, self._uid, self._gid, follow_symlinks=False)

    def _ensure_tmp(self) -> None:
        tmp = self._path / TMP_DIR
        if tmp.is_symlink() or (tmp.exists() and not tmp.is_dir()):
            tmp.unlink()
        if not tmp.exists():
            tmp.mkdir(mode=0o700)
            self._chown(tmp)

    def _target(self, name: str) -> Path:
        """The real path `name` writes to, after validation."""
        if not isinstance(name, str) or not name or "\0" in name:
            raise ValueError(f"invalid path {name!r}: give a non-empty relative path")
        pure = PurePosixPath(name)
        if pure.is_absolute():
            raise ValueError(f"invalid path {name!r}: absolute paths are not allowed; "
                             "give a path relative to the workspace")
        if ".." in pure.parts:
            raise ValueError(f"invalid path {name!r}: '..' is not allowed")
        parts = [p for p in pure.parts if p != "."]
        if not parts:
            raise ValueError(f"invalid path {name!r}: it names the workspace itself")
        base = str(self._path)
        target = os.path.realpath(os.path.join(base, *parts))
        if not _under(target, base) or target == base:
            raise ValueError(f"invalid path {name!r}: it leads outside the workspace "
                             f"through a symlink (to {target!r})")
        if os.path.isdir(target):
            raise ValueError(f"invalid path {name!r}: it is a directory")
        ancestor = os.path.dirname(target)
        while not os.path.lexists(ancestor):
            ancestor = os.path.dirname(ancestor)
        if not os.path.isdir(ancestor):
            raise ValueError(f"invalid path {name!r}: {os.path.relpath(ancestor, base)!r} is "
                             "a file, not a directory")
        return Path(target)

    def write(self, files: Mapping[str, str]) -> None:
        """Add or replace files (paths relative to the workspace). All are validated first;
        an invalid one raises ValueError and nothing is written."""
        if self._closed:
            raise SandboxError("the sandbox is closed")
        targets = [(self._target(name), content) for name, content in files.items()]
        for target, content in targets:
            missing = []
            parent = target.parent
            while not parent.exists():
                missing.append(parent)
                parent = parent.parent
            for directory in reversed(missing):
                directory.mkdir(mode=0o755)
                self._chown(directory)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
            try:
                view = memoryview(content.encode("utf-8"))
                while view:
                    view = view[os.write(fd, view):]
                self._chown(target, fd)
            finally:
                os.close(fd)

    def files(self, max_bytes: int = 1_000_000) -> dict[str, str]:
        """The workspace's text files now, {relative path: content}, in path order. Skipped:
        caches and VCS directories, symlinks, non-regular and hard-linked files, binary or
        non-UTF-8 files, directories nested more than 100 deep, and a file that would take the
        total past `max_bytes`."""
        result: dict[str, str] = {}
        total = 0
        base = str(self._path)
        for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
            deep = dirpath.count(os.sep) - base.count(os.sep) >= _MAX_DEPTH
            dirnames[:] = [] if deep else sorted(d for d in dirnames if d not in _SKIP_DIRS)
            for filename in sorted(filenames):
                full = os.path.join(dirpath, filename)
                text = _read_text(full, max_bytes - total)
                if text is None:
                    continue
                result[os.path.relpath(full, base)] = text
                total += len(text.encode("utf-8"))
        return dict(sorted(result.items()))

    # -- running --------------------------------------------------------------------------

    def run(self, command: str, *, cancelled: Callable[[], bool] | None = None
            ) -> SandboxResult:
        """Run `command` with /bin/sh -c in the workspace; see the package docstring. Waits
        for a free slot first (`sandbox_max_concurrent`). `cancelled` is asked every 0.1 s:
        when it says True the whole run is killed and the result says `cancelled`."""
        if self._closed:
            raise SandboxError("the sandbox is closed")
        with tracing.span("sandbox run", {"agentq.sandbox.mode": self.isolation.mode}) as span:
            result = self._run_in_slot(command, cancelled)
            if span is not None:
                span.set_attributes({
                    "agentq.sandbox.exit_code": -1 if result.exit_code is None
                    else result.exit_code,
                    "agentq.sandbox.timed_out": result.timed_out,
                    "agentq.sandbox.cancelled": result.cancelled,
                    "agentq.sandbox.limit": result.limit or "",
                    "agentq.sandbox.duration_s": result.duration_s})
            return result

    def _run_in_slot(self, command: str, cancelled: Callable[[], bool] | None
                     ) -> SandboxResult:
        if not slots.acquire(cancelled):
            return SandboxResult(exit_code=None, output="", timed_out=False,
                                 output_truncated=False, duration_s=0.0,
                                 network_isolated=self.isolation.network, cancelled=True)
        try:
            return self._run(command, cancelled)
        finally:
            slots.release()

    def _run(self, command: str, cancelled: Callable[[], bool] | None) -> SandboxResult:
        self._ensure_tmp()
        cgroups = None
        if self._own_uid:
            cgroups = Cgroups(f"agentq-sandbox-{self._uid}-{os.urandom(4).hex()}",
                              self.limits.memory_bytes, self.limits.processes + 4)
        try:
            run = execute(self.isolation.mode, self._path, command, self.limits, self._uid,
                          self._gid, cgroups, cancelled)
        finally:
            if cgroups is not None and not cgroups.remove():
                self._busy_cgroups.append(cgroups)
        if run.launcher_error:
            raise SandboxError(f"could not set up the sandbox: {run.launcher_error}")
        return SandboxResult(
            exit_code=run.exit_code,
            output=run.output.decode("utf-8", errors="replace"),
            timed_out=run.timed_out,
            output_truncated=run.truncated,
            duration_s=run.duration_s,
            network_isolated=self.isolation.network,
            limit=run.limit,
            cancelled=run.cancelled,
        )


def _under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _read_text(path: str, budget: int) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1 or st.st_size > budget:
            return None
        data = os.read(fd, st.st_size + 1)
        if len(data) > budget or b"\0" in data:
            return None
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    finally:
        os.close(fd)


def _rmtree(path: Path) -> None:
    try:
        shutil.rmtree(path)
        return
    except FileNotFoundError:
        return
    except (OSError, RecursionError):
        pass
    # Without root, directories the command made unwritable or unreadable block the removal;
    # directories nested deeper than Python recurses need rm(1).
    with contextlib.suppress(OSError):
        os.chmod(path, 0o700)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(["chmod", "-R", "u+rwx", "--", str(path)], capture_output=True,
                       timeout=300, check=False)
        subprocess.run(["rm", "-rf", "--one-file-system", "--", str(path)],
                       capture_output=True, timeout=300, check=False)
