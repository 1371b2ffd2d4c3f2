"""``orbion rebuild lead``: drop the lead projection and fold it again from the lead events.

For a projection that went wrong, or after a change of the fold (``domain.evolve``). Runs in
one transaction (the API keeps serving the old rows until it commits; consumers wait), then
empties the lead cache: a cached lead at the same version could hold the old fold. After a
change of the fold, run it with the new code deployed: replicas keep recently parsed leads in
memory by version (``LeadRecorder``), and only a restart forgets the old fold's.
"""

from __future__ import annotations

import argparse
import asyncio

import asyncpg
from redis.asyncio import Redis

from orbion_common.infra import InfraError, resolve_urls

from .settings import Settings
from .store import SCHEMA, LeadStore


async def rebuild(settings: Settings, *, schema: str = SCHEMA) -> tuple[int, int]:
    """Returns (leads rebuilt, cache keys dropped)."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        async with conn.transaction():
            leads = await LeadStore(schema).rebuild_projection(conn)
    finally:
        await conn.close()
    dropped = 0
    if settings.redis_url:
        redis = Redis.from_url(settings.redis_url)
        try:
            keys = [k async for k in redis.scan_iter(match=f"{settings.lead_cache_prefix}:*", count=1000)]
            for start in range(0, len(keys), 500):
                dropped += await redis.delete(*keys[start : start + 500])
        finally:
            await redis.aclose()
    return leads, dropped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="orbion rebuild lead", description=__doc__.splitlines()[0])
    parser.add_argument("--schema", default=SCHEMA, help="Postgres schema of the lead service")
    args = parser.parse_args(argv)
    base = Settings()
    try:
        urls, _ = resolve_urls(base, start=False)
    except InfraError as exc:
        print(f"error: {exc}")
        return 1
    settings = base.model_copy(update={"database_url": urls.database_url, "redis_url": urls.redis_url})
    leads, dropped = asyncio.run(rebuild(settings, schema=args.schema))
    print(f"lead projection rebuilt: {leads} leads; {dropped} cached leads dropped")
    return 0
