"""Request shapes: a `CallSpec` as the HTTP request a model of the catalogue takes, and the
streamed answer read back into text, tool calls and usage.

Three shapes, by what the catalogue says of the model (`ModelSpec.api`, `.tool_calling`):

- `completions`: `/v1/completions` with the prompt; a conversation as a plain transcript
  (`inference.transcript`) with its action constrained by a JSON schema; a plain chat (messages
  without tools) as a transcript of its turns.
- `chat` with tool calling: `/v1/chat/completions` with `messages` and `tools` (OpenAI's
  format; the final answer is one more tool), the tool calls read from the stream.
- `chat` without tool calling: `/v1/chat/completions` with the tools described in the system
  message and the action constrained by a JSON schema, as for a base model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from core.catalogue import ModelSpec
from inference import transcript
from inference.calls import CallSpec, ToolCall


class Shape(StrEnum):
    COMPLETION = "completion"  # a prompt, or a conversation as a transcript
    CHAT = "chat"  # messages; a conversation's tools described in text
    CHAT_TOOLS = "chat_tools"  # messages with OpenAI tools


def shape_of(call: CallSpec, spec: ModelSpec | None) -> Shape:
    if spec is None or spec.api == "completions":
        return Shape.COMPLETION
    if call.is_conversation and spec.tool_calling:
        return Shape.CHAT_TOOLS
    return Shape.CHAT


def prompt_bound(call: CallSpec, shapes: set[Shape]) -> int:
    """An upper bound of the call's prompt tokens in any of these shapes."""
    bounds = [transcript.plain_bound(call) if shape is Shape.COMPLETION
              else transcript.chat_bound(call, shape is Shape.CHAT_TOOLS) for shape in shapes]
    return max(bounds) if bounds else transcript.prompt_bound(call)


def _structured(call: CallSpec, action: bool) -> dict[str, Any]:
    """vLLM's `structured_outputs`, passed through as the call sets them (vLLM takes one)."""
    if action:
        # Without `disable_any_whitespace` a JSON-schema constraint lets a small model pad
        # with whitespace until max_tokens runs out.
        return {"json": transcript.action_schema(call), "disable_any_whitespace": True}
    structured: dict[str, Any] = {}
    if call.regex is not None:
        structured["regex"] = call.regex
    if call.json_schema is not None:
        structured["json"] = dict(call.json_schema)
        structured["disable_any_whitespace"] = True
    if call.choice is not None:
        structured["choice"] = list(call.choice)
    return structured


def _function(tool: Any) -> dict[str, Any]:
    return {"type": "function", "function": tool.as_json()}


def _chat_tools(call: CallSpec) -> tuple[list[dict[str, Any]], Any]:
    tools = [_function(t) for t in call.tools]
    if call.answer is not None:
        tools.append(_function(call.answer))
    if call.tool_choice in ("required", "auto", "none"):
        choice: Any = call.tool_choice
    else:
        choice = {"type": "function", "function": {"name": call.tool_choice}}
    return tools, choice


def chat_message(message: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        out["content"] = message.content or None
        out["tool_calls"] = [{"id": c.id, "type": "function",
                              "function": {"name": c.name, "arguments": c.arguments}}
                             for c in message.tool_calls]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.role == "tool" and message.name is not None:
        out["name"] = message.name
    return out


def build(call: CallSpec, model: str, max_tokens: int, shape: Shape) -> tuple[str, dict[str, Any]]:
    """The path and JSON body of the request."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": call.temperature,
        "stream": True,
        # Usage on every chunk: a call aborted half-way is still counted exactly.
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    if call.stop:
        body["stop"] = list(call.stop)
    action = call.is_conversation and shape is not Shape.CHAT_TOOLS
    structured = _structured(call, action)
    if shape is Shape.COMPLETION:
        path = "/v1/completions"
        if call.is_chat:
            body["prompt"] = transcript.render_chat(call)
        else:
            body["prompt"] = transcript.render(call) if call.is_conversation else call.prompt
    else:
        path = "/v1/chat/completions"
        if shape is Shape.CHAT_TOOLS:
            body["messages"] = [chat_message(m) for m in call.messages or ()]
            body["tools"], body["tool_choice"] = _chat_tools(call)
            body["parallel_tool_calls"] = False
        elif call.is_chat:
            body["messages"] = transcript.plain_chat_messages(call)
        elif call.is_conversation:
            body["messages"] = transcript.chat_messages(call)
        else:
            body["messages"] = [{"role": "user", "content": call.prompt}]
    if structured:
        body["structured_outputs"] = structured
    return path, body


@dataclass
class _PartialCall:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


@dataclass
class StreamReader:
    """Reads the chunks of a streamed completion or chat completion."""

    parts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    saw_text: bool = False
    _calls: dict[int, _PartialCall] = field(default_factory=dict)

    def feed(self, chunk: dict[str, Any]) -> bool:
        """Take one chunk; whether it carried generated output (for time to first token)."""
        produced = False
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                text = delta.get("content") or ""
                for raw in delta.get("tool_calls") or []:
                    produced = self._tool_delta(raw) or produced
            else:
                text = choice.get("text") or ""
            if text:
                self.parts.append(text)
                produced = True
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
        return produced

    def _tool_delta(self, raw: Any) -> bool:
        if not isinstance(raw, dict):
            return False
        index = int(raw.get("index") or 0)
        call = self._calls.setdefault(index, _PartialCall())
        call.id = raw.get("id") or call.id
        function = raw.get("function") or {}
        if isinstance(function, dict):
            call.name = function.get("name") or call.name
            if function.get("arguments"):
                call.arguments.append(str(function["arguments"]))
        return True

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def tool_calls(self, call: CallSpec, shape: Shape) -> tuple[ToolCall, ...]:
        """The tool calls of the answer: as streamed (OpenAI tools), or the action the model
        wrote (a conversation under a JSON-schema constraint)."""
        if shape is Shape.CHAT_TOOLS:
            return tuple(ToolCall(c.name, "".join(c.arguments) or "{}", c.id or f"call_{i}")
                         for i, c in sorted(self._calls.items()))
        if call.is_conversation:
            return transcript.parse_action(self.text, call.answer, call.turn)
        return ()


def encode_tool_calls(calls: tuple[ToolCall, ...]) -> list[dict[str, str]] | None:
    """Tool calls as stored in the ledger (None when there are none)."""
    return [c.as_json() for c in calls] or None


def decode_tool_calls(stored: Any) -> tuple[ToolCall, ...]:
    if not stored:
        return ()
    if isinstance(stored, str):
        stored = json.loads(stored)
    return tuple(ToolCall(str(c.get("name", "")), str(c.get("arguments", "{}")),
                          str(c.get("id", ""))) for c in stored)
