"""Builders shared by the llm-proxy tests."""

from __future__ import annotations

import random
import uuid
from typing import Any

from orbion_common.bus import Delivery
from orbion_common.events import Event, ReplyRequested
from orbion_common.events.messaging import ReplyRequestedPayload
from orbion_llm_proxy import bootstrap, store
from orbion_llm_proxy.deps import Deps

_built: list[Deps] = []


def build_deps(*args: Any, **kwargs: Any) -> Deps:
    """``bootstrap.build_deps``, remembered so that ``close_built`` closes its HTTP clients."""
    deps = bootstrap.build_deps(*args, **kwargs)
    _built.append(deps)
    return deps


async def close_built() -> None:
    """Close the OpenAI and WhatsApp clients (aiohttp sessions) of every ``build_deps`` so far."""
    while _built:
        deps = _built.pop()
        await deps.responder.aclose()
        if deps.sender.provider is not None:  # None: replies go to the local outbox
            await deps.sender.provider.aclose()


def delivery(times: int) -> Delivery:
    """What a handler is told of a JetStream message delivered ``times`` times (1: the first)."""
    return Delivery(num_delivered=times, subject="", headers={}, _msg=None)  # type: ignore[arg-type]


def new_phone() -> str:
    return "55119" + "".join(random.choice("0123456789") for _ in range(8))


def reply_requested(phone: str, text: str = "Olá, quanto custa?", **payload: object) -> ReplyRequested:
    values: dict[str, object] = {
        "reply_key": f"rk-{uuid.uuid4().hex}",
        "phone": phone,
        "inbound_message_ids": [f"wamid.IN{uuid.uuid4().hex[:10]}"],
        "reply_to_message_id": f"wamid.IN{uuid.uuid4().hex[:10]}",
        "text": text,
    }
    values.update(payload)
    return ReplyRequested.create(phone, ReplyRequestedPayload(**values))  # type: ignore[arg-type]


async def stored_events(deps: Deps, phone: str) -> list[Event]:
    """The contact's stream in the llm-proxy's event store, oldest first."""
    async with deps.pool.acquire() as conn:
        return [s.event for s in await deps.events.load_stream(conn, phone)]


async def reply_state(deps: Deps, reply_key: str) -> str:
    """The state of a stored reply ('pending', 'sending', 'sent', 'failed')."""
    async with deps.pool.acquire() as conn:
        row = await store.get_reply(conn, reply_key)
    assert row is not None
    return row.state
