"""Shared pytest fixtures: real NATS (JetStream), PostgreSQL and Redis for every test.

Servers come, per server, from ORBION_TEST_NATS_URL / ORBION_TEST_DATABASE_URL /
ORBION_TEST_REDIS_URL, else testcontainers when a Docker engine answers, else the pip-installed
binaries started in a temporary folder on free ports (see ``tests/support/servers.py`` and
docs/infrastructure.md). Everything is session-scoped and started only when a test asks.

Fixtures: ``infra_urls``, ``nats_url``, ``database_url``, ``redis_url``, ``db_pool``,
``fresh_schema``, ``unique``, ``settings_env``, ``local_infra``, ``infra_data_dir``.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

# Tests look at traces: record every one (the default samples one message in ten), here and in
# the service processes the integration tests start.
os.environ.setdefault("ORBION_TRACE_SAMPLE_RATIO", "1")

# The repository root is not on sys.path under --import-mode=importlib; tests.support lives there.
_ROOT = Path(__file__).resolve().parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from orbion_common.infra import InfraUrls, LocalInfra  # noqa: E402
from orbion_common.settings import CommonSettings  # noqa: E402
from tests.support.servers import (  # noqa: E402
    TestServers,
    docker_engine_answers,
    env_urls,
    start_local_infra,
    start_test_servers,
    stop_local_infra,
)
from tests.support.settings import settings_for  # noqa: E402


def pytest_report_header(config: pytest.Config) -> str:
    given = env_urls()
    if len(given) == 3:
        return "orbion servers: from ORBION_TEST_* variables"
    rest = "testcontainers (Docker engine answers)" if docker_engine_answers() else "pip-installed binaries"
    named = ", ".join(sorted(given)) or "none"
    return f"orbion servers: from ORBION_TEST_* for {named}; the others from {rest}, started on first use"


@pytest.fixture(scope="session")
def test_servers() -> Iterator[TestServers]:
    """The session's real servers (resolved on first use, released at session end)."""
    servers = start_test_servers()
    try:
        yield servers
    finally:
        servers.close()


@pytest.fixture(scope="session")
def infra_urls(test_servers: TestServers) -> InfraUrls:
    """URLs of the session's NATS, PostgreSQL and Redis."""
    return test_servers.urls


@pytest.fixture(scope="session")
def nats_url(infra_urls: InfraUrls) -> str:
    return str(infra_urls.nats_url)


@pytest.fixture(scope="session")
def database_url(infra_urls: InfraUrls) -> str:
    return str(infra_urls.database_url)


@pytest.fixture(scope="session")
def redis_url(infra_urls: InfraUrls) -> str:
    return str(infra_urls.redis_url)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def db_pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """One asyncpg pool for the session (tests isolate themselves with ``fresh_schema``)."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=10)
    try:
        yield pool
    finally:
        await pool.close()


@pytest_asyncio.fixture(loop_scope="session")
async def fresh_schema(db_pool: asyncpg.Pool) -> AsyncIterator[str]:
    """A new, empty schema ``t_<hex>`` for this test, dropped with everything in it afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    await db_pool.execute(f'CREATE SCHEMA "{name}"')
    try:
        yield name
    finally:
        await db_pool.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@pytest.fixture
def unique() -> str:
    """A short unique hex string for this test's ids, subjects, stream names and durables."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
def settings_env(infra_urls: InfraUrls, tmp_path: Path) -> Callable[..., Any]:
    """Factory: ``settings_env(cls=CommonSettings, **overrides)`` -> settings on the test servers.

    ``data_dir`` defaults to the test's tmp_path; the process environment is not touched.
    """

    def make(cls: type[CommonSettings] = CommonSettings, /, **overrides: Any) -> CommonSettings:
        overrides.setdefault("data_dir", tmp_path)
        return settings_for(infra_urls, cls, **overrides)

    return make


@pytest.fixture
def infra_data_dir() -> Iterator[Path]:
    """An empty folder for a LocalInfra of the test's own, deleted afterwards.

    Not under tmp_path: pytest makes its base folder private again whenever a session starts,
    which would lock out Postgres (it runs as a non-root user when tests run as root).
    """
    folder = Path(tempfile.mkdtemp(prefix="orbion-test-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def local_infra() -> Iterator[LocalInfra]:
    """Servers of our own (pip binaries, own ports and folder) that a test may stop and restart.

    Always LocalInfra, whatever serves ``infra_urls``; started on first request only.
    """
    infra = start_local_infra()
    try:
        yield infra
    finally:
        stop_local_infra(infra)


@pytest.fixture(autouse=True)
def _local_infra_left_running(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a test that used ``local_infra``, start again any server it left stopped."""
    yield
    if "local_infra" in request.fixturenames:
        infra: LocalInfra = request.getfixturevalue("local_infra")
        for name in infra.servers:
            if not infra.is_running(name):
                infra.start_server(name)
