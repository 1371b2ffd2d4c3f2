"""OpenTelemetry tracing for every ORBION process, and W3C trace context for NATS headers.

Owns the process-wide tracer provider (resource ``service.name = orbion-<service>``), the
OTLP/HTTP span exporter when ``ORBION_OTLP_ENDPOINT`` is set (the monitor's ``/v1/traces`` or
a collector), and the official asyncpg/redis instrumentations. FastAPI is instrumented per app
by ``service.create_service_app``; the bus calls :func:`inject_context` / :func:`extract_context`
so that one trace follows a message across services. Handlers never create spans themselves.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
from collections.abc import Coroutine, Iterable, Mapping
from typing import Any, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from orbion_common.settings import CommonSettings

__all__ = [
    "add_span_processor",
    "background_task",
    "extract_context",
    "inject_context",
    "setup_telemetry",
    "shutdown_telemetry",
    "tracer",
    "tracer_provider",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

_lock = threading.Lock()
_provider: TracerProvider | None = None
_endpoints: set[str] = set()


def _instrument_libraries() -> None:
    # The instrumentors patch asyncpg.Connection and redis client classes once per process;
    # they warn when asked twice, so ask only once.
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    for instrumentor in (AsyncPGInstrumentor(), RedisInstrumentor()):  # type: ignore[no-untyped-call]
        if not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument()


def setup_telemetry(service: str, settings: CommonSettings) -> None:
    """Install the tracer provider for this process (idempotent).

    The first call fixes the resource (``service.name = "orbion-<service>"``): OpenTelemetry
    allows one global provider per process. Each call with an ``otlp_endpoint`` not seen before
    adds a batching OTLP/HTTP exporter to it (``otlp_endpoint`` is the full traces URL, e.g.
    ``http://127.0.0.1:8084/v1/traces``). Without an endpoint spans are still created (trace ids
    appear in logs and in NATS headers) but not exported.
    """
    global _provider
    with _lock:
        if _provider is None:
            resource = Resource.create({SERVICE_NAME: f"orbion-{service}", "orbion.service": service})
            # Parent-based: a message's trace is sampled (or not) once, at the gateway, and every
            # service follows that decision, so sampled traces stay whole.
            sampler = ParentBased(TraceIdRatioBased(settings.trace_sample_ratio))
            provider = TracerProvider(resource=resource, sampler=sampler)
            trace.set_tracer_provider(provider)
            # set_tracer_provider refuses to replace a provider installed by someone else
            # (e.g. opentelemetry-instrument); keep using theirs rather than a dead one.
            current = trace.get_tracer_provider()
            _provider = current if isinstance(current, TracerProvider) else provider
            _instrument_libraries()
        endpoint = settings.otlp_endpoint.strip()
        if endpoint and endpoint not in _endpoints:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, timeout=5)))
            _endpoints.add(endpoint)
            log.info("exporting traces over OTLP/HTTP", extra={"otlp_endpoint": endpoint})


def tracer_provider() -> TracerProvider | None:
    """The SDK provider installed by :func:`setup_telemetry`, or None before it ran."""
    return _provider


def add_span_processor(processor: SpanProcessor) -> None:
    """Attach another span processor (e.g. a test's in-memory exporter) to the provider."""
    if _provider is None:
        raise RuntimeError("setup_telemetry() has not run")
    _provider.add_span_processor(processor)


def shutdown_telemetry() -> None:
    """Flush pending spans (bounded wait) before the process exits. Safe to call repeatedly."""
    if _provider is not None:
        _provider.force_flush(timeout_millis=5000)


def tracer(name: str) -> trace.Tracer:
    """A tracer from the global provider (a no-op one until :func:`setup_telemetry` runs)."""
    return trace.get_tracer(name)


def inject_context(headers: dict[str, str]) -> dict[str, str]:
    """Add the current trace context (``traceparent``/``tracestate``) to ``headers``; returns it."""
    propagate.inject(headers)
    return headers


def extract_context(headers: Mapping[str, str] | None) -> otel_context.Context:
    """The trace context carried in ``headers`` (a fresh root context when there is none).

    Use as ``tracer(...).start_as_current_span(name, context=extract_context(msg.headers))``.
    """
    return propagate.extract(dict(headers) if headers else {})


def background_task(coro: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
    """Run a service's background loop (a relay, a scheduler, a flusher) as a task whose
    libraries' spans (SQL, Redis) are off.

    Its statements belong to no one message: traced, each would start a trace of its own (one
    in ten recorded and exported as noise), or join whatever trace the task was started from
    for as long as it runs. The loop's own spans are unaffected, and work it does for one
    message runs in that message's context (e.g. ``otel_context.attach`` of a handler's
    context, which carries the handler's own decision).
    """
    return asyncio.create_task(_untraced(coro), name=name, context=contextvars.Context())


async def finish_tasks(tasks: Iterable[asyncio.Task[Any] | None], *, grace: float = 5.0) -> None:
    """Wait up to ``grace`` seconds for stopped background loops to end, then cancel those
    still running; their errors are theirs to log. ``None`` stands for a loop never started."""
    started = [t for t in tasks if t is not None]
    pending = [t for t in started if not t.done()]
    if pending:
        _finished, late = await asyncio.wait(pending, timeout=grace)
        for task in late:
            task.cancel()
    await asyncio.gather(*started, return_exceptions=True)


async def _untraced(coro: Coroutine[Any, Any, T]) -> T:
    with suppress_instrumentation():
        return await coro
