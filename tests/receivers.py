"""Webhook receivers on this machine, each a real server on a thread: one that records what it
is sent, one that drips its answer a byte at a time, and one whose answer is huge."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


def read_request(sock: socket.socket) -> tuple[dict[str, str], bytes]:
    """One HTTP request's headers (lower-case names) and body (by Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return {}, b""
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    headers: dict[str, str] = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return headers, body


@dataclass
class Connection:
    webhook_id: str
    opened: float
    closed: float | None = None
    sent: int = 0  # bytes of the answer the client took (into its socket buffers)


@dataclass
class Receiver:
    """What a receiver saw; `url` is on 127.0.0.1 unless the server was bound elsewhere."""

    host: str
    port: int
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    connections: list[Connection] = field(default_factory=list)
    most_at_once: dict[str, int] = field(default_factory=dict)  # by webhook-id
    lock: threading.Lock = field(default_factory=threading.Lock)
    _open: dict[str, int] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/hook"

    def opened(self, headers: dict[str, str], body: bytes) -> Connection:
        conn = Connection(headers.get("webhook-id", ""), time.monotonic())
        with self.lock:
            self.received.append((headers, body))
            self.connections.append(conn)
            n = self._open[conn.webhook_id] = self._open.get(conn.webhook_id, 0) + 1
            self.most_at_once[conn.webhook_id] = max(n, self.most_at_once.get(conn.webhook_id, 0))
        return conn

    def closed(self, conn: Connection) -> None:
        with self.lock:
            conn.closed = time.monotonic()
            self._open[conn.webhook_id] -= 1

    def open_now(self) -> int:
        with self.lock:
            return sum(self._open.values())


def _ok(sock: socket.socket, rec: Receiver) -> None:
    conn = rec.opened(*read_request(sock))
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    rec.closed(conn)


def _drip(sock: socket.socket, rec: Receiver, stop: threading.Event, *, headers: bool) -> None:
    """Headers then one byte of body every 0.5 s (or the status line itself, a byte at a time),
    for as long as the client keeps the connection."""
    conn = rec.opened(*read_request(sock))
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n"
    try:
        if headers:
            sock.sendall(answer)
            answer = b""
        while not stop.is_set():
            sock.sendall(answer[:1] or b"x")
            answer = answer[1:]
            conn.sent += 1
            stop.wait(0.5)
    except OSError:
        pass  # the client hung up
    finally:
        rec.closed(conn)


HUGE_BYTES = 300 * 1024 * 1024


def _huge(sock: socket.socket, rec: Receiver, stop: threading.Event) -> None:
    """A 500 whose body is 300 MB, sent as fast as the client takes it."""
    conn = rec.opened(*read_request(sock))
    chunk = b"A" * 65536
    try:
        sock.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\n"
                     b"Content-Length: %d\r\n\r\n" % HUGE_BYTES)
        while conn.sent < HUGE_BYTES and not stop.is_set():
            sock.sendall(chunk)
            conn.sent += len(chunk)
    except OSError:
        pass  # the client hung up
    finally:
        rec.closed(conn)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@contextmanager
def serve(kind: str, host: str = "127.0.0.1", port: int = 0) -> Iterator[Receiver]:
    """A receiver of this kind ("ok", "drip", "drip-headers", "huge") until the block ends."""
    stop = threading.Event()
    rec: Receiver | None = None

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            assert rec is not None
            sock: socket.socket = self.request
            if kind == "ok":
                _ok(sock, rec)
            elif kind == "drip":
                _drip(sock, rec, stop, headers=True)
            elif kind == "drip-headers":
                _drip(sock, rec, stop, headers=False)
            else:
                _huge(sock, rec, stop)

    server = _Server((host, port), Handler)
    rec = Receiver(host, server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield rec
    finally:
        stop.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
