"""The speed layer: labelled-event forwarding, the quality table, and UP updates end to end.

Unit tests call the pure functions and run the agent with ``test_context()``; the integration
test runs a real worker against the real broker and S3 server and watches labelled events
turn into a chain of UP messages that serving applies.
"""
from __future__ import annotations

import asyncio
import base64
import json
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from faust.types import TP

from speed import agent as speed
from serving import tables
from serving.model_manager import model_manager
from app import app
from transport import summary as scored_summary
from transport.schemas import decode_events
from app.settings import Settings
from transport.topics import ensure_topics
from models.online import ModelUpdate
from models.registry import Registry
from devstack.stack import free_port
from devstack.harness import (WorkerProcess, announce, consume_until, deploy_small_model, http,
                              poll, produce, publish_small_model, run)
from transport import protocol
from tests.test_online import make_model, make_regression_model, make_update

FEATURES = ["x0", "x1", "x2", "x3"]
CLASSES = ["neg", "pos"]


class Scorer:
    version = "v1+2"
    base_version = "v1"
    features = FEATURES
    classes = CLASSES


def scored_batch(events: list[dict[str, Any]]) -> tuple[Any, np.ndarray]:
    columns = decode_events([json.dumps(e).encode() for e in events], FEATURES, CLASSES)
    assert not columns.rejected
    probabilities = np.array([[0.8, 0.2], [0.3, 0.7], [0.4, 0.6], [0.9, 0.1]][:len(columns)],
                             dtype=np.float32)
    return columns, probabilities


def forward(columns: Any, probabilities: np.ndarray) -> list[bytes]:
    predicted = [CLASSES[k] for k in probabilities.argmax(axis=1)]
    return scored_summary.summary_messages(Scorer(), predicted, columns.ids, columns.labels,
                                  columns.features, probabilities, columns.ts)


def test_a_summary_counts_the_classes_and_carries_the_labelled_events() -> None:
    columns, probabilities = scored_batch([
        {"id": "a", "features": [1, 2, 3, 4], "label": "pos", "ts": 5},
        {"id": "b", "features": [1, 2, 3, 4]},
        {"id": "c", "features": {"x3": 4, "x2": None, "x1": -999.0, "x0": 0.5},
         "label": "pos"},
    ])
    messages = forward(columns, probabilities)
    assert len(messages) == 1
    header = json.loads(messages[0])
    assert {k: header[k] for k in ("version", "base_version", "scored", "classes", "ids",
                                   "labels", "ts")} == {
        "version": "v1+2", "base_version": "v1", "scored": 3, "classes": {"neg": 1, "pos": 2},
        "ids": ["a", "c"], "labels": [1, 1], "ts": [5, None]}
    summary = scored_summary.parse_summary(messages[0])
    assert (summary.version, summary.scored, summary.classes) == ("v1+2", 3,
                                                                  {"neg": 1, "pos": 2})
    batch = summary.labelled
    assert batch is not None
    assert (batch.version, batch.base_version, batch.labels.tolist()) == ("v1+2", "v1", [1, 1])
    # Features in model order; a null feature stays missing (NaN), -999 stays as sent.
    np.testing.assert_array_equal(batch.features, [[1.0, 2.0, 3.0, 4.0],
                                                   [0.5, -999.0, np.nan, 4.0]])
    np.testing.assert_allclose(batch.probabilities, [[0.8, 0.2], [0.4, 0.6]])
    assert batch.correct.tolist() == [False, True]
    assert speed.log_loss_sum(batch) == pytest.approx(-math.log(0.2) - math.log(0.6), rel=1e-6)
    unlabelled, _ = scored_batch([{"id": "b", "features": [1, 2, 3, 4]}])
    [only] = forward(unlabelled, probabilities[:1])
    assert scored_summary.parse_summary(only) == scored_summary.ScoredSummary("v1+2", 1, {"neg": 1}, None)


def test_a_large_batch_is_forwarded_in_bounded_messages() -> None:
    n = scored_summary.LABELLED_PER_MESSAGE + 10
    columns = decode_events([json.dumps({"id": str(i), "features": [i, 0, 0, 0],
                                         "label": "neg"}).encode() for i in range(n)],
                            FEATURES, CLASSES)
    probabilities = np.tile(np.array([[0.9, 0.1]], dtype=np.float32), (n, 1))
    decoded = [scored_summary.parse_summary(m) for m in forward(columns, probabilities)]
    assert [(d.scored, d.classes) for d in decoded] == [(n, {"neg": n}), (0, {})]
    assert [len(d.labelled) for d in decoded] == [scored_summary.LABELLED_PER_MESSAGE, 10]
    assert np.concatenate([d.labelled.features[:, 0] for d in decoded]).tolist() == list(
        range(n))


def encoded(array: list[Any], dtype: str) -> str:
    return base64.b64encode(np.asarray(array, dtype=dtype).tobytes()).decode()


class RegressionScorer:
    version = "r1+1"
    base_version = "r1"
    task = "regression"
    features = FEATURES
    classes: list[Any] = []


def test_a_regression_summary_carries_numeric_labels_and_predicted_values() -> None:
    events = [{"id": "a", "features": [1, 2, 3, 4], "label": 2.5, "ts": 5},
              {"id": "b", "features": [1, 2, 3, 4]},
              {"id": "c", "features": [0.5, None, 3, 4], "label": -1}]
    columns = decode_events([json.dumps(e).encode() for e in events], FEATURES, [],
                            task="regression")
    outputs = np.array([[2.0], [7.25], [0.5]], dtype=np.float32)
    predicted = outputs[:, 0].tolist()
    [message] = scored_summary.summary_messages(RegressionScorer(), predicted, columns.ids,
                                                columns.labels, columns.features, outputs,
                                                columns.ts)
    header = json.loads(message)
    # No count per predicted value: a regression's summaries count no classes at all.
    assert {k: header[k] for k in ("task", "version", "base_version", "scored", "classes",
                                   "ids", "labels", "ts")} == {
        "task": "regression", "version": "r1+1", "base_version": "r1", "scored": 3,
        "classes": {}, "ids": ["a", "c"], "labels": [2.5, -1.0], "ts": [5, None]}
    assert "probabilities" not in header
    summary = scored_summary.parse_summary(message)
    assert (summary.version, summary.scored, summary.classes) == ("r1+1", 3, {})
    batch = summary.labelled
    assert batch is not None and batch.task == "regression" and len(batch) == 2
    assert batch.labels.dtype == np.float64 and batch.labels.tolist() == [2.5, -1.0]
    assert batch.predicted.tolist() == [2.0, 0.5] and batch.errors.tolist() == [-0.5, 1.5]
    np.testing.assert_array_equal(batch.features, [[1, 2, 3, 4], [0.5, np.nan, 3, 4]])
    # A summary without a task (a worker from before regression) is a classification's.
    old = json.loads(forward(*scored_batch([{"id": "o", "features": [1, 2, 3, 4],
                                              "label": "pos"}]))[0])
    del old["task"]
    parsed = scored_summary.parse_summary(json.dumps(old).encode())
    assert parsed.labelled is not None and parsed.labelled.task == "classification"


def regression_summary(**changes: Any) -> bytes:
    message = {"task": "regression", "version": "r", "base_version": "r", "scored": 2,
               "classes": {}, "labels": [1.5, -2], "n_features": 2,
               "features": encoded([[1.0, 2.0], [3.0, 4.0]], "<f8"),
               "predicted": encoded([1.0, 2.0], "<f4")}
    message.update(changes)
    return json.dumps(message).encode()


@pytest.mark.parametrize("raw", [
    regression_summary(task="ranking"),
    regression_summary(labels=["1.5", 2]),
    regression_summary(labels=[True, 2]),
    regression_summary(labels=[[1.5], 2]),
    regression_summary(predicted=encoded([1.0], "<f4")),
    regression_summary(predicted=encoded([[1.0, 2.0], [3.0, 4.0]], "<f4")),
    regression_summary(predicted=None),
    regression_summary(task=None),
])
def test_malformed_regression_summaries_are_refused(raw: bytes) -> None:
    with pytest.raises(ValueError, match="not a summary of scored events"):
        scored_summary.parse_summary(raw)
    assert scored_summary.parse_summary(regression_summary()).labelled is not None


def regression_batch(version: str, labels: list[float], predicted: list[float],
                     base: str = "r1") -> scored_summary.LabelledBatch:
    n = len(labels)
    return scored_summary.LabelledBatch(
        version, base, np.asarray(labels, dtype=np.float64), np.zeros((n, 4)),
        np.asarray(predicted, dtype=np.float32).reshape(n, 1), "regression")


def test_regression_quality_is_live_rmse_mae_and_r2_with_rolling_figures() -> None:
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    rng = np.random.default_rng(4)
    labels = rng.normal(10.0, 3.0, 700)
    predicted = (labels + rng.normal(0.0, 1.0, 700)).astype(np.float32).astype(np.float64)
    row: dict[str, Any] | None = None
    done = 0
    alpha = 1 - 0.5 ** (1 / speed.QUALITY_HALF_LIFE)
    r_mse = r_mae = 0.0
    for piece in (1, 4, 200, 95, 400):  # across the warm-up boundary, in uneven pieces
        y, p = labels[done:done + piece], predicted[done:done + piece]
        row = speed.update_quality(row, regression_batch("r1", y.tolist(), p.tolist()),
                                   now_ms=done)
        for k in range(piece):  # the rolling figures one event at a time, as defined
            a = max(alpha, 1 / (done + k + 1))
            r_mse += a * ((p[k] - y[k]) ** 2 - r_mse)
            r_mae += a * (abs(p[k] - y[k]) - r_mae)
        done += piece
        assert row["n"] == done and row["task"] == "regression"
        assert row["rmse"] == pytest.approx(
            math.sqrt(mean_squared_error(labels[:done], predicted[:done])), rel=1e-9)
        assert row["mae"] == pytest.approx(
            mean_absolute_error(labels[:done], predicted[:done]), rel=1e-9)
        if done > 1:
            assert row["r2"] == pytest.approx(r2_score(labels[:done], predicted[:done]),
                                              rel=1e-9)
        assert row["rolling_rmse"] == pytest.approx(math.sqrt(r_mse), rel=1e-9)
        assert row["rolling_mae"] == pytest.approx(r_mae, rel=1e-9)
    assert row is not None and row["r2"] > 0.8 and row["first_ms"] == 0
    # One event: no spread of labels yet, so no R2; the rolling figure is that event's.
    first = speed.update_quality(None, regression_batch("r2", [4.0], [1.0]), now_ms=1)
    assert (first["rmse"], first["mae"], first["r2"], first["rolling_rmse"]) == (
        3.0, 3.0, None, 3.0)
    assert "accuracy" not in first and "log_loss" not in first
    # A drift: the rolling RMSE follows it, the overall one lags.
    drifted = speed.update_quality(row, regression_batch(
        "r1", [0.0] * speed.QUALITY_HALF_LIFE * 3, [5.0] * speed.QUALITY_HALF_LIFE * 3),
        now_ms=2)
    assert drifted["rolling_rmse"] > 4.5 and drifted["rmse"] < drifted["rolling_rmse"]


def labelled(version: Any = "v", labels: Any = (0,), features: Any = ((1.0, 2.0),),
             probabilities: Any = ((0.5, 0.5),), n_features: Any = 2, **extra: Any) -> bytes:
    message = {"version": version, "base_version": "v", "scored": len(labels), "classes": {},
               "labels": list(labels), "n_features": n_features,
               "features": encoded(list(features), "<f8"),
               "probabilities": encoded(list(probabilities), "<f4"), **extra}
    return json.dumps(message).encode()


@pytest.mark.parametrize("raw", [
    b"", b"[]", b"{}", b"not json",
    labelled(labels=[2]),
    labelled(labels=[-1]),
    labelled(version=1),
    labelled(labels=[0, 1]),
    labelled(labels=[True]),
    labelled(scored=-1),
    labelled(classes={"a": "many"}),
    labelled(n_features=3),
    labelled(n_features=0),
    labelled(probabilities=[[1.0]]),
    labelled(features=[[1.0]]),
    labelled().replace(b'"features": "', b'"features": "!'),
])
def test_malformed_summaries_are_refused(raw: bytes) -> None:
    with pytest.raises(ValueError, match="not a summary of scored events"):
        scored_summary.parse_summary(raw)


def batch_of(version: str, labels: list[int], p_pos: float,
             base: str = "v1") -> scored_summary.LabelledBatch:
    n = len(labels)
    return scored_summary.LabelledBatch(version, base, np.asarray(labels, dtype=np.int64),
                               np.zeros((n, 4)), np.tile([[1 - p_pos, p_pos]], (n, 1)))


def stepwise(row: dict[str, Any] | None, hits: list[float], losses: list[float]
             ) -> tuple[float, float]:
    """The rolling figures one event at a time, as the definition reads."""
    alpha = 1 - 0.5 ** (1 / speed.QUALITY_HALF_LIFE)
    n = row["n"] if row else 0
    r_acc = row["rolling_accuracy"] if row else None
    r_loss = row["rolling_log_loss"] if row else None
    for hit, loss in zip(hits, losses):
        n += 1
        a = max(alpha, 1 / n)
        r_acc = hit if r_acc is None else r_acc + a * (hit - r_acc)
        r_loss = loss if r_loss is None else r_loss + a * (loss - r_loss)
    return r_acc, r_loss


def test_update_quality_counts_and_rolls() -> None:
    row = speed.update_quality(None, batch_of("v", [1, 0], 0.9), now_ms=10)
    assert row["n"] == 2 and row["correct"] == 1 and row["accuracy"] == 0.5
    assert row["log_loss"] == pytest.approx((-math.log(0.9) - math.log(0.1)) / 2)
    assert row["rolling_accuracy"] == pytest.approx(0.5) and row["first_ms"] == 10
    # A long run of correct predictions pulls the rolling figure up, the overall one less.
    before = row
    row = speed.update_quality(row, batch_of("v", [1] * 1000, 0.9), now_ms=20)
    assert row["n"] == 1002 and row["accuracy"] == pytest.approx(1001 / 1002)
    assert row["rolling_accuracy"] > 0.99 and row["last_ms"] == 20
    # The vectorised update is the one-event-at-a-time definition.
    expected = stepwise(before, [1.0] * 1000, [-math.log(0.9)] * 1000)
    assert (row["rolling_accuracy"], row["rolling_log_loss"]) == pytest.approx(expected)
    before = row
    row = speed.update_quality(row, batch_of("v", [0] * speed.QUALITY_HALF_LIFE, 0.9),
                               now_ms=30)
    assert row["rolling_accuracy"] == pytest.approx(0.5, abs=0.01)
    assert row["accuracy"] > 0.8
    expected = stepwise(before, [0.0] * speed.QUALITY_HALF_LIFE,
                        [-math.log(0.1)] * speed.QUALITY_HALF_LIFE)
    assert (row["rolling_accuracy"], row["rolling_log_loss"]) == pytest.approx(expected)
    # Across the warm-up boundary (mean first, then the half-life), in uneven pieces.
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 700).tolist()
    row, hits = None, []
    for piece in (5, 200, 95, 400):
        chunk, labels = labels[:piece], labels[piece:]
        previous = row
        row = speed.update_quality(row, batch_of("w", chunk, 0.7), now_ms=1)
        hits = [float(label == 1) for label in chunk]
        losses = [-math.log(0.7 if label == 1 else 0.3) for label in chunk]
        assert (row["rolling_accuracy"], row["rolling_log_loss"]) == pytest.approx(
            stepwise(previous, hits, losses))


@pytest.fixture()
def test_app() -> Iterator[Any]:
    app.finalize()
    app.flow_control.resume()
    speed.quality_by_version.data.clear()
    speed.rollout_figures.data.clear()
    yield app


async def test_quality_agent_fills_the_table_per_version(test_app: Any) -> None:
    def forwarded(version: str, labels: list[int], p_pos: float) -> bytes:
        return labelled(version, labels, [[0.0] * 4] * len(labels),
                        [[1 - p_pos, p_pos]] * len(labels), n_features=4,
                        classes={"neg": 0, "pos": 0})

    tables.scored_by_version.data.clear()
    async with speed.summarize_scored.test_context() as agent:
        # v1 is right 7 times out of 10, v1+1 always.
        await agent.put(value=forwarded("v1", [1, 1, 1, 1, 0], 0.75))
        await agent.put(value=b"garbage")  # logged and skipped, never stops the agent
        await agent.put(value=forwarded("v1", [1, 1, 1, 0, 0], 0.75))
        await agent.put(value=forwarded("v1+1", [0, 0, 0, 0], 0.4))
        await agent.put(value=json.dumps({
            "version": "v1+1", "base_version": "v1", "scored": 6, "classes": {"pos": 6},
            "labels": [], "n_features": 4, "features": "", "probabilities": ""}).encode())
    table = speed.quality_by_version
    assert table["v1"]["n"] == 10 and table["v1"]["accuracy"] == pytest.approx(0.7)
    assert table["v1"]["log_loss"] == pytest.approx(
        (-7 * math.log(0.75) - 3 * math.log(0.25)) / 10)
    assert table["v1+1"]["n"] == 4 and table["v1+1"]["accuracy"] == 1.0
    assert table["v1+1"]["rolling_log_loss"] == pytest.approx(-math.log(0.6))
    # What each summary counted: events per version and per class in the current window.
    assert dict(tables.scored_by_version.data.items()) == {"v1": 10, "v1+1": 10}
    assert tables.class_counts["pos"].now() == 6
    from serving.tables import table_rows  # what GET /tables/{name}/ and the web view show

    shown = table_rows("quality_by_version", 10)
    assert shown["size"] == 2 and shown["rows"][0]["key"] == "v1+1"


async def test_the_quality_agent_measures_a_regression_and_counts_no_values(
        test_app: Any) -> None:
    tables.scored_by_version.data.clear()
    before = dict(tables.class_counts.table.data.items())
    async with speed.summarize_scored.test_context() as agent:
        await agent.put(value=regression_summary(version="reg1", labels=[1.0, 3.0],
                                                 predicted=encoded([2.0, 3.0], "<f4")))
        await agent.put(value=regression_summary(version="reg1", labels=[0.0, -4.0],
                                                 predicted=encoded([0.0, -2.0], "<f4")))
    row = speed.quality_by_version["reg1"]
    assert row["n"] == 4 and row["rmse"] == pytest.approx(math.sqrt((1 + 0 + 0 + 4) / 4))
    assert row["mae"] == pytest.approx(3 / 4)
    assert dict(tables.scored_by_version.data.items()) == {"reg1": 4}
    assert dict(tables.class_counts.table.data.items()) == before  # no key per value
    from serving.web import _quality_table

    html = _quality_table("regression", tables.table_rows("quality_by_version", 10)["rows"])
    assert "RMSE" in html and "reg1" in html and "1.118" in html


def test_the_learner_keeps_the_serving_base_and_continues_the_chain() -> None:
    base = make_model()
    layer = speed.SpeedLayer()
    assert layer.collect([batch_of(base.version, [1], 0.5)], None) == 0
    kept = layer.collect([batch_of("other", [1], 0.5), batch_of(base.version, [1], 0.5,
                                                                base.version),
                          batch_of(f"{base.version}+3", [0], 0.5, base.version)], base)
    assert kept == 2 and layer.pending == 2 and layer.pending_base == base.version
    assert np.concatenate(layer.pending_y).tolist() == [1, 0]
    # The chain continues after the newest update seen by the manager or published here.
    ledger = model_manager.ledger
    saved = ledger.topic
    try:
        ledger.topic = protocol.Ledger(saved.model)
        assert layer.next_seq(base) == (None, 1)
        applied = make_update(base, seq=4)
        ledger.topic = protocol.fold(ledger.topic, protocol.Record(0, applied.to_message()))
        newest, seq = layer.next_seq(base)
        assert newest is ledger.updates[base.version] and (newest.seq, seq) == (4, 5)
        layer.published = make_update(base, seq=6)
        assert layer.next_seq(base) == (layer.published, 7)
        layer.published = make_update(base, seq=2)
        assert layer.next_seq(base) == (newest, 5)
    finally:
        ledger.topic = saved
    # A new base version starts afresh.
    other = make_model(version="20261124T000000Z-abcdef")
    layer.collect([batch_of(other.version, [1], 0.5, other.version)], other)
    assert layer.pending == 1 and layer.pending_base == other.version


def test_the_learner_holds_at_most_its_buffer_of_examples(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    base = make_model()
    monkeypatch.setattr(speed, "settings", speed.settings.replace(speed_buffer=100))
    layer = speed.SpeedLayer()
    for _ in range(30):
        layer.collect([batch_of(base.version, [1] * 40, 0.5, base.version)], base)
    assert 100 <= layer.pending < 140


def test_the_learner_keeps_a_regression_s_numeric_labels() -> None:
    base = make_regression_model()
    layer = speed.SpeedLayer()
    kept = layer.collect([regression_batch(base.version, [1.5, -2.0], [0.0, 0.0],
                                           base.version),
                          # the same base as a classification's batch: not its examples
                          batch_of(base.version, [1], 0.5, base.version)], base)
    assert kept == 2 and layer.pending == 2
    assert np.concatenate(layer.pending_y).tolist() == [1.5, -2.0]


# -- one learner at a time: rebalances ----------------------------------------------------------

SCORED = TP(speed.SCORED_TOPIC, 0)
EVENTS_0 = TP(speed.settings.events_topic, 0)


class Producer:
    """Stands in for the worker's Kafka producer: records what the speed layer publishes. A
    test that wants a send to stay under way clears ``release``."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.release.set()
        self.log: list[str] = []

    async def send_and_wait(self, topic: str, key: bytes, value: bytes, **kwargs: Any) -> None:
        self.started.set()
        await self.release.wait()
        self.sent.append(json.loads(value))
        self.log.append(f"stored +{self.sent[-1]['seq']}")


class GatedExecutor(ThreadPoolExecutor):
    """Runs refits in a thread of this process, each one only once ``gate`` is set."""

    def __init__(self) -> None:
        super().__init__(1)
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.gate.set()

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        def gated() -> Any:
            self.entered.set()
            assert self.gate.wait(30)
            return fn(*args, **kwargs)
        return super().submit(gated)


@dataclass
class Learner:
    layer: speed.SpeedLayer
    base: Any
    producer: Producer
    executor: GatedExecutor
    #: The update topic's end offset, as the model manager's reader would find it.
    topic_end: list[int]

    def feed(self, n: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        X = rng.normal(size=(n, self.base.n_features))
        y = (X[:, 0] > 0).astype(np.int64)
        P = np.tile(np.array([[0.5, 0.5]], dtype=np.float32), (n, 1))
        self.layer.collect([scored_summary.LabelledBatch(self.base.version, self.base.base_version, y,
                                                X, P)], self.base)


@pytest.fixture()
def learner(test_app: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Learner]:
    """The worker's speed layer with a base model serving, refits in a thread, a recording
    producer and a model manager that has read the whole update topic (offsets 0-2)."""
    from transport.lease import worker_lease

    base = make_model()
    ledger = model_manager.ledger
    monkeypatch.setattr(ledger, "base", base)
    monkeypatch.setattr(ledger, "active", base)
    monkeypatch.setattr(ledger, "topic", protocol.Ledger(app.settings.model_name))
    monkeypatch.setattr(speed, "settings", speed.settings.replace(
        speed_min_examples=100, speed_window_s=0.2))
    producer = Producer()
    monkeypatch.setattr(app, "_producer", producer)
    topic_end = [3]

    async def end_offset() -> int:
        return topic_end[0]

    monkeypatch.setattr(model_manager, "end_offset", end_offset, raising=False)
    monkeypatch.setattr(model_manager, "position", 3)
    monkeypatch.setattr(model_manager, "_moved", asyncio.Condition())
    worker_lease.confirmed()  # no stall: the lease clock does not tick in unit tests
    layer = speed.speed_layer  # the one the app's rebalance signals reach
    executor = GatedExecutor()
    layer.__init__()
    layer.process = executor
    try:
        yield Learner(layer, base, producer, executor, topic_end)
    finally:
        executor.gate.set()
        executor.shutdown(wait=True)
        layer.__init__()


async def test_a_worker_whose_scored_partition_was_revoked_publishes_nothing(
        learner: Learner) -> None:
    layer, producer = learner.layer, learner.producer
    await app.on_partitions_assigned.send({SCORED, EVENTS_0})
    learner.feed(150)
    first = await layer.step()
    assert first is not None and first.seq == 1 and [u["seq"] for u in producer.sent] == [1]
    # Examples arrive for the next window; then a rebalance gives the partition to another
    # worker, which numbers the chain from now on (its next update is +2).
    learner.feed(150, seed=1)
    assert layer.pending == 150
    await app.on_partitions_revoked.send({SCORED, EVENTS_0})
    await app.on_partitions_assigned.send({EVENTS_0})
    assert await layer.step() is None
    assert [u["seq"] for u in producer.sent] == [1] and layer.pending == 0


async def test_a_regression_learner_publishes_an_update_of_its_one_output(
        learner: Learner, monkeypatch: pytest.MonkeyPatch) -> None:
    base = make_regression_model(hidden=(16,))
    monkeypatch.setattr(model_manager.ledger, "base", base)
    monkeypatch.setattr(model_manager.ledger, "active", base)
    layer, producer = learner.layer, learner.producer
    await app.on_partitions_assigned.send({SCORED})
    rng = np.random.default_rng(0)
    X = rng.normal(size=(150, base.n_features))
    y = 2 * X[:, 0] + 1
    layer.collect([scored_summary.LabelledBatch(base.version, base.version, y, X,
                                                np.zeros((150, 1), np.float32),
                                                "regression")], base)
    update = await layer.step()
    assert update is not None and update.seq == 1 and update.weight.shape == (1, 16)
    [sent] = producer.sent
    assert sent["shape"] == [1, 16] and sent["base_version"] == base.version
    assert sent["fit"]["rmse_after"] < sent["fit"]["rmse_before"]
    ModelUpdate.from_message(sent)  # a valid UP, as every worker will check


@pytest.mark.parametrize("back", [False, True], ids=["moved", "moved-and-back"])
async def test_a_refit_under_way_at_a_revocation_is_not_published(learner: Learner,
                                                                  back: bool) -> None:
    layer, producer, executor = learner.layer, learner.producer, learner.executor
    await app.on_partitions_assigned.send({SCORED})
    learner.feed(150)
    executor.gate.clear()
    step = asyncio.ensure_future(layer.step())
    assert await asyncio.get_running_loop().run_in_executor(None, executor.entered.wait, 30)
    # The refit runs; the partition moves away (and, in the second case, comes back: the
    # examples of the refit were dropped, so its update is no one's).
    await app.on_partitions_revoked.send({SCORED})
    await app.on_partitions_assigned.send({SCORED} if back else {EVENTS_0})
    executor.gate.set()
    assert await step is None
    assert producer.sent == [] and layer.pending == 0
    if back:
        # Its next refit learns from what arrived since, not from the dropped examples.
        learner.feed(120, seed=2)
        update = await layer.step()
        assert update is not None and (update.seq, update.n_examples) == (1, 120)
        assert [u["seq"] for u in producer.sent] == [1]


async def test_a_revocation_waits_for_the_publication_under_way(learner: Learner) -> None:
    layer, producer = learner.layer, learner.producer
    await app.on_partitions_assigned.send({SCORED})
    learner.feed(150)
    producer.release.clear()
    step = asyncio.ensure_future(layer.step())
    await producer.started.wait()  # the update is being sent

    async def revoke() -> None:
        await app.on_partitions_revoked.send({SCORED})
        producer.log.append("revoked")

    revoking = asyncio.ensure_future(revoke())
    await asyncio.sleep(0)
    producer.release.set()
    await asyncio.gather(step, revoking)
    # The group moves on only once the update is stored: the next learner reads it.
    assert producer.log == ["stored +1", "revoked"]


async def test_a_new_learner_continues_the_chain_once_it_has_read_the_update_topic(
        learner: Learner) -> None:
    layer, producer, base = learner.layer, learner.producer, learner.base
    # This worker's model manager read up to +4; the previous learner's +5 is at offsets
    # 3-4, not read yet when the partition comes here.
    ledger = model_manager.ledger
    ledger.topic = protocol.fold(ledger.topic,
                                 protocol.Record(2, make_update(base, seq=4).to_message()))
    learner.topic_end[0] = 5
    await app.on_partitions_assigned.send({SCORED})
    learner.feed(150)
    assert await layer.step() is None  # +5 would be published twice
    assert producer.sent == [] and layer.pending == 150
    # The model manager reads +5 (and the message after it); the learner goes on at +6.
    ledger.topic = protocol.fold(ledger.topic,
                                 protocol.Record(3, make_update(base, seq=5).to_message()))
    await model_manager._advance(5)
    update = await layer.step()
    assert update is not None and [u["seq"] for u in producer.sent] == [6]
    assert update.extra["fit"]["from_version"] == f"{base.version}+5"


# -- end to end ------------------------------------------------------------------------------

INT_FEATURES = ["a", "b", "c"]
INT_CLASSES = ["no", "yes"]


@pytest.fixture(scope="module")
def speed_worker(settings_env: Any, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[tuple[Settings, str, WorkerProcess]]:
    env = settings_env(SPEED_LAYER="1", SPEED_WINDOW_S="1", SPEED_MIN_EXAMPLES="20",
                       TOPIC_PARTITIONS="2", ARCHIVE="0")
    settings = Settings.from_env(env)
    registry = Registry(settings.registry_uri, settings.storage_options)
    ref = publish_small_model(registry, settings.model_name, INT_FEATURES, INT_CLASSES)
    run(ensure_topics(settings))
    run(announce(settings.bootstrap_servers, settings.updates_topic, ref.to_message()))
    tmp: Path = tmp_path_factory.mktemp("speed")
    worker = WorkerProcess(env, tmp / "worker.log").start()
    try:
        assert worker.wait_ready() == {"model_version": ref.version}
        yield settings, ref.version, worker
    finally:
        worker.stop()


def labelled_events(n: int, prefix: str, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        x = rng.normal(size=3)
        event: dict[str, Any] = {"id": f"{prefix}-{i}", "features": x.round(4).tolist()}
        if i % 2 == 0:
            event["label"] = INT_CLASSES[int(x[0] - x[1] > 0)]
        out.append(json.dumps(event).encode())
    return out


def test_labelled_events_become_a_chain_of_updates_that_serving_applies(
        speed_worker: tuple[Settings, str, WorkerProcess]) -> None:
    settings, base, worker = speed_worker
    bootstrap = settings.bootstrap_servers

    def ups(values: list[Any]) -> list[dict[str, Any]]:
        return [v for v in values if v.get("type") == "UP"]

    # Enough labelled events for one update per window; three rounds, three updates.
    for round_ in range(3):
        run(produce(bootstrap, settings.events_topic,
                    labelled_events(200, f"r{round_}", seed=round_)))
        run(consume_until(bootstrap, settings.updates_topic,
                          lambda vs, k=round_: len(ups(vs)) >= k + 1, timeout=90))
    updates = ups(run(consume_until(bootstrap, settings.updates_topic,
                                    lambda vs: len(ups(vs)) >= 3)))
    assert [u["seq"] for u in updates] == list(range(1, len(updates) + 1))
    for message in updates:
        update = ModelUpdate.from_message(message)  # every published update is valid
        assert update.base_version == base and update.model == settings.model_name
        assert update.weight.shape == (2, 8) and update.n_examples >= 20
        # The fit minimises weighted log loss (plus a pull that starts at zero): it never rises.
        assert message["fit"]["log_loss_after"] <= message["fit"]["log_loss_before"] + 1e-6
    assert updates[1]["fit"]["from_version"] == f"{base}+1"

    # Serving applies them: once the newest is active, predictions name <base>+<seq>.
    newest = updates[-1]["seq"]
    active = poll(lambda: http("GET", f"{worker.url}/models/")[1]["active"],
                  lambda v: v == f"{base}+{newest}" or int(v.split("+")[-1]) > newest
                  if "+" in v else False)
    run(produce(bootstrap, settings.events_topic, labelled_events(50, "after", seed=9)))
    predictions = run(consume_until(
        bootstrap, settings.predictions_topic,
        lambda vs: sum(v["id"].startswith("after-") for v in vs) >= 50))
    versions = {p["model_version"] for p in predictions if p["id"].startswith("after-")}
    assert versions and all(v.startswith(f"{base}+") and int(v.split("+")[1]) >= newest
                            for v in versions), (active, versions)

    # The quality table measured each version on the labelled events it predicted, each
    # labelled event once: 3 x 100 + 25 of them.
    labelled = 3 * 100 + 25
    rows = poll(lambda: http("GET", f"{worker.url}/tables/quality_by_version/")[1]["rows"],
                lambda rs: sum(r["value"]["n"] for r in rs) >= labelled)
    quality = {r["key"]: r["value"] for r in rows}
    assert sum(q["n"] for q in quality.values()) == labelled
    assert quality[base]["n"] >= 20 and any(k.startswith(f"{base}+") for k in quality)
    for q in quality.values():
        assert 0 <= q["accuracy"] <= 1 and 0 <= q["rolling_accuracy"] <= 1
        assert math.isfinite(q["log_loss"]) and q["log_loss"] > 0
    status, page, _ = http("GET", f"{worker.url}/plain")
    assert status == 200 and "quality_by_version" in page and f"{base}+1" in page


def test_the_learner_moves_to_another_worker_and_the_chain_goes_on_without_a_repeated_seq(
        settings_env: Any, tmp_path: Path) -> None:
    env = settings_env(SPEED_LAYER="1", SPEED_WINDOW_S="1", SPEED_MIN_EXAMPLES="20",
                       TOPIC_PARTITIONS="2", ARCHIVE="0")
    settings, base = deploy_small_model(env, INT_FEATURES, INT_CLASSES)
    bootstrap = settings.bootstrap_servers
    workers = [WorkerProcess({**env, "STRATUM_DATA_DIR": str(tmp_path / f"w{i}"),
                              "WEB_PORT": env["WEB_PORT"] if i == 0 else str(free_port())},
                             tmp_path / f"worker-{i}.log").start() for i in range(2)]

    def ups() -> list[dict[str, Any]]:
        return [v for v in run(consume_until(bootstrap, settings.updates_topic, lambda vs: True))
                if v.get("type") == "UP"]

    def learners(among: list[WorkerProcess]) -> list[WorkerProcess]:
        return [w for w in among
                if "\nstratum_speed_learner 1.0\n" in http("GET", f"{w.url}/metrics")[1]]

    def learn(round_: int, at_least: int) -> None:
        run(produce(bootstrap, settings.events_topic,
                    labelled_events(200, f"move{round_}", seed=10 + round_)))
        run(consume_until(bootstrap, settings.updates_topic,
                          lambda vs: sum(v.get("type") == "UP" for v in vs) >= at_least,
                          timeout=90))

    try:
        for w in workers:  # ready: the rebalance that brought both in is over
            assert w.wait_ready() == {"model_version": base}
        [first] = poll(lambda: learners(workers), lambda ls: len(ls) == 1)
        [other] = [w for w in workers if w is not first]
        learn(0, 1)
        learn(1, 2)
        # Labelled events in flight while the learner stops: the other worker takes over.
        run(produce(bootstrap, settings.events_topic, labelled_events(200, "move2", seed=12)))
        first.stop()
        by_first = len(ups())
        assert poll(lambda: learners([other]), lambda ls: ls == [other], timeout=90)
        learn(3, by_first + 1)
        learn(4, by_first + 2)
        updates = ups()
        chain = [(u["base_version"], u["seq"]) for u in updates]
        assert len(set(chain)) == len(chain), chain
        assert chain == [(base, seq) for seq in range(1, len(chain) + 1)]
        # The new learner went on from the head of the chain the first one left.
        assert updates[by_first]["fit"]["from_version"] == f"{base}+{by_first}"
        poll(lambda: http("GET", f"{other.url}/models/")[1]["active"],
             lambda v: v.split("+")[-1].isdigit() and int(v.split("+")[-1]) >= len(chain),
             timeout=60)
        # It applied every update: none was dropped as a repeat.
        assert http("GET", f"{other.url}/models/")[1]["updates_dropped"] == 0
    finally:
        for w in workers:
            w.stop()



async def test_the_summaries_keep_the_newest_versions(test_app: Any,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tables, "SCORED_MAX_VERSIONS", 3)
    tables.scored_by_version.data.clear()
    async with speed.summarize_scored.test_context() as agent:
        for k in range(6):
            await agent.put(value=json.dumps({
                "version": f"v+{k}", "base_version": "v", "scored": k + 1, "classes": {},
                "labels": [], "n_features": 4, "features": "", "probabilities": ""}).encode())
    assert dict(tables.scored_by_version.data.items()) == {"v+3": 4, "v+4": 5, "v+5": 6}


def test_live_and_batch_log_loss_agree_for_the_same_predictions() -> None:
    """The live figure in quality_by_version and the batch test metric come from one function
    with one clipping: a confident mistake (probability 0 for the label) costs the same."""
    from batch.evaluate import classification_metrics
    from models.metrics import LOG_LOSS_EPS

    rng = np.random.default_rng(3)
    p_pos = rng.random(300).astype(np.float32)
    probabilities = np.column_stack([1 - p_pos, p_pos]).astype(np.float32)
    labels = rng.integers(0, 2, 300)
    probabilities[:3] = [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]  # sure, and wrong
    labels[:3] = [1, 0, 1]
    batch = scored_summary.LabelledBatch("v", "v", labels.astype(np.int64), np.zeros((300, 4)),
                                probabilities)
    live = speed.update_quality(None, batch, now_ms=1)["log_loss"]
    offline = classification_metrics(labels, probabilities)["log_loss"]
    assert live == pytest.approx(offline, rel=1e-12)
    picked = probabilities[np.arange(300), labels].astype(np.float64)
    assert live == pytest.approx(-np.mean(np.log(np.maximum(picked, LOG_LOSS_EPS))), rel=1e-5)


class DecisionProducer:
    """Records the decisions the rollout policy publishes."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        #: What tables wrote to their changelogs: (topic, partition, key, value).
        self.changelog: list[tuple[str, int, Any, Any]] = []

    async def send_and_wait(self, topic: str, key: bytes, value: bytes, **kwargs: Any) -> None:
        assert topic == speed.settings.updates_topic and kwargs["partition"] == 0
        self.sent.append(json.loads(value))

    def send_soon(self, fut: Any) -> None:
        m = fut.message
        self.changelog.append((m.channel.get_topic_name(), m.partition, m.key, m.value))


def outcome(version: str, accuracy: float, n: int, seed: int) -> scored_summary.LabelledBatch:
    """``n`` labelled events ``version`` predicted right a share ``accuracy`` of the time."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    right = rng.random(n) < accuracy
    predicted = np.where(right, y, 1 - y)
    P = np.eye(2, dtype=np.float32)[predicted] * 0.8 + 0.1
    return scored_summary.LabelledBatch(version, version.split("+")[0], y.astype(np.int64),
                                        np.zeros((n, len(FEATURES))), P)


def in_rollout(monkeypatch: pytest.MonkeyPatch, rollout: dict[str, Any], learner: bool,
               **settings: Any) -> tuple[protocol.Ledger, DecisionProducer]:
    """v1 serving and v2 announced with ``rollout``, on a worker that is the learner or not,
    with these rollout ``settings``: the ledger, and the producer recording decisions."""
    refs = [{"type": "MODEL-REF", "model": app.settings.model_name, "version": v,
             "manifest": f"s3://b/m/{v}/manifest.json", "sha256": "a" * 64} for v in ("v1", "v2")]
    refs[1]["rollout"] = rollout
    ledger = protocol.replay([protocol.Record(i, json.dumps(r).encode())
                              for i, r in enumerate(refs)], app.settings.model_name)
    monkeypatch.setattr(model_manager.ledger, "base", make_model(version="v1"))
    monkeypatch.setattr(model_manager.ledger, "topic", ledger)
    monkeypatch.setattr(speed, "settings", speed.settings.replace(**settings))
    producer = DecisionProducer()
    monkeypatch.setattr(app, "_producer", producer)
    monkeypatch.setattr(speed.speed_layer, "learner", learner)
    return ledger, producer


@pytest.mark.parametrize("candidate_accuracy, expected", [(0.9, "PROMOTE"), (0.5, "ABORT")])
async def test_the_rollout_policy_publishes_its_decision_once_on_the_learner(
        test_app: Any, monkeypatch: pytest.MonkeyPatch, candidate_accuracy: float,
        expected: str) -> None:
    from transport.lease import worker_lease

    ledger, producer = in_rollout(monkeypatch, {"mode": "shadow"}, learner=True,
                                  rollout_min_events=300, rollout_margin=0.01,
                                  rollout_alpha=0.05)
    worker_lease.confirmed()
    policy = speed.RolloutPolicy()
    # Not enough events yet: nothing is decided.
    assert await policy.step([outcome("v1+3", 0.75, 200, 1), outcome("v2", candidate_accuracy,
                                                                      200, 2)]) is None
    # Another rollout's or version's events count for nothing.
    await policy.step([outcome("v0", 0.0, 500, 3)])
    assert (policy.tracker.serving.n, policy.tracker.candidate.n) == (200, 200)
    sent = await policy.step([outcome("v1+4", 0.75, 300, 4), outcome("v2", candidate_accuracy,
                                                                       300, 5)])
    assert sent is not None and producer.sent == [sent]
    assert (sent["type"], sent["version"], sent["by"]) == (expected, "v2", "policy")
    figures = sent["figures"]
    assert figures["test"] == "two-proportion-z" and figures["n_candidate"] == 500
    assert figures["serving"] == "v1" and figures["accuracy_serving"] == pytest.approx(
        0.75, abs=0.05)
    # The decision is published once, and folds into the ledger like any other.
    assert await policy.step([outcome("v2", candidate_accuracy, 100, 6)]) is None
    folded = protocol.fold(ledger, protocol.Record(2, json.dumps(sent).encode()))
    assert folded.candidate is None
    assert protocol.should_serve(folded) == ("v2" if expected == "PROMOTE" else "v1")


async def test_a_worker_without_the_scored_partition_decides_nothing(
        test_app: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _, producer = in_rollout(monkeypatch, {"mode": "canary", "share": 0.5}, learner=False,
                             rollout_min_events=10)
    policy = speed.RolloutPolicy()
    assert await policy.step([outcome("v1", 0.5, 400, 1), outcome("v2", 0.99, 400, 2)]) is None
    assert producer.sent == [] and policy.verdict() is not None
    assert policy.verdict().action == "promote"  # type: ignore[union-attr]


async def test_a_new_holder_of_the_scored_partition_goes_on_counting_the_rollout(
        test_app: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from transport.lease import worker_lease

    _, producer = in_rollout(monkeypatch, {"mode": "canary", "share": 0.5}, learner=True,
                             rollout_min_events=400)
    worker_lease.confirmed()

    # The first holder counts 200 events a side, stores them, and loses the partition.
    first = speed.RolloutPolicy()
    assert await first.step([outcome("v1", 0.6, 200, 1), outcome("v2", 0.95, 200, 2)],
                            partition=0) is None
    written = [(p, k, v) for t, p, k, v in producer.changelog
               if t == speed.rollout_figures.changelog_topic.get_topic_name()]
    assert written and {p for p, _, _ in written} == {0}
    # The next holder's table is what the changelog restores: the last row written.
    _, key, value = written[-1]
    speed.rollout_figures.data.clear()
    speed.rollout_figures.data[json.loads(key)] = json.loads(value)
    second = speed.RolloutPolicy()
    sent = await second.step([outcome("v1", 0.6, 300, 3), outcome("v2", 0.95, 300, 4)],
                             partition=0)
    assert sent is not None and sent["type"] == "PROMOTE"
    assert (sent["figures"]["n_serving"], sent["figures"]["n_candidate"]) == (500, 500)
    # A third holder knows the decision was published and publishes none.
    third = speed.RolloutPolicy()
    assert await third.step([outcome("v2", 0.95, 50, 5)], partition=0) is None
    assert len(producer.sent) == 1
    # Without the table, a holder would have started again: 300 a side is too few.
    speed.rollout_figures.data.clear()
    afresh = speed.RolloutPolicy()
    assert await afresh.step([outcome("v1", 0.6, 300, 3), outcome("v2", 0.95, 300, 4)]) is None
