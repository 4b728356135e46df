"""Completion jobs: one model call, metered and budgeted like any other step.

The smallest job kind: useful on its own for batch generation, and the unit the throughput
benchmark measures the platform with.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from agents.base import JobKind, StepContext, StepSpec
from agents.registry import register


class CompletionInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=32_000, examples=["The capital of France is"])
    max_tokens: int = Field(default=64, ge=1, le=2048,
                            description="The most tokens to generate.")
    stop: list[str] | None = Field(default=None, max_length=4)


@register
class Completion(JobKind):
    name = "completion"
    input_model = CompletionInput
    phases = {"generator": "generating"}

    def initial_steps(self, job_input: BaseModel) -> list[StepSpec]:
        assert isinstance(job_input, CompletionInput)
        return [StepSpec(key="generate", role="generator", max_tokens=job_input.max_tokens)]

    def run_step(
        self,
        ctx: StepContext,
        job_input: BaseModel,
        role: str,
        step_input: Mapping[str, Any],
        deps: Mapping[str, Mapping[str, Any]],
    ) -> dict[str, Any]:
        assert isinstance(job_input, CompletionInput)
        reply = ctx.complete(job_input.prompt, stop=job_input.stop)
        return {"text": reply.text, "finish_reason": reply.finish_reason}

    def result(
        self, job_input: BaseModel, outputs: Mapping[str, Mapping[str, Any]]
    ) -> dict[str, Any]:
        return dict(outputs["generate"])
