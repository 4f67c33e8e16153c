"""Defaults that fit the data: the batch job with no hyper-parameter given, against the
previous fixed defaults and scikit-learn's MLP, on the same rows, for small and large data.

Starts its own Kafka broker and S3 server on free ports, writes each dataset as Parquet (an id
column, the features, a ``label`` column) and runs the whole batch job on it as ``python -m
batch run`` would with no ``BATCH_*`` hyper-parameter set (``auto``: fitted to the training
rows). In the same run, on exactly the job's split and preprocessed rows (its result's arrays),
it trains:

* ``stratum (fixed)``: the job with the fixed defaults it had before they were fitted
  (500-1000-500, dropout 0.4, 3 epochs, mini-batch 512, patience 2);
* ``sklearn MLP``: scikit-learn's ``MLPClassifier`` as a user first tries it (its defaults: one
  layer of 100, Adam, up to 200 epochs), fitted on the job's training and validation rows;
* for the small datasets each with ``--seeds`` seeds (the demo with ``--demo-seeds``) (the split is a seeded hash of the id, so
  each seed is another split), and the mean test accuracy of each model over them.

Datasets: scikit-learn's bundled real ones (``iris``, 150 rows; ``wine``, 178; ``breast_cancer``,
569; ``digits``, 1,797) and ``demo`` (``--demo-rows`` Higgs-schema demo events, 100,000 by
default), each a classification.

    .venv/bin/python bench/defaults.py [--datasets iris,wine,breast_cancer,digits,demo]
                                       [--seeds 3] [--demo-rows 100000] [--demo-seeds 1]
                                       [--keep]

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

#: The fixed defaults the job had before they were fitted to the data.
FIXED = {"hidden": (500, 1000, 500), "dropout": 0.4, "epochs": 3, "batch_size": 512,
         "patience": 2}


def say(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def _bundled(name: str) -> Callable[[int], tuple[np.ndarray, np.ndarray, list[str]]]:
    def make(_rows: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
        import sklearn.datasets

        data = getattr(sklearn.datasets, f"load_{name}")()
        features = [str(f).replace(" ", "_") for f in getattr(
            data, "feature_names", [f"x{i}" for i in range(data.data.shape[1])])]
        labels = np.asarray(data.target_names)[data.target] if hasattr(
            data, "target_names") else data.target
        return data.data.astype(np.float64), np.asarray([str(v) for v in labels]), features
    return make


def demo(rows: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from demo.data import FEATURES, generate

    frame = generate(rows, seed=21)
    return frame[FEATURES].to_numpy(dtype=np.float64), frame["Label"].to_numpy(), FEATURES


DATASETS: dict[str, Callable[[int], tuple[np.ndarray, np.ndarray, list[str]]]] = {
    "iris": _bundled("iris"), "wine": _bundled("wine"),
    "breast_cancer": _bundled("breast_cancer"), "digits": _bundled("digits"), "demo": demo}


def write(settings: Settings, name: str, X: np.ndarray, y: np.ndarray,
          features: list[str]) -> str:
    return write_dataset(settings, name, pa.table(
        {"id": [f"{name}-{i}" for i in range(len(y))],
         **{f: X[:, i] for i, f in enumerate(features)}, "label": y}))


def sklearn_accuracy(result: JobResult) -> float:
    """``MLPClassifier`` with its defaults on the job's training and validation rows, scored
    on its test rows."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    assert result.arrays is not None
    X_train, y_train = result.arrays[prepare.TRAIN]
    X_val, y_val = result.arrays[prepare.VALIDATION]
    X_test, y_test = result.arrays[prepare.TEST]
    model = MLPClassifier(random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(np.concatenate([X_train, X_val]), np.concatenate([y_train, y_val]))
    return float(np.mean(model.predict(X_test) == y_test))


def run_dataset(name: str, settings: Settings, spark: Any, seeds: int, rows: int,
                threads: int, demo_seeds: int = 1) -> dict[str, Any]:
    X, y, features = DATASETS[name](rows)
    uri = write(settings, name, X, y, features)
    say(f"{name}: {X.shape[0]} rows, {X.shape[1]} features, {len(set(y))} classes; load "
        f"{load_average()}")
    runs = []
    for seed in range(seeds if name != "demo" else demo_seeds):
        base = JobConfig.from_settings(settings, data_uri=uri, model_name=f"b-{name}-{seed}",
                                       seed=seed, keep_arrays=True, threads=threads,
                                       announce=False, compare_active=False)
        figures: dict[str, Any] = {"seed": seed, "load": load_average()}
        started = time.monotonic()
        fitted = run_job(settings, base, spark=spark, progress=lambda line: None)
        figures["fitted"] = {"accuracy": round(fitted.metrics["accuracy"], 4),
                             "seconds": round(time.monotonic() - started, 1),
                             "params": fitted.training.get("fitted"),
                             "epochs_run": fitted.training.get("epochs_run")}
        started = time.monotonic()
        fixed = run_job(settings, dataclasses.replace(base, model_name=f"f-{name}-{seed}",
                                                      **FIXED),
                        spark=spark, progress=lambda line: None)
        figures["fixed"] = {"accuracy": round(fixed.metrics["accuracy"], 4),
                            "seconds": round(time.monotonic() - started, 1)}
        started = time.monotonic()
        figures["sklearn"] = {"accuracy": round(sklearn_accuracy(fitted), 4),
                              "seconds": round(time.monotonic() - started, 1)}
        figures["test_rows"] = int(fitted.rows["test"])
        figures["train_rows"] = int(fitted.rows["train"])
        say(f"{name} seed {seed}: fitted {figures['fitted']['accuracy']:.4f}, fixed "
            f"{figures['fixed']['accuracy']:.4f}, sklearn {figures['sklearn']['accuracy']:.4f} "
            f"({figures['test_rows']} test rows; fitted {figures['fitted']['params']}, "
            f"{figures['fitted']['epochs_run']} epochs)")
        runs.append(figures)
    mean = {k: round(float(np.mean([r[k]["accuracy"] for r in runs])), 4)
            for k in ("fitted", "fixed", "sklearn")}
    return {"rows": int(len(y)), "features": int(X.shape[1]), "classes": len(set(y)),
            "runs": runs, "mean_accuracy": mean,
            "fitted_minus_sklearn": round(mean["fitted"] - mean["sklearn"], 4),
            "fitted_minus_fixed": round(mean["fitted"] - mean["fixed"], 4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--demo-rows", type=int, default=100_000)
    parser.add_argument("--demo-seeds", type=int, default=1,
                        help="splits of the demo dataset (each takes minutes)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    say(f"load average {load_average()} on {os.cpu_count()} cores")
    figures: dict[str, Any] = {}
    with batch_deployment("defaults", args.keep) as (settings, spark):
        for name in names:
            figures[name] = run_dataset(name, settings, spark, args.seeds, args.demo_rows,
                                        args.threads, args.demo_seeds)
    print(f"{'dataset':<14} {'rows':>7} {'fitted':>8} {'fixed':>8} {'sklearn':>8} "
          f"{'fitted-sklearn':>15}")
    for name, f in figures.items():
        m = f["mean_accuracy"]
        print(f"{name:<14} {f['rows']:>7} {m['fitted']:>8.4f} {m['fixed']:>8.4f} "
              f"{m['sklearn']:>8.4f} {f['fitted_minus_sklearn']:>+15.4f}")
    print(json.dumps({"datasets": figures, "load_after": load_average()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
