"""The run's view of the file system (modes `root` and `userns`, inside the new mount
namespace), the workspace's tmpfs and the copies into and out of it, and the loopback."""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Mapping
from typing import Any

from .kernel import (
    IFF_UP,
    MNT_DETACH,
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
    SIOCGIFFLAGS,
    SIOCSIFFLAGS,
    check,
    libc,
    mount,
)


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
    mount(None, "/", None, MS_REC | MS_PRIVATE)

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
        mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=755,size=1m")
    for path, fd in binds:
        os.makedirs(path, mode=0o755, exist_ok=True)  # the skeleton, inside a covering tmpfs
        mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        os.close(fd)
    # The workspace: a tmpfs of `disk_bytes` (the quota), filled from the host's directory.
    # The host's directory stays reachable (and writable, for the copy back) only through the
    # returned descriptor: bound to the workspace's path, opened, and detached again.
    os.makedirs(workspace, mode=0o700, exist_ok=True)
    mount(f"/proc/self/fd/{host_workspace}", workspace, None, MS_BIND)
    host = os.open(workspace, os.O_RDONLY | os.O_DIRECTORY)
    check(libc().umount2(workspace.encode(), MNT_DETACH), f"umount {workspace}")
    limits = cfg["limits"]
    uid_gid = f",uid={cfg['uid']},gid={cfg['gid']}" if cfg["drop"] == "uid" else ""
    inodes = max(4096, int(limits["disk_bytes"]) // 4096)
    mount("tmpfs", workspace, "tmpfs", MS_NOSUID | MS_NODEV,
          f"mode=700,size={int(limits['disk_bytes'])},nr_inodes={inodes}{uid_gid}")
    inside = os.open(workspace, os.O_RDONLY | os.O_DIRECTORY)
    try:
        copy_tree(host, inside, owner(cfg), skip_contents=None)
    finally:
        os.close(inside)
    shm_ok = os.path.isdir("/dev/shm") and not os.path.islink("/dev/shm")
    if shm_ok:
        mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
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
            mount(None, point, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_RDONLY | extra)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.EACCES, errno.ENOTDIR):
                continue  # under a covered directory: not reachable anyway
            if exc.errno in (errno.EPERM, errno.EINVAL) and (
                    _under(point, "/proc") or _under(point, "/sys")):
                continue  # kernel file systems; permissions guard them
            raise
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    return host


def owner(cfg: Mapping[str, Any]) -> tuple[int, int] | None:
    return (int(cfg["uid"]), int(cfg["gid"])) if cfg["drop"] == "uid" else None


def clear_dir(dir_fd: int) -> None:
    for entry in os.scandir(dir_fd):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.name, dir_fd=dir_fd)
        else:
            os.unlink(entry.name, dir_fd=dir_fd)


MAX_DEPTH = 100  # directories nested deeper are copied empty
PAGE = 4096


class Budget:
    """Bytes a copy may still write. Each regular file costs its size rounded up to a page, so
    that sparse files and hard links, which cost the tmpfs little or nothing, cannot make the
    copy back to the host's disk larger than the quota (nor too large to be copied in again)."""

    def __init__(self, total: int) -> None:
        self.left = total
        self.skipped = 0

    def take(self, size: int) -> bool:
        cost = -(-size // PAGE) * PAGE
        if cost > self.left:
            self.skipped += 1
            return False
        self.left -= cost
        return True


def copy_tree(src: int, dst: int, owner: tuple[int, int] | None,
              skip_contents: str | None, depth: int = 0, budget: Budget | None = None) -> None:
    """Copy directory `src` into directory `dst` (descriptors; nothing is followed): regular
    files, directories and symbolic links, with their permission bits (no set-id bits); other
    kinds are left out. The contents of the directory named `skip_contents` are not copied,
    nor those of directories more than MAX_DEPTH levels down. With a `budget`, a regular file
    that would take the copy past it is left out."""
    for entry in os.scandir(src):
        name = entry.name
        st = os.stat(name, dir_fd=src, follow_symlinks=False)
        mode = stat.S_IMODE(st.st_mode) & 0o1777
        if stat.S_ISDIR(st.st_mode):
            os.mkdir(name, 0o700, dir_fd=dst)
            sub_src = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=src)
            sub_dst = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dst)
            try:
                if name != skip_contents and depth < MAX_DEPTH:
                    copy_tree(sub_src, sub_dst, owner, None, depth + 1, budget)
                if owner is not None:
                    os.fchown(sub_dst, *owner)
                os.fchmod(sub_dst, mode)
            finally:
                os.close(sub_src)
                os.close(sub_dst)
        elif stat.S_ISREG(st.st_mode):
            if budget is not None and not budget.take(st.st_size):
                continue
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


def loopback_up() -> None:
    import fcntl
    import socket
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        req = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock, SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))

