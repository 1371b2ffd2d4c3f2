"""The webhook intake, free of any web framework: raw ASGI body and headers in, a reply out.

Order of work for a POST, cheapest refusal first: size (declared, then streamed), signature
or API key on the raw bytes (constant time, before any parsing), content type, orjson, the
provider's pure parser, then :class:`~orbion_gateway.publisher.Publisher` (phone limits,
publish, dead letters). ``app`` serves it both as FastAPI routes (for OpenAPI) and as a lean
ASGI fast path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

import orjson
from opentelemetry import trace
from starlette.types import Receive, Scope

from orbion_common.events import utcnow
from orbion_common.events.messaging import Provider
from orbion_common.ratelimit import RateLimiter, RateLimiterUnavailable, Tier, rate_limit_headers

from . import cloud_api, evolution, metrics
from .inbound import MalformedWebhook, ParsedWebhook
from .publisher import Publisher, PublishFailed
from .settings import Settings
from .signature import check_api_key, check_signature

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)
    media_type: str = "application/json"


class Refused(Exception):
    """A request answered with a 4xx/5xx JSON error before anything was published."""

    def __init__(self, status: int, kind: str, detail: str, headers: Mapping[str, str] | None = None):
        super().__init__(detail)
        self.status, self.kind, self.detail, self.headers = status, kind, detail, headers or {}


def _mark_gateway_stage() -> None:
    # The monitor's end-to-end latency of a message starts at the span marked as the gateway stage.
    trace.get_current_span().set_attribute("orbion.stage", "gateway")


def _headers(scope: Scope) -> dict[str, str]:
    """The request headers by name; the first of a repeated header wins, as in Starlette's
    ``Headers.get``, which scans every raw header on each lookup (a few µs per webhook)."""
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in reversed(list(scope["headers"]))}


def _error(status: int, kind: str, detail: str, headers: Mapping[str, str] | None = None) -> Reply:
    return Reply(status, orjson.dumps({"error": {"type": kind, "detail": detail}}), headers or {})


class Webhooks:
    """Cloud API and Evolution API webhooks, verified and published; one instance per app."""

    def __init__(self, settings: Settings, publisher: Publisher, limiter: RateLimiter | None) -> None:
        self.settings = settings
        self.publisher = publisher
        self.limiter = limiter
        self.ip_tier = Tier("ip", settings.rate_limit_ip_per_minute)
        secret = settings.whatsapp_app_secret
        self.app_secret = (
            secret.get_secret_value().encode() if settings.signature_required and secret else None
        )
        token = settings.whatsapp_verify_token
        self.verify_token = token.get_secret_value() if token else ""
        key = settings.evolution_api_key
        self.evolution_key = key.get_secret_value() if key else ""
        self.evolution_header = settings.evolution_api_key_header.lower()
        self.production = settings.mode == "production"
        self.max_body = settings.max_body_bytes

    # -- entry points ---------------------------------------------------------------------

    async def whatsapp(self, scope: Scope, receive: Receive) -> Reply:
        received_at = utcnow()  # the events' occurred_at: a reply's quiet period starts here
        _mark_gateway_stage()
        provider = Provider.CLOUD_API
        headers = _headers(scope)
        try:
            body = await self._read_body(headers, receive)
            if self.app_secret is not None:
                problem = check_signature(self.app_secret, body, headers.get("x-hub-signature-256"))
                if problem is not None:
                    metrics.SIGNATURE_FAILURES.labels(provider.value, problem.value).inc()
                    await self._refuse_ip(scope, headers)
                    raise Refused(401, "bad_signature", f"X-Hub-Signature-256 {problem.value}")
            parsed = self._parse(cloud_api.parse, headers, body)
        except Refused as exc:
            return self._refused(provider, exc)
        return await self._accept(provider, parsed, received_at)

    async def evolution(self, scope: Scope, receive: Receive) -> Reply:
        received_at = utcnow()  # the events' occurred_at: a reply's quiet period starts here
        _mark_gateway_stage()
        provider = Provider.EVOLUTION
        headers = _headers(scope)
        try:
            body = await self._read_body(headers, receive)
            if self.evolution_key or self.production:  # production without a key: always refused
                presented = headers.get(self.evolution_header)
                if not (self.evolution_key and check_api_key(self.evolution_key, presented)):
                    reason = "missing" if not presented else "mismatch"
                    metrics.SIGNATURE_FAILURES.labels(provider.value, reason).inc()
                    await self._refuse_ip(scope, headers)
                    raise Refused(401, "bad_api_key", f"{self.evolution_header} header {reason}")
            parsed = self._parse(evolution.parse, headers, body)
        except Refused as exc:
            return self._refused(provider, exc)
        return await self._accept(provider, parsed, received_at)

    async def verify(self, scope: Scope, mode: str, token: str, challenge: str) -> Reply:
        """Meta's subscription handshake: echo ``hub.challenge`` when the token matches."""
        try:
            await self._refuse_ip(scope, _headers(scope))
        except Refused as exc:
            return self._refused(Provider.CLOUD_API, exc)
        if mode == "subscribe" and self.verify_token and check_api_key(self.verify_token, token):
            log.info("webhook verification handshake accepted")
            return Reply(200, challenge.encode(), media_type="text/plain")
        return self._refused(Provider.CLOUD_API, Refused(403, "forbidden", "verification failed"))

    # -- steps ----------------------------------------------------------------------------

    async def _read_body(self, headers: Mapping[str, str], receive: Receive) -> bytes:
        """The raw body, refused with 413 as soon as it exceeds the limit (declared or streamed)."""
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise Refused(400, "bad_request", "invalid Content-Length")
            if int(declared) > self.max_body:
                raise Refused(413, "payload_too_large", f"body over {self.max_body} bytes")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                raise Refused(400, "bad_request", "request body incomplete")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise Refused(413, "payload_too_large", f"body over {self.max_body} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    @staticmethod
    def _parse(
        parse: Callable[[object], ParsedWebhook], headers: Mapping[str, str], body: bytes
    ) -> ParsedWebhook:
        content_type = headers.get("content-type", "")
        if content_type.split(";", 1)[0].strip().lower() != "application/json":
            raise Refused(415, "unsupported_media_type", "Content-Type must be application/json")
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise Refused(400, "bad_json", "body is not valid JSON") from exc
        try:
            return parse(data)
        except MalformedWebhook as exc:
            raise Refused(400, "bad_webhook", str(exc)) from exc

    async def _refuse_ip(self, scope: Scope, headers: Mapping[str, str]) -> None:
        """Count an unverified request against its IP; raise 429 once over the limit."""
        if self.limiter is None:
            return
        try:
            [decision] = await self.limiter.decide([(self.ip_tier, self._client_ip(scope, headers))])
        except RateLimiterUnavailable:
            return  # the request is refused anyway (401/403): Redis being down changes nothing
        if not decision.allowed:
            metrics.REFUSED.labels(self.ip_tier.name).inc()
            raise Refused(429, "rate_limited", "too many unverified requests", rate_limit_headers(decision))

    def _client_ip(self, scope: Scope, headers: Mapping[str, str]) -> str:
        if self.settings.trust_forwarded_for:
            forwarded = headers.get("x-forwarded-for")
            if forwarded:
                return forwarded.split(",")[0].strip()
        client = scope.get("client")
        return str(client[0]) if client else "unknown"

    def _refused(self, provider: Provider, exc: Refused) -> Reply:
        metrics.webhooks(provider.value, exc.status).inc()
        log.info("webhook refused: %s", exc.detail, extra={"provider": provider.value, "status": exc.status})
        return _error(exc.status, exc.kind, exc.detail, exc.headers)

    async def _accept(self, provider: Provider, parsed: ParsedWebhook, received_at: datetime) -> Reply:
        try:
            accepted = await self.publisher.accept(provider, parsed, received_at=received_at)
        except PublishFailed:
            metrics.webhooks(provider.value, 503).inc()
            return _error(503, "unavailable", "event bus unavailable, retry later", {"Retry-After": "5"})
        metrics.webhooks(provider.value, 200).inc()
        return Reply(200, orjson.dumps(accepted.body()))
