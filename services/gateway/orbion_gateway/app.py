"""The gateway's HTTP app: webhook routes, probes and metrics.

``build_app`` wires :class:`~orbion_gateway.webhooks.Webhooks` (the intake) into the shared
service shell. The POST webhook routes are declared to FastAPI, so that the OpenAPI document
describes them (and they work if the fast path is taken out), but they are served by
:class:`WebhookFastPath`, which answers them in front of the whole middleware stack: measured
with py-spy at saturation, the generic layers (OpenTelemetry's ASGI middleware with its
per-message spans and attribute collection, FastAPI's router and request handling) cost two to
three times the webhook's own work (signature, parsing, rate limit, publish). Both paths run
the same intake code.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import Response
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from orbion_common.bus import Bus
from orbion_common.health import bus_check
from orbion_common.ratelimit import RateLimiter, Tier
from orbion_common.service import HTTP_REQUEST_DURATION, HTTP_REQUESTS, create_service_app

from .publisher import Publisher
from .settings import Settings
from .webhooks import Reply, Webhooks

log = logging.getLogger(__name__)

_tracer = trace.get_tracer("orbion.gateway")
_INTERNAL_ERROR = b'{"error":{"type":"internal_error"}}'

SERVICE = "gateway"
WHATSAPP_PATH = "/webhooks/whatsapp"
EVOLUTION_PATH = "/webhooks/evolution"


@dataclass
class Deps:
    bus: Bus
    limiter: RateLimiter | None  # None: Redis not configured, rate limits off (development only)


_WEBHOOK_BODY = {
    "required": True,
    "content": {"application/json": {"schema": {"type": "object", "additionalProperties": True}}},
}
_WEBHOOK_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Every event acked by JetStream: `{published, duplicates, throttled, ...}`."},
    400: {"description": "Body is not JSON, or not a webhook of this provider."},
    401: {"description": "Signature or API key missing or wrong."},
    413: {"description": "Body larger than ORBION_MAX_BODY_BYTES."},
    415: {"description": "Content type is not application/json."},
    429: {"description": "Unverified requests over the per-IP limit; see Retry-After."},
    503: {"description": "JetStream did not acknowledge: retry later, nothing was lost."},
}


def _response(reply: Reply) -> Response:
    return Response(
        reply.body, status_code=reply.status, headers=dict(reply.headers), media_type=reply.media_type
    )


class WebhookFastPath:
    """Serves POSTs to the webhook paths straight from ASGI, outermost (see the module docstring).

    It keeps what the shared shell gives every request, more cheaply: one SERVER span (the
    trace the bus continues into NATS headers), the ``orbion_http_requests_total`` and
    duration metrics with the route label, and a 500 JSON body that reveals nothing if the
    intake ever raises. Every other request goes to the app untouched.
    """

    def __init__(
        self, app: ASGIApp, handlers: Mapping[str, Callable[..., Any]], routes: Mapping[str, BaseRoute]
    ):
        self.app = app
        self.handlers = handlers
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = self.handlers.get(scope["path"]) if scope["type"] == "http" else None
        if handler is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        scope["route"] = self.routes[path]
        started = time.perf_counter()
        span = _tracer.start_span(f"POST {path}", kind=SpanKind.SERVER)
        # Made current by hand: start_as_current_span's two generator-based context managers
        # cost about as much as the span itself.
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            try:
                reply: Reply = await handler(scope, receive)
            except Exception as exc:
                span.record_exception(exc)
                log.exception("unhandled error in POST %s", path)
                reply = Reply(500, _INTERNAL_ERROR)
            span.set_attribute("http.response.status_code", reply.status)
        finally:
            otel_context.detach(token)
            span.end()
        headers = [
            (b"content-type", reply.media_type.encode()),
            (b"content-length", str(len(reply.body)).encode()),
        ]
        headers += [(k.lower().encode(), v.encode()) for k, v in reply.headers.items()]
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": reply.body})
        requests, duration = _request_metrics(path, reply.status)
        requests.inc()
        duration.observe(time.perf_counter() - started)


@functools.cache
def _request_metrics(route: str, status: int) -> tuple[Any, Any]:
    # Children looked up once: ``labels()`` costs a lock and a dict build on every call.
    labels = (route, "POST", str(status))
    return HTTP_REQUESTS.labels(*labels), HTTP_REQUEST_DURATION.labels(*labels)


def build_app(settings: Settings, deps: Deps) -> FastAPI:
    """The gateway app; tests pass their own ``deps`` (real bus and Redis, their own prefixes)."""
    phone_tier = Tier("phone", settings.rate_limit_phone_per_minute)
    publisher = Publisher(deps.bus, deps.limiter, phone_tier, timeout=settings.publish_timeout_seconds)
    webhooks = Webhooks(settings, publisher, deps.limiter)

    checks: dict[str, Callable[[], Any]] = {"nats": bus_check(deps.bus)}
    if deps.limiter is not None:
        checks["redis"] = _redis_probe(deps.limiter)

    def info() -> Mapping[str, object]:
        if webhooks.evolution_key:
            evolution_auth = "enabled"
        else:
            evolution_auth = "refused (no key)" if webhooks.production else "disabled (development)"
        return {
            "signature": "enabled" if webhooks.app_secret else "disabled (development)",
            "evolution_auth": evolution_auth,
            "rate_limits": {
                "ip_per_minute": webhooks.ip_tier.limit,
                "phone_per_minute": phone_tier.limit,
                "backend": "redis" if deps.limiter else "disabled (no redis configured)",
            },
            "max_body_bytes": webhooks.max_body,
        }

    # FastAPI's own telemetry stands aside for the OpenTelemetry middleware the shell installs,
    # but only after checking the providers and walking the middleware stack on every request,
    # the webhooks included (~6% of a webhook's CPU): switched off, it is skipped at once.
    no_native_telemetry = {"tracing": False, "metrics": False, "logs": False}
    app = create_service_app(
        SERVICE, settings, checks=checks, info=info, title="orbion-gateway", telemetry=no_native_telemetry
    )

    @app.get(
        WHATSAPP_PATH,
        summary="Meta's webhook verification handshake",
        response_class=Response,
        responses={
            200: {"content": {"text/plain": {}}, "description": "The echoed hub.challenge."},
            403: {"description": "Wrong mode or verify token."},
            429: {"description": "Over the IP limit."},
        },
    )
    async def verify_whatsapp(
        request: Request,
        mode: str = Query("", alias="hub.mode"),
        token: str = Query("", alias="hub.verify_token"),
        challenge: str = Query("", alias="hub.challenge"),
    ) -> Response:
        return _response(await webhooks.verify(request.scope, mode, token, challenge))

    @app.post(
        WHATSAPP_PATH,
        summary="WhatsApp Cloud API webhook (messages and statuses)",
        openapi_extra={"requestBody": _WEBHOOK_BODY},
        responses=_WEBHOOK_RESPONSES,
    )
    async def whatsapp_webhook(request: Request) -> Response:
        return _response(await webhooks.whatsapp(request.scope, request.receive))

    @app.post(
        EVOLUTION_PATH,
        summary="Evolution API webhook (messages.upsert, messages.update)",
        openapi_extra={"requestBody": _WEBHOOK_BODY},
        responses=_WEBHOOK_RESPONSES,
    )
    async def evolution_webhook(request: Request) -> Response:
        return _response(await webhooks.evolution(request.scope, request.receive))

    routes = {path: _post_route(app, path) for path in (WHATSAPP_PATH, EVOLUTION_PATH)}
    handlers = {WHATSAPP_PATH: webhooks.whatsapp, EVOLUTION_PATH: webhooks.evolution}
    # Outermost, around the instrumented stack Starlette builds on the first request.
    build_stack = app.build_middleware_stack
    app.state.build_without_fast_path = build_stack  # for the test of the plain FastAPI routes

    def build_with_fast_path() -> ASGIApp:
        return WebhookFastPath(build_stack(), handlers, routes)

    app.build_middleware_stack = build_with_fast_path  # type: ignore[method-assign]
    return app


def _post_route(app: FastAPI, path: str) -> BaseRoute:
    for route in app.routes:
        if getattr(route, "path", None) == path and "POST" in (getattr(route, "methods", None) or ()):
            return route
    raise LookupError(path)


def _redis_probe(limiter: RateLimiter) -> Callable[[], Any]:
    async def check() -> object:
        # Never fails readiness: with Redis down the gateway still accepts verified webhooks
        # (fail open), so taking it out of the load balancer would lose more than it saves.
        try:
            return await limiter.check()
        except Exception as exc:
            return f"unreachable, failing open for verified webhooks ({type(exc).__name__})"

    return check
