"""Fixtures of the conversation tests: a fresh Postgres schema, Redis prefix and deps per test.

Servers come from the root fixtures (``database_url``, ``redis_url``, ``nats_url``) when they
exist, else from ORBION_TEST_* variables; a test without its server is skipped.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from redis.asyncio import Redis

from orbion_common.eventstore import EventStore
from orbion_common.migrations import migrate
from orbion_conversation.bootstrap import MIGRATIONS
from orbion_conversation.consumers import Deps
from orbion_conversation.history import History, history_cache
from orbion_conversation.replies import ReplyContext
from orbion_conversation.store import Projection


# Short names for the root conftest's real servers.
@pytest.fixture
def pg_url(database_url: str) -> str:
    return database_url


@pytest.fixture
def redis_test_url(redis_url: str) -> str:
    return redis_url


@pytest.fixture
def nats_test_url(nats_url: str) -> str:
    return nats_url


@pytest.fixture
async def schema(pg_url: str) -> AsyncIterator[str]:
    name = f"conv_t_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(pg_url)
    try:
        await migrate(conn, name, MIGRATIONS)
        yield name
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        await conn.close()


@pytest.fixture
async def pool(pg_url: str, schema: str) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(pg_url, min_size=1, max_size=8, server_settings={"search_path": schema})
    assert p is not None
    yield p
    await p.close()


@pytest.fixture
async def redis(redis_test_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_test_url, socket_timeout=0.5, socket_connect_timeout=0.5)
    yield client
    await client.aclose()


def make_deps(pool: asyncpg.Pool, schema: str, redis: Redis | None, *, quiet: float = 0.0) -> Deps:
    projection = Projection()
    history = History(pool, projection, history_cache(redis, prefix=f"test:{schema}:history"))
    ctx = ReplyContext(EventStore(schema), projection, history, quiet_seconds=quiet)
    return Deps(pool=pool, ctx=ctx)


@pytest.fixture
def deps(pool: asyncpg.Pool, schema: str, redis: Redis) -> Deps:
    return make_deps(pool, schema, redis)
