"""Search, policy, history window, run lock and update-topic folding: the batch job's pure parts."""
from __future__ import annotations

import json
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from batch import prepare
from batch.active import update_state
from batch.candidates import Arrays, plan_parallelism, train_candidates
from batch.errors import LockError
from batch.evaluate import evaluate_policy
from lake.reader import window_start, within_window
from batch.lock import RegistryLock
from batch.search import candidates, describe, parse_param, parse_space
from batch.train import TrainConfig, train_classifier
from transport.protocol import Record

SPACE = {"lr": "0.001", "hidden": "16", "dropout": "0.1", "epochs": "2", "batch_size": "64"}


def test_one_value_each_gives_exactly_that_candidate() -> None:
    (only,) = candidates(parse_space(SPACE), 5, "random", seed=1)
    assert only == {"lr": 0.001, "hidden": (16,), "dropout": 0.1, "epochs": 2,
                    "batch_size": 64}
    assert describe(only) == "lr 0.001 hidden 16 dropout 0.10 epochs 2 batch 64"


def test_grid_covers_alternatives_and_range_points_and_samples_when_too_big() -> None:
    space = parse_space({**SPACE, "lr": "0.0001:0.01", "hidden": "32,16|8"})
    full = candidates(space, 100, "grid")
    assert len(full) == 6
    assert sorted({c["lr"] for c in full}) == [0.0001, 0.001, 0.01]  # geometric middle
    assert {c["hidden"] for c in full} == {(32, 16), (8,)}
    some = candidates(space, 4, "grid", seed=3)
    assert len(some) == 4 and all(c in full for c in some)
    assert some == candidates(space, 4, "grid", seed=3)


def test_random_draws_stay_in_their_ranges_and_are_reproducible() -> None:
    space = parse_space({"lr": "0.0001:0.1", "hidden": "8|16|32", "dropout": "0.0:0.5",
                         "epochs": "1:4", "batch_size": "32|64"})
    drawn = candidates(space, 40, "random", seed=7)
    assert len(drawn) > 30
    assert all(1e-4 <= c["lr"] <= 0.1 and 0.0 <= c["dropout"] <= 0.5 for c in drawn)
    assert {c["epochs"] for c in drawn} == {1, 2, 3, 4}
    assert {c["hidden"] for c in drawn} == {(8,), (16,), (32,)}
    # Log-uniform: about half the draws fall below the geometric middle 0.00316.
    low = np.mean([c["lr"] < 0.00316 for c in drawn])
    assert 0.25 < low < 0.75
    assert drawn == candidates(space, 40, "random", seed=7)


@pytest.mark.parametrize("name, spec, reason", [
    ("lr", "0", "learning rate must be > 0"),
    ("dropout", "1.0", "dropout must be in"),
    ("epochs", "0", "epochs must be >= 1"),
    ("lr", "0.1:0.01", "low < high"),
    ("hidden", "8,x", "integers"),
    ("momentum", "1", "unknown hyper-parameter"),
])
def test_bad_specifications_say_what_is_wrong(name: str, spec: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_param(name, spec)


def test_parallelism_never_oversubscribes_the_threads() -> None:
    assert plan_parallelism(1, 2) == (1, 2)
    assert plan_parallelism(4, 2) == (2, 1)
    assert plan_parallelism(4, 8) == (4, 2)
    assert plan_parallelism(3, 2, parallelism=1) == (1, 2)


def _blobs(n: int, seed: int, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    X = rng.normal(size=(n, 4)).astype(np.float32)
    X[:, 0] += 2.5 * y
    return X, y


def test_candidates_in_worker_processes_match_training_in_this_process() -> None:
    X, y = _blobs(900, 0)
    Xv, yv = _blobs(200, 1)
    arrays = Arrays(X, y, Xv, yv, 3)
    configs = [TrainConfig(hidden=(8,), dropout=0.0, epochs=2, batch_size=32, lr=0.01, seed=s)
               for s in (1, 2)]
    lines: list[str] = []
    parallel = train_candidates(arrays, configs, threads=2, progress=lines.append)
    assert any(line.startswith("candidate 2/2: epoch 2/2") for line in lines)
    torch.set_num_threads(1)
    for config, result in zip(configs, parallel):
        alone = train_classifier(X, y, 3, config, X_val=Xv, y_val=yv)
        assert result.history[-1]["val_loss"] == pytest.approx(
            alone.history[-1]["val_loss"], rel=1e-5)
        for a, b in zip(result.module.parameters(), alone.module.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_policy_threshold_and_comparison_with_the_active_model() -> None:
    good = {"accuracy": 0.82, "log_loss": 0.40, "auc": 0.88}
    assert evaluate_policy(good, 0.6).accepted
    low = evaluate_policy(good, 0.6, min_accuracy=0.9)
    assert not low.accepted and "below the threshold 0.9000" in low.reason
    worse = evaluate_policy(good, 0.6, active_metrics={"accuracy": 0.83}, active_version="v1")
    assert not worse.accepted and "worse than the active model v1" in worse.reason
    assert evaluate_policy(good, 0.6, active_metrics={"accuracy": 0.83}, tolerance=0.02).accepted
    same = evaluate_policy(good, 0.6, active_metrics={"accuracy": 0.82}, active_version="v1")
    assert same.accepted and "not worse than the active model v1" in same.reason
    by_loss = evaluate_policy(good, 0.6, metric="log_loss", active_metrics={"log_loss": 0.39})
    assert not by_loss.accepted and "log_loss 0.4000 > 0.3900" in by_loss.reason


def test_window_prunes_old_day_partitions_and_keeps_unpartitioned_files() -> None:
    files = [f"s3://b/lake/dt=2026-11-{d:02d}/hour=00/part.parquet" for d in (1, 15, 20, 23)]
    files.append("s3://b/custom/data.parquet")
    now = datetime(2026, 11, 23, 12, tzinfo=timezone.utc)
    since = window_start(7, now)
    assert since == datetime(2026, 11, 16, 12, tzinfo=timezone.utc)
    assert within_window(files, since) == files[2:]
    assert within_window(files, window_start(0, now)) == files


def test_constant_features_are_found_from_training_statistics() -> None:
    X = np.column_stack([np.full(50, 3.0), np.arange(50.0), np.full(50, 1e6)])
    count = np.array([50.0, 50.0, 1.0])
    flat = prepare.constant_features(["c", "x", "big"], count, X.sum(axis=0) * [1, 1, 0.02],
                                     (X ** 2).sum(axis=0) * [1, 1, 0.02])
    assert flat == ["c", "big"]


def test_the_newest_model_ref_is_active_and_the_newest_pin_wins() -> None:
    def ref(version: str, model: str = "default") -> dict:
        return {"type": "MODEL-REF", "model": model, "version": version,
                "manifest": f"s3://b/models/{model}/{version}/manifest.json",
                "sha256": "a" * 64, "metrics": {}}

    def records(*values: Any) -> list[Record]:
        return [Record(i, json.dumps(v).encode()) for i, v in enumerate(values)]

    state = update_state(records(ref("v1"), {"type": "UP", "model": "default"}, ref("v2"),
                                 ref("v9", model="other"), {"type": "MODEL-REF",
                                                            "model": "default"},
                                 "not an object"), "default")
    assert state.active is not None and state.active.version == "v2" and state.pinned is None
    pinned = update_state(records(ref("v1"), ref("v2"),
                                  {"type": "PIN", "model": "default", "version": "v1"},
                                  ref("v3")), "default")
    assert pinned.pinned == "v1" and pinned.active_version == "v1"
    assert pinned.protected() == {"v1", "v3"}
    released = update_state(records(ref("v1"),
                                    {"type": "PIN", "model": "default", "version": "v1"},
                                    {"type": "PIN", "model": "default", "version": None}),
                            "default")
    assert released.pinned is None and released.protected() == {"v1"}


def test_the_run_lock_excludes_a_second_run_until_released_or_expired(tmp_path: Path) -> None:
    registry = f"file://{tmp_path}/registry"
    first = RegistryLock(registry, None, "default", ttl_s=60, settle_s=0.0)
    first.acquire()
    held = json.loads((tmp_path / "registry/_locks/default.json").read_text())
    assert held["token"] == first.token and held["owner"] == first.owner
    with pytest.raises(LockError, match="another batch run of 'default' is in progress"):
        RegistryLock(registry, None, "default", settle_s=0.0).acquire()
    RegistryLock(registry, None, "other", settle_s=0.0).acquire()  # other models are free
    first.release()
    assert not (tmp_path / "registry/_locks/default.json").exists()

    later = [1_000_000.0]
    stale = RegistryLock(registry, None, "default", ttl_s=60, settle_s=0.0,
                         clock=lambda: later[0])
    stale.acquire()
    stale._stop.set()  # the holder dies without releasing: no more heartbeats
    later[0] += 61
    successor = RegistryLock(registry, None, "default", ttl_s=60, settle_s=0.0,
                             clock=lambda: later[0])
    successor.acquire()
    assert json.loads((tmp_path / "registry/_locks/default.json").read_text())[
        "token"] == successor.token
    successor.release()


def test_of_two_runs_racing_for_the_lock_exactly_one_goes_on(tmp_path: Path) -> None:
    registry = f"file://{tmp_path}/registry"
    outcomes: list[str] = []
    barrier = threading.Barrier(4)

    def contend() -> None:
        lock = RegistryLock(registry, None, "default", settle_s=0.2)
        barrier.wait()
        try:
            lock.acquire()
        except LockError:
            outcomes.append("refused")
        else:
            outcomes.append("held")

    threads = [threading.Thread(target=contend) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["held", "refused", "refused", "refused"]
