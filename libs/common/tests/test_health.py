"""Readiness checks (orbion_common.health): concurrency, timeouts, errors, real Postgres and Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest
import redis.asyncio as aioredis

from orbion_common.health import bus_check, postgres_check, redis_check, run_checks


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def pg_pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    yield pool
    await pool.close()


async def test_all_checks_pass_with_their_details() -> None:
    async def db() -> object:
        return {"pool_size": 2}

    async def cache() -> object:
        return "PONG"

    ok, results = await run_checks({"db": db, "cache": cache})
    assert ok
    assert results["db"]["ok"] and results["db"]["detail"] == {"pool_size": 2}
    assert results["cache"]["detail"] == "PONG"
    assert isinstance(results["db"]["latency_ms"], float)


async def test_no_checks_means_ready() -> None:
    assert await run_checks({}) == (True, {})


async def test_a_failing_check_is_a_short_error_string() -> None:
    async def good() -> object:
        return "ok"

    async def broken() -> object:
        raise ConnectionRefusedError("connect to postgresql://orbion:hunter2@db:5432 refused\nmore lines")

    ok, results = await run_checks({"good": good, "broken": broken})
    assert not ok
    assert results["good"]["ok"]
    detail = results["broken"]["detail"]
    assert results["broken"]["ok"] is False
    assert detail.startswith("ConnectionRefusedError: connect to")
    assert "hunter2" not in detail and "Traceback" not in detail and "\n" not in detail


async def test_a_hanging_check_times_out_without_blocking_the_others() -> None:
    async def hangs() -> object:
        await asyncio.Event().wait()  # never set
        return None

    async def fine() -> object:
        return "ok"

    ok, results = await run_checks({"hangs": hangs, "fine": fine}, timeout=0.05)
    assert not ok
    assert results["hangs"] == {
        "ok": False,
        "detail": "timeout after 0.05s",
        "latency_ms": results["hangs"]["latency_ms"],
    }
    assert results["fine"]["ok"]


async def test_checks_run_concurrently() -> None:
    # Each check waits for the other: this only completes if both run at the same time.
    a_started, b_started = asyncio.Event(), asyncio.Event()

    async def a() -> object:
        a_started.set()
        await b_started.wait()
        return "a"

    async def b() -> object:
        b_started.set()
        await a_started.wait()
        return "b"

    ok, _ = await run_checks({"a": a, "b": b}, timeout=5)
    assert ok


async def test_bus_check_reports_what_bus_check_returns_or_raises() -> None:
    class Probe:
        def __init__(self, error: Exception | None) -> None:
            self.error = error

        async def check(self) -> str:
            if self.error:
                raise self.error
            return "127.0.0.1:4222 (12 msgs)"

    ok, results = await run_checks({"bus": bus_check(Probe(None))})
    assert ok and results["bus"]["detail"] == "127.0.0.1:4222 (12 msgs)"
    ok, results = await run_checks({"bus": bus_check(Probe(RuntimeError("stream ORBION missing")))})
    assert not ok and results["bus"]["detail"] == "RuntimeError: stream ORBION missing"


async def test_real_postgres_and_redis_checks_pass(
    pg_pool: asyncpg.Pool, redis_client: aioredis.Redis
) -> None:
    ok, results = await run_checks({"postgres": postgres_check(pg_pool), "redis": redis_check(redis_client)})
    assert ok, results
    assert results["redis"]["detail"] == "PONG"
    assert results["postgres"]["detail"]["pool_size"] >= 1


async def test_real_redis_check_fails_when_redis_is_unreachable() -> None:
    client = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    try:
        ok, results = await run_checks({"redis": redis_check(client)})
    finally:
        await client.aclose()
    assert not ok
    assert results["redis"]["ok"] is False and "Error" in results["redis"]["detail"]


async def test_the_postgres_probe_is_ready_at_once_after_a_postgres_restart(local_infra) -> None:
    import asyncpg

    from orbion_common.health import postgres_check

    pool = await asyncpg.create_pool(local_infra.url("postgres"), min_size=3, max_size=3)
    try:
        check = postgres_check(pool)
        await check()
        await local_infra.arestart_server("postgres")
        # The pool's three connections all point at the old server: no flapping through them.
        for _ in range(3):
            await check()
    finally:
        await pool.close()
