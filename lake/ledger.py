"""Exactly once across crashes: a partition's buffered ranges, their intents and flushes.

Before a range is written it is recorded in an intent object
(:func:`lake.layout.intent_path`); a worker that crashes after writing but before committing
leaves an intent beyond the committed offset, and whoever gets the partition next writes that
range again under the same names, replacing rather than duplicating.
"""
from __future__ import annotations

import bisect
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from aiokafka import TopicPartition
from fsspec import AbstractFileSystem

from models.storage import LOCAL_PROTOCOLS

from lake.layout import file_name, intent_path, split_by_hour
from lake.rows import ArchiveRows, build_table

log = logging.getLogger(__name__)

__all__ = ["PartitionBuffer", "PartitionState", "Flush", "prepare_flush", "read_intent", "write_flush"]


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
