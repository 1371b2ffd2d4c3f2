"""Evolution API webhook JSON → the same normalised messages and statuses as the Cloud API. Pure.

Envelope ``{event, instance, data, date_time, sender, apikey}``. ``messages.upsert`` carries a
Baileys message (``data.key``, ``pushName``, ``message``, ``messageType``, ``messageTimestamp``);
``messages.update`` a delivery status. Group chats and status broadcasts are ignored (the
agent talks to one person at a time); ``fromMe`` messages are published with ``from_me`` so
that nobody replies to them; a ``@lid`` chat takes the phone from ``remoteJidAlt``.
"""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import ValidationError

from orbion_common.events import stable_event_id
from orbion_common.events.messaging import (
    DeliveryStatus,
    Location,
    Media,
    MessageKind,
    MessageReceivedPayload,
    MessageStatusChangedPayload,
    Provider,
)

from .inbound import (
    BadItem,
    MalformedWebhook,
    ParsedMessage,
    ParsedStatus,
    ParsedWebhook,
    Rejected,
    epoch,
    obj,
    opt_obj,
    opt_str,
    phone_digits,
    req_str,
)

PROVIDER = Provider.EVOLUTION
_UPSERT = "messages.upsert"
_UPDATE = "messages.update"
_MEDIA = {
    "imageMessage": MessageKind.IMAGE,
    "audioMessage": MessageKind.AUDIO,
    "pttMessage": MessageKind.AUDIO,
    "videoMessage": MessageKind.VIDEO,
    "documentMessage": MessageKind.DOCUMENT,
    "documentWithCaptionMessage": MessageKind.DOCUMENT,
    "stickerMessage": MessageKind.STICKER,
}
# Baileys' WebMessageInfo status, as a name (Evolution v2) or its number (v1).
_STATUSES = {
    "ERROR": DeliveryStatus.FAILED,
    "PENDING": DeliveryStatus.PENDING,
    "SERVER_ACK": DeliveryStatus.SENT,
    "DELIVERY_ACK": DeliveryStatus.DELIVERED,
    "READ": DeliveryStatus.READ,
    "PLAYED": DeliveryStatus.READ,
    "0": DeliveryStatus.FAILED,
    "1": DeliveryStatus.PENDING,
    "2": DeliveryStatus.SENT,
    "3": DeliveryStatus.DELIVERED,
    "4": DeliveryStatus.READ,
    "5": DeliveryStatus.READ,
}
_PERSONAL = ("@s.whatsapp.net", "@c.us")


def parse(body: object) -> ParsedWebhook:
    """Parse a decoded Evolution webhook; raises :class:`MalformedWebhook` if it is not one."""
    if not isinstance(body, dict):
        raise MalformedWebhook("body is not a JSON object")
    event = body.get("event")
    if not isinstance(event, str):
        raise MalformedWebhook("event missing")
    event = event.lower().replace("_", ".")  # MESSAGES_UPSERT (webhook by events) = messages.upsert
    data = body.get("data")
    items = data if isinstance(data, list) else [data]
    out = ParsedWebhook()
    if event not in (_UPSERT, _UPDATE):
        out.ignored += 1  # connection.update, qrcode.updated, presence...: not ours to act on
        return out
    received = _date_time(body.get("date_time"))
    for raw in items:
        try:
            if event == _UPSERT:
                payload = _message(raw)
                if payload is None:
                    out.ignored += 1
                    continue
                key = payload.provider_message_id
                out.messages.append(ParsedMessage(payload, stable_event_id(PROVIDER.value, key), key))
            else:
                status = _status(raw, received)
                if status is None:
                    out.ignored += 1
                    continue
                key = f"{status.provider_message_id}:{status.status.value}"
                out.statuses.append(ParsedStatus(status, stable_event_id(PROVIDER.value, "status", key), key))
        except (BadItem, ValidationError, ValueError, TypeError) as exc:
            out.rejected.append(Rejected(f"bad {event}: {str(exc).splitlines()[0][:200]}", raw))
    return out


def _contact_phone(key: dict[str, object]) -> str | None:
    """The contact's phone from a message key; None for groups, broadcasts and newsletters."""
    jid = req_str(key, "remoteJid")
    if jid.endswith("@lid"):  # a privacy id, not a phone: the phone rides in remoteJidAlt/senderPn
        alt = opt_str(key, "remoteJidAlt") or opt_str(key, "senderPn")
        if not alt:
            raise BadItem("@lid chat without remoteJidAlt")
        jid = alt
    if not jid.endswith(_PERSONAL) and "@" in jid:
        return None
    return phone_digits(jid.split("@", 1)[0].split(":", 1)[0])


def _message(raw: object) -> MessageReceivedPayload | None:
    data = obj(raw, "data")
    key = obj(data.get("key"), "key")
    phone = _contact_phone(key)
    if phone is None:
        return None
    message = opt_obj(data, "message")
    raw_type = opt_str(data, "messageType") or next(iter(message), "unknown")
    fields: dict[str, object] = {}
    message_id = req_str(key, "id")
    kind, context = _content(message, message_id, fields)
    context_info = opt_obj(data, "contextInfo")
    return MessageReceivedPayload(
        provider=PROVIDER,
        provider_message_id=message_id,
        phone=phone,
        business_number_id=opt_str(data, "instanceId") or opt_str(data, "owner"),
        profile_name="" if key.get("fromMe") is True else opt_str(data, "pushName"),
        kind=kind,
        sent_at=epoch(data.get("messageTimestamp"), "messageTimestamp"),
        from_me=key.get("fromMe") is True,
        context_message_id=context or opt_str(context_info, "stanzaId"),
        raw_type=raw_type,
        **fields,
    )


def _content(
    message: dict[str, object], message_id: str, fields: dict[str, object]
) -> tuple[MessageKind, str]:
    """Fill ``fields`` from a Baileys message; returns its kind and the replied-to message id."""
    if "conversation" in message and isinstance(message["conversation"], str):
        fields["text"] = message["conversation"]
        return MessageKind.TEXT, ""
    if "extendedTextMessage" in message:
        ext = obj(message["extendedTextMessage"], "extendedTextMessage")
        fields["text"] = opt_str(ext, "text")
        return MessageKind.TEXT, _stanza(ext)
    for name, kind in _MEDIA.items():
        if name in message:
            media = obj(message[name], name)
            if name == "documentWithCaptionMessage":  # wraps {"message": {"documentMessage": ...}}
                inner = opt_obj(opt_obj(media, "message"), "documentMessage")
                media = inner or media
            caption = opt_str(media, "caption")
            fields["media"] = Media(
                # Evolution downloads media by message id (getBase64FromMediaMessage).
                media_id=message_id,
                mime_type=opt_str(media, "mimetype"),
                caption=caption,
                filename=opt_str(media, "fileName"),
                url=opt_str(media, "url"),
            )
            fields["text"] = caption
            return kind, _stanza(media)
    if "locationMessage" in message or "liveLocationMessage" in message:
        loc = obj(message.get("locationMessage") or message.get("liveLocationMessage"), "locationMessage")
        fields["location"] = Location(
            latitude=loc.get("degreesLatitude"),  # validated by pydantic
            longitude=loc.get("degreesLongitude"),
            name=opt_str(loc, "name"),
            address=opt_str(loc, "address"),
        )
        return MessageKind.LOCATION, ""
    if "contactMessage" in message:
        card = obj(message["contactMessage"], "contactMessage")
        fields["contacts"] = [{"name": opt_str(card, "displayName"), "vcard": opt_str(card, "vcard")}]
        return MessageKind.CONTACTS, ""
    if "contactsArrayMessage" in message:
        cards = obj(message["contactsArrayMessage"], "contactsArrayMessage").get("contacts") or []
        if not isinstance(cards, list):
            raise BadItem("contactsArrayMessage.contacts is not a list")
        fields["contacts"] = [
            {"name": opt_str(c, "displayName"), "vcard": opt_str(c, "vcard")}
            for c in (obj(c, "contact") for c in cards)
        ]
        return MessageKind.CONTACTS, ""
    if "buttonsResponseMessage" in message:
        resp = obj(message["buttonsResponseMessage"], "buttonsResponseMessage")
        title = opt_str(resp, "selectedDisplayText")
        fields.update(reply_id=opt_str(resp, "selectedButtonId"), reply_title=title, text=title)
        return MessageKind.INTERACTIVE, _stanza(resp)
    if "listResponseMessage" in message:
        resp = obj(message["listResponseMessage"], "listResponseMessage")
        title = opt_str(resp, "title")
        fields.update(
            reply_id=opt_str(opt_obj(resp, "singleSelectReply"), "selectedRowId"),
            reply_title=title,
            text=title,
        )
        return MessageKind.INTERACTIVE, _stanza(resp)
    if "templateButtonReplyMessage" in message:
        resp = obj(message["templateButtonReplyMessage"], "templateButtonReplyMessage")
        title = opt_str(resp, "selectedDisplayText")
        fields.update(reply_id=opt_str(resp, "selectedId"), reply_title=title, text=title)
        return MessageKind.BUTTON, _stanza(resp)
    if "reactionMessage" in message:
        reaction = obj(message["reactionMessage"], "reactionMessage")
        fields["reaction_emoji"] = opt_str(reaction, "text")
        return MessageKind.REACTION, opt_str(opt_obj(reaction, "key"), "id")
    return MessageKind.UNSUPPORTED, ""


def _stanza(part: dict[str, object]) -> str:
    return opt_str(opt_obj(part, "contextInfo"), "stanzaId")


def _status(raw: object, received: datetime) -> MessageStatusChangedPayload | None:
    data = obj(raw, "data")
    key = opt_obj(data, "key")  # v1 nests the key and an "update"; v2 flattens them
    update = opt_obj(data, "update")
    source = key or data
    if source.get("fromMe") is False:
        return None  # receipts of the contact's own messages: nothing we sent changed state
    phone = _contact_phone(source)
    if phone is None:
        return None
    name = opt_str(update or data, "status").upper()
    if name not in _STATUSES:
        raise BadItem(f"unknown status {name[:20]!r}")
    message_id = opt_str(key, "id") if key else (opt_str(data, "keyId") or opt_str(data, "messageId"))
    if not message_id:
        raise BadItem("status without a message id")
    return MessageStatusChangedPayload(
        provider=PROVIDER,
        provider_message_id=message_id,
        phone=phone,
        status=_STATUSES[name],
        changed_at=received,
    )


def _date_time(value: object) -> datetime:
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)
        except (ValueError, OverflowError):  # OverflowError: a time that does not exist in UTC
            pass
    return datetime.now(UTC)
