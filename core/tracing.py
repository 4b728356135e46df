"""OpenTelemetry traces, configured by the standard `OTEL_*` variables.

Tracing is on when an exporter is configured: `OTEL_EXPORTER_OTLP_ENDPOINT` (or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) or `OTEL_TRACES_EXPORTER` (`otlp`, `console`), and
`OTEL_SDK_DISABLED` is not `true` nor `OTEL_TRACES_EXPORTER` `none`. Spans are exported in
batches (`OTEL_BSP_*`) over OTLP/HTTP with protobuf; the exporter reads its own variables
(`OTEL_EXPORTER_OTLP_HEADERS`, `..._TIMEOUT`, `..._COMPRESSION`, `..._CERTIFICATE`),
`OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` describe the process (`agentq` by default),
and `OTEL_TRACES_SAMPLER` samples. With none of it, no tracer provider is set up and every
function here returns at once.

Contexts travel as W3C `traceparent` strings: on the job row (the job's span, see
`orchestrator.traces`) and in the headers of Celery messages (the span that sent them).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

TRACEPARENT = "traceparent"
_propagator = TraceContextTextMapPropagator()
_lock = threading.Lock()
_on: bool | None = None
_tracer: trace.Tracer | None = None
# Ids a span must take (a span recorded in another process than the one that named it).
_forced_ids: ContextVar[tuple[int, int] | None] = ContextVar("agentq_forced_ids", default=None)

Attributes = Mapping[str, Any]


def exporters(env: Mapping[str, str] | None = None) -> list[str]:
    """The trace exporters the environment asks for; empty when tracing is off."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    named = [e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "").split(",")
             if e.strip()]
    if "none" in named:
        return []
    if named:
        return named
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or \
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    return ["otlp"] if endpoint else []


def enabled() -> bool:
    """Whether spans are recorded in this process (set up on the first call)."""
    on = _on
    if on is None:
        on = _setup()
    return on


def _setup() -> bool:
    global _on, _tracer
    with _lock:
        if _on is not None:
            return _on
        names = exporters()
        if names:
            _tracer = _provider(names).get_tracer("agentq")
        _on = _tracer is not None
        return _on


def _provider(names: Sequence[str]) -> trace.TracerProvider:
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class _Ids(RandomIdGenerator):
        def generate_span_id(self) -> int:
            forced = _forced_ids.get()
            return forced[1] if forced else super().generate_span_id()

        def generate_trace_id(self) -> int:
            forced = _forced_ids.get()
            return forced[0] if forced else super().generate_trace_id()

    resource = Resource.create({"process.pid": os.getpid()})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "agentq"}))
    provider = TracerProvider(resource=resource, id_generator=_Ids())
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or \
        os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
    for name in names:
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            if protocol != "http/protobuf":
                log.warning("OTLP protocol %r is not supported; exporting traces over "
                            "http/protobuf", protocol)
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        elif name == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        else:
            log.warning("OTEL_TRACES_EXPORTER %r is not supported (otlp, console, none)", name)
    trace.set_tracer_provider(provider)
    log.info("tracing on: exporting spans to %s", ", ".join(names))
    return provider


def _get_tracer() -> trace.Tracer:
    assert _tracer is not None
    return _tracer


# -- contexts ---------------------------------------------------------------------------------

def traceparent_of(ctx: SpanContext) -> str:
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def parse(traceparent: str | None) -> SpanContext | None:
    """The span context a traceparent names; None when there is none or it is malformed."""
    if not traceparent:
        return None
    ctx = trace.get_current_span(_propagator.extract({TRACEPARENT: traceparent})
                                 ).get_span_context()
    return ctx if ctx.is_valid else None


def _context_of(traceparent: str | None) -> Context:
    return _propagator.extract({TRACEPARENT: traceparent}) if traceparent else Context()


def current_traceparent() -> str | None:
    """The traceparent of the current span (to send along, or link to); None when off."""
    if not enabled():
        return None
    ctx = trace.get_current_span().get_span_context()
    return traceparent_of(ctx) if ctx.is_valid else None


def message_headers() -> dict[str, str] | None:
    """Headers that carry the current span's context in a message; None when there is none."""
    found = current_traceparent()
    return {TRACEPARENT: found} if found else None


def new_root(name: str) -> str | None:
    """A new trace: the traceparent of its root span, which is recorded later, perhaps in
    another process (`record`). None when tracing is off."""
    if not enabled():
        return None
    span = _get_tracer().start_span(name, context=Context())  # never ended: not exported
    return traceparent_of(span.get_span_context())


# -- spans ------------------------------------------------------------------------------------

def _links(traceparents: Sequence[str | None]) -> list[Link]:
    return [Link(ctx) for ctx in (parse(t) for t in traceparents) if ctx is not None]


@contextmanager
def span(name: str, attributes: Attributes | None = None, *, parent: str | None = None,
         kind: SpanKind = SpanKind.INTERNAL, start_ns: int | None = None,
         links: Sequence[str | None] = ()) -> Iterator[Span | None]:
    """A span, current while the block runs: under `parent` (a traceparent) when given, else
    under the current span. An exception leaving the block is recorded on it. Yields None
    (and costs nothing) when tracing is off."""
    if not enabled():
        yield None
        return
    context = _context_of(parent) if parent else None
    with _get_tracer().start_as_current_span(
            name, context=context, kind=kind, attributes=attributes, start_time=start_ns,
            links=_links(links)) as current:
        yield current


@contextmanager
def open_span(name: str, *, parent: str | None = None) -> Iterator[Span | None]:
    """A span under `parent` (a traceparent), current while the block runs and left open:
    the caller ends it (`Span.end`) to record it, or leaves it, and nothing is recorded (a
    span never ended is never exported). Yields None when tracing is off."""
    if not enabled():
        yield None
        return
    made = _get_tracer().start_span(name, context=_context_of(parent) if parent else None)
    with trace.use_span(made, end_on_exit=False):
        yield made


def start(name: str, attributes: Attributes | None = None, *, parent: str | None = None,
          kind: SpanKind = SpanKind.INTERNAL, start_ns: int | None = None) -> Span | None:
    """A span that the caller ends (`Span.end`); under the current span unless `parent`."""
    if not enabled():
        return None
    context = _context_of(parent) if parent else None
    return _get_tracer().start_span(name, context=context, kind=kind, attributes=attributes,
                                    start_time=start_ns)


def record(traceparent: str, name: str, start_ns: int, end_ns: int,
           attributes: Attributes | None = None, *, parent: str | None = None,
           error: str | None = None, kind: SpanKind = SpanKind.INTERNAL) -> None:
    """Record the span that `traceparent` names (made by `new_root`, maybe elsewhere), with
    its own trace and span ids, from `start_ns` to `end_ns`. Nothing when it was not sampled
    or tracing is off."""
    ctx = parse(traceparent) if enabled() else None
    if ctx is None or not ctx.trace_flags.sampled:
        return
    token = _forced_ids.set((ctx.trace_id, ctx.span_id))
    try:
        made = _get_tracer().start_span(name, context=_context_of(parent), kind=kind,
                                        attributes=attributes, start_time=start_ns)
    finally:
        _forced_ids.reset(token)
    if error is not None:
        made.set_status(Status(StatusCode.ERROR, error))
    made.end(end_time=max(start_ns, end_ns))


def record_child(parent: str, name: str, start_ns: int, end_ns: int,
                 attributes: Attributes | None = None, error: str | None = None) -> None:
    """Record a finished span under `parent` (a traceparent)."""
    made = start(name, attributes, parent=parent, start_ns=start_ns)
    if made is None:
        return
    if error is not None:
        made.set_status(Status(StatusCode.ERROR, error))
    made.end(end_time=max(start_ns, end_ns))


def fail(current: Span | None, message: str) -> None:
    """Mark a span failed (nothing when it is None)."""
    if current is not None:
        current.set_status(Status(StatusCode.ERROR, message[:500]))


def now_ns() -> int:
    return time.time_ns()

