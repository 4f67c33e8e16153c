"""The speed layer: labelled-event forwarding, the quality table, and UP updates end to end.

Unit tests call the pure functions and run the agent with ``test_context()``; the integration
test runs a real worker against the real broker and S3 server and watches labelled events
turn into a chain of UP messages that serving applies.
"""
from __future__ import annotations

import base64
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest

from agents import speed, tables
from agents.model_manager import model_manager
from app import app
from app.schemas import decode_events
from app.settings import Settings
from app.topics import ensure_topics
from models.online import ModelUpdate
from models.registry import Registry
from tests.support import (WorkerProcess, announce, consume_until, http, produce,
                           publish_small_model, run)
from tests.test_online import make_model, make_update

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
    return speed.summary_messages(Scorer(), predicted, columns.ids, columns.labels,
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
    summary = speed.parse_summary(messages[0])
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
    assert batch.log_loss_sum() == pytest.approx(-math.log(0.2) - math.log(0.6), rel=1e-6)
    unlabelled, _ = scored_batch([{"id": "b", "features": [1, 2, 3, 4]}])
    [only] = forward(unlabelled, probabilities[:1])
    assert speed.parse_summary(only) == speed.ScoredSummary("v1+2", 1, {"neg": 1}, None)


def test_a_large_batch_is_forwarded_in_bounded_messages() -> None:
    n = speed.LABELLED_PER_MESSAGE + 10
    columns = decode_events([json.dumps({"id": str(i), "features": [i, 0, 0, 0],
                                         "label": "neg"}).encode() for i in range(n)],
                            FEATURES, CLASSES)
    probabilities = np.tile(np.array([[0.9, 0.1]], dtype=np.float32), (n, 1))
    decoded = [speed.parse_summary(m) for m in forward(columns, probabilities)]
    assert [(d.scored, d.classes) for d in decoded] == [(n, {"neg": n}), (0, {})]
    assert [len(d.labelled) for d in decoded] == [speed.LABELLED_PER_MESSAGE, 10]
    assert np.concatenate([d.labelled.features[:, 0] for d in decoded]).tolist() == list(
        range(n))


def encoded(array: list[Any], dtype: str) -> str:
    return base64.b64encode(np.asarray(array, dtype=dtype).tobytes()).decode()


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
        speed.parse_summary(raw)


def batch_of(version: str, labels: list[int], p_pos: float,
             base: str = "v1") -> speed.LabelledBatch:
    n = len(labels)
    return speed.LabelledBatch(version, base, np.asarray(labels, dtype=np.int64),
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
    from agents.tables import table_rows  # what GET /tables/{name}/ and the web view show

    shown = table_rows("quality_by_version", 10)
    assert shown["size"] == 2 and shown["rows"][0]["key"] == "v1+1"


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
    saved = dict(ledger.updates)
    try:
        ledger.updates.pop(base.version, None)
        assert layer.next_seq(base) == (None, 1)
        applied = make_update(base, seq=4)
        ledger.updates[base.version] = applied
        assert layer.next_seq(base) == (applied, 5)
        layer.published = make_update(base, seq=6)
        assert layer.next_seq(base) == (layer.published, 7)
        layer.published = make_update(base, seq=2)
        assert layer.next_seq(base) == (applied, 5)
    finally:
        ledger.updates.clear()
        ledger.updates.update(saved)
    # A new base version starts afresh.
    other = make_model(version="20261124T000000Z-abcdef")
    layer.collect([batch_of(other.version, [1], 0.5, other.version)], other)
    assert layer.pending == 1 and layer.pending_base == other.version


def test_the_learner_holds_at_most_its_buffer_of_examples(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    import dataclasses

    base = make_model()
    monkeypatch.setattr(speed, "settings", dataclasses.replace(speed.settings, speed_buffer=100))
    layer = speed.SpeedLayer()
    for _ in range(30):
        layer.collect([batch_of(base.version, [1] * 40, 0.5, base.version)], base)
    assert 100 <= layer.pending < 140


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
    status, page, _ = http("GET", f"{worker.url}/")
    assert status == 200 and "quality_by_version" in page and f"{base}+1" in page


def poll(read: Callable[[], Any], ok: Callable[[Any], bool], timeout: float = 60.0) -> Any:
    """Call ``read`` until ``ok(value)`` holds; return the value (fail after ``timeout``)."""
    deadline = time.monotonic() + timeout
    value = read()
    while not ok(value):
        assert time.monotonic() < deadline, f"condition not met after {timeout}s: {value!r}"
        time.sleep(0.2)
        value = read()
    return value


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
    batch = speed.LabelledBatch("v", "v", labels.astype(np.int64), np.zeros((300, 4)),
                                probabilities)
    live = speed.update_quality(None, batch, now_ms=1)["log_loss"]
    offline = classification_metrics(labels, probabilities)["log_loss"]
    assert live == pytest.approx(offline, rel=1e-12)
    picked = probabilities[np.arange(300), labels].astype(np.float64)
    assert live == pytest.approx(-np.mean(np.log(np.maximum(picked, LOG_LOSS_EPS))), rel=1e-5)
