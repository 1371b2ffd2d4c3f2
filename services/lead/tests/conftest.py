"""Fixtures of the lead tests: a fresh Postgres schema, Redis prefix and durable name per test.

Servers come from the root fixtures (``database_url``, ``redis_url``, ``nats_url``) when they
exist, else from ORBION_TEST_* variables; a test without its server is skipped. Also makes
``lead_builders`` importable (pytest runs in importlib mode).
"""

from __future__ import annotations

import os
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


def _server_url(request: pytest.FixtureRequest, fixture: str, env: str) -> str:
    try:
        return str(request.getfixturevalue(fixture))
    except pytest.FixtureLookupError:
        url = os.environ.get(env)
        if not url:
            pytest.skip(f"no server: set {env}")
        return url


@pytest.fixture
def pg_url(request: pytest.FixtureRequest) -> str:
    return _server_url(request, "database_url", "ORBION_TEST_DATABASE_URL")


@pytest.fixture
def redis_test_url(request: pytest.FixtureRequest) -> str:
    return _server_url(request, "redis_url", "ORBION_TEST_REDIS_URL")


@pytest.fixture
def nats_test_url(request: pytest.FixtureRequest) -> str:
    return _server_url(request, "nats_url", "ORBION_TEST_NATS_URL")


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
