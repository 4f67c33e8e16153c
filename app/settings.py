"""Stratum's settings: one typed object, read from the environment once at start.

Every field is documented and has a default (docs/contract.md). A bad value stops start-up with a
:class:`SettingsError` naming the variable, never later with a confusing traceback.

The fields are declared by layer (:class:`KafkaSettings`, :class:`StorageSettings`,
:class:`ServingSettings`, :class:`SpeedSettings`, :class:`ArchiveSettings`,
:class:`BatchSettings`, :class:`SparkSettings`), each with the checks of its own values;
:class:`Settings` inherits them all, so the code reads ``settings.kafka_broker`` whatever the
layer. A field's environment variable is its name in upper case (or its ``validation_alias``),
and its docstring says what it means.
"""
from __future__ import annotations

import functools
import os
import re
import types
from typing import Annotated, Any, Literal, Mapping, Union, get_args, get_origin
from urllib.parse import urlparse

from pydantic import AliasGenerator, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

__all__ = ["Settings", "SettingsError", "METRICS", "FACTORY_NAME", "model_params",
           "EMBEDDED_S3_ENDPOINT", "EMBEDDED_S3_CREDENTIALS",
           "KafkaSettings", "StorageSettings", "ServingSettings", "SpeedSettings",
           "ArchiveSettings", "BatchSettings", "SparkSettings", "SECTIONS", "env_name"]

#: The embedded S3-API server's address and fixed credentials (s3rver's own defaults).
EMBEDDED_S3_ENDPOINT = "http://127.0.0.1:9000"
EMBEDDED_S3_CREDENTIALS = ("S3RVER", "S3RVER")

#: Fields KAFKA_PREFIX is put in front of: every topic and consumer group derives from these.
PREFIXED_FIELDS = ("app_id", "events_topic", "predictions_topic", "dlq_topic", "updates_topic",
                   "metrics_topic", "shadow_topic")
#: A model factory as MODEL_FACTORIES names it: ``package.module:function``.
_FACTORY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")
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


#: How a model factory is named: ``package.module:function``.
FACTORY_NAME = re.compile(
    r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")
#: The test metrics a candidate may be compared on, by task; the first is the default.
METRICS: dict[str, tuple[str, ...]] = {"classification": ("accuracy", "auc", "log_loss"),
                                       "regression": ("rmse", "mae", "r2")}


def model_params(text: str) -> dict[str, Any]:
    """The keyword parameters of a model factory from their JSON text (``BATCH_MODEL_PARAMS``).

    Raises
    ------
    ValueError
        Not JSON, or not a JSON object; the message says which.
    """
    import json

    try:
        params = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"expected a JSON object of keyword parameters ({exc})") from None
    if not isinstance(params, dict):
        raise ValueError(f"expected a JSON object of keyword parameters, got "
                         f"{type(params).__name__}")
    return params


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
    # A field's environment variable is its name in upper case unless it gives another
    # (``validation_alias``); its docstring is its ``description``.
    model_config = SettingsConfigDict(
        frozen=True, extra="ignore", validate_by_name=True, validate_by_alias=True,
        validate_default=False, alias_generator=AliasGenerator(validation_alias=str.upper),
        use_attribute_docstrings=True)

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

    kafka_broker: str = "kafka://127.0.0.1:9092"
    """Kafka bootstrap servers, `kafka://host:port[;host:port]`."""
    app_id: str = Field("stratum", validation_alias="STRATUM_APP_ID")
    """Faust application id: consumer group and changelog prefix."""
    events_topic: str = "events"
    """Input topic."""
    predictions_topic: str = "predictions"
    """Output topic of predictions."""
    dlq_topic: str = "events-dlq"
    """Dead-letter topic for input that cannot be served."""
    updates_topic: str = "model-updates"
    """Model update topic (MODEL-REF and UP messages)."""
    metrics_topic: str = "metrics"
    """Topic where runtime metrics are broadcast."""
    shadow_topic: str = "predictions-shadow"
    """Topic of a shadow rollout's candidate predictions."""
    kafka_prefix: str = ""
    """Put before every topic name and STRATUM_APP_ID (so before every consumer group and
    changelog), so that several deployments share one cluster."""
    topic_partitions: Annotated[int, Field(ge=1)] = 4
    """Partitions of the events and predictions topics when created."""
    topic_replication_factor: Annotated[int, Field(ge=1)] = 1
    """Replicas of every topic and changelog Stratum creates (3 on a production cluster)."""
    topic_min_insync_replicas: int = 0
    """min.insync.replicas of the topics Stratum creates; 0 keeps the broker's default."""
    worker_session_timeout_s: Annotated[float, Field(ge=10, le=1800)] = 60.0
    """How long the group waits for a silent worker (crashed, frozen, cut off) before its
    partitions go to the others; a shorter one fails over sooner."""

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

    s3_endpoint_url: str | None = EMBEDDED_S3_ENDPOINT
    """S3-API endpoint; set it empty to use real AWS S3."""
    aws_access_key_id: str | None = None
    """S3 access key; unset: the standard AWS credential chain (S3RVER at the embedded server's
    default endpoint)."""
    aws_secret_access_key: str | None = Field(None, repr=False)
    """S3 secret key; unset: the standard AWS credential chain (S3RVER at the embedded server's
    default endpoint)."""
    lake_uri: str = "s3://stratum/lake/events"
    """Where archived input lives as Parquet (dt=/hour= partitions)."""
    registry_uri: str = "s3://stratum/models"
    """Model registry root: <model>/<version>/manifest.json + weights."""

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

    model_name: str = "default"
    """Which registry model this worker serves."""
    web_bind: str = "127.0.0.1"
    """Address the worker's web server binds."""
    web_port: Annotated[int, Field(ge=1, le=65535)] = 6066
    """Port of the worker's web server."""
    web_advertised_url: str | None = None
    """URL the other workers reach this one at (default http://WEB_BIND:WEB_PORT, and
    http://127.0.0.1:WEB_PORT when bound to every address)."""
    admin_token: Annotated[str, Field(min_length=8)] | None = Field(None, repr=False)
    """Bearer token for admin endpoints; unset disables them."""
    data_dir: str = Field(".stratum", validation_alias="STRATUM_DATA_DIR")
    """Local directory for worker state (table caches)."""
    serving_batch_size: Annotated[int, Field(ge=1)] = 512
    """Largest micro-batch the serving path scores at once."""
    serving_batch_ms: Annotated[int, Field(ge=0)] = 20
    """Longest a micro-batch waits to fill, in milliseconds."""
    torch_threads: Annotated[int, Field(ge=1)] = 1
    """Threads torch may use for scoring."""
    latest_retention_s: Annotated[int, Field(ge=5)] = 900
    """How long the latest-prediction table keeps a row (store and changelog)."""
    metrics_interval_s: Annotated[float, Field(gt=0)] = 10.0
    """Seconds between broadcasts on the metrics topic."""
    model_factories: tuple[str, ...] = ()
    """Model factories (comma-separated `package.module:function`) whose networks a worker
    may build: a version whose manifest names another factory is refused."""

    @field_validator("model_name")
    @classmethod
    def _model_name(cls, value: str) -> str:
        _check(bool(value) and "/" not in value, "expected a name without '/'")
        return value

    @field_validator("model_factories", mode="before")
    @classmethod
    def _factories(cls, value: Any) -> Any:
        """Comma-separated ``package.module:function`` names (blanks around them and empty
        entries ignored); each one's form is checked here, its import when a manifest names
        it."""
        if isinstance(value, str):
            value = tuple(part.strip() for part in value.split(",") if part.strip())
        if isinstance(value, (list, tuple)):
            bad = [v for v in value if not isinstance(v, str) or not _FACTORY.fullmatch(v)]
            _check(not bad, "expected comma-separated package.module:function names "
                   f"(not of that form: {', '.join(repr(v) for v in bad[:5])})")
        return value

    @field_validator("web_advertised_url")
    @classmethod
    def _advertised(cls, value: str | None) -> str | None:
        if value is not None:
            parsed = urlparse(value)
            _check(parsed.scheme in ("http", "https") and bool(parsed.hostname),
                   "expected http(s)://host:port")
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

    speed_layer: bool = True
    """On: learn from labelled events and publish UP updates."""
    speed_window_s: Annotated[float, Field(gt=0)] = 5.0
    """Seconds between two speed-layer updates (when enough is new)."""
    speed_buffer: Annotated[int, Field(ge=1)] = 3000
    """Most recent labelled examples the speed layer learns from."""
    speed_half_life: Annotated[float, Field(gt=0)] = 500.0
    """Recency half-life of an example's weight, in examples."""
    speed_min_examples: Annotated[int, Field(ge=1)] = 100
    """New labelled examples needed before the next update."""
    rollout_mode: Literal["immediate", "shadow", "canary"] = "immediate"
    """How a new base version goes live when its MODEL-REF names no rollout."""
    rollout_canary_share: Annotated[float, Field(gt=0, lt=1)] = 0.1
    """Share of ids a canary candidate serves when its MODEL-REF names none."""
    rollout_min_events: Annotated[int, Field(ge=2)] = 500
    """Labelled events of the candidate (and of the serving version) before the policy
    decides."""
    rollout_margin: Annotated[float, Field(ge=0)] = 0.01
    """How much worse the candidate may be and still be promoted (accuracy points, or a
    fraction of the serving MSE)."""
    rollout_alpha: Annotated[float, Field(gt=0, lt=0.5)] = 0.05
    """Significance level of the rollout policy's one-sided tests, however often it looks."""
    rollout_effect: Annotated[float, Field(gt=0)] = 0.05
    """The difference the policy's sequential test detects soonest (accuracy points, or a
    fraction of the serving MSE): the scale of its mixture."""
    rollout_max_error_rate: Annotated[float, Field(ge=0, lt=1)] = 0.01
    """Highest fraction of the candidate's scoring attempts that may fail before a worker
    aborts the rollout (judged after ROLLOUT_MIN_EVENTS attempts)."""
    rollout_max_latency_ms: Annotated[float, Field(ge=0)] = 5000.0
    """Highest p99 event-to-prediction latency (ms) of the canary predictions the candidate
    answered before a worker aborts the rollout; 0: no limit."""


class ArchiveSettings(_Section):
    """Archive of the input stream to the lake (lake/archive.py)."""

    archive: bool = True
    """On: workers archive valid input events to LAKE_URI as Parquet."""
    archive_flush_s: Annotated[float, Field(gt=0)] = 60.0
    """Longest an archived event waits in memory before its file is written."""
    archive_max_rows: Annotated[int, Field(ge=1)] = 100000
    """Most events of one input partition per archive file."""


class BatchSettings(_Section):
    """Batch layer (python -m batch). Hyper-parameters accept a value, alternatives separated
    by '|' (e.g. "64,32|128") or a range "low:high", searched over by candidates; they are
    parsed when the job starts (batch/job.py)."""

    batch_cron: str = "0 2 * * *"
    """When `python -m batch schedule` rebuilds the model (cron syntax)."""
    batch_id_col: str = "id"
    """Id column of the batch input."""
    batch_label_col: str = "label"
    """Label column of the batch input."""
    batch_epochs: str = "auto"
    """Maximum training epochs (or alternatives/range to search); auto: fitted to the rows."""
    batch_hidden: str = "auto"
    """Hidden layer sizes, e.g. 500,1000,500 (alternatives with '|'); auto: fitted to the
    rows."""
    batch_dropout: str = "auto"
    """Dropout (or alternatives/range to search); auto: fitted to the rows."""
    batch_batch_size: str = "auto"
    """Mini-batch rows (or alternatives/range to search); auto: fitted to the rows."""
    batch_lr: str = "0.001"
    """Adam learning rate (or alternatives/range, searched log-uniformly)."""
    batch_seed: Annotated[int, Field(ge=0)] = 0
    """Seed of the split, the search, initialisation and shuffling."""
    batch_max_train_seconds: Annotated[float, Field(ge=0)] = 0.0
    """Training time budget per candidate; 0 = none."""
    batch_threads: Annotated[int, Field(ge=1)] = 2
    """torch threads the batch job may use in all."""
    batch_candidates: Annotated[int, Field(ge=1)] = 1
    """Hyper-parameter candidates to train and compare."""
    batch_search: Literal["random", "grid"] = "random"
    """Hyper-parameter search: random or grid."""
    batch_parallelism: Annotated[int, Field(ge=0)] = 0
    """Candidates trained at once; 0 = as many as the threads allow."""
    batch_test_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2
    """Share of the rows held out for the test metrics."""
    batch_val_fraction: float = 0.1
    """Share of the rows for early stopping and candidate choice."""
    batch_patience: Annotated[int, Field(ge=0)] | None = None
    """Epochs without a better validation loss before stopping; 0 = never; unset: fitted to
    the rows."""
    batch_window_days: Annotated[int, Field(ge=0)] = 0
    """Train on the last N days of the lake only; 0 = all history."""
    batch_task: Literal["auto", "classification", "regression"] = "auto"
    """What the model predicts: auto (from the label column: strings and booleans are
    classes, floating-point numbers are values, integers are classes unless they take many
    distinct values), classification or regression."""
    batch_metric: Literal["auto", "accuracy", "auc", "log_loss", "rmse", "mae", "r2"] = "auto"
    """Test metric a candidate is compared on: accuracy, auc or log_loss (classification),
    rmse, mae or r2 (regression); auto = accuracy or rmse by the task."""
    batch_min_accuracy: Annotated[float, Field(ge=0, le=1)] = 0.0
    """Least test accuracy to publish a classification (the majority rate always applies)."""
    batch_compare_active: bool = True
    """On: publish only if not worse than the active model; off: no comparison."""
    batch_compare_tolerance: Annotated[float, Field(ge=0)] = 0.0
    """How much worse than the active model still counts as not worse."""
    batch_keep_versions: Annotated[int, Field(ge=0)] = 5
    """Model generations kept in the registry; 0 = keep all."""
    batch_lock_ttl_s: Annotated[int, Field(ge=30)] = 3600
    """Expiry of the registry lock of a run (renewed while it runs)."""
    batch_distributed: Annotated[int, Field(ge=0)] = 0
    """Train with TorchDistributor on this many Spark tasks; 0 = driver."""
    batch_model: str = "mlp"
    """The network to train: mlp (the built-in one, sized by BATCH_HIDDEN and BATCH_DROPOUT)
    or a factory package.module:function of an installed module, called as
    function(n_features, n_outputs, **BATCH_MODEL_PARAMS)."""
    batch_model_params: str = "{}"
    """Keyword parameters of the BATCH_MODEL factory, as a JSON object."""
    batch_demo_rows: Annotated[int, Field(ge=1)] = 100000
    """Rows of demo data the bootstrap writes into an empty lake."""

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

    @field_validator("batch_model")
    @classmethod
    def _model(cls, value: str) -> str:
        _check(value == "mlp" or FACTORY_NAME.fullmatch(value) is not None,
               "expected mlp or a factory package.module:function")
        return value

    @field_validator("batch_model_params")
    @classmethod
    def _model_params(cls, value: str) -> str:
        model_params(value)
        return value

    @model_validator(mode="after")
    def _metric_of_task(self) -> "BatchSettings":
        task, metric = self.batch_task, self.batch_metric
        if task != "auto" and metric != "auto" and metric not in METRICS[task]:
            raise _error("BATCH_METRIC", metric,
                         f"a {task} is compared on {', '.join(METRICS[task])} (BATCH_TASK="
                         f"{task})")
        return self

    @model_validator(mode="after")
    def _val_fraction(self) -> "BatchSettings":
        if not 0 <= self.batch_val_fraction < 1 - self.batch_test_fraction:
            raise _error("BATCH_VAL_FRACTION", self.batch_val_fraction,
                         "expected a fraction >= 0 that leaves rows to train on with "
                         "BATCH_TEST_FRACTION")
        return self


class SparkSettings(_Section):
    """Spark session of the batch job."""

    spark_master: str = "local[2]"
    """Spark master URL of the batch job."""
    spark_driver_memory: str = "1g"
    """Driver heap of the batch job's Spark session."""
    spark_driver_host: str | None = None
    """Address Spark executors reach the batch job's driver at (default SPARK_LOCAL_IP, else
    127.0.0.1); on a cluster, this host's routable address."""
    spark_driver_bind: str | None = None
    """Address the batch job's driver listens on (default SPARK_DRIVER_HOST; 0.0.0.0 for every
    interface)."""


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
            meaning = " ".join((info.description or "").split())
            lines.append(f"{env_name(name):<24} {info.default!s:<28} {meaning}")
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


#: pydantic's error types for a number out of its field's bounds.
_BOUNDS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def _bounds(info: FieldInfo) -> str:
    """A field's numeric bounds in words: ``a number >= 1 and <= 65535``."""
    kind = "an integer" if _admits(info.annotation, int) else "a number"
    words = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    limits = [f"{words[key]} {getattr(item, key)}" for item in info.metadata
              for key in words if getattr(item, key, None) is not None]
    return f"{kind} {' and '.join(limits)}"


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
        elif error["type"] in _BOUNDS and info is not None:
            expected = f"expected {_bounds(info)}"
        elif error["type"] == "literal_error":
            expected = f"expected {error.get('ctx', {}).get('expected')}"
        elif error["type"] == "string_too_short":
            expected = f"expected at least {error.get('ctx', {}).get('min_length')} characters"
        else:
            expected = f"expected {error['msg'][0].lower()}{error['msg'][1:]}"
        messages.append(f"bad setting {env}={value!r}: {expected}")
    return SettingsError("; ".join(messages))
