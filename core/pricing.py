"""Model prices, in dollars per million tokens (input, cached input, output).

They come from the model catalogue (`AGENTQ_MODELS`) where it prices a model, else from
`AGENTQ_MODEL_PRICES` (JSON: model name → prices, with `*` for any other model). A call's cost
is computed when it is made and stored on its ledger row, so changing a price never rewrites
the past.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from core.settings import get_settings

MILLION = Decimal(1_000_000)


@dataclass(frozen=True)
class Price:
    input: Decimal
    cached_input: Decimal
    output: Decimal

    def cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
             ) -> Decimal:
        cached = min(max(cached_tokens, 0), prompt_tokens)
        return ((prompt_tokens - cached) * self.input + cached * self.cached_input
                + completion_tokens * self.output) / MILLION


def _price(entry: dict[str, float]) -> Price:
    return Price(Decimal(str(entry.get("input", 0))),
                 Decimal(str(entry.get("cached_input", entry.get("input", 0)))),
                 Decimal(str(entry.get("output", 0))))


def _catalogue_prices() -> dict[str, dict[str, float]]:
    from core.catalogue import get_catalogue

    out = {}
    for m in get_catalogue().models:
        if m.name is not None and m.prices is not None:
            out[m.name] = {k: v for k, v in m.prices.model_dump().items() if v is not None}
    return out


def price_for(model: str) -> Price:
    catalogue = _catalogue_prices()
    if model in catalogue:
        return _price(catalogue[model])
    prices = get_settings().model_prices
    entry = prices.get(model) or prices.get("*") or {}
    return _price(entry)


def highest_price() -> Price:
    """Component-wise the highest price of any model: the bound used to reserve a call's cost
    before the pool has picked its model."""
    entries = [*get_settings().model_prices.values(), *_catalogue_prices().values()]
    prices = [_price(e) for e in entries] or [_price({})]
    return Price(max(p.input for p in prices), max(p.cached_input for p in prices),
                 max(p.output for p in prices))
