"""Fake Evolution API server: ``POST /message/sendText/{instance}`` with an ``apikey`` header.

Records sends (number, text, quoted message id) in ``sent`` and at ``GET /_sent``.

    python -m tests.fakes.evolution --port 9003 --latency-ms 50
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.fakes.server import FakeServer, cli


class FakeEvolution(FakeServer):
    """Fake Evolution API (WhatsApp via Baileys)."""

    def __init__(self, *, apikey: str = "test-apikey", **kw: Any) -> None:
        super().__init__(**kw)
        self.apikey = apikey
        self.fail_status: int = 0
        self.sent: list[dict[str, Any]] = []

    def routes(self) -> list[Route]:
        async def get_sent(request: Request) -> JSONResponse:
            return JSONResponse({"sent": self.sent})

        return [
            Route("/_sent", get_sent, methods=["GET"]),
            Route("/message/sendText/{instance}", self.send_text, methods=["POST"]),
        ]

    async def send_text(self, request: Request) -> JSONResponse:
        if request.headers.get("apikey") != self.apikey:
            return JSONResponse({"status": 401, "error": "Unauthorized", "response": {}}, status_code=401)
        body = await request.json()
        error = await self.disturb()
        if error is not None:
            return error
        if self.fail_status:
            return JSONResponse(
                {"status": self.fail_status, "error": "injected"}, status_code=self.fail_status
            )
        number, text = str(body.get("number", "")), str(body.get("text", ""))
        if not number or not text:
            return JSONResponse({"status": 400, "error": "Bad Request", "response": {}}, status_code=400)
        quoted = ((body.get("quoted") or {}).get("key") or {}).get("id", "")
        msg_id = "BAE5" + uuid.uuid4().hex[:12].upper()
        self.sent.append(
            {
                "instance": request.path_params["instance"],
                "to": number,
                "text": text,
                "context_message_id": quoted,
                "id": msg_id,
                "at": time.time(),
            }
        )
        return JSONResponse(
            {
                "key": {"remoteJid": f"{number}@s.whatsapp.net", "fromMe": True, "id": msg_id},
                "message": {"extendedTextMessage": {"text": text}},
                "messageTimestamp": str(int(time.time())),
                "status": "PENDING",
            },
            status_code=201,
        )


def main(argv: list[str] | None = None) -> None:
    cli(FakeEvolution, argv, **{"--apikey": {"default": "test-apikey"}})


if __name__ == "__main__":
    main()
