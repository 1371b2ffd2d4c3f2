"""All SQL of the conversation service's read side (asyncpg), connection first.

Owns the projection tables of ``migrations/001_projections.sql`` (messages, parts, early
statuses, contacts) and the ``pending_replies`` work queue. The event-store tables belong to
``orbion_common.eventstore``. Every function takes the connection first so the caller owns
the transaction. No rules here: ``domain.py`` decides, these functions read and write.

:class:`Projection` is parametrised by table names so that ``rebuild.py`` can fill fresh
tables with the very same SQL the live projector uses, then swap them in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from orbion_common.events import Envelope
from orbion_common.eventstore import EventStore

from .domain import ContactState, ContactSummary, MessageItem, PendingReply

LIVE = ""
_MESSAGE_PLAIN = "message_key, phone, direction, kind, text, status, created_at, position"
# Inbound rows are keyed by their provider id; outbound replies store theirs once sent.
_PROVIDER_MESSAGE_ID = "coalesce(provider_message_id, CASE WHEN reply_key = '' THEN message_key ELSE '' END)"
_MESSAGE_COLUMNS = f"{_MESSAGE_PLAIN}, {_PROVIDER_MESSAGE_ID} AS provider_message_id, reply_key"
# The same values for an anonymous ROW(...), which takes no aliases.
_MESSAGE_VALUES = f"{_MESSAGE_PLAIN}, {_PROVIDER_MESSAGE_ID}, reply_key"
CONTACT_COLUMNS = (
    "phone, profile_name, message_count, inbound_count, outbound_count, first_message_at, "
    "last_inbound_at, last_outbound_at, last_activity_at, opted_out, blocked, handed_off, version, "
    "lead_stage, language, verification_pending, verified, verification_answer_ids"
)


def column_names(columns: str) -> tuple[str, ...]:
    """``"a, b"`` -> ``("a", "b")``: the names of a column list written once as SQL."""
    return tuple(c.strip() for c in columns.split(","))


CONTACT_NAMES = column_names(CONTACT_COLUMNS)
_MESSAGE_NAMES = (*column_names(_MESSAGE_PLAIN), "provider_message_id", "reply_key")


def json_rows(columns: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Rows as one JSON array of objects, for ``jsonb_populate_recordset``: an upsert of many
    rows in one statement, columns matched by name (an ``executemany`` runs once per row)."""
    objects = [dict(zip(columns, row, strict=True)) for row in rows]
    return orjson.dumps(objects, option=orjson.OPT_NAIVE_UTC).decode()


def message_item(row: Mapping[str, Any]) -> MessageItem:
    return MessageItem(
        key=row["message_key"],
        phone=row["phone"],
        direction=row["direction"],
        kind=row["kind"],
        text=row["text"],
        status=row["status"],
        created_at=row["created_at"],
        position=row["position"],
        provider_message_id=row["provider_message_id"],
        reply_key=row["reply_key"],
    )


def contact_summary(row: Mapping[str, Any]) -> ContactSummary:
    return ContactSummary(
        phone=row["phone"],
        profile_name=row["profile_name"],
        message_count=row["message_count"],
        inbound_count=row["inbound_count"],
        outbound_count=row["outbound_count"],
        first_message_at=row["first_message_at"],
        last_inbound_at=row["last_inbound_at"],
        last_outbound_at=row["last_outbound_at"],
        last_activity_at=row["last_activity_at"],
        state=ContactState(
            opted_out=row["opted_out"],
            blocked=row["blocked"],
            handed_off=row["handed_off"],
            verification_pending=row["verification_pending"],
            verified=row["verified"],
            verification_answer_ids=tuple(row["verification_answer_ids"]),
        ),
        version=row["version"],
        lead_stage=row["lead_stage"],
        language=row["language"],
    )


def contact_of_record(values: Sequence[Any]) -> ContactSummary:
    """A contact read as an anonymous ``ROW(CONTACT_COLUMNS)``."""
    return contact_summary(dict(zip(CONTACT_NAMES, values, strict=True)))


def _contact_row(s: ContactSummary) -> tuple[object, ...]:
    return (
        s.phone, s.profile_name, s.message_count, s.inbound_count, s.outbound_count,
        s.first_message_at, s.last_inbound_at, s.last_outbound_at, s.last_activity_at,
        s.state.opted_out, s.state.blocked, s.state.handed_off, s.version, s.lead_stage, s.language,
        s.state.verification_pending, s.state.verified, list(s.state.verification_answer_ids),
    )  # fmt: skip


@dataclass(frozen=True)
class SentResult:
    found: bool  # the reply row exists (else the caller creates it and records again)
    echo_removed: bool  # a from_me line of this part was in the history and is gone


@dataclass(frozen=True)
class StatusRow:
    key: str
    status: str


class Projection:
    """SQL over one set of projection tables: the live ones (suffix ``""``) or a rebuild's."""

    TABLES = (
        "conversation_messages",
        "conversation_message_parts",
        "conversation_early_statuses",
        "conversation_contacts",
    )

    def __init__(self, suffix: str = LIVE) -> None:
        if suffix and not suffix.replace("_", "").isalnum():
            raise ValueError(f"bad table suffix {suffix!r}")
        self.suffix = suffix
        m = f"conversation_messages{suffix}"
        p = f"conversation_message_parts{suffix}"
        e = f"conversation_early_statuses{suffix}"
        c = f"conversation_contacts{suffix}"
        self.messages, self.parts, self.early, self.contacts = m, p, e, c
        # One round trip: insert the message and, if it is new, take a status that came first.
        self._insert_message = f"""
            WITH ins AS (
                INSERT INTO {m} (message_key, phone, direction, kind, text, status, created_at, position,
                                 provider_message_id, reply_key)
                SELECT $1, $2, $3, $4, $5, $6, $7, $8, nullif($9, ''), $10
                -- an echo of a reply we sent (from_me) is already in the history as that reply
                WHERE NOT EXISTS (SELECT 1 FROM {m} WHERE provider_message_id = $1)
                  AND NOT EXISTS (SELECT 1 FROM {p} WHERE provider_message_id = $1)
                ON CONFLICT DO NOTHING RETURNING message_key
            ), early AS (
                DELETE FROM {e} WHERE provider_message_id = $1 AND EXISTS (SELECT 1 FROM ins)
                RETURNING status, status_at, error
            )
            SELECT EXISTS (SELECT 1 FROM ins) AS inserted, early.status, early.status_at, early.error
            FROM (SELECT 1) AS one LEFT JOIN early ON true"""
        self._upsert_reply = f"""
            INSERT INTO {m} (message_key, phone, direction, kind, text, status, created_at, position,
                             provider_message_id, reply_key)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, nullif($9, ''), $10)
            ON CONFLICT (message_key) DO UPDATE SET text = excluded.text, created_at = excluded.created_at
            RETURNING (xmax = 0) AS inserted"""
        self._get_message = f"SELECT {_MESSAGE_COLUMNS} FROM {m} WHERE message_key = $1"
        self._by_provider_id = f"""
            SELECT message_key, status FROM {m} WHERE message_key = $1
            UNION ALL
            SELECT message_key, status FROM {m} WHERE provider_message_id = $1
            UNION ALL
            SELECT m.message_key, m.status FROM {p} JOIN {m} m USING (message_key)
            WHERE {p}.provider_message_id = $1
            LIMIT 1"""
        self._set_status = f"UPDATE {m} SET status = $2, status_at = $3, error = $4 WHERE message_key = $1"
        # A provider status, applied only over the statuses it supersedes ($5, from domain).
        self._status_by_provider_id = f"""
            UPDATE {m} SET status = $2, status_at = $3, error = $4
            WHERE message_key = coalesce(
                (SELECT message_key FROM {m} WHERE message_key = $1),
                (SELECT message_key FROM {m} WHERE provider_message_id = $1),
                (SELECT message_key FROM {p} WHERE provider_message_id = $1))
              AND status = ANY($5::text[])
            RETURNING 1"""
        # A sent part: drop our own echo (from_me, seen first) holding its provider id, attach the
        # id to the reply (or report it is a further part), mark it sent over $3 (from domain).
        self._sent = f"""
            WITH echo AS (
                DELETE FROM {m} WHERE message_key = $2 AND direction = 'out' AND reply_key = ''
                RETURNING 1
            ), sent AS (
                UPDATE {m} SET provider_message_id = coalesce(provider_message_id, $2),
                    status_at = CASE WHEN status = ANY($3::text[]) THEN $4 ELSE status_at END,
                    status = CASE WHEN status = ANY($3::text[]) THEN 'sent' ELSE status END
                WHERE message_key = $1
                RETURNING provider_message_id = $2 AS attached
            )
            SELECT (SELECT attached FROM sent) AS attached, EXISTS (SELECT 1 FROM echo) AS echo"""
        self._add_part = (
            f"INSERT INTO {p} (provider_message_id, message_key) VALUES ($1, $2) ON CONFLICT DO NOTHING"
        )
        self._early_get = f"SELECT status FROM {e} WHERE provider_message_id = $1"
        self._early_put = f"""
            INSERT INTO {e} (provider_message_id, status, status_at, error) VALUES ($1, $2, $3, $4)
            ON CONFLICT (provider_message_id) DO UPDATE
            SET status = excluded.status, status_at = excluded.status_at, error = excluded.error"""
        self._load_contact = f"SELECT {CONTACT_COLUMNS} FROM {c} WHERE phone = $1"
        self._save_contact = self._contact_upsert()
        self._recent = f"""
            SELECT {_MESSAGE_COLUMNS} FROM {m} WHERE phone = $1
            ORDER BY created_at DESC, position DESC LIMIT $2"""
        self._recent_before = f"""
            SELECT {_MESSAGE_COLUMNS} FROM {m}
            WHERE phone = $1 AND (created_at, position) < ($3, $4)
            ORDER BY created_at DESC, position DESC LIMIT $2"""
        # One statement, so the version and the messages come from the same snapshot.
        self._snapshot = f"""
            SELECT c.version, r.* FROM {c} c
            LEFT JOIN LATERAL (
                SELECT {_MESSAGE_COLUMNS} FROM {m} WHERE phone = c.phone
                ORDER BY created_at DESC, position DESC LIMIT $2
            ) r ON true
            WHERE c.phone = $1"""
        latest = f"""LEFT JOIN LATERAL (
                SELECT {_MESSAGE_COLUMNS} FROM {m} WHERE phone = c.phone
                ORDER BY created_at DESC, position DESC LIMIT $2
            ) r ON true"""
        self._snapshots = f"""
            SELECT c.phone, c.version, r.* FROM {c} c {latest} WHERE c.phone = ANY($1::text[])"""
        # The saved contacts' versions as written (the statement's snapshot predates them), the
        # others' as found; the messages written by the transaction's earlier statements.
        self._save_contacts_and_snapshots = f"""
            WITH saved AS ({self._save_contact} RETURNING phone, version),
            c AS (
                SELECT phone, version FROM saved
                UNION ALL
                SELECT phone, version FROM {c}
                WHERE phone = ANY($3::text[]) AND phone NOT IN (SELECT phone FROM saved)
            )
            SELECT c.phone, c.version, r.* FROM c {latest}"""
        self._by_keys = f"""
            SELECT {_MESSAGE_COLUMNS} FROM {m} WHERE message_key = ANY($1::text[])
            ORDER BY created_at, position"""
        self._contacts_page = f"""
            SELECT {CONTACT_COLUMNS} FROM {c}
            WHERE last_activity_at >= $1 AND (last_activity_at, phone) < ($2, $3)
            ORDER BY last_activity_at DESC, phone DESC LIMIT $4"""

    # -- messages ---------------------------------------------------------------------------

    async def insert_message(
        self, conn: asyncpg.Connection, item: MessageItem
    ) -> tuple[bool, tuple[str, datetime, str] | None]:
        """Insert a new message row; returns (False, None) when its key or provider id is already
        projected, else (True, the status that arrived before it, taken off the early table)."""
        row = await conn.fetchrow(self._insert_message, *self._row(item))
        assert row is not None
        early = (row["status"], row["status_at"], row["error"]) if row["status"] is not None else None
        return bool(row["inserted"]), early

    async def upsert_reply(self, conn: asyncpg.Connection, item: MessageItem) -> bool:
        """Insert an outbound reply or set its full text; True when the row is new."""
        inserted: bool = await conn.fetchval(self._upsert_reply, *self._row(item))
        return inserted

    @staticmethod
    def _row(item: MessageItem) -> tuple[object, ...]:
        return (
            item.key,
            item.phone,
            item.direction,
            item.kind,
            item.text,
            item.status,
            item.created_at,
            item.position,
            item.provider_message_id,
            item.reply_key,
        )

    async def get_message(self, conn: asyncpg.Connection, key: str) -> MessageItem | None:
        row = await conn.fetchrow(self._get_message, key)
        return message_item(row) if row else None

    async def find_by_provider_id(
        self, conn: asyncpg.Connection, provider_message_id: str
    ) -> StatusRow | None:
        row = await conn.fetchrow(self._by_provider_id, provider_message_id)
        return StatusRow(row["message_key"], row["status"]) if row else None

    async def set_status(
        self, conn: asyncpg.Connection, key: str, status: str, at: datetime, error: str = ""
    ) -> None:
        await conn.execute(self._set_status, key, status, at, error)

    async def apply_provider_status(
        self,
        conn: asyncpg.Connection,
        provider_message_id: str,
        status: str,
        at: datetime,
        error: str,
        supersedes: Sequence[str],
    ) -> bool:
        """Set the status of the message with this provider id if its status is in ``supersedes``."""
        row = await conn.fetchrow(
            self._status_by_provider_id, provider_message_id, status, at, error, list(supersedes)
        )
        return row is not None

    async def record_sent(
        self,
        conn: asyncpg.Connection,
        key: str,
        provider_message_id: str,
        at: datetime,
        sent_supersedes: Sequence[str],
    ) -> SentResult:
        """A sent part: its provider id on the reply (first part) or as an extra part, and the
        status 'sent' over ``sent_supersedes``; an echo line of it (from_me) is removed."""
        row = await conn.fetchrow(self._sent, key, provider_message_id, list(sent_supersedes), at)
        assert row is not None
        attached: bool | None = row["attached"]
        if attached is False:
            await conn.execute(self._add_part, provider_message_id, key)
        return SentResult(found=attached is not None, echo_removed=bool(row["echo"]))

    async def early_status(self, conn: asyncpg.Connection, provider_message_id: str) -> str | None:
        status: str | None = await conn.fetchval(self._early_get, provider_message_id)
        return status

    async def save_early_status(
        self, conn: asyncpg.Connection, provider_message_id: str, status: str, at: datetime, error: str
    ) -> None:
        await conn.execute(self._early_put, provider_message_id, status, at, error)

    async def recent_messages(
        self,
        conn: asyncpg.Connection | asyncpg.Pool,
        phone: str,
        limit: int,
        before: tuple[datetime, int] | None = None,
    ) -> list[MessageItem]:
        """Newest first."""
        if before is None:
            rows = await conn.fetch(self._recent, phone, limit)
        else:
            rows = await conn.fetch(self._recent_before, phone, limit, before[0], before[1])
        return [message_item(r) for r in rows]

    async def history_snapshot(
        self, conn: asyncpg.Connection | asyncpg.Pool, phone: str, limit: int
    ) -> tuple[int, list[MessageItem]] | None:
        """The contact's stream version and newest ``limit`` messages, or None for an unknown phone."""
        rows = await conn.fetch(self._snapshot, phone, limit)
        if not rows:
            return None
        version: int = rows[0]["version"]
        return version, [message_item(r) for r in rows if r["message_key"] is not None]

    async def history_snapshots(
        self, conn: asyncpg.Connection, phones: Sequence[str], limit: int
    ) -> dict[str, tuple[int, list[MessageItem]]]:
        """:meth:`history_snapshot` of several contacts in one statement (unknown phones left out)."""
        return _snapshots(await conn.fetch(self._snapshots, list(phones), limit))

    async def save_contacts_and_snapshots(
        self, conn: asyncpg.Connection, summaries: Sequence[ContactSummary], phones: Sequence[str], limit: int
    ) -> dict[str, tuple[int, list[MessageItem]]]:
        """:meth:`save_contacts`, then :meth:`history_snapshots` of ``phones``, in one statement."""
        rows = await conn.fetch(
            self._save_contacts_and_snapshots,
            json_rows(CONTACT_NAMES, map(_contact_row, summaries)),
            limit,
            list(phones),
        )
        return _snapshots(rows)

    async def messages_by_keys(self, conn: asyncpg.Connection, keys: Sequence[str]) -> list[MessageItem]:
        """Oldest first."""
        return [message_item(r) for r in await conn.fetch(self._by_keys, list(keys))]

    # -- contacts ---------------------------------------------------------------------------

    async def load_contact(
        self, conn: asyncpg.Connection | asyncpg.Pool, phone: str
    ) -> ContactSummary | None:
        row = await conn.fetchrow(self._load_contact, phone)
        return contact_summary(row) if row else None

    async def save_contact(self, conn: asyncpg.Connection, s: ContactSummary) -> None:
        await self.save_contacts(conn, [s])

    async def save_contacts(self, conn: asyncpg.Connection, summaries: Sequence[ContactSummary]) -> None:
        """Upsert contacts (each phone at most once) in one statement, locked in phone order."""
        if summaries:
            await conn.execute(self._save_contact, json_rows(CONTACT_NAMES, map(_contact_row, summaries)))

    def _contact_upsert(self, condition: str = "") -> str:
        """Upsert the contacts of a JSON array (``$1``), locked in phone order, where ``condition``."""
        c = self.contacts
        return f"""
            INSERT INTO {c} ({CONTACT_COLUMNS})
            SELECT {CONTACT_COLUMNS} FROM jsonb_populate_recordset(NULL::{c}, $1::jsonb)
            {f"WHERE {condition}" if condition else ""} ORDER BY phone
            ON CONFLICT (phone) DO UPDATE SET
                profile_name = excluded.profile_name, message_count = excluded.message_count,
                inbound_count = excluded.inbound_count, outbound_count = excluded.outbound_count,
                first_message_at = excluded.first_message_at, last_inbound_at = excluded.last_inbound_at,
                last_outbound_at = excluded.last_outbound_at, last_activity_at = excluded.last_activity_at,
                opted_out = excluded.opted_out, blocked = excluded.blocked, handed_off = excluded.handed_off,
                version = excluded.version, lead_stage = excluded.lead_stage, language = excluded.language,
                verification_pending = excluded.verification_pending, verified = excluded.verified,
                verification_answer_ids = excluded.verification_answer_ids"""

    async def append_and_save_contacts(
        self,
        conn: asyncpg.Connection,
        store: EventStore,
        events: Sequence[tuple[Envelope, int]],
        trace_contexts: Sequence[str | None],
        summaries: Sequence[ContactSummary],
    ) -> list[int]:
        """``store.append_at_versions`` (without a savepoint), then :meth:`save_contacts`, in one
        statement (``EventStore.append_at_versions_with``); returns the events' positions."""
        contacts = json_rows(CONTACT_NAMES, map(_contact_row, summaries))
        return await store.append_at_versions_with(
            conn, events, trace_contexts, self._contact_upsert, [contacts]
        )

    async def active_contacts(
        self,
        conn: asyncpg.Connection | asyncpg.Pool,
        since: datetime,
        limit: int,
        before: tuple[datetime, str] | None,
    ) -> list[ContactSummary]:
        """Contacts active since ``since``, most recent first, strictly before the cursor."""
        far = datetime.max.replace(tzinfo=UTC)  # in another offset it may not exist in UTC
        at, phone = before if before is not None else (far, "\uffff")
        return [contact_summary(r) for r in await conn.fetch(self._contacts_page, since, at, phone, limit)]


def _snapshots(rows: Sequence[asyncpg.Record]) -> dict[str, tuple[int, list[MessageItem]]]:
    """History snapshots by phone from rows of (phone, version, message columns or NULLs)."""
    found: dict[str, tuple[int, list[MessageItem]]] = {}
    for r in rows:
        _, items = found.setdefault(r["phone"], (r["version"], []))
        if r["message_key"] is not None:
            items.append(message_item(r))
    return found


# -- pending replies (a work queue, not a projection) ----------------------------------------

PENDING_COLUMNS = "phone, inbound_ids, due_at, correlation_id, causation_id"
_PENDING_NAMES = column_names(PENDING_COLUMNS)


@dataclass(frozen=True)
class PendingRow:
    reply: PendingReply
    correlation_id: str
    causation_id: str


@dataclass(frozen=True)
class DueBurst(PendingRow):
    """A due row as a scheduler round took it (:func:`take_due`), with what the round read of
    its contact's stream: the trace context of the burst's last message (its causation), the
    stream's version and the reply key of the contact's last ReplyRequested; and of its
    projection: the contact (None if unknown) and the burst's messages found, oldest first."""

    trace_context: str | None
    stream_version: int
    previous_reply_key: str
    contact: ContactSummary | None
    burst: tuple[MessageItem, ...]


def _pending(row: Mapping[str, Any]) -> PendingRow:
    return PendingRow(_reply(row), row["correlation_id"], row["causation_id"])


def _due(row: asyncpg.Record) -> DueBurst:
    return DueBurst(
        _reply(row),
        row["correlation_id"],
        row["causation_id"],
        row["trace_context"],
        row["stream_version"] or 0,
        row["previous_reply_key"] or "",
        contact_of_record(row["contact"]) if row["contact"] else None,
        tuple(message_item(dict(zip(_MESSAGE_NAMES, m, strict=True))) for m in row["burst"]),
    )


def _reply(row: Mapping[str, Any]) -> PendingReply:
    return PendingReply(phone=row["phone"], inbound_ids=tuple(row["inbound_ids"]), due_at=row["due_at"])


async def load_pending(conn: asyncpg.Connection, phone: str) -> PendingRow | None:
    """The contact's waiting reply, locked until the transaction ends."""
    row = await conn.fetchrow(
        f"SELECT {PENDING_COLUMNS} FROM pending_replies WHERE phone = $1 FOR UPDATE", phone
    )
    return _pending(row) if row else None


async def lock_pending_many(conn: asyncpg.Connection, phones: Sequence[str]) -> dict[str, PendingRow]:
    """Contacts' waiting replies by phone, locked until the transaction ends; taken in phone
    order, the order every batch takes them in, so two batches never deadlock on them."""
    rows = await conn.fetch(
        f"""SELECT {PENDING_COLUMNS} FROM pending_replies WHERE phone = ANY($1::text[])
            ORDER BY phone FOR UPDATE""",
        sorted(phones),
    )
    return {row["phone"]: _pending(row) for row in rows}


async def save_pending(conn: asyncpg.Connection, pending: PendingRow) -> None:
    await save_pending_many(conn, [pending])


async def save_pending_many(conn: asyncpg.Connection, rows: Sequence[PendingRow]) -> None:
    """Upsert contacts' waiting replies (each phone at most once)."""
    if not rows:
        return
    await conn.execute(
        f"""INSERT INTO pending_replies ({PENDING_COLUMNS})
           SELECT {PENDING_COLUMNS} FROM jsonb_populate_recordset(NULL::pending_replies, $1::jsonb)
           ORDER BY phone
           ON CONFLICT (phone) DO UPDATE SET inbound_ids = excluded.inbound_ids, due_at = excluded.due_at,
               correlation_id = excluded.correlation_id, causation_id = excluded.causation_id""",
        json_rows(
            _PENDING_NAMES,
            (
                (p.reply.phone, p.reply.inbound_ids, p.reply.due_at, p.correlation_id, p.causation_id)
                for p in rows
            ),
        ),
    )


async def delete_pending(conn: asyncpg.Connection, phone: str) -> bool:
    return await delete_pending_many(conn, [phone]) == 1


async def delete_pending_many(conn: asyncpg.Connection, phones: Sequence[str]) -> int:
    """Drop contacts' waiting replies; returns how many there were."""
    if not phones:
        return 0
    status: str = await conn.execute(
        "DELETE FROM pending_replies WHERE phone = ANY($1::text[])", list(phones)
    )
    return int(status.split()[-1])


@dataclass(frozen=True)
class DueRound:
    """A scheduler round's claim: the due rows it took, and what still waits."""

    rows: list[DueBurst]  # earliest due first
    waiting: int  # rows left in the queue, taken ones excluded
    next_due: datetime | None  # the earliest due time among them


async def take_due(conn: asyncpg.Connection, proj: Projection, now: datetime, limit: int) -> DueRound:
    """Take the due rows out of the queue, in the caller's transaction: a rollback puts them
    back. Rows another replica is emitting right now are skipped, not waited for. Each row
    comes with what the round reads of its contact's stream in the event store of the same
    schema: the trace context stored with its causation (the burst's last message), so that its
    request continues that message's trace; the stream's version, at which the request is
    appended (read in the same snapshot as the contact: see ``replies.emit``); and the reply key
    of the contact's last request, which the new one follows. And of ``proj``: the contact and
    the burst's messages, from which the request is built.

    One statement for the claim, the delete, those reads and the queue's summary. The contact
    and the messages come as anonymous records: a table's own row type would change with the
    rebuild's swapped-in tables and fail the statement prepared before it.
    """
    records = await conn.fetch(
        f"""WITH due AS (
                SELECT phone FROM pending_replies WHERE due_at <= $1
                ORDER BY due_at LIMIT $2 FOR UPDATE SKIP LOCKED
            ), taken AS (
                DELETE FROM pending_replies p USING due WHERE p.phone = due.phone
                RETURNING {", ".join(f"p.{c}" for c in _PENDING_NAMES)}
            ), rest AS (  -- the statement's snapshot still holds the taken rows
                SELECT (SELECT count(*) FROM pending_replies) - (SELECT count(*) FROM taken) AS waiting,
                       (SELECT due_at FROM pending_replies WHERE phone NOT IN (SELECT phone FROM taken)
                        ORDER BY due_at LIMIT 1) AS next_due
            )
            SELECT rest.waiting, rest.next_due, taken.*, e.trace_context::text AS trace_context,
                   (SELECT max(v.version) FROM events v WHERE v.stream_id = taken.phone) AS stream_version,
                   (SELECT r.body->'payload'->>'reply_key' FROM events r
                    WHERE r.stream_id = taken.phone AND r.type = 'ReplyRequested'
                    ORDER BY r.version DESC LIMIT 1) AS previous_reply_key,
                   (SELECT ROW({CONTACT_COLUMNS}) FROM {proj.contacts} WHERE phone = taken.phone) AS contact,
                   ARRAY(SELECT ROW({_MESSAGE_VALUES}) FROM {proj.messages}
                         WHERE message_key = ANY(taken.inbound_ids) ORDER BY created_at, position) AS burst
            FROM rest LEFT JOIN taken ON true LEFT JOIN events e ON e.event_id = taken.causation_id""",
        now,
        limit,
    )
    rows = sorted((_due(r) for r in records if r["phone"] is not None), key=lambda r: r.reply.due_at)
    return DueRound(rows, int(records[0]["waiting"]), records[0]["next_due"])
