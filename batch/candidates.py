"""Training the search's candidates: in this process, side by side in worker processes, or
across Spark tasks with TorchDistributor.

Every path calls :func:`batch.train.train_network` on the same arrays with the same task,
network and hyper-parameters, so they give models of the same quality; they differ only in where
the work runs (a factory's network is built where it trains, from its name and parameters, so
its module must be importable there too):

* one candidate at a time in the driver (the default; all of ``threads`` for it);
* ``parallelism`` candidates at once in worker processes, splitting ``threads`` between them,
  where there are enough cores for more than one (a process each: torch's intra-op threads
  are per process, and Python threads would fight over the GIL);
* each candidate data-parallel over ``distributed`` Spark barrier tasks
  (:mod:`batch.distributed`);
* on a cluster master (not ``local[...]``), with more than one candidate and no
  ``distributed``: each candidate in a Spark task of its own on the executors
  (:mod:`batch.executors`).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import logging
import multiprocessing
import os
import queue
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from batch.train import Arrays, Network, TrainConfig, TrainResult, train_network

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

__all__ = ["Arrays", "train_candidates", "plan_parallelism"]

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


def plan_parallelism(candidates: int, threads: int, parallelism: int = 0) -> tuple[int, int]:
    """``(processes, threads each)`` for training ``candidates`` with ``threads`` in all.

    ``parallelism`` 0 means as many candidates at once as there are threads for (one thread
    each at least); the threads are shared out so that the machine is never oversubscribed.
    """
    wanted = parallelism or threads
    processes = max(1, min(candidates, wanted))
    return processes, max(1, threads // processes)


def train_candidates(arrays: Arrays, configs: Sequence[TrainConfig], *, threads: int = 2,
                     parallelism: int = 0, distributed: int = 0,
                     spark: "SparkSession | None" = None, staging_uri: str | None = None,
                     storage_options: dict[str, Any] | None = None,
                     progress: Progress | None = None,
                     network: Network = Network()) -> list[TrainResult]:
    """Train one network per configuration; results in the order of ``configs``.

    Parameters
    ----------
    arrays : Arrays
        The preprocessed rows.
    configs : sequence of TrainConfig
        One per candidate.
    threads : int
        torch threads available in all.
    parallelism : int
        Candidates trained at once (0: as many as ``threads`` allow; see
        :func:`plan_parallelism`). Ignored when ``distributed`` is set.
    distributed : int
        When > 0, train each candidate with TorchDistributor on this many Spark tasks.
    spark : pyspark.sql.SparkSession, optional
        Needed when ``distributed`` > 0; on a cluster master, the candidates train on its
        executors.
    staging_uri : str, optional
        Where the Spark paths stage the arrays for their tasks (see
        :func:`batch.distributed.train_distributed`, :func:`batch.executors.train_on_executors`);
        without it a search on a cluster trains in the driver's processes.
    storage_options : dict, optional
        fsspec options for ``staging_uri``.
    progress : callable, optional
        One line per epoch, prefixed with the candidate number when there are several.
    network : Network
        The built-in MLP (default) or a factory's network; the task is ``arrays.task``.
    """
    say = progress or log.info
    tagged = [_tagged(say, i, len(configs)) for i in range(len(configs))]
    if distributed > 0:
        if spark is None:
            raise ValueError("distributed training needs a SparkSession")
        from batch.distributed import train_distributed

        return [train_distributed(spark, arrays, config, distributed, staging_uri=staging_uri,
                                  storage_options=storage_options, progress=tagged[i],
                                  network=network)
                for i, config in enumerate(configs)]
    from batch.executors import runs_on_executors, train_on_executors

    if not distributed and runs_on_executors(spark, len(configs)) and staging_uri is not None:
        assert spark is not None
        return train_on_executors(spark, arrays, configs, staging_uri=staging_uri,
                                  storage_options=storage_options, network=network,
                                  progress=say)
    processes, each = plan_parallelism(len(configs), threads, parallelism)
    if processes == 1:
        import torch

        torch.set_num_threads(threads)
        return [train_network(arrays.X_train, arrays.y_train, arrays.n_outputs, config,
                              X_val=arrays.X_val, y_val=arrays.y_val, progress=tagged[i],
                              task=arrays.task, network=network)
                for i, config in enumerate(configs)]
    say(f"training {len(configs)} candidates, {processes} at a time with {each} "
        f"thread{'s' if each > 1 else ''} each")
    return _train_in_processes(arrays, configs, processes, each, tagged, network)


def _tagged(say: Progress, index: int, total: int) -> Progress:
    if total == 1:
        return say
    return lambda line: say(f"candidate {index + 1}/{total}: {line}")


# ----------------------------------------------------------------------- worker processes
_worker_state: dict[str, Any] = {}


def _init_worker(directory: str, threads: int, lines: Any) -> None:
    import torch

    # One team of threads per process and no more: the processes share the cores.
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    data = {name: np.load(Path(directory) / f"{name}.npy")
            for name in ("X_train", "y_train", "X_val", "y_val")}
    _worker_state.update(data=data, lines=lines)


def _train_one(index: int, config: TrainConfig, n_outputs: int, task: str, network: Network
               ) -> tuple[bytes, dict[str, Any]]:
    import torch

    data, lines = _worker_state["data"], _worker_state["lines"]
    result = train_network(data["X_train"], data["y_train"], n_outputs, config,
                           X_val=data["X_val"], y_val=data["y_val"],
                           progress=lambda line: lines.put((index, line)), task=task,
                           network=network)
    buffer = io.BytesIO()
    torch.save(result.module.state_dict(), buffer)
    fields = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)
              if f.name != "module"}
    return buffer.getvalue(), fields


def _train_in_processes(arrays: Arrays, configs: Sequence[TrainConfig], processes: int,
                        threads: int, tagged: list[Progress], network: Network
                        ) -> list[TrainResult]:
    import torch

    # spawn, not fork: the driver holds a JVM gateway and torch thread pools that a forked
    # child must not inherit.
    context = multiprocessing.get_context("spawn")
    lines = context.Queue()
    stop = threading.Event()

    def relay() -> None:
        while not stop.is_set() or not lines.empty():
            try:
                index, line = lines.get(timeout=0.2)
            except queue.Empty:
                continue
            tagged[index](line)

    relay_thread = threading.Thread(target=relay, name="candidate-progress", daemon=True)
    relay_thread.start()
    try:
        with tempfile.TemporaryDirectory(prefix="stratum-candidates-") as directory:
            for name in ("X_train", "y_train", "X_val", "y_val"):
                np.save(Path(directory) / f"{name}.npy", getattr(arrays, name))
            with concurrent.futures.ProcessPoolExecutor(
                    max_workers=processes, mp_context=context, initializer=_init_worker,
                    initargs=(directory, threads, lines)) as pool:
                futures = [pool.submit(_train_one, i, config, arrays.n_outputs, arrays.task,
                                       network)
                           for i, config in enumerate(configs)]
                outputs = [future.result() for future in futures]
    finally:
        stop.set()
        relay_thread.join(timeout=5)
    results = []
    for config, (weights, fields) in zip(configs, outputs):
        module = network.build(arrays.X_train.shape[1], arrays.n_outputs, config)
        module.load_state_dict(torch.load(io.BytesIO(weights), map_location="cpu",
                                          weights_only=True))
        results.append(TrainResult(module=module.eval(), **fields))
    return results
