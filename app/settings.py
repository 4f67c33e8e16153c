"""Stratum's settings: one typed object, read from the environment once at start.

Every field is documented and has a default (CONTRACT.md). A bad value stops start-up with a
:class:`SettingsError` naming the variable, never later with a confusing traceback.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, TypeVar
from urllib.parse import urlparse

__all__ = ["Settings", "SettingsError", "EMBEDDED_S3_ENDPOINT", "EMBEDDED_S3_CREDENTIALS"]

#: The embedded S3-API server's address and fixed credentials (s3rver's own defaults).
EMBEDDED_S3_ENDPOINT = "http://127.0.0.1:9000"
EMBEDDED_S3_CREDENTIALS = ("S3RVER", "S3RVER")

T = TypeVar("T")


class SettingsError(ValueError):
    """A setting has a value Stratum cannot use; the message names the variable."""


def _env(name: str, help: str) -> Any:
    """Declare a field read from environment variable ``name``."""
    return {"env": name, "help": help}


@dataclass(frozen=True)
class Settings:
    """Everything a Stratum process can be told, with CONTRACT.md's defaults."""

    kafka_broker: str = field(default="kafka://127.0.0.1:9092", metadata=_env(
        "KAFKA_BROKER", "Kafka bootstrap servers, `kafka://host:port[;host:port]`."))
    s3_endpoint_url: str | None = field(default=EMBEDDED_S3_ENDPOINT, metadata=_env(
        "S3_ENDPOINT_URL", "S3-API endpoint; set it empty to use real AWS S3."))
    aws_access_key_id: str | None = field(default=None, metadata=_env(
        "AWS_ACCESS_KEY_ID", "S3 access key; S3RVER for the embedded server."))
    aws_secret_access_key: str | None = field(default=None, repr=False, metadata=_env(
        "AWS_SECRET_ACCESS_KEY", "S3 secret key; S3RVER for the embedded server."))
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
    topic_partitions: int = field(default=4, metadata=_env(
        "TOPIC_PARTITIONS", "Partitions of the events and predictions topics when created."))
    serving_batch_size: int = field(default=512, metadata=_env(
        "SERVING_BATCH_SIZE", "Largest micro-batch the serving agent scores at once."))
    serving_batch_ms: int = field(default=20, metadata=_env(
        "SERVING_BATCH_MS", "Longest a micro-batch waits to fill, in milliseconds."))
    metrics_interval_s: float = field(default=10.0, metadata=_env(
        "METRICS_INTERVAL_S", "Seconds between broadcasts on the metrics topic."))
    latest_retention_s: int = field(default=900, metadata=_env(
        "LATEST_RETENTION_S",
        "How long the latest-prediction table's changelog keeps a row; bounds restart time."))
    torch_threads: int = field(default=1, metadata=_env(
        "TORCH_THREADS", "Threads torch may use for scoring."))

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
        if self.s3_endpoint_url is not None:
            parsed = urlparse(self.s3_endpoint_url)
            _check(parsed.scheme in ("http", "https") and bool(parsed.netloc),
                   "S3_ENDPOINT_URL", self.s3_endpoint_url, "expected http(s)://host:port")
        for env, uri in (("LAKE_URI", self.lake_uri), ("REGISTRY_URI", self.registry_uri)):
            parsed = urlparse(uri)
            _check(parsed.scheme in ("s3", "file") and bool(parsed.netloc or parsed.path),
                   env, uri, "expected s3://bucket/prefix or file:///path")
        _check(1 <= self.web_port <= 65535, "WEB_PORT", self.web_port, "expected 1-65535")
        _check(self.topic_partitions >= 1, "TOPIC_PARTITIONS", self.topic_partitions,
               "expected a positive integer")
        _check(self.serving_batch_size >= 1, "SERVING_BATCH_SIZE", self.serving_batch_size,
               "expected a positive integer")
        _check(self.serving_batch_ms >= 0, "SERVING_BATCH_MS", self.serving_batch_ms,
               "expected milliseconds >= 0")
        _check(self.metrics_interval_s > 0, "METRICS_INTERVAL_S", self.metrics_interval_s,
               "expected seconds > 0")
        _check(self.latest_retention_s >= 60, "LATEST_RETENTION_S", self.latest_retention_s,
               "expected seconds >= 60")
        _check(self.torch_threads >= 1, "TORCH_THREADS", self.torch_threads,
               "expected a positive integer")
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
    def storage_options(self) -> dict[str, Any]:
        """Keyword arguments for ``s3fs.S3FileSystem`` / fsspec on the lake and registry."""
        key, secret = self.aws_access_key_id, self.aws_secret_access_key
        if self.s3_endpoint_url is not None and key is None and secret is None:
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
