"""The model pool: OpenAI-compatible endpoints behind one call.

Agents never build HTTP requests; they hand the pool a `CallSpec` (a prompt or a conversation
with tools, a `max_tokens` taken from the step budget, optional structured-output constraints)
and accounting ids, and get back text, tool calls and usage. How the call is shaped for the
model it lands on (`/v1/completions` or `/v1/chat/completions`) is `inference.shapes`.

- Every request sets `max_tokens` (vLLM's completions default is 16 tokens).
- Usage is required: a response without it is an error, never zero spend.
- Only transient failures are retried (connection errors, timeouts, 429, 5xx), with tenacity's
  exponential backoff and jitter, bounded in attempts and time, on another endpoint if any.
- The endpoint is the least loaded one by this process's own in-flight counters, with the job's
  previous endpoint preferred while it is not busier than the idlest (prefix-cache affinity).
- Responses are streamed (`inference.stream`), so time to first token is measured, and a call
  given up on (a cancelled job, a timeout) closes its connection, which makes vLLM abort it.
  A call cancelled after the server took it, before any usage came, carries its prompt's
  tokens as the server counts the request (`/tokenize`), for the ledger to bill; one
  cancelled before it was sent (waiting for a slot) carries none.
- Energy: a call's share of its endpoint's busy time (each in-flight second divided among the
  calls in flight, over every worker process through admission's Redis scripts, or over this
  process's calls when admission is off or Redis is away) times the endpoint's power, declared
  in `AGENTQ_ENDPOINT_WATTS` or read from NVML on a machine with NVIDIA GPUs
  (`AGENTQ_ENERGY_NVML`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import httpx
import redis
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from core.catalogue import Catalogue, ModelSpec, load_catalogue
from core.settings import Settings, get_settings
from inference.admission import Admission, AdmissionCancelled, AdmissionTimeout, Slot
from inference.calls import CallSpec, PromptSize
from inference.endpoints import Endpoint, NvmlPower, endpoint_watts, is_local
from inference.shapes import build, shape_of
from inference.stream import (
    CallCancelled,
    Completion,
    CompletionRequest,
    InferenceError,
    PoolUnavailable,
    TransientInferenceError,
    Usage,
    send,
)
from inference.tokens import PromptMeter

# What callers import from here: the call's types live with the stream that produces them.
__all__ = [
    "CallCancelled", "Completion", "CompletionRequest", "Endpoint", "InferenceError",
    "INFLIGHT_KEY_PREFIX", "Pool", "PoolUnavailable", "TransientInferenceError", "Usage",
    "get_pool",
]

log = logging.getLogger(__name__)
# httpx logs every request at INFO: one line per model call would cost more than the call's
# bookkeeping. Failures are logged here, with what they mean.
logging.getLogger("httpx").setLevel(logging.WARNING)

# Each process publishes its in-flight calls per endpoint to Redis, so `/metrics` can show the
# whole pool: one hash per process, refreshed every second and expiring if the process dies.
INFLIGHT_KEY_PREFIX = "agentq:pool:inflight:"
INFLIGHT_REPORT_S = 1.0
INFLIGHT_TTL_S = 5

AFFINITY_MAX = 10_000
# A job's calls stay on their endpoint while it has at most this many more calls (running and
# waiting, over all processes) than the idlest endpoint, or half as many again, whichever is
# more: under steady load the endpoints' counts wander by more than a fixed few.
AFFINITY_MARGIN = 8
AFFINITY_RELATIVE_MARGIN = 0.5


# An endpoint that can serve a call, the model name to ask it for, and its catalogue entry.
Choice = tuple[Endpoint, str | None, ModelSpec | None]


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, TransientInferenceError)


class Pool:
    def __init__(self, endpoints: Sequence[str] | None = None, settings: Settings | None = None,
                 admission: Admission | None = None):
        self.settings = settings or get_settings()
        if endpoints is not None and not self.settings.models \
                and self.settings.models_file is None:
            self.catalogue = Catalogue([ModelSpec(endpoints=list(endpoints))],
                                       self.settings.endpoint_max_in_flight)
        else:
            self.catalogue = load_catalogue(self.settings)
        urls = self.catalogue.endpoints
        if not urls:
            raise PoolUnavailable("no pool endpoints are configured (AGENTQ_POOL_ENDPOINTS)")
        declared = {k.rstrip("/"): v for k, v in self.settings.endpoint_watts.items()}
        self.endpoints = [Endpoint(u, cap=self.catalogue.cap(u), watts=endpoint_watts(u, declared))
                          for u in urls]
        self._by_url = {e.base_url: e for e in self.endpoints}
        self._nvml: NvmlPower | None = None
        if self.settings.energy_nvml and any(is_local(e.base_url) and e.watts is None
                                             for e in self.endpoints):
            try:
                self._nvml = NvmlPower()
            except ImportError:
                log.info("nvidia-ml-py is not installed: energy is known only where declared")
            except Exception as exc:  # noqa: BLE001 - no driver, no GPU: energy stays unknown
                log.info("NVML power readings unavailable: %s", exc)
        self._admission = admission
        if admission is None and self.settings.pool_admission:
            from core.redis import get_redis

            self._admission = Admission(
                get_redis(), lease_s=self.settings.request_timeout_s + 60,
                aging_tokens_per_s=self.settings.admission_aging_tokens_per_s,
                quantum_tokens=self.settings.admission_quantum_tokens,
                level_growth=self.settings.admission_level_growth)
        self._lock = threading.Lock()
        self._affinity: OrderedDict[str, str] = OrderedDict()
        self._turn = 0
        timeout = httpx.Timeout(self.settings.request_timeout_s,
                                connect=self.settings.connect_timeout_s)
        limits = httpx.Limits(max_connections=512, max_keepalive_connections=256)
        self._http = httpx.Client(timeout=timeout, limits=limits, follow_redirects=False)
        self._meter = PromptMeter(self._http, self.settings.connect_timeout_s + 5)
        self._reporter: threading.Thread | None = None
        self._closed = threading.Event()

    def close(self) -> None:
        self._closed.set()
        self._http.close()

    def in_flight(self) -> dict[str, int]:
        with self._lock:
            return {e.base_url: e.in_flight for e in self.endpoints}

    def breaker_states(self) -> dict[str, str]:
        with self._lock:
            return {e.base_url: e.state for e in self.endpoints}

    def _start_reporter(self) -> None:
        if self._reporter is not None:
            return
        with self._lock:
            if self._reporter is None:
                self._reporter = threading.Thread(target=self._report, name="agentq-pool-report",
                                                  daemon=True)
                self._reporter.start()

    def _report(self) -> None:
        from core.redis import get_redis

        key = f"{INFLIGHT_KEY_PREFIX}{socket.gethostname()}:{os.getpid()}"
        while not self._closed.wait(INFLIGHT_REPORT_S):
            try:
                pipe = get_redis().pipeline(transaction=False)
                pipe.hset(key, mapping=self.in_flight())
                pipe.expire(key, INFLIGHT_TTL_S)
                pipe.execute()
            except Exception as exc:  # noqa: BLE001 - metrics must never break model calls
                log.debug("could not publish in-flight counts: %s", exc)

    # -- discovery --------------------------------------------------------------------------

    def _models_of(self, ep: Endpoint) -> list[str]:
        if not ep.models:
            resp = self._http.get(f"{ep.base_url}/v1/models",
                                  timeout=self.settings.connect_timeout_s)
            resp.raise_for_status()
            try:
                ep.models = [str(m["id"]) for m in resp.json()["data"]]
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"unexpected /v1/models answer: {exc!r}") from exc
        return ep.models

    def check(self) -> list[dict[str, Any]]:
        """Ask every endpoint which models it serves; used by readiness checks."""
        out = []
        for ep in self.endpoints:
            try:
                ep.models = []
                out.append({"endpoint": ep.base_url, "ok": True, "models": self._models_of(ep),
                            "breaker": ep.state})
            except (httpx.HTTPError, ValueError) as exc:
                out.append({"endpoint": ep.base_url, "ok": False, "error": str(exc),
                            "breaker": ep.state})
        return out

    # -- routing ----------------------------------------------------------------------------

    def _candidates(self, call: CallSpec) -> list[Choice]:
        """Endpoints that can serve the call, each with the model name to ask for and its
        catalogue entry."""
        wanted = call.model
        if wanted is not None:
            spec = self.catalogue.spec(wanted)
            if spec is not None:
                return [(self._by_url[u], wanted, spec) for u in spec.endpoints]
            serving = [e for e in self.endpoints if not e.models or wanted in e.models]
            return [(e, wanted, None) for e in serving or self.endpoints]
        out: dict[str, Choice] = {}
        for spec in self.catalogue.for_size(call.size):
            for u in spec.endpoints:
                out.setdefault(u, (self._by_url[u], spec.name, spec))
        return list(out.values())

    def prompt_size(self, call: CallSpec) -> PromptSize:
        """The call's prompt tokens on whichever model of the catalogue may take it (in the
        shape that model takes it): counted by its server where it can, else bounded; and
        that model's context."""
        now = time.monotonic()
        options = [(e.base_url, name, spec) for e, name, spec in self._candidates(call)
                   if e.available(now)] or \
            [(e.base_url, name, spec) for e, name, spec in self._candidates(call)]
        return self._meter.size(call, options, self._model_names)

    def _model_names(self, url: str) -> list[str]:
        return self._models_of(self._by_url[url])

    def prune_admission(self) -> int | None:
        """The sweepers' pass over admission's per-job state (`Admission.prune`): each
        endpoint once an hour over every process. None when admission is off or Redis did not
        answer (the other sweeps go on; the next pass tries again)."""
        if self._admission is None:
            return None
        try:
            return self._admission.prune([e.base_url for e in self.endpoints], every_s=3600.0)
        except redis.RedisError as exc:
            log.debug("could not prune admission's state: %s", exc)
            return None

    def _loads(self, urls: list[str]) -> dict[str, int]:
        """Calls running and waiting at each endpoint: over every process when admission is
        shared through Redis, else this process's own count."""
        if self.settings.pool_routing == "round_robin":
            return {}
        if self._admission is not None and len(urls) > 1:
            try:
                return {u: r + w for u, (r, w) in self._admission.loads(urls).items()}
            except Exception as exc:  # noqa: BLE001 - fall back to this process's counters
                log.debug("could not read endpoint loads: %s", exc)
        with self._lock:
            return {u: self._by_url[u].in_flight for u in urls}

    def _pick(self, req: CompletionRequest, avoid: set[str]) -> Choice:
        options = self._candidates(req.call)
        fresh = [o for o in options if o[0].base_url not in avoid] or options
        loads = self._loads([o[0].base_url for o in fresh])
        now = time.monotonic()
        with self._lock:
            usable = [o for o in fresh if o[0].available(now)]
            if not usable:
                usable = [o for o in options if o[0].available(now)]
            if not usable:
                wait = min(o[0].open_until for o in options) - now
                raise TransientInferenceError(
                    f"no pool endpoint is available: all {len(options)} are failing (circuit "
                    f"open; next probe in {max(wait, 0):.0f} s)", code="pool_unavailable")
            idlest = min(usable, key=lambda o: loads.get(o[0].base_url, 0))
            chosen = idlest
            routing = self.settings.pool_routing
            if routing == "round_robin":
                self._turn += 1
                chosen = usable[self._turn % len(usable)]
            elif routing == "affinity" and req.affinity_key is not None:
                preferred = self._affinity.get(req.affinity_key)
                least = loads.get(idlest[0].base_url, 0)
                margin = max(AFFINITY_MARGIN, least * AFFINITY_RELATIVE_MARGIN)
                home = next((o for o in usable if o[0].base_url == preferred), None)
                if home is not None and loads.get(home[0].base_url, 0) <= least + margin:
                    chosen = home
                # A call that spills over leaves the job's home as it is (its prefix is cached
                # there); a job whose home is gone moves.
                if home is None:
                    self._affinity[req.affinity_key] = chosen[0].base_url
                self._affinity.move_to_end(req.affinity_key)
                while len(self._affinity) > AFFINITY_MAX:
                    self._affinity.popitem(last=False)
            ep = chosen[0]
            if ep.state == "open":
                ep.state = "half_open"  # this call is the probe
            ep.in_flight += 1
            return chosen

    def _start(self, ep: Endpoint) -> tuple[float, float]:
        with self._lock:
            now = time.monotonic()
            share = ep.advance(now)
            ep.running += 1
            return share, now

    def _finish(self, ep: Endpoint) -> tuple[float, float]:
        """The endpoint's busy-share integral and the clock reading it was brought up to."""
        with self._lock:
            now = time.monotonic()
            share = ep.advance(now)
            ep.running -= 1
            return share, now

    def _energy(self, ep: Endpoint, share_s: float) -> tuple[float | None, str | None]:
        if ep.watts is not None:
            return ep.watts * share_s / 3600.0, "declared_watts"
        if self._nvml is not None and is_local(ep.base_url):
            try:
                return self._nvml.watts() * share_s / 3600.0, "nvml"
            except Exception as exc:  # noqa: BLE001 - a failed reading leaves energy unknown
                log.warning("NVML power reading failed: %s", exc)
        return None, None

    def _release(self, ep: Endpoint, outcome: str) -> None:
        """`outcome`: "ok" (the endpoint answered, even if it refused the request), "failed"
        (a transient failure: the endpoint's fault), "down" (nothing accepted the connection)
        or "neutral" (the caller gave up)."""
        with self._lock:
            ep.in_flight -= 1
            change = ep.settle(outcome, self.settings.breaker_fail_max,
                               self.settings.breaker_reset_s)
            if change == "open":
                log.warning("endpoint %s: circuit open for %.0f s after %d failure(s)",
                            ep.base_url, ep.pause_s, ep.failures)
            elif change == "closed":
                log.info("endpoint %s: circuit closed", ep.base_url)

    @contextmanager
    def _admitted(self, ep: Endpoint, req: CompletionRequest) -> Iterator[Slot | None]:
        if self._admission is None:
            yield None
            return
        try:
            with self._admission.slot(ep.base_url, ep.cap, req.tenant_id or "",
                                      req.job_id or req.affinity_key or "",
                                      self.settings.admission_timeout_s, req.cancelled,
                                      tier=req.service_tier) as slot:
                yield slot
        except AdmissionTimeout as exc:
            raise TransientInferenceError(f"{ep.base_url}: {exc}",
                                          code="admission_timeout") from exc
        except AdmissionCancelled as exc:
            raise CallCancelled("cancelled while waiting for a slot", endpoint=ep.base_url
                                ) from exc

    # -- calls ------------------------------------------------------------------------------

    def _attempt(self, req: CompletionRequest, avoid: set[str]) -> Completion:
        ep, spec_model, spec = self._pick(req, avoid)
        outcome = "ok"
        try:
            try:
                models = self._models_of(ep)
            except httpx.HTTPStatusError as exc:
                transient = exc.response.status_code == 429 or exc.response.status_code >= 500
                outcome = "failed" if transient else "ok"
                cls = TransientInferenceError if transient else InferenceError
                raise cls(f"endpoint {ep.base_url} did not list its models: {exc}") from exc
            except httpx.ConnectError as exc:
                outcome = "down"  # nothing listens there: open the circuit at once
                raise TransientInferenceError(
                    f"endpoint {ep.base_url} did not list its models: {exc}") from exc
            except (httpx.HTTPError, ValueError) as exc:
                outcome = "failed"
                raise TransientInferenceError(
                    f"endpoint {ep.base_url} did not list its models: {exc}") from exc
            model = req.call.model or spec_model or (models[0] if models else None)
            if model is None:
                raise InferenceError(f"endpoint {ep.base_url} serves no model")
            shape = shape_of(req.call, spec)
            queued = time.monotonic()
            with self._admitted(ep, req) as slot:
                if req.cancelled is not None and req.cancelled():
                    raise CallCancelled("cancelled before it was sent", endpoint=ep.base_url)
                share_start, started = self._start(ep)
                try:
                    result = send(self._http, req, ep.base_url, model, shape, started)
                    if slot is not None:
                        slot.served_tokens = result.usage.total_tokens
                finally:
                    # Latency and energy cover the same interval, read under the same lock.
                    share_end, ended = self._finish(ep)
            # The busy-time share counted over every process (admission's, over the time the
            # slot was held, in whole milliseconds), else over this process's own calls
            # (admission off, or Redis away); never more than the call's own duration.
            share = slot.busy_share_s if slot is not None else None
            if share is None:
                share = share_end - share_start
            energy_wh, method = self._energy(ep, min(share, ended - started))
            return Completion(**{**result.__dict__, "latency_ms": (ended - started) * 1000,
                                 "energy_wh": energy_wh, "energy_method": method,
                                 "queued_ms": (started - queued) * 1000})
        except CallCancelled as exc:
            outcome = "neutral"
            if exc.sent and exc.usage is None and model is not None:
                # The server took the request and may have read its prompt: count it as
                # sent, for the ledger (`orchestrator.metering`).
                exc.prompt_tokens = self._meter.count_sent(
                    ep.base_url, *build(req.call, model, req.max_tokens, shape))
            raise
        except TransientInferenceError as exc:
            if outcome == "ok":
                outcome = "down" if isinstance(exc.__cause__, httpx.ConnectError) else "failed"
            raise
        finally:
            avoid.add(ep.base_url)
            self._release(ep, outcome)

    def complete(self, req: CompletionRequest) -> Completion:
        if req.max_tokens < 1:
            raise InferenceError("max_tokens must be at least 1", code="invalid_max_tokens")
        self._start_reporter()
        avoid: set[str] = set()
        attempts = 0

        def _log_retry(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.warning("model call %s failed (attempt %d), retrying: %s",
                        req.request_id, state.attempt_number, exc)

        retrying = Retrying(
            retry=retry_if_exception(_is_transient),
            stop=stop_after_attempt(self.settings.retry_max_attempts)
            | stop_after_delay(self.settings.retry_max_seconds),
            wait=wait_exponential_jitter(multiplier=0.5, max=8.0, jitter=0.5),
            before_sleep=_log_retry,
            reraise=True,
        )
        for attempt in retrying:
            with attempt:
                attempts += 1
                if len(avoid) >= len(self.endpoints):
                    avoid.clear()
                result = self._attempt(req, avoid)
        if attempts > 1:
            result = Completion(**{**result.__dict__, "attempts": attempts})
        return result


_pool: Pool | None = None
_pool_lock = threading.Lock()


def get_pool() -> Pool:
    """The process-wide pool (one HTTP connection pool shared by every worker thread)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = Pool()
        return _pool
