"""Fixtures of the reliability suite: a whole system with fakes on the session's servers.

``fault_system`` runs on the session's NATS, Postgres and Redis (each system has its own
database, stream and Redis prefix). Tests that restart a server build their system on
``local_infra`` themselves (test_infra_restarts.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio

from tests.reliability.harness import Fakes, FaultSystem, running_system


@pytest_asyncio.fixture(loop_scope="session")
async def fault_system(
    nats_url: str, database_url: str, redis_url: str, tmp_path: Path
) -> AsyncIterator[tuple[FaultSystem, Fakes]]:
    async with running_system(
        nats_url=nats_url, database_url=database_url, redis_url=redis_url, workdir=tmp_path / "system"
    ) as pair:
        yield pair
