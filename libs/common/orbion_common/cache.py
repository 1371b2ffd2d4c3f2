"""A versioned write-through cache in Redis, shared by the services that serve read models.

Owns: how a cached value is stored (a Redis hash ``{v: version, d: bytes}`` with a TTL),
the stale-write guard (a Lua compare-and-set: a value is only replaced by one of the same or a
newer version, so a slow writer or a cold-path loader never overwrites fresher data), stampede
protection on a miss (one loader per key: in-process futures plus a short Redis lock across
replicas; the others wait for its result), metrics, and the rule that Redis trouble never fails
a request (the loader answers instead, and the failure is counted).

It leaves to its users what the value is, how it is (de)serialised and what the version
means (for the conversation history: the contact's event-stream version). Projections call
:meth:`VersionedCache.put` after their transaction committed; readers call
:meth:`VersionedCache.get` with a loader that reads the projection.

Metrics (label ``cache`` = the cache's name):

- ``orbion_cache_requests_total{result=hit|miss|error|bypass}``: ``error`` is a Redis failure,
  ``bypass`` a read skipped while Redis is considered down (after an error, for
  ``backoff_seconds``), so an outage costs one timeout, not one per request.
- ``orbion_cache_writes_total{result=stored|stale|error|bypass}``
- ``orbion_cache_loads_total{how=leader|waited|shared|fallback}``: who ran the loader on a miss.
- ``orbion_cache_get_duration_seconds{source=cache|loader}``: time to answer a ``get``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from prometheus_client import Counter, Histogram
from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

T = TypeVar("T")

REQUESTS = Counter("orbion_cache_requests_total", "Cache reads by result", ["cache", "result"])
WRITES = Counter("orbion_cache_writes_total", "Cache writes by result", ["cache", "result"])
LOADS = Counter("orbion_cache_loads_total", "Loader runs on a cache miss, by who ran it", ["cache", "how"])
GET_SECONDS = Histogram(
    "orbion_cache_get_duration_seconds",
    "Time to answer a cache get, from Redis or from the loader",
    ["cache", "source"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
)

# KEYS[1] value key; ARGV: version, data, ttl ms. Returns 1 stored, 0 refused (newer cached).
_PUT_LUA = """
local cur = redis.call('HGET', KEYS[1], 'v')
if cur and tonumber(cur) > tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'd', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

# KEYS[1] lock key; ARGV[1] token: release only our own lock.
_UNLOCK_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_REDIS_ERRORS = (RedisError, OSError, asyncio.TimeoutError, TimeoutError)


@dataclass(frozen=True)
class Cached(Generic[T]):
    version: int
    value: T


class VersionedCache(Generic[T]):
    """Versioned values under ``<prefix>:<key>`` in Redis; ``redis=None`` turns caching off.

    ``dumps``/``loads`` turn a value into bytes and back. ``ttl_seconds`` is the safety net for a
    write-through that failed; ``lock_seconds`` bounds how long a crashed loader blocks others;
    ``wait_seconds`` is how long a replica waits for another one's load before loading itself.
    """

    def __init__(
        self,
        redis: Redis | None,
        name: str,
        *,
        prefix: str,
        dumps: Callable[[T], bytes],
        loads: Callable[[bytes], T],
        ttl_seconds: float = 3600.0,
        lock_seconds: float = 2.0,
        wait_seconds: float = 0.25,
        poll_seconds: float = 0.005,
        backoff_seconds: float = 1.0,
    ) -> None:
        self.redis = redis
        self.name = name
        self.prefix = prefix
        self.dumps = dumps
        self.loads = loads
        self.ttl_ms = int(ttl_seconds * 1000)
        self.lock_ms = int(lock_seconds * 1000)
        self.wait_seconds = wait_seconds
        self.poll_seconds = poll_seconds
        self.backoff_seconds = backoff_seconds
        self._down_until = 0.0
        self._inflight: dict[str, asyncio.Future[Cached[T] | None]] = {}
        self._put_script = redis.register_script(_PUT_LUA) if redis is not None else None
        self._unlock_script = redis.register_script(_UNLOCK_LUA) if redis is not None else None
        self._requests = {r: REQUESTS.labels(name, r) for r in ("hit", "miss", "error", "bypass")}
        self._writes = {r: WRITES.labels(name, r) for r in ("stored", "stale", "error", "bypass")}
        self._loads = {h: LOADS.labels(name, h) for h in ("leader", "waited", "shared", "fallback")}
        self._seconds = {s: GET_SECONDS.labels(name, s) for s in ("cache", "loader")}

    def key(self, key: str) -> str:
        return f"{self.prefix}:{key}"

    # -- availability -----------------------------------------------------------------------

    @property
    def available(self) -> bool:
        """False when caching is off, or Redis failed less than ``backoff_seconds`` ago."""
        return self.redis is not None and time.monotonic() >= self._down_until

    def _failed(self, what: str, exc: BaseException) -> None:
        if time.monotonic() >= self._down_until:
            log.warning("cache %s: redis %s failed (%r); serving without it", self.name, what, exc)
        self._down_until = time.monotonic() + self.backoff_seconds

    # -- reads ------------------------------------------------------------------------------

    async def peek(self, key: str) -> Cached[T] | None:
        """The cached value and its version, or None on a miss (or when Redis is unavailable)."""
        return (await self.peek_many([key])).get(key)

    async def peek_many(self, keys: Sequence[str]) -> dict[str, Cached[T]]:
        """:meth:`peek` for several keys in one round trip; misses are left out."""
        if not keys:
            return {}
        if not self.available:
            self._requests["bypass"].inc(len(keys))
            return {}
        assert self.redis is not None
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hmget(self.key(key), ["v", "d"])
                replies = await pipe.execute()
        except _REDIS_ERRORS as exc:
            self._requests["error"].inc(len(keys))
            self._failed("read", exc)
            return {}
        found: dict[str, Cached[T]] = {}
        for key, (version, data) in zip(keys, replies, strict=True):
            if version is not None and data is not None:
                found[key] = Cached(
                    int(version), self.loads(data if isinstance(data, bytes) else data.encode())
                )
        self._requests["hit"].inc(len(found))
        self._requests["miss"].inc(len(keys) - len(found))
        return found

    async def get(self, key: str, loader: Callable[[], Awaitable[tuple[int, T] | None]]) -> T | None:
        """The value for ``key``: from Redis, else from ``loader`` (run once across waiters).

        ``loader`` returns ``(version, value)``, or None when the key does not exist (not cached).
        Never raises because of Redis; the loader's own errors propagate.
        """
        found = await self.get_versioned(key, loader)
        return found.value if found is not None else None

    async def get_versioned(
        self, key: str, loader: Callable[[], Awaitable[tuple[int, T] | None]]
    ) -> Cached[T] | None:
        started = time.perf_counter()
        cached = await self.peek(key)
        if cached is not None:
            self._seconds["cache"].observe(time.perf_counter() - started)
            return cached
        result = await self._single_flight(key, loader)
        self._seconds["loader"].observe(time.perf_counter() - started)
        return result

    async def _single_flight(
        self, key: str, loader: Callable[[], Awaitable[tuple[int, T] | None]]
    ) -> Cached[T] | None:
        running = self._inflight.get(key)
        if running is not None:
            # Another task of this process is loading the same key: share its result.
            self._loads["shared"].inc()
            return await asyncio.shield(running)
        future: asyncio.Future[Cached[T] | None] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            result = await self._load_across_replicas(key, loader)
        except BaseException as exc:
            future.set_exception(exc)
            # Retrieve it so an unshared failure does not log "exception never retrieved".
            future.exception()
            raise
        else:
            future.set_result(result)
            return result
        finally:
            del self._inflight[key]

    async def _load_across_replicas(
        self, key: str, loader: Callable[[], Awaitable[tuple[int, T] | None]]
    ) -> Cached[T] | None:
        if not self.available:
            self._loads["fallback"].inc()
            return await self._run_loader(loader)
        assert self.redis is not None
        token = uuid.uuid4().hex
        lock_key = self.key(key) + ":lock"
        try:
            leader = bool(await self.redis.set(lock_key, token, nx=True, px=self.lock_ms))
        except _REDIS_ERRORS as exc:
            self._failed("lock", exc)
            self._loads["fallback"].inc()
            return await self._run_loader(loader)
        if not leader:
            waited = await self._wait_for_other_loader(key)
            if waited is not None:
                self._loads["waited"].inc()
                return waited
            # The other loader is slow or died: answer from the source rather than wait longer.
            self._loads["fallback"].inc()
            return await self._run_loader(loader, store_as=key)
        self._loads["leader"].inc()
        try:
            return await self._run_loader(loader, store_as=key)
        finally:
            try:
                assert self._unlock_script is not None
                await self._unlock_script(keys=[lock_key], args=[token])
            except _REDIS_ERRORS as exc:  # the lock expires by itself
                self._failed("unlock", exc)

    async def _wait_for_other_loader(self, key: str) -> Cached[T] | None:
        assert self.redis is not None
        deadline = time.monotonic() + self.wait_seconds
        while time.monotonic() < deadline:
            await asyncio.sleep(self.poll_seconds)
            try:
                version, data = await self.redis.hmget(self.key(key), ["v", "d"])
            except _REDIS_ERRORS as exc:
                self._failed("read", exc)
                return None
            if version is not None and data is not None:
                return Cached(int(version), self.loads(data if isinstance(data, bytes) else data.encode()))
        return None

    async def _run_loader(
        self, loader: Callable[[], Awaitable[tuple[int, T] | None]], *, store_as: str | None = None
    ) -> Cached[T] | None:
        loaded = await loader()
        if loaded is None:
            return None
        version, value = loaded
        if store_as is not None:
            await self.put(store_as, version, value)
        return Cached(version, value)

    # -- writes -----------------------------------------------------------------------------

    async def put(self, key: str, version: int, value: T) -> bool:
        """Store ``value`` at ``version`` unless a newer version is cached; True when stored.

        Never raises: a failed write is logged and counted, and the TTL bounds its staleness.
        """
        return await self.put_many([(key, version, value)]) == 1

    async def put_many(self, items: Sequence[tuple[str, int, T]]) -> int:
        """``put`` for each (key, version, value) in one round trip; returns how many were stored."""
        if not items:
            return 0
        if not self.available:
            self._writes["bypass"].inc(len(items))
            return 0
        assert self.redis is not None and self._put_script is not None
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for key, version, value in items:
                    await self._put_script(
                        keys=[self.key(key)], args=[version, self.dumps(value), self.ttl_ms], client=pipe
                    )
                replies = await pipe.execute()
        except _REDIS_ERRORS as exc:
            self._writes["error"].inc(len(items))
            self._failed("write", exc)
            return 0
        stored = sum(1 for reply in replies if reply)
        self._writes["stored"].inc(stored)
        self._writes["stale"].inc(len(replies) - stored)
        return stored

    async def delete(self, key: str) -> None:
        """Drop ``key`` (e.g. after a rebuild); never raises."""
        if self.redis is None:
            return
        try:
            await self.redis.delete(self.key(key))
        except _REDIS_ERRORS as exc:
            self._failed("delete", exc)


def describe(cache: VersionedCache[Any]) -> dict[str, object]:
    """A small JSON summary for /readyz info."""
    return {"name": cache.name, "enabled": cache.redis is not None, "available": cache.available}
