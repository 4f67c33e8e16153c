"""Training across Spark tasks with TorchDistributor on local Spark: same model quality as one
process, and the whole job end to end with ``distributed`` set."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytest
import torch

from app.settings import Settings
from batch.candidates import Arrays, train_candidates
from batch.job import JobConfig, run_job
from batch.train import TrainConfig, train_classifier
from models.registry import Registry

pytestmark = pytest.mark.integration


def _blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    X = rng.normal(size=(n, 6)).astype(np.float32)
    X[:, :3] += 1.5 * np.eye(3, dtype=np.float32)[y]
    return X, y


def test_two_processes_train_the_same_model_as_one(spark: Any) -> None:
    X, y = _blobs(2048, 0)
    Xv, yv = _blobs(512, 1)
    # Without dropout and with batches that split evenly, data-parallel steps equal the
    # single-process steps up to the order of float sums.
    config = TrainConfig(hidden=(16,), dropout=0.0, epochs=3, batch_size=64, lr=0.01, seed=3)
    lines: list[str] = []
    (distributed,) = train_candidates(Arrays(X, y, Xv, yv, 3), [config], distributed=2,
                                      spark=spark, progress=lines.append)
    torch.set_num_threads(1)
    alone = train_classifier(X, y, 3, config, X_val=Xv, y_val=yv)
    assert any("TorchDistributor" in line for line in lines)
    assert [h["epoch"] for h in distributed.history] == [1.0, 2.0, 3.0]
    for d, a in zip(distributed.history, alone.history):
        assert d["val_loss"] == pytest.approx(a["val_loss"], rel=1e-3)
        assert d["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
    with torch.inference_mode():
        agree = (distributed.module(torch.from_numpy(Xv)).argmax(1)
                 == alone.module(torch.from_numpy(Xv)).argmax(1)).float().mean().item()
    assert agree > 0.99


def test_the_job_publishes_a_distributed_model(
        spark: Any, settings_env: Callable[..., dict[str, str]]) -> None:
    from demo.data import write_lake

    settings = Settings.from_env(settings_env())
    write_lake(settings.lake_uri, settings.storage_options, 3000, seed=5)
    config = JobConfig(hidden=(32,), dropout=0.1, epochs=3, batch_size=128, lr=0.005,
                       distributed=2, announce=False)
    result = run_job(settings, config, spark=spark)
    assert result.published and result.training["distributed_processes"] == 2
    assert result.metrics["auc"] > 0.75
    model = Registry(settings.registry_uri, settings.storage_options).load_ref(result.ref)
    assert model.metrics == result.metrics
    # The staged arrays are removed once training is over.
    import s3fs

    fs = s3fs.S3FileSystem(**settings.storage_options)
    staging = settings.registry_uri.replace("s3://", "") + "/_staging"
    assert not fs.exists(staging) or fs.find(staging) == []


def test_a_factory_s_regression_trains_distributed_as_in_one_process(spark: Any) -> None:
    """The processes build the factory's network from its name and parameters (models.zoo is
    importable wherever Stratum is), and each folds the label's scale the same way."""
    from batch.train import Network, train_network

    rng = np.random.default_rng(4)
    # 1000 rows: batches of 20 (at least 50 steps an epoch), each split 10/10.
    X = rng.normal(size=(1000, 5)).astype(np.float32)
    y = 50.0 + 10.0 * X[:, 0] - 4.0 * X[:, 1] ** 2 + rng.normal(0, 0.5, 1000)
    Xv = rng.normal(size=(256, 5)).astype(np.float32)
    yv = 50.0 + 10.0 * Xv[:, 0] - 4.0 * Xv[:, 1] ** 2
    network = Network("models.zoo:residual_mlp", {"width": 16, "blocks": 1, "dropout": 0.0})
    config = TrainConfig(epochs=3, batch_size=64, lr=0.01, seed=1)
    (distributed,) = train_candidates(Arrays(X, y, Xv, yv, 1, "regression"), [config],
                                      distributed=2, spark=spark, network=network)
    torch.set_num_threads(1)
    alone = train_network(X, y, 1, config, X_val=Xv, y_val=yv, task="regression",
                          network=network)
    assert type(distributed.module).__name__ == "ResidualMLP"
    assert distributed.architecture == alone.architecture
    assert distributed.target_mean == pytest.approx(alone.target_mean)
    for d, a in zip(distributed.history, alone.history):
        assert d["val_loss"] == pytest.approx(a["val_loss"], rel=1e-3)
    with torch.inference_mode():
        ours = distributed.module(torch.from_numpy(Xv)).numpy()[:, 0]
        theirs = alone.module(torch.from_numpy(Xv)).numpy()[:, 0]
    np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-2)
    assert float(np.sqrt(np.mean((ours - yv) ** 2))) < float(np.std(yv))
