"""VersionedCache against a real Redis: hits, stale-write guard, single flight, Redis outage."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from orbion_common.cache import REQUESTS, WRITES, Cached, VersionedCache


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, socket_timeout=1)
    yield client
    await client.aclose()


def make(redis: Redis | None, name: str | None = None, **kw: float) -> VersionedCache[str]:
    return VersionedCache(
        redis,
        name or f"test-{uuid.uuid4().hex[:8]}",
        prefix=f"test:cache:{uuid.uuid4().hex}",
        dumps=str.encode,
        loads=bytes.decode,
        **kw,
    )


class CountingLoader:
    def __init__(self, version: int, value: str | None, delay: float = 0.0) -> None:
        self.calls = 0
        self.version, self.value, self.delay = version, value, delay

    async def __call__(self) -> tuple[int, str] | None:
        self.calls += 1
        await asyncio.sleep(self.delay)
        return None if self.value is None else (self.version, self.value)


async def test_a_put_value_is_served_without_the_loader(redis: Redis) -> None:
    cache = make(redis)
    assert await cache.put("k", 3, "three")
    loader = CountingLoader(1, "from db")
    assert await cache.get("k", loader) == "three"
    assert loader.calls == 0
    assert REQUESTS.labels(cache.name, "hit")._value.get() == 1
    assert 0 < await redis.pttl(cache.key("k")) <= 3_600_000


async def test_a_miss_loads_once_and_fills_the_cache(redis: Redis) -> None:
    cache = make(redis)
    loader = CountingLoader(5, "loaded")
    assert await cache.get("k", loader) == "loaded"
    assert await cache.get("k", loader) == "loaded"
    assert loader.calls == 1
    assert (await cache.peek("k")) is not None


async def test_an_older_version_never_overwrites_a_newer_one(redis: Redis) -> None:
    cache = make(redis)
    assert await cache.put("k", 5, "v5")
    assert not await cache.put("k", 4, "v4")
    assert (found := await cache.peek("k")) is not None and (found.version, found.value) == (5, "v5")
    assert await cache.put("k", 6, "v6")
    assert WRITES.labels(cache.name, "stale")._value.get() == 1


async def test_a_batch_write_stores_each_newer_value_and_skips_the_stale_one(redis: Redis) -> None:
    cache = make(redis)
    assert await cache.put("a", 5, "a5")
    assert await cache.put_many([("a", 4, "a4"), ("b", 1, "b1"), ("c", 2, "c2")]) == 2
    assert [(await cache.peek(k)) for k in ("a", "b", "c")] == [
        Cached(5, "a5"),
        Cached(1, "b1"),
        Cached(2, "c2"),
    ]


async def test_a_batch_read_answers_the_hits_and_counts_the_misses(redis: Redis) -> None:
    cache = make(redis)
    await cache.put_many([("a", 1, "a1"), ("c", 3, "c3")])
    assert await cache.peek_many(["a", "b", "c"]) == {"a": Cached(1, "a1"), "c": Cached(3, "c3")}
    assert REQUESTS.labels(cache.name, "hit")._value.get() == 2
    assert REQUESTS.labels(cache.name, "miss")._value.get() == 1


async def test_a_slow_cold_load_does_not_clobber_a_fresher_write_through(redis: Redis) -> None:
    cache = make(redis)
    loader = CountingLoader(6, "old snapshot", delay=0.05)
    reader = asyncio.create_task(cache.get("k", loader))
    await asyncio.sleep(0.01)
    assert await cache.put("k", 7, "written by the projector")
    assert await reader == "old snapshot"  # the reader gets what it loaded...
    found = await cache.peek("k")
    assert found is not None and found.value == "written by the projector"  # ...the cache keeps v7


async def test_concurrent_misses_in_one_process_run_the_loader_once(redis: Redis) -> None:
    cache = make(redis)
    loader = CountingLoader(1, "v", delay=0.05)
    results = await asyncio.gather(*(cache.get("hot", loader) for _ in range(25)))
    assert results == ["v"] * 25
    assert loader.calls == 1


async def test_concurrent_misses_across_replicas_run_the_loader_once(redis: Redis) -> None:
    a = make(redis)
    b = VersionedCache(redis, a.name + "-b", prefix=a.prefix, dumps=str.encode, loads=bytes.decode)
    loader = CountingLoader(1, "v", delay=0.05)
    results = await asyncio.gather(a.get("hot", loader), b.get("hot", loader))
    assert results == ["v", "v"]
    assert loader.calls == 1


async def test_an_unknown_key_is_not_cached(redis: Redis) -> None:
    cache = make(redis)
    loader = CountingLoader(1, None)
    assert await cache.get("nobody", loader) is None
    assert await cache.get("nobody", loader) is None
    assert loader.calls == 2


async def test_redis_down_falls_back_to_the_loader_and_counts_it() -> None:
    dead = Redis.from_url("redis://127.0.0.1:1/0", socket_timeout=0.2, socket_connect_timeout=0.2)
    cache = make(dead)
    loader = CountingLoader(2, "from postgres")
    assert await cache.get("k", loader) == "from postgres"
    assert not await cache.put("k", 3, "x")  # never raises
    assert await cache.get("k", loader) == "from postgres"
    assert loader.calls == 2
    assert REQUESTS.labels(cache.name, "error")._value.get() == 1
    assert REQUESTS.labels(cache.name, "bypass")._value.get() == 1  # no second timeout while down
    await dead.aclose()


async def test_caching_off_still_answers() -> None:
    cache = make(None)
    assert await cache.get("k", CountingLoader(1, "v")) == "v"
    assert not await cache.put("k", 1, "v")
