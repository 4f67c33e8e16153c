"""The shared preprocessing: missing markers, imputation, standardisation, (de)serialisation."""
from __future__ import annotations

import json

import numpy as np
import pytest

from models.errors import ModelError
from models.preprocessing import (
    MAX_STANDARDISED,
    MISSING_MARKER,
    Preprocessor,
    fit_preprocessor,
    missing_mask,
    preprocessor_from_stats,
    sufficient_statistics,
)

FEATURES = ["a", "b", "c"]


def test_missing_mask_marks_marker_nan_and_infinities_only() -> None:
    X = np.array([[MISSING_MARKER, np.nan, np.inf, -np.inf, -998.999, 0.0, -999.0001]])
    assert missing_mask(X).tolist() == [[True, True, True, True, False, False, False]]


def test_fit_imputes_with_mean_of_present_values_and_standardises() -> None:
    X = np.array([[1.0, 10.0, MISSING_MARKER],
                  [3.0, np.nan, 5.0],
                  [MISSING_MARKER, 30.0, 7.0]])
    p = fit_preprocessor(FEATURES, X)
    assert p.fill == pytest.approx([2.0, 20.0, 6.0])
    assert p.mean == pytest.approx([2.0, 20.0, 6.0])
    assert p.std == pytest.approx([1.0, 10.0, 1.0])
    out = p.transform(X)
    assert out.dtype == np.float32 and out.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(out, [[-1.0, -1.0, 0.0], [1.0, 0.0, -1.0], [0.0, 1.0, 1.0]])


def test_transform_leaves_its_input_alone_and_treats_all_markers_alike() -> None:
    p = Preprocessor(FEATURES, fill=[1.0, 2.0, 3.0], mean=[0.0, 0.0, 0.0], std=[1.0, 2.0, 4.0])
    X = np.array([[np.nan, -np.inf, MISSING_MARKER], [1.0, 2.0, 3.0]])
    before = X.copy()
    out = p.transform(X)
    np.testing.assert_array_equal(X, before)
    np.testing.assert_allclose(out, [[1.0, 1.0, 0.75], [1.0, 1.0, 0.75]])


def test_constant_and_never_present_features_get_unit_std_and_zero_fill() -> None:
    X = np.array([[5.0, MISSING_MARKER, 1e6], [5.0, np.nan, 1e6], [5.0, MISSING_MARKER, 1e6]])
    p = fit_preprocessor(FEATURES, X)
    assert p.std == [1.0, 1.0, 1.0]
    assert p.fill[1] == 0.0
    out = p.transform(X)
    assert np.all(np.isfinite(out)) and np.allclose(out, 0.0)


def test_stats_of_parts_add_up_to_the_stats_of_the_whole() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(50.0, 7.0, size=(1000, 3))
    X[rng.random(X.shape) < 0.2] = MISSING_MARKER
    whole = fit_preprocessor(FEATURES, X)
    a, b = sufficient_statistics(X[:300]), sufficient_statistics(X[300:])
    merged = preprocessor_from_stats(FEATURES, *(x + y for x, y in zip(a, b)))
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-12)
    np.testing.assert_allclose(merged.std, whole.std, rtol=1e-9)
    present = np.where(missing_mask(X), np.nan, X)
    np.testing.assert_allclose(whole.std, np.nanstd(present, axis=0), rtol=1e-9)


def test_dict_round_trip_through_json_gives_the_same_transform() -> None:
    rng = np.random.default_rng(1)
    X = rng.normal(size=(50, 3))
    p = fit_preprocessor(FEATURES, X)
    q = Preprocessor.from_dict(json.loads(json.dumps(p.to_dict())))
    assert q == p
    np.testing.assert_array_equal(q.transform(X), p.transform(X))


@pytest.mark.parametrize("change, reason", [
    ({"fill": [0.0, 0.0]}, "'fill' has 2 values"),
    ({"std": [1.0, 0.0, 1.0]}, "'std' must be positive"),
    ({"mean": [0.0, float("nan"), 0.0]}, "finite"),
    ({"features": ["a", "a", "c"]}, "unique"),
    ({"missing": {"marker": -1.0}}, "missing marker"),
])
def test_from_dict_rejects_bad_parameters(change: dict, reason: str) -> None:
    data = fit_preprocessor(FEATURES, np.eye(3)).to_dict()
    data.update(change)
    with pytest.raises(ModelError, match=reason):
        Preprocessor.from_dict(data)


def test_transform_rejects_the_wrong_width() -> None:
    p = fit_preprocessor(FEATURES, np.eye(3))
    with pytest.raises(ModelError, match=r"shape \(n, 3\)"):
        p.transform(np.zeros((2, 4)))


def test_the_largest_finite_values_stay_finite_and_keep_their_sign() -> None:
    """A raw 1e308 is a valid number; standardised in float32 it would be infinite and the
    network's output NaN."""
    p = fit_preprocessor(FEATURES, np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]]))
    out = p.transform(np.array([[1.7976931348623157e308, -1e308, 1e300],
                                [5e-324, -0.0, 0.5]]))
    assert np.isfinite(out).all()
    assert out[0].tolist() == [MAX_STANDARDISED, -MAX_STANDARDISED, MAX_STANDARDISED]
    # Ordinary values are not touched.
    np.testing.assert_allclose(out[1], [-1.0, -1.0, -2.0 / 3.0], rtol=1e-6)


def _sequential_statistics(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Count, sum and sum of squares added one row after another, as a Spark task sums."""
    return (np.full(X.shape[1], float(len(X))), np.cumsum(X, axis=0)[-1],
            np.cumsum(X * X, axis=0)[-1])


def test_the_batch_report_and_the_serving_transform_agree_on_constant_features() -> None:
    """A feature the batch run reports as constant ("standardised to 0") is one that serving,
    from the manifest's parameters, turns into 0; any other keeps its spread."""
    from batch.prepare import constant_features

    rng = np.random.default_rng(4)
    n = 200_000
    X = np.column_stack([
        np.full(n, 0.1),                           # constant: its sums carry rounding noise
        0.5 + rng.choice([-1e-8, 1e-8], n),        # near-constant: a spread of 2e-8 on 0.5
        rng.normal(3.0, 2.0, n),                   # a feature
    ])
    features = ["const", "near", "x"]
    stats = _sequential_statistics(X)
    reported = constant_features(features, *stats)
    manifest = json.loads(json.dumps(preprocessor_from_stats(features, *stats).to_dict()))
    serving = Preprocessor.from_dict(manifest)
    out = serving.transform(X[:1000])
    assert reported == ["const", "near"]
    for i, name in enumerate(features):
        if name in reported:
            assert serving.std[i] == 1.0
            assert np.abs(out[:, i]).max() < 1e-6, name
        else:
            assert 0.9 < out[:, i].std() < 1.1


def test_parameters_that_scale_a_constant_feature_up_are_refused() -> None:
    data = fit_preprocessor(FEATURES, np.eye(3)).to_dict()
    data["mean"], data["std"] = [0.5, 0.0, 0.0], [1e-8, 1.0, 1.0]
    with pytest.raises(ModelError, match="'a' is 1e-08 around a mean of 0.5: no spread"):
        Preprocessor.from_dict(data)
