"""Agents and serving logic without Kafka: ``test_context()`` and plain functions."""
from __future__ import annotations

import json
from typing import Any, Iterator, Sequence

import numpy as np
import pytest

from app import app
from agents import tables
from agents.model_manager import ModelManager
from agents.scoring import SourceMessage, class_counts, score, triage

FEATURES = ["a", "b"]
CLASSES = ["no", "yes"]


class Threshold:
    """A model whose P(yes) is a logistic function of feature a: enough to check wiring."""

    version = "v-test"
    features: Sequence[str] = FEATURES
    classes: Sequence[Any] = CLASSES

    def predict_proba(self, rows: np.ndarray) -> np.ndarray:
        p = 1 / (1 + np.exp(-rows[:, 0]))
        return np.stack([1 - p, p], axis=1).astype(np.float32)


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
    assert ledger.pinned == ok["version"] and manager._candidates() == [ok["version"]]
    assert manager._record(json.dumps({**pin, "version": 7}).encode(), 7) is False
    assert ledger.pinned == ok["version"] and "bad pin" in ledger.last_refusal.reason
    assert manager._record(json.dumps({**pin, "version": None}).encode(), 8) is True
    assert ledger.pinned is None


async def test_count_versions_agent_adds_batch_counts(test_app: Any) -> None:
    async with tables.count_versions.test_context() as agent:
        await agent.put(key="v1", value=3)
        await agent.put(key="v1", value=4)
        await agent.put(key="v2", value=1)
    assert tables.scored_by_version["v1"] == 7 and tables.scored_by_version["v2"] == 1


async def test_count_classes_agent_fills_the_current_window(test_app: Any) -> None:
    async with tables.count_classes.test_context() as agent:
        await agent.put(key="yes", value=5)
        await agent.put(key="yes", value=2)
    assert tables.class_counts["yes"].now() == 7


async def test_record_predictions_keeps_the_latest_per_id(test_app: Any) -> None:
    first = json.dumps({"id": "x", "predicted": "no"}).encode()
    second = json.dumps({"id": "x", "predicted": "yes"}).encode()
    async with tables.record_predictions.test_context() as agent:
        await agent.put(key=b"x", value=first)
        await agent.put(key=b"x", value=second)
        await agent.put(key=b"y", value=first)
    assert tables.latest_predictions[b"x"] == second
    rows = tables.table_rows("latest_predictions", 10)
    assert rows["size"] == 2 and rows["rows"][0]["value"]["predicted"] in ("yes", "no")


async def test_a_micro_batch_the_broker_did_not_store_stops_the_worker_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No later micro-batch is needed to notice (none comes while the group rebalances)."""
    import asyncio

    from agents import serving

    crashed: list[BaseException] = []
    crash_called = asyncio.Event()

    async def crash(reason: BaseException) -> None:
        crashed.append(reason)
        crash_called.set()

    monkeypatch.setattr(serving.app, "crash", crash)
    failure = RuntimeError("KafkaTimeoutError: batch expired")
    failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    failed.add_done_callback(serving._stop_worker_if_not_stored)
    stored: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    stored.add_done_callback(serving._stop_worker_if_not_stored)
    cancelled: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    cancelled.add_done_callback(serving._stop_worker_if_not_stored)
    stored.set_result(None)
    cancelled.cancel()
    failed.set_exception(failure)
    await asyncio.wait_for(crash_called.wait(), timeout=5)
    assert crashed == [failure]  # once: the stored and the cancelled batch crash nothing
    assert failed.exception() is failure
