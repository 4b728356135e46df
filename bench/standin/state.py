"""What a stand-in server knows: its settings (changed through `POST /_control`), its counters,
the requests it received and its prefix cache; and how it counts tokens."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any

DEFAULT_PLAN = ["What is the first part of it?", "What is the second part of it?",
                "What is the third part of it?"]


@dataclass
class StandinState:
    model: str = "standin-model"
    # Pause before the first token of every answer (streamed: after the response's headers,
    # so the request was taken and its prompt counted, as a server that queues or prefills).
    delay_s: float = 0.0
    # More seconds per request running at once when a request starts: a latency that grows
    # with the batch, as a real server's does.
    batch_delay_s: float = 0.0
    # Pause between streamed tokens (a slow generation that a cancel can interrupt).
    token_delay_s: float = 0.0
    # Hold every answer until this many requests have been running at once (or the timeout
    # passes): shows how many calls a client keeps in flight, however slowly they arrive.
    hold_until_running: int = 0
    hold_timeout_s: float = 60.0
    fail_next: int = 0
    fail_status: int = 503
    omit_usage: bool = False
    plan_text: str = json.dumps(DEFAULT_PLAN)
    # Scripted answers: the first whose marker occurs in the prompt is the answer.
    replies: dict[str, str] = field(default_factory=dict)
    # Scripted sequences: the n-th answer for a step's n-th call (see the module's doc).
    scripts: dict[str, list[str]] = field(default_factory=dict)
    # Seconds to wait before answering a step's n-th call, by n (from 0).
    delay_by_index: dict[int, float] = field(default_factory=dict)
    # Pause between streamed tokens of a call whose prompt (or messages) holds the marker.
    token_delay_by_marker: dict[str, float] = field(default_factory=dict)

    def token_delay(self, prompt: str) -> float:
        with self.lock:
            return self.token_delay_s + sum(
                s for marker, s in self.token_delay_by_marker.items() if marker in prompt)
    # `/tokenize` answers (as vLLM's does) with this context length; or, when set, fails with
    # this status.
    tokenize_status: int | None = None
    context: int = 32768
    tokenize_total: int = 0
    # The bodies of requests received (with their path under "_path" and request id under
    # "_request_id"), newest last (the last 500).
    bodies: list[dict[str, Any]] = field(default_factory=list)

    def keep(self, path: str, request_id: str, body: dict[str, Any]) -> None:
        """Keep a request's body (call with the lock)."""
        self.bodies = [*self.bodies[-499:], {**body, "_path": path, "_request_id": request_id}]
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    requests_total: int = 0
    models_requests_total: int = 0
    running: int = 0
    max_running: int = 0
    request_ids: list[str] = field(default_factory=list)
    aborted_total: int = 0
    prefix_cache: set[int] = field(default_factory=set)
    prefix_queries_total: int = 0
    prefix_hits_total: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def cached_tokens(self, prompt: str) -> int:
        """Leading prompt words already seen, in whole blocks of four (call with the lock)."""
        words = prompt.split()
        cached, hit = 0, True
        for end in range(4, len(words) + 1, 4):
            key = hash(tuple(words[:end]))
            if hit and key in self.prefix_cache:
                cached = end
            else:
                hit = False
                self.prefix_cache.add(key)
        self.prefix_queries_total += count_tokens(prompt)
        self.prefix_hits_total += cached
        return cached


def count_tokens(text: str) -> int:
    return len(text.split()) + 1  # a <bos> token, as a real tokenizer adds


def call_index(request_id: str) -> int:
    """A step's call index from its request id (`{step}:{attempt}:{index}`); 0 otherwise."""
    last = request_id.rsplit(":", 1)[-1]
    return int(last) if ":" in request_id and last.isdigit() else 0
