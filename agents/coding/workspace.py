"""A coding job's workspace: its files as a mapping (path -> text), the checks every path and
size goes through, the strict file format of the fixed-format coder, diffs, and one run of a
command over the files in the sandbox.

The workspace is never a directory that outlives a step: each command runs in a throwaway
sandbox made from the mapping, so a step that is run again rebuilds the very same files from
its start and the tool calls it replays.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping

from pydantic import BaseModel, Field

from agents.base import AgentError, StepContext, StepStopped
from agents.sandbox import Sandbox, SandboxLimits, SandboxUnavailable
from agents.sandbox.execute import TMP_DIR
from core.settings import get_settings

MAX_FILES = 200
MAX_FILE_BYTES = 200_000
MAX_TOTAL_BYTES = 1_000_000
REPORT_CHARS = 4000
MAX_NAME_BYTES = 255  # one part of a path (the file systems' limit)
MAX_PATH_BYTES = 1024
MAX_PATH_DEPTH = 64

FILE_BLOCK = re.compile(r"^=== FILE: (?P<path>[^\n=]+?) ===\n(?P<body>.*?)^=== END FILE ===$",
                        re.MULTILINE | re.DOTALL)
# Durations in test reports ("1 passed in 0.03s", "Ran 2 tests in 0.001s"): shown to the model
# without their figures, so that a step run again sees the same report and its model calls
# replay from the ledger.
DURATION = re.compile(r"\b(in|took) \d+(?:\.\d+)?\s?(s|ms|seconds)\b")


class SandboxRefused(AgentError):
    """This worker cannot isolate the job's commands as the operator requires."""

    code = "sandbox_unavailable"


def check_path(path: str) -> str:
    """A workspace-relative path: no absolute paths, no `..`, no empty parts; each part, the
    whole and its depth within what a workspace can hold; not the sandbox's own directory."""
    p = path.strip()
    parts = p.split("/")
    if not p or p.startswith("/") or "\\" in p or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"{path[:200]!r} is not a relative path inside the repository")
    if any(len(part.encode("utf-8")) > MAX_NAME_BYTES for part in parts):
        raise ValueError(f"{path[:200]!r}: a name in it is longer than {MAX_NAME_BYTES} bytes")
    if len(p.encode("utf-8")) > MAX_PATH_BYTES or len(parts) > MAX_PATH_DEPTH:
        raise ValueError(f"{path[:200]!r}: longer than {MAX_PATH_BYTES} bytes or deeper than "
                         f"{MAX_PATH_DEPTH} folders")
    if parts[0] == TMP_DIR:
        raise ValueError(f"{path[:200]!r}: {TMP_DIR} is the sandbox's own directory")
    return p


def check_tree(paths: Iterable[str]) -> None:
    """No path is both a file and a folder of another (`a` and `a/b`)."""
    files = set(paths)
    for path in files:
        parts = path.split("/")
        for i in range(1, len(parts)):
            folder = "/".join(parts[:i])
            if folder in files:
                raise ValueError(f"{folder[:200]!r} is both a file and the folder of "
                                 f"{path[:200]!r}")


def check_sizes(files: Mapping[str, str]) -> None:
    """Within the limits of a workspace: files, bytes each, bytes in all."""
    if len(files) > MAX_FILES:
        raise ValueError(f"more than {MAX_FILES} files")
    total = 0
    for path, content in files.items():
        size = len(content.encode("utf-8"))
        if size > MAX_FILE_BYTES:
            raise ValueError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
        total += size
    if total > MAX_TOTAL_BYTES:
        raise ValueError(f"the files add up to more than {MAX_TOTAL_BYTES} bytes")


def parse_files(text: str) -> dict[str, str] | None:
    """Whole files in the strict format; None when the answer holds none or a bad path."""
    found: dict[str, str] = {}
    for m in FILE_BLOCK.finditer(text):
        try:
            path = check_path(m.group("path"))
        except ValueError:
            return None
        found[path] = m.group("body")
    if not found or len(found) > MAX_FILES:
        return None
    if sum(len(b.encode("utf-8")) for b in found.values()) > MAX_TOTAL_BYTES:
        return None
    return found


def render_files(files: Mapping[str, str]) -> str:
    return "".join(f"=== FILE: {path} ===\n{body}{'' if body.endswith(chr(10)) else chr(10)}"
                   "=== END FILE ===\n" for path, body in sorted(files.items()))


def unified_diff(before: Mapping[str, str], after: Mapping[str, str]) -> str:
    out: list[str] = []
    for path in sorted(set(before) | set(after)):
        old, new = before.get(path), after.get(path)
        if old == new:
            continue
        out.extend(difflib.unified_diff(
            (old or "").splitlines(keepends=True), (new or "").splitlines(keepends=True),
            fromfile=f"a/{path}" if old is not None else "/dev/null",
            tofile=f"b/{path}" if new is not None else "/dev/null"))
    return "".join(line if line.endswith("\n") else line + "\n" for line in out)


class CommandRun(BaseModel):
    """One command over the workspace in the sandbox."""

    passed: bool
    exit_code: int | None
    timed_out: bool
    report: str
    output_truncated: bool
    duration_s: float
    network_isolated: bool
    limit: str | None = Field(default=None, description="The limit of the whole process tree "
                                                        "that ended the command: cpu or memory.")


def sandbox_limits() -> SandboxLimits:
    settings = get_settings()
    return SandboxLimits(cpu_seconds=settings.sandbox_cpu_seconds,
                         wall_seconds=settings.sandbox_wall_seconds,
                         disk_bytes=settings.sandbox_disk_bytes)


def run_command(ctx: StepContext, files: Mapping[str, str], command: str) -> CommandRun:
    """Run `command` over a copy of `files` in the sandbox (the worker's mode and limits);
    what it writes is thrown away. The job stopping ends it at once (StepStopped)."""
    try:
        with Sandbox(dict(files), sandbox_limits()) as box:
            result = box.run(command, cancelled=ctx.stopped)
    except SandboxUnavailable as exc:
        raise SandboxRefused(str(exc)) from exc
    if result.cancelled:
        raise StepStopped("the job stopped while a command ran in the sandbox")
    return CommandRun(passed=result.exit_code == 0, exit_code=result.exit_code,
                      timed_out=result.timed_out, report=result.output[-REPORT_CHARS * 4:],
                      output_truncated=result.output_truncated,
                      duration_s=round(result.duration_s, 3),
                      network_isolated=result.network_isolated, limit=result.limit)


def steady(report: str) -> str:
    """A report as the model is shown it: without its timings (see DURATION)."""
    return DURATION.sub(lambda m: f"{m.group(1)} [time]", report)
