"""Fixtures for the llm-proxy tests: a fresh Postgres schema per test, migrated, with its own pool.

Server URLs come from the root fixtures (``database_url``, ``nats_url``, ``redis_url``) when
they exist, else from ``ORBION_TEST_*``, else the local default servers.
"""

from __future__ import annotations

import contextlib
import os
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:  # so that tests.fakes imports with --import-mode=importlib
    sys.path.insert(0, str(ROOT))

from orbion_common.events import ReplyRequested  # noqa: E402
from orbion_common.migrations import migrate  # noqa: E402
from orbion_llm_proxy import store  # noqa: E402
from orbion_llm_proxy.deps import Deps  # noqa: E402
from orbion_llm_proxy.settings import Settings  # noqa: E402
from tests.fakes.whatsapp import FakeWhatsApp  # noqa: E402

from .helpers import build_deps, close_built, new_phone, reply_requested  # noqa: E402

_DEFAULTS = {
    "database_url": ("ORBION_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"),
    "nats_url": ("ORBION_TEST_NATS_URL", "nats://127.0.0.1:4222"),
    "redis_url": ("ORBION_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"),
}


def _url(request: pytest.FixtureRequest, name: str) -> str:
    try:
        return str(request.getfixturevalue(name))
    except pytest.FixtureLookupError:
        env, default = _DEFAULTS[name]
        return os.environ.get(env, default)


@pytest.fixture
def urls(request: pytest.FixtureRequest) -> dict[str, str]:
    return {name: _url(request, name) for name in _DEFAULTS}


@pytest.fixture
def tag() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
async def schema(urls: dict[str, str], tag: str) -> AsyncIterator[str]:
    name = f"llmp_{tag}"
    conn = await asyncpg.connect(urls["database_url"])
    try:
        await migrate(conn, name, store.MIGRATIONS)
        yield name
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        await conn.close()


@pytest.fixture
async def pool(urls: dict[str, str], schema: str) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(
        urls["database_url"], min_size=1, max_size=8, server_settings={"search_path": f"{schema},public"}
    )
    assert p is not None
    try:
        yield p
    finally:
        await p.close()


def make_settings(urls: dict[str, str], tag: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": urls["database_url"],
        "nats_url": urls["nats_url"],
        "redis_url": "",
        "stream_name": "ORBION",
        "whatsapp_pair_interval_seconds": 0.0,
        "whatsapp_backoff_base_seconds": 0.05,
        "whatsapp_backoff_max_seconds": 0.2,
        "whatsapp_breaker_reset_seconds": 0.3,
        "openai_breaker_reset_seconds": 0.3,
        "openai_retry_backoff_seconds": 0.01,
        "openai_timeout_seconds": 2.0,
        "sender_poll_seconds": 0.05,
    }
    values.update(overrides)
    return Settings(**values)


def cloud_settings(urls: dict[str, str], tag: str, base_url: str, **overrides: Any) -> Settings:
    """:func:`make_settings` sending through the fake WhatsApp Cloud API at ``base_url``."""
    return make_settings(
        urls, tag, whatsapp_token="test-token", whatsapp_api_base_url=base_url,
        whatsapp_phone_number_id="1234567890", **overrides,
    )  # fmt: skip


@contextlib.asynccontextmanager
async def answered_on_cloud(
    pool: asyncpg.Pool, schema: str, urls: dict[str, str], tag: str
) -> AsyncIterator[tuple[FakeWhatsApp, Deps, ReplyRequested]]:
    """A fake WhatsApp Cloud API, the llm-proxy wired to it, and a new contact's reply request
    answered: its reply stored for the sender, not sent yet."""
    fake = FakeWhatsApp()
    async with fake as base_url:
        deps = build_deps(cloud_settings(urls, tag, base_url), pool, schema=schema)
        req = reply_requested(new_phone())
        await deps.handlers.answer_reply_request(req)
        yield fake, deps, req


@pytest.fixture(autouse=True)
async def _close_http_clients() -> AsyncIterator[None]:
    """Each test's service wiring is closed after it (no aiohttp session left unclosed)."""
    yield
    await close_built()
