"""The bench's tables, printed side by side: research by effort, the naive way against the
platform's `medium`, and coding with 1 and N candidates."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from bench.quality.coding import CodingSummary
from bench.quality.naive import NaiveSummary
from bench.quality.research import EffortSummary

T = TypeVar("T")


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f} %"


def num(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def usd(value: float | None) -> str:
    return "n/a" if value is None else f"${value:.6f}"


def table(title: str, columns: Sequence[str],
          rows: Sequence[tuple[str, Sequence[str]]]) -> str:
    width = max([len(label) for label, _ in rows] + [10])
    cells = [max([len(c)] + [len(r[1][i]) for r in rows]) for i, c in enumerate(columns)]
    lines = [title, "  ".join([" " * width, *(c.rjust(w) for c, w in zip(columns, cells,
                                                                         strict=True))])]
    for label, values in rows:
        lines.append("  ".join([label.ljust(width),
                                *(v.rjust(w) for v, w in zip(values, cells, strict=True))]))
    return "\n".join(lines)


def _row(label: str, items: Sequence[T], fmt: Callable[[T], str]) -> tuple[str, list[str]]:
    return label, [fmt(i) for i in items]


def research_table(efforts: Sequence[EffortSummary]) -> str:
    return table("Research over the corpus of invented facts (per job, means)",
                 [e.label for e in efforts], [
        _row("jobs completed", efforts, lambda e: f"{e.completed}/{e.jobs}"),
        _row("fact recall", efforts, lambda e: f"{pct(e.recall)} ({e.facts_found}/{e.facts})"),
        _row("citation precision", efforts, lambda e: pct(e.precision)),
        _row("citations (jobs citing)", efforts,
             lambda e: f"{e.citations} ({e.cited_jobs}/{e.jobs})"),
        _row("tokens / job", efforts, lambda e: num(e.per_job("tokens"))),
        _row("model calls / job", efforts, lambda e: num(e.per_job("calls"), 1)),
        _row("cost / job", efforts, lambda e: usd(e.per_job("cost"))),
        _row("wall s / job", efforts, lambda e: num(e.wall_s, 1)),
    ])


def research_details(efforts: Sequence[EffortSummary]) -> str:
    lines = ["Per question (facts found / expected, citations right / all, status):"]
    for e in efforts:
        for r in e.runs:
            lines.append(f"  {e.label:6s} {r.question.id}  {sum(r.found)}/{len(r.found)}  "
                         f"{r.citations_correct}/{r.citations}  {r.run.status}"
                         + (f"  {r.run.error}" if r.run.error else ""))
    return "\n".join(lines)


def economics_table(naive: NaiveSummary, medium: EffortSummary | None) -> str:
    n = len(naive.calls)
    cols = [f"naive ({naive.context} in prompt)"] + (["platform medium"] if medium else [])
    rows: list[tuple[str, list[str]]] = [
        ("questions", [str(n)] + ([str(medium.jobs)] if medium else [])),
        ("fact recall", [pct(naive.recall)] + ([pct(medium.recall)] if medium else [])),
        ("tokens (all questions)", [num(naive.total_tokens)]
         + ([num(medium.total_tokens)] if medium else [])),
        ("cost (all questions)", [usd(naive.total_cost)]
         + ([usd(medium.total_cost)] if medium else [])),
        ("model calls", [str(n - naive.errors)]
         + ([num(sum(r.run.calls() for r in medium.runs))] if medium else [])),
        ("wall s / question", [num(naive.wall_s, 1)] + ([num(medium.wall_s, 1)]
                                                         if medium else [])),
    ]
    out = [table(f"Economics: naive calls to {naive.model} (size {naive.size}), one at a "
                 "time, no cache, no cascade", cols, rows)]
    if naive.errors:
        first = next(c.error for c in naive.calls if c.error)
        out.append(f"  {naive.errors} naive call(s) failed (scored as nothing found): {first}")
    if medium is not None and naive.total_tokens:
        tokens = naive_ratio(medium.total_tokens, naive.total_tokens)
        out.append(f"  medium / naive: tokens {tokens}, cost "
                   f"{naive_ratio(medium.total_cost, naive.total_cost)}")
    one_size = naive.models_in_catalogue == 1 or len(naive.sizes_in_catalogue) == 1
    if one_size:
        out.append(f"  The catalogue has one size class ({', '.join(naive.sizes_in_catalogue)}; "
                   f"{naive.models_in_catalogue} model(s)): there is no larger model to save on "
                   "and no cascade to route, so compare tokens, not the 40 % cost target.")
    if medium is None:
        out.append("  Economics target: not judged (the platform's medium was not run).")
    else:
        out.append("  " + economics_verdict(
            one_size=one_size, naive_recall=naive.recall, medium_recall=medium.recall,
            naive_tokens=naive.total_tokens, medium_tokens=medium.total_tokens,
            naive_cost=naive.total_cost, medium_cost=medium.total_cost))
    return "\n".join(out)


COST_TARGET = 0.40  # medium's cost at most this share of naive's, at naive's recall or more


def economics_verdict(*, one_size: bool, naive_recall: float | None,
                      medium_recall: float | None, naive_tokens: int, medium_tokens: int,
                      naive_cost: float, medium_cost: float) -> str:
    """Whether the platform's `medium` met the economics target: at least the naive recall
    at no more than 40 % of its cost, where the catalogue has two size classes or more; with
    one, the token ratio and the recall comparison."""
    reached = naive_recall is not None and medium_recall is not None \
        and medium_recall >= naive_recall
    recall = (f"recall {pct(medium_recall)} vs naive {pct(naive_recall)} "
              f"({'reached' if reached else 'not reached'})")
    if one_size:
        ratio = naive_ratio(medium_tokens, naive_tokens)
        fewer = "fewer" if medium_tokens < naive_tokens else "no fewer"
        return (f"Economics (one size class, no cost target): medium used {ratio} naive's "
                f"tokens ({fewer} tokens); {recall}.")
    share = medium_cost / naive_cost if naive_cost > 0 else None
    cheap = share is not None and share <= COST_TARGET
    met = "MET" if reached and cheap else "NOT MET"
    cost = "n/a" if share is None else f"{share:.2f}"
    return (f"Economics target (medium's recall >= naive's at <= {COST_TARGET:.2f} of its "
            f"cost): {met}: {recall}; cost ratio {cost} "
            f"({'within' if cheap else 'over'} {COST_TARGET:.2f}).")


def naive_ratio(part: float, whole: float) -> str:
    return f"{part / whole:.2f}x" if whole else "n/a"


def coding_table(summaries: Sequence[CodingSummary]) -> str:
    cols = [f"{s.candidates} candidate{'s' if s.candidates != 1 else ''}" for s in summaries]

    def cell(fmt: Callable[[CodingSummary], str]) -> Callable[[CodingSummary], str]:
        return lambda s: "unavailable" if s.unavailable is not None else fmt(s)

    out = [table("Coding: small tasks with tests", cols, [
        _row("tasks solved", summaries, cell(lambda s: f"{s.solved}/{s.tasks}")),
        _row("pass rate", summaries, cell(lambda s: pct(s.pass_rate))),
        _row("tokens (all tasks)", summaries, cell(lambda s: num(s.total_tokens))),
        _row("model calls (all tasks)", summaries, cell(lambda s: num(s.calls))),
        _row("tokens / solved task", summaries, cell(lambda s: num(s.tokens_per_solved))),
        _row("cost / solved task", summaries, cell(lambda s: usd(s.cost_per_solved))),
        _row("wall s / task", summaries, cell(lambda s: num(s.wall_s, 1))),
    ])]
    for s in summaries:
        if s.unavailable is not None:
            out.append(f"  candidates={s.candidates} unavailable: the platform refused it "
                       f"(422): {s.unavailable[:300]}")
    return "\n".join(out)
