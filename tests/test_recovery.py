"""A worker always comes back: restarts whatever happened to the changelog meanwhile.

``latest_predictions``' changelog expires rows after ``LATEST_RETENTION_S``; a worker stopped
for longer comes back to a changelog the broker empties (at its next retention check, which
may fall in the middle of the worker's recovery). Both tests run real workers against the
session's broker, which checks retention every second.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from confluent_kafka import Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource

from app.settings import Settings
from devstack.harness import (WorkerProcess, consume_until, deploy_small_model, http, produce,
                           run)

FEATURES = ["a", "b", "c"]
CLASSES = ["b", "s"]


def deploy(settings_env: Callable[..., dict[str, str]], **overrides: Any
           ) -> tuple[dict[str, str], Settings, str]:
    env = settings_env(SPEED_LAYER="0", ARCHIVE="0", **overrides)
    return (env, *deploy_small_model(env, FEATURES, CLASSES))


def changelog(settings: Settings, table: str = "latest_predictions") -> str:
    return f"{settings.app_id}-{table}-changelog"


def topic_config(admin: AdminClient, topic: str) -> dict[str, str]:
    """What the topic's creator set (the broker's defaults left out)."""
    (future,) = admin.describe_configs([ConfigResource("topic", topic)]).values()
    return {name: entry.value for name, entry in future.result(timeout=10).items()
            if not entry.is_default}


def log_bounds(admin: AdminClient, bootstrap: str, topic: str, partition: int = 0
               ) -> tuple[int, int]:
    """(first offset, end offset) of a partition's log."""
    from confluent_kafka import Consumer

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bounds"})
    try:
        return consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
    finally:
        consumer.close()


def wait_for_log(worker: WorkerProcess, text: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in worker.log_path.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"no {text!r} in the log:\n{worker.log_tail()}"
        worker._check_alive()
        time.sleep(0.05)


def test_a_recovery_whose_changelog_is_emptied_under_it_finishes(
        settings_env: Callable[..., dict[str, str]], tmp_path: Path) -> None:
    """The hang seen after a night's stop: recovery reads the high-water mark, then the log
    loses everything up to it. Faust alone waits forever for a record that no longer exists
    ("Still fetching changelog topics for recovery", the count frozen)."""
    env, settings, version = deploy(settings_env, TOPIC_PARTITIONS="1",
                                    LATEST_RETENTION_S="86400")
    bootstrap = settings.bootstrap_servers
    # A big changelog, as a busy worker leaves it: long enough to recover that the records
    # can be deleted while the new worker is still reading them.
    first = WorkerProcess(env, tmp_path / "first.log").start()
    try:
        first.wait_ready()
    finally:
        first.stop()
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 50})
    row = json.dumps({"id": "x", "model_version": version, "predicted": "b",
                      "probabilities": [0.5, 0.5], "ts": int(time.time() * 1000)}).encode()
    n = 400_000
    for i in range(n):
        while True:
            try:
                producer.produce(changelog(settings), row, f"old-{i}".encode(), partition=0)
                break
            except BufferError:
                producer.poll(0.1)
    assert producer.flush(60) == 0
    admin = AdminClient({"bootstrap.servers": bootstrap})
    start, end = log_bounds(admin, bootstrap, changelog(settings))
    assert end - start >= n

    # A new worker (no local state) recovers the whole changelog; as soon as it has read the
    # high-water mark, every record up to it goes, as expired segments do.
    worker = WorkerProcess({**env, "STRATUM_DATA_DIR": str(tmp_path / "fresh")},
                           tmp_path / "worker.log").start()
    try:
        wait_for_log(worker, "Highwater for active changelog partitions")
        futures = admin.delete_records([TopicPartition(changelog(settings), 0, end)])
        for future in futures.values():
            future.result(timeout=30)
        assert log_bounds(admin, bootstrap, changelog(settings)) == (end, end)
        assert worker.wait_ready(timeout=60) == {"model_version": version}
        log = worker.log_path.read_text(errors="replace")
        assert "was emptied during recovery" in log
        # And it serves.
        run(produce(bootstrap, settings.events_topic,
                    [json.dumps({"id": "after", "features": [1, 2, 3]}).encode()]))
        run(consume_until(bootstrap, settings.predictions_topic,
                          lambda vs: any(v["id"] == "after" for v in vs)))
    finally:
        worker.stop()


def test_a_worker_stopped_longer_than_the_retention_comes_back_quickly(
        settings_env: Callable[..., dict[str, str]], tmp_path: Path) -> None:
    retention_s = 5
    env, settings, version = deploy(settings_env, TOPIC_PARTITIONS="2",
                                    LATEST_RETENTION_S=str(retention_s),
                                    TOPIC_MIN_INSYNC_REPLICAS="1")
    bootstrap = settings.bootstrap_servers
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for round_ in range(3):
        worker = WorkerProcess(env, tmp_path / f"worker-{round_}.log").start()
        started = time.monotonic()
        try:
            assert worker.wait_ready(timeout=60) == {"model_version": version}
            ready_s = time.monotonic() - started
            assert ready_s < 60
            ids = [f"r{round_}-{i}" for i in range(200)]
            run(produce(bootstrap, settings.events_topic, [
                json.dumps({"id": i, "features": [1, 2, k % 5]}).encode()
                for k, i in enumerate(ids)]))
            run(consume_until(bootstrap, settings.predictions_topic,
                              lambda vs: {v["id"] for v in vs} >= set(ids)))
            deadline = time.monotonic() + 30
            while http("GET", f"{worker.url}/predictions/{ids[-1]}/")[0] != 200:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            if round_:
                # Rows of the round before are older than the retention: gone.
                status, _, _ = http("GET", f"{worker.url}/predictions/r{round_ - 1}-0/")
                assert status == 404
        finally:
            assert worker.stop() == 0
        stopped = time.monotonic()
        # Down longer than the retention, until the broker has emptied the changelog.
        deadline = stopped + 120
        while True:
            bounds = [log_bounds(admin, bootstrap, changelog(settings), p) for p in (0, 1)]
            if time.monotonic() - stopped > retention_s and all(
                    first == end for first, end in bounds):
                break
            assert time.monotonic() < deadline, f"the changelog was not emptied: {bounds}"
            time.sleep(0.5)
    # What bounds a recovery on the broker's side: rows of latest_predictions expire with the
    # retention; the summary tables' changelogs (records per micro-batch, few keys) roll
    # segments often enough for the broker to compact them to a record per key.
    latest = topic_config(admin, changelog(settings))
    assert latest["cleanup.policy"] == "compact,delete"
    assert latest["retention.ms"] == str(retention_s * 1000)
    for table in ("class_counts", "scored_by_version", "quality_by_version", "rollout_figures"):
        config = topic_config(admin, changelog(settings, table))
        assert "compact" in config["cleanup.policy"]
        assert int(config["segment.ms"]) <= 5 * 60 * 1000
    # TOPIC_MIN_INSYNC_REPLICAS reaches the topics Stratum creates and Faust's changelogs.
    for topic in (settings.events_topic, settings.predictions_topic, changelog(settings),
                  changelog(settings, "scored_by_version")):
        assert topic_config(admin, topic)["min.insync.replicas"] == "1"
