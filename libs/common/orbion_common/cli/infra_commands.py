"""``orbion infra [start|stop|status]``: the local NATS, PostgreSQL and Redis servers.

Owns the terminal side (arguments, printing, waiting for Ctrl-C); ``orbion_common.infra``
does the work.
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path
from typing import Any

from orbion_common.infra import (
    SERVER_NAMES,
    InfraError,
    LocalInfra,
    configured_urls,
    probe,
    read_state,
    running_local_urls,
    stop_recorded,
)
from orbion_common.settings import CommonSettings

_ENV = {"nats": "ORBION_NATS_URL", "postgres": "ORBION_DATABASE_URL", "redis": "ORBION_REDIS_URL"}


def load_settings(args: argparse.Namespace) -> CommonSettings:
    """CommonSettings from the environment, with ``--data-dir`` applied when given."""
    settings = CommonSettings()
    data_dir: Path | None = getattr(args, "data_dir", None)
    if data_dir is not None:
        settings = settings.model_copy(update={"data_dir": data_dir})
    return settings


def register(subparsers: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", type=Path, default=None,
                        help="data folder (default: ORBION_DATA_DIR or .orbion)")
    ports = argparse.ArgumentParser(add_help=False)
    for name in SERVER_NAMES:
        ports.add_argument(f"--{name}-port", type=int, default=None,
                           help=f"port for local {name} (default: last run's port if free, else a free one)")
    ports.add_argument("--detach", action="store_true",
                       help="start, print the URLs and return, leaving the servers running")

    infra = subparsers.add_parser(
        "infra", parents=[common, ports],
        help="start/stop/status of local NATS, PostgreSQL and Redis",
        description="Start real local NATS (JetStream), PostgreSQL and Redis servers from the pip-installed "
        "binaries, in the data folder (kept between runs). Servers whose ORBION_*_URL is set are not "
        "started. Without an action: start in the foreground; Ctrl-C stops them.",
    )
    infra.set_defaults(handler=run_start)
    actions = infra.add_subparsers(dest="action", metavar="<action>")
    start = actions.add_parser(
        "start", parents=[common, ports], help="start local servers in the foreground (Ctrl-C stops them)",
        description="Start local NATS, PostgreSQL and Redis, wait until each answers, print their URLs; "
        "stay in the foreground until Ctrl-C or `orbion infra stop`, then stop them cleanly.",
    )
    start.set_defaults(handler=run_start)
    stop = actions.add_parser(
        "stop", parents=[common], help="stop the local servers started by `orbion infra`",
        description="Stop the local servers recorded in <data-dir>/infra.json (from any terminal).",
    )
    stop.set_defaults(handler=run_stop)
    status = actions.add_parser(
        "status", parents=[common], help="show which servers are configured, running and answering",
        description="Show, for NATS, PostgreSQL and Redis, the URL in use and whether it answers. "
        "Exit code 0 when all three are available.",
    )
    status.set_defaults(handler=run_status)


def print_urls(urls: dict[str, str]) -> None:
    for name in SERVER_NAMES:
        if name in urls:
            print(f"  {name:<9} {urls[name]}")
    print("  use them elsewhere with:")
    for name in SERVER_NAMES:
        if name in urls:
            print(f"    export {_ENV[name]}={urls[name]}")


def run_start(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    configured = configured_urls(settings)
    running = running_local_urls(settings.data_dir)
    missing = [s for s in SERVER_NAMES if s not in configured and s not in running]
    for name in SERVER_NAMES:
        if name in configured:
            print(f"{name}: configured by {_ENV[name]}, not started")
    if not missing:
        if running:
            print(f"local servers already running (data in {settings.data_dir}):")
            print_urls(running)
        return 0
    ports = {s: p for s in SERVER_NAMES if (p := getattr(args, f"{s}_port", None))}
    infra = LocalInfra(settings.data_dir, ports, servers=missing)
    # Handlers first: a Ctrl-C during start-up then stops the servers right after they answer.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"starting local {', '.join(missing)} in {infra.data_dir} ...", flush=True)
    try:
        infra.start()
    except InfraError as exc:
        print(f"error: {exc}")
        return 1
    print(f"ready in {infra.start_seconds:.1f} s:")
    print_urls({**running, **{s: infra.url(s) for s in missing}})
    if args.detach:
        infra.detach()
        print("detached; stop them with `orbion infra stop`")
        return 0
    print("Ctrl-C (or `orbion infra stop`) stops them.", flush=True)
    reported: set[str] = set()
    while not stop.wait(0.5):
        for name in missing:
            if not infra.is_running(name) and name not in reported:
                reported.add(name)
                log = infra.data_dir / "logs" / f"{name}.log"
                print(f"{name} exited unexpectedly; see {log}", flush=True)
    print("stopping ...", flush=True)
    infra.stop()
    print("stopped.")
    return 0


def run_stop(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    stopped = stop_recorded(settings.data_dir)
    print(f"stopped: {', '.join(stopped)}" if stopped else f"no local servers running in {settings.data_dir}")
    return 0


def run_status(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    configured = configured_urls(settings)
    state = read_state(settings.data_dir)
    ok = True
    print(f"data folder: {Path(settings.data_dir).absolute()}")
    for name in SERVER_NAMES:
        if name in configured:
            print(f"  {name:<9} configured  {configured[name]}")
            continue
        info = state.servers.get(name) if state else None
        alive = state.alive_servers() if state else {}
        if info is None or name not in alive:
            print(f"  {name:<9} stopped")
            ok = False
            continue
        answers = probe(name, int(info["port"]))
        ok = ok and answers
        print(f"  {name:<9} {'running' if answers else 'NOT ANSWERING'}  {info['url']}  pid {info['pid']}")
    return 0 if ok else 1
