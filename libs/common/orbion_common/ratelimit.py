"""Tiered rate limits in Redis: GCRA, every tier of a request decided by one Lua script call.

Owns the algorithm, the Redis script, the response headers and a FastAPI dependency for
``/api`` routes. Callers choose the tiers (per IP, per API key, per phone) and what a refusal
means: the gateway flags an over-limit phone's message instead of refusing it, and accepts
verified webhooks when Redis is down (fail open) while API routes answer 503 (fail closed).
See docs/rate-limits.md for why GCRA.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException, Request, Response
from prometheus_client import Counter
from redis.asyncio import Redis

# GCRA ("generic cell rate algorithm"): per key one number, the theoretical arrival time
# (TAT) of the next request, in microseconds of Redis' own clock (TIME), so replicas with
# skewed clocks agree. A request is allowed when, after adding its cost, the TAT is no
# more than `burst` emission intervals ahead of now. The hits are decided in order, so two
# hits on the same key in one call both count.
# ARGV per hit: emission interval (µs), tolerance = interval * burst (µs), cost.
# Returns per hit: allowed (0/1), remaining, retry-after (µs), reset-after (µs).
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
for i, key in ipairs(KEYS) do
  local base = (i - 1) * 3
  local interval = tonumber(ARGV[base + 1])
  local tolerance = tonumber(ARGV[base + 2])
  local cost = tonumber(ARGV[base + 3])
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then tat = now end
  local new_tat = tat + interval * cost
  local allow_at = new_tat - tolerance
  if allow_at <= now then
    redis.call('SET', key, string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
    out[#out + 1] = 1
    out[#out + 1] = math.floor((now - allow_at) / interval)
    out[#out + 1] = 0
    out[#out + 1] = new_tat - now
  else
    out[#out + 1] = 0
    out[#out + 1] = 0
    out[#out + 1] = allow_at - now
    out[#out + 1] = tat - now
  end
end
return out
"""

DECISIONS = Counter(
    "orbion_rate_limit_decisions_total", "Rate-limit decisions by tier and outcome.", ["tier", "outcome"]
)
ERRORS = Counter("orbion_rate_limit_errors_total", "Rate-limit checks that could not reach Redis.")


@functools.cache
def _decisions(tier: str, allowed: bool) -> Any:  # labels() on every hit costs a lock and a dict
    return DECISIONS.labels(tier, "allowed" if allowed else "refused")


@dataclass(frozen=True, slots=True)
class Tier:
    """A limit: ``limit`` requests per ``period_seconds``, at most ``burst`` (default ``limit``) at once."""

    name: str
    limit: int
    period_seconds: float = 60.0
    burst: int | None = None

    @property
    def interval_us(self) -> float:
        return self.period_seconds * 1_000_000 / self.limit

    @property
    def policy(self) -> str:
        """This tier as an IETF ``RateLimit-Policy`` item: quota ``q`` per window ``w`` seconds."""
        return f'"{self.name}";q={self.limit};w={_secs(self.period_seconds)}'


@functools.cache
def _script_args(tier: Tier) -> tuple[bytes, bytes, bytes]:
    """A hit's ARGV for ``_GCRA`` (interval, tolerance, cost), encoded once per tier: the same
    bytes redis-py would make, but it would repr() both floats again for every hit."""
    interval = tier.interval_us
    return repr(interval).encode(), repr(interval * (tier.burst or tier.limit)).encode(), b"1"


@dataclass(frozen=True, slots=True)
class Decision:
    tier: Tier
    allowed: bool
    remaining: int
    retry_after: float  # seconds until a request would be allowed (0 when allowed)
    reset_after: float  # seconds until the full quota is back


class RateLimiterUnavailable(Exception):
    """Redis could not be asked. Callers decide: fail open (verified webhooks) or closed (APIs)."""


class RateLimiter:
    """Decides hits ``(tier, identity)``; all tiers of a call in one Redis round trip.

    Concurrent calls are coalesced: while one script call is in flight, the hits of the calls
    that arrive meanwhile wait and go together in the next one (up to ``max_batch`` hits). At
    low load that is one round trip per request; under a flood it is one per batch, which is
    what keeps the limiter from costing more than the publish it guards. After a Redis error,
    calls fail at once for ``backoff_seconds`` instead of each waiting for a connect timeout,
    so an outage does not slow the requests that fail open.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str = "orbion:rl",
        backoff_seconds: float = 1.0,
        max_batch: int = 512,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.backoff_seconds = backoff_seconds
        self.max_batch = max_batch
        self._script = redis.register_script(_GCRA)
        self._down_until = 0.0
        self._pending: list[tuple[Sequence[tuple[Tier, str]], asyncio.Future[list[Decision]]]] = []
        self._flushing = False
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "orbion:rl", timeout: float = 0.5) -> RateLimiter:
        """A limiter with its own client; short timeouts because every request waits on it."""
        client = Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, max_connections=16
        )
        return cls(client, prefix=prefix)

    async def decide(self, hits: Sequence[tuple[Tier, str]]) -> list[Decision]:
        """One decision per ``(tier, identity)`` hit, in order; raises :class:`RateLimiterUnavailable`."""
        if not hits:
            return []
        if time.monotonic() < self._down_until:
            raise RateLimiterUnavailable("redis unavailable (backing off)")
        future: asyncio.Future[list[Decision]] = asyncio.get_running_loop().create_future()
        self._pending.append((hits, future))
        if not self._flushing:
            self._flushing = True
            self._task = asyncio.get_running_loop().create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch: list[tuple[Sequence[tuple[Tier, str]], asyncio.Future[list[Decision]]]] = []
                size = 0
                while self._pending and (not batch or size + len(self._pending[0][0]) <= self.max_batch):
                    item = self._pending.pop(0)
                    batch.append(item)
                    size += len(item[0])
                await self._decide_batch(batch)
        finally:
            self._flushing = False

    async def _decide_batch(
        self, batch: list[tuple[Sequence[tuple[Tier, str]], asyncio.Future[list[Decision]]]]
    ) -> None:
        hits = [hit for call_hits, _ in batch for hit in call_hits]
        keys = [f"{self.prefix}:{tier.name}:{identity}" for tier, identity in hits]
        args: list[bytes] = []
        for tier, _ in hits:
            args += _script_args(tier)
        try:
            raw = await self._script(keys=keys, args=args)
        except Exception as exc:  # Redis down, timeout, or anything else: no caller may hang
            self._down_until = time.monotonic() + self.backoff_seconds
            ERRORS.inc()
            for _, future in batch:
                if not future.done():
                    future.set_exception(RateLimiterUnavailable(str(exc) or type(exc).__name__))
            return
        self._down_until = 0.0
        at = 0
        outcomes: dict[tuple[str, bool], int] = {}  # counted once per batch: each inc() takes a lock
        for call_hits, future in batch:
            decisions = []
            for tier, _ in call_hits:
                allowed, remaining, retry_us, reset_us = raw[at : at + 4]
                at += 4
                decision = Decision(tier, bool(allowed), int(remaining), retry_us / 1e6, reset_us / 1e6)
                outcome = (tier.name, decision.allowed)
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
                decisions.append(decision)
            if not future.done():  # the caller may have been cancelled meanwhile
                future.set_result(decisions)
        for (tier_name, allowed), count in outcomes.items():
            _decisions(tier_name, allowed).inc(count)

    async def check(self) -> str:
        """Readiness probe: Redis answers."""
        await self.redis.ping()
        return "ok"

    async def close(self) -> None:
        await self.redis.aclose()


def rate_limit_headers(decision: Decision) -> dict[str, str]:
    """Response headers for a decision: IETF draft ``RateLimit``/``RateLimit-Policy``, the
    common ``X-RateLimit-*`` trio, and ``Retry-After`` when refused (whole seconds, rounded up)."""
    tier = decision.tier
    reset = math.ceil(decision.reset_after)
    headers = {
        "RateLimit-Policy": tier.policy,
        "RateLimit": f'"{tier.name}";r={decision.remaining};t={reset}',
        "X-RateLimit-Limit": str(tier.limit),
        "X-RateLimit-Remaining": str(decision.remaining),
        "X-RateLimit-Reset": str(reset),
    }
    if not decision.allowed:
        headers["Retry-After"] = str(max(1, math.ceil(decision.retry_after)))
    return headers


def fingerprint(secret: str) -> str:
    """A stable, non-reversible Redis key part for an API key (never store the key itself)."""
    return hashlib.sha256(secret.encode()).hexdigest()[:24]


def client_ip(request: Request, *, trust_forwarded_for: bool = False) -> str:
    """The client's IP; ``X-Forwarded-For``'s first hop only behind a trusted proxy."""
    if trust_forwarded_for:
        forwarded = request.headers.get("x-forwarded-for")
        if forwarded:
            return forwarded.split(",")[0].strip()
    return request.client.host if request.client else "unknown"


def limit_requests(
    limiter: RateLimiter, *, api_key: Tier, ip: Tier, trust_forwarded_for: bool = False
) -> Callable[[Request, Response], Awaitable[None]]:
    """FastAPI dependency for ``/api`` routes: per API key when ``X-API-Key`` is sent, else per IP.

    Refused: 429 with the headers. Allowed: the headers are added to the response. Redis
    unreachable: 503 (fail closed: an API without limits is an open door).
    """

    async def dependency(request: Request, response: Response) -> None:
        key = request.headers.get("x-api-key")
        if key:
            hit = (api_key, fingerprint(key))
        else:
            hit = (ip, client_ip(request, trust_forwarded_for=trust_forwarded_for))
        try:
            [decision] = await limiter.decide([hit])
        except RateLimiterUnavailable as exc:
            raise HTTPException(503, "rate limiter unavailable", headers={"Retry-After": "1"}) from exc
        headers = rate_limit_headers(decision)
        if not decision.allowed:
            raise HTTPException(429, f"rate limit exceeded ({decision.tier.name})", headers=headers)
        response.headers.update(headers)

    return dependency


def _secs(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
