"""Builders shared by the llm-proxy tests."""

from __future__ import annotations

import random
import uuid

from orbion_common.events import ReplyRequested
from orbion_common.events.messaging import ReplyRequestedPayload


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
