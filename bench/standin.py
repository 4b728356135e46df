"""A fast stand-in for an OpenAI-compatible model server, for tests and benchmarks.

It speaks the subset of vLLM's API that agentq uses (`/v1/models`, `/v1/completions` and
`/v1/chat/completions`, streamed or not, `/metrics` with vLLM's counter names), answers
deterministically, counts "tokens" as whitespace-separated words, reports prompt words it has
seen before as cached (in blocks of four, like a prefix cache), and can be told to be slow, to
fail, or to omit usage (`POST /_control`). `python -m bench.standin --port 8199` runs one on
its own.

Answers can be scripted: `replies` maps a marker to the answer of every request whose prompt
(or messages) holds it; `scripts` maps a marker to a sequence of answers, the n-th for the n-th
call of a step (the call index in its `X-Request-Id`, `{step}:{attempt}:{index}`; the last
answer repeats); `token_delay_by_marker` maps a marker to a pause between streamed tokens of
every request whose prompt holds it (a slow caller among fast ones, or one a cancel
interrupts). Under a JSON-schema constraint, an answer that is JSON is sent as it is (a test
may send arguments that do not fit) and any other text is fitted into the schema, as a
constrained decoder would (a choice between a tool call and a final answer takes the final
answer). On the chat endpoint with `tools`, an answer `{"tool": name, "arguments": {...}}`
comes back as a tool call; a forced tool (`tool_choice` naming one) is called with the text
fitted to its parameters.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

DEFAULT_PLAN = ["What is the first part of it?", "What is the second part of it?",
                "What is the third part of it?"]


@dataclass
class StandinState:
    model: str = "standin-model"
    delay_s: float = 0.0
    # More seconds per request running at once when a request starts: a latency that grows
    # with the batch, as a real server's does.
    batch_delay_s: float = 0.0
    # Pause between streamed tokens (a slow generation that a cancel can interrupt).
    token_delay_s: float = 0.0
    # Hold every answer until this many requests have been running at once (or the timeout
    # passes): shows how many calls a client keeps in flight, however slowly they arrive.
    hold_until_running: int = 0
    hold_timeout_s: float = 60.0
    fail_next: int = 0
    fail_status: int = 503
    omit_usage: bool = False
    plan_text: str = json.dumps(DEFAULT_PLAN)
    # Scripted answers: the first whose marker occurs in the prompt is the answer.
    replies: dict[str, str] = field(default_factory=dict)
    # Scripted sequences: the n-th answer for a step's n-th call (see the module's doc).
    scripts: dict[str, list[str]] = field(default_factory=dict)
    # Seconds to wait before answering a step's n-th call, by n (from 0).
    delay_by_index: dict[int, float] = field(default_factory=dict)
    # Pause between streamed tokens of a call whose prompt (or messages) holds the marker.
    token_delay_by_marker: dict[str, float] = field(default_factory=dict)

    def token_delay(self, prompt: str) -> float:
        with self.lock:
            return self.token_delay_s + sum(
                s for marker, s in self.token_delay_by_marker.items() if marker in prompt)
    # `/tokenize` answers (as vLLM's does) with this context length; or, when set, fails with
    # this status.
    tokenize_status: int | None = None
    context: int = 32768
    tokenize_total: int = 0
    # The bodies of requests received (with their path under "_path" and request id under
    # "_request_id"), newest last (the last 500).
    bodies: list[dict[str, Any]] = field(default_factory=list)

    def keep(self, path: str, request_id: str, body: dict[str, Any]) -> None:
        """Keep a request's body (call with the lock)."""
        self.bodies = [*self.bodies[-499:], {**body, "_path": path, "_request_id": request_id}]
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    requests_total: int = 0
    models_requests_total: int = 0
    running: int = 0
    max_running: int = 0
    request_ids: list[str] = field(default_factory=list)
    aborted_total: int = 0
    prefix_cache: set[int] = field(default_factory=set)
    prefix_queries_total: int = 0
    prefix_hits_total: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def cached_tokens(self, prompt: str) -> int:
        """Leading prompt words already seen, in whole blocks of four (call with the lock)."""
        words = prompt.split()
        cached, hit = 0, True
        for end in range(4, len(words) + 1, 4):
            key = hash(tuple(words[:end]))
            if hit and key in self.prefix_cache:
                cached = end
            else:
                hit = False
                self.prefix_cache.add(key)
        self.prefix_queries_total += count_tokens(prompt)
        self.prefix_hits_total += cached
        return cached


def count_tokens(text: str) -> int:
    return len(text.split()) + 1  # a <bos> token, as a real tokenizer adds


def call_index(request_id: str) -> int:
    """A step's call index from its request id (`{step}:{attempt}:{index}`); 0 otherwise."""
    last = request_id.rsplit(":", 1)[-1]
    return int(last) if ":" in request_id and last.isdigit() else 0


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part, {})
        return dict(target)
    return schema


def fit_to_schema(text: str, schema: dict[str, Any], root: dict[str, Any] | None = None
                  ) -> Any:
    """A value of the schema made from `text`: strings are the text, numbers 0, lists as few
    items as `minItems` asks for (empty by default), objects their required fields; of
    alternatives, one with a `final` field if any."""
    root = root if root is not None else schema
    schema = _resolve(schema, root)
    options = schema.get("anyOf") or schema.get("oneOf")
    if options:
        chosen = next((o for o in options if "final" in (_resolve(o, root).get("properties")
                                                          or {})), options[0])
        return fit_to_schema(text, chosen, root)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        props = schema.get("properties") or {}
        return {name: fit_to_schema(text, props[name], root)
                for name in schema.get("required") or [] if name in props}
    if kind == "array":
        return [fit_to_schema(text, schema.get("items") or {}, root)
                for _ in range(int(schema.get("minItems") or 0))]
    if kind in ("integer", "number"):
        return 0
    if kind == "boolean":
        return False
    if kind == "null":
        return None
    return text.strip()


def _offers_tools(schema: dict[str, Any]) -> bool:
    options = schema.get("anyOf") or schema.get("oneOf") or [schema]
    return any("tool" in (o.get("properties") or {}) for o in options)


def constrained(text: str, schema: dict[str, Any] | None) -> str:
    """The answer under a JSON-schema constraint: JSON as it is (arguments that do not fit and
    tools that do not exist included), other text fitted; a tool call where the schema offers
    no tool at all (only a final answer) is fitted too."""
    if schema is None:
        return text
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    else:
        if not (isinstance(parsed, dict) and "tool" in parsed and not _offers_tools(schema)):
            return text
    return json.dumps(fit_to_schema(text if parsed is None else default_text(12), schema),
                      separators=(",", ":"))


def chat_text(messages: list[dict[str, Any]]) -> str:
    """What a chat prompt says: its messages' texts and tool calls' arguments."""
    return "\n".join(str(m.get("content") or "") + "".join(
        str((c.get("function") or {}).get("arguments") or "")
        for c in m.get("tool_calls") or []) for m in messages)


def default_text(max_tokens: int) -> str:
    words = [f"w{i}" for i in range(max(1, min(max_tokens, 12)))]
    return " Stand-in answer: " + " ".join(words)


def make_app(state: StandinState) -> FastAPI:
    app = FastAPI(title="agentq stand-in model server")

    async def pause() -> None:
        if state.hold_until_running:
            deadline = time.monotonic() + state.hold_timeout_s
            while (state.max_running < state.hold_until_running
                   and time.monotonic() < deadline):
                await asyncio.sleep(0.02)
        extra = state.batch_delay_s * state.running
        if state.delay_s or extra:
            await asyncio.sleep(state.delay_s + extra)

    def scripted_answer(prompt: str, index: int) -> str | None:
        with state.lock:
            for marker, answers in state.scripts.items():
                if marker in prompt and answers:
                    return answers[min(index, len(answers) - 1)]
            return next((reply for marker, reply in state.replies.items() if marker in prompt),
                        None)

    async def pause_for(index: int) -> None:
        wait = state.delay_by_index.get(index, 0.0)
        if wait:
            await asyncio.sleep(wait)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        with state.lock:
            state.models_requests_total += 1
        return {"object": "list", "data": [{"id": state.model, "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await request.json()
        with state.lock:
            state.requests_total += 1
            state.request_ids.append(request.headers.get("x-request-id", ""))
            state.keep("/v1/completions", request.headers.get("x-request-id", ""), body)
            if state.fail_next > 0:
                state.fail_next -= 1
                return JSONResponse({"error": {"message": "injected failure"}},
                                    status_code=state.fail_status)
            state.running += 1
            state.max_running = max(state.max_running, state.running)
        prompt = str(body.get("prompt", ""))
        max_tokens = int(body.get("max_tokens") or 16)
        structured = body.get("structured_outputs") or {}
        index = call_index(request.headers.get("x-request-id", ""))
        scripted = scripted_answer(prompt, index)
        if scripted is not None:
            text = scripted
        elif structured.get("regex") and "Sub-questions:" in prompt:
            text = state.plan_text
        else:
            text = default_text(max_tokens)
        text = constrained(text, structured.get("json"))
        await pause_for(index)
        # "Tokens" are words with the whitespace before them, so text comes back as written.
        pieces = re.findall(r"\s*\S+", text)[:max_tokens]
        text = "".join(pieces)
        finish = "length" if len(pieces) >= max_tokens else "stop"
        prompt_tokens = count_tokens(prompt)
        completion_tokens = len(pieces)
        with state.lock:
            cached = state.cached_tokens(prompt)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens,
                 "prompt_tokens_details": {"cached_tokens": cached}}
        created = int(time.time())
        cmpl_id = f"cmpl-{state.requests_total}"

        def finish_request(generated: int = completion_tokens) -> None:
            with state.lock:
                state.running -= 1
                state.prompt_tokens_total += prompt_tokens
                state.generation_tokens_total += generated

        if not body.get("stream"):
            try:
                await pause()
            finally:
                finish_request()
            out: dict[str, Any] = {
                "id": cmpl_id, "object": "text_completion", "created": created,
                "model": state.model,
                "choices": [{"index": 0, "text": text, "finish_reason": finish}],
            }
            if not state.omit_usage:
                out["usage"] = usage
            return JSONResponse(out)

        options = body.get("stream_options") or {}
        include_usage = bool(options.get("include_usage"))
        continuous = include_usage and bool(options.get("continuous_usage_stats"))

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            return "data: " + json.dumps({"id": cmpl_id, "object": "text_completion",
                                          "created": created, "model": state.model,
                                          "choices": choices, **extra}) + "\n\n"

        pace = state.token_delay(prompt)

        async def events() -> Any:
            completed = False
            generated = 0
            try:
                await pause()
                for i, piece in enumerate(pieces):
                    last = i == len(pieces) - 1
                    extra: dict[str, Any] = {}
                    if continuous and not state.omit_usage:
                        extra["usage"] = {**usage, "completion_tokens": i + 1,
                                          "total_tokens": prompt_tokens + i + 1}
                    generated += 1
                    yield chunk([{"index": 0, "text": piece,
                                  "finish_reason": finish if last else None}], **extra)
                    if pace:
                        await asyncio.sleep(pace)
                if include_usage and not state.omit_usage:
                    yield chunk([], usage=usage)
                yield "data: [DONE]\n\n"
                completed = True
            finally:
                if not completed:
                    with state.lock:
                        state.aborted_total += 1
                finish_request(generated)

        return StreamingResponse(events(), media_type="text/event-stream")

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
        body = await request.json()
        with state.lock:
            state.requests_total += 1
            state.request_ids.append(request.headers.get("x-request-id", ""))
            state.keep("/v1/chat/completions", request.headers.get("x-request-id", ""), body)
            if state.fail_next > 0:
                state.fail_next -= 1
                return JSONResponse({"error": {"message": "injected failure"}},
                                    status_code=state.fail_status)
            state.running += 1
            state.max_running = max(state.max_running, state.running)
        said = chat_text(body.get("messages") or [])
        tools = body.get("tools") or []
        max_tokens = int(body.get("max_tokens") or 16)
        index = call_index(request.headers.get("x-request-id", ""))
        text = scripted_answer(said, index)
        structured = body.get("structured_outputs") or {}
        call: dict[str, Any] | None = None
        if tools:
            call = tool_call(text, tools, body.get("tool_choice"), max_tokens, index)
        if call is None:
            if text is None:
                text = state.plan_text if structured.get("regex") and "Sub-questions:" in said \
                    else default_text(max_tokens)
            text = constrained(text, structured.get("json"))
        await pause_for(index)
        pieces = re.findall(r"\s*\S+", call["arguments"] if call else str(text))[:max_tokens]
        finish = "length" if len(pieces) >= max_tokens else (
            "tool_calls" if call else "stop")
        prompt_tokens = count_tokens(said + json.dumps(tools))
        with state.lock:
            cached = state.cached_tokens(said)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(pieces),
                 "total_tokens": prompt_tokens + len(pieces),
                 "prompt_tokens_details": {"cached_tokens": cached}}
        created = int(time.time())
        cmpl_id = f"chatcmpl-{state.requests_total}"

        def finish_request(generated: int) -> None:
            with state.lock:
                state.running -= 1
                state.prompt_tokens_total += prompt_tokens
                state.generation_tokens_total += generated

        def delta(i: int, piece: str) -> dict[str, Any]:
            if call is None:
                return {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
            fn: dict[str, Any] = {"arguments": piece}
            entry: dict[str, Any] = {"index": 0, "function": fn}
            if i == 0:
                fn["name"] = call["name"]
                entry.update(id=f"call_{index}", type="function")
            return {"tool_calls": [entry]}

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            return "data: " + json.dumps({"id": cmpl_id, "object": "chat.completion.chunk",
                                          "created": created, "model": state.model,
                                          "choices": choices, **extra}) + "\n\n"

        pace = state.token_delay(said)

        async def events() -> Any:
            generated = 0
            try:
                await pause()
                for i, piece in enumerate(pieces):
                    generated += 1
                    last = i == len(pieces) - 1
                    yield chunk([{"index": 0, "delta": delta(i, piece),
                                  "finish_reason": finish if last else None}],
                                usage={**usage, "completion_tokens": generated,
                                       "total_tokens": prompt_tokens + generated})
                    if pace:
                        await asyncio.sleep(pace)
                if not state.omit_usage:
                    yield chunk([], usage=usage)
                yield "data: [DONE]\n\n"
            finally:
                finish_request(generated)

        return StreamingResponse(events(), media_type="text/event-stream")

    def tool_call(text: str | None, tools: list[dict[str, Any]], choice: Any,
                  max_tokens: int, index: int) -> dict[str, Any] | None:
        """The tool call to answer with: the scripted one, the forced one, or (under
        `required`) the last tool offered; None to answer with text."""
        functions = {t["function"]["name"]: t["function"] for t in tools}
        forced = (choice.get("function") or {}).get("name") if isinstance(choice, dict) \
            else None
        wanted: dict[str, Any] | None = None
        if text is not None:
            try:
                parsed = json.loads(text)
                if isinstance(parsed, dict) and isinstance(parsed.get("tool"), str):
                    wanted = parsed
            except ValueError:
                pass
        if wanted is not None and (forced is None or wanted["tool"] == forced):
            return {"name": wanted["tool"],
                    "arguments": json.dumps(wanted.get("arguments", {}))}
        name = forced or (list(functions)[-1] if choice == "required" else None)
        if name is None or name not in functions:
            return None
        filler = text if text is not None and wanted is None else default_text(max_tokens)
        params = functions[name].get("parameters") or {}
        return {"name": name, "arguments": json.dumps(fit_to_schema(filler, params))}

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
                if key in {"delay_s", "batch_delay_s", "token_delay_s", "hold_until_running",
                           "hold_timeout_s", "fail_next", "fail_status", "omit_usage",
                           "plan_text", "replies", "scripts", "token_delay_by_marker",
                           "tokenize_status", "context"}:
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class StandinServer:
    """A stand-in server on a thread of this process."""

    def __init__(self, port: int | None = None, **state: Any) -> None:
        self.state = StandinState(**state)
        self.port = port or free_port()
        config = uvicorn.Config(make_app(self.state), host="127.0.0.1", port=self.port,
                                log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> StandinServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("stand-in server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.standin")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8199)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    uvicorn.run(make_app(StandinState(delay_s=args.delay)), host=args.host, port=args.port,
                log_level="warning")


if __name__ == "__main__":
    main()
