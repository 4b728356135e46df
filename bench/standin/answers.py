"""What a stand-in server answers: default text, text fitted to a JSON schema as a constrained
decoder would, and tool calls."""

from __future__ import annotations

import json
from typing import Any


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
