"""The shared opt-out rule: a message that is only a stop word opts out; sentences never do."""

from __future__ import annotations

import pytest

from orbion_common.optout import OptInRule, is_opt_in, is_opt_out, normalize_word


@pytest.mark.parametrize(
    "text",
    [
        "stop",
        "STOP",
        "Stop",
        "parar",
        "Pare",
        "PARE!",
        " sair ",
        "remover",
        "Cancelar.",
        "unsubscribe",
        "pàrar",
        "CANCELAR!!",
        "\tstop\n",
        "¡pare!",
        "'sair'",
    ],
)
def test_a_message_that_is_only_a_stop_word_opts_out(text: str) -> None:
    assert is_opt_out(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "quero cancelar meu pedido",
        "stop please",
        "não pare",
        "parar de receber",
        "stopped",
        "sair 🙏",
        "stop2",
        "obrigado",
        "sim",
        "pa rar",
    ],
)
def test_a_sentence_or_other_word_does_not_opt_out(text: str) -> None:
    assert not is_opt_out(text)


@pytest.mark.parametrize(
    "text", ["start", "Começar", "COMECAR!", "voltar", "Iniciar", "retomar", "subscribe"]
)
def test_a_start_word_opts_back_in_under_the_keyword_rule(text: str) -> None:
    assert is_opt_in(text, OptInRule.KEYWORD)


def test_an_ordinary_message_does_not_opt_back_in_under_the_keyword_rule() -> None:
    assert not is_opt_in("oi, tudo bem?")
    assert not is_opt_in("quero voltar a conversar")


def test_any_message_opts_back_in_under_the_any_message_rule() -> None:
    assert is_opt_in("oi, tudo bem?", "any_message")
    assert is_opt_in("start", OptInRule.ANY_MESSAGE)


@pytest.mark.parametrize("rule", list(OptInRule))
def test_a_stop_word_or_empty_message_never_opts_back_in(rule: OptInRule) -> None:
    assert not is_opt_in("Parar", rule)
    assert not is_opt_in("  ", rule)


def test_an_unknown_rule_is_refused() -> None:
    with pytest.raises(ValueError):
        is_opt_in("start", "sometimes")


def test_normalize_word_removes_case_accents_and_edge_punctuation() -> None:
    assert normalize_word("  Começar!! ") == "comecar"
