"""Pure rules of the llm-proxy: no await, no I/O.

- which replies may come from the response cache, and the cache key;
- the fallback responder (templated replies per language and lead stage);
- the structured-output schema asked of the LLM and how its answer is read;
- splitting a reply into WhatsApp-sized parts on sentence boundaries;
- how a WhatsApp send error is classified (retry with backoff, terminal, outside the window);
- the Google Sheets row of a lead.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from orbion_common.events.lead import LeadSnapshot
from orbion_common.events.messaging import LeadFacts

WHATSAPP_TEXT_LIMIT = 4096

# -- language --------------------------------------------------------------------------------

_EN_WORDS = frozenset({
    "hello", "hi", "hey", "how", "what", "price", "prices", "much", "cost", "the", "is", "are", "you",
    "your", "please", "thanks", "thank", "want", "need",
})  # fmt: skip
_PT_WORDS = frozenset({
    "olá", "ola", "oi", "bom", "boa", "dia", "tarde", "noite", "quanto", "custa", "preço", "preco", "você",
    "voce", "obrigado", "obrigada", "quero", "preciso", "não", "nao", "sim", "tudo", "bem", "como",
})  # fmt: skip


def language_of(text: str, declared: str = "", default: str = "pt") -> str:
    """``pt`` or ``en``: the declared language when known, else a word count, else ``default``."""
    if declared[:2].lower() in ("pt", "en"):
        return declared[:2].lower()
    words = re.findall(r"[\wà-ú]+", text.lower())
    en = sum(w in _EN_WORDS for w in words)
    pt = sum(w in _PT_WORDS for w in words)
    if en > pt:
        return "en"
    if pt > en:
        return "pt"
    return default


# -- fallback responder ----------------------------------------------------------------------

_FALLBACK: dict[str, dict[str, str]] = {
    "pt": {
        "": "Olá{name}! Obrigado pela sua mensagem. Já estou verificando e te respondo em instantes. "
        "Enquanto isso, pode me contar um pouco mais sobre o que você procura?",
        "need": "Obrigado{name}! Para te ajudar melhor: qual é o principal desafio "
        "que você quer resolver hoje?",
        "budget": "Entendi{name}! Você já tem uma faixa de investimento em mente para essa solução?",
        "authority": "Perfeito{name}! Além de você, mais alguém participa dessa decisão na sua empresa?",
        "timing": "Ótimo{name}! Para quando vocês gostariam de ter isso funcionando?",
        "qualified": "Obrigado{name}! Um especialista do nosso time vai falar com você em breve.",
    },
    "en": {
        "": "Hi{name}! Thanks for your message. I'm looking into it and will get back to you shortly. "
        "Meanwhile, could you tell me a bit more about what you are looking for?",
        "need": "Thanks{name}! To help you better: what is the main challenge you want to solve today?",
        "budget": "Got it{name}! Do you already have a budget range in mind for this?",
        "authority": "Great{name}! Besides you, is anyone else involved in this decision?",
        "timing": "Great{name}! When would you like to have this up and running?",
        "qualified": "Thank you{name}! A specialist from our team will contact you shortly.",
    },
}


def fallback_reply(language: str, stage: str = "", profile_name: str = "") -> str:
    """A polite templated reply for the contact's language and lead stage (never empty)."""
    templates = _FALLBACK.get(language, _FALLBACK["pt"])
    stage_key = stage.lower()
    if stage_key in ("qualified", "handoff", "handed_off", "closed"):
        stage_key = "qualified"
    template = templates.get(stage_key, templates[""])
    first_name = profile_name.strip().split(" ")[0] if profile_name.strip() else ""
    return template.format(name=f", {first_name}" if first_name else "")


# -- response cache policy -------------------------------------------------------------------

_GENERIC_TOPICS: dict[str, tuple[str, ...]] = {
    "pricing": (
        "quanto custa",
        "qual o preço",
        "qual o preco",
        "preço",
        "preco",
        "valor",
        "how much",
        "price",
    ),
    "hours": ("horário", "horario", "que horas", "funcionamento", "opening hours", "business hours"),
    "product": (
        "o que vocês fazem",
        "o que voces fazem",
        "o que é",
        "como funciona",
        "what do you do",
        "how does it work",
    ),
}
_MAX_GENERIC_CHARS = 120


def normalise(text: str) -> str:
    """Lower case, no accents, no punctuation, single spaces: the comparable form of a question."""
    text = unicodedata.normalize("NFKD", text.lower())
    text = "".join(c for c in text if not unicodedata.combining(c))
    return " ".join(re.sub(r"[^\w\s]", " ", text).split())


# In their comparable form once, at import: normalising each phrase on every reply was most of
# what answering from the cache cost (44 µs a call, against 6 for the text's own normalise).
_NORMALISED_TOPICS = {topic: frozenset(map(normalise, phrases)) for topic, phrases in _GENERIC_TOPICS.items()}


def generic_topic(text: str) -> str | None:
    """The generic topic of a short question (pricing, hours, product) or None.

    Only such messages may be answered from the response cache: anything personal or long
    goes to the LLM, so that a cached answer never leaks one contact's context to another.
    """
    if not text or len(text) > _MAX_GENERIC_CHARS:
        return None
    norm = normalise(text)
    for topic, phrases in _NORMALISED_TOPICS.items():
        if any(p in norm for p in phrases):
            return topic
    return None


def cache_key(text: str, stage: str, prompt_version: str, prefix: str = "orbion:") -> str:
    digest = hashlib.sha256(f"{normalise(text)}\x1f{stage}\x1f{prompt_version}".encode()).hexdigest()
    return f"{prefix}llm:reply:{digest[:40]}"


# -- structured output -----------------------------------------------------------------------

FACT_FIELDS: tuple[str, ...] = tuple(LeadFacts.model_fields)


@functools.cache
def _reply_schema() -> str:
    return json.dumps(_build_reply_schema())


def reply_schema() -> dict[str, Any]:
    """The ``response_format`` asking for the reply text and the lead facts in one call."""
    schema: dict[str, Any] = json.loads(_reply_schema())  # a fresh copy: callers may mutate it
    return schema


def _build_reply_schema() -> dict[str, Any]:
    facts = {
        "type": "object",
        "properties": {name: {"type": "string"} for name in FACT_FIELDS},
        "required": list(FACT_FIELDS),
        "additionalProperties": False,
    }
    return {
        "type": "json_schema",
        "json_schema": {
            "name": "sdr_reply",
            "strict": True,
            "schema": {
                "type": "object",
                "properties": {"reply": {"type": "string"}, "facts": facts},
                "required": ["reply", "facts"],
                "additionalProperties": False,
            },
        },
    }


class BadCompletion(ValueError):
    """The model's answer is not the JSON we asked for (or is empty)."""


@dataclass(frozen=True)
class ChatAnswer:
    """What we use of a chat-completions response: first choice's content, model, token usage."""

    content: str | None
    model: str
    prompt_tokens: int
    completion_tokens: int


def read_chat_completion(data: object) -> ChatAnswer:
    """The :class:`ChatAnswer` of a decoded chat-completions body; a missing part is empty or 0.

    Read from plain JSON rather than the SDK's ``ChatCompletion`` model: building that model
    cost ~20% of the client's CPU per call in ``orbion bench llm-proxy`` and we use four fields.
    """
    body = data if isinstance(data, dict) else {}
    choices = body.get("choices")
    first = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    message = first.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    assert isinstance(usage, dict)
    model = body.get("model")

    def tokens(name: str) -> int:
        value = usage.get(name)
        return value if isinstance(value, int) else 0

    return ChatAnswer(
        content=content if isinstance(content, str) else None,
        model=model if isinstance(model, str) else "",
        prompt_tokens=tokens("prompt_tokens"),
        completion_tokens=tokens("completion_tokens"),
    )


def parse_completion(content: str | None) -> tuple[str, LeadFacts]:
    """Reply text and facts from the model's JSON answer; raises :class:`BadCompletion`."""
    if not content or not content.strip():
        raise BadCompletion("empty completion")
    try:
        data = json.loads(content)
    except ValueError as exc:
        raise BadCompletion(f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BadCompletion("not a JSON object")
    reply = data.get("reply")
    if not isinstance(reply, str) or not reply.strip():
        raise BadCompletion("no reply text")
    raw = data.get("facts") if isinstance(data.get("facts"), dict) else {}
    assert isinstance(raw, dict)
    facts = LeadFacts(**{k: str(v) for k, v in raw.items() if k in FACT_FIELDS and v is not None})
    return reply.strip(), facts


# -- splitting -------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?…])\s+|\n+")


def split_text(text: str, limit: int = WHATSAPP_TEXT_LIMIT) -> list[str]:
    """Parts of at most ``limit`` characters, cut after a sentence when possible.

    Sentences are packed greedily; a sentence longer than ``limit`` is cut at the last space
    before the limit (or hard at the limit for a word that long). Parts are stripped, never empty.
    """
    text = text.strip()
    if len(text) <= limit:
        return [text] if text else []
    parts: list[str] = []
    current = ""
    for sentence in (s.strip() for s in _SENTENCE_END.split(text)):
        if not sentence:
            continue
        while len(sentence) > limit:
            if current:
                parts.append(current)
                current = ""
            cut = sentence.rfind(" ", 0, limit + 1)
            cut = cut if cut > 0 else limit
            parts.append(sentence[:cut].strip())
            sentence = sentence[cut:].strip()
        candidate = f"{current} {sentence}" if current else sentence
        if len(candidate) <= limit:
            current = candidate
        else:
            parts.append(current)
            current = sentence
    if current:
        parts.append(current)
    return parts


# -- WhatsApp send errors ----------------------------------------------------------------------


class SendVerdict(StrEnum):
    RATE_LIMITED = "rate_limited"  # 131056 pair rate, 130429 throughput, 429: back off, retry
    RETRY = "retry"  # 5xx, timeouts, connection errors: retry
    OUTSIDE_WINDOW = "outside_window"  # 131047: the 24-hour window closed; never retried
    TERMINAL = "terminal"  # any other 4xx: our request is wrong; never retried


RATE_LIMIT_CODES = frozenset({131056, 130429, 131048, 80007, 4, 613})
OUTSIDE_WINDOW_CODES = frozenset({131047})


def classify_send_error(status: int | None, code: int | None) -> SendVerdict:
    """How to react to a failed send: ``status`` None means no HTTP answer (timeout, connection)."""
    if code in OUTSIDE_WINDOW_CODES:
        return SendVerdict.OUTSIDE_WINDOW
    if code in RATE_LIMIT_CODES or status == 429:
        return SendVerdict.RATE_LIMITED
    if status is None or status >= 500 or status == 408:
        return SendVerdict.RETRY
    return SendVerdict.TERMINAL


def backoff_seconds(attempt: int, *, base: float, cap: float) -> float:
    """Exponential backoff: ``base * 2**(attempt-1)``, at most ``cap`` (attempt counts from 1)."""
    return float(min(cap, base * (2 ** max(attempt - 1, 0))))


# -- Google Sheets row -----------------------------------------------------------------------

SHEET_COLUMNS: tuple[str, ...] = (
    "timestamp",
    "phone",
    "name",
    "company",
    "sector",
    "stage",
    "agent",
    "need",
    "budget",
    "authority",
    "timing",
    "score",
    "origin",
    "message_count",
    "status",
)


@dataclass(frozen=True)
class SheetRow:
    phone: str
    values: list[str]


def sheet_row(snapshot: LeadSnapshot, exported_at: datetime) -> SheetRow:
    """The lead's row, in :data:`SHEET_COLUMNS` order (phone is the row key)."""
    data = snapshot.model_dump()
    values = [exported_at.strftime("%Y-%m-%d %H:%M:%S")] + [str(data.get(c, "")) for c in SHEET_COLUMNS[1:]]
    return SheetRow(phone=snapshot.phone, values=values)
