"""The gateway's Prometheus metrics (the HTTP request counter by route and status is service.py's)."""

from __future__ import annotations

import functools
from typing import Any

from prometheus_client import Counter, Histogram

WEBHOOKS = Counter(
    "orbion_gateway_webhooks_total", "Webhooks answered, by provider and HTTP status.", ["provider", "status"]
)
EVENTS = Counter(
    "orbion_gateway_events_published_total", "Events the gateway had acked by JetStream, by type.", ["type"]
)
DUPLICATES = Counter(
    "orbion_gateway_duplicates_total", "Events JetStream dropped as duplicates (provider retries).", ["type"]
)
THROTTLED = Counter(
    "orbion_gateway_throttled_messages_total",
    "Messages published flagged throttled (phone over its limit).",
    ["provider"],
)
REFUSED = Counter("orbion_gateway_rate_limit_refusals_total", "Requests refused with 429, by tier.", ["tier"])
SIGNATURE_FAILURES = Counter(
    "orbion_gateway_signature_failures_total",
    "Webhooks refused for authentication, by provider and reason.",
    ["provider", "reason"],
)
DEAD_LETTERED = Counter(
    "orbion_gateway_dead_lettered_total",
    "Malformed messages or statuses sent to orbion.dlq.gateway.",
    ["provider"],
)
FAIL_OPEN = Counter(
    "orbion_gateway_rate_limit_fail_open_total",
    "Verified webhooks accepted without a rate-limit decision because Redis was unreachable.",
)
PUBLISH_SECONDS = Histogram(
    "orbion_gateway_publish_seconds",
    "Time to get every event of one webhook acked by JetStream.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
)


# Children looked up once: ``labels()`` costs a lock and a dict build on every call.
@functools.cache
def webhooks(provider: str, status: int) -> Any:
    return WEBHOOKS.labels(provider, str(status))


@functools.cache
def events(event_type: str) -> Any:
    return EVENTS.labels(event_type)
