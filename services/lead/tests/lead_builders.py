"""Builders for the events the lead service consumes, shared by its tests."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import SecretStr
from redis.asyncio import Redis

from orbion_common.events import MessageReceived, MessageSent, ReplyGenerated, stable_event_id
from orbion_common.events.messaging import (
    LeadFacts,
    MessageKind,
    MessageReceivedPayload,
    MessageSentPayload,
    Provider,
    ReplyGeneratedPayload,
)
from orbion_lead.settings import Settings

API_KEY = "lead-test-key"
T0 = datetime(2026, 1, 5, 12, 0, 0, tzinfo=UTC)


def new_phone() -> str:
    """A phone number no other test uses (E.164 digits)."""
    return "55119" + str(uuid.uuid4().int)[:8]


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def inbound(
    phone: str,
    text: str,
    *,
    when: datetime = T0,
    throttled: bool = False,
    profile_name: str = "Ana",
    message_id: str | None = None,
) -> MessageReceived:
    mid = message_id or "wamid." + uuid.uuid4().hex
    return MessageReceived.create(
        phone,
        MessageReceivedPayload(
            provider=Provider.CLOUD_API,
            provider_message_id=mid,
            phone=phone,
            profile_name=profile_name,
            kind=MessageKind.TEXT,
            text=text,
            sent_at=when,
            throttled=throttled,
        ),
        event_id=stable_event_id("wa", mid),
        occurred_at=when,
    )


def sent(phone: str, *, when: datetime = T0, text: str = "Olá! Como posso ajudar?") -> MessageSent:
    return MessageSent.create(
        phone,
        MessageSentPayload(
            reply_key=uuid.uuid4().hex,
            phone=phone,
            provider_message_id="wamid." + uuid.uuid4().hex,
            text=text,
        ),
        occurred_at=when,
    )


def reply(phone: str, *, when: datetime = T0, **facts: str) -> ReplyGenerated:
    return ReplyGenerated.create(
        phone,
        ReplyGeneratedPayload(
            reply_key=uuid.uuid4().hex, phone=phone, text="Entendi!", facts=LeadFacts(**facts)
        ),
        occurred_at=when,
    )


def lead_settings(pg_url: str, redis_url: str = "", nats_url: str = "", **overrides: Any) -> Settings:
    """Settings for a test: its servers, one API key, a small pool, plus ``overrides``."""
    return Settings(
        database_url=pg_url,
        redis_url=redis_url,
        nats_url=nats_url,
        api_keys=[SecretStr(API_KEY)],
        db_pool_max=8,
        **overrides,
    )


async def drop_test_keys(redis: Redis | None, schema: str) -> None:
    """Delete the Redis keys a test made under its own ``test:<schema>:`` prefix."""
    if redis is None:
        return
    keys = [k async for k in redis.scan_iter(match=f"test:{schema}:*", count=1000)]
    if keys:
        await redis.delete(*keys)
