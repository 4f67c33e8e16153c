"""Stratum's settings: one typed object, read from the environment once at start.

Every field is documented and has a default (docs/contract.md). A bad value stops start-up with a
:class:`SettingsError` naming the variable, never later with a confusing traceback.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, TypeVar
from urllib.parse import urlparse

__all__ = ["Settings", "SettingsError", "EMBEDDED_S3_ENDPOINT", "EMBEDDED_S3_CREDENTIALS"]

#: The embedded S3-API server's address and fixed credentials (s3rver's own defaults).
EMBEDDED_S3_ENDPOINT = "http://127.0.0.1:9000"
EMBEDDED_S3_CREDENTIALS = ("S3RVER", "S3RVER")

T = TypeVar("T")

#: Fields KAFKA_PREFIX is put in front of: every topic and consumer group derives from these.
PREFIXED_FIELDS = ("app_id", "events_topic", "predictions_topic", "dlq_topic", "updates_topic",
                   "metrics_topic")
#: Characters Kafka allows in a topic name.
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]*")


class SettingsError(ValueError):
    """A setting has a value Stratum cannot use; the message names the variable."""


def _env(name: str, help: str) -> Any:
    """Declare a field read from environment variable ``name``."""
    return {"env": name, "help": help}


@dataclass(frozen=True)
class Settings:
    """Everything a Stratum process can be told, with the defaults of docs/contract.md."""

    kafka_broker: str = field(default="kafka://127.0.0.1:9092", metadata=_env(
        "KAFKA_BROKER", "Kafka bootstrap servers, `kafka://host:port[;host:port]`."))
    s3_endpoint_url: str | None = field(default=EMBEDDED_S3_ENDPOINT, metadata=_env(
        "S3_ENDPOINT_URL", "S3-API endpoint; set it empty to use real AWS S3."))
    aws_access_key_id: str | None = field(default=None, metadata=_env(
        "AWS_ACCESS_KEY_ID", "S3 access key; unset: the standard AWS credential chain "
        "(S3RVER at the embedded server's default endpoint)."))
    aws_secret_access_key: str | None = field(default=None, repr=False, metadata=_env(
        "AWS_SECRET_ACCESS_KEY", "S3 secret key; unset: the standard AWS credential chain "
        "(S3RVER at the embedded server's default endpoint)."))
    lake_uri: str = field(default="s3://stratum/lake/events", metadata=_env(
        "LAKE_URI", "Where archived input lives as Parquet (dt=/hour= partitions)."))
    registry_uri: str = field(default="s3://stratum/models", metadata=_env(
        "REGISTRY_URI", "Model registry root: <model>/<version>/manifest.json + weights."))
    model_name: str = field(default="default", metadata=_env(
        "MODEL_NAME", "Which registry model this worker serves."))
    web_bind: str = field(default="127.0.0.1", metadata=_env(
        "WEB_BIND", "Address the worker's web server binds."))
    web_port: int = field(default=6066, metadata=_env(
        "WEB_PORT", "Port of the worker's web server."))
    web_advertised_url: str | None = field(default=None, metadata=_env(
        "WEB_ADVERTISED_URL",
        "URL the other workers reach this one at (default http://WEB_BIND:WEB_PORT, and "
        "http://127.0.0.1:WEB_PORT when bound to every address)."))
    admin_token: str | None = field(default=None, repr=False, metadata=_env(
        "ADMIN_TOKEN", "Bearer token for admin endpoints; unset disables them."))
    batch_cron: str = field(default="0 2 * * *", metadata=_env(
        "BATCH_CRON", "When `python -m batch schedule` rebuilds the model (cron syntax)."))
    app_id: str = field(default="stratum", metadata=_env(
        "STRATUM_APP_ID", "Faust application id: consumer group and changelog prefix."))
    data_dir: str = field(default=".stratum", metadata=_env(
        "STRATUM_DATA_DIR", "Local directory for worker state (table caches)."))
    events_topic: str = field(default="events", metadata=_env(
        "EVENTS_TOPIC", "Input topic."))
    predictions_topic: str = field(default="predictions", metadata=_env(
        "PREDICTIONS_TOPIC", "Output topic of predictions."))
    dlq_topic: str = field(default="events-dlq", metadata=_env(
        "DLQ_TOPIC", "Dead-letter topic for input that cannot be served."))
    updates_topic: str = field(default="model-updates", metadata=_env(
        "UPDATES_TOPIC", "Model update topic (MODEL-REF and UP messages)."))
    metrics_topic: str = field(default="metrics", metadata=_env(
        "METRICS_TOPIC", "Topic where runtime metrics are broadcast."))
    kafka_prefix: str = field(default="", metadata=_env(
        "KAFKA_PREFIX", "Put before every topic name and STRATUM_APP_ID (so before every "
        "consumer group and changelog), so that several deployments share one cluster."))
    topic_partitions: int = field(default=4, metadata=_env(
        "TOPIC_PARTITIONS", "Partitions of the events and predictions topics when created."))
    topic_replication_factor: int = field(default=1, metadata=_env(
        "TOPIC_REPLICATION_FACTOR",
        "Replicas of every topic and changelog Stratum creates (3 on a production cluster)."))
    topic_min_insync_replicas: int = field(default=0, metadata=_env(
        "TOPIC_MIN_INSYNC_REPLICAS",
        "min.insync.replicas of the topics Stratum creates; 0 keeps the broker's default."))
    worker_session_timeout_s: float = field(default=60.0, metadata=_env(
        "WORKER_SESSION_TIMEOUT_S",
        "How long the group waits for a silent worker (crashed, frozen, cut off) before its "
        "partitions go to the others; a shorter one fails over sooner."))
    serving_batch_size: int = field(default=512, metadata=_env(
        "SERVING_BATCH_SIZE", "Largest micro-batch the serving path scores at once."))
    serving_batch_ms: int = field(default=20, metadata=_env(
        "SERVING_BATCH_MS", "Longest a micro-batch waits to fill, in milliseconds."))
    archive: int = field(default=1, metadata=_env(
        "ARCHIVE", "1: workers archive valid input events to LAKE_URI as Parquet; 0: off."))
    archive_flush_s: float = field(default=60.0, metadata=_env(
        "ARCHIVE_FLUSH_S", "Longest an archived event waits in memory before its file is written."))
    archive_max_rows: int = field(default=100000, metadata=_env(
        "ARCHIVE_MAX_ROWS", "Most events of one input partition per archive file."))
    metrics_interval_s: float = field(default=10.0, metadata=_env(
        "METRICS_INTERVAL_S", "Seconds between broadcasts on the metrics topic."))
    latest_retention_s: int = field(default=900, metadata=_env(
        "LATEST_RETENTION_S",
        "How long the latest-prediction table keeps a row (store and changelog)."))
    torch_threads: int = field(default=1, metadata=_env(
        "TORCH_THREADS", "Threads torch may use for scoring."))
    # ---- speed layer (speed/agent.py): incremental output-layer updates between rebuilds.
    speed_layer: int = field(default=1, metadata=_env(
        "SPEED_LAYER", "1: learn from labelled events and publish UP updates; 0: off."))
    speed_window_s: float = field(default=5.0, metadata=_env(
        "SPEED_WINDOW_S", "Seconds between two speed-layer updates (when enough is new)."))
    speed_buffer: int = field(default=3000, metadata=_env(
        "SPEED_BUFFER", "Most recent labelled examples the speed layer learns from."))
    speed_half_life: float = field(default=500.0, metadata=_env(
        "SPEED_HALF_LIFE", "Recency half-life of an example's weight, in examples."))
    speed_min_examples: int = field(default=100, metadata=_env(
        "SPEED_MIN_EXAMPLES", "New labelled examples needed before the next update."))
    # ---- batch layer (python -m batch); hyper-parameters accept a value, alternatives
    # separated by '|' (e.g. "64,32|128") or a range "low:high", searched over by candidates.
    batch_epochs: str = field(default="3", metadata=_env(
        "BATCH_EPOCHS", "Maximum training epochs (or alternatives/range to search)."))
    batch_hidden: str = field(default="500,1000,500", metadata=_env(
        "BATCH_HIDDEN", "Hidden layer sizes, e.g. 500,1000,500 (alternatives with '|')."))
    batch_dropout: str = field(default="0.4", metadata=_env(
        "BATCH_DROPOUT", "Dropout (or alternatives/range to search)."))
    batch_batch_size: str = field(default="512", metadata=_env(
        "BATCH_BATCH_SIZE", "Mini-batch rows (or alternatives/range to search)."))
    batch_lr: str = field(default="0.001", metadata=_env(
        "BATCH_LR", "Adam learning rate (or alternatives/range, searched log-uniformly)."))
    batch_seed: int = field(default=0, metadata=_env(
        "BATCH_SEED", "Seed of the split, the search, initialisation and shuffling."))
    batch_max_train_seconds: float = field(default=0.0, metadata=_env(
        "BATCH_MAX_TRAIN_SECONDS", "Training time budget per candidate; 0 = none."))
    batch_threads: int = field(default=2, metadata=_env(
        "BATCH_THREADS", "torch threads the batch job may use in all."))
    batch_candidates: int = field(default=1, metadata=_env(
        "BATCH_CANDIDATES", "Hyper-parameter candidates to train and compare."))
    batch_search: str = field(default="random", metadata=_env(
        "BATCH_SEARCH", "Hyper-parameter search: random or grid."))
    batch_parallelism: int = field(default=0, metadata=_env(
        "BATCH_PARALLELISM", "Candidates trained at once; 0 = as many as the threads allow."))
    batch_test_fraction: float = field(default=0.2, metadata=_env(
        "BATCH_TEST_FRACTION", "Share of the rows held out for the test metrics."))
    batch_val_fraction: float = field(default=0.1, metadata=_env(
        "BATCH_VAL_FRACTION", "Share of the rows for early stopping and candidate choice."))
    batch_patience: int = field(default=2, metadata=_env(
        "BATCH_PATIENCE", "Epochs without a better validation loss before stopping; 0 = never."))
    batch_window_days: int = field(default=0, metadata=_env(
        "BATCH_WINDOW_DAYS", "Train on the last N days of the lake only; 0 = all history."))
    batch_id_col: str = field(default="id", metadata=_env(
        "BATCH_ID_COL", "Id column of the batch input."))
    batch_label_col: str = field(default="label", metadata=_env(
        "BATCH_LABEL_COL", "Label column of the batch input."))
    batch_metric: str = field(default="accuracy", metadata=_env(
        "BATCH_METRIC", "Test metric a candidate is compared on: accuracy, auc or log_loss."))
    batch_min_accuracy: float = field(default=0.0, metadata=_env(
        "BATCH_MIN_ACCURACY", "Least test accuracy to publish (the majority rate always applies)."))
    batch_compare_active: int = field(default=1, metadata=_env(
        "BATCH_COMPARE_ACTIVE", "1: publish only if not worse than the active model; 0: skip."))
    batch_compare_tolerance: float = field(default=0.0, metadata=_env(
        "BATCH_COMPARE_TOLERANCE", "How much worse than the active model still counts as not worse."))
    batch_keep_versions: int = field(default=5, metadata=_env(
        "BATCH_KEEP_VERSIONS", "Model generations kept in the registry; 0 = keep all."))
    batch_lock_ttl_s: int = field(default=3600, metadata=_env(
        "BATCH_LOCK_TTL_S", "Expiry of the registry lock of a run (renewed while it runs)."))
    batch_distributed: int = field(default=0, metadata=_env(
        "BATCH_DISTRIBUTED", "Train with TorchDistributor on this many Spark tasks; 0 = driver."))
    batch_demo_rows: int = field(default=100000, metadata=_env(
        "BATCH_DEMO_ROWS", "Rows of demo data the bootstrap writes into an empty lake."))
    spark_master: str = field(default="local[2]", metadata=_env(
        "SPARK_MASTER", "Spark master URL of the batch job."))
    spark_driver_memory: str = field(default="1g", metadata=_env(
        "SPARK_DRIVER_MEMORY", "Driver heap of the batch job's Spark session."))
    spark_driver_host: str | None = field(default=None, metadata=_env(
        "SPARK_DRIVER_HOST", "Address Spark executors reach the batch job's driver at "
        "(default SPARK_LOCAL_IP, else 127.0.0.1); on a cluster, this host's routable address."))
    spark_driver_bind: str | None = field(default=None, metadata=_env(
        "SPARK_DRIVER_BIND", "Address the batch job's driver listens on (default "
        "SPARK_DRIVER_HOST; 0.0.0.0 for every interface)."))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        """Build settings from ``environ`` (default ``os.environ``), validating every value."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            name = f.metadata["env"]
            if name not in environ:
                continue
            raw = environ[name]
            values[f.name] = _convert(name, raw, f.type)
        prefix = values.get("kafka_prefix", "")
        if prefix:
            defaults = {f.name: f.default for f in dataclasses.fields(cls)}
            for name in PREFIXED_FIELDS:
                values[name] = prefix + values.get(name, defaults[name])
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise :class:`SettingsError` naming the first setting that cannot work."""
        _check(bool(self.broker_servers()), "KAFKA_BROKER", self.kafka_broker,
               "expected kafka://host:port")
        for host_port in self.broker_servers():
            host, _, port = host_port.rpartition(":")
            _check(bool(host) and port.isdigit(), "KAFKA_BROKER", self.kafka_broker,
                   "expected kafka://host:port")
        if self.web_advertised_url is not None:
            parsed = urlparse(self.web_advertised_url)
            _check(parsed.scheme in ("http", "https") and bool(parsed.hostname),
                   "WEB_ADVERTISED_URL", self.web_advertised_url, "expected http(s)://host:port")
        if self.s3_endpoint_url is not None:
            parsed = urlparse(self.s3_endpoint_url)
            _check(parsed.scheme in ("http", "https") and bool(parsed.netloc),
                   "S3_ENDPOINT_URL", self.s3_endpoint_url, "expected http(s)://host:port")
        for env, uri in (("LAKE_URI", self.lake_uri), ("REGISTRY_URI", self.registry_uri)):
            parsed = urlparse(uri)
            _check(parsed.scheme in ("s3", "file") and bool(parsed.netloc or parsed.path),
                   env, uri, "expected s3://bucket/prefix or file:///path")
        _check(_TOPIC_NAME.fullmatch(self.kafka_prefix) is not None, "KAFKA_PREFIX",
               self.kafka_prefix, "expected letters, digits, '.', '_' or '-'")
        for name in PREFIXED_FIELDS:
            value = getattr(self, name)
            _check(bool(value) and len(value) <= 200 and _TOPIC_NAME.fullmatch(value) is not None,
                   _env_name(name), value, "expected 1-200 letters, digits, '.', '_' or '-'")
        _check(1 <= self.web_port <= 65535, "WEB_PORT", self.web_port, "expected 1-65535")
        _check(self.topic_partitions >= 1, "TOPIC_PARTITIONS", self.topic_partitions,
               "expected a positive integer")
        _check(self.topic_replication_factor >= 1, "TOPIC_REPLICATION_FACTOR",
               self.topic_replication_factor, "expected a positive integer")
        _check(0 <= self.topic_min_insync_replicas <= self.topic_replication_factor,
               "TOPIC_MIN_INSYNC_REPLICAS", self.topic_min_insync_replicas,
               "expected 0 (the broker's default) up to TOPIC_REPLICATION_FACTOR")
        # Faust heartbeats every 3 s; the broker allows 6 s to 30 min by default.
        _check(10 <= self.worker_session_timeout_s <= 1800, "WORKER_SESSION_TIMEOUT_S",
               self.worker_session_timeout_s, "expected seconds from 10 to 1800")
        _check(self.serving_batch_size >= 1, "SERVING_BATCH_SIZE", self.serving_batch_size,
               "expected a positive integer")
        _check(self.serving_batch_ms >= 0, "SERVING_BATCH_MS", self.serving_batch_ms,
               "expected milliseconds >= 0")
        _check(self.archive in (0, 1), "ARCHIVE", self.archive, "expected 0 or 1")
        _check(self.archive_flush_s > 0, "ARCHIVE_FLUSH_S", self.archive_flush_s,
               "expected seconds > 0")
        _check(self.archive_max_rows >= 1, "ARCHIVE_MAX_ROWS", self.archive_max_rows,
               "expected a positive integer")
        _check(self.metrics_interval_s > 0, "METRICS_INTERVAL_S", self.metrics_interval_s,
               "expected seconds > 0")
        _check(self.latest_retention_s >= 5, "LATEST_RETENTION_S", self.latest_retention_s,
               "expected seconds >= 5")
        _check(self.torch_threads >= 1, "TORCH_THREADS", self.torch_threads,
               "expected a positive integer")
        _check(self.speed_layer in (0, 1), "SPEED_LAYER", self.speed_layer, "expected 0 or 1")
        _check(self.speed_window_s > 0, "SPEED_WINDOW_S", self.speed_window_s,
               "expected seconds > 0")
        _check(self.speed_buffer >= 1, "SPEED_BUFFER", self.speed_buffer,
               "expected a positive integer")
        _check(self.speed_half_life > 0, "SPEED_HALF_LIFE", self.speed_half_life,
               "expected a number of examples > 0")
        _check(self.speed_min_examples >= 1, "SPEED_MIN_EXAMPLES", self.speed_min_examples,
               "expected a positive integer")
        for env, value, least in (
                ("BATCH_SEED", self.batch_seed, 0), ("BATCH_THREADS", self.batch_threads, 1),
                ("BATCH_CANDIDATES", self.batch_candidates, 1),
                ("BATCH_PARALLELISM", self.batch_parallelism, 0),
                ("BATCH_PATIENCE", self.batch_patience, 0),
                ("BATCH_WINDOW_DAYS", self.batch_window_days, 0),
                ("BATCH_KEEP_VERSIONS", self.batch_keep_versions, 0),
                ("BATCH_LOCK_TTL_S", self.batch_lock_ttl_s, 30),
                ("BATCH_DISTRIBUTED", self.batch_distributed, 0),
                ("BATCH_DEMO_ROWS", self.batch_demo_rows, 1)):
            _check(value >= least, env, value, f"expected an integer >= {least}")
        _check(self.batch_max_train_seconds >= 0, "BATCH_MAX_TRAIN_SECONDS",
               self.batch_max_train_seconds, "expected seconds >= 0 (0 = no budget)")
        _check(self.batch_search in ("random", "grid"), "BATCH_SEARCH", self.batch_search,
               "expected random or grid")
        _check(0 < self.batch_test_fraction < 1, "BATCH_TEST_FRACTION",
               self.batch_test_fraction, "expected a fraction in (0, 1)")
        _check(0 <= self.batch_val_fraction < 1 - self.batch_test_fraction,
               "BATCH_VAL_FRACTION", self.batch_val_fraction,
               "expected a fraction >= 0 that leaves rows to train on with BATCH_TEST_FRACTION")
        _check(self.batch_metric in ("accuracy", "auc", "log_loss"), "BATCH_METRIC",
               self.batch_metric, "expected accuracy, auc or log_loss")
        _check(0 <= self.batch_min_accuracy <= 1, "BATCH_MIN_ACCURACY",
               self.batch_min_accuracy, "expected a number in [0, 1]")
        _check(self.batch_compare_active in (0, 1), "BATCH_COMPARE_ACTIVE",
               self.batch_compare_active, "expected 0 or 1")
        _check(self.batch_compare_tolerance >= 0, "BATCH_COMPARE_TOLERANCE",
               self.batch_compare_tolerance, "expected a number >= 0")
        for env, value in (("BATCH_ID_COL", self.batch_id_col),
                           ("BATCH_LABEL_COL", self.batch_label_col)):
            _check(bool(value.strip()), env, value, "expected a column name")
        _check(self.admin_token is None or len(self.admin_token) >= 8, "ADMIN_TOKEN",
               "<hidden>", "expected at least 8 characters")
        _check(bool(self.model_name) and "/" not in self.model_name, "MODEL_NAME",
               self.model_name, "expected a name without '/'")
        try:
            from croniter import croniter
        except ImportError:  # pragma: no cover - croniter is a dependency
            pass
        else:
            _check(croniter.is_valid(self.batch_cron), "BATCH_CRON", self.batch_cron,
                   "expected a cron expression such as '0 2 * * *'")

    def broker_servers(self) -> list[str]:
        """``host:port`` strings of the bootstrap servers, for non-Faust clients."""
        servers = []
        for part in self.kafka_broker.replace(",", ";").split(";"):
            part = part.strip()
            if part.startswith("kafka://"):
                part = part[len("kafka://"):]
            if part:
                servers.append(part)
        return servers

    @property
    def bootstrap_servers(self) -> str:
        """Comma-separated bootstrap list as aiokafka expects it."""
        return ",".join(self.broker_servers())

    @property
    def advertised_url(self) -> str:
        """The URL the other workers reach this one's web server at."""
        if self.web_advertised_url:
            return self.web_advertised_url.rstrip("/")
        host = "127.0.0.1" if self.web_bind in ("0.0.0.0", "::") else self.web_bind
        return f"http://{host}:{self.web_port}"

    @property
    def storage_options(self) -> dict[str, Any]:
        """Keyword arguments for ``s3fs.S3FileSystem`` / fsspec on the lake and registry."""
        key, secret = self.aws_access_key_id, self.aws_secret_access_key
        # Without keys, botocore's chain (environment, config files, instance role) decides;
        # only the embedded server at its default address gets its fixed credentials.
        if self.s3_endpoint_url == EMBEDDED_S3_ENDPOINT and key is None and secret is None:
            key, secret = EMBEDDED_S3_CREDENTIALS
        options: dict[str, Any] = {}
        if key is not None:
            options["key"] = key
        if secret is not None:
            options["secret"] = secret
        if self.s3_endpoint_url is not None:
            options["client_kwargs"] = {"endpoint_url": self.s3_endpoint_url}
        return options

    @classmethod
    def describe(cls) -> str:
        """One line per setting: variable, default and meaning (for README and --help)."""
        lines = []
        for f in dataclasses.fields(cls):
            lines.append(f"{f.metadata['env']:<24} {f.default!s:<28} {f.metadata['help']}")
        return "\n".join(lines)


def _env_name(field_name: str) -> str:
    """The environment variable of a settings field."""
    return str(next(f.metadata["env"] for f in dataclasses.fields(Settings)
                    if f.name == field_name))


def _check(ok: bool, env: str, value: Any, expected: str) -> None:
    if not ok:
        raise SettingsError(f"bad setting {env}={value!r}: {expected}")


def _convert(env: str, raw: str, type_name: Any) -> Any:
    type_name = str(type_name)
    converters: dict[str, Callable[[str], Any]] = {"int": int, "float": float}
    if type_name.startswith("str | None"):
        return raw or None
    for prefix, conv in converters.items():
        if type_name == prefix:
            try:
                return conv(raw.strip())
            except ValueError:
                raise SettingsError(
                    f"bad setting {env}={raw!r}: expected {'an integer' if prefix == 'int' else 'a number'}"
                ) from None
    return raw
