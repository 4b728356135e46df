"""The naive way, for comparison: one call per question, straight to the model server of the
catalogue's largest size class, one call at a time, with no cache, no cascade and no agent.

With `context="corpus"` (the default) the prompt holds the whole corpus, every document's text,
before the question: what a user without a platform would do with a corpus this small. With
`context="none"` it holds the question alone (the model's own knowledge; on invented facts
this is a floor near zero). Every prompt starts with a fresh random reference line, so that
the server's prefix cache cannot serve one call from another's, and every prompt token is
priced as uncached at the catalogue's price of the model.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import httpx

from bench.quality.fixtures import Question
from bench.quality.scoring import facts_found
from core.catalogue import SIZES, ModelSpec, load_catalogue
from core.pricing import price_for
from core.settings import Settings

Context = Literal["corpus", "none"]
INSTRUCTION = "Answer the question in one short factual paragraph."


@dataclass
class NaiveCall:
    question: Question
    answer: str
    found: list[bool]
    prompt_tokens: int
    completion_tokens: int
    cost: float
    wall_s: float
    error: str | None = None


@dataclass
class NaiveSummary:
    model: str
    size: str
    sizes_in_catalogue: list[str]
    models_in_catalogue: int
    context: Context
    calls: list[NaiveCall] = field(default_factory=list)

    @property
    def facts(self) -> int:
        return sum(len(c.found) for c in self.calls)

    @property
    def facts_found(self) -> int:
        return sum(sum(c.found) for c in self.calls)

    @property
    def recall(self) -> float | None:
        return self.facts_found / self.facts if self.facts else None

    @property
    def total_tokens(self) -> int:
        return sum(c.prompt_tokens + c.completion_tokens for c in self.calls)

    @property
    def total_cost(self) -> float:
        return sum(c.cost for c in self.calls)

    @property
    def wall_s(self) -> float:
        return sum(c.wall_s for c in self.calls) / len(self.calls) if self.calls else 0.0

    @property
    def errors(self) -> int:
        return sum(c.error is not None for c in self.calls)


def largest(settings: Settings) -> tuple[ModelSpec, list[str], int]:
    """The catalogue's model of the largest size class, the classes present, and how many
    models the catalogue has."""
    catalogue = load_catalogue(settings)
    sizes = sorted({m.size for m in catalogue.models}, key=SIZES.index)
    return catalogue.for_size(sizes[-1])[0], sizes, len(catalogue.models)


def prompt(question: str, documents: Mapping[str, str], context: Context) -> str:
    parts = [f"Reference: {secrets.token_hex(8)}\n\n"]
    if context == "corpus":
        parts.append("Documents:\n\n")
        parts.extend(f"=== {name} ===\n{text.strip()}\n\n" for name, text in documents.items())
        parts.append(f"{INSTRUCTION} Use only the documents above.\n")
    else:
        parts.append(f"{INSTRUCTION}\n")
    parts.append(f"Question: {question}\n")
    return "".join(parts)


def _model_name(spec: ModelSpec, endpoint: str) -> str:
    if spec.name is not None:
        return spec.name
    resp = httpx.get(f"{endpoint}/v1/models", timeout=30)
    resp.raise_for_status()
    return str(resp.json()["data"][0]["id"])


def run_naive(questions: Sequence[Question], documents: Mapping[str, str],
              settings: Settings, context: Context = "corpus", max_tokens: int = 256,
              timeout_s: float = 900) -> NaiveSummary:
    spec, sizes, n_models = largest(settings)
    endpoint = spec.endpoints[0]
    model = _model_name(spec, endpoint)
    price = price_for(model)
    summary = NaiveSummary(model=model, size=spec.size, sizes_in_catalogue=sizes,
                           models_in_catalogue=n_models, context=context)
    with httpx.Client(base_url=endpoint, timeout=timeout_s) as http:
        for q in questions:
            text = prompt(q.question, documents, context)
            body: dict[str, object] = {"model": model, "max_tokens": max_tokens,
                                       "temperature": 0}
            if spec.api == "chat":
                path, body["messages"] = "/v1/chat/completions", [
                    {"role": "user", "content": text}]
            else:
                path, body["prompt"], body["stop"] = "/v1/completions", text + "Answer:", \
                    ["\n\n", "\nQuestion:"]
            start = time.perf_counter()
            try:
                resp = http.post(path, json=body)
                error = None if resp.status_code == 200 else \
                    f"{resp.status_code}: {resp.text[:300]}"
            except httpx.TransportError as exc:
                error = f"{type(exc).__name__}: {exc}"
            wall = time.perf_counter() - start
            if error is not None:
                summary.calls.append(NaiveCall(
                    question=q, answer="", found=[False] * len(q.facts), prompt_tokens=0,
                    completion_tokens=0, cost=0.0, wall_s=wall, error=error))
                continue
            data = resp.json()
            choice = data["choices"][0]
            answer = str(choice.get("text") or (choice.get("message") or {}).get("content")
                         or "")
            usage = data.get("usage") or {}
            p, c = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
            summary.calls.append(NaiveCall(
                question=q, answer=answer, found=facts_found(answer, q.facts),
                prompt_tokens=p, completion_tokens=c, cost=float(price.cost(p, c, 0)),
                wall_s=wall))
    return summary
