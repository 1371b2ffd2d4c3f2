"""Aggregation: percentiles against a known span set, end-to-end stages, bounded memory."""

from __future__ import annotations

import math
import random

import pytest

from orbion_monitor.aggregation import Aggregator, Sketch, breakdown
from orbion_monitor.bench import FakeSpan, message_trace
from orbion_monitor.otlp import KIND_SERVER, SpanRecord


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def records(spans: list[FakeSpan]) -> list[SpanRecord]:
    return [
        SpanRecord(
            f.trace_id.hex(), f.span_id.hex(), f.parent_id.hex(), f.service, f.name, f.kind, f.start_ns,
            f.end_ns, f.error, f.stage, f.correlation,
        )
        for f in spans
    ]  # fmt: skip


def span(trace: int, name: str, ms: float, *, service: str = "gateway", error: bool = False) -> SpanRecord:
    start = 1_000_000_000
    return SpanRecord(
        f"{trace:032x}", f"{random.getrandbits(64):016x}", "", service, name, KIND_SERVER, start,
        start + int(ms * 1e6), error, "",
    )  # fmt: skip


def exact_quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def test_sketch_quantiles_are_within_two_percent_of_the_exact_ones() -> None:
    rng = random.Random(1)
    values = [rng.lognormvariate(-1.5, 1.2) for _ in range(20_000)]
    sketch = Sketch()
    for v in values:
        sketch.add(v)
    for q in (0.5, 0.9, 0.95, 0.99, 0.999):
        got = sketch.quantile(q)
        assert got is not None
        assert got == pytest.approx(exact_quantile(values, q), rel=0.021)
    assert Sketch().quantile(0.5) is None


def test_sketch_size_is_bounded_whatever_the_values() -> None:
    sketch = Sketch()
    for exponent in range(-9, 9):
        for mantissa in range(1, 1000):
            sketch.add(mantissa * 10.0**exponent)
    assert len(sketch.buckets) <= Sketch.MAX_BUCKETS < 1000


def test_operation_percentiles_and_errors_match_a_known_span_set() -> None:
    agg = Aggregator(clock=Clock())
    durations = list(range(1, 1001))  # 1..1000 ms
    random.Random(2).shuffle(durations)
    agg.add([span(i, "POST /webhooks/whatsapp", ms, error=i % 100 == 0) for i, ms in enumerate(durations)])
    (row,) = agg.operations()
    assert (row["service"], row["operation"], row["count"], row["errors"]) == (
        "gateway", "POST /webhooks/whatsapp", 1000, 10,
    )  # fmt: skip
    assert row["p50"] == pytest.approx(0.500, rel=0.021)
    assert row["p95"] == pytest.approx(0.950, rel=0.021)
    assert row["p99"] == pytest.approx(0.990, rel=0.021)
    assert agg.error_ratio() == pytest.approx(0.01)
    assert agg.webhooks_total == 1000


def test_one_message_trace_gives_end_to_end_latency_and_stage_breakdown() -> None:
    agg = Aggregator(clock=Clock())
    trace = message_trace(b"\x01" * 16, 5_000_000_000, gateway_ms=4, queue_ms=2, conversation_ms=15,
                          llm_ms=700, send_ms=90)  # fmt: skip
    agg.add(records(trace))
    assert agg.messages_total == 1
    (slow,) = agg.slowest()
    assert slow["trace_id"] == "01" * 16
    assert slow["end_to_end_seconds"] == pytest.approx(0.813)
    stages = slow["stages"]
    assert stages["gateway"] == pytest.approx(0.004)
    assert stages["queue"] == pytest.approx(0.004)
    assert stages["conversation"] == pytest.approx(0.015)
    assert stages["llm"] == pytest.approx(0.700)
    assert stages["send"] == pytest.approx(0.090)
    detail = agg.trace("01" * 16)
    assert detail is not None and detail["complete"]
    assert detail["services"] == ["conversation", "gateway", "lead", "llm-proxy"]
    assert len(detail["spans"]) == 8


def test_stages_are_guessed_from_service_and_span_names_without_attributes() -> None:
    agg = Aggregator(clock=Clock())
    agg.add(records(message_trace(b"\x02" * 16, 0 + 10**9, explicit_stages=False)))
    (slow,) = agg.slowest()
    assert slow["end_to_end_seconds"] == pytest.approx(0.813)
    assert slow["stages"]["send"] == pytest.approx(0.090)
    assert slow["stages"]["llm"] == pytest.approx(0.700)


def test_spans_of_one_trace_arriving_in_separate_exports_in_any_order_complete_it() -> None:
    agg = Aggregator(clock=Clock())
    spans = records(message_trace(b"\x03" * 16, 10**9))
    agg.add([s for s in spans if s.service == "llm-proxy"])  # the send is exported first
    assert agg.messages_total == 0
    agg.add([s for s in spans if s.service != "llm-proxy"])
    assert agg.messages_total == 1
    assert agg.end_to_end().quantile(0.5) == pytest.approx(0.813, rel=0.021)


def test_end_to_end_percentiles_over_many_messages() -> None:
    agg = Aggregator(clock=Clock())
    llm_ms = [100 + 10 * i for i in range(200)]  # e2e = llm + 113 ms
    for i, ms in enumerate(llm_ms):
        agg.add(records(message_trace(i.to_bytes(16, "big"), 10**9, llm_ms=ms)))
    e2e = [(ms + 113) / 1000 for ms in llm_ms]
    sketch = agg.end_to_end()
    for q in (0.5, 0.95, 0.99):
        assert sketch.quantile(q) == pytest.approx(exact_quantile(e2e, q), rel=0.021)
    assert agg.stage_summary()["llm"]["count"] == 200
    assert agg.rates()["messages_per_minute"] > 0
    assert [t["end_to_end_seconds"] for t in agg.slowest(3)] == pytest.approx([2.203, 2.193, 2.183])


def test_old_windows_leave_the_recent_figures() -> None:
    clock = Clock()
    agg = Aggregator(window_seconds=10, windows=6, recent_seconds=20, clock=clock)
    agg.add([span(1, "GET /slow", 900)])
    clock.now += 50
    agg.add([span(2, "GET /fast", 10)])
    assert [r["operation"] for r in agg.operations()] == ["GET /fast"]
    series = agg.series()
    assert len(series) == 6  # the ring's length, empty windows included
    assert [p["spans"] for p in series] == [1, 0, 0, 0, 0, 1]


def test_distinct_operations_are_capped_and_the_excess_counted_as_other() -> None:
    agg = Aggregator(max_operations=10, clock=Clock())
    agg.add([span(i, f"GET /users/{i}", 5) for i in range(1000)])
    names = {op for _, op, _, _ in agg.operation_totals()}
    assert len(names) <= 11
    assert "_other" in names
    assert agg.operations_overflow_total == 990
    assert sum(n for _, _, n, _ in agg.operation_totals()) == 1000


def test_trace_memory_is_capped() -> None:
    agg = Aggregator(max_traces=50, max_spans_per_trace=4, clock=Clock())
    for i in range(500):
        agg.add(records(message_trace(i.to_bytes(16, "big"), 10**9)))
    stats = agg.stats()
    assert stats["traces_kept"] == 50
    assert stats["traces_evicted_total"] == 450
    assert stats["spans_dropped_total"] == 500 * 4
    # Completion does not depend on keeping every span: the gateway and send spans are seen.
    assert stats["messages_total"] == 500


def test_breakdown_counts_uncovered_time_as_queue() -> None:
    a = SpanRecord("t", "a", "", "gateway", "POST /webhooks/whatsapp", KIND_SERVER, 0, 10, False, "")
    b = SpanRecord("t", "b", "", "llm-proxy", "whatsapp send", 3, 30, 40, False, "")
    parts = breakdown([a, b], 0, 40)
    assert parts == {"gateway": 10e-9, "queue": 20e-9, "conversation": 0.0, "llm": 0.0, "send": 10e-9}


def test_traces_broken_by_an_outbox_relay_are_stitched_by_correlation_id_in_any_order() -> None:
    agg = Aggregator(clock=Clock())
    spans = records(message_trace(b"\x04" * 16, 10**9, relayed=True))
    traces = {s.trace_id for s in spans}
    assert len(traces) == 2
    relayed_trace = next(t for t in traces if t != "04" * 16)
    agg.add([s for s in spans if s.trace_id == relayed_trace])  # the llm-proxy side arrives first
    webhook = [s for s in spans if s.name == "POST /webhooks/whatsapp"]
    agg.add(webhook)
    assert agg.messages_total == 0  # the webhook's trace is not linked yet: no correlated span seen
    agg.add([s for s in spans if s.trace_id != relayed_trace and s not in webhook])
    assert agg.messages_total == 1
    assert agg.stats()["traces_stitched_total"] == 1
    (slow,) = agg.slowest()
    assert slow["end_to_end_seconds"] == pytest.approx(0.813)
    assert slow["stages"]["queue"] == pytest.approx(0.004)
    assert slow["stages"]["send"] == pytest.approx(0.090)
    for trace_id in traces:  # either trace id finds the whole message
        detail = agg.trace(trace_id)
        assert detail is not None and len(detail["spans"]) == 8
        assert sorted(detail["trace_ids"]) == sorted(traces)


# -- the critical path: a message's stages are the spans its send waited on ------------------------

MS = 1_000_000
T0 = 1_700_000_000 * 10**9  # the webhook's start (0 means "no gateway span yet" to the aggregator)


def path_span(
    span_id: str,
    parent: str,
    service: str,
    name: str,
    start_ms: float,
    end_ms: float,
    *,
    stage: str = "",
    kind: int = 1,
    trace: str = "c0" * 16,
) -> SpanRecord:
    return SpanRecord(
        trace, span_id.ljust(16, "0"), parent.ljust(16, "0") if parent else "", service, name, kind,
        T0 + int(start_ms * MS), T0 + int(end_ms * MS), False, stage,
    )  # fmt: skip


def message_with_side_work() -> list[SpanRecord]:
    """One message whose critical path is webhook -> publish -> process MessageReceived ->
    publish ReplyRequested -> process ReplyRequested -> whatsapp send (stages, in ms: gateway
    0-10, queue 10-20, conversation 20-40, queue 40-50, llm 50-760, queue 760-770, send 770-820),
    plus work of the same trace beside that path, in the queue gap and during the send."""
    return [
        path_span("a1", "", "gateway", "POST /webhooks/whatsapp", 0, 10, stage="gateway", kind=KIND_SERVER),
        path_span("a2", "a1", "gateway", "publish MessageReceived", 4, 8),
        # Beside the path: a consumer of the same event, in the queue gap before the conversation.
        path_span("b1", "a2", "conversation", "process LeadChanged", 12, 18),
        path_span("a3", "a2", "conversation", "process MessageReceived", 20, 40),
        path_span("a4", "a3", "conversation", "publish ReplyRequested", 30, 35),
        path_span("a5", "a4", "llm-proxy", "process ReplyRequested", 50, 760),
        path_span("a6", "a5", "llm-proxy", "chat gpt-4o-mini", 55, 750, stage="llm"),
        path_span("b2", "a5", "llm-proxy", "publish ReplyGenerated", 755, 758),
        # Beside the path: the conversation records ReplyGenerated while the reply is being sent.
        path_span("b3", "b2", "conversation", "process ReplyGenerated", 780, 800),
        path_span("b4", "b3", "conversation", "INSERT orbion", 782, 790),
        path_span("a7", "a5", "llm-proxy", "whatsapp send", 770, 820, stage="send"),
    ]


def test_work_beside_the_critical_path_takes_no_time_from_its_stages() -> None:
    agg = Aggregator(clock=Clock())
    agg.add(message_with_side_work())
    (slow,) = agg.slowest()
    assert slow["end_to_end_seconds"] == pytest.approx(0.820)
    assert slow["stages"] == pytest.approx(
        {"gateway": 0.010, "queue": 0.030, "conversation": 0.020, "llm": 0.710, "send": 0.050}
    )
    # The latest-started rule would have given the queue gap to the conversation and part of
    # the send to the conversation's "process ReplyGenerated".
    assert sum(slow["stages"].values()) == pytest.approx(slow["end_to_end_seconds"])


def test_stages_sum_to_end_to_end_whatever_order_the_spans_arrive_in() -> None:
    spans = message_with_side_work()
    for seed in range(5):
        random.Random(seed).shuffle(spans)
        agg = Aggregator(clock=Clock())
        for i in range(0, len(spans), 3):
            agg.add(spans[i : i + 3])
        (slow,) = agg.slowest()
        assert sum(slow["stages"].values()) == pytest.approx(slow["end_to_end_seconds"], abs=1e-9)
        assert slow["stages"]["send"] == pytest.approx(0.050)
        assert slow["stages"]["queue"] == pytest.approx(0.030)


def test_a_span_without_stage_inherits_its_parents_stage() -> None:
    spans = [s for s in message_with_side_work() if s.name != "whatsapp send"] + [
        path_span("c1", "a5", "llm-proxy", "deliver reply", 770, 820, stage="send"),
        # No orbion.stage, and its name would make the guess "llm": it takes its parent's "send".
        path_span("c2", "c1", "llm-proxy", "render part", 775, 815),
        path_span("c3", "c2", "llm-proxy", "whatsapp send", 780, 820, stage="send"),
    ]
    parts = breakdown(spans, T0, T0 + 820 * MS)
    assert parts["send"] == pytest.approx(0.050)
    assert parts["llm"] == pytest.approx(0.710)
    agg = Aggregator(clock=Clock())
    agg.add(spans)
    detail = agg.trace("c0" * 16)
    assert detail is not None
    stages = {s["name"]: s["stage"] for s in detail["spans"]}
    assert stages["render part"] == "send"
    # Inheritance stops at a service boundary: the conversation is not "gateway".
    assert stages["process MessageReceived"] == "conversation"


def test_every_part_of_a_split_reply_counts_as_send() -> None:
    spans = [s for s in message_with_side_work() if s.name != "whatsapp send"] + [
        path_span("d1", "a5", "llm-proxy", "whatsapp send", 770, 790, stage="send"),
        path_span("d2", "a5", "llm-proxy", "whatsapp send", 795, 820, stage="send"),
    ]
    parts = breakdown(spans, T0, T0 + 820 * MS)
    assert parts["send"] == pytest.approx(0.045)
    assert parts["queue"] == pytest.approx(0.035)


def test_a_send_in_a_trace_of_its_own_falls_back_to_the_latest_started_span_before_it() -> None:
    # A reply stored without trace context: its send is the root of another trace, stitched
    # back by correlation id. Before the send, the older rule still gives sensible stages.
    spans = [s for s in message_with_side_work() if s.name != "whatsapp send"] + [
        path_span("e1", "", "llm-proxy", "whatsapp send", 770, 820, stage="send", trace="e0" * 16)
    ]
    parts = breakdown(spans, T0, T0 + 820 * MS)
    assert parts["send"] == pytest.approx(0.050)
    assert parts["gateway"] == pytest.approx(0.010)
    assert parts["llm"] == pytest.approx(0.710)
    assert sum(parts.values()) == pytest.approx(0.820)
