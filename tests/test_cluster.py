"""Serving on a replicated three-broker cluster: a broker dies mid-stream and nothing is lost.

Topics and changelogs are created with three replicas and ``min.insync.replicas=2``
(``TOPIC_REPLICATION_FACTOR``, ``TOPIC_MIN_INSYNC_REPLICAS``), the worker's producer writes
with ``acks=all``, and the broker that leads input partitions is killed with SIGKILL while
events stream in, then restarted.
"""
from __future__ import annotations

import json
import signal
from collections import Counter
from pathlib import Path
from typing import Callable

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from devstack.stack import LocalStack
from devstack.harness import WorkerProcess, consume_until, deploy_small_model, http, run

FEATURES = ["a", "b", "c"]
CLASSES = ["b", "s"]


def events(prefix: str, n: int) -> list[bytes]:
    return [json.dumps({"id": f"{prefix}-{i}", "features": [i % 7, 1, 2],
                        "label": CLASSES[i % 2]}).encode() for i in range(n)]


def produce_durably(bootstrap: str, topic: str, values: list[bytes]) -> None:
    """Produce with acks=all and idempotence, as a producer that must lose nothing does;
    raise if any message is not stored."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True,
                         "acks": "all", "linger.ms": 5, "message.timeout.ms": 120_000})
    failed: list[str] = []

    def delivered(err: object, _msg: object) -> None:
        if err is not None:
            failed.append(str(err))

    for i, value in enumerate(values):
        while True:
            try:
                producer.produce(topic, value, key=f"k{i}".encode(), on_delivery=delivered)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    assert producer.flush(150) == 0, "messages still unsent after 150 s"
    assert not failed, f"{len(failed)} events not stored: {failed[:3]}"


def partition_layout(bootstrap: str, topic: str) -> dict[int, tuple[int, list[int], list[int]]]:
    """partition -> (leader, replicas, in-sync replicas)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    meta = admin.list_topics(topic, timeout=30).topics[topic]
    return {p: (m.leader, list(m.replicas), list(m.isrs)) for p, m in meta.partitions.items()}


def test_a_broker_killed_mid_stream_loses_no_event(
        kafka_cluster: LocalStack, settings_env: Callable[..., dict[str, str]],
        tmp_path: Path) -> None:
    # A deployment sharing the cluster under a prefix of its own.
    env = settings_env(KAFKA_BROKER=kafka_cluster.kafka_broker, TOPIC_REPLICATION_FACTOR="3",
                       TOPIC_MIN_INSYNC_REPLICAS="2", TOPIC_PARTITIONS="4", SPEED_LAYER="0",
                       ARCHIVE="0", KAFKA_PREFIX="team-a.")
    settings, version = deploy_small_model(env, FEATURES, CLASSES)
    assert settings.events_topic == "team-a." + env["EVENTS_TOPIC"]
    bootstrap = settings.bootstrap_servers
    layout = partition_layout(bootstrap, settings.events_topic)
    assert len(layout) == 4 and all(len(replicas) == 3 for _, replicas, _ in layout.values())
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    victim = None
    sent: list[str] = []
    try:
        worker.wait_ready()
        # The worker's changelogs are replicated like its topics.
        changelog = f"{settings.app_id}-latest_predictions-changelog"
        assert all(len(r) == 3 for _, r, _ in partition_layout(bootstrap, changelog).values())

        first = events("before", 2000)
        produce_durably(bootstrap, settings.events_topic, first)
        sent += [json.loads(v)["id"] for v in first]
        run(consume_until(bootstrap, settings.predictions_topic,
                          lambda vs: len({v["id"] for v in vs}) >= len(sent), timeout=120))
        # The only worker holds the scored-summary partition: it is the learner.
        status, metrics, _ = http("GET", f"{worker.url}/metrics")
        assert status == 200 and "\nstratum_speed_learner 1.0\n" in metrics

        # Kill the broker that leads the most input partitions, while events keep coming.
        leaders = Counter(leader for leader, _, _ in layout.values())
        victim = leaders.most_common(1)[0][0]
        during = events("during", 4000)
        produce_durably(bootstrap, settings.events_topic, during[:500])
        kafka_cluster.kill_broker(victim, signal.SIGKILL)
        produce_durably(bootstrap, settings.events_topic, during[500:])
        sent += [json.loads(v)["id"] for v in during]
        # Its partitions moved to the surviving replicas.
        moved = partition_layout(bootstrap, settings.events_topic)
        assert all(leader != victim for leader, _, _ in moved.values())

        kafka_cluster.start_broker(victim)
        victim = None
        after = events("after", 2000)
        produce_durably(bootstrap, settings.events_topic, after)
        sent += [json.loads(v)["id"] for v in after]

        predictions = run(consume_until(
            bootstrap, settings.predictions_topic,
            lambda vs: {v["id"] for v in vs} >= set(sent), timeout=180))
        answered = Counter(p["id"] for p in predictions)
        assert set(answered) == set(sent)  # none lost
        assert all(p["model_version"] == version for p in predictions)
        # Its consumer groups and changelogs carry the prefix, too.
        admin = AdminClient({"bootstrap.servers": bootstrap})
        groups = {g.group_id for g in admin.list_consumer_groups().result(30).valid}
        assert f"team-a.{env['STRATUM_APP_ID']}-serving" in groups
        assert changelog.startswith("team-a.")
        worker._check_alive()  # the worker rode it out without a restart
    finally:
        worker.stop()
        if victim is not None:
            kafka_cluster.start_broker(victim)
