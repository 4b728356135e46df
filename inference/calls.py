"""The one object that describes a model call, from the agent that wants it to the pool that
makes it. Nothing on the way re-lists its parameters."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class CallSpec:
    """One model call.

    `max_tokens` None: the step's budget (the orchestrator settles it before the call reaches
    the pool). `size`: the catalogue's size class to run on ("small", "large", ...); `model`: a
    model by name; neither: the smallest class there is. At most one of `regex`, `choice` and
    `json_schema` constrains the output (vLLM structured outputs). `validate`: when the answer
    fails it, the call is made again on the next larger size class (a cascade), as long as
    there is one; every escalation is recorded on its call."""

    prompt: str
    max_tokens: int | None = None
    regex: str | None = None
    choice: Sequence[str] | None = None
    json_schema: Mapping[str, Any] | None = None
    stop: Sequence[str] | None = None
    size: str | None = None
    model: str | None = None
    temperature: float = 0.0
    validate: Callable[[str], bool] | None = field(default=None, compare=False, repr=False)

    def settled(self, max_tokens: int, size: str | None = None) -> CallSpec:
        """This call with its `max_tokens` (and, for an escalation, its size class) settled."""
        return replace(self, max_tokens=max_tokens, size=size if size is not None else self.size)

    def key(self) -> str | None:
        """What determines the answer of a deterministic (temperature 0) call, as a digest:
        identical calls of a job are answered once (the call cache), and a re-run step's call
        is matched by it. None for sampled calls."""
        if self.temperature != 0.0:
            return None
        spec = json.dumps([self.prompt, self.max_tokens, self.size or self.model, self.regex,
                           list(self.choice) if self.choice else None,
                           dict(self.json_schema) if self.json_schema else None,
                           list(self.stop) if self.stop else None, 0.0],
                          sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(spec.encode()).hexdigest()
