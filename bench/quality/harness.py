"""The bench's run against a platform already up (an API URL and a key): research by effort,
the naive way, coding with 1 and N candidates; and the printed report."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from bench.quality import report
from bench.quality.client import Platform
from bench.quality.coding import CodingSummary, run_coding
from bench.quality.fixtures import coding_tasks, corpus_documents, questions
from bench.quality.naive import Context, NaiveSummary, run_naive
from bench.quality.research import EffortSummary, run_effort
from core.settings import Settings

EFFORTS = ("low", "medium", "high", "max")


@dataclass(frozen=True)
class Options:
    efforts: Sequence[str] = EFFORTS
    questions: int | None = None  # None: all
    coding_tasks: int | None = None
    candidates: Sequence[int] = (1, 3)
    naive: bool = True
    naive_context: Context = "corpus"
    naive_max_tokens: int = 256
    parallel: int = 1  # jobs in flight


@dataclass
class Results:
    efforts: list[EffortSummary] = field(default_factory=list)
    naive: NaiveSummary | None = None
    coding: list[CodingSummary] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def effort(self, label: str) -> EffortSummary | None:
        return next((e for e in self.efforts if e.label == label), None)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_all(platform: Platform, settings: Settings, options: Options) -> Results:
    """Every section in turn; a section that fails is noted in the report, and the others
    still run."""
    results = Results()
    qs = questions()[: options.questions]
    docs = corpus_documents()

    def section(name: str, body: Callable[[], None]) -> None:
        try:
            body()
        except Exception as exc:
            say(traceback.format_exc())
            results.notes.append(f"{name} did not finish: {type(exc).__name__}: {exc}")

    def research() -> None:
        corpus = platform.upload_corpus("quality-bench", docs)
        say(f"corpus {corpus.id}: {len(docs)} documents")
        for effort in options.efforts:
            say(f"research, effort {effort}: {len(qs)} questions …")
            results.efforts.append(run_effort(platform, corpus, qs, effort, options.parallel))
            say(report.research_table(results.efforts[-1:]))

    def naive() -> None:
        say(f"naive: {len(qs)} calls, one at a time …")
        results.naive = run_naive(qs, docs, settings, options.naive_context,
                                  options.naive_max_tokens)
        say(report.economics_table(results.naive, results.effort("medium")))

    def coding(n: int) -> Callable[[], None]:
        def run() -> None:
            say(f"coding, {n} candidate(s): {len(tasks)} tasks …")
            results.coding.append(run_coding(platform, tasks, n, options.parallel))
            say(report.coding_table(results.coding[-1:]))
        return run

    if options.efforts and qs:
        section("research", research)
    if options.naive and qs:
        section("naive", naive)
    tasks = coding_tasks()[: options.coding_tasks]
    if tasks:
        for n in options.candidates:
            section(f"coding with {n} candidate(s)", coding(n))
    return results


def render(results: Results, details: bool = True) -> str:
    parts = []
    if results.efforts:
        parts.append(report.research_table(results.efforts))
        if details:
            parts.append(report.research_details(results.efforts))
    if results.naive is not None:
        parts.append(report.economics_table(results.naive, results.effort("medium")))
    if results.coding:
        parts.append(report.coding_table(results.coding))
    parts.extend(results.notes)
    return "\n\n".join(parts)
