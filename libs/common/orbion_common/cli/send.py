"""``orbion send``: play a WhatsApp contact against a running system and print the agent's reply.

Owns one round trip seen from outside: POST a signed Cloud API webhook to the gateway, then poll
the conversation history API until a new outbound message appears. The message shape of that
API belongs to the conversation service; this reader accepts a list or ``{"messages": [...]}``
with ``direction`` (``inbound``/``outbound``) and ``text``/``body``/``content`` per message.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import httpx
import orjson

from orbion_common.cli.webhooks import cloud_text_webhook, message_id_of, signed_headers
from orbion_common.settings import CommonSettings

APP_SECRET_ENV = "ORBION_WHATSAPP_APP_SECRET"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "send", help="send a WhatsApp text as a contact and print the agent's reply",
        description="Post a WhatsApp Cloud API text-message webhook to the gateway (signed with "
        f"{APP_SECRET_ENV} when set), then wait for the reply in the conversation history and print it. "
        "Exit code 1 when no reply arrives in time.",
    )
    parser.add_argument("text", help="message text")
    parser.add_argument("--phone", default="5511999990000", help="contact phone (default 5511999990000)")
    parser.add_argument("--name", default="", help="contact profile name (default: none)")
    parser.add_argument("--gateway", default=None, help="gateway base URL (default: from the settings)")
    parser.add_argument("--conversation", default=None,
                        help="conversation service base URL (default: from the settings)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for a reply (default 5)")
    parser.set_defaults(handler=run_send)


def _messages(payload: Any) -> list[dict[str, Any]]:
    if isinstance(payload, dict):
        payload = payload.get("messages") or payload.get("items") or payload.get("data") or []
    return [m for m in payload if isinstance(m, dict)] if isinstance(payload, list) else []


def _is_outbound(message: dict[str, Any]) -> bool:
    direction = str(message.get("direction", "")).lower()
    return direction in {"outbound", "out", "outgoing"} or message.get("role") in {"assistant", "agent"}


def _text(message: dict[str, Any]) -> str:
    for key in ("text", "body", "content"):
        value = message.get(key)
        if isinstance(value, dict):
            value = value.get("body")
        if value:
            return str(value)
    return json.dumps(message, ensure_ascii=False)


def _identity(message: dict[str, Any]) -> str:
    for key in ("event_id", "message_id", "id", "provider_message_id"):
        if message.get(key):
            return str(message[key])
    return json.dumps(message, sort_keys=True, default=str)


def _outbound_ids(client: httpx.Client, url: str, headers: dict[str, str]) -> set[str] | None:
    try:
        resp = client.get(url, headers=headers)
    except httpx.HTTPError:
        return None
    if resp.status_code == 404:
        return set()  # contact not known yet
    if resp.status_code != 200:
        return None
    return {_identity(m) for m in _messages(resp.json()) if _is_outbound(m)}


def run_send(args: argparse.Namespace) -> int:
    settings = CommonSettings()
    phone = "".join(ch for ch in args.phone if ch.isdigit())
    gateway = (args.gateway or settings.service_url("gateway")).rstrip("/")
    conversation = (args.conversation or settings.service_url("conversation")).rstrip("/")
    headers = {"X-API-Key": settings.api_keys[0].get_secret_value()} if settings.api_keys else {}
    history = f"{conversation}/api/conversations/{phone}/messages?limit=20"
    body = cloud_text_webhook(phone, args.text, profile_name=args.name)
    raw = orjson.dumps(body)
    secret = os.environ.get(APP_SECRET_ENV, "")
    deadline = time.monotonic() + args.timeout
    with httpx.Client(timeout=max(1.0, args.timeout)) as client:
        before = _outbound_ids(client, history, headers) or set()
        try:
            resp = client.post(
                f"{gateway}/webhooks/whatsapp", content=raw, headers=signed_headers(raw, secret)
            )
        except httpx.HTTPError as exc:
            reason = exc.__class__.__name__
            print(f"error: gateway at {gateway} not reachable ({reason}); is `orbion up` running?")
            return 1
        if resp.status_code >= 300:
            print(f"error: gateway answered {resp.status_code}: {resp.text[:500]}")
            return 1
        print(f"sent {message_id_of(body)} from {phone}: {args.text}", flush=True)
        while time.monotonic() < deadline:
            try:
                reply = client.get(history, headers=headers)
            except httpx.HTTPError:
                reply = None
            if reply is not None and reply.status_code == 200:
                fresh = [m for m in _messages(reply.json()) if _is_outbound(m) and _identity(m) not in before]
                if fresh:
                    print(f"reply: {_text(fresh[-1])}")
                    return 0
            elif reply is not None and reply.status_code in (401, 403):
                code = reply.status_code
                print(f"error: conversation API refused the API key ({code}); set ORBION_API_KEYS")
                return 1
            time.sleep(0.1)
    print(f"no reply within {args.timeout:g} s (history: {history})")
    return 1
