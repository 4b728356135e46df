"""Batch jobs: many independent prompts in one job, all run in parallel, one budget over all.

The widest fan-out kind: each prompt is its own step, so a batch spreads over every worker
slot and the model servers batch its calls.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from agents.base import CallSpec, JobKind, Role, StepContext, StepOutputs, StepSpec


class BatchInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompts: list[str] = Field(min_length=1, max_length=200,
                               examples=[["The capital of France is", "Water boils at"]])
    max_tokens: int = Field(default=64, ge=1, le=2048, description="Per prompt.")


class GenerationOutput(BaseModel):
    index: int = Field(description="The prompt's position in `prompts`, from 0.")
    text: str
    finish_reason: str | None


class BatchResult(BaseModel):
    completions: list[GenerationOutput] = Field(description="In the order of the prompts.")


GENERATOR = Role("generator", GenerationOutput, "generating")


def _key(i: int) -> str:
    return f"generate-{i + 1}"


class Batch(JobKind[BatchInput, BatchResult]):
    name = "batch"
    input_model = BatchInput
    result_model = BatchResult
    roles = (GENERATOR,)

    def initial_steps(self, job_input: BatchInput) -> list[StepSpec]:
        return [StepSpec(key=_key(i), role=GENERATOR, max_tokens=job_input.max_tokens,
                         input={"index": i}) for i in range(len(job_input.prompts))]

    def run_step(self, ctx: StepContext, job_input: BatchInput) -> GenerationOutput:
        index = int(ctx.step_input["index"])
        reply = ctx.complete(CallSpec(prompt=job_input.prompts[index]))
        return GenerationOutput(index=index, text=reply.text, finish_reason=reply.finish_reason)

    def result(self, job_input: BatchInput, outputs: StepOutputs) -> BatchResult:
        return BatchResult(completions=sorted(outputs.all(GENERATOR), key=lambda o: o.index))

    def partial_result(self, job_input: BatchInput, outputs: StepOutputs) -> dict[str, Any]:
        return {"partial": True, **self.result(job_input, outputs).model_dump(mode="json")}
