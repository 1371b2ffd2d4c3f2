"""Real NATS (JetStream), PostgreSQL and Redis for a test session.

Resolution, per server:

1. ``ORBION_TEST_NATS_URL`` / ``ORBION_TEST_DATABASE_URL`` / ``ORBION_TEST_REDIS_URL`` when set;
2. else testcontainers, when a Docker engine answers a ping within a second
   (``ORBION_TEST_DOCKER=0`` skips this step);
3. else the pip-installed binaries through :class:`orbion_common.infra.LocalInfra`, in a fresh
   temporary data folder on free ports (what CI uses), stopped and deleted at session end.

Owns starting and stopping those servers; the fixtures themselves live in the root conftest.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import psutil

from orbion_common.infra import (
    SERVER_NAMES,
    InfraError,
    InfraUrls,
    LocalInfra,
    read_state,
    stop_recorded,
)

TEST_ENV = {
    "nats": "ORBION_TEST_NATS_URL", "postgres": "ORBION_TEST_DATABASE_URL", "redis": "ORBION_TEST_REDIS_URL",
}


@dataclass
class TestServers:
    """The servers of one test session and how to let them go."""

    __test__ = False  # not a test class, despite the name

    urls: InfraUrls
    sources: dict[str, str]  # server -> "env" | "docker" | "local"
    _closers: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        while self._closers:
            with contextlib.suppress(Exception):
                self._closers.pop()()

    def describe(self) -> str:
        return ", ".join(f"{name} from {self.sources[name]}" for name in SERVER_NAMES)


def env_urls() -> dict[str, str]:
    """Servers given by ORBION_TEST_* variables."""
    return {name: os.environ[var] for name, var in TEST_ENV.items() if os.environ.get(var)}


def docker_engine_answers(timeout: float = 1.0) -> bool:
    """True when a Docker engine answers ``/_ping`` quickly; never hangs when there is none."""
    if os.environ.get("ORBION_TEST_DOCKER", "").lower() in {"0", "false", "no"}:
        return False
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        if host.startswith("unix://"):
            path = host[len("unix://"):]
            if not os.path.exists(path):
                return False
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(path)
        elif host.startswith("tcp://"):
            parsed = urlparse(host)
            sock = socket.create_connection((parsed.hostname or "localhost", parsed.port or 2375), timeout)
            if os.environ.get("DOCKER_TLS_VERIFY"):
                sock.close()
                return True  # TLS engine reachable; testcontainers does the handshake
        else:
            return False
        with sock:
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return b" 200 " in sock.recv(256)
    except OSError:
        return False


def start_test_servers(root: Path | None = None) -> TestServers:
    """Resolve every server (env, docker, pip binaries); the caller must ``close()`` the result."""
    urls = env_urls()
    sources = dict.fromkeys(urls, "env")
    servers = TestServers(InfraUrls("", "", ""), sources)
    missing = [s for s in SERVER_NAMES if s not in urls]
    try:
        if missing and docker_engine_answers():
            for name in missing:
                urls[name] = _start_container(name, servers)
                sources[name] = "docker"
            missing = []
        if missing:
            infra = start_local_infra(root, servers=missing)
            servers._closers.append(lambda: stop_local_infra(infra))
            for name in missing:
                urls[name] = infra.url(name)
                sources[name] = "local"
    except BaseException:
        servers.close()
        raise
    servers.urls = InfraUrls(urls["nats"], urls["postgres"], urls["redis"])
    return servers


def reap_stale_test_folders(root: Path | None = None, *, older_than: float = 3600.0) -> list[Path]:
    """Stop servers and delete folders left by test sessions that were killed (SIGKILL, OOM).

    A folder whose owner process is alive belongs to a running session and is left alone.
    """
    reaped: list[Path] = []
    base = Path(root or tempfile.gettempdir())
    for folder in base.glob("orbion-test-*"):
        state = read_state(folder)
        if state is not None:
            if state.owner_pid and psutil.pid_exists(state.owner_pid):
                continue
            stop_recorded(folder, timeout=10)
        elif time.time() - folder.stat().st_mtime < older_than:
            continue  # maybe a session still starting up
        shutil.rmtree(folder, ignore_errors=True)
        reaped.append(folder)
    return reaped


def start_local_infra(root: Path | None = None, *, servers: list[str] | None = None) -> LocalInfra:
    """A LocalInfra in a fresh temporary folder, on free ports, started (fsync off: throwaway data)."""
    with contextlib.suppress(OSError):
        reap_stale_test_folders(root)
    for attempt in range(3):
        data_dir = Path(tempfile.mkdtemp(prefix="orbion-test-", dir=root))
        infra = LocalInfra(data_dir, servers=servers or list(SERVER_NAMES), durable=False)
        try:
            infra.start()
            return infra
        except InfraError:
            shutil.rmtree(data_dir, ignore_errors=True)
            # Another session may have taken a "free" port between our pick and the bind.
            if attempt == 2:
                raise
        except BaseException:
            shutil.rmtree(data_dir, ignore_errors=True)
            raise
    raise AssertionError("unreachable")


def stop_local_infra(infra: LocalInfra) -> None:
    """Stop the servers and delete their temporary data folder."""
    try:
        infra.stop(timeout=15)
    finally:
        shutil.rmtree(infra.data_dir, ignore_errors=True)


# --------------------------------------------------------------------------- docker


_IMAGES: dict[str, tuple[str, int, str, int]] = {
    # server: (image, port, log line meaning "ready", times it must appear)
    "nats": ("nats:2.10-alpine", 4222, "Server is ready", 1),
    # The postgres image starts once for init, stops, then starts for real: wait for the 2nd.
    "postgres": ("postgres:16-alpine", 5432, "database system is ready to accept connections", 2),
    "redis": ("redis:7-alpine", 6379, "Ready to accept connections", 1),
}


def _start_container(name: str, servers: TestServers) -> str:
    from testcontainers.core.container import DockerContainer

    image, port, ready_line, times = _IMAGES[name]
    container: Any = DockerContainer(image).with_exposed_ports(port)
    if name == "nats":
        container = container.with_command("-js")
    elif name == "postgres":
        container = container.with_env("POSTGRES_HOST_AUTH_METHOD", "trust").with_env("POSTGRES_DB", "orbion")
    elif name == "redis":
        container = container.with_command("redis-server --appendonly yes")
    container.start()
    servers._closers.append(container.stop)
    _wait_for_log(container, ready_line, times, timeout=60)
    host = container.get_container_host_ip()
    mapped = container.get_exposed_port(port)
    return {
        "nats": f"nats://{host}:{mapped}",
        "postgres": f"postgresql://postgres@{host}:{mapped}/orbion",
        "redis": f"redis://{host}:{mapped}/0",
    }[name]


def _wait_for_log(container: Any, text: str, times: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out, err = container.get_logs()
        if (out + err).decode(errors="replace").count(text) >= times:
            return
        time.sleep(0.2)
    raise TimeoutError(f"container {container} did not log {text!r} in {timeout:.0f} s")
