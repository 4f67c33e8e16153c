"""The batch job: read -> clean and split -> active model -> preprocess -> train -> evaluate ->
publish (announce, prune).

:func:`run_job` takes the run lock and runs those steps, each a method of one run that takes
what the steps before it produced: they wire :mod:`lake.reader`, :mod:`batch.prepare`,
:mod:`batch.train`, :mod:`batch.evaluate`, :mod:`models.registry` and :mod:`batch.announce`,
timing each one.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import numpy as np

from app.settings import FACTORY_NAME, METRICS, Settings, SettingsError
from batch import prepare
from batch.defaults import AUTO, fitted, is_auto
from batch.errors import DataError, NetworkError, StorageError
from batch.evaluate import (Decision, classification_metrics, default_metric, evaluate_policy,
                            majority_rate, mean_predictor_rmse, regression_metrics)
from batch.train import Arrays, Network, TrainConfig, TrainResult
from models.errors import ModelError
from models.network import MLP_FACTORY

if TYPE_CHECKING:
    from datetime import datetime

    from pyspark.sql import SparkSession

    from batch.active import UpdateState
    from models.preprocessing import Preprocessor

    from batch.lock import RegistryLock
    from models.manifest import Manifest
    from models.registry import ModelRef
    from models.loaded import LoadedModel

__all__ = ["JobConfig", "JobResult", "CandidateReport", "run_job", "EXIT_PUBLISHED",
           "EXIT_REJECTED", "EXIT_FAILED"]

log = logging.getLogger(__name__)

EXIT_PUBLISHED, EXIT_FAILED, EXIT_REJECTED = 0, 1, 3
# Reference rows recorded in the manifest, and how closely a loader must reproduce them: float32
# sums in a different order (another thread count) move probabilities by about 1e-6.
_REFERENCE_ROWS = 8
_REFERENCE_ATOL = 1e-4

Progress = Callable[[str], None]


@dataclass(frozen=True)
class JobConfig:
    """What to train on and how; :meth:`from_settings` fills it from the ``BATCH_*`` settings.

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
    hidden, dropout, epochs, batch_size, lr : value or str
        Hyper-parameters: a value, or a search specification of :mod:`batch.search`
        (``"64,32|128"``, ``"0.0003:0.01"``, ...); ``"auto"`` (the default of all but ``lr``):
        fitted to the training rows (:mod:`batch.defaults`).
    seed : int
        Seed of the split, the search, initialisation and shuffling.
    max_train_seconds : float or None
        Training time budget per candidate (None: none).
    patience : int or None
        Early-stopping patience in epochs (0: never stop early; None: fitted to the rows).
    test_fraction, val_fraction : float
        Held-out test share and validation share (early stopping, candidate choice).
    threads : int
        torch threads for training, in all.
    candidates : int
        Hyper-parameter candidates to train; the best on the validation split is chosen.
    search : str
        ``random`` or ``grid``.
    parallelism : int
        Candidates trained at once (0: as many as ``threads`` allow).
    distributed : int
        Train on this many Spark tasks with TorchDistributor (0: in the driver).
    window_days : int
        Train on the last N days only (0: all history).
    task : str
        ``auto`` (from the label column, :func:`batch.prepare.infer_task`),
        ``classification`` or ``regression``.
    metric : str
        Test metric compared with the active model: ``accuracy``, ``auc``, ``log_loss``
        (classification), ``rmse``, ``mae``, ``r2`` (regression), or ``auto`` (accuracy or
        rmse by the task).
    network : str
        ``mlp`` (the built-in network, sized by ``hidden`` and ``dropout``) or a factory
        ``package.module:function`` (``BATCH_MODEL``); a factory's network is not searched
        over ``hidden`` and ``dropout``.
    network_params : mapping
        Keyword parameters of the factory (``BATCH_MODEL_PARAMS``).
    min_accuracy : float
        Least test accuracy to publish a classification.
    compare_active : bool
        Publish only a candidate not worse than the active model on the same test rows.
    compare_tolerance : float
        How much worse than the active model still counts as not worse.
    keep_versions : int
        Generations kept in the registry after publishing (0: all).
    lock, lock_ttl_s : bool, float
        Take the registry's run lock of the model (and its expiry).
    force : bool
        Publish even when the evaluation policy rejects the candidate.
    announce : bool
        Send the MODEL-REF to Kafka after publishing.
    onnx : bool
        Also write an ONNX export of the network.
    staging_uri : str or None
        Where distributed training stages its arrays (default ``REGISTRY_URI/_staging``).
    keep_arrays : bool
        Keep the preprocessed arrays in the result (benchmarks compare against them).
    """

    data_uri: str | None = None
    model_name: str | None = None
    id_col: str = "id"
    label_col: str = "label"
    exclude_cols: tuple[str, ...] = prepare.METADATA_COLUMNS
    # "auto" (and patience None): fitted to the training rows (batch.defaults).
    hidden: Any = AUTO
    dropout: Any = AUTO
    epochs: Any = AUTO
    batch_size: Any = AUTO
    lr: Any = TrainConfig.lr
    seed: int = TrainConfig.seed
    max_train_seconds: float | None = TrainConfig.max_seconds
    patience: int | None = None
    test_fraction: float = 0.2
    val_fraction: float = 0.1
    threads: int = 2
    candidates: int = 1
    search: str = "random"
    parallelism: int = 0
    distributed: int = 0
    window_days: int = 0
    task: str = "auto"
    metric: str = "auto"
    network: str = MLP_FACTORY
    network_params: Mapping[str, Any] = field(default_factory=dict)
    min_accuracy: float = 0.0
    compare_active: bool = True
    compare_tolerance: float = 0.0
    keep_versions: int = 5
    lock: bool = True
    lock_ttl_s: float = 3600.0
    force: bool = False
    announce: bool = True
    onnx: bool = True
    staging_uri: str | None = None
    keep_arrays: bool = False

    def __post_init__(self) -> None:
        if self.task not in ("auto", *prepare.TASKS):
            raise ValueError(f"task must be auto, classification or regression, got "
                             f"{self.task!r}")
        known = {m for metrics in METRICS.values() for m in metrics}
        if self.metric != "auto" and self.metric not in known:
            raise ValueError(f"metric must be auto or one of {sorted(known)}, got "
                             f"{self.metric!r}")
        if self.task != "auto" and self.metric not in ("auto", *METRICS[self.task]):
            raise ValueError(f"metric {self.metric!r} does not apply to a {self.task}: it is "
                             f"compared on {', '.join(METRICS[self.task])}")
        if self.network != MLP_FACTORY and not FACTORY_NAME.fullmatch(self.network):
            raise ValueError(f"network must be mlp or a factory package.module:function, got "
                             f"{self.network!r}")

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> "JobConfig":
        """The ``BATCH_*`` settings, then ``overrides`` (None values ignored).

        Raises
        ------
        app.settings.SettingsError
            A hyper-parameter setting, or the task, metric or network given, cannot be used;
            the message names the variable or option.
        """
        from app.settings import model_params
        from batch.search import parse_param

        values: dict[str, Any] = {
            "id_col": settings.batch_id_col, "label_col": settings.batch_label_col,
            "hidden": settings.batch_hidden, "dropout": settings.batch_dropout,
            "epochs": settings.batch_epochs, "batch_size": settings.batch_batch_size,
            "lr": settings.batch_lr, "seed": settings.batch_seed,
            "max_train_seconds": settings.batch_max_train_seconds or None,
            "patience": settings.batch_patience,
            "test_fraction": settings.batch_test_fraction,
            "val_fraction": settings.batch_val_fraction, "threads": settings.batch_threads,
            "candidates": settings.batch_candidates, "search": settings.batch_search,
            "parallelism": settings.batch_parallelism,
            "distributed": settings.batch_distributed,
            "window_days": settings.batch_window_days, "task": settings.batch_task,
            "metric": settings.batch_metric, "network": settings.batch_model,
            "network_params": model_params(settings.batch_model_params),
            "min_accuracy": settings.batch_min_accuracy,
            "compare_active": settings.batch_compare_active,
            "compare_tolerance": settings.batch_compare_tolerance,
            "keep_versions": settings.batch_keep_versions,
            "lock_ttl_s": float(settings.batch_lock_ttl_s),
        }
        given = {k: v for k, v in overrides.items() if v is not None}
        values.update(given)
        for name in ("hidden", "dropout", "epochs", "batch_size", "lr"):
            where = (f"option --{name.replace('_', '-')}" if name in given
                     else f"setting BATCH_{name.upper()}")
            try:
                if not is_auto(values[name]):
                    parse_param(name, values[name])
            except ValueError as exc:
                raise SettingsError(f"bad {where}={values[name]!r}: {exc}") from None
        if isinstance(values["network_params"], str):
            try:
                values["network_params"] = model_params(values["network_params"])
            except ValueError as exc:
                raise SettingsError(f"bad option --network-params="
                                    f"{values['network_params']!r}: {exc}") from None
        try:
            return cls(**values)
        except ValueError as exc:
            given_names = [f"--{k.replace('_', '-')}" for k in ("task", "metric", "network")
                           if k in given]
            where = (f"option{'s' if len(given_names) > 1 else ''} {', '.join(given_names)}"
                     if given_names else "settings BATCH_TASK, BATCH_METRIC, BATCH_MODEL")
            raise SettingsError(f"bad {where}: {exc}") from None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any
                 ) -> "JobConfig":
        """:meth:`from_settings` of ``Settings.from_env(environ)``."""
        return cls.from_settings(Settings.from_env(environ), **overrides)

    @property
    def network_spec(self) -> Network:
        """The :class:`~batch.train.Network` to train."""
        return Network(self.network, dict(self.network_params))

    def search_space(self, rows: int | None = None) -> dict[str, Any]:
        """The :func:`batch.search.parse_space` of the hyper-parameters (without ``hidden``
        and ``dropout`` for a factory's network: they do not size it), ``"auto"`` ones fitted
        to ``rows`` training rows (before the data is read, to a large dataset's)."""
        from batch.search import parse_space

        fit = fitted(rows if rows is not None else 100_000)
        specs = {"lr": self.lr, "hidden": self.hidden, "dropout": self.dropout,
                 "epochs": self.epochs, "batch_size": self.batch_size}
        specs = {name: fit[name] if is_auto(spec) else spec for name, spec in specs.items()}
        if self.network != MLP_FACTORY:
            del specs["hidden"], specs["dropout"]
        return parse_space(specs)

    def fitted_params(self, rows: int) -> dict[str, Any]:
        """The hyper-parameters fitted to ``rows`` training rows that this run uses: those
        left at ``"auto"`` (patience: unset)."""
        fit = fitted(rows)
        chosen = {name: fit[name] for name in ("hidden", "dropout", "epochs", "batch_size")
                  if is_auto(getattr(self, name))
                  and (self.network == MLP_FACTORY or name not in ("hidden", "dropout"))}
        if self.patience is None:
            chosen["patience"] = fit["patience"]
        return chosen

    def train_configs(self, rows: int | None = None) -> list[TrainConfig]:
        """One :class:`~batch.train.TrainConfig` per search candidate, for ``rows`` training
        rows (``"auto"`` hyper-parameters are fitted to them)."""
        from batch.search import candidates

        patience = (self.patience if self.patience is not None
                    else fitted(rows if rows is not None else 100_000)["patience"])
        return [TrainConfig(hidden=tuple(c.get("hidden", TrainConfig.hidden)),
                            dropout=c.get("dropout", TrainConfig.dropout),
                            epochs=c["epochs"], batch_size=c["batch_size"], lr=c["lr"],
                            seed=self.seed, patience=patience,
                            max_seconds=self.max_train_seconds)
                for c in candidates(self.search_space(rows), self.candidates, self.search,
                                    seed=self.seed)]

    def train_config(self) -> TrainConfig:
        """The first candidate's :class:`~batch.train.TrainConfig`."""
        return self.train_configs()[0]


@dataclass
class CandidateReport:
    """One trained candidate: its hyper-parameters, how training went and its metrics."""

    index: int
    params: dict[str, Any]
    epochs_run: float
    stopped: str
    seconds: float
    val_loss: float | None
    val_accuracy: float | None
    test: dict[str, float]
    chosen: bool = False


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
    candidates: list[CandidateReport] = field(default_factory=list)
    active_version: str | None = None
    active_metrics: dict[str, float] | None = None
    pruned: list[str] = field(default_factory=list)
    constant_features: list[str] = field(default_factory=list)
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
    #: ``classification`` or ``regression``, and the metric compared with the active model.
    task: str = "classification"
    metric: str = "accuracy"

    @property
    def exit_code(self) -> int:
        """0 published, 3 rejected by the evaluation policy."""
        return EXIT_PUBLISHED if self.published else EXIT_REJECTED


class _Stages:
    """Times named stages and reports them through ``progress``."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.timings: dict[str, float] = {}
        #: Called before every stage starts (the run lock's "still held?" flag).
        self.guard: Callable[[], None] | None = None

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.guard is not None:
            self.guard()
        self.progress(f"{name} ...")
        start = time.monotonic()
        try:
            yield
        finally:
            self.timings[name] = round(time.monotonic() - start, 3)


def _outputs(module: Any, X: np.ndarray, task: str, n_outputs: int) -> np.ndarray:
    """Class probabilities (classification) or predicted values (regression, one column) of
    preprocessed rows."""
    import torch

    if len(X) == 0:
        return np.empty((0, n_outputs), np.float32)
    with torch.inference_mode():
        # Chunks bound the activations' memory on large splits.
        chunks = [module(torch.from_numpy(X[i:i + 8192])) for i in range(0, len(X), 8192)]
        if task == prepare.CLASSIFICATION:
            chunks = [torch.softmax(out, dim=1) for out in chunks]
        return np.concatenate([out.float().numpy() for out in chunks])


def _test_metrics(task: str, y: np.ndarray, outputs: np.ndarray) -> dict[str, float]:
    if task == prepare.REGRESSION:
        return regression_metrics(y, outputs)
    return classification_metrics(y, outputs)


def _validation_figures(module: Any, X: np.ndarray, y: np.ndarray, task: str, n_outputs: int
                        ) -> tuple[float | None, float | None]:
    """Validation loss (log loss; a regression's mean squared error in the label's units) and
    accuracy (None for a regression)."""
    if len(X) == 0:
        return None, None
    outputs = _outputs(module, X, task, n_outputs)
    if task == prepare.REGRESSION:
        return float(regression_metrics(y, outputs)["rmse"] ** 2), None
    metrics = classification_metrics(y, outputs)
    return metrics["log_loss"], metrics["accuracy"]


def _active_on_test(active: "LoadedModel", features: list[str], classes: list[Any],
                    X_raw: np.ndarray, y_test: np.ndarray, task: str = prepare.CLASSIFICATION
                    ) -> tuple[dict[str, float] | None, str]:
    """The active model's metrics on the candidate's test rows, or None and why not."""
    if active.task != task:
        return None, f"the active model is a {active.task}, the candidate a {task}"
    if task == prepare.CLASSIFICATION and (sorted(map(str, active.classes)) != sorted(
            map(str, classes)) or len(active.classes) != len(classes)):
        return None, (f"the active model's classes {active.classes} differ from the data's "
                      f"{classes}")
    missing = [f for f in active.features if f not in features]
    if missing:
        return None, f"the data lacks the active model's features {missing[:5]}"
    columns = [features.index(f) for f in active.features]
    outputs = active.outputs(X_raw[:, columns])
    if task == prepare.REGRESSION:
        return regression_metrics(y_test, outputs), "compared on the same test rows"
    # Reorder the active model's probability columns into the candidate's class order.
    by_label = {str(c): i for i, c in enumerate(active.classes)}
    proba = outputs[:, [by_label[str(c)] for c in classes]]
    return classification_metrics(y_test, proba), "compared on the same test rows"


def _check_factory(config: JobConfig) -> None:
    """A factory named by ``BATCH_MODEL`` imports (before any data is read)."""
    from models.network import load_factory

    if config.network != MLP_FACTORY:
        try:
            load_factory(config.network)
        except ModelError as exc:
            raise NetworkError(f"bad BATCH_MODEL={config.network!r}: {exc}") from None


def run_job(settings: Settings, config: JobConfig, spark: "SparkSession | None" = None,
            progress: Progress | None = None) -> JobResult:
    """Rebuild a model from a Parquet dataset, and publish and announce it if it is good enough.

    Steps: take the registry's run lock of the model; list (and window) the dataset; read it
    in Spark; clean and split; fit preprocessing on the training split; collect; find the
    active model; train the search's candidates; choose the best on the validation split;
    evaluate it and the active model on the same test rows; apply the policy; publish (every
    file, then the manifest), announce, and prune old generations.

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
    BatchError or LakeError
        Bad data (:class:`~lake.errors.DataError`), unreachable storage
        (:class:`~lake.errors.StorageError`), Kafka (:class:`~batch.errors.AnnounceError`),
        another run in progress (:class:`~batch.errors.LockError`), the run lock lost while
        this run went on (:class:`~batch.errors.LockLostError`, raised at the next stage or
        check: before the manifest is written, before announcing, before pruning). The
        exception carries the stage timings so far as ``timings``.
    """
    from batch.lock import RegistryLock

    say = progress or log.info
    stages = _Stages(say)
    model_name = config.model_name or settings.model_name
    job_start = time.monotonic()
    try:
        _check_factory(config)
        if config.lock:
            with stages.stage("lock"):
                lock = RegistryLock(settings.registry_uri, settings.storage_options,
                                    model_name, ttl_s=config.lock_ttl_s)
                # Written now, read back once the lake is listed: the settle time is not idle.
                lock.acquire(confirm=False)
            try:
                return _run_locked(settings, config, spark, say, stages, model_name, lock=lock)
            finally:
                lock.release()
        return _run_locked(settings, config, spark, say, stages, model_name)
    except BaseException as exc:
        stages.timings["total"] = round(time.monotonic() - job_start, 3)
        exc.timings = dict(stages.timings)  # type: ignore[attr-defined]
        raise
    finally:
        stages.timings["total"] = round(time.monotonic() - job_start, 3)


@dataclass
class _Data:
    """The cleaned, split dataset, cached in Spark until the arrays are collected."""

    frame: Any
    features: list[str]
    classes: list[Any]
    #: Rows per class per split (empty for a regression).
    counts: dict[str, dict[Any, int]]
    #: Rows read, usable, and per split.
    rows: dict[str, int]
    #: ``classification`` or ``regression``, why, and the metric compared with the active one.
    task: str = prepare.CLASSIFICATION
    task_reason: str = ""
    metric: str = "accuracy"
    #: A regression's label per split: n, mean, std, min, max.
    label_stats: dict[str, dict[str, float]] | None = None

    @property
    def n_outputs(self) -> int:
        """Width of the network's output: the classes, or one value."""
        return len(self.classes) if self.task == prepare.CLASSIFICATION else 1


@dataclass
class _Active:
    """The model serving now, as the update topic says, and whether it can be compared with."""

    state: "UpdateState"
    #: The serving version loaded for the comparison, or None.
    model: "LoadedModel | None" = None
    #: Why a serving version that exists cannot be compared with (the policy then rejects).
    unavailable: str | None = None

    @property
    def version(self) -> str | None:
        return self.state.active_version

    @property
    def task(self) -> str | None:
        """The task of the active model, when it is loaded."""
        return self.model.task if self.model is not None else None


@dataclass
class _Prepared:
    """What training and evaluation take from the dataset: preprocessed arrays per split."""

    preprocessor: "Preprocessor"
    constant: list[str]
    arrays: dict[str, tuple[np.ndarray, np.ndarray]]
    reference_inputs: np.ndarray
    #: The test split's raw features, for scoring the active model on the same rows.
    X_raw_test: np.ndarray | None


@dataclass
class _Evaluation:
    """The candidates' figures, the chosen one and the policy's decision."""

    reports: list[CandidateReport]
    best: int
    result: TrainResult
    metrics: dict[str, Any]
    decision: Decision
    active_metrics: dict[str, float] | None


class _Run:
    """One batch run, step by step: each step is a method that takes what the steps before
    it produced and returns what the next ones need."""

    def __init__(self, settings: Settings, config: JobConfig, spark: "SparkSession | None",
                 say: Progress, stages: _Stages, model_name: str,
                 lock: "RegistryLock | None") -> None:
        from models.registry import Registry

        self.settings, self.config, self.say, self.stages = settings, config, say, stages
        self.model_name, self.lock = model_name, lock
        self.data_uri = config.data_uri or settings.lake_uri
        self.storage = settings.storage_options
        self.network = config.network_spec
        # The factory this run trains may load the active version, as may those serving
        # allows (MODEL_FACTORIES, where the settings have it).
        self.registry = Registry(settings.registry_uri, self.storage,
                                 factories=_allowed_factories(settings, config))
        self.spark = spark
        self.own_session = spark is None
        # Checked now, fitted to the training rows once they are known (train).
        self.configs = config.train_configs()
        self.fitted: dict[str, Any] = {}

    def list_files(self) -> tuple[list[str], "datetime | None"]:
        """The dataset's files (within the window); listing fails fast, before Spark starts,
        when the store is down or empty."""
        from lake.reader import list_parquet_files, window_start, within_window

        config = self.config
        since = window_start(config.window_days)
        with self.stages.stage("list"):
            all_files = list_parquet_files(self.data_uri, self.storage)
            files = within_window(all_files, since)
            if not files:
                raise DataError(f"no Parquet files under {self.data_uri}"
                                + (f" in the last {config.window_days} days" if since else ""))
        self.say(f"{len(files)} Parquet files under {self.data_uri}"
                 + (f" (last {config.window_days} days: {len(all_files) - len(files)} older "
                    "files skipped)" if since else ""))
        return files, since

    def start(self) -> "SparkSession":
        """The Spark session (created unless given), then the run lock confirmed: from here a
        lost lock stops the run at the next stage."""
        with self.stages.stage("spark session"):
            if self.spark is None:
                from batch.spark import get_session

                settings = self.settings
                self.spark = get_session(master=settings.spark_master,
                                         driver_memory=settings.spark_driver_memory,
                                         driver_host=settings.spark_driver_host,
                                         driver_bind=settings.spark_driver_bind)
        if self.lock is not None:
            with self.stages.stage("lock check"):
                self.lock.confirm()
            # Before each step that changes the registry or the update topic the lock is also
            # read from the store again.
            self.stages.guard = self.lock.raise_if_lost
        return self.spark

    def read(self, spark: "SparkSession", files: list[str], since: "datetime | None"
             ) -> tuple[Any, list[str], int]:
        """The dataset as a cached DataFrame, its feature columns and its row count."""
        from lake.reader import read_parquet

        config = self.config
        with self.stages.stage("read"):
            raw = read_parquet(spark, self.data_uri, self.storage, files=files)
            features = prepare.feature_columns(raw.dtypes, config.id_col, config.label_col,
                                               config.exclude_cols)
            if since is not None and "ts" in raw.columns and "ts" not in features:
                raw = prepare.filter_since(raw, "ts", int(since.timestamp() * 1000))
            # Cached so that the store is read once; every later step starts from here.
            raw = raw.persist()
            rows_read = int(raw.count())
        self.say(f"read {rows_read} rows with {len(features)} features from {self.data_uri}")
        return raw, features, rows_read

    def clean_and_split(self, raw: Any, features: list[str], rows_read: int) -> _Data:
        """The task, then labelled rows with one row per id, split into train, validation and
        test."""
        config = self.config
        with self.stages.stage("clean and split"):
            try:
                task, task_reason = prepare.resolve_task(raw, config.label_col, config.task)
                metric = _metric_of(config, task, task_reason)
                cleaned = prepare.clean(raw, features, config.id_col, config.label_col,
                                        task=task)
                frame = prepare.add_split(cleaned, config.id_col, config.seed,
                                          config.test_fraction, config.val_fraction).persist()
                if task == prepare.REGRESSION:
                    label_stats = prepare.split_label_stats(frame, config.label_col)
                    counts: dict[str, dict[Any, int]] = {split: {} for split in label_stats}
                else:
                    label_stats = None
                    counts = prepare.split_class_counts(frame, config.label_col)
            finally:
                raw.unpersist()
            if label_stats is not None:
                prepare.check_regression_splits(label_stats, config.label_col)
                classes: list[Any] = []
            else:
                classes = prepare.check_splits(counts, config.label_col)
        rows = {"read": rows_read}
        if label_stats is not None:
            rows.update({split: int(stats["n"]) for split, stats in label_stats.items()})
        else:
            rows.update({split: sum(c.values()) for split, c in counts.items()})
        rows["usable"] = rows[prepare.TRAIN] + rows[prepare.VALIDATION] + rows[prepare.TEST]
        dropped = rows["read"] - rows["usable"]
        self.say(f"task {task} ({task_reason}); metric {metric}")
        if label_stats is not None:
            train = label_stats[prepare.TRAIN]
            described = (f"label mean {train['mean']:.4g}, std {train['std']:.4g}, range "
                         f"{train['min']:.4g} to {train['max']:.4g} (train)")
            why = "no, NaN or infinite label, or duplicate ids"
        else:
            described, why = f"classes {classes}", "unlabelled or duplicate ids"
        self.say(f"{rows['usable']} usable rows (train {rows['train']}, val {rows['val']}, "
                 f"test {rows['test']}; {dropped} dropped: {why}); {described}")
        return _Data(frame, features, list(classes), counts, rows, task=task,
                     task_reason=task_reason, metric=metric, label_stats=label_stats)

    def active_model(self) -> _Active:
        """What serves now, by the update topic's fold, verified as a worker verifies it (a
        version that fails is refused), and loaded when the policy compares with it."""
        from batch.active import UpdateState, read_update_state

        config, registry, say = self.config, self.registry, self.say
        if not (config.compare_active or config.keep_versions > 0):
            return _Active(UpdateState(active=None, pinned=None))
        with self.stages.stage("active model"):
            verified: dict[str, LoadedModel] = {}

            def verify(ref: Any) -> None:
                verified[ref.version] = registry.load_ref(ref)

            active = _Active(read_update_state(self.settings, self.model_name,
                                               registry=registry, verify=verify))
            state, version = active.state, active.version
            if version and not config.compare_active:
                # Loaded anyway when the topic's fold verified it: its task is checked.
                active.model = verified.get(version)
            if version and config.compare_active:
                active.model = verified.get(version)
                if active.model is None:  # the registry's newest: not verified on the topic
                    try:
                        ref = (state.active if state.active and state.active.version == version
                               else registry.ref(self.model_name, version))
                        active.model = registry.load_ref(ref)
                    except ModelError as exc:
                        active.unavailable = f"it does not load: {exc}"
                        say(f"cannot load the active model {version} to compare with: {exc}")
        say(f"active model: {state.active_version or 'none'} (from the {state.source})"
            + (f", pinned {state.pinned}" if state.pinned else "")
            + (f"; refused (artifact does not verify): {sorted(state.refused)}"
               if state.refused else ""))
        return active

    def preprocess(self, data: _Data, active: _Active) -> _Prepared:
        """Preprocessing fitted on the training split, and every split collected through it."""
        from models.preprocessing import preprocessor_from_stats

        config, features = self.config, data.features
        try:
            with self.stages.stage("fit preprocessing"):
                train_rows = data.frame.where(data.frame[prepare.SPLIT_COL] == prepare.TRAIN)
                stats = prepare.feature_statistics(train_rows, features)
                preprocessor = preprocessor_from_stats(features, *stats)
                constant = prepare.constant_features(features, *stats)
            if constant:
                self.say(f"{len(constant)} constant feature(s) carry no information (kept, "
                         f"standardised to 0): {constant[:10]}")
            with self.stages.stage("collect"):
                arrays = prepare.collect_preprocessed(
                    data.frame, features, preprocessor,
                    data.classes if data.task == prepare.CLASSIFICATION else None,
                    config.id_col, config.label_col)
                reference_inputs = prepare.reference_rows(data.frame, features,
                                                          _REFERENCE_ROWS)
                X_raw_test = (prepare.collect_raw(data.frame, features, config.id_col)
                              if active.model is not None and config.compare_active
                              and active.model.task == data.task else None)
        finally:
            data.frame.unpersist()
        return _Prepared(preprocessor, constant, arrays, reference_inputs, X_raw_test)

    def check_network(self, n_features: int, n_outputs: int, task: str) -> None:
        """The network builds and maps a batch to ``(n, n_outputs)``, and a regression's ends
        in a linear layer with a bias (its label's scale is folded there); otherwise a
        :class:`~batch.errors.NetworkError` before any training."""
        import torch

        from batch.train import regression_output_layer
        from models.network import output_layer

        name = ("the built-in MLP" if self.network.is_mlp
                else f"BATCH_MODEL={self.network.factory!r}")
        try:
            module = self.network.build(n_features, n_outputs, self.configs[0])
            module.eval()
            with torch.inference_mode():
                out = module(torch.zeros(2, n_features))
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, n_outputs):
                raise ModelError(f"it maps a (2, {n_features}) batch to "
                                 f"{getattr(out, 'shape', type(out).__name__)}, expected "
                                 f"(2, {n_outputs})")
            if task == prepare.REGRESSION:
                regression_output_layer(module, n_features)
            elif not self.network.is_mlp:
                try:
                    output_layer(module, n_features)
                except ModelError as exc:
                    self.say(f"the speed layer cannot update this network: {exc}")
        except ModelError as exc:
            raise NetworkError(f"bad {name} with params {dict(self.network.params)}: "
                               f"{exc}") from None
        except Exception as exc:  # a user's module failing on a plain batch
            raise NetworkError(f"bad {name} with params {dict(self.network.params)}: "
                               f"{type(exc).__name__}: {exc}") from None

    def train(self, spark: "SparkSession", prepared: _Prepared, data: _Data
              ) -> list[TrainResult]:
        """Every candidate of the search, trained on the training split."""
        import torch

        from batch.candidates import train_candidates
        from batch.search import describe

        config = self.config
        X_train, y_train = prepared.arrays[prepare.TRAIN]
        X_val, y_val = prepared.arrays[prepare.VALIDATION]
        self.fitted = config.fitted_params(len(X_train))
        if self.fitted:
            self.say(f"fitted to {len(X_train)} training rows: " + ", ".join(
                f"{name} {_fitted_text(value)}" for name, value in self.fitted.items()))
        self.configs = configs = config.train_configs(rows=len(X_train))
        self.check_network(X_train.shape[1], data.n_outputs, data.task)
        params = ", ".join(f"{k}={v!r}" for k, v in self.network.params.items())
        network = ("the built-in MLP" if self.network.is_mlp
                   else f"{self.network.factory}({params})")
        self.say(f"{len(configs)} candidate{'s' if len(configs) > 1 else ''} "
                 f"({config.search if len(configs) > 1 else 'as configured'}) of {network}: "
                 + "; ".join(describe(_params(c, self.network)) for c in configs))
        with self.stages.stage("train"):
            torch.set_num_threads(config.threads)
            staging = (config.staging_uri
                       or f"{self.settings.registry_uri.rstrip('/')}/_staging")
            try:
                return train_candidates(
                    Arrays(X_train, y_train, X_val, y_val, data.n_outputs, data.task),
                    configs, threads=config.threads, parallelism=config.parallelism,
                    distributed=config.distributed, spark=spark,
                    staging_uri=staging,
                    storage_options=self.storage, progress=self.say, network=self.network)
            except ModelError as exc:
                raise NetworkError(f"cannot train the network: {exc}") from None

    def evaluate(self, data: _Data, prepared: _Prepared, results: list[TrainResult],
                 active: _Active) -> _Evaluation:
        """The candidates' validation and test figures, the choice (on validation only), the
        active model on the same test rows, and the policy's decision."""
        config, task, n_outputs = self.config, data.task, data.n_outputs
        X_train, y_train = prepared.arrays[prepare.TRAIN]
        X_val, y_val = prepared.arrays[prepare.VALIDATION]
        X_test, y_test = prepared.arrays[prepare.TEST]
        unavailable = active.unavailable
        with self.stages.stage("evaluate"):
            reports = []
            for i, (train_config, trained) in enumerate(zip(self.configs, results)):
                val_loss, val_accuracy = _validation_figures(trained.module, X_val, y_val,
                                                             task, n_outputs)
                test = _test_metrics(task, y_test,
                                     _outputs(trained.module, X_test, task, n_outputs))
                reports.append(CandidateReport(
                    index=i + 1, params=_params(train_config, self.network),
                    epochs_run=trained.epochs_run, stopped=trained.stopped,
                    seconds=round(trained.seconds, 3), val_loss=val_loss,
                    val_accuracy=val_accuracy, test=test))
            # The choice uses the validation split only: the test split stays unseen by it.
            fallback = "rmse" if task == prepare.REGRESSION else "log_loss"
            best = min(range(len(reports)), key=lambda i: (
                reports[i].val_loss if reports[i].val_loss is not None
                else reports[i].test[fallback], i))
            reports[best].chosen = True
            metrics: dict[str, Any] = dict(reports[best].test)
            if task == prepare.REGRESSION:
                # What predicting without a model gives: the training split's mean.
                baseline = mean_predictor_rmse(y_test, float(np.mean(y_train)))
                metrics["baseline_rmse"] = baseline
            else:
                baseline = majority_rate(data.counts[prepare.TEST])
                metrics["baseline_accuracy"] = baseline
            active_metrics: dict[str, float] | None = None
            if config.compare_active and active.model is not None and (
                    prepared.X_raw_test is not None or active.model.task != task):
                raw_test = (prepared.X_raw_test if prepared.X_raw_test is not None
                            else np.empty((0, len(data.features))))
                active_metrics, comparison = _active_on_test(
                    active.model, list(data.features), data.classes, raw_test, y_test, task)
                if active_metrics is None:
                    unavailable = comparison
                    self.say(f"cannot compare with the active model {active.model.version}: "
                             f"{comparison}")
            decision = evaluate_policy(
                metrics, baseline, min_accuracy=config.min_accuracy, metric=data.metric,
                active_metrics=active_metrics if config.compare_active else None,
                active_version=active.version,
                tolerance=config.compare_tolerance,
                active_unavailable=unavailable if config.compare_active else None,
                task=task, active_task=active.task)
        if task == prepare.REGRESSION and config.min_accuracy:
            self.say("BATCH_MIN_ACCURACY applies to a classification only: not used")
        if len(reports) > 1:
            self.say(f"chose candidate {best + 1}/{len(reports)} (lowest validation loss)")
        self.say("test metrics: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                 if isinstance(v, float))
                 + f"; {decision.reason}")
        return _Evaluation(reports, best, results[best], metrics, decision, active_metrics)

    def _active_version(self, active: _Active) -> str | None:
        """The version serving now, whether or not it could be loaded to compare with."""
        return active.version if self.config.compare_active else None

    def result(self, data: _Data, prepared: _Prepared, active: _Active,
               evaluation: _Evaluation) -> JobResult:
        """The manifest of the chosen candidate (reference outputs from the serving code path
        itself) and the run's result, not published yet."""
        import torch

        from models.loaded import LoadedModel
        from models.manifest import CLASSIFICATION, REGRESSION, Manifest, Reference

        config, best, result = self.config, evaluation.best, evaluation.result
        decision, reports = evaluation.decision, evaluation.reports
        active_version = self._active_version(active)
        regression = data.task == prepare.REGRESSION
        training = {
            "data": self.data_uri, "id_col": config.id_col, "label_col": config.label_col,
            "rows": data.rows, "window_days": config.window_days,
            "task": data.task, "task_reason": data.task_reason, "metric": data.metric,
            **({"label_stats": data.label_stats, "target_mean": result.target_mean,
                "target_std": result.target_std} if regression else {
                "class_counts": {split: {str(c): n for c, n in sorted(cc.items())}
                                 for split, cc in data.counts.items()}}),
            "constant_features": prepared.constant,
            "network": self.network.factory,
            **({} if self.network.is_mlp else {"network_params": dict(self.network.params)}),
            "seed": config.seed, "test_fraction": config.test_fraction,
            "val_fraction": config.val_fraction, "epochs": self.configs[best].epochs,
            "epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
            "stopped": result.stopped, "batch_size": result.batch_size,
            "lr": self.configs[best].lr, "optimizer": "adam",
            "loss": "mse_standardised" if regression else "cross_entropy",
            "train_seconds": round(result.seconds, 3),
            "history": [{k: round(v, 6) for k, v in h.items()} for h in result.history],
            "fitted": {name: list(v) if isinstance(v, tuple) else v
                       for name, v in self.fitted.items()},
            "search": {"method": config.search, "candidates": len(reports),
                       "chosen": best + 1,
                       "results": [{"params": r.params, "val_loss": r.val_loss,
                                    "val_accuracy": r.val_accuracy, "test": r.test,
                                    "seconds": r.seconds} for r in reports]},
            "distributed_processes": config.distributed,
            "active_version": active_version,
            "active_metrics": evaluation.active_metrics, "policy": decision.reason,
            "torch": torch.__version__,
        }
        draft = Manifest.draft(
            name=self.model_name, features=list(data.features), classes=list(data.classes),
            preprocessing=prepared.preprocessor.to_dict(),
            architecture=result.architecture, metrics=evaluation.metrics,
            training=training, forced=not decision.accepted,
            task=REGRESSION if regression else CLASSIFICATION)
        candidate = LoadedModel(draft, result.module)
        draft.reference = Reference(
            inputs=prepared.reference_inputs.tolist(),
            outputs=candidate.outputs(prepared.reference_inputs).tolist(),
            atol=_REFERENCE_ATOL)
        return JobResult(
            published=False, decision=decision, forced=False, model_name=self.model_name,
            data_uri=self.data_uri, features=list(data.features), classes=list(data.classes),
            rows=data.rows, metrics=evaluation.metrics, training=training, manifest=draft,
            timings=self.stages.timings, candidates=reports, active_version=active_version,
            active_metrics=evaluation.active_metrics, constant_features=prepared.constant,
            arrays=prepared.arrays if config.keep_arrays else None, task=data.task,
            metric=data.metric)

    def publish(self, job: JobResult, module: Any, active: _Active) -> None:
        """Every file, then the manifest; the announcement on the update topic; old
        generations pruned. The run lock is read again before each of the three."""
        from batch.announce import announce

        config, registry, say = self.config, self.registry, self.say
        assert job.manifest is not None
        verify_lock = self.lock.check if self.lock is not None else None
        with self.stages.stage("publish"):
            try:
                job.ref = registry.publish(module, job.manifest, onnx=config.onnx,
                                           before_manifest=verify_lock)
            except ModelError as exc:
                raise StorageError(f"cannot publish {self.model_name}: {exc}") from exc
        job.published, job.forced = True, not job.decision.accepted
        say(f"published {job.ref.name}/{job.ref.version} at {job.ref.manifest_uri}")
        if config.announce:
            with self.stages.stage("announce"):
                if verify_lock is not None:
                    verify_lock()
                announce(self.settings, job.ref)
            say(f"announced MODEL-REF on {self.settings.updates_topic!r}")
        if config.keep_versions > 0:
            with self.stages.stage("prune"):
                # The new version becomes the active one once workers hear it; until then
                # the one serving now must stay too, as must a pinned one.
                protect = active.state.protected() | {job.ref.version}
                if verify_lock is not None:
                    verify_lock()
                try:
                    job.pruned = registry.prune(self.model_name, config.keep_versions, protect)
                except ModelError as exc:  # a leftover generation is no reason to fail
                    say(f"could not prune old versions: {exc}")
            if job.pruned:
                say(f"removed {len(job.pruned)} old version(s), keeping "
                    f"{config.keep_versions} and {sorted(protect - {job.ref.version})}: "
                    f"{job.pruned}")

    def stop(self) -> None:
        """Stop the Spark session if this run created it."""
        if self.own_session and self.spark is not None:
            self.spark.stop()


def _run_locked(settings: Settings, config: JobConfig, spark: "SparkSession | None",
                say: Progress, stages: _Stages, model_name: str,
                lock: "RegistryLock | None" = None) -> JobResult:
    """read -> clean and split -> active model -> preprocess -> train -> evaluate -> publish."""
    run = _Run(settings, config, spark, say, stages, model_name, lock)
    try:
        files, since = run.list_files()
        session = run.start()
        raw, features, rows_read = run.read(session, files, since)
        data = run.clean_and_split(raw, features, rows_read)
        active = run.active_model()
        prepared = run.preprocess(data, active)
        results = run.train(session, prepared, data)
        evaluation = run.evaluate(data, prepared, results, active)
        job = run.result(data, prepared, active, evaluation)
        if not evaluation.decision.accepted and not config.force:
            say(f"candidate rejected: {evaluation.decision.reason}")
            return job
        if not evaluation.decision.accepted:
            say("publishing anyway (--force); the manifest records \"forced\": true")
        run.publish(job, evaluation.result.module, active)
        return job
    finally:
        run.stop()


def _params(config: TrainConfig, network: Network = Network()) -> dict[str, Any]:
    """A candidate's hyper-parameters (``hidden`` and ``dropout`` only for the built-in
    MLP)."""
    sizing = ({"hidden": list(config.hidden), "dropout": config.dropout} if network.is_mlp
              else {})
    return {"lr": config.lr, **sizing, "epochs": config.epochs,
            "batch_size": config.batch_size}


def _metric_of(config: JobConfig, task: str, task_reason: str) -> str:
    """The metric compared with the active model: ``config.metric``, or for ``auto`` the
    task's default; one that does not apply to the task is a settings error."""
    if config.metric == "auto":
        return default_metric(task)
    if config.metric not in METRICS[task]:
        raise SettingsError(f"bad setting BATCH_METRIC={config.metric!r}: a {task} "
                            f"({task_reason}) is compared on {', '.join(METRICS[task])}")
    return config.metric


def _allowed_factories(settings: Settings, config: JobConfig) -> set[str]:
    """The model factories this run may build: the one it trains (``BATCH_MODEL``) and those
    the serving workers are allowed (``MODEL_FACTORIES``), so the active version loads here
    when it loads there."""
    allowed = set() if config.network == MLP_FACTORY else {config.network}
    allowed.update(settings.model_factories)
    return allowed


def _fitted_text(value: Any) -> str:
    """A fitted hyper-parameter as the run reports it (layer sizes as ``256-128``)."""
    if isinstance(value, tuple):
        return "-".join(str(v) for v in value)
    return str(value)
