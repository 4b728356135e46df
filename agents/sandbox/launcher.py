"""The launcher: run as `python -I -S launcher.py CONFIG` (under `unshare` in the namespace modes),
it sets up the run's view of the machine, starts `/bin/sh -c COMMAND` and supervises the tree.

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
import ctypes
import errno
import json
import os
import resource
import shutil
import signal
import stat
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any

LAUNCHER_FAILED = 125
POLL_S = 0.05  # how often the tree's CPU time and memory are summed

# mount(2), unshare(2) and prctl(2) constants (linux/mount.h, sched.h, prctl.h).
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2
CLONE_NEWUSER = 0x10000000
PR_SET_NO_NEW_PRIVS = 38
PR_SET_CHILD_SUBREAPER = 36
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


# --------------------------------------------------------------------------------------------
# Helpers also used by the parent (importable: nothing here runs on import)


def libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def pids() -> Iterator[str]:
    try:
        names = os.listdir("/proc")
    except OSError:
        return
    yield from (name for name in names if name.isdigit())


def task_uid(pid: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def stat_fields(pid: int | str) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command name: [0] is the state, [1] the parent,
    [11..14] utime, stime, cutime, cstime (ticks), [19] the start time, [21] the resident pages."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None


def descendants(ancestor: int) -> list[int]:
    """Live processes below `ancestor` (pids as this /proc shows them), nearest first."""
    parent_of: dict[int, int] = {}
    for pid in pids():
        fields = stat_fields(pid)
        if fields is not None and len(fields) > 1:
            parent_of[int(pid)] = int(fields[1])
    found: list[int] = []
    for task in parent_of:
        seen, current = 0, task
        while current in parent_of and seen < 4096:
            current, seen = parent_of[current], seen + 1
            if current == ancestor:
                found.append(task)
                break
    return found


# --------------------------------------------------------------------------------------------
# Mounts


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    def enc(value: str | None) -> bytes | None:
        return None if value is None else value.encode()

    ret = libc().mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data))
    check(ret, f"mount {target}")


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


def setup_mounts(cfg: Mapping[str, Any], host_workspace: int) -> int:
    """The run's view of the file system (see the module docstring); `host_workspace` is a
    descriptor of the workspace directory as the host has it, opened before anything is
    covered. Returns a descriptor through which the host's workspace can be written."""
    workspace: str = cfg["workspace"]
    _mount(None, "/", None, MS_REC | MS_PRIVATE)

    hidden: list[str] = []
    for raw in sorted({os.path.realpath(p) for p in cfg["hide"]}, key=len):
        if os.path.isdir(raw) and raw != "/" and not any(_under(raw, h) for h in hidden):
            hidden.append(raw)
    # The interpreter's directories are brought back read-only from these descriptors.
    binds: list[tuple[str, int]] = []
    for raw in sorted({os.path.realpath(p) for p in cfg["expose"]}, key=len):
        if (os.path.isdir(raw) and any(_under(raw, h) for h in hidden)
                and not any(_under(raw, b) for b, _ in binds)):
            binds.append((raw, os.open(raw, os.O_PATH)))

    for path in hidden:
        _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=755,size=1m")
    for path, fd in binds:
        os.makedirs(path, mode=0o755, exist_ok=True)  # the skeleton, inside a covering tmpfs
        _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        os.close(fd)
    # The workspace: a tmpfs of `disk_bytes` (the quota), filled from the host's directory.
    # The host's directory stays reachable (and writable, for the copy back) only through the
    # returned descriptor: bound to the workspace's path, opened, and detached again.
    os.makedirs(workspace, mode=0o700, exist_ok=True)
    _mount(f"/proc/self/fd/{host_workspace}", workspace, None, MS_BIND)
    host = os.open(workspace, os.O_RDONLY | os.O_DIRECTORY)
    check(libc().umount2(workspace.encode(), MNT_DETACH), f"umount {workspace}")
    limits = cfg["limits"]
    owner = f",uid={cfg['uid']},gid={cfg['gid']}" if cfg["drop"] == "uid" else ""
    inodes = max(4096, int(limits["disk_bytes"]) // 4096)
    _mount("tmpfs", workspace, "tmpfs", MS_NOSUID | MS_NODEV,
           f"mode=700,size={int(limits['disk_bytes'])},nr_inodes={inodes}{owner}")
    inside = os.open(workspace, os.O_RDONLY | os.O_DIRECTORY)
    try:
        copy_tree(host, inside, _owner(cfg), skip_contents=None)
    finally:
        os.close(inside)
    shm_ok = os.path.isdir("/dev/shm") and not os.path.islink("/dev/shm")
    if shm_ok:
        _mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
               f"mode=1777,size={int(cfg['shm_bytes'])}")

    # Everything else read-only (and nosuid). Mount flags that a less privileged namespace
    # inherited locked (nodev, noexec) must be given again.
    extra_flags: dict[str, int] = {}  # mount point -> flags (the last, topmost, mount wins)
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            opts = fields[5].split(",")
            extra_flags[_unescape_mountinfo(fields[4])] = (
                (MS_NODEV if "nodev" in opts else 0) | (MS_NOEXEC if "noexec" in opts else 0))
    for point, extra in extra_flags.items():
        if (point == "/dev/shm" and shm_ok) or point == workspace:
            continue
        try:
            _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_RDONLY | extra)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.EACCES, errno.ENOTDIR):
                continue  # under a covered directory: not reachable anyway
            if exc.errno in (errno.EPERM, errno.EINVAL) and (
                    _under(point, "/proc") or _under(point, "/sys")):
                continue  # kernel file systems; permissions guard them
            raise
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    return host


def _owner(cfg: Mapping[str, Any]) -> tuple[int, int] | None:
    return (int(cfg["uid"]), int(cfg["gid"])) if cfg["drop"] == "uid" else None


def clear_dir(dir_fd: int) -> None:
    for entry in os.scandir(dir_fd):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.name, dir_fd=dir_fd)
        else:
            os.unlink(entry.name, dir_fd=dir_fd)


def copy_tree(src: int, dst: int, owner: tuple[int, int] | None,
              skip_contents: str | None) -> None:
    """Copy directory `src` into directory `dst` (descriptors; nothing is followed): regular
    files, directories and symbolic links, with their permission bits (no set-id bits); other
    kinds are left out. The contents of the directory named `skip_contents` are not copied."""
    for entry in os.scandir(src):
        name = entry.name
        st = os.stat(name, dir_fd=src, follow_symlinks=False)
        mode = stat.S_IMODE(st.st_mode) & 0o1777
        if stat.S_ISDIR(st.st_mode):
            os.mkdir(name, 0o700, dir_fd=dst)
            sub_src = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=src)
            sub_dst = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dst)
            try:
                if name != skip_contents:
                    copy_tree(sub_src, sub_dst, owner, None)
                if owner is not None:
                    os.fchown(sub_dst, *owner)
                os.fchmod(sub_dst, mode)
            finally:
                os.close(sub_src)
                os.close(sub_dst)
        elif stat.S_ISREG(st.st_mode):
            fin = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=src)
            try:
                fout = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                               dir_fd=dst)
                try:
                    while os.sendfile(fout, fin, None, 1 << 20) > 0:
                        pass
                    if owner is not None:
                        os.fchown(fout, *owner)
                    os.fchmod(fout, mode & 0o777)
                finally:
                    os.close(fout)
            finally:
                os.close(fin)
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(name, dir_fd=src), name, dir_fd=dst)
            if owner is not None:
                os.chown(name, *owner, dir_fd=dst, follow_symlinks=False)


def _loopback_up() -> None:
    import fcntl
    import socket
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        req = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock, SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


# --------------------------------------------------------------------------------------------
# The command


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


def drop_to(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def _enter_nested_userns(uid: int, gid: int) -> None:
    """Leave the launcher's user namespace (which owns the mounts) for one where this process
    is `uid`/`gid` with no capabilities."""
    check(libc().unshare(CLONE_NEWUSER), "unshare(CLONE_NEWUSER)")
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
    """Sums the CPU time and resident memory of the processes below the launcher."""

    def __init__(self, cgroup_oom: str | None) -> None:
        self.me = int(os.readlink("/proc/self"))  # as the mounted /proc numbers it
        self.tick = os.sysconf("SC_CLK_TCK")
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.cgroup_oom = cgroup_oom

    def usage(self) -> tuple[float, int]:
        """(CPU seconds, resident bytes): the reaped children's, plus every live process's
        own and its reaped children's (each process is counted once, alive or reaped)."""
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = reaped.ru_utime + reaped.ru_stime
        rss = 0
        for pid in descendants(self.me):
            fields = stat_fields(pid)
            if fields is None or len(fields) < 22:
                continue
            cpu += sum(int(f) for f in fields[11:15]) / self.tick
            rss += int(fields[21]) * self.page
        return cpu, rss

    def oom_kills(self) -> int:
        if not self.cgroup_oom:
            return 0
        try:
            with open(self.cgroup_oom) as fh:
                for line in fh:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            pass
        return 0


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


def _supervise(cfg: Mapping[str, Any], child: int) -> tuple[str, int]:
    """Wait for the command; ('exit'|'signal', N), or ('timeout'|'cpu'|'memory', 0) when a
    limit ended it first."""
    limits = cfg["limits"]
    tree = _Tree(cfg.get("cgroup_oom"))
    deadline = time.monotonic() + float(limits["wall_seconds"])
    cpu_limit, memory_limit = float(limits["cpu_seconds"]), int(limits["memory_bytes"])
    oom_before = tree.oom_kills()
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
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "timeout", 0
        cpu, rss = tree.usage()
        if cpu > cpu_limit:
            return "cpu", 0
        if rss > memory_limit or tree.oom_kills() > oom_before:
            return "memory", 0
        signal.sigtimedwait([signal.SIGCHLD], min(POLL_S, remaining))


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
    host_workspace = -1
    try:
        if not pid_namespace:
            check(libc().prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(SUBREAPER)")
        if cfg["mounts"]:
            opened = os.open(cfg["workspace"], os.O_RDONLY | os.O_DIRECTORY)
            host_workspace = setup_mounts(cfg, opened)
            os.close(opened)
        if cfg["net_namespace"]:
            _loopback_up()
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
    end, code = _supervise(cfg, child)
    _kill_all(pid_namespace)
    if host_workspace >= 0:
        try:
            inside = os.open(cfg["workspace"], os.O_RDONLY | os.O_DIRECTORY)
            try:
                clear_dir(host_workspace)
                copy_tree(inside, host_workspace, _owner(cfg), skip_contents=cfg["tmp_dir"])
            finally:
                os.close(inside)
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            fail(exc)
    report("end " + json.dumps({"end": end, "code": code}))
    # As PID 1 of its namespace, the kernel kills whatever is left when it exits.
    os._exit(code if end == "exit" else 128 + code if end == "signal" else 124)


if __name__ == "__main__" and len(sys.argv) == 2:
    main(sys.argv[1])
