"""Shared fixtures: the embedded stack (a real Kafka broker and S3 server) and fresh names.

The stack starts once per test session on free ports with a temporary data directory, the
first time a test asks for ``stack``, ``kafka_broker``, ``s3_server`` or ``settings_env``;
unit tests that ask for none of them never start it. Tests that use it are marked
``integration`` automatically (``pytest -m 'not integration'`` skips them).

Every test gets its own topics, consumer groups, app ids and buckets from ``unique_name`` /
``settings_env``, so tests share one broker and one S3 server without seeing each other's data,
and the suite can run while ``make run`` is up.
"""
from __future__ import annotations

import atexit
import itertools
import os
import re
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from devstack.stack import DEFAULT_CACHE_DIR, S3_CREDENTIALS, LocalStack, free_port

#: Fixtures that start the stack; a test using any of them (directly or through another
#: fixture) is an integration test.
STACK_FIXTURES = frozenset({"stack", "kafka_broker", "s3_server", "settings_env", "spark",
                            "kafka_cluster", "spark_cluster"})

# Unit tests use the module-level app of the default settings: its local table stores (the
# RocksDB files of latest_predictions) go to a temporary directory, not the checkout.
if "STRATUM_DATA_DIR" not in os.environ:
    os.environ["STRATUM_DATA_DIR"] = tempfile.mkdtemp(prefix="stratum-unit-")
    atexit.register(shutil.rmtree, os.environ["STRATUM_DATA_DIR"], ignore_errors=True)

_counter = itertools.count(1)
# Distinguishes this session's names from any other session's on a shared server.
_session_token = secrets.token_hex(3)


def make_unique_name(prefix: str) -> str:
    """``<prefix>-<session token>-<n>``: unique within the session, valid as a Kafka topic,
    consumer group, Faust app id and S3 bucket name (lowercase letters, digits, hyphens)."""
    clean = re.sub(r"[^a-z0-9-]+", "-", prefix.lower()).strip("-")[:40] or "x"
    return f"{clean}-{_session_token}-{next(_counter)}"


def pytest_configure(config: pytest.Config) -> None:
    if not any(line.startswith("integration") for line in config.getini("markers")):
        config.addinivalue_line(
            "markers", "integration: needs the real Kafka broker, S3 server or Spark")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if STACK_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@dataclass(frozen=True)
class KafkaBroker:
    """The session's Kafka broker."""

    #: ``127.0.0.1:PORT``, for aiokafka's ``bootstrap_servers``.
    bootstrap: str

    @property
    def url(self) -> str:
        """``kafka://127.0.0.1:PORT``, for Faust and ``KAFKA_BROKER``."""
        return f"kafka://{self.bootstrap}"


@dataclass
class S3Server:
    """The session's S3-API server (s3rver)."""

    endpoint_url: str
    key: str = S3_CREDENTIALS[0]
    secret: str = S3_CREDENTIALS[1]
    _client: Any = field(default=None, init=False, repr=False)

    @property
    def storage_options(self) -> dict[str, Any]:
        """Keyword arguments for ``s3fs.S3FileSystem`` (a fresh dict each time)."""
        return {"key": self.key, "secret": self.secret,
                "client_kwargs": {"endpoint_url": self.endpoint_url}}

    def client(self) -> Any:
        """A boto3 S3 client for this server (created once)."""
        if self._client is None:
            import boto3

            self._client = boto3.client(
                "s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.key,
                aws_secret_access_key=self.secret, region_name="us-east-1")
        return self._client

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique one unless ``name`` is given); return its name."""
        bucket = name or make_unique_name("bucket")
        self.client().create_bucket(Bucket=bucket)
        return bucket


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """ZooKeeper, Kafka and s3rver on free ports, for the whole session."""
    # Retention checked every second (Kafka's default is every 5 minutes), so that tests of
    # expiring changelogs see the broker delete what expired.
    with LocalStack(cache_dir=DEFAULT_CACHE_DIR, data_dir=tmp_path_factory.mktemp("stack"),
                    with_kafka=True, with_s3=True,
                    broker_config={"log.retention.check.interval.ms": 1000}) as running:
        yield running


@pytest.fixture(scope="session")
def kafka_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """Three Kafka brokers on one ZooKeeper (topics replicated 3, min ISR 2), for the session.

    Kafka only: tests pair it with the session's S3 server (``settings_env(KAFKA_BROKER=
    kafka_cluster.kafka_broker)``). Tests may kill and restart brokers
    (``kill_broker(id)``, ``start_broker(id)``) but leave all three running when they end.
    """
    with LocalStack(cache_dir=DEFAULT_CACHE_DIR, data_dir=tmp_path_factory.mktemp("cluster"),
                    with_kafka=True, with_s3=False, brokers=3) as running:
        yield running


@pytest.fixture(scope="session")
def kafka_broker(stack: LocalStack) -> KafkaBroker:
    """The session's broker: ``.bootstrap`` (``127.0.0.1:PORT``) and ``.url`` (``kafka://``)."""
    return KafkaBroker(stack.bootstrap)


@pytest.fixture(scope="session")
def s3_server(stack: LocalStack) -> S3Server:
    """The session's S3 server: ``.endpoint_url``, ``.storage_options``, ``.make_bucket()``."""
    return S3Server(stack.s3_endpoint_url)


@pytest.fixture(scope="session")
def unique_name() -> Callable[[str], str]:
    """``unique_name(prefix)``: a name no other call in this session returns.

    Session-scoped so that module- and session-scoped fixtures can use it too.
    """
    return make_unique_name


@pytest.fixture(scope="session")
def settings_env(kafka_broker: KafkaBroker, s3_server: S3Server,
                 tmp_path_factory: pytest.TempPathFactory
                 ) -> Callable[..., dict[str, str]]:
    """``settings_env(**overrides)``: environment variables for a fresh Stratum deployment.

    Each call returns a new set: the session's broker and S3 server, a new bucket holding
    ``LAKE_URI`` and ``REGISTRY_URI``, a new app id, new topic names, a free web port and a new
    data directory. Keyword arguments (variable names) override or add values, for example
    ``settings_env(TOPIC_PARTITIONS="2")``. Pass the result to ``Settings.from_env`` or as a
    child process's environment.

    Session-scoped (each call is independent) so that module-scoped fixtures can use it.
    """
    def make(**overrides: Any) -> dict[str, str]:
        bucket = s3_server.make_bucket()
        data_dir: Path = tmp_path_factory.mktemp("stratum-data")
        env = {
            "KAFKA_BROKER": kafka_broker.url,
            "S3_ENDPOINT_URL": s3_server.endpoint_url,
            "AWS_ACCESS_KEY_ID": s3_server.key,
            "AWS_SECRET_ACCESS_KEY": s3_server.secret,
            "LAKE_URI": f"s3://{bucket}/lake/events",
            "REGISTRY_URI": f"s3://{bucket}/models",
            "STRATUM_APP_ID": make_unique_name("stratum-test"),
            "EVENTS_TOPIC": make_unique_name("events"),
            "PREDICTIONS_TOPIC": make_unique_name("predictions"),
            "DLQ_TOPIC": make_unique_name("events-dlq"),
            "UPDATES_TOPIC": make_unique_name("model-updates"),
            "METRICS_TOPIC": make_unique_name("metrics"),
            "WEB_BIND": "127.0.0.1",
            "WEB_PORT": str(free_port()),
            "STRATUM_DATA_DIR": str(data_dir),
        }
        env.update({name: str(value) for name, value in overrides.items()})
        return env

    return make


@pytest.fixture(scope="session")
def spark() -> Iterator[Any]:
    """One local Spark session for every test that needs one (starting one takes seconds)."""
    from batch.spark import get_session

    session = get_session(app_name="stratum-tests")
    yield session
    session.stop()


# ---- A Spark standalone cluster, for the batch job on spark:// ------------------------------


@pytest.fixture(scope="session")
def spark_cluster(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[Any]:
    """A Spark standalone master and two workers of one core and 1g each, on free loopback ports.

    The workers' environment, which their executors inherit, carries the S3 server's
    credentials: executors authenticate with their own environment, never with credentials
    from the driver. ``.master_url`` is ``spark://127.0.0.1:PORT``; ``.worker_dirs()`` hold
    the executors' logs.
    """
    import sys

    from devstack.spark_cluster import SparkStandalone

    env = {"AWS_ACCESS_KEY_ID": s3_server.key, "AWS_SECRET_ACCESS_KEY": s3_server.secret,
           "PYSPARK_PYTHON": sys.executable,
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    with SparkStandalone(tmp_path_factory.mktemp("spark-cluster"), workers=2,
                         cores_per_worker=1, memory_per_worker="1g", env=env) as cluster:
        yield cluster
