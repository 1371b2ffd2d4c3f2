"""What the monitor exports as figures: the services' scraped ``/metrics`` digested, the JSON of
``GET /api/metrics``, the signals alert rules read, and the Prometheus collector of ``/metrics``.

Owns the monitor's metric names (all ``orbion_monitor_*``, so they never clash with the
services' own metrics when one process hosts several apps, as tests do) and the reading of the
services' metric names: ``orbion_cache_requests_total{cache,result}``,
``orbion_rate_limit_decisions_total{tier,outcome}``, ``orbion_breaker_state{breaker}``,
``orbion_bus_handled_total{consumer,outcome}``, ``orbion_bus_dead_letters_total{consumer}``.
Trace-derived figures come from aggregation.py, health from health.py.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import REGISTRY
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from .aggregation import STAGES, Aggregator

CACHE_RATIO_SECONDS = 300.0  # the cache hit ratio is measured over the last 5 minutes of scrapes


@dataclass
class Scrape:
    """The figures the monitor reads from one service's ``/metrics``."""

    at: float
    cache: dict[str, dict[str, float]] = field(default_factory=dict)  # cache -> result -> count
    rate_limit_refused: dict[str, float] = field(default_factory=dict)  # tier -> count
    breakers: dict[str, float] = field(default_factory=dict)  # breaker -> 0 closed, 1 half-open, 2 open
    bus_handled: dict[str, dict[str, float]] = field(default_factory=dict)  # consumer -> outcome -> count
    dead_letters: dict[str, float] = field(default_factory=dict)  # consumer -> count

    @property
    def cache_hits(self) -> float:
        return sum(r.get("hit", 0.0) for r in self.cache.values())

    @property
    def cache_reads(self) -> float:
        # A Redis error on read is served by the loader: a miss for the user. Bypasses are not reads.
        return sum(r.get("hit", 0.0) + r.get("miss", 0.0) + r.get("error", 0.0) for r in self.cache.values())


def parse_scrape(text: str, at: float) -> Scrape:
    """Parse Prometheus text exposition; unknown metrics are ignored."""
    scrape = Scrape(at=at)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, float(sample.value)
            if name == "orbion_cache_requests_total":
                cache = scrape.cache.setdefault(labels.get("cache", ""), {})
                result = labels.get("result", "")
                cache[result] = cache.get(result, 0.0) + value
            elif name == "orbion_rate_limit_decisions_total" and labels.get("outcome") == "refused":
                tier = labels.get("tier", "")
                scrape.rate_limit_refused[tier] = scrape.rate_limit_refused.get(tier, 0.0) + value
            elif name == "orbion_breaker_state":
                scrape.breakers[labels.get("breaker", "")] = value
            elif name == "orbion_bus_handled_total":
                handled = scrape.bus_handled.setdefault(labels.get("consumer", ""), {})
                outcome = labels.get("outcome", "")
                handled[outcome] = handled.get(outcome, 0.0) + value
            elif name == "orbion_bus_dead_letters_total":
                scrape.dead_letters[labels.get("consumer", "")] = value
    return scrape


class CacheRatios:
    """Cache hit ratio per service over the last few minutes of scrapes (counter deltas)."""

    def __init__(self, span_seconds: float = CACHE_RATIO_SECONDS) -> None:
        self.span_seconds = span_seconds
        self._history: dict[str, deque[tuple[float, float, float]]] = {}

    def update(self, scrapes: Mapping[str, Scrape]) -> None:
        for service, scrape in scrapes.items():
            if not scrape.cache:
                continue
            history = self._history.setdefault(service, deque(maxlen=512))
            point = (scrape.at, scrape.cache_hits, scrape.cache_reads)
            if history and history[-1][0] == point[0]:
                continue  # same scrape seen twice
            if history and (point[1] < history[-1][1] or point[2] < history[-1][2]):
                history.clear()  # the service restarted: its counters began again
            history.append(point)
            while len(history) > 2 and history[1][0] <= point[0] - self.span_seconds:
                history.popleft()

    def ratios(self) -> dict[str, dict[str, float | None]]:
        out: dict[str, dict[str, float | None]] = {}
        for service, history in self._history.items():
            if not history:
                continue
            _, hits, reads = history[-1]
            _, hits0, reads0 = history[0]
            delta = reads - reads0
            out[service] = {
                "hit_ratio": (hits - hits0) / delta if delta > 0 else None,
                "hit_ratio_total": hits / reads if reads else None,
                "hits_total": hits,
                "reads_total": reads,
            }
        return out


def build_snapshot(
    aggregator: Aggregator,
    health: Mapping[str, Any] | None,
    scrapes: Mapping[str, Scrape],
    caches: CacheRatios,
    alerts: list[dict[str, Any]],
) -> dict[str, Any]:
    """The JSON of ``GET /api/metrics`` (the dashboard reads it every few seconds)."""
    now = time.time()
    e2e = aggregator.end_to_end(now).summary()
    rates = aggregator.rates(now)
    stats = aggregator.stats()
    refused: dict[str, float] = {}
    handled_errors = 0.0
    dead_letters = 0.0
    for scrape in scrapes.values():
        for tier, n in scrape.rate_limit_refused.items():
            refused[tier] = refused.get(tier, 0.0) + n
        for outcomes in scrape.bus_handled.values():
            handled_errors += sum(
                n for outcome, n in outcomes.items() if outcome not in ("ok", "acked", "success")
            )
        dead_letters += sum(scrape.dead_letters.values())
    health = health or {}
    nats = (health.get("dependencies") or {}).get("nats") or {}
    return {
        "generated_at": now,
        "window_seconds": aggregator.window_seconds,
        "recent_seconds": aggregator.recent_windows * aggregator.window_seconds,
        "messages": {
            "processed_total": stats["messages_total"],
            "per_minute": rates["messages_per_minute"],
            "webhooks_total": stats["webhooks_total"],
            "webhooks_per_minute": rates["webhooks_per_minute"],
        },
        "end_to_end": e2e,
        "stages": aggregator.stage_summary(now),
        "error_ratio": aggregator.error_ratio(now),
        "spans": {**stats, "per_second": rates["spans_per_second"]},
        "operations": aggregator.operations(now),
        "series": aggregator.series(now),
        "cache": caches.ratios(),
        "rate_limit_refusals": refused,
        "rate_limit_refusals_total": sum(refused.values()),
        "consumer_handler_failures_total": handled_errors,
        "breakers": health.get("breakers", {}),
        "consumer_lag": {name: c.get("pending", 0) for name, c in (nats.get("consumers") or {}).items()},
        "dead_letters": nats.get("dead_letters") if nats.get("dead_letters") is not None else dead_letters,
        "health": {
            "status": health.get("status", "unknown"),
            "reasons": health.get("reasons", []),
            "checked_at": health.get("checked_at"),
            "services": {
                name: {"status": s.get("status"), "ready": s.get("ready"), "latency_ms": s.get("latency_ms")}
                for name, s in (health.get("services") or {}).items()
            },
            "dependencies": {name: d.get("status") for name, d in (health.get("dependencies") or {}).items()},
        },
        "host": health.get("host", {}),
        "alerts": {"firing": sum(1 for a in alerts if a["state"] == "firing"), "active": alerts},
    }


def signals(snapshot: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """The values alert rules compare, per instance: ``{signal: {instance: value}}``.
    A signal without data (no traffic yet) has no instance, so its rules stay quiet."""
    out: dict[str, dict[str, float]] = {}
    p99 = snapshot["end_to_end"].get("p99")
    out["end_to_end_p99_seconds"] = {} if p99 is None else {"": float(p99)}
    ratio = snapshot.get("error_ratio")
    out["error_ratio"] = {} if ratio is None else {"": float(ratio)}
    out["cache_hit_ratio"] = {
        service: float(c["hit_ratio"])
        for service, c in snapshot["cache"].items()
        if c.get("hit_ratio") is not None
    }
    out["breaker_open"] = {
        name: 1.0 if b.get("state") == "open" else 0.0 for name, b in snapshot["breakers"].items()
    }
    out["service_not_ready"] = {
        name: 0.0 if s.get("ready") else 1.0 for name, s in snapshot["health"]["services"].items()
    }
    out["consumer_lag"] = {name: float(n) for name, n in snapshot["consumer_lag"].items()}
    host = snapshot.get("host") or {}
    out["disk_used_percent"] = (
        {} if "disk_percent" not in host else {host.get("disk_path", ""): host["disk_percent"]}
    )
    out["memory_used_percent"] = {} if "memory_percent" not in host else {"": host["memory_percent"]}
    out["health_down"] = {"": 1.0 if snapshot["health"]["status"] == "down" else 0.0}
    return out


_STATUS_VALUE = {"ok": 0.0, "degraded": 1.0, "down": 2.0}
_BREAKER_VALUE = {"closed": 0.0, "half_open": 1.0, "open": 2.0}


class MonitorCollector(Collector):
    """Prometheus view of the monitor's state, computed at scrape time (nothing per span)."""

    def __init__(self, state: Callable[[], tuple[Aggregator, dict[str, Any], Any]]) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        aggregator, snapshot, alert_engine = self._state()
        p = "orbion_monitor_"
        stats = aggregator.stats()
        for name, key, doc in (
            ("spans_received", "spans_total", "Spans received over OTLP and aggregated."),
            ("spans_rejected", "spans_rejected_total", "Spans skipped because they could not be understood."),
            (
                "otlp_requests_rejected",
                "payloads_rejected_total",
                "OTLP requests refused as malformed (400/413/415).",
            ),
            (
                "operations_overflow",
                "operations_overflow_total",
                "Spans counted under _other (operation cap).",
            ),
            (
                "messages_processed",
                "messages_total",
                "Messages whose reply was sent (webhook to send in one trace).",
            ),
            ("webhooks_received", "webhooks_total", "WhatsApp webhook requests seen by the gateway."),
        ):
            yield CounterMetricFamily(p + name, doc, value=stats[key])

        spans = CounterMetricFamily(
            p + "operation_spans", "Spans per service and operation.", labels=["service", "operation"]
        )
        errors = CounterMetricFamily(
            p + "operation_errors",
            "Spans with error status per service and operation.",
            labels=["service", "operation"],
        )
        for service, operation, count, errs in aggregator.operation_totals():
            spans.add_metric([service, operation], count)
            errors.add_metric([service, operation], errs)
        yield spans
        yield errors
        latency = GaugeMetricFamily(
            p + "operation_duration_seconds",
            "Span duration quantiles per operation over the recent window.",
            labels=["service", "operation", "quantile"],
        )
        for row in snapshot["operations"]:
            for q in ("p50", "p95", "p99"):
                if row[q] is not None:
                    latency.add_metric([row["service"], row["operation"], "0." + q[1:]], row[q])
        yield latency

        yield _histogram(
            p + "end_to_end_latency_seconds",
            "Webhook received to reply sent, per message.",
            aggregator.e2e_histogram,
        )
        recent = GaugeMetricFamily(
            p + "end_to_end_latency_recent_seconds",
            "End-to-end latency quantiles over the recent window.",
            labels=["quantile"],
        )
        for q in ("p50", "p95", "p99"):
            value = snapshot["end_to_end"].get(q)
            if value is not None:
                recent.add_metric(["0." + q[1:]], value)
        yield recent
        stage_hist = HistogramMetricFamily(
            p + "stage_duration_seconds", "Time a message spends in each stage of its trip.", labels=["stage"]
        )
        for stage in STAGES:
            h = aggregator.stage_histograms[stage]
            stage_hist.add_metric([stage], h.cumulative(), h.total)
        yield stage_hist

        ratio = snapshot.get("error_ratio")
        if ratio is not None:
            yield GaugeMetricFamily(
                p + "error_ratio", "Errored server/consumer spans over all, recent window.", value=ratio
            )

        cache = GaugeMetricFamily(
            p + "cache_hit_ratio", "Cache hits over reads, last 5 minutes.", labels=["service"]
        )
        for service, c in snapshot["cache"].items():
            value = c["hit_ratio"] if c["hit_ratio"] is not None else c["hit_ratio_total"]
            if value is not None:
                cache.add_metric([service], value)
        yield cache
        refusals = CounterMetricFamily(
            p + "rate_limit_refusals", "Requests refused by rate limits, by tier.", labels=["tier"]
        )
        for tier, n in snapshot["rate_limit_refusals"].items():
            refusals.add_metric([tier], n)
        yield refusals
        breakers = GaugeMetricFamily(
            p + "breaker_state",
            "Circuit breaker state (0 closed, 1 half-open, 2 open).",
            labels=["breaker", "service"],
        )
        for name, b in snapshot["breakers"].items():
            if b.get("state") in _BREAKER_VALUE:
                breakers.add_metric([name, b.get("service", "")], _BREAKER_VALUE[b["state"]])
        yield breakers
        lag = GaugeMetricFamily(
            p + "consumer_lag_messages",
            "Messages not yet delivered to a durable consumer.",
            labels=["consumer"],
        )
        for name, n in snapshot["consumer_lag"].items():
            lag.add_metric([name], n)
        yield lag
        if snapshot.get("dead_letters") is not None:
            yield GaugeMetricFamily(
                p + "dead_letter_messages",
                "Events in the dead-letter stream.",
                value=snapshot["dead_letters"],
            )
        up = GaugeMetricFamily(
            p + "service_ready", "1 when the service's /readyz answers 200.", labels=["service"]
        )
        for name, s in snapshot["health"]["services"].items():
            up.add_metric([name], 1.0 if s.get("ready") else 0.0)
        yield up
        status = snapshot["health"]["status"]
        if status in _STATUS_VALUE:
            yield GaugeMetricFamily(
                p + "health_status", "Roll-up: 0 ok, 1 degraded, 2 down.", value=_STATUS_VALUE[status]
            )
        host = snapshot.get("host") or {}
        if "memory_percent" in host:
            yield GaugeMetricFamily(
                p + "host_memory_used_ratio", "Host memory in use (0-1).", value=host["memory_percent"] / 100
            )
        if "disk_percent" in host:
            yield GaugeMetricFamily(
                p + "host_disk_used_ratio", "Disk in use (0-1).", value=host["disk_percent"] / 100
            )
        if alert_engine is not None:
            yield from alert_engine.metric_families(p)


def _histogram(name: str, doc: str, h: Any) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, buckets=h.cumulative(), sum_value=h.total)


class _Proxy(Collector):
    """Registered once in the default registry; points at the newest monitor app's state."""

    target: MonitorCollector | None = None

    def collect(self) -> Iterator[Metric]:
        if self.target is not None:
            yield from self.target.collect()


_proxy = _Proxy()
_registered = False


def install(collector: MonitorCollector) -> None:
    """Expose ``collector`` on the default registry (which create_service_app's /metrics serves)."""
    global _registered
    _proxy.target = collector
    if not _registered:
        REGISTRY.register(_proxy)
        _registered = True
