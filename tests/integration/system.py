"""The whole system as real processes, for tests that cross services or kill them.

Each service runs as `python -m orbion_common.cli serve <service>` on its own free port, against
the test session's NATS, Postgres and Redis, in a stream and database schemas of its own so that
two systems never share state. Logs go to files under the test's folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from orbion_common.settings import SERVICES


def free_ports(count: int) -> list[int]:
    """``count`` ports free now, all different: each socket is held until all are chosen (one
    at a time, the kernel may hand out the same port twice)."""
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]


@dataclass
class System:
    nats_url: str
    database_url: str
    redis_url: str
    workdir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    services: tuple[str, ...] = SERVICES
    ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [name for name in SERVICES if name not in self.ports]
        self.ports.update(zip(missing, free_ports(len(missing)), strict=True))

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}"

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ORBION_")}
        env.update(
            ORBION_NATS_URL=self.nats_url,
            ORBION_DATABASE_URL=self.database_url,
            ORBION_REDIS_URL=self.redis_url,
            ORBION_DATA_DIR=str(self.workdir / "data"),
            ORBION_LOG_JSON="true",
            ORBION_DB_POOL_MAX="4",
        )
        for name, port in self.ports.items():
            env[f"ORBION_{name.upper().replace('-', '_')}_PORT"] = str(port)
        env.update(self.extra_env)
        return env

    def start(self, names: Iterable[str] | None = None) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for name in names or self.services:
            log = (self.workdir / f"{name}.log").open("ab")
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "orbion_common.cli", "serve", name],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill(self, name: str) -> None:
        """SIGKILL: no drain, no goodbye, as in a crash or an OOM kill."""
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.procs.clear()

    def logs(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    async def wait_ready(self, names: Iterable[str] | None = None, timeout: float = 60.0) -> None:  # noqa: ASYNC109
        pending = set(names or self.services)
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=2.0) as client:
            while pending:
                for name in list(pending):
                    proc = self.procs.get(name)
                    if proc is not None and proc.poll() is not None:
                        raise AssertionError(
                            f"{name} exited with {proc.returncode}:\n{self.logs(name)[-3000:]}"
                        )
                    try:
                        resp = await client.get(self.url(name) + "/readyz")
                    except httpx.HTTPError:
                        continue
                    # Another process on the port (the service could not bind it) is not the service.
                    if resp.status_code == 200 and resp.json().get("service") == name:
                        pending.discard(name)
                if pending and time.monotonic() > deadline:
                    tails = "\n".join(f"--- {n}\n{self.logs(n)[-2000:]}" for n in pending)
                    raise AssertionError(f"not ready after {timeout}s: {sorted(pending)}\n{tails}")
                await asyncio.sleep(0.2)
