"""Conversations for models without tool calling: a plain-text transcript (for base models,
which have no chat template) and a JSON-schema constraint under which the model chooses its
action, either one tool call `{"tool": name, "arguments": {...}}` or its final answer
`{"final": {...}}`.

The transcript is laid out prefix-stable: the system text and the tool descriptions come
first and never change within a step (nor between the steps of a role), then the task, then
each turn appended as it happens, so the model server's prefix cache serves every turn but the
newest part. The model's own actions are kept verbatim.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from inference.calls import CallSpec, ChatMessage, ToolCall, ToolSchema

ACTION_RULES = (
    "Each turn, write exactly one JSON object on one line: either a tool call "
    '{"tool": "<name>", "arguments": {...}} or, once you can answer, the final answer '
    '{"final": {...}}.')
# Every message adds some tokens of its own under a chat template (roles, separators).
MESSAGE_OVERHEAD_TOKENS = 16
# A chat template may add instructions of its own for tools.
TOOLS_OVERHEAD_TOKENS = 512


def _type_of(schema: Mapping[str, Any], defs: Mapping[str, Any]) -> str:
    ref = schema.get("$ref")
    if isinstance(ref, str):
        target = defs.get(ref.rsplit("/", 1)[-1], {})
        return _signature(target, defs) if target.get("properties") else str(
            target.get("type", "object"))
    if "anyOf" in schema:
        return " or ".join(_type_of(s, defs) for s in schema["anyOf"])
    kind = schema.get("type")
    if kind == "array":
        return f"list of {_type_of(schema.get('items') or {}, defs)}"
    if kind == "object" and schema.get("properties"):
        return _signature(schema, defs)
    if "enum" in schema:
        return " | ".join(json.dumps(v) for v in schema["enum"])
    return str(kind or "any")


def _signature(schema: Mapping[str, Any], defs: Mapping[str, Any] | None = None) -> str:
    """A compact description of an object schema: `{"query": string, "k": integer}`."""
    defs = {**(defs or {}), **(schema.get("$defs") or {})}
    required = set(schema.get("required") or ())
    fields = []
    for name, prop in (schema.get("properties") or {}).items():
        optional = "" if name in required else " (optional)"
        fields.append(f"{json.dumps(name)}: {_type_of(prop, defs)}{optional}")
    return "{" + ", ".join(fields) + "}"


def _describe(tool: ToolSchema) -> str:
    return f"- {tool.name}: {tool.description.strip()} Arguments: {_signature(tool.parameters)}"


def tool_instructions(tools: Sequence[ToolSchema], answer: ToolSchema | None) -> str:
    lines = [ACTION_RULES, "", "Tools:"]
    lines += [_describe(t) for t in tools] or ["(none)"]
    if answer is not None:
        lines += ["", f"Final answer: {answer.description.strip()} "
                      f"Fields: {_signature(answer.parameters)}"]
    return "\n".join(lines)


def _assistant_text(message: ChatMessage) -> str:
    if message.content:
        return message.content.strip()
    return " ".join(json.dumps({"tool": c.name, "arguments": _loads(c.arguments)},
                               ensure_ascii=False) for c in message.tool_calls)


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def render(call: CallSpec) -> str:
    """The conversation as one plain-text prompt, ending where the model writes its next
    action."""
    messages = list(call.messages or ())
    parts: list[str] = []
    system = [m.content for m in messages if m.role == "system"]
    parts.append("\n\n".join([*system, tool_instructions(call.tools, call.answer)]))
    action = 0
    for m in messages:
        if m.role == "system":
            continue
        if m.role == "assistant":
            action += 1
            parts.append(f"Action {action}: {_assistant_text(m)}")
        elif m.role == "tool":
            parts.append(f"Result {action} ({m.name or 'tool'}):\n{m.content.strip()}")
        else:
            parts.append(m.content.strip())
    parts.append(f"Action {action + 1}:")
    return "\n\n".join(parts)


SPEAKERS = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}


def render_chat(call: CallSpec) -> str:
    """A plain chat as a transcript for a model without a chat template: each turn under
    its speaker's name, ending where the assistant answers."""
    parts = [f"{SPEAKERS.get(m.role, m.role)}: {m.content.strip()}"
             for m in call.messages or ()]
    parts.append("Assistant:")
    return "\n\n".join(parts)


def plain_chat_messages(call: CallSpec) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in call.messages or ()]


def chat_messages(call: CallSpec) -> list[dict[str, str]]:
    """The conversation for a chat model without tool calling: the tools described in the
    system message, tool results as user turns, the model's actions as it wrote them."""
    messages = list(call.messages or ())
    system = "\n\n".join([*(m.content for m in messages if m.role == "system"),
                          tool_instructions(call.tools, call.answer)])
    out = [{"role": "system", "content": system}]
    action = 0
    for m in messages:
        if m.role == "system":
            continue
        if m.role == "assistant":
            action += 1
            out.append({"role": "assistant", "content": _assistant_text(m)})
        elif m.role == "tool":
            out.append({"role": "user",
                        "content": f"Result {action} ({m.name or 'tool'}):\n{m.content}"})
        else:
            out.append({"role": "user", "content": m.content})
    return out


def _hoist(schema: Mapping[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """The schema without its `$defs`, which join `defs` (references point at the root)."""
    out = dict(schema)
    for name, definition in (out.pop("$defs", None) or {}).items():
        if defs.setdefault(name, definition) != definition:
            raise ValueError(f"two tools define different schemas named {name!r}")
    return out


def action_schema(call: CallSpec) -> dict[str, Any]:
    """The JSON schema of the model's next action: a call of one of the tools (or only the
    one `tool_choice` names) or the final answer."""
    only = None if call.tool_choice in ("required", "auto") else call.tool_choice
    defs: dict[str, Any] = {}
    branches: list[dict[str, Any]] = []
    for tool in call.tools:
        if only is None or only == tool.name:
            branches.append({
                "type": "object",
                "properties": {"tool": {"const": tool.name},
                               "arguments": _hoist(tool.parameters, defs)},
                "required": ["tool", "arguments"], "additionalProperties": False})
    if call.answer is not None and (only is None or only == call.answer.name):
        branches.append({"type": "object",
                         "properties": {"final": _hoist(call.answer.parameters, defs)},
                         "required": ["final"], "additionalProperties": False})
    if not branches:
        raise ValueError(f"tool_choice names no tool of the call: {call.tool_choice!r}")
    schema: dict[str, Any] = branches[0] if len(branches) == 1 else {"anyOf": branches}
    if defs:
        schema = {**schema, "$defs": defs}
    return schema


def parse_action(text: str, answer: ToolSchema | None, turn: int | None = None
                 ) -> tuple[ToolCall, ...]:
    """The action the model wrote (the first JSON object of its text); none when it wrote no
    action. A final answer is a call of the `answer` tool."""
    stripped = text.lstrip()
    try:
        obj, _ = json.JSONDecoder().raw_decode(stripped)
    except ValueError:
        return ()
    if not isinstance(obj, dict):
        return ()
    call_id = f"call_{turn}" if turn is not None else "call_0"
    if "final" in obj and answer is not None:
        return (ToolCall(answer.name, json.dumps(obj["final"], ensure_ascii=False), call_id),)
    name = obj.get("tool")
    if isinstance(name, str):
        arguments = obj.get("arguments", {})
        return (ToolCall(name, json.dumps(arguments, ensure_ascii=False), call_id),)
    return ()


def _size(text: str) -> int:
    return len(text.encode("utf-8"))


def plain_bound(call: CallSpec) -> int:
    """Prompt tokens of the call as a plain prompt or transcript, at most: every token is at
    least one byte."""
    if call.is_chat:
        return _size(render_chat(call)) + 8
    return _size(render(call) if call.messages is not None else call.prompt) + 8


def chat_bound(call: CallSpec, with_tools: bool) -> int:
    """Prompt tokens of the call under a chat template, at most: its texts in bytes, some
    tokens per message, and, with OpenAI tools, their schemas and what a template adds."""
    if call.messages is None:
        return _size(call.prompt) + 2 * MESSAGE_OVERHEAD_TOKENS
    if not with_tools or call.is_chat:
        messages = plain_chat_messages(call) if call.is_chat else chat_messages(call)
        return sum(_size(m["content"]) for m in messages) \
            + MESSAGE_OVERHEAD_TOKENS * (len(messages) + 1)
    size = sum(_size(m.content) + sum(_size(c.name) + _size(c.arguments) for c in m.tool_calls)
               for m in call.messages)
    tools = [t.as_json() for t in call.tools] + ([call.answer.as_json()] if call.answer else [])
    return size + MESSAGE_OVERHEAD_TOKENS * (len(call.messages) + 1) \
        + _size(json.dumps(tools)) + TOOLS_OVERHEAD_TOKENS


def prompt_bound(call: CallSpec) -> int:
    """An upper bound of the call's prompt tokens, whichever way it reaches a model."""
    return max(plain_bound(call), chat_bound(call, False), chat_bound(call, True))
