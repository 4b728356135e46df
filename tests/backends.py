"""Run a test module against the embedded SQLite database as well as Postgres (the session's
database, or a fresh one for tests whose writes would show in other tests' global sums)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BACKENDS = ("postgres", "sqlite")


@contextmanager
def sqlite_database(folder: Path) -> Iterator[str]:
    """Point this process at a fresh, migrated SQLite database until the block ends."""
    with _database_url(f"sqlite:///{folder / 'agentq.db'}") as url:
        yield url


@contextmanager
def _database_url(url: str) -> Iterator[str]:
    """Point this process at `url` (migrated) until the block ends."""
    from core.settings import get_settings
    from tests.conftest import migrate

    old = os.environ.get("AGENTQ_DATABASE_URL")
    os.environ["AGENTQ_DATABASE_URL"] = url
    get_settings.cache_clear()
    try:
        migrate(url)
        yield url
    finally:
        if old is None:
            os.environ.pop("AGENTQ_DATABASE_URL", None)
        else:
            os.environ["AGENTQ_DATABASE_URL"] = old
        get_settings.cache_clear()


@contextmanager
def fresh_postgres() -> Iterator[str]:
    """A new Postgres database of its own, dropped at the end."""
    import psycopg

    from tests.conftest import PG_ADMIN_URL

    name = f"agentq_test_{os.getpid()}_{secrets.token_hex(3)}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        with _database_url(f"{base}/{name}") as url:
            yield url
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def backend(name: str, folder: Path, *, fresh: bool = False) -> Iterator[str]:
    """The database `name` for the block: "sqlite", a fresh file; "postgres", the session's
    database, or with `fresh` a new one."""
    if name == "sqlite":
        with sqlite_database(folder) as url:
            yield url
    elif fresh:
        with fresh_postgres() as url:
            yield url
    else:
        from core.settings import get_settings

        yield get_settings().database_url
