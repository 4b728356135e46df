"""Tools over a tenant's corpus: search it, read a passage, read a whole document.

Every passage a step shows its model gets a number, [1], [2], ..., in the order it was first
shown, and keeps it for the rest of the step: the model reads and cites passages by those
numbers (small models copy a number far more reliably than an id), and the step maps them back
to chunk ids (`PassageBook`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from agents.base import Passage, StepContext
from agents.corpus import snippet
from agents.tools import Tool, ToolError

# Characters of each passage a search shows (a read shows the whole passage).
SNIPPET_CHARS = 400
# Characters of a document one read shows.
DOCUMENT_CHARS = 2400
# The highest passage number a model may write (bounded numbers keep a small model, under a
# JSON-schema constraint, from writing digits until its tokens run out).
MAX_PASSAGE = 999


@dataclass
class PassageBook:
    """The passages a step has shown its model, numbered from 1 in the order first shown."""

    passages: list[Passage] = field(default_factory=list)
    _numbers: dict[str, int] = field(default_factory=dict)

    def number(self, passage: Passage) -> int:
        n = self._numbers.get(passage.chunk_id)
        if n is None:
            self.passages.append(passage)
            n = self._numbers[passage.chunk_id] = len(self.passages)
        return n

    def get(self, n: int) -> Passage:
        if not 1 <= n <= len(self.passages):
            shown = f"[1] to [{len(self.passages)}]" if self.passages else "none yet"
            raise ToolError(f"there is no passage [{n}]; the passages shown are {shown}")
        return self.passages[n - 1]

    def show(self, found: list[Passage], query: str) -> str:
        return "\n".join(f"[{self.number(p)}] ({p.document_title}) "
                         f"{snippet(p.text, query, SNIPPET_CHARS)}" for p in found)


@dataclass
class CorpusEnv:
    """What the corpus tools work with: the step's context, the corpus, the passages shown."""

    ctx: StepContext
    corpus_id: str
    per_search: int = 4
    book: PassageBook = field(default_factory=PassageBook)


class SearchArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str = Field(min_length=1, max_length=300,
                       description="Words to look for (a few specific terms work best).")


class PassageArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    passage: int = Field(ge=1, le=MAX_PASSAGE,
                         description="The number of a passage shown, like 3 for [3].")


class DocumentArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    passage: int = Field(ge=1, le=MAX_PASSAGE,
                         description="The number of a passage shown: its document is read.")
    offset: int = Field(default=0, ge=0, le=100_000_000,
                        description="Where to start, in characters.")


def search(env: CorpusEnv, args: SearchArgs) -> str:
    found = env.ctx.search_corpus(env.corpus_id, args.query, env.per_search)
    if not found:
        return f"No passage matches {args.query!r}. Try other words."
    return env.book.show(found, args.query)


def read_passage(env: CorpusEnv, args: PassageArgs) -> str:
    passage = env.book.get(args.passage)
    text = env.ctx.read_passages(env.corpus_id, [passage.chunk_id]).get(passage.chunk_id)
    if text is None:
        raise ToolError(f"passage [{args.passage}] is no longer in the corpus")
    return f"[{args.passage}] ({passage.document_title}) {text}"


def read_document(env: CorpusEnv, args: DocumentArgs) -> str:
    passage = env.book.get(args.passage)
    doc = env.ctx.read_document(env.corpus_id, passage.document_id)
    if doc is None:
        raise ToolError(f"the document of passage [{args.passage}] is no longer in the corpus")
    if args.offset >= max(1, len(doc.text)):
        raise ToolError(f"the document {doc.title!r} has {len(doc.text)} characters; "
                        f"offset {args.offset} is past its end")
    end = min(len(doc.text), args.offset + DOCUMENT_CHARS)
    more = (f" Read on with offset {end}." if end < len(doc.text) else " That is the end.")
    return (f"Document {doc.title!r}, characters {args.offset} to {end} of {len(doc.text)}."
            f"{more} Cite what you use by its passage numbers.\n{doc.text[args.offset:end]}")


SEARCH = Tool("search", "Search the corpus; shows the best matching passages, numbered.",
              SearchArgs, search)
READ_PASSAGE = Tool("read_passage", "Read the whole of a passage shown.", PassageArgs,
                    read_passage)
READ_DOCUMENT = Tool("read_document", "Read the document a passage shown comes from.",
                     DocumentArgs, read_document)
CORPUS_TOOLS = (SEARCH, READ_PASSAGE, READ_DOCUMENT)
