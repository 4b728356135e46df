"""Coding jobs: plan, write, test in a sandbox, revise with the test report, until the tests
pass, the rounds run out or the budget does.

Input: a task, the repository's files (path -> text) and the command that runs its tests. Steps:
`plan` (the model outlines the change), then per round `write-N` (the model returns whole files
in a strict format, validated; an answer that does not parse is asked of a larger model where
the catalogue has one) and `test-N` (the test command in a sandbox: its own process tree,
workspace, limits, no network, no secrets). A failing `test-N` adds the next round. The result
holds the final files, a unified diff against the input, the last test report and `passed`.

A worker whose sandbox cannot isolate the command (see `AGENTQ_SANDBOX_WEAKEST_MODE`) fails the
job with `sandbox_unavailable` before any model call; while every worker that is up is such a
worker, the API refuses coding jobs with a 422 that says so.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agents.archives import ArchiveLimits, unpack_archive
from agents.base import (
    AgentError,
    CallSpec,
    Deployment,
    JobKind,
    Role,
    StepContext,
    StepOutputs,
    StepSpec,
    StepStopped,
    SubmissionContext,
)
from agents.sandbox import Sandbox, SandboxLimits, SandboxUnavailable, host_refusal
from agents.sandbox.execute import TMP_DIR
from core.errors import InvalidInput
from core.settings import get_settings

MAX_FILES = 200
MAX_FILE_BYTES = 200_000
MAX_TOTAL_BYTES = 1_000_000
REPORT_CHARS = 4000

FILE_BLOCK = re.compile(r"^=== FILE: (?P<path>[^\n=]+?) ===\n(?P<body>.*?)^=== END FILE ===$",
                        re.MULTILINE | re.DOTALL)


MAX_NAME_BYTES = 255  # one part of a path (the file systems' limit)
MAX_PATH_BYTES = 1024
MAX_PATH_DEPTH = 64


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


class CodingInput(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "task": "Make add() return the sum of its arguments.",
        "files": {"calc.py": "def add(a, b):\n    return a - b\n",
                  "test_calc.py": "from calc import add\n\ndef test_add():\n"
                                  "    assert add(2, 3) == 5\n"},
        "test_command": "python -m pytest -q", "max_rounds": 3}]})

    task: str = Field(min_length=1, max_length=20_000)
    files: dict[str, str] = Field(default_factory=dict, max_length=MAX_FILES,
                                  description="The repository: path -> file content (text).")
    test_command: str = Field(default="python -m pytest -q", min_length=1, max_length=500)
    max_rounds: int = Field(default=3, ge=1, le=10,
                            description="Write-and-test rounds at most (the budget may stop "
                                        "the job earlier).")
    archive: str | None = Field(
        default=None, max_length=1_400_000,
        description="A small repository as a base64-encoded .zip or .tar (.gz, .bz2, .xz); "
                    "its text files join `files` (which win on the same path). A single top "
                    "folder is dropped from the paths; binary files, folders and links inside "
                    "the repository are left out. Refused when it unpacks past the server's "
                    "caps (bytes, members, compression ratio) or is corrupt or unsafe.")

    @model_validator(mode="after")
    def _unpack(self) -> CodingInput:
        if self.archive is None:
            return self
        unpacked = unpack_archive(self.archive, ArchiveLimits.from_settings(MAX_FILE_BYTES))
        merged = {**{check_path(p): c for p, c in unpacked.items()}, **self.files}
        check_tree(merged)
        if len(merged) > MAX_FILES:
            raise ValueError(f"more than {MAX_FILES} files")
        if sum(len(v.encode("utf-8")) for v in merged.values()) > MAX_TOTAL_BYTES:
            raise ValueError(f"the files add up to more than {MAX_TOTAL_BYTES} bytes")
        self.files, self.archive = merged, None
        return self

    @field_validator("files")
    @classmethod
    def _check_files(cls, files: dict[str, str]) -> dict[str, str]:
        total = 0
        out = {}
        for path, content in files.items():
            size = len(content.encode("utf-8"))
            if size > MAX_FILE_BYTES:
                raise ValueError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
            total += size
            out[check_path(path)] = content
        if total > MAX_TOTAL_BYTES:
            raise ValueError(f"the files add up to more than {MAX_TOTAL_BYTES} bytes")
        check_tree(out)
        return out


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


INSTRUCTIONS = (
    "You are a careful software engineer. Change the repository so that the task is done and "
    "its tests pass. Answer with every file you change, each complete, in exactly this format "
    "and nothing else:\n=== FILE: path/to/file ===\n<the whole file>\n=== END FILE ===\n\n")


def write_prompt(task: str, plan: str, files: Mapping[str, str], report: str | None) -> str:
    # Shared part first (instructions, task, plan), so a job's rounds share a cached prefix.
    parts = [INSTRUCTIONS, f"Task: {task}\n\n"]
    if plan:
        parts.append(f"Plan: {plan}\n\n")
    parts.append(f"Repository:\n{render_files(files)}\n")
    if report:
        parts.append(f"The tests failed with this report:\n{report[-REPORT_CHARS:]}\n\n")
    parts.append("Changed files:\n")
    return "".join(parts)


def plan_prompt(task: str, files: Mapping[str, str]) -> str:
    listing = "\n".join(sorted(files)) or "(empty)"
    return (f"{INSTRUCTIONS}Task: {task}\n\nFiles:\n{listing}\n\n"
            "In two or three sentences, the plan of the change:\n")


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


class CodingResult(BaseModel):
    passed: bool
    rounds: int
    files: dict[str, str]
    diff: str = Field(description="Unified diff of the final files against the input.")
    test_report: str | None
    exit_code: int | None
    plan: str


class PlanNote(BaseModel):
    plan: str


class CoderOutput(BaseModel):
    round: int
    files: dict[str, str] = Field(description="The whole repository after this round.")
    plan: str
    changed: list[str]
    format_error: str | None = None
    answer: str | None = Field(default=None, description="The end of an unusable answer.")


class TestOutput(BaseModel):
    __test__ = False  # not a test class, whatever pytest thinks of its name

    round: int
    files: dict[str, str]
    plan: str
    passed: bool
    exit_code: int | None
    timed_out: bool
    report: str
    output_truncated: bool
    duration_s: float
    network_isolated: bool
    limit: str | None = Field(default=None, description="The limit of the whole process tree "
                                                        "that ended the tests: cpu or memory.")


class SandboxRefused(AgentError):
    """This worker cannot isolate the job's commands as the operator requires."""

    code = "sandbox_unavailable"


PLANNER = Role("planner", PlanNote, "planning")
CODER = Role("coder", CoderOutput, "writing")
TESTER = Role("tester", TestOutput, "testing")


class Coding(JobKind[CodingInput, CodingResult]):
    name = "coding"
    input_model = CodingInput
    result_model = CodingResult
    roles = (PLANNER, CODER, TESTER)

    def unavailable(self, deployment: Deployment) -> str | None:
        workers = deployment.worker_sandboxes()
        if workers and all(w.refusal for w in workers):
            return (f"no worker that is up can run coding jobs: {len(workers)} worker(s) up, "
                    f"and for instance {workers[0].worker}: {workers[0].refusal}")
        return None

    def check(self, ctx: SubmissionContext, job_input: CodingInput) -> None:
        reason = self.unavailable(ctx)
        if reason:
            raise InvalidInput(reason, code="sandbox_unavailable")

    def initial_steps(self, job_input: CodingInput) -> list[StepSpec]:
        settings = get_settings()
        return [StepSpec(key="plan", role=PLANNER, max_tokens=settings.planner_max_tokens),
                *self._round(1, ("plan",))]

    @staticmethod
    def _round(n: int, after: tuple[str, ...]) -> list[StepSpec]:
        settings = get_settings()
        return [
            StepSpec(key=f"write-{n}", role=CODER, max_tokens=settings.coder_max_tokens,
                     depends_on=after, input={"round": n}),
            # The tester makes no model call; its budget is unused.
            StepSpec(key=f"test-{n}", role=TESTER, max_tokens=1,
                     depends_on=(f"write-{n}",), input={"round": n}),
        ]

    def expand(self, job_input: CodingInput, step_key: str, role: Role[Any],
               output: BaseModel) -> list[StepSpec]:
        if not isinstance(output, TestOutput) or output.passed:
            return []
        if output.round >= job_input.max_rounds:
            return []
        return self._round(output.round + 1, (step_key,))

    def run_step(self, ctx: StepContext, job_input: CodingInput) -> BaseModel:
        # A worker that cannot isolate the tests fails the job before it spends a token.
        refused = host_refusal()
        if refused:
            raise SandboxRefused(refused)
        if ctx.role == PLANNER.name:
            reply = ctx.complete(CallSpec(prompt=plan_prompt(job_input.task, job_input.files),
                                          stop=["\n\n"]))
            return PlanNote(plan=reply.text.strip())
        if ctx.role == CODER.name:
            return self._write(ctx, job_input, int(ctx.step_input["round"]))
        if ctx.role == TESTER.name:
            return self._test(ctx, job_input, int(ctx.step_input["round"]))
        raise AgentError(f"coding jobs have no role {ctx.role!r}")

    @staticmethod
    def _previous(job_input: CodingInput, parents: StepOutputs
                  ) -> tuple[dict[str, str], str, str | None]:
        """The files, plan and test report a round starts from: the plan's, or the last
        round's test."""
        tested = parents.all(TESTER)
        if tested:
            return dict(tested[-1].files), tested[-1].plan, tested[-1].report
        return dict(job_input.files), parents.one(PLANNER).plan, None

    def _write(self, ctx: StepContext, job_input: CodingInput, n: int) -> CoderOutput:
        files, plan, report = self._previous(job_input, ctx.parents)
        prompt = write_prompt(job_input.task, plan, files, report)
        reply = ctx.complete(CallSpec(prompt=prompt,
                                      validate=lambda text: parse_files(text) is not None))
        changed = parse_files(reply.text)
        problem = None if changed else "the answer held no file in the required format"
        if changed:
            try:
                check_tree({**files, **changed})
            except ValueError as exc:
                problem = f"the answer's files do not fit the repository: {exc}"
        if changed is None or problem is not None:
            return CoderOutput(round=n, files=files, plan=plan, changed=[],
                               format_error=problem, answer=reply.text[-2000:])
        return CoderOutput(round=n, files={**files, **changed}, plan=plan,
                           changed=sorted(changed))

    def _test(self, ctx: StepContext, job_input: CodingInput, n: int) -> TestOutput:
        written = ctx.parents.one(CODER)
        settings = get_settings()
        limits = SandboxLimits(cpu_seconds=settings.sandbox_cpu_seconds,
                               wall_seconds=settings.sandbox_wall_seconds,
                               disk_bytes=settings.sandbox_disk_bytes)
        try:
            with Sandbox(written.files, limits) as box:
                result = box.run(job_input.test_command, cancelled=ctx.stopped)
        except SandboxUnavailable as exc:
            raise SandboxRefused(str(exc)) from exc
        if result.cancelled:
            raise StepStopped("the job stopped while its tests ran")
        return TestOutput(round=n, files=written.files, plan=written.plan,
                          passed=result.exit_code == 0, exit_code=result.exit_code,
                          timed_out=result.timed_out, report=result.output[-REPORT_CHARS * 4:],
                          output_truncated=result.output_truncated,
                          duration_s=round(result.duration_s, 3),
                          network_isolated=result.network_isolated, limit=result.limit)

    def result(self, job_input: CodingInput, outputs: StepOutputs) -> CodingResult:
        tests = sorted(outputs.all(TESTER), key=lambda t: t.round)
        writes = sorted(outputs.all(CODER), key=lambda w: w.round)
        last_test = tests[-1] if tests else None
        files = dict(job_input.files)
        if last_test is not None and last_test.files:
            files = dict(last_test.files)
        elif writes and writes[-1].files:
            files = dict(writes[-1].files)
        plan = outputs.get(PLANNER, "plan")
        return CodingResult(
            passed=last_test.passed if last_test else False, rounds=len(tests), files=files,
            diff=unified_diff(job_input.files, files),
            test_report=last_test.report if last_test else None,
            exit_code=last_test.exit_code if last_test else None,
            plan=plan.plan if plan else "")

    def partial_result(self, job_input: CodingInput, outputs: StepOutputs) -> dict[str, Any]:
        return {"partial": True, **self.result(job_input, outputs).model_dump(mode="json")}
