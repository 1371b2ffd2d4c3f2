"""The GCRA rate limiter against a real Redis: quotas, refill, headers, outages, the API dependency."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from fastapi import Depends, FastAPI
from redis.asyncio import Redis

from orbion_common.infra import LocalInfra
from orbion_common.ratelimit import (
    RateLimiter,
    RateLimiterUnavailable,
    Tier,
    fingerprint,
    limit_requests,
    rate_limit_headers,
)


@pytest.fixture(scope="module")
def rl_private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    infra = LocalInfra(tmp_path_factory.mktemp("ratelimit-redis"), servers=("redis",), durable=False)
    yield infra.start().redis_url
    infra.stop()


@pytest.fixture
def rl_redis_url(request: pytest.FixtureRequest) -> str:
    """The root ``redis_url``, else ORBION_TEST_REDIS_URL, else a redis-server of this module."""
    with contextlib.suppress(pytest.FixtureLookupError):
        return str(request.getfixturevalue("redis_url"))
    return os.environ.get("ORBION_TEST_REDIS_URL", "") or str(request.getfixturevalue("rl_private_redis"))


@pytest.fixture
async def limiter(rl_redis_url: str) -> AsyncIterator[RateLimiter]:
    prefix = f"rltest:{uuid.uuid4().hex[:10]}"
    limiter = RateLimiter.from_url(rl_redis_url, prefix=prefix)
    yield limiter
    async for key in limiter.redis.scan_iter(match=f"{prefix}:*"):
        await limiter.redis.delete(key)
    await limiter.close()


def dead_redis_url() -> str:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


async def test_a_burst_up_to_the_limit_passes_and_the_next_is_refused(limiter: RateLimiter) -> None:
    tier = Tier("phone", 20)
    decisions = await limiter.decide([(tier, "5511999990000")] * 21)
    assert [d.allowed for d in decisions] == [True] * 20 + [False]
    assert [d.remaining for d in decisions[:3]] == [19, 18, 17]
    refused = decisions[-1]
    assert refused.remaining == 0
    assert 2.5 < refused.retry_after <= 3.0  # one emission interval: 60 s / 20


async def test_identities_and_tiers_have_separate_quotas(limiter: RateLimiter) -> None:
    ip, key = Tier("ip", 2), Tier("api_key", 2)
    hits = [(ip, "10.0.0.1"), (ip, "10.0.0.1"), (ip, "10.0.0.2"), (key, "10.0.0.1"), (ip, "10.0.0.1")]
    assert [d.allowed for d in await limiter.decide(hits)] == [True, True, True, True, False]


async def test_the_quota_refills_with_time(limiter: RateLimiter) -> None:
    tier = Tier("fast", 2, period_seconds=0.2)  # one request back every 100 ms
    assert [d.allowed for d in await limiter.decide([(tier, "a")] * 3)] == [True, True, False]
    await asyncio.sleep(0.25)
    assert [d.allowed for d in await limiter.decide([(tier, "a")] * 2)] == [True, True]


async def test_a_refused_request_does_not_use_up_quota(limiter: RateLimiter) -> None:
    tier = Tier("fast", 1, period_seconds=0.3)
    await limiter.decide([(tier, "a")])
    for _ in range(5):  # hammering while refused must not push the next allowed time further out
        assert not (await limiter.decide([(tier, "a")]))[0].allowed
    await asyncio.sleep(0.35)
    assert (await limiter.decide([(tier, "a")]))[0].allowed


async def test_keys_expire_once_the_quota_is_whole_again(limiter: RateLimiter) -> None:
    await limiter.decide([(Tier("ip", 100), "10.9.9.9")])
    ttl = await limiter.redis.pttl(f"{limiter.prefix}:ip:10.9.9.9")
    assert 0 < ttl <= 1000  # 60 s / 100 = 600 ms of debt, plus a millisecond


def test_headers_follow_the_ietf_draft_and_the_x_ratelimit_convention() -> None:
    from orbion_common.ratelimit import Decision

    tier = Tier("ip", 100)
    refused = rate_limit_headers(Decision(tier, False, 0, retry_after=0.4, reset_after=59.6))
    assert refused == {
        "RateLimit-Policy": '"ip";q=100;w=60',
        "RateLimit": '"ip";r=0;t=60',
        "X-RateLimit-Limit": "100",
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": "60",
        "Retry-After": "1",
    }
    allowed = rate_limit_headers(Decision(tier, True, 42, retry_after=0, reset_after=34.8))
    assert "Retry-After" not in allowed
    assert allowed["RateLimit"] == '"ip";r=42;t=35'


async def test_an_unreachable_redis_raises_and_backs_off() -> None:
    limiter = RateLimiter.from_url(dead_redis_url(), prefix="rltest:dead")
    with pytest.raises(RateLimiterUnavailable):
        await limiter.decide([(Tier("ip", 1), "x")])
    with pytest.raises(RateLimiterUnavailable, match="backing off"):
        await limiter.decide([(Tier("ip", 1), "x")])
    await limiter.close()


def api_app(limiter: RateLimiter) -> FastAPI:
    app = FastAPI()
    limit = limit_requests(limiter, api_key=Tier("api_key", 3), ip=Tier("ip", 2))

    @app.get("/api/things", dependencies=[Depends(limit)])
    async def things() -> dict[str, str]:
        return {"ok": "yes"}

    return app


async def test_the_api_key_tier_refuses_with_429_and_headers(limiter: RateLimiter) -> None:
    transport = httpx.ASGITransport(app=api_app(limiter))
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        answers = [await client.get("/api/things", headers={"X-API-Key": "key-1"}) for _ in range(4)]
        other_key = await client.get("/api/things", headers={"X-API-Key": "key-2"})
    assert [r.status_code for r in answers] == [200, 200, 200, 429]
    assert answers[0].headers["X-RateLimit-Remaining"] == "2"
    assert answers[0].headers["RateLimit-Policy"] == '"api_key";q=3;w=60'
    refused = answers[-1]
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.headers["RateLimit"].startswith('"api_key";r=0;')
    assert other_key.status_code == 200
    assert await limiter.redis.exists(f"{limiter.prefix}:api_key:{fingerprint('key-1')}")


async def test_the_ip_tier_applies_without_a_key(limiter: RateLimiter) -> None:
    transport = httpx.ASGITransport(app=api_app(limiter))
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        answers = [await client.get("/api/things") for _ in range(3)]
    assert [r.status_code for r in answers] == [200, 200, 429]
    assert answers[-1].headers["X-RateLimit-Limit"] == "2"


async def test_api_routes_fail_closed_when_redis_is_down() -> None:
    limiter = RateLimiter.from_url(dead_redis_url(), prefix="rltest:dead")
    transport = httpx.ASGITransport(app=api_app(limiter))
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        answer = await client.get("/api/things", headers={"X-API-Key": "key-1"})
    assert answer.status_code == 503
    await limiter.close()


async def test_concurrent_decisions_never_overspend(limiter: RateLimiter, rl_redis_url: str) -> None:
    # Two limiters = two replicas sharing Redis: the script is atomic, so exactly 10 pass.
    other = RateLimiter(Redis.from_url(rl_redis_url), prefix=limiter.prefix)
    tier = Tier("shared", 10)
    results = await asyncio.gather(*(lim.decide([(tier, "k")]) for lim in [limiter, other] * 15))
    assert sum(r[0].allowed for r in results) == 10
    await other.close()
