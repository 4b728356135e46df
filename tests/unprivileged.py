"""Run a command as `nobody`, a real unprivileged process: `python tests/unprivileged.py
[--no-userns] -- COMMAND ARGS...` (as root).

- In a mount namespace of its own, the interpreter's directories are made reachable (the
  running Python may live under root's home, mode 0700), nothing else changes.
- In a user namespace of its own that maps every uid to itself (so `nobody` is the host's
  `nobody`), `--no-userns` sets `max_user_namespaces` to 0: the command and its children cannot
  create user namespaces, as on a host where they are disabled.
- Then it drops to uid/gid 65534 with no groups or capabilities and execs COMMAND. This process
  stays as root outside, forwards SIGTERM and SIGINT, and exits as the command did.
"""

from __future__ import annotations

import os
import signal
import stat
import sys

from agents.sandbox.execute import interpreter_dirs
from agents.sandbox.launcher.kernel import MS_BIND, MS_PRIVATE, MS_REC, check, libc, mount

NOBODY = 65534
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000


def _closed_ancestor(path: str) -> str | None:
    """The topmost directory above `path` that others may not traverse."""
    parts = path.strip("/").split("/")
    for i in range(1, len(parts)):
        parent = "/" + "/".join(parts[:i])
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            return parent
    return None


def _expose_interpreter() -> None:
    check(libc().unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    dirs = sorted({os.path.realpath(d) for d in interpreter_dirs()}, key=len)
    keep: dict[str, list[tuple[str, int]]] = {}
    for path in dirs:
        closed = _closed_ancestor(path)
        if closed is not None and not any(path.startswith(p + "/") for p, _ in
                                          keep.get(closed, [])):
            keep.setdefault(closed, []).append((path, os.open(path, os.O_PATH)))
    for closed, binds in keep.items():
        mount("tmpfs", closed, "tmpfs", 0, "mode=755,size=1m")
        for path, fd in binds:
            os.makedirs(path, exist_ok=True)
            mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
            os.close(fd)


def main(argv: list[str]) -> int:
    no_userns = argv[:1] == ["--no-userns"]
    if no_userns:
        argv = argv[1:]
    if argv[:1] != ["--"] or len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    command = argv[1:]
    _expose_interpreter()
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(ready_r)
        os.close(go_w)
        check(libc().unshare(CLONE_NEWUSER), "unshare(CLONE_NEWUSER)")
        os.write(ready_w, b"1")
        os.read(go_r, 1)  # the maps are written
        if no_userns:
            with open("/proc/sys/user/max_user_namespaces", "w") as fh:
                fh.write("0")
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)
        os.execvp(command[0], command)
    os.close(ready_w)
    os.close(go_r)
    os.read(ready_r, 1)
    for name in ("uid_map", "gid_map"):
        with open(f"/proc/{child}/{name}", "w") as fh:
            fh.write("0 0 4294967295")
    os.write(go_w, b"1")
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: os.kill(child, signum))
    while True:
        try:
            _, status = os.waitpid(child, 0)
            return os.waitstatus_to_exitcode(status)
        except InterruptedError:
            continue


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
