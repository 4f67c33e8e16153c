"""Regression quality: the batch job with its shipped defaults against scikit-learn on the same
rows.

Starts its own Kafka broker and S3 server on free ports, writes each dataset below to the lake
as Parquet (an id column, the features, a ``label`` column) and runs the whole batch job on it
as ``python -m batch run`` would: the ``BATCH_*`` defaults, ``BATCH_TASK=auto`` (the task comes
from the label). In the same run it fits scikit-learn's ``MLPRegressor`` and a linear baseline
(``RidgeCV``) on exactly the job's training and validation rows, preprocessed as the job
preprocessed them (its result's arrays), and scores all three on the job's test rows (the
split is the job's seeded hash of the id). ``MLPRegressor`` gets what a practitioner gives it:
``max_iter=500``, early stopping, and a standardised target (``TransformedTargetRegressor``).

Datasets (``--datasets``):

* ``diabetes``: scikit-learn's bundled diabetes data (442 patients, 10 raw features, disease
  progression after a year), the only real regression dataset shipped with the installed
  packages that is big enough to split (``linnerud`` has 20 rows; the ``fetch_*`` ones need the
  network);
* ``friedman1``: Friedman's first problem (``make_friedman1``, 5,000 rows, 10 features of which
  5 matter, noise 1): smooth and non-linear;
* ``linear-wide``: ``make_regression`` with 8,000 rows, 200 features of which 40 matter,
  noise 20, the label shifted to around 1,000: linear, wide;
* ``counts``: 6,000 rows, 8 features, a Poisson count label (an integer with well over 100
  distinct values, which ``auto`` makes a regression).

``--also '{"hidden": "64,64", "epochs": 200, ...}'`` adds a Stratum row per dataset with those
JobConfig fields changed (e.g. to see what the defaults leave on the table).

    .venv/bin/python bench/regression.py [--datasets diabetes,friedman1,linear-wide,counts]
                                         [--also JSON] [--threads 2] [--keep]

Ends with one line holding a JSON object of the figures.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from app.settings import Settings  # noqa: E402
from batch import prepare  # noqa: E402
from batch.job import JobConfig, JobResult, run_job  # noqa: E402
from devstack.harness import batch_deployment, write_dataset  # noqa: E402


def say(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def load_average() -> float:
    """One-minute load average (the machine may be shared)."""
    return round(os.getloadavg()[0], 2)


# ------------------------------------------------------------------------------- datasets
def diabetes() -> tuple[np.ndarray, np.ndarray, list[str]]:
    from sklearn.datasets import load_diabetes

    data = load_diabetes(scaled=False)
    return data.data, data.target.astype(np.float64), list(data.feature_names)


def friedman1() -> tuple[np.ndarray, np.ndarray, list[str]]:
    from sklearn.datasets import make_friedman1

    X, y = make_friedman1(n_samples=5000, n_features=10, noise=1.0, random_state=0)
    return X, y, [f"x{i}" for i in range(X.shape[1])]


def linear_wide() -> tuple[np.ndarray, np.ndarray, list[str]]:
    from sklearn.datasets import make_regression

    X, y = make_regression(n_samples=8000, n_features=200, n_informative=40, noise=20.0,
                           random_state=0)
    return X, 1000.0 + y, [f"f{i:03d}" for i in range(X.shape[1])]


def counts() -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(6000, 8))
    rate = np.exp(3.5 + 0.6 * X[:, 0] - 0.4 * X[:, 1] + 0.3 * X[:, 2] * X[:, 3])
    return X, rng.poisson(rate).astype(np.int64), [f"c{i}" for i in range(X.shape[1])]


DATASETS: dict[str, Callable[[], tuple[np.ndarray, np.ndarray, list[str]]]] = {
    "diabetes": diabetes, "friedman1": friedman1, "linear-wide": linear_wide,
    "counts": counts}


def write(settings: Settings, name: str, X: np.ndarray, y: np.ndarray,
          features: list[str]) -> str:
    return write_dataset(settings, name, pa.table(
        {"id": [f"{name}-{i}" for i in range(len(y))],
         **{f: X[:, i] for i, f in enumerate(features)}, "label": y}))


# ------------------------------------------------------------------------------- scoring
def scores(y: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    from models.metrics import regression_metrics

    m = regression_metrics(y, predicted)
    return {"r2": round(m["r2"], 4), "rmse": round(m["rmse"], 4), "mae": round(m["mae"], 4)}


def sklearn_rows(result: JobResult) -> dict[str, dict[str, Any]]:
    """MLPRegressor and RidgeCV fitted on the job's training and validation rows (as the job
    preprocessed them) and scored on its test rows."""
    from sklearn.compose import TransformedTargetRegressor
    from sklearn.linear_model import RidgeCV
    from sklearn.neural_network import MLPRegressor
    from sklearn.preprocessing import StandardScaler

    assert result.arrays is not None
    X_train, y_train = result.arrays[prepare.TRAIN]
    X_val, y_val = result.arrays[prepare.VALIDATION]
    X_test, y_test = result.arrays[prepare.TEST]
    X_fit, y_fit = np.concatenate([X_train, X_val]), np.concatenate([y_train, y_val])
    models = {
        "sklearn MLPRegressor": TransformedTargetRegressor(
            MLPRegressor(hidden_layer_sizes=(100,), max_iter=500, early_stopping=True,
                         random_state=0),
            transformer=StandardScaler()),
        "linear (RidgeCV)": RidgeCV(alphas=np.logspace(-3, 3, 13)),
    }
    out = {}
    for name, model in models.items():
        started = time.perf_counter()
        model.fit(X_fit, y_fit)
        seconds = time.perf_counter() - started
        out[name] = {**scores(y_test, model.predict(X_test)), "seconds": round(seconds, 2)}
    mean = float(np.mean(y_train))
    out["training mean"] = {**scores(y_test, np.full(len(y_test), mean)), "seconds": 0.0}
    return out


def run_dataset(name: str, settings: Settings, spark: Any, threads: int,
                also: dict[str, Any]) -> dict[str, Any]:
    X, y, features = DATASETS[name]()
    uri = write(settings, name, X, y, features)
    say(f"{name}: {X.shape[0]} rows, {X.shape[1]} features, label {y.dtype}, written to {uri}")
    configs = {"stratum (defaults)": JobConfig.from_settings(
        settings, data_uri=uri, model_name=f"bench-{name}", keep_arrays=True, threads=threads,
        announce=False)}
    if also:
        configs["stratum (--also)"] = dataclasses.replace(
            configs["stratum (defaults)"], model_name=f"bench-{name}-also",
            **{k: tuple(v) if isinstance(v, list) else v for k, v in also.items()})
    rows: dict[str, dict[str, Any]] = {}
    first: JobResult | None = None
    for label, config in configs.items():
        load_before = load_average()
        result = run_job(settings, config, spark=spark,
                         progress=lambda line: say(f"{name}: {line}"))
        assert result.arrays is not None and result.task == "regression", result.task
        trained = result.candidates[[c.chosen for c in result.candidates].index(True)]
        rows[label] = {"r2": round(result.metrics["r2"], 4),
                       "rmse": round(result.metrics["rmse"], 4),
                       "mae": round(result.metrics["mae"], 4),
                       "seconds": round(result.timings["train"], 2),
                       "epochs_run": trained.epochs_run, "stopped": trained.stopped,
                       "published": result.published,
                       "load": [load_before, load_average()]}
        first = first or result
    assert first is not None
    load_before = load_average()
    rows.update(sklearn_rows(first))
    X_test, y_test = first.arrays[prepare.TEST] if first.arrays else (None, np.empty(0))
    return {"rows": int(len(y)), "features": int(X.shape[1]), "task": first.task,
            "task_reason": first.training["task_reason"], "test_rows": int(len(y_test)),
            "train_rows": int(first.rows["train"]), "val_rows": int(first.rows["val"]),
            "results": rows, "load_sklearn": [load_before, load_average()]}


def print_table(figures: dict[str, dict[str, Any]]) -> None:
    header = ["dataset", "rows x features", "model", "test R2", "test RMSE", "train s",
              "load"]
    lines = []
    for name, f in figures.items():
        for model, r in f["results"].items():
            load = r.get("load", f["load_sklearn"])
            lines.append([name, f"{f['rows']} x {f['features']}", model, f"{r['r2']:.4f}",
                          f"{r['rmse']:.4g}", f"{r['seconds']:.1f}",
                          f"{load[0]:.2f}->{load[1]:.2f}"])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for line in lines:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default=",".join(DATASETS),
                        help=f"comma-separated, of {', '.join(DATASETS)}")
    parser.add_argument("--also", type=json.loads, default={},
                        help="JSON object of JobConfig fields for an extra Stratum row")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the job")
    parser.add_argument("--keep", action="store_true", help="keep the run's data directory")
    args = parser.parse_args()
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    unknown = set(names) - set(DATASETS)
    if unknown:
        parser.error(f"unknown datasets {sorted(unknown)}")
    say(f"load average {load_average()} on {os.cpu_count()} cores")
    figures: dict[str, dict[str, Any]] = {}
    with batch_deployment("regression", args.keep) as (settings, spark):
        for name in names:
            figures[name] = run_dataset(name, settings, spark, args.threads, args.also)
    print_table(figures)
    print(json.dumps({"datasets": figures, "also": args.also}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
