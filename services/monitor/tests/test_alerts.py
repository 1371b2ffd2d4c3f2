"""Alert rules: parsing, pending -> firing -> resolved, and an alert fired by a real stopped service."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import Request

from orbion_common.service import create_service_app
from orbion_monitor.alerts import DEFAULT_RULES, AlertEngine, RuleError, load_rules, parse_rules
from orbion_monitor.app import build_app
from orbion_monitor.settings import Settings
from orbion_monitor.state import Monitor

ServeFactory = Callable[..., Any]  # the `serve` fixture of conftest.py


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def test_default_rules_cover_the_issue_thresholds() -> None:
    rules = {r.name: r for r in load_rules(None)}
    assert (rules["EndToEndLatencyHigh"].above, rules["EndToEndLatencyHigh"].for_seconds) == (2.0, 300)
    assert rules["ErrorRateHigh"].above == 0.01
    assert rules["CacheHitRatioLow"].below == 0.70
    assert (rules["BreakerOpen"].signal, rules["BreakerOpen"].for_seconds) == ("breaker_open", 60)
    assert rules["ServiceNotReady"].signal == "service_not_ready"
    assert rules["ConsumerLagHigh"].above == 1000
    assert rules["DiskAlmostFull"].above == 90
    assert DEFAULT_RULES.exists()


@pytest.mark.parametrize(
    "text",
    [
        "[[rules]]\nname = 'x'\nsignal = 'error_ratio'\n",  # no threshold
        "[[rules]]\nname = 'x'\nsignal = 'error_ratio'\nabove = 1\nbelow = 0\n",  # both
        "[[rules]]\nname = 'x'\nsignal = 'error_ratio'\nabove = 1\nfor = 5\n",  # unknown key
        "[[rules]]\nname = 'x'\nsignal = 'e'\nabove = 1\n[[rules]]\nname = 'x'\nsignal = 'e'\nabove = 2\n",
        "rules = 'nope'",
        "[[rules]\n",
    ],
)
def test_invalid_rule_files_are_refused_with_a_reason(text: str) -> None:
    with pytest.raises(RuleError):
        parse_rules(text)


def test_alert_waits_for_its_duration_fires_once_and_resolves() -> None:
    clock = Clock()
    rules = parse_rules("[[rules]]\nname = 'Slow'\nsignal = 'p99'\nabove = 2.0\nfor_seconds = 300\n")
    engine = AlertEngine(rules, clock=clock)
    assert engine.evaluate({"p99": {"": 2.5}}) == []
    assert engine.listing()["pending"][0]["name"] == "Slow"
    clock.now += 299
    assert engine.evaluate({"p99": {"": 3.0}}) == []
    clock.now += 1
    (fired,) = engine.evaluate({"p99": {"": 3.0}})
    assert (fired.state, fired.value) == ("firing", 3.0)
    clock.now += 10
    assert engine.evaluate({"p99": {"": 3.0}}) == []  # still firing: no second notification
    clock.now += 10
    (resolved,) = engine.evaluate({"p99": {"": 1.0}})
    assert resolved.state == "resolved"
    listing = engine.listing()
    assert listing["firing"] == [] and listing["resolved"][0]["name"] == "Slow"
    assert engine.fired_total == {"Slow": 1} and engine.resolved_total == {"Slow": 1}


def test_a_dip_below_the_threshold_restarts_the_wait_and_instances_are_separate() -> None:
    clock = Clock()
    rules = parse_rules("[[rules]]\nname = 'Low'\nsignal = 'hit'\nbelow = 0.7\nfor_seconds = 60\n")
    engine = AlertEngine(rules, clock=clock)
    engine.evaluate({"hit": {"conversation": 0.5, "lead": 0.9}})
    clock.now += 30
    engine.evaluate({"hit": {"conversation": 0.8, "lead": 0.9}})  # recovered: pending is dropped
    clock.now += 40
    assert engine.evaluate({"hit": {"conversation": 0.5, "lead": 0.5}}) == []
    clock.now += 60
    fired = engine.evaluate({"hit": {"conversation": 0.5, "lead": 0.5}})
    assert sorted(a.instance for a in fired) == ["conversation", "lead"]


async def test_alert_fires_when_a_service_stops_and_resolves_when_it_returns(
    tmp_path: Path, make_settings: Callable[..., Settings], serve: ServeFactory
) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text(
        "[[rules]]\nname = 'ServiceNotReady'\nsignal = 'service_not_ready'\nabove = 0\nfor_seconds = 0\n"
        "severity = 'critical'\nsummary = 'a service is not ready'\n"
    )
    received: list[dict[str, Any]] = []
    hook_settings = make_settings()
    hook = create_service_app("hook", hook_settings)

    @hook.post("/hook")
    async def take(request: Request) -> dict[str, str]:
        received.append(await request.json())
        return {}

    base = make_settings()
    async with serve(hook, hook_settings) as hook_url, httpx.AsyncClient(timeout=2) as client:
        lead = serve(create_service_app("lead", base), base)
        lead_url = await lead.__aenter__()
        settings = make_settings(
            monitor_targets={"lead": lead_url},
            monitor_alert_rules_file=rules,
            monitor_alert_webhook_url=f"{hook_url}/hook",
        )
        monitor = Monitor(settings, client)
        api = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=build_app(settings, monitor)), base_url="http://m"
        )
        try:
            assert await monitor.refresh() == []
            await lead.__aexit__(None, None, None)  # the lead service stops
            (fired,) = await monitor.refresh()
            assert (fired.rule.name, fired.instance, fired.state) == ("ServiceNotReady", "lead", "firing")
            firing = (await api.get("/api/alerts")).json()["firing"]
            assert [(a["name"], a["instance"]) for a in firing] == [("ServiceNotReady", "lead")]

            lead = serve(create_service_app("lead", base), base)
            settings_back = make_settings(
                monitor_targets={"lead": await lead.__aenter__()},
                monitor_alert_rules_file=rules,
                monitor_alert_webhook_url=f"{hook_url}/hook",
            )
            monitor.poller.settings = settings_back  # the service came back (on a new port)
            (resolved,) = await monitor.refresh()
            assert resolved.state == "resolved"
            listing = (await api.get("/api/alerts")).json()
            assert listing["firing"] == [] and listing["resolved"][0]["name"] == "ServiceNotReady"
            await monitor.alerts.drain()  # the webhook POSTs are fire-and-forget tasks
            assert [r["alert"]["state"] for r in received] == ["firing", "resolved"]
            metrics = (await api.get("/metrics")).text
            assert (
                'orbion_monitor_alert_transitions_total{alert="ServiceNotReady",state="firing"} 1.0'
                in metrics
            )
        finally:
            await api.aclose()
            await lead.__aexit__(None, None, None)
            await monitor.stop()
