"""The model catalogue: which models the pool serves, where, how big, how long a context, at
what price, and how many calls each endpoint takes at once.

Set `AGENTQ_MODELS` to a JSON list (or `AGENTQ_MODELS_FILE` to a JSON file holding one):

    [{"name": "gemma-3-270m", "endpoints": ["http://10.0.0.5:8000"], "size": "small",
      "context": 2048, "max_in_flight": 64,
      "prices": {"input": 0.02, "cached_input": 0.01, "output": 0.04}},
     {"name": "qwen3-32b", "endpoints": ["http://10.0.0.6:8000", "http://10.0.0.7:8000"],
      "size": "large", "context": 32768, "max_in_flight": 128,
      "prices": {"input": 0.2, "cached_input": 0.1, "output": 0.6},
      "api": "chat", "tool_calling": true}]

Without one, the catalogue is one model of size `small` served by every endpoint in
`AGENTQ_POOL_ENDPOINTS`, under whatever name the servers report, priced by
`AGENTQ_MODEL_PRICES`. Agents ask for a size class; the pool picks the model and endpoint.

`api` says how a model is called: `completions` (the default: `/v1/completions`, right for a
base model such as the embedded one, which has no chat template) or `chat`
(`/v1/chat/completions`). `tool_calling`: the chat server parses tool calls (vLLM started with
`--enable-auto-tool-choice` and a `--tool-call-parser`); agent loops then send OpenAI `tools`.
Without it a model chooses its action under a JSON-schema constraint.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, TypeAdapter, field_validator

from core.settings import Settings, get_settings

SIZES = ("tiny", "small", "medium", "large", "xlarge")


class ModelPrices(BaseModel):
    input: float = Field(ge=0)
    cached_input: float | None = Field(default=None, ge=0)
    output: float = Field(ge=0)


class ModelSpec(BaseModel):
    # None: whatever the endpoints serve (discovered from /v1/models).
    name: str | None = None
    endpoints: list[str] = Field(min_length=1)
    size: str = "small"
    context: int = Field(default=2048, ge=1)
    max_in_flight: int | None = Field(default=None, ge=1)
    prices: ModelPrices | None = None
    api: Literal["completions", "chat"] = "completions"
    tool_calling: bool = False

    @field_validator("endpoints")
    @classmethod
    def _strip(cls, value: list[str]) -> list[str]:
        return [v.rstrip("/") for v in value]

    @field_validator("size")
    @classmethod
    def _known_size(cls, value: str) -> str:
        if value not in SIZES:
            raise ValueError(f"size must be one of {', '.join(SIZES)}")
        return value


class Catalogue:
    def __init__(self, models: list[ModelSpec], default_max_in_flight: int) -> None:
        if not models:
            raise ValueError("the model catalogue is empty")
        self.models = models
        self.default_max_in_flight = default_max_in_flight

    @property
    def endpoints(self) -> list[str]:
        seen: dict[str, None] = {}
        for m in self.models:
            for e in m.endpoints:
                seen.setdefault(e)
        return list(seen)

    def cap(self, endpoint: str) -> int:
        """Calls one endpoint takes at once: the smallest cap of the models it serves."""
        caps = [m.max_in_flight for m in self.models
                if endpoint in m.endpoints and m.max_in_flight is not None]
        return min(caps) if caps else self.default_max_in_flight

    def for_size(self, size: str | None) -> list[ModelSpec]:
        """Models of the size class asked for; else the nearest larger class; else the nearest
        smaller one. No size: the smallest class there is."""
        present = sorted({m.size for m in self.models}, key=SIZES.index)
        if size is None:
            chosen = present[0]
        elif size in present:
            chosen = size
        else:
            wanted = SIZES.index(size) if size in SIZES else 0
            larger = [s for s in present if SIZES.index(s) > wanted]
            chosen = larger[0] if larger else present[-1]
        return [m for m in self.models if m.size == chosen]

    def larger_than(self, size: str) -> str | None:
        """The next size class present above `size`, for escalation."""
        wanted = SIZES.index(size) if size in SIZES else -1
        above = sorted({m.size for m in self.models if SIZES.index(m.size) > wanted},
                       key=SIZES.index)
        return above[0] if above else None

    def spec(self, model: str) -> ModelSpec | None:
        for m in self.models:
            if m.name == model:
                return m
        return None


def load_catalogue(settings: Settings) -> Catalogue:
    raw: object = None
    if settings.models_file is not None:
        raw = json.loads(Path(settings.models_file).read_text())
    elif settings.models:
        raw = json.loads(settings.models) if isinstance(settings.models, str) else settings.models
    if raw is None:
        models = [ModelSpec(endpoints=list(settings.pool_endpoints))]
    else:
        models = TypeAdapter(list[ModelSpec]).validate_python(raw)
    return Catalogue(models, settings.endpoint_max_in_flight)


@lru_cache(maxsize=1)
def get_catalogue() -> Catalogue:
    return load_catalogue(get_settings())
