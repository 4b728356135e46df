"""One run, from the parent's side: start the launcher (under `unshare` in the namespace modes),
drain its output, and end the whole tree at the wall clock or on cancel, whatever the command
did to its launcher or to its process group.

The launcher enforces the wall clock and the tree's limits itself; the parent is the backstop:
`wall_seconds + GRACE_S` after the start (or when `cancelled()` says so) it kills the run's
process group, then the whole tree by the handle the mode has on it (the PID namespace, whose
processes all die with its PID 1; the run's uid; its cgroup; in `plain`, every descendant it saw)
and waits until the namespace is empty. The output pump stops then, whoever still holds the
pipe open.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from agents.sandbox.cgroups import Cgroups
from agents.sandbox.launcher import kernel
from agents.sandbox.model import Limit, Mode, SandboxError, SandboxLimits

# Directories covered with an empty read-only tmpfs inside the mount namespace.
HIDDEN_DIRS = ("/root", "/home", "/tmp", "/var/tmp", "/run", "/mnt", "/media", "/srv")
TMP_DIR = ".sandbox-tmp"
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"
GRACE_S = 5.0  # past the wall clock, for the launcher to kill the tree and copy the workspace out
POLL_S = 0.1
LAUNCHER = os.path.dirname(os.path.abspath(kernel.__file__))  # run as a directory

_NAMESPACES = ["--net", "--pid", "--ipc", "--uts", "--fork", "--kill-child"]
UNSHARE_FLAGS: dict[Mode, list[str]] = {
    "root": ["--mount", *_NAMESPACES],
    "userns": ["--user", "--map-root-user", "--mount", *_NAMESPACES],
    "netns": ["--user", "--map-root-user", *_NAMESPACES],
}


def unshare_binary() -> str | None:
    return shutil.which("unshare") or shutil.which("unshare", path="/usr/bin:/bin:/usr/sbin:/sbin")


def interpreter_dirs() -> list[str]:
    exe = sys.executable
    dirs = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix,
            os.path.dirname(os.path.abspath(exe)), os.path.dirname(os.path.realpath(exe))}
    return sorted(d for d in dirs if d)


def _home() -> list[str]:
    try:
        return [str(Path.home())]
    except (RuntimeError, KeyError):
        return []


def sandbox_env(workspace: Path) -> dict[str, str]:
    bin_dir = os.path.dirname(os.path.abspath(sys.executable))
    return {
        "PATH": f"{bin_dir}:{SYSTEM_PATH}",
        "HOME": str(workspace),
        "TMPDIR": str(workspace / TMP_DIR),
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "USER": "sandbox",
        "LOGNAME": "sandbox",
    }


def count_tasks(uid: int) -> int:
    """Threads (which RLIMIT_NPROC counts) of processes whose real uid is `uid`."""
    total = 0
    for pid in kernel.pids():
        if kernel.task_uid(pid) == uid:
            with contextlib.suppress(OSError):
                total += len(os.listdir(f"/proc/{pid}/task"))
    return total


def kill_uid(uid: int) -> None:
    """SIGKILL every process whose real uid is `uid` until none is left."""
    for _ in range(200):
        found = False
        for pid in kernel.pids():
            if kernel.task_uid(pid) == uid:
                found = True
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(int(pid), signal.SIGKILL)
        if not found:
            return
        time.sleep(0.01)


def _start_time(pid: int) -> bytes | None:
    fields = kernel.stat_fields(pid)
    return fields[19] if fields is not None and len(fields) > 19 else None


def _ended(pid: int, started: bytes | None) -> bool:
    """The process is gone or a zombie (a PID 1 that is a zombie has emptied its namespace)."""
    fields = kernel.stat_fields(pid)
    return fields is None or fields[0] in (b"Z", b"X") or fields[19] != started


class _Seen:
    """`plain` mode: every descendant of the launcher seen while it ran (pid, start time), and
    at the end every process of this uid that still holds the run's output pipe, so that those
    which left the launcher (and their own descendants) are killed too."""

    def __init__(self, root: int, pipe_fd: int) -> None:
        self.root = root
        self.pipe = f"pipe:[{os.fstat(pipe_fd).st_ino}]"
        self.seen: dict[int, bytes | None] = {}

    def scan(self) -> None:
        for pid in kernel.descendants(self.root):
            self.seen.setdefault(pid, _start_time(pid))

    def scan_pipe(self) -> None:
        me, uid = os.getpid(), os.getuid()
        for pid in kernel.pids():
            if int(pid) == me or kernel.task_uid(pid) != uid:
                continue
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for fd in fds:
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == self.pipe:
                        self.seen.setdefault(int(pid), _start_time(int(pid)))
                        break

    def kill(self) -> None:
        for _ in range(200):
            alive = [p for p, t in self.seen.items() if not _ended(p, t)]
            if not alive:
                return
            for pid in alive:
                for below in kernel.descendants(pid):
                    self.seen.setdefault(below, _start_time(below))
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)


class _Output:
    """Reads a pipe in a thread, keeps the first `limit` bytes and drains the rest, until the
    pipe ends or `finish` stops it."""

    def __init__(self, fd: int, limit: int) -> None:
        self.fd, self.limit = fd, limit
        os.set_blocking(fd, False)
        self.kept = bytearray()
        self.dropped = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._pump, name="sandbox-output", daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self.fd, selectors.EVENT_READ)
            while not self.stop.is_set():
                if not sel.select(timeout=0.05):
                    continue
                try:
                    chunk = os.read(self.fd, 65536)
                except BlockingIOError:
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                room = self.limit - len(self.kept)
                if room > 0:
                    self.kept += chunk[:room]
                self.dropped += max(0, len(chunk) - max(room, 0))

    def finish(self, grace_s: float) -> None:
        """Drain for at most `grace_s` more, then stop whether or not the pipe has ended."""
        self.thread.join(grace_s)
        self.stop.set()
        self.thread.join()


class _Status:
    """The launcher's reports: `pid N` when it starts, `end {json}` when the run ends."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        self.buffer = b""
        self.pid: int | None = None
        self.pid_started: bytes | None = None
        self.end: dict[str, object] | None = None

    def read(self) -> None:
        while True:
            try:
                chunk = os.read(self.fd, 4096)
            except BlockingIOError:
                break
            if not chunk:
                break
            self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            word, _, rest = line.decode(errors="replace").partition(" ")
            if word == "pid" and rest.isdigit():
                self.pid = int(rest)
                self.pid_started = _start_time(self.pid)
            elif word == "end":
                with contextlib.suppress(ValueError):
                    self.end = json.loads(rest)


@dataclass
class Run:
    exit_code: int | None
    output: bytes
    truncated: bool
    timed_out: bool
    duration_s: float
    launcher_error: str | None
    limit: Limit | None = None
    cancelled: bool = False


def execute(mode: Mode, workspace: Path, command: str, limits: SandboxLimits, uid: int, gid: int,
            cgroups: Cgroups | None, cancelled: Callable[[], bool] | None = None) -> Run:
    root = os.geteuid() == 0
    own_uid = mode == "root" or (mode == "plain" and root)
    lim = asdict(limits)
    lim["nproc"] = limits.processes
    if not own_uid and mode != "userns":
        # RLIMIT_NPROC counts every process of the caller's uid: allow `processes` more.
        lim["nproc"] = count_tasks(os.getuid()) + limits.processes
    status_r, status_w = os.pipe()
    cfg = {
        "status_fd": status_w,
        "workspace": str(workspace),
        "tmp_dir": TMP_DIR,
        "command": command,
        "limits": lim,
        "mounts": mode in ("root", "userns"),
        "pid_namespace": mode != "plain",
        "net_namespace": mode != "plain",
        "hide": [*HIDDEN_DIRS, tempfile.gettempdir(), *_home()],
        "expose": interpreter_dirs(),
        "shm_bytes": min(limits.file_bytes, 64 * 1024 * 1024),
        "drop": "userns" if mode == "userns" else "uid" if own_uid else "none",
        "uid": uid if own_uid else os.getuid(),
        "gid": gid if own_uid else os.getgid(),
        "cgroup_oom": cgroups.oom_file if cgroups is not None else None,
    }
    argv = [sys.executable, "-I", "-S", "-B", LAUNCHER, json.dumps(cfg)]
    if mode != "plain":
        unshare = unshare_binary()
        if unshare is None:
            raise SandboxError("unshare (util-linux) is not available")
        argv = [unshare, *UNSHARE_FLAGS[mode], *argv]

    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            cwd=workspace, env=sandbox_env(workspace), start_new_session=True, close_fds=True,
            pass_fds=(status_w,), preexec_fn=cgroups.join if cgroups is not None else None,
        )
    except BaseException:
        os.close(status_r)
        raise
    finally:
        os.close(status_w)
    assert proc.stdout is not None
    out = _Output(proc.stdout.fileno(), limits.output_bytes)
    status = _Status(status_r)
    seen = _Seen(proc.pid, proc.stdout.fileno()) if mode == "plain" else None
    deadline = started + limits.wall_seconds + GRACE_S
    backstop = stopped = False
    try:
        while True:
            try:
                proc.wait(timeout=POLL_S)
                break
            except subprocess.TimeoutExpired:
                pass
            status.read()
            if seen is not None:
                seen.scan()
            if cancelled is not None and cancelled():
                stopped = True
                break
            if time.monotonic() > deadline:
                backstop = True
                break
    finally:
        _kill_tree(proc, status, uid if own_uid else None, cgroups, seen)
        duration = time.monotonic() - started
        out.finish(grace_s=1.0)
        proc.stdout.close()
        status.read()
        os.close(status_r)
    # Memory no process holds (files in the workspace's tmpfs) is charged to the cgroup, whose
    # OOM killer may then take the launcher itself: the run still ended at its memory limit.
    oom = cgroups is not None and cgroups.oom_kills() > 0
    return _result(status, proc, out, duration, backstop, stopped, oom)


def _kill_tree(proc: subprocess.Popen[bytes], status: _Status, uid: int | None,
               cgroups: Cgroups | None, seen: _Seen | None) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        # unshare and the launcher; `--kill-child` takes the PID namespace down with them.
        os.killpg(proc.pid, signal.SIGKILL)
    if seen is not None:
        seen.scan()
        seen.scan_pipe()
        seen.kill()
    if uid is not None:
        kill_uid(uid)
    if cgroups is not None:
        cgroups.kill()
    proc.wait()
    status.read()
    if status.pid is not None:
        # The launcher's end (as PID 1: once every process of its namespace has ended).
        deadline = time.monotonic() + 10.0
        while not _ended(status.pid, status.pid_started) and time.monotonic() < deadline:
            time.sleep(0.005)


def _result(status: _Status, proc: subprocess.Popen[bytes], out: _Output, duration: float,
            backstop: bool, stopped: bool, oom: bool = False) -> Run:
    end = status.end or {}
    word = str(end.get("end", ""))
    code = end.get("code")
    run = Run(exit_code=None, output=bytes(out.kept), truncated=out.dropped > 0,
              timed_out=False, duration_s=duration, launcher_error=None)
    if word == "error":
        run.launcher_error = str(end.get("message") or "the launcher failed")
    elif stopped:
        run.cancelled = True
    elif word == "exit" and isinstance(code, int):
        run.exit_code = code
    elif word == "signal" and isinstance(code, int):
        run.exit_code = -code
    elif word in ("cpu", "memory") or oom:
        run.exit_code = -signal.SIGKILL
        run.limit = "cpu" if word == "cpu" else "memory"
    elif word == "timeout" or backstop:
        run.timed_out = True
    elif status.pid is None:
        # The launcher never started (unshare refused, the interpreter could not run).
        detail = run.output.decode(errors="replace").strip()[-300:]
        run.launcher_error = f"exit {proc.returncode}: {detail}"
    else:
        run.exit_code = proc.returncode  # the command killed its launcher (plain mode)
    return run
