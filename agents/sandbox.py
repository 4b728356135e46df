"""A throwaway workspace in which a coding job runs commands written by a model (untrusted code).

`with Sandbox(files, limits) as box: result = box.run("pytest -q"); files = box.files()`

Every `run` starts `/bin/sh -c COMMAND` in the workspace (a fresh temporary directory, mode 0700)
under a small launcher (this file, run as a script with `python -I -S`, stdlib only), with:

* an environment of its own: nothing of the parent's is passed on. The command sees PATH (the
  bin directory of the running Python, so that `python` and `pytest` are this interpreter's,
  then /usr/local/bin:/usr/bin:/bin), HOME = the workspace, TMPDIR inside the workspace,
  LANG=C.UTF-8, PYTHONDONTWRITEBYTECODE=1 and USER/LOGNAME=sandbox (so `getpass` works);
* its own session and process group, stdin from /dev/null, stdout and stderr interleaved through
  one pipe that a thread drains: the first `output_bytes` are kept, the rest is read and dropped
  (`output_truncated`), so a chatty command neither blocks nor fills memory;
* rlimits: RLIMIT_CPU (SIGXCPU, then SIGKILL a second later), RLIMIT_AS (`memory_bytes`),
  RLIMIT_FSIZE (a bigger write gets SIGXFSZ), RLIMIT_NPROC, RLIMIT_CORE=0; no_new_privs;
* a wall clock: the launcher kills everything at `wall_seconds` (`timed_out`, exit_code None);
  the parent SIGKILLs the process group 5 s later if the launcher has not ended;
* nothing left running afterwards: see the modes for how.

`exit_code` is the shell's: a command killed by signal N gives 128+N when the shell forked it
(dash does so even for a lone command), -N when it had replaced the shell (`exec cmd`).

How much more holds depends on what the machine allows. `isolation()` says what was chosen: it is
found once per process by starting `true` each way, strongest first.

``root`` (the process is root and util-linux `unshare` works; the production case). `unshare
--net --pid --mount --ipc --uts --fork --kill-child` starts the launcher as PID 1 of a new PID
namespace: when it exits or is killed, the kernel kills every process of the namespace, also
those that left the process group. In the new mount namespace the launcher
  - covers /root, /home, /tmp, /var/tmp, /run, /mnt, /media, /srv, the temp directory and the
    caller's home with empty read-only tmpfs, and mounts back read-only only the running
    Python's directories (prefix, base prefix, directory of the real executable): other users'
    files, other sandboxes' workspaces and the sockets under /run and /tmp (the local Postgres
    socket, for one) are not there;
  - remounts every other mount read-only and nosuid, except the workspace (bound back
    read-write, nosuid, nodev) and a private /dev/shm of at most 64 MiB;
  - mounts a /proc of the new PID namespace (host processes, the parent's included, are not
    visible) and brings up the namespace's own loopback: the command may listen on and talk to
    127.0.0.1 inside, while the host's 127.0.0.1 services (Redis, Postgres) and every other
    network are unreachable.
  The command then runs as a uid/gid of its own: random in a high range (no account), one per
  Sandbox, no supplementary groups, no capabilities. That makes RLIMIT_NPROC bind (root is
  exempt from it) and count only this sandbox's processes, keeps root-only files unreadable, and
  lets the parent kill every process of that uid when the run ends. Where the cgroup v1 (or v2)
  memory and pids controllers are writable, each run also gets a cgroup that caps the memory of
  all its processes together at `memory_bytes` (the OOM killer acts inside it) and their number.
  About the interpreter: the running Python may live where that uid cannot read (e.g. a pyenv
  install in root's home, mode 0700: a venv's `python` then fails with "Permission denied" for
  any other uid). Running the command as root is out of the question and changing the host's
  permissions is not the sandbox's business, so the launcher (root, inside the mount namespace)
  exposes exactly the interpreter's directories read-only, as described above.

``userns`` (not root; unprivileged user namespaces allowed). The same namespaces and mounts, made
inside a new user namespace where the caller is mapped to root (`unshare --user
--map-root-user ...`). The command then enters a nested user namespace where it is the caller's
uid without capabilities over those mounts, so it cannot undo them. There is no separate uid
(files outside the workspace are read-only, the caller's home is hidden except the
interpreter's directories) and no cgroup; RLIMIT_NPROC counts the namespace's processes only
(per-user-namespace accounting, kernels >= 5.14).

``netns`` (user namespaces allowed, mount or PID namespaces not: `unshare --user
--map-root-user --net`). Only the network is isolated. The command can read and write whatever
the caller can, and see and signal the caller's processes (/proc/PID/environ of the caller's
processes is readable).

``plain`` (no namespaces, e.g. a container whose seccomp profile forbids them, or Ubuntu's
AppArmor restriction on user namespaces). Environment, rlimits, wall clock and cleanup only;
`network_isolated` is False: the command reaches the network and the host's localhost
services, and reads and writes everything the caller can. As RLIMIT_NPROC counts all of the
caller's processes, it is set to the caller's current count plus `processes`. A root caller
without `unshare` still runs the command as a uid of its own (then the interpreter must be
readable by that uid).

In ``netns`` and ``plain`` the launcher is a child subreaper: processes that leave the group or
the session (double fork, setsid) are re-parented to it and killed when the command ends.
A command running as the caller's uid could kill the launcher first and so escape that cleanup.

Not isolated in any mode: the disk space of the workspace (only each file's size is capped),
CPU share (each process has a CPU-seconds limit; nothing caps the whole run but the wall clock),
the kernel itself (namespaces are not a VM), and, without a cgroup, the memory of several
processes together. World-readable files of the host (/etc, /usr, the project's sources) remain
readable (read-only).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import resource
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any

__all__ = [
    "Isolation",
    "Sandbox",
    "SandboxError",
    "SandboxLimits",
    "SandboxResult",
    "isolation",
]


@dataclass(frozen=True)
class SandboxLimits:
    cpu_seconds: int = 30
    memory_bytes: int = 1024 * 1024 * 1024
    file_bytes: int = 16 * 1024 * 1024
    processes: int = 64
    wall_seconds: float = 60.0
    output_bytes: int = 64 * 1024  # stdout+stderr kept (the rest is dropped, flagged)


@dataclass(frozen=True)
class SandboxResult:
    exit_code: int | None  # None when killed on timeout; -N when killed by signal N
    output: str  # stdout and stderr interleaved, truncated to output_bytes
    timed_out: bool
    output_truncated: bool
    duration_s: float
    network_isolated: bool


@dataclass(frozen=True)
class Isolation:
    """What this machine allows; see the module docstring for each mode."""

    mode: str  # "root", "userns", "netns" or "plain"
    network: bool  # the command has a network namespace of its own
    filesystem: bool  # host read-only, homes, /tmp and /run hidden, workspace the only rw place
    processes: bool  # PID namespace: host processes invisible, all killed with the launcher
    separate_user: bool  # the command runs as a uid of its own
    reason: str = ""  # why stronger modes were not used


class SandboxError(RuntimeError):
    """The sandbox itself could not be set up (not a failure of the command)."""


# Directories covered with an empty read-only tmpfs inside the mount namespace.
_HIDDEN_DIRS = ("/root", "/home", "/tmp", "/var/tmp", "/run", "/mnt", "/media", "/srv")
# Not returned by `files()`: caches, VCS metadata and the sandbox's own temp directory.
_SKIP_DIRS = frozenset({
    "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis", ".tox",
    ".nox", ".cache", ".git", ".hg", ".svn", ".sandbox-tmp",
})
_TMP_DIR = ".sandbox-tmp"
_SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"
# Sandboxed uids/gids (root mode): random, one per Sandbox, far above any real account.
_UID_BASE = 1_500_000_000
_UID_SPAN = 100_000_000
_LAUNCH_FLAG = "--sandbox-launch"
_LAUNCHER_FAILED = 125

# mount(2), unshare(2) and prctl(2) constants (linux/mount.h, sched.h, prctl.h).
_MS_RDONLY = 0x1
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_NOEXEC = 0x8
_MS_REMOUNT = 0x20
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_PRIVATE = 0x40000
_CLONE_NEWUSER = 0x10000000
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_CHILD_SUBREAPER = 36
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1

_UNSHARE_FLAGS = {
    "root": ["--net", "--pid", "--mount", "--ipc", "--uts", "--fork", "--kill-child"],
    "userns": ["--user", "--map-root-user", "--net", "--pid", "--mount", "--ipc", "--uts",
               "--fork", "--kill-child"],
    "netns": ["--user", "--map-root-user", "--net", "--fork", "--kill-child"],
}


# --------------------------------------------------------------------------------------------
# Helpers shared by the parent and the launcher


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _no_new_privs() -> None:
    _check(_libc().prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")


def _apply_limits(limits: Mapping[str, int]) -> None:
    """Set the rlimits of this process (never above a hard limit it already has)."""

    def cap(res: int, soft: int, hard: int) -> None:
        _, current_hard = resource.getrlimit(res)
        if current_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        resource.setrlimit(res, (soft, hard))

    cpu = max(1, int(limits["cpu_seconds"]))
    cap(resource.RLIMIT_CPU, cpu, cpu + 1)  # SIGXCPU at the soft limit, SIGKILL at the hard one
    cap(resource.RLIMIT_AS, limits["memory_bytes"], limits["memory_bytes"])
    cap(resource.RLIMIT_FSIZE, limits["file_bytes"], limits["file_bytes"])
    cap(resource.RLIMIT_NPROC, limits["nproc"], limits["nproc"])
    cap(resource.RLIMIT_CORE, 0, 0)


def _drop_to(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def _task_uid(pid: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _pids() -> Iterator[str]:
    try:
        names = os.listdir("/proc")
    except OSError:
        return
    yield from (name for name in names if name.isdigit())


def _count_tasks(uid: int) -> int:
    """Threads (which RLIMIT_NPROC counts) of processes whose real uid is `uid`."""
    total = 0
    for pid in _pids():
        if _task_uid(pid) == uid:
            try:
                total += len(os.listdir(f"/proc/{pid}/task"))
            except OSError:
                pass
    return total


# --------------------------------------------------------------------------------------------
# The launcher: run as `python -I -S sandbox.py --sandbox-launch CONFIG` under `unshare`; it is
# PID 1 of the new PID namespace (except in "netns" mode) and imports nothing outside stdlib.


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    def enc(value: str | None) -> bytes | None:
        return None if value is None else value.encode()

    ret = _libc().mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags),
                        enc(data))
    _check(ret, f"mount {target}")


def _under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _unescape_mountinfo(field: str) -> str:
    # Spaces, tabs, newlines and backslashes are written as \ooo.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit() and i + 3 < len(field):
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _setup_mounts(cfg: Mapping[str, Any]) -> None:
    workspace: str = cfg["workspace"]
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)

    hidden: list[str] = []
    for raw in sorted({os.path.realpath(p) for p in cfg["hide"]}, key=len):
        if os.path.isdir(raw) and raw != "/" and not any(_under(raw, h) for h in hidden):
            hidden.append(raw)
    # Directories to bring back (the workspace read-write, the interpreter's read-only). Opened
    # before anything is covered, mounted back from these descriptors.
    binds: list[tuple[str, int]] = [(workspace, os.open(workspace, os.O_PATH))]
    for raw in sorted({os.path.realpath(p) for p in cfg["expose"]}, key=len):
        if (os.path.isdir(raw) and any(_under(raw, h) for h in hidden)
                and not any(_under(raw, b) for b, _ in binds[1:])):
            binds.append((raw, os.open(raw, os.O_PATH)))

    for path in hidden:
        _mount("tmpfs", path, "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "mode=755,size=1m")
    for path, fd in binds:
        os.makedirs(path, mode=0o755, exist_ok=True)  # the skeleton, inside a covering tmpfs
        _mount(f"/proc/self/fd/{fd}", path, None, _MS_BIND | _MS_REC)
        os.close(fd)
    shm_ok = os.path.isdir("/dev/shm") and not os.path.islink("/dev/shm")
    if shm_ok:
        _mount("tmpfs", "/dev/shm", "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
               f"mode=1777,size={int(cfg['shm_bytes'])}")

    # Everything else read-only (and nosuid). Mount flags that a less privileged namespace
    # inherited locked (nodev, noexec) must be given again.
    extra_flags: dict[str, int] = {}  # mount point -> flags (the last, topmost, mount wins)
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            opts = fields[5].split(",")
            extra_flags[_unescape_mountinfo(fields[4])] = (
                (_MS_NODEV if "nodev" in opts else 0) | (_MS_NOEXEC if "noexec" in opts else 0))
    for point, extra in extra_flags.items():
        if point == "/dev/shm" and shm_ok:
            continue
        flags = _MS_REMOUNT | _MS_BIND | _MS_NOSUID | extra
        if point == workspace:
            flags |= _MS_NODEV  # stays writable, but no set-uid programs or device files
        else:
            flags |= _MS_RDONLY
        try:
            _mount(None, point, None, flags)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.EACCES, errno.ENOTDIR):
                continue  # under a covered directory: not reachable anyway
            if exc.errno in (errno.EPERM, errno.EINVAL) and (
                    _under(point, "/proc") or _under(point, "/sys")):
                continue  # kernel file systems; permissions guard them
            raise
    _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)


def _loopback_up() -> None:
    import fcntl
    import socket
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        req = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock, _SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | _IFF_UP))


def _enter_nested_userns(uid: int, gid: int) -> None:
    """Leave the launcher's user namespace (which owns the mounts) for one where this process
    is `uid`/`gid` with no capabilities."""
    _check(_libc().unshare(_CLONE_NEWUSER), "unshare(CLONE_NEWUSER)")
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} 0 1"),
                       ("gid_map", f"{gid} 0 1")):
        with open(f"/proc/self/{name}", "w") as fh:
            fh.write(text)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def _exec_command(cfg: Mapping[str, Any]) -> None:
    # Python ignores these at start-up; the command must get the default behaviour.
    for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGXCPU):
        signal.signal(sig, signal.SIG_DFL)
    _apply_limits(cfg["limits"])
    if cfg["drop"] == "uid":
        _drop_to(cfg["uid"], cfg["gid"])
    elif cfg["drop"] == "userns":
        _enter_nested_userns(cfg["uid"], cfg["gid"])
    _no_new_privs()  # set-uid programs (sudo, su) cannot raise it
    os.chdir(cfg["workspace"])
    os.umask(0o022)
    os.execve("/bin/sh", ["/bin/sh", "-c", cfg["command"]], dict(os.environ))


class _WallClock(Exception):
    pass


def _on_wall_clock(signum: int, frame: object) -> None:
    raise _WallClock


def _descendants(ancestor: int) -> list[int]:
    parent_of: dict[int, int] = {}
    for pid in _pids():
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
            parent_of[int(pid)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    found: list[int] = []
    for task in parent_of:
        seen, current = 0, task
        while current in parent_of and seen < 4096:
            current, seen = parent_of[current], seen + 1
            if current == ancestor:
                found.append(task)
                break
    return found


def _kill_descendants() -> None:
    """SIGKILL everything below this process (a child subreaper: orphans come back to it, so
    daemons that left the process group or the session are found too) and reap it."""
    me = os.getpid()
    for _ in range(2000):
        while True:
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        left = _descendants(me)
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.005)


def _launcher_main(config: str) -> None:
    cfg = json.loads(config)
    status_fd = int(cfg["status_fd"])
    os.set_inheritable(status_fd, False)
    pid_namespace = bool(cfg["pid_namespace"])

    def report(text: str) -> None:
        try:
            os.write(status_fd, text.encode()[:4000])
        except OSError:
            pass

    def finish(text: str, code: int) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        if not pid_namespace:
            _kill_descendants()
        report(text)
        # As PID 1 of its namespace, the kernel kills whatever is left when it exits.
        os._exit(code)

    try:
        if not pid_namespace:
            _check(_libc().prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(SUBREAPER)")
        if cfg["mounts"]:
            _setup_mounts(cfg)
        if cfg["net_namespace"]:
            _loopback_up()
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which falls back
        report(f"error {exc}")
        os._exit(_LAUNCHER_FAILED)
    signal.signal(signal.SIGALRM, _on_wall_clock)
    signal.signal(signal.SIGTERM, _on_wall_clock)
    child = os.fork()
    if child == 0:
        try:
            _exec_command(cfg)
        except BaseException as exc:  # noqa: BLE001
            os.write(2, f"sandbox: cannot start the command: {exc}\n".encode())
        os._exit(127)
    status = 0
    try:
        signal.setitimer(signal.ITIMER_REAL, float(cfg["limits"]["wall_seconds"]))
        while True:  # reap everything (orphans come here) until the command itself ends
            try:
                done, status = os.waitpid(-1, 0)
            except ChildProcessError:
                finish("error the command disappeared", _LAUNCHER_FAILED)
            if done == child:
                break
        signal.setitimer(signal.ITIMER_REAL, 0)
    except _WallClock:
        finish("timeout", 124)
    if os.WIFSIGNALED(status):
        finish(f"signal {os.WTERMSIG(status)}", 128 + os.WTERMSIG(status))
    code = os.waitstatus_to_exitcode(status)
    finish(f"exit {code}", code)


# --------------------------------------------------------------------------------------------
# The parent side


def _interpreter_dirs() -> list[str]:
    exe = sys.executable
    dirs = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix,
            os.path.dirname(os.path.abspath(exe)), os.path.dirname(os.path.realpath(exe))}
    return sorted(d for d in dirs if d)


def _home() -> list[str]:
    try:
        return [str(Path.home())]
    except (RuntimeError, KeyError):
        return []


def _sandbox_env(workspace: Path) -> dict[str, str]:
    bin_dir = os.path.dirname(os.path.abspath(sys.executable))
    return {
        "PATH": f"{bin_dir}:{_SYSTEM_PATH}",
        "HOME": str(workspace),
        "TMPDIR": str(workspace / _TMP_DIR),
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "USER": "sandbox",
        "LOGNAME": "sandbox",
    }


class _Cgroups:
    """Per-run memory and pids cgroups (root only, where a controller is writable): caps on
    all the run's processes together."""

    def __init__(self, name: str, memory_bytes: int, processes: int) -> None:
        self.dirs: list[str] = []
        v1 = [
            ("/sys/fs/cgroup/memory", {"memory.limit_in_bytes": memory_bytes}),
            ("/sys/fs/cgroup/pids", {"pids.max": processes}),
        ]
        v2 = ("/sys/fs/cgroup", {"memory.max": memory_bytes, "memory.swap.max": 0,
                                 "pids.max": processes})
        for root, values in v1:
            self._make(root, name, values)
        if not self.dirs and _v2_controllers() >= {"memory", "pids"}:
            self._make(v2[0], name, v2[1])
        self.procs_files = [os.path.join(d, "cgroup.procs") for d in self.dirs]

    def _make(self, root: str, name: str, values: Mapping[str, int]) -> None:
        if not os.path.exists(os.path.join(root, "cgroup.procs")):
            return
        path = os.path.join(root, name)
        try:
            os.mkdir(path, 0o755)
        except OSError:
            return
        try:
            for key, value in values.items():
                if os.path.exists(os.path.join(path, key)):
                    with open(os.path.join(path, key), "w") as fh:
                        fh.write(str(value))
        except OSError:
            os.rmdir(path)
            return
        self.dirs.append(path)

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
        return not left


def _v2_controllers() -> set[str]:
    try:
        with open("/sys/fs/cgroup/cgroup.subtree_control") as fh:
            return set(fh.read().split())
    except OSError:
        return set()


class _Output:
    """Reads a pipe in a thread, keeps the first `limit` bytes and drains the rest."""

    def __init__(self, fd: int, limit: int) -> None:
        self.fd, self.limit = fd, limit
        self.kept = bytearray()
        self.dropped = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._pump, name="sandbox-output", daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self.fd, selectors.EVENT_READ)
            while True:
                if not sel.select(timeout=0.1):
                    if self.stop.is_set():
                        return
                    continue
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:
                    return
                if not chunk:
                    return
                room = self.limit - len(self.kept)
                if room > 0:
                    self.kept += chunk[:room]
                self.dropped += max(0, len(chunk) - max(room, 0))

    def finish(self, grace_s: float) -> None:
        self.thread.join(grace_s)
        self.stop.set()
        self.thread.join()


_log = logging.getLogger(__name__)
_DETECT_LOCK = threading.Lock()
_DETECTED: Isolation | None = None


def _unshare_binary() -> str | None:
    return shutil.which("unshare") or shutil.which("unshare", path="/usr/bin:/bin:/usr/sbin:/sbin")


def _describe(mode: str, reason: str) -> Isolation:
    return Isolation(
        mode=mode,
        network=mode != "plain",
        filesystem=mode in ("root", "userns"),
        processes=mode in ("root", "userns"),
        separate_user=mode == "root" or (mode == "plain" and os.geteuid() == 0),
        reason=reason,
    )


def isolation() -> Isolation:
    """The isolation this machine allows, found on first use (and then remembered)."""
    global _DETECTED
    with _DETECT_LOCK:
        if _DETECTED is None:
            _DETECTED = _detect()
        return _DETECTED


def _detect() -> Isolation:
    reasons: list[str] = []
    if _unshare_binary() is None:
        reasons.append("unshare (util-linux) not found")
        candidates: list[str] = []
    elif os.geteuid() == 0:
        candidates = ["root"]
    else:
        candidates = ["userns", "netns"]
    chosen = "plain"
    for mode in candidates:
        problem = _probe(mode)
        if problem is None:
            chosen = mode
            break
        reasons.append(f"{mode}: {problem}")
    found = _describe(chosen, "; ".join(reasons))
    log = _log.info if found.filesystem else _log.warning
    log("sandbox isolation: %s (network isolated: %s)%s", found.mode, found.network,
        f"; {found.reason}" if found.reason else "")
    return found


def _probe(mode: str) -> str | None:
    """None if `true` runs in `mode` here, else what went wrong."""
    workspace = Path(tempfile.mkdtemp(prefix="agentq-sandbox-probe-"))
    try:
        uid = _UID_BASE + secrets.randbelow(_UID_SPAN)
        if mode == "root":
            os.chown(workspace, uid, uid)
        (workspace / _TMP_DIR).mkdir()
        limits = SandboxLimits(wall_seconds=30.0)
        run = _execute(mode, workspace, "true", limits, uid, uid, None)
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


@dataclass
class _Run:
    exit_code: int | None
    output: bytes
    truncated: bool
    timed_out: bool
    duration_s: float
    launcher_error: str | None


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_uid(uid: int) -> None:
    """SIGKILL every process whose real uid is `uid` until none is left (root mode)."""
    for _ in range(200):
        found = False
        for pid in _pids():
            if _task_uid(pid) == uid:
                found = True
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        if not found:
            return
        time.sleep(0.01)


def _execute(mode: str, workspace: Path, command: str, limits: SandboxLimits, uid: int,
             gid: int, cgroups: _Cgroups | None) -> _Run:
    root = os.geteuid() == 0
    own_uid = mode == "root" or (mode == "plain" and root)
    lim = asdict(limits)
    lim["nproc"] = limits.processes
    if not own_uid and mode != "userns":
        # RLIMIT_NPROC counts every process of the caller's uid: allow `processes` more.
        lim["nproc"] = _count_tasks(os.getuid()) + limits.processes
    status_r, status_w = os.pipe()
    cfg = {
        "status_fd": status_w,
        "workspace": str(workspace),
        "command": command,
        "limits": lim,
        "mounts": mode in ("root", "userns"),
        "pid_namespace": mode in ("root", "userns"),
        "net_namespace": mode != "plain",
        "hide": [*_HIDDEN_DIRS, tempfile.gettempdir(), *_home()],
        "expose": _interpreter_dirs(),
        "shm_bytes": min(limits.file_bytes, 64 * 1024 * 1024),
        "drop": "userns" if mode == "userns" else "uid" if own_uid else "none",
        "uid": uid if own_uid else os.getuid(),
        "gid": gid if own_uid else os.getgid(),
    }
    argv = [sys.executable, "-I", "-S", os.path.abspath(__file__), _LAUNCH_FLAG,
            json.dumps(cfg)]
    if mode != "plain":
        unshare = _unshare_binary()
        if unshare is None:
            raise SandboxError("unshare (util-linux) is no longer available")
        argv = [unshare, *_UNSHARE_FLAGS[mode], *argv]

    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            cwd=workspace, env=_sandbox_env(workspace), start_new_session=True, close_fds=True,
            pass_fds=(status_w,), preexec_fn=cgroups.join if cgroups is not None else None,
        )
    except BaseException:
        os.close(status_r)
        raise
    finally:
        os.close(status_w)
    assert proc.stdout is not None
    out = _Output(proc.stdout.fileno(), limits.output_bytes)
    backstop = False
    try:
        # The launcher enforces the wall clock itself; this is for a launcher that cannot.
        proc.wait(timeout=limits.wall_seconds + 5.0)
    except subprocess.TimeoutExpired:
        backstop = True
    finally:
        # Kills the command's group, unshare and the launcher (hence the whole PID namespace).
        _kill_group(proc.pid)
        if own_uid:
            _kill_uid(uid)
        proc.wait()
        duration = time.monotonic() - started
        out.finish(grace_s=2.0)
        proc.stdout.close()
        try:
            status = os.read(status_r, 4096).decode(errors="replace")
        finally:
            os.close(status_r)

    word, _, rest = status.partition(" ")
    exit_code: int | None = None
    if word == "exit":
        exit_code = int(rest)
    elif word == "signal":
        exit_code = -int(rest)
    elif word not in ("timeout", "error") and not backstop:
        exit_code = proc.returncode
    return _Run(
        exit_code=exit_code,
        output=bytes(out.kept),
        truncated=out.dropped > 0,
        timed_out=backstop or word == "timeout",
        duration_s=duration,
        launcher_error=(rest or "the launcher failed") if word == "error" else None,
    )


class Sandbox:
    """A temporary workspace; `with Sandbox(files, limits) as box: result = box.run("pytest -q");
    files = box.files()`."""

    def __init__(self, files: Mapping[str, str], limits: SandboxLimits = SandboxLimits()) -> None:
        self.limits = limits
        self.isolation = isolation()
        self._uid = self._gid = _UID_BASE + secrets.randbelow(_UID_SPAN)
        self._own_uid = self.isolation.separate_user
        self._path = Path(tempfile.mkdtemp(prefix="agentq-sandbox-")).resolve()
        self._closed = False
        self._busy_cgroups: list[_Cgroups] = []
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
            _kill_uid(self._uid)
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
        tmp = self._path / _TMP_DIR
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
        non-UTF-8 files, and a file that would take the total past `max_bytes`."""
        result: dict[str, str] = {}
        total = 0
        base = str(self._path)
        for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
            for filename in sorted(filenames):
                full = os.path.join(dirpath, filename)
                text = _read_text(full, max_bytes - total)
                if text is None:
                    continue
                result[os.path.relpath(full, base)] = text
                total += len(text.encode("utf-8"))
        return dict(sorted(result.items()))

    # -- running --------------------------------------------------------------------------

    def run(self, command: str) -> SandboxResult:
        """Run `command` with /bin/sh -c in the workspace; see the module docstring."""
        if self._closed:
            raise SandboxError("the sandbox is closed")
        self._ensure_tmp()
        mode = self.isolation.mode
        cgroups = None
        if self._own_uid:
            cgroups = _Cgroups(f"agentq-sandbox-{self._uid}-{secrets.token_hex(4)}",
                               self.limits.memory_bytes, self.limits.processes + 4)
        try:
            run = _execute(mode, self._path, command, self.limits, self._uid, self._gid,
                           cgroups)
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
        )


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
    except FileNotFoundError:
        return
    except OSError:
        # Without root, directories the command made unwritable or unreadable block the removal.
        with contextlib.suppress(OSError):
            os.chmod(path, 0o700)
        for dirpath, dirnames, _ in os.walk(path):
            for name in dirnames:
                try:
                    os.chmod(os.path.join(dirpath, name), 0o700, follow_symlinks=False)
                except OSError:
                    pass
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == _LAUNCH_FLAG:
    _launcher_main(sys.argv[2])
