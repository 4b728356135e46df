"""A throwaway workspace in which a coding job runs commands written by a model (untrusted code).

`with Sandbox(files, limits) as box: result = box.run("pytest -q"); files = box.files()`

Modules: `model` (limits, results, modes, errors), `detect` (which modes work here), `launcher`
(the stdlib-only package that runs as PID 1 of each run: `kernel`, `mounts`, `run`), `execute`
(a run from the parent's side: output, wall clock, cancel, tearing the tree down), `cgroups`,
`box` (the Sandbox API).

Every `run` starts `/bin/sh -c COMMAND` in the workspace (a fresh temporary directory, mode 0700)
under the launcher, with:

* an environment of its own: nothing of the parent's is passed on. The command sees PATH (the
  bin directory of the running Python, so that `python` and `pytest` are this interpreter's,
  then /usr/local/bin:/usr/bin:/bin), HOME = the workspace, TMPDIR inside the workspace,
  LANG=C.UTF-8, PYTHONDONTWRITEBYTECODE=1 and USER/LOGNAME=sandbox (so `getpass` works);
* stdin from /dev/null, stdout and stderr interleaved through one pipe that a thread drains:
  the first `output_bytes` are kept, the rest is read and dropped (`output_truncated`); the
  pump stops when the run is torn down, even if an escaped process still holds the pipe;
* per process: RLIMIT_CPU (SIGXCPU, then SIGKILL a second later), RLIMIT_AS (`memory_bytes`),
  RLIMIT_FSIZE (a bigger write gets SIGXFSZ), RLIMIT_NPROC, RLIMIT_CORE=0; no_new_privs;
* for the whole tree, summed by the launcher every 0.1 s: CPU time past `cpu_seconds` or
  memory (proportional set size) past `memory_bytes` kills every process of the run (`limit`
  says which, `exit_code` is -9);
* a wall clock: at `wall_seconds` the launcher kills every process of the run (`timed_out`,
  exit_code None); `cancelled()`, asked every 0.1 s, does the same at once (`cancelled`);
  5 s past the wall clock the parent kills the tree itself, whatever became of the launcher;
* at most `sandbox_max_concurrent` runs at once per process: more wait their turn.

`exit_code` is the shell's: a command killed by signal N gives 128+N when the shell forked it
(dash does so even for a lone command), -N when it had replaced the shell (`exec cmd`).

How much more holds depends on the mode. By default a Sandbox gets the strongest that works
here (`isolation()`, found once per process by starting `true` each way), and refuses to be
made (SandboxUnavailable) when that is weaker than the `AGENTQ_SANDBOX_WEAKEST_MODE` setting
(default `userns`): nothing falls back silently.

``root`` (the process is root and util-linux `unshare` works; the production case). `unshare
--net --pid --mount --ipc --uts --fork --kill-child` starts the launcher as PID 1 of a new PID
namespace: when it exits or is killed, the kernel kills every process of the namespace, also
those that left the process group or the session. In the new mount namespace the launcher
  - covers /root, /home, /tmp, /var/tmp, /run, /mnt, /media, /srv, the temp directory and the
    caller's home with empty read-only tmpfs, and mounts back read-only only the running
    Python's directories (prefix, base prefix, directory of the real executable): other users'
    files, other sandboxes' workspaces and the sockets under /run and /tmp (the local Postgres
    socket, for one) are not there;
  - mounts a tmpfs of `disk_bytes` where the workspace is (the disk quota: a write past it
    fails with ENOSPC), copies the workspace in before the command and back out once every
    process of the run has ended (regular files, directories and symbolic links; no set-id
    bits; at most `disk_bytes` of files, each counted at its full size rounded up to a page,
    so that sparse files and hard links cannot write more than the quota to the host's disk:
    files past it are left out). While a command runs, `path` shows the workspace as it was
    before; a run that is cancelled, or that the parent had to kill, leaves it so;
  - remounts every other mount read-only and nosuid, and gives the run a private /dev/shm of
    at most 64 MiB;
  - mounts a /proc of the new PID namespace (host processes, the parent's included, are not
    visible) and brings up the namespace's own loopback: the command may listen on and talk to
    127.0.0.1 inside, while the host's 127.0.0.1 services (Redis, Postgres) and every other
    network are unreachable.
  The command then runs as a uid/gid of its own: random in a high range (no account), one per
  Sandbox, no supplementary groups, no capabilities. That makes RLIMIT_NPROC bind (root is
  exempt from it) and count only this sandbox's processes, keeps root-only files unreadable, and
  lets the parent kill every process of that uid when the run ends. It runs inside a user
  namespace of its own (only its uid mapped; other owners show as nobody) whose
  `max_user_namespaces` is 0: in a user namespace the command could mount a tmpfs of any size,
  files past the quota in memory that no limit counts. Where the cgroup v1 (or v2)
  memory and pids controllers are writable, each run also gets a cgroup that caps the memory of
  all its processes together at `memory_bytes` (an OOM kill there ends the run as `memory`)
  and their number. About the interpreter: the running Python may live where that uid cannot
  read (e.g. a pyenv install in root's home, mode 0700). Running the command as root is out of
  the question and changing the host's permissions is not the sandbox's business, so the
  launcher (root, inside the mount namespace) exposes exactly the interpreter's directories
  read-only, as described above.

``userns`` (not root; unprivileged user namespaces allowed). The same namespaces, mounts and
quota, made inside a new user namespace where the caller is mapped to root (`unshare --user
--map-root-user ...`). The command then enters a nested user namespace where it is the caller's
uid without capabilities over those mounts, so it cannot undo them; that namespace allows no
user namespace below it (so no mounts of its own either). Gives up: a separate uid
(files outside the workspace are read-only, the caller's home is hidden except the
interpreter's directories) and the cgroup; RLIMIT_NPROC counts the namespace's processes only
(per-user-namespace accounting, kernels >= 5.14).

``netns`` (user namespaces allowed, mounts in them not: `unshare --user --map-root-user --net
--pid ...`). The network is isolated and the launcher is PID 1 of its own PID namespace, so the
tree still ends with it. Gives up the file system and process isolation: the command can read
and write whatever the caller can (no quota), and see the caller's processes in /proc (their
/proc/PID/environ, the worker's database URL with its password among them, is readable).

``plain`` (no namespaces, e.g. a container whose seccomp profile forbids them, or Ubuntu's
AppArmor restriction on user namespaces). Environment, rlimits, tree limits, wall clock and
cleanup only; `network_isolated` is False: the command reaches the network and the host's
localhost services, and reads and writes everything the caller can. As RLIMIT_NPROC counts all
of the caller's processes, it is set to the caller's current count plus `processes`. The
launcher is a child subreaper: processes that leave the group or the session are re-parented to
it and killed when the command ends, and the parent kills every descendant it saw. A root
caller still runs the command as a uid of its own (and kills by that uid; the interpreter must
be readable by it); otherwise a command that kills its launcher at once can leave processes
the parent never saw running.

Not isolated in any mode: the kernel itself (namespaces are not a VM) and the CPU share (a run
uses as many cores as it forks processes, within its CPU time). World-readable files of the
host (/etc, /usr, the project's sources) remain readable (read-only). The tree's memory is
summed every 0.1 s (a fast allocator can pass the limit in between, by at most `memory_bytes`
per process: RLIMIT_AS), and capped exactly only by a cgroup (mode `root`).
"""

from agents.sandbox.box import Sandbox, host_refusal, slots
from agents.sandbox.detect import available_modes, describe, isolation, probe
from agents.sandbox.model import (
    GIVES_UP,
    MODES,
    WEAKEST_MODE_SETTING,
    Isolation,
    Limit,
    Mode,
    SandboxError,
    SandboxLimits,
    SandboxResult,
    SandboxUnavailable,
    refusal,
)

__all__ = [
    "GIVES_UP",
    "MODES",
    "WEAKEST_MODE_SETTING",
    "Isolation",
    "Limit",
    "Mode",
    "Sandbox",
    "SandboxError",
    "SandboxLimits",
    "SandboxResult",
    "SandboxUnavailable",
    "available_modes",
    "describe",
    "host_refusal",
    "isolation",
    "probe",
    "refusal",
    "slots",
]
