"""Reading a Parquet dataset from S3 (or local files) into Spark without hadoop-aws.

The pyspark wheel has no S3A connector and Maven is unreachable, so ``spark.read.parquet`` cannot
read ``s3://``. Instead the driver lists the files with fsspec, builds a DataFrame of paths, and
each task reads its share with pyarrow through its own fsspec filesystem, which works the same on
a cluster. The storage options travel with the task without credentials
(:func:`models.storage.task_storage_options`): executors authenticate with their own environment.
"""
from __future__ import annotations

import functools
import logging
import re
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from lake.errors import DataError, StorageError
from models.storage import filesystem

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

__all__ = ["list_parquet_files", "read_schema", "read_parquet", "read_files", "file_reader",
           "within_window", "window_start"]

log = logging.getLogger(__name__)

# Reading every footer costs one or two requests per file; beyond this many files a sample
# (the first and last ones: oldest and newest partitions) decides the schema.
_MAX_SCHEMA_FILES = 200
_BATCH_ROWS = 65_536
# Read tasks per core. One task per core leaves a core idle whenever the other task is slower
# (an uneven file count, a core shared with another process) in the read and in every step
# after it, which work on the read's partitions; a few tasks per core even the load out.
_TASKS_PER_CORE = 4
_DT_RE = re.compile(r"/dt=(\d{4}-\d{2}-\d{2})(?:/|$)")


def window_start(days: int, now: datetime | None = None) -> datetime | None:
    """Start of the window of the last ``days`` days (UTC), or None for all history."""
    if days <= 0:
        return None
    return (now or datetime.now(timezone.utc)).astimezone(timezone.utc) - timedelta(days=days)


def within_window(files: list[str], since: datetime | None) -> list[str]:
    """The files whose ``dt=YYYY-MM-DD`` partition may hold rows at or after ``since``.

    Partition pruning only: files of days before ``since``'s day are dropped without being
    read; files without a ``dt=`` partition are kept (their rows are filtered by time later).
    """
    if since is None:
        return list(files)
    first_day = since.astimezone(timezone.utc).date().isoformat()
    kept = []
    for uri in files:
        match = _DT_RE.search(uri)
        if match is None or match.group(1) >= first_day:
            kept.append(uri)
    return kept


def list_parquet_files(uri: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """URIs of the Parquet files of a dataset, sorted.

    Parameters
    ----------
    uri : str
        A dataset directory (searched recursively, e.g. ``LAKE_URI`` with its ``dt=/hour=``
        partitions) or a single ``.parquet`` file.
    storage_options : mapping, optional
        s3fs options.

    Returns
    -------
    list of str
        Full URIs; hidden and bookkeeping files (``_SUCCESS``, ``.part``, ...) are skipped.
        Empty when the location does not exist.

    Raises
    ------
    StorageError
        The store cannot be reached or listed.
    """
    try:
        fs, path = filesystem(uri, storage_options)
        if path.endswith(".parquet") and fs.isfile(path):
            return [fs.unstrip_protocol(path)]
        found = fs.find(path)
    except FileNotFoundError:
        return []
    except Exception as exc:  # botocore/aiohttp errors share no base class
        raise StorageError(f"cannot list {uri}: {_describe(exc)}") from exc
    prefix = path.rstrip("/") + "/"
    files = []
    for item in found:
        if not item.startswith(prefix) or not item.endswith(".parquet"):
            continue
        if any(part.startswith(("_", ".")) for part in item[len(prefix):].split("/")):
            continue
        files.append(fs.unstrip_protocol(item))
    return sorted(files)


def read_schema(files: list[str], storage_options: Mapping[str, Any] | None = None
                ) -> pa.Schema:
    """The unified Arrow schema of ``files`` (int and float columns promote to float, ...).

    Raises
    ------
    StorageError
        A footer cannot be read.
    DataError
        Files disagree on a column's type in a way that cannot be promoted.
    """
    if len(files) > _MAX_SCHEMA_FILES:
        half = _MAX_SCHEMA_FILES // 2
        files = files[:half] + files[-half:]
    fs, _ = filesystem(files[0], storage_options)
    schemas = []
    for uri in files:
        try:
            schemas.append(pq.read_schema(fs._strip_protocol(uri), filesystem=fs))
        except Exception as exc:
            raise StorageError(f"cannot read the Parquet footer of {uri}: "
                               f"{_describe(exc)}") from exc
    try:
        schema = pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DataError(f"the Parquet files of the dataset have incompatible schemas: "
                        f"{_describe(exc)}") from exc
    return _spark_compatible(schema.remove_metadata())


def read_files(batches: Iterator[pa.RecordBatch], storage_options: Mapping[str, Any],
               schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    """``mapInArrow`` body: read the files named in ``batches``' ``path`` column.

    Each batch read is conformed to ``schema``: columns in schema order, types cast, columns a
    file lacks filled with nulls, so files written at different times can be read together.
    ``storage_options`` are those of :func:`file_reader`: without credentials.
    """
    fs = None
    for batch in batches:
        for uri in batch.column("path").to_pylist():
            if fs is None:
                fs, _ = filesystem(uri, storage_options)
            try:
                handle = fs.open(fs._strip_protocol(uri), "rb")
            except Exception as exc:
                raise StorageError(f"cannot open {uri}: {_describe(exc)}") from exc
            with handle:
                parquet = pq.ParquetFile(handle)
                wanted = [name for name in schema.names if name in parquet.schema_arrow.names]
                for chunk in parquet.iter_batches(batch_size=_BATCH_ROWS, columns=wanted):
                    yield _conform(chunk, schema, uri)


def file_reader(storage_options: Mapping[str, Any] | None, schema: pa.Schema
                ) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The ``mapInArrow`` function of :func:`read_parquet`: :func:`read_files` bound to the
    storage options less their credentials, which a task must never carry."""
    from models.storage import task_storage_options

    return functools.partial(read_files, storage_options=task_storage_options(storage_options),
                             schema=schema)


def read_parquet(spark: "SparkSession", uri: str,
                 storage_options: Mapping[str, Any] | None = None,
                 partitions: int | None = None, files: list[str] | None = None
                 ) -> "DataFrame":
    """Read a Parquet dataset (directory tree or file) on S3 or local disk into a DataFrame.

    Parameters
    ----------
    spark : pyspark.sql.SparkSession
    uri : str
        Dataset location (see :func:`list_parquet_files`).
    storage_options : mapping, optional
        s3fs options. The tasks open their own connections with these options less the
        credentials: an executor authenticates with its own environment (on a local master,
        the credentials given here are put there: :func:`models.storage.share_local_credentials`).
    partitions : int, optional
        Number of read tasks (default: one per file, at most four per core). Every later
        step of the job works on the read's partitions.
    files : list of str, optional
        The dataset's files when already listed (:func:`list_parquet_files`).

    Returns
    -------
    pyspark.sql.DataFrame
        The dataset's columns with the unified schema of its files. Lazy: files are read when
        an action runs.

    Raises
    ------
    DataError
        No Parquet file at ``uri``, or incompatible file schemas.
    StorageError
        The store cannot be listed or a footer cannot be read.
    """
    from pyspark.sql.pandas.types import from_arrow_schema

    from models.storage import share_local_credentials

    if files is None:
        files = list_parquet_files(uri, storage_options)
    if not files:
        raise DataError(f"no Parquet files under {uri}")
    schema = read_schema(files, storage_options)
    log.info("reading %d Parquet files under %s", len(files), uri)
    n = partitions or max(1, min(len(files),
                                 _TASKS_PER_CORE * spark.sparkContext.defaultParallelism))
    paths = spark.createDataFrame([(f,) for f in files], "path string").repartition(n)
    share_local_credentials(spark, storage_options)
    return paths.mapInArrow(file_reader(storage_options, schema), from_arrow_schema(schema))


def _conform(batch: pa.RecordBatch, schema: pa.Schema, uri: str) -> pa.RecordBatch:
    arrays = []
    for field in schema:
        index = batch.schema.get_field_index(field.name)
        if index < 0:
            arrays.append(pa.nulls(batch.num_rows, field.type))
            continue
        column = batch.column(index)
        if column.type != field.type:
            try:
                if pa.types.is_dictionary(column.type):
                    column = column.dictionary_decode()
                column = column.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise DataError(f"{uri}: column {field.name!r} of type {column.type} cannot be "
                                f"read as {field.type}: {_describe(exc)}") from exc
        arrays.append(column)
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _spark_compatible(schema: pa.Schema) -> pa.Schema:
    """Arrow types Spark's Arrow bridge takes: plain strings/binaries, decoded dictionaries,
    float64 for all-null columns (a column with no value anywhere is harmless as a feature)."""
    fields = []
    for field in schema:
        kind = field.type
        if pa.types.is_dictionary(kind):
            kind = kind.value_type
        if pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
            kind = pa.string()
        elif pa.types.is_large_binary(kind) or pa.types.is_binary_view(kind):
            kind = pa.binary()
        elif pa.types.is_null(kind):
            kind = pa.float64()
        elif pa.types.is_timestamp(kind):
            kind = pa.timestamp("us", tz="UTC" if kind.tz else None)
        fields.append(pa.field(field.name, kind, nullable=True))
    return pa.schema(fields)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
