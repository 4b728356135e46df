"""Run a test module against the embedded SQLite database as well as the session's Postgres."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BACKENDS = ("postgres", "sqlite")


@contextmanager
def sqlite_database(folder: Path) -> Iterator[str]:
    """Point this process at a fresh, migrated SQLite database until the block ends."""
    from core.settings import get_settings
    from tests.conftest import migrate

    url = f"sqlite:///{folder / 'agentq.db'}"
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
def backend(name: str, folder: Path) -> Iterator[str]:
    """The database `name` ("postgres": the session's; "sqlite": a fresh file) for the block."""
    if name == "sqlite":
        with sqlite_database(folder) as url:
            yield url
    else:
        from core.settings import get_settings

        yield get_settings().database_url
