"""Settings: contract defaults, environment overrides, and start-up failures naming the variable."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import Field, ValidationError

from app.settings import SECTIONS, Settings, SettingsError, env_name

ROOT = Path(__file__).resolve().parent.parent
#: Read by `make run`, not by Settings (docs/contract.md, "Outside Settings").
OUTSIDE_SETTINGS = {"DEMO_FEED"}


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
    ({"MODEL_FACTORIES": "models.zoo.residual_mlp"}, "MODEL_FACTORIES"),  # no ':function'
    ({"ROLLOUT_EFFECT": "0"}, "ROLLOUT_EFFECT"),
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
    copy = s.replace(archive=False)
    assert (copy.events_topic, copy.app_id, copy.archive) == ("team-a.clicks", "team-a.stratum",
                                                              False)
    assert Settings.from_env({}).events_topic == "events"


def test_a_copy_is_checked_and_only_takes_known_names() -> None:
    s = Settings.from_env({})
    assert s.replace(web_port=7000).web_port == 7000 and s.web_port == 6066
    with pytest.raises(SettingsError, match="WEB_PORT=0: expected an integer >= 1 and <= 65535"):
        s.replace(web_port=0)
    with pytest.raises(TypeError, match="web_prot"):
        s.replace(web_prot=7000)


def test_settings_are_frozen_and_unknown_variables_ignored() -> None:
    s = Settings.from_env({"NOT_A_STRATUM_SETTING": "x", "web_port": "1"})
    assert s.web_port == 6066 and not hasattr(s, "NOT_A_STRATUM_SETTING")
    with pytest.raises(ValidationError, match="frozen"):
        s.web_port = 7000  # type: ignore[misc]


SWITCHES = ["SPEED_LAYER", "ARCHIVE", "BATCH_COMPARE_ACTIVE"]


@pytest.mark.parametrize("env", SWITCHES)
@pytest.mark.parametrize("value", ["2", "-1", "maybe", "", "t"])
def test_a_switch_refuses_anything_but_on_and_off_words(env: str, value: str) -> None:
    with pytest.raises(SettingsError, match=f"{env}='{value}': expected true or false"):
        Settings.from_env({env: value})


@pytest.mark.parametrize("env", SWITCHES)
def test_a_switch_is_a_real_boolean(env: str) -> None:
    field = next(name for name in Settings.model_fields if env_name(name) == env)
    assert getattr(Settings.from_env({}), field) is True
    for off in ("false", "0", "no", "off", "False", " OFF "):
        assert getattr(Settings.from_env({env: off}), field) is False
    for on in ("true", "1", "yes", "on", "TRUE"):
        assert getattr(Settings.from_env({env: on}), field) is True


def test_numbers_convert_and_integers_are_written_as_integers() -> None:
    s = Settings.from_env({"SPEED_HALF_LIFE": "1e3", "TOPIC_PARTITIONS": " 8 ",
                           "WORKER_SESSION_TIMEOUT_S": "30"})
    assert (s.speed_half_life, s.topic_partitions, s.worker_session_timeout_s) == (1000.0, 8,
                                                                                   30.0)
    assert type(s.topic_partitions) is int and type(s.worker_session_timeout_s) is float
    with pytest.raises(SettingsError, match="TOPIC_PARTITIONS='8.0': expected an integer"):
        Settings.from_env({"TOPIC_PARTITIONS": "8.0"})
    with pytest.raises(SettingsError, match="SPEED_HALF_LIFE='half': expected a number"):
        Settings.from_env({"SPEED_HALF_LIFE": "half"})


class _WithLimit(Settings):
    """A settings class with an optional integer, as a deployment's own extension would add."""

    row_limit: int | None = Field(None, validation_alias="ROW_LIMIT", description="Rows.")


def test_an_optional_integer_converts() -> None:
    assert _WithLimit.from_env({}).row_limit is None
    assert _WithLimit.from_env({"ROW_LIMIT": ""}).row_limit is None
    limited = _WithLimit.from_env({"ROW_LIMIT": "250", "WEB_PORT": "7000"})
    assert limited.row_limit == 250 and type(limited.row_limit) is int
    assert limited.web_port == 7000
    with pytest.raises(SettingsError, match="ROW_LIMIT='many': expected an integer"):
        _WithLimit.from_env({"ROW_LIMIT": "many"})


def test_every_bad_value_is_reported_at_once() -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"WEB_PORT": "x", "ARCHIVE": "2", "SPEED_BUFFER": "0"})
    message = str(caught.value)
    for part in ("WEB_PORT='x'", "ARCHIVE='2'", "SPEED_BUFFER='0'"):
        assert part in message


def test_every_setting_has_a_variable_a_meaning_and_one_layer() -> None:
    names = list(Settings.model_fields)
    envs = [env_name(name) for name in names]
    assert len(set(envs)) == len(envs)
    for name, info in Settings.model_fields.items():
        assert re.fullmatch(r"[A-Z][A-Z0-9_]+", env_name(name)), name
        assert info.description and len(info.description) > 10, name
    by_section = [name for section in SECTIONS for name in section.model_fields]
    assert sorted(by_section) == sorted(names)  # each field in exactly one layer
    checks = Settings.__pydantic_decorators__
    for section in SECTIONS:  # no check of a layer hidden by another of the same name
        own = section.__pydantic_decorators__
        assert set(own.field_validators) <= set(checks.field_validators), section
        assert set(own.model_validators) <= set(checks.model_validators), section
    assert len(checks.field_validators) > len(SECTIONS)
    described = Settings.describe().splitlines()
    assert [line.split()[0] for line in described] == envs


def _documented(path: Path, section: str) -> set[str]:
    """The variables named in the first column of the tables of a document's section."""
    text = path.read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    names: set[str] = set()
    for line in text[start:end].splitlines():
        if line.startswith("| `"):
            names |= set(re.findall(r"`([A-Z][A-Z0-9_]+)`", line.split("|")[1]))
    return names


@pytest.mark.parametrize("doc", ["README.md", "docs/contract.md"])
def test_the_settings_tables_name_every_variable(doc: str) -> None:
    envs = {env_name(name) for name in Settings.model_fields}
    documented = _documented(ROOT / doc, "Settings")
    assert envs - documented == set(), f"{doc} lacks these settings"
    assert documented - envs <= OUTSIDE_SETTINGS, f"{doc} names settings that do not exist"


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
          speed.rollout_figures.changelog_topic, speed.scored_topic]
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


def test_model_factories_are_a_list_of_function_names_checked_at_start() -> None:
    assert Settings.from_env({}).model_factories == ()
    assert Settings.from_env({"MODEL_FACTORIES": ""}).model_factories == ()
    s = Settings.from_env({"MODEL_FACTORIES": " models.zoo:residual_mlp, my_pkg.nets:wide ,"})
    assert s.model_factories == ("models.zoo:residual_mlp", "my_pkg.nets:wide")
    assert s.replace(web_port=7000).model_factories == s.model_factories
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"MODEL_FACTORIES": "models.zoo:residual_mlp,os:system(1),a:b:c"})
    message = str(caught.value)
    assert message.startswith("bad setting MODEL_FACTORIES='models.zoo:residual_mlp,"
                              "os:system(1),a:b:c': expected comma-separated "
                              "package.module:function names")
    assert "'os:system(1)', 'a:b:c'" in message and "'models.zoo:residual_mlp'" not in \
        message.split("(not of that form")[1]
