"""Pure rules: splitting, fallback replies, cache policy, completion parsing, send-error verdicts."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from orbion_common.events.lead import LeadSnapshot
from orbion_llm_proxy.domain import (
    SHEET_COLUMNS,
    BadCompletion,
    SendVerdict,
    backoff_seconds,
    cache_key,
    classify_send_error,
    fallback_reply,
    generic_topic,
    language_of,
    parse_completion,
    read_chat_completion,
    reply_schema,
    sheet_row,
    split_text,
)


def test_short_reply_is_one_part() -> None:
    assert split_text("Olá! Tudo bem?") == ["Olá! Tudo bem?"]


def test_long_reply_is_split_on_sentence_boundaries_within_limit() -> None:
    sentence = "Esta é uma frase de teste com algumas palavras. "
    text = sentence * 200  # ~9800 chars
    parts = split_text(text, limit=4096)
    assert len(parts) == 3
    assert all(len(p) <= 4096 for p in parts)
    assert all(p.endswith(".") for p in parts)
    assert " ".join(parts) == text.strip()


def test_sentence_longer_than_limit_is_cut_at_a_space() -> None:
    text = "palavra " * 30
    parts = split_text(text, limit=50)
    assert all(len(p) <= 50 for p in parts)
    assert " ".join(parts).split() == text.split()


def test_word_longer_than_limit_is_cut_hard() -> None:
    assert split_text("x" * 25, limit=10) == ["x" * 10, "x" * 10, "x" * 5]


def test_fallback_speaks_the_contact_language_and_stage() -> None:
    pt = fallback_reply("pt", "", "Maria Silva")
    assert pt.startswith("Olá, Maria!")
    en = fallback_reply("en", "budget")
    assert "budget" in en
    assert fallback_reply("xx", "unknown-stage")  # never empty


def test_language_guess() -> None:
    assert language_of("Olá, quanto custa?") == "pt"
    assert language_of("Hello, how much is it?") == "en"
    assert language_of("???", default="pt") == "pt"
    assert language_of("Hello", declared="pt-BR") == "pt"


def test_only_short_generic_questions_are_cacheable() -> None:
    assert generic_topic("Quanto custa?") == "pricing"
    assert generic_topic("qual o horário de funcionamento") == "hours"
    assert generic_topic("Meu nome é João e preciso de ajuda com meu pedido 123") is None
    assert generic_topic("quanto custa " + "x" * 200) is None


def test_cache_key_ignores_case_accents_and_punctuation_but_not_stage() -> None:
    assert cache_key("Quanto custa?", "need", "sdr-v1") == cache_key("quanto CUSTA", "need", "sdr-v1")
    assert cache_key("Quanto custa?", "need", "sdr-v1") != cache_key("Quanto custa?", "budget", "sdr-v1")
    assert cache_key("Quanto custa?", "need", "sdr-v1") != cache_key("Quanto custa?", "need", "sdr-v2")


def test_completion_gives_reply_and_facts() -> None:
    text, facts = parse_completion('{"reply": " Oi! ", "facts": {"budget": "10k", "unknown": "x"}}')
    assert text == "Oi!"
    assert facts.budget == "10k"


@pytest.mark.parametrize("content", [None, "", "not json", "[]", '{"facts": {}}', '{"reply": ""}'])
def test_bad_completion_is_refused(content: str | None) -> None:
    with pytest.raises(BadCompletion):
        parse_completion(content)


def test_chat_completion_gives_first_content_model_and_usage() -> None:
    body = {
        "model": "gpt-4o-mini-2024",
        "choices": [{"message": {"role": "assistant", "content": '{"reply": "Oi"}'}}, {"message": {}}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
    }
    answer = read_chat_completion(body)
    assert (answer.content, answer.model) == ('{"reply": "Oi"}', "gpt-4o-mini-2024")
    assert (answer.prompt_tokens, answer.completion_tokens) == (12, 3)


@pytest.mark.parametrize(
    "body", [None, [], {}, {"choices": []}, {"choices": [{"message": None}]}, {"choices": "x", "usage": 3}]
)
def test_chat_completion_without_parts_reads_as_empty(body: object) -> None:
    answer = read_chat_completion(body)
    assert (answer.content, answer.model, answer.prompt_tokens, answer.completion_tokens) == (None, "", 0, 0)
    with pytest.raises(BadCompletion):  # and no content is a bad completion, as before
        parse_completion(answer.content)


def test_schema_declares_every_fact_field() -> None:
    schema = reply_schema()["json_schema"]["schema"]
    required = set(schema["properties"]["facts"]["required"])
    assert required >= {"need", "budget", "authority", "timing", "intent"}


@pytest.mark.parametrize(
    ("status", "code", "verdict"),
    [
        (400, 131056, SendVerdict.RATE_LIMITED),
        (400, 130429, SendVerdict.RATE_LIMITED),
        (429, None, SendVerdict.RATE_LIMITED),
        (400, 131047, SendVerdict.OUTSIDE_WINDOW),
        (400, 100, SendVerdict.TERMINAL),
        (401, 190, SendVerdict.TERMINAL),
        (500, 131000, SendVerdict.RETRY),
        (503, None, SendVerdict.RETRY),
        (None, None, SendVerdict.RETRY),
    ],
)
def test_send_error_verdicts(status: int | None, code: int | None, verdict: SendVerdict) -> None:
    assert classify_send_error(status, code) is verdict


def test_backoff_doubles_up_to_cap() -> None:
    assert [backoff_seconds(a, base=1, cap=5) for a in (1, 2, 3, 4)] == [1, 2, 4, 5]


def test_sheet_row_follows_columns() -> None:
    row = sheet_row(
        LeadSnapshot(phone="5511999990000", name="Ana", stage="budget", score=40),
        datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    )
    assert row.phone == "5511999990000"
    assert len(row.values) == len(SHEET_COLUMNS)
    assert row.values[:3] == ["2026-01-02 03:04:05", "5511999990000", "Ana"]
    assert row.values[SHEET_COLUMNS.index("score")] == "40"


def test_pacer_allows_a_burst_per_contact_then_one_per_interval() -> None:
    from orbion_llm_proxy.sender import Pacer

    now = [0.0]
    pacer = Pacer(interval=6.0, burst=2, rate=0, clock=lambda: now[0])
    assert [pacer.delay("a"), pacer.delay("a")] == [0.0, 0.0]
    assert pacer.delay("a") == pytest.approx(6.0)
    assert pacer.delay("b") == 0.0  # another contact is not held back
    now[0] += 6.0
    assert pacer.delay("a") == 0.0


def test_pacer_takes_back_a_token_given_for_a_send_that_did_not_happen() -> None:
    from orbion_llm_proxy.sender import Pacer

    pacer = Pacer(interval=6.0, burst=1, rate=2.0, clock=lambda: 0.0)
    assert pacer.delay("a") == 0.0
    pacer.refund("a")  # nothing was due after all
    assert pacer.delay("a") == 0.0 and pacer.delay("b") == 0.0  # neither bucket lost the token
    assert pacer.delay("a") == pytest.approx(6.0) and pacer.delay("c") == pytest.approx(0.5)


def test_pacer_caps_the_business_number_rate() -> None:
    from orbion_llm_proxy.sender import Pacer

    pacer = Pacer(interval=0.0, burst=100, rate=2.0, clock=lambda: 0.0)
    assert [pacer.delay(f"p{i}") for i in range(3)] == [0.0, 0.0, pytest.approx(0.5)]
