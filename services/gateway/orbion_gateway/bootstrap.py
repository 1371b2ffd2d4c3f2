"""The gateway's composition root: settings, logging, telemetry, bus, rate limiter, HTTP server.

``main()`` is what ``orbion serve gateway`` runs. The gateway has no Postgres (it owns no
events: it publishes inbound facts and answers 200 after JetStream acked), so no ``migrate``.
"""

from __future__ import annotations

import logging

from orbion_common.auth import require_production_secrets
from orbion_common.bus import Bus
from orbion_common.logging import configure_logging
from orbion_common.ratelimit import RateLimiter
from orbion_common.service import run, serve
from orbion_common.telemetry import setup_telemetry, shutdown_telemetry

from .app import SERVICE, Deps, build_app
from .settings import Settings

log = logging.getLogger(__name__)


async def build_deps(settings: Settings) -> Deps:
    """Connect the bus and the rate limiter (a Redis outage later is survived, see publisher)."""
    bus = await Bus.connect(settings, name=SERVICE)
    limiter = None
    if settings.redis_url:
        limiter = RateLimiter.from_url(settings.redis_url, prefix=settings.rate_limit_prefix)
    else:
        log.warning("ORBION_REDIS_URL not set: rate limits are off")
    return Deps(bus=bus, limiter=limiter)


async def _main(settings: Settings) -> None:
    deps = await build_deps(settings)
    try:
        app = build_app(settings, deps)
        log.info(
            "gateway listening",
            extra={"port": settings.gateway_port, "signature": settings.signature_required},
        )
        await serve(app, settings, settings.gateway_port)
    finally:
        # serve() returned after in-flight requests finished: their publishes are acked.
        await deps.bus.close()
        if deps.limiter is not None:
            await deps.limiter.close()
        shutdown_telemetry()


def main() -> None:
    settings = Settings()
    configure_logging(SERVICE, settings)
    require_production_secrets(settings, ["whatsapp_app_secret"])
    if not settings.signature_required:
        log.warning("ORBION_WHATSAPP_APP_SECRET not set: webhook signatures are NOT checked (development)")
    setup_telemetry(SERVICE, settings)
    run(_main(settings))
