"""The serving layer: score every input event in micro-batches with the active model.

Each micro-batch is validated, scored in one forward pass (in a thread, so the event loop
keeps consuming the next batch), and its predictions and dead letters are sent; the batch's
offsets are acknowledged only after every send is confirmed by the broker, so a crash
re-delivers rather than loses (at least once).
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
from faust.types import EventT

from agents.metrics import BATCH_SECONDS, BATCH_SIZE, EVENTS_DEAD_LETTERED, EVENTS_SCORED
from agents.model_manager import model_manager
from agents.scoring import SourceMessage, class_counts, feature_matrix, predictions_from, triage
from app import app
from app.schemas import dead_letter_message

settings = app.settings

__all__ = ["events_topic", "predictions_topic", "class_count_deltas",
           "version_count_deltas", "score_events"]

log = logging.getLogger(__name__)

N = settings.topic_partitions

events_topic = app.topic(settings.events_topic, key_serializer="raw", value_serializer="raw",
                         partitions=N)
# Keyed by id: the partition of an id's prediction is the partition of its table row.
predictions_topic = app.topic(settings.predictions_topic, key_type=bytes, value_type=bytes,
                              key_serializer="raw", value_serializer="raw", partitions=N)
# Per-batch count deltas, keyed by what they count so that one worker owns each key.
class_count_deltas = app.topic(f"{settings.app_id}-class-count-deltas", internal=True,
                               key_type=str, key_serializer="raw", value_serializer="json",
                               partitions=N)
version_count_deltas = app.topic(f"{settings.app_id}-version-count-deltas", internal=True,
                                 key_type=str, key_serializer="raw", value_serializer="json",
                                 partitions=N)


def _init_scoring_thread() -> None:
    import torch

    torch.set_num_threads(settings.torch_threads)


# One thread: batches are scored in order, and torch gets the core the loop is not using.
scoring_executor = ThreadPoolExecutor(1, thread_name_prefix="scoring", initializer=_init_scoring_thread)


@app.agent(events_topic, concurrency=1)
async def score_events(stream: Any) -> None:
    """Validate, score and answer every input event, in micro-batches."""
    loop = asyncio.get_running_loop()
    async for events in stream.take_events(settings.serving_batch_size,
                                           within=settings.serving_batch_ms / 1000):
        started = time.perf_counter()
        model = await model_manager.wait_ready()
        messages = [_source(e) for e in events]
        valid, rejected = triage(messages, model.features, model.classes)
        pending = []
        if valid:
            rows = feature_matrix([v for _, v in valid], len(model.features))
            probabilities = await loop.run_in_executor(scoring_executor, model.predict_proba, rows)
            predictions = predictions_from(model, [v for _, v in valid], probabilities,
                                           int(time.time() * 1000))
            for prediction in predictions:
                pending.append(await _send(settings.predictions_topic, prediction["id"],
                                           prediction))
            for cls, n in class_counts(predictions).items():
                pending.append(await class_count_deltas.send(key=cls, value=n))
            pending.append(await version_count_deltas.send(key=model.version,
                                                           value=len(predictions)))
            EVENTS_SCORED.labels(model.version).inc(len(predictions))
        for r in rejected:
            log.warning("dead-lettered %s[%s]@%s: %s", r.message.topic, r.message.partition,
                        r.message.offset, r.reason)
            pending.append(await _send(settings.dlq_topic, None, dead_letter_message(
                r.reason, r.message.value, r.message.topic, r.message.partition,
                r.message.offset)))
        EVENTS_DEAD_LETTERED.inc(len(rejected))
        # Acknowledge the batch (when this iteration ends) only once the broker has it all.
        await asyncio.gather(*pending)
        BATCH_SIZE.observe(len(events))
        BATCH_SECONDS.observe(time.perf_counter() - started)


async def _send(topic: str, key: str | None, value: dict[str, Any]) -> asyncio.Future[Any]:
    """Hand one JSON message to the producer; the returned future resolves once it is stored.

    The hot path goes straight to the app's producer with bytes serialised by orjson:
    Faust's per-message send machinery costs more than scoring the event.
    """
    return await app.producer.send(topic, key.encode() if key is not None else None,
                                   orjson.dumps(value), partition=None, timestamp=None,
                                   headers=None)


def _source(event: EventT) -> SourceMessage:
    message = event.message
    return SourceMessage(event.value, message.topic, message.partition, message.offset)
