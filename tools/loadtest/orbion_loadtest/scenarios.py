"""Simulated contacts: who writes what at each arrival of the schedule, and which answer is due.

Owns the traffic mix and, for every planned message, the *role* that the accounting in
stats.py judges the system by:

- ``due``: a reply must reach WhatsApp (ordinary messages of ordinary contacts);
- ``optional``: a reply may or may not come (messages of bots, messages an opt-out cancels,
  messages the gateway flagged ``throttled``);
- ``forbidden``: no reply may ever answer it (the stop word itself, anything after it);
- ``duplicate``: the same webhook again (same provider message id): no second reply.

Contacts (Portuguese and English, each with a profile name):

- *conversation*: 2-5 turns from a small SDR script (greeting, need, pricing, authority,
  timing, thanks); a turn is 1-3 messages typed in a quick burst, turns 10-20 s apart;
- *pricing*: one short generic pricing question (the LLM response cache answers most);
- *opt-out*: a turn or two, then a stop word (``Pare``, ``STOP``...), then one more message;
- *bot*: an auto-responder firing bursts of menu texts, past the per-phone rate limit.

Ordinary contacts stay under ``max_per_minute`` messages in any 60 s, so the gateway's
per-phone limit (20/min by default) never throttles them. The sending (bodies, signatures,
HTTP) is runner.py's job; the schedule of arrival times is schedule.py's.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum

from .schedule import Arrival


class Role(StrEnum):
    DUE = "due"
    OPTIONAL = "optional"
    FORBIDDEN = "forbidden"
    DUPLICATE = "duplicate"


class Kind(StrEnum):
    CONVERSATION = "conversation"
    PRICING = "pricing"
    OPT_OUT = "opt_out"
    BOT = "bot"


@dataclass
class Planned:
    """One webhook of the step: sent at ``at`` seconds from the step start."""

    seq: int
    at: float
    phase: str
    phone: str
    contact: int
    kind: Kind
    turn: int
    message_id: str
    text: str
    role: Role
    profile_name: str
    duplicate_of: int | None = None


@dataclass(frozen=True)
class Mix:
    """Share of new contacts by kind, and of arrivals spent on duplicate webhooks."""

    conversation: float = 0.74
    pricing: float = 0.15
    opt_out: float = 0.10
    bot: float = 0.01
    duplicate_rate: float = 0.02
    english_share: float = 0.3
    turn_gap: tuple[float, float] = (10.0, 20.0)
    max_per_minute: int = 15

    def kinds(self) -> tuple[list[Kind], list[float]]:
        return (
            [Kind.CONVERSATION, Kind.PRICING, Kind.OPT_OUT, Kind.BOT],
            [self.conversation, self.pricing, self.opt_out, self.bot],
        )


FIRST_NAMES = (
    "Maria",
    "João",
    "Ana",
    "Pedro",
    "Juliana",
    "Carlos",
    "Fernanda",
    "Lucas",
    "Beatriz",
    "Rafael",
    "Emily",
    "James",
    "Sarah",
    "Michael",
    "Olivia",
    "David",
)
LAST_NAMES = (
    "Silva",
    "Santos",
    "Oliveira",
    "Souza",
    "Lima",
    "Costa",
    "Pereira",
    "Almeida",
    "Smith",
    "Johnson",
    "Brown",
    "Miller",
)

# Turns of a sales conversation, by stage; a contact picks a variant per stage it reaches.
SCRIPT: dict[str, dict[str, list[list[str]]]] = {
    "pt": {
        "greeting": [
            ["Oi, boa tarde!", "Vi o anúncio de vocês no Instagram"],
            ["Olá, tudo bem?"],
            ["Bom dia! Queria mais informações sobre o sistema de vocês"],
            ["Oi", "Vocês atendem empresas pequenas?"],
        ],
        "need": [
            ["Preciso organizar o atendimento da minha loja no WhatsApp", "Hoje a gente perde muito cliente"],
            ["Quero automatizar as respostas para os clientes"],
            ["Estamos com dificuldade de responder todo mundo a tempo"],
        ],
        "pricing": [
            ["Quanto custa?"],
            ["Qual o preço do plano para uma equipe de 10 pessoas?"],
            ["E o valor mensal, como funciona?"],
        ],
        "authority": [
            ["Sou o dono da empresa, eu decido"],
            ["Preciso ver com o meu sócio antes", "Mas tenho interesse"],
        ],
        "timing": [
            ["Queria começar ainda este mês"],
            ["É urgente, precisamos para a próxima semana"],
            ["Sem pressa, talvez no próximo trimestre"],
        ],
        "closing": [
            ["Obrigado, aguardo o contato"],
            ["Perfeito, pode me mandar uma proposta?"],
        ],
    },
    "en": {
        "greeting": [
            ["Hi there!", "I saw your ad on Instagram"],
            ["Hello, how are you?"],
            ["Good morning, I'd like to know more about your product"],
        ],
        "need": [
            ["We need to answer WhatsApp leads faster", "We lose a lot of customers today"],
            ["I want to automate replies to our customers"],
        ],
        "pricing": [
            ["How much is it?"],
            ["What's the price for a team of 10 people?"],
        ],
        "authority": [["I'm the owner, I make the call"], ["I need to check with my partner first"]],
        "timing": [["We'd like to start this month"], ["It's urgent, we need it next week"]],
        "closing": [["Thanks, looking forward to your call"], ["Great, can you send me a proposal?"]],
    },
}
STAGES = ("greeting", "need", "pricing", "authority", "timing", "closing")
PRICING_QUESTIONS = {
    "pt": ["Quanto custa?", "Qual o preço?", "Qual o valor?"],
    "en": ["How much?", "What's the price?"],
}
STOP_WORDS = {"pt": ["Pare", "sair", "PARAR", "Cancelar"], "en": ["STOP", "Unsubscribe", "stop"]}
AFTER_STOP = {"pt": ["ok", "Tá bom, obrigado"], "en": ["ok", "Thanks anyway"]}
BOT_TEXTS = (
    "Olá! Sou um assistente virtual. Digite 1 para vendas, 2 para suporte.",
    "Estamos fora do horário de atendimento. Retornaremos em breve.",
    "Mensagem automática: recebemos seu contato.",
    "Escolha uma das opções: 1) Pedidos 2) Financeiro 3) Outros",
)


@dataclass
class _Contact:
    index: int
    phone: str
    kind: Kind
    lang: str
    name: str
    turns: list[list[tuple[str, Role]]]
    turn: int = 0
    msg: int = 0
    recent: deque[float] = field(default_factory=deque)

    @property
    def done(self) -> bool:
        return self.turn >= len(self.turns)

    def room(self, at: float, need: int, limit: int) -> bool:
        while self.recent and self.recent[0] <= at - 60.0:
            self.recent.popleft()
        return len(self.recent) + need <= limit


class Scenario:
    """Turns a schedule of arrivals into planned messages from simulated contacts.

    ``run_tag`` (4 digits) keeps phone numbers and message ids of different runs apart, so a
    system that keeps its state between runs (opt-outs, bot blocks) never mixes them up.
    """

    def __init__(self, *, seed: int = 1, run_tag: int = 0, mix: Mix | None = None) -> None:
        self.rng = random.Random(seed)
        self.run_tag = run_tag % 10_000
        self.mix = mix or Mix()
        self.contacts: list[_Contact] = []
        self._seq = 0
        self._counter = {"pt": 0, "en": 0}

    # -- contacts --------------------------------------------------------------------------

    def _phone(self, lang: str) -> str:
        n = self._counter[lang]
        self._counter[lang] += 1
        if lang == "pt":
            return f"55119{self.run_tag:04d}{n:06d}"  # 15 digits: Brazil, São Paulo mobile
        return f"1555{self.run_tag:04d}{n:07d}"

    def _turns(self, kind: Kind, lang: str) -> list[list[tuple[str, Role]]]:
        rng = self.rng
        pick = rng.choice
        if kind is Kind.PRICING:
            return [[(pick(PRICING_QUESTIONS[lang]), Role.DUE)]]
        if kind is Kind.BOT:
            return [[(pick(BOT_TEXTS), Role.OPTIONAL) for _ in range(6)] for _ in range(4)]
        script = SCRIPT[lang]
        count = rng.randint(2, 5) if kind is Kind.CONVERSATION else rng.randint(1, 2)
        stages = (
            STAGES[:count]
            if rng.random() < 0.7
            else tuple(sorted(rng.sample(STAGES, count), key=STAGES.index))
        )
        turns = [[(text, Role.DUE) for text in pick(script[stage])] for stage in stages]
        if kind is Kind.OPT_OUT:
            # A stop word cancels a reply still waiting for its quiet period: earlier answers are optional.
            turns = [[(text, Role.OPTIONAL) for text, _ in turn] for turn in turns]
            turns.append([(pick(STOP_WORDS[lang]), Role.FORBIDDEN)])
            turns.append([(pick(AFTER_STOP[lang]), Role.FORBIDDEN)])
        return turns

    def _new_contact(self) -> _Contact:
        kinds, weights = self.mix.kinds()
        kind = self.rng.choices(kinds, weights)[0]
        lang = "en" if self.rng.random() < self.mix.english_share else "pt"
        name = f"{self.rng.choice(FIRST_NAMES)} {self.rng.choice(LAST_NAMES)}"
        contact = _Contact(len(self.contacts), self._phone(lang), kind, lang, name, self._turns(kind, lang))
        self.contacts.append(contact)
        return contact

    # -- planning --------------------------------------------------------------------------

    def plan(self, arrivals: list[Arrival]) -> list[Planned]:
        """One planned message per arrival, in arrival order."""
        out: list[Planned] = []
        ready: list[tuple[float, int]] = []  # (time a contact may start its next turn, index)
        typing: deque[_Contact] = deque()  # contacts in the middle of a burst: served first
        mix = self.mix
        for arrival in arrivals:
            at = arrival.at
            if out and self.rng.random() < mix.duplicate_rate:
                duplicate = self._duplicate(out, arrival)
                if duplicate is not None:
                    out.append(duplicate)
                    continue
            contact = typing.popleft() if typing else self._next_ready(ready, at)
            text, role = contact.turns[contact.turn][contact.msg]
            self._seq += 1
            out.append(
                Planned(
                    seq=self._seq,
                    at=at,
                    phase=arrival.phase,
                    phone=contact.phone,
                    contact=contact.index,
                    kind=contact.kind,
                    turn=contact.turn,
                    message_id=f"wamid.LT{self.run_tag:04d}{self._seq:09d}",
                    text=text,
                    role=role,
                    profile_name=contact.name,
                )
            )
            contact.recent.append(at)
            contact.msg += 1
            if contact.msg < len(contact.turns[contact.turn]):
                typing.append(contact)
                continue
            contact.turn += 1
            contact.msg = 0
            if contact.done:
                continue
            gap = (1.0, 2.0) if contact.kind is Kind.BOT else mix.turn_gap
            heapq.heappush(ready, (at + self.rng.uniform(*gap), contact.index))
        return out

    def _next_ready(self, ready: list[tuple[float, int]], at: float) -> _Contact:
        deferred: list[tuple[float, int]] = []
        chosen: _Contact | None = None
        while ready and ready[0][0] <= at:
            _, index = heapq.heappop(ready)
            contact = self.contacts[index]
            need = len(contact.turns[contact.turn])
            if contact.kind is Kind.BOT or contact.room(at, need, self.mix.max_per_minute):
                chosen = contact
                break
            deferred.append((at + 5.0, index))  # over its own per-minute budget: later
        for item in deferred:
            heapq.heappush(ready, item)
        return chosen or self._new_contact()

    def _duplicate(self, out: list[Planned], arrival: Arrival) -> Planned | None:
        # Meta retries a webhook it thinks failed: the same message id and text, a bit later.
        originals = [p for p in out[-200:] if p.role is not Role.DUPLICATE]
        if not originals:
            return None
        original = self.rng.choice(originals)
        self._seq += 1
        return Planned(
            seq=self._seq,
            at=arrival.at,
            phase=arrival.phase,
            phone=original.phone,
            contact=original.contact,
            kind=original.kind,
            turn=original.turn,
            message_id=original.message_id,
            text=original.text,
            role=Role.DUPLICATE,
            profile_name=original.profile_name,
            duplicate_of=original.seq,
        )
