"""HTTP API of the llm-proxy: probes (via orbion_common.service), the outbox and reply lookups."""

from __future__ import annotations

import asyncio
import re
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Query

from orbion_common.auth import ApiKey
from orbion_common.health import bus_check, postgres_check

from . import store
from .deps import Deps

_PHONE = re.compile(r"^\d{8,15}$")


def create_app(deps: Deps) -> FastAPI:
    from orbion_common.service import create_service_app

    settings = deps.settings

    probes: set[asyncio.Task[None]] = set()

    async def openai_reachability() -> object:
        # Informational: never raises and never waits for OpenAI (the readiness timeout is short),
        # so an OpenAI outage does not make the service unready. The probe runs in the background
        # at most once per ORBION_CONNECTIVITY_PROBE_SECONDS; this answer shows the last result.
        if not probes:
            task = asyncio.create_task(deps.responder.probe())
            probes.add(task)
            task.add_done_callback(probes.discard)
        return deps.responder.info()

    checks: dict[str, Any] = {"postgres": postgres_check(deps.pool), "openai": openai_reachability}
    if deps.bus is not None:
        checks["nats"] = bus_check(deps.bus)

    def info() -> dict[str, object]:
        return {
            "reply_mode": deps.responder.mode,
            "fallback_only": deps.responder.mode == "fallback",
            "send_via": deps.sender.via,
            "sender_leader": deps.sender.leader,
            "sheets": deps.exporter.info() if deps.exporter is not None else "disabled",
            "breakers": {name: b.info() for name, b in deps.breakers.items()},
        }

    app = create_service_app("llm-proxy", settings, checks=checks, info=info)
    app.state.deps = deps

    @app.get("/api/outbox")
    async def outbox(
        _key: ApiKey,
        phone: Annotated[str | None, Query(description="Only this contact (E.164 digits)")] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
    ) -> dict[str, Any]:
        """Replies written to the local outbox (no WhatsApp provider configured), newest first."""
        if phone is not None:
            phone = phone.lstrip("+")
            if not _PHONE.match(phone):
                raise HTTPException(
                    400, detail={"type": "invalid_phone", "detail": "phone must be 8-15 digits"}
                )
        async with deps.pool.acquire() as conn:
            rows = await store.list_outbox(conn, phone=phone, limit=limit)
        return {"messages": [{**r, "created_at": r["created_at"].isoformat()} for r in rows]}

    @app.get("/api/replies/{reply_key}")
    async def reply(_key: ApiKey, reply_key: str) -> dict[str, Any]:
        """One reply's text and send progress."""
        if len(reply_key) > 300:
            raise HTTPException(400, detail={"type": "invalid_reply_key"})
        async with deps.pool.acquire() as conn:
            row = await store.get_reply(conn, reply_key)
        if row is None:
            raise HTTPException(404, detail={"type": "not_found", "detail": "no such reply"})
        data = dict(vars(row))
        data["next_attempt_at"] = row.next_attempt_at.isoformat()
        data["created_at"] = row.created_at.isoformat()
        return data

    @app.get("/api/breakers")
    async def breakers(_key: ApiKey) -> dict[str, Any]:
        return {name: b.info() for name, b in deps.breakers.items()}

    return app
