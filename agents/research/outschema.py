"""`output_schema`: the user's JSON Schema of an object, checked at submission; the schema of
the extraction call derived from it (each field's value with the citations that support it and
a confidence); and the object the model wrote, validated against the user's schema with the
`jsonschema` library.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from jsonschema import validators
from jsonschema.exceptions import SchemaError

# Bounds of a schema a job may ask for: its size as JSON, its fields.
MAX_SCHEMA_BYTES = 16_384
MAX_FIELDS = 32
# Citations a field may carry.
MAX_FIELD_CITATIONS = 4


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def check_output_schema(schema: dict[str, Any]) -> None:
    """Raise ValueError, saying what is wrong, unless `schema` is a usable schema of an object."""
    size = len(json.dumps(schema, separators=(",", ":")).encode("utf-8"))
    if size > MAX_SCHEMA_BYTES:
        raise ValueError(f"the schema takes {size} bytes as JSON; at most {MAX_SCHEMA_BYTES}")
    if "$schema" in schema and (not isinstance(schema["$schema"], str)
                                or validators.validator_for(schema, default=None) is None):
        raise ValueError(f"unknown $schema {schema['$schema']!r}; leave it out for draft "
                         "2020-12")
    try:
        validators.validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "the schema"
        raise ValueError(f"not a valid JSON Schema: {exc.message} (at {where})") from None
    if schema.get("type") != "object" or not isinstance(schema.get("properties"), dict) \
            or not schema["properties"]:
        raise ValueError("the schema must describe an object: \"type\": \"object\" with "
                         "\"properties\"")
    if len(schema["properties"]) > MAX_FIELDS:
        raise ValueError(f"the schema has {len(schema['properties'])} properties; at most "
                         f"{MAX_FIELDS}")
    for ref in _refs(schema):
        if not ref.startswith("#"):
            raise ValueError(f"only references within the schema (\"#/...\") are allowed, "
                             f"not {ref!r}")
        if not _resolves(schema, ref):
            raise ValueError(f"the reference {ref!r} points at nothing in the schema")


def _resolves(schema: dict[str, Any], ref: str) -> bool:
    node: Any = schema
    for part in [p for p in ref[1:].split("/") if p]:
        part = unquote(part).replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


def field_names(schema: dict[str, Any]) -> list[str]:
    return list(schema["properties"])


def extraction_schema(schema: dict[str, Any], citations: int) -> dict[str, Any]:
    """The schema the model writes under: each of the user's fields becomes
    `{"value": <the field's schema>, "citations": [n, ...], "confidence": 0..1}`."""
    cite: dict[str, Any] = {"type": "array", "maxItems": MAX_FIELD_CITATIONS if citations else 0,
                            "items": {"type": "integer", "minimum": 1,
                                      "maximum": max(1, citations)}}
    props = {name: {"type": "object",
                    "properties": {"value": sub, "citations": cite,
                                   "confidence": {"type": "number", "minimum": 0,
                                                  "maximum": 1}},
                    "required": ["value", "citations", "confidence"],
                    "additionalProperties": False}
             for name, sub in schema["properties"].items()}
    out: dict[str, Any] = {"type": "object", "properties": props,
                           "required": list(schema.get("required") or []),
                           "additionalProperties": False}
    for key in ("$defs", "definitions"):
        if key in schema:
            out[key] = schema[key]
    return out


@dataclass(frozen=True)
class Extracted:
    """What the model wrote, made into the user's object; `error` says why it is not valid."""

    object: dict[str, Any] | None
    citations: dict[str, list[int]]
    confidence: dict[str, float]
    error: str | None


def first_error(schema: dict[str, Any], instance: Any) -> str | None:
    validator = validators.validator_for(schema)(schema)
    try:
        errors = sorted(validator.iter_errors(instance), key=lambda e: [str(p) for p in e.path])
    except Exception as exc:  # noqa: BLE001 - a schema the checks let through yet cannot apply
        return f"the schema could not be applied: {type(exc).__name__}: {exc}"
    if not errors:
        return None
    err = errors[0]
    where = "/".join(str(p) for p in err.absolute_path) or "the object"
    return f"{where}: {err.message}"


def read_extraction(text: str, schema: dict[str, Any], citations: int) -> Extracted:
    """The object the model wrote, validated against the user's schema."""
    try:
        raw = json.loads(text)
    except ValueError as exc:
        return Extracted(None, {}, {}, f"the model's answer is not JSON: {exc}")
    if not isinstance(raw, dict):
        return Extracted(None, {}, {}, "the model's answer is not a JSON object")
    obj: dict[str, Any] = {}
    cites: dict[str, list[int]] = {}
    confidence: dict[str, float] = {}
    for name in field_names(schema):
        entry = raw.get(name)
        if not isinstance(entry, dict) or "value" not in entry:
            continue
        obj[name] = entry["value"]
        given = entry.get("citations")
        numbers: list[Any] = given if isinstance(given, list) else []
        cites[name] = [n for n in dict.fromkeys(numbers)
                       if isinstance(n, int) and 1 <= n <= citations][:MAX_FIELD_CITATIONS]
        conf = entry.get("confidence")
        confidence[name] = min(1.0, max(0.0, float(conf))) \
            if isinstance(conf, int | float) and not isinstance(conf, bool) else 0.0
    error = first_error(schema, obj)
    return Extracted(None if error else obj, cites, confidence, error)
