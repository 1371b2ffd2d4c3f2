"""``orbion serve``, ``orbion migrate`` and the per-package tools (``bench``, ``loadtest``, ``rebuild``).

Owns finding a service's modules by convention (``orbion_<svc>.bootstrap``, ``orbion_<svc>.bench``,
...) and calling their contract functions: ``bootstrap.main()``, ``async bootstrap.migrate(settings)
-> list[str]``, ``<tool>.main(argv) -> int | None``. The services own what those functions do.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import inspect
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from orbion_common.infra import InfraError, InfraUrls, resolve_urls
from orbion_common.settings import SERVICES, CommonSettings


@dataclass(frozen=True)
class Tool:
    """A command whose work lives in other packages: ``orbion <name> [target] [args...]``.

    ``target`` a service name -> ``orbion_<svc>.<per_service>``; a key of ``targets`` -> that
    module; anything else (or nothing) -> ``default`` with all arguments. Each module has
    ``main(argv: list[str]) -> int | None``.
    """

    purpose: str
    per_service: str | None = None
    targets: Mapping[str, str] = field(default_factory=dict)
    default: str | None = None


TOOLS: dict[str, Tool] = {
    "bench": Tool(
        "benchmarks: the system's before/after figures, or one service's micro-benchmarks",
        per_service="bench",
        targets={"events": "orbion_common.events.bench", "bus": "orbion_common.busbench"},
        default="orbion_loadtest.bench",
    ),
    "loadtest": Tool(
        "load test (ladder, soak, spike) against a system with fakes", default="orbion_loadtest.cli"
    ),
    "rebuild": Tool("drop and rebuild a service's projections from its event store", per_service="rebuild"),
}


def package_name(target: str) -> str:
    """``llm-proxy`` -> ``orbion_llm_proxy``; ``common`` -> ``orbion_common``."""
    return "orbion_" + target.replace("-", "_")


def find_module(target: str, module: str) -> ModuleType | None:
    """Import ``orbion_<target>.<module>``; None when the package or module is not installed.

    An installed module that fails to import raises: a broken service must not look absent.
    """
    package = package_name(target)
    try:
        if importlib.util.find_spec(package) is None:
            return None
        if importlib.util.find_spec(f"{package}.{module}") is None:
            return None
    except ModuleNotFoundError:
        return None
    return importlib.import_module(f"{package}.{module}")


def installed_services() -> list[str]:
    """Services whose ``bootstrap`` module is installed, in SERVICES order."""
    return [svc for svc in SERVICES if find_module(svc, "bootstrap") is not None]


def service_settings(service: str, urls: InfraUrls) -> CommonSettings:
    """The service's own Settings (``orbion_<svc>.settings.Settings``) pointed at ``urls``."""
    module = find_module(service, "settings")
    cls: type[CommonSettings] = getattr(module, "Settings", CommonSettings) if module else CommonSettings
    return cls(nats_url=urls.nats_url, database_url=urls.database_url, redis_url=urls.redis_url)


async def migrate_all(urls: InfraUrls, services: list[str] | None = None) -> dict[str, list[str]]:
    """Run ``migrate(settings)`` of every installed service; returns the applied files by service."""
    applied: dict[str, list[str]] = {}
    for svc in services if services is not None else list(SERVICES):
        module = find_module(svc, "bootstrap")
        migrate = getattr(module, "migrate", None) if module else None
        if migrate is None:
            continue
        result = migrate(service_settings(svc, urls))
        done = await result if inspect.isawaitable(result) else result
        applied[svc] = list(done or [])
    return applied


def register(subparsers: Any) -> None:
    serve = subparsers.add_parser(
        "serve", help="run one service in the foreground",
        description="Run one service (its bootstrap.main()) until SIGTERM/Ctrl-C. Unset ORBION_*_URL "
        "variables are taken from the local servers of `orbion infra` when they run.",
    )
    serve.add_argument("service", choices=SERVICES, help="service to run")
    serve.set_defaults(handler=run_serve)

    migrate = subparsers.add_parser(
        "migrate", help="apply the database migrations of every installed service",
        description="Create each service's schema and apply its versioned SQL migrations (idempotent). "
        "Uses ORBION_DATABASE_URL, else the running local infra, else starts it for the duration.",
    )
    migrate.add_argument("services", nargs="*", default=[], metavar="service",
                         help=f"only these services, of {', '.join(SERVICES)} (default: all installed)")
    migrate.set_defaults(handler=run_migrate)

    for name, tool in TOOLS.items():
        choices = [*(SERVICES if tool.per_service else ()), *tool.targets]
        purpose = tool.purpose[0].upper() + tool.purpose[1:]
        if choices:
            default = f"without one, {tool.default} runs" if tool.default else "a target is required"
            description = (
                f"{purpose}. Targets: {', '.join(choices)}; {default}. Arguments after the target go to "
                f"that tool: `orbion {name} <target> --help` shows its options."
            )
        else:
            description = f"{purpose}. Runs {tool.default}; every argument goes to it."
        parser = subparsers.add_parser(
            name, help=tool.purpose, description=description,
            usage=f"orbion {name} [target] [args ...]" if choices else f"orbion {name} [args ...]",
        )
        parser.add_argument("args", nargs=argparse.REMAINDER, help="target and the tool's own arguments")
        parser.set_defaults(handler=run_tool, tool=name)


def run_serve(args: argparse.Namespace) -> int:
    module = find_module(args.service, "bootstrap")
    if module is None:
        print(f"error: service {args.service} is not installed ({package_name(args.service)}.bootstrap)")
        return 2
    _export_local_urls()
    module.main()
    return 0


def _export_local_urls() -> None:
    """Point this process at the running local infra for every ORBION_*_URL not set.

    This is the process entry point (the service reads its settings right after), so setting
    the environment here is the configuration, not a side channel.
    """
    settings = CommonSettings()
    try:
        urls, _ = resolve_urls(settings, start=False)
    except InfraError:
        return  # the service reports what is missing in its readiness check
    for key, value in urls.as_env().items():
        os.environ.setdefault(key, value)


def run_migrate(args: argparse.Namespace) -> int:
    unknown = [s for s in args.services if s not in SERVICES]
    if unknown:
        print(f"error: unknown service(s) {', '.join(unknown)}; expected {', '.join(SERVICES)}")
        return 2
    settings = CommonSettings()
    try:
        urls, started = resolve_urls(settings, start=True)
    except InfraError as exc:
        print(f"error: {exc}")
        return 1
    try:
        applied = asyncio.run(migrate_all(urls, args.services or None))
    finally:
        if started is not None:
            started.stop()
    if not applied:
        print("no installed service has migrations")
    for svc, files in applied.items():
        print(f"{svc}: applied {', '.join(files)}" if files else f"{svc}: up to date")
    return 0


def tool_module(name: str, argv: list[str]) -> tuple[str | None, list[str]]:
    """The module that runs ``orbion <name> argv`` and the arguments it gets."""
    tool = TOOLS[name]
    if argv and tool.per_service and argv[0] in SERVICES:
        return f"{package_name(argv[0])}.{tool.per_service}", argv[1:]
    if argv and argv[0] in tool.targets:
        return tool.targets[argv[0]], argv[1:]
    return tool.default, argv


def run_tool(args: argparse.Namespace) -> int:
    module_name, argv = tool_module(args.tool, list(args.args))
    if module_name is None:
        print(f"error: `orbion {args.tool}` needs a target: {', '.join(SERVICES)}")
        return 2
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            print(f"error: {module_name} is not installed")
            return 2
        raise
    result = module.main(argv)
    return int(result or 0)
