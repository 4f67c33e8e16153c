"""Batch scoring: a whole Parquet dataset scored on Spark by a registry version.

``python -m batch score --data URI --out URI [--model NAME] [--version V]`` reads the dataset
as the batch job reads the lake (fsspec in the tasks, no hadoop-aws), scores it in Spark tasks
with the very :class:`models.loaded.LoadedModel` a worker serves with (same verification, same
preprocessing, same rounding as the prediction messages), and writes Parquet predictions, one
file per task, under ``--out``:

=================  =============================================================
``id``             the row's id (``BATCH_ID_COL``, as a string, as event ids are)
``predicted``      the class label (string or integer), or the value (regression)
``probabilities``  class probabilities in the manifest's class order (classification)
``model_version``  the version that scored the row
=================  =============================================================

Without ``--version`` the version is the one serving: the update topic's fold, verified as a
worker verifies it (:func:`batch.active.read_update_state`). ``--out`` must not hold files yet;
the files appear with ``_SUCCESS`` last, so a reader that sees ``_SUCCESS`` sees them all. A
retried or speculative task writes the same file name, so no row is written twice.
"""
from __future__ import annotations

import functools
import logging
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Collection, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batch.errors import BatchError
from lake.errors import DataError, StorageError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from app.settings import Settings
    from models.loaded import LoadedModel

__all__ = ["ScoreResult", "score_dataset", "score_batches", "prediction_table"]

log = logging.getLogger(__name__)

#: Written last: its presence means every prediction file is there.
SUCCESS_FILE = "_SUCCESS"
#: Rows one forward pass scores at most.
_CHUNK_ROWS = 8192
_NUMERIC = ("tinyint", "smallint", "int", "bigint", "float", "double")


@dataclass(frozen=True)
class ScoreResult:
    """What one scoring run did."""

    model_name: str
    version: str
    task: str
    data_uri: str
    out_uri: str
    rows: int
    files: int
    seconds: float

    @property
    def rows_per_second(self) -> float:
        """Rows scored per second of the whole run (reading, scoring and writing)."""
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def prediction_table(model: "LoadedModel", ids: list[str], X: np.ndarray) -> pa.Table:
    """The prediction rows of ``ids`` scored from raw features ``X``, with the numbers the
    prediction messages carry (:func:`transport.schemas.rounded_probabilities`,
    :func:`transport.schemas.predicted_values`)."""
    from transport.schemas import predicted_values, rounded_probabilities

    outputs = model.outputs(X)
    version = pa.array([model.version] * len(ids), pa.string())
    if model.task == "classification":
        outputs = rounded_probabilities(outputs)
        classes = model.classes
        predicted = [classes[k] for k in outputs.argmax(axis=1).tolist()] if len(ids) else []
        label_type = pa.int64() if classes and isinstance(classes[0], int) else pa.string()
        return pa.table({"id": pa.array(ids, pa.string()),
                         "predicted": pa.array(predicted, label_type),
                         "probabilities": pa.array(outputs.tolist(), pa.list_(pa.float64())),
                         "model_version": version})
    return pa.table({"id": pa.array(ids, pa.string()),
                     "predicted": pa.array(predicted_values(outputs), pa.float64()),
                     "model_version": version})


# One verified model per Python worker process (Spark reuses them across tasks).
_MODELS: dict[tuple[str, str], "LoadedModel"] = {}


def _task_model(registry_uri: str, storage_options: Mapping[str, Any], manifest_uri: str,
                sha256: str, factories: Collection[str]) -> "LoadedModel":
    key = (manifest_uri, sha256)
    if key not in _MODELS:
        import torch

        from models.registry import Registry

        torch.set_num_threads(1)  # one task per core already
        _MODELS.clear()
        _MODELS[key] = Registry(registry_uri, storage_options, factories=factories).load(
            manifest_uri, sha256=sha256)
    return _MODELS[key]


def score_batches(batches: Iterator[pa.RecordBatch], *, registry_uri: str,
                  storage_options: Mapping[str, Any], manifest_uri: str, sha256: str,
                  factories: Collection[str], out_uri: str, run_id: str,
                  features: list[str]) -> Iterator[pa.RecordBatch]:
    """``mapInArrow`` body: score this task's rows and write them as one Parquet file under
    ``out_uri``; yield ``(file, rows)``.

    Input columns are ``__id`` (string) and ``__f0..`` (double, in ``features`` order).
    ``storage_options`` carry no credentials (:func:`models.storage.task_storage_options`).
    """
    from pyspark import TaskContext

    from models.storage import filesystem

    model = _task_model(registry_uri, storage_options, manifest_uri, sha256, factories)
    context = TaskContext.get()
    part = context.partitionId() if context is not None else 0
    name = f"part-{part:05d}-{run_id}.parquet"
    fs, root = filesystem(out_uri, storage_options)
    path = f"{root}/{name}"
    rows = 0
    handle: Any = None
    writer: pq.ParquetWriter | None = None
    try:
        for batch in batches:
            for start in range(0, batch.num_rows, _CHUNK_ROWS):
                chunk = batch.slice(start, _CHUNK_ROWS)
                ids = chunk.column("__id").to_pylist()
                X = np.column_stack([
                    chunk.column(f"__f{i}").to_numpy(zero_copy_only=False).astype(np.float64)
                    for i in range(len(features))])
                table = prediction_table(model, ids, X)
                if writer is None:
                    handle = fs.open(path, "wb")
                    writer = pq.ParquetWriter(handle, table.schema)
                writer.write_table(table)
                rows += table.num_rows
    finally:
        if writer is not None:
            writer.close()
        if handle is not None:
            handle.close()
    if writer is not None:
        yield pa.RecordBatch.from_pydict({"file": [name], "rows": [rows]})


def score_dataset(settings: "Settings", data_uri: str, out_uri: str,
                  model_name: str | None = None, version: str | None = None,
                  id_col: str | None = None, spark: "SparkSession | None" = None,
                  factories: Collection[str] = (),
                  progress: Callable[[str], None] = log.info) -> ScoreResult:
    """Score the Parquet dataset at ``data_uri`` and write predictions under ``out_uri``.

    Parameters
    ----------
    settings : Settings
        Registry, storage, Kafka (to find the serving version) and Spark settings.
    data_uri, out_uri : str
        Dataset to score; where the predictions go (must hold no files yet).
    model_name, version : str, optional
        Registry model (default ``MODEL_NAME``) and version (default: the one serving).
    id_col : str, optional
        Id column of the dataset (default ``BATCH_ID_COL``).
    spark : SparkSession, optional
        A session to use (default: one from the ``SPARK_*`` settings).
    factories : collection of str
        Model factories a manifest may name (the worker's ``MODEL_FACTORIES``).

    Raises
    ------
    BatchError
        No version serves and none was given, or ``out_uri`` holds files already.
    DataError
        The dataset lacks the id or a feature column, or a feature column is not numeric.
    models.errors.ArtifactError
        The version does not verify.
    """
    from pyspark.sql import functions as F

    from batch.active import read_update_state
    from lake.reader import list_parquet_files, read_parquet
    from models.registry import Registry
    from models.storage import (ensure_bucket, filesystem, share_local_credentials,
                                task_storage_options)

    began = time.monotonic()
    name = model_name or settings.model_name
    id_col = id_col or settings.batch_id_col
    storage = settings.storage_options
    registry = Registry(settings.registry_uri, storage, factories=factories)
    if version is None:
        state = read_update_state(settings, name, registry=registry)
        if state.active is None:
            raise BatchError(f"no version of {name!r} serves now (update topic: "
                             f"{state.source}); name one with --version")
        ref = state.active
    else:
        ref = registry.ref(name, version)
    model = registry.load_ref(ref)
    progress(f"scoring with {name}/{ref.version} ({model.task}, {len(model.features)} "
             "features)")
    fs, root = filesystem(out_uri, storage)
    try:
        existing = fs.find(root) if fs.exists(root) else []
    except Exception as exc:
        raise StorageError(f"cannot list {out_uri}: {type(exc).__name__}: {exc}") from exc
    if existing:
        raise BatchError(f"{out_uri} holds {len(existing)} files already: scoring writes into "
                         "an empty location only")
    try:
        ensure_bucket(fs, root)
        fs.makedirs(root, exist_ok=True)
    except Exception as exc:
        raise StorageError(f"cannot create {out_uri}: {type(exc).__name__}: {exc}") from exc
    files = list_parquet_files(data_uri, storage)
    if spark is None:
        from batch.spark import get_session

        spark = get_session(master=settings.spark_master,
                            driver_memory=settings.spark_driver_memory,
                            driver_host=settings.spark_driver_host,
                            driver_bind=settings.spark_driver_bind)
    frame = read_parquet(spark, data_uri, storage, files=files)
    kinds = dict(frame.dtypes)
    missing = [c for c in [id_col, *model.features] if c not in kinds]
    if missing:
        raise DataError(f"{data_uri} lacks the column{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(repr(c) for c in missing)} that {name}/{ref.version} "
                        "needs")
    wrong = [f"{f!r} ({kinds[f]})" for f in model.features if kinds[f] not in _NUMERIC
             and not kinds[f].startswith("decimal")]
    if wrong:
        raise DataError(f"feature columns must be numeric: {', '.join(wrong)}")
    run_id = uuid.uuid4().hex[:12]
    body = functools.partial(
        score_batches, registry_uri=settings.registry_uri,
        storage_options=task_storage_options(storage), manifest_uri=ref.manifest_uri,
        sha256=ref.sha256, factories=tuple(factories), out_uri=out_uri, run_id=run_id,
        features=list(model.features))
    share_local_credentials(spark, storage)
    columns = [F.col(f"`{id_col}`").cast("string").alias("__id")] + [
        F.col(f"`{f}`").cast("double").alias(f"__f{i}") for i, f in enumerate(model.features)]
    written = frame.select(*columns).mapInArrow(body, "file string, rows long").collect()
    rows = sum(int(r["rows"]) for r in written)
    fs.pipe_file(f"{root}/{SUCCESS_FILE}", b"")
    seconds = time.monotonic() - began
    progress(f"scored {rows} rows into {len(written)} files under {out_uri} in {seconds:.1f}s "
             f"({rows / seconds if seconds else 0:.0f} rows/s)")
    return ScoreResult(model_name=name, version=ref.version, task=model.task, data_uri=data_uri,
                       out_uri=out_uri, rows=rows, files=len(written), seconds=seconds)
