"""WhatsApp Cloud API (Meta) webhook JSON → normalised messages and statuses. Pure, no I/O.

One webhook may carry several entries, changes, messages and statuses: each becomes its own
event. A malformed message or status is rejected alone (dead-lettered by the caller); a
malformed envelope raises :class:`MalformedWebhook`. Changes of other fields than
``messages`` are counted as ignored, never refused (Meta would retry them for days).
"""

from __future__ import annotations

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
    ProviderError,
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

PROVIDER = Provider.CLOUD_API
OBJECT = "whatsapp_business_account"
_MEDIA_KINDS = {
    "image": MessageKind.IMAGE,
    "audio": MessageKind.AUDIO,
    "voice": MessageKind.AUDIO,
    "video": MessageKind.VIDEO,
    "document": MessageKind.DOCUMENT,
    "sticker": MessageKind.STICKER,
}
_STATUSES = {s.value: s for s in DeliveryStatus}


def parse(body: object) -> ParsedWebhook:
    """Parse a decoded webhook body; raises :class:`MalformedWebhook` if it is not one."""
    if not isinstance(body, dict):
        raise MalformedWebhook("body is not a JSON object")
    if body.get("object") != OBJECT:
        raise MalformedWebhook(f"object is not {OBJECT!r}")
    entries = body.get("entry")
    if not isinstance(entries, list):
        raise MalformedWebhook("entry is not a list")
    out = ParsedWebhook()
    for entry in entries:
        changes = entry.get("changes") if isinstance(entry, dict) else None
        if not isinstance(changes, list):
            out.rejected.append(Rejected("entry without a changes list", entry))
            continue
        for change in changes:
            _parse_change(change, out)
    return out


def _parse_change(change: object, out: ParsedWebhook) -> None:
    if not isinstance(change, dict) or not isinstance(change.get("value"), dict):
        out.rejected.append(Rejected("change without a value object", change))
        return
    if change.get("field") != "messages":
        out.ignored += 1
        return
    value: dict[str, object] = change["value"]
    metadata = value.get("metadata")
    business = ""
    if isinstance(metadata, dict) and isinstance(metadata.get("phone_number_id"), str):
        business = metadata["phone_number_id"]
    profiles = _profiles(value.get("contacts"))
    messages = value.get("messages") or []
    statuses = value.get("statuses") or []
    if not isinstance(messages, list) or not isinstance(statuses, list):
        out.rejected.append(Rejected("messages or statuses is not a list", value))
        return
    for raw in messages:
        try:
            payload = _message(raw, business, profiles)
        except (BadItem, ValidationError, ValueError, TypeError) as exc:
            out.rejected.append(Rejected(f"bad message: {_short(exc)}", raw))
            continue
        wamid = payload.provider_message_id
        out.messages.append(ParsedMessage(payload, stable_event_id(PROVIDER.value, wamid), wamid))
    for raw in statuses:
        try:
            status = _status(raw)
        except (BadItem, ValidationError, ValueError, TypeError) as exc:
            out.rejected.append(Rejected(f"bad status: {_short(exc)}", raw))
            continue
        key = f"{status.provider_message_id}:{status.status.value}"
        out.statuses.append(ParsedStatus(status, stable_event_id(PROVIDER.value, "status", key), key))
    if not messages and not statuses:
        out.ignored += 1  # e.g. a change that only carries value-level errors


def _profiles(contacts: object) -> dict[str, str]:
    names: dict[str, str] = {}
    if isinstance(contacts, list):
        for contact in contacts:
            if isinstance(contact, dict) and isinstance(contact.get("wa_id"), str):
                profile = contact.get("profile")
                name = profile.get("name") if isinstance(profile, dict) else None
                names[contact["wa_id"]] = name if isinstance(name, str) else ""
    return names


def _message(raw: object, business: str, profiles: dict[str, str]) -> MessageReceivedPayload:
    msg = obj(raw, "message")
    sender = req_str(msg, "from")
    raw_type = opt_str(msg, "type") or "unknown"
    fields: dict[str, object] = {}
    kind = MessageKind.UNSUPPORTED
    if raw_type == "text":
        kind = MessageKind.TEXT
        fields["text"] = opt_str(obj(msg.get("text"), "text"), "body")
    elif raw_type in _MEDIA_KINDS:
        kind = _MEDIA_KINDS[raw_type]
        media = obj(msg.get(raw_type), raw_type)
        caption = opt_str(media, "caption")
        fields["media"] = Media(
            media_id=opt_str(media, "id"),
            mime_type=opt_str(media, "mime_type"),
            caption=caption,
            filename=opt_str(media, "filename"),
            url=opt_str(media, "url"),
        )
        fields["text"] = caption
    elif raw_type == "location":
        kind = MessageKind.LOCATION
        loc = obj(msg.get("location"), "location")
        fields["location"] = Location(
            latitude=loc.get("latitude"),  # validated by pydantic
            longitude=loc.get("longitude"),
            name=opt_str(loc, "name"),
            address=opt_str(loc, "address"),
        )
    elif raw_type == "contacts":
        kind = MessageKind.CONTACTS
        cards = msg.get("contacts")
        if not isinstance(cards, list) or not all(isinstance(c, dict) for c in cards):
            raise BadItem("contacts is not a list of objects")
        fields["contacts"] = cards
    elif raw_type == "interactive":
        kind = MessageKind.INTERACTIVE
        fields.update(_interactive(obj(msg.get("interactive"), "interactive")))
    elif raw_type == "button":
        kind = MessageKind.BUTTON
        button = obj(msg.get("button"), "button")
        fields["reply_id"] = opt_str(button, "payload")
        fields["reply_title"] = fields["text"] = opt_str(button, "text")
    elif raw_type == "reaction":
        kind = MessageKind.REACTION
        reaction = obj(msg.get("reaction"), "reaction")
        fields["reaction_emoji"] = opt_str(reaction, "emoji")  # absent when a reaction is removed
        fields["context_message_id"] = opt_str(reaction, "message_id")
    context = opt_obj(msg, "context")
    if context and "context_message_id" not in fields:
        fields["context_message_id"] = opt_str(context, "id")
    return MessageReceivedPayload(
        provider=PROVIDER,
        provider_message_id=req_str(msg, "id"),
        phone=phone_digits(sender),
        business_number_id=business,
        profile_name=profiles.get(sender, ""),
        kind=kind,
        sent_at=epoch(msg.get("timestamp")),
        raw_type=raw_type,
        **fields,
    )


def _interactive(inter: dict[str, object]) -> dict[str, object]:
    itype = opt_str(inter, "type")
    if itype in ("button_reply", "list_reply"):
        reply = obj(inter.get(itype), itype)
        title = opt_str(reply, "title")
        return {"reply_id": opt_str(reply, "id"), "reply_title": title, "text": title}
    if itype == "nfm_reply":  # a WhatsApp Flow answer: its JSON is the useful part
        reply = obj(inter.get("nfm_reply"), "nfm_reply")
        return {"reply_title": opt_str(reply, "name"), "text": opt_str(reply, "response_json")}
    return {}


def _status(raw: object) -> MessageStatusChangedPayload:
    st = obj(raw, "status")
    name = req_str(st, "status")
    if name not in _STATUSES:
        raise BadItem(f"unknown status {name[:20]!r}")
    errors = st.get("errors") or []
    if not isinstance(errors, list):
        raise BadItem("errors is not a list")
    return MessageStatusChangedPayload(
        provider=PROVIDER,
        provider_message_id=req_str(st, "id"),
        phone=phone_digits(req_str(st, "recipient_id")),
        status=_STATUSES[name],
        changed_at=epoch(st.get("timestamp")),
        errors=[_error(e) for e in errors],
    )


def _error(raw: object) -> ProviderError:
    err = obj(raw, "error")
    code = err.get("code")
    data = err.get("error_data")
    detail = opt_str(data, "details") if isinstance(data, dict) else ""
    return ProviderError(
        code=code if isinstance(code, int) and not isinstance(code, bool) else None,
        title=opt_str(err, "title") or opt_str(err, "message"),
        detail=detail,
    )


def _short(exc: Exception) -> str:
    return str(exc).splitlines()[0][:200]
