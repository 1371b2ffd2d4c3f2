"""Operational events: circuit breakers and exports. ``stream_id`` names the dependency or sheet."""

from __future__ import annotations

from typing import Literal

from .envelope import Envelope, Payload


class BreakerStateChangedPayload(Payload):
    breaker: str
    from_state: str
    to_state: str
    reason: str = ""


class BreakerStateChanged(Envelope):
    type: Literal["BreakerStateChanged"] = "BreakerStateChanged"
    payload: BreakerStateChangedPayload


class LeadExportedPayload(Payload):
    phone: str
    worksheet: str
    lead_version: int


class LeadExported(Envelope):
    type: Literal["LeadExported"] = "LeadExported"
    payload: LeadExportedPayload
