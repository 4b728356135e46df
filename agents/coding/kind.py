"""Coding jobs: change a repository until its tests pass.

Input: a task, the repository's files (path -> text, or an archive) and the command that runs
its tests. By default (`"coder": "loop"`) the coder is an agent loop (`agents.coding.agent`)
over tools that list, read and write the files and run the tests or a command in the sandbox;
`candidates` loops run in parallel as separate steps, the first whose tests pass decides the
job and the others are cancelled. A round that ends without passing starts the candidate's next
round (up to `max_rounds`) with its files and test report, one size class larger where the
catalogue has one. `"coder": "fixed"` keeps the plan / write / test rounds of
`agents.coding.fixed` for models that cannot drive a loop.

A worker whose sandbox cannot isolate the command (see `AGENTQ_SANDBOX_WEAKEST_MODE`) fails the
job with `sandbox_unavailable` before any model call; while every worker that is up is such a
worker, the API refuses coding jobs with a 422 that says so.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agents.archives import ArchiveLimits, unpack_archive
from agents.base import (
    AgentError,
    Deployment,
    JobKind,
    Role,
    StepContext,
    StepOutputs,
    StepSpec,
    SubmissionContext,
)
from agents.coding import fixed
from agents.coding.agent import CODER_AGENT, AttemptOutput, attempt
from agents.coding.workspace import (
    MAX_FILE_BYTES,
    MAX_FILES,
    MAX_TOTAL_BYTES,
    SandboxRefused,
    check_path,
    check_tree,
    unified_diff,
)
from agents.sandbox import host_refusal
from core.catalogue import get_catalogue
from core.errors import InvalidInput
from core.settings import get_settings


class CodingInput(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "task": "Make add() return the sum of its arguments.",
        "files": {"calc.py": "def add(a, b):\n    return a - b\n",
                  "test_calc.py": "from calc import add\n\ndef test_add():\n"
                                  "    assert add(2, 3) == 5\n"},
        "test_command": "python -m pytest -q", "candidates": 2, "max_rounds": 2}]})

    task: str = Field(min_length=1, max_length=20_000)
    files: dict[str, str] = Field(default_factory=dict, max_length=MAX_FILES,
                                  description="The repository: path -> file content (text).")
    test_command: str = Field(default="python -m pytest -q", min_length=1, max_length=500)
    coder: Literal["loop", "fixed"] = Field(
        default="loop", description="loop: the coder is an agent loop with tools; fixed: "
                                    "plan, then rounds of whole files in a strict format.")
    candidates: int = Field(default=1, ge=1, description="Coder loops run in parallel; the "
                            "first whose tests pass wins (at most AGENTQ_CODING_MAX_CANDIDATES; "
                            "loop only).")
    max_rounds: int = Field(default=3, ge=1, le=10,
                            description="Rounds at most: per candidate, loops (each under its "
                                        "step budget and turn limit); fixed, write-and-test "
                                        "rounds. The budget may stop the job earlier.")
    max_turns: int | None = Field(default=None, ge=2, le=100, description="Turns (model calls) "
                                  "of each loop round (default AGENTQ_CODER_TURN_LIMIT).")
    archive: str | None = Field(
        default=None, max_length=1_400_000,
        description="A small repository as a base64-encoded .zip or .tar (.gz, .bz2, .xz); "
                    "its text files join `files` (which win on the same path). A single top "
                    "folder is dropped from the paths; binary files, folders and links inside "
                    "the repository are left out. Refused when it unpacks past the server's "
                    "caps (bytes, members, compression ratio) or is corrupt or unsafe.")

    @model_validator(mode="after")
    def _unpack(self) -> CodingInput:
        most = get_settings().coding_max_candidates
        if self.candidates > most:
            raise ValueError(f"candidates: at most {most} (AGENTQ_CODING_MAX_CANDIDATES)")
        if self.candidates > 1 and self.coder != "loop":
            raise ValueError("candidates: more than one needs the loop coder")
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


class CandidateOutcome(BaseModel):
    candidate: int
    outcome: Literal["passed", "failed", "cancelled", "unfinished"] = Field(
        description="passed: its tests passed; failed: its rounds ran out; cancelled: another "
                    "candidate passed first; unfinished: the job stopped first.")
    rounds: int
    turns: int
    test_runs: int
    exit_code: int | None
    size: str | None


class CodingResult(BaseModel):
    passed: bool
    rounds: int
    files: dict[str, str]
    diff: str = Field(description="Unified diff of the final files against the input.")
    test_report: str | None
    exit_code: int | None
    plan: str = Field(description="fixed: the plan; loop: the coder's summary.")
    coder: Literal["loop", "fixed"] = "fixed"
    winner: int | None = Field(default=None, description="The candidate whose tests passed "
                                                         "first (loop).")
    candidates: list[CandidateOutcome] = Field(default_factory=list)


def _next_size(size: str | None) -> str | None:
    """The size class after `size` (None: the smallest there is), or `size` at the top."""
    catalogue = get_catalogue()
    current = size or catalogue.for_size(None)[0].size
    return catalogue.larger_than(current) or size


class Coding(JobKind[CodingInput, CodingResult]):
    name = "coding"
    input_model = CodingInput
    result_model = CodingResult
    roles = (fixed.PLANNER, fixed.CODER, fixed.TESTER, CODER_AGENT)

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

    def default_max_total_tokens(self, job_input: CodingInput) -> int | None:
        if job_input.coder == "fixed":
            return None
        return min(10_000_000, job_input.candidates * job_input.max_rounds
                   * get_settings().coder_step_tokens)

    @staticmethod
    def _attempt(job_input: CodingInput, candidate: int, n: int, after: tuple[str, ...],
                 size: str | None) -> StepSpec:
        settings = get_settings()
        return StepSpec(key=f"code-{candidate}-{n}", role=CODER_AGENT,
                        max_tokens=settings.coder_step_tokens, depends_on=after,
                        input={"candidate": candidate, "round": n, "size": size,
                               "turn_limit": job_input.max_turns or settings.coder_turn_limit})

    def initial_steps(self, job_input: CodingInput) -> list[StepSpec]:
        if job_input.coder == "fixed":
            return fixed.first_steps()
        return [self._attempt(job_input, k, 1, (), None)
                for k in range(1, job_input.candidates + 1)]

    def expand(self, job_input: CodingInput, step_key: str, role: Role[Any],
               output: BaseModel) -> list[StepSpec]:
        if isinstance(output, AttemptOutput):
            if output.passed or output.round >= job_input.max_rounds:
                return []
            return [self._attempt(job_input, output.candidate, output.round + 1, (step_key,),
                                  _next_size(output.size))]
        if not isinstance(output, fixed.TestOutput) or output.passed:
            return []
        if output.round >= job_input.max_rounds:
            return []
        return fixed.round_steps(output.round + 1, (step_key,))

    def decides(self, job_input: CodingInput, step_key: str, role: Role[Any],
                output: BaseModel) -> bool:
        return isinstance(output, AttemptOutput) and output.passed

    def run_step(self, ctx: StepContext, job_input: CodingInput) -> BaseModel:
        # A worker that cannot isolate the tests fails the job before it spends a token.
        refused = host_refusal()
        if refused:
            raise SandboxRefused(refused)
        n = int(ctx.step_input.get("round", 1))
        if ctx.role == CODER_AGENT.name:
            return self._code(ctx, job_input, int(ctx.step_input["candidate"]), n)
        if ctx.role == fixed.PLANNER.name:
            return fixed.plan(ctx, job_input.task, job_input.files)
        if ctx.role == fixed.CODER.name:
            return fixed.write(ctx, job_input.task, job_input.files, n)
        if ctx.role == fixed.TESTER.name:
            return fixed.run_round_tests(ctx, job_input.test_command, n)
        raise AgentError(f"coding jobs have no role {ctx.role!r}")

    @staticmethod
    def _code(ctx: StepContext, job_input: CodingInput, candidate: int, n: int
              ) -> AttemptOutput:
        before = ctx.parents.all(CODER_AGENT)
        files, report = (before[-1].files, before[-1].report) if before else \
            (job_input.files, None)
        size = ctx.step_input.get("size")
        return attempt(ctx, task=job_input.task, files=files,
                       test_command=job_input.test_command, candidate=candidate,
                       candidates=job_input.candidates, round_=n, report=report,
                       size=str(size) if size else None)

    def result(self, job_input: CodingInput, outputs: StepOutputs) -> CodingResult:
        if job_input.coder == "fixed":
            return self._fixed_result(job_input, outputs)
        return self._loop_result(job_input, outputs, stopped=False)

    def _loop_result(self, job_input: CodingInput, outputs: StepOutputs, stopped: bool
                     ) -> CodingResult:
        rounds: dict[int, list[AttemptOutput]] = {k: [] for k in
                                                  range(1, job_input.candidates + 1)}
        for out in outputs.all(CODER_AGENT):
            rounds.setdefault(out.candidate, []).append(out)
        winner = next((o for o in sorted(outputs.all(CODER_AGENT), key=lambda o: o.candidate)
                       if o.passed), None)
        outcomes = []
        for k, done in sorted(rounds.items()):
            done.sort(key=lambda o: o.round)
            last = done[-1] if done else None
            if last is not None and last.passed:
                outcome = "passed"
            elif last is not None and last.round >= job_input.max_rounds:
                outcome = "failed"
            else:
                outcome = "cancelled" if winner is not None else \
                    ("unfinished" if stopped else "failed")
            outcomes.append(CandidateOutcome(
                candidate=k, outcome=outcome, rounds=len(done),
                turns=sum(o.turns for o in done), test_runs=sum(o.test_runs for o in done),
                exit_code=last.exit_code if last else None, size=last.size if last else None))
        chosen = winner or next((r[-1] for _, r in sorted(rounds.items()) if r), None)
        files = dict(chosen.files) if chosen else dict(job_input.files)
        return CodingResult(
            passed=winner is not None, rounds=len(rounds.get(chosen.candidate, []))
            if chosen else 0, files=files, diff=unified_diff(job_input.files, files),
            test_report=chosen.report if chosen else None,
            exit_code=chosen.exit_code if chosen else None,
            plan=chosen.summary if chosen else "", coder="loop",
            winner=winner.candidate if winner else None, candidates=outcomes)

    @staticmethod
    def _fixed_result(job_input: CodingInput, outputs: StepOutputs) -> CodingResult:
        tests = sorted(outputs.all(fixed.TESTER), key=lambda t: t.round)
        writes = sorted(outputs.all(fixed.CODER), key=lambda w: w.round)
        last_test = tests[-1] if tests else None
        files = dict(job_input.files)
        if last_test is not None and last_test.files:
            files = dict(last_test.files)
        elif writes and writes[-1].files:
            files = dict(writes[-1].files)
        plan = outputs.get(fixed.PLANNER, "plan")
        return CodingResult(
            passed=last_test.passed if last_test else False, rounds=len(tests), files=files,
            diff=unified_diff(job_input.files, files),
            test_report=last_test.report if last_test else None,
            exit_code=last_test.exit_code if last_test else None,
            plan=plan.plan if plan else "", coder="fixed")

    def partial_result(self, job_input: CodingInput, outputs: StepOutputs) -> dict[str, Any]:
        result = self._fixed_result(job_input, outputs) if job_input.coder == "fixed" else \
            self._loop_result(job_input, outputs, stopped=True)
        return {"partial": True, **result.model_dump(mode="json")}
