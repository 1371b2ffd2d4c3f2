"""Fixtures for the gateway's tests: a gateway app on real NATS and Redis.

Redis comes from the root fixture ``redis_url`` when it exists, else ORBION_TEST_REDIS_URL;
each gateway gets its own key prefix, deleted afterwards. NATS is a private nats-server for
this test session (``LocalInfra``): the bus binds every stream to ``orbion.events.>``, so a
test that needs its own stream settings (a short duplicate window) cannot share a server
where another stream already claims those subjects. Tests that stop servers get their own.
Builders live in ``gateway_testkit`` (this folder is put on sys.path so that test modules can
import it under that unique name).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from gateway_testkit import Gateway, close_gateway, open_gateway

from orbion_common.infra import LocalInfra

GatewayFactory = Callable[..., Awaitable[Gateway]]


def _server_url(request: pytest.FixtureRequest, fixture: str, env: str) -> str:
    with contextlib.suppress(pytest.FixtureLookupError):
        return str(request.getfixturevalue(fixture))
    return os.environ.get(env, "")


@pytest.fixture(scope="session")
def gw_nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    infra = LocalInfra(tmp_path_factory.mktemp("gateway-nats"), servers=("nats",), durable=False)
    yield infra.start().nats_url
    infra.stop()


@pytest.fixture
def restartable(tmp_path: Path) -> Iterator[LocalInfra]:
    """A NATS and a Redis of this test's own, to stop and start again."""
    infra = LocalInfra(tmp_path / "infra", servers=("nats", "redis"), durable=False)
    infra.start()
    yield infra
    infra.stop()


@pytest.fixture(scope="session")
def gw_private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    infra = LocalInfra(tmp_path_factory.mktemp("gateway-redis"), servers=("redis",), durable=False)
    yield infra.start().redis_url
    infra.stop()


@pytest.fixture
def gw_redis_url(request: pytest.FixtureRequest) -> str:
    """The root ``redis_url``, else ORBION_TEST_REDIS_URL, else a private redis-server."""
    return _server_url(request, "redis_url", "ORBION_TEST_REDIS_URL") or str(
        request.getfixturevalue("gw_private_redis")
    )


@pytest.fixture
async def make_gateway(gw_nats_url: str, gw_redis_url: str) -> AsyncIterator[GatewayFactory]:
    """``await make_gateway(**settings)``: a gateway app on its own stream and key prefix."""
    made: list[Gateway] = []

    async def make(**overrides: Any) -> Gateway:
        nats_url = overrides.pop("nats_url", gw_nats_url)
        redis_url = overrides.pop("redis_url", gw_redis_url)
        gateway = await open_gateway(nats_url, redis_url, **overrides)
        made.append(gateway)
        return gateway

    yield make
    for gateway in made:
        await close_gateway(gateway)


@pytest.fixture
async def gateway(make_gateway: GatewayFactory) -> Gateway:
    return await make_gateway()
