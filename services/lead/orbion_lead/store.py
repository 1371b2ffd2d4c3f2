"""All of the lead service's SQL: its event store, the lead projection, the verification timers.

Every function takes the connection first, so the caller owns the transaction (see
``recorder``). The schema is a constructor argument ("lead" in production; tests use a
fresh one each). No rules here: what a lead is and how it changes is ``domain``.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import asyncpg

from orbion_common.events import Envelope, decode
from orbion_common.eventstore import EventStore, StoredEvent

from .domain import Lead, evolve

MIGRATIONS = Path(__file__).parent / "migrations"
SCHEMA = "lead"


class Change(NamedTuple):
    """One input's effect, as the recorder hands it over to be stored."""

    lead: Lead  # after the events
    state: bytes  # its JSON
    events: Sequence[Envelope]
    trace: str | None  # the input's trace context (``eventstore.trace_context``), stored with its events


@dataclass(frozen=True)
class LeadFilter:
    """The filters of ``GET /api/leads``; None means "any"."""

    stage: str | None = None
    min_score: int | None = None
    agent: str | None = None
    status: str | None = None
    updated_since: datetime | None = None


@dataclass(frozen=True)
class PageCursor:
    """Keyset position in (updated_at, phone) order, opaque to API clients."""

    updated_at: datetime
    phone: str

    def encode(self) -> str:
        return base64.urlsafe_b64encode(f"{self.updated_at.isoformat()}|{self.phone}".encode()).decode()

    @classmethod
    def decode(cls, token: str) -> PageCursor:
        """Raises ValueError on a token we did not issue."""
        try:
            raw = base64.urlsafe_b64decode(token.encode()).decode()
            when, phone = raw.split("|", 1)
            at = datetime.fromisoformat(when)
            return cls(at.astimezone(UTC) if at.tzinfo else at.replace(tzinfo=UTC), phone)
        except (ValueError, UnicodeDecodeError, OverflowError) as exc:  # Overflow: no such time in UTC
            raise ValueError("invalid cursor") from exc


class LeadStore:
    def __init__(self, schema: str = SCHEMA) -> None:
        self.events = EventStore(schema)
        self.schema = schema
        s = f'"{schema}"'
        self._sql_load = f"SELECT state::text FROM {s}.leads WHERE phone = $1"
        self._sql_load_for_update = self._sql_load + " FOR UPDATE"
        self._sql_load_json = f"SELECT version, state::text AS state FROM {s}.leads WHERE phone = $1"
        self._sql_set_timer = (
            f"INSERT INTO {s}.verification_timers (phone, due_at) VALUES ($1, $2) "
            f"ON CONFLICT (phone) DO UPDATE SET due_at = excluded.due_at"
        )
        self._sql_clear_timer = f"DELETE FROM {s}.verification_timers WHERE phone = $1"
        self._sql_due_timers = (
            f"SELECT phone FROM {s}.verification_timers WHERE due_at <= $1 "
            f"ORDER BY due_at LIMIT $2 FOR UPDATE SKIP LOCKED"
        )
        self._sql_next_due = f"SELECT min(due_at) FROM {s}.verification_timers"
        self._sql_count_events = f"SELECT count(*) FROM {s}.events"
        self._sql_count_processed = f"SELECT count(*) FROM {s}.processed WHERE consumer = $1"
        self._sql_drop_projection = f"TRUNCATE {s}.leads, {s}.verification_timers"
        self._sql_all_events = (
            f"SELECT position, body::text AS body FROM {s}.events "
            f"WHERE position > $1 ORDER BY position LIMIT $2"
        )
        self._sql_claim_many = (
            f"INSERT INTO {s}.processed (consumer, event_id) SELECT * FROM unnest($1::text[], $2::text[]) "
            f"ON CONFLICT DO NOTHING RETURNING consumer, event_id"
        )
        # Sorted, so that two transactions locking overlapping sets of leads never deadlock.
        # The state is sent only when the caller's parsed copy is not at the locked version.
        self._sql_lock_many = (
            f"SELECT l.phone, l.version, CASE WHEN l.version = k.version THEN NULL ELSE l.state::text END "
            f"AS state FROM {s}.leads l JOIN unnest($1::text[], $2::int[]) AS k(phone, version) "
            f"ON l.phone = k.phone ORDER BY l.phone FOR UPDATE OF l"
        )
        self._sql_lock_many_skip = self._sql_lock_many + " SKIP LOCKED"
        self._sql_project_many = self._project_sql()

    def _project_sql(self, condition: str = "") -> str:
        """Upsert the leads of the arrays ``$1`` to ``$11`` (:func:`_project_args`) where
        ``condition``; an older version never overwrites a newer one."""
        s = f'"{self.schema}"'
        return f"""
            INSERT INTO {s}.leads (phone, version, stage, agent, status, score, qualified, bot_score,
                                   created_at, updated_at, state)
            SELECT l.phone, l.version, l.stage, l.agent, l.status, l.score, l.qualified, l.bot_score,
                   l.created_at, l.updated_at, l.state::jsonb
            FROM unnest($1::text[], $2::int[], $3::text[], $4::text[], $5::text[], $6::int[], $7::bool[],
                        $8::int[], $9::timestamptz[], $10::timestamptz[], $11::text[])
                 AS l(phone, version, stage, agent, status, score, qualified, bot_score, created_at,
                      updated_at, state)
            {f"WHERE {condition}" if condition else ""}
            ON CONFLICT (phone) DO UPDATE SET
                version = excluded.version, stage = excluded.stage, agent = excluded.agent,
                status = excluded.status, score = excluded.score, qualified = excluded.qualified,
                bot_score = excluded.bot_score, updated_at = excluded.updated_at, state = excluded.state
            WHERE {s}.leads.version < excluded.version"""

    # --- events ---------------------------------------------------------------------------

    async def claim(self, conn: asyncpg.Connection, consumer: str, event_id: str) -> bool:
        return await self.events.claim(conn, consumer, event_id)

    async def append(
        self, conn: asyncpg.Connection, phone: str, events: Sequence[Envelope], *, expected_version: int
    ) -> list[StoredEvent]:
        return await self.events.append(conn, phone, events, expected_version=expected_version)

    async def count_events(self, conn: asyncpg.Connection) -> int:
        count: int = await conn.fetchval(self._sql_count_events)
        return count

    async def count_processed(self, conn: asyncpg.Connection, consumer: str) -> int:
        count: int = await conn.fetchval(self._sql_count_processed, consumer)
        return count

    async def load_events(
        self, conn: asyncpg.Connection, phone: str, *, after_version: int = 0, limit: int = 100
    ) -> list[StoredEvent]:
        return (await self.events.load_stream(conn, phone, after_version=after_version))[:limit]

    # --- batches: what the recorder uses on the hot path ------------------------------------

    async def claim_many(
        self, conn: asyncpg.Connection, claims: Sequence[tuple[str, str]]
    ) -> set[tuple[str, str]]:
        """Mark (consumer, event_id) pairs handled; returns those marked now (the others were before)."""
        if not claims:
            return set()
        ordered = sorted(claims)  # one order for every transaction: concurrent claims never deadlock
        rows = await conn.fetch(self._sql_claim_many, [c for c, _ in ordered], [e for _, e in ordered])
        return {(r["consumer"], r["event_id"]) for r in rows}

    async def lock_leads(
        self,
        conn: asyncpg.Connection,
        phones: Sequence[str],
        known: Mapping[str, Lead] | None = None,
        *,
        skip_locked: bool = False,
    ) -> dict[str, Lead]:
        """The projected leads of ``phones``, their rows locked for this transaction (absent: not created).

        ``known``: leads the caller already parsed; one still at the locked version is reused
        rather than sent and parsed again. ``skip_locked``: leave out rows another transaction
        holds (the timers do, so they never wait on, or deadlock with, a consumer).
        """
        if not phones:
            return {}
        known = known or {}
        versions = [known[p].version if p in known else -1 for p in phones]
        sql = self._sql_lock_many_skip if skip_locked else self._sql_lock_many
        rows = await conn.fetch(sql, list(phones), versions)
        return {
            r["phone"]: known[r["phone"]] if r["state"] is None else Lead.model_validate_json(r["state"])
            for r in rows
        }

    async def append_and_project(self, conn: asyncpg.Connection, changes: Sequence[Change]) -> None:
        """Append each lead's new events after its previous version and upsert the leads, in one
        statement.

        Raises ``ConcurrencyError`` when another writer appended to one of the streams
        meanwhile; the caller's transaction is then unusable (no savepoint: two round trips
        fewer), and every caller abandons it and decides again in a new one.
        """
        events = [
            (e, c.lead.version - len(c.events) + i + 1) for c in changes for i, e in enumerate(c.events)
        ]
        if not events:
            return
        traces = [c.trace for c in changes for _ in c.events]
        projected = _project_args([(c.lead, c.state) for c in changes if c.events])
        await self.events.append_at_versions_with(conn, events, traces, self._project_sql, projected)

    async def save_leads(self, conn: asyncpg.Connection, leads: Sequence[Lead]) -> None:
        """Upsert projection rows (an older version never overwrites a newer one)."""
        await self._write(conn, [(lead, lead.model_dump_json().encode()) for lead in leads])

    async def _write(self, conn: asyncpg.Connection, leads: Sequence[tuple[Lead, bytes]]) -> None:
        if leads:
            await conn.execute(self._sql_project_many, *_project_args(leads))

    # --- projection -----------------------------------------------------------------------

    async def load_lead(self, conn: asyncpg.Connection, phone: str, *, for_update: bool = False) -> Lead:
        """The projected lead, or a new (not yet existing) one; ``for_update`` locks its row."""
        state = await conn.fetchval(self._sql_load_for_update if for_update else self._sql_load, phone)
        return Lead.model_validate_json(state) if state is not None else Lead(phone=phone)

    async def load_lead_json(self, conn: asyncpg.Connection, phone: str) -> tuple[int, bytes] | None:
        """The projected lead as stored (version, JSON), for the cache; None when it does not exist."""
        row = await conn.fetchrow(self._sql_load_json, phone)
        return (row["version"], row["state"].encode()) if row is not None else None

    async def list_leads(
        self, conn: asyncpg.Connection, where: LeadFilter, *, after: PageCursor | None, limit: int
    ) -> tuple[list[Lead], PageCursor | None]:
        """One page of leads in (updated_at, phone) order and the cursor of the next page (None: last).

        Only the filters given are in the statement: each combination is prepared (and its plan
        cached, see ``orbion_common.db``) on its own, with the index that serves it.
        """
        conditions: list[str] = []
        args: list[object] = []
        for condition, value in (
            ("stage = ${}", where.stage),
            ("score >= ${}", where.min_score),
            ("agent = ${}", where.agent),
            ("status = ${}", where.status),
            ("updated_at >= ${}", where.updated_since),
        ):
            if value is not None:
                args.append(value)
                conditions.append(condition.format(len(args)))
        if after is not None:
            args += [after.updated_at, after.phone]
            conditions.append(f"(updated_at, phone) > (${len(args) - 1}, ${len(args)})")
        args.append(limit + 1)
        rows = await conn.fetch(
            f'SELECT state::text, updated_at, phone FROM "{self.schema}".leads'
            + (f" WHERE {' AND '.join(conditions)}" if conditions else "")
            + f" ORDER BY updated_at, phone LIMIT ${len(args)}",
            *args,
        )
        leads = [Lead.model_validate_json(r["state"]) for r in rows[:limit]]
        more = len(rows) > limit
        last = rows[limit - 1] if more else None
        return leads, PageCursor(last["updated_at"], last["phone"]) if last is not None else None

    async def rebuild_projection(self, conn: asyncpg.Connection, *, batch: int = 2000) -> int:
        """Drop the projection and timers and fold every stream again from the events; returns leads.

        Run it in one transaction: readers see the old projection until it commits, and the
        TRUNCATE lock makes lead writers wait for it (their writes land after it, on the new rows).
        Reads every committed event by position: nothing else writes this schema meanwhile.
        """
        await conn.execute(self._sql_drop_projection)
        leads: dict[str, Lead] = {}
        position = 0
        while True:
            rows = await conn.fetch(self._sql_all_events, position, batch)
            if not rows:
                break
            for row in rows:
                event = decode(row["body"])
                phone = event.stream_id
                leads[phone] = evolve(leads.get(phone) or Lead(phone=phone), event)
            position = rows[-1]["position"]
        rebuilt = [lead for lead in leads.values() if lead.exists]
        for start in range(0, len(rebuilt), batch):
            await self.save_leads(conn, rebuilt[start : start + batch])
        for lead in rebuilt:
            if lead.verification.pending and lead.verification.expires_at is not None:
                await self.set_timer(conn, lead.phone, lead.verification.expires_at)
        return len(rebuilt)

    # --- verification timers --------------------------------------------------------------

    async def set_timer(self, conn: asyncpg.Connection, phone: str, due_at: datetime) -> None:
        await conn.execute(self._sql_set_timer, phone, due_at)

    async def clear_timer(self, conn: asyncpg.Connection, phone: str) -> None:
        await conn.execute(self._sql_clear_timer, phone)

    async def claim_due_timers(self, conn: asyncpg.Connection, now: datetime, limit: int = 100) -> list[str]:
        """Phones whose verification deadline passed, locked for this transaction (others skip them)."""
        return [r["phone"] for r in await conn.fetch(self._sql_due_timers, now, limit)]

    async def next_due(self, conn: asyncpg.Connection) -> datetime | None:
        due: datetime | None = await conn.fetchval(self._sql_next_due)
        return due


def _project_args(leads: Sequence[tuple[Lead, bytes]]) -> list[list[Any]]:
    """The arrays the leads' upsert unnests, from each lead and its state as JSON."""
    return [
        [x.phone for x, _ in leads],
        [x.version for x, _ in leads],
        [x.stage.value for x, _ in leads],
        [x.agent.value for x, _ in leads],
        [x.status.value for x, _ in leads],
        [x.score for x, _ in leads],
        [x.qualified for x, _ in leads],
        [x.bot_score for x, _ in leads],
        [x.created_at for x, _ in leads],
        [x.updated_at for x, _ in leads],
        [state.decode() for _, state in leads],
    ]
