"""Data-parallel training across Spark tasks with :class:`TorchDistributor`.

The driver stages the preprocessed arrays as ``.npy`` files under a staging URI (the registry's
store by default, so executors on other machines read them the way they read the lake), and
TorchDistributor starts one barrier task per process; each runs ``torchrun`` for one node, joins
a gloo process group and calls :func:`batch.train.train_network` with ``distributed=True`` (a
factory's network is built in each process from its name and parameters: its module must be
importable on the executors, as :mod:`models.zoo` is wherever Stratum is installed).
Rank 0's weights come back to the driver.

``local_mode=False`` is used on every master, ``local[N]`` and ``spark://`` alike: the processes
run as Spark barrier tasks, one per task slot, and the rendezvous address is the first task's
address. Each process uses one torch thread, so N processes never oversubscribe N cores.

When the driver's address (``spark.driver.host``: ``SPARK_DRIVER_HOST``, else ``SPARK_LOCAL_IP``,
else 127.0.0.1) is a loopback one, every executor runs on this machine and gloo is pinned to the
loopback interface. Otherwise gloo picks the interface of the executor's host name, and
``GLOO_SOCKET_IFNAME`` in the executors' environment (their worker's environment, or
``spark.executorEnv.GLOO_SOCKET_IFNAME``) names another one where that is wrong.

The staged arrays' storage options reach the tasks without credentials: executors read the
staging directory with their own (:func:`batch.spark.task_storage_options`).
"""
from __future__ import annotations

import dataclasses
import io
import logging
import os
import secrets
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

from batch.errors import StorageError, TrainingError
from batch.train import Arrays, Network, TrainConfig, TrainResult

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


__all__ = ["train_distributed", "process_call", "ARRAY_NAMES", "stage_arrays", "unstage_arrays"]

log = logging.getLogger(__name__)

ARRAY_NAMES = ("X_train", "y_train", "X_val", "y_val")


def stage_arrays(arrays: Arrays, uri: str, storage_options: Mapping[str, Any] | None) -> None:
    """Write the arrays as ``.npy`` files under ``uri`` for tasks to read."""
    from models.storage import ensure_bucket, filesystem

    fs, path = filesystem(uri, storage_options)
    try:
        ensure_bucket(fs, path)
        fs.makedirs(path, exist_ok=True)
        for name in ARRAY_NAMES:
            buffer = io.BytesIO()
            np.save(buffer, getattr(arrays, name))
            fs.pipe_file(f"{path}/{name}.npy", buffer.getvalue())
    except Exception as exc:
        raise StorageError(f"cannot stage training data at {uri}: "
                           f"{type(exc).__name__}: {exc}") from exc


def unstage_arrays(uri: str, storage_options: Mapping[str, Any] | None) -> None:
    """Remove what :func:`stage_arrays` wrote (best effort)."""
    from models.storage import filesystem

    try:
        fs, path = filesystem(uri, storage_options)
        fs.rm(path, recursive=True)
    except Exception:  # leftovers are harmless: the next run uses a new directory
        log.warning("could not remove staged training data at %s", uri, exc_info=True)


def _train_process(uri: str, storage_options: dict[str, Any], n_outputs: int,
                   config: dict[str, Any], loopback: bool, task: str = "classification",
                   network: dict[str, Any] | None = None
                   ) -> tuple[bytes, dict[str, Any]] | None:
    """Body of every distributed process (runs under ``torchrun`` in a Spark task).

    ``loopback``: every process is on this machine, so gloo may use the loopback interface;
    otherwise ``GLOO_SOCKET_IFNAME`` is the executor environment's to set, or gloo's choice.
    """
    import torch
    import torch.distributed as dist

    from batch.train import Network, TrainConfig, train_network
    from models.storage import filesystem

    torch.set_num_threads(1)
    if loopback:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo")
    try:
        rank = dist.get_rank()

        def say(line: str) -> None:
            print(f"[distributed rank {rank}] {line}", flush=True)

        # One line per process in its executor's log: where each rank ran.
        say(f"joined a gloo group of {dist.get_world_size()} processes on "
            f"{os.uname().nodename} (pid {os.getpid()})")
        fs, path = filesystem(uri, storage_options)
        data = {name: np.load(io.BytesIO(fs.cat_file(f"{path}/{name}.npy")))
                for name in ARRAY_NAMES}

        result = train_network(data["X_train"], data["y_train"], n_outputs,
                               TrainConfig(**config), X_val=data["X_val"],
                               y_val=data["y_val"], progress=say, distributed=True, task=task,
                               network=Network(**(network or {})))
        if rank != 0:
            return None
        buffer = io.BytesIO()
        torch.save(result.module.state_dict(), buffer)
        fields = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)
                  if f.name != "module"}
        return buffer.getvalue(), fields
    finally:
        # Leaving together: a process that exits while a peer still uses the group aborts.
        dist.barrier()
        dist.destroy_process_group()


def process_call(uri: str, storage_options: Mapping[str, Any] | None, n_outputs: int,
                 config: TrainConfig, loopback: bool, task: str = "classification",
                 network: Network = Network()
                 ) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """The function every distributed process runs and its arguments, as given to
    ``TorchDistributor.run``: what the barrier tasks carry, credentials left out."""
    from batch.spark import task_storage_options

    return _train_process, (uri, task_storage_options(storage_options), n_outputs,
                            dataclasses.asdict(config), loopback, task,
                            {"factory": network.factory, "params": dict(network.params)})


def train_distributed(spark: "SparkSession", arrays: Arrays, config: TrainConfig,
                      processes: int, *, staging_uri: str | None = None,
                      storage_options: Mapping[str, Any] | None = None,
                      progress: Callable[[str], None] | None = None,
                      network: Network = Network()) -> TrainResult:
    """Train one candidate data-parallel over ``processes`` Spark barrier tasks.

    Parameters
    ----------
    spark : pyspark.sql.SparkSession
        Needs at least ``processes`` task slots.
    arrays : batch.train.Arrays
        Preprocessed rows.
    config : TrainConfig
        Hyper-parameters; the global mini-batch is ``config.batch_size`` as in one process.
    processes : int
        Number of training processes (Spark tasks).
    staging_uri : str, optional
        Directory for the staged arrays (default: a local temporary directory, which only a
        ``local[N]`` master can read); a fresh sub-directory is used and removed afterwards.
    storage_options : mapping, optional
        fsspec options for ``staging_uri``. The driver stages with them; the tasks get them
        without credentials and authenticate with their own environment (on a local master,
        the credentials given here are put there).
    progress : callable, optional
        Receives the per-epoch lines of rank 0 once training is over.
    network : batch.train.Network
        The built-in MLP (default) or a factory's network; the task is ``arrays.task``.

    Raises
    ------
    TrainingError
        The distributed run failed (the reason of the first failing process).
    StorageError
        The arrays could not be staged.
    """
    import tempfile

    import torch
    from pyspark.ml.torch.distributor import TorchDistributor

    from batch.spark import driver_addresses, is_loopback, share_local_credentials

    say = progress or log.info
    cleanup_dir = None
    if staging_uri is None:
        cleanup_dir = tempfile.mkdtemp(prefix="stratum-staging-")
        staging_uri = f"file://{cleanup_dir}"
    uri = f"{staging_uri.rstrip('/')}/{secrets.token_hex(8)}"
    stage_arrays(arrays, uri, storage_options)
    loopback = is_loopback(spark.conf.get("spark.driver.host", None) or driver_addresses()[0])
    share_local_credentials(spark, storage_options)
    say(f"training on {processes} Spark tasks with TorchDistributor (gloo, 1 thread each)")
    try:
        distributor = TorchDistributor(num_processes=processes, local_mode=False,
                                       use_gpu=False)
        function, args = process_call(uri, storage_options, arrays.n_outputs, config, loopback,
                                      arrays.task, network)
        output = distributor.run(function, *args)
    except Exception as exc:
        from batch.spark import spark_error_reason

        raise TrainingError(f"distributed training on {processes} processes failed: "
                            f"{spark_error_reason(exc)}") from exc
    finally:
        unstage_arrays(uri, storage_options)
        if cleanup_dir is not None:
            import shutil

            shutil.rmtree(cleanup_dir, ignore_errors=True)
    if output is None:
        raise TrainingError("distributed training returned no model from rank 0")
    weights, fields = output
    module = network.build(arrays.X_train.shape[1], arrays.n_outputs, config)
    module.load_state_dict(torch.load(io.BytesIO(weights), map_location="cpu",
                                      weights_only=True))
    result = TrainResult(module=module.eval(), **fields)
    for record in result.history:
        say(f"epoch {int(record['epoch'])}/{config.epochs}: train loss "
            f"{record['train_loss']:.4f}"
            + (f", val loss {record['val_loss']:.4f}" if "val_loss" in record else "")
            + f" ({record['seconds']:.1f}s)")
    return result
