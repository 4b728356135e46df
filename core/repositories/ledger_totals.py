"""Running totals of the ledger per model (`ledger_totals`): added to in every transaction that
writes ledger rows, read by `/metrics` in a time that does not grow with the ledger.

The additions are made just before the transaction commits (`core.db.before_commit`), after
every other row it locks, in a fixed order: so these rows, which many transactions update,
are always locked last and held only for the commit, and no two transactions wait on each other
in a cycle through them. Each model's totals are split over `SHARDS` rows by job.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from core.db import PrebuiltInsert, before_commit, pending
from core.models import ledger_totals_table

SHARDS = 16
T = ledger_totals_table.c
_KEY = "ledger_totals.pending"
_SUMMED = ("calls", "prompt_tokens", "cached_tokens", "completion_tokens", "cost_usd",
           "energy_wh")


@dataclass(frozen=True)
class ModelTotals:
    calls: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cost_usd: Decimal
    energy_wh: float


def add(session: Session, rows: Iterable[dict[str, Any]]) -> None:
    """Count these ledger rows (as inserted into `model_calls`) in the totals, when the
    transaction of `session` commits."""
    waiting: list[dict[str, Any]] = pending(session, _KEY)
    waiting.extend(rows)
    before_commit(session, _KEY, lambda: _write(session, waiting))


def _write(session: Session, rows: list[dict[str, Any]]) -> None:
    sums: dict[tuple[str, int], list[Any]] = defaultdict(
        lambda: [0, 0, 0, 0, Decimal(0), 0.0])
    for r in rows:
        s = sums[(str(r["model"]), zlib.crc32(str(r["job_id"]).encode()) % SHARDS)]
        s[0] += 1
        s[1] += int(r["prompt_tokens"])
        s[2] += int(r.get("cached_tokens") or 0)
        s[3] += int(r["completion_tokens"])
        s[4] += Decimal(r.get("cost_usd") or 0)
        s[5] += float(r.get("energy_wh") or 0.0)
    rows.clear()
    # One statement per row, in one lock order for everyone (an executemany's rows are run in
    # the order given).
    _UPSERT.execute(session, [{"model": model, "shard": shard,
                               **dict(zip(_SUMMED, values, strict=True))}
                              for (model, shard), values in sorted(sums.items())])


def _upsert(insert: Any) -> Any:
    """The statement that adds to one row of totals (built once; its values are parameters)."""
    stmt = insert(ledger_totals_table)
    return stmt.on_conflict_do_update(
        index_elements=[T.model, T.shard],
        set_={name: T[name] + stmt.excluded[name] for name in _SUMMED})


_UPSERT = PrebuiltInsert(lambda postgres: _upsert(postgresql.insert if postgres
                                                   else sqlite.insert))


def by_model(session: Session) -> dict[str, ModelTotals]:
    """Every model's totals."""
    return {str(m): ModelTotals(int(c), int(p), int(ct), int(cp), Decimal(cost), float(e))
            for m, c, p, ct, cp, cost, e in session.execute(
                select(T.model, *(func.sum(T[name]) for name in _SUMMED))
                .group_by(T.model).order_by(T.model))}
