"""Research over the corpus of invented facts, one job per question and effort, through the
API: fact recall, citation precision, tokens, model calls, cost and wall time per job."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from bench.quality.client import JobRun, Platform, UploadedCorpus
from bench.quality.fixtures import Question
from bench.quality.scoring import brief_text, citation_score, facts_found


@dataclass
class QuestionRun:
    question: Question
    run: JobRun
    found: list[bool]
    citations: int
    citations_correct: int


@dataclass
class EffortSummary:
    """One effort's jobs, summed: recall and precision are over all facts and citations."""

    label: str
    runs: list[QuestionRun] = field(default_factory=list)

    @property
    def jobs(self) -> int:
        return len(self.runs)

    @property
    def completed(self) -> int:
        return sum(r.run.status == "completed" for r in self.runs)

    @property
    def facts(self) -> int:
        return sum(len(r.found) for r in self.runs)

    @property
    def facts_found(self) -> int:
        return sum(sum(r.found) for r in self.runs)

    @property
    def recall(self) -> float | None:
        return self.facts_found / self.facts if self.facts else None

    @property
    def citations(self) -> int:
        return sum(r.citations for r in self.runs)

    @property
    def precision(self) -> float | None:
        right = sum(r.citations_correct for r in self.runs)
        return right / self.citations if self.citations else None

    @property
    def cited_jobs(self) -> int:
        return sum(r.citations > 0 for r in self.runs)

    def per_job(self, what: str) -> float:
        values = [float(getattr(r.run, what)()) for r in self.runs]
        return sum(values) / len(values) if values else 0.0

    @property
    def wall_s(self) -> float:
        return sum(r.run.wall_s for r in self.runs) / len(self.runs) if self.runs else 0.0

    @property
    def total_tokens(self) -> int:
        return sum(r.run.tokens() for r in self.runs)

    @property
    def total_cost(self) -> float:
        return sum(r.run.cost() for r in self.runs)


def score(question: Question, run: JobRun, corpus: UploadedCorpus) -> QuestionRun:
    text = brief_text(run.result)
    result = run.result or {}
    cites = result.get("citations") if isinstance(result.get("citations"), list) else []
    scored = citation_score(cites, {corpus.ids[d] for d in question.documents},
                            {corpus.titles[d] for d in question.documents})
    return QuestionRun(question=question, run=run, found=facts_found(text, question.facts),
                       citations=scored.total, citations_correct=scored.correct)


def run_effort(platform: Platform, corpus: UploadedCorpus, questions: Sequence[Question],
               effort: str, parallel: int = 1) -> EffortSummary:
    inputs = [{"query": q.question, "corpus_id": corpus.id, "effort": effort}
              for q in questions]
    runs = platform.run_many("research", inputs, parallel,
                             metadata={"bench": "quality", "effort": effort})
    summary = EffortSummary(label=effort)
    for question, run in zip(questions, runs, strict=True):
        summary.runs.append(score(question, run, corpus))
    return summary
