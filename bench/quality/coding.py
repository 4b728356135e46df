"""Coding: small tasks with tests, each a coding job through the API, with 1 and with N
candidates (coders in parallel, the first to pass wins). Pass rate and cost per solved task.

A task counts as solved when its job completed with `passed: true`. Cost per solved task is
everything spent on all tasks (solved or not) over the number solved. Where the platform
refuses `candidates` (a 422 on the first job that asks for it), that row says it is
unavailable and why; it is not a failure of the bench.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.quality.client import JobRun, Platform
from bench.quality.fixtures import CodingTask


@dataclass
class CodingSummary:
    candidates: int
    runs: list[tuple[CodingTask, JobRun]] = field(default_factory=list)
    unavailable: str | None = None

    @property
    def tasks(self) -> int:
        return len(self.runs)

    @property
    def solved(self) -> int:
        return sum(solved(run) for _, run in self.runs)

    @property
    def pass_rate(self) -> float | None:
        return self.solved / self.tasks if self.tasks else None

    @property
    def total_tokens(self) -> int:
        return sum(run.tokens() for _, run in self.runs)

    @property
    def total_cost(self) -> float:
        return sum(run.cost() for _, run in self.runs)

    @property
    def calls(self) -> int:
        return sum(run.calls() for _, run in self.runs)

    @property
    def tokens_per_solved(self) -> float | None:
        return self.total_tokens / self.solved if self.solved else None

    @property
    def cost_per_solved(self) -> float | None:
        return self.total_cost / self.solved if self.solved else None

    @property
    def wall_s(self) -> float:
        return sum(run.wall_s for _, run in self.runs) / self.tasks if self.tasks else 0.0


def solved(run: JobRun) -> bool:
    return run.status == "completed" and bool((run.result or {}).get("passed"))


def job_input(task: CodingTask, candidates: int) -> dict[str, Any]:
    body: dict[str, Any] = {"task": task.task, "files": task.files,
                            "test_command": task.test_command}
    if candidates != 1:  # 1 is the default; asking for it would need the field to exist
        body["candidates"] = candidates
    return body


def run_coding(platform: Platform, tasks: Sequence[CodingTask], candidates: int,
               parallel: int = 1) -> CodingSummary:
    summary = CodingSummary(candidates=candidates)
    if not tasks:
        return summary
    # The first job alone: a refusal of `candidates` shows before the others are sent.
    first = platform.run("coding", job_input(tasks[0], candidates),
                         metadata={"bench": "quality", "candidates": candidates})
    if first.rejected is not None:
        summary.unavailable = first.rejected
        return summary
    rest = platform.run_many("coding", [job_input(t, candidates) for t in tasks[1:]], parallel,
                             metadata={"bench": "quality", "candidates": candidates})
    summary.runs = list(zip(tasks, [first, *rest], strict=True))
    return summary
