"""OpenAI batch lines in memory: checking a file, cutting it into steps, a line as a model
call, a plain chat as a chat request or a transcript, and the kind's steps against a fake
context (a stopped batch keeps the lines it finished)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from agents.base import ModelReply, StepOutputs, StepStopped
from agents.openai_batch import REQUESTS, ChunkOutput, OpenAIBatch, OpenAIBatchInput, spec_of
from agents.openai_lines import (
    CHAT,
    COMPLETIONS,
    call_of,
    check_file,
    chunks,
    lines_per_step,
    output_record,
)
from core.catalogue import ModelSpec
from inference.calls import CallSpec
from inference.shapes import Shape, build, shape_of
from inference.transcript import prompt_bound
from tests.test_kinds_contract import FakeContext


def line(custom_id: str, url: str = CHAT, **body: Any) -> str:
    payload = {"model": "m", "messages": [{"role": "user", "content": custom_id}], **body}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": payload})


def test_check_file_names_each_problem() -> None:
    ok = check_file(f"{line('a')}\n\n{line('b', max_tokens=7)}\n".encode(), CHAT, 10, 50)
    assert ok.errors == []
    assert [s[2] for s in ok.spans] == [50, 7]
    assert ok.token_bound > 57
    data = "\n".join([line("a"), "[1]", line("a"), line("c", url=COMPLETIONS),
                      line("d", n=2), line("e", messages=[])]).encode()
    found = check_file(data, CHAT, 10, 50)
    assert [(e.code, e.line) for e in found.errors] == [
        ("invalid_request", 2), ("duplicate_custom_id", 3), ("mismatched_endpoint", 4),
        ("invalid_request", 5), ("invalid_request", 6)]
    assert found.errors[4].param == "body.messages"
    assert check_file(b"\n", CHAT, 10, 50).errors[0].code == "empty_file"
    many = check_file("\n".join(line(str(i)) for i in range(4)).encode(), CHAT, 3, 50)
    assert many.errors[-1].code == "too_many_requests"


def test_lines_per_step_and_chunks() -> None:
    assert lines_per_step(100, 256, 32) == 1
    assert lines_per_step(1000, 256, 32) == 4
    assert lines_per_step(50_000, 256, 32) == 32
    data = "\n".join(line(str(i)) for i in range(7)).encode()
    spans = check_file(data, CHAT, 10, 50).spans
    cut = chunks(spans, 3)
    assert [(c.first, c.count) for c in cut] == [(0, 3), (3, 3), (6, 1)]
    assert b"".join(data[c.start:c.end] for c in cut) == data


def test_a_line_as_a_call() -> None:
    raw = json.dumps({"custom_id": "x", "method": "POST", "url": CHAT, "body": {
        "model": "large", "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        "max_completion_tokens": 9, "stop": "\n"}}).encode()
    custom_id, call = call_of(CHAT, raw, 50)
    assert custom_id == "x"
    assert (call.size, call.model, call.max_tokens, call.temperature) == ("large", None, 9, 1.0)
    assert call.is_chat
    assert not call.is_conversation
    assert [(m.role, m.content) for m in call.messages or ()] == [("system", "Be brief."),
                                                                  ("user", "Hi")]
    _, completion = call_of(COMPLETIONS, json.dumps({
        "custom_id": "y", "method": "POST", "url": COMPLETIONS,
        "body": {"model": "gemma", "prompt": ["Once"]}}).encode(), 50)
    assert (completion.prompt, completion.model, completion.max_tokens) == ("Once", "gemma", 16)


def test_plain_chat_shapes() -> None:
    _, call = call_of(CHAT, line("Hello there").encode(), 50)
    chat = ModelSpec(endpoints=["http://x"], api="chat", tool_calling=True)
    assert shape_of(call, chat) is Shape.CHAT
    path, body = build(call, "m", 20, Shape.CHAT)
    assert path == "/v1/chat/completions"
    assert body["messages"] == [{"role": "user", "content": "Hello there"}]
    assert "structured_outputs" not in body
    assert "tools" not in body
    path, body = build(call, "m", 20, shape_of(call, None))
    assert path == "/v1/completions"
    assert body["prompt"] == "User: Hello there\n\nAssistant:"
    assert "structured_outputs" not in body
    assert prompt_bound(call) >= len(body["prompt"])


def batch_input(data: bytes, per: int) -> OpenAIBatchInput:
    spans = check_file(data, CHAT, 100, 8).spans
    return OpenAIBatchInput(input_file_id="file-1", endpoint=CHAT, total=len(spans),
                            default_max_tokens=8,
                            chunks=[spec_of(c) for c in chunks(spans, per)])


class StoppingContext(FakeContext):
    """Answers `answer_calls` calls, then the batch stops."""

    answer_calls = 2

    def complete(self, call: CallSpec) -> ModelReply:
        if len(self.calls) >= self.answer_calls:
            raise StepStopped("job is cancelling")
        return super().complete(call)


def test_a_chunk_step_and_a_stopped_one() -> None:
    data = "\n".join(line(f"q{i}") for i in range(5)).encode()
    job_input = batch_input(data, 5)
    kind = OpenAIBatch()
    [spec] = kind.initial_steps(job_input)
    stored = OpenAIBatchInput.model_validate(job_input.model_dump(mode="json"))
    assert stored.chunks == []  # the chunks live in the steps' inputs, not the job's
    ctx = FakeContext(spec, StepOutputs({}), lambda c: "an answer")
    ctx.files["file-1"] = data
    out = kind.run_step(ctx, stored)
    assert isinstance(out, ChunkOutput)
    assert [r.custom_id for r in out.results] == [f"q{i}" for i in range(5)]
    assert (out.done, out.failed, out.stopped) == (5, 0, False)
    record = output_record("batch_1", CHAT, out.results[0])
    assert record["response"]["body"]["choices"][0]["message"]["content"] == "an answer"

    stopping = StoppingContext(spec, StepOutputs({}), lambda c: "an answer")
    stopping.files["file-1"] = data
    partial = kind.run_step(stopping, stored)
    assert isinstance(partial, ChunkOutput)
    assert (partial.done, partial.stopped) == (2, True)
    counts = kind.result(stored, StepOutputs({spec.key: (REQUESTS.name,
                                                         partial.model_dump(mode="json"))}))
    assert counts.request_counts.model_dump() == {"total": 5, "completed": 2, "failed": 0}

    nothing = StoppingContext(spec, StepOutputs({}), lambda c: "x")
    nothing.answer_calls = 0
    nothing.files["file-1"] = data
    with pytest.raises(StepStopped):
        kind.run_step(nothing, stored)
