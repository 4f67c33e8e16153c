"""Stratum's settings: one typed object, read from the environment once at start.

Every field is documented and has a default (docs/contract.md). A bad value stops start-up with a
:class:`SettingsError` naming the variable, never later with a confusing traceback.

The fields are declared by layer (:class:`KafkaSettings`, :class:`StorageSettings`,
:class:`ServingSettings`, :class:`SpeedSettings`, :class:`ArchiveSettings`,
:class:`BatchSettings`, :class:`SparkSettings`), each with the checks of its own values;
:class:`Settings` inherits them all, so the code reads ``settings.kafka_broker`` whatever the
layer. Each field's ``validation_alias`` is its environment variable, its ``description`` its
meaning.
"""
from __future__ import annotations

import functools
import os
import re
import types
from typing import Any, ClassVar, Mapping, Union, get_args, get_origin
from urllib.parse import urlparse

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

__all__ = ["Settings", "SettingsError", "EMBEDDED_S3_ENDPOINT", "EMBEDDED_S3_CREDENTIALS",
           "KafkaSettings", "StorageSettings", "ServingSettings", "SpeedSettings",
           "ArchiveSettings", "BatchSettings", "SparkSettings", "SECTIONS", "env_name"]

#: The embedded S3-API server's address and fixed credentials (s3rver's own defaults).
EMBEDDED_S3_ENDPOINT = "http://127.0.0.1:9000"
EMBEDDED_S3_CREDENTIALS = ("S3RVER", "S3RVER")

#: Fields KAFKA_PREFIX is put in front of: every topic and consumer group derives from these.
PREFIXED_FIELDS = ("app_id", "events_topic", "predictions_topic", "dlq_topic", "updates_topic",
                   "metrics_topic")
#: Characters Kafka allows in a topic name.
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]*")
#: How an integer setting is written: digits, optionally signed (``10``, not ``10.0``).
_INTEGER = re.compile(r"\s*[-+]?[0-9]+\s*")
#: How an on/off setting is written, in any case.
_SWITCH = {"1": True, "true": True, "yes": True, "on": True,
           "0": False, "false": False, "no": False, "off": False}
_SWITCH_EXPECTED = "expected true or false (1/0, yes/no, on/off)"


class SettingsError(ValueError):
    """A setting has a value Stratum cannot use; the message names the variable."""


def _setting(default: Any, env: str, help: str, *, secret: bool = False) -> Any:
    """Declare a field read from environment variable ``env``, meaning ``help``."""
    return Field(default, validation_alias=env, description=help, repr=not secret)


def _check(ok: bool, expected: str) -> None:
    """A field check: pydantic reports the failure with the variable and the value given."""
    if not ok:
        raise ValueError(expected)


def _admits(annotation: Any, kind: type) -> bool:
    """Whether a field's type is ``kind`` or a union with it (``int | None``)."""
    if get_origin(annotation) in (Union, types.UnionType):
        return kind in get_args(annotation)
    return annotation is kind


class _Section(BaseSettings):
    """What every group of settings shares: frozen, built from given values only (see
    :meth:`Settings.from_env`), unknown names ignored, and the text conventions of the
    environment. Validator names are unique across the sections: :class:`Settings` inherits
    them all, and one of the same name would hide another."""

    # The defaults are valid as declared: only given values are checked.
    model_config = SettingsConfigDict(frozen=True, extra="ignore", validate_by_name=True,
                                      validate_by_alias=True, validate_default=False)

    @classmethod
    def settings_customise_sources(
            cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Only what the constructor is given: Settings.from_env reads the environment.
        return (init_settings,)

    @field_validator("*", mode="before")
    @classmethod
    def _from_text(cls, value: Any, info: ValidationInfo) -> Any:
        """An environment value as text: empty means unset where a field may be unset,
        on/off words for booleans, digits only for integers; pydantic converts the rest."""
        if not isinstance(value, str) or info.field_name is None:
            return value
        optional, boolean, integer = _kinds(cls)[info.field_name]
        if value == "" and optional:
            return None
        if boolean:
            switch = _SWITCH.get(value.strip().lower())
            _check(switch is not None, _SWITCH_EXPECTED)
            return switch
        if integer:
            _check(_INTEGER.fullmatch(value) is not None, "expected an integer")
            return value.strip()
        return value


class KafkaSettings(_Section):
    """Kafka and topics."""

    kafka_broker: str = _setting(
        "kafka://127.0.0.1:9092", "KAFKA_BROKER",
        "Kafka bootstrap servers, `kafka://host:port[;host:port]`.")
    app_id: str = _setting(
        "stratum", "STRATUM_APP_ID",
        "Faust application id: consumer group and changelog prefix.")
    events_topic: str = _setting("events", "EVENTS_TOPIC", "Input topic.")
    predictions_topic: str = _setting(
        "predictions", "PREDICTIONS_TOPIC", "Output topic of predictions.")
    dlq_topic: str = _setting(
        "events-dlq", "DLQ_TOPIC", "Dead-letter topic for input that cannot be served.")
    updates_topic: str = _setting(
        "model-updates", "UPDATES_TOPIC", "Model update topic (MODEL-REF and UP messages).")
    metrics_topic: str = _setting(
        "metrics", "METRICS_TOPIC", "Topic where runtime metrics are broadcast.")
    kafka_prefix: str = _setting(
        "", "KAFKA_PREFIX", "Put before every topic name and STRATUM_APP_ID (so before every "
        "consumer group and changelog), so that several deployments share one cluster.")
    topic_partitions: int = _setting(
        4, "TOPIC_PARTITIONS", "Partitions of the events and predictions topics when created.")
    topic_replication_factor: int = _setting(
        1, "TOPIC_REPLICATION_FACTOR",
        "Replicas of every topic and changelog Stratum creates (3 on a production cluster).")
    topic_min_insync_replicas: int = _setting(
        0, "TOPIC_MIN_INSYNC_REPLICAS",
        "min.insync.replicas of the topics Stratum creates; 0 keeps the broker's default.")
    worker_session_timeout_s: float = _setting(
        60.0, "WORKER_SESSION_TIMEOUT_S",
        "How long the group waits for a silent worker (crashed, frozen, cut off) before its "
        "partitions go to the others; a shorter one fails over sooner.")

    @model_validator(mode="before")
    @classmethod
    def _apply_prefix(cls, data: Any) -> Any:
        """KAFKA_PREFIX goes before the topic names and the app id the environment gives (or
        their defaults). Values given by field name (copies, see :meth:`Settings.replace`) are
        final and never prefixed again."""
        if not isinstance(data, dict):
            return data
        envs = _env_names(cls)
        prefix = data.get(envs["kafka_prefix"])
        if not isinstance(prefix, str) or not prefix or not _TOPIC_NAME.fullmatch(prefix):
            return data  # no prefix, or a bad one that KAFKA_PREFIX's own check reports
        data = dict(data)
        for name in PREFIXED_FIELDS:
            env = envs[name]
            value = data.get(env, cls.model_fields[name].default)
            if isinstance(value, str):
                data[env] = prefix + value
        return data

    @field_validator("kafka_broker")
    @classmethod
    def _broker(cls, value: str) -> str:
        servers = _broker_servers(value)
        _check(bool(servers), "expected kafka://host:port")
        for host_port in servers:
            host, _, port = host_port.rpartition(":")
            _check(bool(host) and port.isdigit(), "expected kafka://host:port")
        return value

    @field_validator("kafka_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        _check(_TOPIC_NAME.fullmatch(value) is not None,
               "expected letters, digits, '.', '_' or '-'")
        return value

    @field_validator(*PREFIXED_FIELDS)
    @classmethod
    def _topic_name(cls, value: str) -> str:
        _check(bool(value) and len(value) <= 200 and _TOPIC_NAME.fullmatch(value) is not None,
               "expected 1-200 letters, digits, '.', '_' or '-'")
        return value

    @field_validator("topic_partitions", "topic_replication_factor")
    @classmethod
    def _kafka_counts(cls, value: int) -> int:
        _check(value >= 1, "expected a positive integer")
        return value

    @field_validator("worker_session_timeout_s")
    @classmethod
    def _session_timeout(cls, value: float) -> float:
        # Faust heartbeats every 3 s; the broker allows 6 s to 30 min by default.
        _check(10 <= value <= 1800, "expected seconds from 10 to 1800")
        return value

    @model_validator(mode="after")
    def _min_insync_replicas(self) -> "KafkaSettings":
        if not 0 <= self.topic_min_insync_replicas <= self.topic_replication_factor:
            raise _error("TOPIC_MIN_INSYNC_REPLICAS", self.topic_min_insync_replicas,
                         "expected 0 (the broker's default) up to TOPIC_REPLICATION_FACTOR")
        return self

    def broker_servers(self) -> list[str]:
        """``host:port`` strings of the bootstrap servers, for non-Faust clients."""
        return _broker_servers(self.kafka_broker)

    @property
    def bootstrap_servers(self) -> str:
        """Comma-separated bootstrap list as aiokafka expects it."""
        return ",".join(self.broker_servers())


class StorageSettings(_Section):
    """S3, lake and registry."""

    s3_endpoint_url: str | None = _setting(
        EMBEDDED_S3_ENDPOINT, "S3_ENDPOINT_URL",
        "S3-API endpoint; set it empty to use real AWS S3.")
    aws_access_key_id: str | None = _setting(
        None, "AWS_ACCESS_KEY_ID", "S3 access key; unset: the standard AWS credential chain "
        "(S3RVER at the embedded server's default endpoint).")
    aws_secret_access_key: str | None = _setting(
        None, "AWS_SECRET_ACCESS_KEY", "S3 secret key; unset: the standard AWS credential "
        "chain (S3RVER at the embedded server's default endpoint).", secret=True)
    lake_uri: str = _setting(
        "s3://stratum/lake/events", "LAKE_URI",
        "Where archived input lives as Parquet (dt=/hour= partitions).")
    registry_uri: str = _setting(
        "s3://stratum/models", "REGISTRY_URI",
        "Model registry root: <model>/<version>/manifest.json + weights.")

    @field_validator("s3_endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None:
            parsed = urlparse(value)
            _check(parsed.scheme in ("http", "https") and bool(parsed.netloc),
                   "expected http(s)://host:port")
        return value

    @field_validator("lake_uri", "registry_uri")
    @classmethod
    def _store_uri(cls, value: str) -> str:
        parsed = urlparse(value)
        _check(parsed.scheme in ("s3", "file") and bool(parsed.netloc or parsed.path),
               "expected s3://bucket/prefix or file:///path")
        return value

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


class ServingSettings(_Section):
    """Serving and web."""

    model_name: str = _setting(
        "default", "MODEL_NAME", "Which registry model this worker serves.")
    web_bind: str = _setting("127.0.0.1", "WEB_BIND", "Address the worker's web server binds.")
    web_port: int = _setting(6066, "WEB_PORT", "Port of the worker's web server.")
    web_advertised_url: str | None = _setting(
        None, "WEB_ADVERTISED_URL",
        "URL the other workers reach this one at (default http://WEB_BIND:WEB_PORT, and "
        "http://127.0.0.1:WEB_PORT when bound to every address).")
    admin_token: str | None = _setting(
        None, "ADMIN_TOKEN", "Bearer token for admin endpoints; unset disables them.",
        secret=True)
    data_dir: str = _setting(
        ".stratum", "STRATUM_DATA_DIR", "Local directory for worker state (table caches).")
    serving_batch_size: int = _setting(
        512, "SERVING_BATCH_SIZE", "Largest micro-batch the serving path scores at once.")
    serving_batch_ms: int = _setting(
        20, "SERVING_BATCH_MS", "Longest a micro-batch waits to fill, in milliseconds.")
    torch_threads: int = _setting(1, "TORCH_THREADS", "Threads torch may use for scoring.")
    latest_retention_s: int = _setting(
        900, "LATEST_RETENTION_S",
        "How long the latest-prediction table keeps a row (store and changelog).")
    metrics_interval_s: float = _setting(
        10.0, "METRICS_INTERVAL_S", "Seconds between broadcasts on the metrics topic.")

    @field_validator("model_name")
    @classmethod
    def _model_name(cls, value: str) -> str:
        _check(bool(value) and "/" not in value, "expected a name without '/'")
        return value

    @field_validator("web_port")
    @classmethod
    def _port(cls, value: int) -> int:
        _check(1 <= value <= 65535, "expected 1-65535")
        return value

    @field_validator("web_advertised_url")
    @classmethod
    def _advertised(cls, value: str | None) -> str | None:
        if value is not None:
            parsed = urlparse(value)
            _check(parsed.scheme in ("http", "https") and bool(parsed.hostname),
                   "expected http(s)://host:port")
        return value

    @field_validator("admin_token")
    @classmethod
    def _token(cls, value: str | None) -> str | None:
        _check(value is None or len(value) >= 8, "expected at least 8 characters")
        return value

    @field_validator("serving_batch_size", "torch_threads")
    @classmethod
    def _serving_counts(cls, value: int) -> int:
        _check(value >= 1, "expected a positive integer")
        return value

    @field_validator("serving_batch_ms")
    @classmethod
    def _wait(cls, value: int) -> int:
        _check(value >= 0, "expected milliseconds >= 0")
        return value

    @field_validator("latest_retention_s")
    @classmethod
    def _retention(cls, value: int) -> int:
        _check(value >= 5, "expected seconds >= 5")
        return value

    @field_validator("metrics_interval_s")
    @classmethod
    def _interval(cls, value: float) -> float:
        _check(value > 0, "expected seconds > 0")
        return value

    @property
    def advertised_url(self) -> str:
        """The URL the other workers reach this one's web server at."""
        if self.web_advertised_url:
            return self.web_advertised_url.rstrip("/")
        host = "127.0.0.1" if self.web_bind in ("0.0.0.0", "::") else self.web_bind
        return f"http://{host}:{self.web_port}"


class SpeedSettings(_Section):
    """Speed layer (speed/agent.py): incremental output-layer updates between rebuilds."""

    speed_layer: bool = _setting(
        True, "SPEED_LAYER", "On: learn from labelled events and publish UP updates.")
    speed_window_s: float = _setting(
        5.0, "SPEED_WINDOW_S", "Seconds between two speed-layer updates (when enough is new).")
    speed_buffer: int = _setting(
        3000, "SPEED_BUFFER", "Most recent labelled examples the speed layer learns from.")
    speed_half_life: float = _setting(
        500.0, "SPEED_HALF_LIFE", "Recency half-life of an example's weight, in examples.")
    speed_min_examples: int = _setting(
        100, "SPEED_MIN_EXAMPLES", "New labelled examples needed before the next update.")

    @field_validator("speed_window_s")
    @classmethod
    def _window(cls, value: float) -> float:
        _check(value > 0, "expected seconds > 0")
        return value

    @field_validator("speed_buffer", "speed_min_examples")
    @classmethod
    def _speed_counts(cls, value: int) -> int:
        _check(value >= 1, "expected a positive integer")
        return value

    @field_validator("speed_half_life")
    @classmethod
    def _half_life(cls, value: float) -> float:
        _check(value > 0, "expected a number of examples > 0")
        return value


class ArchiveSettings(_Section):
    """Archive of the input stream to the lake (lake/archive.py)."""

    archive: bool = _setting(
        True, "ARCHIVE", "On: workers archive valid input events to LAKE_URI as Parquet.")
    archive_flush_s: float = _setting(
        60.0, "ARCHIVE_FLUSH_S",
        "Longest an archived event waits in memory before its file is written.")
    archive_max_rows: int = _setting(
        100000, "ARCHIVE_MAX_ROWS", "Most events of one input partition per archive file.")

    @field_validator("archive_flush_s")
    @classmethod
    def _flush(cls, value: float) -> float:
        _check(value > 0, "expected seconds > 0")
        return value

    @field_validator("archive_max_rows")
    @classmethod
    def _rows(cls, value: int) -> int:
        _check(value >= 1, "expected a positive integer")
        return value


class BatchSettings(_Section):
    """Batch layer (python -m batch). Hyper-parameters accept a value, alternatives separated
    by '|' (e.g. "64,32|128") or a range "low:high", searched over by candidates; they are
    parsed when the job starts (batch/job.py)."""

    batch_cron: str = _setting(
        "0 2 * * *", "BATCH_CRON",
        "When `python -m batch schedule` rebuilds the model (cron syntax).")
    batch_id_col: str = _setting("id", "BATCH_ID_COL", "Id column of the batch input.")
    batch_label_col: str = _setting(
        "label", "BATCH_LABEL_COL", "Label column of the batch input.")
    batch_epochs: str = _setting(
        "3", "BATCH_EPOCHS", "Maximum training epochs (or alternatives/range to search).")
    batch_hidden: str = _setting(
        "500,1000,500", "BATCH_HIDDEN",
        "Hidden layer sizes, e.g. 500,1000,500 (alternatives with '|').")
    batch_dropout: str = _setting(
        "0.4", "BATCH_DROPOUT", "Dropout (or alternatives/range to search).")
    batch_batch_size: str = _setting(
        "512", "BATCH_BATCH_SIZE", "Mini-batch rows (or alternatives/range to search).")
    batch_lr: str = _setting(
        "0.001", "BATCH_LR",
        "Adam learning rate (or alternatives/range, searched log-uniformly).")
    batch_seed: int = _setting(
        0, "BATCH_SEED", "Seed of the split, the search, initialisation and shuffling.")
    batch_max_train_seconds: float = _setting(
        0.0, "BATCH_MAX_TRAIN_SECONDS", "Training time budget per candidate; 0 = none.")
    batch_threads: int = _setting(
        2, "BATCH_THREADS", "torch threads the batch job may use in all.")
    batch_candidates: int = _setting(
        1, "BATCH_CANDIDATES", "Hyper-parameter candidates to train and compare.")
    batch_search: str = _setting(
        "random", "BATCH_SEARCH", "Hyper-parameter search: random or grid.")
    batch_parallelism: int = _setting(
        0, "BATCH_PARALLELISM",
        "Candidates trained at once; 0 = as many as the threads allow.")
    batch_test_fraction: float = _setting(
        0.2, "BATCH_TEST_FRACTION", "Share of the rows held out for the test metrics.")
    batch_val_fraction: float = _setting(
        0.1, "BATCH_VAL_FRACTION", "Share of the rows for early stopping and candidate choice.")
    batch_patience: int = _setting(
        2, "BATCH_PATIENCE",
        "Epochs without a better validation loss before stopping; 0 = never.")
    batch_window_days: int = _setting(
        0, "BATCH_WINDOW_DAYS", "Train on the last N days of the lake only; 0 = all history.")
    batch_metric: str = _setting(
        "accuracy", "BATCH_METRIC",
        "Test metric a candidate is compared on: accuracy, auc or log_loss.")
    batch_min_accuracy: float = _setting(
        0.0, "BATCH_MIN_ACCURACY",
        "Least test accuracy to publish (the majority rate always applies).")
    batch_compare_active: bool = _setting(
        True, "BATCH_COMPARE_ACTIVE",
        "On: publish only if not worse than the active model; off: no comparison.")
    batch_compare_tolerance: float = _setting(
        0.0, "BATCH_COMPARE_TOLERANCE",
        "How much worse than the active model still counts as not worse.")
    batch_keep_versions: int = _setting(
        5, "BATCH_KEEP_VERSIONS", "Model generations kept in the registry; 0 = keep all.")
    batch_lock_ttl_s: int = _setting(
        3600, "BATCH_LOCK_TTL_S", "Expiry of the registry lock of a run (renewed while it runs).")
    batch_distributed: int = _setting(
        0, "BATCH_DISTRIBUTED",
        "Train with TorchDistributor on this many Spark tasks; 0 = driver.")
    batch_demo_rows: int = _setting(
        100000, "BATCH_DEMO_ROWS", "Rows of demo data the bootstrap writes into an empty lake.")

    #: The least value of each integer batch setting.
    _LEAST: ClassVar[dict[str, int]] = {
        "batch_seed": 0, "batch_threads": 1, "batch_candidates": 1, "batch_parallelism": 0,
        "batch_patience": 0, "batch_window_days": 0, "batch_keep_versions": 0,
        "batch_lock_ttl_s": 30, "batch_distributed": 0, "batch_demo_rows": 1}

    @field_validator(*_LEAST)
    @classmethod
    def _least(cls, value: int, info: ValidationInfo) -> int:
        least = cls._LEAST[str(info.field_name)]
        _check(value >= least, f"expected an integer >= {least}")
        return value

    @field_validator("batch_cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        from croniter import croniter

        _check(bool(croniter.is_valid(value)), "expected a cron expression such as '0 2 * * *'")
        return value

    @field_validator("batch_id_col", "batch_label_col")
    @classmethod
    def _column(cls, value: str) -> str:
        _check(bool(value.strip()), "expected a column name")
        return value

    @field_validator("batch_max_train_seconds")
    @classmethod
    def _budget(cls, value: float) -> float:
        _check(value >= 0, "expected seconds >= 0 (0 = no budget)")
        return value

    @field_validator("batch_search")
    @classmethod
    def _search(cls, value: str) -> str:
        _check(value in ("random", "grid"), "expected random or grid")
        return value

    @field_validator("batch_test_fraction")
    @classmethod
    def _test_fraction(cls, value: float) -> float:
        _check(0 < value < 1, "expected a fraction in (0, 1)")
        return value

    @field_validator("batch_metric")
    @classmethod
    def _metric(cls, value: str) -> str:
        _check(value in ("accuracy", "auc", "log_loss"), "expected accuracy, auc or log_loss")
        return value

    @field_validator("batch_min_accuracy")
    @classmethod
    def _min_accuracy(cls, value: float) -> float:
        _check(0 <= value <= 1, "expected a number in [0, 1]")
        return value

    @field_validator("batch_compare_tolerance")
    @classmethod
    def _tolerance(cls, value: float) -> float:
        _check(value >= 0, "expected a number >= 0")
        return value

    @model_validator(mode="after")
    def _val_fraction(self) -> "BatchSettings":
        if not 0 <= self.batch_val_fraction < 1 - self.batch_test_fraction:
            raise _error("BATCH_VAL_FRACTION", self.batch_val_fraction,
                         "expected a fraction >= 0 that leaves rows to train on with "
                         "BATCH_TEST_FRACTION")
        return self


class SparkSettings(_Section):
    """Spark session of the batch job."""

    spark_master: str = _setting(
        "local[2]", "SPARK_MASTER", "Spark master URL of the batch job.")
    spark_driver_memory: str = _setting(
        "1g", "SPARK_DRIVER_MEMORY", "Driver heap of the batch job's Spark session.")
    spark_driver_host: str | None = _setting(
        None, "SPARK_DRIVER_HOST", "Address Spark executors reach the batch job's driver at "
        "(default SPARK_LOCAL_IP, else 127.0.0.1); on a cluster, this host's routable address.")
    spark_driver_bind: str | None = _setting(
        None, "SPARK_DRIVER_BIND", "Address the batch job's driver listens on (default "
        "SPARK_DRIVER_HOST; 0.0.0.0 for every interface).")


#: The groups of settings, in the order of docs/contract.md.
SECTIONS: tuple[type[_Section], ...] = (
    KafkaSettings, StorageSettings, ServingSettings, SpeedSettings, ArchiveSettings,
    BatchSettings, SparkSettings)


# pydantic lists the fields of the last base first: the bases are in reverse order so that the
# fields (repr, describe, error messages) come in the order of SECTIONS.
class Settings(SparkSettings, BatchSettings, ArchiveSettings, SpeedSettings, ServingSettings,
               StorageSettings, KafkaSettings):
    """Everything a Stratum process can be told, with the defaults of docs/contract.md.

    Build it with :meth:`from_env`; copy it with changes with :meth:`replace`.
    """

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        """Build settings from ``environ`` (default ``os.environ``), validating every value.

        Raises
        ------
        SettingsError
            A value cannot work; the message names every such variable and its value.
        """
        environ = os.environ if environ is None else environ
        given = {env: environ[env] for env in _env_names(cls).values() if env in environ}
        try:
            return cls.model_validate(given)
        except ValidationError as exc:
            raise _settings_error(cls, exc) from None

    def replace(self, **changes: Any) -> "Settings":
        """A validated copy with ``changes`` (field names) applied; the names KAFKA_PREFIX
        was put before stay as they are."""
        unknown = set(changes) - set(type(self).model_fields)
        if unknown:
            raise TypeError(f"no such settings: {', '.join(sorted(unknown))}")
        try:
            return type(self).model_validate({**dict(self), **changes})
        except ValidationError as exc:
            raise _settings_error(type(self), exc) from None

    @classmethod
    def describe(cls) -> str:
        """One line per setting: variable, default and meaning (for README and --help)."""
        lines = []
        for name, info in cls.model_fields.items():
            lines.append(f"{env_name(name):<24} {info.default!s:<28} {info.description}")
        return "\n".join(lines)


def env_name(field_name: str) -> str:
    """The environment variable of a settings field."""
    return _env_names(Settings)[field_name]


@functools.cache
def _env_names(cls: type[BaseSettings]) -> dict[str, str]:
    """Field name to environment variable, of every field of ``cls``."""
    return {name: _alias(info) for name, info in cls.model_fields.items()}


@functools.cache
def _kinds(cls: type[BaseSettings]) -> dict[str, tuple[bool, bool, bool]]:
    """Per field of ``cls``: whether it may be unset, is a boolean, is an integer."""
    return {name: (_admits(info.annotation, type(None)), _admits(info.annotation, bool),
                   _admits(info.annotation, int)) for name, info in cls.model_fields.items()}


def _alias(info: FieldInfo) -> str:
    alias = info.validation_alias
    assert isinstance(alias, str), alias
    return alias


def _broker_servers(broker: str) -> list[str]:
    servers = []
    for part in broker.replace(",", ";").split(";"):
        part = part.strip()
        if part.startswith("kafka://"):
            part = part[len("kafka://"):]
        if part:
            servers.append(part)
    return servers


def _error(env: str, value: Any, expected: str) -> SettingsError:
    return SettingsError(f"bad setting {env}={value!r}: {expected}")


def _settings_error(cls: type[BaseSettings], exc: ValidationError) -> SettingsError:
    """The :class:`SettingsError` of a failed validation: every bad variable with its value
    (secrets hidden) and what was expected."""
    by_env = {_alias(info): info for info in cls.model_fields.values()}
    messages = []
    for error in exc.errors():
        cause = error.get("ctx", {}).get("error")
        if isinstance(cause, SettingsError):  # a check across fields, already worded
            messages.append(str(cause))
            continue
        key = str(error["loc"][0]) if error["loc"] else ""
        info = by_env.get(key) or cls.model_fields.get(key)
        env = _alias(info) if info is not None else key
        value = error["input"] if info is None or info.repr else "<hidden>"
        if isinstance(cause, ValueError):
            expected = str(cause)
        elif error["type"] in ("int_parsing", "int_from_float", "int_type"):
            expected = "expected an integer"
        elif error["type"] in ("float_parsing", "float_type", "finite_number"):
            expected = "expected a number"
        else:
            expected = f"expected {error['msg'][0].lower()}{error['msg'][1:]}"
        messages.append(f"bad setting {env}={value!r}: {expected}")
    return SettingsError("; ".join(messages))
