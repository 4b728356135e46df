"""The research investigator over a corpus, as an agent loop: it starts from a search for its
sub-question, may read passages and whole documents and search again with better words, and
answers with its findings and the numbers of the passages they rest on.
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

INSTRUCTIONS = (
    "You are a careful research analyst. You answer one sub-question of a research question "
    "from a corpus of documents, and only from what its passages say. The passages you are "
    "shown are numbered like [1] and [2]. Search the corpus, read what looks useful, search "
    "again with better words when you need more, then give your final answer: a short factual "
    "paragraph that marks every claim with the number of its passage, like [1], and the list "
    "of the passage numbers it rests on.")
NO_ANSWER = "No answer was reached within the step's budget."


class Findings(BaseModel):
    """The investigator's final answer."""

    model_config = ConfigDict(extra="forbid")

    answer: str = Field(description="The findings: a short factual paragraph; every claim "
                                    "marked with its passage number, like [1].")
    passages: list[Annotated[int, Field(ge=1, le=MAX_PASSAGE)]] = Field(
        default_factory=list, max_length=20,
        description="The numbers of the passages the findings rest on.")


def _salvage(messages: list[ChatMessage], text: str) -> Findings:
    """What a last answer cut short still says (`"answer": "...` up to where it stopped)."""
    found = re.search(r'"answer"\s*:\s*"((?:[^"\\]|\\.)*)', text)
    if found is None:
        return Findings(answer=NO_ANSWER)
    try:
        answer = json.loads(f'"{found.group(1)}"')
    except ValueError:
        answer = found.group(1)
    return Findings(answer=answer.strip() or NO_ANSWER)


AGENT: Agent[CorpusEnv, Findings] = Agent(
    instructions=INSTRUCTIONS, tools=CORPUS_TOOLS, answer=Findings,
    answer_description="Give the final answer: the findings and the passages they rest on.",
    fallback=_salvage, turn_max_tokens=160, final_max_tokens=256)


@dataclass(frozen=True)
class Investigation:
    answer: str
    # Every passage shown, in the order of their numbers (passage n is `passages[n - 1]`).
    passages: list[Passage]
    rests_on: list[str]  # chunk ids
    turns: int
    stopped: Stop
    fallback: bool


def task(query: str, question: str, sources: str) -> str:
    return (f"Research question: {query.strip()}\nSub-question: {question}\n\n"
            f"Sources:\n{sources}")


def investigate(ctx: StepContext, corpus_id: str, query: str, question: str,
                per_search: int, turns: int) -> Investigation | None:
    """The loop on one sub-question; None when the corpus has nothing for it and there is no
    turn to search again."""
    env = CorpusEnv(ctx, corpus_id, per_search)
    found = ctx.search_corpus(corpus_id, question, per_search)
    if not found and turns <= 1:
        return None
    sources = env.book.show(found, question) if found else \
        "(no passage matched the sub-question; search with other words)"
    result: LoopResult[Findings] = run_loop(ctx, AGENT, env, task(query, question, sources),
                                            turns)
    passages = env.book.passages
    numbers = [n for n in dict.fromkeys(result.answer.passages) if 1 <= n <= len(passages)]
    answer = result.answer.answer.strip() or NO_ANSWER
    if numbers and not re.search(r"\[\d{1,3}\]", answer):
        # The passages named in the list but not in the text: the text cites them at its end.
        answer += " " + "".join(f"[{n}]" for n in numbers)
    return Investigation(answer=answer, passages=list(passages),
                         rests_on=[passages[n - 1].chunk_id for n in numbers],
                         turns=result.turns, stopped=result.stopped, fallback=result.fallback)
