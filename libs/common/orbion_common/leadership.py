"""One leader per job across replicas: a Postgres advisory lock held on a connection of its own.

The lock lives as long as that connection: if the process dies, Postgres drops the session and
another replica takes over at its next try.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg


@asynccontextmanager
async def leadership(pool: asyncpg.Pool, key: str) -> AsyncIterator[bool]:
    """Yields True while this process holds the lock named ``key``, False if another one does."""
    async with pool.acquire() as conn:
        if not await conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", key):
            yield False
            return
        try:
            yield True
        finally:
            try:
                await conn.execute("SELECT pg_advisory_unlock(hashtext($1))", key)
            except BaseException:
                # The pool does not reset sessions (db.create_pool): a connection that may
                # still hold the lock must not go back to it.
                conn.terminate()
                raise
