"""The archive's rows: a micro-batch's valid events as Arrow columns, and the tables written.

The serving path hands the archive the events it decoded as columns (:class:`BatchRows`);
:func:`build_table` turns a range of them into the table of one Parquet file.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa

from transport.schemas import (CLASSIFICATION, REGRESSION, EventColumns, InvalidEvent,
                               parse_event, validate_event)

from lake.layout import MAX_TS_MS

log = logging.getLogger(__name__)

__all__ = ["ArchiveRows", "event_rows", "label_type", "build_table", "BatchRows", "partition_rows", "column_rows"]


@dataclass(frozen=True)
class ArchiveRows:
    """Valid events of one run of consecutive records, as an Arrow table.

    ``features``, ``classes`` and ``task`` are the model's when the rows were validated;
    ``table`` has the lake's columns: ``id``, one float64 column per feature in that order
    (null where the event gave ``null``), ``label`` (typed by :func:`label_type`) and ``ts``.
    Rows are turned
    into Arrow as they arrive, a micro-batch at a time, so that writing a range only
    concatenates and encodes.
    """

    features: tuple[str, ...]
    classes: tuple[Any, ...]
    table: pa.Table
    invalid: int = 0
    task: str = CLASSIFICATION

    @classmethod
    def of(cls, features: Sequence[str], classes: Sequence[Any], ids: Sequence[str],
           values: np.ndarray, labels: Sequence[Any], ts: np.ndarray,
           invalid: int = 0, task: str = CLASSIFICATION) -> "ArchiveRows":
        """Rows from columns: ``values`` is ``(rows, features)`` (NaN: missing)."""
        kind = label_type(classes, labels, task)
        if kind == pa.string():
            labels = [None if label is None else str(label) for label in labels]
        columns: dict[str, pa.Array] = {"id": pa.array(ids, type=pa.string())}
        # One contiguous array per feature; from_pandas turns NaN (a null feature) into null.
        for name, column in zip(features, np.ascontiguousarray(
                np.asarray(values, dtype=np.float64).reshape(len(ids), len(features)).T)):
            columns[name] = pa.array(column, type=pa.float64(), from_pandas=True)
        columns["label"] = pa.array(labels, type=kind)
        columns["ts"] = pa.array(np.asarray(ts, dtype=np.int64), type=pa.int64())
        return cls(tuple(features), tuple(classes), pa.table(columns), invalid, task)

    def __len__(self) -> int:
        return int(self.table.num_rows)

    @property
    def ids(self) -> list[str]:
        return list(self.table.column("id").to_pylist())

    @property
    def values(self) -> np.ndarray:
        """``(rows, features)`` float64, NaN where missing."""
        if not len(self):
            return np.empty((0, len(self.features)), dtype=np.float64)
        values: np.ndarray = np.column_stack([
            self.table.column(name).to_numpy(zero_copy_only=False)
            for name in self.features]).astype(np.float64)
        return values

    @property
    def labels(self) -> list[Any]:
        return list(self.table.column("label").to_pylist())

    @property
    def ts(self) -> np.ndarray:
        return np.asarray(self.table.column("ts").to_numpy())


def event_rows(messages: Iterable[tuple[bytes | None, int]], features: Sequence[str],
               classes: Sequence[Any], task: str = CLASSIFICATION) -> ArchiveRows:
    """Validate raw messages and keep the valid ones as columns.

    Parameters
    ----------
    messages
        ``(value, kafka_timestamp_ms)`` pairs in offset order.
    features, classes, task
        The active model's ordered feature names, class labels and task.

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
            event = validate_event(parse_event(value), features, classes, task)
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
                          np.asarray(ts, dtype=np.int64), invalid, task)


def label_type(classes: Sequence[Any], labels: Sequence[Any] = (),
               task: str = CLASSIFICATION) -> pa.DataType:
    """Parquet type of the ``label`` column: float64 for a regression, int64 for integer
    classes, else string.

    One type per model keeps every file of the lake readable together; ``labels`` that do not
    fit integer classes (after a model changed its classes) make the file's labels strings.
    """
    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if task == REGRESSION:
        return pa.float64()
    if classes and all(is_int(c) for c in classes) and all(
            label is None or is_int(label) for label in labels):
        return pa.int64()
    return pa.string()


def build_table(parts: Sequence[ArchiveRows]) -> pa.Table:
    """The lake table of ``parts`` (in order): ``id``, one column per feature, ``label``, ``ts``.

    Feature columns follow the newest part's model order; a part validated under another order
    is rearranged by name (null where it lacks a feature). Features are float64 with ``null``
    where the event gave ``null`` (raw values such as ``-999.0`` markers are kept as they are).
    ``label`` is float64 when the newest model is a regression, int64 when its classes are
    integers; either only when every part's labels are of that type (or absent), else string.
    """
    if not parts:
        raise ValueError("no rows to build a table from")
    features = parts[-1].features
    kind = label_type(parts[-1].classes, task=parts[-1].task)
    if kind != pa.string() and any(
            p.table.schema.field("label").type != kind
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


class BatchRows:
    """The valid events of one decoded micro-batch as one Arrow table, its rows grouped by
    partition (message order kept within each), so that any range of one partition's records
    is a zero-copy slice of it: one conversion per micro-batch, not one per partition.

    Parameters
    ----------
    features, classes, task
        The model the batch was validated with.
    columns
        The decoded micro-batch.
    partitions, timestamps
        Partition and Kafka timestamp of every message of the batch.
    """

    def __init__(self, features: Sequence[str], classes: Sequence[Any], columns: EventColumns,
                 partitions: Sequence[int] | np.ndarray, timestamps: Sequence[int],
                 task: str = CLASSIFICATION) -> None:
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
                                [timestamps[p] for p in self._positions.tolist()],
                                task=task)

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
                               invalid=(j - i) - (b - a), task=whole.task)

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
                kafka_ts: Sequence[int], invalid: int = 0,
                task: str = CLASSIFICATION) -> ArchiveRows:
    """:class:`ArchiveRows` of already validated events: ``ts`` is the event's, else (absent,
    or past year 9999) its Kafka timestamp."""
    ts = np.fromiter((t if t is not None and t <= MAX_TS_MS else max(int(k), 0)
                      for t, k in zip(event_ts, kafka_ts)), dtype=np.int64, count=len(ids))
    return ArchiveRows.of(features, classes, ids, values, labels, ts, invalid, task)
