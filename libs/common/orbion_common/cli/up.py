"""``orbion up``: the whole system in one terminal.

Owns the sequence infra -> migrations -> five service processes, their prefixed log lines, the
readiness wait, one restart of a service that dies, and the orderly stop on Ctrl-C/SIGTERM:
SIGTERM to the services (each drains: stops fetching, finishes in-flight handlers, so nothing
acknowledged is lost), wait, then stop the local servers if this command started them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from orbion_common.cli.services import installed_services, migrate_all
from orbion_common.infra import InfraError, InfraUrls, resolve_urls
from orbion_common.settings import SERVICES, CommonSettings

_COLORS = {
    "gateway": "36", "conversation": "32", "lead": "35", "llm-proxy": "33", "monitor": "34", "orbion": "1",
}
_WIDTH = max(len(s) for s in (*SERVICES, "orbion"))
_STOP_STAGES = (0, 1, 2)


def _stage_of(service: str) -> int:
    return {"gateway": 0, "monitor": 2}.get(service, 1)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "up", help="start everything: infra, migrations and all five services",
        description="Start local NATS, PostgreSQL and Redis (unless ORBION_*_URL are set), apply "
        "migrations, then run all five services (those installed) as child processes with prefixed "
        "logs; print "
        "their URLs and wait until each /readyz answers 200. Ctrl-C stops the services gracefully, "
        "then the local servers.",
    )
    parser.add_argument("services", nargs="*", default=[], metavar="service",
                        help=f"only these services, of {', '.join(SERVICES)} (default: all installed)")
    parser.add_argument("--ready-timeout", type=float, default=90.0,
                        help="seconds to wait for every /readyz before warning (default 90)")
    # As docker-compose.yml's stop_grace_period: HTTP, in-flight events, then the loops and the relay.
    parser.add_argument("--grace", type=float, default=45.0,
                        help="seconds a service gets to drain on stop before it is killed (default 45)")
    parser.set_defaults(handler=run_up)


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def serve_command(service: str) -> list[str]:
    """The child process command line that runs ``service``."""
    return [sys.executable, "-m", "orbion_common.cli", "serve", service]


class Printer:
    def __init__(self) -> None:
        self.color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")

    def line(self, who: str, text: str) -> None:
        prefix = f"{who:<{_WIDTH}} |"
        if self.color:
            prefix = f"\x1b[{_COLORS.get(who, '0')}m{prefix}\x1b[0m"
        print(f"{prefix} {text}", flush=True)


@dataclass
class _Child:
    service: str
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    ready: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class Supervisor:
    """Runs services as child processes and keeps an eye on them."""

    def __init__(
        self, services: list[str], env: dict[str, str], out: Printer,
        command: Callable[[str], list[str]] | None = None,
    ) -> None:
        self.children = {svc: _Child(svc) for svc in services}
        self.env = env
        self.out = out
        self.command = command or serve_command
        self.stopping = False
        self.failed: set[str] = set()

    async def start_all(self) -> None:
        for child in self.children.values():
            await self._spawn(child)

    async def _spawn(self, child: _Child) -> None:
        child.ready = False
        child.process = await asyncio.create_subprocess_exec(
            *self.command(child.service),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env=self.env,
            # Own session: a terminal Ctrl-C reaches only `orbion up`, which then stops the
            # services in order (SIGTERM, drain) instead of all of them dying at once.
            start_new_session=True,
        )
        child.tasks = [
            asyncio.create_task(self._pump(child, child.process)),
            asyncio.create_task(self._watch(child, child.process)),
        ]

    async def _pump(self, child: _Child, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        while line := await process.stdout.readline():
            self.out.line(child.service, line.decode(errors="replace").rstrip())

    async def _watch(self, child: _Child, process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        if self.stopping:
            return
        self.out.line("orbion", f"{child.service} exited with code {code}")
        if child.restarts == 0:
            child.restarts += 1
            self.out.line("orbion", f"restarting {child.service} once")
            await self._spawn(child)
        else:
            self.failed.add(child.service)
            self.out.line("orbion", f"{child.service} died again; not restarting it")

    async def stop_all(self, grace: float) -> None:
        """SIGTERM in stages: the gateway first (no new work comes in), then the event
        handlers, the monitor last (it receives everyone's final traces)."""
        self.stopping = True
        for stage in _STOP_STAGES:
            children = [c for c in self.children.values() if _stage_of(c.service) == stage]
            await self._stop_stage(children, grace)
        for child in self.children.values():
            for task in child.tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(task, 2)

    async def _stop_stage(self, children: list[_Child], grace: float) -> None:
        live = [c for c in children if c.process is not None and c.process.returncode is None]
        for child in live:
            assert child.process is not None
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)

        async def wait_one(child: _Child) -> None:
            assert child.process is not None
            try:
                code = await asyncio.wait_for(child.process.wait(), grace)
                self.out.line("orbion", f"{child.service} stopped (exit code {code})")
            except TimeoutError:
                self.out.line("orbion", f"{child.service} did not stop in {grace:.0f} s; killing it")
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()
                await child.process.wait()

        await asyncio.gather(*(wait_one(c) for c in live))

    async def wait_ready(self, settings: CommonSettings, within: float, stop: asyncio.Event) -> bool:
        """Poll every /readyz until all answer 200 (True) or ``within`` seconds pass (False)."""
        deadline = time.monotonic() + within
        async with httpx.AsyncClient(timeout=2.0) as client:
            while not stop.is_set():
                for child in self.children.values():
                    if child.ready:
                        continue
                    with contextlib.suppress(httpx.HTTPError):
                        resp = await client.get(settings.service_url(child.service) + "/readyz")
                        if resp.status_code == 200:
                            child.ready = True
                            self.out.line("orbion", f"{child.service} ready")
                if all(c.ready for c in self.children.values()):
                    return True
                if time.monotonic() > deadline:
                    return False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.3)
        return False


def run_up(args: argparse.Namespace) -> int:
    return asyncio.run(_up(args))


async def _up(args: argparse.Namespace) -> int:
    out = Printer()
    began = time.monotonic()
    settings = CommonSettings()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    unknown = [s for s in args.services if s not in SERVICES]
    if unknown:
        out.line("orbion", f"unknown service(s) {', '.join(unknown)}; expected {', '.join(SERVICES)}")
        return 2
    busy = [s for s in (args.services or SERVICES) if not _port_free(settings.host, settings.service_port(s))]
    if busy:
        ports = ", ".join(f"{s} {settings.service_port(s)}" for s in busy)
        out.line("orbion", f"error: port(s) already in use: {ports}. Another `orbion up`? "
                 "Stop it, or set ORBION_<SERVICE>_PORT.")
        return 1
    out.line("orbion", "resolving NATS, PostgreSQL and Redis ...")
    try:
        urls, infra = await asyncio.to_thread(resolve_urls, settings)
    except InfraError as exc:
        out.line("orbion", f"error: {exc}")
        return 1
    if infra is not None:
        out.line("orbion", f"started local {', '.join(infra.servers)} in {infra.start_seconds:.1f} s "
                 f"(data in {infra.data_dir})")
    for name, url in (("nats", urls.nats_url), ("postgres", urls.database_url), ("redis", urls.redis_url)):
        out.line("orbion", f"  {name:<9} {url}")
    try:
        return await _run_services(args, settings, urls, out, stop, began)
    finally:
        if infra is not None:
            out.line("orbion", "stopping local servers ...")
            await asyncio.to_thread(infra.stop)
            out.line("orbion", "stopped.")


async def _run_services(
    args: argparse.Namespace, settings: CommonSettings, urls: InfraUrls, out: Printer,
    stop: asyncio.Event, began: float,
) -> int:
    available = installed_services()
    services = [s for s in (args.services or available) if s in available]
    for svc in args.services or SERVICES:
        if svc not in available:
            out.line("orbion", f"{svc}: not installed (no orbion_{svc.replace('-', '_')}.bootstrap), skipped")
    applied = await migrate_all(urls, services)
    for svc, files in applied.items():
        out.line("orbion", f"{svc}: migrations up to date" + (f" ({len(files)} applied)" if files else ""))
    if not services:
        out.line("orbion", "no service installed; nothing to run (infra stays up until Ctrl-C)")
    # On a developer's machine every message is traced, so the dashboard shows each one.
    env = {"ORBION_TRACE_SAMPLE_RATIO": "1", **os.environ, **urls.as_env(), "PYTHONUNBUFFERED": "1"}
    if "monitor" in services and not settings.otlp_endpoint:
        # Traces of every service go to the monitor unless an OTLP endpoint is configured.
        env["ORBION_OTLP_ENDPOINT"] = settings.service_url("monitor") + "/v1/traces"
    supervisor = Supervisor(services, env, out)
    try:
        await supervisor.start_all()
        for svc in services:
            out.line("orbion", f"{svc:<13} {settings.service_url(svc)}")
        if services:
            ready = await supervisor.wait_ready(settings, args.ready_timeout, stop)
            if ready:
                out.line("orbion", f"all {len(services)} services ready in {time.monotonic() - began:.1f} s "
                         "(Ctrl-C stops everything)")
            elif not stop.is_set():
                late = [c.service for c in supervisor.children.values() if not c.ready]
                out.line("orbion", f"not ready after {args.ready_timeout:.0f} s: {', '.join(late)}")
        await stop.wait()
        out.line("orbion", "stopping services (they drain in-flight work) ...")
    finally:
        await supervisor.stop_all(args.grace)
    return 1 if supervisor.failed else 0
