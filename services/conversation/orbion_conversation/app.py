"""HTTP API of the conversation service: history pages and active contacts. Thin: parse, call, return.

Routes (``X-API-Key``, shared rate limiter when Redis is configured):

- ``GET /api/conversations/{phone}/messages?limit=20&before=<cursor>``: newest first; from the
  Redis cache when the page lies in the newest messages, else from Postgres. 404 unknown phone.
- ``GET /api/conversations/{phone}``: the contact's summary (counts, 24 h window, silenced flags).
- ``GET /api/conversations?active_since=<ISO time>&limit=50&cursor=<cursor>``: contacts active
  since then (default: the last 24 h), most recent first.

Bad phone, limit or cursor: 422 with a message saying what to send instead.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import asyncpg
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response

from orbion_common.auth import ApiKey
from orbion_common.events import utcnow
from orbion_common.health import ReadinessCheck
from orbion_common.service import create_service_app

from . import domain
from .domain import BadCursor
from .history import History
from .settings import Settings
from .store import Projection

log = logging.getLogger(__name__)

MAX_PAGE = 100


@dataclass
class AppDeps:
    pool: asyncpg.Pool
    projection: Projection
    history: History
    checks: Mapping[str, ReadinessCheck] = field(default_factory=dict)
    info: Callable[[], Mapping[str, object] | Awaitable[Mapping[str, object]]] | None = None
    rate_limit: Callable[[Request, Response], Awaitable[None]] | None = None


def _unprocessable(detail: str) -> HTTPException:
    return HTTPException(422, detail={"type": "validation_error", "detail": detail})


def parse_phone(phone: str) -> str:
    digits = phone.removeprefix("+")
    if not (digits.isdigit() and digits.isascii() and 8 <= len(digits) <= 15):
        raise _unprocessable("phone must be the contact's number in E.164 digits, e.g. 5511999990000")
    return digits


def _cursor(value: str | None) -> tuple[datetime, int] | None:
    if value is None:
        return None
    try:
        return domain.decode_cursor(value)
    except BadCursor as exc:
        raise _unprocessable(str(exc)) from exc


def _contact_cursor(value: str | None) -> tuple[datetime, str] | None:
    if value is None:
        return None
    try:
        return domain.decode_contact_cursor(value)
    except BadCursor as exc:
        raise _unprocessable(str(exc)) from exc


def create_app(settings: Settings, deps: AppDeps) -> FastAPI:
    app = create_service_app("conversation", settings, checks=deps.checks, info=deps.info)
    guards: list[Any] = [Depends(deps.rate_limit)] if deps.rate_limit is not None else []
    router = APIRouter(prefix="/api/conversations", dependencies=guards)

    @router.get("/{phone}/messages")
    async def messages(
        phone: str,
        key: ApiKey,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="Messages per page (1-100).")] = 20,
        before: Annotated[str | None, Query(description="`next_cursor` of the previous page.")] = None,
    ) -> dict[str, Any]:
        number = parse_phone(phone)
        page = await deps.history.page(number, limit, _cursor(before))
        if page is None:
            raise HTTPException(
                404, detail={"type": "not_found", "detail": "no conversation with this phone"}
            )
        return {
            "phone": number,
            "messages": [m.to_json() for m in page],
            "next_cursor": page[-1].cursor if len(page) == limit else None,
        }

    @router.get("/{phone}")
    async def contact(phone: str, key: ApiKey) -> dict[str, Any]:
        summary = await deps.projection.load_contact(deps.pool, parse_phone(phone))
        if summary is None:
            raise HTTPException(
                404, detail={"type": "not_found", "detail": "no conversation with this phone"}
            )
        return summary.to_json(utcnow())

    @router.get("")
    async def active(
        key: ApiKey,
        active_since: Annotated[
            datetime | None, Query(description="ISO 8601 time with offset; default: 24 hours ago.")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
        cursor: Annotated[str | None, Query(description="`next_cursor` of the previous page.")] = None,
    ) -> dict[str, Any]:
        now = utcnow()
        since = active_since or now - timedelta(hours=24)
        if since.tzinfo is None:
            raise _unprocessable("active_since needs a UTC offset, e.g. 2026-11-28T12:00:00Z")
        try:
            since = since.astimezone(UTC)
        except OverflowError:
            raise _unprocessable("active_since is out of range once in UTC") from None
        rows = await deps.projection.active_contacts(deps.pool, since, limit, _contact_cursor(cursor))
        last = rows[-1] if len(rows) == limit else None
        return {
            "contacts": [c.to_json(now) for c in rows],
            "next_cursor": domain.encode_contact_cursor(last.last_activity_at, last.phone)
            if last is not None and last.last_activity_at is not None
            else None,
        }

    app.include_router(router)
    return app
