"""Where the archive puts things in the lake: hour directories, file names, intents.

``LAKE_URI/dt=YYYY-MM-DD/hour=HH/part-<topic>-p<partition>-<first>-<last>.parquet`` holds the
events of one partition's offset range whose timestamps fall in that UTC hour, and
``LAKE_URI/_archive/<topic>/p<partition>.json`` the range being written (readers skip ``_``
paths). Pure functions of names and tables.
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
from fsspec import AbstractFileSystem


log = logging.getLogger(__name__)

__all__ = ["HOUR_MS", "MAX_TS_MS", "hour_directory", "split_by_hour", "file_name", "parse_file_name", "intent_path", "lake_files"]

HOUR_MS = 3_600_000
#: The last millisecond of year 9999: a larger ``ts`` has no calendar date, so such an event
#: is filed (and its ``ts`` column set) by its Kafka timestamp instead.
MAX_TS_MS = 253_402_300_799_999

Schema = tuple[Sequence[str], Sequence[Any]]


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


def lake_files(fs: AbstractFileSystem, root: str) -> list[str]:
    """Every archive file under the lake root (for checks and tests)."""
    try:
        found = fs.find(root)
    except FileNotFoundError:
        return []
    return sorted(p for p in found if parse_file_name(p) is not None
                  and "/_" not in p[len(root):])
