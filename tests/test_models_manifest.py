"""Manifest schema: a valid manifest round-trips, every kind of damage is named."""
from __future__ import annotations

import copy
import json
import math
from typing import Any, Callable

import numpy as np
import pytest

from models.errors import ManifestError
from models.manifest import FORMAT_VERSION, Manifest

SHA = "0" * 64


def valid_dict() -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "name": "default",
        "version": "20261123T140501Z-3fa2c1",
        "created_at": "2026-11-23T14:05:01Z",
        "parent_version": None,
        "forced": False,
        "task": "classification",
        "features": ["x", "y"],
        "classes": ["b", "s"],
        "preprocessing": {"features": ["x", "y"], "fill": [0.0, 1.0], "mean": [0.0, 1.0],
                          "std": [1.0, 2.0]},
        "architecture": {"type": "mlp", "n_features": 2, "n_outputs": 2, "hidden": [4],
                         "dropout": 0.1},
        "metrics": {"accuracy": 0.8, "log_loss": 0.4, "auc": 0.9, "n": 100},
        "training": {"rows": 500},
        "reference": {"inputs": [[1.0, None]], "outputs": [[0.25, 0.75]], "atol": 1e-4},
        "files": {"model.pt": SHA},
    }


def test_valid_manifest_round_trips_through_json() -> None:
    manifest = Manifest.from_dict(valid_dict())
    again = Manifest.from_json(manifest.to_json())
    assert again == manifest
    assert json.loads(manifest.to_json())["reference"]["inputs"] == [[1.0, None]]


def test_nan_reference_inputs_are_written_as_null_and_read_back_as_nan() -> None:
    manifest = Manifest.from_dict(valid_dict())
    manifest.reference.inputs = [[float("nan"), 2.0]]
    raw = manifest.to_json()
    assert b"NaN" not in raw
    inputs, probs, atol = Manifest.from_json(raw).reference_arrays()
    assert math.isnan(inputs[0, 0]) and inputs[0, 1] == 2.0
    assert probs.tolist() == [[0.25, 0.75]] and atol == 1e-4


def test_unknown_keys_are_ignored_for_forward_compatibility() -> None:
    data = valid_dict()
    data["added_later"] = {"anything": 1}
    assert Manifest.from_dict(data).name == "default"


def _set(path: str, value: Any) -> Callable[[dict], None]:
    def change(data: dict) -> None:
        *parents, leaf = path.split(".")
        target = data
        for key in parents:
            target = target[key]
        target[leaf] = value
    return change


def _drop(key: str) -> Callable[[dict], None]:
    return lambda data: data.pop(key)


@pytest.mark.parametrize("change, reason", [
    (_drop("features"), "missing required field `features`"),
    (_drop("files"), "missing required field `files`"),
    (_drop("reference"), "missing required field `reference`"),
    (_set("format_version", 2), "unsupported format_version"),
    (_set("name", "a/b"), r"matching regex .* at `\$\.name`"),
    (_set("version", "../x"), r"matching regex .* at `\$\.version`"),
    (_set("version", "a..b"), "version 'a..b' is not a valid name"),
    (_set("created_at", "yesterday"), "not ISO 8601"),
    (_set("created_at", "2026-11-23T14:05:01+02:00"), "must be in UTC"),
    (_set("features", ["x", "x"]), "duplicate names"),
    (_set("classes", ["b"]), "at least two class labels"),
    (_set("classes", ["b", 1]), "all strings or all integers"),
    (_set("classes", ["b", "b"]), "duplicate labels"),
    (_set("preprocessing.features", ["y", "x"]), "differ from 'features'"),
    (_set("preprocessing.std", [1.0, 0.0]), "'preprocessing'.*positive"),
    (_set("architecture.n_features", 3), "n_features 3 != 2"),
    (_set("architecture.n_outputs", 3), "n_outputs 3 != 2"),
    (_set("architecture.type", "cnn"), r"Invalid value 'cnn' - at `\$\.architecture\.type`"),
    (_set("architecture.hidden", [0]), r">= 1 - at `\$\.architecture\.hidden\[0\]`"),
    (_set("architecture.dropout", 1.0), r"< 1.0 - at `\$\.architecture\.dropout`"),
    (_set("metrics", {"accuracy": 0.8, "log_loss": 0.4}), "lacks 'auc'"),
    (_set("metrics.accuracy", "high"), r"Expected `float`, got `str` - at `\$\.metrics"),
    (_set("reference.inputs", []), r"length >= 1 - at `\$\.reference\.inputs`"),
    (_set("reference.inputs", [[1.0]]), "must hold 2 numbers or nulls"),
    (_set("reference.outputs", [[0.5, 1.5]]), r"are probabilities: numbers in \[0, 1\]"),
    (_set("reference.outputs", [[0.5]]), "output rows must hold 2 finite numbers"),
    (_set("reference.atol", 0), r"> 0.0 - at `\$\.reference\.atol`"),
    (_set("files", {}), r"length >= 1 - at `\$\.files`"),
    (_set("files", {"model.pt": "abc"}), r"\[0-9a-f\]\{64\}.* at `\$\.files"),
    (_set("files", {"../model.pt": SHA}), r"at `key` in `\$\.files`"),
    (_set("files", {"manifest.json": SHA}), "must not list manifest.json"),
    (_set("forced", "yes"), r"Expected `bool`, got `str` - at `\$\.forced`"),
    (_set("metrics.accuracy", float("nan")), "metric 'accuracy' must be a finite number"),
    (_set("classes", ["b", True]), r"at `\$\.classes\[1\]`"),
])
def test_schema_violations_are_reported_with_the_reason(change: Callable[[dict], None],
                                                        reason: str) -> None:
    data = copy.deepcopy(valid_dict())
    change(data)
    with pytest.raises(ManifestError, match=reason):
        Manifest.from_dict(data)


def test_three_classes_need_no_auc_and_integer_classes_are_fine() -> None:
    data = valid_dict()
    data["classes"] = [0, 1, 2]
    data["architecture"]["n_outputs"] = 3
    data["metrics"] = {"accuracy": 0.5, "log_loss": 1.0}
    data["reference"]["outputs"] = [[0.2, 0.3, 0.5]]
    assert Manifest.from_dict(data).classes == [0, 1, 2]


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_garbage_is_a_manifest_error(raw: bytes) -> None:
    with pytest.raises(ManifestError):
        Manifest.from_json(raw)


def regression_dict() -> dict[str, Any]:
    data = valid_dict()
    data.update(task="regression", classes=[],
                metrics={"rmse": 1.5, "mae": 1.1, "r2": 0.7, "n": 100})
    data["architecture"]["n_outputs"] = 1
    data["reference"]["outputs"] = [[1234.5]]
    return data


def test_a_regression_has_one_output_no_classes_and_its_own_metrics() -> None:
    manifest = Manifest.from_dict(regression_dict())
    assert manifest.task == "regression" and manifest.n_outputs == 1
    assert Manifest.from_json(manifest.to_json()) == manifest
    # Reference values of a regression are not probabilities: any finite number.
    assert manifest.reference_arrays()[1].tolist() == [[1234.5]]


@pytest.mark.parametrize("change, reason", [
    (_set("classes", ["a", "b"]), "a regression has no 'classes'"),
    (_set("architecture.n_outputs", 2), "n_outputs 2 != 1"),
    (_set("metrics", {"rmse": 1.0, "mae": 1.0}), "lacks 'r2'"),
    (_set("reference.outputs", [[float("inf")]]), "finite numbers"),
    (_set("task", "ranking"), r"Invalid enum value 'ranking' - at `\$\.task`"),
])
def test_regression_violations_are_reported(change: Callable[[dict], None],
                                            reason: str) -> None:
    data = copy.deepcopy(regression_dict())
    change(data)
    with pytest.raises(ManifestError, match=reason):
        Manifest.from_dict(data)


def test_a_factory_architecture_round_trips_with_its_parameters() -> None:
    data = valid_dict()
    data["architecture"] = {"type": "factory", "factory": "demo.networks:residual_mlp",
                            "n_features": 2, "n_outputs": 2, "params": {"width": 8}}
    manifest = Manifest.from_dict(data)
    assert manifest.architecture_dict() == data["architecture"]
    data["architecture"]["factory"] = "os.system"
    with pytest.raises(ManifestError, match=r"at `\$\.architecture\.factory`"):
        Manifest.from_dict(data)


def test_manifests_written_before_regression_are_read() -> None:
    data = valid_dict()
    data.pop("task")
    data["architecture"]["n_classes"] = data["architecture"].pop("n_outputs")
    data["reference"]["probabilities"] = data["reference"].pop("outputs")
    manifest = Manifest.from_dict(data)
    assert manifest.task == "classification"
    assert manifest.architecture_dict()["n_outputs"] == 2
    assert "n_classes" not in manifest.architecture_dict()
    assert manifest.reference.outputs == [[0.25, 0.75]]
    assert b"probabilities" not in manifest.to_json()


def test_free_form_facts_of_numpy_and_str_subclasses_are_written_as_plain_json() -> None:
    class Version(str):
        pass

    manifest = Manifest.from_dict(valid_dict())
    manifest.training = {"torch": Version("2.5.1"), "rows": np.int64(500),
                         "loss": np.float32(0.5), "history": np.array([1.0, 2.0])}
    again = Manifest.from_json(manifest.validate().to_json())
    assert again.training == {"torch": "2.5.1", "rows": 500, "loss": 0.5, "history": [1.0, 2.0]}
