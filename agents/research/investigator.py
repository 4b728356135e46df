"""The research investigator over a corpus, as an agent loop: it starts from a search for its
sub-question, may read passages and whole documents and search again with better words, and
answers with its findings, sentence by sentence, each with the numbers of the passages it
rests on (structured output; see `agents.research.brief`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from agents.base import ChatMessage, Passage, StepContext
from agents.corpus_tools import CORPUS_TOOLS, MAX_PASSAGE, CorpusEnv
from agents.loop import Agent, LoopResult, Stop, run_loop
from agents.research.brief import extract, resolve
from agents.research.models import How

INSTRUCTIONS = (
    "You are a careful research analyst. You answer one sub-question of a research question "
    "from a corpus of documents, and only from what its passages say. The passages you are "
    "shown are numbered like [1] and [2]. Search the corpus, read what looks useful, search "
    "again with better words when you need more, then give your final answer: the findings "
    "as a few short factual sentences, each with the numbers of the passages it comes from.")
NO_ANSWER = "No answer was reached within the step's budget."


class FindingSentence(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(description="One short factual sentence.")
    passages: list[Annotated[int, Field(ge=1, le=MAX_PASSAGE)]] = Field(
        max_length=4, description="The numbers of the passages it comes from.")


class Findings(BaseModel):
    """The investigator's final answer: sentences, each with the passages it rests on."""

    model_config = ConfigDict(extra="forbid")

    sentences: list[FindingSentence] = Field(min_length=1, max_length=8,
                                             description="The findings, a sentence each.")


def _salvage(messages: list[ChatMessage], text: str) -> Findings:
    """What a last answer cut short still says (each `"text": "...` up to where it stopped);
    no sentence at all when it says nothing."""
    found = []
    for raw in re.findall(r'"text"\s*:\s*"((?:[^"\\]|\\.)*)', text):
        try:
            found.append(json.loads(f'"{raw}"'))
        except ValueError:
            found.append(raw)
    return Findings.model_construct(sentences=[
        FindingSentence(text=t.strip(), passages=[]) for t in found if t.strip()])


AGENT: Agent[CorpusEnv, Findings] = Agent(
    instructions=INSTRUCTIONS, tools=CORPUS_TOOLS, answer=Findings,
    answer_description="Give the final answer: the findings and the passages they rest on.",
    fallback=_salvage, turn_max_tokens=160, final_max_tokens=256)


@dataclass(frozen=True)
class Investigation:
    # Every passage shown, in the order of their numbers (passage n is `passages[n - 1]`).
    passages: list[Passage]
    # The findings' sentences, each with the numbers of the passages it rests on (checked:
    # every number names a passage shown) and how they were found.
    sentences: list[tuple[str, list[int], How]]
    invalid: list[int]  # numbers the model wrote that named no passage shown
    turns: int
    stopped: Stop
    fallback: bool  # no answer of the model fitted: what its last one said was salvaged
    quoted: bool  # no sentence of the model rested on a passage: the passages were quoted


def task(query: str, question: str, sources: str) -> str:
    return (f"Research question: {query.strip()}\nSub-question: {question}\n\n"
            f"Sources:\n{sources}")


def investigate(ctx: StepContext, corpus_id: str, query: str, question: str,
                per_search: int, turns: int) -> Investigation | None:
    """The loop on one sub-question; None when the corpus has nothing for it and there is no
    turn to search again. When no sentence of the findings rests on a passage, the
    passages' best sentences are quoted after them."""
    env = CorpusEnv(ctx, corpus_id, per_search)
    found = ctx.search_corpus(corpus_id, question, per_search)
    if not found and turns <= 1:
        return None
    sources = env.book.show(found, question) if found else \
        "(no passage matched the sub-question; search with other words)"
    result: LoopResult[Findings] = run_loop(ctx, AGENT, env, task(query, question, sources),
                                            turns)
    passages = env.book.passages
    texts = {i + 1: p.text for i, p in enumerate(passages)}
    resolved = resolve([(s.text, s.passages) for s in result.answer.sentences], texts)
    quoted = not any(ns for _, ns, _ in resolved.sentences) and bool(texts)
    if quoted:
        # Nothing the model wrote rests on a passage: the passages' best sentences follow.
        resolved.sentences += extract(question, texts)
    return Investigation(passages=list(passages), sentences=resolved.sentences,
                         invalid=resolved.invalid, turns=result.turns, stopped=result.stopped,
                         fallback=result.fallback, quoted=quoted)
