"""The lead state machine: given events, when an input arrives, then these lead events."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta

import pytest
from lead_builders import T0, at, inbound, new_phone, reply, sent

from orbion_common.events import (
    BantStageAdvanced,
    ContactBlocked,
    ContactFlaggedAsBot,
    Envelope,
    HumanVerificationFailed,
    HumanVerificationPassed,
    HumanVerificationRequested,
    LeadChanged,
    LeadCreated,
    LeadFieldsCaptured,
    LeadHandedOff,
    LeadOptedIn,
    LeadOptedOut,
    LeadQualified,
)
from orbion_common.events.lead import LeadActivityRecorded
from orbion_common.optout import OptInRule
from orbion_lead import domain
from orbion_lead.domain import Agent, Lead, Policy, Stage, Status

DEFAULT = Policy()


def given(phone: str, *steps: Envelope, policy: Policy = DEFAULT) -> tuple[Lead, list[Envelope]]:
    """Feeds inputs through the decisions; returns the lead and every lead event decided."""
    lead = Lead(phone=phone)
    history: list[Envelope] = []
    for step in steps:
        events = _decide(lead, step, policy)
        for event in events:
            lead = domain.evolve(lead, event)
        history.extend(events)
    return lead, history


def _decide(lead: Lead, step: Envelope, policy: Policy) -> list[Envelope]:
    if step.type == "MessageReceived":
        return domain.on_message_received(lead, step, policy)  # type: ignore[arg-type]
    if step.type == "ReplyGenerated":
        return domain.on_reply_generated(lead, step, policy)  # type: ignore[arg-type]
    return domain.on_message_sent(lead, step)  # type: ignore[arg-type]


def types(events: Iterable[Envelope]) -> list[str]:
    return [e.type for e in events if e.type != "LeadActivityRecorded"]


def test_a_first_message_creates_the_lead_with_its_profile_name_and_a_snapshot() -> None:
    phone = new_phone()
    events = domain.on_message_received(Lead(phone=phone), inbound(phone, "Oi, bom dia"))
    assert types(events) == ["LeadCreated", "LeadChanged"]
    lead = domain.replay(phone, events)
    assert lead.exists and lead.profile_name == "Ana" and lead.messages_in == 1
    assert lead.status is Status.ACTIVE and lead.stage is Stage.NEED and lead.agent is Agent.SDR
    snapshot = events[-1].payload.snapshot
    assert snapshot.version == lead.version == len(events)


def test_a_second_plain_message_only_counts_and_publishes_no_snapshot() -> None:
    phone = new_phone()
    lead, _ = given(phone, inbound(phone, "Oi"))
    events = domain.on_message_received(lead, inbound(phone, "tudo bem?", when=at(30)))
    assert [e.type for e in events] == ["LeadActivityRecorded"]
    assert domain.evolve(lead, events[0]).messages_in == 2


def test_deciding_twice_on_the_same_message_gives_the_same_event_ids() -> None:
    phone = new_phone()
    msg = inbound(phone, "Preciso de um CRM")
    first = domain.on_message_received(Lead(phone=phone), msg)
    again = domain.on_message_received(Lead(phone=phone), msg)
    assert [e.event_id for e in first] == [e.event_id for e in again]
    assert first == again


def test_stated_need_advances_the_stage_to_budget() -> None:
    phone = new_phone()
    lead, events = given(phone, inbound(phone, "Olá, precisamos de um sistema de atendimento"))
    assert lead.fields["need"] == "um sistema de atendimento"
    assert lead.stage is Stage.BUDGET and lead.score == 30
    advanced = [e for e in events if isinstance(e, BantStageAdvanced)]
    assert [(e.payload.from_stage, e.payload.to_stage) for e in advanced] == [("need", "budget")]
    assert (
        isinstance(events[-1], LeadChanged)
        and events[-1].payload.snapshot.need == "um sistema de atendimento"
    )


def test_need_budget_and_authority_qualify_the_lead_and_hand_it_to_the_scheduler() -> None:
    phone = new_phone()
    lead, events = given(
        phone,
        inbound(phone, "Precisamos de um chatbot para vendas", when=at(0)),
        inbound(phone, "Nosso orçamento é de R$ 20 mil", when=at(60)),
        inbound(phone, "Sou o diretor comercial", when=at(120)),
    )
    assert lead.score == 80 and lead.qualified
    assert lead.stage is Stage.TIMING and lead.agent is Agent.SCHEDULER
    qualified = [e for e in events if isinstance(e, LeadQualified)]
    assert len(qualified) == 1 and qualified[0].payload.score == 80 and qualified[0].payload.threshold == 70
    assert lead.snapshot().status == "qualified"


def test_a_lead_is_qualified_only_once() -> None:
    phone = new_phone()
    _, events = given(
        phone,
        inbound(phone, "We need a CRM, budget is $10k and I am the CEO", when=at(0)),
        inbound(phone, "We want it next month", when=at(60)),
    )
    assert types(events).count("LeadQualified") == 1


def test_the_qualification_threshold_is_configurable() -> None:
    phone = new_phone()
    lead, _ = given(
        phone,
        inbound(phone, "Precisamos de um chatbot para vendas. Sou o dono."),
        policy=Policy(qualify_threshold=90),
    )
    assert lead.score == 55 and not lead.qualified


def test_no_budget_scores_low_and_keeps_the_lead_at_the_budget_stage() -> None:
    phone = new_phone()
    lead, _ = given(phone, inbound(phone, "Preciso de um site mas não temos orçamento"))
    assert lead.fields["budget"] == "none" and lead.stage_scores["budget"] == 10
    assert lead.stage is Stage.BUDGET and lead.score == 32  # 30 + 25 * 10%


def test_llm_facts_are_captured_and_may_correct_a_rules_value() -> None:
    phone = new_phone()
    lead, events = given(
        phone,
        inbound(phone, "Preciso de um site"),
        reply(
            phone,
            need="site institucional com blog",
            company="ACME",
            timing="next month",
            stage_hint="budget",
        ),
    )
    captured = [e for e in events if isinstance(e, LeadFieldsCaptured)]
    assert [c.payload.source for c in captured] == ["rules", "llm"]
    assert lead.fields["need"] == "site institucional com blog" and lead.fields["company"] == "ACME"
    assert lead.field_sources["need"] == "llm" and "stage_hint" not in lead.fields


def test_rules_never_overwrite_what_the_llm_captured() -> None:
    phone = new_phone()
    lead, _ = given(
        phone,
        inbound(phone, "Oi"),
        reply(phone, budget="R$ 50 mil por ano"),
        inbound(phone, "o orçamento é R$ 5 mil", when=at(60)),
    )
    assert lead.fields["budget"] == "R$ 50 mil por ano"


def test_a_reply_without_new_facts_changes_nothing() -> None:
    phone = new_phone()
    lead, _ = given(phone, inbound(phone, "Oi"), reply(phone, need="crm"))
    assert domain.on_reply_generated(lead, reply(phone, need="crm")) == []


def test_a_stop_word_opts_out_and_further_messages_capture_nothing() -> None:
    phone = new_phone()
    lead, events = given(phone, inbound(phone, "Oi"), inbound(phone, "PARE!", when=at(10)))
    opted = [e for e in events if isinstance(e, LeadOptedOut)]
    assert len(opted) == 1 and opted[0].payload.word == "pare"
    assert lead.status is Status.OPTED_OUT and not lead.agent_replies
    later = domain.on_message_received(lead, inbound(phone, "precisamos de um CRM", when=at(20)))
    assert types(later) == []
    assert domain.replay(phone, [*events, *later]).messages_in == 3


def test_an_opted_out_contact_opts_back_in_with_a_start_word() -> None:
    phone = new_phone()
    lead, events = given(
        phone,
        inbound(phone, "stop"),
        inbound(phone, "oi?", when=at(10)),
        inbound(phone, "Voltar", when=at(20)),
    )
    assert types(events).count("LeadOptedIn") == 1
    assert lead.status is Status.ACTIVE and lead.agent_replies


def test_under_the_any_message_rule_any_message_opts_back_in() -> None:
    phone = new_phone()
    policy = Policy(opt_in_rule=OptInRule.ANY_MESSAGE)
    lead, events = given(
        phone, inbound(phone, "sair"), inbound(phone, "oi, tenho uma dúvida", when=at(5)), policy=policy
    )
    assert [type(e) for e in events if isinstance(e, LeadOptedOut | LeadOptedIn)] == [
        LeadOptedOut,
        LeadOptedIn,
    ]
    assert not lead.opted_out


def test_a_repeated_stop_word_opts_out_once() -> None:
    phone = new_phone()
    _, events = given(phone, inbound(phone, "stop"), inbound(phone, "STOP", when=at(3)))
    assert types(events).count("LeadOptedOut") == 1


def test_an_auto_responder_is_flagged_and_asked_one_verification_question() -> None:
    phone = new_phone()
    lead, events = given(
        phone,
        inbound(phone, "Olá! Estamos fora do horário de atendimento. Digite 1 para vendas.", when=at(0)),
        inbound(phone, "Sou a assistente virtual da Loja X. Digite 1 para vendas.", when=at(10)),
        inbound(phone, "Sou a assistente virtual da Loja X. Digite 1 para vendas.", when=at(20)),
    )
    flagged = [e for e in events if isinstance(e, ContactFlaggedAsBot)]
    asked = [e for e in events if isinstance(e, HumanVerificationRequested)]
    assert len(flagged) == 1 and flagged[0].payload.bot_score >= 60
    assert "pattern:out_of_hours" in flagged[0].payload.reasons
    assert len(asked) == 1 and "SIM" in asked[0].payload.question
    assert asked[0].payload.expires_at == at(10) + timedelta(seconds=60)
    assert lead.status is Status.VERIFYING and not lead.agent_replies


def test_a_single_human_message_is_not_flagged() -> None:
    phone = new_phone()
    lead, events = given(phone, inbound(phone, "Vocês atendem fora do horário comercial?"))
    assert "ContactFlaggedAsBot" not in types(events) and lead.bot_score == 0


def test_repeated_quick_replies_and_identical_messages_raise_the_bot_score() -> None:
    phone = new_phone()
    steps: list[Envelope] = []
    for i in range(4):
        steps += [sent(phone, when=at(i * 30)), inbound(phone, "ok", when=at(i * 30 + 1))]
    lead, events = given(phone, *steps)
    signals = [s for e in events if isinstance(e, LeadActivityRecorded) for s in e.payload.signals]
    assert "quick_replies" in signals and "repeated_message" in signals
    assert lead.flagged_bot and lead.verification.pending


def test_a_human_answering_slowly_is_never_a_quick_replier() -> None:
    phone = new_phone()
    steps: list[Envelope] = []
    for i in range(4):
        steps += [sent(phone, when=at(i * 30)), inbound(phone, f"resposta {i}", when=at(i * 30 + 5))]
    lead, _ = given(phone, *steps)
    assert lead.quick_streak == 0 and lead.bot_score == 0


def test_the_gateway_throttled_flag_feeds_the_bot_score() -> None:
    phone = new_phone()
    steps = [inbound(phone, f"msg {i}", when=at(i), throttled=True) for i in range(3)]
    lead, events = given(phone, *steps)
    assert lead.bot_score == 60 and lead.flagged_bot
    assert "throttled" in next(e for e in events if isinstance(e, ContactFlaggedAsBot)).payload.reasons


def _flagged(phone: str) -> Lead:
    lead, _ = given(
        phone,
        inbound(phone, "Mensagem automática: digite 1 para vendas", when=at(0)),
        inbound(phone, "Mensagem automática: digite 1 para vendas", when=at(5)),
    )
    assert lead.verification.pending
    return lead


def test_answering_sim_passes_verification_and_the_agent_replies_again() -> None:
    phone = new_phone()
    lead = _flagged(phone)
    events = domain.on_message_received(lead, inbound(phone, "Sim!", when=at(20)))
    assert types(events) == ["HumanVerificationPassed", "LeadChanged"]
    after = _fold(_flagged(phone), events)
    assert after.status is Status.ACTIVE and after.verification.passed and after.bot_score == 0


def test_a_verified_human_is_never_asked_again() -> None:
    phone = new_phone()
    lead = _fold(
        _flagged(phone), domain.on_message_received(_flagged(phone), inbound(phone, "YES", when=at(20)))
    )
    _, events = _continue(
        lead, [inbound(phone, "Mensagem automática: digite 1", when=at(30 + i)) for i in range(3)]
    )
    assert "HumanVerificationRequested" not in types(events)


def test_two_wrong_answers_block_the_contact() -> None:
    phone = new_phone()
    lead, events = _continue(
        _flagged(phone), [inbound(phone, "1", when=at(10)), inbound(phone, "digite 1", when=at(15))]
    )
    assert types(events) == [
        "HumanVerificationFailed",
        "LeadChanged",
        "HumanVerificationFailed",
        "ContactBlocked",
        "LeadChanged",
    ]
    assert lead.blocked and lead.status is Status.BLOCKED and not lead.agent_replies
    blocked = next(e for e in events if isinstance(e, ContactBlocked))
    assert "verification_failed" in blocked.payload.reasons


def test_one_wrong_answer_then_sim_passes() -> None:
    phone = new_phone()
    lead, events = _continue(
        _flagged(phone), [inbound(phone, "?", when=at(10)), inbound(phone, "sim", when=at(15))]
    )
    assert [type(e) for e in events if isinstance(e, HumanVerificationFailed | HumanVerificationPassed)] == [
        HumanVerificationFailed,
        HumanVerificationPassed,
    ]
    assert not lead.blocked


def test_no_answer_within_the_window_blocks_the_contact() -> None:
    phone = new_phone()
    lead = _flagged(phone)
    assert lead.verification.expires_at == at(65)
    assert domain.on_verification_timeout(lead, at(64)) == []
    events = domain.on_verification_timeout(lead, at(65))
    assert types(events) == ["HumanVerificationFailed", "ContactBlocked", "LeadChanged"]
    assert events[0].payload.reason == "timeout"
    assert domain.on_verification_timeout(lead, at(65)) == events  # a second timer run decides the same
    assert _fold(lead, events).blocked


def test_the_timeout_does_nothing_once_verification_passed() -> None:
    phone = new_phone()
    lead = _fold(
        _flagged(phone), domain.on_message_received(_flagged(phone), inbound(phone, "sim", when=at(10)))
    )
    assert domain.on_verification_timeout(lead, at(1000)) == []


def test_a_blocked_contact_only_has_its_messages_counted() -> None:
    phone = new_phone()
    lead = _fold(_flagged(phone), domain.on_verification_timeout(_flagged(phone), at(100)))
    events = domain.on_message_received(lead, inbound(phone, "SIM! precisamos de um CRM", when=at(200)))
    assert types(events) == []
    assert not domain.on_reply_generated(lead, reply(phone, need="crm"))


def test_handoff_stops_the_agent_and_is_idempotent() -> None:
    phone = new_phone()
    lead, _ = given(phone, inbound(phone, "Oi"))
    events = domain.hand_off(lead, to="maria", reason="hot lead", request_id="r1", at=at(60))
    assert types(events) == ["LeadHandedOff", "LeadChanged"]
    after = _fold(lead, events)
    assert after.status is Status.HANDED_OFF and not after.agent_replies and after.handed_off_to == "maria"
    assert domain.hand_off(after, to="maria", reason="again", request_id="r2", at=at(70)) == []


def test_handing_off_an_unknown_lead_is_refused() -> None:
    with pytest.raises(domain.LeadNotFound):
        domain.hand_off(Lead(phone=new_phone()), to="x", reason="", request_id="r", at=T0)


def test_a_message_sent_before_the_lead_exists_creates_it_and_is_counted() -> None:
    # Another replica may still be committing the inbound message that caused the send.
    phone = new_phone()
    lead, _ = given(phone, sent(phone))
    assert lead.exists and lead.messages_out == 1
    lead, _ = given(phone, sent(phone, when=at(1)), inbound(phone, "Oi"))
    assert lead.messages_out == 1 and lead.messages_in == 1


def test_messages_sent_are_counted_in_the_snapshot() -> None:
    phone = new_phone()
    lead, _ = given(phone, inbound(phone, "Oi"), sent(phone, when=at(3)), sent(phone, when=at(4)))
    assert lead.messages_out == 2 and lead.snapshot().message_count == 3


def test_replaying_the_history_gives_the_same_lead() -> None:
    phone = new_phone()
    lead, events = given(
        phone,
        inbound(phone, "Precisamos de um chatbot"),
        reply(phone, budget="R$ 30 mil", when=at(2)),
        sent(phone, when=at(3)),
        inbound(phone, "Sou o dono", when=at(40)),
    )
    assert domain.replay(phone, events) == lead
    assert isinstance(events[0], LeadCreated)
    assert [e for e in events if isinstance(e, LeadHandedOff)] == []
    assert lead.created_at == T0


def _fold(lead: Lead, events: Iterable[Envelope]) -> Lead:
    for event in events:
        lead = domain.evolve(lead, event)
    return lead


def _continue(lead: Lead, steps: list[Envelope]) -> tuple[Lead, list[Envelope]]:
    history: list[Envelope] = []
    for step in steps:
        events = _decide(lead, step, Policy())
        lead = _fold(lead, events)
        history.extend(events)
    return lead, history
