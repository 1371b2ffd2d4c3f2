"""All of the llm-proxy's SQL (asyncpg), besides the event store itself (orbion_common.eventstore).

Functions take the connection first so the caller owns the transaction. Tables are in
``migrations/``: ``replies`` (one row per reply_key: text, send progress and the trace context
it was generated in),
``outbox`` (the local "WhatsApp" without a provider), ``sheet_exports`` / ``sheet_exported``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

from orbion_common.events import Envelope
from orbion_common.eventstore import EventStore

SCHEMA = "llm_proxy"
MIGRATIONS = Path(__file__).parent / "migrations"

PENDING, SENDING, SENT, FAILED = "pending", "sending", "sent", "failed"


@dataclass(frozen=True)
class ReplyRow:
    reply_key: str
    seq: int
    phone: str
    kind: str
    text: str
    parts: list[str]
    reply_to_message_id: str
    source: str
    correlation_id: str
    causation_id: str
    state: str
    parts_sent: int
    provider_message_ids: list[str]
    via: str
    attempts: int
    next_attempt_at: datetime
    last_error: str
    created_at: datetime
    trace_context: dict[str, str] | None = None  # W3C headers of the span that generated it
    requested_at: datetime | None = None  # the request's occurred_at: the contact's send order
    previous_reply_key: str = ""  # the contact's previous request ("" unknown)
    held: bool = False  # head waiting for its previous request to be stored (due_heads, heads_of)
    claimed: bool = False  # head marked 'sending' by the statement that read it (claim_heads)
    unsent: int = 1  # the contact's unsent replies, this head included, when a heads read ran

    @classmethod
    def of(cls, row: asyncpg.Record) -> ReplyRow:
        data = dict(row)
        data.pop("updated_at", None)
        data["parts"] = list(data["parts"])
        data["provider_message_ids"] = list(data["provider_message_ids"])
        raw = data.get("trace_context")
        data["trace_context"] = json.loads(raw) if raw else None
        return cls(**data)


async def get_reply(conn: asyncpg.Connection, reply_key: str) -> ReplyRow | None:
    row = await conn.fetchrow("SELECT * FROM replies WHERE reply_key = $1", reply_key)
    return ReplyRow.of(row) if row else None


@dataclass(frozen=True)
class NewReply:
    """A reply to store (see :func:`insert_replies`)."""

    reply_key: str
    phone: str
    kind: str
    text: str
    parts: Sequence[str]
    reply_to_message_id: str
    source: str
    correlation_id: str
    causation_id: str
    trace_context: Mapping[str, str] | None = None
    requested_at: datetime | None = None
    previous_reply_key: str = ""


async def stored_reply_keys(conn: asyncpg.Connection, reply_keys: Sequence[str]) -> set[str]:
    """Those of ``reply_keys`` already stored."""
    rows = await conn.fetch(
        "SELECT reply_key FROM replies WHERE reply_key = ANY($1::text[])", list(reply_keys)
    )
    return {r["reply_key"] for r in rows}


_INSERT_REPLIES = """INSERT INTO replies (reply_key, phone, kind, text, parts, reply_to_message_id, source,
                           correlation_id, causation_id, trace_context, requested_at, previous_reply_key)
           SELECT r.key, r.phone, r.kind, r.text,
                  coalesce((SELECT array_agg(p ORDER BY i)
                            FROM jsonb_array_elements_text(r.parts::jsonb) WITH ORDINALITY AS e(p, i)), '{}'),
                  r.reply_to, r.source, r.correlation_id, r.causation_id, r.trace::jsonb,
                  coalesce(r.requested_at, now()), r.previous_key
           FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                       $8::text[], $9::text[], $10::text[], $11::timestamptz[], $12::text[])
                WITH ORDINALITY AS r(key, phone, kind, text, parts, reply_to, source, correlation_id,
                                     causation_id, trace, requested_at, previous_key, n)
           ORDER BY r.n
           ON CONFLICT (reply_key) DO NOTHING RETURNING reply_key"""


async def insert_replies(
    conn: asyncpg.Connection,
    replies: Sequence[NewReply],
    *,
    events: EventStore | None = None,
    generated: Sequence[tuple[str, Envelope, str | None]] = (),
) -> set[str]:
    """Store replies to send, in the order given (their ``seq``); returns the keys stored now
    (a ``reply_key`` already stored changes nothing).

    ``trace_context`` (``traceparent``/``tracestate``) is where the sender's span will continue.
    ``requested_at`` (when the request was made; default now) orders the contact's replies;
    ``previous_reply_key`` is the contact's previous request, waited for (see ``due_heads``).

    ``generated``: (reply key, event, trace context) of events to append to ``events`` in the
    same statement, each after its stream's last version, for the replies stored now only.
    One statement is atomic without a transaction: a version another writer took meanwhile
    raises :class:`ConcurrencyError`, and nothing is stored."""
    args: list[object] = [
        [r.reply_key for r in replies],
        [r.phone for r in replies],
        [r.kind for r in replies],
        [r.text for r in replies],
        # text[] per row cannot ride in a 1-D array parameter: each row's parts as a JSON array.
        [json.dumps(list(r.parts)) for r in replies],
        [r.reply_to_message_id for r in replies],
        [r.source for r in replies],
        [r.correlation_id for r in replies],
        [r.causation_id for r in replies],
        [json.dumps(dict(r.trace_context)) if r.trace_context else None for r in replies],
        [r.requested_at for r in replies],
        [r.previous_reply_key for r in replies],
    ]
    if not generated:
        rows = await conn.fetch(_INSERT_REPLIES, *args)
        return {r["reply_key"] for r in rows}
    assert events is not None
    event_sql, event_args = events.insert_next(
        [e for _, e, _ in generated],
        [t for _, _, t in generated],
        first=len(args) + 3,
        only="e.event_id IN (SELECT event_id FROM fresh_events)",
    )
    rows = await events.fetch_appending(
        conn,
        f"""WITH fresh AS ({_INSERT_REPLIES}),
           fresh_events AS (
               SELECT k.event_id FROM unnest(${len(args) + 1}::text[], ${len(args) + 2}::text[])
                    AS k(reply_key, event_id) JOIN fresh USING (reply_key)
           ),
           appended AS ({event_sql})
           SELECT reply_key FROM fresh""",
        [*args, [key for key, _, _ in generated], [e.event_id for _, e, _ in generated], *event_args],
        savepoint=False,  # one statement, in no transaction of its own
    )
    return {r["reply_key"] for r in rows}


async def insert_reply(conn: asyncpg.Connection, **reply: Any) -> bool:
    """Store one reply (the fields of :class:`NewReply`); False when ``reply_key`` is already stored."""
    new = NewReply(**reply)
    return new.reply_key in await insert_replies(conn, [new])


# A contact's send order: a reply already started (a part sent, or in flight) first, then by
# when it was requested (the conversation's order), then by arrival.
_HEAD_ORDER = "(state = 'pending' AND parts_sent = 0), requested_at, seq"
# The head waits while the contact's previous request is not stored, for at most $hold seconds
# after it was stored itself (a request that never comes must not block the contact).
_HELD = """(r.previous_reply_key <> '' AND r.state = 'pending' AND r.parts_sent = 0
            AND r.created_at > now() - make_interval(secs => {hold})
            AND NOT EXISTS (SELECT 1 FROM replies p WHERE p.reply_key = r.previous_reply_key))"""


def _heads(where: str = "") -> str:
    """Each contact's first unsent reply (among the rows ``where`` keeps), with ``held`` and the
    contact's count of ``unsent`` replies; ``$2`` is the hold in seconds."""
    return f"""SELECT DISTINCT ON (phone) r.*, {_HELD.format(hold="$2")} AS held,
                      count(*) OVER (PARTITION BY phone) AS unsent FROM replies r
               WHERE {where}state IN ('pending', 'sending') ORDER BY phone, {_HEAD_ORDER}"""


_HEADS_OF = _heads("phone = ANY($1::text[]) AND ")


async def due_heads(conn: asyncpg.Connection, limit: int, *, hold_seconds: float = 0.0) -> list[ReplyRow]:
    """The first unsent reply of each contact, when it is due and not held (later ones wait
    behind it: order)."""
    rows = await conn.fetch(
        f"""SELECT * FROM ({_heads()}) heads
           WHERE next_attempt_at <= now() AND NOT held ORDER BY seq LIMIT $1""",
        limit,
        float(hold_seconds),
    )
    return [ReplyRow.of(r) for r in rows]


async def heads_of(
    conn: asyncpg.Connection, phones: Sequence[str], *, hold_seconds: float = 0.0
) -> dict[str, ReplyRow]:
    """Each contact's first unsent reply (``held`` says whether it waits for its previous one);
    contacts with none are left out."""
    rows = await conn.fetch(
        _HEADS_OF,
        list(phones),
        float(hold_seconds),
    )
    return {r["phone"]: ReplyRow.of(r) for r in rows}


async def claim_heads(
    conn: asyncpg.Connection, phones: Sequence[str], *, hold_seconds: float = 0.0
) -> dict[str, ReplyRow]:
    """:func:`heads_of`, and each head that is due, not held and pending marked 'sending' in the
    same statement (``claimed``; the row comes back as it was before). A caller's own
    transaction must not hold the mark: it is committed before the call it precedes."""
    rows = await conn.fetch(
        f"""WITH heads AS ({_HEADS_OF}), claimed AS (
               UPDATE replies u SET state = 'sending', updated_at = now() FROM heads h
               WHERE u.reply_key = h.reply_key AND h.state = 'pending' AND NOT h.held
                     AND h.next_attempt_at <= now()
               RETURNING u.reply_key
           )
           SELECT h.*, h.reply_key IN (SELECT reply_key FROM claimed) AS claimed FROM heads h""",
        list(phones),
        float(hold_seconds),
    )
    return {r["phone"]: ReplyRow.of(r) for r in rows}


async def in_doubt(conn: asyncpg.Connection) -> list[ReplyRow]:
    """Replies left in ``sending`` by a process that stopped during the HTTP call."""
    rows = await conn.fetch("SELECT * FROM replies WHERE state = 'sending' ORDER BY seq")
    return [ReplyRow.of(r) for r in rows]


async def mark_sending(conn: asyncpg.Connection, reply_keys: Sequence[str]) -> None:
    await conn.execute(
        "UPDATE replies SET state = 'sending', updated_at = now() WHERE reply_key = ANY($1::text[])",
        list(reply_keys),
    )


@dataclass(frozen=True)
class PartSent:
    """Part ``part`` (1-based) of a reply went out as ``provider_message_id``."""

    reply_key: str
    provider_message_id: str
    via: str
    part: int
    last: bool


async def record_sent(
    conn: asyncpg.Connection,
    sent: Sequence[PartSent],
    outbox: Sequence[OutboxMessage],
    *,
    events: EventStore,
    appended: Sequence[tuple[Envelope, str | None]],
) -> None:
    """In one statement, atomic without a transaction: move each reply's progress past its part,
    store the outbox rows, and append the events (with their trace contexts), each after its
    stream's last version. Idempotent: a retried commit whose first try did commit (the answer
    was lost with the connection) changes nothing. A version another writer took meanwhile
    raises :class:`ConcurrencyError`, and nothing is stored."""
    args: list[object] = [
        [p.reply_key for p in sent],
        [p.provider_message_id for p in sent],
        [p.via for p in sent],
        [SENT if p.last else PENDING for p in sent],
        [p.part for p in sent],
        [m.provider_message_id for m in outbox],
        [m.reply_key for m in outbox],
        [m.part for m in outbox],
        [m.phone for m in outbox],
        [m.text for m in outbox],
        [m.reply_to_message_id for m in outbox],
    ]
    event_sql, event_args = events.insert_next(
        [e for e, _ in appended], [t for _, t in appended], first=len(args) + 1, unstored_only=True
    )
    await events.fetch_appending(
        conn,
        f"""WITH progress AS (
               UPDATE replies r SET parts_sent = d.part,
                      provider_message_ids = array_append(r.provider_message_ids, d.provider_id),
                      via = d.via, state = d.state, last_error = '', updated_at = now()
               FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[])
                    AS d(reply_key, provider_id, via, state, part)
               WHERE r.reply_key = d.reply_key AND r.parts_sent = d.part - 1 AND r.state <> 'failed'
           ), outboxed AS (
               INSERT INTO outbox (provider_message_id, reply_key, part, phone, text, reply_to_message_id)
               SELECT * FROM unnest($6::text[], $7::text[], $8::int[], $9::text[], $10::text[], $11::text[])
               ON CONFLICT DO NOTHING
           ), appended AS ({event_sql})
           SELECT 1""",
        [*args, *event_args],
        savepoint=False,  # one statement, in no transaction of its own
    )


async def reschedule(
    conn: asyncpg.Connection, reply_key: str, delay_seconds: float, error: str, *, count_attempt: bool
) -> None:
    await conn.execute(
        """UPDATE replies SET state = 'pending', attempts = attempts + $4::int,
                  next_attempt_at = now() + make_interval(secs => $2), last_error = $3, updated_at = now()
           WHERE reply_key = $1""",
        reply_key,
        delay_seconds,
        error[:500],
        1 if count_attempt else 0,
    )


async def mark_failed(conn: asyncpg.Connection, reply_key: str, error: str) -> None:
    await conn.execute(
        """UPDATE replies SET state = 'failed', attempts = attempts + 1, last_error = $2, updated_at = now()
           WHERE reply_key = $1""",
        reply_key,
        error[:500],
    )


async def reply_counts(conn: asyncpg.Connection) -> dict[str, int]:
    rows = await conn.fetch("SELECT state, count(*) AS n FROM replies GROUP BY state")
    return {r["state"]: int(r["n"]) for r in rows}


# -- outbox ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutboxMessage:
    provider_message_id: str
    reply_key: str
    part: int
    phone: str
    text: str
    reply_to_message_id: str


async def list_outbox(conn: asyncpg.Connection, *, phone: str | None, limit: int) -> list[dict[str, Any]]:
    if phone:
        rows = await conn.fetch(
            "SELECT * FROM outbox WHERE phone = $1 ORDER BY created_at DESC, part DESC LIMIT $2", phone, limit
        )
    else:
        rows = await conn.fetch("SELECT * FROM outbox ORDER BY created_at DESC, part DESC LIMIT $1", limit)
    return [dict(r) for r in rows]


# -- Sheets export queue ---------------------------------------------------------------------


async def queue_export(
    conn: asyncpg.Connection,
    *,
    phone: str,
    lead_version: int,
    snapshot: dict[str, Any],
    correlation_id: str,
    causation_id: str,
) -> bool:
    """Queue the lead's latest snapshot; an older version than queued or written changes nothing."""
    status: str = await conn.execute(
        """INSERT INTO sheet_exports (phone, lead_version, snapshot, correlation_id, causation_id)
           SELECT $1, $2, $3::jsonb, $4, $5
           WHERE NOT EXISTS (SELECT 1 FROM sheet_exported WHERE phone = $1 AND lead_version >= $2)
           ON CONFLICT (phone) DO UPDATE
               SET lead_version = excluded.lead_version, snapshot = excluded.snapshot,
                   correlation_id = excluded.correlation_id, causation_id = excluded.causation_id,
                   queued_at = now()
               WHERE sheet_exports.lead_version < excluded.lead_version""",
        phone,
        lead_version,
        json.dumps(snapshot),
        correlation_id,
        causation_id,
    )
    return status.endswith(" 1")


async def take_exports(conn: asyncpg.Connection, limit: int) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT phone, lead_version, snapshot::text AS snapshot, correlation_id, causation_id "
        "FROM sheet_exports ORDER BY queued_at LIMIT $1",
        limit,
    )
    return [{**dict(r), "snapshot": json.loads(r["snapshot"])} for r in rows]


async def exports_done(conn: asyncpg.Connection, done: Sequence[tuple[str, int]]) -> None:
    """Dequeue what was written (unless a newer version was queued meanwhile) and remember it."""
    phones = [p for p, _ in done]
    versions = [v for _, v in done]
    await conn.execute(
        """DELETE FROM sheet_exports e USING unnest($1::text[], $2::int[]) AS d(phone, v)
           WHERE e.phone = d.phone AND e.lead_version <= d.v""",
        phones,
        versions,
    )
    await conn.execute(
        """INSERT INTO sheet_exported (phone, lead_version)
           SELECT * FROM unnest($1::text[], $2::int[])
           ON CONFLICT (phone) DO UPDATE SET lead_version = GREATEST(sheet_exported.lead_version,
                                                                     excluded.lead_version),
                                             exported_at = now()""",
        phones,
        versions,
    )


async def export_attempt_failed(conn: asyncpg.Connection, phones: Sequence[str]) -> None:
    await conn.execute(
        "UPDATE sheet_exports SET attempts = attempts + 1 WHERE phone = ANY($1::text[])", list(phones)
    )


async def pending_exports(conn: asyncpg.Connection) -> int:
    n: int = await conn.fetchval("SELECT count(*) FROM sheet_exports")
    return n
