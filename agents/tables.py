"""Serving state in Faust tables, each backed by a Kafka changelog and recovered at start.

Every table is sharded like the topic that feeds it, so the worker that owns a key's
partition is the one that writes and answers for it, however many workers run.
"""
from __future__ import annotations

import logging
from datetime import timedelta
from itertools import islice
from typing import Any

import orjson
from faust.types import EventT

from agents.serving import class_count_deltas, predictions_topic, version_count_deltas
from app import app

settings = app.settings

__all__ = ["latest_predictions", "class_counts", "scored_by_version", "record_predictions",
           "count_classes", "count_versions", "CLASS_WINDOW_S"]

log = logging.getLogger(__name__)

CLASS_WINDOW_S = 60
N = settings.topic_partitions

latest_predictions = app.Table(
    # Rows live in the partition of the prediction they come from, which the raw id bytes
    # picked; the router hashes the same bytes, so GET /predictions/{id}/ reaches the owner.
    "latest_predictions", key_type=bytes, value_type=bytes, partitions=N,
    # Every id gets a row, so the changelog grows with the stream; recovery at start reads
    # all of it. Compaction alone would keep every id forever: delete old segments too.
    extra_topic_configs={
        "cleanup.policy": "compact,delete",
        "retention.ms": str(settings.latest_retention_s * 1000),
        "segment.ms": str(max(settings.latest_retention_s * 1000 // 3, 60_000)),
    },
    help="Latest prediction per event id (the JSON message as sent).")

class_counts = app.Table(
    "class_counts", default=int, key_type=str, partitions=N,
    help=f"Predicted-class counts in {CLASS_WINDOW_S}-second tumbling windows.",
).tumbling(CLASS_WINDOW_S, expires=timedelta(hours=1)).relative_to_stream()

scored_by_version = app.Table(
    "scored_by_version", default=int, key_type=str, partitions=N,
    help="Events scored per model version.")


#: Predictions written to ``latest_predictions`` per batch, and the longest wait for a batch.
RECORD_BATCH = 1024
RECORD_WITHIN_S = 0.05


@app.agent(predictions_topic, concurrency=1)
async def record_predictions(stream: Any) -> None:
    """Keep the latest prediction of every id.

    One row per prediction is the tables' hottest path, so rows are written in batches: each
    goes to the store and to the changelog partition of the prediction it came from, as
    ``table[key] = value`` would write it, without that path's per-row bookkeeping. As for any
    table write, the worker flushes the changelog before it commits the predictions' offsets.
    """
    async for events in stream.noack_take(RECORD_BATCH, within=RECORD_WITHIN_S):
        store_latest(events)
        for event in events:
            await stream.ack(event)


def store_latest(events: list[EventT]) -> None:
    """Write every prediction in ``events`` to ``latest_predictions`` and its changelog."""
    store = latest_predictions.data
    send_changelog = latest_predictions.send_changelog
    for event in events:
        store[event.key] = event.value
        send_changelog(event.message.partition, event.key, event.value)


@app.agent(class_count_deltas, concurrency=1)
async def count_classes(stream: Any) -> None:
    """Add each micro-batch's per-class counts to the current window."""
    async for cls, n in stream.items():
        class_counts[cls] += int(n)


@app.agent(version_count_deltas, concurrency=1)
async def count_versions(stream: Any) -> None:
    """Add each micro-batch's count to its model version's total."""
    async for version, n in stream.items():
        scored_by_version[version] += int(n)


def table_rows(name: str, limit: int) -> dict[str, Any]:
    """This worker's rows of table ``name`` as JSON, newest first, at most ``limit``."""
    table = app.tables[name]
    rows: list[dict[str, Any]] = []
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
    return {"name": name, "help": table.help, "size": len(table.data), "rows": rows}
