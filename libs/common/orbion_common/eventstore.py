"""The event store: an append-only log of one service's events in that service's schema.

Every method takes the connection first so that the caller owns the transaction: appending
events, updating projections, marking the input as processed and moving a checkpoint commit
together or not at all.

- Streams: one per aggregate (a contact's phone). ``version`` counts events in a stream;
  ``UNIQUE (stream_id, version)`` gives optimistic concurrency.
- Event ids are unique for ever: appending an event that is already stored is a no-op.
- ``position`` orders the whole log. Positions are allocated before commit, so a reader that
  simply follows ``position`` could pass a gap that a slower transaction fills later. Followers
  use :meth:`EventStore.read_after`, which reads in ``(tx_id, position)`` order and only below the
  oldest transaction still running: that part of the log can no longer change. The price: that
  horizon is the whole server's, so a long write transaction anywhere on it (another database
  included) delays every follower until it ends; keep transactions short.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, NamedTuple, TypeVar

import asyncpg
import orjson
from opentelemetry import propagate
from opentelemetry.context import Context, get_current

from .events import EncodedEvent, Envelope, Event, decode, encode


class ConcurrencyError(RuntimeError):
    """The stream moved on since the caller read it: reload and decide again."""


class Cursor(NamedTuple):
    """A follower's place in the log: after this transaction id and position."""

    tx_id: int
    position: int


START = Cursor(0, 0)


@dataclass(frozen=True)
class StoredEvent:
    position: int
    version: int
    event: Event
    tx_id: int = 0
    trace_context: dict[str, str] | None = None

    @property
    def cursor(self) -> Cursor:
        return Cursor(self.tx_id, self.position)


@dataclass(frozen=True)
class StoredEncoded:
    """A stored event left as the JSON the store keeps, for passing it on unparsed (a relay)."""

    event: EncodedEvent
    trace_context: dict[str, str] | None = None


S = TypeVar("S", StoredEvent, StoredEncoded)


class Page(NamedTuple, Generic[S]):
    """What a follower read: the events it wants, and where to continue from."""

    events: list[S]
    cursor: Cursor  # after the last event read, of any type
    read: int  # events read, of any type


def _stored(row: asyncpg.Record) -> StoredEvent:
    return StoredEvent(
        position=row["position"],
        version=row["version"],
        event=decode(row["body"]),
        tx_id=int(row["tx_id"]),
        trace_context=_trace_of(row),
    )


def _stored_encoded(row: asyncpg.Record) -> StoredEncoded:
    body: str = row["body"]
    event = EncodedEvent(row["event_id"], row["type"], row["stream_id"], row["correlation_id"], body.encode())
    return StoredEncoded(event, _trace_of(row))


def _trace_of(row: asyncpg.Record) -> dict[str, str] | None:
    return parse_trace_context(row.get("trace_context"))


def parse_trace_context(trace: str | None) -> dict[str, str] | None:
    """The headers of a trace context that :func:`trace_context` stored (None without one)."""
    return orjson.loads(trace) if trace else None


def trace_context(context: Context | None = None) -> str | None:
    """The W3C trace context stored with appended events: of ``context``, else the current one.

    A batch writer captures it in each caller's context, so that every event keeps its own trace.
    """
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    return orjson.dumps(carrier).decode() if carrier else None


def context_of(trace: str | None) -> Context:
    """The current context joined to a trace context that :func:`trace_context` stored (as it
    is without one): to append an event later in the trace of the message that asked for it."""
    headers = parse_trace_context(trace)
    return propagate.extract(headers) if headers else get_current()


class EventStore:
    """SQL for the event-store tables of one schema (see ``migrations/000_event_store.sql``)."""

    def __init__(self, schema: str) -> None:
        if not schema.isidentifier():
            raise ValueError(f"not a valid schema name: {schema!r}")
        self.schema = schema
        s = f'"{schema}"'
        self._sql_version = f"SELECT coalesce(max(version), 0) FROM {s}.events WHERE stream_id = $1"
        self._sql_trace_of = f"SELECT trace_context::text FROM {s}.events WHERE event_id = $1"
        self._sql_version_and_existing = f"""
            SELECT coalesce((SELECT max(version) FROM {s}.events WHERE stream_id = $1), 0) AS version,
                   ARRAY(SELECT event_id FROM {s}.events WHERE event_id = ANY($2::text[])) AS existing"""
        self._sql_insert = f"""
            INSERT INTO {s}.events (event_id, stream_id, version, type, occurred_at, body, trace_context)
            SELECT e.event_id, $1, e.version, e.type, e.occurred_at, e.body::jsonb, $7::jsonb
            FROM unnest($2::text[], $3::int[], $4::text[], $5::timestamptz[], $6::text[])
                 AS e(event_id, version, type, occurred_at, body)
            ORDER BY e.version
            RETURNING position, version, tx_id::text::bigint AS tx_id, body::text AS body,
                      trace_context::text AS trace_context"""
        self._sql_insert_many = self._insert_at_versions_sql(1)
        self._sql_stream = (
            f"SELECT position, version, tx_id::text::bigint AS tx_id, body::text AS body "
            f"FROM {s}.events WHERE stream_id = $1 AND version > $2 ORDER BY version"
        )
        self._sql_last_of_type = (
            f"SELECT position, version, tx_id::text::bigint AS tx_id, body::text AS body "
            f"FROM {s}.events WHERE stream_id = $1 AND type = $2 ORDER BY version DESC LIMIT 1"
        )
        self._sql_all = (
            f"SELECT position, version, tx_id::text::bigint AS tx_id, body::text AS body FROM {s}.events "
            f"WHERE position > $1 AND tx_id < pg_snapshot_xmin(pg_current_snapshot()) "
            f"ORDER BY position LIMIT $2"
        )
        # The body only of the wanted types ($4, NULL: all): the others are passed, not parsed.
        self._sql_after = (
            f"SELECT position, version, tx_id::text::bigint AS tx_id, event_id, stream_id, type, "
            f"CASE WHEN $4::text[] IS NULL OR type = ANY($4) THEN body::text END AS body, "
            f"CASE WHEN $4::text[] IS NULL OR type = ANY($4) THEN body->>'correlation_id' END "
            f"AS correlation_id, "
            f"trace_context::text AS trace_context FROM {s}.events "
            f"WHERE (tx_id, position) > ($1::text::xid8, $2) "
            f"AND tx_id < pg_snapshot_xmin(pg_current_snapshot()) "
            f"ORDER BY tx_id, position LIMIT $3"
        )
        self._sql_claim = (
            f"INSERT INTO {s}.processed (consumer, event_id) VALUES ($1, $2) ON CONFLICT DO NOTHING"
        )
        self._sql_claim_many = (
            f"INSERT INTO {s}.processed (consumer, event_id) SELECT $1, unnest($2::text[]) "
            f"ON CONFLICT DO NOTHING RETURNING event_id"
        )
        self._sql_checkpoint = (
            f"SELECT tx_id::text::bigint AS tx_id, position FROM {s}.checkpoints WHERE name = $1"
        )
        self._sql_save_checkpoint = (
            f"INSERT INTO {s}.checkpoints (name, tx_id, position) VALUES ($1, $2::text::xid8, $3) "
            f"ON CONFLICT (name) DO UPDATE SET tx_id = excluded.tx_id, position = excluded.position, "
            f"updated_at = now()"
        )

    async def append(
        self,
        conn: asyncpg.Connection,
        stream_id: str,
        events: Sequence[Envelope],
        *,
        expected_version: int | None = None,
        savepoint: bool = True,
    ) -> list[StoredEvent]:
        """Append ``events`` to ``stream_id`` in order; returns the ones newly stored.

        Events already stored (same ``event_id``) are skipped. With ``expected_version``, raises
        :class:`ConcurrencyError` unless the stream is at exactly that version; without it, a
        concurrent append to the same stream also surfaces as :class:`ConcurrencyError`.
        ``savepoint=False`` for callers whose transaction ends on that error anyway: the
        savepoint, which keeps the caller's transaction usable, costs two round trips.
        """
        if any(e.stream_id != stream_id for e in events):
            raise ValueError("every event must belong to the stream it is appended to")
        row = await conn.fetchrow(self._sql_version_and_existing, stream_id, [e.event_id for e in events])
        current: int = row["version"]
        if expected_version is not None and current != expected_version:
            raise ConcurrencyError(f"stream {stream_id} is at version {current}, expected {expected_version}")
        existing = set(row["existing"])
        fresh = [e for e in events if e.event_id not in existing]
        if not fresh:
            return []
        args = (
            stream_id,
            [e.event_id for e in fresh],
            list(range(current + 1, current + 1 + len(fresh))),
            [e.type for e in fresh],
            [e.occurred_at for e in fresh],
            [encode(e).decode() for e in fresh],
            trace_context(),
        )
        conflict = f"concurrent append to stream {stream_id}"
        rows = await _insert(conn, self._sql_insert, args, savepoint, conflict)
        return [_stored(r) for r in rows]

    async def append_at_versions(
        self,
        conn: asyncpg.Connection,
        events: Sequence[tuple[Envelope, int]],
        trace_contexts: Sequence[str | None] | None = None,
        *,
        savepoint: bool = True,
    ) -> list[int]:
        """Append events of many streams in one statement, each at the version the caller decided;
        returns their positions, in the order given.

        For batch writers that hold the streams' current versions already (e.g. locked with their
        projection rows): a version taken meanwhile by another writer, or an event id already
        stored, raises :class:`ConcurrencyError` and nothing of the batch is stored.
        ``trace_contexts`` (see :func:`trace_context`), one per event: by default the current one.
        ``savepoint=False`` saves two round trips for a caller that abandons its transaction on
        :class:`ConcurrencyError` anyway (the savepoint keeps it usable).
        Writers that may append to the same streams concurrently should order ``events`` the
        same way (e.g. by stream), so that their row locks cannot deadlock.
        """
        if not events:
            return []
        rows = await _insert(
            conn, self._sql_insert_many, _at_versions(events, trace_contexts), savepoint, "concurrent append"
        )
        return _positions_of(events, rows)

    async def append_at_versions_with(
        self,
        conn: asyncpg.Connection,
        events: Sequence[tuple[Envelope, int]],
        trace_contexts: Sequence[str | None],
        rows: Callable[[str], str],
        rows_args: Sequence[object],
    ) -> list[int]:
        """:meth:`append_at_versions` (without a savepoint) and the caller's own rows in one
        statement; returns the events' positions. ``rows(condition)`` is the caller's
        data-modifying statement on ``$1`` to ``$len(rows_args)``, with ``condition`` in its
        WHERE: it waits for every event to be inserted, so that the locks are taken in the order
        of two separate statements, and a concurrent writer taking them in that order cannot
        deadlock with it."""
        appending = self._insert_at_versions_sql(len(rows_args) + 1)
        sql = f"""
            WITH appended AS ({appending}), written AS ({rows(after("appended"))})
            SELECT event_id, position FROM appended"""
        args = [*rows_args, *_at_versions(events, trace_contexts)]
        return _positions_of(events, await _insert(conn, sql, args, False, "concurrent append"))

    def _insert_at_versions_sql(self, first: int) -> str:
        p = [f"${first + i}" for i in range(7)]
        s = f'"{self.schema}"'
        return f"""
            INSERT INTO {s}.events (event_id, stream_id, version, type, occurred_at, body, trace_context)
            SELECT e.event_id, e.stream_id, e.version, e.type, e.occurred_at, e.body::jsonb, e.trace::jsonb
            FROM unnest({p[0]}::text[], {p[1]}::text[], {p[2]}::int[], {p[3]}::text[], {p[4]}::timestamptz[],
                        {p[5]}::text[], {p[6]}::text[])
                 WITH ORDINALITY AS e(event_id, stream_id, version, type, occurred_at, body, trace, n)
            ORDER BY e.n
            RETURNING event_id, position"""

    def insert_next(
        self,
        events: Sequence[Envelope],
        trace_contexts: Sequence[str | None] | None = None,
        *,
        first: int = 1,
        only: str = "",
        unstored_only: bool = False,
    ) -> tuple[str, list[object]]:
        """An INSERT that appends each event after its stream's last version (events of one
        stream in the order given), read in the same statement, ``RETURNING event_id, position,
        version``, and its arguments, numbered from ``$first``: for a batch writer that needs the
        versions for nothing else (a round trip less than reading them first), and that may store
        its own rows in the same statement, the INSERT as one of its data-modifying CTEs.
        Run it with :meth:`fetch_appending`: a version another writer takes meanwhile, or an
        event id already stored, raises :class:`ConcurrencyError` and nothing is stored.
        ``only``, a condition on ``e.event_id``, and ``unstored_only`` (an event already in the
        store, as after a retried commit whose first answer was lost): the events left out
        before the versions are counted."""
        s = f'"{self.schema}"'
        p = [f"${first + i}" for i in range(6)]
        conditions = [only] if only else []
        if unstored_only:
            conditions.append(f"NOT EXISTS (SELECT 1 FROM {s}.events o WHERE o.event_id = e.event_id)")
        sql = f"""
            INSERT INTO {s}.events (event_id, stream_id, version, type, occurred_at, body, trace_context)
            SELECT e.event_id, e.stream_id,
                   coalesce((SELECT max(x.version) FROM {s}.events x WHERE x.stream_id = e.stream_id), 0)
                   + row_number() OVER (PARTITION BY e.stream_id ORDER BY e.n),
                   e.type, e.occurred_at, e.body::jsonb, e.trace::jsonb
            FROM unnest({p[0]}::text[], {p[1]}::text[], {p[2]}::text[], {p[3]}::timestamptz[],
                        {p[4]}::text[], {p[5]}::text[])
                 WITH ORDINALITY AS e(event_id, stream_id, type, occurred_at, body, trace, n)
            {f"WHERE {' AND '.join(conditions)}" if conditions else ""}
            ORDER BY e.n
            RETURNING event_id, position, version"""
        return sql, list(_columns(events, trace_contexts))

    async def fetch_appending(
        self, conn: asyncpg.Connection, sql: str, args: Sequence[object], *, savepoint: bool = True
    ) -> list[asyncpg.Record]:
        """Run a statement that appends events (one built on :meth:`insert_next`): a unique
        violation is a :class:`ConcurrencyError` (nothing of the statement is stored)."""
        return await _insert(conn, sql, args, savepoint, "concurrent append")

    async def trace_context_of(self, conn: asyncpg.Connection, event_id: str) -> str | None:
        """The trace context stored with an event (:func:`trace_context`'s form); None without."""
        trace: str | None = await conn.fetchval(self._sql_trace_of, event_id)
        return trace

    async def last_of_type(
        self, conn: asyncpg.Connection, stream_id: str, event_type: str
    ) -> StoredEvent | None:
        """The newest event of ``event_type`` in ``stream_id``, if any."""
        row = await conn.fetchrow(self._sql_last_of_type, stream_id, event_type)
        return _stored(row) if row else None

    async def stream_version(self, conn: asyncpg.Connection, stream_id: str) -> int:
        version: int = await conn.fetchval(self._sql_version, stream_id)
        return version

    async def load_stream(
        self, conn: asyncpg.Connection, stream_id: str, *, after_version: int = 0
    ) -> list[StoredEvent]:
        """The events of one stream, oldest first."""
        return [_stored(r) for r in await conn.fetch(self._sql_stream, stream_id, after_version)]

    async def read_all(
        self, conn: asyncpg.Connection, *, after_position: int = 0, limit: int = 500
    ) -> list[StoredEvent]:
        """Committed events in position order, for replays and rebuilds that read the whole log."""
        return [_stored(r) for r in await conn.fetch(self._sql_all, after_position, limit)]

    async def read_after(
        self, conn: asyncpg.Connection, cursor: Cursor, *, limit: int = 500
    ) -> list[StoredEvent]:
        """Events after ``cursor`` that no running transaction can still precede, in log order.

        Following the log with this never skips an event, however late its transaction commits.
        """
        return (await self.read_page(conn, cursor, limit=limit)).events

    async def read_page(
        self,
        conn: asyncpg.Connection,
        cursor: Cursor,
        types: Collection[str] | None = None,
        *,
        limit: int = 500,
    ) -> Page[StoredEvent]:
        """:meth:`read_after`, returning only the events of ``types`` (None: all), and the cursor
        after the last event read, whatever its type: a follower that publishes a few types
        moves past the others without parsing them."""
        return await self._page(conn, cursor, types, limit, _stored)

    async def read_encoded_page(
        self,
        conn: asyncpg.Connection,
        cursor: Cursor,
        types: Collection[str] | None = None,
        *,
        limit: int = 500,
    ) -> Page[StoredEncoded]:
        """:meth:`read_page` with the events left as the JSON stored, for a relay to publish."""
        return await self._page(conn, cursor, types, limit, _stored_encoded)

    async def _page(
        self,
        conn: asyncpg.Connection,
        cursor: Cursor,
        types: Collection[str] | None,
        limit: int,
        parse: Callable[[asyncpg.Record], S],
    ) -> Page[S]:
        wanted = sorted(types) if types is not None else None
        rows = await conn.fetch(self._sql_after, str(cursor.tx_id), cursor.position, limit, wanted)
        if not rows:
            return Page([], cursor, 0)
        last = Cursor(int(rows[-1]["tx_id"]), rows[-1]["position"])
        return Page([parse(r) for r in rows if r["body"] is not None], last, len(rows))

    async def claim(self, conn: asyncpg.Connection, consumer: str, event_id: str) -> bool:
        """Mark ``event_id`` as handled by ``consumer``; False if it already was (a redelivery)."""
        status: str = await conn.execute(self._sql_claim, consumer, event_id)
        return status.endswith(" 1")

    async def claim_many(self, conn: asyncpg.Connection, consumer: str, event_ids: Sequence[str]) -> set[str]:
        """:meth:`claim` for several events in one statement; returns those claimed now."""
        # One order for every transaction: concurrent batches never deadlock on the marks.
        rows = await conn.fetch(self._sql_claim_many, consumer, sorted(event_ids))
        return {r["event_id"] for r in rows}

    async def cursor(self, conn: asyncpg.Connection, name: str) -> Cursor:
        row = await conn.fetchrow(self._sql_checkpoint, name)
        return Cursor(row["tx_id"], row["position"]) if row else START

    async def save_cursor(self, conn: asyncpg.Connection, name: str, cursor: Cursor) -> None:
        await conn.execute(self._sql_save_checkpoint, name, str(cursor.tx_id), cursor.position)

    async def checkpoint(self, conn: asyncpg.Connection, name: str) -> int:
        """The position a position-ordered follower named ``name`` has reached (0 at first)."""
        return (await self.cursor(conn, name)).position

    async def save_checkpoint(self, conn: asyncpg.Connection, name: str, position: int) -> None:
        await self.save_cursor(conn, name, Cursor(0, position))


def _columns(
    events: Sequence[Envelope], trace_contexts: Sequence[str | None] | None
) -> tuple[list[str], list[str], list[str], list[datetime], list[str], list[str | None]]:
    """The arrays a batch insert unnests: ids, streams, types, times, bodies and trace contexts
    (by default the current one)."""
    traces = list(trace_contexts) if trace_contexts is not None else [trace_context()] * len(events)
    return (
        [e.event_id for e in events],
        [e.stream_id for e in events],
        [e.type for e in events],
        [e.occurred_at for e in events],
        [encode(e).decode() for e in events],
        traces,
    )


def after(cte: str) -> str:
    """A condition, always true, that makes the part of a statement that takes it wait until
    the data-modifying CTE ``cte`` of the same statement has run to its end (Postgres runs the
    sub-statements of a WITH in no set order otherwise): a lock order within one statement."""
    return f"(SELECT count(*) FROM {cte}) >= 0"


def _at_versions(
    events: Sequence[tuple[Envelope, int]], trace_contexts: Sequence[str | None] | None
) -> list[object]:
    """The arguments of an insert at the callers' versions: :func:`_columns` with the versions third."""
    ids, streams, types, occurred, bodies, traces = _columns([e for e, _ in events], trace_contexts)
    return [ids, streams, [v for _, v in events], types, occurred, bodies, traces]


def _positions_of(events: Sequence[tuple[Envelope, int]], rows: Sequence[asyncpg.Record]) -> list[int]:
    """The positions of ``events`` (in their order) from the rows of an insert at their versions."""
    positions = {r["event_id"]: r["position"] for r in rows}
    return [positions[e.event_id] for e, _ in events]


async def _insert(
    conn: asyncpg.Connection, sql: str, args: Sequence[object], savepoint: bool, conflict: str
) -> list[asyncpg.Record]:
    """Insert events, in a savepoint if asked (it keeps the caller's transaction usable after a
    conflict, for two round trips); a unique violation is a :class:`ConcurrencyError`."""
    try:
        async with conn.transaction() if savepoint else contextlib.nullcontext():
            rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
            return rows
    except asyncpg.UniqueViolationError as exc:
        raise ConcurrencyError(f"{conflict}: {exc.detail}") from exc
