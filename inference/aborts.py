"""Aborting a streamed call while it waits for its server's next chunk.

A call's `cancelled()` is asked after each chunk it reads; a call waiting for a chunk (queued
at the server, prefilling its prompt, or between slow tokens) would notice only when the next
one comes. One thread per process asks the calls waiting in this way every `POLL_S`, and shuts
down the connection of each one that was cancelled: its blocked read ends at once, and the
server, seeing the connection close, aborts the request (a request still queued there is never
prefilled).

Only the connection of a response still registered and open is shut down, under the lock
that registers it, and a reader unregisters its response before closing it (which gives its
connection back to the client's pool for another call). A stream that ends without its
`[DONE]` line is closed by httpx as it ends, not atomically with that check: a server that
cut a stream short while its call was being cancelled could, in that instant, have the
connection shut down after it went back to the pool (the next call on it fails, transiently,
and is retried).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx

log = logging.getLogger(__name__)

POLL_S = 0.25


@dataclass(eq=False)
class Watched:
    """A response being read; `aborted` once its connection was shut down for a cancel."""

    resp: httpx.Response
    sock: socket.socket
    cancelled: Callable[[], bool]
    aborted: bool = False


class Aborter:
    def __init__(self, poll_s: float = POLL_S) -> None:
        self._poll_s = poll_s
        self._lock = threading.Lock()
        self._watched: set[Watched] = set()
        self._thread: threading.Thread | None = None

    @contextmanager
    def watching(self, resp: httpx.Response, cancelled: Callable[[], bool] | None
                 ) -> Iterator[None]:
        """Shut `resp`'s connection down if `cancelled()` turns true while this block reads
        it."""
        stream = resp.extensions.get("network_stream")
        sock = stream.get_extra_info("socket") if stream is not None else None
        if cancelled is None or not isinstance(sock, socket.socket):
            yield
            return
        entry = Watched(resp, sock, cancelled)
        with self._lock:
            self._watched.add(entry)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="agentq-aborts",
                                                daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._watched.discard(entry)

    def _run(self) -> None:
        stop = threading.Event()
        while not stop.wait(self._poll_s):
            with self._lock:
                watched = list(self._watched)
            for entry in watched:
                try:
                    if not entry.cancelled():
                        continue
                except Exception as exc:  # noqa: BLE001 - a failing check aborts nothing
                    log.debug("could not ask whether a call was cancelled: %s", exc)
                    continue
                self._abort(entry)

    def _abort(self, entry: Watched) -> None:
        with self._lock:
            if entry not in self._watched or entry.resp.is_closed or entry.aborted:
                return
            entry.aborted = True
            try:
                entry.sock.shutdown(socket.SHUT_RDWR)
            except OSError as exc:  # closed meanwhile by its reader: nothing to abort
                log.debug("could not shut a cancelled call's connection down: %s", exc)


# The process's aborter: `with watching(resp, cancelled): ...read resp...`.
watching = Aborter().watching
