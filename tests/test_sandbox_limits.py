"""Limits of a whole run, tried for real: CPU time and memory of the process tree, the
workspace's disk quota, and the cap on runs at once."""

from __future__ import annotations

import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from agents.sandbox import Mode, Sandbox, SandboxLimits, SandboxResult, available_modes, describe
from agents.sandbox import slots as sandbox_slots
from core.settings import get_settings
from tests.test_sandbox import PY, processes_with

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")

MODES_HERE = available_modes()
WITH_QUOTA = [m for m in MODES_HERE if describe(m).filesystem]
MiB = 1024 * 1024


@pytest.mark.parametrize("mode", MODES_HERE)
def test_cpu_time_is_limited_for_the_whole_tree(mode: Mode) -> None:
    """Four busy processes, each far below the per-process limit when the tree passes it."""
    marker = f"spin-{secrets.token_hex(6)}"
    limits = SandboxLimits(cpu_seconds=2, wall_seconds=60.0)
    with Sandbox({}, limits, mode=mode, weakest=mode) as box:
        result = box.run(f"for i in 1 2 3 4; do sh -c 'while :; do :; done # {marker}' & done; "
                         "wait")
        assert processes_with(marker) == []
    assert result.limit == "cpu", result
    assert result.exit_code == -9
    assert not result.timed_out
    assert result.duration_s < 30, "the CPU limit, not the wall clock, ended it"


@pytest.mark.parametrize("mode", MODES_HERE)
def test_memory_is_limited_for_the_whole_tree(mode: Mode) -> None:
    """Four processes each fill a buffer of 48 MiB (dd's block): each is within the
    per-process limit of 128 MiB, together they pass it. The run is killed and says why."""
    marker = f"hog-{secrets.token_hex(6)}"
    limits = SandboxLimits(memory_bytes=128 * MiB, cpu_seconds=20, wall_seconds=60.0)
    hog = f"sh -c 'dd if=/dev/zero of=/dev/null bs=48M count=1000000 # {marker}'"
    with Sandbox({}, limits, mode=mode, weakest=mode) as box:
        result = box.run(f"for i in 1 2 3 4; do {hog} & done; wait")
        assert processes_with(marker) == []
    assert result.limit == "memory", result
    assert result.exit_code == -9
    assert not result.timed_out
    assert result.duration_s < 30, "the memory limit, not the wall clock, ended it"


@pytest.mark.skipif("root" not in MODES_HERE, reason="the cgroup memory limit is root mode's")
def test_memory_in_files_past_the_limit_is_reported_as_memory() -> None:
    """Files in the workspace's tmpfs are memory no process holds: the cgroup's OOM killer
    ends the writer, the command goes on and exits. The run still says the memory limit
    ended it, not that the command failed."""
    limits = SandboxLimits(memory_bytes=64 * MiB, disk_bytes=256 * MiB, file_bytes=256 * MiB,
                           wall_seconds=60.0)
    with Sandbox({}, limits, mode="root", weakest="root") as box:
        result = box.run("head -c 201326592 /dev/zero > big; echo went on; exit 3")
    assert result.limit == "memory", result
    assert not result.timed_out


def test_one_process_cannot_allocate_past_the_limit() -> None:
    limits = SandboxLimits(memory_bytes=128 * MiB, cpu_seconds=20, wall_seconds=60.0)
    with Sandbox({}, limits, weakest="plain") as box:
        result = box.run(f"{PY} -c 'block = b\"x\" * (256 << 20)'")
    assert result.exit_code not in (0, None)
    assert "MemoryError" in result.output


@pytest.mark.parametrize("mode", WITH_QUOTA)
def test_the_workspace_has_a_disk_quota(mode: Mode) -> None:
    """Many files, each below the file size limit, together past the quota: writes fail with
    ENOSPC, and what was written is copied back out within the quota."""
    limits = SandboxLimits(disk_bytes=8 * MiB, file_bytes=16 * MiB, wall_seconds=30.0)
    with Sandbox({"keep.txt": "kept\n"}, limits, mode=mode, weakest=mode) as box:
        result = box.run("for i in 1 2 3 4 5 6; do "
                         "head -c 2097152 /dev/zero > part$i || exit 7; done")
        sizes = {p.name: p.stat().st_size for p in box.path.iterdir() if p.is_file()}
        again = box.run("rm part*; head -c 4194304 /dev/zero > big && echo fits")
        files = box.files()
    assert result.exit_code == 7, result
    assert "No space left on device" in result.output
    assert sum(sizes.values()) <= limits.disk_bytes
    assert sizes["part1"] == 2 * MiB
    assert sizes["keep.txt"] == 5
    assert again.exit_code == 0, again.output  # the space comes back when files go
    assert "fits" in again.output
    assert files == {"keep.txt": "kept\n"}


@pytest.mark.parametrize("mode", WITH_QUOTA)
def test_sparse_files_and_hard_links_do_not_pass_the_quota_on_the_way_out(mode: Mode) -> None:
    """Sparse files and hard links cost the tmpfs next to nothing; copied back to the host's
    disk they would be written out in full, once per name (here 40 x 16 MiB + 40 x 4 MiB on
    an 8 MiB quota). At most the quota comes back."""
    limits = SandboxLimits(disk_bytes=8 * MiB, file_bytes=16 * MiB, wall_seconds=30.0)
    with Sandbox({"keep.txt": "kept\n"}, limits, mode=mode, weakest=mode) as box:
        result = box.run("head -c 4194304 /dev/zero > big && for i in $(seq 1 40); do "
                         "truncate -s 16M sparse$i && ln big link$i || exit 7; done")
        written = sum(p.lstat().st_blocks * 512 for p in box.path.rglob("*"))
        apparent = sum(p.lstat().st_size for p in box.path.rglob("*") if p.is_file())
    assert result.exit_code == 0, result
    assert apparent <= limits.disk_bytes
    assert written <= limits.disk_bytes + MiB  # directories' blocks aside


_PRIVATE_TMPFS = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
uid, gid = os.getuid(), os.getgid()
if libc.unshare(0x10000000 | 0x00020000) != 0:  # CLONE_NEWUSER | CLONE_NEWNS
    sys.exit(f"refused: {os.strerror(ctypes.get_errno())}")
for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
    with open(f"/proc/self/{name}", "w") as fh:
        fh.write(text)
if libc.mount(b"none", b"/mnt", b"tmpfs", 0, None) != 0:
    sys.exit(f"no mount: {os.strerror(ctypes.get_errno())}")
for i in range(4):
    with open(f"/mnt/part{i}", "wb") as fh:
        fh.write(bytes(8 << 20))
print("wrote 32 MiB past the quota")
"""


@pytest.mark.parametrize("mode", WITH_QUOTA)
def test_a_command_cannot_mount_a_tmpfs_of_its_own(mode: Mode) -> None:
    """In a user namespace of its own the command could mount a tmpfs of any size: files past
    the disk quota, in memory that no limit of the run counts. It may make none."""
    limits = SandboxLimits(disk_bytes=8 * MiB, file_bytes=16 * MiB, wall_seconds=30.0)
    with Sandbox({"escape.py": _PRIVATE_TMPFS}, limits, mode=mode, weakest=mode) as box:
        result = box.run(f"{PY} escape.py")
        plain = box.run("echo still runs")
    assert "wrote 32 MiB" not in result.output, result
    assert result.exit_code == 1, result
    assert "refused" in result.output
    assert plain.exit_code == 0, plain
    assert "still runs" in plain.output


@pytest.fixture
def one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("AGENTQ_SANDBOX_MAX_CONCURRENT", "1")
    get_settings.cache_clear()
    yield
    monkeypatch.undo()
    get_settings.cache_clear()


def _wait(check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.usefixtures("one_at_a_time")
def test_runs_past_the_cap_wait_their_turn() -> None:
    results: dict[str, SandboxResult] = {}
    command = "date +%s.%N; sleep 1; date +%s.%N"

    def run(name: str) -> None:
        with Sandbox({}, SandboxLimits(wall_seconds=30.0), weakest="plain") as box:
            results[name] = box.run(command)

    first = threading.Thread(target=run, args=("first",))
    second = threading.Thread(target=run, args=("second",))
    first.start()
    _wait(lambda: sandbox_slots.running == 1)
    second.start()
    _wait(lambda: sandbox_slots.waiting == 1)  # the second waits, it does not fail
    stopped = threading.Event()
    cancelled: list[SandboxResult] = []
    with Sandbox({}, weakest="plain") as third:
        waiter = threading.Thread(target=lambda: cancelled.append(
            third.run("echo never", cancelled=stopped.is_set)))
        waiter.start()
        _wait(lambda: sandbox_slots.waiting == 2)
        stopped.set()  # a run cancelled while it waits never starts
        waiter.join(timeout=10)
    first.join(timeout=30)
    second.join(timeout=30)
    assert cancelled[0].cancelled
    assert cancelled[0].output == ""
    spans = {name: [float(x) for x in r.output.split()] for name, r in results.items()}
    assert all(r.exit_code == 0 for r in results.values()), results
    assert spans["first"][1] <= spans["second"][0], spans  # one after the other
    assert sandbox_slots.running == 0


@pytest.mark.parametrize("mode", MODES_HERE)
def test_a_workspace_nested_too_deep_is_read_and_removed(mode: Mode) -> None:
    """A command cannot make the copy back out of its tmpfs, `files()` or the removal of the
    workspace fail by nesting directories deeper than Python recurses: what lies deeper than
    100 levels is left out, the rest comes back, and the workspace is removed."""
    with Sandbox({}, SandboxLimits(wall_seconds=30.0), mode=mode, weakest=mode) as box:
        result = box.run("echo top > top.txt; "
                         "i=0; while [ $i -lt 1200 ]; do mkdir d && cd d || exit 3; "
                         "i=$((i + 1)); done; echo deep > deep.txt")
        files = box.files()
        workspace = box.path
    assert result.exit_code == 0, result.output
    assert files == {"top.txt": "top\n"}
    assert not workspace.exists()
