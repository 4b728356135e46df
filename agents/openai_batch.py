"""OpenAI batches: the requests of an uploaded JSONL file, run as one agentq job.

The file's lines are cut into chunks of consecutive lines; each chunk is one step that reads
its byte range of the file through its context and makes its lines' calls one after the other
through `ctx.complete`, so each is reserved against the job's budget, metered, cached and
recorded in the ledger like any other call. Chunks run in parallel over every worker slot.
How many lines a chunk holds is `agents.openai_lines.lines_per_step`: one line per step for
small batches (all in parallel), more for big ones, so that a batch of thousands of lines
does not pay a step's overhead (its claim, its completion, its events) per line.

A step stopped half-way (the batch was cancelled) returns the lines it finished, so the
batch's output keeps them. The job is created by `orchestrator.openai_batches`, which checks
the file first; the output and error files are written when the job ends.
"""

from __future__ import annotations

import re
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agents.base import AgentError, JobKind, Role, StepContext, StepOutputs, StepSpec, StepStopped
from agents.openai_lines import (
    CHAT,
    COMPLETIONS,
    Chunk,
    LineError,
    LineResult,
    call_of,
    request_lines,
)
from inference.pool import InferenceError, TransientInferenceError

KIND = "openai_batch"


class ChunkSpec(BaseModel):
    first: int = Field(ge=0)
    count: int = Field(ge=1)
    start: int = Field(ge=0)
    end: int = Field(ge=1)
    max_tokens: int = Field(ge=1)


class OpenAIBatchInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(min_length=1, max_length=40)
    endpoint: Literal["/v1/chat/completions", "/v1/completions"]
    completion_window: str = "24h"
    total: int = Field(ge=0, description="Requests in the file.")
    default_max_tokens: int = Field(default=256, ge=1)
    # Only at submission: the steps to start with (kept in the steps' own inputs).
    chunks: list[ChunkSpec] = Field(default_factory=list, exclude=True)


class ChunkOutput(BaseModel):
    first: int
    count: int
    results: list[LineResult]
    done: int = Field(description="Lines that ran: the length of `results`.")
    failed: int = Field(description="Of `results`, the lines whose call failed.")
    stopped: bool = Field(default=False, description="The batch stopped before every line "
                                                     "of the chunk ran.")


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchOutcome(BaseModel):
    """What a batch ended with: its request counts, its output and error files (written when
    it ends), and what was wrong with its input file (a batch that failed validation)."""

    request_counts: RequestCounts
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[LineError] = Field(default_factory=list)
    finalized: bool = Field(default=False, description="The output and error files are "
                                                       "written.")


REQUESTS = Role("requests", ChunkOutput, "running requests")
_STATUS = re.compile(r"refused the request \((\d{3})\)")


def chunk_key(first: int) -> str:
    return f"lines-{first + 1}"


def spec_of(chunk: Chunk) -> ChunkSpec:
    return ChunkSpec(first=chunk.first, count=chunk.count, start=chunk.start, end=chunk.end,
                     max_tokens=chunk.max_tokens)


def _failure(line: int, custom_id: str, exc: InferenceError) -> LineResult:
    found = _STATUS.search(exc.message)
    status = int(found.group(1)) if found else (503 if isinstance(
        exc, TransientInferenceError) else 500)
    kind = "invalid_request_error" if 400 <= status < 500 else "server_error"
    return LineResult(line=line, custom_id=custom_id, status_code=status,
                      created=int(time.time()), error_type=kind,
                      error_message=exc.message[:2000])


class OpenAIBatch(JobKind[OpenAIBatchInput, BatchOutcome]):
    name = KIND
    input_model = OpenAIBatchInput
    result_model = BatchOutcome
    roles = (REQUESTS,)

    def initial_steps(self, job_input: OpenAIBatchInput) -> list[StepSpec]:
        return [StepSpec(key=chunk_key(c.first), role=REQUESTS, max_tokens=c.max_tokens,
                         input=c.model_dump()) for c in job_input.chunks]

    def run_step(self, ctx: StepContext, job_input: OpenAIBatchInput) -> ChunkOutput:
        chunk = ChunkSpec.model_validate(dict(ctx.step_input))
        data = ctx.read_file(job_input.input_file_id, chunk.start, chunk.end)
        lines = [raw for _, _, raw in request_lines(data)]
        if len(lines) != chunk.count:
            raise AgentError(f"the batch's input file {job_input.input_file_id} is gone or "
                             f"changed: lines {chunk.first + 1}-{chunk.first + chunk.count} "
                             "could not be read")
        results: list[LineResult] = []
        for offset, raw in enumerate(lines):
            line = chunk.first + offset
            try:
                custom_id, call = call_of(job_input.endpoint, raw, job_input.default_max_tokens)
            except ValidationError as exc:
                raise AgentError(f"line {line + 1} of the batch's input file no longer reads "
                                 f"as a request: {exc.errors()[0].get('msg')}") from exc
            try:
                reply = ctx.complete(call)
            except StepStopped:
                if not results:
                    raise
                return self._output(chunk, results, stopped=True)
            except InferenceError as exc:
                results.append(_failure(line, custom_id, exc))
                continue
            results.append(LineResult(
                line=line, custom_id=custom_id, status_code=200, created=int(time.time()),
                text=reply.text, finish_reason=reply.finish_reason, model=reply.model,
                prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens))
        return self._output(chunk, results, stopped=False)

    @staticmethod
    def _output(chunk: ChunkSpec, results: list[LineResult], stopped: bool) -> ChunkOutput:
        return ChunkOutput(first=chunk.first, count=chunk.count, results=results,
                           done=len(results), failed=sum(1 for r in results if not r.ok),
                           stopped=stopped)

    def result(self, job_input: OpenAIBatchInput, outputs: StepOutputs) -> BatchOutcome:
        return BatchOutcome(request_counts=counts(job_input.total, outputs))

    def partial_result(self, job_input: OpenAIBatchInput, outputs: StepOutputs
                       ) -> dict[str, Any]:
        return self.result(job_input, outputs).model_dump(mode="json")


def counts(total: int, outputs: StepOutputs) -> RequestCounts:
    done = outputs.all(REQUESTS)
    failed = sum(o.failed for o in done)
    return RequestCounts(total=total, completed=sum(len(o.results) for o in done) - failed,
                         failed=failed)


__all__ = ["CHAT", "COMPLETIONS", "KIND", "REQUESTS", "BatchOutcome", "ChunkOutput",
           "OpenAIBatch", "OpenAIBatchInput", "RequestCounts", "chunk_key", "counts", "spec_of"]
