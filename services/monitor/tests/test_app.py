"""The monitor's HTTP API through its ASGI app: OTLP in, figures out, errors as 4xx JSON."""

from __future__ import annotations

import gzip
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from orbion_monitor.app import build_app
from orbion_monitor.bench import encode_json, encode_protobuf, message_trace
from orbion_monitor.settings import Settings
from orbion_monitor.state import Monitor

PROTOBUF = {"content-type": "application/x-protobuf"}


@pytest.fixture
async def monitor(make_settings: Callable[..., Settings]) -> AsyncIterator[tuple[Monitor, httpx.AsyncClient]]:
    settings = make_settings(monitor_max_body_bytes=200_000)
    async with httpx.AsyncClient(timeout=2) as outbound:
        mon = Monitor(settings, outbound)
        app = build_app(settings, mon)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://monitor") as client:
            yield mon, client
        await mon.stop()


def metric(text: str, name: str, labels: dict[str, str] | None = None) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and (
                labels is None or all(sample.labels.get(k) == v for k, v in labels.items())
            ):
                return float(sample.value)
    return None


async def test_protobuf_export_is_aggregated_and_shown_in_api_metrics(
    monitor: tuple[Monitor, httpx.AsyncClient],
) -> None:
    _, client = monitor
    spans = []
    for i in range(20):
        spans += message_trace((i + 1).to_bytes(16, "big"), 10**18, llm_ms=500 + 10 * i)
    response = await client.post("/v1/traces", content=encode_protobuf(spans), headers=PROTOBUF)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-protobuf"
    body = (await client.get("/api/metrics")).json()
    assert body["messages"]["processed_total"] == 20
    assert body["messages"]["per_minute"] > 0
    assert body["end_to_end"]["count"] == 20
    assert body["end_to_end"]["p50"] == pytest.approx(0.613 + 0.09, rel=0.021)
    assert body["spans"]["spans_total"] == 160
    assert {row["service"] for row in body["operations"]} == {"gateway", "conversation", "lead", "llm-proxy"}
    assert sum(p["messages"] for p in body["series"]) == 20


async def test_json_and_gzip_exports_are_accepted(monitor: tuple[Monitor, httpx.AsyncClient]) -> None:
    mon, client = monitor
    one = message_trace(b"\x0a" * 16, 10**18)
    two = message_trace(b"\x0b" * 16, 10**18)
    response = await client.post(
        "/v1/traces", content=encode_json(one), headers={"content-type": "application/json"}
    )
    assert response.status_code == 200 and response.json() == {}
    response = await client.post(
        "/v1/traces",
        content=gzip.compress(encode_protobuf(two)),
        headers={**PROTOBUF, "content-encoding": "gzip"},
    )
    assert response.status_code == 200
    assert mon.aggregator.messages_total == 2


@pytest.mark.parametrize(
    ("content", "headers", "status", "kind"),
    [
        (b"\xff\xfe garbage", PROTOBUF, 400, "malformed_otlp"),
        (b"{nope", {"content-type": "application/json"}, 400, "malformed_otlp"),
        (b"hello", {"content-type": "text/plain"}, 415, "unsupported_media_type"),
        (b"x" * 300_000, PROTOBUF, 413, "payload_too_large"),
        (gzip.compress(b"\0" * 300_000), {**PROTOBUF, "content-encoding": "gzip"}, 413, "payload_too_large"),
    ],
)
async def test_malformed_otlp_gets_a_4xx_json_error_and_is_counted(
    monitor: tuple[Monitor, httpx.AsyncClient],
    content: bytes,
    headers: dict[str, str],
    status: int,
    kind: str,
) -> None:
    _, client = monitor
    response = await client.post("/v1/traces", content=content, headers=headers)
    assert response.status_code == status
    assert response.json()["error"]["type"] == kind
    text = (await client.get("/metrics")).text
    assert metric(text, "orbion_monitor_otlp_requests_rejected_total") == 1.0
    # The monitor still takes good exports afterwards.
    ok = await client.post(
        "/v1/traces", content=encode_protobuf(message_trace(b"\x0c" * 16, 10**18)), headers=PROTOBUF
    )
    assert ok.status_code == 200


async def test_prometheus_metrics_carry_end_to_end_histogram_and_stage_durations(
    monitor: tuple[Monitor, httpx.AsyncClient],
) -> None:
    _, client = monitor
    spans = message_trace(b"\x0d" * 16, 10**18, llm_ms=1500)  # 1.613 s end to end
    await client.post("/v1/traces", content=encode_protobuf(spans), headers=PROTOBUF)
    text = (await client.get("/metrics")).text
    assert metric(text, "orbion_monitor_messages_processed_total") == 1.0
    assert metric(text, "orbion_monitor_end_to_end_latency_seconds_bucket", {"le": "1.0"}) == 0.0
    assert metric(text, "orbion_monitor_end_to_end_latency_seconds_bucket", {"le": "2.0"}) == 1.0
    assert metric(text, "orbion_monitor_end_to_end_latency_seconds_sum") == pytest.approx(1.613)
    assert metric(text, "orbion_monitor_stage_duration_seconds_sum", {"stage": "llm"}) == pytest.approx(1.5)
    assert metric(text, "orbion_monitor_operation_spans_total", {"service": "gateway"}) is not None
    assert metric(text, "orbion_monitor_alerts_firing", {"alert": "BreakerOpen"}) == 0.0


async def test_recent_slowest_traces_and_one_trace_in_detail(
    monitor: tuple[Monitor, httpx.AsyncClient],
) -> None:
    _, client = monitor
    spans = []
    for i in range(30):
        spans += message_trace((1000 + i).to_bytes(16, "big"), 10**18, llm_ms=100 * (i + 1))
    await client.post("/v1/traces", content=encode_protobuf(spans), headers=PROTOBUF)
    recent = (await client.get("/api/traces/recent", params={"slowest": 3})).json()["traces"]
    assert [round(t["end_to_end_seconds"], 3) for t in recent] == [3.113, 3.013, 2.913]
    slowest = recent[0]
    assert slowest["stages"]["llm"] == pytest.approx(3.0)
    detail = (await client.get(f"/api/traces/{slowest['trace_id']}")).json()
    assert detail["complete"] is True
    assert next(s["stage"] for s in detail["spans"] if s["stage"] != "other") == "gateway"
    assert {"gateway", "conversation", "llm", "send"} <= {s["stage"] for s in detail["spans"]}


async def test_trace_lookups_with_bad_or_unknown_ids(monitor: tuple[Monitor, httpx.AsyncClient]) -> None:
    _, client = monitor
    bad = await client.get("/api/traces/not-a-trace")
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "bad_trace_id"
    unknown = await client.get("/api/traces/" + "ab" * 16)
    assert unknown.status_code == 404
    assert (await client.get("/api/traces/recent", params={"slowest": 0})).status_code == 422


async def test_api_needs_a_key_when_keys_are_configured(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(api_keys=["s3cret-key"])
    async with httpx.AsyncClient() as outbound:
        mon = Monitor(settings, outbound)
        transport = httpx.ASGITransport(app=build_app(settings, mon))
        async with httpx.AsyncClient(transport=transport, base_url="http://monitor") as client:
            assert (await client.get("/api/metrics")).status_code == 401
            assert (await client.get("/api/metrics", headers={"X-API-Key": "s3cret-key"})).status_code == 200
            # Exporters and the dashboard page itself need no key.
            assert (await client.post("/v1/traces", content=b"", headers=PROTOBUF)).status_code == 200
            page = await client.get("/")
            assert page.status_code == 200 and "ORBION" in page.text
            assert (await client.get("/static/app.js")).status_code == 200


async def test_probes_of_the_monitor_itself(monitor: tuple[Monitor, httpx.AsyncClient]) -> None:
    _, client = monitor
    assert (await client.get("/livez")).status_code == 200
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert "spans" in ready.json()["info"]
