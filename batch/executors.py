"""The search's candidates as Spark tasks: one candidate per task, on the cluster's executors.

On a cluster (``SPARK_MASTER`` other than ``local[...]``) the driver is often a small machine
and the executors are where the cores are, so :func:`batch.candidates.train_candidates` trains
the candidates of a search there rather than in processes of the driver: the preprocessed arrays
are staged under the staging URI (the registry's store by default, which executors read the way
they read the lake), one Spark task per candidate reads them, trains with
:func:`batch.train.train_network` on the task's cores (``spark.task.cpus``), and returns its
weights and figures to the driver, which keeps the one with the best validation loss as it does
in local mode. The candidates are drawn on the driver by the seeded search
(:func:`batch.search.candidates`), and each trains with its own seed, so a cluster and a local
run of the same data and seed compare the same candidates and choose the same one.

A task carries no credential (:func:`models.storage.task_storage_options`); executors read the
staged arrays with their own. A failed task is retried by Spark and trains again from the same
seed. Each task writes one line to its executor's log saying which candidate it trains and where.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import logging
import os
import secrets
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from batch.errors import TrainingError
from batch.train import Arrays, Network, TrainConfig, TrainResult

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

__all__ = ["train_on_executors", "runs_on_executors"]

log = logging.getLogger(__name__)

#: Spark job group of a search's tasks (``SparkContext.statusTracker`` finds them by it).
JOB_GROUP = "stratum-search"


def runs_on_executors(spark: "SparkSession | None", candidates: int) -> bool:
    """Whether a search of ``candidates`` trains on the executors: more than one candidate and
    a cluster master (on ``local[N]`` the executors are the driver's own cores, where worker
    processes do the same with less overhead)."""
    from models.storage import is_local_master

    return (spark is not None and candidates > 1
            and not is_local_master(str(spark.sparkContext.master)))


def _train_task(item: tuple[int, dict[str, Any]], *, uri: str,
                storage_options: dict[str, Any], n_outputs: int, task: str,
                network: dict[str, Any], total: int) -> tuple[int, bytes, dict[str, Any]]:
    """Body of one candidate's Spark task: read the staged arrays, train, return the weights."""
    import torch
    from pyspark import TaskContext

    from batch.train import Network, TrainConfig, train_network
    from models.storage import filesystem

    index, config = item
    context = TaskContext.get()
    threads = max(1, context.cpus() if context is not None else 1)
    torch.set_num_threads(threads)
    tag = f"[candidate {index + 1}/{total}]"
    print(f"{tag} training on {os.uname().nodename} (pid {os.getpid()}, {threads} thread"
          f"{'s' if threads > 1 else ''}, Spark task attempt "
          f"{context.taskAttemptId() if context is not None else '-'})", flush=True)
    fs, path = filesystem(uri, storage_options)
    data = {name: np.load(io.BytesIO(fs.cat_file(f"{path}/{name}.npy")))
            for name in ("X_train", "y_train", "X_val", "y_val")}
    result = train_network(data["X_train"], data["y_train"], n_outputs, TrainConfig(**config),
                           X_val=data["X_val"], y_val=data["y_val"],
                           progress=lambda line: print(f"{tag} {line}", flush=True),
                           task=task, network=Network(**network))
    buffer = io.BytesIO()
    torch.save(result.module.state_dict(), buffer)
    fields = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)
              if f.name != "module"}
    return index, buffer.getvalue(), fields


def train_on_executors(spark: "SparkSession", arrays: Arrays, configs: Sequence[TrainConfig],
                       *, staging_uri: str, storage_options: Mapping[str, Any] | None = None,
                       network: Network = Network(),
                       progress: Callable[[str], None] | None = None) -> list[TrainResult]:
    """Train each of ``configs`` in a Spark task of its own; results in the order of
    ``configs``.

    Parameters
    ----------
    spark : pyspark.sql.SparkSession
        A session on the cluster whose executors train.
    arrays : batch.train.Arrays
        Preprocessed rows, staged for the tasks under ``staging_uri``.
    configs : sequence of TrainConfig
        The candidates' hyper-parameters (each with its seed).
    staging_uri : str
        A directory every executor can read (a fresh sub-directory is used and removed).
    storage_options : mapping, optional
        fsspec options for ``staging_uri``; the tasks get them without credentials.
    network : batch.train.Network
        The built-in MLP or a factory's network (its module must import on the executors).
    progress : callable, optional
        Receives a line per candidate and, once it is back, its epochs.

    Raises
    ------
    TrainingError
        A candidate's task failed after Spark's retries (the reason of the failure).
    StorageError
        The arrays could not be staged.
    """
    import torch

    from batch.distributed import stage_arrays, unstage_arrays
    from batch.spark import spark_error_reason
    from models.storage import task_storage_options

    say = progress or log.info
    uri = f"{staging_uri.rstrip('/')}/search-{secrets.token_hex(8)}"
    stage_arrays(arrays, uri, storage_options)
    sc = spark.sparkContext
    total = len(configs)
    say(f"training {total} candidates as {total} Spark tasks on the executors of "
        f"{sc.master}")
    body = functools.partial(
        _train_task, uri=uri, storage_options=task_storage_options(storage_options),
        n_outputs=arrays.n_outputs, task=arrays.task,
        network={"factory": network.factory, "params": dict(network.params)}, total=total)
    began = time.monotonic()
    sc.setJobGroup(JOB_GROUP, f"train {total} candidates", interruptOnCancel=True)
    try:
        items = [(i, dataclasses.asdict(config)) for i, config in enumerate(configs)]
        outputs = sc.parallelize(items, total).map(body).collect()
    except Exception as exc:
        raise TrainingError(f"training the candidates on the executors failed: "
                            f"{spark_error_reason(exc)}") from exc
    finally:
        sc.setLocalProperty("spark.jobGroup.id", None)  # type: ignore[arg-type]
        sc.setLocalProperty("spark.job.description", None)  # type: ignore[arg-type]
        unstage_arrays(uri, storage_options)
    results: list[TrainResult | None] = [None] * total
    for index, weights, fields in outputs:
        config = configs[index]
        module = network.build(arrays.X_train.shape[1], arrays.n_outputs, config)
        module.load_state_dict(torch.load(io.BytesIO(weights), map_location="cpu",
                                          weights_only=True))
        results[index] = TrainResult(module=module.eval(), **fields)
    say(f"{total} candidates trained on the executors in {time.monotonic() - began:.1f}s")
    missing = [i + 1 for i, r in enumerate(results) if r is None]
    if missing:
        raise TrainingError(f"no result came back for candidates {missing}")
    return [r for r in results if r is not None]
