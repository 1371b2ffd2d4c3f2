"""A contact's recent history: the Redis cache (write-through), its Postgres fallback, and pages.

Owns the cache codec and the choice between cache and Postgres for a history page. The cache
holds the newest ``size`` messages of each contact at the contact's event-stream version, so
a writer holding an older snapshot can never overwrite a newer one (see orbion_common.cache).
"""

from __future__ import annotations

from datetime import datetime

import asyncpg
import orjson
from redis.asyncio import Redis

from orbion_common.cache import VersionedCache

from .domain import MessageItem, page_from
from .store import Projection

CACHE_NAME = "conversation_history"


def _dumps(items: list[MessageItem]) -> bytes:
    return orjson.dumps({"phone": items[0].phone if items else "", "messages": [m.to_json() for m in items]})


def _loads(data: bytes) -> list[MessageItem]:
    doc = orjson.loads(data)
    return [MessageItem.from_json(m, doc["phone"]) for m in doc["messages"]]


def history_cache(
    redis: Redis | None, *, prefix: str = "orbion:conversation:history", ttl_seconds: float = 3600.0
) -> VersionedCache[list[MessageItem]]:
    return VersionedCache(
        redis, CACHE_NAME, prefix=prefix, dumps=_dumps, loads=_loads, ttl_seconds=ttl_seconds
    )


class History:
    """Reads of recent history: cache first, Postgres when it misses or Redis is down."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        projection: Projection,
        cache: VersionedCache[list[MessageItem]],
        size: int = 20,
    ) -> None:
        self.pool = pool
        self.projection = projection
        self.cache = cache
        self.size = size

    async def _load(self, phone: str) -> tuple[int, list[MessageItem]] | None:
        return await self.projection.history_snapshot(self.pool, phone, self.size)

    async def recent(self, phone: str) -> list[MessageItem] | None:
        """The newest ``size`` messages, newest first; None for a phone never seen."""
        return await self.cache.get(phone, lambda: self._load(phone))

    async def write_through(self, phone: str, version: int, items: list[MessageItem]) -> None:
        """After a commit: store the snapshot taken in that transaction (older versions lose)."""
        await self.cache.put(phone, version, items)

    async def write_through_many(self, snapshots: dict[str, tuple[int, list[MessageItem]]]) -> None:
        """``write_through`` for several contacts, in one Redis round trip."""
        await self.cache.put_many([(phone, version, items) for phone, (version, items) in snapshots.items()])

    async def page(
        self, phone: str, limit: int, before: tuple[datetime, int] | None
    ) -> list[MessageItem] | None:
        """Newest-first page strictly before ``before``; None for an unknown phone."""
        if limit <= self.size:
            recent = await self.recent(phone)
            if recent is None:
                return None
            page = page_from(recent, limit, before)
            # The cache answers when it holds the whole page, or the contact's whole history.
            if len(page) == limit or len(recent) < self.size:
                return page
        items = await self.projection.recent_messages(self.pool, phone, limit, before)
        if not items and await self.projection.load_contact(self.pool, phone) is None:
            return None
        return items
