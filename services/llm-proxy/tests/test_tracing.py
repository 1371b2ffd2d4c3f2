"""Tracing of the send: the sender's ``whatsapp send`` span closes the message's trace.

The sender is a background task outside any trace; it must continue the trace context saved
with the reply (so the monitor sees webhook -> ... -> send as one trace) and carry what the
monitor reads: ``orbion.stage = "send"`` and the message's ``orbion.correlation_id``.
Spans are caught with an in-memory exporter; WhatsApp is the local fake.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import asyncpg
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from orbion_common import telemetry
from orbion_common.events import MessageSent
from orbion_common.settings import CommonSettings
from orbion_llm_proxy import store
from orbion_llm_proxy.deps import Deps
from tests.fakes.whatsapp import FakeWhatsApp

from .conftest import cloud_settings
from .helpers import build_deps, new_phone, reply_requested


@pytest.fixture(scope="module")
def exporter() -> Iterator[InMemorySpanExporter]:
    # Sample everything: a message's trace is whole or absent, and this one must be there.
    telemetry.setup_telemetry("llm-proxy", CommonSettings(trace_sample_ratio=1.0))
    spans = InMemorySpanExporter()
    telemetry.add_span_processor(SimpleSpanProcessor(spans))
    yield spans
    spans.shutdown()  # processors cannot be removed; a shut-down exporter stops keeping spans


async def _send_all(deps: Deps) -> None:
    """Drive the sender, outside any span as its background task is, until nothing is pending."""
    for _ in range(60):
        await deps.sender.drain()
        async with deps.pool.acquire() as conn:
            counts = await store.reply_counts(conn)
        if not counts.get("pending") and not counts.get("sending"):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"replies still pending: {counts}")


def _send_spans(exporter: InMemorySpanExporter, reply_key: str) -> list[ReadableSpan]:
    return [
        s
        for s in exporter.get_finished_spans()
        if s.name == "whatsapp send" and (s.attributes or {}).get("orbion.reply_key") == reply_key
    ]


async def test_whatsapp_send_continues_the_trace_saved_with_the_reply(
    pool: asyncpg.Pool, schema: str, urls: dict[str, str], tag: str, exporter: InMemorySpanExporter
) -> None:
    fake = FakeWhatsApp()
    async with fake as base_url:
        deps = build_deps(cloud_settings(urls, tag, base_url), pool, schema=schema)
        req = reply_requested(new_phone())
        # As the bus does: the handler runs in the consumer span that continues the message's trace.
        tracer = telemetry.tracer("test.llm_proxy")
        with tracer.start_as_current_span("process ReplyRequested", kind=SpanKind.CONSUMER) as handler:
            await deps.handlers.answer_reply_request(req)
        await _send_all(deps)
    handler_ctx = handler.get_span_context()
    async with pool.acquire() as conn:
        reply = await store.get_reply(conn, req.payload.reply_key)
    assert reply is not None and reply.trace_context is not None
    assert f"{handler_ctx.trace_id:032x}-{handler_ctx.span_id:016x}" in reply.trace_context["traceparent"]

    [send] = _send_spans(exporter, req.payload.reply_key)
    assert send.context is not None and send.parent is not None
    assert send.context.trace_id == handler_ctx.trace_id  # the same trace as the handler
    assert send.parent.span_id == handler_ctx.span_id  # started as a child of the stored context
    assert send.kind is SpanKind.CLIENT
    attributes = send.attributes or {}
    assert attributes["orbion.stage"] == "send"
    assert attributes["orbion.correlation_id"] == req.correlation_id
    assert attributes["orbion.send.via"] == "cloud_api"
    assert send.status.status_code is not StatusCode.ERROR
    # The span covers the accepted send, and its correlation id is the one MessageSent carries.
    [record] = fake.sent
    async with pool.acquire() as conn:
        sent = [s.event for s in await deps.events.load_stream(conn, req.stream_id)]
    [message_sent] = [e for e in sent if isinstance(e, MessageSent)]
    assert message_sent.payload.provider_message_id == record["id"]
    assert message_sent.correlation_id == attributes["orbion.correlation_id"]


async def test_a_reply_stored_without_trace_context_is_sent_in_a_new_trace_with_its_correlation_id(
    pool: asyncpg.Pool, schema: str, urls: dict[str, str], tag: str, exporter: InMemorySpanExporter
) -> None:
    fake = FakeWhatsApp()
    async with fake as base_url:
        deps = build_deps(cloud_settings(urls, tag, base_url), pool, schema=schema)
        req = reply_requested(new_phone())
        await deps.handlers.answer_reply_request(req)  # no current span: nothing to continue
        await _send_all(deps)
    [send] = _send_spans(exporter, req.payload.reply_key)
    assert send.parent is None  # a root: the monitor stitches it back by correlation id
    attributes = send.attributes or {}
    assert attributes["orbion.stage"] == "send"
    assert attributes["orbion.correlation_id"] == req.correlation_id
    assert len(fake.sent) == 1
