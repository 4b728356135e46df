"""Uploaded documents are parsed in a child process with a time limit and a memory limit.

Parsing (`agents.corpus.prepare_document`: PDF with pypdf, HTML with Beautiful Soup, text in any
declared charset, then chunking) can cost far more than a document's size suggests: a small PDF
whose pages all draw one huge content stream, or HTML of millions of tiny elements. So each
parse runs in a process of its own, forked from a server process that has the parsers loaded
(multiprocessing's forkserver: quick to start, and never a fork of the API's own threads). The
child caps its address space (RLIMIT_AS, its size at start plus the memory limit) and its CPU
time (RLIMIT_CPU, a backstop should its parent die) before it parses; the parent waits for its
answer at most the time limit and kills it then. The forkserver reaps every child it forked,
so none is left behind as a zombie.

A parse past the time limit is refused with 422 (`parse_time_limit`), one past the memory limit
with 413 (`parse_memory_limit`); the document's own refusals (415, 422, ...) come back as they
were raised.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import resource
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext
from multiprocessing.process import BaseProcess
from typing import Any

from agents.corpus import PreparedDocument, prepare_document
from core.errors import AgentqError, InvalidInput, PayloadTooLarge
from core.settings import get_settings

log = logging.getLogger(__name__)

# Modules the forkserver imports once, so that each child starts with the parsers loaded.
PRELOAD = ["agents.corpus"]
_ENV_PREFIX = "AGENTQ_"
_REAP_S = 10.0  # the longest a child that has answered may take to exit
_CPU_MARGIN_S = 5  # CPU seconds past the time limit at which the kernel stops a child


@dataclass(frozen=True)
class ParseLimits:
    timeout_s: float
    max_memory_bytes: int

    @classmethod
    def from_settings(cls) -> ParseLimits:
        s = get_settings()
        return cls(timeout_s=s.corpus_parse_timeout_s,
                   max_memory_bytes=s.corpus_parse_max_memory_mb * 1024 * 1024)


@dataclass(frozen=True)
class _Job:
    data: bytes
    declared_type: str | None
    filename: str | None
    title: str | None
    max_memory_bytes: int
    timeout_s: float
    env: dict[str, str]  # the API's AGENTQ_* settings, as they are now


_context: ForkServerContext | None = None
_context_lock = threading.Lock()


def _get_context() -> ForkServerContext:
    global _context
    with _context_lock:
        if _context is None:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(PRELOAD)
            _context = context
        return _context


def _address_space() -> int:
    """This process's virtual memory size in bytes (0 where /proc cannot tell)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _limit_memory(extra: int) -> None:
    """Let this process's address space grow by at most `extra` bytes from here."""
    size = _address_space()
    if not size:
        log.warning("no memory limit on document parsing: /proc/self/statm is not readable")
        return
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = size + extra
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _limit_cpu(seconds: float) -> None:
    """A backstop for a child whose parent is gone: the kernel ends it a little after the time
    limit (the parent, while alive, kills it at the limit itself)."""
    soft = math.ceil(seconds) + _CPU_MARGIN_S
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def _child(answer: Connection, job: _Job) -> None:
    """The child: parse the document under the limits and send back the outcome."""
    _limit_memory(job.max_memory_bytes)
    _limit_cpu(job.timeout_s)
    for key in [k for k in os.environ if k.startswith(_ENV_PREFIX)]:
        del os.environ[key]
    os.environ.update(job.env)
    get_settings.cache_clear()
    outcome: tuple[Any, ...]
    try:
        outcome = ("done", prepare_document(job.data, declared_type=job.declared_type,
                                            filename=job.filename, title=job.title))
    except AgentqError as exc:
        outcome = ("refused", exc)
    except MemoryError:
        outcome = ("memory",)
    except Exception as exc:  # a parser's own failure on a hostile document
        outcome = ("failed", f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
    try:
        answer.send(outcome)
    except MemoryError:
        answer.send(("memory",))
    answer.close()


def _stop(process: BaseProcess, *, kill: bool) -> None:
    """Kill the child if asked (or if it outstays its answer), and wait until it is reaped."""
    if process.pid is None:
        return  # it never started
    if kill and process.is_alive():
        process.kill()
    process.join(None if kill else _REAP_S)
    if process.is_alive():
        process.kill()
        process.join()
    process.close()


def _memory_error(limits: ParseLimits) -> PayloadTooLarge:
    mib = limits.max_memory_bytes // (1024 * 1024)
    return PayloadTooLarge(f"the document needs more than {mib} MiB of memory to parse (the "
                           "limit on parsing memory); send a smaller or simpler document, or "
                           "its text", code="parse_memory_limit")


def prepare_document_bounded(data: bytes, *, declared_type: str | None,
                             filename: str | None = None, title: str | None = None,
                             limits: ParseLimits | None = None) -> PreparedDocument:
    """`agents.corpus.prepare_document` in a child process under `limits` (by default the
    settings'); blocks the calling thread until it answers or is killed."""
    limits = limits or ParseLimits.from_settings()
    context = _get_context()
    job = _Job(data=data, declared_type=declared_type, filename=filename, title=title,
               max_memory_bytes=limits.max_memory_bytes, timeout_s=limits.timeout_s,
               env={k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIX)})
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(sender, job), name="agentq-parse",
                              daemon=True)
    outcome: tuple[Any, ...] | None = None
    timed_out = False
    try:
        try:
            process.start()
        finally:
            sender.close()  # the child holds its own end now
        if receiver.poll(limits.timeout_s):
            try:
                outcome = receiver.recv()
            except EOFError:
                outcome = None  # it died without an answer
        else:
            timed_out = True
    finally:
        receiver.close()
        _stop(process, kill=timed_out)
    if timed_out:
        raise InvalidInput(f"the document took longer than {limits.timeout_s:g} s to parse (the "
                           "limit on parsing time); send a smaller or simpler document, or its "
                           "text", code="parse_time_limit")
    if outcome is None:
        log.warning("a document parser died without an answer")
        raise _memory_error(limits)
    if outcome[0] == "done":
        prepared: PreparedDocument = outcome[1]
        return prepared
    if outcome[0] == "refused":
        raise outcome[1]
    if outcome[0] == "memory":
        raise _memory_error(limits)
    log.warning("a document parser failed: %s", outcome[1])
    raise InvalidInput(f"could not read the document ({outcome[1]})")
