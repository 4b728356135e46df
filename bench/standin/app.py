"""The stand-in server's HTTP endpoints. `/v1/completions` and `/v1/chat/completions` share
their bookkeeping (`admit`, `Answer`): they differ in how they read a prompt and shape a
chunk."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from bench.standin.answers import chat_text, constrained, default_text, tool_call
from bench.standin.state import StandinState, call_index, count_tokens

# The settings `POST /_control` may change.
CONTROLLED = {"delay_s", "batch_delay_s", "token_delay_s", "hold_until_running",
              "hold_timeout_s", "fail_next", "fail_status", "omit_usage", "plan_text", "replies",
              "scripts", "token_delay_by_marker", "tokenize_status", "context"}


async def admit(state: StandinState, path: str, request: Request
                ) -> tuple[dict[str, Any], JSONResponse | None]:
    """Read, count and keep a request, and let it run; with the injected failure it gets
    instead, if any."""
    body = await request.json()
    with state.lock:
        state.requests_total += 1
        state.request_ids.append(request.headers.get("x-request-id", ""))
        state.keep(path, request.headers.get("x-request-id", ""), body)
        if state.fail_next > 0:
            state.fail_next -= 1
            return body, JSONResponse({"error": {"message": "injected failure"}},
                                      status_code=state.fail_status)
        state.running += 1
        state.max_running = max(state.max_running, state.running)
    return body, None


async def pause(state: StandinState) -> None:
    if state.hold_until_running:
        deadline = time.monotonic() + state.hold_timeout_s
        while (state.max_running < state.hold_until_running
               and time.monotonic() < deadline):
            await asyncio.sleep(0.02)
    extra = state.batch_delay_s * state.running
    if state.delay_s or extra:
        await asyncio.sleep(state.delay_s + extra)


async def pause_for(state: StandinState, index: int) -> None:
    wait = state.delay_by_index.get(index, 0.0)
    if wait:
        await asyncio.sleep(wait)


def scripted_answer(state: StandinState, prompt: str, index: int) -> str | None:
    with state.lock:
        for marker, answers in state.scripts.items():
            if marker in prompt and answers:
                return answers[min(index, len(answers) - 1)]
        return next((reply for marker, reply in state.replies.items() if marker in prompt),
                    None)


def pieces_of(text: str, max_tokens: int) -> list[str]:
    """"Tokens" are words with the whitespace before them, so text comes back as written."""
    return re.findall(r"\s*\S+", text)[:max_tokens]


@dataclass
class Answer:
    """One admitted request's answer: its usage, its chunks, and the end of its run (which
    counts its tokens and gives its place among the running back)."""

    state: StandinState
    kind: str  # the chunks' "object"
    cmpl_id: str
    prompt_tokens: int
    completion_tokens: int
    cached: int
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def usage(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached}}

    def usage_after(self, generated: int) -> dict[str, Any]:
        return {**self.usage, "completion_tokens": generated,
                "total_tokens": self.prompt_tokens + generated}

    def finish(self, generated: int) -> None:
        with self.state.lock:
            self.state.running -= 1
            self.state.prompt_tokens_total += self.prompt_tokens
            self.state.generation_tokens_total += generated

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        return "data: " + json.dumps({"id": self.cmpl_id, "object": self.kind,
                                      "created": self.created, "model": self.state.model,
                                      "choices": choices, **extra}) + "\n\n"

    async def stream(self, pieces: list[str], choice: Callable[[int, str, bool], dict[str, Any]],
                     pace: float, running_usage: Callable[[], bool],
                     final_usage: Callable[[], bool]) -> AsyncIterator[str]:
        """The pieces as chunks (`choice` makes each one's choice, given its position, text and
        whether it is the last), each with the usage so far while `running_usage()`, then a
        usage chunk if `final_usage()`; a stream closed before its end counts as aborted."""
        completed = False
        generated = 0
        try:
            await pause(self.state)
            for i, piece in enumerate(pieces):
                generated += 1
                extra = {"usage": self.usage_after(generated)} if running_usage() else {}
                yield self.chunk([choice(i, piece, i == len(pieces) - 1)], **extra)
                if pace:
                    await asyncio.sleep(pace)
            if final_usage():
                yield self.chunk([], usage=self.usage)
            yield "data: [DONE]\n\n"
            completed = True
        finally:
            if not completed:
                with self.state.lock:
                    self.state.aborted_total += 1
            self.finish(generated)


def make_app(state: StandinState) -> FastAPI:
    app = FastAPI(title="agentq stand-in model server")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        with state.lock:
            state.models_requests_total += 1
        return {"object": "list", "data": [{"id": state.model, "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body, refused = await admit(state, "/v1/completions", request)
        if refused is not None:
            return refused
        prompt = str(body.get("prompt", ""))
        max_tokens = int(body.get("max_tokens") or 16)
        structured = body.get("structured_outputs") or {}
        index = call_index(request.headers.get("x-request-id", ""))
        scripted = scripted_answer(state, prompt, index)
        if scripted is not None:
            text = scripted
        elif structured.get("regex") and "Sub-questions:" in prompt:
            text = state.plan_text
        else:
            text = default_text(max_tokens)
        text = constrained(text, structured.get("json"))
        await pause_for(state, index)
        pieces = pieces_of(text, max_tokens)
        text = "".join(pieces)
        finish = "length" if len(pieces) >= max_tokens else "stop"
        with state.lock:
            cached = state.cached_tokens(prompt)
        answer = Answer(state, "text_completion", f"cmpl-{state.requests_total}",
                        count_tokens(prompt), len(pieces), cached)

        if not body.get("stream"):
            try:
                await pause(state)
            finally:
                answer.finish(answer.completion_tokens)
            out: dict[str, Any] = {
                "id": answer.cmpl_id, "object": "text_completion", "created": answer.created,
                "model": state.model,
                "choices": [{"index": 0, "text": text, "finish_reason": finish}],
            }
            if not state.omit_usage:
                out["usage"] = answer.usage
            return JSONResponse(out)

        options = body.get("stream_options") or {}
        include_usage = bool(options.get("include_usage"))
        continuous = include_usage and bool(options.get("continuous_usage_stats"))

        def choice(i: int, piece: str, last: bool) -> dict[str, Any]:
            return {"index": 0, "text": piece, "finish_reason": finish if last else None}

        events = answer.stream(pieces, choice, state.token_delay(prompt),
                               running_usage=lambda: continuous and not state.omit_usage,
                               final_usage=lambda: include_usage and not state.omit_usage)
        return StreamingResponse(events, media_type="text/event-stream")

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Any:
        with state.lock:
            state.tokenize_total += 1
        if state.tokenize_status is not None:
            return JSONResponse({"error": {"message": "no tokenizer here"}},
                                status_code=state.tokenize_status)
        body = await request.json()
        if "messages" in body:
            said = chat_text(body.get("messages") or [])
            count = count_tokens(said + json.dumps(body.get("tools") or []))
        else:
            count = count_tokens(str(body.get("prompt", "")))
        return {"count": count, "max_model_len": state.context, "tokens": list(range(count))}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body, refused = await admit(state, "/v1/chat/completions", request)
        if refused is not None:
            return refused
        said = chat_text(body.get("messages") or [])
        tools = body.get("tools") or []
        max_tokens = int(body.get("max_tokens") or 16)
        index = call_index(request.headers.get("x-request-id", ""))
        text = scripted_answer(state, said, index)
        structured = body.get("structured_outputs") or {}
        call: dict[str, Any] | None = None
        if tools:
            call = tool_call(text, tools, body.get("tool_choice"), max_tokens, index)
        if call is None:
            if text is None:
                text = state.plan_text if structured.get("regex") and "Sub-questions:" in said \
                    else default_text(max_tokens)
            text = constrained(text, structured.get("json"))
        await pause_for(state, index)
        pieces = pieces_of(call["arguments"] if call else str(text), max_tokens)
        finish = "length" if len(pieces) >= max_tokens else (
            "tool_calls" if call else "stop")
        with state.lock:
            cached = state.cached_tokens(said)
        answer = Answer(state, "chat.completion.chunk", f"chatcmpl-{state.requests_total}",
                        count_tokens(said + json.dumps(tools)), len(pieces), cached)

        def delta(i: int, piece: str) -> dict[str, Any]:
            if call is None:
                return {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
            fn: dict[str, Any] = {"arguments": piece}
            entry: dict[str, Any] = {"index": 0, "function": fn}
            if i == 0:
                fn["name"] = call["name"]
                entry.update(id=f"call_{index}", type="function")
            return {"tool_calls": [entry]}

        def choice(i: int, piece: str, last: bool) -> dict[str, Any]:
            return {"index": 0, "delta": delta(i, piece), "finish_reason": finish if last else None}

        events = answer.stream(pieces, choice, state.token_delay(said),
                               running_usage=lambda: True,
                               final_usage=lambda: not state.omit_usage)
        return StreamingResponse(events, media_type="text/event-stream")

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        lines = [
            f'vllm:prompt_tokens_total{{model_name="{state.model}"}} {state.prompt_tokens_total}',
            f'vllm:generation_tokens_total{{model_name="{state.model}"}} '
            f"{state.generation_tokens_total}",
            f'vllm:num_requests_running{{model_name="{state.model}"}} {state.running}',
            f'vllm:prefix_cache_queries_total{{model_name="{state.model}"}} '
            f"{state.prefix_queries_total}",
            f'vllm:prefix_cache_hits_total{{model_name="{state.model}"}} '
            f"{state.prefix_hits_total}",
            f"standin:requests_total {state.requests_total}",
            f"standin:aborted_total {state.aborted_total}",
        ]
        return PlainTextResponse("\n".join(lines) + "\n")

    @app.post("/_control")
    async def control(request: Request) -> dict[str, Any]:
        changes = await request.json()
        with state.lock:
            for key, value in changes.items():
                if key in CONTROLLED:
                    setattr(state, key, value)
        return {"ok": True}

    @app.get("/_stats")
    async def stats() -> dict[str, Any]:
        with state.lock:
            return {"requests_total": state.requests_total,
                    "models_requests_total": state.models_requests_total,
                    "prompt_tokens_total": state.prompt_tokens_total,
                    "generation_tokens_total": state.generation_tokens_total,
                    "max_running": state.max_running,
                    "aborted_total": state.aborted_total,
                    "request_ids": list(state.request_ids)}

    return app
