"""Builders for WhatsApp Cloud API webhook bodies, and their signature.

Owns the realistic shape of a Meta "messages" webhook as the gateway receives it, so that
``orbion send``, the load tool and tests all post the same thing. Leaves parsing and
verification to the gateway.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from typing import Any

DEFAULT_PHONE_NUMBER_ID = "100000000000001"
DEFAULT_DISPLAY_NUMBER = "15550000001"
DEFAULT_WABA_ID = "200000000000001"


def new_message_id() -> str:
    """A fresh provider message id in Meta's format (``wamid.`` + opaque base64-ish text)."""
    return "wamid." + secrets.token_urlsafe(36)


def cloud_text_webhook(
    phone: str,
    text: str,
    *,
    message_id: str | None = None,
    profile_name: str = "",
    phone_number_id: str = "",
    timestamp: int | None = None,
) -> dict[str, Any]:
    """The webhook body Meta POSTs when contact ``phone`` (digits, E.164 without '+') sends ``text``."""
    wa_id = "".join(ch for ch in phone if ch.isdigit())
    return {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": DEFAULT_WABA_ID,
                "changes": [
                    {
                        "field": "messages",
                        "value": {
                            "messaging_product": "whatsapp",
                            "metadata": {
                                "display_phone_number": DEFAULT_DISPLAY_NUMBER,
                                "phone_number_id": phone_number_id or DEFAULT_PHONE_NUMBER_ID,
                            },
                            "contacts": [{"profile": {"name": profile_name}, "wa_id": wa_id}],
                            "messages": [
                                {
                                    "from": wa_id,
                                    "id": message_id or new_message_id(),
                                    "timestamp": str(int(time.time()) if timestamp is None else timestamp),
                                    "type": "text",
                                    "text": {"body": text},
                                }
                            ],
                        },
                    }
                ],
            }
        ],
    }


def message_id_of(body: dict[str, Any]) -> str:
    """The provider message id inside a body built by :func:`cloud_text_webhook`."""
    return str(body["entry"][0]["changes"][0]["value"]["messages"][0]["id"])


def sign(body: bytes, secret: str) -> str:
    """``X-Hub-Signature-256`` value for the raw ``body``: ``sha256=`` + hex HMAC-SHA256(app secret)."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def signed_headers(body: bytes, secret: str | None) -> dict[str, str]:
    """Request headers for posting ``body``; signed when an app ``secret`` is given."""
    headers = {"Content-Type": "application/json"}
    if secret:
        headers["X-Hub-Signature-256"] = sign(body, secret)
    return headers
