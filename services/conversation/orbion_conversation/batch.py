"""Batched projection: apply many events in memory, then write the result in a few statements.

Used by the rebuild (and the benchmark's "batched transactions" figure). ``BatchProjection``
has the interface of ``store.Projection`` that ``projector.apply`` uses, so the rules are the
same code as the live path; only the storage differs: the rows a batch touches are read once
(``load``), changed in memory with the same semantics as the SQL in ``store.py`` (the rebuild
test compares both paths), and written with ``executemany`` (``flush``), all in the caller's
transaction. Only one writer may use a batch's rows meanwhile (the rebuild's copy tables,
split by contact across connections).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from orbion_common.events import Event, MessageReceived, MessageSent, MessageStatusChanged
from orbion_common.eventstore import StoredEvent

from .domain import ContactSummary, MessageItem
from .store import (
    CONTACT_COLUMNS,
    Projection,
    SentResult,
    StatusRow,
    column_names,
    contact_of_record,
    json_rows,
)

_ROW_COLUMNS = (
    "message_key, phone, direction, kind, text, status, status_at, error, created_at, position, "
    "provider_message_id, reply_key"
)
_ROW_NAMES = column_names(_ROW_COLUMNS)


@dataclass
class _Row:
    message_key: str
    phone: str
    direction: str
    kind: str
    text: str
    status: str
    status_at: datetime | None
    error: str
    created_at: datetime
    position: int
    provider_message_id: str | None
    reply_key: str

    def item(self) -> MessageItem:
        pid = self.provider_message_id or (self.message_key if self.reply_key == "" else "")
        return MessageItem(
            key=self.message_key, phone=self.phone, direction=self.direction,  # type: ignore[arg-type]
            kind=self.kind, text=self.text, status=self.status, created_at=self.created_at,
            position=self.position, provider_message_id=pid, reply_key=self.reply_key,
        )  # fmt: skip

    def values(self) -> tuple[Any, ...]:
        return (
            self.message_key, self.phone, self.direction, self.kind, self.text, self.status,
            self.status_at, self.error, self.created_at, self.position, self.provider_message_id,
            self.reply_key,
        )  # fmt: skip


def _referenced(events: Sequence[Event]) -> tuple[list[str], list[str]]:
    """Message keys / provider ids and phones the batch refers to."""
    ids: set[str] = set()
    phones: set[str] = set()
    for event in events:
        phones.add(event.stream_id)
        if isinstance(event, MessageReceived | MessageStatusChanged | MessageSent):
            ids.add(event.payload.provider_message_id)
        reply_key = getattr(event.payload, "reply_key", "")
        if reply_key:
            ids.add(reply_key)
    return sorted(ids), sorted(phones)


class BatchProjection(Projection):
    """The rows of one batch in memory; ``flush`` writes what changed."""

    def __init__(self, suffix: str = "") -> None:
        super().__init__(suffix)
        self.rows: dict[str, _Row] = {}
        self.by_pid: dict[str, str] = {}
        self.part_keys: dict[str, str] = {}
        self.early_rows: dict[str, tuple[str, datetime, str]] = {}
        self.contacts_loaded: dict[str, ContactSummary] = {}
        self._dirty: set[str] = set()
        self._deleted: set[str] = set()
        self._new_parts: dict[str, str] = {}
        self._early_dirty: set[str] = set()
        self._early_deleted: set[str] = set()

    async def load(self, conn: asyncpg.Connection, events: Sequence[StoredEvent]) -> None:
        """Read the rows the events refer to, in one statement: the parts of our replies by
        their provider ids, the messages by key (theirs included) or provider id, the statuses
        that came before their message, and the contacts."""
        ctes, columns, args = self.load_query([s.event for s in events])
        self.loaded(await conn.fetchrow(f"WITH {ctes} SELECT {columns}", *args))

    def load_query(self, events: Sequence[Event], *, first: int = 1) -> tuple[str, str, list[object]]:
        """:meth:`load`'s read as parts of a statement: its CTEs, its select list and their
        arguments, numbered from ``$first``; for a caller that writes in the same statement
        (the group commit appends the events). :meth:`loaded` takes the row it returns."""
        ids, phones = _referenced(events)
        m, p, e, c = self.messages, self.parts, self.early, self.contacts
        i, k = f"${first}::text[]", f"${first + 1}::text[]"
        ctes = f"""parts AS (
                SELECT provider_message_id, message_key FROM {p} WHERE provider_message_id = ANY({i})
            )"""
        # Anonymous records: a table's own row type would change with the rebuild's copies.
        columns = f"""ARRAY(SELECT ROW(provider_message_id, message_key) FROM parts) AS parts,
                   ARRAY(SELECT ROW({_ROW_COLUMNS}) FROM {m}
                         WHERE message_key = ANY({i} || ARRAY(SELECT message_key FROM parts))
                            OR provider_message_id = ANY({i})) AS messages,
                   ARRAY(SELECT ROW(provider_message_id, status, status_at, error) FROM {e}
                         WHERE provider_message_id = ANY({i})) AS early,
                   ARRAY(SELECT ROW({CONTACT_COLUMNS}) FROM {c} WHERE phone = ANY({k})) AS contacts"""
        return ctes, columns, [ids, phones]

    def loaded(self, found: Mapping[str, Any]) -> None:
        """Keep the rows of a :meth:`load_query` read."""
        self.part_keys.update(found["parts"])
        for values in found["messages"]:
            row = _Row(*values)
            self.rows[row.message_key] = row
            if row.provider_message_id is not None:
                self.by_pid[row.provider_message_id] = row.message_key
        for pid, *status in found["early"]:
            self.early_rows[pid] = tuple(status)
        for values in found["contacts"]:
            contact = contact_of_record(values)
            self.contacts_loaded[contact.phone] = contact

    # -- the interface projector.apply uses ---------------------------------------------------

    async def load_contact(self, conn: Any, phone: str) -> ContactSummary | None:
        return self.contacts_loaded.get(phone)

    def _find(self, pid: str) -> str | None:
        if pid in self.rows:
            return pid
        key = self.by_pid.get(pid) or self.part_keys.get(pid)
        return key if key is not None and key in self.rows else None

    def _put(self, row: _Row) -> None:
        self.rows[row.message_key] = row
        if row.provider_message_id is not None:
            self.by_pid[row.provider_message_id] = row.message_key
        self._dirty.add(row.message_key)
        self._deleted.discard(row.message_key)

    @staticmethod
    def _new_row(item: MessageItem) -> _Row:
        return _Row(
            item.key, item.phone, item.direction, item.kind, item.text, item.status, None, "",
            item.created_at, item.position, item.provider_message_id or None, item.reply_key,
        )  # fmt: skip

    async def insert_message(
        self, conn: Any, item: MessageItem
    ) -> tuple[bool, tuple[str, datetime, str] | None]:
        pid = item.provider_message_id or None
        if (
            item.key in self.rows
            or item.key in self.by_pid
            or item.key in self.part_keys
            or (pid and pid in self.by_pid)
        ):
            return False, None
        self._put(self._new_row(item))
        early = self.early_rows.pop(item.key, None)
        if early is not None:
            self._early_deleted.add(item.key)
            self._early_dirty.discard(item.key)
        return True, early

    async def upsert_reply(self, conn: Any, item: MessageItem) -> bool:
        row = self.rows.get(item.key)
        if row is not None:
            row.text, row.created_at = item.text, item.created_at
            self._dirty.add(row.message_key)
            return False
        self._put(self._new_row(item))
        return True

    async def get_message(self, conn: Any, key: str) -> MessageItem | None:
        row = self.rows.get(key)
        return row.item() if row is not None else None

    async def find_by_provider_id(self, conn: Any, provider_message_id: str) -> StatusRow | None:
        key = self._find(provider_message_id)
        return StatusRow(key, self.rows[key].status) if key is not None else None

    async def set_status(self, conn: Any, key: str, status: str, at: datetime, error: str = "") -> None:
        row = self.rows.get(key)
        if row is not None:
            row.status, row.status_at, row.error = status, at, error
            self._dirty.add(key)

    async def apply_provider_status(
        self, conn: Any, provider_message_id: str, status: str, at: datetime, error: str,
        supersedes: Sequence[str],
    ) -> bool:  # fmt: skip
        key = self._find(provider_message_id)
        if key is None or self.rows[key].status not in supersedes:
            return False
        await self.set_status(conn, key, status, at, error)
        return True

    async def record_sent(
        self, conn: Any, key: str, provider_message_id: str, at: datetime, sent_supersedes: Sequence[str]
    ) -> SentResult:
        echo = self.rows.get(provider_message_id)
        echo_removed = echo is not None and echo.direction == "out" and echo.reply_key == ""
        if echo_removed:
            del self.rows[provider_message_id]
            self._dirty.discard(provider_message_id)
            self._deleted.add(provider_message_id)
        row = self.rows.get(key)
        if row is None:
            return SentResult(False, echo_removed)
        if row.provider_message_id is None:
            row.provider_message_id = provider_message_id
            self.by_pid[provider_message_id] = key
        if row.status in sent_supersedes:
            row.status, row.status_at = "sent", at
        self._dirty.add(key)
        if row.provider_message_id != provider_message_id and provider_message_id not in self.part_keys:
            self.part_keys[provider_message_id] = key
            self._new_parts[provider_message_id] = key
        return SentResult(True, echo_removed)

    async def early_status(self, conn: Any, provider_message_id: str) -> str | None:
        early = self.early_rows.get(provider_message_id)
        return early[0] if early is not None else None

    async def save_early_status(
        self, conn: Any, provider_message_id: str, status: str, at: datetime, error: str
    ) -> None:
        self.early_rows[provider_message_id] = (status, at, error)
        self._early_dirty.add(provider_message_id)
        self._early_deleted.discard(provider_message_id)

    async def save_contact(self, conn: Any, s: ContactSummary) -> None:
        raise AssertionError("batched projection keeps contacts in the caller's dict")

    # -- writing ------------------------------------------------------------------------------

    async def flush(self, conn: asyncpg.Connection, contacts: dict[str, ContactSummary]) -> None:
        m, p, e = self.messages, self.parts, self.early
        if self._deleted:
            await conn.execute(f"DELETE FROM {m} WHERE message_key = ANY($1)", sorted(self._deleted))
        if self._dirty:
            cols = _ROW_COLUMNS
            updates = ", ".join(f"{c} = excluded.{c}" for c in _ROW_NAMES[1:])
            await conn.execute(
                f"INSERT INTO {m} ({cols}) SELECT {cols} FROM jsonb_populate_recordset(NULL::{m}, $1::jsonb) "
                f"ORDER BY position ON CONFLICT (message_key) DO UPDATE SET {updates}",
                json_rows(_ROW_NAMES, (self.rows[k].values() for k in self._dirty)),
            )
        if self._new_parts:
            await conn.executemany(
                f"INSERT INTO {p} (provider_message_id, message_key) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                list(self._new_parts.items()),
            )
        if self._early_deleted:
            await conn.execute(
                f"DELETE FROM {e} WHERE provider_message_id = ANY($1)", sorted(self._early_deleted)
            )
        if self._early_dirty:
            await conn.executemany(
                f"INSERT INTO {e} (provider_message_id, status, status_at, error) VALUES ($1, $2, $3, $4) "
                "ON CONFLICT (provider_message_id) DO UPDATE SET status = excluded.status, "
                "status_at = excluded.status_at, error = excluded.error",
                [(k, *self.early_rows[k]) for k in sorted(self._early_dirty)],
            )
        if contacts:
            await self.save_contacts(conn, list(contacts.values()))
