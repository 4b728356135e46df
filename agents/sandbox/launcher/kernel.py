"""What the launcher and the parent both need of the kernel: libc, a few constants, and the
processes as /proc shows them. Standard library only."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator

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
PR_SET_DUMPABLE = 4
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


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



def mount(source: str | None, target: str, fstype: str | None, flags: int,
          data: str | None = None) -> None:
    def enc(value: str | None) -> bytes | None:
        return None if value is None else value.encode()

    ret = libc().mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data))
    check(ret, f"mount {target}")


def oom_kills(text: str) -> int:
    """The `oom_kill` count of a memory cgroup's `memory.events` (v2) or `memory.oom_control`
    (v1) text; 0 when it has none."""
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0
