"""The registry of job kinds: every entry point of the `agentq.kinds` group, loaded once.

An entry point names a `JobKind` subclass (or an instance of one); the kind is registered
under its `name`. One that fails to load is logged and skipped; of two kinds with the same
name, the first found wins.
"""

from __future__ import annotations

import logging
import threading
from importlib.metadata import entry_points
from typing import Any

from agents.base import JobKind

GROUP = "agentq.kinds"

log = logging.getLogger(__name__)
_kinds: dict[str, JobKind[Any, Any]] | None = None
_lock = threading.Lock()


def _instantiate(target: object) -> JobKind[Any, Any]:
    kind = target() if isinstance(target, type) else target
    if not isinstance(kind, JobKind):
        raise TypeError(f"{target!r} is not a JobKind")
    return kind


def _discover() -> dict[str, JobKind[Any, Any]]:
    found: dict[str, JobKind[Any, Any]] = {}
    for ep in entry_points(group=GROUP):
        try:
            kind = _instantiate(ep.load())
            name = kind.name
        except Exception:
            log.exception("job kind entry point %s = %s could not be loaded; skipped",
                          ep.name, ep.value)
            continue
        if name != ep.name:
            log.warning("job kind entry point %s = %s defines the kind %r", ep.name, ep.value,
                        name)
        if name in found:
            log.warning("job kind %r from %s is ignored: %s already defines it", name,
                        ep.value, type(found[name]).__module__)
            continue
        found[name] = kind
    return found


def _load() -> dict[str, JobKind[Any, Any]]:
    global _kinds
    kinds = _kinds
    if kinds is None:
        with _lock:
            if _kinds is None:
                _kinds = _discover()
            kinds = _kinds
    return kinds


def get_kind(name: str) -> JobKind[Any, Any] | None:
    return _load().get(name)


def kind_names() -> list[str]:
    return sorted(_load())
