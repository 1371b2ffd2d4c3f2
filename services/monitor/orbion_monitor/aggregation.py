"""Span aggregation in bounded memory: latency sketches per operation and time window, and the
end-to-end latency of each message (webhook received -> reply sent, one trace) split into stages.

Owns every figure the monitor derives from traces. Memory stays flat whatever the span rate:
a :class:`Sketch` has at most ``Sketch.MAX_BUCKETS`` buckets, windows live in a fixed ring,
distinct operations are capped (the excess is counted under ``_other``), per-operation data is
kept only for the recent windows, and traces live in a FIFO of ``max_traces`` with at most
``max_spans_per_trace`` spans each. Windows are placed by arrival time (the monitor's clock),
so a service with a skewed clock cannot put spans in the future; durations come from the
spans' own start/end. Decoding is otlp.py's job; HTTP is app.py's.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .otlp import KIND_CONSUMER, KIND_SERVER, SpanRecord

#: Stages of a message's critical path, in order. Time inside no span of the path is queue wait.
STAGES = ("gateway", "queue", "conversation", "llm", "send")
_TIMED_STAGES = frozenset({"gateway", "conversation", "llm", "send", "queue"})
OTHER = "_other"

#: Bucket bounds (seconds) of the end-to-end and stage histograms exported to Prometheus.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)


class Sketch:
    """A log-bucketed latency histogram (DDSketch-style): any quantile within ~2% relative error,
    at most ``MAX_BUCKETS`` buckets whatever the number of values."""

    __slots__ = ("buckets", "count", "max", "total")

    RELATIVE_ACCURACY = 0.02
    GAMMA = (1 + RELATIVE_ACCURACY) / (1 - RELATIVE_ACCURACY)
    _INV_LOG_GAMMA = 1.0 / math.log(GAMMA)
    MIN_VALUE = 1e-6  # 1 µs: anything faster is recorded as 1 µs
    MAX_VALUE = 1e5  # ~28 h: anything slower is recorded as that
    _MIN_INDEX = math.ceil(math.log(MIN_VALUE) * _INV_LOG_GAMMA)
    _MAX_INDEX = math.ceil(math.log(MAX_VALUE) * _INV_LOG_GAMMA)
    MAX_BUCKETS = _MAX_INDEX - _MIN_INDEX + 1

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.count = 0
        self.total = 0.0
        self.max = 0.0

    def add(self, seconds: float) -> None:
        if seconds <= self.MIN_VALUE:
            index = self._MIN_INDEX
        elif seconds >= self.MAX_VALUE:
            index = self._MAX_INDEX
        else:
            index = math.ceil(math.log(seconds) * self._INV_LOG_GAMMA)
        buckets = self.buckets
        buckets[index] = buckets.get(index, 0) + 1
        self.count += 1
        self.total += seconds
        if seconds > self.max:
            self.max = seconds

    def merge(self, other: Sketch) -> None:
        buckets = self.buckets
        for index, n in other.buckets.items():
            buckets[index] = buckets.get(index, 0) + n
        self.count += other.count
        self.total += other.total
        self.max = max(self.max, other.max)

    def quantile(self, q: float) -> float | None:
        """The value at quantile ``q`` (0..1, nearest rank), or None when empty."""
        if not self.count:
            return None
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen >= rank:
                # The bucket (gamma^(i-1), gamma^i] is represented by the point of least relative error.
                value = 2 * self.GAMMA**index / (self.GAMMA + 1)
                return min(value, self.max)
        return self.max

    def summary(self) -> dict[str, float | int | None]:
        return {
            "count": self.count,
            "p50": self.quantile(0.50),
            "p95": self.quantile(0.95),
            "p99": self.quantile(0.99),
            "max": self.max if self.count else None,
            "mean": self.total / self.count if self.count else None,
        }


class OpWindow:
    __slots__ = ("count", "errors", "sketch")

    def __init__(self) -> None:
        self.count = 0
        self.errors = 0
        self.sketch = Sketch()


class Window:
    """Everything seen during one ``window_seconds`` interval of arrival time."""

    __slots__ = (
        "e2e",
        "entries",
        "entry_errors",
        "errors",
        "index",
        "messages",
        "ops",
        "spans",
        "stages",
        "webhooks",
    )

    def __init__(self, index: int) -> None:
        self.index = index
        self.spans = 0
        self.errors = 0
        self.entries = 0  # server and consumer spans: requests and messages handled
        self.entry_errors = 0
        self.webhooks = 0
        self.messages = 0  # messages whose reply was sent (end-to-end completions)
        self.e2e = Sketch()
        self.stages: dict[str, Sketch] = {}
        # Dropped (set to None) once the window is older than the recent span: per-operation
        # sketches are the bulk of the memory and only the recent figures need them.
        self.ops: dict[int, OpWindow] | None = {}


class CumulativeHistogram:
    """Prometheus-style cumulative buckets since start (for ``_bucket``/``_sum``/``_count``)."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * len(self.bounds)
        self.count = 0
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        for i, bound in enumerate(self.bounds):
            if seconds <= bound:
                self.counts[i] += 1
                break
        self.count += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip(self.bounds, self.counts, strict=True):
            running += n
            out.append((repr(float(bound)), float(running)))
        out.append(("+Inf", float(self.count)))
        return out


class TraceState:
    __slots__ = (
        "breakdown",
        "completed_at",
        "dropped_spans",
        "e2e",
        "first_seen",
        "gateway_start",
        "send_end",
        "spans",
        "trace_id",
        "trace_ids",
    )

    def __init__(self, trace_id: str, now: float) -> None:
        self.trace_id = trace_id  # the message's key: the first trace id it was seen under
        self.trace_ids = [trace_id]  # every trace stitched into this message (see Aggregator._merge)
        self.spans: list[SpanRecord] = []
        self.dropped_spans = 0
        self.first_seen = now
        self.gateway_start = 0  # ns; 0 = no gateway span yet
        self.send_end = 0  # ns; 0 = no send span yet
        self.e2e: float | None = None
        self.completed_at: float | None = None
        self.breakdown: dict[str, float] = {}


@dataclass(frozen=True)
class Completed:
    trace_id: str
    e2e: float
    completed_at: float
    breakdown: dict[str, float] = field(default_factory=dict)


def classify(span: SpanRecord) -> str:
    """The stage a span belongs to: its ``orbion.stage`` attribute, else a guess from its service
    and name ("other" for spans off the message's critical path, e.g. the lead service)."""
    explicit: str = span.stage
    if explicit:
        return explicit
    service = span.service
    if service == "gateway":
        return "gateway"
    if service == "conversation":
        return "conversation"
    if service == "llm-proxy":
        name = span.name.lower()
        if not name.startswith(("publish ", "process ")) and ("send" in name or "whatsapp" in name):
            return "send"
        return "llm"
    return "other"


def _is_webhook(span: SpanRecord, stage: str) -> bool:
    if span.kind != KIND_SERVER or stage != "gateway":
        return False
    return span.stage == "gateway" or "webhook" in span.name.lower()


def effective_stages(spans: Sequence[SpanRecord]) -> dict[str, str]:
    """Each span's stage (by span id), as the breakdown sees it: its ``orbion.stage``, else that of
    its nearest ancestor *in the same service* that has one, else :func:`classify`'s guess.

    The inheritance stops at a service boundary: a consumer span continues its producer's trace,
    but the gateway's ``orbion.stage = "gateway"`` must not make the conversation "gateway".
    """
    by_id = {s.span_id: s for s in spans}
    memo: dict[str, str] = {}
    for span in spans:
        _stage_of(span, by_id, memo)
    return memo


def _stage_of(span: SpanRecord, by_id: dict[str, SpanRecord], memo: dict[str, str]) -> str:
    known = memo.get(span.span_id)
    if known is not None:
        return known
    stage = span.stage
    if not stage:
        ancestor = by_id.get(span.parent_id) if span.parent_id else None
        hops = 0
        while ancestor is not None and ancestor.service == span.service and hops < len(by_id):
            if ancestor.stage:
                stage = ancestor.stage
                break
            ancestor = by_id.get(ancestor.parent_id) if ancestor.parent_id else None
            hops += 1  # parent links come from the wire: a cycle must not hang the monitor
        if not stage:
            stage = classify(span)
    memo[span.span_id] = stage
    return stage


def critical_chain(spans: Sequence[SpanRecord], end_ns: int) -> list[tuple[SpanRecord, str]]:
    """The spans the message's end waited on, deepest first, each with its stage: the send span
    that ended last (at or before ``end_ns``), then its parent, grandparent... by ``parent_id``
    (across services: the trace context is propagated) up to the root, or to the first parent
    that is not among ``spans`` (another trace, not arrived yet, or beyond the per-trace cap).
    Empty when no send span is kept."""
    send: SpanRecord | None = None
    for span in spans:  # fast path: the span that defines end_ns is usually the send itself
        if span.end_ns != end_ns or (send is not None and span.start_ns <= send.start_ns):
            continue
        if classify(span) == "send":
            send = span
    if send is None:
        for span in spans:
            if span.end_ns > end_ns or (
                send is not None and (span.end_ns, span.start_ns) <= (send.end_ns, send.start_ns)
            ):
                continue
            if classify(span) == "send":
                send = span
    if send is None:
        return []
    by_id = {s.span_id: s for s in spans}
    chain = [send]
    seen = {send.span_id}
    parent = by_id.get(send.parent_id) if send.parent_id else None
    while parent is not None and parent.span_id not in seen:  # a cyclic parent link ends the walk
        chain.append(parent)
        seen.add(parent.span_id)
        parent = by_id.get(parent.parent_id) if parent.parent_id else None
    # Stages top-down: a span without orbion.stage inherits from the nearest chain ancestor of
    # its own service that has one (see effective_stages), else the guess.
    staged: list[tuple[SpanRecord, str]] = []
    inherited = ""
    service = None
    for span in reversed(chain):
        if span.service != service:
            inherited, service = "", span.service
        if span.stage:
            inherited = span.stage
        staged.append((span, inherited or classify(span)))
    staged.reverse()
    return staged


def breakdown(spans: Iterable[SpanRecord], start_ns: int, end_ns: int) -> dict[str, float]:
    """Seconds of ``[start_ns, end_ns]`` spent in each stage, summing to ``end_ns - start_ns``.

    Only the critical path counts (see :func:`critical_chain`): each instant belongs to the
    deepest span of the chain running then, with that span's stage; the chain's other
    descendants (SQL and Redis spans, the chat call under ``process ReplyRequested``) are part of
    their chain ancestor's time, and work beside the path in the same trace (the lead service,
    the conversation recording ``ReplyGenerated`` during the send) takes nothing. Earlier parts
    of a split reply (send spans sharing the last send's parent) count as send. Instants covered
    by no chain span are queue wait (the message sat in JetStream, an outbox or the reply table).

    When the chain does not reach back to ``start_ns`` (it broke at a trace stitched by
    correlation id, or a span is missing), instants it does not cover fall back to the older
    rule: the latest started span with a timed stage running then, else queue.
    """
    result = dict.fromkeys(STAGES, 0.0)
    if end_ns <= start_ns:
        return result
    spans = spans if isinstance(spans, list) else list(spans)
    chain = critical_chain(spans, end_ns)
    bounds = {start_ns, end_ns}
    # (lo, hi, depth, stage): depth 0 is the send; deeper wins, so a lower depth wins.
    on_path: list[tuple[int, int, int, str]] = []
    for depth, (span, stage) in enumerate(chain):
        lo = span.start_ns if span.start_ns > start_ns else start_ns
        hi = span.end_ns if span.end_ns < end_ns else end_ns
        if hi > lo and stage in _TIMED_STAGES:
            on_path.append((lo, hi, depth, stage))
            bounds.add(lo)
            bounds.add(hi)
    if chain:
        send = chain[0][0]
        for span in spans:
            if span.parent_id == send.parent_id and span is not send and classify(span) == "send":
                lo = span.start_ns if span.start_ns > start_ns else start_ns
                hi = span.end_ns if span.end_ns < end_ns else end_ns
                if hi > lo:
                    on_path.append((lo, hi, 0, "send"))
                    bounds.add(lo)
                    bounds.add(hi)
    broken = not chain or chain[-1][0].start_ns > start_ns or chain[0][0].end_ns < end_ns
    beside: list[tuple[int, int, str]] = []
    if broken:
        chain_ids = {span.span_id for span, _ in chain}
        for span in spans:
            if span.span_id in chain_ids:
                continue
            stage = classify(span)
            if stage not in _TIMED_STAGES:
                continue
            lo = span.start_ns if span.start_ns > start_ns else start_ns
            hi = span.end_ns if span.end_ns < end_ns else end_ns
            if hi > lo:
                beside.append((lo, hi, stage))
                bounds.add(lo)
                bounds.add(hi)
        beside.sort()
    on_path.sort()
    points = sorted(bounds)
    for a, b in itertools.pairwise(points):
        chosen = ""
        deepest = len(chain) + 1
        for lo, hi, depth, stage in on_path:
            if lo > a:
                break  # sorted by start: no later interval covers a
            if hi >= b and depth < deepest:
                deepest, chosen = depth, stage
        if not chosen:
            chosen = "queue"
            latest = -1
            for lo, hi, stage in beside:
                if lo > a:
                    break
                if hi >= b and lo >= latest:
                    latest, chosen = lo, stage
        result[chosen] = result.get(chosen, 0.0) + (b - a) / 1e9
    return result


class Aggregator:
    """All trace-derived state of the monitor. Not thread-safe: used from the event loop only."""

    def __init__(
        self,
        *,
        window_seconds: int = 10,
        windows: int = 90,
        recent_seconds: int = 60,
        max_operations: int = 256,
        max_traces: int = 2000,
        max_spans_per_trace: int = 128,
        recent_completed: int = 1000,
        clock: Any = time.time,
    ) -> None:
        self.window_seconds = window_seconds
        self.recent_windows = max(1, math.ceil(recent_seconds / window_seconds))
        self.max_operations = max_operations
        self.max_traces = max_traces
        self.max_spans_per_trace = max_spans_per_trace
        self._clock = clock
        self._windows: deque[Window] = deque(maxlen=max(windows, self.recent_windows))
        self._ops: dict[tuple[str, str], int] = {}
        self._op_keys: list[tuple[str, str]] = []
        self._op_totals: list[list[int]] = []  # [count, errors] since start, per operation id
        self._services: set[str] = set()
        self._traces: dict[str, TraceState] = {}
        # Traces break where an event goes through an outbox relay; spans that carry the event's
        # correlation id stitch them back into one message. Both maps are FIFO-capped.
        self._alias: dict[str, str] = {}  # trace id -> the message key it was merged into
        self._correlations: dict[str, str] = {}  # correlation id -> message key
        self._link_cap = max_traces * 4
        self.traces_stitched_total = 0
        self._completed: deque[Completed] = deque(maxlen=recent_completed)
        # Totals since start (Prometheus counters).
        self.spans_total = 0
        self.spans_rejected_total = 0
        self.payloads_rejected_total = 0
        self.operations_overflow_total = 0
        self.traces_evicted_total = 0
        self.spans_dropped_total = 0  # spans not kept in a trace (per-trace cap); still aggregated
        self.messages_total = 0
        self.webhooks_total = 0
        self.e2e_histogram = CumulativeHistogram()
        self.stage_histograms = {stage: CumulativeHistogram() for stage in STAGES}

    # -- ingestion ---------------------------------------------------------------------------

    def _window(self, now: float) -> Window:
        index = int(now // self.window_seconds)
        windows = self._windows
        if windows and windows[-1].index == index:
            return windows[-1]
        if windows and windows[-1].index > index:
            return windows[-1]  # clock went back: keep adding to the newest window
        windows.append(Window(index))
        # Older windows keep their totals for the time series but lose per-operation sketches.
        cutoff = index - self.recent_windows
        for old in windows:
            if old.index > cutoff:
                break
            old.ops = None
        return windows[-1]

    def _op_id(self, service: str, name: str) -> int:
        key = (service, name)
        op = self._ops.get(key)
        if op is not None:
            return op
        if len(self._op_keys) >= self.max_operations:
            self.operations_overflow_total += 1
            key = (service, OTHER) if service in self._services else (OTHER, OTHER)
            op = self._ops.get(key)
            if op is not None:
                return op
            if len(self._op_keys) >= self.max_operations + 16:
                key = (OTHER, OTHER)  # even the overflow keys are capped
                op = self._ops.get(key)
                if op is not None:
                    return op
        op = len(self._op_keys)
        self._ops[key] = op
        self._op_keys.append(key)
        self._op_totals.append([0, 0])
        self._services.add(key[0])
        return op

    def _new_trace(self, key: str, now: float) -> TraceState:
        traces = self._traces
        if len(traces) >= self.max_traces:
            del traces[next(iter(traces))]  # FIFO: the oldest trace goes
            self.traces_evicted_total += 1
        trace = traces[key] = TraceState(key, now)
        return trace

    def _resolve(self, trace_id: str) -> str:
        key = trace_id
        for _ in range(8):  # chains stay short: each merge points straight at a live key
            nxt = self._alias.get(key)
            if nxt is None:
                break
            key = nxt
        return key

    def _link(self, key: str, correlation: str, now: float, touched: list[TraceState]) -> str:
        """The message key for a span of trace ``key`` carrying ``correlation``; merges two
        traces found to be one message."""
        owner = self._correlations.get(correlation)
        if owner is None:
            if len(self._correlations) >= self._link_cap:
                del self._correlations[next(iter(self._correlations))]
            self._correlations[correlation] = key
            return key
        owner = self._resolve(owner)
        if owner == key:
            return key
        self._merge(key, owner, now, touched)
        return owner

    def _merge(self, source: str, target: str, now: float, touched: list[TraceState]) -> None:
        if len(self._alias) >= self._link_cap:
            del self._alias[next(iter(self._alias))]
        self._alias[source] = target
        moved = self._traces.pop(source, None)
        if moved is None:
            return
        self.traces_stitched_total += 1
        into = self._traces.get(target) or self._new_trace(target, now)
        into.trace_ids.extend(t for t in moved.trace_ids if t not in into.trace_ids)
        room = self.max_spans_per_trace - len(into.spans)
        into.spans.extend(moved.spans[:room])
        dropped = max(0, len(moved.spans) - room) + moved.dropped_spans
        into.dropped_spans += dropped
        self.spans_dropped_total += max(0, len(moved.spans) - room)
        if moved.gateway_start and (not into.gateway_start or moved.gateway_start < into.gateway_start):
            into.gateway_start = moved.gateway_start
        into.send_end = max(into.send_end, moved.send_end)
        if into.e2e is None and moved.e2e is not None:
            into.e2e, into.completed_at, into.breakdown = moved.e2e, moved.completed_at, moved.breakdown
        if into.e2e is None:
            touched.append(into)

    def reject_payload(self) -> None:
        self.payloads_rejected_total += 1

    def add(self, spans: Sequence[SpanRecord], rejected: int = 0) -> None:
        """Aggregate one decoded export request."""
        now = self._clock()
        window = self._window(now)
        self.spans_total += len(spans)
        self.spans_rejected_total += rejected
        window.spans += len(spans)
        ops = window.ops
        assert ops is not None  # the newest window always has its per-operation data
        op_index = self._ops
        op_totals = self._op_totals
        traces = self._traces
        alias = self._alias
        max_spans = self.max_spans_per_trace
        touched: list[TraceState] = []
        for span in spans:
            seconds = (span.end_ns - span.start_ns) / 1e9
            op = op_index.get((span.service, span.name))
            if op is None:
                op = self._op_id(span.service, span.name)
            stats = ops.get(op)
            if stats is None:
                stats = ops[op] = OpWindow()
            stats.count += 1
            stats.sketch.add(seconds)
            totals = op_totals[op]
            totals[0] += 1
            error = span.error
            if error:
                stats.errors += 1
                totals[1] += 1
                window.errors += 1
            kind = span.kind
            if kind in (KIND_SERVER, KIND_CONSUMER):
                window.entries += 1
                if error:
                    window.entry_errors += 1

            key = span.trace_id
            if key in alias:
                key = self._resolve(key)
            if span.correlation:
                key = self._link(key, span.correlation, now, touched)
            trace = traces.get(key)
            if trace is None:
                trace = self._new_trace(key, now)
            if len(trace.spans) < max_spans:
                trace.spans.append(span)
            else:
                trace.dropped_spans += 1
                self.spans_dropped_total += 1
            stage = classify(span)
            if stage == "gateway":
                if _is_webhook(span, stage):
                    window.webhooks += 1
                    self.webhooks_total += 1
                if kind == KIND_SERVER or span.stage == "gateway":
                    if not trace.gateway_start or span.start_ns < trace.gateway_start:
                        trace.gateway_start = span.start_ns
                    if trace.e2e is None:
                        touched.append(trace)
            elif stage == "send":
                if span.end_ns > trace.send_end:
                    trace.send_end = span.end_ns
                if trace.e2e is None:
                    touched.append(trace)
        for trace in touched:
            if traces.get(trace.trace_id) is not trace:
                continue  # merged into another message meanwhile
            if trace.e2e is None and trace.gateway_start and trace.send_end > trace.gateway_start:
                self._complete(trace, window, now)

    def _complete(self, trace: TraceState, window: Window, now: float) -> None:
        e2e = (trace.send_end - trace.gateway_start) / 1e9
        trace.e2e = e2e
        trace.completed_at = now
        trace.breakdown = breakdown(trace.spans, trace.gateway_start, trace.send_end)
        window.messages += 1
        window.e2e.add(e2e)
        self.messages_total += 1
        self.e2e_histogram.observe(e2e)
        for stage, seconds in trace.breakdown.items():
            sketch = window.stages.get(stage)
            if sketch is None:
                sketch = window.stages[stage] = Sketch()
            sketch.add(seconds)
            if stage in self.stage_histograms:
                self.stage_histograms[stage].observe(seconds)
        self._completed.append(Completed(trace.trace_id, e2e, now, trace.breakdown))

    # -- queries -----------------------------------------------------------------------------

    def _recent(self, now: float | None = None) -> list[Window]:
        now = self._clock() if now is None else now
        newest = int(now // self.window_seconds)
        cutoff = newest - self.recent_windows
        return [w for w in self._windows if w.index > cutoff]

    def end_to_end(self, now: float | None = None) -> Sketch:
        merged = Sketch()
        for w in self._recent(now):
            merged.merge(w.e2e)
        return merged

    def stage_summary(self, now: float | None = None) -> dict[str, dict[str, float | int | None]]:
        merged: dict[str, Sketch] = {stage: Sketch() for stage in STAGES}
        for w in self._recent(now):
            for stage, sketch in w.stages.items():
                merged.setdefault(stage, Sketch()).merge(sketch)
        return {stage: sketch.summary() for stage, sketch in merged.items()}

    def error_ratio(self, now: float | None = None) -> float | None:
        """Errored server/consumer spans over all of them, in the recent windows (None: no traffic)."""
        recent = self._recent(now)
        entries = sum(w.entries for w in recent)
        return sum(w.entry_errors for w in recent) / entries if entries else None

    def rates(self, now: float | None = None) -> dict[str, float]:
        now = self._clock() if now is None else now
        recent = self._recent(now)
        if not recent:
            return {"messages_per_minute": 0.0, "webhooks_per_minute": 0.0, "spans_per_second": 0.0}
        # Divide by the time actually covered: the current window is only partly elapsed.
        oldest = recent[0].index * self.window_seconds
        covered = max(1.0, min(now - oldest, self.recent_windows * self.window_seconds))
        return {
            "messages_per_minute": sum(w.messages for w in recent) * 60 / covered,
            "webhooks_per_minute": sum(w.webhooks for w in recent) * 60 / covered,
            "spans_per_second": sum(w.spans for w in recent) / covered,
        }

    def operations(self, now: float | None = None, limit: int = 100) -> list[dict[str, Any]]:
        merged: dict[int, OpWindow] = {}
        for w in self._recent(now):
            for op, stats in (w.ops or {}).items():
                into = merged.get(op)
                if into is None:
                    into = merged[op] = OpWindow()
                into.count += stats.count
                into.errors += stats.errors
                into.sketch.merge(stats.sketch)
        rows = []
        for op, stats in sorted(merged.items(), key=lambda kv: -kv[1].count)[:limit]:
            service, name = self._op_keys[op]
            summary = stats.sketch.summary()
            rows.append(
                {
                    "service": service,
                    "operation": name,
                    "count": stats.count,
                    "errors": stats.errors,
                    "p50": summary["p50"],
                    "p95": summary["p95"],
                    "p99": summary["p99"],
                }
            )
        return rows

    def operation_totals(self) -> list[tuple[str, str, int, int]]:
        """``(service, operation, spans, errors)`` since start, for Prometheus counters."""
        return [(*self._op_keys[i], t[0], t[1]) for i, t in enumerate(self._op_totals)]

    def series(self, now: float | None = None) -> list[dict[str, Any]]:
        """One point per window for the dashboard's charts: the last ``windows`` windows up to
        now, oldest first, empty windows included (so the time axis is regular)."""
        now = self._clock() if now is None else now
        newest = int(now // self.window_seconds)
        by_index = {w.index: w for w in self._windows}
        out = []
        for index in range(newest - (self._windows.maxlen or 1) + 1, newest + 1):
            w = by_index.get(index)
            out.append(
                {
                    "t": index * self.window_seconds,
                    "spans": w.spans if w else 0,
                    "messages": w.messages if w else 0,
                    "webhooks": w.webhooks if w else 0,
                    "errors": w.entry_errors if w else 0,
                    "entries": w.entries if w else 0,
                    "p50": w.e2e.quantile(0.5) if w else None,
                    "p95": w.e2e.quantile(0.95) if w else None,
                    "p99": w.e2e.quantile(0.99) if w else None,
                }
            )
        return out

    def slowest(self, limit: int = 20) -> list[dict[str, Any]]:
        """The slowest recently completed messages with their stage breakdown."""
        top = heapq.nlargest(limit, self._completed, key=lambda c: c.e2e)
        return [self._completed_view(c) for c in top]

    def _completed_view(self, c: Completed) -> dict[str, Any]:
        trace = self._traces.get(self._resolve(c.trace_id))
        if trace is not None and trace.e2e is not None:
            # Spans that arrived after completion (a parent ending last) refine the breakdown.
            parts = breakdown(trace.spans, trace.gateway_start, trace.send_end)
        else:
            parts = c.breakdown
        return {
            "trace_id": c.trace_id,
            "end_to_end_seconds": c.e2e,
            "completed_at": c.completed_at,
            "stages": parts,
        }

    def trace(self, trace_id: str) -> dict[str, Any] | None:
        state = self._traces.get(self._resolve(trace_id))
        if state is None:
            return None
        spans = sorted(state.spans, key=lambda s: s.start_ns)
        origin = state.gateway_start or (spans[0].start_ns if spans else 0)
        complete = state.e2e is not None
        stages = effective_stages(spans)
        return {
            "trace_id": state.trace_id,
            "trace_ids": state.trace_ids,
            "complete": complete,
            "end_to_end_seconds": state.e2e,
            "stages": breakdown(state.spans, state.gateway_start, state.send_end) if complete else None,
            "services": sorted({s.service for s in spans}),
            "dropped_spans": state.dropped_spans,
            "spans": [
                {
                    "span_id": s.span_id,
                    "parent_id": s.parent_id or None,
                    "service": s.service,
                    "name": s.name,
                    "stage": stages[s.span_id],
                    "kind": s.kind,
                    "error": s.error,
                    "offset_ms": round((s.start_ns - origin) / 1e6, 3),
                    "duration_ms": round((s.end_ns - s.start_ns) / 1e6, 3),
                }
                for s in spans
            ],
        }

    def stats(self) -> dict[str, int]:
        return {
            "spans_total": self.spans_total,
            "spans_rejected_total": self.spans_rejected_total,
            "payloads_rejected_total": self.payloads_rejected_total,
            "operations": len(self._op_keys),
            "operations_overflow_total": self.operations_overflow_total,
            "traces_kept": len(self._traces),
            "traces_evicted_total": self.traces_evicted_total,
            "traces_stitched_total": self.traces_stitched_total,
            "spans_dropped_total": self.spans_dropped_total,
            "messages_total": self.messages_total,
            "webhooks_total": self.webhooks_total,
        }
