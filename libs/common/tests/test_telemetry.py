"""Tracing (orbion_common.telemetry): provider, OTLP export, NATS header propagation, FastAPI spans."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import asyncpg
import httpx
import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, StatusCode, TraceFlags

from orbion_common import telemetry
from orbion_common.logging import configure_logging
from orbion_common.service import create_service_app
from orbion_common.settings import CommonSettings


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    telemetry.setup_telemetry("test", CommonSettings())
    exporter = InMemorySpanExporter()
    telemetry.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()  # processors cannot be removed; a shut-down exporter stops keeping spans


class OtlpSink:
    """A tiny OTLP/HTTP receiver: stores every POSTed ExportTraceServiceRequest."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.paths: list[str] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                sink.paths.append(self.path)
                sink.requests.append(ExportTraceServiceRequest.FromString(body))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"


@pytest.fixture
def otlp_sink() -> Iterator[OtlpSink]:
    sink = OtlpSink()
    thread = threading.Thread(target=sink.server.serve_forever, daemon=True)
    thread.start()
    yield sink
    sink.server.shutdown()
    sink.server.server_close()


def test_setup_is_idempotent_and_installs_one_sdk_provider(spans: InMemorySpanExporter) -> None:
    provider = telemetry.tracer_provider()
    telemetry.setup_telemetry("test", CommonSettings())
    telemetry.setup_telemetry("other", CommonSettings())
    assert telemetry.tracer_provider() is provider
    assert isinstance(trace.get_tracer_provider(), TracerProvider)
    assert str(provider.resource.attributes["service.name"]).startswith("orbion-")  # type: ignore[union-attr]


def test_context_travels_through_headers(spans: InMemorySpanExporter) -> None:
    with telemetry.tracer("test").start_as_current_span("publish") as parent:
        headers = telemetry.inject_context({"Nats-Msg-Id": "abc"})
    assert headers["Nats-Msg-Id"] == "abc"
    assert format(parent.get_span_context().trace_id, "032x") in headers["traceparent"]

    # the consumer side, in "another process": a child of the publisher's span
    with telemetry.tracer("test").start_as_current_span(
        "process", context=telemetry.extract_context(headers)
    ) as child:
        assert child.get_span_context().trace_id == parent.get_span_context().trace_id
    exported = {s.name: s for s in spans.get_finished_spans()}
    assert exported["process"].parent is not None
    assert exported["process"].parent.span_id == parent.get_span_context().span_id


def test_no_headers_gives_a_new_root(spans: InMemorySpanExporter) -> None:
    with telemetry.tracer("test").start_as_current_span(
        "root", context=telemetry.extract_context(None)
    ) as span:
        assert span.get_span_context().is_valid
        assert getattr(span, "parent", None) is None


async def test_a_background_task_traces_none_of_its_statements_even_when_started_inside_a_sampled_trace(
    spans: InMemorySpanExporter, database_url: str
) -> None:
    # A relay or a flusher started from a handler would otherwise put every statement it runs,
    # for as long as it runs, into that one message's trace (and out of it, a trace each).
    sampled = SpanContext(0x5EED, 0xF00D, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)

    async def poll() -> None:
        async with pool.acquire() as conn:
            await conn.fetch("SELECT 1")

    def in_the_trace() -> list[str]:
        return [s.name for s in spans.get_finished_spans() if s.context.trace_id == sampled.trace_id]

    token = otel_context.attach(trace.set_span_in_context(NonRecordingSpan(sampled)))
    try:
        spans.clear()
        await asyncio.create_task(poll())
        assert in_the_trace(), "a plain task's statements join the trace it was started in"
        spans.clear()
        await telemetry.background_task(poll(), name="poll")
        assert in_the_trace() == []
    finally:
        otel_context.detach(token)
        await pool.close()


async def test_fastapi_requests_become_server_spans_except_probes(spans: InMemorySpanExporter) -> None:
    app = create_service_app("testsvc", CommonSettings())

    @app.get("/api/things/{thing_id}")
    async def thing(thing_id: str) -> dict[str, str]:
        return {"trace_id": format(trace.get_current_span().get_span_context().trace_id, "032x")}

    spans.clear()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        trace_id = (await c.get("/api/things/7")).json()["trace_id"]
        await c.get("/livez")
        await c.get("/readyz")
    names = [s.name for s in spans.get_finished_spans()]
    assert "GET /api/things/{thing_id}" in names
    assert trace_id != "0" * 32
    assert not any("livez" in n or "readyz" in n for n in names)


async def test_an_unhandled_error_is_logged_with_the_request_trace_id_and_marks_the_span(
    spans: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_service_app("testsvc", CommonSettings())

    @app.get("/api/fail")
    async def fail() -> None:
        raise RuntimeError("boom")

    spans.clear()
    root = logging.getLogger()
    saved = list(root.handlers)
    stream = io.StringIO()
    configure_logging("testsvc", CommonSettings(), stream=stream)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            assert (await c.get("/api/fail")).status_code == 500
    finally:
        root.handlers[:] = saved
    (span,) = [s for s in spans.get_finished_spans() if s.name == "GET /api/fail"]
    assert span.status.status_code is StatusCode.ERROR
    (line,) = [json.loads(x) for x in stream.getvalue().splitlines() if "unhandled error" in x]
    assert line["trace_id"] == format(span.context.trace_id, "032x")
    assert "RuntimeError: boom" in line["exc"]


async def test_extra_untraced_paths_make_no_spans(spans: InMemorySpanExporter) -> None:
    app = create_service_app("testsvc", CommonSettings(), untraced_paths=["/v1/traces"])

    @app.post("/v1/traces")
    async def receive() -> dict[str, str]:
        return {}

    @app.get("/api/x")
    async def other() -> dict[str, str]:
        return {}

    spans.clear()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        await c.post("/v1/traces")
        await c.get("/api/x")
    assert [s.name for s in spans.get_finished_spans()] == ["GET /api/x"]


def test_spans_are_exported_over_otlp_http(otlp_sink: OtlpSink) -> None:
    # A fresh process: the global provider can be installed only once per process.
    script = (
        "from orbion_common.settings import CommonSettings\n"
        "from orbion_common import telemetry\n"
        f"telemetry.setup_telemetry('gateway', CommonSettings(otlp_endpoint={otlp_sink.url!r}))\n"
        "with telemetry.tracer('t').start_as_current_span('webhook received'):\n"
        "    pass\n"
        "telemetry.shutdown_telemetry()\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    assert otlp_sink.paths == ["/v1/traces"]
    (request,) = otlp_sink.requests
    (resource_spans,) = request.resource_spans
    attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert attributes["service.name"] == "orbion-gateway"
    names = [span.name for scope in resource_spans.scope_spans for span in scope.spans]
    assert names == ["webhook received"]
