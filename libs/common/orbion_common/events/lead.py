"""Events about a contact as a sales lead, owned by the lead service. ``stream_id`` is the phone."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from .envelope import Envelope, Payload


class LeadCreatedPayload(Payload):
    phone: str
    profile_name: str = ""
    origin: str = "whatsapp"


class LeadCreated(Envelope):
    type: Literal["LeadCreated"] = "LeadCreated"
    payload: LeadCreatedPayload


class LeadFieldsCapturedPayload(Payload):
    phone: str
    fields: dict[str, str]
    source: Literal["rules", "llm", "operator"] = "rules"


class LeadFieldsCaptured(Envelope):
    type: Literal["LeadFieldsCaptured"] = "LeadFieldsCaptured"
    payload: LeadFieldsCapturedPayload


class BantStageAdvancedPayload(Payload):
    phone: str
    from_stage: str
    to_stage: str
    stage_score: int = 0
    score: int = 0
    agent: str = "sdr"


class BantStageAdvanced(Envelope):
    type: Literal["BantStageAdvanced"] = "BantStageAdvanced"
    payload: BantStageAdvancedPayload


class LeadQualifiedPayload(Payload):
    phone: str
    score: int
    threshold: int


class LeadQualified(Envelope):
    type: Literal["LeadQualified"] = "LeadQualified"
    payload: LeadQualifiedPayload


class LeadHandedOffPayload(Payload):
    phone: str
    to: str = "human"
    reason: str = ""


class LeadHandedOff(Envelope):
    type: Literal["LeadHandedOff"] = "LeadHandedOff"
    payload: LeadHandedOffPayload


class LeadOptedOutPayload(Payload):
    phone: str
    message_id: str = ""
    word: str = ""


class LeadOptedOut(Envelope):
    type: Literal["LeadOptedOut"] = "LeadOptedOut"
    payload: LeadOptedOutPayload


class LeadOptedInPayload(Payload):
    phone: str
    message_id: str = ""


class LeadOptedIn(Envelope):
    type: Literal["LeadOptedIn"] = "LeadOptedIn"
    payload: LeadOptedInPayload


class ContactFlaggedAsBotPayload(Payload):
    phone: str
    bot_score: int
    reasons: list[str] = Field(default_factory=list)


class ContactFlaggedAsBot(Envelope):
    type: Literal["ContactFlaggedAsBot"] = "ContactFlaggedAsBot"
    payload: ContactFlaggedAsBotPayload


class HumanVerificationPayload(Payload):
    """``question`` (on Requested) is the text to send the contact as a WhatsApp message.

    ``attempt`` counts failed answers so far; ``expires_at`` is when an unanswered request fails.
    """

    phone: str
    attempt: int = 0
    reason: str = ""
    question: str = ""
    expires_at: datetime | None = None


class HumanVerificationRequested(Envelope):
    type: Literal["HumanVerificationRequested"] = "HumanVerificationRequested"
    payload: HumanVerificationPayload


class HumanVerificationPassed(Envelope):
    type: Literal["HumanVerificationPassed"] = "HumanVerificationPassed"
    payload: HumanVerificationPayload


class HumanVerificationFailed(Envelope):
    type: Literal["HumanVerificationFailed"] = "HumanVerificationFailed"
    payload: HumanVerificationPayload


class ContactBlockedPayload(Payload):
    phone: str
    reasons: list[str] = Field(default_factory=list)


class ContactBlocked(Envelope):
    type: Literal["ContactBlocked"] = "ContactBlocked"
    payload: ContactBlockedPayload


class LeadActivityRecordedPayload(Payload):
    """One message in or out, as the lead sees it: counts, timing and bot signals.

    ``quick`` marks an inbound reply that came within the quick-reply window of our last
    message; ``signals`` are the bot signals this message raised and ``bot_score`` the
    contact's bot score after it. ``text_digest`` fingerprints the text (repeats), never the text.
    """

    phone: str
    direction: Literal["in", "out"]
    message_id: str = ""
    kind: str = "text"
    at: datetime
    text_digest: str = ""
    quick: bool = False
    throttled: bool = False
    signals: list[str] = Field(default_factory=list)
    bot_score: int = 0


class LeadActivityRecorded(Envelope):
    type: Literal["LeadActivityRecorded"] = "LeadActivityRecorded"
    payload: LeadActivityRecordedPayload


class LeadSnapshot(Payload):
    """The lead as the Google Sheets export needs it (latest state wins)."""

    phone: str
    name: str = ""
    company: str = ""
    sector: str = ""
    stage: str = ""
    agent: str = ""
    need: str = ""
    budget: str = ""
    authority: str = ""
    timing: str = ""
    score: int = 0
    origin: str = ""
    message_count: int = 0
    status: str = ""
    version: int = 0
    qualified: bool = False
    bot_score: int = 0
    updated_at: datetime | None = None


class LeadChangedPayload(Payload):
    snapshot: LeadSnapshot


class LeadChanged(Envelope):
    """A meaningful change of a lead, published for the export; carries the whole snapshot."""

    type: Literal["LeadChanged"] = "LeadChanged"
    payload: LeadChangedPayload
