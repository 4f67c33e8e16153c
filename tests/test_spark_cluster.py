"""The batch job on a Spark standalone cluster, and what its Spark tasks carry.

Unit tests: the driver's addresses, and that neither the lake reader nor the distributed
training processes carry S3 credentials (executors authenticate with their own environment).
Integration test: ``python -m batch run`` against ``spark://`` (a master and two one-core
workers whose environment holds the S3 credentials), reading the lake and training with
TorchDistributor on the cluster's executors, then serving the model it published.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pytest

from batch.spark import driver_addresses, is_local_master, is_loopback, task_storage_options

REPO = Path(__file__).resolve().parent.parent
SECRET = "wJalrXUtnFEMI-not-a-real-secret-7Q2"
KEY = "AKIA-TEST-ACCESS-KEY-ID"
ENDPOINT = "http://s3.example.internal:9000"
OPTIONS = {"key": KEY, "secret": SECRET, "client_kwargs": {"endpoint_url": ENDPOINT}}


def _pickled(obj: Any) -> bytes:
    # The serializer Spark uses for task closures and TorchDistributor's arguments.
    from pyspark import cloudpickle

    return cloudpickle.dumps(obj)


# -- unit tests ------------------------------------------------------------------------------


def test_task_storage_options_keep_the_endpoint_and_drop_every_credential() -> None:
    options = {**OPTIONS, "token": "session-token",
               "client_kwargs": {"endpoint_url": ENDPOINT, "aws_secret_access_key": SECRET,
                                 "aws_access_key_id": KEY, "aws_session_token": "t"},
               "use_ssl": False}
    assert task_storage_options(options) == {"client_kwargs": {"endpoint_url": ENDPOINT},
                                             "use_ssl": False}
    # The caller's options are left as they were: the driver keeps using them.
    assert options["secret"] == SECRET and options["client_kwargs"]["aws_access_key_id"] == KEY
    assert task_storage_options(None) == {}


def test_the_lake_reader_tasks_carry_no_secret() -> None:
    from lake.reader import file_reader

    reader = file_reader(OPTIONS, pa.schema([("id", pa.string()), ("x", pa.float64())]))
    shipped = _pickled(reader)
    assert SECRET.encode() not in shipped and KEY.encode() not in shipped
    assert ENDPOINT.encode() in shipped  # the options do travel, less their credentials


def test_the_distributed_training_tasks_carry_no_secret() -> None:
    from batch.distributed import process_call
    from batch.train import TrainConfig

    function, args = process_call("s3://bucket/models/_staging/abc", OPTIONS, 2,
                                  TrainConfig(hidden=(8,)), loopback=True)
    shipped = _pickled((function, args))
    assert SECRET.encode() not in shipped and KEY.encode() not in shipped
    assert ENDPOINT.encode() in shipped and b"_staging/abc" in shipped


def test_driver_addresses_come_from_arguments_then_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SPARK_DRIVER_HOST", "SPARK_DRIVER_BIND", "SPARK_LOCAL_IP"):
        monkeypatch.delenv(name, raising=False)
    assert driver_addresses() == ("127.0.0.1", "127.0.0.1")
    monkeypatch.setenv("SPARK_LOCAL_IP", "127.0.0.2")
    assert driver_addresses() == ("127.0.0.2", "127.0.0.2")
    monkeypatch.setenv("SPARK_DRIVER_HOST", "10.1.2.3")
    assert driver_addresses() == ("10.1.2.3", "10.1.2.3")
    monkeypatch.setenv("SPARK_DRIVER_BIND", "0.0.0.0")
    assert driver_addresses() == ("10.1.2.3", "0.0.0.0")
    assert driver_addresses("driver.example", "10.0.0.5") == ("driver.example", "10.0.0.5")


def test_loopback_and_local_masters_are_recognised() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("127.1.2.3") and is_loopback("::1")
    assert is_loopback("localhost") and is_loopback("[::1]")
    assert not is_loopback("10.1.2.3") and not is_loopback("driver.example")
    assert not is_loopback("0.0.0.0")
    assert is_local_master("local[2]") and is_local_master("local") and is_local_master(
        "local-cluster[2,1,1024]")
    assert not is_local_master("spark://127.0.0.1:7077")


# -- on the cluster -------------------------------------------------------------------------


def _executor_logs(worker_dir: Path, app_ids: set[str]) -> str:
    return "\n".join(path.read_text(errors="replace") for app in sorted(app_ids)
                     for path in sorted((worker_dir / app).glob("*/std*")))


def _run_on_cluster(spark_cluster: Any, env: dict[str, str], rows: int, seed: int,
                    timeout: float) -> tuple[Any, subprocess.CompletedProcess[str], list[str]]:
    """Write ``rows`` demo events to the lake ``env`` names and run ``python -m batch run``
    on the cluster; return the settings, the finished run and each worker's executor logs of
    the run's application."""
    from app.settings import Settings
    from demo.data import write_lake

    settings = Settings.from_env(env)
    write_lake(settings.lake_uri, settings.storage_options, rows, seed=seed)
    workers = spark_cluster.worker_dirs()
    apps_before = [{p.name for p in w.iterdir()} for w in workers]
    run = subprocess.run([sys.executable, "-m", "batch", "run"], cwd=REPO, timeout=timeout,
                         env={**os.environ, **env}, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    apps = [{p.name for p in w.iterdir()} - before for w, before in zip(workers, apps_before)]
    # The application got an executor on each worker.
    assert apps[0] and apps[0] == apps[1], apps
    return settings, run, [_executor_logs(w, app_ids) for w, app_ids in zip(workers, apps)]


def test_the_batch_job_reads_and_trains_on_a_standalone_cluster(
        spark_cluster: Any, settings_env: Callable[..., dict[str, str]]) -> None:
    from batch.active import read_update_state
    from demo.data import FEATURES, generate
    from batch.evaluate import roc_auc
    from models.registry import Registry

    env = settings_env(SPARK_MASTER=spark_cluster.master_url, BATCH_DISTRIBUTED="2",
                       BATCH_HIDDEN="32", BATCH_EPOCHS="2", BATCH_DROPOUT="0.1",
                       BATCH_LR="0.005", BATCH_BATCH_SIZE="128")
    settings, run, logs = _run_on_cluster(spark_cluster, env, 3000, seed=8, timeout=420)
    assert "read 3000 rows" in run.stdout
    assert "training on 2 Spark tasks with TorchDistributor" in run.stdout

    # The two training processes ran on the executors as barrier tasks, one per executor.
    ranks = [{rank for rank in (0, 1)
              if f"[distributed rank {rank}] joined a gloo group of 2 processes" in text}
             for text in logs]
    assert sorted(ranks, key=sorted) == [{0}, {1}], ranks

    # Published, announced, and the active model loads and scores.
    registry = Registry(settings.registry_uri, settings.storage_options)
    latest = registry.latest(settings.model_name)
    assert latest is not None and latest.version in run.stdout
    state = read_update_state(settings, settings.model_name)
    assert state.source == "topic" and state.active_version == latest.version
    model = registry.load_ref(state.active)
    assert model.manifest.training["distributed_processes"] == 2
    fresh = generate(1000, seed=99)
    proba = model.predict_proba(fresh[FEATURES].to_numpy(dtype=np.float64))
    assert proba.shape == (1000, 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    assert roc_auc(fresh["Label"].to_numpy() == "s", proba[:, model.classes.index("s")]) > 0.6


def test_a_search_on_the_cluster_trains_each_candidate_in_an_executor_task(
        spark_cluster: Any, spark: Any, settings_env: Callable[..., dict[str, str]]) -> None:
    """Four candidates, four Spark tasks on the executors, and the same candidate chosen as a
    local run of the same data and seed chooses."""
    from app.settings import Settings
    from batch.job import JobConfig, run_job
    from models.registry import Registry

    search = dict(BATCH_CANDIDATES="4", BATCH_HIDDEN="16|32", BATCH_LR="0.0003:0.03",
                  BATCH_EPOCHS="2", BATCH_DROPOUT="0.1", BATCH_BATCH_SIZE="128",
                  BATCH_SEED="11")
    env = settings_env(SPARK_MASTER=spark_cluster.master_url, **search)
    settings, run, logs = _run_on_cluster(spark_cluster, env, 3000, seed=4, timeout=600)
    assert "training 4 candidates as 4 Spark tasks on the executors of spark://" in run.stdout
    for k in range(1, 5):
        assert f"[candidate {k}/4] training on" in "\n".join(logs), k
        assert f"[candidate {k}/4] epoch 2/2" in "\n".join(logs), k
    # Each worker's executor trained some of them.
    assert all("[candidate " in text for text in logs)

    registry = Registry(settings.registry_uri, settings.storage_options)
    ref = registry.latest(settings.model_name)
    assert ref is not None
    on_cluster = registry.load_ref(ref).manifest.training["search"]

    local_env = settings_env(MODEL_NAME="search-local", LAKE_URI=settings.lake_uri, **search)
    local_settings = Settings.from_env(local_env)
    local = run_job(local_settings, JobConfig.from_settings(local_settings, announce=False),
                    spark=spark)
    assert local.published
    in_driver = local.training["search"]
    assert [r["params"] for r in in_driver["results"]] == [
        r["params"] for r in on_cluster["results"]]
    assert in_driver["chosen"] == on_cluster["chosen"]
    assert len({str(r["params"]) for r in on_cluster["results"]}) == 4
