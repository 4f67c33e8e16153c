"""Hot swap under load: two workers, a steady feed, new versions announced mid-stream.

Starts its own Kafka + S3 on free ports, publishes a model of the default architecture, starts
two workers of one group, and feeds events at a steady rate (default 1,500/s, about half of
what one worker sustains) while it announces new versions. It then reads every prediction and
reports, in one run:

- swap latency: from each announcement to the first prediction by the new version, for every
  input partition (each served by one worker) and as each worker's ``/models/`` records it;
- the longest gap between consecutive predictions, overall and per input partition;
- lost (events without a prediction), failed (dead letters), and versions going backwards
  (a prediction by an older version after a newer one, per partition).

    .venv/bin/python bench/swap.py [--rate 1500] [--seconds 60] [--swaps 2]

Ends with one line holding a JSON object of the figures.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition  # noqa: E402

from app.settings import Settings  # noqa: E402
from devstack.stack import LocalStack, free_port  # noqa: E402
from transport.topics import ensure_topics  # noqa: E402
from demo.data import FEATURES, event_messages  # noqa: E402
from models.registry import Registry  # noqa: E402
from devstack.harness import (WorkerProcess, announce, http, publish_small_model,  # noqa: E402
                           scratch_dir)

HIDDEN = (500, 1000, 500)


def say(message: str) -> None:
    print(f"[bench] {message}", flush=True)


async def feed(settings: Settings, rate: float, seconds: float,
               announcements: list[tuple[float, Any]]) -> tuple[dict[str, int], list[float]]:
    """Produce events at ``rate``/s for ``seconds``; at each ``(offset_s, callable)`` of
    ``announcements`` run the callable (it announces a version) without pausing the feed.

    Returns each id's input partition and the wall-clock time of each announcement.
    """
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, linger_ms=5)
    await producer.start()
    partition_of: dict[str, int] = {}
    announced_at: list[float] = []
    pending_announcements = sorted(announcements, key=lambda a: a[0])
    tasks = []
    try:
        messages = event_messages(int(rate * seconds), seed=7, start_id=0)
        started = time.monotonic()
        futures = []
        tick = 0.01
        sent = 0
        while sent < len(messages):
            elapsed = time.monotonic() - started
            if pending_announcements and elapsed >= pending_announcements[0][0]:
                _, announce_now = pending_announcements.pop(0)
                announced_at.append(time.time())
                tasks.append(asyncio.ensure_future(announce_now()))
            due = min(len(messages), int(elapsed * rate) + 1)
            for m in messages[sent:due]:
                futures.append((m["id"], await producer.send(
                    settings.events_topic, json.dumps(m).encode(), key=m["id"].encode())))
            sent = due
            await asyncio.sleep(tick)
        for event_id, future in futures:
            partition_of[event_id] = (await future).partition
        await asyncio.gather(*tasks)
    finally:
        await producer.stop()
    return partition_of, announced_at


async def read_all(settings: Settings, topic: str, want: int | None,
                   timeout: float) -> list[tuple[int, int, dict[str, Any]]]:
    """(partition, timestamp ms, value) of every message on ``topic``, in offset order per
    partition: until ``want`` distinct ids were seen (then to the end), or, with ``want``
    None, to the end."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=settings.bootstrap_servers,
                                group_id=None, auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    out: list[tuple[int, int, dict[str, Any]]] = []
    ids: set[str] = set()
    try:
        deadline = time.monotonic() + timeout
        while want is not None and len(ids) < want and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for tp, records in batches.items():
                for r in records:
                    out.append((tp.partition, r.timestamp, json.loads(r.value)))
                    ids.add(out[-1][2].get("id"))
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        ends = await consumer.end_offsets(parts) if parts else {}
        while [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
            batches = await consumer.getmany(timeout_ms=500)
            out.extend((tp.partition, r.timestamp, json.loads(r.value))
                       for tp, records in batches.items() for r in records)
    finally:
        await consumer.stop()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=1500, help="events/s fed")
    parser.add_argument("--seconds", type=float, default=60, help="length of the feed")
    parser.add_argument("--swaps", type=int, default=2, help="versions announced mid-feed")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--keep", action="store_true",
                        help="keep the run's data directory (broker logs, worker logs, lake)")
    args = parser.parse_args()

    with scratch_dir("stratum-bench-swap-", args.keep) as work, \
            LocalStack(data_dir=work / "stack", s3_buckets=["bench"]) as stack:
        say(f"Kafka + S3 up on free ports (data in {work})")
        base_env = {**stack.environment("bench"),
                    "STRATUM_APP_ID": "bench-swap", "TOPIC_PARTITIONS": str(args.partitions),
                    "SPEED_LAYER": "0"}
        settings = Settings.from_env({**base_env, "WEB_PORT": "1"})
        registry = Registry(settings.registry_uri, settings.storage_options)
        refs = [publish_small_model(registry, settings.model_name, list(FEATURES), ["b", "s"],
                                    seed=i, hidden=HIDDEN) for i in range(args.swaps + 1)]
        versions = [r.version for r in refs]
        say(f"published {len(refs)} versions of 30-500-1000-500-2: {versions}")
        asyncio.run(ensure_topics(settings))
        asyncio.run(announce(settings.bootstrap_servers, settings.updates_topic,
                             refs[0].to_message()))
        workers = []
        for i in range(2):
            env = {**base_env, "WEB_PORT": str(free_port()),
                   "STRATUM_DATA_DIR": str(work / f"worker-{i}")}
            workers.append(WorkerProcess(env, work / f"worker-{i}.log").start())
        try:
            for w in workers:
                w.wait_ready()
            say(f"two workers serving {versions[0]}; feeding {args.rate:.0f} events/s for "
                f"{args.seconds:.0f}s, announcing {args.swaps} new version(s) on the way")

            def announcer(ref: Any) -> Any:
                return lambda: announce(settings.bootstrap_servers, settings.updates_topic,
                                        ref.to_message())
            step = args.seconds / (args.swaps + 1)
            schedule = [(step * (i + 1), announcer(ref)) for i, ref in enumerate(refs[1:])]
            partition_of, announced_at = asyncio.run(
                feed(settings, args.rate, args.seconds, schedule))
            say(f"fed {len(partition_of)} events; reading predictions")
            predictions = asyncio.run(read_all(settings, settings.predictions_topic,
                                               want=len(partition_of), timeout=300))
            dead = asyncio.run(read_all(settings, settings.dlq_topic, want=None, timeout=30))
            fed = asyncio.run(read_all(settings, settings.events_topic, want=None, timeout=60))
            worker_swaps = [http("GET", f"{w.url}/models/")[1]["history"] for w in workers]
        finally:
            for w in workers:
                w.stop()

    rank = {v: i for i, v in enumerate(versions)}
    ids = {v["id"] for _, _, v in predictions}
    lost = len(set(partition_of) - ids)
    by_input: dict[int, list[tuple[int, int]]] = defaultdict(list)  # ts, version rank
    backwards = 0
    last_rank: dict[int, int] = {}
    for part, _, value in sorted(predictions, key=lambda p: p[0]):
        r = rank[value["model_version"]]
        if r < last_rank.get(part, -1):
            backwards += 1
        last_rank[part] = max(r, last_rank.get(part, -1))
        by_input[partition_of[value["id"]]].append((value["ts"], r))
    # The same check per input partition in time order (each is served by one worker).
    for part, rows in by_input.items():
        rows.sort()
        highest = -1
        for _, r in rows:
            backwards += r < highest
            highest = max(highest, r)

    all_ts = np.array(sorted(v["ts"] for _, _, v in predictions), dtype=np.float64)
    gaps = np.diff(all_ts)
    gap_ms = float(np.max(gaps)) if len(gaps) else None
    gap_at_s = round(float(all_ts[int(np.argmax(gaps))]) / 1000 - announced_at[0], 2) \
        if len(gaps) and announced_at else None
    # Gaps around each swap (from 2 s before the announcement to 5 s after), and the feed's
    # own longest gap (broker timestamps of the input), which bounds what serving can do.
    near_swap_ms = []
    for at in announced_at:
        window = all_ts[(all_ts >= (at - 2) * 1000) & (all_ts <= (at + 5) * 1000)]
        near_swap_ms.append(float(np.max(np.diff(window))) if len(window) > 1 else None)
    input_ts = np.array(sorted(t for _, t, _ in fed), dtype=np.float64)
    input_gap_ms = float(np.max(np.diff(input_ts))) if len(input_ts) > 1 else None
    # While events were arriving (from the first to the last input timestamp): a gap there is
    # serving's; after the last input event there is nothing left to answer.
    during = all_ts[(all_ts >= input_ts[0]) & (all_ts <= input_ts[-1])] if len(input_ts) else []
    gap_during_feed_ms = float(np.max(np.diff(during))) if len(during) > 1 else None
    gap_by_input = {p: float(np.max(np.diff(np.array(sorted(t for t, _ in rows)))))
                    for p, rows in sorted(by_input.items())}
    latency: dict[str, dict[int, float | None]] = {}
    for i, at in enumerate(announced_at, start=1):
        latency[versions[i]] = {
            p: next((round(t / 1000 - at, 3) for t, r in rows if r >= i), None)
            for p, rows in sorted(by_input.items())}
    worker_latency = [
        {versions[i]: next((round(h["at"] - at, 3) for h in history
                            if h["version"] == versions[i] and "reason" not in h), None)
         for i, at in enumerate(announced_at, start=1)}
        for history in worker_swaps]
    worst = max((s for per in latency.values() for s in per.values() if s is not None),
                default=None)
    for version, per in latency.items():
        say(f"{version}: first prediction per input partition after "
            + ", ".join(f"p{p} {s}s" for p, s in per.items()))
    say(f"worker swap times (from /models/): {worker_latency}")
    say(f"{len(predictions)} predictions for {len(partition_of)} events: lost {lost}, "
        f"failed {len(dead)}, backwards {backwards}; longest gap {gap_ms:.0f} ms "
        f"({gap_at_s}s after the first swap), {gap_during_feed_ms:.0f} ms while events "
        f"arrived, around the swaps {near_swap_ms} ms; "
        f"the feed's own longest gap {input_gap_ms:.0f} ms")
    figures = {
        "events": len(partition_of),
        "rate_per_s": args.rate,
        "workers": 2,
        "swaps": len(announced_at),
        "swap_latency_s_max": worst,
        "swap_latency_s_by_partition": latency,
        "worker_swap_s": worker_latency,
        "longest_gap_ms": gap_ms,
        "longest_gap_ms_while_fed": gap_during_feed_ms,
        # Seconds from the first announcement to the start of that gap (negative: before).
        "longest_gap_at_s_after_first_swap": gap_at_s,
        "longest_gap_ms_around_each_swap": near_swap_ms,
        "input_longest_gap_ms": input_gap_ms,
        "longest_gap_ms_by_input_partition": gap_by_input,
        "lost": lost,
        "failed": len(dead),
        "predictions": len(predictions),
        "duplicates": len(predictions) - len(ids),
        "versions_backwards": backwards,
    }
    print(json.dumps(figures), flush=True)
    return 0 if lost == 0 and not dead and backwards == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
