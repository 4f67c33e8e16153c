"""Agents and serving logic without Kafka: ``test_context()`` and plain functions."""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Iterator, Sequence

import numpy as np
import pytest
from confluent_kafka import KafkaError
from faust.types import TP

from app import app
from serving import tables
from serving.model_manager import ModelManager
from serving.recovery import truncated_partitions
from transport.schemas import predicted_values
from serving.scoring import (SourceMessage, class_counts, encode_predictions,
                             score, triage)
from transport.kafka import Delivery, DeliveryFailed

FEATURES = ["a", "b"]
CLASSES = ["no", "yes"]


class Threshold:
    """A model whose P(yes) is a logistic function of feature a: enough to check wiring."""

    version = "v-test"
    task = "classification"
    features: Sequence[str] = FEATURES
    classes: Sequence[Any] = CLASSES

    def outputs(self, rows: np.ndarray) -> np.ndarray:
        p = 1 / (1 + np.exp(-rows[:, 0]))
        return np.stack([1 - p, p], axis=1).astype(np.float32)


class Line:
    """A regression whose value is a / 3 - 2 b (as float32, as a network computes it)."""

    version = "r-test"
    task = "regression"
    features: Sequence[str] = FEATURES
    classes: Sequence[Any] = []

    def outputs(self, rows: np.ndarray) -> np.ndarray:
        return (rows[:, :1] / 3 - 2 * rows[:, 1:2]).astype(np.float32)


@pytest.fixture()
def test_app() -> Iterator[Any]:
    app.finalize()
    app.flow_control.resume()
    yield app


def message(value: Any, offset: int) -> SourceMessage:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    return SourceMessage(raw, "events", 0, offset)


def test_triage_keeps_order_and_reasons() -> None:
    batch = [message({"id": "1", "features": [3, 0]}, 10), message(b"{", 11),
             message({"id": "2", "features": {"b": 0, "a": -3}}, 12),
             message({"id": "3", "features": [1]}, 13)]
    valid, rejected = triage(batch, FEATURES, CLASSES)
    assert [(m.offset, e.id) for m, e in valid] == [(10, "1"), (12, "2")]
    assert [(r.message.offset, r.reason.split(":")[0]) for r in rejected] == [
        (11, "not JSON"), (13, "'features' has 1 values, the model expects 2")]


def test_score_names_the_version_and_most_probable_class() -> None:
    valid, _ = triage([message({"id": "hi", "features": [4, 0]}, 0),
                       message({"id": "lo", "features": [-4, 0]}, 1)], FEATURES, CLASSES)
    predictions = score(Threshold(), [e for _, e in valid], now_ms=99)
    assert [(p["id"], p["predicted"], p["model_version"], p["ts"]) for p in predictions] == [
        ("hi", "yes", "v-test", 99), ("lo", "no", "v-test", 99)]
    assert predictions[0]["probabilities"] == pytest.approx([0.017986, 0.982014], abs=1e-6)
    assert class_counts(predictions) == {"yes": 1, "no": 1}


def test_update_messages_are_recorded_or_refused() -> None:
    manager = ModelManager()
    ledger = manager.ledger
    assert manager._record(b'{"type": "SOMETHING", "model": "default"}', 1) is False
    assert manager._record(b"not json", 2) is False
    assert ledger.refusals == 2 and "unknown message type" in ledger.last_refusal.reason
    assert manager._record(b'{"type": "MODEL-REF", "model": "default"}', 3) is False
    assert ledger.refusals == 3 and "bad announcement" in ledger.last_refusal.reason
    ok = {"type": "MODEL-REF", "model": "default", "version": "20261123T000000Z-abcdef",
          "manifest": "s3://b/models/default/20261123T000000Z-abcdef/manifest.json",
          "sha256": "0" * 64, "metrics": {"accuracy": 0.9}}
    assert manager._record(json.dumps(ok).encode(), 4) is True
    assert list(ledger.announced) == [ok["version"]]
    assert manager._record(json.dumps({**ok, "model": "other"}).encode(), 5) is False
    assert list(ledger.announced) == [ok["version"]]
    pin = {"type": "PIN", "model": "default", "version": ok["version"]}
    assert manager._record(json.dumps(pin).encode(), 6) is True
    assert ledger.pinned == ok["version"] and manager.should_serve() == ok["version"]
    assert manager._record(json.dumps({**pin, "version": 7}).encode(), 7) is False
    assert ledger.pinned == ok["version"] and "bad pin" in ledger.last_refusal.reason
    assert manager._record(json.dumps({**pin, "version": None}).encode(), 8) is True
    assert ledger.pinned is None


def test_encoded_predictions_are_the_contract_messages() -> None:
    model = Threshold()
    probabilities = model.outputs(np.array([[4.0, 0.0], [-4.0, 0.0], [0.0, 0.0]]))
    values, predicted = encode_predictions(model, ["hi", "lo", "even"], probabilities, 99)
    valid, _ = triage([message({"id": i, "features": [x, 0]}, k)
                       for k, (i, x) in enumerate([("hi", 4), ("lo", -4), ("even", 0)])],
                      FEATURES, CLASSES)
    assert [json.loads(v) for v in values] == score(model, [e for _, e in valid], now_ms=99)
    assert predicted == ["yes", "no", "no"]  # a tie goes to the first class


def test_a_regression_predicts_a_number_and_no_probabilities() -> None:
    model = Line()
    events = [{"id": "one", "features": [1, 0], "label": 2.5},
              {"id": "big", "features": [3e7, -1.5]}, {"id": "neg", "features": [0, 0.25],
                                                       "label": -3}]
    valid, rejected = triage([message(e, k) for k, e in enumerate(events)], FEATURES, CLASSES,
                             task="regression")
    assert rejected == [] and [e.label for _, e in valid] == [2.5, None, -3.0]
    predictions = score(model, [e for _, e in valid], now_ms=7)
    assert [sorted(p) for p in predictions] == [["id", "model_version", "predicted", "ts"]] * 3
    values = model.outputs(np.stack([e.features for _, e in valid]))[:, 0]
    # The float32 value, written as the shortest decimal that reads back as that float32.
    assert [p["predicted"] for p in predictions] == [0.33333334, 1e7 + 3, -0.5]
    assert np.array_equal(np.float32([p["predicted"] for p in predictions]), values)
    assert all(type(p["predicted"]) is float for p in predictions)
    # The stream's encoding is the same messages, and what it predicted is the value.
    encoded, predicted = encode_predictions(model, ["one", "big", "neg"],
                                            model.outputs(np.stack([e.features
                                                                    for _, e in valid])), 7)
    assert [json.loads(v) for v in encoded] == predictions
    assert predicted == [p["predicted"] for p in predictions]
    # A value the network could not compute is null, never NaN (which JSON does not have).
    assert predicted_values(np.array([[np.nan], [np.inf], [1.5]], dtype=np.float32)) == [
        None, None, 1.5]


def test_a_regression_refuses_labels_that_are_not_finite_numbers() -> None:
    batch = [message({"id": "s", "features": [1, 0], "label": "2.5"}, 0),
             message({"id": "b", "features": [1, 0], "label": True}, 1),
             message({"id": "c", "features": [1, 0], "label": "yes"}, 2)]
    valid, rejected = triage(batch, FEATURES, CLASSES, task="regression")
    assert valid == [] and [r.message.offset for r in rejected] == [0, 1, 2]
    assert all("'label' must be a number for a regression model" in r.reason
               for r in rejected)
    # A classification's labels are unchanged: one of its classes.
    valid, rejected = triage([message({"id": "n", "features": [1, 0], "label": 2.5}, 3),
                              message({"id": "y", "features": [1, 0], "label": "yes"}, 4)],
                             FEATURES, CLASSES)
    assert [e.label for _, e in valid] == ["yes"]
    assert [r.reason.split(";")[0] for r in rejected] == ["unknown label 2.5"]


def test_a_version_of_another_task_or_features_cannot_replace_the_serving_one() -> None:
    from types import SimpleNamespace

    from serving.model_manager import _incompatibility

    def model(task: str, features: list[str], classes: list[Any]) -> Any:
        return SimpleNamespace(task=task, features=features, classes=classes)

    regression = model("regression", ["a", "b"], [])
    assert _incompatibility(None, regression) is None  # nothing serves yet
    assert _incompatibility(regression, model("regression", ["b", "a"], [])) is None
    reason = _incompatibility(regression, model("classification", ["a", "b"], ["no", "yes"]))
    assert reason is not None and reason.startswith(
        "incompatible task: classification instead of regression")
    reason = _incompatibility(model("classification", ["a", "b"], ["no", "yes"]), regression)
    assert reason is not None and "regression instead of classification" in reason
    reason = _incompatibility(regression, model("regression", ["a", "c"], []))
    assert reason == "incompatible features: missing ['b'], unexpected ['c']"
    reason = _incompatibility(model("classification", ["a"], [0, 1]),
                              model("classification", ["a"], [1, 0]))
    assert reason == "incompatible classes: [1, 0] instead of [0, 1]"


def test_latest_predictions_rows_are_kept_per_partition_and_expire() -> None:
    now = int(time.time() * 1000)
    fresh = json.dumps({"id": "x", "predicted": "yes", "ts": now}).encode()
    stale = json.dumps({"id": "old", "predicted": "no",
                        "ts": now - 1000 * (app.settings.latest_retention_s + 5)}).encode()
    tables.store_latest(1, [b"x", b"old"], [fresh, stale])
    tables.store_latest(2, [b"y"], [fresh])
    assert tables.latest_prediction(b"x") == fresh and tables.latest_prediction(b"y") == fresh
    # Older than LATEST_RETENTION_S: gone, whether or not RocksDB compacted it away yet.
    assert tables.latest_prediction(b"old") is None
    assert tables.latest_prediction(b"never") is None
    tables.record_changelog_offsets({1: 41, 2: 7})
    store = tables.latest_predictions.data
    assert store.persisted_offset(TP(tables.LATEST_CHANGELOG, 1)) == 41
    rows = tables.table_rows("latest_predictions", 2)
    assert [r["key"] for r in rows["rows"]] == ["y", "old"]


async def test_a_delivery_resolves_once_every_message_is_settled() -> None:
    class Producer:
        def __init__(self) -> None:
            self.callbacks: list[Any] = []

        def produce(self, topic: str, value: Any, key: Any, partition: int,
                    on_delivery: Any) -> None:
            self.callbacks.append(on_delivery)

    class Stored:
        def __init__(self, partition: int, offset: int) -> None:
            self._p, self._o = partition, offset

        def partition(self) -> int:
            return self._p

        def offset(self) -> int:
            return self._o

    producer = Producer()
    delivery = Delivery(producer, asyncio.get_running_loop())  # type: ignore[arg-type]
    delivery.produce("t", b"1")
    delivery.produce_changelog("c", b"2", b"k", 3)
    delivery.produce_changelog("c", b"3", b"k", 3)
    done = delivery.seal()
    # Delivery reports come from librdkafka's polling thread, in any order.
    reports = [(producer.callbacks[2], Stored(3, 12)), (producer.callbacks[0], Stored(0, 5)),
               (producer.callbacks[1], Stored(3, 11))]
    for callback, stored in reports[:2]:
        await asyncio.to_thread(callback, None, stored)
    await asyncio.sleep(0.05)
    assert not done.done()
    await asyncio.to_thread(reports[2][0], None, reports[2][1])
    await asyncio.wait_for(done, 5)
    assert delivery.changelog_offsets == {3: 12}

    failed = Delivery(producer, asyncio.get_running_loop())  # type: ignore[arg-type]
    failed.produce("t", b"4")
    failed.produce("t", b"5")
    failed.seal()
    error = KafkaError(KafkaError._MSG_TIMED_OUT)
    await asyncio.to_thread(producer.callbacks[3], error, Stored(0, 6))
    await asyncio.to_thread(producer.callbacks[4], None, Stored(0, 7))
    with pytest.raises(DeliveryFailed, match="MSG_TIMED_OUT"):
        await asyncio.wait_for(failed.done, 5)


async def test_a_micro_batch_the_broker_did_not_store_stops_the_worker_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No later micro-batch is needed to notice (none comes while the group rebalances)."""
    from serving import agent as serving

    crashed: list[BaseException] = []
    crash_called = asyncio.Event()

    async def crash(reason: BaseException) -> None:
        crashed.append(reason)
        crash_called.set()

    monkeypatch.setattr(serving.app, "crash", crash)
    monkeypatch.setattr(serving.serving, "_failed", False)  # restored afterwards
    stop = serving.serving._stop_if_not_stored
    failure = DeliveryFailed("_MSG_TIMED_OUT: Local: Message timed out")
    loop = asyncio.get_running_loop()
    failed: asyncio.Future[None] = loop.create_future()
    failed.add_done_callback(stop)
    stored: asyncio.Future[None] = loop.create_future()
    stored.add_done_callback(stop)
    cancelled: asyncio.Future[None] = loop.create_future()
    cancelled.add_done_callback(stop)
    stored.set_result(None)
    cancelled.cancel()
    failed.set_exception(failure)
    await asyncio.wait_for(crash_called.wait(), timeout=5)
    assert crashed == [failure]  # once: the stored and the cancelled batch crash nothing
    assert failed.exception() is failure
    assert serving.serving._failed  # so stopping will not commit past the failed batch


async def test_offset_requests_are_asked_again_while_the_coordinator_moves() -> None:
    """A broker restart moves group coordinators: NOT_COORDINATOR and the like are asked
    again; an error that asking again cannot cure is raised at once."""
    from confluent_kafka import KafkaException

    from transport.kafka import coordinator_call

    answers: list[Any] = [KafkaException(KafkaError(KafkaError.NOT_COORDINATOR)),
                          KafkaException(KafkaError(KafkaError.COORDINATOR_LOAD_IN_PROGRESS)),
                          {"p0": 7}]

    def call() -> Any:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert await coordinator_call(call, "read offsets") == {"p0": 7} and not answers

    def refused() -> Any:
        answers.append(1)
        raise KafkaException(KafkaError(KafkaError.GROUP_AUTHORIZATION_FAILED))

    with pytest.raises(KafkaException, match="GROUP_AUTHORIZATION_FAILED"):
        await coordinator_call(refused, "read offsets")
    assert answers == [1]


async def test_a_stopping_worker_exits_even_when_it_cannot_drain(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopping answers, stores and commits what was read, but only for STOP_DRAIN_S: a worker
    stopping while the cluster is away must still exit so that it can be restarted. After a
    micro-batch failed it does not try at all (nothing may be committed past it)."""
    from serving import agent as serving

    service = serving.serving
    monkeypatch.setattr(serving, "STOP_DRAIN_S", 0.2)
    lock = asyncio.Lock()
    monkeypatch.setattr(service, "_lock", lock)
    monkeypatch.setattr(service, "_failed", False)
    released: list[bool] = []

    async def release() -> None:
        released.append(True)

    monkeypatch.setattr(service, "_release", release)
    await lock.acquire()  # the serving loop, stuck while holding it
    try:
        began = time.monotonic()
        await asyncio.wait_for(service.on_stop(), 5)
        assert 0.2 <= time.monotonic() - began < 2 and released == []
        monkeypatch.setattr(service, "_failed", True)
        began = time.monotonic()
        await asyncio.wait_for(service.on_stop(), 5)
        assert time.monotonic() - began < 0.2 and released == []
    finally:
        lock.release()
    monkeypatch.setattr(service, "_failed", False)
    await asyncio.wait_for(service.on_stop(), 5)
    assert released == [True]


def test_scored_version_series_are_bounded() -> None:
    from serving import metrics

    for k in range(metrics.METRIC_MAX_VERSIONS + 5):
        metrics.count_scored(f"base+{k}", 2)
    series = {s.labels["model_version"] for m in metrics.EVENTS_SCORED.collect()
              for s in m.samples if s.name.endswith("_total")}
    assert len(series) == metrics.METRIC_MAX_VERSIONS
    assert f"base+{metrics.METRIC_MAX_VERSIONS + 4}" in series and "base+0" not in series


def test_recovery_gives_up_only_on_records_the_log_no_longer_has() -> None:
    highwaters = {"emptied": 99, "trimmed": 99, "done": 50, "waiting": 80, "nothing": None}
    applied = {"emptied": 20, "trimmed": 20, "done": 50, "waiting": 10, "nothing": None}
    starts = {"emptied": 100, "trimmed": 60, "done": 51, "waiting": 0, "nothing": 0}
    assert truncated_partitions(highwaters, applied, starts) == {"emptied": 99}
