"""The batch job: read -> clean -> split -> fit preprocessing -> train -> evaluate -> publish ->
announce.

:func:`run_job` only wires the steps of :mod:`batch.lake`, :mod:`batch.prepare`,
:mod:`batch.train`, :mod:`batch.evaluate`, :mod:`models.registry` and :mod:`batch.announce`,
timing each one. :func:`bootstrap` makes sure a fresh installation has a model to serve.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import numpy as np

from app.settings import Settings
from batch import prepare
from batch.errors import BatchError, DataError, StorageError
from batch.evaluate import Decision, classification_metrics, evaluate_policy, majority_rate
from batch.train import TrainConfig, parse_hidden
from models.errors import ModelError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from models.manifest import Manifest
    from models.registry import ModelRef

__all__ = ["JobConfig", "JobResult", "run_job", "bootstrap", "EXIT_PUBLISHED", "EXIT_REJECTED",
           "EXIT_FAILED", "DEFAULT_DEMO_ROWS", "BOOTSTRAP_TRAIN_SECONDS"]

log = logging.getLogger(__name__)

EXIT_PUBLISHED, EXIT_FAILED, EXIT_REJECTED = 0, 1, 3
#: Rows of demo data the bootstrap writes into an empty lake.
DEFAULT_DEMO_ROWS = 100_000
#: Training time budget of the bootstrap run unless one is configured: the first model must be
#: ready within a minute or two of ``make run`` on a busy 2-core machine, and the default network
#: reaches most of its accuracy in its first epoch.
BOOTSTRAP_TRAIN_SECONDS = 20.0
# Reference rows recorded in the manifest, and how closely a loader must reproduce them: float32
# sums in a different order (another thread count) move probabilities by about 1e-6.
_REFERENCE_ROWS = 8
_REFERENCE_ATOL = 1e-4

Progress = Callable[[str], None]


@dataclass(frozen=True)
class JobConfig:
    """What to train on and how; every field has an environment default (``from_env``).

    Attributes
    ----------
    data_uri : str or None
        Parquet dataset to train on (default ``LAKE_URI``).
    model_name : str or None
        Registry model name (default ``MODEL_NAME``, i.e. ``default``).
    id_col, label_col : str
        Id and label columns of the dataset.
    exclude_cols : tuple of str
        Columns that are metadata, not features.
    hidden : tuple of int
        Hidden layer sizes (``BATCH_HIDDEN``, e.g. ``500,1000,500``).
    dropout : float
        Dropout (``BATCH_DROPOUT``).
    epochs : int
        Maximum epochs (``BATCH_EPOCHS``).
    batch_size : int
        Mini-batch rows (``BATCH_BATCH_SIZE``).
    lr : float
        Adam learning rate (``BATCH_LR``).
    seed : int
        Seed of the split, initialisation and shuffling (``BATCH_SEED``).
    max_train_seconds : float or None
        Training time budget (``BATCH_MAX_TRAIN_SECONDS``; unset: none).
    test_fraction, val_fraction : float
        Held-out test share and validation share (early stopping) of the rows.
    threads : int
        torch threads for training (``BATCH_THREADS``).
    force : bool
        Publish even when the evaluation policy rejects the candidate.
    announce : bool
        Send the MODEL-REF to Kafka after publishing.
    onnx : bool
        Also write an ONNX export of the network.
    """

    data_uri: str | None = None
    model_name: str | None = None
    id_col: str = "id"
    label_col: str = "label"
    exclude_cols: tuple[str, ...] = prepare.METADATA_COLUMNS
    # Training defaults are TrainConfig's own, so the two cannot drift apart.
    hidden: tuple[int, ...] = TrainConfig.hidden
    dropout: float = TrainConfig.dropout
    epochs: int = TrainConfig.epochs
    batch_size: int = TrainConfig.batch_size
    lr: float = TrainConfig.lr
    seed: int = TrainConfig.seed
    max_train_seconds: float | None = TrainConfig.max_seconds
    test_fraction: float = 0.2
    val_fraction: float = 0.1
    threads: int = 2
    force: bool = False
    announce: bool = True
    onnx: bool = True

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any
                 ) -> "JobConfig":
        """Defaults from ``BATCH_*`` variables, then ``overrides`` (None values ignored)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        readers: dict[str, tuple[str, Callable[[str], Any]]] = {
            "hidden": ("BATCH_HIDDEN", parse_hidden),
            "dropout": ("BATCH_DROPOUT", float),
            "epochs": ("BATCH_EPOCHS", int),
            "batch_size": ("BATCH_BATCH_SIZE", int),
            "lr": ("BATCH_LR", float),
            "seed": ("BATCH_SEED", int),
            "max_train_seconds": ("BATCH_MAX_TRAIN_SECONDS", float),
            "threads": ("BATCH_THREADS", int),
        }
        for name, (env, convert) in readers.items():
            raw = environ.get(env, "").strip()
            if raw:
                try:
                    values[name] = convert(raw)
                except ValueError as exc:
                    raise BatchError(f"bad setting {env}={raw!r}: {exc}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def train_config(self) -> TrainConfig:
        """The :class:`~batch.train.TrainConfig` part of this configuration."""
        return TrainConfig(hidden=tuple(self.hidden), dropout=self.dropout, epochs=self.epochs,
                           batch_size=self.batch_size, lr=self.lr, seed=self.seed,
                           max_seconds=self.max_train_seconds)


@dataclass
class JobResult:
    """What a run did: the decision, the published version (if any) and the figures."""

    published: bool
    decision: Decision
    forced: bool
    model_name: str
    data_uri: str
    features: list[str]
    classes: list[Any]
    rows: dict[str, int]
    metrics: dict[str, float]
    training: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    ref: "ModelRef | None" = None
    manifest: "Manifest | None" = None

    @property
    def exit_code(self) -> int:
        """0 published, 3 rejected by the evaluation policy."""
        return EXIT_PUBLISHED if self.published else EXIT_REJECTED


class _Stages:
    """Times named stages and reports them through ``progress``."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.progress(f"{name} ...")
        start = time.monotonic()
        yield
        self.timings[name] = round(time.monotonic() - start, 3)


def run_job(settings: Settings, config: JobConfig, spark: "SparkSession | None" = None,
            progress: Progress | None = None) -> JobResult:
    """Rebuild a model from a Parquet dataset, and publish and announce it if it is good enough.

    Parameters
    ----------
    settings : app.settings.Settings
        Lake, registry, S3 and Kafka settings.
    config : JobConfig
        Dataset columns, hyper-parameters and switches.
    spark : pyspark.sql.SparkSession, optional
        Session to use; by default one is created (and stopped at the end).
    progress : callable, optional
        Receives one human-readable line per step (default: the module logger).

    Returns
    -------
    JobResult
        ``published`` is False when the evaluation policy rejected the candidate (and
        ``config.force`` was not set).

    Raises
    ------
    BatchError
        Bad data (:class:`~batch.errors.DataError`), unreachable storage
        (:class:`~batch.errors.StorageError`) or Kafka (:class:`~batch.errors.AnnounceError`).
    models.errors.ModelError
        The candidate could not be published.
    """
    import torch

    from batch.announce import announce
    from batch.lake import list_parquet_files, read_parquet
    from models.manifest import Manifest
    from models.preprocessing import preprocessor_from_stats
    from models.registry import Registry
    from models.serving import LoadedModel

    say = progress or log.info
    stages = _Stages(say)
    data_uri = config.data_uri or settings.lake_uri
    model_name = config.model_name or settings.model_name
    storage = settings.storage_options
    registry = Registry(settings.registry_uri, storage)
    own_session = spark is None
    job_start = time.monotonic()
    try:
        # Listing first fails fast (before Spark starts) when the store is down or empty.
        with stages.stage("list"):
            files = list_parquet_files(data_uri, storage)
            if not files:
                raise DataError(f"no Parquet files under {data_uri}")
        say(f"{len(files)} Parquet files under {data_uri}")

        with stages.stage("spark session"):
            if spark is None:
                from batch.spark import get_session
                spark = get_session()

        with stages.stage("read"):
            raw = read_parquet(spark, data_uri, storage, files=files)
            features = prepare.feature_columns(raw.dtypes, config.id_col, config.label_col,
                                               config.exclude_cols)
            # Cached so that the store is read once; every later step starts from here.
            raw = raw.persist()
            rows_read = raw.count()
        say(f"read {rows_read} rows with {len(features)} features from {data_uri}")

        with stages.stage("clean and split"):
            cleaned = prepare.clean(raw, features, config.id_col, config.label_col)
            data = prepare.add_split(cleaned, config.id_col, config.seed, config.test_fraction,
                                     config.val_fraction).persist()
            try:
                counts = prepare.split_class_counts(data, config.label_col)
            finally:
                raw.unpersist()
            classes = prepare.check_splits(counts, config.label_col)
        rows = {"read": int(rows_read)}
        rows.update({split: sum(c.values()) for split, c in counts.items()})
        rows["usable"] = rows[prepare.TRAIN] + rows[prepare.VALIDATION] + rows[prepare.TEST]
        say(f"{rows['usable']} usable rows (train {rows['train']}, val {rows['val']}, "
            f"test {rows['test']}); classes {classes}")

        try:
            with stages.stage("fit preprocessing"):
                train_rows = data.where(data[prepare.SPLIT_COL] == prepare.TRAIN)
                preprocessor = preprocessor_from_stats(
                    features, *prepare.feature_statistics(train_rows, features))
            with stages.stage("collect"):
                arrays = prepare.collect_preprocessed(data, features, preprocessor, classes,
                                                      config.id_col, config.label_col)
                reference_inputs = prepare.reference_rows(data, features, _REFERENCE_ROWS)
        finally:
            data.unpersist()

        with stages.stage("train"):
            torch.set_num_threads(config.threads)
            X_train, y_train = arrays[prepare.TRAIN]
            X_val, y_val = arrays[prepare.VALIDATION]
            from batch.train import train_classifier
            result = train_classifier(X_train, y_train, len(classes), config.train_config(),
                                      X_val=X_val, y_val=y_val, progress=say)

        with stages.stage("evaluate"):
            X_test, y_test = arrays[prepare.TEST]
            with torch.inference_mode():
                # Chunks bound the activations' memory on large test splits.
                proba = np.concatenate([
                    torch.softmax(result.module(torch.from_numpy(X_test[i:i + 8192])),
                                  dim=1).numpy()
                    for i in range(0, len(X_test), 8192)])
            metrics = classification_metrics(y_test, proba)
            baseline = majority_rate(counts[prepare.TEST])
            metrics["baseline_accuracy"] = baseline
            decision = evaluate_policy(metrics, baseline)
        say("test metrics: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                            if isinstance(v, float)) + f"; {decision.reason}")

        training = {
            "data": data_uri, "id_col": config.id_col, "label_col": config.label_col,
            "rows": rows,
            "class_counts": {split: {str(c): n for c, n in sorted(cc.items())}
                             for split, cc in counts.items()},
            "seed": config.seed, "test_fraction": config.test_fraction,
            "val_fraction": config.val_fraction, "epochs": config.epochs,
            "epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
            "stopped": result.stopped, "batch_size": result.batch_size, "lr": config.lr,
            "optimizer": "adam", "loss": "cross_entropy",
            "train_seconds": round(result.seconds, 3),
            "history": [{k: round(v, 6) for k, v in h.items()} for h in result.history],
            "policy": decision.reason, "torch": torch.__version__,
        }
        draft = Manifest(
            name=model_name, features=list(features), classes=list(classes),
            preprocessing=preprocessor.to_dict(), architecture=result.module.architecture(),
            metrics=metrics, training=training, forced=not decision.accepted)
        # Reference probabilities come from the serving code path itself.
        candidate = LoadedModel(draft, result.module)
        draft.reference = {"inputs": reference_inputs.tolist(),
                           "probabilities": candidate.predict_proba(reference_inputs).tolist(),
                           "atol": _REFERENCE_ATOL}

        job = JobResult(published=False, decision=decision, forced=False, model_name=model_name,
                        data_uri=data_uri, features=list(features), classes=list(classes),
                        rows=rows, metrics=metrics, training=training, manifest=draft,
                        timings=stages.timings)
        if not decision.accepted and not config.force:
            say(f"candidate rejected: {decision.reason}")
            return job
        if not decision.accepted:
            say("publishing anyway (--force); the manifest records \"forced\": true")

        with stages.stage("publish"):
            try:
                job.ref = registry.publish(result.module, draft, onnx=config.onnx)
            except ModelError as exc:
                raise StorageError(f"cannot publish {model_name}: {exc}") from exc
        job.published, job.forced = True, not decision.accepted
        say(f"published {job.ref.name}/{job.ref.version} at {job.ref.manifest_uri}")
        if config.announce:
            with stages.stage("announce"):
                announce(settings, job.ref)
            say(f"announced MODEL-REF on {settings.updates_topic!r}")
        return job
    finally:
        stages.timings["total"] = round(time.monotonic() - job_start, 3)
        if own_session and spark is not None:
            spark.stop()


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
    from batch.demo_data import write_lake
    from batch.lake import list_parquet_files
    from models.registry import Registry

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
