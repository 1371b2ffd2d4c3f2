"""The service pool releases connections without a reset query; nothing it skips may leak."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from orbion_common.db import create_pool
from orbion_common.leadership import leadership
from orbion_common.settings import CommonSettings


@pytest.fixture
async def service_pool(database_url: str) -> asyncpg.Pool:
    pool = await create_pool(
        CommonSettings(database_url=database_url, db_pool_min=1, db_pool_max=1), service="dbtest"
    )
    yield pool
    await pool.close()


async def _lock_is_free(database_url: str, key: str) -> bool:
    other = await asyncpg.connect(database_url)
    try:
        free = bool(await other.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", key))
        if free:
            await other.execute("SELECT pg_advisory_unlock(hashtext($1))", key)
        return free
    finally:
        await other.close()


async def test_released_connection_keeps_its_schema_and_no_open_transaction(
    service_pool: asyncpg.Pool,
) -> None:
    async with service_pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        await conn.execute("SELECT 1")
        # Left open on purpose: the pool must still roll it back on release.
    async with service_pool.acquire() as conn:
        assert await conn.fetchval("SELECT current_setting('search_path')") == "dbtest,public"
        assert not conn.is_in_transaction()


async def test_leadership_lock_is_released_with_the_leader(
    service_pool: asyncpg.Pool, database_url: str
) -> None:
    key = "test-db-leader"
    async with leadership(service_pool, key) as leading:
        assert leading
        assert not await _lock_is_free(database_url, key)
    assert await _lock_is_free(database_url, key)


async def test_cancelled_leader_leaves_no_lock_behind(service_pool: asyncpg.Pool, database_url: str) -> None:
    key = "test-db-cancelled-leader"
    entered = asyncio.Event()

    async def lead_forever() -> None:
        async with leadership(service_pool, key) as leading:
            assert leading
            entered.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(lead_forever())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _lock_is_free(database_url, key)
    # The single pooled connection is usable again (either unlocked or replaced).
    async with leadership(service_pool, key) as leading:
        assert leading
