"""The serving path across rebalances and restarts, against the real broker and S3 server.

Every event is answered; a graceful hand-over (a worker joining, a worker stopping) answers
every event exactly once, because everything read is answered, stored and committed before
the group moves on.
"""
from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

from confluent_kafka import Consumer, TopicPartition

from app.settings import Settings
from devstack.stack import free_port
from devstack.harness import (WorkerProcess, consume_until, deploy_small_model, http, produce,
                           run)

FEATURES = ["a", "b", "c"]
CLASSES = ["b", "s"]


def deploy(settings_env: Callable[..., dict[str, str]], **overrides: Any
           ) -> tuple[dict[str, str], Settings, str]:
    env = settings_env(SPEED_LAYER="0", TOPIC_PARTITIONS="4", ARCHIVE_FLUSH_S="1", **overrides)
    return (env, *deploy_small_model(env, FEATURES, CLASSES))


def events(prefix: str, n: int) -> list[bytes]:
    return [json.dumps({"id": f"{prefix}-{i}", "features": [i % 7, 1, 2],
                        "label": CLASSES[i % 2]}).encode() for i in range(n)]


def committed(settings: Settings, group: str) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": group})
    try:
        found = consumer.committed([TopicPartition(settings.events_topic, p) for p in range(4)],
                                   timeout=30)
        return {tp.partition: tp.offset for tp in found if tp.offset >= 0}
    finally:
        consumer.close()


def ends(settings: Settings) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": "ends"})
    try:
        return {p: consumer.get_watermark_offsets(TopicPartition(settings.events_topic, p),
                                                  timeout=10)[1] for p in range(4)}
    finally:
        consumer.close()


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not after {timeout}s"
        time.sleep(0.2)


def test_a_joining_and_a_leaving_worker_answer_every_event_exactly_once(
        settings_env: Callable[..., dict[str, str]], tmp_path: Path) -> None:
    env, settings, version = deploy(settings_env)
    bootstrap = settings.bootstrap_servers
    env_b = {**env, "WEB_PORT": str(int(env["WEB_PORT"]) + 1),
             "STRATUM_DATA_DIR": str(tmp_path / "b")}
    first = WorkerProcess(env, tmp_path / "a.log").start()
    second = WorkerProcess(env_b, tmp_path / "b.log")
    ids: list[str] = []
    try:
        first.wait_ready()
        for round_, action in enumerate(("b joins", "a stops", None)):
            batch = events(f"r{round_}", 3000)
            ids += [json.loads(v)["id"] for v in batch]
            run(produce(bootstrap, settings.events_topic, batch))
            # While those are being answered, the group changes.
            if action == "b joins":
                second.start().wait_ready()
            elif action == "a stops":
                assert first.stop() == 0
        predictions = run(consume_until(bootstrap, settings.predictions_topic,
                                        lambda vs: {v["id"] for v in vs} >= set(ids),
                                        timeout=120))
        answered = [p["id"] for p in predictions]
        assert sorted(answered) == sorted(ids)  # every event once: none lost, none twice
        assert all(p["model_version"] == version for p in predictions)
        # Everything is committed where the input ends, by the serving and archive groups.
        wait_until(lambda: committed(settings, f"{settings.app_id}-serving") == ends(settings),
                   "serving offsets committed")
        wait_until(lambda: committed(settings, f"{settings.app_id}-archiver") == ends(settings),
                   "archive offsets committed")
        # The one worker left holds every row of latest_predictions.
        for event_id in (ids[0], ids[len(ids) // 2], ids[-1]):
            status, body, _ = http("GET", f"{second.url}/predictions/{event_id}/")
            assert status == 200 and body["id"] == event_id
    finally:
        first.stop()
        if second.proc is not None:
            second.stop()


def test_a_worker_starts_where_the_faust_agent_it_replaces_stopped(
        settings_env: Callable[..., dict[str, str]], tmp_path: Path) -> None:
    """An upgrade: the input offsets committed by the Faust group of an earlier version (which
    read the topic with an agent) are where serving starts, not the start of the topic."""
    env, settings, _ = deploy(settings_env, ARCHIVE="0")
    bootstrap = settings.bootstrap_servers
    run(produce(bootstrap, settings.events_topic, events("old", 400)))
    served_before = ends(settings)
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": settings.app_id})
    try:
        consumer.commit(offsets=[TopicPartition(settings.events_topic, p, o)
                                 for p, o in served_before.items()], asynchronous=False)
    finally:
        consumer.close()
    run(produce(bootstrap, settings.events_topic, events("new", 200)))
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        worker.wait_ready()
        predictions = run(consume_until(
            bootstrap, settings.predictions_topic,
            lambda vs: sum(v["id"].startswith("new-") for v in vs) >= 200))
        assert {p["id"] for p in predictions} == {f"new-{i}" for i in range(200)}
    finally:
        worker.stop()


def test_workers_on_different_hosts_each_answer_every_lookup(
        settings_env: Callable[..., dict[str, str]], tmp_path: Path) -> None:
    """Two workers bound to every address, each advertising its own host (127.0.0.2 and
    127.0.0.3 stand for two machines): a lookup on either finds a row wherever it lives."""
    env, settings, version = deploy(settings_env, ARCHIVE="0", WEB_BIND="0.0.0.0")
    workers, urls = [], []
    for k, host in enumerate(("127.0.0.2", "127.0.0.3")):
        port = free_port()
        url = f"http://{host}:{port}"
        workers.append(WorkerProcess({**env, "WEB_PORT": str(port), "WEB_ADVERTISED_URL": url,
                                      "STRATUM_DATA_DIR": str(tmp_path / f"w{k}")},
                                     tmp_path / f"w{k}.log"))
        urls.append(url)
    try:
        for worker in workers:
            worker.start().wait_ready()
        wait_until(lambda: all(http("GET", f"{u}/ready")[0] == 200 for u in urls),
                   "both workers ready after the rebalance")
        batch = events("hosts", 400)
        ids = [json.loads(v)["id"] for v in batch]
        run(produce(settings.bootstrap_servers, settings.events_topic, batch))
        run(consume_until(settings.bootstrap_servers, settings.predictions_topic,
                          lambda vs: {v["id"] for v in vs} >= set(ids)))
        # Each worker serves some of the input partitions, so some rows are the other's: it
        # asks its peer at the URL the peer advertised, and the answer names the holder.
        holders: dict[str, set[str]] = {}
        for url in urls:
            for event_id in ids:  # every id, on each worker
                with urllib.request.urlopen(f"{url}/predictions/{event_id}/",
                                            timeout=30) as response:
                    body = json.loads(response.read())
                    holders.setdefault(event_id, set()).add(
                        response.headers["X-Stratum-Worker"])
                assert body["id"] == event_id and body["model_version"] == version
        assert all(len(h) == 1 for h in holders.values())  # both name the same holder
        assert set().union(*holders.values()) == set(urls)  # and each worker holds some
    finally:
        for worker in workers:
            if worker.proc is not None:
                worker.stop()
