"""Versioned SQL migrations, applied once each, in order, under a lock.

Every service schema gets the event store (``orbion_common/migrations/000_event_store.sql``)
and then the service's own files ``NNN_name.sql``. Each file runs in its own transaction with
``search_path`` set to the schema, and is recorded in ``<schema>.schema_migrations``; running
``migrate`` again (another replica, a restart, ``orbion migrate``) applies nothing new.
"""

from __future__ import annotations

import logging
from pathlib import Path

import asyncpg

log = logging.getLogger(__name__)

EVENT_STORE_MIGRATIONS = Path(__file__).parent / "migrations"


def _files(folder: Path | None) -> list[Path]:
    if folder is None or not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.sql") if p.name[:3].isdigit())


async def migrate(
    target: asyncpg.Pool | asyncpg.Connection, schema: str, service_migrations: Path | None = None
) -> list[str]:
    """Bring ``schema`` up to date; returns the names of the migrations applied now."""
    if isinstance(target, asyncpg.Pool):
        async with target.acquire() as conn:
            return await _migrate(conn, schema, service_migrations)
    return await _migrate(target, schema, service_migrations)


async def _migrate(conn: asyncpg.Connection, schema: str, service_migrations: Path | None) -> list[str]:
    if not schema.isidentifier():
        raise ValueError(f"not a valid schema name: {schema!r}")
    applied: list[str] = []
    # Replicas starting together serialise here; the loser finds everything applied.
    await conn.execute("SELECT pg_advisory_lock(hashtext($1))", f"orbion-migrate:{schema}")
    try:
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        await conn.execute(
            f'CREATE TABLE IF NOT EXISTS "{schema}".schema_migrations '
            "(name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["name"] for r in await conn.fetch(f'SELECT name FROM "{schema}".schema_migrations')}
        for path in _files(EVENT_STORE_MIGRATIONS) + _files(service_migrations):
            if path.name in done:
                continue
            async with conn.transaction():
                await conn.execute(f'SET LOCAL search_path TO "{schema}", public')
                await conn.execute(path.read_text())
                await conn.execute(f'INSERT INTO "{schema}".schema_migrations (name) VALUES ($1)', path.name)
            applied.append(path.name)
            log.info("migration applied", extra={"schema": schema, "migration": path.name})
    finally:
        try:
            await conn.execute("SELECT pg_advisory_unlock(hashtext($1))", f"orbion-migrate:{schema}")
        except BaseException:
            conn.terminate()  # may still hold the lock; pooled connections are not reset (db.py)
            raise
    return applied
