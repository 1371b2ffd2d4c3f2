"""Keyword rules on inbound text (Portuguese and English): lead facts, stage scores, bot patterns.

Pure functions over a message's text. ``extract_facts`` finds BANT facts a person states
plainly ("meu orçamento é R$ 20 mil", "sou o diretor", "precisamos para o próximo mês");
the LLM's structured facts (``ReplyGenerated.payload.facts``) complement it with context.
``stage_score`` grades any value of a BANT field, whoever captured it. ``bot_patterns``
names the auto-responder phrases found in a message. Deciding what to do with all this is
``domain``'s job.
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata

BANT = ("need", "budget", "authority", "timing")

# Values a field takes when the contact said "no" rather than stating a fact.
NO_BUDGET = "none"
NEEDS_APPROVAL = "needs approval"


def _fold_with_map(text: str) -> tuple[str, list[int]]:
    """``fold(text)`` and, for each of its characters, the index of the character of ``text`` it came from."""
    if text.isascii():  # one character in, one out: only blank runs collapse
        words = list(re.finditer(r"\S+", text))
        origin = []
        for n, word in enumerate(words):
            if n:
                origin.append(word.start() - 1)
            origin.extend(range(word.start(), word.end()))
        return " ".join(w.group().lower() for w in words), origin
    out: list[str] = []
    origin = []
    pending_space = False
    for index, char in enumerate(text):
        if char.isspace():
            pending_space = bool(out)
            continue
        for part in unicodedata.normalize("NFKD", char).lower():
            if unicodedata.combining(part):
                continue
            if pending_space:
                out.append(" ")
                origin.append(index - 1)
                pending_space = False
            out.append(part)
            origin.append(index)
    return "".join(out), origin


@functools.lru_cache(maxsize=4096)
def fold(text: str) -> str:
    """Lower-case, accents removed, blanks collapsed: what every pattern below matches against.

    Cached: one message's text is folded by several rules (facts, bot patterns, digest).
    """
    if text.isascii():  # most messages: no accents to strip, so skip the per-character work
        return " ".join(text.lower().split())
    decomposed = unicodedata.normalize("NFKD", text.lower())
    return " ".join("".join(ch for ch in decomposed if not unicodedata.combining(ch)).split())


def text_digest(text: str) -> str:
    """A short fingerprint of a message, equal for messages that differ only in case/accents/blanks."""
    folded = fold(text)
    if not folded:
        return ""
    return hashlib.blake2b(folded.encode(), digest_size=8).hexdigest()


# --- budget -----------------------------------------------------------------------------------

_AMOUNT = r"\d{1,3}(?:[.,\s]\d{3})+(?:[.,]\d{1,2})?|\d+(?:[.,]\d+)?"
_SCALE = r"(?:\s*(?:mil|k|mi|milhao|milhoes|million|thousand|m)\b)?"
_BUDGET_PATTERNS = (
    re.compile(rf"(?:r\$|us\$|\$|usd|brl|eur|€)\s*(?:{_AMOUNT}){_SCALE}"),
    re.compile(rf"\b(?:{_AMOUNT}){_SCALE}\s*(?:reais|dolares|dollars|euros|bucks)\b"),
    re.compile(
        rf"\b(?:orcamento|budget|investimento|investir|invest)\b[^.!?\d]{{0,25}}(?:{_AMOUNT}){_SCALE}"
    ),
)
_NO_BUDGET = re.compile(
    r"\b(?:sem orcamento|nao (?:temos|tenho|ha|tem) (?:orcamento|verba|dinheiro)|"
    r"no budget|don'?t have (?:a |the )?budget|do not have (?:a |the )?budget|can'?t afford)\b"
)
_HAS_BUDGET = re.compile(
    r"\b(?:temos (?:orcamento|verba)|tenho (?:orcamento|verba)|orcamento (?:aprovado|disponivel)|"
    r"(?:we )?have (?:a |the )?budget|budget (?:is )?approved)\b"
)

# --- authority --------------------------------------------------------------------------------

_DECIDER = re.compile(
    r"\b(?:sou (?:o |a )?(?:dono|dona|proprietari[oa]|socio|socia|fundador|fundadora|ceo|cto|cfo|coo|"
    r"diretor|diretora|gerente|gestor|gestora|head|presidente|decisor|responsavel)|"
    r"eu (?:que )?decido|quem decide sou eu|(?:a )?decisao e minha|"
    r"i'?m (?:the |a )?(?:owner|founder|co-?founder|ceo|cto|cfo|coo|director|manager|head of|president|"
    r"decision maker)|i am (?:the |a )?(?:owner|founder|co-?founder|ceo|cto|cfo|coo|director|manager|"
    r"head of|president|decision maker)|i (?:make the )?decide|i make the decisions?)"
)
_INFLUENCER = re.compile(
    r"\b(?:preciso (?:falar|ver|consultar|conversar) com (?:o |a |meu |minha )?(?:chefe|socio|socia|"
    r"diretor|diretora|gerente|gestor)|(?:meu|minha) (?:chefe|gestor|gestora) (?:decide|aprova)|"
    r"need to (?:ask|check with|talk to) my (?:boss|manager|partner|director)|my (?:boss|manager) decides)"
)

# --- timing -----------------------------------------------------------------------------------

# (pattern, canonical value, stage score): the sooner, the hotter the lead.
_TIMING: tuple[tuple[re.Pattern[str], str, int], ...] = (
    (
        re.compile(
            r"\b(?:urgente|urgencia|imediatamente|pra ontem|para ontem|asap|urgent|right away|"
            r"immediately)\b"
        ),
        "immediately",
        100,
    ),
    (
        re.compile(
            r"\b(?:ess[ea] semana|est[ea] semana|proxima semana|semana que vem|this week|next week)\b"
        ),
        "within weeks",
        100,
    ),
    (
        re.compile(
            r"\b(?:ess[ea] mes|est[ea] mes|proximo mes|mes que vem|this month|next month|"
            r"(?:em|dentro de|in|within) (?:1|2|um|dois|one|two) (?:mes|meses|months?))\b"
        ),
        "within 2 months",
        100,
    ),
    (
        re.compile(
            r"\b(?:proximo trimestre|next quarter|(?:em|dentro de|in|within) (?:3|4|5|6|tres|quatro|"
            r"cinco|seis|three|four|five|six) (?:meses|months)|ate o fim do ano|by the end of the year|"
            r"this year|este ano|esse ano)\b"
        ),
        "within 6 months",
        70,
    ),
    (
        re.compile(
            r"\b(?:ano que vem|proximo ano|next year|sem pressa|no rush|no hurry|algum dia|someday|"
            r"ainda nao sei quando|not sure when)\b"
        ),
        "later",
        30,
    ),
)

# --- need, company, name ----------------------------------------------------------------------

_NEED = re.compile(
    r"\b(?:preciso de|precisamos de|procuro|procuramos|estou procurando|estamos procurando|busco|buscamos|"
    r"quero|queremos|gostaria de|tenho interesse em|temos interesse em|"
    r"we need|i need|looking for|we want|i want|interested in|we'?re looking for)\s+"
    r"(?P<what>[^.!?\n]{3,80})"
)
_COMPANY = re.compile(
    r"\b(?:minha empresa (?:e|se chama)|trabalho na|trabalho no|sou da empresa|nossa empresa (?:e|se chama)|"
    r"my company is|i work at|i work for|our company is)\s+(?P<what>[^,.!?\n]{2,60})"
)
_NAME = re.compile(r"\b(?:meu nome e|me chamo|my name is)\s+(?P<what>[^\W\d_]+(?:\s+[^\W\d_]+){0,2})")

# --- auto-responders --------------------------------------------------------------------------

BOT_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern))
    for name, pattern in (
        (
            "menu_digit",
            r"\b(?:digite|tecle|responda|envie|press|reply with|type|send)\s+(?:o numero\s+)?"
            r"\d\b|\bescolha uma das opcoes\b|\bselecione uma opcao\b|\bchoose an option\b",
        ),
        (
            "out_of_hours",
            r"\b(?:estamos|estou|esta|encontra-se) fora do (?:nosso )?horario\b|"
            r"\bfora do (?:nosso )?horario de atendimento\b|\bout of (?:the )?office\b|"
            r"\boutside (?:of )?(?:our )?business hours\b|\bnosso horario de atendimento\b",
        ),
        (
            "virtual_assistant",
            r"\bsou (?:a|o|um|uma) (?:assistente|atendente) virtua(?:l|is)\b|"
            r"\b(?:i am|i'm) (?:a|an|the) (?:virtual|automated) assistant\b",
        ),
        (
            "automatic_message",
            r"\b(?:mensagem|resposta) automatica\b|\bautomated message\b|\bauto-?reply\b|"
            r"\bautomatic reply\b|\bthis is an automated\b",
        ),
        (
            "will_reply_later",
            r"\bretornaremos (?:em breve|o mais breve|assim que)\b|"
            r"\bwe will get back to you\b|\bwe'll get back to you\b|"
            r"\bagradecemos (?:o seu|seu|pelo) contato\b|"
            r"\bobrigad[oa] por entrar em contato\b|"
            r"\bthank you for contacting\b|\bthanks for reaching out\b",
        ),
    )
)


def extract_facts(text: str) -> dict[str, str]:
    """BANT and profile facts stated in ``text``; empty when it states none.

    Keys among ``need``, ``budget``, ``authority``, ``timing``, ``company``, ``name``.
    Budget ``"none"`` and authority ``"needs approval"`` record a "no" answer.
    """
    folded = fold(text)
    if not folded:
        return {}
    facts: dict[str, str] = {}
    if _NO_BUDGET.search(folded):
        facts["budget"] = NO_BUDGET
    else:
        for pattern in _BUDGET_PATTERNS:
            match = pattern.search(folded)
            if match:
                facts["budget"] = _original(text, match.span())
                break
        else:
            if _HAS_BUDGET.search(folded):
                facts["budget"] = "available"
    if match := _DECIDER.search(folded):
        facts["authority"] = _original(text, match.span())
    elif _INFLUENCER.search(folded):
        facts["authority"] = NEEDS_APPROVAL
    for pattern, value, _score in _TIMING:
        if pattern.search(folded):
            facts["timing"] = value
            break
    if match := _NEED.search(folded):
        facts["need"] = _original(text, match.span("what"))
    if match := _COMPANY.search(folded):
        facts["company"] = _original(text, match.span("what"))
    if match := _NAME.search(folded):
        facts["name"] = _person_name(_original(text, match.span("what")))
    return facts


def _original(text: str, span: tuple[int, int]) -> str:
    """The characters of ``text`` that produced ``span`` of its folded form (keeps "ACME", "João")."""
    if span[0] >= span[1]:
        return ""
    folded, origin = _fold_with_map(text)
    if folded != fold(text):  # a letter whose lower case folds differently alone: keep it folded
        return fold(text)[span[0] : span[1]]
    return " ".join(text[origin[span[0]] : origin[span[1] - 1] + 1].split())


def _person_name(words: str) -> str:
    """The first word, plus the next ones written with a capital ("Carla e preciso" -> "Carla")."""
    first, *rest = words.split()
    kept = [first]
    for word in rest:
        if not word[:1].isupper():
            break
        kept.append(word)
    return " ".join(kept).title()


def stage_score(field: str, value: str) -> int:
    """0-100: how well ``value`` answers the BANT ``field`` (whether rules or the LLM found it)."""
    folded = fold(value)
    if not folded:
        return 0
    if field == "budget":
        if folded == NO_BUDGET or _NO_BUDGET.search(folded) or folded in {"no", "nao", "nenhum"}:
            return 10
        if any(ch.isdigit() for ch in folded):
            return 100
        return 70
    if field == "authority":
        if folded == NEEDS_APPROVAL or _INFLUENCER.search(folded):
            return 50
        return 100
    if field == "timing":
        for pattern, canonical, score in _TIMING:
            if folded == canonical or pattern.search(folded):
                return score
        return 70
    return 100


def bot_patterns(text: str) -> list[str]:
    """Names of the auto-responder patterns ``text`` matches, e.g. ``["menu_digit", "out_of_hours"]``."""
    folded = fold(text)
    if not folded:
        return []
    return [name for name, pattern in BOT_PATTERNS if pattern.search(folded)]


def is_affirmative(text: str) -> bool:
    """The human-verification answer: "SIM" / "YES" (case, accents and edge punctuation ignored)."""
    return fold(text).strip(" .!?,;:\"'") in {"sim", "yes", "s", "y"}
