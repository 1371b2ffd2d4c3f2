"""``orbion rebuild conversation``: rebuild the projections from the event store, online.

How: create empty copies of the projection tables (suffix ``_rebuild``), replay the whole log
into them with the live projector's code (batched transactions, contacts spread over a few
connections, each contact's events in order), then swap in one short transaction:

1. ``LOCK events IN SHARE MODE``: waits for transactions that are appending right now and
   holds off new appends (consumers pause for the duration of the swap, nothing fails);
2. lock the live projection tables; replay what was appended since the bulk replay;
3. drop the live tables, rename the copies (and their indexes) to the live names.

Consumers keep running during the bulk replay; a crash before the swap leaves the live tables
untouched (the copies are dropped on the next run). ``pending_replies`` is a work queue, not
a projection: it is left alone. Prints events/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import asyncpg

from orbion_common.events import decode
from orbion_common.eventstore import START, Cursor, EventStore, StoredEvent

from . import projector
from .batch import BatchProjection
from .domain import ContactSummary
from .store import Projection

SUFFIX = "_rebuild"


@dataclass(frozen=True)
class RebuildReport:
    events: int
    seconds: float
    swap_seconds: float

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


async def _create_copies(conn: asyncpg.Connection) -> None:
    for table in Projection.TABLES:
        await conn.execute(f"DROP TABLE IF EXISTS {table}{SUFFIX}")
        await conn.execute(f"CREATE TABLE {table}{SUFFIX} (LIKE {table} INCLUDING ALL)")


async def apply_in_memory(
    conn: asyncpg.Connection, suffix: str, events: Sequence[StoredEvent], opt_in_rule: str
) -> None:
    """Project ``events`` into the ``suffix`` tables: rows read once, changed in memory, written once."""
    batch = BatchProjection(suffix)
    await batch.load(conn, events)
    contacts: dict[str, ContactSummary] = {}
    for stored in events:
        await projector.apply(conn, batch, stored, opt_in_rule, contacts)
    await batch.flush(conn, contacts)


async def apply_batch(
    pool: asyncpg.Pool, suffix: str, events: Sequence[StoredEvent], *, workers: int, opt_in_rule: str
) -> None:
    """Apply ``events`` with up to ``workers`` connections; one contact always on one of them."""
    lanes: list[list[StoredEvent]] = [[] for _ in range(workers)]
    for stored in events:
        lanes[zlib.crc32(stored.event.stream_id.encode()) % workers].append(stored)

    async def run(lane: list[StoredEvent]) -> None:
        async with pool.acquire() as conn, conn.transaction():
            await apply_in_memory(conn, suffix, lane, opt_in_rule)

    await asyncio.gather(*(run(lane) for lane in lanes if lane))


async def _read_rest(conn: asyncpg.Connection, schema: str, cursor: Cursor, limit: int) -> list[StoredEvent]:
    # Inside the swap, appends are locked out: every event after the cursor is committed, so
    # the log can be read without read_after's wait for running transactions.
    rows = await conn.fetch(
        f'SELECT position, version, tx_id::text::bigint AS tx_id, body::text AS body FROM "{schema}".events '
        "WHERE (tx_id, position) > ($1::text::xid8, $2) ORDER BY tx_id, position LIMIT $3",
        str(cursor.tx_id),
        cursor.position,
        limit,
    )
    return [StoredEvent(r["position"], r["version"], decode(r["body"]), int(r["tx_id"])) for r in rows]


_INDEXES = "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema() AND tablename = $1"


async def _swap(conn: asyncpg.Connection) -> None:
    for table in Projection.TABLES:
        old = {r["indexname"]: r["indexdef"] for r in await conn.fetch(_INDEXES, table)}
        new = await conn.fetch(_INDEXES, table + SUFFIX)
        await conn.execute(f"DROP TABLE {table}")
        await conn.execute(f"ALTER TABLE {table}{SUFFIX} RENAME TO {table}")
        # Give each copied index the name of the live index with the same definition.
        for row in new:
            shape = row["indexdef"].split(" ON ", 1)[1].replace(f"{table}{SUFFIX}", table)
            for name, definition in old.items():
                if definition.split(" ON ", 1)[1] == shape and name != row["indexname"]:
                    await conn.execute(f'ALTER INDEX "{row["indexname"]}" RENAME TO "{name}"')
                    break


async def rebuild(
    pool: asyncpg.Pool,
    schema: str,
    *,
    batch_size: int = 2000,
    workers: int = 4,
    opt_in_rule: str = "keyword",
    progress: Callable[[int], None] | None = None,
) -> RebuildReport:
    """Rebuild the projections of ``schema`` (the pool's search_path must be that schema)."""
    store = EventStore(schema)
    started = time.perf_counter()
    async with pool.acquire() as conn:
        await _create_copies(conn)
    cursor, count = START, 0
    while True:
        async with pool.acquire() as conn:
            events = await store.read_after(conn, cursor, limit=batch_size)
        if not events:
            break
        await apply_batch(pool, SUFFIX, events, workers=workers, opt_in_rule=opt_in_rule)
        cursor, count = events[-1].cursor, count + len(events)
        if progress is not None:
            progress(count)
    swap_started = time.perf_counter()
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(f'LOCK TABLE "{schema}".events IN SHARE MODE')
        tables = ", ".join(Projection.TABLES)
        await conn.execute(f"LOCK TABLE {tables} IN ACCESS EXCLUSIVE MODE")
        while True:
            rest = await _read_rest(conn, schema, cursor, batch_size)
            if not rest:
                break
            await apply_in_memory(conn, SUFFIX, rest, opt_in_rule)
            cursor, count = rest[-1].cursor, count + len(rest)
        await _swap(conn)
    finished = time.perf_counter()
    return RebuildReport(count, finished - started, finished - swap_started)


def main(argv: list[str] | None = None) -> int:
    from .bootstrap import SCHEMA
    from .settings import Settings

    parser = argparse.ArgumentParser(
        prog="orbion rebuild conversation",
        description="Drop and rebuild the conversation projections from the event store, online.",
    )
    parser.add_argument("--schema", default=SCHEMA, help="Postgres schema (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=2000, help="events per transaction batch")
    parser.add_argument("--workers", type=int, default=4, help="connections replaying in parallel")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON on the last line")
    args = parser.parse_args(argv)
    settings = Settings()
    database_url = settings.database_url or _local_database_url(settings)

    async def run() -> RebuildReport:
        pool = await asyncpg.create_pool(
            database_url, min_size=1, max_size=args.workers + 1, server_settings={"search_path": args.schema}
        )
        assert pool is not None
        try:
            return await rebuild(
                pool,
                args.schema,
                batch_size=args.batch,
                workers=args.workers,
                opt_in_rule=settings.opt_in_rule,
            )
        finally:
            await pool.close()

    report = asyncio.run(run())
    print(
        f"rebuilt conversation projections from {report.events} events in {report.seconds:.2f} s "
        f"({report.events_per_second:,.0f} events/s; tables swapped in {report.swap_seconds * 1000:.0f} ms)"
    )
    if args.json:
        print(
            json.dumps(
                {
                    "events": report.events,
                    "seconds": round(report.seconds, 3),
                    "events_per_second": round(report.events_per_second, 1),
                    "swap_ms": round(report.swap_seconds * 1000, 1),
                }
            )
        )
    return 0


def _local_database_url(settings: object) -> str:
    from orbion_common.infra import resolve_urls
    from orbion_common.settings import CommonSettings

    assert isinstance(settings, CommonSettings)
    urls, _ = resolve_urls(settings, start=False)
    return urls.database_url
