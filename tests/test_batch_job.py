"""The batch job end to end against the real S3 server, Kafka broker and a local SparkSession."""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from app.settings import Settings
from demo.data import FEATURES, generate
from batch.errors import DataError
from batch.evaluate import roc_auc
from batch.job import EXIT_REJECTED, JobConfig, run_job
from demo.bootstrap import bootstrap
from lake.reader import list_parquet_files
from models.registry import ModelRef, Registry

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
# A tiny network and two epochs: the test checks the wiring, not the model quality.
SMALL = dict(hidden=(32, 16), dropout=0.1, epochs=2, batch_size=128)


async def _read_updates(bootstrap: str, topic: str, timeout: float = 30.0) -> list[dict]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        partition = TopicPartition(topic, 0)
        consumer.assign([partition])
        end = (await consumer.end_offsets([partition]))[partition]
        messages: list[dict] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while await consumer.position(partition) < end and loop.time() < deadline:
            batch = await consumer.getmany(partition, timeout_ms=1000)
            messages += [json.loads(r.value) for r in batch.get(partition, [])]
        return messages
    finally:
        await consumer.stop()


def _write_parquet(settings: Settings, relative: str, table: pa.Table) -> str:
    uri = f"{settings.lake_uri.rsplit('/lake/', 1)[0]}/{relative}"
    fs = s3fs.S3FileSystem(**settings.storage_options)
    with fs.open(uri, "wb") as out:
        pq.write_table(table, out)
    return uri


def test_bootstrap_publishes_a_loadable_model_and_announces_it(
        spark: Any, settings_env: Callable[..., dict[str, str]], kafka_broker: Any) -> None:
    settings = Settings.from_env(settings_env())
    lines: list[str] = []
    result = bootstrap(settings, JobConfig(**SMALL), rows=4000, seed=0, spark=spark,
                       progress=lines.append)

    assert result is not None and result.published and not result.forced
    assert result.exit_code == 0
    assert list_parquet_files(settings.lake_uri, settings.storage_options)
    assert result.rows["read"] == result.rows["usable"] == 4000
    assert result.features == FEATURES and result.classes == ["b", "s"]
    assert {"list", "spark session", "read", "train", "publish", "announce"} <= set(
        result.timings)
    assert any(line.startswith("epoch 2/2") for line in lines)

    registry = Registry(settings.registry_uri, settings.storage_options)
    ref = result.ref
    model = registry.load(ref.manifest_uri, sha256=ref.sha256)
    assert model.version == ref.version and model.metrics["auc"] > 0.6
    assert model.manifest.training["rows"]["train"] == result.rows["train"]
    assert set(model.manifest.files) == {"model.pt", "model.onnx"}
    fresh = generate(2000, seed=99)
    proba = model.predict_proba(fresh[FEATURES].to_numpy(dtype=np.float64))
    assert roc_auc(fresh["Label"].to_numpy() == "s", proba[:, 1]) > 0.6

    messages = asyncio.run(_read_updates(kafka_broker.bootstrap, settings.updates_topic))
    refs = [m for m in messages if m.get("type") == "MODEL-REF"]
    assert len(refs) == 1
    manifest_bytes = s3fs.S3FileSystem(**settings.storage_options).cat_file(ref.manifest_uri)
    assert refs[0]["sha256"] == hashlib.sha256(manifest_bytes).hexdigest() == ref.sha256
    assert ModelRef.from_message(refs[0]) == ref

    # A second bootstrap finds the model and does nothing.
    assert bootstrap(settings, JobConfig(**SMALL), rows=4000, spark=spark) is None
    assert registry.versions(settings.model_name) == [ref.version]


def test_a_string_valued_feature_column_fails_with_its_name(
        spark: Any, settings_env: Callable[..., dict[str, str]]) -> None:
    settings = Settings.from_env(settings_env())
    table = pa.table({"key": [1, 2, 3], "x": [0.1, 0.2, 0.3], "comment": ["a", "b", "c"],
                      "target": ["p", "q", "p"]})
    uri = _write_parquet(settings, "custom/data.parquet", table)
    config = JobConfig(data_uri=uri, id_col="key", label_col="target", announce=False, **SMALL)
    with pytest.raises(DataError, match=r"non-numeric column 'comment' \(string\)"):
        run_job(settings, config, spark=spark)


def test_policy_rejects_a_useless_candidate_and_force_publishes_it(
        spark: Any, settings_env: Callable[..., dict[str, str]]) -> None:
    settings = Settings.from_env(settings_env(MODEL_NAME="constant"))
    n = 1200
    rng = np.random.default_rng(0)
    labels = (rng.random(n) < 0.2).astype(np.int64)
    ids = np.arange(n)
    ids[-100:] = ids[:100]  # 100 duplicated ids
    table = pa.table({
        "row": ids,
        # Features that carry no information: every row looks the same to the model, so it
        # cannot beat the majority class. Missing markers must be imputed, not learned.
        "f1": np.where(rng.random(n) < 0.1, -999.0, 1.0),
        "f2": np.where(rng.random(n) < 0.1, np.nan, 2.0),
        "y": pa.array(labels, mask=np.arange(n) % 50 == 0),  # 24 unlabelled rows
    })
    uri = _write_parquet(settings, "constant/part-0.parquet", table)
    base = JobConfig(data_uri=uri, id_col="row", label_col="y", announce=False,
                     **{**SMALL, "epochs": 1})
    rejected = run_job(settings, base, spark=spark)
    assert not rejected.published and rejected.exit_code == EXIT_REJECTED
    assert "does not beat" in rejected.decision.reason
    # 1100 distinct ids; ids 0 and 50 are unlabelled in both copies, 20 more ids are
    # unlabelled in their only row.
    assert rejected.rows["read"] == n and rejected.rows["usable"] == 1078
    assert rejected.classes == [0, 1]
    registry = Registry(settings.registry_uri, settings.storage_options)
    assert registry.versions("constant") == []

    forced = run_job(settings, dataclasses.replace(base, force=True), spark=spark)
    assert forced.published and forced.forced and forced.exit_code == 0
    loaded = registry.load(forced.ref.manifest_uri, sha256=forced.ref.sha256)
    assert loaded.manifest.forced is True and loaded.classes == [0, 1]
    assert loaded.features == ["f1", "f2"]


def test_demo_data_creates_a_missing_bucket(s3_server: Any, unique_name: Callable[[str], str]
                                            ) -> None:
    from demo.data import write_lake

    bucket = unique_name("fresh")
    files = write_lake(f"s3://{bucket}/lake/events", s3_server.storage_options, 500, seed=1)
    assert len(files) == 1
    assert list_parquet_files(f"s3://{bucket}/lake/events", s3_server.storage_options) == files


def _cli(args: list[str], env: dict[str, str], timeout: float = 240, module: str = "batch"
         ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, timeout=timeout,
                          env={**os.environ, **env}, capture_output=True, text=True)


def test_command_line_writes_demo_data_trains_and_publishes(
        settings_env: Callable[..., dict[str, str]]) -> None:
    env = settings_env(BATCH_HIDDEN="32", BATCH_EPOCHS="3", BATCH_DROPOUT="0.1",
                       BATCH_LR="0.005")
    demo = _cli(["data", "--rows", "3000", "--seed", "4"], env, module="demo")
    assert demo.returncode == 0, demo.stderr
    run = _cli(["run"], env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "summary" in run.stdout and "published" in run.stdout
    settings = Settings.from_env(env)
    latest = Registry(settings.registry_uri, settings.storage_options).latest("default")
    assert latest is not None and latest.version in run.stdout


def test_command_line_reports_an_unreachable_store_in_one_line() -> None:
    from devstack.stack import free_port

    env = {"S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
           "LAKE_URI": "s3://nowhere/lake", "REGISTRY_URI": "s3://nowhere/models",
           "AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "SK", "AWS_MAX_ATTEMPTS": "1"}
    run = _cli(["run"], env, timeout=120)
    assert run.returncode == 1
    errors = [line for line in run.stderr.splitlines() if line.strip()]
    # The run lock in the registry is the first thing a run touches.
    assert len(errors) == 1 and errors[0].startswith(
        "batch: error: cannot read the run lock s3://nowhere/models/_locks/default.json")
