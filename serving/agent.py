"""The serving layer: score every input event in micro-batches with the active model.

A service of the Faust worker reads the input topic in bulk (:mod:`transport.kafka`), never
through a Faust agent: the per-message work of an agent cost ten times the model. Each
micro-batch is

1. read with one call (up to ``SERVING_BATCH_SIZE`` messages, waiting at most
   ``SERVING_BATCH_MS``) and decoded and validated at once (:func:`transport.schemas.decode_events`);
2. handed to the lake archive as columns (the archive does not read the topic again);
3. scored in one forward pass in the scoring thread, while the loop reads and decodes the
   next micro-batch;
4. answered as soon as it is scored, by a second task: predictions, their
   ``latest_predictions`` rows (store and changelog: nothing reads the predictions back),
   dead letters, and one summary of the micro-batch (counts, and the labelled events for the
   quality table and the speed layer), all queued to one producer.

A micro-batch's offsets are committed (group ``<app id>-serving``) only once the broker has
stored every message it produced, so a crash re-delivers rather than loses (at least once).

Which input partitions a worker reads follows the Faust group: partition ``p`` of the input
is served by the worker that holds partition ``p`` of ``latest_predictions`` as an active
table partition, so a row is written where its table partition lives. Reading starts once
the worker's tables are recovered; on a rebalance, everything read is answered, stored and
committed before the worker rejoins, so the next owner starts where this one stopped.
"""
from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, TopicPartition
from mode import Service

from lake.archive import LakeArchiver
from lake.rows import BatchRows
from transport.lease import worker_lease
from serving.metrics import (BATCH_SECONDS, BATCH_SIZE, EVENT_LATENCY, EVENTS_DEAD_LETTERED,
                             count_flush, count_scored)
from serving.health import CandidateHealth
from serving.model_manager import Routing, model_manager
from serving.scoring import encode_predictions, split_rows
from transport.summary import summary_messages
from transport.topics import ensure_topics, scored_topic_name
from serving.tables import LATEST_CHANGELOG, record_changelog_offsets, store_latest
from transport import protocol
from transport.kafka import Delivery, EventReader, OutputProducer, client_config
from app import app
from transport.schemas import EventColumns, dead_letter_message, decode_events
from app.settings import Settings
from models.loaded import LoadedModel

settings = app.settings
#: The internal topic where each scored micro-batch is summarised for the speed layer.
SCORED_TOPIC = scored_topic_name(settings)

__all__ = ["ServingService", "serving", "scoring_executor", "MicroBatch",
           "MAX_BATCHES_IN_FLIGHT"]

log = logging.getLogger(__name__)


@app.before_first_start
async def create_topics() -> None:
    """Create Stratum's topics before any consumer subscribes: a consumer that subscribes to a
    missing topic makes the broker auto-create it with one partition, and Faust then fails
    with PartitionsMismatch."""
    await ensure_topics(settings)


# The scoring thread gives the GIL up inside every torch operation and needs it back between
# them; with the default 5 ms switch interval a busy event loop can hold it that long each
# time, stretching a 13 ms forward pass several times over.
sys.setswitchinterval(0.0005)


def _init_scoring_thread() -> None:
    import torch

    torch.set_num_threads(settings.torch_threads)


# One thread: batches are scored in order, and torch gets the core the loop is not using.
scoring_executor = ThreadPoolExecutor(1, thread_name_prefix="scoring",
                                      initializer=_init_scoring_thread)

#: Micro-batches whose messages may be awaiting the broker at once; the loop reads, decodes
#: and scores the next ones meanwhile.
MAX_BATCHES_IN_FLIGHT = 4
#: Seconds between two commits of the served offsets while serving (and at every rebalance
#: and stop).
COMMIT_INTERVAL_S = 1.0
#: A micro-batch whose messages wait longer than this for the broker is logged.
SLOW_SEND_S = 5.0
#: Longest a stopping worker spends answering, storing and committing what it read (and
#: archiving what it buffered); past it, it stops without committing, and whoever reads the
#: partitions next answers those events again.
STOP_DRAIN_S = 30.0


@dataclass
class MicroBatch:
    """One micro-batch on its way through the pipeline."""

    model: LoadedModel
    started: float
    values: list[bytes | None]
    partitions: list[int]
    offsets: list[int]
    columns: EventColumns
    #: Rows of ``columns`` to answer (the others were read again for the archive only).
    rows: np.ndarray
    #: Rejected messages to dead-letter: ``(message index, reason)``.
    rejected: list[tuple[int, str]]
    #: Per partition, the offset after the last message answered.
    ends: dict[int, int]
    #: Kafka timestamp (ms) of the record of each row of ``columns``.
    row_ts: np.ndarray
    scoring: asyncio.Future[np.ndarray] | None = None
    delivery: Delivery | None = None
    #: The models of the micro-batch (the candidate's during a rollout).
    routing: Routing | None = None
    #: Positions into ``rows`` the serving model answers, and those the candidate scores.
    served: np.ndarray | None = None
    tried: np.ndarray | None = None
    candidate_scoring: asyncio.Future[np.ndarray] | None = None


class ServingService(Service):
    """This worker's serving path: reads the input partitions it owns, answers every event."""

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.group_id = f"{settings.app_id}-serving"
        self.reader: EventReader | None = None
        self.producer: OutputProducer | None = None
        self.archiver: LakeArchiver | None = None
        #: Input partitions of the last assignment, until their tables are recovered.
        self._wanted: set[int] | None = None
        #: Input partitions served now, and the next offset to answer in each.
        self.partitions: set[int] = set()
        self.next_offset: dict[int, int] = {}
        #: Offset after the last message read, per partition.
        self.read_offset: dict[int, int] = {}
        #: Micro-batches read and being scored, in order, for the answering task.
        self._scored: asyncio.Queue[MicroBatch] = asyncio.Queue(maxsize=2)
        self._in_flight: deque[MicroBatch] = deque()
        #: Offsets whose every output is stored, and those last committed.
        self._stored: dict[int, int] = {}
        self._committed: dict[int, int] = {}
        self._last_commit = 0.0
        self._taken = False
        #: Partitions not read while the archive has no room for them.
        self._paused: set[int] = set()
        self._lock = asyncio.Lock()
        #: Set once a micro-batch could not be stored: nothing may be committed after that.
        self._failed = False
        #: The candidate's failures and latency as this worker sees them, and the ``ABORT``
        #: it is publishing when they cross a limit.
        self.health = CandidateHealth(settings.rollout_max_error_rate,
                                      settings.rollout_max_latency_ms,
                                      settings.rollout_min_events)
        self._deciding: set[asyncio.Future[None]] = set()
        # Receivers run before the consumer rejoins the group (Faust awaits them).
        # Faust's signal type asks for a ``signal`` keyword parameter; it arrives in **kwargs.
        app.on_partitions_revoked.connect(self._on_partitions_revoked)  # type: ignore[arg-type]
        app.on_partitions_assigned.connect(self._on_partitions_assigned)  # type: ignore[arg-type]

    @property
    def ready(self) -> bool:
        """Whether this worker serves its current share of the input partitions."""
        return self._taken and self._wanted is None

    async def on_start(self) -> None:
        s = self.settings
        self.producer = OutputProducer(s, self.group_id, on_fatal=self._fatal)
        self.reader = EventReader(s, s.events_topic, self.group_id, s.serving_batch_size,
                                  s.serving_batch_ms)
        if s.archive:
            self.archiver = LakeArchiver(s, on_flush=count_flush, lease=worker_lease)

    async def on_stop(self) -> None:
        """Answer, store and commit what was read, unless a micro-batch failed; bounded by
        ``STOP_DRAIN_S`` either way, so that a worker stopping while the cluster is away
        still exits (and is restarted), leaving the uncommitted events to be read again."""
        failed = self._failed

        async def release() -> None:
            async with self._lock:
                await self._release()

        try:
            if not failed:
                await self._bounded(release(), "answer, store and commit what it read")
            if self.archiver is not None:
                await self._bounded(self.archiver.stop(flush=not failed),
                                    "archive what it buffered")
        finally:
            if self.reader is not None:
                self.reader.close()
            if self.producer is not None:
                self.producer.close(timeout=0 if failed else STOP_DRAIN_S)

    @staticmethod
    async def _bounded(step: Any, what: str) -> None:
        try:
            await asyncio.wait_for(step, STOP_DRAIN_S)
        except asyncio.TimeoutError:
            log.error("stopping without waiting any longer to %s (%.0fs): uncommitted events "
                      "are read again by the next owner", what, STOP_DRAIN_S)
        except Exception:
            log.exception("stopping: could not %s; uncommitted events are read again by "
                          "the next owner", what)

    # -- the loop

    @Service.task
    async def _serve(self) -> None:
        await model_manager.wait_ready()
        if self.archiver is not None:
            await self.archiver.start()
        while not self.should_stop:
            try:
                async with self._lock:
                    if self._wanted is not None and app.tables.actives_ready:
                        await self._take_assignment()
                    if self.archiver is not None:
                        self._rewind_for_archive()
                    reading = bool(self.partitions)
                    if reading:
                        assert self.reader is not None
                        messages = await self.reader.read()
                        batch = self._prepare(messages) if messages else None
                        if batch is not None:
                            # Waits while two micro-batches are already being scored.
                            await self._scored.put(batch)
                    self._settle()
                if not reading:
                    await self.sleep(0.05)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("serving failed; stopping this worker so that its partitions "
                              "are read again from the last committed offsets")
                await app.crash(exc)
                return

    @Service.task
    async def _archive(self) -> None:
        """Write the archive's buffers when they are due (S3 calls run in its thread)."""
        while not self.should_stop:
            archiver = self.archiver
            if archiver is None:
                return
            await self.sleep(archiver.next_wait())
            try:
                await archiver.flush_due()
            except Exception:  # a bug: the archive's own errors are handled inside
                log.exception("archive flush failed")

    @Service.task
    async def _answer_scored(self) -> None:
        """Answer each micro-batch as soon as it is scored, in the order they were read, while
        the loop above reads and decodes the next ones. (It runs until the service's tasks
        are cancelled, after :meth:`on_stop` has answered everything read.)"""
        while True:
            batch = await self._scored.get()
            try:
                await self._answer(batch)
                self._settle()
            except Exception as exc:
                log.exception("serving failed; stopping this worker so that its partitions "
                              "are read again from the last committed offsets")
                await app.crash(exc)
                return
            finally:
                self._scored.task_done()

    def _prepare(self, messages: list[Message]) -> MicroBatch | None:
        """Decode a micro-batch, feed the archive and start scoring it."""
        model = model_manager.active
        assert model is not None
        started = time.perf_counter()
        values: list[bytes | None] = []
        partitions: list[int] = []
        offsets: list[int] = []
        timestamps: list[int] = []
        mine = self.partitions
        for message in messages:
            error = message.error()
            if error is not None:
                log.warning("reading %s: %s", self.settings.events_topic, error.str())
                continue
            partition, offset = message.partition(), message.offset()
            if partition not in mine or offset is None:  # read before it was revoked
                continue
            values.append(message.value())
            partitions.append(partition)
            offsets.append(offset)
            timestamps.append(message.timestamp()[1])
        if not values:
            return None
        columns = decode_events(values, model.features, model.classes, model.task)
        # Answer what was not answered before (a partition may be read again for the
        # archive), in offset order per partition.
        answer = np.ones(len(values), dtype=bool)
        ends: dict[int, int] = {}
        next_offset = self.next_offset
        for i, (partition, offset) in enumerate(zip(partitions, offsets)):
            if offset < next_offset.get(partition, 0):
                answer[i] = False
            else:
                ends[partition] = next_offset[partition] = offset + 1
            self.read_offset[partition] = offset + 1
        positions = np.asarray(columns.positions, dtype=np.int64)
        rows = (np.flatnonzero(answer[positions]) if len(positions)
                else np.empty(0, dtype=np.int64))
        rejected = [(i, reason) for i, reason in columns.rejected if answer[i]]
        if self.archiver is not None:
            self._feed_archive(model, columns, partitions, offsets, timestamps)
        row_ts = (np.asarray(timestamps, dtype=np.int64)[positions] if len(positions)
                  else np.empty(0, dtype=np.int64))
        batch = MicroBatch(model, started, values, partitions, offsets, columns, rows,
                           rejected, ends, row_ts)
        if len(rows):
            features = columns.features if len(rows) == len(columns) else \
                columns.features[rows]
            loop = asyncio.get_running_loop()
            routing = model_manager.routing()
            candidate = routing.candidate
            if candidate is None or routing.model is not model:
                batch.scoring = loop.run_in_executor(scoring_executor, model.outputs,
                                                     features)
                return batch
            # A rollout: the serving version and the candidate split (canary) or both
            # score (shadow) the micro-batch.
            ids = [columns.ids[k] for k in rows.tolist()]
            served, tried = split_rows(ids, routing.mode, routing.share)
            batch.routing, batch.served, batch.tried = routing, served, tried
            if len(served):
                batch.scoring = loop.run_in_executor(
                    scoring_executor, model.outputs,
                    features if len(served) == len(rows) else features[served])
            if len(tried):
                batch.candidate_scoring = loop.run_in_executor(
                    scoring_executor, candidate.outputs,
                    features if len(tried) == len(rows) else features[tried])
        return batch

    def _feed_archive(self, model: LoadedModel, columns: EventColumns,
                      partitions: list[int], offsets: list[int],
                      timestamps: list[int]) -> None:
        assert self.archiver is not None
        part_of_message = np.asarray(partitions, dtype=np.int64)
        batch_rows = BatchRows(model.features, model.classes, columns, partitions, timestamps,
                               task=model.task)
        for partition in set(partitions):
            messages = np.flatnonzero(part_of_message == partition)
            self.archiver.add(partition, [offsets[m] for m in messages.tolist()],
                              batch_rows.of_partition(partition, messages))
        full = {p for p in set(partitions) if self.archiver.full(p)} - self._paused
        if full:
            assert self.reader is not None
            self.reader.pause(full)
            self._paused |= full
            log.warning("archive buffers of %s[%s] are full: reading them waits for the "
                        "lake", self.settings.events_topic, sorted(full))

    async def _answer(self, batch: MicroBatch) -> None:
        """Send everything ``batch`` produces; track it until the broker has stored it."""
        assert self.producer is not None
        s = self.settings
        delivery = self.producer.delivery()
        columns = batch.columns
        rows = batch.rows.tolist()
        if rows and batch.routing is None:
            assert batch.scoring is not None
            self._send_scored(delivery, batch, batch.model, rows, await batch.scoring)
        elif rows:
            await self._answer_rollout(delivery, batch, rows)
        for i, reason in batch.rejected:
            partition, offset = batch.partitions[i], batch.offsets[i]
            log.warning("dead-lettered %s[%s]@%s: %s", s.events_topic, partition, offset,
                        reason)
            delivery.produce(s.dlq_topic, orjson.dumps(dead_letter_message(
                reason, batch.values[i], s.events_topic, partition, offset)))
        EVENTS_DEAD_LETTERED.inc(len(batch.rejected))
        batch.delivery = delivery
        delivery.seal().add_done_callback(self._stop_if_not_stored)
        self._in_flight.append(batch)
        # Bound what waits for the broker (a failure raises here, too).
        while len(self._in_flight) > MAX_BATCHES_IN_FLIGHT:
            await self._wait_stored(self._in_flight[0])
            self._settle()

    async def _answer_rollout(self, delivery: Delivery, batch: MicroBatch,
                              rows: list[int]) -> None:
        """Answer a micro-batch scored during a rollout. When the candidate's scoring fails,
        the serving version answers its canary events (in shadow mode it answered them
        already) and the failure counts against the candidate's health."""
        routing = batch.routing
        assert routing is not None and routing.candidate is not None
        assert batch.served is not None and batch.tried is not None
        candidate = routing.candidate
        shadow = routing.mode == "shadow"
        if len(batch.served):
            assert batch.scoring is not None
            self._send_scored(delivery, batch, batch.model,
                              [rows[k] for k in batch.served.tolist()], await batch.scoring)
        if not len(batch.tried):
            return
        assert batch.candidate_scoring is not None
        health = self.health
        health.follow((candidate.base_version, routing.since)
                      if routing.since is not None else None)
        tried = [rows[k] for k in batch.tried.tolist()]
        try:
            outputs = await batch.candidate_scoring
        except Exception as exc:
            first = health.failures == 0
            health.scored(len(tried), failed=True)
            (log.exception if first else log.warning)(
                "candidate %s failed to score %d events (%s)%s", candidate.version,
                len(tried), protocol.describe_error(exc),
                "" if shadow else "; the serving version answers them")
            if not shadow:
                features = batch.columns.features[np.asarray(tried, dtype=np.int64)]
                fallback = await asyncio.get_running_loop().run_in_executor(
                    scoring_executor, batch.model.outputs, features)
                self._send_scored(delivery, batch, batch.model, tried, fallback)
        else:
            health.scored(len(tried))
            now_ms = self._send_scored(delivery, batch, candidate, tried, outputs,
                                       shadow=shadow)
            if not shadow:
                health.answered(now_ms, batch.row_ts[np.asarray(tried, dtype=np.int64)])
        message = self.abort_message()
        if message is not None:
            key = health.decided
            task = asyncio.ensure_future(self._publish_abort(message, key))
            self._deciding.add(task)
            task.add_done_callback(self._deciding.discard)

    def abort_message(self) -> dict[str, Any] | None:
        """The ``ABORT`` (``by`` ``"policy"``) of the candidate once its health crosses a
        limit on this worker, once per rollout (marked decided); None otherwise."""
        health = self.health
        if health.key is None or health.decided == health.key:
            return None
        unhealthy = health.verdict()
        if unhealthy is None or not worker_lease.held:
            return None
        health.decided = health.key
        active = model_manager.active
        figures = {**unhealthy.figures,
                   "serving": active.base_version if active is not None else None}
        return protocol.decision_message(
            protocol.ABORT, self.settings.model_name, health.key[0], "policy",
            unhealthy.reason, figures, at=int(time.time() * 1000))

    async def _publish_abort(self, message: dict[str, Any],
                             key: tuple[str, int] | None) -> None:
        try:
            await app.producer.send_and_wait(
                self.settings.updates_topic, self.settings.model_name.encode(),
                orjson.dumps(message), partition=0, timestamp=None, headers=None)
        except Exception:  # the next micro-batch of the candidate tries again
            log.exception("publishing the ABORT of unhealthy candidate %s failed",
                          message["version"])
            if self.health.decided == key:
                self.health.decided = None
            return
        log.warning("rollout of %s: ABORT (%s)", message["version"], message["reason"])

    def _send_scored(self, delivery: Delivery, batch: MicroBatch, model: LoadedModel,
                     rows: list[int], outputs: np.ndarray, shadow: bool = False) -> int:
        """Queue what ``model``'s ``outputs`` for ``rows`` (of ``batch.columns``) produce: the
        predictions and their ``latest_predictions`` rows, or for a shadow candidate its
        predictions on the shadow topic only; and the summary for the speed layer (a
        shadow's counts nothing as scored, its labelled events measure its quality).
        Returns when (epoch ms) the predictions were handed to the producer."""
        columns = batch.columns
        everything = len(rows) == len(columns)
        ids = columns.ids if everything else [columns.ids[k] for k in rows]
        now_ms = int(time.time() * 1000)
        values, predicted = encode_predictions(model, ids, outputs, now_ms)
        keys = [i.encode() for i in ids]
        produce = delivery.produce
        topic = self.settings.shadow_topic if shadow else self.settings.predictions_topic
        for key, value in zip(keys, values):
            produce(topic, value, key)
        if not shadow:
            self._write_latest(delivery, batch, rows, keys, values)
        labels = columns.labels if everything else [columns.labels[k] for k in rows]
        features = columns.features if everything else columns.features[rows]
        ts = columns.ts if everything else [columns.ts[k] for k in rows]
        # The counts, and the labelled events with what was predicted before anything
        # learns from them, for the count and quality tables and the speed layer.
        for value in summary_messages(model, predicted, ids, labels, features, outputs, ts,
                                      shadow=shadow):
            produce(SCORED_TOPIC, value, None, 0)
        if not shadow:
            count_scored(model.version, len(rows))
            EVENT_LATENCY.record(now_ms, batch.row_ts if everything else batch.row_ts[rows])
        return now_ms

    def _write_latest(self, delivery: Delivery, batch: MicroBatch, rows: list[int],
                      keys: list[bytes], values: list[bytes]) -> None:
        """Each prediction's ``latest_predictions`` row, in its input event's partition."""
        positions = batch.columns.positions
        by_partition: dict[int, tuple[list[bytes], list[bytes]]] = {}
        for k, key, value in zip(rows, keys, values):
            partition = batch.partitions[positions[k]]
            entry = by_partition.get(partition)
            if entry is None:
                entry = by_partition[partition] = ([], [])
            entry[0].append(key)
            entry[1].append(value)
        produce = delivery.produce_changelog
        for partition, (part_keys, part_values) in by_partition.items():
            store_latest(partition, part_keys, part_values)
            for key, value in zip(part_keys, part_values):
                produce(LATEST_CHANGELOG, value, key, partition)

    async def _wait_stored(self, batch: MicroBatch) -> None:
        assert batch.delivery is not None
        done = batch.delivery.done
        try:
            await asyncio.wait_for(asyncio.shield(done), SLOW_SEND_S)
        except asyncio.TimeoutError:
            log.warning("%d messages of a micro-batch not stored by the broker after %ss; "
                        "its offsets stay uncommitted until they are",
                        batch.delivery.queued - batch.delivery.settled, SLOW_SEND_S)
            await done

    def _settle(self) -> None:
        """Take the stored micro-batches off the front of the pipeline and commit their
        offsets now and then."""
        while self._in_flight and self._in_flight[0].delivery.done.done():  # type: ignore
            batch = self._in_flight.popleft()
            assert batch.delivery is not None
            batch.delivery.done.result()  # raises DeliveryFailed
            self._stored.update(batch.ends)
            if batch.delivery.changelog_offsets:
                record_changelog_offsets(batch.delivery.changelog_offsets)
            BATCH_SIZE.observe(len(batch.offsets))
            BATCH_SECONDS.observe(time.perf_counter() - batch.started)
        now = time.monotonic()
        if now - self._last_commit >= COMMIT_INTERVAL_S:
            self._last_commit = now
            assert self.reader is not None
            due = self._uncommitted()
            if due:
                self.reader.commit(due)
                self._committed.update(due)

    def _uncommitted(self) -> dict[int, int]:
        return {p: o for p, o in self._stored.items()
                if p in self.partitions and self._committed.get(p) != o}

    def _stop_if_not_stored(self, done: asyncio.Future[None]) -> None:
        """Crash the worker as soon as a micro-batch's messages could not be stored.

        The producer has retried for ``message.timeout.ms`` by then. The batch's offsets stay
        uncommitted, but this process will not read them again (its position has moved on)
        and must never commit past them. Stopping the worker, as Faust does on a failed send
        of its own, hands its partitions to other workers (or to this one restarted), which
        read again from the last committed offset: nothing is lost. Waiting for the next
        micro-batch to notice would not do: none arrives while the group rebalances."""
        if done.cancelled() or done.exception() is None:
            return
        exc = done.exception()
        self._failed = True
        log.error("the broker did not store a micro-batch's messages (%s); stopping this "
                  "worker so that its partitions are read again from the last committed "
                  "offset", exc)
        asyncio.ensure_future(app.crash(exc))  # type: ignore[arg-type]

    def _fatal(self, reason: str) -> None:
        # Called from librdkafka's thread.
        self._failed = True
        loop = self.loop
        loop.call_soon_threadsafe(lambda: asyncio.ensure_future(
            app.crash(RuntimeError(f"output producer failed: {reason}"))))

    # -- partitions

    async def _on_partitions_revoked(self, sender: Any, revoked: Any, **kwargs: Any) -> None:
        """Answer, store and commit everything read before the group moves on."""
        async with self._lock:
            await self._release()

    async def _on_partitions_assigned(self, sender: Any, assigned: Any, **kwargs: Any) -> None:
        # Only noted here: reading starts once the tables are recovered (the loop waits for
        # that), and this receiver must return quickly for the worker to keep its place.
        worker_lease.confirmed()
        self._wanted = {tp.partition for tp in app.assignor.assigned_actives()
                        if tp.topic == LATEST_CHANGELOG}

    async def _release(self) -> None:
        """Finish every micro-batch read, commit, and stop reading all partitions."""
        self._taken = False
        if not self.partitions or self.reader is None:
            return
        await self._scored.join()
        for batch in list(self._in_flight):
            await self._wait_stored(batch)
        self._settle()
        await self.reader.commit_and_wait(self._uncommitted())
        self._committed.update(self._uncommitted())
        if self.archiver is not None:
            await self.archiver.revoke(self.partitions)
        self.reader.unassign()
        self._paused.clear()
        log.info("released input partitions %s at offsets %s", sorted(self.partitions),
                 {p: self._stored.get(p) for p in sorted(self.partitions)})
        self.partitions = set()
        self.next_offset.clear()
        self.read_offset.clear()
        self._stored.clear()
        self._committed.clear()

    async def _take_assignment(self) -> None:
        """Start reading the partitions of the last assignment, where serving (and the
        archive) left them."""
        assert self.reader is not None and self._wanted is not None
        wanted, self._wanted = self._wanted, None
        committed = await self.reader.committed(wanted)
        missing = [p for p, o in committed.items() if o is None]
        if missing:
            committed.update(await self._offsets_of_earlier_agent(missing))
        archive_from = (await self.archiver.assign(wanted) if self.archiver is not None
                        else {})
        starts: dict[int, int] = {}
        for partition in wanted:
            serve_from = committed.get(partition)
            start = serve_from
            if partition in archive_from:
                archived = archive_from[partition]
                start = None if serve_from is None or archived is None else min(serve_from,
                                                                                archived)
            starts[partition] = OFFSET_BEGINNING if start is None else start
            self.next_offset[partition] = serve_from or 0
        self.reader.assign(starts)
        self.partitions = set(wanted)
        self._committed = {p: o for p, o in committed.items() if o is not None}
        self._taken = True
        log.info("serving input partitions %s from offsets %s", sorted(wanted),
                 {p: committed.get(p) for p in sorted(wanted)})

    async def _offsets_of_earlier_agent(self, partitions: Sequence[int]) -> dict[int, int]:
        """Offsets the Faust group committed for the input topic (where an earlier version of
        the worker, which read it with an agent, stopped)."""
        consumer = Consumer({**client_config(self.settings, self.settings.app_id),
                             "group.id": self.settings.app_id, "enable.auto.commit": False})
        try:
            tps = [TopicPartition(self.settings.events_topic, p) for p in partitions]
            found = await asyncio.get_running_loop().run_in_executor(
                None, lambda: consumer.committed(tps, timeout=30))
            return {tp.partition: tp.offset for tp in found if tp.offset >= 0}
        except Exception as exc:  # nothing to carry over
            log.warning("cannot read the Faust group's input offsets: %s", exc)
            return {}
        finally:
            consumer.close()

    def _rewind_for_archive(self) -> None:
        """Read partitions again where the archive asks to (after it fell behind; serving
        skips what it answered already), and resume those it had no room for."""
        assert self.archiver is not None and self.reader is not None
        room = {p for p in self._paused if not self.archiver.full(p)}
        if room:
            self.reader.resume(room)
            self._paused -= room
        for partition, offset in self.archiver.take_rewinds().items():
            if partition in self.partitions and offset < self.read_offset.get(partition, 0):
                log.info("reading %s[%d] again from %d for the archive",
                         self.settings.events_topic, partition, offset)
                self.reader.rewind(partition, offset)
                self.read_offset[partition] = offset


serving = ServingService(settings)
app.service(serving)  # type: ignore[arg-type]  # Faust takes a Service instance as well as a class
