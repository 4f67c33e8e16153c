"""The demo feed: Higgs-schema events, labelled and unlabelled, at a steady rate.

``python -m demo.feed [--rate 200] [--labelled 0.5] [--count N]`` produces input
events to ``EVENTS_TOPIC`` with a real Kafka producer until stopped (or ``--count`` sent).
``make run`` starts it unless ``DEMO_FEED=0``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import time
from typing import Sequence

from aiokafka import AIOKafkaProducer

from app.settings import Settings
from transport.topics import ensure_topics
from demo.data import event_messages

__all__ = ["run_feed", "main"]

log = logging.getLogger(__name__)

TICKS_PER_SECOND = 10


async def run_feed(settings: Settings, rate: float, labelled: float, count: int | None,
                   seed: int, stop: asyncio.Event) -> int:
    """Produce events at ``rate`` per second until ``stop`` is set or ``count`` are sent."""
    await ensure_topics(settings, [settings.events_topic])
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, linger_ms=5,
                                acks="all", enable_idempotence=True)
    await producer.start()
    run = int(time.time())
    sent = 0
    tick = 1.0 / TICKS_PER_SECOND
    started = time.monotonic()
    try:
        while not stop.is_set() and (count is None or sent < count):
            due = int(rate * (time.monotonic() - started)) - sent
            n = max(due, 0) if count is None else min(max(due, 0), count - sent)
            if n:
                batch = event_messages(n, seed=seed + sent, start_id=sent,
                                       labelled_fraction=labelled)
                for message in batch:
                    message["id"] = f"demo-{run}-{message['id']}"
                    await producer.send(settings.events_topic, key=message["id"].encode(),
                                        value=json.dumps(message).encode())
                sent += n
                if sent // 10000 != (sent - n) // 10000:
                    log.info("feed: %d events sent", sent)
            try:
                await asyncio.wait_for(stop.wait(), tick)
            except asyncio.TimeoutError:
                pass
    finally:
        await producer.stop()  # flushes what is buffered
    return sent


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m demo.feed``."""
    parser = argparse.ArgumentParser(prog="python -m demo.feed", description=__doc__)
    parser.add_argument("--rate", type=float, default=200.0, help="events per second")
    parser.add_argument("--labelled", type=float, default=0.5,
                        help="fraction of events that carry a label")
    parser.add_argument("--count", type=int, default=None, help="stop after this many")
    parser.add_argument("--seed", type=int, default=1000)
    args = parser.parse_args(argv)
    if args.rate <= 0 or not 0 <= args.labelled <= 1:
        parser.error("--rate must be > 0 and --labelled within [0, 1]")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    settings = Settings.from_env()

    async def _main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        sent = await run_feed(settings, args.rate, args.labelled, args.count, args.seed, stop)
        log.info("feed: stopped after %d events", sent)
        return 0

    return asyncio.run(_main())


if __name__ == "__main__":
    raise SystemExit(main())
