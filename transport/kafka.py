"""Bulk Kafka I/O for the serving path, on librdkafka (confluent-kafka).

Faust hands an agent one message at a time, and each one costs several asyncio tasks, a lock
and a sensor call before the agent sees it; aiokafka's ``send`` costs a future and several
loop cycles per message. At the rates one worker can score, that per-message work outweighs
the model. Here librdkafka fetches and batches in its own threads: :class:`EventReader` hands
over a whole micro-batch per call, and :class:`OutputProducer` queues a micro-batch's messages
with one C call each and reports when the broker has stored all of them.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Mapping

from confluent_kafka import (Consumer, KafkaError, KafkaException, Message, Producer,
                             TopicPartition)

from app.settings import Settings

__all__ = ["EventReader", "OffsetStore", "OutputProducer", "Delivery", "DeliveryFailed",
           "client_config"]

log = logging.getLogger(__name__)

#: Prefetched input kept by librdkafka, in KiB: enough for several micro-batches per partition,
#: bounded whatever the backlog.
PREFETCH_KIB = 16 * 1024
#: Most messages librdkafka may hold for the broker, in KiB.
PRODUCE_QUEUE_KIB = 64 * 1024


def client_config(settings: Settings, client_id: str) -> dict[str, Any]:
    """Settings common to every librdkafka client of a worker."""
    return {"bootstrap.servers": settings.bootstrap_servers, "client.id": client_id,
            "socket.keepalive.enable": True,
            # librdkafka's own log lines go to Python logging, not straight to stderr.
            "logger": logging.getLogger("librdkafka")}


class DeliveryFailed(RuntimeError):
    """The broker did not store a message of a micro-batch (after the producer's retries)."""


class EventReader:
    """Reads the input partitions assigned to it, a micro-batch per :meth:`read`.

    The partitions are assigned by the caller (they follow the Faust group's table
    assignment), never by a group protocol of librdkafka's; ``group_id`` only names where
    offsets are committed.
    """

    def __init__(self, settings: Settings, topic: str, group_id: str, batch_size: int,
                 batch_ms: int) -> None:
        self.topic = topic
        self.group_id = group_id
        self.batch_size = batch_size
        self.batch_s = max(batch_ms, 1) / 1000
        self._consumer = Consumer({
            **client_config(settings, group_id),
            "group.id": group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": False,
            # Bounds the prefetch by size. (A small queued.min.messages would bound it by
            # count, but makes librdkafka fetch in small steps: 30x slower here.)
            "queued.max.messages.kbytes": PREFETCH_KIB,
            # Each fetch waits for 64 KiB (about 75 events) or 10 ms, whichever comes first:
            # at moderate rates the broker answers fewer, fuller fetches, for a few ms of a
            # micro-batch's SERVING_BATCH_MS.
            "fetch.min.bytes": 64 * 1024,
            "fetch.wait.max.ms": 10,
            "error_cb": _log_client_error,
            "on_commit": _log_failed_commit,
        })
        # consume() blocks in C with the GIL released; one thread, so reads stay in order.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="reader")
        self.assigned: dict[int, int] = {}

    async def read(self) -> list[Message]:
        """The next micro-batch: up to ``batch_size`` messages, waiting at most ``batch_ms``
        for it to fill (an empty list when nothing came)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._consumer.consume,
                                          self.batch_size, self.batch_s)

    def assign(self, starts: Mapping[int, int]) -> None:
        """Start reading ``partition -> offset`` (added to what is already assigned)."""
        if not starts:
            return
        self._consumer.incremental_assign(
            [TopicPartition(self.topic, p, o) for p, o in starts.items()])
        self.assigned.update(starts)

    def unassign(self, partitions: Iterable[int] | None = None) -> None:
        """Stop reading ``partitions`` (default: all)."""
        chosen = list(self.assigned) if partitions is None else [
            p for p in partitions if p in self.assigned]
        if not chosen:
            return
        self._consumer.incremental_unassign([TopicPartition(self.topic, p) for p in chosen])
        for p in chosen:
            del self.assigned[p]

    def pause(self, partitions: Iterable[int]) -> None:
        """Stop fetching ``partitions`` for now (what was fetched is still returned)."""
        self._consumer.pause([TopicPartition(self.topic, p) for p in partitions])

    def resume(self, partitions: Iterable[int]) -> None:
        self._consumer.resume([TopicPartition(self.topic, p) for p in partitions])

    def rewind(self, partition: int, offset: int) -> None:
        """Read ``partition`` again from ``offset``."""
        self.unassign([partition])
        self.assign({partition: offset})

    async def committed(self, partitions: Iterable[int]) -> dict[int, int | None]:
        """This group's committed offset of each partition (None where there is none)."""
        return await _committed(self._consumer, self.topic, partitions)

    def commit(self, offsets: Mapping[int, int]) -> None:
        """Commit ``partition -> next offset`` without waiting (errors are logged)."""
        if offsets:
            self._consumer.commit(offsets=[TopicPartition(self.topic, p, o)
                                           for p, o in offsets.items()], asynchronous=True)

    async def commit_and_wait(self, offsets: Mapping[int, int]) -> None:
        """Commit ``partition -> next offset`` and wait for the broker's answer."""
        if offsets:
            tps = [TopicPartition(self.topic, p, o) for p, o in offsets.items()]
            await coordinator_call(
                lambda: self._consumer.commit(offsets=tps, asynchronous=False),
                f"commit offsets of {self.topic}")

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        self._consumer.close()


class OffsetStore:
    """Committed offsets of one consumer group that no consumer joins: a place to record how
    far something (the lake archive) has got in each partition of a topic."""

    def __init__(self, settings: Settings, topic: str, group_id: str) -> None:
        self.topic = topic
        self.group_id = group_id
        self._consumer = Consumer({**client_config(settings, group_id), "group.id": group_id,
                                   "enable.auto.commit": False, "error_cb": _log_client_error})

    async def committed(self, partitions: Iterable[int]) -> dict[int, int | None]:
        return await _committed(self._consumer, self.topic, partitions)

    async def commit(self, partition: int, offset: int) -> None:
        tp = [TopicPartition(self.topic, partition, offset)]
        await coordinator_call(lambda: self._consumer.commit(offsets=tp, asynchronous=False),
                               f"commit offsets of {self.topic}")

    def close(self) -> None:
        self._consumer.close()


#: Errors of a group coordinator that is moving or starting (a broker restarted, a leader
#: elected): asked again, the next answer comes from the new coordinator.
_COORDINATOR_MOVING = frozenset({
    KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_NOT_AVAILABLE,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS, KafkaError.REQUEST_TIMED_OUT,
    KafkaError._TIMED_OUT, KafkaError._TRANSPORT, KafkaError.NOT_ENOUGH_REPLICAS,
    KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND})
#: How long an offset read or commit is retried while the coordinator moves.
COORDINATOR_RETRY_S = 120.0


async def coordinator_call(call: Callable[[], Any], what: str) -> Any:
    """Run a blocking group-coordinator request (offsets read or committed) in a thread,
    asking again while the coordinator moves, for up to ``COORDINATOR_RETRY_S``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + COORDINATOR_RETRY_S
    delay = 0.2
    while True:
        try:
            return await loop.run_in_executor(None, call)
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            moving = isinstance(error, KafkaError) and (
                error.code() in _COORDINATOR_MOVING or error.retriable())
            if not moving or loop.time() + delay > deadline:
                raise
            log.warning("cannot %s yet (%s); asking again in %.1fs", what, error, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def _committed(consumer: Consumer, topic: str,
                     partitions: Iterable[int]) -> dict[int, int | None]:
    tps = [TopicPartition(topic, p) for p in partitions]
    if not tps:
        return {}
    found = await coordinator_call(lambda: consumer.committed(tps, timeout=30),
                                   f"read committed offsets of {topic}")
    out: dict[int, int | None] = {}
    for tp in found:
        if tp.error is not None:
            raise RuntimeError(f"cannot read committed offsets of {topic}: {tp.error}")
        # OFFSET_INVALID (-1001): nothing committed yet.
        out[tp.partition] = tp.offset if tp.offset >= 0 else None
    return out


class Delivery:
    """The messages of one micro-batch on their way to the broker.

    :attr:`done` resolves (on the event loop) once every message is stored, or fails with
    :class:`DeliveryFailed` once all are settled and one was not. Counters are split between
    the two threads that touch them: the loop counts what it queues, the polling thread what
    the broker answered.
    """

    __slots__ = ("_producer", "_loop", "done", "queued", "settled", "error", "sealed",
                 "changelog_offsets", "_on_delivery", "_on_changelog_delivery")

    def __init__(self, producer: "OutputProducer", loop: asyncio.AbstractEventLoop) -> None:
        self._producer = producer
        self._loop = loop
        self.done: asyncio.Future[None] = loop.create_future()
        self.queued = 0
        self.settled = 0
        self.error: KafkaError | None = None
        self.sealed = False
        #: Highest stored offset per partition of the changelog written through
        #: :meth:`produce_changelog`.
        self.changelog_offsets: dict[int, int] = {}
        self._on_delivery = self._delivered
        self._on_changelog_delivery = self._changelog_delivered

    def produce(self, topic: str, value: bytes | None, key: bytes | None = None,
                partition: int = -1) -> None:
        """Queue one message (``partition=-1``: the partitioner picks by key, as Kafka's
        Java client does)."""
        self._producer.produce(topic, value, key, partition, self._on_delivery)
        self.queued += 1

    def produce_changelog(self, topic: str, value: bytes, key: bytes, partition: int) -> None:
        """Queue one table changelog record, remembering its offset once stored."""
        self._producer.produce(topic, value, key, partition, self._on_changelog_delivery)
        self.queued += 1

    def seal(self) -> asyncio.Future[None]:
        """No more messages: :attr:`done` resolves once all queued ones are settled."""
        self.sealed = True
        if self.settled == self.queued:
            self._finish()
        return self.done

    # -- the polling thread

    def _delivered(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None and self.error is None:
            self.error = err
        self.settled += 1
        if self.sealed and self.settled == self.queued:
            self._loop.call_soon_threadsafe(self._finish)

    def _changelog_delivered(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            partition, offset = msg.partition(), msg.offset()
            # A delivered message has both (librdkafka sets them on success).
            assert partition is not None and offset is not None
            if offset > self.changelog_offsets.get(partition, -1):
                self.changelog_offsets[partition] = offset
        self._delivered(err, msg)

    # -- the loop

    def _finish(self) -> None:
        if self.done.done():
            return
        if self.error is not None:
            self.done.set_exception(DeliveryFailed(f"{self.error.name()}: {self.error.str()}"))
        else:
            self.done.set_result(None)


#: How long the serving producer retries a message before its micro-batch fails.
MESSAGE_TIMEOUT_MS = 300_000


class OutputProducer:
    """One librdkafka producer for everything the serving path writes.

    Idempotent (no duplicates or reordering from its own retries), ``acks=all``; a thread
    serves delivery reports. ``murmur2_random`` partitions keyed messages as Kafka's Java
    client, aiokafka and so Faust do.
    """

    def __init__(self, settings: Settings, client_id: str, linger_ms: int = 5,
                 on_fatal: Callable[[str], None] | None = None) -> None:
        self._on_fatal = on_fatal
        self._producer = Producer({
            **client_config(settings, client_id),
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": linger_ms,
            "partitioner": "murmur2_random",
            "batch.size": 1024 * 1024,
            "queue.buffering.max.kbytes": PRODUCE_QUEUE_KIB,
            # The cluster has this long to store a message, retries included (long enough
            # to ride out a restart of every broker); then its micro-batch fails and the
            # worker stops (its events are read again).
            "message.timeout.ms": MESSAGE_TIMEOUT_MS,
            "error_cb": self._client_error,
        })
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="delivery-reports",
                                        daemon=True)
        self._poller.start()

    def delivery(self) -> Delivery:
        """A new micro-batch of messages (call from the event loop)."""
        return Delivery(self, asyncio.get_running_loop())

    def produce(self, topic: str, value: bytes | None, key: bytes | None, partition: int,
                on_delivery: Callable[[KafkaError | None, Message], None]) -> None:
        while True:
            try:
                self._producer.produce(topic, value, key, partition, on_delivery=on_delivery)
                return
            except BufferError:
                # The local queue is full: wait for the broker to take some of it.
                self._producer.poll(0.05)

    def flush(self, timeout: float = 30.0) -> int:
        """Wait until everything queued is settled; return how many messages are left."""
        return self._producer.flush(timeout)

    def close(self, timeout: float = 30.0) -> None:
        left = self.flush(timeout)
        if left:
            log.warning("%d messages were not delivered before the producer closed", left)
        self._stop.set()
        self._poller.join(timeout=5)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.05)

    def _client_error(self, err: KafkaError) -> None:
        if err.fatal():
            log.error("the output producer failed for good: %s", err.str())
            if self._on_fatal is not None:
                self._on_fatal(err.str())
        else:
            _log_client_error(err)


def _log_failed_commit(err: KafkaError | None, partitions: list[TopicPartition]) -> None:
    # The next commit of a partition supersedes a failed one; until then a crash
    # re-delivers what it covered (never loses it).
    if err is not None:
        log.warning("committing offsets failed: %s", err.str())


def _log_client_error(err: KafkaError) -> None:
    # Transient (a broker restarting, a connection dropped): librdkafka retries by itself.
    log.warning("kafka client: %s", err.str())
