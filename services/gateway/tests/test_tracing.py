"""A webhook's trace: the fast path's SERVER span, the bus's PRODUCER span, the NATS headers.

The spans are made by hand on the hot path (no ``start_as_current_span``), and the bus skips
the producer span under a parent that is not sampled: these tests pin what must not change
for the monitor and for the consumers that continue the trace.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from gateway_testkit import Gateway, new_phone, text_webhook
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags

from orbion_common import telemetry
from orbion_common.events import MessageReceived
from orbion_common.settings import CommonSettings
from orbion_gateway import cloud_api
from orbion_gateway.inbound import to_events


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    telemetry.setup_telemetry("gateway", CommonSettings())  # every trace sampled (the root conftest sets it)
    exporter = InMemorySpanExporter()
    telemetry.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()  # processors cannot be removed; a shut-down exporter stops keeping spans


async def last_headers(gateway: Gateway) -> dict[str, str]:
    info = await gateway.bus.js.stream_info(gateway.settings.stream_name)
    msg = await gateway.bus.js.get_msg(gateway.settings.stream_name, info.state.last_seq)
    assert msg.headers is not None
    return dict(msg.headers)


def traceparent(span_context: SpanContext) -> str:
    return f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-{span_context.trace_flags:02x}"


async def test_a_webhook_is_a_server_span_with_a_producer_child_whose_context_rides_in_nats(
    gateway: Gateway, spans: InMemorySpanExporter
) -> None:
    spans.clear()
    assert (await gateway.post_cloud(text_webhook(new_phone()))).status_code == 200
    [server] = [s for s in spans.get_finished_spans() if s.name == "POST /webhooks/whatsapp"]
    [producer] = [s for s in spans.get_finished_spans() if s.name == "publish MessageReceived"]
    assert server.kind == SpanKind.SERVER and server.parent is None
    assert server.attributes is not None
    assert server.attributes["orbion.stage"] == "gateway"
    assert server.attributes["http.response.status_code"] == 200
    assert producer.kind == SpanKind.PRODUCER
    assert producer.parent is not None and producer.parent.span_id == server.context.span_id
    assert producer.attributes is not None
    assert producer.attributes["messaging.system"] == "nats"
    assert producer.attributes["orbion.event_type"] == "MessageReceived"
    assert (await last_headers(gateway))["traceparent"] == traceparent(producer.context)


async def test_an_unsampled_parent_gets_no_producer_span_and_passes_its_decision_on(
    gateway: Gateway, spans: InMemorySpanExporter
) -> None:
    body = text_webhook(new_phone())
    parsed = cloud_api.parse(body)
    [event], [msg_id] = to_events(parsed)
    assert isinstance(event, MessageReceived)
    parent = SpanContext(0x1234, 0x5678, is_remote=False, trace_flags=TraceFlags(TraceFlags.DEFAULT))
    spans.clear()
    with trace.use_span(NonRecordingSpan(parent)):
        assert await gateway.bus.publish(event, msg_id=msg_id)
    assert spans.get_finished_spans() == ()
    # The consumers see the same trace id and the same "not sampled" decision.
    assert (await last_headers(gateway))["traceparent"] == traceparent(parent)
