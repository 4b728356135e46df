"""The pool client against stand-in servers: usage, retries, failover, structured outputs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from bench.standin import StandinServer, free_port
from core.settings import Settings
from inference.calls import CallSpec
from inference.pool import CompletionRequest, InferenceError, Pool, TransientInferenceError


@pytest.fixture
def server() -> Iterator[StandinServer]:
    s = StandinServer().start()
    yield s
    s.stop()


def settings(**kw: Any) -> Settings:
    base: dict[str, Any] = {"retry_max_attempts": 3, "retry_max_seconds": 10,
                            "request_timeout_s": 5, "connect_timeout_s": 1,
                            "pool_admission": False}
    return Settings(**{**base, **kw})


_CALL_FIELDS = {"prompt", "max_tokens", "regex", "choice", "json_schema", "stop", "size",
                "model", "temperature"}


def req(**kw: Any) -> CompletionRequest:
    call = {"prompt": "one two three", "max_tokens": 5,
            **{k: v for k, v in kw.items() if k in _CALL_FIELDS}}
    rest = {"request_id": "r-1", **{k: v for k, v in kw.items() if k not in _CALL_FIELDS}}
    return CompletionRequest(call=CallSpec(**call), **rest)


def test_completion_carries_usage_and_max_tokens(server: StandinServer) -> None:
    pool = Pool([server.url], settings())
    c = pool.complete(req(max_tokens=3))
    assert c.usage.prompt_tokens == 4  # three words and <bos>
    assert c.usage.completion_tokens == 3
    assert c.finish_reason == "length"
    assert c.model == "standin-model"
    assert c.endpoint == server.url
    assert server.state.request_ids == ["r-1"]


def test_a_response_without_usage_is_an_error(server: StandinServer) -> None:
    server.state.omit_usage = True
    with pytest.raises(InferenceError) as info:
        Pool([server.url], settings()).complete(req())
    assert info.value.code == "usage_missing"
    assert server.state.requests_total == 1  # not retried


def test_transient_errors_are_retried_then_succeed(server: StandinServer) -> None:
    server.state.fail_next, server.state.fail_status = 2, 429
    c = Pool([server.url], settings()).complete(req())
    assert c.attempts == 3
    assert server.state.requests_total == 3


def test_retries_are_bounded(server: StandinServer) -> None:
    server.state.fail_next, server.state.fail_status = 100, 502
    with pytest.raises(TransientInferenceError):
        Pool([server.url], settings(retry_max_attempts=3)).complete(req())
    assert server.state.requests_total == 3


def test_client_errors_are_not_retried(server: StandinServer) -> None:
    server.state.fail_next, server.state.fail_status = 1, 422
    with pytest.raises(InferenceError) as info:
        Pool([server.url], settings()).complete(req())
    assert not isinstance(info.value, TransientInferenceError)
    assert server.state.requests_total == 1


def test_a_dead_endpoint_fails_over_to_another(server: StandinServer) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    pool = Pool([dead, server.url], settings())
    for i in range(4):
        c = pool.complete(req(request_id=f"r-{i}"))
        assert c.endpoint == server.url
    assert server.state.requests_total == 4


def test_a_failing_endpoint_is_skipped_while_it_cools_down(server: StandinServer) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    pool = Pool([dead, server.url], settings())
    first = pool.complete(req(request_id="r-0"))
    assert first.endpoint == server.url
    # the dead endpoint is now cooling down: later calls go straight to the healthy one
    for i in range(1, 5):
        assert pool.complete(req(request_id=f"r-{i}")).attempts == 1
    assert pool.endpoints[0].failures >= 1
    assert pool.endpoints[1].failures == 0


def test_client_errors_do_not_put_an_endpoint_on_cooldown(server: StandinServer) -> None:
    server.state.fail_next, server.state.fail_status = 1, 400
    pool = Pool([server.url], settings())
    with pytest.raises(InferenceError):
        pool.complete(req())
    assert pool.endpoints[0].failures == 0
    assert pool.complete(req(request_id="r-2")).attempts == 1


def test_no_endpoint_answering_fails_within_bounded_time() -> None:
    import time

    pool = Pool([f"http://127.0.0.1:{free_port()}"], settings(retry_max_seconds=3))
    start = time.monotonic()
    with pytest.raises(TransientInferenceError,
                       match="did not list its models|unreachable|circuit open"):
        pool.complete(req())
    assert time.monotonic() - start < 15


def test_structured_outputs_are_passed_through(server: StandinServer) -> None:
    from inference.shapes import Shape, build

    call = req(regex=r"\[.*\]", choice=["a", "b"], json_schema={"type": "object"})
    path, body = build(call.call, "m", call.max_tokens, Shape.COMPLETION)
    assert path == "/v1/completions"
    # A JSON schema also asks for JSON without padding whitespace (a small model pads).
    assert body["structured_outputs"] == {"regex": r"\[.*\]", "choice": ["a", "b"],
                                          "json": {"type": "object"},
                                          "disable_any_whitespace": True}
    assert body["max_tokens"] == 5
    assert body["temperature"] == 0.0


def test_zero_max_tokens_is_refused_before_sending(server: StandinServer) -> None:
    with pytest.raises(InferenceError):
        Pool([server.url], settings()).complete(req(max_tokens=0))
    assert server.state.requests_total == 0


def test_streamed_calls_measure_time_to_first_token_and_cache_hits(
        server: StandinServer) -> None:
    server.state.delay_s = 0.3
    pool = Pool([server.url], settings())
    prompt = "alpha beta gamma delta epsilon zeta eta theta iota"
    first = pool.complete(req(prompt=prompt, request_id="a"))
    second = pool.complete(req(prompt=prompt + " kappa", request_id="b"))
    assert first.ttft_ms is not None
    assert 300 <= first.ttft_ms <= first.latency_ms
    assert first.usage.cached_tokens == 0
    assert second.usage.cached_tokens == 8  # two whole blocks of four words seen before
    assert second.text == first.text


def test_energy_is_each_calls_share_of_the_endpoints_busy_time(
        server: StandinServer) -> None:
    """Four calls overlap for about a second at 360 W: together they used about
    360 W x 1 s = 0.1 Wh, a quarter each, however the overlap falls."""
    import threading
    import time

    server.state.delay_s = 1.0
    pool = Pool([server.url], settings(endpoint_watts={"*": 360.0}))
    results: list[Any] = []
    started = time.monotonic()

    def call(i: int) -> None:
        results.append(pool.complete(req(request_id=f"e-{i}")))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    busy_s = time.monotonic() - started
    energies = [r.energy_wh for r in results]
    assert all(r.energy_method == "declared_watts" for r in results)
    # The endpoint was busy at least the server's 1 s and at most the wall time seen here; the
    # four calls ran together, so they share it about equally (not 4 x the watts).
    assert 360.0 * 1.0 / 3600 * 0.95 <= sum(energies) <= 360.0 * busy_s / 3600 * 1.05
    for e in energies:
        assert e == pytest.approx(sum(energies) / 4, rel=0.35)


def test_energy_is_unknown_without_a_declared_power(server: StandinServer) -> None:
    quiet = settings(energy_nvml=False)
    quiet.endpoint_watts = {}  # settings merge dicts from the environment; clear it here
    c = Pool([server.url], quiet).complete(req())
    assert c.energy_wh is None
    assert c.energy_method is None


def test_a_stream_cut_short_is_a_transient_failure(server: StandinServer) -> None:
    """A server that dies mid-answer is retried, not recorded as a short answer."""
    import socket
    import threading

    port = free_port()
    listener = socket.create_server(("127.0.0.1", port))

    models = b'{"object": "list", "data": [{"id": "m"}]}'
    chunk = b'data: {"choices": [{"text": "hi", "finish_reason": null}]}\n\n'
    posts: list[int] = []

    def serve_truncated() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            request = conn.recv(65536)
            if request.startswith(b"GET /v1/models"):
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                             % (len(models), models))
            else:
                posts.append(1)
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"transfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n"
                             % (len(chunk), chunk))
            conn.close()

    threading.Thread(target=serve_truncated, daemon=True).start()
    with pytest.raises(TransientInferenceError, match="unreachable|before its end"):
        Pool([f"http://127.0.0.1:{port}"], settings(retry_max_seconds=3)).complete(req())
    listener.close()
    assert len(posts) == 3  # every attempt was made, and each one failed mid-stream


def test_the_circuit_opens_after_repeated_failures_and_one_probe_closes_it(
        server: StandinServer) -> None:
    server.state.fail_next, server.state.fail_status = 3, 503
    pool = Pool([server.url], settings(breaker_fail_max=3, breaker_reset_s=1.0))
    with pytest.raises(TransientInferenceError):
        pool.complete(req(request_id="r-1"))
    assert pool.breaker_states() == {server.url: "open"}
    sent = server.state.requests_total
    # While open, nothing is sent; after the pause one probe goes, succeeds, and closes it.
    c = pool.complete(req(request_id="r-2"))
    assert c.attempts > 1
    assert server.state.requests_total == sent + 1
    assert pool.breaker_states() == {server.url: "closed"}


def test_a_failed_probe_keeps_the_circuit_open_longer(server: StandinServer) -> None:
    import time

    server.state.fail_next, server.state.fail_status = 100, 503
    pool = Pool([server.url], settings(breaker_fail_max=2, breaker_reset_s=0.5,
                                       retry_max_attempts=2))
    with pytest.raises(TransientInferenceError):
        pool.complete(req(request_id="r-1"))
    first_pause = pool.endpoints[0].pause_s
    time.sleep(0.6)
    with pytest.raises(TransientInferenceError):
        pool.complete(req(request_id="r-2"))  # the probe fails
    assert pool.endpoints[0].pause_s == 2 * first_pause


def test_with_every_endpoint_down_calls_fail_clearly_within_the_bound(
        server: StandinServer) -> None:
    import time

    dead = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    pool = Pool(dead, settings(retry_max_seconds=3, retry_max_attempts=10))
    started = time.monotonic()
    with pytest.raises(TransientInferenceError) as info:
        pool.complete(req())
    assert time.monotonic() - started < 8
    assert "circuit open" in info.value.message or "did not list" in info.value.message


def test_the_catalogue_routes_by_size_class() -> None:
    small = StandinServer(model="tiny-model").start()
    large = StandinServer(model="big-model").start()
    try:
        pool = Pool(settings=settings(models=[
            {"name": "tiny-model", "endpoints": [small.url], "size": "small"},
            {"name": "big-model", "endpoints": [large.url], "size": "large",
             "max_in_flight": 8}]))
        assert pool.complete(req(size="large")).endpoint == large.url
        assert pool.complete(req(size="small")).endpoint == small.url
        assert pool.complete(req()).endpoint == small.url  # the smallest class by default
        assert pool.complete(req(size="medium")).model == "big-model"  # next larger class
        assert pool.complete(req(model="tiny-model")).endpoint == small.url
        assert {e.base_url: e.cap for e in pool.endpoints}[large.url] == 8
        assert pool.catalogue.larger_than("small") == "large"
    finally:
        small.stop()
        large.stop()


def test_routing_modes_affinity_and_round_robin() -> None:
    a, b = StandinServer().start(), StandinServer().start()
    try:
        sticky = Pool([a.url, b.url], settings(pool_routing="affinity"))
        ends = {sticky.complete(req(request_id=f"s{i}", affinity_key="job-1")).endpoint
                for i in range(6)}
        assert len(ends) == 1  # a job's calls stay together while loads are even
        rr = Pool([a.url, b.url], settings(pool_routing="round_robin"))
        ends_rr = [rr.complete(req(request_id=f"r{i}", affinity_key="job-1")).endpoint
                   for i in range(6)]
        assert ends_rr.count(a.url) == ends_rr.count(b.url) == 3
    finally:
        a.stop()
        b.stop()


def test_a_busy_home_spills_a_call_without_moving_the_job() -> None:
    a, b = StandinServer().start(), StandinServer().start()
    try:
        pool = Pool([a.url, b.url], settings(pool_routing="affinity"))
        home = pool.complete(req(request_id="h0", affinity_key="job-1")).endpoint
        busy = next(e for e in pool.endpoints if e.base_url == home)
        busy.in_flight += 20  # as if twenty calls of other jobs were running there
        spilled = pool.complete(req(request_id="h1", affinity_key="job-1")).endpoint
        busy.in_flight -= 20
        back = pool.complete(req(request_id="h2", affinity_key="job-1")).endpoint
        assert spilled != home
        assert back == home
    finally:
        a.stop()
        b.stop()


def _conversation(text: str) -> CallSpec:
    from inference.calls import ChatMessage, ToolSchema

    answer = ToolSchema("final_answer", "Answer.", {
        "type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]})
    return CallSpec(messages=(ChatMessage("system", "Be brief."), ChatMessage("user", text)),
                    answer=answer, max_tokens=40)


def test_a_conversation_is_counted_by_the_servers_tokenizer(server: StandinServer) -> None:
    pool = Pool([server.url], settings())
    call = _conversation("one two three")
    size = pool.prompt_size(call)
    assert size.exact
    assert size.context == server.state.context  # the catalogue left it at its default
    made = pool.complete(CompletionRequest(call=call, request_id="t-1"))
    assert made.usage.prompt_tokens == size.tokens
    assert pool.prompt_size(call) == size  # kept: the server is not asked again
    assert server.state.tokenize_total == 1
    assert made.tool_calls[0].name == "final_answer"
    # plain prompts are bounded by their bytes, never counted
    plain = pool.prompt_size(CallSpec(prompt="one two three", max_tokens=5))
    assert not plain.exact
    assert plain.tokens == len("one two three") + 8
    assert server.state.tokenize_total == 1


def test_prompts_are_bounded_where_the_server_has_no_tokenizer(server: StandinServer) -> None:
    server.state.tokenize_status = 503  # it may answer later: asked again each time
    pool = Pool([server.url], settings())
    first = pool.prompt_size(_conversation("alpha beta"))
    assert not first.exact
    made = pool.complete(CompletionRequest(call=_conversation("alpha beta"), request_id="b-1"))
    assert made.usage.prompt_tokens <= first.tokens
    assert first.context == 2048  # the catalogue's default for an undeclared model
    pool.prompt_size(_conversation("gamma"))
    assert server.state.tokenize_total == 2
    server.state.tokenize_status = 404  # it has none: asked once more, then never
    for word in ("delta", "epsilon", "zeta"):
        assert not pool.prompt_size(_conversation(word)).exact
    assert server.state.tokenize_total == 3
