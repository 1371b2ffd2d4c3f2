"""Fake OpenAI chat-completions server (``/v1/chat/completions``, ``/v1/models``).

Answers like the real API: a ``chat.completion`` object with ``usage``; when the request asks
for structured output (``response_format`` of type ``json_schema``) the message content is a
JSON object with a ``reply`` and the ``facts`` the schema declares, filled from simple keyword
rules on the last user message. Knobs: latency/jitter, ``error_rate`` (500), ``rate_limit_rate``
(429 with ``retry-after``), ``timeout_rate`` (hangs), ``reply_text`` (fixed reply).

    python -m tests.fakes.openai --port 9001 --latency-ms 300 --error-rate 0.1
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.fakes.server import FakeJSONResponse, FakeServer, cli

#: Request bodies kept for :attr:`FakeOpenAI.requests`: enough for any test, bounded for a fake
#: serving a benchmark or a demo for hours.
REQUESTS_KEPT = 10_000

_FACT_RULES = (
    ("budget", ("r$", "orçamento", "budget", "mil reais")),
    ("timing", ("mês", "semana", "urgente", "month", "week")),
    ("authority", ("sou o dono", "diretor", "decido", "owner", "ceo")),
    ("need", ("preciso", "quero", "need", "want")),
)


def extract_facts(text: str) -> dict[str, str]:
    """Rough, deterministic facts from ``text``: enough for tests to see facts travel."""
    low = text.lower()
    facts = {key: text for key, words in _FACT_RULES if any(w in low for w in words)}
    if any(w in low for w in ("parar", "sair", "stop", "unsubscribe")):
        facts["intent"] = "opt_out"
    elif any(w in low for w in ("humano", "atendente", "human")):
        facts["intent"] = "wants_human"
    facts["language"] = "en" if any(w in low for w in ("hello", "hi ", "price", "how much")) else "pt"
    return facts


class FakeOpenAI(FakeServer):
    """Fake OpenAI chat-completions API."""

    url_suffix = "/v1"

    def __init__(self, **kw: Any) -> None:
        self.rate_limit_rate = float(kw.pop("rate_limit_rate", 0.0))
        self.reply_text: str = str(kw.pop("reply_text", "") or "")
        super().__init__(**kw)
        # Raw bytes, decoded on read: thousands of kept dicts would make every garbage
        # collection of this process slower (they are tracked objects; bytes are not).
        self._bodies: deque[bytes] = deque(maxlen=REQUESTS_KEPT)

    @property
    def requests(self) -> list[dict[str, Any]]:
        """The JSON bodies of the chat-completions calls received (the last ``REQUESTS_KEPT``)."""
        return [orjson.loads(raw) for raw in self._bodies]

    def routes(self) -> list[Route]:
        return [
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
        ]

    def server_error(self) -> JSONResponse:
        return JSONResponse(
            {"error": {"message": "The server had an error", "type": "server_error", "code": None}},
            status_code=500,
        )

    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model"}]})

    async def chat_completions(self, request: Request) -> JSONResponse:
        if not request.headers.get("authorization", "").startswith("Bearer "):
            return JSONResponse({"error": {"message": "no key", "type": "invalid_request_error"}}, 401)
        raw = await request.body()
        body = orjson.loads(raw)
        self._bodies.append(raw)
        error = await self.disturb()
        if error is not None:
            return error
        if self.rate_limit_rate and self._rng.random() < self.rate_limit_rate:
            return FakeJSONResponse(
                {
                    "error": {
                        "message": "Rate limit reached",
                        "type": "requests",
                        "code": "rate_limit_exceeded",
                    }
                },
                status_code=429,
                headers={"retry-after": "1"},
            )
        messages = body.get("messages", [])
        last_user = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
        if not isinstance(last_user, str):
            last_user = orjson.dumps(last_user).decode()
        reply = self.reply_text or f"Obrigado pela mensagem! Você disse: {last_user[:200]}"
        fmt = body.get("response_format") or {}
        if fmt.get("type") == "json_schema":
            content = orjson.dumps({"reply": reply, "facts": self._facts(fmt, last_user)}).decode()
        else:
            content = reply
        prompt_tokens = sum(len(str(m.get("content", ""))) for m in messages) // 4 + 1
        return FakeJSONResponse(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", "gpt-4o-mini"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content, "refusal": None},
                        "finish_reason": "stop",
                        "logprobs": None,
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": len(content) // 4 + 1,
                    "total_tokens": prompt_tokens + len(content) // 4 + 1,
                },
            }
        )

    @staticmethod
    def _facts(fmt: dict[str, Any], text: str) -> dict[str, str]:
        schema = (fmt.get("json_schema") or {}).get("schema") or {}
        fact_schema = (schema.get("properties") or {}).get("facts") or {}
        declared = list((fact_schema.get("properties") or {}).keys())
        found = extract_facts(text)
        return {name: found.get(name, "") for name in declared}


def main(argv: list[str] | None = None) -> None:
    cli(
        FakeOpenAI,
        argv,
        **{
            "--rate-limit-rate": {"type": float, "default": 0.0},
            "--reply-text": {"default": ""},
        },
    )


if __name__ == "__main__":
    main()
