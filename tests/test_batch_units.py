"""Pure parts of the batch job: feature selection, split rule, metrics, policy, training."""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from app.settings import Settings
from batch import prepare
from batch.__main__ import build_parser
from batch.errors import DataError
from batch.evaluate import classification_metrics, evaluate_policy, majority_rate, roc_auc
from batch.job import JobConfig
from batch.spark import spark_error_reason
from batch.train import TrainConfig, parse_hidden, train_classifier
from models.preprocessing import Preprocessor, fit_preprocessor, preprocessor_from_stats

DTYPES = [("id", "string"), ("x", "double"), ("n", "bigint"), ("label", "string"),
          ("ts", "bigint"), ("d", "decimal(10,2)")]


def test_feature_columns_keep_numeric_columns_in_order_and_skip_metadata() -> None:
    assert prepare.feature_columns(DTYPES, "id", "label") == ["x", "n", "d"]
    assert prepare.feature_columns(DTYPES, "id", "label", exclude=()) == ["x", "n", "ts", "d"]


def test_a_string_feature_column_is_named_in_the_error() -> None:
    with pytest.raises(DataError, match=r"non-numeric column 'comment' \(string\)"):
        prepare.feature_columns(DTYPES + [("comment", "string")], "id", "label")


@pytest.mark.parametrize("dtypes, id_col, label_col, reason", [
    (DTYPES, "id", "y", "no label column 'y'"),
    (DTYPES, "key", "label", "no id column 'key'"),
    ([("id", "string"), ("label", "timestamp"), ("x", "double")], "id", "label",
     "label column 'label' is timestamp"),
    ([("id", "string"), ("label", "string")], "id", "label", "no feature columns"),
])
def test_feature_columns_reject_unusable_datasets(dtypes, id_col, label_col, reason) -> None:
    with pytest.raises(DataError, match=reason):
        prepare.feature_columns(dtypes, id_col, label_col)


def test_split_rule_gives_the_requested_fractions() -> None:
    u = np.random.default_rng(0).random(100_000)
    splits = prepare.assign_splits(u, test_fraction=0.2, val_fraction=0.1)
    shares = {name: float(np.mean(splits == name)) for name in ("train", "val", "test")}
    assert shares == pytest.approx({"train": 0.7, "val": 0.1, "test": 0.2}, abs=0.01)
    assert prepare.split_thresholds(0.2, 0.0) == pytest.approx((0.8, 0.8))
    for bad in ((0.0, 0.1), (0.6, 0.4), (0.2, -0.1)):
        with pytest.raises(ValueError):
            prepare.split_thresholds(*bad)


def test_check_splits_returns_sorted_classes_or_says_what_is_missing() -> None:
    counts = {"train": {"s": 5, "b": 9}, "val": {"b": 1}, "test": {"s": 2, "b": 3}}
    assert prepare.check_splits(counts, "label") == ["b", "s"]
    with pytest.raises(DataError, match="1 class"):
        prepare.check_splits({"train": {"s": 5}, "val": {}, "test": {"s": 1}}, "label")
    with pytest.raises(DataError, match="test split is empty"):
        prepare.check_splits({"train": {"s": 5, "b": 1}, "val": {}, "test": {}}, "label")
    with pytest.raises(DataError, match="holds only class 'b'"):
        prepare.check_splits({"train": {"s": 5, "b": 1}, "val": {}, "test": {"b": 3}}, "label")


def test_auc_matches_pairwise_counting_with_ties() -> None:
    rng = np.random.default_rng(1)
    y = rng.random(300) < 0.4
    s = np.round(rng.random(300) + 0.3 * y, 1)  # rounding makes many ties
    pos, neg = s[y], s[~y]
    pairs = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert roc_auc(y, s) == pytest.approx(pairs / (len(pos) * len(neg)))
    assert roc_auc([0, 1], [0.2, 0.9]) == 1.0 and roc_auc([0, 1], [0.9, 0.2]) == 0.0
    assert math.isnan(roc_auc([1, 1], [0.2, 0.9]))


def test_auc_and_log_loss_agree_with_scikit_learn() -> None:
    metrics_module = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 500)
    p1 = np.clip(rng.random(500) * 0.6 + 0.4 * y, 0, 1)
    proba = np.column_stack([1 - p1, p1])
    m = classification_metrics(y, proba)
    assert m["auc"] == pytest.approx(metrics_module.roc_auc_score(y, p1))
    assert m["log_loss"] == pytest.approx(metrics_module.log_loss(y, proba), rel=1e-6)
    assert m["accuracy"] == pytest.approx(metrics_module.accuracy_score(y, p1 > 0.5))


def test_metrics_of_three_classes_and_a_confident_mistake() -> None:
    proba = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [1.0, 0.0, 0.0]])
    m = classification_metrics(np.array([0, 1, 2]), proba)
    assert "auc" not in m and m["n"] == 3
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["log_loss"] == pytest.approx(-(np.log(0.7) + np.log(0.8) + np.log(1e-7)) / 3)


def test_policy_publishes_only_what_beats_the_majority_class() -> None:
    assert majority_rate({"b": 66, "s": 34}) == pytest.approx(0.66)
    assert evaluate_policy({"accuracy": 0.84}, 0.66).accepted
    rejected = evaluate_policy({"accuracy": 0.66}, 0.66)
    assert not rejected.accepted and "does not beat" in rejected.reason


@pytest.mark.parametrize("candidate, active, reason", [
    ({"accuracy": 0.84}, {"accuracy": 0.8, "auc": 0.9}, "the candidate has no auc"),
    ({"accuracy": 0.84, "auc": float("nan")}, {"accuracy": 0.8, "auc": 0.9},
     "the candidate has no auc"),
    ({"accuracy": 0.84, "auc": 0.9}, {"accuracy": 0.8}, "the active model v1 has no auc"),
], ids=["candidate-lacks-it", "candidate-nan", "active-lacks-it"])
def test_policy_rejects_when_the_compared_metric_is_missing(candidate: dict, active: dict,
                                                            reason: str) -> None:
    decision = evaluate_policy(candidate, 0.5, metric="auc", active_metrics=active,
                               active_version="v1")
    assert not decision.accepted
    assert decision.reason.startswith("cannot compare with the active model v1: " + reason)


def test_policy_rejects_when_the_active_model_cannot_be_scored_and_not_without_one() -> None:
    decision = evaluate_policy({"accuracy": 0.84}, 0.5, active_version="v1",
                               active_unavailable="it does not load: sha256 mismatch")
    assert not decision.accepted
    assert decision.reason == ("cannot compare with the active model v1: it does not load: "
                               "sha256 mismatch")
    assert evaluate_policy({"accuracy": 0.84}, 0.5).accepted  # the first model


@pytest.mark.parametrize("classes,labels", [(["b", "s"], ["s", "b", "s", "b"]),
                                             ([3, 7, 42], [42, 3, 7, 7])],
                         ids=["string-classes", "integer-classes"])
def test_collect_batches_carry_class_and_split_indices_and_preprocessed_features(
        classes: list, labels: list) -> None:
    pre = Preprocessor(features=["a", "b"], fill=[0.5, 0.0], mean=[1.0, 0.0], std=[2.0, 1.0])
    raw = np.array([[1.0, 2.0], [np.nan, -999.0], [3.0, np.inf], [-1.0, 0.5]])
    batch = pa.record_batch({"__id": ["r1", "r2", "r3", "r4"], "__f0": raw[:, 0],
                             "__f1": raw[:, 1], "__label": labels,
                             prepare.SPLIT_COL: ["test", "train", "val", "train"]})
    (out,) = prepare._preprocess_batches(iter([batch]), ["__f0", "__f1"], pre.to_dict(),
                                         classes, "__id", "__label")
    assert out.column("id").to_pylist() == ["r1", "r2", "r3", "r4"]
    assert [classes[i] for i in out.column("y").to_pylist()] == labels
    assert out.column("split").to_pylist() == [2, 0, 1, 0]  # train, val, test
    X = np.column_stack([out.column("x0").to_numpy(), out.column("x1").to_numpy()])
    np.testing.assert_array_equal(X, pre.transform(raw))

    with pytest.raises(DataError, match=f"labels \\[{classes[0]!r}\\] are not among"):
        list(prepare._preprocess_batches(iter([batch]), ["__f0", "__f1"], pre.to_dict(),
                                         classes[1:], "__id", "__label"))


def test_rows_are_ordered_by_id_in_code_point_order_across_chunks() -> None:
    ids = ["b", "a10", "a9", "\u00e9t\u00e9", "Z", "z", "\u65e5\u672c", "a", "a\u0000"]
    order = prepare._id_order(pa.chunked_array([ids[:4], ids[4:]]))
    assert [ids[i] for i in order] == sorted(ids)


def test_statistics_to_preprocessor_matches_the_numpy_fit() -> None:
    rng = np.random.default_rng(3)
    X = rng.normal(3.0, 2.0, size=(400, 2))
    X[:50, 0] = -999.0
    count = (X != -999.0).sum(axis=0)
    present = np.where(X == -999.0, 0.0, X)
    p = preprocessor_from_stats(["a", "b"], count, present.sum(axis=0),
                                (present ** 2).sum(axis=0))
    assert p == fit_preprocessor(["a", "b"], X)


def _blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    X = rng.normal(size=(n, 4)).astype(np.float32) + 2.0 * y[:, None].astype(np.float32)
    return X, y


def test_training_learns_a_separable_problem_and_keeps_the_best_epoch() -> None:
    X, y = _blobs(2000, 0)
    Xv, yv = _blobs(400, 1)
    lines: list[str] = []
    result = train_classifier(X, y, 2, TrainConfig(hidden=(16,), dropout=0.0, epochs=3,
                                                   batch_size=64, lr=1e-2),
                              X_val=Xv, y_val=yv, progress=lines.append)
    assert len(lines) == len(result.history) == 3 and "val loss" in lines[0]
    with torch.inference_mode():
        accuracy = (result.module(torch.from_numpy(Xv)).argmax(1).numpy() == yv).mean()
    assert accuracy > 0.9
    best = min(h["val_loss"] for h in result.history)
    assert result.history[result.best_epoch - 1]["val_loss"] == best
    assert not result.module.training


def test_training_is_reproducible_and_stops_at_its_time_budget() -> None:
    X, y = _blobs(500, 4)
    config = TrainConfig(hidden=(8,), epochs=2, batch_size=50, seed=5)
    a, b = train_classifier(X, y, 2, config), train_classifier(X, y, 2, config)
    for first, second in zip(a.module.parameters(), b.module.parameters()):
        assert torch.equal(first, second)
    timed = train_classifier(X, y, 2, TrainConfig(hidden=(8,), epochs=1000, batch_size=10,
                                                  max_seconds=0.3))
    assert timed.stopped == "time budget" and timed.epochs_run < 1000


def test_hidden_sizes_parse_from_the_command_line_format() -> None:
    assert parse_hidden("500,1000,500") == (500, 1000, 500)
    assert parse_hidden(" 64 , 32 ") == (64, 32) and parse_hidden("") == ()
    for bad in ("a,b", "10,-1"):
        with pytest.raises(ValueError):
            parse_hidden(bad)


def test_job_config_reads_the_settings_and_options_override_them() -> None:
    from app.settings import SettingsError

    env = {"BATCH_EPOCHS": "7", "BATCH_HIDDEN": "32,16", "BATCH_MAX_TRAIN_SECONDS": "20",
           "BATCH_CANDIDATES": "3", "BATCH_WINDOW_DAYS": "14"}
    config = JobConfig.from_env(env, epochs=2, model_name=None)
    (train,) = config.train_configs()[:1]
    assert (train.epochs, train.hidden, train.max_seconds) == (2, (32, 16), 20.0)
    assert (config.candidates, config.window_days, config.model_name) == (3, 14, None)
    assert JobConfig.from_env({}).train_config().hidden == (500, 1000, 500)
    assert JobConfig.from_env({}).max_train_seconds is None
    with pytest.raises(SettingsError, match="BATCH_EPOCHS='many'"):
        JobConfig.from_env({"BATCH_EPOCHS": "many"})
    with pytest.raises(SettingsError, match="BATCH_LR='0.01:0.001'.*low < high"):
        JobConfig.from_env({"BATCH_LR": "0.01:0.001"})
    with pytest.raises(SettingsError, match="BATCH_SEARCH"):
        JobConfig.from_env({"BATCH_SEARCH": "bayes"})


def test_demo_command_line_writes_data_and_bootstraps() -> None:
    from demo.__main__ import build_parser as demo_parser

    parser = demo_parser()
    assert parser.parse_args(["data", "--rows", "10"]).rows == 10
    args = parser.parse_args(["bootstrap", "--rows", "5", "--epochs", "1"])
    assert (args.command, args.rows, args.epochs) == ("bootstrap", 5, "1")


def test_command_line_knows_the_contract_commands() -> None:
    parser = build_parser()
    args = parser.parse_args(["run", "--data", "s3://b/x", "--model", "m", "--force",
                              "--hidden", "8,4", "--epochs", "2", "--seed", "3"])
    assert (args.command, args.data, args.model, args.force, args.hidden) == (
        "run", "s3://b/x", "m", True, "8,4")
    assert parser.parse_args(["run"]).force is None
    with pytest.raises(SystemExit):  # the demo's commands are not the product's
        parser.parse_args(["bootstrap"])
    assert parser.parse_args(["schedule", "--epochs", "1"]).epochs == "1"
    searched = parser.parse_args(["run", "--lr", "0.0003:0.01", "--hidden", "64,32|128",
                                  "--candidates", "4", "--search", "grid", "--distributed", "2"])
    assert (searched.lr, searched.hidden, searched.candidates, searched.search,
            searched.distributed) == ("0.0003:0.01", "64,32|128", 4, "grid", 2)


def test_spark_failures_are_reduced_to_the_python_error_line() -> None:
    text = ("An exception was thrown from the Python worker.\n"
            "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n"
            "batch.errors.StorageError: cannot open s3://b/k.parquet: timeout\n"
            "\tat org.apache.spark.api.python.BasePythonRunner...\n")
    assert spark_error_reason(RuntimeError(text)) == (
        "batch.errors.StorageError: cannot open s3://b/k.parquet: timeout")


def test_schedule_runs_at_cron_times_one_at_a_time_and_survives_failures() -> None:
    from datetime import datetime, timedelta, timezone

    from batch.schedule import run_schedule

    clock = [datetime(2026, 11, 23, 1, 59, 30, tzinfo=timezone.utc)]
    started: list[datetime] = []

    def sleep(seconds: float) -> None:
        clock[0] += timedelta(seconds=seconds)

    def run() -> int:
        started.append(clock[0])
        if len(started) == 1:
            clock[0] += timedelta(hours=25)  # overruns the next slot: it is skipped, not queued
            return 0
        raise RuntimeError("S3 down")

    lines: list[str] = []
    done = run_schedule("0 2 * * *", run, now=lambda: clock[0], sleep=sleep,
                        progress=lines.append, max_runs=3)
    assert done == 3
    assert [t.isoformat() for t in started] == [
        "2026-11-23T02:00:00+00:00", "2026-11-25T02:00:00+00:00", "2026-11-26T02:00:00+00:00"]
    assert any("run failed: RuntimeError: S3 down" in line for line in lines)


# ---- regression and a user's own network ----------------------------------------------------


@pytest.mark.parametrize("kind, distinct, rows, task", [
    ("double", 0, 0, "regression"),
    ("float", 0, 0, "regression"),
    ("decimal(10,2)", 0, 0, "regression"),
    ("string", 0, 0, "classification"),
    ("boolean", 0, 0, "classification"),
    ("bigint", 2, 10_000, "classification"),
    ("int", 20, 100, "classification"),        # at most 20 values: classes, however few rows
    ("bigint", 60, 100_000, "classification"),  # 60 values recurring over many rows
    ("bigint", 60, 1_000, "regression"),        # 60 values, 6% of the rows distinct
    ("smallint", 101, 1_000_000, "regression"),  # over 100 values: always a value
], ids=lambda v: str(v))
def test_the_task_follows_the_label(kind: str, distinct: int, rows: int, task: str) -> None:
    found, reason = prepare.infer_task(kind, distinct, rows)
    assert found == task, reason
    assert reason


def test_an_explicit_task_overrides_the_label_and_is_checked_against_it() -> None:
    class Frame:  # only the label's type is read when the task is given
        dtypes = [("id", "string"), ("y", "bigint"), ("s", "string"), ("f", "double")]

    assert prepare.resolve_task(Frame(), "y", "regression") == ("regression", "BATCH_TASK")
    assert prepare.resolve_task(Frame(), "y", "classification")[0] == "classification"
    assert prepare.resolve_task(Frame(), "f", "auto")[0] == "regression"
    assert prepare.resolve_task(Frame(), "s", "auto")[0] == "classification"
    with pytest.raises(DataError, match="the label of a regression must be numeric"):
        prepare.resolve_task(Frame(), "s", "regression")
    with pytest.raises(DataError, match="class labels must be strings, booleans or integers"):
        prepare.resolve_task(Frame(), "f", "classification")


def test_regression_metrics_agree_with_scikit_learn() -> None:
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    from batch.evaluate import mean_predictor_rmse, regression_metrics

    rng = np.random.default_rng(5)
    y = rng.normal(10.0, 3.0, 400)
    p = y + rng.normal(0.0, 1.0, 400)
    m = regression_metrics(y, p[:, None])
    assert m["rmse"] == pytest.approx(math.sqrt(mean_squared_error(y, p)))
    assert m["mae"] == pytest.approx(mean_absolute_error(y, p))
    assert m["r2"] == pytest.approx(r2_score(y, p)) and m["n"] == 400
    assert mean_predictor_rmse(y, 10.0) == pytest.approx(math.sqrt(np.mean((y - 10.0) ** 2)))


def test_a_regression_must_beat_the_training_mean() -> None:
    good = evaluate_policy({"rmse": 2.0, "mae": 1.5, "r2": 0.6}, 3.0, task="regression")
    assert good.accepted and "beats always predicting the training mean" in good.reason
    useless = evaluate_policy({"rmse": 3.0, "mae": 2.5, "r2": 0.0}, 3.0, task="regression")
    assert not useless.accepted and "does not beat always predicting" in useless.reason


@pytest.mark.parametrize("metric, mine, theirs, accepted", [
    ("rmse", 2.5, 2.0, False), ("rmse", 1.9, 2.0, True), ("rmse", 2.0, 2.0, True),
    ("mae", 1.6, 1.5, False), ("mae", 1.4, 1.5, True),
    ("r2", 0.55, 0.60, False), ("r2", 0.65, 0.60, True),
    ("log_loss", 0.40, 0.35, False), ("auc", 0.91, 0.90, True),
])
def test_the_comparison_with_the_active_model_respects_the_metric_direction(
        metric: str, mine: float, theirs: float, accepted: bool) -> None:
    regression = metric in ("rmse", "mae", "r2")
    if regression:
        candidate, active = {"rmse": 2.0, "mae": 1.5, "r2": 0.6}, {"rmse": 2.0, "mae": 1.5,
                                                                  "r2": 0.6}
    else:
        candidate, active = {"accuracy": 0.8}, {"accuracy": 0.8}
    candidate, active = {**candidate, metric: mine}, {**active, metric: theirs}
    decision = evaluate_policy(candidate, 10.0 if regression else 0.5, metric=metric,
                               active_metrics=active, active_version="v1",
                               task="regression" if regression else "classification")
    assert decision.accepted is accepted, decision.reason
    if accepted:
        assert "; not worse than the active model v1" in decision.reason
    else:
        assert decision.reason.startswith(f"worse than the active model v1: {metric}")


def test_a_tolerance_in_the_metric_s_units_lets_a_slightly_worse_rmse_pass() -> None:
    decision = evaluate_policy({"rmse": 2.04, "mae": 1.0, "r2": 0.5}, 5.0, metric="rmse",
                               active_metrics={"rmse": 2.0}, tolerance=0.05,
                               task="regression")
    assert decision.accepted
    assert not evaluate_policy({"rmse": 2.06, "mae": 1.0, "r2": 0.5}, 5.0, metric="rmse",
                               active_metrics={"rmse": 2.0}, tolerance=0.05,
                               task="regression").accepted


def test_an_active_model_of_another_task_rejects_the_candidate() -> None:
    decision = evaluate_policy({"rmse": 1.0, "mae": 1.0, "r2": 0.9}, 5.0, metric="rmse",
                               active_version="v7", task="regression",
                               active_task="classification")
    assert not decision.accepted
    assert decision.reason.startswith("the active model v7 is a classification and the "
                                      "candidate a regression")
    # Whether or not metrics could be compared: the task decides first.
    assert not evaluate_policy({"accuracy": 0.9, "log_loss": 0.2}, 0.5, task="classification",
                               active_task="regression",
                               active_metrics={"accuracy": 0.1}).accepted


def test_training_a_regression_folds_the_label_scale_into_the_output_layer() -> None:
    from batch.train import train_network

    rng = np.random.default_rng(0)
    X = rng.normal(size=(3000, 3)).astype(np.float32)
    y = 1000.0 + 250.0 * X[:, 0] - 100.0 * X[:, 1] * X[:, 2] + rng.normal(0, 5.0, 3000)
    Xv = rng.normal(size=(500, 3)).astype(np.float32)
    yv = 1000.0 + 250.0 * Xv[:, 0] - 100.0 * Xv[:, 1] * Xv[:, 2]
    result = train_network(X, y, 1, TrainConfig(hidden=(32,), dropout=0.0, epochs=15,
                                                batch_size=64, lr=3e-3, patience=3),
                           X_val=Xv, y_val=yv, task="regression")
    assert result.task == "regression" and result.architecture["n_outputs"] == 1
    assert result.target_mean == pytest.approx(float(y.mean()))
    assert result.target_std == pytest.approx(float(y.std()))
    with torch.inference_mode():
        predicted = result.module(torch.from_numpy(Xv)).numpy()[:, 0]
    # The network itself outputs values in the label's units (no scaling left to apply).
    assert abs(float(predicted.mean()) - float(yv.mean())) < 15.0
    residual = float(np.sqrt(np.mean((predicted - yv) ** 2)))
    assert residual < 0.3 * float(yv.std())


def test_a_regression_network_must_end_in_a_linear_layer() -> None:
    from batch.train import Network, train_network
    from models.errors import ModelError

    X = np.random.default_rng(1).normal(size=(100, 2)).astype(np.float32)
    bounded = Network("tests.factories:ends_in_tanh")
    with pytest.raises(ModelError, match="does not end in a linear layer"):
        train_network(X, X[:, 0].astype(np.float64), 1, TrainConfig(epochs=1),
                      task="regression", network=bounded)


def test_the_network_settings_are_checked_at_start() -> None:
    from app.settings import Settings, SettingsError

    assert Settings.from_env({}).batch_model == "mlp"
    assert JobConfig.from_env({}).network_params == {}
    config = JobConfig.from_env({"BATCH_MODEL": "models.zoo:residual_mlp",
                                 "BATCH_MODEL_PARAMS": '{"width": 8, "blocks": 1}',
                                 "BATCH_HIDDEN": "8|16"})
    assert config.network == "models.zoo:residual_mlp"
    assert config.network_params == {"width": 8, "blocks": 1}
    # hidden and dropout do not size a factory's network: no candidates over them.
    assert len(config.train_configs()) == 1 and "hidden" not in config.search_space()
    for env, reason in [
        ({"BATCH_MODEL_PARAMS": "{width: 8}"}, "BATCH_MODEL_PARAMS='{width: 8}'.*JSON object"),
        ({"BATCH_MODEL_PARAMS": "[8]"}, "BATCH_MODEL_PARAMS='\\[8\\]'.*got list"),
        ({"BATCH_MODEL": "zoo"}, "BATCH_MODEL='zoo'.*package.module:function"),
        ({"BATCH_TASK": "ranking"}, "BATCH_TASK='ranking'"),
        ({"BATCH_TASK": "regression", "BATCH_METRIC": "auc"},
         "BATCH_METRIC='auc'.*a regression is compared on rmse, mae, r2"),
    ]:
        with pytest.raises(SettingsError, match=reason):
            JobConfig.from_env(env)
    with pytest.raises(SettingsError, match="option --network-params='7'"):
        JobConfig.from_env({}, network_params="7")
    with pytest.raises(SettingsError, match="option --metric.*does not apply to a "
                                            "classification"):
        JobConfig.from_env({"BATCH_TASK": "classification"}, metric="rmse")


def test_a_factory_that_cannot_be_imported_stops_the_run_before_it_starts() -> None:
    from app.settings import Settings
    from batch.errors import NetworkError
    from batch.job import run_job

    # Nothing is listed or locked: the store named here does not exist.
    settings = Settings.from_env({"REGISTRY_URI": "s3://nowhere/models",
                                  "S3_ENDPOINT_URL": "http://127.0.0.1:9"})
    for name, reason in [("no_such_package.nets:build", "cannot import 'no_such_package.nets'"),
                         ("models.zoo:no_such_function", "has no function 'no_such_function'")]:
        with pytest.raises(NetworkError, match=f"bad BATCH_MODEL='{name}': .*{reason}"):
            run_job(settings, JobConfig(network=name))


def test_command_line_takes_the_task_metric_and_network() -> None:
    args = build_parser().parse_args(["run", "--task", "regression", "--metric", "mae",
                                      "--network", "models.zoo:residual_mlp",
                                      "--network-params", '{"width": 8}'])
    assert (args.task, args.metric, args.network, args.network_params) == (
        "regression", "mae", "models.zoo:residual_mlp", '{"width": 8}')
    from app.settings import Settings
    from batch.__main__ import job_config

    config = job_config(args, Settings.from_env({}))
    assert (config.task, config.metric, config.network, config.network_params) == (
        "regression", "mae", "models.zoo:residual_mlp", {"width": 8})


def test_auto_hyper_parameters_are_fitted_to_the_training_rows() -> None:
    from batch.defaults import fitted

    small, middle, large = fitted(300), fitted(5_000), fitted(700_000)
    assert small["hidden"] == (128,) and small["dropout"] == 0.1 and small["patience"] == 10
    assert middle["hidden"] == (256, 128) and middle["batch_size"] == 128
    assert large["hidden"] == (500, 1000, 500) and large["dropout"] == 0.4
    assert large["batch_size"] == 512 and large["patience"] == 3
    # Small data: many passes (capped), large data: few (each holds many steps).
    assert small["epochs"] == 200 and 3 <= large["epochs"] < fitted(60_000)["epochs"] <= 20
    for rows in (1, 50, 999, 10_000, 10**7):
        f = fitted(rows)
        assert 32 <= f["batch_size"] <= 512 and f["batch_size"] & (f["batch_size"] - 1) == 0


def test_a_run_fits_only_what_is_left_at_auto() -> None:
    config = JobConfig(hidden="auto", dropout=0.3, epochs="auto", batch_size="auto")
    assert config.fitted_params(400) == {"hidden": (128,), "epochs": 200, "batch_size": 32,
                                         "patience": 10}
    (small,) = config.train_configs(rows=400)
    assert (small.hidden, small.dropout, small.epochs, small.patience) == ((128,), 0.3, 200, 10)
    (large,) = config.train_configs(rows=200_000)
    assert large.hidden == (500, 1000, 500) and large.epochs <= 20 and large.patience == 3
    given = JobConfig(hidden="64", dropout=0.0, epochs=5, batch_size=16, patience=1)
    assert given.fitted_params(400) == {}
    (one,) = given.train_configs(rows=400)
    assert (one.hidden, one.epochs, one.batch_size, one.patience) == ((64,), 5, 16, 1)
    # A factory's network is not sized by hidden and dropout: they are not fitted.
    factory = JobConfig(network="models.zoo:residual_mlp")
    assert set(factory.fitted_params(400)) == {"epochs", "batch_size", "patience"}


def test_the_shipped_hyper_parameter_settings_are_auto() -> None:
    settings = Settings.from_env({})
    assert (settings.batch_hidden, settings.batch_dropout, settings.batch_epochs,
            settings.batch_batch_size, settings.batch_patience) == ("auto",) * 4 + (None,)
    config = JobConfig.from_settings(settings)
    assert config.patience is None and config.epochs == "auto"
    assert JobConfig.from_settings(Settings.from_env({"BATCH_PATIENCE": "4"})).patience == 4
