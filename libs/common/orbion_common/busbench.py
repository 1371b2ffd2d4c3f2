"""``orbion bench bus``: the CPU a consumer spends per event it receives, at a fixed arrival rate.

A publisher in a process of its own sends typical inbound events at each rate (open loop,
evenly spaced); this process consumes them through :class:`~orbion_common.bus.Bus` with a
handler that does nothing, so that what is measured is the bus: receiving, decoding, the trace
context, the ack, on the services' event loop and garbage collector settings. Printed per
rate: the consumer's CPU per event (user + system time of this process) and, when the bench
started its own NATS server, the server's (publishing included). Against the machine's NATS
(``--use-configured``) the server's figure is left out: other work shares it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil

from .bus import Bus, ConsumerSpec
from .events.bench import typical_inbound
from .service import run as run_service
from .service import tune_garbage_collector
from .settings import CommonSettings


@contextlib.contextmanager
def nats_server(use_configured: bool) -> Iterator[tuple[str, int | None]]:
    """The NATS URL, and the pid of the server when this bench started it."""
    if use_configured:
        url = CommonSettings().nats_url
        if not url:
            raise SystemExit("--use-configured needs ORBION_NATS_URL")
        yield url, None
        return
    from .infra import LocalInfra

    with (
        tempfile.TemporaryDirectory(prefix="orbion-bench-bus-") as tmp,
        LocalInfra(Path(tmp), servers=("nats",), durable=False) as infra,
    ):
        yield infra.url("nats"), infra.pid("nats")


async def publish(nats_url: str, stream: str, rate: float, count: int) -> None:
    """The publisher's side (run in its own process): ``count`` events, evenly spaced."""
    bus = await Bus.connect(CommonSettings(nats_url=nats_url, stream_name=stream), name="bench-publisher")
    event = typical_inbound()
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        for n in range(count):
            delay = start + n / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            # 500 contacts, so that the consumer handles several streams at once, as services do.
            await bus.publish(
                event.model_copy(update={"event_id": uuid.uuid4().hex, "stream_id": f"55{n % 500}"})
            )
    finally:
        await bus.close()


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


async def consume_at(nats_url: str, server_pid: int | None, rate: float, seconds: float) -> dict[str, float]:
    """One rate: a fresh stream, a publisher process, and this process consuming."""
    stream = f"BENCH{uuid.uuid4().hex[:8]}".upper()
    settings = CommonSettings(nats_url=nats_url, stream_name=stream)
    bus = await Bus.connect(settings, name="bench-consumer")
    count = max(1, int(rate * seconds))
    received = 0
    done = asyncio.Event()

    async def handler(event: object, delivery: object) -> None:
        nonlocal received
        received += 1
        if received >= count:
            done.set()

    me = psutil.Process()
    server = psutil.Process(server_pid) if server_pid else None
    publisher: asyncio.subprocess.Process | None = None
    try:
        bus.consume(ConsumerSpec(durable="bench", event_types=("MessageReceived",), batch_size=256), handler)
        await asyncio.sleep(0.5)  # bound, and its first request open
        publisher = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "orbion_common.busbench",
            "--publish",
            nats_url,
            stream,
            str(rate),
            str(count),
        )
        mine, theirs, started = _cpu(me), _cpu(server) if server else 0.0, time.perf_counter()
        await asyncio.wait_for(done.wait(), timeout=seconds * 3 + 30)
        await bus.stop_consuming()  # the last acks out before the clocks are read
        mine, theirs = _cpu(me) - mine, (_cpu(server) - theirs) if server else 0.0
        elapsed = time.perf_counter() - started
        await publisher.wait()
    finally:
        if publisher is not None and publisher.returncode is None:
            publisher.kill()  # a run that timed out: no publisher left behind
            await publisher.wait()
        for name in (stream, f"{stream}_DLQ"):
            with contextlib.suppress(Exception):
                await bus.js.delete_stream(name)
        await bus.close()
    figures = {"rate": rate, "events": received, "seconds": round(elapsed, 1)}
    figures["consumer_cpu_us_per_event"] = round(mine / received * 1e6, 1)
    if server:
        figures["nats_cpu_us_per_event"] = round(theirs / received * 1e6, 1)
    return figures


async def run(args: argparse.Namespace) -> list[dict[str, float]]:
    tune_garbage_collector()
    results = []
    with nats_server(args.use_configured) as (url, server_pid):
        for rate in args.rates:
            rounds = [await consume_at(url, server_pid, rate, args.seconds) for _ in range(args.rounds)]
            median = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
            results.append(median)
            nats = median.get("nats_cpu_us_per_event")
            print(
                f"{rate:g} events/s: consumer {median['consumer_cpu_us_per_event']} µs of CPU per event"
                + (f", NATS server {nats} µs" if nats is not None else "")
                + f" (median of {args.rounds} runs of {args.seconds:g} s)"
            )
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="orbion bench bus", description=__doc__)
    parser.add_argument("--rates", type=float, nargs="+", default=[150.0, 600.0], help="events/s")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each run")
    parser.add_argument("--rounds", type=int, default=3, help="runs per rate (the median is printed)")
    parser.add_argument("--use-configured", action="store_true", help="the NATS of ORBION_NATS_URL")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    parser.add_argument(
        "--publish", nargs=4, metavar=("URL", "STREAM", "RATE", "COUNT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.publish:
        url, stream, rate, count = args.publish
        run_service(publish(url, stream, float(rate), int(count)))
        return
    results = run_service(run(args))
    if args.json:
        print(json.dumps({"bus": results}))


if __name__ == "__main__":
    main()
