"""Pure rules: which message gets a reply, bursts, window, statuses, cursors."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from orbion_common.events import (
    ContactBlocked,
    Envelope,
    LeadHandedOff,
    LeadOptedIn,
    LeadOptedOut,
    MessageReceived,
)
from orbion_common.events.lead import (
    ContactBlockedPayload,
    LeadHandedOffPayload,
    LeadOptedInPayload,
    LeadOptedOutPayload,
)
from orbion_common.events.messaging import MessageKind, MessageReceivedPayload, Provider, quiet_period_start
from orbion_conversation import domain
from orbion_conversation.domain import ContactState, MessageItem

from .builders import blocked, verification_failed, verification_passed, verification_requested

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
PHONE = "5511999990000"


def inbound(text: str = "Olá", kind: MessageKind = MessageKind.TEXT, **kw: object) -> MessageReceivedPayload:
    return MessageReceivedPayload(
        provider=Provider.CLOUD_API,
        provider_message_id=str(kw.pop("mid", "wamid.1")),
        phone=PHONE,
        kind=kind,
        text=text,
        sent_at=T0,
        **kw,
    )


def item(key: str, direction: str, text: str, minutes: int, position: int) -> MessageItem:
    return MessageItem(
        key=key,
        phone=PHONE,
        direction=direction,
        kind="text",
        text=text,
        status="received",
        created_at=T0 + timedelta(minutes=minutes),
        position=position,
    )


def test_plain_text_from_a_contact_deserves_a_reply() -> None:
    assert domain.skip_reason(inbound("Quanto custa?"), ContactState()) is None


def test_button_reply_deserves_a_reply() -> None:
    msg = inbound("", MessageKind.BUTTON, reply_title="Quero saber mais")
    assert domain.skip_reason(msg, ContactState()) is None
    assert domain.inbound_text(msg) == "Quero saber mais"


@pytest.mark.parametrize(
    ("msg", "contact", "reason"),
    [
        (inbound(from_me=True), ContactState(), "from_me"),
        (inbound("", MessageKind.IMAGE), ContactState(), "kind:image"),
        (inbound("   "), ContactState(), "empty"),
        (inbound(throttled=True), ContactState(), "throttled"),
        (inbound(), ContactState(opted_out=True), "opted_out"),
        (inbound(), ContactState(blocked=True), "blocked"),
        (inbound(), ContactState(handed_off=True), "handed_off"),
    ],
)
def test_messages_that_get_no_reply(msg: MessageReceivedPayload, contact: ContactState, reason: str) -> None:
    assert domain.skip_reason(msg, contact) == reason


@pytest.mark.parametrize("word", ["stop", "PARAR", "Pare", " sair ", "remover", "Cancelar", "unsubscribe"])
def test_stop_word_never_gets_a_reply_and_silences_the_contact(word: str) -> None:
    assert domain.skip_reason(inbound(word), ContactState()) == "opt_out_word"
    assert domain.cancels_pending_reply(inbound(word))
    event = MessageReceived.create(PHONE, inbound(word))
    assert domain.evolve_contact(ContactState(), event).opted_out


def test_stop_word_inside_a_sentence_is_not_an_opt_out() -> None:
    assert domain.skip_reason(inbound("não quero parar de receber"), ContactState()) is None


def test_lead_events_silence_and_unsilence_a_contact() -> None:
    s = ContactState()
    s = domain.evolve_contact(s, LeadOptedOut.create(PHONE, LeadOptedOutPayload(phone=PHONE)))
    assert s.opted_out and s.silenced
    s = domain.evolve_contact(s, LeadOptedIn.create(PHONE, LeadOptedInPayload(phone=PHONE)))
    assert not s.silenced
    s = domain.evolve_contact(s, ContactBlocked.create(PHONE, ContactBlockedPayload(phone=PHONE)))
    assert s.blocked
    s2 = domain.evolve_contact(ContactState(), LeadHandedOff.create(PHONE, LeadHandedOffPayload(phone=PHONE)))
    assert s2.handed_off


def test_a_burst_collects_messages_and_restarts_the_quiet_period() -> None:
    quiet = timedelta(seconds=1.5)
    p = domain.extend_burst(None, PHONE, "m1", T0, quiet)
    p = domain.extend_burst(p, PHONE, "m2", T0 + timedelta(seconds=1), quiet)
    p = domain.extend_burst(p, PHONE, "m2", T0 + timedelta(seconds=1), quiet)  # redelivery
    assert p.inbound_ids == ("m1", "m2")
    assert p.due_at == T0 + timedelta(seconds=2.5)


def test_the_quiet_period_counts_from_the_gateways_receipt_unless_the_message_came_late() -> None:
    ms = timedelta(milliseconds=1)
    # The usual trip from the gateway (a few ms) is part of the contact's pause.
    assert quiet_period_start(T0 - 30 * ms, T0) == T0 - 30 * ms
    # A backlog or a redelivery: the rest of the burst may be queued behind it, so it waits
    # nearly the whole quiet period from now.
    assert quiet_period_start(T0 - timedelta(seconds=5), T0) == T0 - 100 * ms
    # A gateway clock running ahead delays nothing.
    assert quiet_period_start(T0 + 40 * ms, T0) == T0


def test_a_message_received_before_the_bursts_last_does_not_bring_its_due_time_forward() -> None:
    quiet = timedelta(seconds=1.5)
    p = domain.extend_burst(None, PHONE, "m1", T0, quiet)
    p = domain.extend_burst(p, PHONE, "m2", T0 - timedelta(milliseconds=50), quiet)
    assert p.inbound_ids == ("m1", "m2")
    assert p.due_at == T0 + quiet


def test_reply_key_is_stable_for_the_same_burst_and_differs_between_bursts() -> None:
    assert domain.reply_key(["m1", "m2"]) == domain.reply_key(["m1", "m2"])
    assert domain.reply_key(["m1"]) != domain.reply_key(["m1", "m2"])
    with pytest.raises(ValueError):
        domain.reply_key([])


def test_reply_request_joins_the_burst_and_excludes_it_from_history() -> None:
    recent = [
        item("a", "in", "Oi", 0, 1),
        item("r", "out", "Olá! Como posso ajudar?", 1, 2),
        item("m1", "in", "Quanto custa", 2, 3),
        item("m2", "in", "o plano pro?", 2, 4),
    ]
    payload = domain.build_reply_request(PHONE, recent[2:], reversed(recent), quiet_period_ms=1500)
    assert payload.text == "Quanto custa\no plano pro?"
    assert payload.inbound_message_ids == ["m1", "m2"]
    assert payload.reply_to_message_id == "m2"
    assert [(h.direction, h.text) for h in payload.history] == [
        ("in", "Oi"),
        ("out", "Olá! Como posso ajudar?"),
    ]
    assert payload.reply_key == domain.reply_key(["m1", "m2"])


def test_history_keeps_the_last_twenty_lines_oldest_first() -> None:
    items = [item(f"m{i}", "in", f"t{i}", i, i) for i in range(30)]
    lines = domain.history_lines(items)
    assert len(lines) == 20 and lines[0].text == "t10" and lines[-1].text == "t29"


def test_same_second_messages_keep_arrival_order() -> None:
    a, b = item("a", "in", "first", 0, 7), item("b", "in", "second", 0, 8)
    assert [h.text for h in domain.history_lines([b, a])] == ["first", "second"]


def test_late_status_never_moves_a_message_backwards() -> None:
    assert domain.newer_status("read", "delivered") == "read"
    assert domain.newer_status("sent", "delivered") == "delivered"
    assert domain.newer_status("pending", "failed") == "failed"


def test_customer_service_window_closes_after_24_hours() -> None:
    assert domain.window_open(T0, T0 + timedelta(hours=23, minutes=59))
    assert not domain.window_open(T0, T0 + timedelta(hours=24))
    assert not domain.window_open(None, T0)


def test_cursor_round_trips_and_rejects_garbage() -> None:
    at, pos = domain.decode_cursor(domain.encode_cursor(T0, 42))
    assert (at, pos) == (T0, 42)
    for bad in ["nope", "%%%", domain.encode_cursor(T0, 1)[:-3]]:
        with pytest.raises(domain.BadCursor):
            domain.decode_cursor(bad)


def test_page_before_cursor_is_strictly_older() -> None:
    items = [item(f"m{i}", "in", "x", i, i) for i in range(5)][::-1]
    page = domain.page_from(items, 2, (items[1].created_at, items[1].position))
    assert [m.key for m in page] == ["m2", "m1"]


def test_cache_item_round_trips() -> None:
    m = item("a", "out", "hello", 3, 9)
    assert MessageItem.from_json(m.to_json(), PHONE) == m


def test_start_word_brings_an_opted_out_contact_back() -> None:
    stopped = ContactState(opted_out=True)
    back = domain.evolve_contact(stopped, MessageReceived.create(PHONE, inbound("voltar")))
    assert not back.opted_out
    still = domain.evolve_contact(stopped, MessageReceived.create(PHONE, inbound("oi")))
    assert still.opted_out
    anyway = domain.evolve_contact(stopped, MessageReceived.create(PHONE, inbound("oi")), "any_message")
    assert not anyway.opted_out


# --------------------------------------------------------------------------- human verification


def _fold(*events: Envelope) -> ContactState:
    state = ContactState()
    for event in events:
        state = domain.evolve_contact(state, event)
    return state


def _message(text: str, mid: str) -> MessageReceived:
    return MessageReceived.create(PHONE, inbound(text, mid=mid), event_id=f"evt-{mid}")


def test_a_contact_asked_to_prove_it_is_human_gets_no_reply() -> None:
    state = _fold(verification_requested(PHONE))
    assert state.verification_pending and state.silenced
    assert domain.skip_reason(inbound("Quanto custa?"), state) == "verification_pending"


def test_the_answer_to_the_verification_question_gets_no_sales_reply() -> None:
    state = _fold(verification_requested(PHONE))
    for answer in ("SIM", "yes", "não sei"):
        assert domain.skip_reason(inbound(answer), state) == "verification_pending"


def test_replies_resume_once_the_contact_passes_the_verification() -> None:
    answer = _message("SIM", "wamid.yes")
    state = _fold(verification_requested(PHONE), answer, verification_passed(PHONE, answer))
    assert not state.verification_pending and not state.silenced
    assert domain.skip_reason(inbound("E o preço?", mid="wamid.next"), state, "evt-wamid.next") is None


def test_a_wrong_answer_keeps_replies_on_hold() -> None:
    wrong = _message("digite 1", "wamid.wrong")
    state = _fold(verification_requested(PHONE), wrong, verification_failed(PHONE, wrong))
    assert state.verification_pending
    assert domain.skip_reason(inbound("oi"), state) == "verification_pending"


def test_a_contact_blocked_after_failing_gets_no_reply_for_good() -> None:
    wrong = _message("digite 1", "wamid.w1")
    again = _message("digite 1", "wamid.w2")
    state = _fold(
        verification_requested(PHONE),
        verification_failed(PHONE, wrong),
        verification_failed(PHONE, again, attempt=2),
        blocked(PHONE, again),
    )
    assert state.blocked and not state.verification_pending
    assert domain.skip_reason(inbound("Quanto custa?"), state) == "blocked"
    # a request delivered late (a redelivery overtaken by the block) does not reopen anything
    assert not domain.evolve_contact(state, verification_requested(PHONE)).verification_pending


def test_an_answer_delivered_after_its_verdict_still_gets_no_reply() -> None:
    """Replicas: the answer's handling lost a race and is redelivered after the lead's Passed."""
    answer = _message("SIM", "wamid.late")
    state = _fold(verification_requested(PHONE), verification_passed(PHONE, answer))
    assert not state.verification_pending
    assert domain.skip_reason(answer.payload, state, answer.event_id) == "verification_answer"
    assert domain.skip_reason(inbound("E o preço?", mid="wamid.n"), state, "evt-wamid.n") is None


def test_a_request_delivered_after_the_pass_does_not_hold_replies_again() -> None:
    """The lead asks a contact once; a Requested redelivered after the Passed is that same one."""
    answer = _message("SIM", "wamid.ok")
    state = _fold(verification_passed(PHONE, answer), verification_requested(PHONE))
    assert state.verified and not state.verification_pending


def test_only_the_last_few_verification_answers_are_remembered() -> None:
    state = ContactState(verification_pending=True)
    for i in range(domain.VERIFICATION_ANSWERS_KEPT + 2):
        state = domain.evolve_contact(state, verification_failed(PHONE, _message("não", f"w{i}"), i + 1))
    assert len(state.verification_answer_ids) == domain.VERIFICATION_ANSWERS_KEPT
    assert state.verification_answer_ids[-1] == "evt-w6"
