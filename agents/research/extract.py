"""The extraction step of a research job with an `output_schema`: one structured call, under a
schema derived from the user's (`agents.research.outschema`), turns the final brief into an
object valid against the user's schema, each field with the brief's citations that support it
and a confidence. An object that does not validate is never returned: the call escalates to the
next larger size class where the catalogue has one, then is made once more with the validation
error in its prompt; when that fails too, the step says why.
"""

from __future__ import annotations

import json

from agents.base import CallSpec, StepContext
from agents.citations import attribute
from agents.research.brief import fit
from agents.research.models import Citation, ExtractionOutput, FieldSupport, ResearchInput
from agents.research.outschema import Extracted, extraction_schema, read_extraction
from agents.research.synthesis import _cited_prefix, _notes, final_brief

ATTEMPTS = 2
EXTRACT_CUE = ("A JSON object with, for each field, its value, the numbers of the sources "
               "that support it and a confidence from 0 to 1:")


def _fields_line(schema: dict[str, object]) -> str:
    props = schema.get("properties")
    assert isinstance(props, dict)
    return "Fields: " + json.dumps(props, separators=(",", ":"))[:4000] + "\n"


def extract(ctx: StepContext, job_input: ResearchInput) -> ExtractionOutput:
    schema = job_input.output_schema
    assert schema is not None
    brief = final_brief(ctx)
    citations = brief.citations or []
    n = len(citations)
    derived = extraction_schema(schema, n)
    fields = f"Overall answer: {brief.answer}\n\n" + _fields_line(schema)
    # The whole brief where the model's context holds it, else its overall answer only.
    prompts = [_cited_prefix(job_input.query) + _notes(brief.sections) + fields,
               _cited_prefix(job_input.query) + fields]

    def read(text: str) -> Extracted:
        return read_extraction(text, schema, n)

    error: str | None = None
    attempts, escalated = 0, False
    for _ in range(ATTEMPTS):
        note = "" if error is None else \
            f"A previous answer was not valid: {error}. Write one that is.\n"
        calls = (fit(ctx, CallSpec(prompt=p + note + EXTRACT_CUE, json_schema=derived,
                                   validate=lambda text: read(text).error is None))
                 for p in prompts)
        call = next((c for c in calls if c is not None), None)
        if call is None:
            error = "the brief and the schema do not fit the model's context"
            break
        reply = ctx.complete(call)
        attempts += 1 + (1 if reply.escalated_from else 0)
        escalated = escalated or reply.escalated_from is not None
        got = read(reply.text)
        if got.error is None and got.object is not None:
            return ExtractionOutput(object=got.object, fields=_support(ctx, job_input, got,
                                                                       brief.citations or []),
                                    attempts=attempts, escalated=escalated)
        error = got.error
    return ExtractionOutput(
        object=None, attempts=attempts, escalated=escalated,
        error=f"no object valid against output_schema could be made ({attempts} attempts): "
              f"{error}")


def _support(ctx: StepContext, job_input: ResearchInput, got: Extracted,
             citations: list[Citation]) -> dict[str, FieldSupport]:
    """Each field's citations (those the model named, else those whose passages share the
    value's words) and confidence."""
    assert got.object is not None
    texts: dict[str, str] = {}
    if job_input.corpus_id and citations:
        by_chunk = {c.chunk: c.n for c in citations}
        read = ctx.read_passages(job_input.corpus_id, sorted(by_chunk))
        texts = {str(by_chunk[chunk]): text for chunk, text in read.items()}
    out = {}
    for name, value in got.object.items():
        cited = got.citations.get(name, [])
        if not cited and texts:
            said = value if isinstance(value, str) else json.dumps(value)
            cited = [int(k) for k in attribute(said, texts)]
        out[name] = FieldSupport(citations=cited, confidence=got.confidence.get(name, 0.0))
    return out
