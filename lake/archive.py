"""Archive the input stream to the lake: every valid event exactly once, as Parquet.

The serving path reads and decodes each input message once; it hands the archiver the valid
events of every micro-batch as columns (invalid ones are the serving path's to dead-letter),
and the archiver keeps them in memory per partition and writes them to
``LAKE_URI/dt=YYYY-MM-DD/hour=HH/`` (the UTC hour of the event's ``ts``, else of its Kafka
timestamp) when a partition holds ``ARCHIVE_MAX_ROWS`` events or its oldest one has waited
``ARCHIVE_FLUSH_S`` seconds. Its progress is the committed offsets of the group
``<app id>-archiver`` (which no consumer joins), committed only after the files are written;
the serving path reads each partition from the lower of its own and the archive's position.

Exactly once across crashes: a file is named after its partition and the offset range it
covers (``part-<topic>-p<partition>-<first>-<last>.parquet``; a range whose events span hours
gives one such file per hour directory). Before writing a range the archiver records it in a
small intent object, ``LAKE_URI/_archive/<topic>/p<partition>.json`` (readers skip ``_``
paths). A worker that crashes after writing but before committing leaves an intent beyond the
committed offset; whoever gets the partition next re-reads exactly that range and writes it
again under the same names, replacing rather than duplicating. On a rebalance the revoked
partitions are flushed and committed before the group moves on. A write or commit that fails
is retried, never skipped; if the lake stays unreachable until a partition holds
``MAX_BUFFERED_RANGES`` ranges, its buffers are dropped and the partition is read again from
the archive's committed offset once the lake answers, so memory stays bounded and nothing is
lost.
"""
from __future__ import annotations

import asyncio
import bisect
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Sequence

from aiokafka import TopicPartition

from transport.lease import Lease
from transport.kafka import OffsetStore
from app.settings import Settings
from models.storage import ensure_bucket, filesystem

from lake.ledger import Flush, PartitionState, prepare_flush, read_intent, write_flush
from lake.rows import ArchiveRows

__all__ = ["LakeArchiver", "ARCHIVE_NICENESS", "WRITE_ROWS_PER_S", "MAX_BUFFERED_RANGES"]

log = logging.getLogger(__name__)

_MAX_BACKOFF_S = 30.0
#: CPU niceness of the archive's thread: encoding and writing a range is background work that
#: must not take CPU time from scoring on a busy machine (the thread holds the GIL only
#: briefly; Parquet encoding and the upload run without it).
ARCHIVE_NICENESS = 10
#: Rows per second a worker's archive writes at most (a few times what one worker serves).
WRITE_ROWS_PER_S = 50_000
#: A partition may hold this many ``ARCHIVE_MAX_ROWS`` ranges in memory while they wait to be
#: written; then its reading pauses (or, while writes fail, its buffers are dropped).
MAX_BUFFERED_RANGES = 3


class LakeArchiver:
    """Archive the events the serving path reads to the lake, exactly once.

    The serving path reads and decodes every input message once and hands the archiver its
    partition, offsets and decoded rows (:meth:`add`); this class buffers them per partition,
    writes each buffer as one offset range (:meth:`flush_due`, from a task of its own) and
    records its progress as committed offsets of the group ``<app id>-archiver``, which no
    consumer joins: partitions follow the serving path's assignment.

    Parameters
    ----------
    settings : Settings
        Topic, lake and archive settings (``ARCHIVE_FLUSH_S``, ``ARCHIVE_MAX_ROWS``).
    offsets : OffsetStore, optional
        Where progress is committed (default: the group ``<app id>-archiver``).
    on_flush : callable, optional
        Called with each :class:`Flush` once its files are written (metrics).
    """

    def __init__(self, settings: Settings, offsets: OffsetStore | None = None,
                 on_flush: Callable[[Flush], None] | None = None,
                 lease: Lease | None = None) -> None:
        self.settings = settings
        #: With a lease, writes go ahead only while it holds (the worker passes its own).
        self.lease = lease
        self.topic = settings.events_topic
        self.group_id = f"{settings.app_id}-archiver"
        self.flush_s = settings.archive_flush_s
        self.max_rows = settings.archive_max_rows
        #: Most records one partition may hold in memory; beyond it (the lake unreachable for
        #: long) its buffers are dropped and read again once the lake answers.
        self.max_buffered = MAX_BUFFERED_RANGES * settings.archive_max_rows
        self.on_flush = on_flush
        self.offsets = offsets or OffsetStore(settings, self.topic, self.group_id)
        self.fs, self.root = filesystem(settings.lake_uri, settings.storage_options)
        self.states: dict[int, PartitionState] = {}
        self.failures = 0
        self._rewinds: dict[int, int] = {}
        self._next_write_at = 0.0
        self._turn = 0
        self._lock = asyncio.Lock()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="archive",
                                            initializer=_lower_priority)

    async def start(self) -> None:
        """Make sure the lake's bucket exists."""
        await self._io(ensure_bucket, self.fs, self.root)
        _lower_io_thread_priority()

    async def stop(self, flush: bool = True) -> None:
        """Write what is buffered (unless ``flush`` is False) and commit it."""
        async with self._lock:
            if flush:
                for state in list(self.states.values()):
                    self._close(state)
                    await self._flush_state(state, retry=False)
            self.states.clear()
        self._executor.shutdown(wait=False)
        self.offsets.close()

    # -- partitions

    async def assign(self, partitions: Iterable[int]) -> dict[int, int | None]:
        """Set up ``partitions``; return the offset each must be read from for the archive
        (None: the start of the log). A partition whose last range was written but not
        committed is read again from that range's start, to write it again under the same
        names. One whose set-up fails (the lake unreachable) is left out: it asks for a
        :meth:`take_rewinds` once it is set up."""
        starts: dict[int, int | None] = {}
        # Under the lock: flush_due would otherwise set up a partition still being set up
        # here, and its second set-up would rewind a buffer that already holds records.
        async with self._lock:
            for partition in partitions:
                state = self.states[partition] = PartitionState(TopicPartition(self.topic,
                                                                               partition))
                start = await self._set_up(state)
                if state.ready:
                    starts[partition] = start
        return starts

    async def revoke(self, partitions: Iterable[int]) -> None:
        """Write and commit what was read of ``partitions``, then forget them; the next owner
        starts from the offsets committed here."""
        async with self._lock:
            held = self._lease_held()
            for partition in partitions:
                state = self.states.pop(partition, None)
                if state is not None and not held:
                    # Perhaps another worker's already: what is buffered is left to it.
                    log.warning("archive of %s[%d]: dropped %d buffered records unwritten "
                                "after a stall; the partition's next owner archives them",
                                self.topic, partition, state.buffered_records())
                elif state is not None:
                    self._close(state)
                    await self._flush_state(state, retry=False)
                self._rewinds.pop(partition, None)

    def take_rewinds(self) -> dict[int, int]:
        """Partitions that must be read again from an offset for the archive (after their
        buffers were dropped or their set-up failed), and clear them."""
        rewinds, self._rewinds = self._rewinds, {}
        return rewinds

    async def _set_up(self, state: PartitionState) -> int | None:
        """Find where ``state``'s partition resumes and whether a range must be rewritten.
        On failure the partition stays not ready and is set up again after a backoff."""
        tp = state.tp
        try:
            committed = (await self.offsets.committed([tp.partition]))[tp.partition]
            intent = await self._io(read_intent, self.fs, self.root, self.topic, tp.partition)
        except Exception as exc:
            self.failures += 1
            state.ready = False
            state.backoff_s = min(max(2 * state.backoff_s, 1.0), _MAX_BACKOFF_S)
            state.retry_at = time.monotonic() + state.backoff_s
            log.error("cannot set up the archive of %s[%d] (retrying in %.0fs): %s: %s",
                      self.topic, tp.partition, state.backoff_s, type(exc).__name__, exc)
            return None
        start = committed
        if intent is not None and (committed is None or intent[1] >= committed):
            state.plan = intent
            start = intent[0] if committed is None else min(intent[0], committed)
            log.info("archive of %s[%d]: offsets %d-%d were written but not committed; "
                     "writing them again under the same names", self.topic, tp.partition,
                     intent[0], intent[1])
        state.next_offset = 0 if start is None else start
        state.ready = True
        # The backoff is reset by a successful write, not here: a lake that answers reads
        # but fails writes must not be read again in a tight loop.
        return start

    # -- reading

    def add(self, partition: int, offsets: Sequence[int],
            rows: Callable[[int, int], ArchiveRows]) -> None:
        """Take records ``offsets`` (ascending) of ``partition``; ``rows(i, j)`` gives the
        valid events among records ``i..j-1`` as :class:`ArchiveRows`. Records before the
        partition's archive position are skipped (they were archived already)."""
        state = self.states.get(partition)
        if state is None or not state.ready or state.closing or not offsets:
            return
        skip = bisect.bisect_left(offsets, state.next_offset)
        if skip == len(offsets):
            return
        if skip:
            offsets = offsets[skip:]
            whole = rows

            def rows(i: int, j: int) -> ArchiveRows:
                return whole(i + skip, j + skip)
        state.add(offsets, rows, time.monotonic(), self.max_rows)
        self._check_room(state)

    def full(self, partition: int) -> bool:
        """Whether ``partition`` holds as much as it may: the caller stops reading it until
        the buffers are written (a lake that is slow, not failing: catching up after an
        outage reads much faster than it writes)."""
        state = self.states.get(partition)
        return (state is not None and state.ready and not state.closing
                and state.buffered_records() >= self.max_buffered)

    def _check_room(self, state: PartitionState) -> None:
        # Full while a failed write waits for its retry: waiting would hold up serving for as
        # long as the lake is down, so drop the buffers and read them again later.
        if state.ready and time.monotonic() < state.retry_at and \
                state.buffered_records() >= self.max_buffered:
            self._fall_behind(state, f"the lake failed while it held {self.max_buffered} "
                                     "records")

    def _fall_behind(self, state: PartitionState, why: str) -> None:
        """Drop a partition's buffers; it is read again from its committed offset once the
        lake answers (nothing is lost: nothing past that offset was committed)."""
        log.error("archive of %s[%d] falls behind: %s; its unwritten records will be read "
                  "again from the last committed offset", self.topic, state.tp.partition, why)
        state.current = None
        state.sealed.clear()
        state.pending = None
        state.ready = False
        if not state.backoff_s:
            state.backoff_s = 1.0
            state.retry_at = time.monotonic() + state.backoff_s

    def next_wait(self) -> float:
        """Seconds until :meth:`flush_due` has something to do (at most 1)."""
        now = time.monotonic()
        wait = 1.0
        for state in self.states.values():
            if state.current is not None:
                wait = min(wait, state.current.opened_at + self.flush_s - now)
            if state.has_work() or not state.ready:
                wait = min(wait, max(state.retry_at, self._next_write_at) - now)
        return min(max(wait, 0.01), 1.0)

    # -- writing

    async def flush_due(self) -> None:
        """Seal buffers that are full or old enough and write one sealed range; set up again
        the partitions that fell behind once their backoff has passed.

        After a range, the next write waits in proportion to its rows (at most
        :data:`WRITE_ROWS_PER_S`): a worker's partitions fill at the same pace, and writing
        all their ranges back to back would take the CPU from scoring for as long."""
        async with self._lock:
            now = time.monotonic()
            states = list(self.states.values())
            # Start after the partition written last, so that each gets its turn.
            turn = self._turn % len(states) if states else 0
            for state in states[turn:] + states[:turn]:
                if state.closing or now < state.retry_at:
                    continue
                if not state.ready:
                    start = await self._set_up(state)
                    if state.ready:
                        self._rewinds[state.tp.partition] = 0 if start is None else start
                    continue
                if state.due(now, self.flush_s, self.max_rows):
                    state.seal()
                if state.has_work() and now >= self._next_write_at:
                    rows = await self._flush_state(state, most=1)
                    if rows:
                        self._next_write_at = time.monotonic() + rows / WRITE_ROWS_PER_S
                        self._turn = states.index(state) + 1

    async def _flush_state(self, state: PartitionState, retry: bool = True,
                           most: int | None = None) -> int:
        """Write the state's sealed buffers in order (at most ``most`` of them), committing
        after each range; return how many rows were written."""
        written = 0
        if not self._lease_held():
            return written
        try:
            if state.commit_due is not None:
                await self._commit(state, state.commit_due)
            ranges = 0
            while (state.pending is not None or state.sealed) and (
                    most is None or ranges < most):
                ranges += 1
                if state.pending is None:
                    buffer = state.sealed.popleft()
                    state.pending = await self._io(prepare_flush, self.topic,
                                                   state.tp.partition, buffer)
                flush = state.pending
                if not self._lease_held():
                    break
                if flush.files:
                    await self._io(write_flush, self.fs, self.root, flush)
                state.pending = None
                state.commit_due = flush.last + 1
                if flush.files:
                    log.info("archived %s[%d] offsets %d-%d: %d rows in %d file(s)",
                             self.topic, flush.partition, flush.first, flush.last,
                             flush.rows, len(flush.files))
                    if self.on_flush is not None:
                        self.on_flush(flush)
                    written += flush.rows
                await self._commit(state, state.commit_due)
        except Exception as exc:
            self.failures += 1
            state.backoff_s = min(max(2 * state.backoff_s, 1.0), _MAX_BACKOFF_S)
            state.retry_at = time.monotonic() + state.backoff_s
            log.error("archive of %s[%d] failed (retrying in %.0fs): %s: %s", self.topic,
                      state.tp.partition, state.backoff_s, type(exc).__name__, exc)
            if retry:
                self._check_room(state)
        else:
            state.backoff_s = 0.0
        return written

    def _lease_held(self) -> bool:
        return self.lease is None or self.lease.held

    async def _commit(self, state: PartitionState, offset: int) -> None:
        # A write that was under way when the worker stalled may finish after it; its commit
        # would move the partition's archive offset back behind the new owner's.
        if not self._lease_held():
            log.warning("archive of %s[%d]: offset %d not committed after a stall",
                        self.topic, state.tp.partition, offset)
            return
        await self.offsets.commit(state.tp.partition, offset)
        state.commit_due = None

    async def _io(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _close(self, state: PartitionState) -> None:
        """Stop reading into ``state``; its unfinished planned range is dropped, not written
        under other names."""
        state.closing = True
        if state.current is not None and state.current.zone == 1:
            state.current = None
        state.seal()


def _lower_priority() -> None:
    try:  # on Linux a thread has a niceness of its own
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), ARCHIVE_NICENESS)
    except (AttributeError, OSError) as exc:
        log.debug("archive thread keeps its priority: %s", exc)


def _lower_io_thread_priority() -> None:
    """The same for fsspec's I/O thread, where s3fs signs and sends the uploads (hashing
    each file's bytes): it serves the lake and the model registry, neither of them on the
    path of an event."""
    import fsspec.asyn

    try:
        fsspec.asyn.get_loop().call_soon_threadsafe(_lower_priority)
    except RuntimeError as exc:  # no I/O loop (a local lake)
        log.debug("no fsspec I/O thread to lower: %s", exc)
