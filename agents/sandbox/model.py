"""The sandbox's public types: limits, results, modes and errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

Mode = Literal["root", "userns", "netns", "plain"]
# Strongest first.
MODES: tuple[Mode, ...] = get_args(Mode)

# What each mode gives up, against `root` (the operator reads these in errors and logs).
GIVES_UP: dict[Mode, str] = {
    "root": "nothing",
    "userns": "a uid of its own and the cgroup limits (the command runs as the worker's uid, "
              "inside namespaces)",
    "netns": "the file system and process isolation: the command can read and write whatever "
             "the worker's user can, including the worker's environment (its database URL and "
             "secrets) and other jobs' workspaces; and the disk quota",
    "plain": "every isolation: the command reads and writes whatever the worker's user can "
             "(the worker's environment with its database URL and secrets, other jobs' "
             "workspaces; a root worker runs it as a uid of its own, which reads what any "
             "user can), reaches the network and the host's local services, has no disk "
             "quota, and (unless the worker is root) can leave processes running by killing "
             "its launcher at once",
}


def stronger_or_equal(mode: Mode, weakest: Mode) -> bool:
    return MODES.index(mode) <= MODES.index(weakest)


@dataclass(frozen=True)
class SandboxLimits:
    cpu_seconds: int = 30  # CPU time of each process, and of the whole tree together
    memory_bytes: int = 1024 * 1024 * 1024  # address space per process; PSS of the tree
    file_bytes: int = 16 * 1024 * 1024  # the largest file
    disk_bytes: int = 256 * 1024 * 1024  # the workspace's quota (modes with a mount namespace)
    processes: int = 64
    wall_seconds: float = 60.0
    output_bytes: int = 64 * 1024  # stdout+stderr kept (the rest is dropped, flagged)


# How a run ended when a limit of the whole tree ended it: `SandboxResult.limit`.
Limit = Literal["cpu", "memory"]


@dataclass(frozen=True)
class SandboxResult:
    exit_code: int | None  # None on timeout or cancel; -N when killed by signal N
    output: str  # stdout and stderr interleaved, truncated to output_bytes
    timed_out: bool
    output_truncated: bool
    duration_s: float
    network_isolated: bool
    # The tree passed its CPU time or memory limit and was killed (exit_code -9).
    limit: Limit | None = None
    cancelled: bool = False  # ended by the caller's cancel check


@dataclass(frozen=True)
class Isolation:
    """What a mode gives; see the package docstring for each mode."""

    mode: Mode
    network: bool  # the command has a network namespace of its own
    filesystem: bool  # host read-only, homes, /tmp and /run hidden, workspace a quota'd tmpfs
    processes: bool  # host processes invisible (a PID namespace with its own /proc)
    separate_user: bool  # the command runs as a uid of its own
    contained: bool  # every process of a run ends with it (PID namespace or separate uid)
    reason: str = ""  # why stronger modes were not used

    @property
    def gives_up(self) -> str:
        return GIVES_UP[self.mode]


class SandboxError(RuntimeError):
    """The sandbox itself could not be set up (not a failure of the command)."""


class SandboxUnavailable(SandboxError):
    """This machine cannot isolate commands as well as the operator requires."""


WEAKEST_MODE_SETTING = "AGENTQ_SANDBOX_WEAKEST_MODE"


def refusal(found: Isolation, weakest: Mode) -> str | None:
    """Why commands must not run here (None: the mode found is allowed)."""
    if stronger_or_equal(found.mode, weakest):
        return None
    why = f" ({found.reason})" if found.reason else ""
    return (f"this machine cannot isolate untrusted commands: its sandbox can only run in "
            f"mode '{found.mode}'{why}, which gives up {found.gives_up}. The weakest mode "
            f"allowed is '{weakest}' ({WEAKEST_MODE_SETTING}). Run the worker as root (mode "
            f"'root') or as a user allowed unprivileged user namespaces (mode 'userns'), or "
            f"accept the weaker mode with {WEAKEST_MODE_SETTING}={found.mode}.")


def as_mode(value: str) -> Mode:
    for mode in MODES:
        if mode == value:
            return mode
    raise ValueError(f"unknown sandbox mode {value!r}; one of {', '.join(MODES)}")
