"""The archive: pure parts (rows, tables, names, hours, replay plans), then exactly-once into
the lake against the real broker and S3 server, in process and with a worker killed -9."""
from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from lake import archive
from lake.archive import LakeArchiver
from lake.layout import (HOUR_MS, MAX_TS_MS, file_name, hour_directory, lake_files,
                         parse_file_name, split_by_hour)
from lake.ledger import PartitionState, prepare_flush, read_intent, write_flush
from lake.rows import BatchRows, build_table, event_rows, label_type, partition_rows
from transport.schemas import decode_events
from app.settings import Settings, SettingsError
from transport.topics import ensure_topics
from demo.data import FEATURES as HIGGS
from models.registry import Registry
from models.storage import filesystem
from devstack.harness import WorkerProcess, announce, produce, publish_small_model, run

FEATURES = ["a", "b", "c"]
CLASSES = ["b", "s"]
# 2026-11-23 14:00 UTC: an hour number, and its start in epoch ms.
HOUR = 1_795_442_400_000 // HOUR_MS
T0 = HOUR * HOUR_MS


def raw(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode()


# --- pure parts --------------------------------------------------------------------------

def test_file_names_sort_by_offset_and_parse_back() -> None:
    names = [file_name("my-pipe-p1-events", 3, first, last)
             for first, last in [(1000, 1999), (0, 999), (2000, 10**12)]]
    assert sorted(names) == [names[1], names[0], names[2]]
    assert names[1] == "part-my-pipe-p1-events-p3-0000000000000000000-0000000000000000999.parquet"
    assert parse_file_name(f"bucket/lake/dt=2026-11-23/hour=14/{names[0]}") == (
        "my-pipe-p1-events", 3, 1000, 1999)
    for other in ("part-x.parquet", "data.parquet", "part-events-p3-1-2.json", "_SUCCESS"):
        assert parse_file_name(other) is None


def test_hour_directories_and_a_range_spanning_an_hour_boundary() -> None:
    assert hour_directory(HOUR) == "dt=2026-11-23/hour=14"
    assert hour_directory(HOUR + 10) == "dt=2026-11-24/hour=00"
    # Interleaved on both sides of 15:00: each side keeps its rows, in their order.
    ts = [T0 + HOUR_MS - 1, T0 + HOUR_MS, T0 + 5, T0 + 2 * HOUR_MS - 1]
    rows = event_rows([(raw({"id": f"e{i}", "features": [i, 0, 0], "ts": t}), 0)
                       for i, t in enumerate(ts)], FEATURES, CLASSES)
    parts = split_by_hour(build_table([rows]))
    assert [(d, t.column("id").to_pylist()) for d, t in parts] == [
        ("dt=2026-11-23/hour=14", ["e0", "e2"]), ("dt=2026-11-23/hour=15", ["e1", "e3"])]


def test_event_rows_validate_like_serving_and_take_ts_from_the_event_or_kafka() -> None:
    messages = [
        (raw({"id": "by-name", "features": {"c": 3, "a": 1.5, "b": None}, "label": "s",
              "ts": T0}), 7),
        (raw({"id": "as-list", "features": [1.5, None, 3]}), T0 + 42),
        (b"{not json", T0),
        (raw({"id": "bad-label", "features": [1, 2, 3], "label": "x"}), T0),
        (raw({"id": "far-future", "features": [0, 0, 0], "ts": MAX_TS_MS + 1}), T0 + 9),
        (None, T0),
    ]
    rows = event_rows(messages, FEATURES, CLASSES)
    assert rows.ids == ["by-name", "as-list", "far-future"] and rows.invalid == 3
    assert rows.labels == ["s", None, None]
    assert rows.ts.tolist() == [T0, T0 + 42, T0 + 9]
    np.testing.assert_array_equal(rows.values[0], rows.values[1])
    assert np.isnan(rows.values[0, 1]) and rows.values[0, 2] == 3.0


def test_lake_table_columns_and_types() -> None:
    rows = event_rows([(raw({"id": "x", "features": [1, -999.0, None], "label": 1}), T0),
                       (raw({"id": "y", "features": [2, 3, 4]}), T0)], FEATURES, [0, 1])
    table = build_table([rows])
    assert table.schema.names == ["id", *FEATURES, "label", "ts"]
    assert table.schema.field("label").type == pa.int64()
    assert table.schema.field("ts").type == pa.int64()
    assert table.to_pylist()[0] == {"id": "x", "a": 1.0, "b": -999.0, "c": None, "label": 1,
                                    "ts": T0}
    assert label_type(["b", "s"]) == pa.string() and label_type([0, 1]) == pa.int64()
    assert label_type([0, 1], [1, "2"]) == pa.string()
    # No label anywhere still gives the model's label type, never Arrow's null type.
    unlabelled = event_rows([(raw({"id": "z", "features": [1, 2, 3]}), T0)], FEATURES, CLASSES)
    assert build_table([unlabelled]).schema.field("label").type == pa.string()


def test_a_regression_archives_its_labels_as_numbers() -> None:
    rows = event_rows([(raw({"id": "x", "features": [1, 2, 3], "label": 2}), T0),
                       (raw({"id": "y", "features": [2, 3, 4], "label": -0.5}), T0),
                       (raw({"id": "z", "features": [2, 3, 4]}), T0),
                       (raw({"id": "bad", "features": [2, 3, 4], "label": "2"}), T0)],
                      FEATURES, [], task="regression")
    assert rows.invalid == 1
    table = build_table([rows])
    assert table.schema.field("label").type == pa.float64()
    assert table.column("label").to_pylist() == [2.0, -0.5, None]
    assert label_type([], task="regression") == pa.float64()
    unlabelled = event_rows([(raw({"id": "u", "features": [1, 2, 3]}), T0)], FEATURES, [],
                            task="regression")
    assert build_table([unlabelled]).schema.field("label").type == pa.float64()
    # The serving path's rows (one table per micro-batch, sliced per partition) alike.
    messages = [raw({"id": "p", "features": [1, 2, 3], "label": 7}),
                raw({"id": "q", "features": [1, 2, 3], "label": 0.25})]
    columns = decode_events(messages, FEATURES, [], task="regression")
    batch = BatchRows(FEATURES, [], columns, [0, 0], [T0, T0], task="regression")
    part = batch.of_partition(0, np.array([0, 1]))(0, 2)
    assert part.task == "regression"
    table = build_table([part])
    assert table.schema.field("label").type == pa.float64()
    assert table.column("label").to_pylist() == [7.0, 0.25]


def test_rows_validated_under_another_feature_order_are_rearranged_by_name() -> None:
    old = event_rows([(raw({"id": "old", "features": [1, 2, 3]}), T0)], FEATURES, CLASSES)
    new = event_rows([(raw({"id": "new", "features": [3, 2, 1]}), T0)], ["c", "b", "a"],
                     CLASSES)
    table = build_table([old, new])
    assert table.schema.names == ["id", "c", "b", "a", "label", "ts"]
    assert [(r["id"], r["a"], r["c"]) for r in table.to_pylist()] == [
        ("old", 1.0, 3.0), ("new", 1.0, 3.0)]


def _records(offsets: list[int]) -> list[Any]:
    return [SimpleNamespace(offset=o, value=raw({"id": f"o{o}", "features": [o, 0, 0],
                                                 "ts": T0}), timestamp=T0) for o in offsets]


def _feed(state: PartitionState, offsets: list[int], now: float = 0.0,
          max_records: int | None = None) -> None:
    records = _records(offsets)
    state.add(offsets, lambda i, j: event_rows(((r.value, r.timestamp) for r in records[i:j]),
                                               FEATURES, CLASSES), now, max_records)


def test_a_replay_cuts_buffers_exactly_at_the_uncommitted_range() -> None:
    state = PartitionState(TopicPartition("events", 0), ready=True, plan=(10, 19))
    _feed(state, list(range(5, 14)))
    # Inside the planned range nothing is due, however old or full.
    assert not state.due(now=1e9, flush_s=1, max_rows=1)
    _feed(state, list(range(14, 25)))
    assert [(b.first, b.last, b.records) for b in state.sealed] == [(5, 9, 5), (10, 19, 10)]
    assert state.plan is None and state.current is not None
    assert (state.current.first, state.current.last) == (20, 24)
    assert state.due(now=100.0, flush_s=60, max_rows=1000)
    assert state.due(now=0.0, flush_s=60, max_rows=5)
    assert not state.due(now=0.0, flush_s=60, max_rows=6)
    flushed = prepare_flush("events", 0, state.sealed[1])
    assert [path for path, _ in flushed.files] == [
        f"dt=2026-11-23/hour=14/{file_name('events', 0, 10, 19)}"]
    assert flushed.files[0][1].column("id").to_pylist() == [f"o{o}" for o in range(10, 20)]


def test_buffers_are_cut_at_the_row_limit_but_never_inside_a_planned_range() -> None:
    state = PartitionState(TopicPartition("events", 0), ready=True)
    _feed(state, list(range(0, 7)), max_records=3)
    _feed(state, list(range(7, 12)), max_records=3)
    assert [(b.first, b.last, b.rows) for b in state.sealed] == [(0, 2, 3), (3, 5, 3), (6, 8, 3)]
    assert (state.current.first, state.current.last) == (9, 11)
    replay = PartitionState(TopicPartition("events", 0), ready=True, plan=(0, 9))
    _feed(replay, list(range(0, 12)), max_records=3)
    assert [(b.first, b.last) for b in replay.sealed] == [(0, 9)]
    assert (replay.current.first, replay.current.last) == (10, 11)


def test_a_planned_range_the_log_no_longer_has_is_given_up() -> None:
    state = PartitionState(TopicPartition("events", 0), ready=True, plan=(10, 19))
    _feed(state, [15, 16])
    _feed(state, [30, 31])  # 17..19 are gone (retention): the range cannot be rewritten
    assert [(b.first, b.last) for b in state.sealed] == [(15, 16)]
    assert state.plan is None and (state.current.first, state.current.last) == (30, 31)


def test_a_micro_batch_of_interleaved_partitions_is_sliced_per_partition() -> None:
    """One Arrow table per micro-batch; each partition's run of records is a slice of it with
    exactly its valid events, in offset order."""
    messages, partitions, timestamps = [], [], []
    for i in range(12):
        event = {"id": f"m{i}", "features": [float(i), 0, 0], "ts": T0 + i}
        messages.append(b"{broken" if i % 5 == 4 else raw(event))
        partitions.append(i % 3)
        timestamps.append(T0 + 1000 + i)
    columns = decode_events(messages, FEATURES, CLASSES)
    batch = BatchRows(FEATURES, CLASSES, columns, partitions, timestamps)
    for partition in range(3):
        mine = np.flatnonzero(np.asarray(partitions) == partition)
        rows = batch.of_partition(partition, mine)
        whole = rows(0, len(mine))
        expected = [f"m{i}" for i in mine if i % 5 != 4]
        assert whole.ids == expected and whole.invalid == len(mine) - len(expected)
        assert whole.values[:, 0].tolist() == [float(i[1:]) for i in expected]
        # A run in the middle: records 1..2 of the partition.
        middle = rows(1, 3)
        assert middle.ids == [f"m{i}" for i in mine[1:3] if i % 5 != 4]


def test_archive_settings_are_checked() -> None:
    settings = Settings.from_env({})
    assert (settings.archive, settings.archive_flush_s, settings.archive_max_rows) == (
        True, 60.0, 100000)
    assert Settings.from_env({"ARCHIVE": "off"}).archive is False
    for env, value in (("ARCHIVE", "sometimes"), ("ARCHIVE", "2"), ("ARCHIVE_FLUSH_S", "0"),
                       ("ARCHIVE_MAX_ROWS", "0"), ("ARCHIVE_MAX_ROWS", "many")):
        with pytest.raises(SettingsError, match=env):
            Settings.from_env({env: value})


def test_a_local_lake_gets_whole_files_and_an_intent(tmp_path: Path) -> None:
    from lake.reader import list_parquet_files, read_schema

    fs, root = filesystem(f"file://{tmp_path}/lake")
    rows = event_rows([(raw({"id": f"e{i}", "features": [i, 0, 0], "ts": T0 + i * HOUR_MS}),
                        0) for i in range(3)], FEATURES, CLASSES)
    state = PartitionState(TopicPartition("events", 2), ready=True)
    state.add([7, 8, 9], lambda i, j: rows, 0.0)
    state.seal()
    flush = prepare_flush("events", 2, state.sealed.popleft())
    written = write_flush(fs, root, flush)
    assert len(written) == 3 and read_intent(fs, root, "events", 2) == (7, 9)
    assert read_intent(fs, root, "events", 3) is None
    listed = list_parquet_files(f"file://{tmp_path}/lake")
    assert [parse_file_name(p) for p in listed] == [("events", 2, 7, 9)] * 3
    assert read_schema(listed).names == ["id", *FEATURES, "label", "ts"]
    assert not list(tmp_path.rglob(".*.tmp"))


# --- against the real broker and S3 server ------------------------------------------------

def events(n: int, prefix: str, features: list[str] = FEATURES, start: int = 0
           ) -> list[bytes]:
    """Valid events: features by name and as lists, some labelled, ``ts`` alternating between
    two hours, some without ``ts`` (filed by their Kafka timestamp)."""
    out = []
    for i in range(start, start + n):
        values = [float((i * 7 + j) % 13) for j in range(len(features))]
        event: dict[str, Any] = {"id": f"{prefix}-{i}",
                                 "features": dict(zip(features, values)) if i % 2 else values}
        if i % 3 == 0:
            event["label"] = CLASSES[i % 2]
        if i % 5:
            event["ts"] = T0 + (i % 2) * HOUR_MS + i
        out.append(raw(event))
    return out


def read_lake(settings: Settings) -> tuple[pa.Table, list[str]]:
    """Every archived row with the file it is in."""
    fs, root = filesystem(settings.lake_uri, settings.storage_options)
    files = lake_files(fs, root)
    tables = []
    for path in files:
        table = pq.read_table(path, filesystem=fs)
        tables.append(table.append_column("path", pa.array([path] * table.num_rows)))
    return (pa.concat_tables(tables) if tables else pa.table({"id": pa.array([], pa.string())}),
            files)


def written_ranges(files: list[str]) -> dict[int, list[tuple[int, int]]]:
    """Offset ranges per partition named by the lake's files (one per range, sorted)."""
    ranges: dict[int, set[tuple[int, int]]] = {}
    for path in files:
        _, partition, first, last = parse_file_name(path)  # type: ignore[misc]
        ranges.setdefault(partition, set()).add((first, last))
    return {p: sorted(r) for p, r in ranges.items()}


def assert_disjoint(ranges: dict[int, list[tuple[int, int]]]) -> None:
    for partition, spans in ranges.items():
        for (_, last), (first, _) in zip(spans, spans[1:]):
            assert last < first, f"partition {partition}: overlapping ranges {spans}"


async def end_offsets(settings: Settings) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers)
    await consumer.start()
    try:
        tps = [TopicPartition(settings.events_topic, p)
               for p in consumer.partitions_for_topic(settings.events_topic) or ()]
        if not tps:
            await consumer._client.force_metadata_update()  # first sight of the topic
            tps = [TopicPartition(settings.events_topic, p)
                   for p in consumer.partitions_for_topic(settings.events_topic) or ()]
        return {tp.partition: offset for tp, offset in (await consumer.end_offsets(tps)).items()}
    finally:
        await consumer.stop()


async def committed_offsets(settings: Settings) -> dict[int, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(f"{settings.app_id}-archiver")
    finally:
        await admin.close()
    return {tp.partition: meta.offset for tp, meta in offsets.items()
            if tp.topic == settings.events_topic}


async def wait_for(condition: Callable[[], Any], what: str, timeout: float = 60.0) -> None:
    """Poll a condition (a plain or an async callable) until it holds."""
    deadline = time.monotonic() + timeout
    while not await _value(condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout}s")
        await asyncio.sleep(0.2)


async def _value(result: Any) -> Any:
    return await result if asyncio.iscoroutine(result) else result


async def feed(archiver: LakeArchiver, settings: Settings, starts: dict[int, int | None],
               ends: dict[int, int]) -> None:
    """Read each partition from ``starts`` (None: the beginning) to ``ends`` and hand the
    archiver what the serving path would: offsets and the decoded rows."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, group_id=None,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        tps = {p: TopicPartition(settings.events_topic, p) for p in starts}
        consumer.assign(list(tps.values()))
        for p, start in starts.items():
            if start is None:
                await consumer.seek_to_beginning(tps[p])
            else:
                consumer.seek(tps[p], start)
        deadline = time.monotonic() + 60

        async def behind() -> bool:
            return any([await consumer.position(tp) < ends[p] for p, tp in tps.items()])

        while await behind():
            assert time.monotonic() < deadline, "the topic was not read to its end"
            for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                if archiver.full(tp.partition):  # what the serving path does: wait for room
                    consumer.seek(tp, records[0].offset)
                    await archiver.flush_due()
                    await asyncio.sleep(0.05)
                    continue
                values = [r.value for r in records]
                columns = decode_events(values, FEATURES, CLASSES)
                archiver.add(tp.partition, [r.offset for r in records], partition_rows(
                    FEATURES, CLASSES, columns, np.arange(len(records)),
                    [r.timestamp for r in records]))
    finally:
        await consumer.stop()


async def flush_until(archiver: LakeArchiver, condition: Callable[[], Any], what: str,
                      timeout: float = 60.0) -> None:
    """Run the archiver's flushes (as the serving path's task does) until ``condition``."""
    deadline = time.monotonic() + timeout
    while not await _value(condition()):
        assert time.monotonic() < deadline, f"{what}: not after {timeout}s"
        await archiver.flush_due()
        await asyncio.sleep(0.1)


async def test_a_crash_before_the_commit_rewrites_the_same_files_and_a_revoke_loses_nothing(
        settings_env: Callable[..., dict[str, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings.from_env(settings_env(TOPIC_PARTITIONS="2", ARCHIVE_FLUSH_S="0.3",
                                              ARCHIVE_MAX_ROWS="100"))
    await ensure_topics(settings, [settings.events_topic])
    ids: set[str] = set()

    async def send(batch: list[bytes]) -> dict[int, int]:
        ids.update(json.loads(v)["id"] for v in batch)
        await produce(settings.bootstrap_servers, settings.events_topic,
                      batch + [b"{not an event"])
        return await end_offsets(settings)

    async def all_committed(ends: dict[int, int]) -> bool:
        return await committed_offsets(settings) == ends

    # 1. Read everything, then die half-way through writing: partition 0 gets its intent and
    #    the first of its hour files, partition 1 all of its files; nothing is committed.
    ends = await send(events(400, "one"))
    big = settings.replace(archive_max_rows=10_000)
    crashed = LakeArchiver(big)
    await crashed.start()
    assert await crashed.assign([0, 1]) == {0: None, 1: None}
    await feed(crashed, settings, {0: None, 1: None}, ends)
    before_crash = []
    for partition, state in sorted(crashed.states.items()):
        state.seal()
        flush = prepare_flush(settings.events_topic, partition, state.sealed.popleft())
        assert len(flush.files) >= 2  # the range spans hours
        before_crash += await asyncio.to_thread(write_flush, crashed.fs, crashed.root, flush,
                                                1 if partition == 0 else None)
    await crashed.stop(flush=False)
    assert await committed_offsets(settings) == {}

    # 2. The next owner reads each planned range again and rewrites it under the same names.
    slow = big.replace(archive_flush_s=30.0)
    survivor = LakeArchiver(slow)
    await survivor.start()
    starts = await survivor.assign([0, 1])
    assert starts == {0: 0, 1: 0}
    assert {p: s.plan for p, s in survivor.states.items()} == {
        p: (0, ends[p] - 1) for p in (0, 1)}
    await feed(survivor, settings, starts, ends)
    await flush_until(survivor, lambda: all_committed(ends), "the replayed ranges committed")
    table, files = await asyncio.to_thread(read_lake, settings)
    assert set(before_crash) < set(files)
    assert table.num_rows == len(ids) == len(set(table.column("id").to_pylist()))

    # 3. Revoking a partition writes and commits what was read of it (the survivor flushes
    #    only every 30 s); the other partition's events stay in memory.
    previous = ends
    ends = await send(events(300, "two", start=400))
    await feed(survivor, settings, previous, ends)
    await survivor.flush_due()
    assert await committed_offsets(settings) == previous
    await survivor.revoke([1])
    assert list(survivor.states) == [0]
    assert await committed_offsets(settings) == {0: previous[0], 1: ends[1]}
    await survivor.stop()
    assert await committed_offsets(settings) == ends

    # 4. The lake unreachable for long: a partition drops its buffers instead of growing, and
    #    once the lake answers it asks to be read again from its committed offset.
    failing = {"on": True}
    real_write = archive.write_flush

    def write_or_fail(*args: Any, **kwargs: Any) -> Any:
        if failing["on"]:
            raise OSError("the lake is unreachable")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(archive, "write_flush", write_or_fail)
    previous = ends
    middle = await send(events(400, "three", start=700))
    unlucky = LakeArchiver(settings)  # ARCHIVE_MAX_ROWS=100: holds 300 records at most
    await unlucky.start()
    starts = await unlucky.assign([0, 1])
    assert starts == previous
    await feed(unlucky, settings, starts, middle)
    await unlucky.flush_due()
    assert unlucky.failures >= 1 and await committed_offsets(settings) == previous
    ends = await send(events(400, "four", start=1100))
    await feed(unlucky, settings, middle, ends)
    assert all(s.buffered_records() <= unlucky.max_buffered for s in unlucky.states.values())
    behind = sorted(p for p, s in unlucky.states.items() if not s.ready)
    assert behind == [0, 1]
    failing["on"] = False
    rewinds: dict[int, int] = {}

    def rewound() -> bool:
        rewinds.update(unlucky.take_rewinds())
        return sorted(rewinds) == behind

    await flush_until(unlucky, rewound, "the rewinds once the lake answers")
    assert rewinds == previous
    await feed(unlucky, settings, dict(rewinds), ends)
    await flush_until(unlucky, lambda: all_committed(ends), "everything committed")
    await unlucky.stop()

    table, files = await asyncio.to_thread(read_lake, settings)
    archived = table.column("id").to_pylist()
    assert len(archived) == len(ids) == 1500 and set(archived) == ids
    assert_disjoint(written_ranges(files))
    for row in table.select(["ts", "path"]).to_pylist():
        assert f"/{hour_directory(row['ts'] // HOUR_MS)}/" in row["path"]


# --- a worker killed -9 half-way ------------------------------------------------------------

N_EVENTS = 30_000
N_BEFORE_KILL = 20_000


def test_a_worker_killed_half_way_leaves_every_event_in_the_lake_exactly_once(
        settings_env: Callable[..., dict[str, str]], tmp_path: Path, spark: Any) -> None:
    # Small ranges: the backlog is read in a second or two, and writing it range by range
    # takes long enough for the kill to land half-way.
    env = settings_env(ARCHIVE_FLUSH_S="1", ARCHIVE_MAX_ROWS="250")
    settings = Settings.from_env(env)
    registry = Registry(settings.registry_uri, settings.storage_options)
    ref = publish_small_model(registry, settings.model_name, list(HIGGS), CLASSES)
    run(ensure_topics(settings))
    run(announce(settings.bootstrap_servers, settings.updates_topic, ref.to_message()))
    valid = events(N_EVENTS, "k", features=list(HIGGS))
    invalid = [raw({"id": "no-features"}), raw({"id": "bad-label", "features": [0.0] * 30,
                                                 "label": "x"}), b"\xff\xfe"]
    run(produce(settings.bootstrap_servers, settings.events_topic,
                valid[:N_BEFORE_KILL // 2] + invalid + valid[N_BEFORE_KILL // 2:N_BEFORE_KILL]))

    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        worker.wait_ready()
        fs, root = filesystem(settings.lake_uri, settings.storage_options)
        deadline = time.monotonic() + 120
        covered = 0
        while covered < N_BEFORE_KILL // 3:
            assert time.monotonic() < deadline, f"too slow:\n{worker.log_tail()}"
            covered = sum(last - first + 1 for spans in written_ranges(lake_files(fs, root))
                          .values() for first, last in spans)
            time.sleep(0.2)
        worker.stop(signal.SIGKILL)
        assert covered < N_BEFORE_KILL, "the archive was complete before the kill"
    finally:
        worker.stop()

    run(produce(settings.bootstrap_servers, settings.events_topic, valid[N_BEFORE_KILL:]))
    worker = WorkerProcess(env, tmp_path / "worker-2.log").start()
    try:
        worker.wait_ready()
        ends = run(end_offsets(settings))

        async def done() -> bool:
            return await committed_offsets(settings) == ends

        run(wait_for(done, "the archive caught up", timeout=240))
    finally:
        worker.stop()

    table, files = read_lake(settings)
    archived = table.column("id").to_pylist()
    assert len(archived) == N_EVENTS and len(set(archived)) == N_EVENTS
    assert set(archived) == {json.loads(v)["id"] for v in valid}
    assert_disjoint(written_ranges(files))
    rows = {r["id"]: r for r in table.to_pylist()}
    for i in (0, 1, 3, 5, 12345, N_EVENTS - 1):
        event = json.loads(valid[i])
        row = rows[event["id"]]
        values = (event["features"] if isinstance(event["features"], list)
                  else [event["features"][f] for f in HIGGS])
        assert [row[f] for f in HIGGS] == values
        assert row["label"] == event.get("label")
        assert f"/{hour_directory(row['ts'] // HOUR_MS)}/" in row["path"]
        if "ts" in event:
            assert row["ts"] == event["ts"]

    # The batch job reads the archive together with the demo data.
    from batch import prepare
    from demo.data import write_lake
    from lake.reader import read_parquet

    write_lake(settings.lake_uri, settings.storage_options, 1000, seed=3, start_id=10**6)
    df = read_parquet(spark, settings.lake_uri, settings.storage_options)
    assert prepare.feature_columns(df.dtypes, "id", "label") == list(HIGGS)
    labelled = sum(1 for v in valid if "label" in json.loads(v))
    cleaned = prepare.clean(df, list(HIGGS), "id", "label")
    assert df.count() == N_EVENTS + 1000 and cleaned.count() == labelled + 1000
