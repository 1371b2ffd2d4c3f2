"""Composition root of the monitor: settings, logging, telemetry, the live state, the server.

The monitor has no event store and no consumers: it reads what the other services expose
(OTLP spans, ``/readyz``, ``/metrics``) and JetStream's consumer info. Nothing here runs at
import time; ``orbion serve monitor`` calls :func:`main`.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

import httpx

from orbion_common.logging import configure_logging
from orbion_common.service import run, serve
from orbion_common.telemetry import setup_telemetry, shutdown_telemetry

from .app import SERVICE, build_app
from .settings import Settings
from .state import Monitor

log = logging.getLogger(__name__)


def exports_to_itself(settings: Settings) -> bool:
    """True when ORBION_OTLP_ENDPOINT is this monitor's own /v1/traces: exporting the monitor's
    spans there would trace every export, which exports a span, for ever."""
    endpoint = urlsplit(settings.otlp_endpoint.strip())
    if not endpoint.netloc:
        return False
    local_hosts = {settings.host, "127.0.0.1", "localhost", "0.0.0.0", "::1"}
    return (endpoint.hostname in local_hosts and endpoint.port == settings.monitor_port) and (
        endpoint.path.rstrip("/").endswith("/v1/traces")
    )


async def _main(settings: Settings) -> None:
    limits = httpx.Limits(max_connections=50, max_keepalive_connections=20)
    async with httpx.AsyncClient(timeout=settings.monitor_check_timeout_seconds, limits=limits) as client:
        monitor = Monitor(settings, client)
        app = build_app(settings, monitor)
        monitor.start()
        log.info(
            "monitor watching",
            extra={
                "targets": settings.targets(),
                "port": settings.monitor_port,
                "rules": len(monitor.alerts.rules),
            },
        )
        try:
            await serve(app, settings, settings.monitor_port)
        finally:
            await monitor.stop()
            shutdown_telemetry()


def main() -> None:
    settings = Settings()
    configure_logging(SERVICE, settings)
    if not exports_to_itself(settings):
        setup_telemetry(SERVICE, settings)
    run(_main(settings))


if __name__ == "__main__":
    main()
