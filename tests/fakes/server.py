"""What every fake shares: fault knobs, running a Starlette app on a free port, and a CLI."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import socket
from collections.abc import Sequence
from dataclasses import dataclass, fields
from types import TracebackType
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


class FakeJSONResponse(JSONResponse):
    """A JSONResponse rendered by orjson: the same compact UTF-8 JSON, a fraction of the CPU.

    A fake shares the machine's cores with the client it serves in benchmarks, so its own cost
    per request caps the figures measured through it.
    """

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


@dataclass
class Faults:
    """Knobs every fake understands; change them on a running fake (attribute or POST /_faults)."""

    latency_ms: float = 0.0  # added before each answer
    jitter_ms: float = 0.0  # uniform extra latency in [0, jitter_ms]
    error_rate: float = 0.0  # share of calls answered with a 500
    timeout_rate: float = 0.0  # share of calls that hang for hang_s (a client timeout)
    hang_s: float = 30.0

    def update(self, values: dict[str, Any]) -> None:
        names = {f.name for f in fields(self)}
        for key, value in values.items():
            if key in names:
                setattr(self, key, float(value))


class FakeServer:
    """Base: subclasses implement :meth:`routes`; ``async with`` runs it and returns the base URL."""

    url_suffix = ""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, **faults: float) -> None:
        self.host = host
        self.port = port
        self.faults = Faults()
        self.faults.update(faults)
        self.calls = 0
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._rng = random.Random(7)

    # -- subclass API ------------------------------------------------------------------------

    def routes(self) -> list[Route]:
        raise NotImplementedError

    async def disturb(self) -> JSONResponse | None:
        """Apply latency, hangs and random 500s; returns the error response to send, if any."""
        self.calls += 1
        f = self.faults
        delay = f.latency_ms + (self._rng.uniform(0, f.jitter_ms) if f.jitter_ms else 0.0)
        if delay > 0:
            await asyncio.sleep(delay / 1000)
        if f.timeout_rate and self._rng.random() < f.timeout_rate:
            await asyncio.sleep(f.hang_s)
        if f.error_rate and self._rng.random() < f.error_rate:
            return self.server_error()
        return None

    def server_error(self) -> JSONResponse:
        return JSONResponse({"error": {"message": "injected failure", "code": 500}}, status_code=500)

    # -- running -------------------------------------------------------------------------------

    def app(self) -> Starlette:
        async def set_faults(request: Request) -> JSONResponse:
            self.faults.update(await request.json())
            return JSONResponse(vars(self.faults))

        return Starlette(routes=[*self.routes(), Route("/_faults", set_faults, methods=["POST"])])

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}{self.url_suffix}"

    async def __aenter__(self) -> str:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        # Keep-alive longer than any client's idle expiry (httpx and the OpenAI SDK: 5 s, like
        # uvicorn's default): with equal values the server may close an idle connection just as
        # the client reuses it, a spurious connection error. No proxy-header rewriting needed.
        config = uvicorn.Config(
            self.app(), log_level="warning", lifespan="off", access_log=False, http="auto", loop="none",
            timeout_keep_alive=75, proxy_headers=False,
        )  # fmt: skip
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        for _ in range(500):
            if self._server.started:
                break
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)
        return self.base_url

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            self._server.force_exit = True  # hung requests (timeout faults) must not hold the test
            await self._task


def cli(fake_cls: type[FakeServer], argv: Sequence[str] | None = None, **extra: Any) -> None:
    """``python -m tests.fakes.<name> --port N --latency-ms 300 --error-rate 0.1``."""
    parser = argparse.ArgumentParser(description=fake_cls.__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--error-rate", type=float, default=0.0)
    parser.add_argument("--timeout-rate", type=float, default=0.0)
    for flag, kw in extra.items():
        parser.add_argument(flag, **kw)
    args = vars(parser.parse_args(argv))
    host, port = args.pop("host"), args.pop("port")
    knobs = {k: args.pop(k) for k in ("latency_ms", "jitter_ms", "error_rate", "timeout_rate")}
    fake = fake_cls(host=host, port=port, **knobs)
    for key, value in args.items():
        setattr(fake, key, value)

    async def run() -> None:
        async with fake as url:
            print(f"{fake_cls.__name__} listening on {url}", flush=True)
            await asyncio.Event().wait()

    try:
        import uvloop

        loop_factory: Any = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(run())
