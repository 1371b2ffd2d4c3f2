"""The service pool releases connections without a reset query; nothing it skips may leak."""

from __future__ import annotations

import asyncio
import json

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


async def test_a_cached_plan_made_on_a_tiny_table_still_uses_the_index_once_the_table_has_grown(
    service_pool: asyncpg.Pool, unique: str
) -> None:
    # A fresh event store grows from nothing under load, faster than autovacuum analyzes it
    # (or with autovacuum off). A plan cached while the table was tiny must not be a sequential
    # scan that every later execution of the prepared statement runs: in a load test such plans
    # made the conversation's per-group lookups 10 ms each instead of 0.4. Nor may every
    # execution be planned afresh: that cost Postgres as much time as executing.
    table = f"plans_{unique}"
    async with service_pool.acquire() as conn:
        await conn.execute(
            f"CREATE TABLE {table} (id text PRIMARY KEY, v int) WITH (autovacuum_enabled = false)"
        )
        try:
            await conn.execute(f"INSERT INTO {table} SELECT g::text, g FROM generate_series(1, 5) g")
            await conn.execute(f"ANALYZE {table}")  # the statistics of a table that has just started
            await conn.execute(f"PREPARE many_{unique}(text[]) AS SELECT v FROM {table} WHERE id = ANY($1)")
            await conn.execute(f"PREPARE one_{unique}(text) AS SELECT v FROM {table} WHERE id = $1")
            for _ in range(10):  # past the five custom plans after which Postgres may cache a generic one
                await conn.fetch(f"EXECUTE many_{unique}('{{1,2,3}}')")
                await conn.fetch(f"EXECUTE one_{unique}('1')")
            planned = {
                r["name"]: r["custom_plans"]
                for r in await conn.fetch(
                    "SELECT name, custom_plans FROM pg_prepared_statements WHERE name LIKE $1", f"%_{unique}"
                )
            }
            await conn.execute(f"INSERT INTO {table} SELECT g::text, g FROM generate_series(6, 200000) g")
            plans = {
                name: "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN EXECUTE {name}_{unique}({arg})"))
                for name, arg in (("many", "'{1,2,3}'"), ("one", "'1'"))
            }
        finally:
            await conn.execute(f"DEALLOCATE ALL; DROP TABLE {table}")
    for plan in plans.values():
        assert "Seq Scan" not in plan, plan
    # Not even the first five: Postgres kept planning at every execution the statements whose
    # generic plan it costed above their custom ones (a quarter of its statement time).
    assert planned == {f"many_{unique}": 0, f"one_{unique}": 0}, "each execution was planned afresh"


async def test_a_statement_that_can_only_scan_a_table_is_not_compiled_to_machine_code(
    service_pool: asyncpg.Pool, database_url: str, unique: str
) -> None:
    # With sequential scans off, a statement no index serves is costed at 10 billion, far past
    # jit_above_cost: Postgres compiled a scheduler statement's small scan with LLVM at every
    # execution, 460 ms each, and the pipeline's p50 went from 0.1 to 1.4 s.
    plain = await asyncpg.connect(database_url)  # the service's connections say "no" either way
    try:
        if not await plain.fetchval("SELECT pg_jit_available()"):
            pytest.skip("this Postgres has no JIT compiler, or has it off")
    finally:
        await plain.close()
    async with service_pool.acquire() as conn:
        table = f"scan_{unique}"
        await conn.execute(f"CREATE TEMP TABLE {table} (id text, v int)")
        await conn.execute(f"INSERT INTO {table} SELECT g::text, g FROM generate_series(1, 100) g")
        explained = await conn.fetchval(
            f"EXPLAIN (ANALYZE, FORMAT JSON) SELECT count(*) FROM {table} WHERE v % 7 = 0"
        )
    (plan,) = json.loads(explained)
    assert "Seq Scan" in explained  # the only way, even with sequential scans off
    assert "JIT" not in plan, plan.get("JIT")
