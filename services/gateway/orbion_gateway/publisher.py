"""Hand a parsed webhook to JetStream: phone-tier flags, events, publish, dead letters.

Owns the gateway's durability promise: :meth:`Publisher.accept` returns only when JetStream
acked every event (and every dead letter) of the webhook; otherwise it raises
:class:`PublishFailed` and the route answers 503, so the provider retries. A retry is harmless:
events carry stable ids and ``Nats-Msg-Id`` = the provider's message id. Parsing is
``cloud_api``/``evolution``'s job, HTTP concerns are ``app``'s.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import datetime

import orjson

from orbion_common.bus import Bus
from orbion_common.events.messaging import Provider
from orbion_common.logging import mask_phone
from orbion_common.ratelimit import RateLimiter, RateLimiterUnavailable, Tier

from . import metrics
from .inbound import ParsedWebhook, to_events

log = logging.getLogger(__name__)

DLQ_DURABLE = "gateway"  # dead letters go to orbion.dlq.gateway (stream ORBION_DLQ)


class PublishFailed(Exception):
    """JetStream did not ack everything: the webhook must be answered 503 and retried."""


@dataclass(frozen=True, slots=True)
class Accepted:
    published: int
    duplicates: int
    throttled: int
    dead_lettered: int
    ignored: int

    def body(self) -> dict[str, int]:
        return {
            "published": self.published,
            "duplicates": self.duplicates,
            "throttled": self.throttled,
            "dead_lettered": self.dead_lettered,
            "ignored": self.ignored,
        }


class Publisher:
    def __init__(
        self, bus: Bus, limiter: RateLimiter | None, phone_tier: Tier, *, timeout: float = 5.0
    ) -> None:
        self.bus = bus
        self.limiter = limiter
        self.phone_tier = phone_tier
        self.timeout = timeout

    async def accept(
        self, provider: Provider, parsed: ParsedWebhook, *, received_at: datetime | None = None
    ) -> Accepted:
        """Publish every event of ``parsed`` (received at ``received_at``, else now); raises
        :class:`PublishFailed` if any is not acked."""
        throttled = await self._throttled(provider, parsed)
        events, msg_ids = to_events(parsed, throttled, received_at=received_at)
        started = time.perf_counter()
        try:
            if len(events) == 1 and not parsed.rejected:
                # The usual webhook: one publish, bounded by its own ack wait (no gather task per
                # event, no second timer around it).
                results = [await self.bus.publish(events[0], msg_id=msg_ids[0], ack_timeout=self.timeout)]
            else:
                async with asyncio.timeout(self.timeout):
                    results = await self.bus.publish_all(events, msg_ids) if events else []
                    for rejected in parsed.rejected:
                        # Published before the 200, like the events: a lost dead letter is a lost message.
                        await self.bus.publish_dead_letter(
                            DLQ_DURABLE,
                            orjson.dumps(rejected.raw),
                            rejected.reason,
                            Provider=provider.value,
                        )
        except Exception as exc:  # whatever the cause, the answer is 503 and a provider retry
            log.warning("publish failed, answering 503: %r", exc, extra={"provider": provider.value})
            raise PublishFailed(str(exc)) from exc
        metrics.PUBLISH_SECONDS.observe(time.perf_counter() - started)
        duplicates = 0
        for event, fresh in zip(events, results, strict=True):
            if fresh:
                metrics.events(event.type).inc()
            else:
                duplicates += 1
                metrics.DUPLICATES.labels(event.type).inc()
        n_throttled = sum(throttled)
        if n_throttled:
            metrics.THROTTLED.labels(provider.value).inc(n_throttled)
        if parsed.rejected:
            metrics.DEAD_LETTERED.labels(provider.value).inc(len(parsed.rejected))
            log.warning(
                "dead-lettered %d malformed item(s)",
                len(parsed.rejected),
                extra={"provider": provider.value, "reasons": [r.reason for r in parsed.rejected][:5]},
            )
        return Accepted(
            len(events) - duplicates, duplicates, n_throttled, len(parsed.rejected), parsed.ignored
        )

    async def _throttled(self, provider: Provider, parsed: ParsedWebhook) -> list[bool]:
        """Which messages come from a phone over its limit. Redis down: none (fail open)."""
        if self.limiter is None or not parsed.messages:
            return []
        hits = [(self.phone_tier, m.payload.phone) for m in parsed.messages if not m.payload.from_me]
        try:
            decisions = iter(await self.limiter.decide(hits))
        except RateLimiterUnavailable as exc:
            metrics.FAIL_OPEN.inc()
            log.warning("rate limiter unavailable, accepting unflagged: %s", exc)
            return []
        flags = []
        for m in parsed.messages:
            if m.payload.from_me:  # our own messages (Evolution echoes) never count against a contact
                flags.append(False)
                continue
            allowed = next(decisions).allowed
            if not allowed:
                log.info(
                    "phone over its limit, flagged throttled", extra={"phone": mask_phone(m.payload.phone)}
                )
            flags.append(not allowed)
        return flags
