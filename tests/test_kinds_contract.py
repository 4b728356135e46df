"""Each built-in job kind's DAG run in memory against a fake `StepContext`: no database, no
worker, no model server. Outputs travel between steps as JSON, as they do through the database,
and are read back as their roles' models."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import pytest
from pydantic import BaseModel

from agents.base import (
    CallSpec,
    Child,
    Document,
    JobKind,
    ModelReply,
    Passage,
    PromptSize,
    Role,
    SpawnRefused,
    StepContext,
    StepOutputs,
    StepSpec,
    ToolCall,
)
from agents.batch import Batch, BatchInput, BatchResult
from agents.coding import Coding, CodingInput, CodingResult
from agents.completion import Completion, CompletionInput, CompletionResult
from agents.registry import get_kind, kind_names
from agents.research import (
    INVESTIGATOR,
    PLANNER,
    SYNTHESIS_CUE,
    PlanOutput,
    Research,
    ResearchInput,
    ResearchResult,
)
from bench.standin import constrained
from inference.transcript import action_schema, parse_action, prompt_bound
from orchestrator.metering import MeteredContext

Answer = Callable[[CallSpec], str]

OutputT = TypeVar("OutputT", bound=BaseModel)


class FakeContext:
    """A `StepContext` that answers model calls with `answer`, searches return `passages`, and
    `chunks` holds the corpus's chunk texts."""

    def __init__(self, spec: StepSpec, parents: StepOutputs, answer: Answer,
                 passages: Sequence[Passage] = (), chunks: Mapping[str, str] | None = None
                 ) -> None:
        self.step_key = spec.key
        self.role = spec.role.name
        self.step_input: Mapping[str, Any] = spec.input
        self.step_max_tokens = spec.max_tokens
        self.parents = parents
        self.calls: list[CallSpec] = []
        self._answer = answer
        self._passages = list(passages)
        self._chunks = dict(chunks or {})
        self.files: dict[str, bytes] = {}

    def complete(self, call: CallSpec) -> ModelReply:
        self.calls.append(call)
        text = self._answer(call)
        valid = call.validate(text) if call.validate is not None else None
        tool_calls: tuple[ToolCall, ...] = ()
        if call.is_conversation:
            # As a server under the action's JSON-schema constraint would answer.
            text = constrained(text, action_schema(call))
            tool_calls = parse_action(text, call.answer, call.turn)
        return ModelReply(text, "stop", len(call.prompt.split()) + 1, len(text.split()),
                          model="fake", valid=valid, tool_calls=tool_calls)

    def stopped(self) -> bool:
        return False

    def search_corpus(self, corpus_id: str, query: str, k: int) -> list[Passage]:
        return self._passages[:k]

    def read_passages(self, corpus_id: str, chunk_ids: Sequence[str]) -> dict[str, str]:
        return {c: self._chunks[c] for c in chunk_ids if c in self._chunks}

    def read_file(self, file_id: str, start: int, end: int) -> bytes:
        return self.files.get(file_id, b"")[start:end]

    def read_document(self, corpus_id: str, document_id: str) -> Document | None:
        texts = [p.text for p in self._passages if p.document_id == document_id]
        return Document(document_id, "fake", " ".join(texts)) if texts else None

    def job_tokens_left(self) -> int | None:
        return None

    def spawn(self, child: Child[Any, OutputT], tasks: Sequence[BaseModel]) -> list[OutputT]:
        raise SpawnRefused("no sub-agents in this fake")

    def prompt_size(self, call: CallSpec) -> PromptSize:
        return PromptSize(prompt_bound(call))


def _as_step_context(ctx: FakeContext) -> StepContext:
    return ctx  # mypy: the fake has the protocol's shape


def _metered_is_a_step_context(ctx: MeteredContext) -> StepContext:
    return ctx  # mypy: so has the orchestrator's context


class Run:
    """A kind's steps run to the end, in dependency order."""

    def __init__(self, kind: JobKind[Any, Any], job_input: BaseModel, answer: Answer,
                 passages: Sequence[Passage] = (), chunks: Mapping[str, str] | None = None,
                 stop_after: int | None = None) -> None:
        self.order: list[str] = []
        self.roles: dict[str, Role[Any]] = {}
        stored: dict[str, tuple[str, dict[str, Any]]] = {}
        pending = list(kind.initial_steps(job_input))
        while pending and (stop_after is None or len(self.order) < stop_after):
            ready = [s for s in pending if all(d in stored for d in s.depends_on)]
            assert ready, f"no step can run: {[s.key for s in pending]}"
            spec = ready[0]
            pending.remove(spec)
            parents = StepOutputs({d: stored[d] for d in spec.depends_on})
            ctx = FakeContext(spec, parents, answer, passages, chunks)
            output = kind.run_step(_as_step_context(ctx), job_input)
            assert isinstance(output, spec.role.output), (spec.key, type(output))
            stored[spec.key] = (spec.role.name, json.loads(output.model_dump_json()))
            self.order.append(spec.key)
            self.roles[spec.key] = spec.role
            pending.extend(kind.expand(job_input, spec.key, spec.role, output))
        self.pending = [s.key for s in pending]
        self.outputs = StepOutputs(stored)


def test_the_registry_finds_the_built_in_kinds() -> None:
    assert {"research", "coding", "completion", "batch"} <= set(kind_names())
    research = get_kind("research")
    assert isinstance(research, Research)
    assert research.phases == {"planner": "planning", "investigator": "investigating",
                               "gap_analyst": "analysing gaps", "synthesiser": "synthesising",
                               "critic": "critiquing", "reviser": "revising",
                               "verifier": "verifying", "extractor": "extracting"}
    assert get_kind("no-such-kind") is None


# --- Research ----------------------------------------------------------------------------------

PLAN = ["How do bees collect nectar?", "How do bees turn nectar into honey?",
        "Where do bees keep their honey?"]


def research_answer(section: str, synthesis: str) -> Answer:
    def answer(call: CallSpec) -> str:
        if call.regex is not None:
            return json.dumps(PLAN)
        if call.prompt.endswith(SYNTHESIS_CUE):
            return " " + synthesis
        return " " + section
    return answer


def test_research_without_a_corpus() -> None:
    kind = Research()
    job_input = kind.parse_input({"query": "How do bees make honey?", "max_subquestions": 3})
    run = Run(kind, job_input, research_answer("Bees do it.", "Bees make honey."))
    assert run.order == ["plan", "investigate-1", "investigate-2", "investigate-3",
                         "synthesise"]
    assert run.outputs.one(PLANNER).subquestions == PLAN
    assert [o.question for o in run.outputs.all(INVESTIGATOR)] == PLAN
    result = kind.result(job_input, run.outputs)
    assert isinstance(result, ResearchResult)
    body = result.model_dump(mode="json")
    assert body["answer"] == "Bees make honey."
    assert body["sources"] == "model_knowledge"
    assert "own knowledge" in body["note"]
    assert body["plan_fallback"] is False
    assert [s["question"] for s in body["sections"]] == PLAN
    assert "citations" not in body
    assert all("citations" not in s for s in body["sections"])
    assert ResearchResult.model_validate(body) == result


def test_research_falls_back_to_a_plan_of_its_own() -> None:
    kind = Research()
    job_input = kind.parse_input({"query": "How do bees make honey?", "max_subquestions": 2})
    run = Run(kind, job_input, lambda call: "no plan here")
    plan = run.outputs.one(PLANNER)
    assert isinstance(plan, PlanOutput)
    assert plan.fallback is True
    assert plan.raw == "no plan here"
    body = kind.result(job_input, run.outputs).model_dump(mode="json")
    assert body["plan_fallback"] is True
    assert len(body["sections"]) == 2


PASSAGES = [
    Passage(chunk_id="chk_a", document_id="doc_1", document_title="Bees",
            text="Honey bees make honey from flower nectar.", score=2.0),
    Passage(chunk_id="chk_b", document_id="doc_1", document_title="Bees",
            text="Bees store honey in wax cells.", score=1.0),
]
CHUNKS = {p.chunk_id: p.text for p in PASSAGES}


def test_research_over_a_corpus_cites_and_verifies() -> None:
    kind = Research()
    job_input = kind.parse_input({"query": "How do bees make honey?", "max_subquestions": 2,
                                  "corpus_id": "cor_1"})
    assert isinstance(job_input, ResearchInput)
    run = Run(kind, job_input,
              research_answer("Honey bees make honey from flower nectar [1].",
                              "Honey bees make honey from flower nectar [1]."),
              passages=PASSAGES, chunks=CHUNKS)
    assert run.order[-2:] == ["synthesise", "verify"]
    investigations = run.outputs.all(INVESTIGATOR)
    assert all(inv.retrieved == ["chk_a", "chk_b"] for inv in investigations)
    assert all(inv.citations and inv.citations[0].chunk_id == "chk_a"
               for inv in investigations)
    body = kind.result(job_input, run.outputs).model_dump(mode="json")
    assert body["sources"] == "corpus"
    assert body["corpus_id"] == "cor_1"
    assert "note" not in body
    assert body["citations"] == [{"n": 1, "document": "Bees", "document_id": "doc_1",
                                  "chunk": "chk_a",
                                  "snippet": "Honey bees make honey from flower nectar."}]
    assert body["sections"][0]["citations"] == [1]
    assert body["verification"]["verified"] is True, body["verification"]
    assert body["verification"]["citations_checked"] >= 2
    ResearchResult.model_validate(body)


def test_research_verifier_flags_a_chunk_the_corpus_does_not_hold() -> None:
    kind = Research()
    job_input = kind.parse_input({"query": "How do bees make honey?", "max_subquestions": 2,
                                  "corpus_id": "cor_1"})
    run = Run(kind, job_input,
              research_answer("Honey bees make honey from flower nectar [1]. Bees keep wax [7].",
                              "Honey bees make honey from flower nectar [1]."),
              passages=PASSAGES, chunks={})
    body = kind.result(job_input, run.outputs).model_dump(mode="json")
    check = body["verification"]
    assert check["verified"] is False
    # Every citation names a chunk the corpus does not hold.
    assert check["problems"]
    assert all(
        p["problem"] == "the cited chunk does not exist in the corpus" for p in check["problems"])
    # [7] named no passage shown: it never reaches the brief; the sentence is attributed to the
    # passage that says it.
    assert run.outputs.all(INVESTIGATOR)[0].invalid_citations == [7]
    assert "[7]" not in body["sections"][0]["answer"]
    wax = body["sections"][0]["sentences"][1]
    assert wax["how"] == "overlap"
    assert body["citations"][wax["citations"][0] - 1]["chunk"] == "chk_b"


def test_research_partial_result_keeps_finished_sections() -> None:
    kind = Research()
    job_input = kind.parse_input({"query": "How do bees make honey?", "max_subquestions": 3,
                                  "corpus_id": "cor_1"})
    run = Run(kind, job_input, research_answer("Bees make honey from nectar [1].", "Honey."),
              passages=PASSAGES, chunks=CHUNKS, stop_after=3)
    assert run.order == ["plan", "investigate-1", "investigate-2"]
    partial = kind.partial_result(job_input, run.outputs)
    assert partial["partial"] is True
    assert partial["answer"] is None
    assert partial["sources"] == "corpus"
    assert [s["question"] for s in partial["sections"]] == PLAN[:2]
    assert partial["sections"][0]["citations"] == [{"n": 1, "chunk_id": "chk_a"}]
    json.dumps(partial)


# --- Coding ------------------------------------------------------------------------------------

BUGGY = {"calc.py": "def add(a, b):\n    return a - b\n"}
FIX = "=== FILE: calc.py ===\ndef add(a, b):\n    return a + b\n=== END FILE ===\n"
WRONG_FIX = "=== FILE: calc.py ===\ndef add(a, b):\n    return a * b\n=== END FILE ===\n"
TEST_COMMAND = 'python -c "from calc import add; assert add(2, 3) == 5"'


def coder(*answers: str) -> Answer:
    """The plan, then each round's answer in turn."""
    rounds = list(answers)

    def answer(call: CallSpec) -> str:
        if call.prompt.endswith("Changed files:\n"):
            return rounds.pop(0)
        return "Fix add."
    return answer


def test_coding_revises_until_the_tests_pass() -> None:
    kind = Coding()
    job_input = kind.parse_input({"task": "Make add() return the sum.", "files": BUGGY,
                                  "test_command": TEST_COMMAND, "max_rounds": 3,
                                  "coder": "fixed"})
    run = Run(kind, job_input, coder(WRONG_FIX, FIX))
    assert run.order == ["plan", "write-1", "test-1", "write-2", "test-2"]
    result = kind.result(job_input, run.outputs)
    assert isinstance(result, CodingResult)
    assert result.passed is True
    assert result.rounds == 2
    assert result.plan == "Fix add."
    assert result.files["calc.py"] == "def add(a, b):\n    return a + b\n"
    assert "+    return a + b" in result.diff
    assert result.exit_code == 0
    CodingResult.model_validate(result.model_dump(mode="json"))


def test_coding_stops_when_the_rounds_run_out() -> None:
    kind = Coding()
    job_input = kind.parse_input({"task": "Make add() return the sum.", "files": BUGGY,
                                  "test_command": TEST_COMMAND, "max_rounds": 1,
                                  "coder": "fixed"})
    assert isinstance(job_input, CodingInput)
    run = Run(kind, job_input, coder("Sure! return a + b"))
    assert run.order == ["plan", "write-1", "test-1"]
    result = kind.result(job_input, run.outputs)
    assert result.passed is False
    assert result.files == BUGGY
    assert result.diff == ""
    assert result.exit_code not in (0, None)
    partial = kind.partial_result(job_input, run.outputs)
    assert partial["partial"] is True
    assert partial["rounds"] == 1


# --- Batch and completion ----------------------------------------------------------------------

def echo(call: CallSpec) -> str:
    return f" <{call.prompt}>"


def test_batch_results_follow_the_prompts() -> None:
    kind = Batch()
    job_input = kind.parse_input({"prompts": ["a", "b", "c"], "max_tokens": 4})
    assert isinstance(job_input, BatchInput)
    run = Run(kind, job_input, echo)
    assert run.order == ["generate-1", "generate-2", "generate-3"]
    result = kind.result(job_input, run.outputs)
    assert isinstance(result, BatchResult)
    assert result.model_dump(mode="json") == {"completions": [
        {"index": i, "text": f" <{p}>", "finish_reason": "stop"}
        for i, p in enumerate("abc")]}
    partial = kind.partial_result(job_input, Run(kind, job_input, echo, stop_after=2).outputs)
    assert partial["partial"] is True
    assert [c["index"] for c in partial["completions"]] == [0, 1]


def test_completion_is_one_call() -> None:
    kind = Completion()
    job_input = kind.parse_input({"prompt": "Hello", "stop": ["\n"]})
    assert isinstance(job_input, CompletionInput)
    run = Run(kind, job_input, echo)
    assert run.order == ["generate"]
    result = kind.result(job_input, run.outputs)
    assert isinstance(result, CompletionResult)
    assert result.model_dump(mode="json") == {"text": " <Hello>", "finish_reason": "stop"}


@pytest.mark.parametrize("kind", [Research(), Coding(), Batch(), Completion()])
def test_every_role_has_a_phase_and_a_model(kind: JobKind[Any, Any]) -> None:
    names = [r.name for r in kind.roles]
    assert len(names) == len(set(names))
    for role in kind.roles:
        assert role.phase
        assert issubclass(role.output, BaseModel)
        assert kind.role(role.name) is role
