"""Identifiers: a short type prefix and 128 random bits, sortable by nothing on purpose."""

from __future__ import annotations

import uuid


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"
