"""``orbion loadtest``: the ladder, soak and spike runs, and the fakes for a system you started.

    orbion loadtest                          the ladder on a system this command starts
    orbion loadtest ladder --step-seconds 20 --second-steps 10,50,100
    orbion loadtest soak --rate 50 --minutes 10
    orbion loadtest spike --rate 20 --factor 10
    orbion loadtest fakes                    run the instrumented fakes; prints the env for `orbion up`
    orbion loadtest ladder --gateway-url http://127.0.0.1:8080 --whatsapp-fake-url http://127.0.0.1:9002 \\
        --openai-fake-url http://127.0.0.1:9001 --service monitor=http://127.0.0.1:8084 ...

Without ``--gateway-url`` the command starts everything itself (stack.py): a JetStream server
of its own, Postgres and Redis as configured (``ORBION_*_URL``) or from ``orbion infra``, a
fresh database, the fakes and the five services. Owns argument parsing; which step
comes next is ladder.py's, measuring runner.py's, formatting report.py's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from . import ladder, report
from .fakes import repo_root
from .runner import Runner, Slo, StepPlan
from .scenarios import Scenario
from .schedule import constant, ladder_rates, spike
from .stack import API_KEY, APP_SECRET, PHONE_NUMBER_ID, WHATSAPP_TOKEN, Stack, Target, spawn_fake

COMMANDS = ("ladder", "soak", "spike", "fakes")
_ACTIVE: list[Stack] = []  # the stack being run, so that Ctrl-C can still stop its processes


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orbion loadtest",
        description=__doc__.split("\n\n")[0] if __doc__ else "",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--results", default="results", help="folder for the run's reports (default results/)")
        p.add_argument("--seed", type=int, default=1)
        p.add_argument("--poisson", action="store_true", help="Poisson arrivals instead of evenly spaced")
        p.add_argument("--slo-p99-ms", type=float, default=1000.0, help="pipeline p99 SLO (default 1000)")
        p.add_argument("--slo-error-rate", type=float, default=0.001, help="error-rate SLO (default 0.001)")
        p.add_argument(
            "--drain-timeout",
            type=float,
            default=60.0,
            help="give up waiting for due replies after this many seconds without a new one (default 60)",
        )
        p.add_argument(
            "--drain-max",
            type=float,
            default=600.0,
            help="longest wait for due replies after a step (default 600)",
        )
        p.add_argument(
            "--history-sample",
            type=int,
            default=100,
            help="contacts whose history is checked per step (default 100)",
        )
        p.add_argument("--no-progress", action="store_true", help="no live progress bar")
        p.add_argument(
            "--json", action="store_true", help="print the run summary as one JSON object, last line"
        )
        p.add_argument("--docs", default="", help="also write the Markdown report to this file")
        g = p.add_argument_group("a system this command starts (default)")
        g.add_argument("--openai-latency-ms", type=float, default=0.0, help="fake OpenAI latency (default 0)")
        g.add_argument("--quiet-period", type=float, default=1.5, help="ORBION_REPLY_QUIET_PERIOD_SECONDS")
        g.add_argument("--log-level", default="WARNING", help="services' ORBION_LOG_LEVEL (default WARNING)")
        g.add_argument(
            "--no-traces", action="store_true", help="services do not export traces to the monitor"
        )
        g.add_argument(
            "--env", action="append", default=[], metavar="NAME=VALUE", help="extra service setting"
        )
        g.add_argument("--workdir", default="", help="folder for service logs (default: a temporary one)")
        g.add_argument("--keep-database", action="store_true", help="keep the run's database for analysis")
        t = p.add_argument_group("a running system (when --gateway-url is given)")
        t.add_argument("--gateway-url", default="")
        t.add_argument(
            "--whatsapp-fake-url", default="", help="instrumented WhatsApp fake (`orbion loadtest fakes`)"
        )
        t.add_argument("--openai-fake-url", default="", help="instrumented OpenAI fake, without /v1")
        t.add_argument(
            "--service",
            action="append",
            default=[],
            metavar="NAME=URL",
            help="a service's base URL (for /metrics, history checks, monitor)",
        )
        t.add_argument("--app-secret", default=os.environ.get("ORBION_WHATSAPP_APP_SECRET", ""))
        t.add_argument("--api-key", default=os.environ.get("ORBION_LOADTEST_API_KEY", ""))
        t.add_argument(
            "--pid", action="append", default=[], metavar="NAME=PID", help="a service's pid (psutil)"
        )

    ladder_cmd = sub.add_parser("ladder", help="steps up the rate until the SLO breaks")
    common(ladder_cmd)
    ladder_cmd.add_argument("--minute-steps", default="10,50,100,200", help="the plan's msg/min steps")
    ladder_cmd.add_argument("--second-steps", default="10,50,100,250,500,1000,2000", help="then msg/s steps")
    ladder_cmd.add_argument(
        "--step-seconds", type=float, default=30.0, help="duration of each step (default 30)"
    )
    ladder_cmd.add_argument("--max-rate", type=float, default=0.0, help="stop after this msg/s")
    ladder_cmd.add_argument(
        "--keep-going", action="store_true", help="run every step even after the SLO broke"
    )
    ladder_cmd.add_argument(
        "--no-confirm",
        dest="confirm",
        action="store_false",
        help="a step that breaks is not run a second time",
    )
    ladder_cmd.add_argument(
        "--refine",
        type=int,
        default=3,
        metavar="N",
        help="after the first break, up to N steps halving the gap between the highest rate that "
        "held and the lowest that broke (default 3; 0: none)",
    )

    soak = sub.add_parser("soak", help="a fixed rate for N minutes")
    common(soak)
    soak.add_argument("--rate", type=float, default=50.0, help="msg/s (default 50)")
    soak.add_argument("--minutes", type=float, default=10.0)

    sp = sub.add_parser("spike", help="base rate, 10x for 30 s, base rate")
    common(sp)
    sp.add_argument("--rate", type=float, default=20.0, help="base msg/s (default 20)")
    sp.add_argument("--factor", type=float, default=10.0)
    sp.add_argument("--spike-seconds", type=float, default=30.0)
    sp.add_argument("--around-seconds", type=float, default=30.0, help="base load before and after")

    fakes = sub.add_parser("fakes", help="run the instrumented fakes and print the env for `orbion up`")
    fakes.add_argument("--openai-latency-ms", type=float, default=0.0)
    return parser


def _pairs(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"expected NAME=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def run_plan(args: argparse.Namespace) -> StepPlan:
    """The one step of a soak or a spike."""
    if args.command == "soak":
        return StepPlan(
            f"soak {args.rate:g}/s x {args.minutes:g} min",
            constant(args.rate, args.minutes * 60),
            args.poisson,
        )
    segments = spike(
        args.rate,
        factor=args.factor,
        before=args.around_seconds,
        spike_seconds=args.spike_seconds,
        after=args.around_seconds,
    )
    return StepPlan(f"spike {args.rate:g}->{args.rate * args.factor:g}/s", segments, args.poisson)


def ladder_steps(args: argparse.Namespace) -> list[float]:
    """The ladder's rates in msg/s, up to ``--max-rate``."""
    rates = ladder_rates(_floats(args.minute_steps), _floats(args.second_steps))
    return [r for r in rates if not args.max_rate or r <= args.max_rate]


def ladder_plan(args: argparse.Namespace, rate: float) -> StepPlan:
    """A ladder step: named in msg/min when it is one of the plan's per-minute steps."""
    minutes = [m for m in _floats(args.minute_steps) if abs(m / 60 - rate) < 1e-9]
    name = f"{minutes[0]:g}/min" if minutes else f"{rate:g}/s"
    return StepPlan(name, constant(rate, args.step_seconds), args.poisson)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    folder = report.new_folder(Path(args.results), args.command)
    stack: Stack | None = None
    if args.gateway_url:
        if not args.whatsapp_fake_url:
            raise SystemExit(
                "--whatsapp-fake-url is required with --gateway-url (see `orbion loadtest fakes`)"
            )
        target = Target(
            gateway_url=args.gateway_url.rstrip("/"),
            whatsapp_fake_url=args.whatsapp_fake_url.rstrip("/"),
            openai_fake_url=args.openai_fake_url.rstrip("/").removesuffix("/v1"),
            service_urls={k: v.rstrip("/") for k, v in _pairs(args.service).items()},
            app_secret=args.app_secret,
            api_key=args.api_key,
            quiet_period=args.quiet_period,
            pids={k: int(v) for k, v in _pairs(args.pid).items()},
        )
        target.service_urls.setdefault("gateway", target.gateway_url)
    else:
        workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="orbion-loadtest-"))
        stack = Stack(
            workdir,
            openai_latency_ms=args.openai_latency_ms,
            quiet_period=args.quiet_period,
            log_level=args.log_level,
            traces=not args.no_traces,
            keep_database=args.keep_database,
            extra_env=_pairs(args.env),
        )
        print(f"starting the system (logs in {workdir}) ...", file=sys.stderr, flush=True)
        target = await stack.start()
    meta: dict[str, Any] = {
        "mode": args.command,
        "machine": report.machine(),
        "slo": {"p99_ms": args.slo_p99_ms, "error_rate": args.slo_error_rate},
        "quiet_period_s": target.quiet_period,
        "settings": target.settings,
        "folder": str(folder),
    }
    steps: list[dict[str, Any]] = []
    scenario = Scenario(seed=args.seed, run_tag=random.Random().randrange(10_000))
    if stack is not None:
        _ACTIVE.append(stack)
    try:
        async with Runner(
            target,
            scenario,
            slo=Slo(args.slo_p99_ms, args.slo_error_rate),
            drain_timeout=args.drain_timeout,
            drain_max=args.drain_max,
            history_sample=args.history_sample,
            progress=not args.no_progress,
            seed=args.seed,
        ) as runner:

            def record(result: dict[str, Any]) -> None:
                steps.append(result)
                report.append_step(folder, result)
                report.write(folder, meta, steps)
                print(_line(result), file=sys.stderr, flush=True)

            if args.command == "ladder":
                await ladder.climb(
                    lambda rate, seed: runner.run_step(ladder_plan(args, rate), seed=seed),
                    ladder_steps(args),
                    confirm=args.confirm,
                    keep_going=args.keep_going,
                    refine=args.refine,
                    seed=args.seed,
                    on_step=record,
                )
            else:
                record(await runner.run_step(run_plan(args), seed=args.seed))
    finally:
        if stack is not None:
            await stack.stop()
    path = report.write(folder, meta, steps)
    if args.docs:
        text = await asyncio.to_thread(path.read_text, encoding="utf-8")
        await asyncio.to_thread(Path(args.docs).write_text, text, encoding="utf-8")
    best = report.sustainable(steps)
    return {
        "mode": args.command,
        "report": str(path),
        "sustainable_rate": best["offered_rate"] if best and args.command == "ladder" else None,
        "steps": [
            {
                k: s[k]
                for k in (
                    "step",
                    "offered_rate",
                    "sent",
                    "error_rate",
                    "lost",
                    "duplicate_sends",
                    "unwanted_replies",
                )
            }
            | {
                "pipeline_p50_ms": s["pipeline_ms"]["p50"],
                "pipeline_p99_ms": s["pipeline_ms"]["p99"],
                "e2e_p99_ms": s["e2e_ms"]["p99"],
                "holds": s["slo"]["holds"],
            }
            for s in steps
        ],
    }


def _line(s: dict[str, Any]) -> str:
    verdict = "holds" if s["slo"]["holds"] else "BREAKS (" + "; ".join(s["slo"]["reasons"]) + ")"
    if "first_attempt" in s:
        verdict += " (run twice: it broke the first time)"
    return (
        f"{s['step']:>10}: {s['sent']} sent, {s['ack_rate']:g} acked/s, {s['reply_rate']:g} replies/s, "
        f"errors {s['error_rate']:.2%}, "
        f"pipeline p50/p99 {s['pipeline_ms']['p50']}/{s['pipeline_ms']['p99']} ms, "
        f"lost {s['lost']}, dup {s['duplicate_sends']}: {verdict}"
    )


def run_fakes(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="orbion-fakes-"))
    root = repo_root()
    wa, wa_url = spawn_fake("whatsapp", root, 0.0, workdir)
    oa, oa_url = spawn_fake("openai", root, args.openai_latency_ms, workdir)
    print(
        "# Fakes running. Export these for `orbion up`, then run "
        "`orbion loadtest ladder` with the URLs below."
    )
    for key, value in {
        "ORBION_OPENAI_API_KEY": "loadtest-openai-key",
        "ORBION_OPENAI_BASE_URL": f"{oa_url}/v1",
        "ORBION_WHATSAPP_TOKEN": WHATSAPP_TOKEN,
        "ORBION_WHATSAPP_API_BASE_URL": wa_url,
        "ORBION_WHATSAPP_PHONE_NUMBER_ID": PHONE_NUMBER_ID,
        "ORBION_WHATSAPP_APP_SECRET": APP_SECRET,
        "ORBION_API_KEYS": orjson.dumps([API_KEY]).decode(),
        "ORBION_WHATSAPP_RATE_PER_SECOND": "100000",
    }.items():
        print(f"export {key}='{value}'")
    print(
        f"# orbion loadtest ladder --gateway-url http://127.0.0.1:8080 --whatsapp-fake-url {wa_url} "
        f"--openai-fake-url {oa_url} --app-secret {APP_SECRET} --api-key {API_KEY} "
        "--service conversation=http://127.0.0.1:8081 --service lead=http://127.0.0.1:8082 "
        "--service llm-proxy=http://127.0.0.1:8083 --service monitor=http://127.0.0.1:8084",
        flush=True,
    )
    stop = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    try:
        signal.sigwait(stop)
    finally:
        for proc in (wa, oa):
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``orbion loadtest``; returns the exit code (1 when a soak/spike broke its SLO)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or args_list[0] not in (*COMMANDS, "-h", "--help"):
        args_list.insert(0, "ladder")
    args = build_parser().parse_args(args_list)
    if args.command == "fakes":
        return run_fakes(args)
    # Ctrl-C or SIGTERM interrupts at once, even in a busy loop; the processes we started are
    # stopped below, synchronously, whatever state the event loop was left in.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        summary = asyncio.run(run(args))
    except KeyboardInterrupt:
        for stack in _ACTIVE:
            stack.stop_processes()
        return 130
    print(f"report: {summary['report']}")
    if summary["sustainable_rate"] is not None:
        print(f"sustainable rate: {summary['sustainable_rate']:g} msg/s")
    if args.json:
        print(orjson.dumps(summary).decode())
    failed = args.command != "ladder" and any(not s["holds"] for s in summary["steps"])
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
