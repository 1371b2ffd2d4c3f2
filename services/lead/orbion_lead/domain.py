"""The lead: what ORBION knows about a contact as a sales lead, and the decisions it takes.

Pure: no ``await``, no I/O. A ``Lead`` is the fold of its events (``evolve``/``replay``);
each decision (``on_message_received``, ``on_reply_generated``, ``on_message_sent``,
``hand_off``, ``on_verification_timeout``) takes the current lead and an input and returns
the new lead events. The caller (``consumers``, ``app``, ``scheduler``) stores them.

Event ids are derived from the input event (``stable_event_id``), so deciding twice on the
same input yields the same events and the event store drops the repeat.

Rules, in order, for each inbound message:

1. a first message creates the lead; every message is recorded (``LeadActivityRecorded``)
   with its bot signals and the resulting bot score;
2. a blocked contact: nothing else happens;
3. a message that is only a stop word opts the contact out; an opted-out contact opts back
   in only under ``Policy.opt_in_rule``, otherwise nothing else happens;
4. while a human verification is pending, the message is the answer: "SIM"/"YES" passes,
   anything else is a failed attempt; ``verification_max_failures`` failures block;
5. otherwise the rules extract facts (fields, BANT stage, score, qualification);
6. a bot score at or over ``bot_threshold`` flags the contact and asks ONE verification
   question (never twice, never to a contact that passed it);
7. a meaningful change ends with a ``LeadChanged`` snapshot for the Sheets export.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from orbion_common.events import (
    BantStageAdvanced,
    ContactBlocked,
    ContactFlaggedAsBot,
    Envelope,
    HumanVerificationFailed,
    HumanVerificationPassed,
    HumanVerificationRequested,
    LeadChanged,
    LeadCreated,
    LeadFieldsCaptured,
    LeadHandedOff,
    LeadOptedIn,
    LeadOptedOut,
    LeadQualified,
    MessageReceived,
    MessageSent,
    Payload,
    ReplyGenerated,
    stable_event_id,
)
from orbion_common.events.lead import (
    BantStageAdvancedPayload,
    ContactBlockedPayload,
    ContactFlaggedAsBotPayload,
    HumanVerificationPayload,
    LeadActivityRecorded,
    LeadActivityRecordedPayload,
    LeadChangedPayload,
    LeadCreatedPayload,
    LeadFieldsCapturedPayload,
    LeadHandedOffPayload,
    LeadOptedInPayload,
    LeadOptedOutPayload,
    LeadQualifiedPayload,
    LeadSnapshot,
)
from orbion_common.optout import OptInRule, is_opt_in, is_opt_out, normalize_word

from . import rules


class Stage(StrEnum):
    """BANT progress: the first of need -> budget -> authority -> timing not yet answered."""

    NEED = "need"
    BUDGET = "budget"
    AUTHORITY = "authority"
    TIMING = "timing"
    COMPLETE = "complete"


STAGE_ORDER = (Stage.NEED, Stage.BUDGET, Stage.AUTHORITY, Stage.TIMING, Stage.COMPLETE)


class Agent(StrEnum):
    SDR = "sdr"
    SPECIALIST = "specialist"
    SCHEDULER = "scheduler"


class Status(StrEnum):
    ACTIVE = "active"
    QUALIFIED = "qualified"
    VERIFYING = "verifying"
    HANDED_OFF = "handed_off"
    OPTED_OUT = "opted_out"
    BLOCKED = "blocked"


# Weight of each BANT field in the overall score (sums to 100).
SCORE_WEIGHTS = {"need": 30, "budget": 25, "authority": 25, "timing": 20}
# A field counts as answered (the stage moves past it) from this stage score.
STAGE_PASS_SCORE = 50
# Fields the lead keeps (from rules or LLM); others are ignored.
KNOWN_FIELDS = frozenset({"need", "budget", "authority", "timing", "company", "sector", "name", "language"})
# Fingerprints of recent inbound texts kept to spot repeats.
RECENT_DIGESTS = 5
# Bot signals kept as the reasons given when the contact is flagged.
RECENT_SIGNALS = 10

# Bot signal weights: an auto-responder phrase alone almost reaches the threshold; the other
# signals need to repeat. A clean message lowers the score, so a long human chat never drifts up.
BOT_POINTS = {"pattern": 40, "quick_replies": 25, "repeated_message": 20, "throttled": 20}
BOT_DECAY = 10

VERIFICATION_QUESTION = (
    "Para continuarmos, confirme que você é uma pessoa: responda SIM. "
    "/ To continue, please confirm you are a person: reply YES."
)


@dataclass(frozen=True)
class Policy:
    """The configurable part of the rules (from ``Settings``)."""

    qualify_threshold: int = 70
    bot_threshold: int = 60
    quick_reply_seconds: float = 2.0
    verification_timeout_seconds: float = 60.0
    verification_max_failures: int = 2
    verification_question: str = VERIFICATION_QUESTION
    opt_in_rule: OptInRule = OptInRule.KEYWORD


class Verification(BaseModel):
    model_config = ConfigDict(frozen=True)

    pending: bool = False
    passed: bool = False
    failures: int = 0
    requested_at: datetime | None = None
    expires_at: datetime | None = None


class Lead(BaseModel):
    """A lead's state: the fold of its events. ``version`` is its event-stream version."""

    model_config = ConfigDict(frozen=True)

    phone: str
    version: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None
    profile_name: str = ""
    origin: str = "whatsapp"
    fields: dict[str, str] = Field(default_factory=dict)
    field_sources: dict[str, str] = Field(default_factory=dict)
    stage: Stage = Stage.NEED
    stage_scores: dict[str, int] = Field(default_factory=dict)
    score: int = 0
    agent: Agent = Agent.SDR
    qualified: bool = False
    handed_off: bool = False
    handed_off_to: str = ""
    opted_out: bool = False
    blocked: bool = False
    block_reasons: list[str] = Field(default_factory=list)
    messages_in: int = 0
    messages_out: int = 0
    last_in_at: datetime | None = None
    last_out_at: datetime | None = None
    recent_digests: list[str] = Field(default_factory=list)
    quick_streak: int = 0
    recent_signals: list[str] = Field(default_factory=list)
    bot_score: int = 0
    flagged_bot: bool = False
    bot_reasons: list[str] = Field(default_factory=list)
    verification: Verification = Field(default_factory=Verification)

    @property
    def exists(self) -> bool:
        return self.created_at is not None

    @property
    def status(self) -> Status:
        if self.blocked:
            return Status.BLOCKED
        if self.opted_out:
            return Status.OPTED_OUT
        if self.handed_off:
            return Status.HANDED_OFF
        if self.verification.pending:
            return Status.VERIFYING
        if self.qualified:
            return Status.QUALIFIED
        return Status.ACTIVE

    @property
    def agent_replies(self) -> bool:
        """Whether the AI agent may answer this contact now."""
        return self.status in (Status.ACTIVE, Status.QUALIFIED)

    def snapshot(self) -> LeadSnapshot:
        return LeadSnapshot(
            phone=self.phone,
            name=self.fields.get("name") or self.profile_name,
            company=self.fields.get("company", ""),
            sector=self.fields.get("sector", ""),
            stage=self.stage.value,
            agent=self.agent.value,
            need=self.fields.get("need", ""),
            budget=self.fields.get("budget", ""),
            authority=self.fields.get("authority", ""),
            timing=self.fields.get("timing", ""),
            score=self.score,
            origin=self.origin,
            message_count=self.messages_in + self.messages_out,
            status=self.status.value,
            version=self.version,
            qualified=self.qualified,
            bot_score=self.bot_score,
            updated_at=self.updated_at,
        )


# --- fold ---------------------------------------------------------------------------------------


def evolve(lead: Lead, event: Envelope) -> Lead:
    """The lead after ``event``. Events of other types only move the version."""
    changes: dict[str, object] = {"version": lead.version + 1, "updated_at": event.occurred_at}
    p = event.payload
    if isinstance(event, LeadCreated):
        changes |= {"created_at": event.occurred_at, "profile_name": p.profile_name, "origin": p.origin}
    elif isinstance(event, LeadActivityRecorded):
        changes |= _activity_changes(lead, p)
    elif isinstance(event, LeadFieldsCaptured):
        fields = {**lead.fields, **p.fields}
        scores = _stage_scores(fields)
        changes |= {
            "fields": fields,
            "field_sources": {**lead.field_sources, **dict.fromkeys(p.fields, p.source)},
            "stage_scores": scores,
            "score": _score(scores),
        }
    elif isinstance(event, BantStageAdvanced):
        changes |= {"stage": Stage(p.to_stage), "agent": Agent(p.agent)}
    elif isinstance(event, LeadQualified):
        changes |= {"qualified": True, "agent": Agent.SCHEDULER}
    elif isinstance(event, LeadHandedOff):
        changes |= {"handed_off": True, "handed_off_to": p.to}
    elif isinstance(event, LeadOptedOut):
        changes |= {"opted_out": True}
    elif isinstance(event, LeadOptedIn):
        changes |= {"opted_out": False}
    elif isinstance(event, ContactFlaggedAsBot):
        changes |= {"flagged_bot": True, "bot_reasons": list(p.reasons)}
    elif isinstance(event, HumanVerificationRequested):
        changes["verification"] = Verification(
            pending=True, requested_at=event.occurred_at, expires_at=p.expires_at
        )
    elif isinstance(event, HumanVerificationPassed):
        changes |= {
            "verification": lead.verification.model_copy(update={"pending": False, "passed": True}),
            "bot_score": 0,
        }
    elif isinstance(event, HumanVerificationFailed):
        changes["verification"] = lead.verification.model_copy(update={"failures": p.attempt})
    elif isinstance(event, ContactBlocked):
        changes |= {
            "blocked": True,
            "block_reasons": list(p.reasons),
            "verification": lead.verification.model_copy(update={"pending": False}),
        }
    return lead.model_copy(update=changes)


def _activity_changes(lead: Lead, p: LeadActivityRecordedPayload) -> dict[str, object]:
    if p.direction == "out":
        return {"messages_out": lead.messages_out + 1, "last_out_at": p.at}
    digests = lead.recent_digests
    if p.text_digest:
        digests = [*digests, p.text_digest][-RECENT_DIGESTS:]
    return {
        "messages_in": lead.messages_in + 1,
        "last_in_at": p.at,
        "recent_digests": digests,
        "quick_streak": lead.quick_streak + 1 if p.quick else 0,
        "recent_signals": [*lead.recent_signals, *p.signals][-RECENT_SIGNALS:],
        "bot_score": p.bot_score,
    }


def replay(phone: str, events: Iterable[Envelope]) -> Lead:
    """The lead built from its whole history."""
    lead = Lead(phone=phone)
    for event in events:
        lead = evolve(lead, event)
    return lead


def _stage_scores(fields: dict[str, str]) -> dict[str, int]:
    return {name: rules.stage_score(name, fields[name]) for name in rules.BANT if fields.get(name)}


def _score(stage_scores: dict[str, int]) -> int:
    return round(sum(weight * stage_scores.get(name, 0) / 100 for name, weight in SCORE_WEIGHTS.items()))


# --- decisions ----------------------------------------------------------------------------------


class Decision(list[Envelope]):
    """The events of a decision, in order; ``lead`` is the lead after them (None: not computed).

    A list, so callers that only need the events use it as one; the recorder takes ``lead``
    rather than folding the same events a second time.
    """

    lead: Lead | None = None


def _derived_id(cause_id: str, salt: str, index: int, kind: str) -> str:
    """A deterministic event id (32 hex digits, like ``stable_event_id``), cheaper than a uuid5."""
    key = f"lead/{cause_id}/{salt}/{index}/{kind}".encode()
    return hashlib.blake2b(key, digest_size=16).hexdigest()


def _decided(events: list[Envelope], lead: Lead) -> Decision:
    decision = Decision(events)
    decision.lead = lead
    return decision


class _Decision:
    """Accumulates the events of one decision, folding each into the lead as it goes."""

    def __init__(self, lead: Lead, cause: Envelope, salt: str = "") -> None:
        self.lead = lead
        self.cause = cause
        self.salt = salt
        self.events: list[Envelope] = []
        self.meaningful = False

    def add(self, cls: type[Envelope], payload: Payload, *, meaningful: bool = True) -> None:
        event_id = _derived_id(self.cause.event_id, self.salt, len(self.events), cls.__name__)
        # The cause's time, not the clock: deciding again on the same input gives the same events.
        event = cls.create(
            self.lead.phone,
            payload,
            cause=self.cause,
            event_id=event_id,
            occurred_at=self.cause.occurred_at,
        )
        self.events.append(event)
        self.lead = evolve(self.lead, event)
        self.meaningful = self.meaningful or meaningful

    def create_if_new(self, profile_name: str = "") -> None:
        """The lead's first event, whichever of its inputs comes first (a send may overtake
        the inbound message that caused it)."""
        if not self.lead.exists:
            self.add(LeadCreated, LeadCreatedPayload(phone=self.lead.phone, profile_name=profile_name))

    def finish(self) -> Decision:
        if self.meaningful:
            snapshot = self.lead.snapshot().model_copy(update={"version": self.lead.version + 1})
            self.add(LeadChanged, LeadChangedPayload(snapshot=snapshot), meaningful=False)
        return _decided(self.events, self.lead)


def on_message_received(lead: Lead, msg: MessageReceived, policy: Policy = Policy()) -> Decision:
    """A contact wrote (see the module docstring for the rules, in order)."""
    p = msg.payload
    d = _Decision(lead, msg)
    if p.from_me:  # our own number wrote from another device: an outbound message
        if lead.exists:
            d.add(
                LeadActivityRecorded,
                _activity(lead.phone, "out", p.provider_message_id, p.kind, msg.occurred_at),
                meaningful=False,
            )
        return _decided(d.events, d.lead)
    d.create_if_new(p.profile_name)
    text = _text_of(msg)
    _record_inbound(d, msg, text, policy)
    if d.lead.blocked:
        return d.finish()
    if is_opt_out(text):
        if not d.lead.opted_out:
            d.add(
                LeadOptedOut,
                LeadOptedOutPayload(
                    phone=lead.phone, message_id=p.provider_message_id, word=normalize_word(text)
                ),
            )
        return d.finish()
    if d.lead.opted_out:
        if not is_opt_in(text, policy.opt_in_rule):
            return d.finish()
        d.add(LeadOptedIn, LeadOptedInPayload(phone=lead.phone, message_id=p.provider_message_id))
    if d.lead.verification.pending:
        _answer_verification(d, text, policy)
        return d.finish()
    _capture(d, rules.extract_facts(text), "rules", policy)
    _maybe_verify(d, policy)
    return d.finish()


def on_reply_generated(lead: Lead, reply: ReplyGenerated, policy: Policy = Policy()) -> Decision:
    """The LLM answered and extracted structured facts alongside its reply."""
    d = _Decision(lead, reply)
    d.create_if_new()
    if lead.blocked:
        return d.finish()
    facts = reply.payload.facts.model_dump()
    _capture(
        d,
        {k: str(v).strip() for k, v in facts.items() if k in KNOWN_FIELDS and str(v).strip()},
        "llm",
        policy,
    )
    return d.finish()


def on_message_sent(lead: Lead, sent: MessageSent) -> Decision:
    """We sent a message: counts, and the clock for the quick-reply signal.

    A send can be handled before the inbound message that caused it (another replica may still
    be committing that one): it creates the lead rather than being dropped, because a decision
    that appends nothing would not conflict with that commit and the send would never be counted.
    """
    p = sent.payload
    d = _Decision(lead, sent)
    d.create_if_new()
    d.add(
        LeadActivityRecorded,
        _activity(lead.phone, "out", p.provider_message_id, "text", sent.occurred_at),
        meaningful=False,
    )
    return _decided(d.events, d.lead)


class LeadNotFound(LookupError):
    pass


def hand_off(lead: Lead, *, to: str, reason: str, request_id: str, at: datetime) -> Decision:
    """A human takes over: the agent stops replying. Asking again changes nothing.

    ``request_id`` identifies the request (a retried request decides the same event ids).
    """
    if not lead.exists:
        raise LeadNotFound(lead.phone)
    if lead.handed_off:
        return Decision()
    d = _Decision(lead, _Origin.of(lead.phone, f"handoff/{request_id}", at), salt="handoff")
    d.add(LeadHandedOff, LeadHandedOffPayload(phone=lead.phone, to=to, reason=reason))
    return d.finish()


def on_verification_timeout(lead: Lead, now: datetime) -> Decision:
    """The verification window passed: an unanswered (or unpassed) verification blocks the contact."""
    v = lead.verification
    if not v.pending or v.expires_at is None or now < v.expires_at:
        return Decision()
    # The deadline, not ``now``, dates the decision: every timer run decides the same events.
    cause = _Origin.of(lead.phone, f"verification-timeout/{v.expires_at.isoformat()}", v.expires_at)
    d = _Decision(lead, cause, salt="timeout")
    attempt = v.failures + 1
    d.add(
        HumanVerificationFailed, HumanVerificationPayload(phone=lead.phone, attempt=attempt, reason="timeout")
    )
    d.add(
        ContactBlocked,
        ContactBlockedPayload(phone=lead.phone, reasons=["verification_timeout", *lead.bot_reasons]),
    )
    return d.finish()


class _Origin(Envelope):
    """A stand-in cause for decisions that no event triggered (an API call, a timer)."""

    type: str = "_Origin"
    payload: None = None

    @classmethod
    def of(cls, phone: str, key: str, at: datetime) -> _Origin:
        eid = stable_event_id("lead-origin", phone, key)
        return cls(event_id=eid, stream_id=phone, correlation_id=eid, occurred_at=at)


def _text_of(msg: MessageReceived) -> str:
    p = msg.payload
    return p.text or p.reply_title or (p.media.caption if p.media else "")


def _activity(
    phone: str, direction: Literal["in", "out"], message_id: str, kind: str, at: datetime, **extra: object
) -> LeadActivityRecordedPayload:
    return LeadActivityRecordedPayload(
        phone=phone,
        direction=direction,
        message_id=message_id,
        kind=str(kind),
        at=at,
        **extra,
    )


def _record_inbound(d: _Decision, msg: MessageReceived, text: str, policy: Policy) -> None:
    lead, p = d.lead, msg.payload
    at = msg.occurred_at
    quick = lead.last_out_at is not None and timedelta(0) <= at - lead.last_out_at <= timedelta(
        seconds=policy.quick_reply_seconds
    )
    digest = rules.text_digest(text)
    signals = [f"pattern:{name}" for name in rules.bot_patterns(text)]
    if quick and lead.quick_streak >= 1:
        signals.append("quick_replies")
    if digest and digest in lead.recent_digests:
        signals.append("repeated_message")
    if p.throttled:
        signals.append("throttled")
    if signals:
        points = (BOT_POINTS["pattern"] if any(s.startswith("pattern:") for s in signals) else 0) + sum(
            BOT_POINTS[s] for s in signals if not s.startswith("pattern:")
        )
        bot_score = min(100, lead.bot_score + points)
    else:
        bot_score = max(0, lead.bot_score - BOT_DECAY)
    if lead.verification.passed:
        bot_score = 0  # a verified human is never asked again; the score would only mislead
    d.add(
        LeadActivityRecorded,
        _activity(
            lead.phone,
            "in",
            p.provider_message_id,
            p.kind,
            at,
            text_digest=digest,
            quick=quick,
            throttled=p.throttled,
            signals=signals,
            bot_score=bot_score,
        ),
        meaningful=False,
    )


def _answer_verification(d: _Decision, text: str, policy: Policy) -> None:
    phone = d.lead.phone
    if rules.is_affirmative(text):
        d.add(
            HumanVerificationPassed,
            HumanVerificationPayload(phone=phone, attempt=d.lead.verification.failures, reason="answered"),
        )
        return
    attempt = d.lead.verification.failures + 1
    d.add(
        HumanVerificationFailed, HumanVerificationPayload(phone=phone, attempt=attempt, reason="wrong_answer")
    )
    if attempt >= policy.verification_max_failures:
        d.add(
            ContactBlocked,
            ContactBlockedPayload(phone=phone, reasons=["verification_failed", *d.lead.bot_reasons]),
        )


def _capture(d: _Decision, found: dict[str, str], source: Literal["rules", "llm"], policy: Policy) -> None:
    lead = d.lead
    # The LLM reads the whole conversation and may correct anything; keyword rules only
    # fill blanks, so they never overwrite what the LLM understood.
    new = {
        k: v
        for k, v in found.items()
        if k in KNOWN_FIELDS and v and lead.fields.get(k) != v and (source == "llm" or not lead.fields.get(k))
    }
    if not new:
        return
    d.add(LeadFieldsCaptured, LeadFieldsCapturedPayload(phone=lead.phone, fields=new, source=source))
    lead = d.lead
    target = _stage_for(lead.stage_scores)
    if STAGE_ORDER.index(target) > STAGE_ORDER.index(lead.stage):
        agent = Agent.SCHEDULER if lead.qualified or target is Stage.COMPLETE else _agent_for(target)
        d.add(
            BantStageAdvanced,
            BantStageAdvancedPayload(
                phone=lead.phone,
                from_stage=lead.stage.value,
                to_stage=target.value,
                stage_score=lead.stage_scores.get(lead.stage.value, 0),
                score=lead.score,
                agent=agent.value,
            ),
        )
    if not d.lead.qualified and d.lead.score >= policy.qualify_threshold:
        d.add(
            LeadQualified,
            LeadQualifiedPayload(phone=lead.phone, score=d.lead.score, threshold=policy.qualify_threshold),
        )


def _stage_for(scores: dict[str, int]) -> Stage:
    for stage in STAGE_ORDER[:-1]:
        if scores.get(stage.value, 0) < STAGE_PASS_SCORE:
            return stage
    return Stage.COMPLETE


def _agent_for(stage: Stage) -> Agent:
    return Agent.SDR if stage in (Stage.NEED, Stage.BUDGET) else Agent.SPECIALIST


def _maybe_verify(d: _Decision, policy: Policy) -> None:
    lead = d.lead
    if (
        lead.bot_score < policy.bot_threshold
        or lead.flagged_bot
        or lead.verification.passed
        or lead.handed_off
    ):
        return
    reasons = sorted(set(lead.recent_signals)) or ["bot_score"]
    d.add(
        ContactFlaggedAsBot,
        ContactFlaggedAsBotPayload(phone=lead.phone, bot_score=lead.bot_score, reasons=reasons),
    )
    expires = d.cause.occurred_at + timedelta(seconds=policy.verification_timeout_seconds)
    d.add(
        HumanVerificationRequested,
        HumanVerificationPayload(
            phone=lead.phone,
            attempt=0,
            reason=",".join(reasons),
            question=policy.verification_question,
            expires_at=expires,
        ),
    )
