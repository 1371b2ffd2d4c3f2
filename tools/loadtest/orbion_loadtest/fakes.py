"""The fakes as the load tool runs them: tests/fakes servers with cheap, paged read-outs.

Each fake runs in its own process (``python -m orbion_loadtest.fakes whatsapp|openai``), so
that answering the system's calls never competes with the generator's event loop. Over the
repository's fakes (tests/fakes, imported from the repository root) this adds:

- WhatsApp: ``GET /_sent_since?after=N`` -> the accepted sends from index N on (to, context id,
  text, receipt time), so the tool reads only what is new while a step runs;
- OpenAI: every successful completion gets a call number N, its reply text starts with
  ``[llm:N] `` and ``GET /_calls?after=N`` lists each call's duration. A reply carrying a marker
  already seen came from the llm-proxy's response cache; its duration is the LLM's own share
  of that message's end-to-end latency (stats.py subtracts it).

Prints ``READY <url>`` on stdout once listening. Leaves the protocol (and fault knobs such as
``POST /_faults {"latency_ms": 300}``) to tests/fakes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


def repo_root(start: Path | None = None) -> Path:
    """The repository that holds tests/fakes: from ``start`` (default: this file) upwards, else the cwd."""
    for folder in [*(start or Path(__file__).resolve()).parents, Path.cwd()]:
        if (folder / "tests" / "fakes" / "whatsapp.py").exists():
            return folder
    raise FileNotFoundError("tests/fakes not found: run the load tool from the ORBION repository")


def _import_fakes() -> tuple[type[Any], type[Any]]:
    root = str(repo_root())
    if root not in sys.path:
        sys.path.insert(0, root)
    from tests.fakes.openai import FakeOpenAI
    from tests.fakes.whatsapp import FakeWhatsApp

    return FakeWhatsApp, FakeOpenAI


def _after(request: Request) -> int:
    try:
        return max(0, int(request.query_params.get("after", "0")))
    except ValueError:
        return 0


def build(kind: str, **knobs: Any) -> Any:
    """An instrumented fake of ``kind`` (``whatsapp`` or ``openai``), not started."""
    fake_whatsapp, fake_openai = _import_fakes()

    class PagedWhatsApp(fake_whatsapp):  # type: ignore[misc, valid-type]
        def routes(self) -> list[Route]:
            async def sent_since(request: Request) -> JSONResponse:
                after = _after(request)
                rows = [
                    {"to": s["to"], "ctx": s["context_message_id"], "text": s["text"][:80], "at": s["at"]}
                    for s in self.sent[after:]
                ]
                return JSONResponse(
                    {"after": after, "total": len(self.sent), "sent": rows, "rejected": len(self.rejected)}
                )

            return [Route("/_sent_since", sent_since, methods=["GET"]), *super().routes()]

    class MarkedOpenAI(fake_openai):  # type: ignore[misc, valid-type]
        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw)
            self.calls_log: list[dict[str, float]] = []

        def routes(self) -> list[Route]:
            async def calls(request: Request) -> JSONResponse:
                after = _after(request)
                return JSONResponse(
                    {"after": after, "total": len(self.calls_log), "calls": self.calls_log[after:]}
                )

            return [Route("/_calls", calls, methods=["GET"]), *super().routes()]

        async def chat_completions(self, request: Request) -> Response:
            started = time.perf_counter()
            response: Response = await super().chat_completions(request)
            if response.status_code != 200:
                return response
            number = len(self.calls_log) + 1
            self.calls_log.append(
                {"n": number, "at": time.time(), "ms": round((time.perf_counter() - started) * 1000, 3)}
            )
            body = json.loads(bytes(response.body))
            message = body["choices"][0]["message"]
            try:
                content = json.loads(message["content"])
                content["reply"] = f"[llm:{number}] {content['reply']}"
                message["content"] = json.dumps(content, ensure_ascii=False)
            except (ValueError, TypeError, KeyError):
                message["content"] = f"[llm:{number}] {message['content']}"
            return JSONResponse(body)

    cls = PagedWhatsApp if kind == "whatsapp" else MarkedOpenAI
    return cls(**knobs)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run one instrumented fake for the load tool.")
    parser.add_argument("kind", choices=("whatsapp", "openai"))
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--token", default="loadtest-token")
    args = parser.parse_args(argv)
    knobs: dict[str, Any] = {"port": args.port, "latency_ms": args.latency_ms, "jitter_ms": args.jitter_ms}
    if args.kind == "whatsapp":
        knobs["token"] = args.token
    fake = build(args.kind, **knobs)

    async def run() -> None:
        async with fake as url:
            print(f"READY {url}", flush=True)
            await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        try:
            import uvloop
        except ImportError:
            asyncio.run(run())
        else:
            uvloop.run(run())


if __name__ == "__main__":
    main()
