"""Alert rules: loaded from TOML, evaluated against the monitor's signals, firing and resolving.

Owns the rule file format (see ``alerts.toml``, the packaged defaults), the pending -> firing
-> resolved state machine per (rule, instance), the log lines, counters and the optional
webhook POST of each transition. Where signal values come from is metrics.py's job.
"""

from __future__ import annotations

import asyncio
import logging
import time
import tomllib
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

log = logging.getLogger(__name__)

PENDING, FIRING, RESOLVED = "pending", "firing", "resolved"
DEFAULT_RULES = Path(__file__).parent / "alerts.toml"


class RuleError(ValueError):
    """The rules file is not valid (raised at start-up: a typo must not silently disable alerting)."""


@dataclass(frozen=True)
class Rule:
    name: str
    signal: str
    above: float | None = None
    below: float | None = None
    for_seconds: float = 0.0
    severity: str = "warning"
    summary: str = ""

    def breached(self, value: float) -> bool:
        if self.above is not None and value > self.above:
            return True
        return self.below is not None and value < self.below

    @property
    def threshold(self) -> str:
        return f"> {self.above:g}" if self.above is not None else f"< {self.below:g}"


_RULE_KEYS = {"name", "signal", "above", "below", "for_seconds", "severity", "summary"}


def parse_rules(text: str, source: str = "rules") -> list[Rule]:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RuleError(f"{source}: {exc}") from exc
    entries = document.get("rules", [])
    if not isinstance(entries, list):
        raise RuleError(f"{source}: 'rules' must be an array of tables ([[rules]])")
    rules: list[Rule] = []
    for i, entry in enumerate(entries):
        where = f"{source}: rule {i + 1}"
        unknown = set(entry) - _RULE_KEYS
        if unknown:
            raise RuleError(f"{where}: unknown keys {sorted(unknown)}")
        if not isinstance(entry.get("name"), str) or not isinstance(entry.get("signal"), str):
            raise RuleError(f"{where}: 'name' and 'signal' are required strings")
        if ("above" in entry) == ("below" in entry):
            raise RuleError(f"{where} ({entry['name']}): give exactly one of 'above' or 'below'")
        try:
            rule = Rule(
                name=entry["name"],
                signal=entry["signal"],
                above=float(entry["above"]) if "above" in entry else None,
                below=float(entry["below"]) if "below" in entry else None,
                for_seconds=float(entry.get("for_seconds", 0)),
                severity=str(entry.get("severity", "warning")),
                summary=str(entry.get("summary", "")),
            )
        except (TypeError, ValueError) as exc:
            raise RuleError(f"{where} ({entry['name']}): {exc}") from exc
        rules.append(rule)
    names = [r.name for r in rules]
    if len(set(names)) != len(names):
        raise RuleError(f"{source}: rule names must be unique")
    return rules


def load_rules(path: Path | None) -> list[Rule]:
    """Rules from ``path``, or the packaged defaults when None."""
    if path is None:
        return parse_rules(DEFAULT_RULES.read_text(encoding="utf-8"), "alerts.toml (defaults)")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise RuleError(f"cannot read alert rules {path}: {exc}") from exc
    return parse_rules(text, str(path))


@dataclass
class Alert:
    rule: Rule
    instance: str
    state: str
    since: float  # wall time the condition started holding
    value: float
    fired_at: float | None = None
    resolved_at: float | None = None
    labels: dict[str, str] = field(default_factory=dict)

    def view(self) -> dict[str, Any]:
        def iso(t: float | None) -> str | None:
            return None if t is None else datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")

        return {
            "name": self.rule.name,
            "instance": self.instance,
            "state": self.state,
            "severity": self.rule.severity,
            "summary": self.rule.summary,
            "signal": self.rule.signal,
            "threshold": self.rule.threshold,
            "for_seconds": self.rule.for_seconds,
            "value": self.value,
            "since": iso(self.since),
            "fired_at": iso(self.fired_at),
            "resolved_at": iso(self.resolved_at),
        }


class AlertEngine:
    """Evaluates rules; keeps active alerts and the last resolved ones. Event-loop only."""

    def __init__(
        self,
        rules: list[Rule],
        *,
        webhook_url: str = "",
        client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
        history: int = 200,
    ) -> None:
        self.rules = rules
        self.webhook_url = webhook_url
        self.client = client
        self._clock = clock
        self._active: dict[tuple[str, str], Alert] = {}
        self._resolved: deque[Alert] = deque(maxlen=history)
        self._tasks: set[asyncio.Task[None]] = set()
        self.fired_total: dict[str, int] = {}
        self.resolved_total: dict[str, int] = {}
        self.webhook_failures_total = 0
        self.evaluations_total = 0

    def evaluate(self, signals: Mapping[str, Mapping[str, float]]) -> list[Alert]:
        """Compare every rule with the current signals; returns the alerts that changed to
        firing or resolved in this evaluation."""
        now = self._clock()
        self.evaluations_total += 1
        changed: list[Alert] = []
        for rule in self.rules:
            values = signals.get(rule.signal, {})
            breached = {inst: v for inst, v in values.items() if rule.breached(v)}
            for instance, value in breached.items():
                key = (rule.name, instance)
                alert = self._active.get(key)
                if alert is None:
                    alert = self._active[key] = Alert(rule, instance, PENDING, now, value)
                alert.value = value
                if alert.state == PENDING and now - alert.since >= rule.for_seconds:
                    alert.state, alert.fired_at = FIRING, now
                    self.fired_total[rule.name] = self.fired_total.get(rule.name, 0) + 1
                    changed.append(alert)
            for key in [k for k in self._active if k[0] == rule.name and k[1] not in breached]:
                alert = self._active.pop(key)
                if alert.state == FIRING:
                    alert.state, alert.resolved_at = RESOLVED, now
                    if key[1] in values:
                        alert.value = values[key[1]]
                    self.resolved_total[rule.name] = self.resolved_total.get(rule.name, 0) + 1
                    self._resolved.append(alert)
                    changed.append(alert)
        for alert in changed:
            self._announce(alert)
        return changed

    def _announce(self, alert: Alert) -> None:
        view = alert.view()
        where = f" [{alert.instance}]" if alert.instance else ""
        if alert.state == FIRING:
            log.warning(
                "alert firing: %s%s %s", alert.rule.name, where, alert.rule.summary, extra={"alert": view}
            )
        else:
            log.info("alert resolved: %s%s", alert.rule.name, where, extra={"alert": view})
        if self.webhook_url and self.client is not None:
            task = asyncio.get_running_loop().create_task(self._post(view))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _post(self, view: dict[str, Any]) -> None:
        assert self.client is not None
        try:
            response = await self.client.post(
                self.webhook_url, json={"source": "orbion-monitor", "alert": view}, timeout=5.0
            )
            if response.status_code >= 400:
                raise RuntimeError(f"HTTP {response.status_code}")
        except Exception as exc:  # a dead webhook must not stop alerting
            self.webhook_failures_total += 1
            log.warning("alert webhook failed", extra={"error": f"{type(exc).__name__}: {exc}"[:200]})

    async def drain(self) -> None:
        """Wait for in-flight webhook POSTs (shutdown, tests)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def active(self) -> list[Alert]:
        return sorted(self._active.values(), key=lambda a: (a.state != FIRING, a.rule.name, a.instance))

    def listing(self) -> dict[str, Any]:
        """The body of ``GET /api/alerts``."""
        return {
            "firing": [a.view() for a in self.active() if a.state == FIRING],
            "pending": [a.view() for a in self.active() if a.state == PENDING],
            "resolved": [a.view() for a in reversed(self._resolved)],
            "rules": [
                {
                    "name": r.name,
                    "signal": r.signal,
                    "threshold": r.threshold,
                    "for_seconds": r.for_seconds,
                    "severity": r.severity,
                    "summary": r.summary,
                }
                for r in self.rules
            ],
        }

    def metric_families(self, prefix: str) -> Iterator[Metric]:
        firing = GaugeMetricFamily(prefix + "alerts_firing", "Alerts firing now, per rule.", labels=["alert"])
        counts: dict[str, int] = {r.name: 0 for r in self.rules}
        for alert in self._active.values():
            if alert.state == FIRING:
                counts[alert.rule.name] = counts.get(alert.rule.name, 0) + 1
        for name, n in counts.items():
            firing.add_metric([name], n)
        yield firing
        transitions = CounterMetricFamily(
            prefix + "alert_transitions",
            "Alerts that fired or resolved, per rule.",
            labels=["alert", "state"],
        )
        for name, n in self.fired_total.items():
            transitions.add_metric([name, FIRING], n)
        for name, n in self.resolved_total.items():
            transitions.add_metric([name, RESOLVED], n)
        yield transitions
