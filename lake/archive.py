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
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from aiokafka import TopicPartition
from fsspec import AbstractFileSystem

from transport.lease import Lease
from transport.kafka import OffsetStore
from transport.schemas import EventColumns, InvalidEvent, parse_event, validate_event
from app.settings import Settings
from models.storage import LOCAL_PROTOCOLS, ensure_bucket, filesystem

__all__ = [
    "ArchiveRows", "Flush", "PartitionBuffer", "PartitionState", "LakeArchiver",
    "event_rows", "column_rows", "BatchRows", "partition_rows", "build_table", "split_by_hour", "hour_directory", "file_name",
    "parse_file_name", "intent_path", "read_intent", "write_flush", "prepare_flush",
    "label_type", "lake_files", "MAX_TS_MS",
]

log = logging.getLogger(__name__)

HOUR_MS = 3_600_000
#: The last millisecond of year 9999: a larger ``ts`` has no calendar date, so such an event
#: is filed (and its ``ts`` column set) by its Kafka timestamp instead.
MAX_TS_MS = 253_402_300_799_999
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

Schema = tuple[Sequence[str], Sequence[Any]]


# --- pure parts: rows, tables, names -------------------------------------------------------

@dataclass(frozen=True)
class ArchiveRows:
    """Valid events of one run of consecutive records, as an Arrow table.

    ``features`` and ``classes`` are the model's when the rows were validated; ``table`` has
    the lake's columns: ``id``, one float64 column per feature in that order (null where the
    event gave ``null``), ``label`` (typed by :func:`label_type`) and ``ts``. Rows are turned
    into Arrow as they arrive, a micro-batch at a time, so that writing a range only
    concatenates and encodes.
    """

    features: tuple[str, ...]
    classes: tuple[Any, ...]
    table: pa.Table
    invalid: int = 0

    @classmethod
    def of(cls, features: Sequence[str], classes: Sequence[Any], ids: Sequence[str],
           values: np.ndarray, labels: Sequence[Any], ts: np.ndarray,
           invalid: int = 0) -> "ArchiveRows":
        """Rows from columns: ``values`` is ``(rows, features)`` (NaN: missing)."""
        kind = label_type(classes, labels)
        if kind == pa.string():
            labels = [None if label is None else str(label) for label in labels]
        columns: dict[str, pa.Array] = {"id": pa.array(ids, type=pa.string())}
        # One contiguous array per feature; from_pandas turns NaN (a null feature) into null.
        for name, column in zip(features, np.ascontiguousarray(
                np.asarray(values, dtype=np.float64).reshape(len(ids), len(features)).T)):
            columns[name] = pa.array(column, type=pa.float64(), from_pandas=True)
        columns["label"] = pa.array(labels, type=kind)
        columns["ts"] = pa.array(np.asarray(ts, dtype=np.int64), type=pa.int64())
        return cls(tuple(features), tuple(classes), pa.table(columns), invalid)

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def ids(self) -> list[str]:
        return self.table.column("id").to_pylist()

    @property
    def values(self) -> np.ndarray:
        """``(rows, features)`` float64, NaN where missing."""
        if not len(self):
            return np.empty((0, len(self.features)), dtype=np.float64)
        return np.column_stack([self.table.column(name).to_numpy(zero_copy_only=False)
                                for name in self.features]).astype(np.float64)

    @property
    def labels(self) -> list[Any]:
        return self.table.column("label").to_pylist()

    @property
    def ts(self) -> np.ndarray:
        return self.table.column("ts").to_numpy()


def event_rows(messages: Iterable[tuple[bytes | None, int]], features: Sequence[str],
               classes: Sequence[Any]) -> ArchiveRows:
    """Validate raw messages and keep the valid ones as columns.

    Parameters
    ----------
    messages
        ``(value, kafka_timestamp_ms)`` pairs in offset order.
    features, classes
        The active model's ordered feature names and class labels.

    Returns
    -------
    ArchiveRows
        One row per valid event: its ``id``, features in model order (by name or as a list,
        as :func:`transport.schemas.validate_event` accepts them), ``label`` (None when absent) and
        ``ts`` (the event's, else the Kafka timestamp). ``invalid`` counts the others.
    """
    ids: list[str] = []
    vectors: list[np.ndarray] = []
    labels: list[Any] = []
    ts: list[int] = []
    invalid = 0
    for value, kafka_ts in messages:
        try:
            event = validate_event(parse_event(value), features, classes)
        except InvalidEvent:
            invalid += 1
            continue
        ids.append(event.id)
        vectors.append(event.features)
        labels.append(event.label)
        event_ts = event.ts
        # Kafka >= 0.10 stamps every record; -1 would only come from ancient producers.
        ts.append(event_ts if event_ts is not None and event_ts <= MAX_TS_MS
                  else max(int(kafka_ts), 0))
    values = (np.stack(vectors) if vectors
              else np.empty((0, len(features)), dtype=np.float64))
    return ArchiveRows.of(features, classes, ids, values, labels,
                          np.asarray(ts, dtype=np.int64), invalid)


def label_type(classes: Sequence[Any], labels: Sequence[Any] = ()) -> pa.DataType:
    """Parquet type of the ``label`` column: int64 for integer classes, else string.

    One type per model keeps every file of the lake readable together; ``labels`` that do not
    fit integer classes (after a model changed its classes) make the file's labels strings.
    """
    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if classes and all(is_int(c) for c in classes) and all(
            label is None or is_int(label) for label in labels):
        return pa.int64()
    return pa.string()


def build_table(parts: Sequence[ArchiveRows]) -> pa.Table:
    """The lake table of ``parts`` (in order): ``id``, one column per feature, ``label``, ``ts``.

    Feature columns follow the newest part's model order; a part validated under another order
    is rearranged by name (null where it lacks a feature). Features are float64 with ``null``
    where the event gave ``null`` (raw values such as ``-999.0`` markers are kept as they are).
    ``label`` is int64 when the newest model's classes are integers and every label fits,
    else string.
    """
    if not parts:
        raise ValueError("no rows to build a table from")
    features = parts[-1].features
    kind = label_type(parts[-1].classes)
    if kind == pa.int64() and any(
            p.table.schema.field("label").type != pa.int64()
            and p.table.column("label").null_count < len(p) for p in parts):
        kind = pa.string()
    names = ["id", *features, "label", "ts"]
    if all(p.features == features and p.table.schema.field("label").type == kind
           for p in parts):
        # Contiguous columns: the Parquet writer pays per chunk, and there is one per part.
        return pa.concat_tables([p.table for p in parts]).combine_chunks()
    tables = []
    for part in parts:
        t = part.table
        present = set(part.features)
        tables.append(pa.table(
            [t.column("id"),
             *(t.column(name) if name in present else pa.nulls(len(part), pa.float64())
               for name in features),
             t.column("label").cast(kind), t.column("ts")], names=names))
    return pa.concat_tables(tables).combine_chunks()


def hour_directory(hour: int) -> str:
    """``dt=YYYY-MM-DD/hour=HH`` of the UTC hour number ``hour`` (epoch ms // 3,600,000)."""
    when = datetime.fromtimestamp(hour * 3600, tz=timezone.utc)
    return f"dt={when:%Y-%m-%d}/hour={when:%H}"


def split_by_hour(table: pa.Table) -> list[tuple[str, pa.Table]]:
    """Split a lake table by the UTC hour of its ``ts``: ``(hour directory, rows)``, in time
    order, each keeping the rows' original order."""
    hours = table.column("ts").to_numpy() // HOUR_MS
    distinct = np.unique(hours)
    if len(distinct) == 1:
        return [(hour_directory(int(distinct[0])), table)]
    return [(hour_directory(int(h)), table.take(pa.array(np.flatnonzero(hours == h))))
            for h in distinct]


def file_name(topic: str, partition: int, first: int, last: int) -> str:
    """The name of the file holding ``topic[partition]`` offsets ``first..last``.

    Zero-padded so names sort by offset; derived from the range alone, so writing the same
    range again replaces the file instead of adding one.
    """
    return f"part-{topic}-p{partition}-{first:019d}-{last:019d}.parquet"


def parse_file_name(name: str) -> tuple[str, int, int, int] | None:
    """``(topic, partition, first, last)`` of a :func:`file_name`, or None for another name."""
    name = name.rsplit("/", 1)[-1]
    if not (name.startswith("part-") and name.endswith(".parquet")):
        return None
    head, _, last = name[len("part-"):-len(".parquet")].rpartition("-")
    head, _, first = head.rpartition("-")
    topic, _, partition = head.rpartition("-p")
    if not (topic and partition.isdigit() and first.isdigit() and last.isdigit()):
        return None
    return topic, int(partition), int(first), int(last)


def intent_path(root: str, topic: str, partition: int) -> str:
    """Where the last range written for ``topic[partition]`` is recorded (under ``_archive``,
    which lake readers skip)."""
    return f"{root.rstrip('/')}/_archive/{topic}/p{partition}.json"


# --- a partition's buffers and the exactly-once bookkeeping ---------------------------------

@dataclass
class PartitionBuffer:
    """Consecutive records of one partition waiting to be written as one offset range."""

    first: int
    last: int
    opened_at: float
    records: int = 0
    parts: list[ArchiveRows] = field(default_factory=list)
    #: While replaying: 0 before the planned range, 1 inside it, 2 after it.
    zone: int | None = None

    @property
    def rows(self) -> int:
        return sum(len(p) for p in self.parts)


@dataclass
class PartitionState:
    """What the archiver holds for one assigned partition.

    ``plan`` is a range already (perhaps partly) written but not committed: until it has been
    written again, buffers are cut exactly at its ends so that it gets the same file names.
    """

    tp: TopicPartition
    ready: bool = False
    next_offset: int = 0
    plan: tuple[int, int] | None = None
    current: PartitionBuffer | None = None
    sealed: deque[PartitionBuffer] = field(default_factory=deque)
    pending: "Flush | None" = None
    commit_due: int | None = None
    retry_at: float = 0.0
    backoff_s: float = 0.0
    closing: bool = False

    def add(self, offsets: Sequence[int], rows: Callable[[int, int], ArchiveRows],
            now: float, max_records: int | None = None) -> None:
        """Add records with ``offsets`` (ascending); ``rows(i, j)`` validates records i..j-1.

        Cuts buffers at the planned range's ends (sealing the planned range as soon as its
        last offset is in) and, outside it, every ``max_records`` records.
        """
        if not offsets:
            return
        i, n = 0, len(offsets)
        while i < n:
            zone = None
            j = n
            if self.plan is not None:
                start, end = self.plan
                o = offsets[i]
                zone = 0 if o < start else (1 if o <= end else 2)
                if zone == 0:
                    j = bisect.bisect_left(offsets, start, i, n)
                elif zone == 1:
                    j = bisect.bisect_right(offsets, end, i, n)
                else:
                    # Past the planned range (the log lost its end): it cannot be rewritten.
                    if self.current is not None and self.current.zone == 1:
                        self.seal()
                    self.plan, zone = None, None
            if self.current is not None and self.current.zone != zone:
                self.seal()
            if max_records is not None and zone != 1:
                if self.current is not None and self.current.records >= max_records:
                    self.seal()
                room = max_records - (self.current.records if self.current else 0)
                j = min(j, i + room)
            part = rows(i, j)
            if self.current is None:
                self.current = PartitionBuffer(offsets[i], offsets[j - 1], now, zone=zone)
            buffer = self.current
            buffer.last = offsets[j - 1]
            buffer.records += j - i
            if len(part):
                buffer.parts.append(part)
            if self.plan is not None and zone == 1 and buffer.last >= self.plan[1]:
                self.seal()
                self.plan = None
            i = j
        self.next_offset = offsets[-1] + 1

    def seal(self) -> None:
        """Close the current buffer: it is written as one range at the next flush."""
        if self.current is not None:
            self.sealed.append(self.current)
            self.current = None

    def due(self, now: float, flush_s: float, max_rows: int) -> bool:
        """Whether the current buffer should be sealed now (never inside a planned range)."""
        buffer = self.current
        if buffer is None or buffer.zone == 1:
            return False
        return buffer.records >= max_rows or now - buffer.opened_at >= flush_s

    def buffered_records(self) -> int:
        """Records read but not yet written."""
        return ((self.current.records if self.current is not None else 0)
                + sum(b.records for b in self.sealed)
                + (self.pending.records if self.pending is not None else 0))

    def has_work(self) -> bool:
        return bool(self.sealed) or self.pending is not None or self.commit_due is not None


@dataclass
class Flush:
    """One offset range of one partition, ready to write: its files and their tables."""

    topic: str
    partition: int
    first: int
    last: int
    records: int
    files: list[tuple[str, pa.Table]]

    @property
    def rows(self) -> int:
        return sum(t.num_rows for _, t in self.files)


def prepare_flush(topic: str, partition: int, buffer: PartitionBuffer) -> Flush:
    """Build the per-hour tables of ``buffer`` (relative paths under the lake root)."""
    files: list[tuple[str, pa.Table]] = []
    if buffer.rows:
        name = file_name(topic, partition, buffer.first, buffer.last)
        for directory, table in split_by_hour(build_table(buffer.parts)):
            files.append((f"{directory}/{name}", table))
    return Flush(topic, partition, buffer.first, buffer.last, buffer.records, files)


def read_intent(fs: AbstractFileSystem, root: str, topic: str,
                partition: int) -> tuple[int, int] | None:
    """The last range recorded for ``topic[partition]``, or None."""
    path = intent_path(root, topic, partition)
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        intent = orjson.loads(raw)
        return int(intent["first"]), int(intent["last"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        log.warning("ignored unreadable archive intent %s", path)
        return None


def write_flush(fs: AbstractFileSystem, root: str, flush: Flush,
                max_files: int | None = None) -> list[str]:
    """Record ``flush``'s range as the partition's intent, then write its files.

    ``max_files`` stops after that many files (a crash half-way, for tests). Returns the paths
    written.
    """
    root = root.rstrip("/")
    intent = {"topic": flush.topic, "partition": flush.partition, "first": flush.first,
              "last": flush.last, "files": [path for path, _ in flush.files],
              "written_at": int(time.time() * 1000)}
    _write_bytes(fs, intent_path(root, flush.topic, flush.partition), orjson.dumps(intent))
    written = []
    for path, table in flush.files[:max_files]:
        sink = pa.BufferOutputStream()
        # No dictionary for the feature columns (trying one on float columns costs twice the
        # rest of the encoding, and saves a few percent of space) and statistics for ``ts``
        # only (what readers filter on; min/max of every feature cost a fifth of the rest).
        pq.write_table(table, sink, compression="snappy", use_dictionary=["label"],
                       write_statistics=["ts"])
        _write_bytes(fs, f"{root}/{path}", sink.getvalue().to_pybytes())
        written.append(f"{root}/{path}")
    return written


def _write_bytes(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Write a whole object: one PUT on S3 (atomic); a rename on a local disk."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in LOCAL_PROTOCOLS:
        parent, _, name = path.rpartition("/")
        fs.makedirs(parent, exist_ok=True)
        # A dot-name is skipped by lake readers until the rename makes it whole.
        temporary = f"{parent}/.{name}.tmp"
        fs.pipe_file(temporary, data)
        fs.mv(temporary, path)
    else:
        fs.pipe_file(path, data)


# --- the archiver, fed by the serving path ------------------------------------------------

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


class BatchRows:
    """The valid events of one decoded micro-batch as one Arrow table, its rows grouped by
    partition (message order kept within each), so that any range of one partition's records
    is a zero-copy slice of it: one conversion per micro-batch, not one per partition.

    Parameters
    ----------
    features, classes
        The model the batch was validated with.
    columns
        The decoded micro-batch.
    partitions, timestamps
        Partition and Kafka timestamp of every message of the batch.
    """

    def __init__(self, features: Sequence[str], classes: Sequence[Any], columns: EventColumns,
                 partitions: Sequence[int], timestamps: Sequence[int]) -> None:
        positions = np.asarray(columns.positions, dtype=np.int64)
        part = (np.asarray(partitions, dtype=np.int64)[positions] if len(positions)
                else positions)
        order = np.argsort(part, kind="stable")
        self._part = part[order]
        self._positions = positions[order]
        chosen = order.tolist()
        self.rows = column_rows(features, classes, [columns.ids[k] for k in chosen],
                                columns.features[order], [columns.labels[k] for k in chosen],
                                [columns.ts[k] for k in chosen],
                                [timestamps[p] for p in self._positions.tolist()])

    def of_partition(self, partition: int, messages: np.ndarray
                     ) -> Callable[[int, int], ArchiveRows]:
        """``rows(i, j)`` for :meth:`LakeArchiver.add`: the valid events among ``partition``'s
        messages ``i..j-1``, where ``messages`` are the indexes of that partition's messages
        in the batch (ascending)."""
        lo = int(np.searchsorted(self._part, partition, side="left"))
        hi = int(np.searchsorted(self._part, partition, side="right"))
        positions = self._positions[lo:hi]
        whole = self.rows

        def rows_between(i: int, j: int) -> ArchiveRows:
            a = lo + int(np.searchsorted(positions, messages[i], side="left"))
            b = lo + int(np.searchsorted(positions, messages[j - 1], side="right"))
            return ArchiveRows(whole.features, whole.classes, whole.table.slice(a, b - a),
                               invalid=(j - i) - (b - a))

        return rows_between


def partition_rows(features: Sequence[str], classes: Sequence[Any], columns: EventColumns,
                   messages: np.ndarray, timestamps: Sequence[int]
                   ) -> Callable[[int, int], ArchiveRows]:
    """``rows(i, j)`` for :meth:`LakeArchiver.add` of a micro-batch read from one partition
    (``messages``: the indexes of the messages to archive; ``timestamps``: every message's
    Kafka timestamp)."""
    partitions = np.full(len(timestamps), -1, dtype=np.int64)
    partitions[messages] = 0
    return BatchRows(features, classes, columns, partitions, timestamps).of_partition(
        0, messages)


def column_rows(features: Sequence[str], classes: Sequence[Any], ids: Sequence[str],
                values: np.ndarray, labels: Sequence[Any], event_ts: Sequence[int | None],
                kafka_ts: Sequence[int], invalid: int = 0) -> ArchiveRows:
    """:class:`ArchiveRows` of already validated events: ``ts`` is the event's, else (absent,
    or past year 9999) its Kafka timestamp."""
    ts = np.fromiter((t if t is not None and t <= MAX_TS_MS else max(int(k), 0)
                      for t, k in zip(event_ts, kafka_ts)), dtype=np.int64, count=len(ids))
    return ArchiveRows.of(features, classes, ids, values, labels, ts, invalid)


def lake_files(fs: AbstractFileSystem, root: str) -> list[str]:
    """Every archive file under the lake root (for checks and tests)."""
    try:
        found = fs.find(root)
    except FileNotFoundError:
        return []
    return sorted(p for p in found if parse_file_name(p) is not None
                  and "/_" not in p[len(root):])
