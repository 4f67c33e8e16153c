"""The embedded stack: a real broker and S3 server that start, serve, stop and keep their data."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from aiokafka import AIOKafkaProducer

from devstack.harness import consume_until
from devstack.stack import DEFAULT_CACHE_DIR, LocalStack, PortInUseError, StackError

if TYPE_CHECKING:
    from tests.conftest import KafkaBroker, S3Server

pytestmark = pytest.mark.integration


async def produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for value in values:
            await producer.send(topic, value=value, key=value)
        await producer.flush()
    finally:
        await producer.stop()


async def consume(bootstrap: str, topic: str, n: int, group: str | None = None,
                  commit: bool = False, timeout: float = 30.0) -> list[bytes]:
    """Read at least ``n`` raw messages (from the group's committed offset, else the start)
    and everything else already on the topic, so callers can assert exact contents."""
    values: list[bytes] = await consume_until(bootstrap, topic, lambda got: len(got) >= n,
                                              timeout, group=group, commit=commit, decode=bytes)
    return values


def assert_refused(port: int) -> None:
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


async def test_kafka_round_trip_with_a_consumer_group(kafka_broker: KafkaBroker,
                                                      unique_name: Callable[[str], str]) -> None:
    topic = unique_name("round-trip")
    sent = [f"message-{i}".encode() for i in range(500)]
    await produce(kafka_broker.bootstrap, topic, sent)
    group = unique_name("group")
    assert await consume(kafka_broker.bootstrap, topic, len(sent), group, commit=True) == sent
    # The group's committed offsets hold: a new member of the group sees only what is new.
    await produce(kafka_broker.bootstrap, topic, [b"late"])
    assert await consume(kafka_broker.bootstrap, topic, 1, group) == [b"late"]


def test_s3_objects_ranges_and_listing(s3_server: S3Server) -> None:
    fs = s3fs.S3FileSystem(**s3_server.storage_options)
    bucket = s3_server.make_bucket()
    data = bytes(range(256)) * 64
    fs.pipe(f"{bucket}/blobs/one.bin", data)
    assert fs.cat(f"{bucket}/blobs/one.bin") == data
    assert fs.cat_file(f"{bucket}/blobs/one.bin", start=1000, end=3000) == data[1000:3000]

    # A Range request answers 206 with just those bytes (pyarrow reads Parquet footers so).
    answer = s3_server.client().get_object(Bucket=bucket, Key="blobs/one.bin",
                                           Range="bytes=10-19")
    assert answer["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert answer["Body"].read() == data[10:20]

    # A truncated listing continues with its token (a 500 on Node >= 17 without the
    # legacy OpenSSL provider).
    keys = [f"many/{i:03d}" for i in range(7)]
    for key in keys:
        fs.pipe(f"{bucket}/{key}", key.encode())
    pages = s3_server.client().get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix="many/", PaginationConfig={"PageSize": 2})
    listed = [obj["Key"] for page in pages for obj in page.get("Contents", [])]
    assert listed == keys

    # A "directory" holding only sub-directories is listed and exists (s3rver is patched).
    fs.pipe(f"{bucket}/lake/dt=2026-01-01/hour=00/part-0", b"x")
    fs.pipe(f"{bucket}/lake/dt=2026-01-02/hour=05/part-0", b"y")
    fs.invalidate_cache()
    assert fs.ls(f"{bucket}/lake") == [f"{bucket}/lake/dt=2026-01-01",
                                       f"{bucket}/lake/dt=2026-01-02"]
    assert fs.isdir(f"{bucket}/lake/dt=2026-01-02")
    assert sorted(fs.ls(bucket)) == [f"{bucket}/blobs", f"{bucket}/lake", f"{bucket}/many"]


def test_parquet_through_s3fs(s3_server: S3Server) -> None:
    fs = s3fs.S3FileSystem(**s3_server.storage_options)
    bucket = s3_server.make_bucket()
    rng = np.random.default_rng(0)
    n = 20_000
    table = pa.table({"id": [f"id-{i}" for i in range(n)], "f0": rng.normal(size=n),
                      "f1": rng.normal(size=n), "label": rng.integers(0, 2, size=n)})
    path = f"{bucket}/lake/dt=2026-01-01/hour=00/part-0.parquet"
    pq.write_table(table, path, filesystem=fs, row_group_size=5_000)

    assert pq.read_table(path, filesystem=fs).equals(table)
    # Reading one row group and one column fetches byte ranges, not the whole file.
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        assert parquet.metadata.num_row_groups == 4
        assert parquet.read_row_group(2, columns=["f1"]).column("f1").equals(
            table.column("f1").slice(10_000, 5_000))
    # The partitioned directory reads back as a dataset with its partition columns.
    dataset = pq.read_table(f"{bucket}/lake", filesystem=fs)
    assert dataset.num_rows == n
    assert {"dt", "hour"} <= set(dataset.column_names)


def test_restart_keeps_data_and_recovers_from_a_crashed_broker(
        tmp_path: Path, unique_name: Callable[[str], str]) -> None:
    data_dir = tmp_path / "stack"
    bucket, topic, group = "kept", unique_name("durable"), unique_name("group")
    first = [f"first-{i}".encode() for i in range(10)]
    second = [f"second-{i}".encode() for i in range(5)]

    stack = LocalStack(DEFAULT_CACHE_DIR, data_dir, s3_buckets=[bucket])
    with stack:
        fs = s3fs.S3FileSystem(**stack.s3_storage_options)
        fs.pipe(f"{bucket}/kept.txt", b"still here")
        asyncio.run(produce(stack.bootstrap, topic, first))
        assert asyncio.run(consume(stack.bootstrap, topic, 10, group, commit=True)) == first
        ports = [stack.zk_port, stack.kafka_port, stack.s3_port]
    for port in ports:
        assert port is not None
        assert_refused(port)

    # Same directory, same ports: objects, messages and committed offsets are all there.
    restarted = LocalStack(DEFAULT_CACHE_DIR, data_dir, zk_port=ports[0], kafka_port=ports[1],
                           s3_port=ports[2], s3_buckets=[bucket])
    with restarted:
        fs = s3fs.S3FileSystem(**restarted.s3_storage_options, skip_instance_cache=True)
        assert fs.cat(f"{bucket}/kept.txt") == b"still here"
        asyncio.run(produce(restarted.bootstrap, topic, second))
        assert asyncio.run(consume(restarted.bootstrap, topic, 5, group)) == second
        # A broker killed outright leaves its ZooKeeper registration behind for a while.
        os.killpg(restarted.pids["kafka"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while restarted.running:
            assert time.monotonic() < deadline, "the broker did not die"
            time.sleep(0.05)
        assert [d.split()[0] for d in restarted.dead_services()] == ["kafka"]

    with LocalStack(DEFAULT_CACHE_DIR, data_dir) as recovered:
        everything = asyncio.run(consume(recovered.bootstrap, topic, 15))
        assert everything == first + second


def test_taken_port_and_busy_data_dir_are_refused(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortInUseError, match=f"127.0.0.1:{port} is already in use"):
            LocalStack(DEFAULT_CACHE_DIR, tmp_path / "a", with_kafka=False, s3_port=port).start()

    with LocalStack(DEFAULT_CACHE_DIR, tmp_path / "b", with_kafka=False) as first:
        with pytest.raises(StackError, match="in use by another running stack"):
            LocalStack(DEFAULT_CACHE_DIR, tmp_path / "b", with_kafka=False).start()
        assert first.running  # the refused one did not disturb the running one
