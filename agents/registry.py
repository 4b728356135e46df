"""The registry of job kinds. Every module in `agents/` that registers a kind is imported once."""

from __future__ import annotations

import importlib
import pkgutil
import threading

from agents.base import JobKind

_kinds: dict[str, JobKind] = {}
_loaded = False
_lock = threading.Lock()


def register(kind_cls: type[JobKind]) -> type[JobKind]:
    _kinds[kind_cls.name] = kind_cls()
    return kind_cls


def _load() -> None:
    global _loaded
    with _lock:
        if _loaded:
            return
        import agents

        for mod in pkgutil.iter_modules(agents.__path__):
            if mod.name not in {"base", "registry"}:
                importlib.import_module(f"agents.{mod.name}")
        _loaded = True


def get_kind(name: str) -> JobKind | None:
    _load()
    return _kinds.get(name)


def kind_names() -> list[str]:
    _load()
    return sorted(_kinds)
