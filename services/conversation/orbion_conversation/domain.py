"""Pure rules of the conversation service: no await, no I/O.

What it owns: which inbound message deserves an answer, how a burst of messages from one
contact is grouped into one reply request, the 24-hour customer-service window, the shape
of a history line (projection row, cache item, API item), delivery-status precedence and
the pagination cursor. ``store.py`` persists what these functions decide; ``consumers.py``
calls them in order.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from orbion_common import optout
from orbion_common.events import (
    ContactBlocked,
    Envelope,
    HumanVerificationFailed,
    HumanVerificationPassed,
    HumanVerificationRequested,
    LeadHandedOff,
    LeadOptedIn,
    LeadOptedOut,
    MessageReceived,
    stable_event_id,
)
from orbion_common.events.messaging import (
    HistoryLine,
    MessageKind,
    MessageReceivedPayload,
    ReplyRequestedPayload,
)

SERVICE_WINDOW = timedelta(hours=24)
"""WhatsApp's customer-service window: free-form replies only within 24 h of the last inbound."""

HISTORY_SIZE = 20
"""Messages kept per contact in the cache and sent to the LLM as history."""

REPLYABLE_KINDS = frozenset({MessageKind.TEXT, MessageKind.INTERACTIVE, MessageKind.BUTTON})

Direction = Literal["in", "out"]


def is_opt_out(text: str) -> bool:
    """Whether ``text`` as a whole is an opt-out request (the rule shared with the lead service)."""
    return optout.is_opt_out(text)


# --------------------------------------------------------------------------- contact state


VERIFICATION_ANSWERS_KEPT = 5
"""Answers remembered per contact: the lead blocks after 2 wrong ones, so a few cover all."""


@dataclass(frozen=True)
class ContactState:
    """What the conversation service must know about a contact to decide on a reply.

    ``verification_pending``: the lead service suspects a bot and has asked the contact to prove
    it is human; no LLM replies until it passes (or for good, once blocked). ``verified``: it
    passed. ``verification_answer_ids``: event ids of the inbound messages the lead judged as
    answers, so that one redelivered after its verdict is still not answered.
    """

    opted_out: bool = False
    blocked: bool = False
    handed_off: bool = False
    verification_pending: bool = False
    verified: bool = False
    verification_answer_ids: tuple[str, ...] = ()

    @property
    def silenced(self) -> bool:
        """No reply may be requested for this contact now."""
        return self.opted_out or self.blocked or self.handed_off or self.verification_pending


def evolve_contact(
    state: ContactState, event: Envelope, opt_in_rule: optout.OptInRule | str = optout.OptInRule.KEYWORD
) -> ContactState:
    """Fold one event into the contact's reply-relevant state.

    Stop and start words are applied here too, with the lead service's rule, so that the very
    message that opts a contact out (or back in) is treated right before the lead's event lands.
    """
    if isinstance(event, LeadOptedOut):
        return replace(state, opted_out=True)
    if isinstance(event, LeadOptedIn):
        return replace(state, opted_out=False)
    if isinstance(event, ContactBlocked):
        return replace(state, blocked=True, verification_pending=False)
    # The lead asks a contact once: after it passed or was blocked, a request or failure that
    # is delivered late (a redelivery overtaken by the verdict) reopens nothing.
    still_open = not (state.verified or state.blocked)
    if isinstance(event, HumanVerificationRequested):
        return replace(state, verification_pending=still_open)
    if isinstance(event, HumanVerificationFailed):
        # A wrong answer leaves the question open (the lead blocks after enough of them).
        return replace(
            state, verification_pending=still_open, verification_answer_ids=_answered(state, event)
        )
    if isinstance(event, HumanVerificationPassed):
        return replace(
            state, verification_pending=False, verified=True, verification_answer_ids=_answered(state, event)
        )
    if isinstance(event, LeadHandedOff):
        return replace(state, handed_off=True)
    if isinstance(event, MessageReceived) and not event.payload.from_me:
        text = inbound_text(event.payload)
        if is_opt_out(text):
            return replace(state, opted_out=True)
        if state.opted_out and optout.is_opt_in(text, opt_in_rule):
            return replace(state, opted_out=False)
    return state


def _answered(state: ContactState, verdict: Envelope) -> tuple[str, ...]:
    """The answer ids after a verdict: the lead's Passed/Failed is caused by the answer's event
    (a timeout's cause is no message, and its id never matches one)."""
    answer = verdict.causation_id
    if not answer or answer in state.verification_answer_ids:
        return state.verification_answer_ids
    return (*state.verification_answer_ids, answer)[-VERIFICATION_ANSWERS_KEPT:]


def inbound_text(msg: MessageReceivedPayload) -> str:
    """The words a contact sent: text, the title of a tapped button/list item, or a caption."""
    if msg.kind is MessageKind.TEXT:
        return msg.text
    if msg.kind in (MessageKind.INTERACTIVE, MessageKind.BUTTON):
        return msg.reply_title or msg.text or msg.reply_id
    if msg.media is not None and msg.media.caption:
        return msg.media.caption
    if msg.kind is MessageKind.REACTION:
        return msg.reaction_emoji
    if msg.location is not None:
        return msg.location.name or msg.location.address
    return msg.text


def skip_reason(msg: MessageReceivedPayload, contact: ContactState, event_id: str = "") -> str | None:
    """Why this inbound message (event ``event_id``) gets no reply, or None when it deserves one."""
    if msg.from_me:
        return "from_me"
    if msg.kind not in REPLYABLE_KINDS:
        return f"kind:{msg.kind.value}"
    if not inbound_text(msg).strip():
        return "empty"
    if msg.throttled:
        return "throttled"
    if msg.kind is MessageKind.TEXT and is_opt_out(msg.text):
        return "opt_out_word"
    if contact.opted_out:
        return "opted_out"
    if contact.blocked:
        return "blocked"
    if contact.handed_off:
        return "handed_off"
    if contact.verification_pending:
        return "verification_pending"  # it is the answer to "are you human?", not a question for sales
    if event_id and event_id in contact.verification_answer_ids:
        return "verification_answer"  # redelivered after the lead's verdict on it
    return None


def cancels_pending_reply(msg: MessageReceivedPayload) -> bool:
    """A stop word withdraws an answer still waiting for its quiet period."""
    return not msg.from_me and is_opt_out(inbound_text(msg))


# --------------------------------------------------------------------------- bursts


@dataclass(frozen=True)
class PendingReply:
    """A reply waiting for the contact to stop typing (one row per contact in ``pending_replies``)."""

    phone: str
    inbound_ids: tuple[str, ...]
    due_at: datetime


def extend_burst(
    pending: PendingReply | None, phone: str, message_id: str, since: datetime, quiet: timedelta
) -> PendingReply:
    """Add an inbound message to the contact's burst; the quiet period restarts from ``since``
    (never ending earlier than it did)."""
    ids = pending.inbound_ids if pending is not None else ()
    if message_id not in ids:
        ids = (*ids, message_id)
    due_at = since + quiet if pending is None else max(pending.due_at, since + quiet)
    return PendingReply(phone=phone, inbound_ids=ids, due_at=due_at)


def reply_key(inbound_ids: Sequence[str]) -> str:
    """The reply's idempotency key: derived from the burst's last inbound message id, so that a
    redelivered or re-grouped burst asks for the same reply and the llm-proxy answers it once."""
    if not inbound_ids:
        raise ValueError("a reply needs at least one inbound message")
    return stable_event_id("reply", inbound_ids[-1])


def reply_requested_event_id(key: str) -> str:
    return stable_event_id("ReplyRequested", key)


# --------------------------------------------------------------------------- history rows


@dataclass(frozen=True)
class MessageItem:
    """One line of a contact's history, as projected, cached and served."""

    key: str  # inbound: provider message id; outbound reply: the reply key
    phone: str
    direction: Direction
    kind: str
    text: str
    status: str
    created_at: datetime
    position: int  # event-store position of the event that created it: the tie-breaker
    provider_message_id: str = ""
    reply_key: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.key,
            "direction": self.direction,
            "type": self.kind,
            "text": self.text,
            "status": self.status,
            "created_at": self.created_at.isoformat(),
            "position": self.position,
            "provider_message_id": self.provider_message_id,
            "reply_key": self.reply_key,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], phone: str) -> MessageItem:
        return cls(
            key=data["id"],
            phone=phone,
            direction=data["direction"],
            kind=data["type"],
            text=data["text"],
            status=data["status"],
            created_at=datetime.fromisoformat(data["created_at"]),
            position=int(data["position"]),
            provider_message_id=data.get("provider_message_id", ""),
            reply_key=data.get("reply_key", ""),
        )

    @property
    def cursor(self) -> str:
        return encode_cursor(self.created_at, self.position)


def inbound_item(event: MessageReceived, position: int) -> MessageItem:
    p = event.payload
    return MessageItem(
        key=p.provider_message_id,
        phone=event.stream_id,
        # from_me: the business wrote from its own phone; it belongs to the outbound side.
        direction="out" if p.from_me else "in",
        kind=p.kind.value,
        text=inbound_text(p),
        status="sent" if p.from_me else "received",
        created_at=p.sent_at,
        position=position,
        # stored as the row's key; the column is for outbound replies (see store._MESSAGE_COLUMNS)
    )


def reply_item(phone: str, key: str, text: str, status: str, at: datetime, position: int) -> MessageItem:
    """The history row of an outbound reply, keyed by its reply key."""
    return MessageItem(
        key=key,
        phone=phone,
        direction="out",
        kind="text",
        text=text,
        status=status,
        created_at=at,
        position=position,
        reply_key=key,
    )


def history_lines(items: Iterable[MessageItem], exclude: Iterable[str] = ()) -> list[HistoryLine]:
    """Oldest-first lines for the LLM, without the burst being answered and without empty lines."""
    skip = set(exclude)
    ordered = sorted(items, key=lambda m: (m.created_at, m.position))
    return [
        HistoryLine(direction=m.direction, text=m.text, at=m.created_at)
        for m in ordered
        if m.key not in skip and m.text.strip()
    ][-HISTORY_SIZE:]


def build_reply_request(
    phone: str,
    burst: Sequence[MessageItem],
    recent: Iterable[MessageItem],
    *,
    profile_name: str = "",
    lead_stage: str = "",
    language: str = "",
    quiet_period_ms: int = 0,
) -> ReplyRequestedPayload:
    """The payload asking the llm-proxy to answer ``burst`` (oldest first) in one reply."""
    ids = [m.key for m in burst]
    return ReplyRequestedPayload(
        reply_key=reply_key(ids),
        phone=phone,
        inbound_message_ids=ids,
        reply_to_message_id=ids[-1],
        text="\n".join(m.text for m in burst if m.text.strip()),
        history=history_lines(recent, exclude=ids),
        profile_name=profile_name,
        lead_stage=lead_stage,
        language=language,
        quiet_period_ms=quiet_period_ms,
    )


# --------------------------------------------------------------------------- contact summary


@dataclass(frozen=True)
class ContactSummary:
    """The per-contact row of the projection; ``version`` is the contact's event-stream version."""

    phone: str
    profile_name: str = ""
    message_count: int = 0
    inbound_count: int = 0
    outbound_count: int = 0
    first_message_at: datetime | None = None
    last_inbound_at: datetime | None = None
    last_outbound_at: datetime | None = None
    last_activity_at: datetime | None = None
    state: ContactState = ContactState()
    version: int = 0
    lead_stage: str = ""
    language: str = ""

    def to_json(self, now: datetime) -> dict[str, Any]:
        def iso(at: datetime | None) -> str | None:
            return at.isoformat() if at is not None else None

        return {
            "phone": self.phone,
            "profile_name": self.profile_name,
            "message_count": self.message_count,
            "inbound_count": self.inbound_count,
            "outbound_count": self.outbound_count,
            "first_message_at": iso(self.first_message_at),
            "last_inbound_at": iso(self.last_inbound_at),
            "last_outbound_at": iso(self.last_outbound_at),
            "last_activity_at": iso(self.last_activity_at),
            "window_open": window_open(self.last_inbound_at, now),
            "opted_out": self.state.opted_out,
            "blocked": self.state.blocked,
            "handed_off": self.state.handed_off,
            "verification_pending": self.state.verification_pending,
            "lead_stage": self.lead_stage,
            "language": self.language,
        }


def _later(a: datetime | None, b: datetime) -> datetime:
    return b if a is None or b > a else a


def count_message(summary: ContactSummary, item: MessageItem) -> ContactSummary:
    """The summary after a new message row (a duplicate is never counted: the caller inserts first)."""
    inbound = item.direction == "in"
    return replace(
        summary,
        message_count=summary.message_count + 1,
        inbound_count=summary.inbound_count + (1 if inbound else 0),
        outbound_count=summary.outbound_count + (0 if inbound else 1),
        first_message_at=item.created_at
        if summary.first_message_at is None or item.created_at < summary.first_message_at
        else summary.first_message_at,
        last_inbound_at=_later(summary.last_inbound_at, item.created_at)
        if inbound
        else summary.last_inbound_at,
        last_outbound_at=summary.last_outbound_at
        if inbound
        else _later(summary.last_outbound_at, item.created_at),
        last_activity_at=_later(summary.last_activity_at, item.created_at),
    )


def uncount_echo(summary: ContactSummary) -> ContactSummary:
    """The summary after our own echo line was found to be a reply already counted."""
    return replace(
        summary, message_count=summary.message_count - 1, outbound_count=summary.outbound_count - 1
    )


# --------------------------------------------------------------------------- statuses

_STATUS_RANK = {"pending": 0, "received": 0, "sent": 1, "failed": 2, "delivered": 3, "read": 4}


def status_rank(status: str) -> int:
    """Later stages win, so a late 'sent' never hides 'read' (WhatsApp does not order statuses)."""
    return _STATUS_RANK.get(status, 0)


def newer_status(current: str, new: str) -> str:
    return new if status_rank(new) > status_rank(current) else current


def superseded_by(new: str) -> list[str]:
    """The statuses a message may have for ``new`` to replace it (the SQL filter of an update)."""
    return [s for s in _STATUS_RANK if status_rank(s) < status_rank(new)]


SENT_SUPERSEDES = ("pending", "failed")
"""A reply sent after a failed try is sent; a provider status (delivered, read) still wins."""


# --------------------------------------------------------------------------- window, cursor


def window_open(last_inbound_at: datetime | None, now: datetime) -> bool:
    """Whether a free-form reply is still allowed (24 h since the contact last wrote)."""
    return last_inbound_at is not None and now - last_inbound_at < SERVICE_WINDOW


class BadCursor(ValueError):
    """A pagination cursor this service did not issue."""


def encode_cursor(created_at: datetime, position: int) -> str:
    raw = f"{created_at.isoformat()}|{position}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, pos = raw.split("|")
        created_at = datetime.fromisoformat(at)
        if created_at.tzinfo is None:
            raise ValueError("naive timestamp")
        return created_at.astimezone(UTC), int(pos)  # OverflowError: no such time in UTC
    except (binascii.Error, UnicodeDecodeError, ValueError, OverflowError) as exc:
        raise BadCursor("cursor is not one this API returned (use next_cursor as given)") from exc


def encode_contact_cursor(at: datetime, phone: str) -> str:
    raw = f"{at.isoformat()}|{phone}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_contact_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, phone = raw.split("|")
        created_at = datetime.fromisoformat(at)
        if created_at.tzinfo is None or not phone.isdigit():
            raise ValueError("bad cursor")
        return created_at.astimezone(UTC), phone  # OverflowError: no such time in UTC
    except (binascii.Error, UnicodeDecodeError, ValueError, OverflowError) as exc:
        raise BadCursor("cursor is not one this API returned (use next_cursor as given)") from exc


def page_from(
    items: Sequence[MessageItem], limit: int, before: tuple[datetime, int] | None
) -> list[MessageItem]:
    """Newest-first page of ``items`` (already newest first) strictly before the cursor."""
    if before is not None:
        items = [m for m in items if (m.created_at, m.position) < before]
    return list(items[:limit])
