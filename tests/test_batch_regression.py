"""Regression and a user's own network, end to end: the real S3 server and Kafka broker, local
Spark, Parquet files written as a user would write them."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pytest

from app.settings import Settings
from batch import prepare
from batch.errors import NetworkError
from batch.job import EXIT_REJECTED, JobConfig, run_job
from devstack.harness import write_dataset
from models.errors import ArtifactError
from models.registry import Registry

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
ZOO = "models.zoo:residual_mlp"
SMALL = dict(hidden=(32, 16), dropout=0.0, epochs=30, batch_size=64, lr=0.003, patience=4)


def friedman(n: int = 2500, seed: int = 0, offset: float = 500.0, scale: float = 20.0
             ) -> pa.Table:
    """Friedman's first regression problem, shifted and scaled away from mean 0 / std 1 (the
    published network must output the value itself), with missing values, one NaN label and
    one infinite label (dropped), and integer ids."""
    from sklearn.datasets import make_friedman1

    X, y = make_friedman1(n_samples=n, n_features=6, noise=0.5, random_state=seed)
    y = offset + scale * y
    rng = np.random.default_rng(seed)
    X[rng.random(X.shape) < 0.02] = np.nan
    y[7], y[11] = np.nan, np.inf
    return pa.table({"row": np.arange(n, dtype=np.int64),
                     **{f"x{i}": X[:, i] for i in range(X.shape[1])}, "target": y})



def test_a_float_label_publishes_a_regression_whose_network_outputs_the_value(
        spark: Any, settings_env: Callable[..., dict[str, str]],
        capsys: pytest.CaptureFixture[str]) -> None:
    settings = Settings.from_env(settings_env())
    table = friedman()
    uri = write_dataset(settings, "friedman", table)
    lines: list[str] = []
    result = run_job(settings, JobConfig(data_uri=uri, id_col="row", label_col="target",
                                         announce=False, keep_arrays=True, **SMALL),
                     spark=spark, progress=lines.append)

    assert result.published, result.decision.reason
    assert result.task == "regression" and result.metric == "rmse" and result.classes == []
    assert any(line.startswith("task regression (double labels are values)") for line in lines)
    assert result.rows["read"] == 2500 and result.rows["usable"] == 2498  # NaN and inf labels
    manifest = result.manifest
    assert manifest is not None and manifest.task == "regression"
    assert manifest.architecture_dict()["n_outputs"] == 1
    assert {"rmse", "mae", "r2", "n", "baseline_rmse"} <= set(result.metrics)
    assert result.metrics["r2"] > 0.8
    assert result.metrics["rmse"] < 0.5 * result.metrics["baseline_rmse"]
    assert manifest.training["loss"] == "mse_standardised"
    X_train, y_train = result.arrays[prepare.TRAIN]
    assert manifest.training["target_mean"] == pytest.approx(float(np.mean(y_train)))

    model = Registry(settings.registry_uri, settings.storage_options).load_ref(result.ref)
    assert model.task == "regression" and model.metrics == result.metrics
    # The reference rows reproduce (load_ref checked them); here they are checked again.
    inputs, expected, _ = model.manifest.reference_arrays()
    assert expected.shape == (len(inputs), 1)
    np.testing.assert_allclose(model.outputs(inputs), expected, rtol=1e-4)
    # predict gives numbers in the label's units, as accurate as the test metrics say.
    rows = table.to_pandas().dropna(subset=["target"])
    rows = rows[np.isfinite(rows["target"])]
    predicted = model.predict(rows[model.features].to_numpy(dtype=np.float64))
    assert all(isinstance(v, float) for v in predicted)
    rmse = float(np.sqrt(np.mean((np.array(predicted) - rows["target"].to_numpy()) ** 2)))
    assert rmse < 2 * result.metrics["rmse"]
    # The job's test split is the one the test metrics were measured on.
    X_test, y_test = result.arrays[prepare.TEST]
    assert len(y_test) == result.metrics["n"] and y_test.dtype == np.float64

    from batch.__main__ import print_summary

    print_summary(result)
    summary = capsys.readouterr().out
    assert "task        regression, compared on rmse" in summary
    assert f"label       mean {float(np.mean(y_train)):.4g}" in summary
    assert "test rmse" in summary and f"{result.metrics['r2']:.4f}" in summary


def test_the_policy_compares_regressions_by_rmse_and_refuses_a_change_of_task(
        spark: Any, settings_env: Callable[..., dict[str, str]], kafka_broker: Any) -> None:
    settings = Settings.from_env(settings_env())
    table = friedman(2000, seed=1)
    uri = write_dataset(settings, "friedman", table)
    base = JobConfig(data_uri=uri, id_col="row", label_col="target", **SMALL)
    first = run_job(settings, base, spark=spark)
    assert first.published and first.active_version is None

    # A linear model cannot follow Friedman's sine and square: worse rmse than the network
    # that serves, though far better than the training mean.
    linear = dataclasses.replace(base, hidden=(), epochs=5)
    rejected = run_job(settings, linear, spark=spark)
    assert not rejected.published and rejected.exit_code == EXIT_REJECTED
    assert rejected.active_version == first.ref.version
    assert rejected.decision.reason.startswith(
        f"worse than the active model {first.ref.version}: rmse")
    assert rejected.metrics["rmse"] > first.metrics["rmse"]
    assert rejected.active_metrics["rmse"] == pytest.approx(first.metrics["rmse"], rel=1e-4)

    # Compared on r2 (higher is better) it is worse too; with a tolerance as large as the
    # difference in rmse it passes.
    by_r2 = run_job(settings, dataclasses.replace(linear, metric="r2"), spark=spark)
    assert not by_r2.published and "r2" in by_r2.decision.reason
    gap = rejected.metrics["rmse"] - first.metrics["rmse"]
    tolerated = run_job(settings, dataclasses.replace(linear, compare_tolerance=gap + 0.01,
                                                      announce=False), spark=spark)
    assert tolerated.published, tolerated.decision.reason

    # The same rows with a class label: a classification may not replace a regression.
    labels = np.where(np.nan_to_num(table.column("target").to_numpy(), nan=0.0) > 600, "hi", "lo")
    classes = write_dataset(settings, "classes", table.drop_columns(["target"]).append_column(
        "target", pa.array(labels)))
    other = run_job(settings, dataclasses.replace(base, data_uri=classes, announce=False),
                    spark=spark)
    assert other.task == "classification" and not other.published
    assert other.decision.reason.startswith(
        f"the active model {first.ref.version} is a regression and the candidate a "
        "classification")
    forced = run_job(settings, dataclasses.replace(base, data_uri=classes, announce=False,
                                                   force=True), spark=spark)
    assert forced.published and forced.forced


def test_an_integer_label_with_many_values_is_a_regression_unless_told(
        spark: Any, settings_env: Callable[..., dict[str, str]]) -> None:
    settings = Settings.from_env(settings_env())
    rng = np.random.default_rng(3)
    x = rng.normal(size=1500)
    counts = np.round(200 + 40 * x + rng.normal(0, 5, 1500)).astype(np.int64)  # ~150 values
    few = np.digitize(x, [-1.0, 0.0, 1.0]).astype(np.int32)  # 4 values
    df = spark.createDataFrame(
        [(i, float(x[i]), int(counts[i]), int(few[i])) for i in range(1500)],
        "id long, x double, visits long, band int")
    assert prepare.resolve_task(df, "visits", "auto")[0] == "regression"
    assert prepare.resolve_task(df, "band", "auto")[0] == "classification"
    assert prepare.resolve_task(df, "visits", "classification")[0] == "classification"

    uri = write_dataset(settings, "visits", pa.table({"id": np.arange(1500), "x": x,
                                              "visits": counts}))
    told = run_job(settings, JobConfig(data_uri=uri, label_col="visits", task="regression",
                                       announce=False, compare_active=False, **SMALL),
                   spark=spark)
    assert told.task == "regression" and told.training["task_reason"] == "BATCH_TASK"
    assert told.published and told.metrics["r2"] > 0.8


def test_a_factory_network_trains_publishes_and_loads_where_it_is_allowed(
        spark: Any, settings_env: Callable[..., dict[str, str]]) -> None:
    settings = Settings.from_env(settings_env())
    uri = write_dataset(settings, "friedman", friedman(2000, seed=2))
    params = {"width": 16, "blocks": 1, "dropout": 0.0}
    lines: list[str] = []
    # Two candidates side by side in worker processes: each builds the factory's network.
    config = JobConfig(data_uri=uri, id_col="row", label_col="target", announce=False,
                       network=ZOO, network_params=params, candidates=2, search="grid",
                       lr="0.002|0.01",
                       parallelism=2, threads=2, epochs=25, batch_size=64, patience=4)
    result = run_job(settings, config, spark=spark, progress=lines.append)

    assert result.published, result.decision.reason
    assert any("2 candidates side by side" in line or "2 at a time" in line for line in lines)
    assert {c.params["lr"] for c in result.candidates} == {0.002, 0.01}
    assert all("hidden" not in c.params for c in result.candidates)
    assert result.manifest.architecture_dict() == {
        "type": "factory", "factory": ZOO, "n_features": 6, "n_outputs": 1, "params": params}
    assert result.manifest.training["network"] == ZOO
    assert result.metrics["r2"] > 0.7

    allowed = Registry(settings.registry_uri, settings.storage_options, factories=[ZOO])
    model = allowed.load_ref(result.ref)
    assert type(model.module).__name__ == "ResidualMLP" and model.task == "regression"
    assert model.output_layer()[0] == "head"  # the speed layer can refit it
    with pytest.raises(ArtifactError, match="is not allowed here"):
        Registry(settings.registry_uri, settings.storage_options).load_ref(result.ref)


def test_a_factory_that_fails_or_does_not_fit_the_task_stops_before_training(
        spark: Any, settings_env: Callable[..., dict[str, str]]) -> None:
    settings = Settings.from_env(settings_env())
    uri = write_dataset(settings, "friedman", friedman(600, seed=4))
    base = JobConfig(data_uri=uri, id_col="row", label_col="target", announce=False,
                     compare_active=False, **SMALL)
    for network, params, reason in [
        (ZOO, {"width": -3}, "bad BATCH_MODEL='models.zoo:residual_mlp' with params "
                             "{'width': -3}: model factory .* failed"),
        (ZOO, {"depth": 2}, "unexpected keyword argument 'depth'"),
        ("tests.factories:wrong_width", {}, r"maps a \(2, 6\) batch to .*expected \(2, 1\)"),
        ("tests.factories:ends_in_tanh", {}, "does not end in a linear layer"),
    ]:
        lines: list[str] = []
        with pytest.raises(NetworkError, match=reason) as raised:
            run_job(settings, dataclasses.replace(base, network=network,
                                                  network_params=params),
                    spark=spark, progress=lines.append)
        assert "train" not in raised.value.timings, network  # stopped before training
    assert Registry(settings.registry_uri, settings.storage_options).versions("default") == []


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "batch", *args], cwd=REPO, timeout=120,
                          env={**os.environ, **env}, capture_output=True, text=True)


def test_command_line_reports_a_bad_network_in_one_line() -> None:
    for env, message in [
        ({"BATCH_MODEL_PARAMS": "{'width': 8}"},
         "batch: error: bad setting BATCH_MODEL_PARAMS=\"{'width': 8}\": expected a JSON "
         "object of keyword parameters"),
        ({"BATCH_MODEL": "no_such_package.nets:build"},
         "batch: error: bad BATCH_MODEL='no_such_package.nets:build': model factory "
         "'no_such_package.nets:build': cannot import 'no_such_package.nets'"),
    ]:
        run = _cli(["run"], env)
        errors = [line for line in run.stderr.splitlines() if line.strip()]
        assert run.returncode == 1 and len(errors) == 1, run.stderr
        assert errors[0].startswith(message), errors[0]
