"""Fixtures of the lead tests: a fresh Postgres schema, Redis prefix and durable name per test.

Servers come from the root fixtures (``database_url``, ``redis_url``, ``nats_url``) when they
exist, else from ORBION_TEST_* variables; a test without its server is skipped. Also makes
``lead_builders`` importable (pytest runs in importlib mode).
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from orbion_common.migrations import migrate
from orbion_lead.bootstrap import Service, build
from orbion_lead.store import MIGRATIONS

sys.path.insert(0, str(Path(__file__).parent))

from lead_builders import drop_test_keys, lead_settings


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
    name = f"lead_t_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(pg_url)
    try:
        await migrate(conn, name, MIGRATIONS)
        yield name
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        await conn.close()


@pytest.fixture
async def service(pg_url: str, redis_test_url: str, schema: str) -> AsyncIterator[Service]:
    """Postgres and Redis, no bus: handlers are called directly (the bus has its own tests)."""
    svc = await build(
        lead_settings(pg_url, redis_test_url, rate_limit_prefix=f"test:{schema}:rl"),
        schema=schema,
        cache_prefix=f"test:{schema}:lead",
        with_bus=False,
    )
    yield svc
    await drop_test_keys(svc.redis, schema)
    await svc.stop()
