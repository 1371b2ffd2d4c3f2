"""Fixtures of the monitor's tests: real servers' URLs, monitor settings, and serving an app on a
real port (OTLP exporters, health polls and Chromium talk HTTP to it)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import httpx
import pytest

from orbion_common.service import ServiceServer
from orbion_monitor.settings import Settings


@pytest.fixture(scope="session")
def infra(nats_url: str, database_url: str, redis_url: str) -> dict[str, str]:
    """URLs of the session's real NATS, Postgres and Redis (root conftest.py)."""
    return {"nats": nats_url, "postgres": database_url, "redis": redis_url}


@pytest.fixture
def make_settings() -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "nats_url": "",
            "database_url": "",
            "redis_url": "",
            "host": "127.0.0.1",
            "monitor_targets": {},
            "monitor_check_timeout_seconds": 1.0,
            "monitor_window_seconds": 10,
        }
        values.update(overrides)
        return Settings(**values)

    return make


ServeFactory = Callable[[Any, Settings], AbstractAsyncContextManager[str]]


@pytest.fixture
def serve() -> ServeFactory:
    """``async with serve(app, settings) as base_url:`` runs the app under uvicorn on a free port."""

    @asynccontextmanager
    async def run(app: Any, settings: Settings) -> AsyncIterator[str]:
        server = ServiceServer(app, settings, 0, graceful_seconds=1)
        task = asyncio.create_task(server.serve())
        try:
            async with asyncio.timeout(10):
                await server.wait_started()
            yield f"http://127.0.0.1:{server.port}"
        finally:
            server.stop()
            await asyncio.wait_for(task, 10)

    return run


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=5.0) as client:
        yield client
