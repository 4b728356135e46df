"""The sandbox for untrusted commands: the normal path works, and escapes are tried and refused.

Needs no Redis, Postgres or model server. What a test can demand depends on what the machine
allows (`isolation()`); a guarantee the machine cannot give is skipped with the reason, and the
flags that report it are checked instead. Escapes, tree limits and the refusal of weak modes
are tried in test_sandbox_escapes.py, test_sandbox_limits.py and test_sandbox_policy.py.
"""

from __future__ import annotations

import os
import resource
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agents.sandbox import Sandbox, SandboxLimits, SandboxResult, isolation
from core.settings import get_settings

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")

PROJECT = Path(__file__).resolve().parents[1]
PY = Path(sys.executable).name  # found through the sandbox's PATH (this interpreter's bin dir)
FAST = SandboxLimits(cpu_seconds=5, wall_seconds=10.0)
ALLOWED_ENV = {"PATH", "HOME", "TMPDIR", "LANG", "PYTHONDONTWRITEBYTECODE", "USER", "LOGNAME",
               "PWD", "SHLVL", "OLDPWD", "_"}

CALC = {
    "calc.py": "def add(a, b): return a + b\n",
    "test_calc.py": "from calc import add\ndef test_add(): assert add(2, 3) == 5\n",
}


def processes_with(marker: str) -> list[str]:
    """Command lines of live (non-zombie) processes that contain `marker`, this one excluded."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmdline:
            found.append(f"{pid}: {cmdline}")
    return found


def is_signal_death(result: SandboxResult, *signals: int) -> bool:
    """Killed by one of `signals`: -N when the command itself died, 128+N when a shell ran it."""
    codes = {-s for s in signals} | {128 + s for s in signals}
    return result.exit_code in codes


@pytest.fixture(autouse=True)
def any_mode(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """These tests check what this machine's strongest mode gives, whichever it is (and skip
    what it cannot give); the refusal of weak modes is tried in test_sandbox_policy.py."""
    monkeypatch.setenv("AGENTQ_SANDBOX_WEAKEST_MODE", "plain")
    get_settings.cache_clear()
    yield
    monkeypatch.undo()
    get_settings.cache_clear()


@pytest.fixture
def box() -> Iterator[Sandbox]:
    with Sandbox({}, FAST) as sandbox:
        yield sandbox


# -- the normal path -------------------------------------------------------------------------


def test_runs_a_repositorys_tests_and_returns_its_files() -> None:
    with Sandbox(CALC) as sandbox:
        workspace = sandbox.path
        assert workspace.is_dir()
        result = sandbox.run(f"{PY} -m pytest -q")
        assert result.exit_code == 0, result.output
        assert "1 passed" in result.output
        assert not result.timed_out
        assert not result.output_truncated
        assert result.network_isolated == isolation().network

        sandbox.write({"pkg/notes.txt": "written later\n"})
        sandbox.run("printf 'made inside\\n' > made.txt; printf '\\000\\001' > blob.bin")
        files = sandbox.files()
    assert files == {**CALC, "pkg/notes.txt": "written later\n", "made.txt": "made inside\n"}
    assert not workspace.exists(), "the workspace is removed on exit"


def test_files_respects_max_bytes() -> None:
    with Sandbox({"a.txt": "a" * 600, "b.txt": "b" * 600, "c.txt": "c" * 100}) as sandbox:
        files = sandbox.files(max_bytes=1000)
    assert files == {"a.txt": "a" * 600, "c.txt": "c" * 100}


# -- secrets ---------------------------------------------------------------------------------


def test_environment_is_cleared(monkeypatch: pytest.MonkeyPatch, box: Sandbox) -> None:
    monkeypatch.setenv("AGENTQ_SECRET_TEST", "x")
    result = box.run("env")
    assert result.exit_code == 0, result.output
    names = {line.split("=", 1)[0] for line in result.output.splitlines() if "=" in line}
    assert "AGENTQ_SECRET_TEST" not in names
    assert names <= ALLOWED_ENV, f"unexpected variables: {names - ALLOWED_ENV}"
    assert f"HOME={box.path}" in result.output.splitlines()
    assert f"TMPDIR={box.path}/" in result.output
    assert "LANG=C.UTF-8" in result.output.splitlines()
    assert "PYTHONDONTWRITEBYTECODE=1" in result.output.splitlines()


def test_parent_environ_is_not_readable(box: Sandbox) -> None:
    where = isolation()
    if not (where.processes or where.separate_user):
        pytest.skip(f"mode {where.mode}: the command runs as this user in this PID namespace")
    # /proc/PID/environ shows a process's initial environment: start one with a secret in it.
    holder = subprocess.Popen(["sleep", "30"], env={**os.environ, "AGENTQ_SECRET_TEST": "x"})
    try:
        own = Path(f"/proc/{os.getpid()}/environ").read_bytes().split(b"\0")[0].decode()
        environ = Path(f"/proc/{holder.pid}/environ")
        deadline = time.monotonic() + 5
        while not environ.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.01)  # empty until its exec has set up the new memory
        assert b"AGENTQ_SECRET_TEST=x" in environ.read_bytes()
        result = box.run(f"cat /proc/{holder.pid}/environ; cat /proc/{os.getpid()}/environ")
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code != 0
    assert "AGENTQ_SECRET_TEST" not in result.output
    assert own not in result.output


def test_runs_as_a_user_of_its_own_when_root(box: Sandbox) -> None:
    if not isolation().separate_user:
        pytest.skip("not root: the command runs as the calling user")
    result = box.run("id -u; id -G; cat /etc/shadow")
    lines = result.output.splitlines()
    assert lines[0] not in ("0", str(os.getuid()))
    assert lines[1] == lines[0], "no supplementary groups"
    assert "root:" not in result.output
    assert result.exit_code != 0


# -- the file system -------------------------------------------------------------------------


def test_writing_outside_the_workspace_fails(box: Sandbox) -> None:
    if not isolation().filesystem:
        pytest.skip(f"mode {isolation().mode}: no mount namespace, host is writable")
    tag = secrets.token_hex(6)
    targets = [
        Path(tempfile.gettempdir()) / f"outside-{tag}",
        PROJECT / f"outside-{tag}",
        box.path.parent / f"outside-parent-{tag}",
        Path.home() / f"outside-home-{tag}",
    ]
    commands = [f"echo x > {targets[0]}", f"touch {targets[1]}",
                f"echo x > ../outside-parent-{tag}", f"touch {targets[3]}"]
    try:
        for command, target in zip(commands, targets, strict=True):
            result = box.run(command)
            assert result.exit_code != 0, f"{command!r} succeeded: {result.output}"
            assert not target.exists(), f"{command!r} created {target}"
        inside = box.run("echo x > inside.txt && cat inside.txt")
        assert inside.exit_code == 0, inside.output
        assert (box.path / "inside.txt").read_text() == "x\n"
    finally:
        for target in targets:
            target.unlink(missing_ok=True)


def test_huge_file_is_cut_at_the_file_size_limit() -> None:
    limits = SandboxLimits(file_bytes=16 * 1024 * 1024, cpu_seconds=10, wall_seconds=20.0)
    with Sandbox({}, limits) as sandbox:
        result = sandbox.run("dd if=/dev/zero of=big bs=1M count=100")
        big = sandbox.path / "big"
        assert is_signal_death(result, signal.SIGXFSZ), (result.exit_code, result.output)
        assert big.stat().st_size <= limits.file_bytes
        workspace = sandbox.path
    assert not workspace.exists()


# -- the network -----------------------------------------------------------------------------


def test_network_is_unreachable(box: Sandbox) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        socket.create_connection(("127.0.0.1", port), timeout=2).close()  # reachable from here
        probe = (
            "import socket\n"
            f"for port in ({port}, 6379, 5432):\n"
            "    try:\n"
            "        socket.create_connection(('127.0.0.1', port), timeout=3).close()\n"
            "        print(port, 'CONNECTED')\n"
            "    except OSError as exc:\n"
            "        print(port, 'failed', exc)\n"
        )
        box.write({"probe.py": probe})
        result = box.run(f"{PY} probe.py")
    if not isolation().network:
        assert result.network_isolated is False
        pytest.skip(f"mode {isolation().mode}: no network namespace here")
    assert result.network_isolated is True
    assert result.exit_code == 0, result.output
    assert "CONNECTED" not in result.output
    for target in (port, 6379, 5432):
        assert f"{target} failed" in result.output


# -- processes, CPU and output -----------------------------------------------------------------


@pytest.mark.parametrize("bomb", [
    # dash does not take ':' as a function name; this is the classic bomb under another name.
    # The first shell stays while the bomb grows, so that it meets the limit.
    "MARK={marker}; bomb() {{ bomb | bomb & }}; bomb; sleep 3",
    PY + " -c 'import os, time  # MARK={marker}\n"
    "while True:\n"
    "    try:\n"
    "        os.fork()\n"
    "    except OSError:\n"
    "        print(\"fork failed\", flush=True)\n"
    "        time.sleep(0.05)\n'",
], ids=["sh", "python"])
def test_fork_bomb_is_contained(bomb: str) -> None:
    marker = f"bomb-{secrets.token_hex(6)}"
    limits = SandboxLimits(processes=32, cpu_seconds=5, wall_seconds=4.0)
    with Sandbox({}, limits) as sandbox:
        result = sandbox.run(bomb.format(marker=marker))
        assert result.duration_s < limits.wall_seconds + 4
        assert "fork" in result.output.lower(), "forks were refused: the limit bound"
        if "os.fork" in bomb:
            assert result.timed_out, "it forks forever: only the wall clock ends it"
        assert processes_with(marker) == []
    started = time.monotonic()
    assert os.system("true") == 0
    assert time.monotonic() - started < 5.0, "the machine stays responsive"
    assert processes_with(marker) == []


def test_leftover_processes_are_killed(box: Sandbox) -> None:
    marker = f"leftover-{secrets.token_hex(6)}"
    result = box.run(f"sh -c 'sleep 60 # {marker}' & setsid sh -c 'sleep 60 # {marker}' & "
                     "sleep 0.2; echo started")
    assert result.exit_code == 0, result.output
    assert "started" in result.output
    assert processes_with(marker) == []


def test_infinite_loop_ends_by_cpu_limit() -> None:
    limits = SandboxLimits(cpu_seconds=2, wall_seconds=15.0)
    with Sandbox({}, limits) as sandbox:
        result = sandbox.run(f"{PY} -c 'while True: pass'")
    assert result.exit_code != 0
    assert result.timed_out or is_signal_death(result, signal.SIGXCPU, signal.SIGKILL), result
    assert result.duration_s < 10


def test_wall_clock_timeout_kills_the_command() -> None:
    marker = f"sleeper-{secrets.token_hex(6)}"
    limits = SandboxLimits(wall_seconds=1.5)
    with Sandbox({}, limits) as sandbox:
        result = sandbox.run(f"sleep 30 # {marker}")
        assert result.timed_out
        assert result.exit_code is None
        assert 1.5 <= result.duration_s < 6
        assert processes_with(marker) == []


def test_huge_output_is_truncated_without_blowing_memory() -> None:
    limits = SandboxLimits(output_bytes=64 * 1024, wall_seconds=2.0, cpu_seconds=10)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    with Sandbox({}, limits) as sandbox:
        endless = sandbox.run("yes")
        finite = sandbox.run(f"{PY} -c \"import sys\nfor _ in range(50000): "
                             "sys.stdout.write('z' * 999 + '\\n')\"")
        small = sandbox.run("echo hello")
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert endless.timed_out
    assert endless.output_truncated
    assert len(endless.output.encode()) == limits.output_bytes
    assert endless.output.startswith("y\ny\n")
    assert finite.exit_code == 0, "the child was drained, not blocked"
    assert finite.output_truncated
    assert len(finite.output.encode()) == limits.output_bytes
    assert small.output == "hello\n"
    assert not small.output_truncated
    assert grown_mib < 32


# -- path validation in write() --------------------------------------------------------------


@pytest.mark.parametrize(("name", "message"), [
    ("/etc/passwd", "absolute"),
    ("../escape.txt", r"'\.\.'"),
    ("a/../../escape.txt", r"'\.\.'"),
    ("", "non-empty"),
    (".", "workspace itself"),
])
def test_write_refuses_bad_paths(box: Sandbox, name: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        box.write({name: "x"})


def test_write_refuses_symlink_escapes(box: Sandbox, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (box.path / "dir-link").symlink_to(outside)
    (box.path / "file-link").symlink_to(outside / "target.txt")
    made = box.run("ln -s /etc etc-link")  # the command can make links too
    assert made.exit_code == 0, made.output
    for name in ("dir-link/x.txt", "file-link", "etc-link/passwd-copy", "etc-link/hostname"):
        with pytest.raises(ValueError, match="symlink"):
            box.write({name: "x"})
    assert list(outside.iterdir()) == []
    assert not Path("/etc/passwd-copy").exists()


def test_write_is_all_or_nothing(box: Sandbox) -> None:
    with pytest.raises(ValueError, match="absolute"):
        box.write({"fine.txt": "1", "/abs.txt": "2"})
    assert not (box.path / "fine.txt").exists()


def test_files_does_not_follow_symlinks(box: Sandbox, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("do not leak\n")
    (box.path / "leak.txt").symlink_to(secret)
    box.run(f"ln -s {secret} leak2.txt; ln -s /etc/hostname host.txt; mkfifo pipe")
    box.write({"real.txt": "ok\n"})
    assert box.files() == {"real.txt": "ok\n"}
