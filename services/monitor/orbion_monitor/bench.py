"""``orbion bench monitor``: spans ingested per second and resident memory after N spans.

Owns the synthetic message traces (also used by the tests): each is the 8 spans one WhatsApp
message makes across gateway, conversation, lead and llm-proxy, with known stage durations,
encoded as the OTLP protobuf or JSON an OpenTelemetry exporter sends. The benchmark feeds
export requests of ``--batch`` spans (512: the SDK's BatchSpanProcessor default) through the
same decode + aggregate path as ``POST /v1/traces`` and prints figures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import orjson
import psutil
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, Span, Status

from .aggregation import Aggregator
from .otlp import KIND_CLIENT, KIND_CONSUMER, KIND_PRODUCER, KIND_SERVER, decode_protobuf

MS = 1_000_000  # nanoseconds


@dataclass(frozen=True)
class FakeSpan:
    service: str
    name: str
    trace_id: bytes
    span_id: bytes
    parent_id: bytes
    start_ns: int
    end_ns: int
    kind: int = 1
    error: bool = False
    stage: str = ""
    correlation: str = ""


def message_trace(
    trace_id: bytes,
    start_ns: int,
    *,
    gateway_ms: float = 4,
    queue_ms: float = 2,
    conversation_ms: float = 15,
    llm_ms: float = 700,
    send_ms: float = 90,
    explicit_stages: bool = True,
    error: bool = False,
    relayed: bool = False,
) -> list[FakeSpan]:
    """The spans of one inbound message answered by the LLM. End to end is
    ``gateway + 2 * queue + conversation + llm + send`` milliseconds; the lead service's
    span runs beside the conversation and is off the critical path.

    ``relayed``: the conversation's ReplyRequested goes out through its outbox relay, which
    starts a new trace; the bus spans carry the message's correlation id (as
    ``orbion.correlation_id``) so the monitor can stitch the two traces back together."""
    rng = random.Random(trace_id)
    webhook, pub1, conv, pub2, lead, proc, llm, send = (rng.randbytes(8) for _ in range(8))
    # The relay's trace shares the first 8 bytes, so the benchmark can renew both with one replace.
    second = trace_id[:8] + rng.randbytes(8) if relayed else trace_id
    corr = trace_id.hex() if relayed else ""
    t = start_ns
    g, q, c, lm, s = (int(x * MS) for x in (gateway_ms, queue_ms, conversation_ms, llm_ms, send_ms))
    t_conv = t + g + q
    t_llm = t_conv + c + q
    stage = (lambda name: name) if explicit_stages else (lambda name: "")
    # fmt: off
    return [
        FakeSpan("gateway", "POST /webhooks/whatsapp", trace_id, webhook, b"", t, t + g, KIND_SERVER,
                 stage=stage("gateway")),
        FakeSpan("gateway", "publish MessageReceived", trace_id, pub1, webhook, t + g // 4, t + g * 3 // 4,
                 KIND_PRODUCER, correlation=corr),
        FakeSpan("conversation", "process MessageReceived", trace_id, conv, pub1, t_conv, t_conv + c,
                 KIND_CONSUMER, correlation=corr),
        FakeSpan("conversation", "publish ReplyRequested", second, pub2, b"" if relayed else conv,
                 t_conv + c // 2, t_conv + c * 3 // 4, KIND_PRODUCER, correlation=corr),
        FakeSpan("lead", "process MessageReceived", trace_id, lead, pub1, t_conv, t_conv + 3 * c,
                 KIND_CONSUMER),
        FakeSpan("llm-proxy", "process ReplyRequested", second, proc, pub2, t_llm, t_llm + lm + s,
                 KIND_CONSUMER, error=error, correlation=corr),
        FakeSpan("llm-proxy", "chat gpt-4o-mini", second, llm, proc, t_llm, t_llm + lm, KIND_CLIENT,
                 error=error, stage=stage("llm")),
        FakeSpan("llm-proxy", "whatsapp send", second, send, proc, t_llm + lm, t_llm + lm + s, KIND_CLIENT,
                 stage=stage("send")),
    ]
    # fmt: on


def _attr(key: str, value: str) -> KeyValue:
    return KeyValue(key=key, value=AnyValue(string_value=value))


def to_request(spans: Iterable[FakeSpan]) -> ExportTraceServiceRequest:
    """Group spans by service into one ExportTraceServiceRequest, as a collector would forward them."""
    by_service: dict[str, list[FakeSpan]] = {}
    for fake in spans:
        by_service.setdefault(fake.service, []).append(fake)
    request = ExportTraceServiceRequest()
    for service, group in by_service.items():
        rs: ResourceSpans = request.resource_spans.add()
        rs.resource.attributes.extend(
            [_attr("service.name", f"orbion-{service}"), _attr("orbion.service", service)]
        )
        ss = rs.scope_spans.add()
        ss.scope.name = "orbion"
        for f in group:
            span: Span = ss.spans.add()
            span.trace_id, span.span_id, span.parent_span_id = f.trace_id, f.span_id, f.parent_id
            span.name, span.kind = f.name, Span.SpanKind.ValueType(f.kind)
            span.start_time_unix_nano, span.end_time_unix_nano = f.start_ns, f.end_ns
            span.attributes.extend([_attr("messaging.system", "nats")] if "publish" in f.name else [])
            if f.stage:
                span.attributes.append(_attr("orbion.stage", f.stage))
            if f.correlation:
                span.attributes.append(_attr("orbion.correlation_id", f.correlation))
            if f.error:
                span.status.code = Status.STATUS_CODE_ERROR
    return request


def encode_protobuf(spans: Iterable[FakeSpan]) -> bytes:
    data: bytes = to_request(spans).SerializeToString()
    return data


def encode_json(spans: Iterable[FakeSpan]) -> bytes:
    """OTLP/JSON as the spec writes it: hex ids, camelCase, 64-bit integers as strings."""
    by_service: dict[str, list[FakeSpan]] = {}
    for span in spans:
        by_service.setdefault(span.service, []).append(span)
    resource_spans = []
    for service, group in by_service.items():
        resource_spans.append(
            {
                "resource": {
                    "attributes": [{"key": "service.name", "value": {"stringValue": f"orbion-{service}"}}]
                },
                "scopeSpans": [
                    {
                        "scope": {"name": "orbion"},
                        "spans": [
                            {
                                "traceId": f.trace_id.hex(),
                                "spanId": f.span_id.hex(),
                                "parentSpanId": f.parent_id.hex(),
                                "name": f.name,
                                "kind": f.kind,
                                "startTimeUnixNano": str(f.start_ns),
                                "endTimeUnixNano": str(f.end_ns),
                                "attributes": [
                                    {"key": key, "value": {"stringValue": value}}
                                    for key, value in (
                                        ("orbion.stage", f.stage),
                                        ("orbion.correlation_id", f.correlation),
                                    )
                                    if value
                                ],
                                "status": {"code": 2 if f.error else 0},
                            }
                            for f in group
                        ],
                    }
                ],
            }
        )
    return orjson.dumps({"resourceSpans": resource_spans})


def _batch_templates(count: int, batch: int, seed: int) -> tuple[list[bytes], bytes]:
    """``count`` distinct protobuf export requests of ~``batch`` spans. Every trace id starts
    with the same 8-byte marker, so a batch gets fresh trace and correlation ids cheaply (see _renew)."""
    rng = random.Random(seed)
    marker = rng.randbytes(8)
    now = time.time_ns()
    templates = []
    for b in range(count):
        spans: list[FakeSpan] = []
        while len(spans) < batch:
            trace_id = marker + rng.randbytes(8)
            spans.extend(
                message_trace(
                    trace_id,
                    now + b * 1000 * MS,
                    llm_ms=rng.lognormvariate(6.3, 0.5),
                    queue_ms=rng.uniform(0.5, 10),
                    error=rng.random() < 0.005,
                    relayed=rng.random() < 0.5,  # half the messages cross an outbox relay (two traces)
                )
            )
        templates.append(encode_protobuf(spans))
    return templates, marker


def _renew(template: bytes, marker: bytes, i: int) -> bytes:
    """Fresh trace ids (raw bytes) and correlation ids (their hex) for batch ``i``."""
    fresh = i.to_bytes(8, "big")
    return template.replace(marker, fresh).replace(marker.hex().encode(), fresh.hex().encode())


def rss_mb() -> float:
    return float(psutil.Process(os.getpid()).memory_info().rss) / 2**20


def run(spans: int, batch: int = 512, seed: int = 7) -> dict[str, object]:
    """Ingest about ``spans`` spans; return the figures."""
    templates, marker = _batch_templates(16, batch, seed)
    per_batch = len(decode_protobuf(templates[0]).spans)
    aggregator = Aggregator()
    batches = max(1, spans // per_batch)
    gc.collect()
    rss_start = rss_mb()
    checkpoints: list[tuple[int, float]] = []
    next_checkpoint = max(1, batches // 4)
    busy = 0.0
    ingested = 0
    started = time.perf_counter()
    for i in range(batches):
        body = _renew(templates[i % len(templates)], marker, i)
        t0 = time.perf_counter()
        decoded = decode_protobuf(body)
        aggregator.add(decoded.spans, decoded.rejected)
        busy += time.perf_counter() - t0
        ingested += len(decoded.spans)
        if (i + 1) % next_checkpoint == 0:
            checkpoints.append((ingested, round(rss_mb(), 1)))
    wall = time.perf_counter() - started
    return {
        "spans": ingested,
        "batch": per_batch,
        "seconds": round(busy, 3),
        "spans_per_second": round(ingested / busy) if busy else 0,
        "wall_seconds": round(wall, 3),
        "rss_mb_start": round(rss_start, 1),
        "rss_mb_end": round(rss_mb(), 1),
        "rss_mb_checkpoints": checkpoints,
        "messages_aggregated": aggregator.messages_total,
        "traces_kept": aggregator.stats()["traces_kept"],
        "end_to_end_p99_seconds": aggregator.end_to_end().quantile(0.99),
        "targets": {"spans_per_second": 50_000, "rss_mb_max": 150},
    }


async def run_http(spans: int, batch: int = 512, concurrency: int = 4, seed: int = 7) -> dict[str, object]:
    """Ingest about ``spans`` spans over real HTTP into a monitor started as its own process
    (``python -m orbion_monitor.bootstrap``), as exporters do; RSS is the server process's."""
    import asyncio
    import socket

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "ORBION_HOST": "127.0.0.1",
        "ORBION_MONITOR_PORT": str(port),
        "ORBION_MONITOR_TARGETS": "{}",
        "ORBION_OTLP_ENDPOINT": "",
        "ORBION_LOG_LEVEL": "WARNING",
    }
    server = await asyncio.create_subprocess_exec(sys.executable, "-m", "orbion_monitor.bootstrap", env=env)
    templates, marker = _batch_templates(16, batch, seed)
    per_batch = len(decode_protobuf(templates[0]).spans)
    batches = max(1, spans // per_batch)
    url = f"http://127.0.0.1:{port}"
    headers = {"content-type": "application/x-protobuf"}
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            for _ in range(200):
                try:
                    if (await client.get(f"{url}/livez")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)
            else:
                raise RuntimeError("monitor did not start")
            process = psutil.Process(server.pid)
            rss_start = process.memory_info().rss / 2**20
            counter = iter(range(batches))

            async def worker() -> None:
                for i in counter:
                    body = _renew(templates[i % len(templates)], marker, i)
                    response = await client.post(f"{url}/v1/traces", content=body, headers=headers)
                    response.raise_for_status()

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            elapsed = time.perf_counter() - started
            received = (await client.get(f"{url}/api/metrics")).json()["spans"]["spans_total"]
            rss_end = process.memory_info().rss / 2**20
    finally:
        server.terminate()
        await asyncio.wait_for(server.wait(), 30)
    return {
        "spans": received,
        "batch": per_batch,
        "concurrency": concurrency,
        "seconds": round(elapsed, 3),
        "spans_per_second": round(received / elapsed) if elapsed else 0,
        "server_rss_mb_start": round(rss_start, 1),
        "server_rss_mb_end": round(rss_end, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="orbion bench monitor", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--spans", type=int, default=1_000_000, help="spans to ingest (the target: 10000000)")
    parser.add_argument("--batch", type=int, default=512, help="spans per OTLP export request")
    parser.add_argument(
        "--http-spans",
        type=int,
        default=200_000,
        help="spans also sent over HTTP to a monitor process (0: skip that part)",
    )
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON on the last line")
    args = parser.parse_args(argv)
    figures = run(args.spans, args.batch)
    print(f"monitor ingest: {figures['spans']:,} spans in batches of {figures['batch']}")
    print(f"  {figures['spans_per_second']:,} spans/s (decode + aggregate, in process; target >= 50,000)")
    print(f"  RSS {figures['rss_mb_start']} MB before, {figures['rss_mb_end']} MB after (target < 150 MB)")
    print(f"  RSS at checkpoints (spans, MB): {figures['rss_mb_checkpoints']}")
    if args.http_spans > 0:
        import asyncio

        http = asyncio.run(run_http(args.http_spans, args.batch))
        figures["http"] = http
        print(
            f"  over HTTP (POST /v1/traces, {http['concurrency']} concurrent exporters): "
            f"{http['spans_per_second']:,} spans/s, server RSS {http['server_rss_mb_end']} MB "
            f"after {http['spans']:,} spans"
        )
    if args.json:
        print(orjson.dumps(figures).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
