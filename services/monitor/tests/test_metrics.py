"""Scraped service metrics become cache hit ratios, refusals and breaker states; the Grafana
dashboard only uses metric names the monitor really exports."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from orbion_monitor.bench import encode_protobuf, message_trace
from orbion_monitor.metrics import CacheRatios, parse_scrape, signals
from orbion_monitor.otlp import decode_protobuf
from orbion_monitor.settings import Settings
from orbion_monitor.state import Monitor

DASHBOARD = Path(__file__).resolve().parents[3] / "deploy" / "grafana" / "orbion-dashboard.json"

CONVERSATION_METRICS = """\
# TYPE orbion_cache_requests_total counter
orbion_cache_requests_total{cache="history",result="hit"} 80.0
orbion_cache_requests_total{cache="history",result="miss"} 15.0
orbion_cache_requests_total{cache="history",result="error"} 5.0
orbion_cache_requests_total{cache="history",result="bypass"} 40.0
# TYPE orbion_bus_handled_total counter
orbion_bus_handled_total{consumer="conversation-inbound",outcome="ok"} 100.0
"""
GATEWAY_METRICS = """\
# TYPE orbion_rate_limit_decisions_total counter
orbion_rate_limit_decisions_total{tier="ip",outcome="allowed"} 500.0
orbion_rate_limit_decisions_total{tier="ip",outcome="refused"} 7.0
orbion_rate_limit_decisions_total{tier="phone",outcome="refused"} 3.0
"""
LLM_METRICS = """\
# TYPE orbion_breaker_state gauge
orbion_breaker_state{breaker="openai"} 2.0
orbion_breaker_state{breaker="whatsapp"} 0.0
"""


def test_scrape_parsing_reads_caches_refusals_and_breakers() -> None:
    conversation = parse_scrape(CONVERSATION_METRICS, 0.0)
    assert conversation.cache_hits == 80 and conversation.cache_reads == 100  # bypasses are not reads
    gateway = parse_scrape(GATEWAY_METRICS, 0.0)
    assert gateway.rate_limit_refused == {"ip": 7.0, "phone": 3.0}
    assert parse_scrape(LLM_METRICS, 0.0).breakers == {"openai": 2.0, "whatsapp": 0.0}


def test_cache_hit_ratio_is_measured_on_recent_scrapes_and_survives_restarts() -> None:
    ratios = CacheRatios(span_seconds=300)
    ratios.update({"lead": parse_scrape('orbion_cache_requests_total{cache="lead",result="hit"} 10\n', 0.0)})
    ratios.update({"lead": parse_scrape(
        'orbion_cache_requests_total{cache="lead",result="hit"} 19\n'
        'orbion_cache_requests_total{cache="lead",result="miss"} 1\n', 60.0)})  # fmt: skip
    assert ratios.ratios()["lead"]["hit_ratio"] == pytest.approx(0.9)
    # A restarted service starts its counters again: no negative deltas.
    ratios.update(
        {"lead": parse_scrape('orbion_cache_requests_total{cache="lead",result="miss"} 2\n', 120.0)}
    )
    assert ratios.ratios()["lead"]["hit_ratio"] is None
    assert ratios.ratios()["lead"]["hit_ratio_total"] == 0.0


def sample_report() -> dict[str, Any]:
    return {
        "status": "degraded",
        "reasons": ["breaker openai (llm-proxy) is open"],
        "services": {"gateway": {"status": "ok", "ready": True}, "lead": {"status": "down", "ready": False}},
        "dependencies": {
            "postgres": {"status": "ok"},
            "redis": {"status": "ok"},
            "nats": {
                "status": "ok",
                "consumers": {"lead-inbound": {"pending": 1500, "ack_pending": 0}},
                "dead_letters": 2,
            },
        },
        "breakers": {"openai": {"state": "open", "service": "llm-proxy", "open_seconds": 70.0}},
        "host": {"status": "ok", "memory_percent": 40.0, "disk_percent": 95.0, "disk_path": "/"},
    }


@pytest.fixture
async def loaded_monitor(make_settings: Callable[..., Settings]) -> Any:
    async with httpx.AsyncClient() as client:
        monitor = Monitor(make_settings(), client)
        decoded = decode_protobuf(
            encode_protobuf(message_trace(b"\x07" * 16, 10**18, llm_ms=2500, error=True))
        )
        monitor.aggregator.add(decoded.spans)
        monitor.poller.last = sample_report()
        monitor.poller.scrapes = {
            "conversation": parse_scrape(CONVERSATION_METRICS, 1.0),
            "gateway": parse_scrape(GATEWAY_METRICS, 1.0),
        }
        monitor.caches.update(monitor.poller.scrapes)
        monitor.caches.update(
            {"conversation": parse_scrape(CONVERSATION_METRICS.replace("80.0", "90.0"), 2.0)}
        )
        yield monitor


async def test_signals_for_alert_rules_come_from_traces_health_and_scrapes(loaded_monitor: Monitor) -> None:
    found = signals(loaded_monitor.snapshot())
    assert found["end_to_end_p99_seconds"][""] == pytest.approx(2.613, rel=0.021)
    # 4 server/consumer spans, of which the llm-proxy handler failed (its client span is not counted).
    assert found["error_ratio"][""] == pytest.approx(1 / 4)
    assert found["cache_hit_ratio"] == {"conversation": 1.0}  # 10 more reads, all hits
    assert found["breaker_open"] == {"openai": 1.0}
    assert found["service_not_ready"] == {"gateway": 0.0, "lead": 1.0}
    assert found["consumer_lag"] == {"lead-inbound": 1500.0}
    assert found["disk_used_percent"] == {"/": 95.0}
    fired = {(a.rule.name, a.instance) for a in loaded_monitor.alerts.evaluate(found)}
    assert {("ServiceNotReady", "lead")} <= fired  # the only default rule without a duration


def exported_names(monitor: Monitor) -> set[str]:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(monitor.collector)
    names: set[str] = set()
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        names.update(sample.name for sample in family.samples)
    return names


async def test_every_metric_in_the_grafana_dashboard_is_exported(loaded_monitor: Monitor) -> None:
    names = exported_names(loaded_monitor)
    dashboard = json.loads(DASHBOARD.read_text())
    used = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"orbion_[a-z_]+", target["expr"])
    }
    assert used, "the dashboard queries no metric"
    assert used - names == set()
    for expected in (
        "orbion_monitor_cache_hit_ratio",
        "orbion_monitor_rate_limit_refusals_total",
        "orbion_monitor_breaker_state",
        "orbion_monitor_consumer_lag_messages",
        "orbion_monitor_messages_processed_total",
        "orbion_monitor_end_to_end_latency_seconds_bucket",
        "orbion_monitor_error_ratio",
    ):
        assert expected in names
