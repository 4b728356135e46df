"""One endpoint of the pool as this process sees it: its in-flight counters, its circuit
breaker, the busy time shared out among its calls, and the power it draws (declared, or read
from NVML on a machine with NVIDIA GPUs)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import httpx

BREAKER_MAX_PAUSE_S = 60.0


@dataclass
class Endpoint:
    base_url: str
    cap: int = 64
    models: list[str] = field(default_factory=list)
    # Calls of this process routed here (waiting for a slot or running), and those running.
    in_flight: int = 0
    running: int = 0
    # Circuit breaker: consecutive transient failures; "closed", "open" or "half_open" (one
    # probe call in flight); until when it stays open, and the current pause.
    failures: int = 0
    state: str = "closed"
    open_until: float = 0.0
    pause_s: float = 0.0
    # Declared power draw; None when unknown.
    watts: float | None = None
    # Busy time shared out among the calls running: the integral of 1/running over time.
    busy_share_s: float = 0.0
    share_clock: float = field(default_factory=time.monotonic)

    def available(self, now: float) -> bool:
        if self.state == "closed":
            return True
        return self.state == "open" and now >= self.open_until

    def advance(self, now: float) -> float:
        """Bring the busy-share integral up to `now` (call before `running` changes)."""
        if self.running > 0:
            self.busy_share_s += (now - self.share_clock) / self.running
        self.share_clock = now
        return self.busy_share_s

    def settle(self, outcome: str, fail_max: int, reset_s: float) -> str | None:
        """Move the circuit breaker on a call's outcome (see `Pool._release`): "open" when the
        circuit opens (or stays open after a failed probe), "closed" when it closes again."""
        if outcome in ("failed", "down"):
            self.failures += 1
            if self.state == "half_open" or outcome == "down" or self.failures >= fail_max:
                was_probe = self.state == "half_open"
                self.pause_s = min(self.pause_s * 2, BREAKER_MAX_PAUSE_S) if was_probe \
                    and self.pause_s else reset_s
                self.state = "open"
                self.open_until = time.monotonic() + self.pause_s
                return "open"
        elif outcome == "ok":
            was_closed = self.state == "closed"
            self.failures, self.state, self.pause_s = 0, "closed", 0.0
            return None if was_closed else "closed"
        elif self.state == "half_open":
            self.state = "open"  # the probe told nothing; probe again at once
        return None


class NvmlPower:
    """Board power of this machine's NVIDIA GPUs, summed, through NVML (nvidia-ml-py)."""

    def __init__(self) -> None:
        import pynvml  # type: ignore[import-not-found, unused-ignore]

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i)
                         for i in range(pynvml.nvmlDeviceGetCount())]
        if not self._handles:
            raise RuntimeError("NVML found no GPU")

    def watts(self) -> float:
        return sum(self._nvml.nvmlDeviceGetPowerUsage(h) for h in self._handles) / 1000.0


def is_local(url: str) -> bool:
    host = httpx.URL(url).host
    return host in {"127.0.0.1", "localhost", "::1"}


def endpoint_watts(url: str, declared: dict[str, float]) -> float | None:
    return declared.get(url.rstrip("/"), declared.get("*"))

