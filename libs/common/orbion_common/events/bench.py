"""``orbion bench events``: encode + decode round trip of a typical inbound message, in µs."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import UTC, datetime

from . import MessageReceived, decode, encode
from .messaging import MessageReceivedPayload


def typical_inbound() -> MessageReceived:
    return MessageReceived.create(
        "5511999990000",
        MessageReceivedPayload(
            provider="cloud_api",
            provider_message_id="wamid.HBgLNTUxMTk5OTk5MDAwMBUCABIYFjNFQjBDNzE2RjFGM0Q3QjYwRDM2AA==",
            phone="5511999990000",
            business_number_id="106540352242922",
            profile_name="Maria Souza",
            kind="text",
            text="Olá! Vi o anúncio de vocês. Quanto custa o plano para uma equipe de 10 vendedores?",
            sent_at=datetime.now(UTC),
        ),
    )


def measure(rounds: int, per_round: int) -> list[float]:
    event = typical_inbound()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(per_round):
            decode(encode(event))
        samples.append((time.perf_counter() - start) / per_round * 1e6)
    return samples


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="orbion bench events", description=__doc__)
    parser.add_argument("--rounds", type=int, default=7, help="repetitions (median and spread are printed)")
    parser.add_argument("--per-round", type=int, default=20000, help="round trips per repetition")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = parser.parse_args(argv)
    samples = measure(args.rounds, args.per_round)
    figures = {
        "event_round_trip_us_median": round(statistics.median(samples), 2),
        "event_round_trip_us_min": round(min(samples), 2),
        "event_round_trip_us_max": round(max(samples), 2),
        "event_bytes": len(encode(typical_inbound())),
    }
    print(
        f"event encode+decode round trip: median {figures['event_round_trip_us_median']} µs "
        f"(min {figures['event_round_trip_us_min']}, max {figures['event_round_trip_us_max']}), "
        f"{figures['event_bytes']} bytes; target < 20 µs"
    )
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
