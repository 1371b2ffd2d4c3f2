"""The ``orbion`` command line: one entry point for running, operating and testing ORBION.

Subcommands (``orbion <command> --help`` on each)::

    orbion infra [start|stop|status]   local NATS, PostgreSQL and Redis from pip binaries
    orbion up                          infra + migrations + all five services, prefixed logs
    orbion serve <service>             run one service in the foreground
    orbion migrate                     apply every installed service's migrations
    orbion send --phone N "text"       post a signed WhatsApp webhook, print the reply
    orbion bench|loadtest|rebuild ...  tools that live in the service and tool packages (below)

Owns argument parsing and dispatch; the work lives in ``orbion_common.infra`` and in the
modules of this package (``infra_commands``, ``services``, ``up``, ``send``, ``webhooks``).

Extension points, so that later tools need no change here:

* **Tools that live in other packages** (``bench``, ``loadtest``, ``rebuild``): declared in
  ``services.TOOLS``. ``orbion bench <service> [args]`` imports ``orbion_<service>.bench``
  (``-`` becomes ``_``) and calls its ``main(argv: list[str]) -> int | None`` with the rest of
  the arguments; named targets map to modules (``orbion bench events`` ->
  ``orbion_common.events.bench``); without a target the tool's default module runs
  (``orbion bench`` -> ``orbion_loadtest.bench``, ``orbion loadtest ...`` ->
  ``orbion_loadtest.cli``). A new tool of this kind is one ``Tool(...)`` entry there.
* **New top-level commands** from any installed distribution: an entry point in group
  ``orbion.commands`` whose value is ``register(subparsers) -> None``; it adds its parser with
  ``subparsers.add_parser(...)`` and sets ``handler=callable(args) -> int`` via ``set_defaults``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

from orbion_common.cli import infra_commands, send, services, up

ENTRY_POINT_GROUP = "orbion.commands"


def build_parser() -> argparse.ArgumentParser:
    """The full ``orbion`` argument parser (every subcommand registered)."""
    parser = argparse.ArgumentParser(
        prog="orbion",
        description="ORBION: WhatsApp AI sales agent backend. Run the system, its servers and tools.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    infra_commands.register(subparsers)
    up.register(subparsers)
    services.register(subparsers)
    send.register(subparsers)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``orbion``: parse ``argv`` and run the chosen command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) > 1 and argv[0] in services.TOOLS and argv[1:] not in (["-h"], ["--help"]):
        # Everything after the tool name belongs to the tool, options included
        # (`orbion bench --json`), which argparse's REMAINDER would refuse.
        return services.run_tool(argparse.Namespace(tool=argv[0], args=argv[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return int(handler(args) or 0)
    except KeyboardInterrupt:
        return 130
