"""Keyset pagination cursors: an opaque token for a row's position (creation time, id) in a
newest-first listing. A cursor is read back strictly: anything that is not a cursor this API
wrote, or names a time that cannot be compared in UTC, is a 422."""

from __future__ import annotations

import base64
import binascii
import json
import re
from datetime import UTC, datetime

from core.errors import InvalidInput

_ID = re.compile(r"[A-Za-z0-9_-]{1,40}")


def encode_cursor(created_at: datetime, row_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), row_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The (creation time in UTC, id) a cursor names; InvalidInput for anything else."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        fields = json.loads(raw)
        if not isinstance(fields, list) or len(fields) != 2:
            raise ValueError("not two fields")
        created, row_id = fields
        if not isinstance(created, str) or not isinstance(row_id, str) \
                or not _ID.fullmatch(row_id):
            raise ValueError("bad cursor fields")
        when = datetime.fromisoformat(created)
        if when.tzinfo is None:
            raise ValueError("cursor time has no zone")
        return when.astimezone(UTC), row_id
    except (ValueError, TypeError, OverflowError, RecursionError, binascii.Error) as exc:
        raise InvalidInput("cursor: not a cursor this API returned; pass the next_cursor of "
                           "the previous page") from exc
