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
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
from faust.types import EventT

from agents.metrics import BATCH_SECONDS, BATCH_SIZE, EVENTS_DEAD_LETTERED, EVENTS_SCORED
from agents.model_manager import model_manager
from agents.scoring import SourceMessage, class_counts, feature_matrix, predictions_from, triage
from agents.speed import LABELLED_TOPIC, labelled_messages
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


#: Micro-batches whose messages may be awaiting the broker's confirmation at once. The agent
#: scores the next batch while earlier ones are in flight; each batch is acknowledged only
#: when all of its own messages are stored.
MAX_BATCHES_IN_FLIGHT = 4
#: A micro-batch whose messages wait longer than this for the broker is logged.
SLOW_SEND_S = 5.0


@app.agent(events_topic, concurrency=1)
async def score_events(stream: Any) -> None:
    """Validate, score and answer every input event, in micro-batches."""
    in_flight: deque[asyncio.Future[None]] = deque()
    try:
        async for events in stream.noack_take(settings.serving_batch_size,
                                              within=settings.serving_batch_ms / 1000):
            started = time.perf_counter()
            pending = await _answer(events)
            batch = asyncio.ensure_future(
                _acknowledge_when_stored(stream, events, pending, started))
            batch.add_done_callback(_stop_worker_if_not_stored)
            in_flight.append(batch)
            # Bound how much waits for the broker (and raise here if a batch failed).
            while in_flight and (in_flight[0].done()
                                 or len(in_flight) > MAX_BATCHES_IN_FLIGHT):
                await in_flight.popleft()
    finally:
        if in_flight:
            log.info("serving agent stopping with %d micro-batches awaiting the broker; their "
                     "events will be delivered again", len(in_flight))
        for future in in_flight:
            future.cancel()


async def _answer(events: list[EventT]) -> list[asyncio.Future[Any]]:
    """Score one micro-batch and hand every prediction and dead letter to the producer."""
    model = await model_manager.wait_ready()
    messages = [_source(e) for e in events]
    valid, rejected = triage(messages, model.features, model.classes)
    pending = []
    if valid:
        rows = feature_matrix([v for _, v in valid], len(model.features))
        probabilities = await asyncio.get_running_loop().run_in_executor(
            scoring_executor, model.predict_proba, rows)
        predictions = predictions_from(model, [v for _, v in valid], probabilities,
                                       int(time.time() * 1000))
        for prediction in predictions:
            pending.append(await _send(settings.predictions_topic, prediction["id"], prediction))
        for cls, n in class_counts(predictions).items():
            pending.append(await class_count_deltas.send(key=cls, value=n))
        pending.append(await version_count_deltas.send(key=model.version,
                                                       value=len(predictions)))
        # Labelled events, with what was predicted before anything learns from them, feed
        # the quality table and the speed layer (one partition: one learner).
        for value in labelled_messages(model, valid, probabilities):
            pending.append(await app.producer.send(LABELLED_TOPIC, None, value, partition=0,
                                                   timestamp=None, headers=None))
        EVENTS_SCORED.labels(model.version).inc(len(predictions))
    for r in rejected:
        log.warning("dead-lettered %s[%s]@%s: %s", r.message.topic, r.message.partition,
                    r.message.offset, r.reason)
        pending.append(await _send(settings.dlq_topic, None, dead_letter_message(
            r.reason, r.message.value, r.message.topic, r.message.partition,
            r.message.offset)))
    EVENTS_DEAD_LETTERED.inc(len(rejected))
    return pending


async def _acknowledge_when_stored(stream: Any, events: list[EventT],
                                   pending: list[asyncio.Future[Any]], started: float) -> None:
    """Acknowledge ``events`` (so their offsets may be committed) once the broker has stored
    every message they produced; a failed send raises and leaves them unacknowledged."""
    futures = [asyncio.ensure_future(p) for p in pending]
    _, waiting = await asyncio.wait(futures, timeout=SLOW_SEND_S)
    if waiting:
        log.warning("%d of %d messages of a micro-batch not stored by the broker after %ss; "
                    "its events stay unacknowledged until they are", len(waiting),
                    len(futures), SLOW_SEND_S)
    await asyncio.gather(*futures)
    for event in events:
        await stream.ack(event)
    BATCH_SIZE.observe(len(events))
    BATCH_SECONDS.observe(time.perf_counter() - started)


def _stop_worker_if_not_stored(batch: asyncio.Future[None]) -> None:
    """Crash the worker as soon as a micro-batch's messages could not be stored.

    The producer has retried for ``producer_request_timeout`` by then. The batch's events stay
    unacknowledged, but this process will not read them again (its position has moved on) and
    can never commit past them: a rebalance would wait for them forever. Stopping the worker,
    as Faust does on a failed send of its own, hands its partitions to other workers (or to
    this one restarted), which read again from the last committed offset: nothing is lost.
    Waiting for the next micro-batch to notice would not do: none arrives while the group
    rebalances."""
    if batch.cancelled() or batch.exception() is None:
        return
    exc = batch.exception()
    log.error("the broker did not store a micro-batch's messages (%s: %s); stopping this "
              "worker so that its partitions are read again from the last committed offset",
              type(exc).__name__, exc)
    asyncio.ensure_future(app.crash(exc))


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
