"""Parameter types shared by the routers, bounded to what the database can hold: an integer
past a 64-bit column's range, or a time that overflows once converted to UTC, is a 422 that
says so rather than an error from the database driver."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator

# The largest value a BIGINT column (and SQLite's INTEGER) holds.
MAX_DB_INT = 2**63 - 1


def to_utc(value: datetime) -> datetime:
    """The same instant in UTC (a time without a zone is taken as UTC)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("out of range: in UTC this time falls outside the years 1 to "
                         "9999") from None


UtcDateTime = Annotated[datetime, AfterValidator(to_utc)]
