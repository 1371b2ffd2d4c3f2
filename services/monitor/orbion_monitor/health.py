"""The health roll-up behind ``GET /health``: every service's ``/readyz``, Postgres, NATS
(JetStream stream, consumer lag, dead letters), Redis, circuit breakers and this host.

Owns the probes and the rule that turns them into ``ok`` / ``degraded`` / ``down`` with
reasons. Every probe runs concurrently under a short timeout, so one hung dependency makes
the roll-up say so instead of hanging it. Each poll also scrapes the services' ``/metrics``
(parsed by metrics.py). Evaluating alerts on the result is alerts.py's job.

Severity, and why: a service that does not answer or says it is not ready, Postgres or NATS
unreachable, or the event stream missing is ``down`` (messages stop). Redis unreachable is
``degraded``: caches and rate limits fall back and messages still flow. An open or half-open
breaker, consumer lag over the threshold, dead letters and host memory or disk over the
thresholds are ``degraded``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil

from orbion_common.logging import mask_text

from .metrics import Scrape, parse_scrape
from .settings import Settings

log = logging.getLogger(__name__)

OK, DEGRADED, DOWN, UNKNOWN = "ok", "degraded", "down", "unknown"
_RANK = {OK: 0, UNKNOWN: 0, DEGRADED: 1, DOWN: 2}


def worst(*statuses: str) -> str:
    return max(statuses, key=lambda s: _RANK[s], default=OK)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return mask_text(f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__)


def normalise_breaker_state(value: object) -> str:
    """``closed`` / ``open`` / ``half_open`` from what a service reports (a string, or a dict
    with ``state`` as ``Breaker.info()`` gives, or the Prometheus gauge value 0/1/2)."""
    if isinstance(value, dict):
        value = value.get("state")
    if isinstance(value, int | float) and not isinstance(value, bool):
        return {0: "closed", 1: "half_open", 2: "open"}.get(int(value), "unknown")
    text = str(value or "").strip().lower().replace("-", "_").replace(" ", "_")
    return text if text in ("closed", "open", "half_open") else "unknown"


class HealthPoller:
    """Polls everything the monitor watches; keeps the last report and scrapes."""

    def __init__(
        self,
        settings: Settings,
        client: httpx.AsyncClient,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.client = client
        self.timeout = settings.monitor_check_timeout_seconds
        self._clock = clock
        self._pg: Any = None
        self._nats: Any = None
        self._redis: Any = None
        self._lock = asyncio.Lock()
        self._breaker_open_since: dict[str, float] = {}
        self.last: dict[str, Any] | None = None
        self.last_at = 0.0
        self.scrapes: dict[str, Scrape] = {}
        self.polls_total = 0

    # -- connections (lazy: the monitor starts even when a dependency is down) ---------------

    async def _pg_pool(self) -> Any:
        if self._pg is None:
            import asyncpg

            self._pg = await asyncpg.create_pool(
                self.settings.database_url, min_size=0, max_size=1, timeout=self.timeout
            )
        return self._pg

    async def _nats_js(self) -> Any:
        if self._nats is None or self._nats.is_closed:
            import nats

            async def quiet(_exc: Exception) -> None:  # reconnects are reported by the probe instead
                return None

            self._nats = await nats.connect(
                self.settings.nats_url,
                name="orbion-monitor",
                connect_timeout=self.timeout,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                error_cb=quiet,
            )
        if not self._nats.is_connected:
            raise ConnectionError("not connected to NATS (reconnecting)")
        return self._nats.jetstream()

    def _redis_client(self) -> Any:
        if self._redis is None:
            from redis.asyncio import Redis

            self._redis = Redis.from_url(
                self.settings.redis_url, socket_timeout=self.timeout, socket_connect_timeout=self.timeout
            )
        return self._redis

    async def close(self) -> None:
        if self._pg is not None:
            with contextlib.suppress(Exception):
                await self._pg.close()
        if self._nats is not None and not self._nats.is_closed:
            with contextlib.suppress(Exception):
                await self._nats.close()
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose()

    # -- probes ------------------------------------------------------------------------------

    async def _bounded(self, probe: Awaitable[dict[str, Any]]) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout):
                result = await probe
        except TimeoutError:
            result = {"status": DOWN, "error": f"timeout after {self.timeout:g}s"}
        except Exception as exc:
            result = {"status": DOWN, "error": _describe(exc)}
        result["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)
        return result

    async def _service(self, name: str, base_url: str) -> dict[str, Any]:
        async def readyz() -> dict[str, Any]:
            response = await self.client.get(f"{base_url}/readyz")
            try:
                body = response.json()
            except ValueError:
                body = {}
            body = body if isinstance(body, dict) else {}
            checks = body.get("checks")
            checks = checks if isinstance(checks, dict) else {}
            failing = sorted(k for k, v in checks.items() if isinstance(v, dict) and not v.get("ok", True))
            ready = response.status_code == 200
            info = body.get("info") if isinstance(body.get("info"), dict) else {}
            return {
                "status": OK if ready else DOWN,
                "ready": ready,
                "http_status": response.status_code,
                "failing": failing,
                "info": info,
            }

        async def scrape() -> None:
            response = await self.client.get(f"{base_url}/metrics")
            if response.status_code == 200:
                self.scrapes[name] = parse_scrape(response.text, self._clock())

        result: dict[str, Any]
        result, _ = await asyncio.gather(self._bounded(readyz()), self._bounded_quiet(scrape()))
        result.setdefault("ready", False)
        result["url"] = base_url
        return result

    async def _bounded_quiet(self, probe: Awaitable[None]) -> None:
        # A failed scrape leaves the previous one in place; readiness says what is wrong.
        try:
            async with asyncio.timeout(self.timeout):
                await probe
        except Exception as exc:
            log.debug("scrape failed", extra={"error": _describe(exc)})

    async def _postgres(self) -> dict[str, Any]:
        if not self.settings.database_url:
            return {"status": UNKNOWN, "error": "not configured"}
        pool = await self._pg_pool()
        async with pool.acquire() as conn:
            version = await conn.fetchval("SHOW server_version")
        return {"status": OK, "version": version}

    async def _nats_probe(self) -> dict[str, Any]:
        if not self.settings.nats_url:
            return {"status": UNKNOWN, "error": "not configured"}
        js = await self._nats_js()
        stream = self.settings.stream_name
        try:
            info = await js.stream_info(stream)
        except Exception as exc:
            return {"status": DOWN, "error": f"stream {stream} unavailable: {_describe(exc)}"}
        consumers = {
            c.name: {"pending": int(c.num_pending or 0), "ack_pending": int(c.num_ack_pending or 0)}
            for c in await js.consumers_info(stream)
        }
        dead_letters = None
        with contextlib.suppress(Exception):  # the DLQ stream appears with the first consumer
            dead_letters = int((await js.stream_info(f"{stream}_DLQ")).state.messages)
        threshold = self.settings.monitor_consumer_lag_threshold
        lagging = sorted(n for n, c in consumers.items() if c["pending"] > threshold)
        result: dict[str, Any] = {
            "status": DEGRADED if lagging or dead_letters else OK,
            "stream": {"name": stream, "messages": int(info.state.messages), "bytes": int(info.state.bytes)},
            "consumers": consumers,
            "dead_letters": dead_letters,
        }
        reasons = [f"consumer {n} lag {consumers[n]['pending']} > {threshold}" for n in lagging]
        if dead_letters:
            reasons.append(f"{dead_letters} dead-lettered events in {stream}_DLQ")
        if reasons:
            result["reasons"] = reasons
        return result

    async def _redis_probe(self) -> dict[str, Any]:
        if not self.settings.redis_url:
            return {"status": UNKNOWN, "error": "not configured"}
        await self._redis_client().ping()
        return {"status": OK}

    def _host(self) -> dict[str, Any]:
        memory = psutil.virtual_memory().percent
        path = Path(self.settings.data_dir).absolute()
        while not path.exists() and path != path.parent:
            path = path.parent  # the data folder may not exist yet: measure its file system
        disk = psutil.disk_usage(str(path)).percent
        reasons = []
        if memory > self.settings.monitor_memory_threshold_percent:
            reasons.append(f"memory {memory:.0f}% > {self.settings.monitor_memory_threshold_percent:g}%")
        if disk > self.settings.monitor_disk_threshold_percent:
            reasons.append(f"disk {disk:.0f}% > {self.settings.monitor_disk_threshold_percent:g}% ({path})")
        return {
            "status": DEGRADED if reasons else OK,
            "memory_percent": memory,
            "disk_percent": disk,
            "disk_path": str(path),
            "reasons": reasons,
        }

    def _breakers(self, services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        now = self._clock()
        found: dict[str, dict[str, Any]] = {}
        for service, report in services.items():
            reported = (report.get("info") or {}).get("breakers")
            if isinstance(reported, dict):
                for name, value in reported.items():
                    found[str(name)] = {"state": normalise_breaker_state(value), "service": service}
        # Services that report no breakers in /readyz may still export the gauge.
        for service, scrape in self.scrapes.items():
            for name, value in scrape.breakers.items():
                found.setdefault(name, {"state": normalise_breaker_state(value), "service": service})
        for name, breaker in found.items():
            if breaker["state"] == "open":
                since = self._breaker_open_since.setdefault(name, now)
                breaker["open_seconds"] = round(now - since, 1)
            else:
                self._breaker_open_since.pop(name, None)
        return found

    async def poll(self) -> dict[str, Any]:
        """Probe everything now; returns (and keeps) the roll-up."""
        targets = self.settings.targets()
        names = list(targets)
        results = await asyncio.gather(
            *(self._service(name, targets[name]) for name in names),
            self._bounded(self._postgres()),
            self._bounded(self._nats_probe()),
            self._bounded(self._redis_probe()),
        )
        services = dict(zip(names, results[: len(names)], strict=True))
        postgres, nats_report, redis_report = results[len(names) :]
        # Scrapes of services that are no longer targets are dropped.
        for gone in set(self.scrapes) - set(names):
            del self.scrapes[gone]
        try:
            host = self._host()
        except Exception as exc:
            host = {"status": UNKNOWN, "error": _describe(exc)}
        breakers = self._breakers(services)

        reasons: list[str] = []
        status = OK
        for name, svc in services.items():
            if svc["status"] != OK:
                why = svc.get("error") or (
                    f"not ready (HTTP {svc.get('http_status')}"
                    + (f": {', '.join(svc['failing'])})" if svc.get("failing") else ")")
                )
                reasons.append(f"{name}: {why}")
                status = worst(status, DOWN)
        for dep, report, failing_status in (
            ("postgres", postgres, DOWN),
            ("nats", nats_report, DOWN),
            ("redis", redis_report, DEGRADED),
        ):
            if report["status"] == DOWN:
                reasons.append(f"{dep}: {report.get('error', 'down')}")
                status = worst(status, failing_status)
                report["status"] = failing_status
            elif report["status"] == DEGRADED:
                reasons.extend(f"{dep}: {r}" for r in report.get("reasons", []))
                status = worst(status, DEGRADED)
        for name, breaker in sorted(breakers.items()):
            if breaker["state"] in ("open", "half_open"):
                reasons.append(
                    f"breaker {name} ({breaker['service']}) is {breaker['state'].replace('_', '-')}"
                )
                status = worst(status, DEGRADED)
        if host["status"] == DEGRADED:
            reasons.extend(f"host: {r}" for r in host["reasons"])
            status = worst(status, DEGRADED)

        report = {
            "status": status,
            "reasons": reasons,
            "checked_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "services": services,
            "dependencies": {"postgres": postgres, "nats": nats_report, "redis": redis_report},
            "breakers": breakers,
            "host": host,
        }
        self.last, self.last_at = report, self._clock()
        self.polls_total += 1
        return report

    async def current(self, max_age: float = 1.0) -> dict[str, Any]:
        """The last report if younger than ``max_age`` seconds, else a fresh poll (one at a time)."""
        async with self._lock:
            if self.last is not None and self._clock() - self.last_at <= max_age:
                return self.last
            return await self.poll()
