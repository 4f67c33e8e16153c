"""Training a network: Adam, mini-batches, early stopping on the validation loss.

A classification minimises cross-entropy over the class indices. A regression minimises the
mean squared error of the label standardised with the training rows' mean and standard
deviation; once trained, that scaling is folded into the network's output layer (weight times
the deviation, bias times the deviation plus the mean), so the published network outputs the
value itself, as serving and the speed layer expect.

The network is the built-in :class:`~models.network.MLP` or one a factory builds
(:class:`Network`).
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from models.errors import ModelError
from models.network import DEFAULT_DROPOUT, DEFAULT_HIDDEN, MLP_FACTORY, build_network, output_layer

__all__ = ["Arrays", "Network", "TrainConfig", "TrainResult", "train_network",
           "train_classifier", "fold_target_scale", "regression_output_layer", "parse_hidden"]

log = logging.getLogger(__name__)

# Fewest optimiser steps an epoch should take (see the batch size cap in train_network).
_MIN_STEPS_PER_EPOCH = 50


@dataclass
class Arrays:
    """Preprocessed training and validation rows: float32 features, and int64 class indices
    (classification) or float64 values (regression)."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    n_outputs: int
    task: str = "classification"



@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run.

    Attributes
    ----------
    hidden : tuple of int
        Hidden layer sizes (default: the CERN HEP pipeline's 500-1000-500).
    dropout : float
        Dropout after each hidden layer.
    epochs : int
        Maximum passes over the training rows.
    batch_size : int
        Rows per Adam step, at most; smaller on small datasets so that an epoch takes at least
        50 steps.
    lr : float
        Adam learning rate.
    seed : int
        Seeds weight initialisation and shuffling.
    patience : int
        Stop after this many epochs without a better validation loss (0: never stop early).
    max_seconds : float or None
        Stop after this much training time (checked after every step); the best weights so
        far are kept. A safety net for time-boxed runs such as the first bootstrap.
    """

    hidden: tuple[int, ...] = DEFAULT_HIDDEN
    dropout: float = DEFAULT_DROPOUT
    epochs: int = 3
    batch_size: int = 512
    lr: float = 1e-3
    seed: int = 0
    patience: int = 2
    max_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"learning rate must be > 0, got {self.lr}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(f"max seconds must be > 0, got {self.max_seconds}")


@dataclass(frozen=True)
class Network:
    """Which network to train: the built-in MLP (``factory`` is ``"mlp"``), sized by the
    candidate's ``hidden`` and ``dropout``, or ``factory(n_features, n_outputs, **params)``.

    Plain data, so it travels to worker processes and Spark tasks, which build the same
    network from it (a factory's module must be importable there).
    """

    factory: str = MLP_FACTORY
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_mlp(self) -> bool:
        """True for the built-in network."""
        return self.factory == MLP_FACTORY

    def architecture(self, n_features: int, n_outputs: int, config: "TrainConfig"
                     ) -> dict[str, Any]:
        """The manifest's ``architecture`` object of this network."""
        if self.is_mlp:
            return {"type": "mlp", "n_features": n_features, "n_outputs": n_outputs,
                    "hidden": list(config.hidden), "dropout": config.dropout}
        return {"type": "factory", "factory": self.factory, "n_features": n_features,
                "n_outputs": n_outputs, "params": dict(self.params)}

    def build(self, n_features: int, n_outputs: int, config: "TrainConfig") -> nn.Module:
        """An untrained module (:func:`models.network.build_network`; raises
        :class:`~models.errors.ModelError` when the factory cannot be imported or fails)."""
        allowed = () if self.is_mlp else (self.factory,)
        return build_network(self.architecture(n_features, n_outputs, config), allowed)


@dataclass
class TrainResult:
    """A trained network and how the training went.

    ``architecture`` is the manifest's object the module is rebuilt from; ``target_mean`` and
    ``target_std`` are a regression's label scaling, already folded into the module."""

    module: nn.Module
    architecture: dict[str, Any]
    batch_size: int
    epochs_run: float
    best_epoch: int
    stopped: str
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    task: str = "classification"
    target_mean: float | None = None
    target_std: float | None = None


def _loss(task: str, reduction: str = "mean") -> nn.Module:
    return nn.MSELoss(reduction=reduction) if task == "regression" else nn.CrossEntropyLoss(
        reduction=reduction)


def _mean_loss(module: nn.Module, X: torch.Tensor, y: torch.Tensor, chunk: int = 8192,
               task: str = "classification") -> float:
    module.eval()
    loss = _loss(task, "sum")
    total = 0.0
    with torch.inference_mode():
        for start in range(0, len(X), chunk):
            total += float(loss(module(X[start:start + chunk]), y[start:start + chunk]))
    return total / max(len(X), 1)


def _global_sum(value: float, world: int) -> float:
    """Sum of ``value`` over the processes of the group (``value`` itself alone)."""
    if world == 1:
        return value
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor[0])


def _any_process(flag: bool, world: int) -> bool:
    """True when ``flag`` is true in any process of the group."""
    return _global_sum(1.0 if flag else 0.0, world) > 0 if world > 1 else flag


def _global_mean_loss(module: nn.Module, X: torch.Tensor, y: torch.Tensor, world: int,
                      task: str = "classification") -> float:
    """Mean loss over the rows of every process (each holds its own share)."""
    if world == 1:
        return _mean_loss(module, X, y, task=task)
    local = _mean_loss(module, X, y, task=task) * len(X)
    return _global_sum(local, world) / max(_global_sum(float(len(X)), world), 1.0)


def fold_target_scale(module: nn.Module, n_features: int, mean: float, std: float) -> None:
    """Make a network trained on ``(y - mean) / std`` output ``y``: its output layer (found by
    :func:`models.network.output_layer`) gets weight ``* std`` and bias ``* std + mean``.

    Raises
    ------
    ModelError
        The network does not end in a linear layer with a bias.
    """
    layer = regression_output_layer(module, n_features)
    with torch.no_grad():
        layer.weight.mul_(std)
        layer.bias.mul_(std).add_(mean)


def regression_output_layer(module: nn.Module, n_features: int) -> nn.Linear:
    """The output layer a regression's label scaling is folded into: the network's last
    linear layer, which must compute its output and have a bias (to add the mean).

    Raises
    ------
    ModelError
        The network does not end in such a layer.
    """
    name, layer = output_layer(module, n_features)
    if layer.bias is None:
        raise ModelError(f"{type(module).__name__}'s output layer {name!r} has no bias: a "
                         "regression's network must end in a linear layer with a bias (the "
                         "label's mean is added there)")
    return layer


def train_classifier(X_train: np.ndarray, y_train: np.ndarray, n_classes: int,
                     config: TrainConfig = TrainConfig(),
                     X_val: np.ndarray | None = None, y_val: np.ndarray | None = None,
                     progress: Callable[[str], None] | None = None,
                     distributed: bool = False) -> TrainResult:
    """:func:`train_network` of a classification with the built-in MLP."""
    return train_network(X_train, y_train, n_classes, config, X_val=X_val, y_val=y_val,
                         progress=progress, distributed=distributed)


def train_network(X_train: np.ndarray, y_train: np.ndarray, n_outputs: int,
                  config: TrainConfig = TrainConfig(),
                  X_val: np.ndarray | None = None, y_val: np.ndarray | None = None,
                  progress: Callable[[str], None] | None = None,
                  distributed: bool = False, task: str = "classification",
                  network: Network = Network()) -> TrainResult:
    """Train a network on preprocessed rows.

    Parameters
    ----------
    X_train : numpy.ndarray
        ``(n, n_features)`` float32, already preprocessed.
    y_train : numpy.ndarray
        ``(n,)`` class indices in ``[0, n_outputs)``, or a regression's values.
    n_outputs : int
        Number of classes, or 1 for a regression.
    config : TrainConfig
        Hyper-parameters (``hidden`` and ``dropout`` size the built-in MLP only).
    X_val, y_val : numpy.ndarray, optional
        Validation rows: the weights of the epoch with the lowest validation loss are kept,
        and training stops after ``config.patience`` epochs without improvement.
    progress : callable, optional
        Receives one line per epoch.
    distributed : bool
        Data-parallel training in an initialised :mod:`torch.distributed` process group: every
        process holds the same rows and draws the same shuffled order; each global mini-batch is
        split between the processes and DDP averages the gradients, so an optimiser step is the
        one single-process training takes on the same batch. Losses and the stopping decisions
        are reduced across processes, so every process stops at the same step.
    task : str
        ``classification`` (cross-entropy) or ``regression`` (mean squared error of the
        standardised label, the scaling folded into the output layer afterwards).
    network : Network
        The built-in MLP (default) or a factory's network.

    Returns
    -------
    TrainResult
        The network in eval mode, with per-epoch history (losses of a regression are in
        standardised units).

    Raises
    ------
    ModelError
        The network cannot be built, or (regression) does not end in a linear layer.

    Notes
    -----
    Uses torch's current thread setting; the job sets it (the library never does).
    """
    if len(X_train) == 0:
        raise ValueError("no training rows")
    regression = task == "regression"
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    X = torch.from_numpy(np.ascontiguousarray(X_train, dtype=np.float32))
    mean = std = None
    if regression:
        values = np.asarray(y_train, dtype=np.float64)
        mean, std = float(values.mean()), float(values.std())
        std = std if std > 0 and math.isfinite(std) else 1.0

        def target(v: np.ndarray) -> torch.Tensor:
            assert mean is not None and std is not None
            scaled = (np.asarray(v, dtype=np.float64) - mean) / std
            return torch.from_numpy(scaled.astype(np.float32).reshape(-1, 1))
    else:
        def target(v: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.asarray(v, dtype=np.int64))
    y = target(y_train)
    has_val = X_val is not None and y_val is not None and len(X_val) > 0
    if has_val:
        assert X_val is not None and y_val is not None
        Xv = torch.from_numpy(np.ascontiguousarray(X_val, dtype=np.float32))
        yv = target(y_val)
    # The same seed gives every process the same initial weights.
    module = network.build(X.shape[1], n_outputs, config)
    if regression:
        regression_output_layer(module, X.shape[1])  # fails now, not after training
    rank, world = 0, 1
    stepper: torch.nn.Module = module
    if distributed:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        rank, world = dist.get_rank(), dist.get_world_size()
        stepper = DistributedDataParallel(module)
        if has_val:
            Xv, yv = Xv[rank::world], yv[rank::world]
    optimizer = torch.optim.Adam(module.parameters(), lr=config.lr)
    loss_fn = _loss(task)
    n = len(X)
    # On a small dataset a large batch leaves a handful of steps per epoch and the network
    # learns nothing; shrink the batch so that every epoch takes enough steps.
    bs = max(1, min(config.batch_size, math.ceil(n / _MIN_STEPS_PER_EPOCH)))
    if bs != config.batch_size:
        log.info("batch size %d -> %d for %d training rows", config.batch_size, bs, n)
    steps_per_epoch = math.ceil(n / bs)

    start = time.monotonic()
    best_loss, best_epoch, best_state = math.inf, 0, None
    history: list[dict[str, float]] = []
    stopped, epochs_run, stale = "epochs", 0.0, 0
    for epoch in range(1, config.epochs + 1):
        module.train()
        order = torch.randperm(n, generator=generator)
        total, steps, out_of_time = 0.0, 0, False
        for step in range(steps_per_epoch):
            idx = order[step * bs:(step + 1) * bs]
            if world > 1:
                # Each process takes every world-th row of the global batch (a last batch
                # smaller than the world repeats its first row: every process must step).
                idx = idx[rank::world] if len(idx) > rank else idx[:1]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(stepper(X[idx]), y[idx])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
            steps += 1
            if config.max_seconds is not None:
                late = time.monotonic() - start > config.max_seconds
                if _any_process(late, world):
                    out_of_time = True
                    break
        seen = min(steps * bs, n)
        epochs_run += seen / n
        record = {"epoch": float(epoch), "train_loss": _global_sum(total, world) / seen,
                  "seconds": time.monotonic() - start}
        if has_val:
            record["val_loss"] = _global_mean_loss(module, Xv, yv, world, task)
        history.append(record)
        score = record.get("val_loss", record["train_loss"])
        if progress and rank == 0:
            progress(f"epoch {epoch}/{config.epochs}: train loss {record['train_loss']:.4f}"
                     + (f", val loss {record['val_loss']:.4f}" if has_val else "")
                     + f" ({record['seconds']:.1f}s)" + (" [time budget]" if out_of_time else ""))
        if score < best_loss:
            best_loss, best_epoch, stale = score, epoch, 0
            # Copying only when needed: the last epoch is usually the best.
            best_state = copy.deepcopy(module.state_dict()) if has_val else None
        else:
            stale += 1
        if out_of_time:
            stopped = "time budget"
            break
        if has_val and config.patience and stale >= config.patience:
            stopped = "early stopping"
            break
    if has_val and best_state is not None and best_epoch != len(history):
        module.load_state_dict(best_state)
    module.eval()
    if regression:
        assert mean is not None and std is not None
        fold_target_scale(module, X.shape[1], mean, std)
    seconds = time.monotonic() - start
    log.info("trained %s (%s) for %.2f epochs in %.1fs (%s, best epoch %d)",
             network.factory, task, epochs_run, seconds, stopped, best_epoch)
    return TrainResult(module=module,
                       architecture=network.architecture(X.shape[1], n_outputs, config),
                       batch_size=bs, epochs_run=round(epochs_run, 3), best_epoch=best_epoch,
                       stopped=stopped, seconds=seconds, history=history, task=task,
                       target_mean=mean, target_std=std)


def parse_hidden(value: str | Sequence[int]) -> tuple[int, ...]:
    """Parse ``"500,1000,500"`` (or a sequence) into hidden sizes; ``""`` means none."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        try:
            sizes = tuple(int(p) for p in parts)
        except ValueError:
            raise ValueError(f"hidden sizes must be integers like 500,1000,500, "
                             f"got {value!r}") from None
    else:
        sizes = tuple(int(v) for v in value)
    if any(s < 1 for s in sizes):
        raise ValueError(f"hidden sizes must be positive, got {value!r}")
    return sizes
