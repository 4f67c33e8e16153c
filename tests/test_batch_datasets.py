"""Any tabular dataset: shapes, column names, label types and class counts of users' own data.

Each dataset is written to the real S3 server as Parquet, rebuilt by the job on local Spark and
published; its test accuracy is compared with scikit-learn's MLP trained on exactly the same
preprocessed training rows and scored on the same test rows.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from sklearn.datasets import make_classification
from sklearn.neural_network import MLPClassifier as SklearnMLP

from app.settings import Settings
from batch import prepare
from batch.job import JobConfig, run_job
from models.registry import Registry

pytestmark = pytest.mark.integration


def _features(n: int, n_features: int, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    return make_classification(n_samples=n, n_features=n_features,
                               n_informative=min(n_features, 6), n_redundant=0,
                               n_classes=n_classes, n_clusters_per_class=1, class_sep=1.2,
                               flip_y=0.02, random_state=seed)


def iris_like() -> tuple[pa.Table, dict[str, Any]]:
    """Few features named with spaces and punctuation, three string classes."""
    X, y = _features(3000, 5, 3, seed=1)
    names = ["sepal length (cm)", "sepal.width", "petal-length", "petal width [cm]", "ratio %"]
    table = pa.table({"flower id": [f"f-{i}" for i in range(len(y))],
                      **{name: X[:, i] for i, name in enumerate(names)},
                      "species": np.array(["setosa", "versicolor", "virginica"])[y]})
    return table, {"id_col": "flower id", "label_col": "species", "features": names,
                   "classes": ["setosa", "versicolor", "virginica"]}


def churn_like() -> tuple[pa.Table, dict[str, Any]]:
    """Twenty features, integer 0/1 labels, missing markers, NaN, inf, duplicate ids and a
    constant column."""
    X, y = _features(3000, 20, 2, seed=2)
    rng = np.random.default_rng(2)
    X[rng.random(X.shape) < 0.03] = np.nan
    X[rng.random(X.shape) < 0.01] = -999.0
    X[rng.random(X.shape) < 0.005] = np.inf
    ids = np.arange(len(y))
    ids[-50:] = ids[:50]  # 50 duplicated ids: one row each is kept
    columns = {f"f{i}": X[:, i] for i in range(X.shape[1])}
    columns["plan"] = np.full(len(y), 7.0)  # constant
    table = pa.table({"customer": ids, **columns, "churned": y.astype(np.int64)})
    return table, {"id_col": "customer", "label_col": "churned",
                   "features": list(columns), "classes": [0, 1]}


def sensor_like() -> tuple[pa.Table, dict[str, Any]]:
    """Twelve integer and float features, four non-contiguous integer classes."""
    X, y = _features(4000, 12, 4, seed=3)
    labels = np.array([3, 7, 11, 42])[y]
    columns = {f"s{i:02d}": X[:, i] for i in range(8)}
    columns.update({f"count_{i}": np.round(X[:, 8 + i] * 10).astype(np.int32)
                    for i in range(4)})
    table = pa.table({"id": [f"r{i}" for i in range(len(y))], **columns,
                      "label": labels.astype(np.int32)})
    return table, {"id_col": "id", "label_col": "label", "features": list(columns),
                   "classes": [3, 7, 11, 42]}


@pytest.mark.parametrize("make", [iris_like, churn_like, sensor_like],
                         ids=["spaces-3-string-classes", "20-features-dirty-int-labels",
                              "12-features-4-int-classes"])
def test_a_dataset_of_any_shape_gives_a_model_on_par_with_scikit_learn(
        make: Callable[[], tuple[pa.Table, dict[str, Any]]], spark: Any,
        settings_env: Callable[..., dict[str, str]]) -> None:
    settings = Settings.from_env(settings_env())
    table, expected = make()
    uri = f"{settings.lake_uri.rsplit('/lake/', 1)[0]}/datasets/{make.__name__}"
    fs = s3fs.S3FileSystem(**settings.storage_options)
    half = len(table) // 2  # two files: the reader must combine them
    for i, part in enumerate((table.slice(0, half), table.slice(half))):
        with fs.open(f"{uri}/part-{i}.parquet", "wb") as out:
            pq.write_table(part, out)

    config = JobConfig(data_uri=uri, model_name=make.__name__.replace("_", "-"),
                       id_col=expected["id_col"], label_col=expected["label_col"],
                       hidden=(32,), dropout=0.0, epochs=20, batch_size=64, lr=0.003,
                       patience=3, announce=False, keep_arrays=True)
    result = run_job(settings, config, spark=spark)

    assert result.published, result.decision.reason
    assert result.features == expected["features"]
    assert result.classes == expected["classes"]
    model = Registry(settings.registry_uri, settings.storage_options).load_ref(result.ref)
    assert model.classes == expected["classes"] and model.features == expected["features"]
    if make is churn_like:
        assert result.rows["read"] == 3000 and result.rows["usable"] == 2950
        assert result.constant_features == ["plan"]

    X_train, y_train = result.arrays[prepare.TRAIN]
    X_test, y_test = result.arrays[prepare.TEST]
    reference = SklearnMLP(hidden_layer_sizes=(32,), max_iter=300, random_state=0)
    reference.fit(X_train, y_train)
    sklearn_accuracy = float(np.mean(reference.predict(X_test) == y_test))
    ours = result.metrics["accuracy"]
    print(f"{make.__name__}: stratum test accuracy {ours:.4f}, "
          f"scikit-learn MLP {sklearn_accuracy:.4f} ({len(y_test)} test rows)")
    assert ours >= sklearn_accuracy - 0.03
    assert ours > result.metrics["baseline_accuracy"] + 0.2


def _newest_rows(rows: list[tuple[Any, ...]]) -> dict[str, tuple[Any, ...]]:
    """The reference rule: per usable id, the row with the latest ``ts`` (missing ts last)."""
    best: dict[str, tuple[Any, ...]] = {}
    for row in rows:
        ident, x, label, ts = row
        if ident is None or label is None:
            continue
        kept = best.get(ident)
        if kept is None or (ts is not None and (kept[3] is None or ts > kept[3])):
            best[ident] = row
    return {ident: (x, label) for ident, (_, x, label, _) in best.items()}


def test_duplicate_ids_keep_their_newest_row_however_many_ids_repeat(spark: Any) -> None:
    rows: list[tuple[Any, ...]] = [(f"e{i}", float(i), "s" if i % 3 else "b", 1_000 + i)
                                   for i in range(300)]
    rows += [(f"e{i}", -float(i), "b", 5_000 + i) for i in range(0, 60, 2)]  # newer copies
    rows += [(f"e{i}", -float(i), "s", 10 + i) for i in range(1, 60, 2)]  # older copies
    rows += [("e200", 0.5, "s", 9_000), ("e200", 0.25, "b", 8_000)]  # three copies
    rows += [("e201", 7.0, "s", None)]  # a copy without event time loses
    rows += [(None, 1.0, "s", 1), ("e-unlabelled", 1.0, None, 1)]
    df = spark.createDataFrame(rows, "id string, x double, label string, ts long")
    expected = _newest_rows(rows)
    assert len(expected) == 300

    # Few repeated ids (deduplicated apart), and every row through the shuffle.
    for limit in (None, 0):
        cleaned = prepare.clean(df, ["x"], "id", "label", broadcast_keys=limit)
        assert cleaned.columns == ["id", "x", "label", "ts"]
        got = {r["id"]: (r["x"], r["label"]) for r in cleaned.collect()}
        assert got == expected, f"broadcast_keys={limit}"

    # No repeated id: every usable row comes through once, as it was.
    unique = [row for row in rows[:300]] + [(None, 1.0, "s", 1)]
    cleaned = prepare.clean(spark.createDataFrame(unique, df.schema), ["x"], "id", "label")
    assert sorted(r["id"] for r in cleaned.collect()) == sorted(f"e{i}" for i in range(300))

    # Without an event time any one copy of a repeated id is kept.
    no_ts = prepare.clean(df.drop("ts"), ["x"], "id", "label").collect()
    assert sorted(r["id"] for r in no_ts) == sorted(expected)
    assert all((r["x"], r["label"]) in {(x, label) for i, x, label, _ in rows if i == r["id"]}
               for r in no_ts)


def test_values_whose_square_overflows_are_missing_not_fatal(spark: Any) -> None:
    """A valid event may carry 1e200: the lake keeps it, and the job treats it as missing
    rather than let it turn the preprocessing statistics infinite and fail every run."""
    rows = [("a", 1.0, "s"), ("b", 1e200, "b"), ("c", -1e150, "s"), ("d", 3.0, "b"),
            ("e", float("inf"), "s"), ("f", -999.0, "b"), ("g", prepare.MAX_ABS_VALUE, "s")]
    df = spark.createDataFrame(rows, "id string, x double, label string")
    cleaned = {r["id"]: r["x"] for r in prepare.clean(df, ["x"], "id", "label").collect()}
    assert cleaned == {"a": 1.0, "b": None, "c": None, "d": 3.0, "e": None, "f": None,
                       "g": prepare.MAX_ABS_VALUE}
