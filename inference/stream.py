"""One streamed call to one endpoint: what the pool is asked, what it answers, and how.

`send` posts a call shaped for its model (`inference.shapes`) to one endpoint and reads the
streamed answer: text or tool-call chunks, then a usage chunk. A response without usage is an
error, never zero spend; a call given up on closes its connection, which makes vLLM abort the
request. Which endpoint, how often and with what admission is `inference.pool`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from core.errors import AgentqError
from inference.aborts import watching
from inference.calls import CallSpec, ToolCall
from inference.shapes import Shape, StreamReader, build


class InferenceError(AgentqError):
    status_code = 502
    code = "inference_error"


class TransientInferenceError(InferenceError):
    """A failure worth retrying: the server may answer next time."""

    code = "inference_unavailable"


class PoolUnavailable(InferenceError):
    code = "pool_unavailable"


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class CompletionRequest:
    """A call as the pool receives it: the agent's `CallSpec` (with `max_tokens` settled) and
    what the platform adds."""

    call: CallSpec
    request_id: str
    # Accounting ids: admission shares slots fairly across tenants and jobs; calls with the
    # same affinity key prefer the same endpoint (prefix cache).
    tenant_id: str | None = None
    job_id: str | None = None
    affinity_key: str | None = None
    # Polled while the call waits and while it streams; True aborts it.
    cancelled: Callable[[], bool] | None = None
    # The job's service tier: admission serves `interactive` first and `flex` last.
    service_tier: str = "standard"

    @property
    def max_tokens(self) -> int:
        return self.call.max_tokens or 0


@dataclass(frozen=True)
class Completion:
    text: str
    usage: Usage
    finish_reason: str | None
    model: str
    endpoint: str
    latency_ms: float
    attempts: int
    ttft_ms: float | None = None
    energy_wh: float | None = None
    energy_method: str | None = None
    queued_ms: float = 0.0
    tool_calls: tuple[ToolCall, ...] = ()
    # Sent as a chat completion (`/v1/chat/completions`), not a plain completion.
    chat: bool = False


class CallCancelled(InferenceError):
    """The caller gave up (its job was cancelled): the request was closed, and vLLM aborts a
    request whose connection closes. `usage` is what the server had counted until then.
    `sent`: the server had taken the request (it answered, and may have read the prompt)
    before the abort; a call cancelled before (waiting for a slot) never reached it.
    `prompt_tokens`: for a call sent but cancelled before any usage came, its prompt's tokens
    as the server's tokenizer counts the request it was sent, when that could be asked."""

    status_code = 409
    code = "cancelled"

    def __init__(self, message: str, usage: Usage | None = None, model: str | None = None,
                 endpoint: str | None = None, latency_ms: float = 0.0,
                 sent: bool = False) -> None:
        super().__init__(message)
        self.usage, self.model, self.endpoint, self.latency_ms = usage, model, endpoint, latency_ms
        self.sent = sent
        self.prompt_tokens: int | None = None


def send(http: httpx.Client, req: CompletionRequest, base_url: str, model: str, shape: Shape,
         started: float) -> Completion:
    try:
        path, body = build(req.call, model, req.max_tokens, shape)
    except ValueError as exc:
        raise InferenceError(f"cannot shape the call for {model}: {exc}") from exc
    try:
        with http.stream(
            "POST",
            f"{base_url}{path}",
            json=body,
            headers={"X-Request-Id": req.request_id},
        ) as resp:
            if resp.status_code == 429 or resp.status_code >= 500:
                raise TransientInferenceError(
                    f"{base_url} answered {resp.status_code}: {resp.read()[:300]!r}")
            if resp.status_code >= 400:
                raise InferenceError(f"{base_url} refused the request "
                                     f"({resp.status_code}): {resp.read()[:300]!r}")
            # Leaving this block closes the connection: a cancelled call is aborted. While it
            # waits for a chunk, its connection is shut down as soon as it is cancelled.
            with watching(resp, req.cancelled):
                return read_stream(resp, base_url, model, started, req.cancelled, req.call,
                                   shape)
    except httpx.TimeoutException as exc:
        raise TransientInferenceError(f"{base_url} timed out: {exc}") from exc
    except httpx.HTTPError as exc:
        raise TransientInferenceError(f"{base_url} unreachable: {exc}") from exc


def parse_usage(raw: Any) -> Usage | None:
    if not isinstance(raw, dict) or "prompt_tokens" not in raw \
            or "completion_tokens" not in raw:
        return None
    details = raw.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return Usage(int(raw["prompt_tokens"]), int(raw["completion_tokens"]),
                 int(cached) if cached is not None else None)


def read_stream(resp: httpx.Response, endpoint: str, model: str, started: float,
                cancelled: Callable[[], bool] | None = None, call: CallSpec | None = None,
                shape: Shape = Shape.COMPLETION) -> Completion:
    """Read an OpenAI-style completion or chat completion stream: text or tool-call
    chunks (each with the usage so far), then a usage chunk. `cancelled()` is asked after
    each line (a chunk that came is counted first) and when the stream breaks off (the
    aborter shut its connection down: `inference.aborts`)."""
    reader = StreamReader()
    usage: Usage | None = None
    served_model = model
    ttft_ms: float | None = None
    done = False

    def stop_if_cancelled() -> None:
        if cancelled is not None and cancelled():
            raise CallCancelled("the call was cancelled while generating", usage=usage,
                                model=served_model, endpoint=endpoint,
                                latency_ms=(time.monotonic() - started) * 1000, sent=True)

    lines = resp.iter_lines()
    while True:
        try:
            line = next(lines, None)
        except httpx.HTTPError:
            stop_if_cancelled()
            raise
        if line is None:
            break
        if not line.startswith("data:"):
            stop_if_cancelled()
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            done = True
            break
        try:
            chunk = json.loads(payload)
        except ValueError as exc:
            raise InferenceError(f"{endpoint} sent a malformed stream chunk: {exc}") from exc
        if not isinstance(chunk, dict):
            raise InferenceError(f"{endpoint} sent a malformed stream chunk")
        if "error" in chunk:
            raise TransientInferenceError(f"{endpoint} failed mid-stream: "
                                          f"{str(chunk['error'])[:300]}")
        served_model = str(chunk.get("model") or served_model)
        if reader.feed(chunk) and ttft_ms is None:
            ttft_ms = (time.monotonic() - started) * 1000
        usage = parse_usage(chunk.get("usage")) or usage
        stop_if_cancelled()
    latency_ms = (time.monotonic() - started) * 1000
    if not done:
        stop_if_cancelled()
        raise TransientInferenceError(f"{endpoint} closed the stream before its end")
    if usage is None:
        raise InferenceError(f"{endpoint} sent a completion without usage; refusing to "
                             "count it as zero", code="usage_missing")
    return Completion(
        text=reader.text,
        usage=usage,
        finish_reason=reader.finish_reason,
        model=served_model,
        endpoint=endpoint,
        latency_ms=latency_ms,
        attempts=1,
        ttft_ms=ttft_ms if ttft_ms is not None else latency_ms,
        tool_calls=reader.tool_calls(call, shape) if call is not None else (),
        chat=shape is not Shape.COMPLETION,
    )
