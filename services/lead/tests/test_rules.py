"""Keyword rules: facts people state in Portuguese and English, and auto-responder phrases."""

from __future__ import annotations

import pytest

from orbion_lead import rules


@pytest.mark.parametrize(
    ("text", "budget"),
    [
        ("Meu orçamento é de R$ 20 mil", "R$ 20 mil"),
        ("temos uns 15.000 reais pra isso", "15.000 reais"),
        ("budget is $5k", "$5k"),
        ("We can invest about USD 10,000", "USD 10,000"),
        ("não temos orçamento agora", "none"),
        ("we don't have a budget yet", "none"),
        ("temos verba aprovada", "available"),
    ],
)
def test_budget_is_found_in_portuguese_and_english(text: str, budget: str) -> None:
    assert rules.extract_facts(text)["budget"] == budget


@pytest.mark.parametrize(
    ("text", "authority"),
    [
        ("Sou o diretor comercial", "Sou o diretor"),
        ("sou sócia da empresa", "sou sócia"),
        ("I'm the founder", "I'm the founder"),
        ("preciso falar com meu chefe antes", "needs approval"),
        ("I need to ask my boss", "needs approval"),
    ],
)
def test_roles_tell_who_decides(text: str, authority: str) -> None:
    assert rules.extract_facts(text)["authority"].casefold() == authority.casefold()


@pytest.mark.parametrize(
    ("text", "timing", "score"),
    [
        ("é urgente", "immediately", 100),
        ("queremos começar mês que vem", "within 2 months", 100),
        ("next quarter", "within 6 months", 70),
        ("talvez ano que vem, sem pressa", "later", 30),
    ],
)
def test_time_frames_are_bucketed_and_scored_by_urgency(text: str, timing: str, score: int) -> None:
    found = rules.extract_facts(text)["timing"]
    assert found == timing and rules.stage_score("timing", found) == score


def test_need_company_and_name_keep_the_contacts_spelling() -> None:
    facts = rules.extract_facts("Oi, me chamo João Pedro, minha empresa é ACME Ltda. Precisamos de um CRM.")
    assert facts == {"name": "João Pedro", "company": "ACME Ltda", "need": "um CRM"}


def test_a_name_stops_at_the_first_lowercase_word() -> None:
    assert rules.extract_facts("meu nome é Carla e preciso de ajuda")["name"] == "Carla"


def test_small_talk_states_no_facts() -> None:
    assert rules.extract_facts("Oi, tudo bem? Bom dia!") == {}
    assert rules.extract_facts("") == {}


def test_stage_scores_grade_answers_whoever_captured_them() -> None:
    assert rules.stage_score("budget", "R$ 50 mil") == 100
    assert rules.stage_score("budget", "a definir") == 70
    assert rules.stage_score("budget", "none") == 10
    assert rules.stage_score("authority", "needs approval") == 50
    assert rules.stage_score("need", "") == 0


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("Olá! Estamos fora do horário de atendimento.", "out_of_hours"),
        ("Digite 1 para vendas, 2 para suporte", "menu_digit"),
        ("Sou a assistente virtual da Loja X", "virtual_assistant"),
        ("Esta é uma mensagem automática", "automatic_message"),
        ("Obrigado por entrar em contato! Retornaremos em breve.", "will_reply_later"),
        ("This is an automated message. Press 1 for sales.", "menu_digit"),
        ("I'm out of office until Monday", "out_of_hours"),
    ],
)
def test_auto_responder_phrases_are_recognised(text: str, pattern: str) -> None:
    assert pattern in rules.bot_patterns(text)


@pytest.mark.parametrize(
    "text",
    ["Vocês atendem fora do horário comercial?", "Queremos um chatbot para vendas", "Pode me mandar o menu?"],
)
def test_people_asking_about_bots_or_hours_are_not_auto_responders(text: str) -> None:
    assert rules.bot_patterns(text) == []


@pytest.mark.parametrize("text", ["SIM", "sim!", " Yes ", "s", "Sim."])
def test_sim_or_yes_is_an_affirmative_answer(text: str) -> None:
    assert rules.is_affirmative(text)


@pytest.mark.parametrize("text", ["1", "não", "simples", "yes please send the menu", ""])
def test_anything_else_is_not_an_affirmative_answer(text: str) -> None:
    assert not rules.is_affirmative(text)


def test_identical_messages_share_a_digest_whatever_the_case_and_accents() -> None:
    assert rules.text_digest("Olá  Mundo") == rules.text_digest("ola mundo")
    assert rules.text_digest("ola mundo") != rules.text_digest("ola mundo!")
    assert rules.text_digest("   ") == ""


def test_extra_blanks_do_not_change_what_is_found_or_its_spelling() -> None:
    assert rules.extract_facts("We   need  a CRM  for Sales.  Budget is  $5k") == {
        "need": "a CRM for Sales",
        "budget": "$5k",
    }
