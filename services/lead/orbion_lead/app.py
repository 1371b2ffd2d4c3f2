"""The lead API (``X-API-Key``, rate-limited per key): read leads, their audit trail, hand off.

- ``GET /api/leads/{phone}``: the lead (from the Redis cache, Postgres when Redis is down)
- ``GET /api/leads?stage=&min_score=&agent=&status=&updated_since=&limit=&cursor=``: a page
  of leads in ``updated_at`` order, with ``next_cursor`` for the next page
- ``GET /api/leads/{phone}/events?after_version=&limit=``: the lead's events, oldest first
- ``POST /api/leads/{phone}/handoff`` ``{"to": "...", "reason": "..."}``: a human takes over;
  ``LeadHandedOff`` makes the conversation service stop requesting replies

Routes parse, call the recorder/store, return. ``build_app(settings, deps)`` so tests pass their own.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

import asyncpg
from fastapi import Depends, FastAPI, Header, HTTPException, Path, Query
from pydantic import BaseModel, Field
from redis.asyncio import Redis

from orbion_common.auth import ApiKey
from orbion_common.bus import Bus
from orbion_common.cache import describe
from orbion_common.health import bus_check, postgres_check, redis_check
from orbion_common.logging import mask_phone
from orbion_common.ratelimit import RateLimiter, Tier, limit_requests
from orbion_common.relay import Relay
from orbion_common.service import create_service_app

from . import domain
from .domain import Agent, Lead, Stage, Status
from .recorder import LeadRecorder
from .settings import Settings
from .store import LeadFilter, LeadStore, PageCursor

log = logging.getLogger(__name__)

SERVICE = "lead"
PHONE_PATTERN = r"^\+?\d{8,15}$"

Phone = Annotated[str, Path(pattern=PHONE_PATTERN, description="E.164 digits, optional leading +")]


@dataclass
class Deps:
    pool: asyncpg.Pool
    store: LeadStore
    recorder: LeadRecorder
    bus: Bus | None = None
    redis: Redis | None = None
    relay: Relay | None = None
    limiter: RateLimiter | None = None  # None: rate limits off (no Redis configured)


class HandoffRequest(BaseModel):
    to: str = Field("human", min_length=1, max_length=120, description="Who takes over (a name, a team).")
    reason: str = Field("", max_length=500)


def lead_view(lead: Lead) -> dict[str, Any]:
    """The lead as the API shows it (internal bookkeeping left out)."""
    body = lead.model_dump(mode="json", exclude={"recent_digests", "recent_signals", "quick_streak"})
    body["status"] = lead.status.value
    body["agent_replies"] = lead.agent_replies
    return body


def _digits(phone: str) -> str:
    return phone.removeprefix("+")


def build_app(settings: Settings, deps: Deps) -> FastAPI:
    checks = {"postgres": postgres_check(deps.pool)}
    if deps.bus is not None:
        checks["nats"] = bus_check(deps.bus)
    if deps.redis is not None:
        checks["redis"] = redis_check(deps.redis)

    def info() -> dict[str, object]:
        cache = deps.recorder.cache
        return {
            "cache": describe(cache) if cache is not None else {"enabled": False},
            "relay_leader": deps.relay.leader if deps.relay is not None else None,
            "qualify_threshold": settings.lead_qualify_threshold,
        }

    app = create_service_app(SERVICE, settings, checks=checks, info=info)
    guards: list[Any] = []
    if deps.limiter is not None:
        guards.append(
            Depends(
                limit_requests(
                    deps.limiter,
                    api_key=Tier("api_key", settings.rate_limit_api_key_per_minute),
                    ip=Tier("ip", settings.rate_limit_ip_per_minute),
                )
            )
        )

    @app.get("/api/leads/{phone}", dependencies=guards)
    async def get_lead(phone: Phone, key: ApiKey) -> dict[str, Any]:
        lead = await deps.recorder.get(_digits(phone))
        if lead is None:
            raise HTTPException(404, detail={"type": "lead_not_found", "detail": "no lead for this phone"})
        return lead_view(lead)

    @app.get("/api/leads", dependencies=guards)
    async def list_leads(
        key: ApiKey,
        stage: Stage | None = None,
        min_score: Annotated[int | None, Query(ge=0, le=100)] = None,
        agent: Agent | None = None,
        status: Status | None = None,
        updated_since: datetime | None = None,
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        after = None
        if cursor:
            try:
                after = PageCursor.decode(cursor)
            except ValueError:
                raise HTTPException(
                    400, detail={"type": "invalid_cursor", "detail": "unknown cursor"}
                ) from None
        if updated_since is not None and updated_since.tzinfo is None:
            updated_since = updated_since.replace(tzinfo=UTC)
        where = LeadFilter(
            stage=stage.value if stage else None,
            min_score=min_score,
            agent=agent.value if agent else None,
            status=status.value if status else None,
            updated_since=updated_since,
        )
        async with deps.pool.acquire() as conn:
            leads, next_page = await deps.store.list_leads(conn, where, after=after, limit=limit)
        return {
            "items": [lead_view(x) for x in leads],
            "next_cursor": next_page.encode() if next_page else None,
        }

    @app.get("/api/leads/{phone}/events", dependencies=guards)
    async def lead_events(
        phone: Phone,
        key: ApiKey,
        after_version: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,  # a Postgres integer
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
    ) -> dict[str, Any]:
        async with deps.pool.acquire() as conn:
            stored = await deps.store.load_events(
                conn, _digits(phone), after_version=after_version, limit=limit
            )
        if not stored and after_version == 0:
            raise HTTPException(404, detail={"type": "lead_not_found", "detail": "no lead for this phone"})
        items = [
            {"version": s.version, "position": s.position, "event": s.event.model_dump(mode="json")}
            for s in stored
        ]
        return {"items": items, "next_after_version": stored[-1].version if len(stored) == limit else None}

    @app.post("/api/leads/{phone}/handoff", dependencies=guards)
    async def handoff(
        phone: Phone,
        key: ApiKey,
        body: HandoffRequest,
        idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
    ) -> dict[str, Any]:
        digits = _digits(phone)
        request_id = idempotency_key or uuid.uuid4().hex
        try:
            result = await deps.recorder.record(
                digits,
                lambda lead: domain.hand_off(
                    lead, to=body.to, reason=body.reason, request_id=request_id, at=datetime.now(UTC)
                ),
            )
        except domain.LeadNotFound:
            raise HTTPException(
                404, detail={"type": "lead_not_found", "detail": "no lead for this phone"}
            ) from None
        assert result is not None
        log.info(
            "lead handed off", extra={"phone": mask_phone(digits), "to": body.to, "new": bool(result.events)}
        )
        return lead_view(result.lead)

    return app
