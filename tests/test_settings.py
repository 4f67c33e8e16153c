"""Settings: contract defaults, environment overrides, and start-up failures naming the variable."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from app.settings import Settings, SettingsError


def test_contract_defaults() -> None:
    s = Settings.from_env({})
    assert s.kafka_broker == "kafka://127.0.0.1:9092"
    assert s.bootstrap_servers == "127.0.0.1:9092"
    assert s.s3_endpoint_url == "http://127.0.0.1:9000"
    assert s.storage_options == {"key": "S3RVER", "secret": "S3RVER",
                                 "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}
    assert (s.lake_uri, s.registry_uri) == ("s3://stratum/lake/events", "s3://stratum/models")
    assert (s.web_bind, s.web_port, s.admin_token) == ("127.0.0.1", 6066, None)
    assert s.batch_cron == "0 2 * * *"


def test_overrides_and_real_aws() -> None:
    s = Settings.from_env({"KAFKA_BROKER": "kafka://a:1;kafka://b:2", "WEB_PORT": "7000",
                           "S3_ENDPOINT_URL": "", "AWS_ACCESS_KEY_ID": "AK",
                           "AWS_SECRET_ACCESS_KEY": "SK"})
    assert s.bootstrap_servers == "a:1,b:2"
    assert s.web_port == 7000
    assert s.s3_endpoint_url is None
    assert s.storage_options == {"key": "AK", "secret": "SK"}


@pytest.mark.parametrize("env, named", [
    ({"WEB_PORT": "http"}, "WEB_PORT"),
    ({"WEB_PORT": "70000"}, "WEB_PORT"),
    ({"KAFKA_BROKER": "localhost"}, "KAFKA_BROKER"),
    ({"S3_ENDPOINT_URL": "127.0.0.1:9000"}, "S3_ENDPOINT_URL"),
    ({"LAKE_URI": "/tmp/lake"}, "LAKE_URI"),
    ({"BATCH_CRON": "every night"}, "BATCH_CRON"),
    ({"SERVING_BATCH_SIZE": "0"}, "SERVING_BATCH_SIZE"),
    ({"ADMIN_TOKEN": "short"}, "ADMIN_TOKEN"),
    ({"TOPIC_REPLICATION_FACTOR": "0"}, "TOPIC_REPLICATION_FACTOR"),
    ({"WEB_ADVERTISED_URL": "worker-2:6066"}, "WEB_ADVERTISED_URL"),
    ({"TOPIC_MIN_INSYNC_REPLICAS": "2"}, "TOPIC_MIN_INSYNC_REPLICAS"),  # above the replicas
    ({"KAFKA_PREFIX": "team a/"}, "KAFKA_PREFIX"),
    ({"EVENTS_TOPIC": "my events"}, "EVENTS_TOPIC"),
    ({"STRATUM_APP_ID": ""}, "STRATUM_APP_ID"),
    ({"WORKER_SESSION_TIMEOUT_S": "5"}, "WORKER_SESSION_TIMEOUT_S"),  # below 3 heartbeats
])
def test_bad_value_names_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        Settings.from_env(env)


def test_kafka_prefix_goes_before_every_topic_and_the_app_id() -> None:
    s = Settings.from_env({"KAFKA_PREFIX": "team-a.", "EVENTS_TOPIC": "clicks"})
    assert (s.events_topic, s.predictions_topic, s.dlq_topic, s.updates_topic,
            s.metrics_topic, s.app_id) == ("team-a.clicks", "team-a.predictions",
                                           "team-a.events-dlq", "team-a.model-updates",
                                           "team-a.metrics", "team-a.stratum")
    # Once: copies of the settings keep the names they were given.
    assert dataclasses.replace(s, archive=0).events_topic == "team-a.clicks"
    assert Settings.from_env({}).events_topic == "events"


def test_secret_never_in_repr() -> None:
    s = Settings.from_env({"ADMIN_TOKEN": "hunter2hunter2", "AWS_SECRET_ACCESS_KEY": "xyzzy"})
    assert "hunter2hunter2" not in repr(s) and "xyzzy" not in repr(s)


def test_worker_refuses_to_start_on_bad_setting() -> None:
    proc = subprocess.run([sys.executable, "-c", "import app; app.app"],
                          env={"WEB_PORT": "not-a-port", "PATH": ""},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "WEB_PORT" in proc.stderr and "Traceback" not in proc.stderr


def test_replication_settings_reach_every_topic_stratum_creates() -> None:
    from transport.topics import durability_config

    default = Settings.from_env({})
    assert default.topic_replication_factor == 1 and durability_config(default) == {}
    cluster = Settings.from_env({"TOPIC_REPLICATION_FACTOR": "3",
                                 "TOPIC_MIN_INSYNC_REPLICAS": "2"})
    assert cluster.topic_replication_factor == 3
    assert durability_config(cluster) == {"min.insync.replicas": "2"}
    # Faust's own topics (changelogs, the summary topic) in a worker with those settings.
    proc = subprocess.run([sys.executable, "-c", """
from app import app
from speed import agent as speed
from serving import tables
topics = [tables.latest_predictions.changelog_topic, tables.class_counts.table.changelog_topic,
          tables.scored_by_version.changelog_topic, speed.quality_by_version.changelog_topic,
          speed.scored_topic]
print(app.conf.topic_replication_factor, {t.config.get("min.insync.replicas") for t in topics})
"""], env={**os.environ, "TOPIC_REPLICATION_FACTOR": "3", "TOPIC_MIN_INSYNC_REPLICAS": "2"},
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[-2] == "3 {'2'}"


def test_advertised_url() -> None:
    assert Settings.from_env({}).advertised_url == "http://127.0.0.1:6066"
    assert Settings.from_env({"WEB_BIND": "0.0.0.0", "WEB_PORT": "7000"}).advertised_url == \
        "http://127.0.0.1:7000"
    assert Settings.from_env({"WEB_BIND": "0.0.0.0", "WEB_ADVERTISED_URL":
                              "http://worker-2.internal:6066/"}).advertised_url == \
        "http://worker-2.internal:6066"


def test_s3_credentials_come_from_the_standard_chain_except_for_the_embedded_server() -> None:
    assert Settings.from_env({}).storage_options["key"] == "S3RVER"  # embedded, default address
    minio = Settings.from_env({"S3_ENDPOINT_URL": "https://minio.internal:9000"})
    assert minio.storage_options == {"client_kwargs": {"endpoint_url":
                                                       "https://minio.internal:9000"}}
    keyed = Settings.from_env({"S3_ENDPOINT_URL": "https://minio.internal:9000",
                               "AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "SK"})
    assert (keyed.storage_options["key"], keyed.storage_options["secret"]) == ("AK", "SK")
