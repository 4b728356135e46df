"""Secrets the deployment generates for itself once and shares through the database."""

from __future__ import annotations

import secrets

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.models import AppSecret


def get_or_create(session: Session, name: str) -> str:
    """The secret called `name`, made (random, 256 bits) by the first process that asks. The
    session's transaction must be fresh: a concurrent creation rolls it back once."""
    value = session.scalar(select(AppSecret.value).where(AppSecret.name == name))
    if value is not None:
        return value
    try:
        with session.begin_nested():
            session.add(AppSecret(name=name, value=secrets.token_urlsafe(32)))
    except IntegrityError:  # another process made it first
        pass
    value = session.scalar(select(AppSecret.value).where(AppSecret.name == name))
    assert value is not None
    return value
