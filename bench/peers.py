"""The serving loops a user would write instead of Stratum, measured beside it by
``bench/serving.py``.

Both read the input topic with aiokafka in a consumer group, parse each event as a plain loop
would (``orjson.loads``, the features picked in the model's order), score it with the same
model (``LoadedModel.predict_proba``), send a prediction (docs/contract.md) keyed by id (a dead letter
with the exception's text for an event that fails), and commit only what the broker
acknowledged:

* ``naive``: one event at a time (``getone``, a one-row forward pass, ``send_and_wait``,
  commit every 16 events), the loop of Kafka-ML's inference workers;
* ``batched``: ``getmany`` up to the batch size, one forward pass, every send started before
  any is awaited, commit after the acknowledgements: the plain 60-line batched loop.

    python bench/peers.py naive|batched --input T --output T --dlq T --group G \\
        --manifest URI --sha256 HEX --count N [--batch-size 512]

Settings (broker, registry, S3) come from the environment, as for the worker. The loop stops
once ``--count`` input events are answered and prints one JSON line of what it did.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import orjson  # noqa: E402
import torch  # noqa: E402
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer  # noqa: E402

from transport.schemas import dead_letter_message, prediction_message  # noqa: E402
from app.settings import Settings  # noqa: E402
from models.registry import Registry  # noqa: E402


class Event:
    __slots__ = ("id", "features")

    def __init__(self, event_id: str, features: np.ndarray) -> None:
        self.id, self.features = event_id, features


def validate(model: object, value: bytes | None) -> tuple[Event | None, str | None]:
    """The event's id and feature row, or why it cannot be served."""
    try:
        event = orjson.loads(value)
        features = event["features"]
        row = ([features[name] for name in model.features] if isinstance(features, dict)
               else features)
        vector = np.asarray(row, dtype=np.float64)
        if vector.shape != (len(model.features),) or not isinstance(event["id"], str):
            raise ValueError("wrong id or number of features")
        return Event(event["id"], vector), None
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        return None, f"{type(exc).__name__}: {exc}"


def answer(model: object, record: object, event: Event | None, reason: str | None,
           probabilities: list[float] | None, args: argparse.Namespace
           ) -> tuple[str, bytes | None, bytes]:
    """(topic, key, value) of the one message an input event gets."""
    if event is None:
        return args.dlq, None, orjson.dumps(dead_letter_message(
            reason or "", record.value, record.topic, record.partition, record.offset))
    return args.output, event.id.encode(), orjson.dumps(prediction_message(
        event.id, model.version, model.classes, probabilities, int(time.time() * 1000)))


async def naive(model: object, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer,
                args: argparse.Namespace) -> int:
    done = 0
    while done < args.count:
        record = await consumer.getone()
        event, reason = validate(model, record.value)
        probabilities = (np.round(model.predict_proba(event.features[None, :])[0]
                                  .astype(np.float64), 6).tolist() if event else None)
        topic, key, value = answer(model, record, event, reason, probabilities, args)
        await producer.send_and_wait(topic, value, key=key)
        done += 1
        if done % 16 == 0:
            await consumer.commit()
    await consumer.commit()
    return done


async def batched(model: object, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer,
                  args: argparse.Namespace) -> int:
    done = 0
    while done < args.count:
        batches = await consumer.getmany(timeout_ms=args.batch_ms,
                                         max_records=args.batch_size)
        records = [r for rs in batches.values() for r in rs]
        if not records:
            continue
        checked = [validate(model, r.value) for r in records]
        valid = [e for e, _ in checked if e is not None]
        rows = (np.round(model.predict_proba(np.stack([e.features for e in valid]))
                         .astype(np.float64), 6).tolist() if valid else [])
        scored = iter(rows)
        futures = []
        for record, (event, reason) in zip(records, checked):
            topic, key, value = answer(model, record, event, reason,
                                       next(scored) if event else None, args)
            futures.append(await producer.send(topic, value, key=key))
        await asyncio.gather(*futures)
        await consumer.commit()
        done += len(records)
    return done


async def run(args: argparse.Namespace) -> dict[str, object]:
    settings = Settings.from_env()
    torch.set_num_threads(args.threads)
    model = Registry(settings.registry_uri, settings.storage_options).load(args.manifest,
                                                                           args.sha256)
    consumer = AIOKafkaConsumer(args.input, bootstrap_servers=settings.bootstrap_servers,
                                group_id=args.group, enable_auto_commit=False,
                                auto_offset_reset="earliest",
                                max_poll_records=args.batch_size)
    # aiokafka's defaults, but acks from every in-sync replica, as Stratum waits for.
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all")
    await consumer.start()
    await producer.start()
    started = time.perf_counter()
    try:
        loop = naive if args.kind == "naive" else batched
        done = await loop(model, consumer, producer, args)
    finally:
        await consumer.stop()
        await producer.stop()
    return {"kind": args.kind, "answered": done,
            "seconds": round(time.perf_counter() - started, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=("naive", "batched"))
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--dlq", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--sha256", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--batch-ms", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
