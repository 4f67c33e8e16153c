"""The bootstrap that gives a fresh installation its first model (``make run``).

If the registry has no version of the model, it writes demo data into the lake when the lake
is empty, then runs the batch job once with ``force``: a first model is better than none.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING

from app.settings import Settings
from batch.errors import StorageError
from batch.job import JobConfig, JobResult, Progress, run_job
from demo.data import write_lake
from lake.reader import list_parquet_files
from models.errors import ModelError
from models.registry import Registry

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

__all__ = ["bootstrap", "DEFAULT_DEMO_ROWS", "BOOTSTRAP_TRAIN_SECONDS"]

log = logging.getLogger(__name__)

#: Rows of demo data the bootstrap writes into an empty lake.
DEFAULT_DEMO_ROWS = 100_000
#: Training time budget of the bootstrap run unless one is configured: the first model must be
#: ready within a minute or two of ``make run`` on a busy 2-core machine, and the default network
#: reaches most of its accuracy in its first epoch.
BOOTSTRAP_TRAIN_SECONDS = 20.0


def bootstrap(settings: Settings, config: JobConfig, rows: int = DEFAULT_DEMO_ROWS,
              seed: int = 0, spark: "SparkSession | None" = None,
              progress: Progress | None = None) -> JobResult | None:
    """Give a fresh installation a model: if the registry has none, train one.

    When the registry has no version of the model, demo data is written to the lake if the lake
    is empty, and the job runs once with ``force`` (a first model is better than none) and, unless
    ``config`` sets one, a training time budget of :data:`BOOTSTRAP_TRAIN_SECONDS`.

    Returns
    -------
    JobResult or None
        None when a version existed already.
    """
    say = progress or log.info
    model_name = config.model_name or settings.model_name
    registry = Registry(settings.registry_uri, settings.storage_options)
    try:
        existing = registry.latest(model_name)
    except ModelError as exc:
        raise StorageError(f"cannot read the registry: {exc}") from exc
    if existing is not None:
        say(f"model {model_name!r} has version {existing.version} already; nothing to do")
        return None
    data_uri = config.data_uri or settings.lake_uri
    if not list_parquet_files(data_uri, settings.storage_options):
        start = time.monotonic()
        say(f"lake {data_uri} is empty: writing {rows} demo events (seed {seed})")
        try:
            write_lake(data_uri, settings.storage_options, rows, seed=seed)
        except Exception as exc:
            raise StorageError(f"cannot write demo data to {data_uri}: "
                               f"{type(exc).__name__}: {exc}") from exc
        say(f"demo data written in {time.monotonic() - start:.1f}s")
    budget = config.max_train_seconds or BOOTSTRAP_TRAIN_SECONDS
    return run_job(settings, dataclasses.replace(config, force=True, max_train_seconds=budget),
                   spark=spark, progress=progress)
