"""The health roll-up against real NATS, Postgres and Redis and real service apps on real ports."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import nats
import pytest
from nats.js.api import ConsumerConfig, StreamConfig

from orbion_common.service import create_service_app
from orbion_monitor.health import HealthPoller, normalise_breaker_state
from orbion_monitor.settings import Settings

ServeFactory = Callable[..., Any]  # the `serve` fixture of conftest.py


@pytest.fixture
async def stream(infra: dict[str, str]) -> AsyncIterator[str]:
    """A JetStream stream of this test's own, with a durable consumer 3 messages behind."""
    name = f"ORBION_T{uuid.uuid4().hex[:10].upper()}"
    nc = await nats.connect(infra["nats"])
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name=name, subjects=[f"{name.lower()}.>"]))
    await js.add_consumer(name, ConsumerConfig(durable_name="test-lagging"))
    for i in range(3):
        await js.publish(f"{name.lower()}.x", f"m{i}".encode())
    try:
        yield name
    finally:
        await js.delete_stream(name)
        await nc.close()


def fake_service(name: str, settings: Settings, breakers: dict[str, Any]) -> Any:
    # A real ORBION service shell (create_service_app's /readyz and /metrics) reporting breakers
    # the way the llm-proxy does, in its readiness info.
    return create_service_app(name, settings, info=lambda: {"breakers": dict(breakers)})


async def test_rollup_is_ok_then_degraded_when_a_breaker_opens_then_down_when_a_service_stops(
    infra: dict[str, str], stream: str, make_settings: Callable[..., Settings], serve: ServeFactory,
    http: httpx.AsyncClient,
) -> None:  # fmt: skip
    base = make_settings()
    breakers: dict[str, Any] = {"openai": {"state": "closed"}, "whatsapp": "closed", "sheets": "closed"}
    async with serve(fake_service("gateway", base, {}), base) as gateway:
        llm = serve(fake_service("llm-proxy", base, breakers), base)
        llm_url = await llm.__aenter__()
        settings = make_settings(
            nats_url=infra["nats"],
            database_url=infra["postgres"],
            redis_url=infra["redis"],
            stream_name=stream,
            monitor_targets={"gateway": gateway, "llm-proxy": llm_url},
            monitor_memory_threshold_percent=100,
            monitor_disk_threshold_percent=100,
        )
        poller = HealthPoller(settings, http)
        try:
            report = await poller.poll()
            assert report["status"] == "ok", report["reasons"]
            assert report["services"]["gateway"]["ready"] is True
            assert report["dependencies"]["nats"]["consumers"]["test-lagging"]["pending"] == 3
            assert report["dependencies"]["postgres"]["status"] == "ok"
            assert report["dependencies"]["redis"]["status"] == "ok"
            assert report["breakers"]["openai"]["state"] == "closed"
            assert "memory_percent" in report["host"]
            assert "gateway" in poller.scrapes  # /metrics was scraped too

            breakers["openai"] = {"state": "open"}
            report = await poller.poll()
            assert report["status"] == "degraded"
            assert any("breaker openai" in r for r in report["reasons"])
            assert report["breakers"]["openai"]["open_seconds"] >= 0

            await llm.__aexit__(None, None, None)
            report = await poller.poll()
            assert report["status"] == "down"
            assert report["services"]["llm-proxy"]["ready"] is False
            assert any(r.startswith("llm-proxy:") for r in report["reasons"])
            assert report["services"]["gateway"]["ready"] is True
        finally:
            await poller.close()


async def test_unready_service_consumer_lag_and_full_disk_are_reported_with_reasons(
    infra: dict[str, str], stream: str, make_settings: Callable[..., Settings], serve: ServeFactory,
    http: httpx.AsyncClient,
) -> None:  # fmt: skip
    base = make_settings()

    async def broken() -> object:
        raise ConnectionError("database gone")

    unready = create_service_app("lead", base, checks={"postgres": broken})
    async with serve(unready, base) as lead:
        settings = make_settings(
            nats_url=infra["nats"],
            stream_name=stream,
            monitor_targets={"lead": lead},
            monitor_consumer_lag_threshold=2,
            monitor_disk_threshold_percent=0,
            monitor_memory_threshold_percent=100,
        )
        poller = HealthPoller(settings, http)
        try:
            report = await poller.poll()
        finally:
            await poller.close()
    assert report["status"] == "down"
    assert report["services"]["lead"]["http_status"] == 503
    assert report["services"]["lead"]["failing"] == ["postgres"]
    reasons = " | ".join(report["reasons"])
    assert "lead: not ready (HTTP 503: postgres)" in reasons
    assert "consumer test-lagging lag 3 > 2" in reasons
    assert "host: disk" in reasons


async def test_unreachable_dependencies_redis_degrades_postgres_and_nats_take_it_down(
    make_settings: Callable[..., Settings], http: httpx.AsyncClient
) -> None:
    settings = make_settings(
        redis_url="redis://127.0.0.1:1/0",
        monitor_memory_threshold_percent=100,
        monitor_disk_threshold_percent=100,
    )
    poller = HealthPoller(settings, http)
    try:
        report = await poller.poll()
        assert report["status"] == "degraded"
        assert report["dependencies"]["redis"]["status"] == "degraded"
        assert report["dependencies"]["postgres"]["status"] == "unknown"  # not configured: not judged
        poller.settings = make_settings(
            database_url="postgresql://postgres@127.0.0.1:1/test", nats_url="nats://127.0.0.1:1"
        )
        report = await poller.poll()
        assert report["status"] == "down"
        assert report["dependencies"]["postgres"]["status"] == "down"
        assert report["dependencies"]["nats"]["status"] == "down"
    finally:
        await poller.close()


def test_breaker_states_are_read_in_every_reported_shape() -> None:
    assert normalise_breaker_state("half-open") == "half_open"
    assert normalise_breaker_state({"state": "OPEN"}) == "open"
    assert normalise_breaker_state(2.0) == "open"
    assert normalise_breaker_state(0) == "closed"
    assert normalise_breaker_state("weird") == "unknown"
