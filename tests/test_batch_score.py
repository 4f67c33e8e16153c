"""Batch scoring's rows carry the numbers the prediction messages carry, for both tasks.

End to end (Spark, S3, a worker's POST /predict) it is tested in tests/test_worker.py."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest

from batch.score import prediction_table
from devstack.harness import publish_small_model
from models.registry import Registry
from serving.scoring import encode_predictions

FEATURES = ["a", "b", "c"]


@pytest.mark.parametrize("task, classes", [("classification", ["b", "s"]),
                                           ("classification", [3, 5, 9]),
                                           ("regression", [])])
def test_a_scored_row_equals_the_prediction_message_of_the_same_event(
        tmp_path: Path, task: str, classes: list) -> None:
    registry = Registry(f"file://{tmp_path}/registry")
    ref = publish_small_model(registry, "m", FEATURES, classes, task=task, seed=3)
    model = registry.load_ref(ref)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 3)) * 50
    X[rng.random(X.shape) < 0.1] = np.nan
    ids = [f"e{i}" for i in range(len(X))]
    rows = prediction_table(model, ids, X).to_pylist()
    values, _ = encode_predictions(model, ids, model.outputs(X), now_ms=0)
    messages = [orjson.loads(v) for v in values]
    assert [r["id"] for r in rows] == [m["id"] for m in messages]
    for row, message in zip(rows, messages):
        assert row["model_version"] == message["model_version"] == ref.version
        assert row["predicted"] == message["predicted"]
        if task == "classification":
            assert row["probabilities"] == message["probabilities"]
            assert type(row["predicted"]) is type(classes[0])
        else:
            assert "probabilities" not in row and isinstance(row["predicted"], float)
