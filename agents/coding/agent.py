"""The coder as an agent loop: it reads the task and the tests, writes files, runs the tests in
the sandbox, reads the failures and repairs, until the tests pass or its step budget or turn
limit ends. One step is one round of one candidate (`code-{candidate}-{round}`); a round that
ends without passing hands its files and last report to the candidate's next round.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from pydantic import BaseModel, ConfigDict, Field

from agents.base import ChatMessage, Role, StepContext
from agents.coding.tools import CODING_TOOLS, CodeEnv, check_workspace
from agents.coding.workspace import CommandRun, render_files, steady
from agents.loop import Agent, run_loop

INSTRUCTIONS = (
    "You are a careful software engineer working in a repository. Do the task so that the "
    "repository's tests pass. Read the files you need, write whole files with write_file, run "
    "the tests with run_tests, read the failures and repair, until the tests pass. Then give "
    "your final answer: a short summary of what you changed.")
# A repository this small is shown whole in the task; a larger one as a list of its files.
INLINE_BYTES = 3000
# The candidates after the first sample their answers (the first decodes greedily), so that
# parallel candidates explore different repairs.
CANDIDATE_TEMPERATURE = 0.7
NO_SUMMARY = "No summary was given."


class Done(BaseModel):
    """The coder's final answer (its work is the workspace)."""

    model_config = ConfigDict(extra="forbid")

    summary: str = Field(max_length=2000, description="What you changed, in a sentence or two.")


class AttemptOutput(CommandRun):
    """One round of one candidate: the files it left and its last test run over them."""

    candidate: int
    round: int
    files: dict[str, str] = Field(description="The whole repository after this round.")
    summary: str
    turns: int
    stopped: str = Field(description="Why the loop ended: done (the tests passed), answered, "
                                     "turn_limit, step_budget, context or job_budget.")
    test_runs: int = Field(description="Test runs the round made, its final check included.")
    size: str | None = Field(default=None, description="The size class the round ran on.")
    written: list[str] = Field(default_factory=list)


CODER_AGENT = Role("coder-agent", AttemptOutput, "coding")


def _summary(messages: list[ChatMessage], text: str) -> Done:
    return Done(summary=NO_SUMMARY)


def _passed(env: CodeEnv) -> Done | None:
    if env.tested is not None and env.tested.passed:
        return Done(summary="The tests pass.")
    return None


AGENT: Agent[CodeEnv, Done] = Agent(
    instructions=INSTRUCTIONS, tools=CODING_TOOLS, answer=Done,
    answer_description="Finish: a short summary of what you changed.",
    fallback=_summary, turn_max_tokens=512, final_max_tokens=96, finished=_passed)


def task_text(task: str, files: Mapping[str, str], test_command: str, candidate: int,
              candidates: int, report: str | None) -> str:
    parts = [f"Task: {task.strip()}\nTests: `{test_command}`\n"]
    if candidates > 1:
        parts.append(f"You are candidate {candidate} of {candidates}.\n")
    size = sum(len(b.encode("utf-8")) for b in files.values())
    if size <= INLINE_BYTES:
        parts.append(f"\nRepository:\n{render_files(files) or '(empty)'}")
    else:
        parts.append("\nFiles:\n" + "\n".join(sorted(files)) + "\n")
    if report is not None:
        parts.append(f"\nAn earlier attempt left the files so; its tests failed with:\n"
                     f"{steady(report)[-1500:]}\n")
    return "".join(parts)


def attempt(ctx: StepContext, *, task: str, files: Mapping[str, str], test_command: str,
            candidate: int, candidates: int, round_: int, report: str | None,
            size: str | None) -> AttemptOutput:
    """One round of the loop; its files are tested once more (without a model call) when the
    loop ended without a test run of them as they are."""
    env = CodeEnv(ctx, dict(files), test_command)
    agent = replace(AGENT, size=size,
                    temperature=0.0 if candidate == 1 else CANDIDATE_TEMPERATURE)
    result = run_loop(ctx, agent, env,
                      task_text(task, files, test_command, candidate, candidates, report))
    ran = env.tested if env.tested is not None else check_workspace(env)
    return AttemptOutput(
        candidate=candidate, round=round_, files=env.files,
        summary=result.answer.summary, turns=result.turns, stopped=str(result.stopped),
        test_runs=env.test_runs, size=size, written=list(dict.fromkeys(env.written)),
        **ran.model_dump())
