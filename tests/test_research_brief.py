"""The pieces of deep research on their own: reading, checking and attributing a structured
paragraph, rendering it, and `output_schema`'s checks, derived schema and validation."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from pydantic import ValidationError

from agents.research import ResearchInput
from agents.research.brief import extract, read_paragraph, render, resolve
from agents.research.outschema import check_output_schema, extraction_schema, read_extraction
from agents.research.plan import gap_regex, parse_gaps

PASSAGES = {1: "Honey bees make honey from flower nectar.",
            2: "Bees store honey in wax cells sealed with wax.",
            3: "Volcanoes erupt when magma rises."}


def test_a_paragraph_is_read_from_json_or_from_prose_with_markers() -> None:
    as_json = json.dumps({"sentences": [{"text": "Bees make honey.", "passages": [1]},
                                        {"text": 3}, "junk"]})
    assert read_paragraph(as_json) == [("Bees make honey.", [1])]
    assert read_paragraph("Bees make honey [1]. They keep it in wax [2].") == [
        ("Bees make honey.", [1]), ("They keep it in wax.", [2])]


def test_a_paragraph_cut_short_keeps_its_whole_sentences_never_its_json() -> None:
    """A structured paragraph whose call ran out of `max_tokens` mid-sentence."""
    cut = json.dumps({"sentences": [
        {"text": "Bees make honey from nectar.", "passages": [1]},
        {"text": 'They seal it "well".', "passages": [1, 2]},
        {"text": "The bees then make honey from the honey they", "passages": [2]}]})[:-40]
    assert read_paragraph(cut) == [("Bees make honey from nectar.", [1]),
                                   ('They seal it "well".', [1, 2])]
    assert read_paragraph('{"sentences":[{"text":"The be') == []


def test_resolve_keeps_supported_numbers_drops_invalid_ones_and_attributes_the_rest() -> None:
    got = resolve([("Honey bees make honey from flower nectar.", [1]),
                   ("Bees keep honey in wax cells.", [9]),  # 9 names no passage
                   ("Honey comes from nectar.", [3]),  # 3 does not hold its words
                   ("The queen lives for decades.", [])], PASSAGES)
    assert got.sentences == [
        ("Honey bees make honey from flower nectar.", [1], "model"),
        ("Bees keep honey in wax cells.", [2], "overlap"),
        ("Honey comes from nectar.", [1], "overlap"),
        ("The queen lives for decades.", [], "none")]
    assert got.invalid == [9]


def test_a_second_passage_is_cited_only_for_words_the_first_does_not_hold() -> None:
    got = resolve([("Honey bees fill wax cells with flower nectar.", [])], PASSAGES)
    assert got.sentences == [("Honey bees fill wax cells with flower nectar.", [1, 2],
                              "overlap")]


def test_markers_in_a_sentence_split_it_and_each_part_keeps_its_own() -> None:
    got = resolve([("Bees make honey from nectar [1]. They seal wax cells [2].", [])], PASSAGES)
    assert [(t, ns) for t, ns, _ in got.sentences] == [
        ("Bees make honey from nectar.", [1]), ("They seal wax cells.", [2])]


def test_rendered_markers_sit_before_the_closing_punctuation() -> None:
    assert render([("Bees make honey.", [1, 2]), ("No source here.", []),
                   ("No stop", [3])]) == "Bees make honey [1][2]. No source here. No stop [3]"


def test_quoting_picks_the_sentence_closest_to_the_question() -> None:
    got = extract("Where do bees store honey?", PASSAGES, at_most=1)
    assert got == [("Bees store honey in wax cells sealed with wax.", [2], "passage")]


def test_gap_questions_already_asked_are_dropped() -> None:
    assert parse_gaps('["Where do bees store honey?", "Why is honey sweet?"]',
                      ["where do bees store honey?"], 2) == ["Why is honey sweet?"]
    assert parse_gaps("[]", [], 2) == []
    assert parse_gaps("not json", [], 2) is None
    assert gap_regex(2).startswith(r"(\[\]|")


SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["name"],
    "properties": {"name": {"type": "string"}, "tags": {"$ref": "#/$defs/tags"}},
    "$defs": {"tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}}}


def test_the_derived_schema_wraps_each_field_and_keeps_definitions() -> None:
    derived = extraction_schema(SCHEMA, citations=5)
    jsonschema.Draft202012Validator.check_schema(derived)
    good = {"name": {"value": "bees", "citations": [1], "confidence": 0.9},
            "tags": {"value": ["a"], "citations": [], "confidence": 0.2}}
    jsonschema.validate(good, derived)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": {"value": "x", "citations": [6], "confidence": 1}},
                            derived)
    assert derived["required"] == ["name"]


def test_an_extracted_object_is_validated_against_the_users_schema() -> None:
    ok = read_extraction(json.dumps({
        "name": {"value": "bees", "citations": [1, 1, 7], "confidence": 3}}), SCHEMA, 2)
    assert ok.error is None
    assert ok.object == {"name": "bees"}
    assert ok.citations == {"name": [1]}
    assert ok.confidence == {"name": 1.0}
    bad = read_extraction(json.dumps({
        "name": {"value": "b", "citations": [], "confidence": 0.5},
        "tags": {"value": ["a", "b", "c", "d"], "citations": [], "confidence": 0.5}}),
        SCHEMA, 2)
    assert bad.object is None
    assert bad.error is not None
    assert bad.error.startswith("tags: ")
    assert read_extraction("{", SCHEMA, 2).error is not None
    assert "name" in (read_extraction("{}", SCHEMA, 2).error or "")


def test_schema_checks() -> None:
    check_output_schema(SCHEMA)
    for bad in ({"type": "object", "properties": {}}, {"type": "object",
                                                      "properties": {"a": {"type": 5}}},
                {"type": "object", "properties": {f"p{i}": {} for i in range(33)}},
                {"$schema": "foo", "type": "object", "properties": {"a": {}}},
                {"$schema": 5, "type": "object", "properties": {"a": {}}},
                {"type": "object", "properties": {"a": {"$ref": "#/$defs/none"}}}):
        with pytest.raises(ValueError, match=r"."):
            check_output_schema(bad)
    with pytest.raises(ValidationError, match="output_schema"):
        ResearchInput(query="How?", output_schema={"type": "array"})


def test_a_sentence_said_again_is_kept_once_and_a_paragraph_is_bounded() -> None:
    said = "Honey bees make honey from flower nectar. " * 5 + "Bees store honey in wax cells."
    got = resolve([(said, []), ("honey bees make honey from flower nectar", [1])], PASSAGES)
    assert [t for t, _, _ in got.sentences] == ["Honey bees make honey from flower nectar.",
                                                "Bees store honey in wax cells."]
    assert resolve([("wax", [1, 2]), ("", [1])], PASSAGES).sentences == []
    many = " ".join(f"Bees make honey number w{i}." for i in range(20))
    assert len(resolve([(many, [1])], PASSAGES).sentences) == 8
