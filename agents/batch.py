"""Batch jobs: many independent prompts in one job, all run in parallel, one budget over all.

The widest fan-out kind: each prompt is its own step, so a batch spreads over every worker
slot and the model servers batch its calls.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from agents.base import JobKind, StepContext, StepSpec
from agents.registry import register


class BatchInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompts: list[str] = Field(min_length=1, max_length=200,
                               examples=[["The capital of France is", "Water boils at"]])
    max_tokens: int = Field(default=64, ge=1, le=2048, description="Per prompt.")


def _key(i: int) -> str:
    return f"generate-{i + 1}"


@register
class Batch(JobKind):
    name = "batch"
    input_model = BatchInput
    phases = {"generator": "generating"}

    def initial_steps(self, job_input: BaseModel) -> list[StepSpec]:
        assert isinstance(job_input, BatchInput)
        return [StepSpec(key=_key(i), role="generator", max_tokens=job_input.max_tokens,
                         input={"index": i}) for i in range(len(job_input.prompts))]

    def run_step(
        self,
        ctx: StepContext,
        job_input: BaseModel,
        role: str,
        step_input: Mapping[str, Any],
        deps: Mapping[str, Mapping[str, Any]],
    ) -> dict[str, Any]:
        assert isinstance(job_input, BatchInput)
        index = int(step_input["index"])
        reply = ctx.complete(job_input.prompts[index])
        return {"index": index, "text": reply.text, "finish_reason": reply.finish_reason}

    def result(
        self, job_input: BaseModel, outputs: Mapping[str, Mapping[str, Any]]
    ) -> dict[str, Any]:
        done = sorted((dict(o) for o in outputs.values()), key=lambda o: o["index"])
        return {"completions": done}

    def partial_result(
        self, job_input: BaseModel, outputs: Mapping[str, Mapping[str, Any]]
    ) -> dict[str, Any]:
        return {"partial": True, **self.result(job_input, outputs)}
