"""Spans exported by the real OpenTelemetry SDK over OTLP/HTTP reach a monitor on a real port
and aggregate into the right percentiles (checked against the known synthetic span set)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from orbion_monitor.app import build_app
from orbion_monitor.settings import Settings
from orbion_monitor.state import Monitor

ServeFactory = Callable[..., Any]  # the `serve` fixture of conftest.py
MS = 1_000_000
PROPAGATOR = TraceContextTextMapPropagator()


def export_messages(endpoint: str, llm_ms: list[int], t0: int) -> list[str]:
    """Each service its own SDK provider and exporter, as in production; trace context crosses
    "services" in W3C headers as it does in NATS headers. Returns the trace ids (hex)."""
    providers = {}
    for service in ("gateway", "conversation", "llm-proxy"):
        provider = TracerProvider(resource=Resource.create({"service.name": f"orbion-{service}"}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, timeout=5)))
        providers[service] = provider
    gw, conv, llm = (providers[s].get_tracer("test") for s in ("gateway", "conversation", "llm-proxy"))
    trace_ids = []
    for i, llm_duration in enumerate(llm_ms):
        start = t0 + i * 10_000 * MS
        webhook = gw.start_span("POST /webhooks/whatsapp", kind=SpanKind.SERVER, start_time=start)
        trace_ids.append(f"{webhook.get_span_context().trace_id:032x}")
        headers: dict[str, str] = {}
        publish = gw.start_span("publish MessageReceived", set_span_in_context(webhook), SpanKind.PRODUCER,
                                start_time=start + 1 * MS)  # fmt: skip
        PROPAGATOR.inject(headers, set_span_in_context(publish))
        publish.end(start + 3 * MS)
        webhook.end(start + 5 * MS)
        # 5 ms in JetStream, then the conversation service handles it for 20 ms.
        process = conv.start_span("process MessageReceived", PROPAGATOR.extract(headers), SpanKind.CONSUMER,
                                  start_time=start + 10 * MS)  # fmt: skip
        relay_headers: dict[str, str] = {}
        PROPAGATOR.inject(relay_headers, set_span_in_context(process))
        process.end(start + 30 * MS)
        # 5 ms more in JetStream, then the llm-proxy: the OpenAI call, then the WhatsApp send (100 ms).
        parent = PROPAGATOR.extract(relay_headers)
        handler = llm.start_span(
            "process ReplyRequested", parent, SpanKind.CONSUMER, start_time=start + 35 * MS
        )
        inner = set_span_in_context(handler)
        call = llm.start_span("openai chat", inner, SpanKind.CLIENT, start_time=start + 35 * MS,
                              attributes={"orbion.stage": "llm"})  # fmt: skip
        call.end(start + (35 + llm_duration) * MS)
        t_send = start + (35 + llm_duration) * MS
        send = llm.start_span("whatsapp send", inner, SpanKind.CLIENT, start_time=t_send,
                              attributes={"orbion.stage": "send"})  # fmt: skip
        send.end(start + (135 + llm_duration) * MS)
        handler.end(start + (136 + llm_duration) * MS)
    for provider in providers.values():
        provider.force_flush(10_000)
        provider.shutdown()
    return trace_ids


def exact_quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


async def test_sdk_exports_aggregate_into_the_right_percentiles_and_full_traces(
    make_settings: Callable[..., Settings], serve: ServeFactory
) -> None:
    settings = make_settings(monitor_targets={})
    llm_ms = [100 + (i * 37) % 1900 for i in range(60)]
    async with httpx.AsyncClient() as outbound:
        monitor = Monitor(settings, outbound)
        async with serve(build_app(settings, monitor), settings) as url:
            trace_ids = await asyncio.to_thread(
                export_messages, f"{url}/v1/traces", llm_ms, 1_700_000_000 * 10**9
            )
            api = (await outbound.get(f"{url}/api/metrics")).json()
            detail = (await outbound.get(f"{url}/api/traces/{trace_ids[0]}")).json()
            slowest = (await outbound.get(f"{url}/api/traces/recent?slowest=1")).json()["traces"][0]
        await monitor.stop()

    assert api["spans"]["spans_total"] == 60 * 6
    assert api["spans"]["spans_rejected_total"] == 0
    assert api["messages"]["processed_total"] == 60
    e2e = [(135 + ms) / 1000 for ms in llm_ms]  # webhook start -> send end
    for q in ("p50", "p95", "p99"):
        assert api["end_to_end"][q] == pytest.approx(exact_quantile(e2e, int(q[1:]) / 100), rel=0.021)
    llm_op = next(r for r in api["operations"] if r["operation"] == "openai chat")
    assert llm_op["service"] == "llm-proxy" and llm_op["count"] == 60
    assert llm_op["p50"] == pytest.approx(exact_quantile([ms / 1000 for ms in llm_ms], 0.5), rel=0.021)

    # One message's trace covers gateway -> conversation -> llm-proxy -> send.
    assert detail["complete"] is True
    assert detail["services"] == ["conversation", "gateway", "llm-proxy"]
    assert detail["end_to_end_seconds"] == pytest.approx(e2e[0])
    stages = detail["stages"]
    assert stages["gateway"] == pytest.approx(0.005)
    assert stages["queue"] == pytest.approx(0.010)
    assert stages["conversation"] == pytest.approx(0.020)
    assert stages["llm"] == pytest.approx(llm_ms[0] / 1000)
    assert stages["send"] == pytest.approx(0.100)
    assert slowest["end_to_end_seconds"] == pytest.approx(max(e2e))
