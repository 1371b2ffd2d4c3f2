"""Applies one stored event to the projection tables: the single path for live and rebuild.

The live consumer calls :func:`apply` in the transaction that appended the event; the
rebuild replays the whole log through it into fresh tables. Decisions come from ``domain``,
SQL from ``store``; nothing here publishes, caches or decides on replies.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import asyncpg

from orbion_common.events import (
    BantStageAdvanced,
    Event,
    MessageReceived,
    MessageSent,
    MessageStatusChanged,
    ReplyGenerated,
    SendFailed,
)
from orbion_common.eventstore import StoredEvent

from . import domain
from .domain import ContactSummary, MessageItem
from .store import Projection

PROJECTED_TYPES = (
    "MessageReceived",
    "MessageStatusChanged",
    "ReplyRequested",
    "ReplyGenerated",
    "MessageSent",
    "SendFailed",
    "LeadOptedOut",
    "LeadOptedIn",
    "ContactBlocked",
    "LeadHandedOff",
    "BantStageAdvanced",
    "HumanVerificationRequested",
    "HumanVerificationPassed",
    "HumanVerificationFailed",
)


@dataclass(frozen=True)
class Applied:
    summary: ContactSummary  # the contact after the event, at the event's stream version
    new_message: MessageItem | None  # the inbound row this event created (None: duplicate or other type)


async def apply(
    conn: asyncpg.Connection,
    proj: Projection,
    stored: StoredEvent,
    opt_in_rule: str = "keyword",
    contacts: dict[str, ContactSummary] | None = None,
) -> Applied:
    """Project ``stored`` (idempotent per message key / provider id).

    With ``contacts`` (a batch), summaries are read once and kept there instead of being
    written per event: the caller saves them with :func:`save_contacts` before committing.
    """
    event = stored.event
    new_message: MessageItem | None = None
    phone = event.stream_id
    summary = contacts.get(phone) if contacts is not None else None
    if summary is None:
        summary = await proj.load_contact(conn, phone) or ContactSummary(phone=phone)
    summary = contact_after(summary, event, stored.version, opt_in_rule)
    if isinstance(event, MessageReceived):
        summary, new_message = await _inbound(conn, proj, event, stored.position, summary)
    elif isinstance(event, MessageStatusChanged):
        await _status(conn, proj, event)
    elif isinstance(event, ReplyGenerated | MessageSent | SendFailed):
        summary = await _outbound(conn, proj, event, stored.position, summary)
        if isinstance(event, ReplyGenerated) and event.payload.facts.language:
            summary = replace(summary, language=event.payload.facts.language)
    elif isinstance(event, BantStageAdvanced):
        summary = replace(summary, lead_stage=event.payload.to_stage)
    # Lead events (opt-out/in, blocked, handed off, human verification) only change the
    # contact state (above).

    if contacts is not None:
        contacts[phone] = summary
    else:
        await proj.save_contact(conn, summary)
    return Applied(summary, new_message)


def contact_after(summary: ContactSummary, event: Event, version: int, opt_in_rule: str) -> ContactSummary:
    """The contact's state and version after ``event``, at ``version`` of its stream: all that
    an event projects beyond its own rows (``ReplyRequested`` and the lead's events have none)."""
    return replace(summary, state=domain.evolve_contact(summary.state, event, opt_in_rule), version=version)


async def _inbound(
    conn: asyncpg.Connection, proj: Projection, event: MessageReceived, position: int, summary: ContactSummary
) -> tuple[ContactSummary, MessageItem | None]:
    item = domain.inbound_item(event, position)
    inserted, early = await proj.insert_message(conn, item)
    if not inserted:
        return summary, None  # the provider message is already projected
    summary = domain.count_message(summary, item)
    if event.payload.profile_name:
        summary = replace(summary, profile_name=event.payload.profile_name)
    if early is not None and domain.newer_status(item.status, early[0]) != item.status:
        await proj.set_status(conn, item.key, early[0], early[1], early[2])
    return summary, item


async def _status(conn: asyncpg.Connection, proj: Projection, event: MessageStatusChanged) -> None:
    p = event.payload
    error = "; ".join(f"{e.code}: {e.title}" for e in p.errors)
    new = p.status.value
    if await proj.apply_provider_status(
        conn, p.provider_message_id, new, p.changed_at, error, domain.superseded_by(new)
    ):
        return
    if await proj.find_by_provider_id(conn, p.provider_message_id) is not None:
        return  # a late status: the message already has a later one
    # Its message is not projected yet: keep the status for it.
    current = await proj.early_status(conn, p.provider_message_id) or "pending"
    if domain.newer_status(current, new) != current or current == "pending":
        await proj.save_early_status(conn, p.provider_message_id, new, p.changed_at, error)


async def _outbound(
    conn: asyncpg.Connection,
    proj: Projection,
    event: ReplyGenerated | MessageSent | SendFailed,
    position: int,
    summary: ContactSummary,
) -> ContactSummary:
    p = event.payload
    if isinstance(event, ReplyGenerated):
        row = domain.reply_item(
            event.stream_id, p.reply_key, event.payload.text, "pending", event.occurred_at, position
        )
        return domain.count_message(summary, row) if await proj.upsert_reply(conn, row) else summary
    if isinstance(event, MessageSent):
        result = await proj.record_sent(
            conn, p.reply_key, event.payload.provider_message_id, event.occurred_at, domain.SENT_SUPERSEDES
        )
        if result.echo_removed:
            summary = domain.uncount_echo(summary)
        if result.found:
            return summary
    current = await proj.get_message(conn, p.reply_key)
    if current is None:
        # Sent/failed seen before Generated (the llm-proxy's events may be redelivered out of
        # order): a stand-in row, completed by ReplyGenerated's text when it lands.
        text = event.payload.text if isinstance(event, MessageSent) else ""
        status = "sent" if isinstance(event, MessageSent) else "pending"
        current = domain.reply_item(event.stream_id, p.reply_key, text, status, event.occurred_at, position)
        if await proj.upsert_reply(conn, current):
            summary = domain.count_message(summary, current)
    if isinstance(event, MessageSent):
        await proj.record_sent(
            conn, p.reply_key, event.payload.provider_message_id, event.occurred_at, domain.SENT_SUPERSEDES
        )
    elif current.status in ("pending", "sent"):
        await proj.set_status(conn, p.reply_key, "failed", event.occurred_at, event.payload.reason)
    return summary
