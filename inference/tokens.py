"""A conversation's prompt size before the call, for agent loops to plan their turns by:
counted by the model server's own tokenizer (vLLM's `POST /tokenize`, which also tells the
model's context length), else bounded from the prompt's bytes (no token is shorter than a
byte).

Only conversations are counted (an agent loop's calls); one count is kept per prompt for a
while, so the loop's look before a call and the reservation that follows ask the server once.
A server without `/tokenize` is asked once per process.

`count_sent` counts a request as it was sent (any call, plain prompts too): the prompt a call
cancelled after it was sent, before any usage came, is billed by it (`inference.pool`).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx

from core.catalogue import ModelSpec
from inference import transcript
from inference.calls import CallSpec, PromptSize
from inference.shapes import Shape, chat_message, prompt_bound, shape_of

log = logging.getLogger(__name__)

KEPT = 512


class PromptMeter:
    def __init__(self, http: httpx.Client, timeout_s: float) -> None:
        self._http = http
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._sizes: OrderedDict[str, PromptSize] = OrderedDict()
        self._without: set[str] = set()  # endpoints that have no tokenizer to ask

    def size(self, call: CallSpec, options: Sequence[tuple[str, str | None, ModelSpec | None]],
             models_of: Callable[[str], list[str]]) -> PromptSize:
        """`options`: the endpoints that may take the call, each with the model name to ask
        for and its catalogue entry."""
        shapes = {shape_of(call, spec) for _, _, spec in options}
        specs = [spec for _, _, spec in options if spec is not None]
        # A context the catalogue declares holds; one it leaves at its default gives way to
        # what the server says.
        declared = [s.context for s in specs if "context" in s.model_fields_set]
        context = min(declared) if declared else None
        bound = PromptSize(prompt_bound(call, shapes),
                           min(s.context for s in specs) if specs else None)
        names = {name for _, name, _ in options if name is not None}
        if not call.is_conversation or len(shapes) != 1 or len(names) > 1:
            return bound  # several tokenizers could read it: the bound covers them all
        key = call.prompt_key()
        with self._lock:
            known = self._sizes.get(key)
            if known is not None:
                self._sizes.move_to_end(key)
                return known
        shape = next(iter(shapes))
        for url, name, _ in options:
            if url in self._without:
                continue
            counted = self._count(url, name, call, shape, models_of)
            if counted is None:
                break
            limits = [x for x in (context, counted[1]) if x is not None]
            size = PromptSize(counted[0], min(limits) if limits else None, exact=True)
            with self._lock:
                self._sizes[key] = size
                while len(self._sizes) > KEPT:
                    self._sizes.popitem(last=False)
            return size
        return bound

    def _count(self, url: str, name: str | None, call: CallSpec, shape: Shape,
               models_of: Callable[[str], list[str]]) -> tuple[int, int | None] | None:
        try:
            names = models_of(url)
            model = name or (names[0] if names else None)
            body: dict[str, Any] = {"model": model}
            if shape is Shape.COMPLETION:
                body.update(prompt=transcript.render(call), add_special_tokens=True)
            elif shape is Shape.CHAT:
                body.update(messages=transcript.chat_messages(call), add_generation_prompt=True)
            else:
                body.update(messages=[chat_message(m) for m in call.messages or ()],
                            tools=[{"type": "function", "function": t.as_json()}
                                   for t in [*call.tools, *([call.answer] if call.answer
                                                            else [])]],
                            add_generation_prompt=True)
        except (httpx.HTTPError, ValueError) as exc:
            log.debug("could not count a prompt's tokens at %s: %s", url, exc)
            return None
        return self._ask(url, body)

    def count_sent(self, url: str, path: str, request: Mapping[str, Any]) -> int | None:
        """The prompt tokens of a request as it was sent to `url` (the path and body of
        `inference.shapes.build`), counted by that server's tokenizer; None where it has
        none or did not answer."""
        if url in self._without:
            return None
        body: dict[str, Any] = {"model": request.get("model")}
        if path.endswith("/chat/completions"):
            body.update(messages=request.get("messages") or [], add_generation_prompt=True)
            if request.get("tools"):
                body["tools"] = request["tools"]
        else:
            body.update(prompt=request.get("prompt", ""), add_special_tokens=True)
        counted = self._ask(url, body)
        return None if counted is None else counted[0]

    def _ask(self, url: str, body: dict[str, Any]) -> tuple[int, int | None] | None:
        try:
            resp = self._http.post(f"{url}/tokenize", json=body, timeout=self._timeout_s)
        except httpx.HTTPError as exc:
            log.debug("could not count a prompt's tokens at %s: %s", url, exc)
            return None
        if resp.status_code in (404, 405, 501):
            log.info("%s has no /tokenize: prompt sizes there are bounded from bytes", url)
            with self._lock:
                self._without.add(url)
            return None
        try:
            data = resp.json()
            count = int(data["count"])
            limit = data.get("max_model_len")
            return count, int(limit) if limit else None
        except (ValueError, KeyError, TypeError) as exc:
            log.debug("%s answered /tokenize with %s: %s", url, resp.status_code, exc)
            return None
