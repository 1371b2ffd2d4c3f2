"""Opt-out and opt-in words: the one rule the conversation and lead services share.

A contact opts out by sending a message that is *only* a stop word (``stop``, ``parar``,
``pare``, ``sair``, ``remover``, ``cancelar``, ``unsubscribe``), whatever the case, the
accents, the surrounding blanks or punctuation ("Pare!", " STOP. ", "Sair 🙏" is *not* one:
emoji and other words make it an ordinary message). "Quero cancelar meu pedido" is not an
opt-out: the whole message must be the word, so a sentence is never misread.

An opted-out contact opts back in according to :class:`OptInRule`: by default only a start
word (``start``, ``voltar``, ``comecar``/``começar``, ``iniciar``, ``retomar``, ``subscribe``,
``resume``) brings the agent back; with ``any_message`` any later message does.

Pure functions, no I/O: the lead service records the facts (``LeadOptedOut``/``LeadOptedIn``),
the conversation service uses the same test to never answer a stop message itself.
"""

from __future__ import annotations

import unicodedata
from enum import StrEnum

STOP_WORDS: frozenset[str] = frozenset(
    {"stop", "parar", "pare", "sair", "remover", "cancelar", "unsubscribe"}
)
START_WORDS: frozenset[str] = frozenset(
    {"start", "voltar", "comecar", "iniciar", "retomar", "subscribe", "resume"}
)

# Punctuation a person types around a single word ("Pare!", "stop."); anything else (emoji,
# digits, a second word) makes the message more than the word.
_EDGE_PUNCTUATION = " \t\r\n.!?,;:\"'`()[]{}*_~-¡¿"


class OptInRule(StrEnum):
    """How an opted-out contact comes back (setting ``ORBION_OPT_IN_RULE``)."""

    #: Only a message that is a start word opts the contact back in.
    KEYWORD = "keyword"
    #: Any message the contact writes after opting out opts them back in.
    ANY_MESSAGE = "any_message"


def normalize_word(text: str) -> str:
    """``text`` lower-cased, accents removed and edge punctuation stripped ("Começar!" -> "comecar")."""
    if text.isascii():  # most messages: nothing to decompose
        return text.lower().strip(_EDGE_PUNCTUATION)
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    bare = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return bare.strip(_EDGE_PUNCTUATION)


# Longer than any stop word with generous punctuation around it: not worth normalising.
_MAX_WORD_MESSAGE = 40


def is_opt_out(text: str) -> bool:
    """True when the whole message is one stop word (case, accents and edge punctuation ignored)."""
    return len(text) <= _MAX_WORD_MESSAGE and normalize_word(text) in STOP_WORDS


def is_opt_in(text: str, rule: OptInRule | str = OptInRule.KEYWORD) -> bool:
    """True when a message from an opted-out contact brings them back under ``rule``.

    A stop word never opts in, whatever the rule.
    """
    if OptInRule(rule) is OptInRule.ANY_MESSAGE:
        return bool(text.strip()) and not is_opt_out(text) and bool(normalize_word(text))
    return len(text) <= _MAX_WORD_MESSAGE and normalize_word(text) in START_WORDS


__all__ = ["START_WORDS", "STOP_WORDS", "OptInRule", "is_opt_in", "is_opt_out", "normalize_word"]
