"""Completion jobs: one model call, metered and budgeted like any other step.

The smallest job kind: useful on its own for batch generation, and the unit the throughput
benchmark measures the platform with.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from agents.base import CallSpec, JobKind, Role, StepContext, StepOutputs, StepSpec


class CompletionInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=32_000, examples=["The capital of France is"])
    max_tokens: int = Field(default=64, ge=1, le=2048,
                            description="The most tokens to generate.")
    stop: list[str] | None = Field(default=None, max_length=4)


class CompletionOutput(BaseModel):
    text: str
    finish_reason: str | None


class CompletionResult(CompletionOutput):
    """The generated text and why generation ended (`stop`, `length`)."""


GENERATOR = Role("generator", CompletionOutput, "generating")


class Completion(JobKind[CompletionInput, CompletionResult]):
    name = "completion"
    input_model = CompletionInput
    result_model = CompletionResult
    roles = (GENERATOR,)

    def initial_steps(self, job_input: CompletionInput) -> list[StepSpec]:
        return [StepSpec(key="generate", role=GENERATOR, max_tokens=job_input.max_tokens)]

    def run_step(self, ctx: StepContext, job_input: CompletionInput) -> CompletionOutput:
        reply = ctx.complete(CallSpec(prompt=job_input.prompt, stop=job_input.stop))
        return CompletionOutput(text=reply.text, finish_reason=reply.finish_reason)

    def result(self, job_input: CompletionInput, outputs: StepOutputs) -> CompletionResult:
        out = outputs.one(GENERATOR)
        return CompletionResult(text=out.text, finish_reason=out.finish_reason)
