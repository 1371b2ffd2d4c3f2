"""Fake WhatsApp Cloud API (Graph) server: ``POST /{version}/{phone_number_id}/messages``.

Records every accepted send (to, text, reply-to context id, provider id) in ``sent`` and at
``GET /_sent``. Faults: latency, ``error_rate`` (500), ``timeout_rate``, a ``fail_status``
that fails every call (e.g. 500 for a while), and scripted Graph error codes returned by the
next calls in order (``script_errors(131056, 130429, 131047)``).

    python -m tests.fakes.whatsapp --port 9002 --error-rate 0.05
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.fakes.server import FakeServer, cli

#: Graph error code -> (HTTP status, title) as the Cloud API reports them.
GRAPH_ERRORS: dict[int, tuple[int, str]] = {
    131056: (400, "(Business Account, Consumer Account) pair rate limit hit"),
    130429: (400, "Rate limit hit"),
    131047: (400, "Re-engagement message"),
    131026: (400, "Message undeliverable"),
    100: (400, "Invalid parameter"),
    190: (401, "Invalid OAuth access token"),
    131000: (500, "Something went wrong"),
}


def graph_error(code: int) -> JSONResponse:
    status, title = GRAPH_ERRORS.get(code, (400, "Error"))
    return JSONResponse(
        {
            "error": {
                "message": f"({code}) {title}",
                "type": "OAuthException",
                "code": code,
                "error_data": {"messaging_product": "whatsapp", "details": title},
                "fbtrace_id": uuid.uuid4().hex[:20],
            }
        },
        status_code=status,
    )


class FakeWhatsApp(FakeServer):
    """Fake WhatsApp Cloud API."""

    def __init__(self, *, token: str = "test-token", **kw: Any) -> None:
        super().__init__(**kw)
        self.token = token
        self.fail_status: int = 0
        self.sent: list[dict[str, Any]] = []
        self.rejected: list[dict[str, Any]] = []
        self._script: deque[int] = deque()

    def script_errors(self, *codes: int) -> None:
        """The next ``len(codes)`` sends answer with these Graph error codes, in order."""
        self._script.extend(codes)

    def routes(self) -> list[Route]:
        async def get_sent(request: Request) -> JSONResponse:
            return JSONResponse({"sent": self.sent, "rejected": self.rejected})

        return [
            Route("/_sent", get_sent, methods=["GET"]),
            Route("/{version}/{phone_number_id}/messages", self.messages, methods=["POST"]),
        ]

    def server_error(self) -> JSONResponse:
        return graph_error(131000)

    async def messages(self, request: Request) -> JSONResponse:
        if request.headers.get("authorization") != f"Bearer {self.token}":
            return graph_error(190)
        body = await request.json()
        record = {
            "to": body.get("to", ""),
            "text": (body.get("text") or {}).get("body", ""),
            "context_message_id": (body.get("context") or {}).get("message_id", ""),
            "phone_number_id": request.path_params["phone_number_id"],
            "at": time.time(),
        }
        error = await self.disturb()
        if error is not None:
            self.rejected.append({**record, "code": 500})
            return error
        if self.fail_status:
            self.rejected.append({**record, "code": self.fail_status})
            return JSONResponse({"error": {"message": "injected", "code": 1}}, status_code=self.fail_status)
        if self._script:
            code = self._script.popleft()
            self.rejected.append({**record, "code": code})
            return graph_error(code)
        if body.get("messaging_product") != "whatsapp" or body.get("type") != "text" or not record["text"]:
            self.rejected.append({**record, "code": 100})
            return graph_error(100)
        if len(record["text"]) > 4096:
            self.rejected.append({**record, "code": 100})
            return graph_error(100)
        wamid = "wamid.FAKE" + uuid.uuid4().hex.upper()
        self.sent.append({**record, "id": wamid})
        return JSONResponse(
            {
                "messaging_product": "whatsapp",
                "contacts": [{"input": record["to"], "wa_id": record["to"]}],
                "messages": [{"id": wamid}],
            }
        )


def main(argv: list[str] | None = None) -> None:
    cli(FakeWhatsApp, argv, **{"--token": {"default": "test-token"}})


if __name__ == "__main__":
    main()
