"""The monitor's live state and its refresh loop: span aggregator, health poller, cache ratios
and alert engine, wired together.

Owns the order of one refresh (poll -> digest scrapes -> snapshot -> evaluate alerts) and the
background loop that repeats it. Routes (app.py) read from here; bootstrap.py starts and
stops it. Tests call :meth:`Monitor.refresh` directly instead of waiting for the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import httpx

from .aggregation import Aggregator
from .alerts import Alert, AlertEngine, load_rules
from .health import HealthPoller
from .metrics import CacheRatios, MonitorCollector, build_snapshot, signals
from .settings import Settings

log = logging.getLogger(__name__)


class Monitor:
    def __init__(self, settings: Settings, client: httpx.AsyncClient) -> None:
        self.settings = settings
        self.client = client
        self.aggregator = Aggregator(
            window_seconds=settings.monitor_window_seconds,
            windows=settings.monitor_windows,
            recent_seconds=settings.monitor_recent_seconds,
            max_operations=settings.monitor_max_operations,
            max_traces=settings.monitor_max_traces,
            max_spans_per_trace=settings.monitor_max_spans_per_trace,
        )
        self.poller = HealthPoller(settings, client)
        self.caches = CacheRatios()
        self.alerts = AlertEngine(
            load_rules(settings.monitor_alert_rules_file),
            webhook_url=settings.monitor_alert_webhook_url,
            client=client,
        )
        self.collector = MonitorCollector(lambda: (self.aggregator, self.snapshot(), self.alerts))
        self._task: asyncio.Task[None] | None = None
        self.refresh_errors_total = 0

    def snapshot(self) -> dict[str, Any]:
        return build_snapshot(
            self.aggregator,
            self.poller.last,
            self.poller.scrapes,
            self.caches,
            [a.view() for a in self.alerts.active()],
        )

    async def refresh(self) -> list[Alert]:
        """Poll everything once, then evaluate the alert rules; returns the alert transitions."""
        await self.poller.current(max_age=0.0)
        self.caches.update(self.poller.scrapes)
        return self.alerts.evaluate(signals(self.snapshot()))

    async def _loop(self) -> None:
        interval = self.settings.monitor_poll_interval_seconds
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad poll must not end monitoring
                self.refresh_errors_total += 1
                log.exception("monitor refresh failed")
            await asyncio.sleep(interval)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="monitor-refresh")

    def started(self) -> bool:
        return self._task is not None

    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.alerts.drain()
        await self.poller.close()
