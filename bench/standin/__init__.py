"""A fast stand-in for an OpenAI-compatible model server, for tests and benchmarks.

It speaks the subset of vLLM's API that agentq uses (`/v1/models`, `/v1/completions` and
`/v1/chat/completions`, streamed or not, `/metrics` with vLLM's counter names), answers
deterministically, counts "tokens" as whitespace-separated words, reports prompt words it has
seen before as cached (in blocks of four, like a prefix cache), and can be told to be slow, to
fail, or to omit usage (`POST /_control`). `python -m bench.standin --port 8199` runs one on
its own.

Answers can be scripted: `replies` maps a marker to the answer of every request whose prompt
(or messages) holds it; `scripts` maps a marker to a sequence of answers, the n-th for the n-th
call of a step (the call index in its `X-Request-Id`, `{step}:{attempt}:{index}`; the last
answer repeats); `token_delay_by_marker` maps a marker to a pause between streamed tokens of
every request whose prompt holds it (a slow caller among fast ones, or one a cancel
interrupts). Under a JSON-schema constraint, an answer that is JSON is sent as it is (a test
may send arguments that do not fit) and any other text is fitted into the schema, as a
constrained decoder would (a choice between a tool call and a final answer takes the final
answer). On the chat endpoint with `tools`, an answer `{"tool": name, "arguments": {...}}`
comes back as a tool call; a forced tool (`tool_choice` naming one) is called with the text
fitted to its parameters.

The package: `state` (settings, counters, token counting), `answers` (what is answered),
`app` (the endpoints), `server` (running one).
"""

from bench.standin.answers import constrained, fit_to_schema
from bench.standin.app import make_app
from bench.standin.server import StandinServer, free_port, main
from bench.standin.state import DEFAULT_PLAN, StandinState, call_index, count_tokens

__all__ = ["DEFAULT_PLAN", "StandinServer", "StandinState", "call_index", "constrained",
           "count_tokens", "fit_to_schema", "free_port", "main", "make_app"]
