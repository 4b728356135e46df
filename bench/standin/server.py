"""A stand-in server on a thread of this process, or on its own (`python -m bench.standin`)."""

from __future__ import annotations

import argparse
import socket
import threading
import time
from typing import Any

import uvicorn

from bench.standin.app import make_app
from bench.standin.state import StandinState


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class StandinServer:
    """A stand-in server on a thread of this process."""

    def __init__(self, port: int | None = None, **state: Any) -> None:
        self.state = StandinState(**state)
        self.port = port or free_port()
        config = uvicorn.Config(make_app(self.state), host="127.0.0.1", port=self.port,
                                log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> StandinServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("stand-in server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.standin")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8199)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    uvicorn.run(make_app(StandinState(delay_s=args.delay)), host=args.host, port=args.port,
                log_level="warning")
