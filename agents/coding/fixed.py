"""The fixed-format coder (`"coder": "fixed"`), for models that cannot drive a loop: `plan`,
then per round `write-N` (the model returns whole files in a strict format, validated; an
answer that does not parse is asked of a larger model where the catalogue has one) and
`test-N` (the test command in the sandbox). A failing `test-N` adds the next round.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel, Field

from agents.base import CallSpec, Role, StepContext, StepOutputs, StepSpec
from agents.coding.workspace import (
    REPORT_CHARS,
    CommandRun,
    check_tree,
    parse_files,
    render_files,
    run_command,
)
from core.settings import get_settings

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


class PlanNote(BaseModel):
    plan: str


class CoderOutput(BaseModel):
    round: int
    files: dict[str, str] = Field(description="The whole repository after this round.")
    plan: str
    changed: list[str]
    format_error: str | None = None
    answer: str | None = Field(default=None, description="The end of an unusable answer.")


class TestOutput(CommandRun):
    __test__ = False  # not a test class, whatever pytest thinks of its name

    round: int
    files: dict[str, str]
    plan: str


PLANNER = Role("planner", PlanNote, "planning")
CODER = Role("coder", CoderOutput, "writing")
TESTER = Role("tester", TestOutput, "testing")


def first_steps() -> list[StepSpec]:
    return [StepSpec(key="plan", role=PLANNER, max_tokens=get_settings().planner_max_tokens),
            *round_steps(1, ("plan",))]


def round_steps(n: int, after: tuple[str, ...]) -> list[StepSpec]:
    return [
        StepSpec(key=f"write-{n}", role=CODER, max_tokens=get_settings().coder_max_tokens,
                 depends_on=after, input={"round": n}),
        # The tester makes no model call; its budget is unused.
        StepSpec(key=f"test-{n}", role=TESTER, max_tokens=1,
                 depends_on=(f"write-{n}",), input={"round": n}),
    ]


def plan(ctx: StepContext, task: str, files: Mapping[str, str]) -> PlanNote:
    reply = ctx.complete(CallSpec(prompt=plan_prompt(task, files), stop=["\n\n"]))
    return PlanNote(plan=reply.text.strip())


def _previous(files: Mapping[str, str], parents: StepOutputs
              ) -> tuple[dict[str, str], str, str | None]:
    """The files, plan and test report a round starts from: the plan's, or the last round's
    test."""
    tested = parents.all(TESTER)
    if tested:
        return dict(tested[-1].files), tested[-1].plan, tested[-1].report
    return dict(files), parents.one(PLANNER).plan, None


def write(ctx: StepContext, task: str, start: Mapping[str, str], n: int) -> CoderOutput:
    files, plan_text, report = _previous(start, ctx.parents)
    prompt = write_prompt(task, plan_text, files, report)
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
        return CoderOutput(round=n, files=files, plan=plan_text, changed=[],
                           format_error=problem, answer=reply.text[-2000:])
    return CoderOutput(round=n, files={**files, **changed}, plan=plan_text,
                       changed=sorted(changed))


def run_round_tests(ctx: StepContext, command: str, n: int) -> TestOutput:
    written = ctx.parents.one(CODER)
    ran = run_command(ctx, written.files, command)
    return TestOutput(round=n, files=written.files, plan=written.plan, **ran.model_dump())
