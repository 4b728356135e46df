"""The launcher: run as `python -I -S -B .../launcher CONFIG` (under `unshare` in the namespace
modes), it sets up the run's view of the machine, starts `/bin/sh -c COMMAND` and supervises the
tree.

It imports nothing outside the standard library (it starts in a bare interpreter) and is PID 1 of
the run's PID namespace in every mode but `plain`, where it is a child subreaper instead. Its
steps:

1. reports its pid as the host sees it (`pid N` on the status pipe);
2. in the modes with a mount namespace (`root`, `userns`): hides the homes, /tmp, /run and the
   like under empty read-only tmpfs, mounts a size-limited tmpfs (the disk quota) where the
   workspace is and copies the workspace into it, remounts everything else read-only, mounts
   the namespace's own /proc; brings up the namespace's loopback where it has a network
   namespace;
3. forks the command (rlimits, no_new_privs, a uid of its own or a nested user namespace);
4. supervises: the wall clock, the CPU time of the whole tree, its memory (resident, summed,
   and the cgroup's OOM kills where there is one), until the command ends;
5. kills everything left (as PID 1: `kill(-1)`; in `plain`: every descendant), copies the
   workspace back out of the tmpfs, and reports how the run ended (`end {json}`).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import time
from collections.abc import Mapping
from typing import Any

from .kernel import (
    CLONE_NEWUSER,
    PR_SET_CHILD_SUBREAPER,
    PR_SET_DUMPABLE,
    PR_SET_NO_NEW_PRIVS,
    check,
    descendants,
    libc,
    oom_kills,
    stat_fields,
)
from .mounts import Budget, clear_dir, copy_tree, loopback_up, owner, setup_mounts

LAUNCHER_FAILED = 125
POLL_S = 0.1  # how often the tree's CPU time and memory are summed


def apply_limits(limits: Mapping[str, int]) -> None:
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


def _map_and_seal(uid: int, gid: int, outer_uid: int, outer_gid: int) -> None:
    """In a user namespace just made: map `uid`/`gid` to the outer ids, and allow no user
    namespace below this one. (In a namespace of its own the command could mount a tmpfs of
    any size: files past the disk quota, in memory no limit counts.)"""
    for path, text in (("/proc/self/setgroups", "deny"),
                       ("/proc/self/uid_map", f"{uid} {outer_uid} 1"),
                       ("/proc/self/gid_map", f"{gid} {outer_gid} 1"),
                       ("/proc/sys/user/max_user_namespaces", "0")):
        with open(path, "w") as fh:
            fh.write(text)


def drop_to(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    # A user namespace where the command keeps its uid and may make none of its own. Where
    # this uid may not make one (unprivileged user namespaces disabled), neither may the
    # command, which runs as the same uid without capabilities.
    # (Changing its ids made this process undumpable, its /proc/self files root's: as after
    # the command's own execve, it is dumpable again.)
    check(libc().prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "prctl(SET_DUMPABLE)")
    if libc().unshare(CLONE_NEWUSER) == 0:
        _map_and_seal(uid, gid, uid, gid)


def _enter_nested_userns(uid: int, gid: int) -> None:
    """Leave the launcher's user namespace (which owns the mounts) for one where this process
    is `uid`/`gid` with no capabilities."""
    check(libc().unshare(CLONE_NEWUSER), "unshare(CLONE_NEWUSER)")
    _map_and_seal(uid, gid, 0, 0)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def _exec_command(cfg: Mapping[str, Any]) -> None:
    # Python ignores these at start-up; the command must get the default behaviour.
    for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGXCPU):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    apply_limits(cfg["limits"])
    if cfg["drop"] == "uid":
        drop_to(cfg["uid"], cfg["gid"])
    elif cfg["drop"] == "userns":
        _enter_nested_userns(cfg["uid"], cfg["gid"])
    check(libc().prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    os.chdir(cfg["workspace"])
    os.umask(0o022)
    os.execve("/bin/sh", ["/bin/sh", "-c", cfg["command"]], dict(os.environ))


# --------------------------------------------------------------------------------------------
# Supervision


class _Tree:
    """Sums the CPU time and the memory of the processes below the launcher."""

    def __init__(self, oom_fd: int | None) -> None:
        self.me = int(os.readlink("/proc/self"))  # as the mounted /proc numbers it
        self.tick = os.sysconf("SC_CLK_TCK")
        self.page = os.sysconf("SC_PAGE_SIZE")
        # The cgroup's OOM counter, opened before the sandbox's mounts hide /sys.
        self.oom_fd = oom_fd

    def usage(self) -> tuple[float, int]:
        """(CPU seconds, memory bytes). CPU: the reaped children's, plus every live process's
        own and its reaped children's (each process is counted once, alive or reaped).
        Memory: the proportional set size of every live process (a page shared by n of them
        counts 1/n to each), or, where that cannot be read, its resident size."""
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = reaped.ru_utime + reaped.ru_stime
        memory = 0
        for pid in descendants(self.me):
            fields = stat_fields(pid)
            if fields is None or len(fields) < 22:
                continue
            cpu += sum(int(f) for f in fields[11:15]) / self.tick
            pss = _pss(pid)
            memory += pss if pss is not None else int(fields[21]) * self.page
        return cpu, memory

    def oom_kills(self) -> int:
        if self.oom_fd is None:
            return 0
        try:
            return oom_kills(os.pread(self.oom_fd, 65536, 0).decode())
        except OSError:
            return 0


def _open_oom_counter(path: str | None) -> int | None:
    if not path:
        return None
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _pss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as fh:
            for line in fh:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _kill_all(pid_namespace: bool) -> None:
    """SIGKILL every other process of the run and reap them all."""
    me = os.getpid()
    for _ in range(2000):
        if pid_namespace:
            with contextlib.suppress(ProcessLookupError):
                os.kill(-1, signal.SIGKILL)  # as PID 1: everyone else in the namespace
        else:
            # A child subreaper: orphans come back here, also those that left the group.
            for pid in descendants(me):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        try:
            while os.waitpid(-1, os.WNOHANG)[0] != 0:
                pass
        except ChildProcessError:
            return  # nothing left below this process
        time.sleep(0.005)


def _supervise(cfg: Mapping[str, Any], child: int, oom_fd: int | None) -> tuple[str, int]:
    """Wait for the command; ('exit'|'signal', N), or ('timeout'|'cpu'|'memory', 0) when a
    limit ended it first."""
    limits = cfg["limits"]
    tree = _Tree(oom_fd)
    deadline = time.monotonic() + float(limits["wall_seconds"])
    cpu_limit, memory_limit = float(limits["cpu_seconds"]), int(limits["memory_bytes"])
    oom_before = tree.oom_kills()
    next_check = 0.0
    while True:
        try:
            while True:
                done, status = os.waitpid(-1, os.WNOHANG)
                if done == 0:
                    break
                if done == child:
                    if os.WIFSIGNALED(status):
                        return "signal", os.WTERMSIG(status)
                    return "exit", os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            return "exit", LAUNCHER_FAILED
        now = time.monotonic()
        if now >= deadline:
            return "timeout", 0
        if now >= next_check:
            next_check = now + POLL_S
            cpu, memory = tree.usage()
            if cpu > cpu_limit:
                return "cpu", 0
            if memory > memory_limit or tree.oom_kills() > oom_before:
                return "memory", 0
        signal.sigtimedwait([signal.SIGCHLD], max(0.001, min(next_check, deadline) - now))


def main(config: str) -> None:
    cfg = json.loads(config)
    status_fd = int(cfg["status_fd"])
    os.set_inheritable(status_fd, False)
    pid_namespace = bool(cfg["pid_namespace"])

    def report(text: str) -> None:
        with contextlib.suppress(OSError):
            os.write(status_fd, (text + "\n").encode()[:4000])

    def fail(exc: BaseException) -> None:
        report("end " + json.dumps({"end": "error", "code": 0, "message": str(exc)}))
        os._exit(LAUNCHER_FAILED)

    report(f"pid {os.readlink('/proc/self')}")
    oom_fd = _open_oom_counter(cfg.get("cgroup_oom"))
    host_workspace = -1
    try:
        if not pid_namespace:
            check(libc().prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(SUBREAPER)")
        if cfg["mounts"]:
            opened = os.open(cfg["workspace"], os.O_RDONLY | os.O_DIRECTORY)
            host_workspace = setup_mounts(cfg, opened)
            os.close(opened)
        if cfg["net_namespace"]:
            loopback_up()
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        fail(exc)
    # SIGCHLD is waited for, not handled (the command gets an empty mask back).
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])
    child = os.fork()
    if child == 0:
        try:
            _exec_command(cfg)
        except BaseException as exc:  # noqa: BLE001
            os.write(2, f"sandbox: cannot start the command: {exc}\n".encode())
        os._exit(127)
    end, code = _supervise(cfg, child, oom_fd)
    _kill_all(pid_namespace)
    if host_workspace >= 0:
        try:
            inside = os.open(cfg["workspace"], os.O_RDONLY | os.O_DIRECTORY)
            try:
                clear_dir(host_workspace)
                # At most the quota goes back to the host's disk, however sparse or linked.
                copy_tree(inside, host_workspace, owner(cfg), skip_contents=cfg["tmp_dir"],
                          budget=Budget(int(cfg["limits"]["disk_bytes"])))
            finally:
                os.close(inside)
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            fail(exc)
    report("end " + json.dumps({"end": end, "code": code}))
    # As PID 1 of its namespace, the kernel kills whatever is left when it exits.
    os._exit(code if end == "exit" else 128 + code if end == "signal" else 124)

