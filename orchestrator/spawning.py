"""A step's sub-agents: `StepContext.spawn` matches each task to a child an earlier run of the
step made for it, returns the children's outputs once all have completed, and otherwise
suspends the step on the children still to run, after checking the caps and the budget."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel

from agents.base import AgentError, Child, SpawnRefused, StepSpec, StepSuspended
from core.db import transaction
from core.repositories import step_deps
from core.settings import get_settings
from orchestrator.budget import Run

log = logging.getLogger(__name__)
OutputT = TypeVar("OutputT", bound=BaseModel)


class Spawner:
    """What one run of a step may spawn, and how many spawns it has made."""

    def __init__(self, run: Run, step_key: str, role: str, allowed: Sequence[Child[Any, Any]],
                 step_budgets: Mapping[str, int], tokens_left: Callable[[], int | None]) -> None:
        self.run = run
        self.step_key = step_key
        self.role = role
        self.allowed = tuple(allowed)
        # The job's step budgets by role, and what the job's budget has left.
        self.step_budgets = dict(step_budgets)
        self.tokens_left = tokens_left
        self.calls = 0

    def spawn(self, child: Child[Any, OutputT], tasks: Sequence[BaseModel]) -> list[OutputT]:
        if child not in self.allowed:
            raise AgentError(f"a {self.role} step may not spawn {child.role.name} steps")
        # The spawn's place in the step's transcript (its m-th spawn): a re-run, forming the
        # same transcript, makes the same spawns in the same order.
        call = self.calls
        self.calls += 1
        if not tasks:
            raise SpawnRefused("give at least one task")
        inputs = [{**child.step_input(t), "spawn_call": call} for t in tasks]
        with transaction(read_only=True) as s:
            found = step_deps.spawned(s, self.run.job_id)
        mine = [f for f in found if f.spawned_by == self.step_key]
        # Each task is matched to a child that the same spawn of an earlier run of this step
        # made for the same task.
        matched: list[step_deps.SpawnedStep | None] = []
        for wanted in inputs:
            hit = next((f for f in mine if f.input == wanted and f.role == child.role.name
                        and all(f is not m for m in matched)), None)
            matched.append(hit)
        if all(m is not None and m.status == "completed" for m in matched):
            return [child.role.parse(m.output) for m in matched if m is not None]
        new = [i for i, m in enumerate(matched) if m is None]
        # Counted as the step's transcript stood at this spawn: children of its later spawns
        # (made by an earlier run) are left out, so a re-run refuses, or not, in the same
        # words, and the same transcript forms again.
        before = len([f for f in mine if int(f.input.get("spawn_call") or 0) < call])
        others = len(found) - len(mine)
        if new:
            self._check_spawn(child, len(new), before, others + before)
        numbers = [int(k.rsplit(".", 1)[1]) for k in (f.key for f in mine)
                   if k.rsplit(".", 1)[-1].isdigit()]
        first = max(numbers, default=0) + 1
        children = [StepSpec(key=f"{self.step_key}.{first + n}", role=child.role,
                             max_tokens=child.max_tokens, input=inputs[i],
                             spawned_by=self.step_key) for n, i in enumerate(new)]
        waiting = [m.key for m in matched if m is not None and m.status != "completed"]
        log.info("step %s spawns %d %s step(s) and waits for %d", self.run.step_id,
                 len(children), child.role.name, len(waiting) + len(children))
        raise StepSuspended(children, [*waiting, *(c.key for c in children)],
                            spawned_before=before)

    def _check_spawn(self, child: Child[Any, Any], n: int, of_step: int, of_job: int) -> None:
        """Refuse `n` more children past the step's or the job's cap, or the job's budget."""
        settings = get_settings()
        most = settings.spawn_max_children
        if of_step + n > most:
            raise SpawnRefused(
                f"this step may spawn at most {most} sub-agents (AGENTQ_SPAWN_MAX_CHILDREN) "
                f"and has spawned {of_step}; {n} more were asked for")
        most = settings.spawn_max_per_job
        if of_job + n > most:
            raise SpawnRefused(
                f"this job may have at most {most} sub-agents (AGENTQ_SPAWN_MAX_PER_JOB) and "
                f"has {of_job}; {n} more were asked for")
        each = self.step_budgets.get(child.role.name, child.max_tokens)
        left = self.tokens_left()
        if left is not None and n * each > left:
            raise SpawnRefused(
                f"the job's budget has too few tokens left for {n} sub-agents of {each} "
                f"tokens each ({n * each} in all); ask for fewer")
