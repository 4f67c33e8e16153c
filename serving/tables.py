"""Serving state in Faust tables, each backed by a Kafka changelog and recovered at start.

Every table is sharded like what feeds it, so the worker that owns a row's partition is the
one that writes and answers for it, however many workers run:

* ``latest_predictions`` rows live in the partition of the input event they answer: the
  serving path writes them from the same loop that scores the event (no second reading of
  the predictions), into a RocksDB store on local disk whose rows expire after
  ``LATEST_RETENTION_S``, like the changelog's. Memory stays bounded however many ids the
  stream carries, and a restart reads only the changelog written since the store's last
  recorded offset.
* ``class_counts`` and ``scored_by_version`` (like ``quality_by_version``) have one partition:
  the worker that reads the one-partition summaries of scored micro-batches keeps them.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from datetime import timedelta
from itertools import islice
from typing import Any, Iterable, Mapping, Sequence

import orjson
from faust.types import TP

from app import app
from transport.topics import durability_config

settings = app.settings

__all__ = ["latest_predictions", "class_counts", "scored_by_version", "store_latest",
           "record_changelog_offsets", "latest_prediction", "count_scored", "table_rows",
           "table_size", "CLASS_WINDOW_S", "SCORED_MAX_VERSIONS", "LATEST_CHANGELOG",
           "SUMMARY_CHANGELOG_CONFIG"]

log = logging.getLogger(__name__)

CLASS_WINDOW_S = 60
#: Most model versions ``scored_by_version`` keeps (the oldest go first): with a speed-layer
#: update every few seconds, versions are many.
SCORED_MAX_VERSIONS = 500
#: Rows of ``latest_predictions`` shown by the web view and ``/tables/`` (the newest written).
RECENT_ROWS = 200
N = settings.topic_partitions
MIB = 1024 * 1024

latest_predictions = app.Table(
    "latest_predictions", key_type=bytes, value_type=bytes, partitions=N,
    # On disk, not in memory: one row per id of the stream. RocksDB drops rows older than
    # the TTL when it compacts; small write buffers and cache keep its memory flat. (The
    # path names the files: a bare "rocksdb://" would count as no store and mean memory.)
    store="rocksdb:latest_predictions",
    options={"ttl": settings.latest_retention_s, "write_buffer_size": 8 * MIB,
             "max_write_buffer_number": 2, "target_file_size_base": 16 * MIB,
             "block_cache_size": 8 * MIB},
    # The changelog would keep every id forever under compaction alone: old segments go too.
    extra_topic_configs={
        **durability_config(settings),
        "cleanup.policy": "compact,delete",
        "retention.ms": str(settings.latest_retention_s * 1000),
        "segment.ms": str(max(settings.latest_retention_s * 1000 // 3, 60_000)),
    },
    help="Latest prediction per event id (the JSON message as sent), in the partition of "
         f"the input event; rows expire after {settings.latest_retention_s} s.")

#: The changelog topic of ``latest_predictions``: its active partitions on a worker are the
#: input partitions that worker serves.
LATEST_CHANGELOG = latest_predictions.changelog_topic.get_topic_name()

#: Topic configuration of the changelogs of the tables fed by the one-partition summaries of
#: scored micro-batches. They get records per micro-batch of every worker but hold few keys:
#: once a segment closes the broker compacts it to the newest record per key, so what a
#: restart reads stays bounded (the keys, plus at most this long of the newest records)
#: however long the group has run.
SUMMARY_CHANGELOG_CONFIG = {**durability_config(settings), "segment.ms": str(5 * 60 * 1000)}

# Fed by the one-partition summaries of scored micro-batches (speed.agent): one worker of
# the group keeps them.
class_counts = app.Table(
    "class_counts", default=int, key_type=str, partitions=1,
    extra_topic_configs=SUMMARY_CHANGELOG_CONFIG,
    help=f"Predicted-class counts in {CLASS_WINDOW_S}-second tumbling windows.",
).tumbling(CLASS_WINDOW_S, expires=timedelta(hours=1)).relative_to_stream()

scored_by_version = app.Table(
    "scored_by_version", default=int, key_type=str, partitions=1,
    extra_topic_configs=SUMMARY_CHANGELOG_CONFIG,
    help=f"Events scored per model version (the newest {SCORED_MAX_VERSIONS} versions).")

#: The newest rows this worker wrote to ``latest_predictions`` (for the web view: the store
#: itself is ordered by key, and counting it would read all of it).
_recent: deque[tuple[bytes, bytes]] = deque(maxlen=RECENT_ROWS)


def store_latest(partition: int, keys: Sequence[bytes], values: Sequence[bytes]) -> None:
    """Write rows to ``latest_predictions``' store for ``partition`` in one RocksDB write.

    Their changelog records are the caller's to produce (in the same partition); rows are
    written before those are stored, and a crash before they are re-delivers the events, which
    writes the rows again.
    """
    from rocksdict import WriteBatch

    store: Any = latest_predictions.data  # Faust's RocksDB store
    db = store._db_for_partition(partition)
    batch = WriteBatch(raw_mode=True)
    put = batch.put
    for key, value in zip(keys, values):
        put(key, value)
    db.write(batch)
    _recent.extend(zip(keys[-RECENT_ROWS:], values[-RECENT_ROWS:]))


def record_changelog_offsets(offsets: Mapping[int, int]) -> None:
    """Remember, per partition, the newest changelog offset whose row the store holds: a
    restart recovers only what comes after it."""
    store: Any = latest_predictions.data
    for partition, offset in offsets.items():
        store.set_persisted_offset(TP(LATEST_CHANGELOG, partition), offset)


def latest_prediction(key: bytes) -> bytes | None:
    """This worker's stored prediction for ``key``, or None (also once it is older than
    ``LATEST_RETENTION_S``, which RocksDB only enforces when it compacts)."""
    value: bytes | None = latest_predictions.data.get(key)
    if value is None:
        return None
    try:
        ts = orjson.loads(value).get("ts", 0)
    except (orjson.JSONDecodeError, AttributeError):
        return None
    if isinstance(ts, int) and ts < (time.time() - settings.latest_retention_s) * 1000:
        return None
    return value


def count_scored(version: str, scored: int, classes: dict[str, int]) -> None:
    """Add a scored micro-batch's counts (inside an agent's ``async for event``: windowed
    table writes take the event's time and partition); keep the newest
    :data:`SCORED_MAX_VERSIONS` versions."""
    for cls, n in classes.items():
        class_counts[cls] += n
    if scored:
        scored_by_version[version] += scored
        excess = len(scored_by_version) - SCORED_MAX_VERSIONS
        if excess > 0:
            for old in list(islice(scored_by_version.keys(), excess)):
                del scored_by_version[old]


def table_size(name: str) -> int:
    """Rows of table ``name`` on this worker (an estimate for ``latest_predictions``)."""
    if name == latest_predictions.name:
        store: Any = latest_predictions.data
        return sum(int(db.property_int_value("rocksdb.estimate-num-keys") or 0)
                   for db in store._dbs_for_actives())
    table: Any = app.tables[name]
    return len(table.data)


def table_rows(name: str, limit: int) -> dict[str, Any]:
    """This worker's rows of table ``name`` as JSON, newest first, at most ``limit``."""
    table: Any = app.tables[name]
    rows: list[dict[str, Any]] = []
    newest_first: Iterable[tuple[Any, Any]]
    if name == latest_predictions.name:
        newest_first = islice(reversed(_recent), limit)
    else:
        newest_first = islice(reversed(table.data.items()), limit)
    for key, value in newest_first:
        if isinstance(key, tuple) and len(key) == 2 and isinstance(key[1], tuple):
            label, (start, end) = key
            rows.append({"key": label, "window_start": start, "window_end": end,
                         "value": value})
        elif isinstance(key, bytes):  # latest_predictions: raw id -> raw JSON prediction
            rows.append({"key": key.decode("utf-8", "replace"), "value": orjson.loads(value)})
        else:
            rows.append({"key": key, "value": value})
    return {"name": name, "help": table.help, "size": table_size(name), "rows": rows}
