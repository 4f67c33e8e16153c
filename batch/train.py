"""Training the classifier on the driver: Adam, cross-entropy, mini-batches, early stopping."""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from models.network import DEFAULT_DROPOUT, DEFAULT_HIDDEN, MLP

__all__ = ["Arrays", "TrainConfig", "TrainResult", "train_classifier", "parse_hidden"]

log = logging.getLogger(__name__)

# Fewest optimiser steps an epoch should take (see the batch size cap in train_classifier).
_MIN_STEPS_PER_EPOCH = 50


@dataclass
class Arrays:
    """Preprocessed training and validation rows (float32 features, int64 class indices)."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    n_classes: int



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


@dataclass
class TrainResult:
    """A trained network and how the training went."""

    module: MLP
    batch_size: int
    epochs_run: float
    best_epoch: int
    stopped: str
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def _mean_loss(module: nn.Module, X: torch.Tensor, y: torch.Tensor, chunk: int = 8192
               ) -> float:
    module.eval()
    loss = nn.CrossEntropyLoss(reduction="sum")
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


def _global_mean_loss(module: nn.Module, X: torch.Tensor, y: torch.Tensor, world: int
                      ) -> float:
    """Mean loss over the rows of every process (each holds its own share)."""
    if world == 1:
        return _mean_loss(module, X, y)
    local = _mean_loss(module, X, y) * len(X)
    return _global_sum(local, world) / max(_global_sum(float(len(X)), world), 1.0)


def train_classifier(X_train: np.ndarray, y_train: np.ndarray, n_classes: int,
                     config: TrainConfig = TrainConfig(),
                     X_val: np.ndarray | None = None, y_val: np.ndarray | None = None,
                     progress: Callable[[str], None] | None = None,
                     distributed: bool = False) -> TrainResult:
    """Train an :class:`~models.network.MLP` on preprocessed rows.

    Parameters
    ----------
    X_train : numpy.ndarray
        ``(n, n_features)`` float32, already preprocessed.
    y_train : numpy.ndarray
        ``(n,)`` class indices in ``[0, n_classes)``.
    n_classes : int
        Number of classes.
    config : TrainConfig
        Hyper-parameters.
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

    Returns
    -------
    TrainResult
        The network in eval mode, with per-epoch history.

    Notes
    -----
    Uses torch's current thread setting; the job sets it (the library never does).
    """
    if len(X_train) == 0:
        raise ValueError("no training rows")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    X = torch.from_numpy(np.ascontiguousarray(X_train, dtype=np.float32))
    y = torch.from_numpy(np.asarray(y_train, dtype=np.int64))
    has_val = X_val is not None and y_val is not None and len(X_val) > 0
    if has_val:
        Xv = torch.from_numpy(np.ascontiguousarray(X_val, dtype=np.float32))
        yv = torch.from_numpy(np.asarray(y_val, dtype=np.int64))
    module = MLP(X.shape[1], n_classes, hidden=config.hidden, dropout=config.dropout)
    rank, world = 0, 1
    network: torch.nn.Module = module
    if distributed:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        rank, world = dist.get_rank(), dist.get_world_size()
        network = DistributedDataParallel(module)
        if has_val:
            Xv, yv = Xv[rank::world], yv[rank::world]
    optimizer = torch.optim.Adam(module.parameters(), lr=config.lr)
    loss_fn = nn.CrossEntropyLoss()
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
            loss = loss_fn(network(X[idx]), y[idx])
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
            record["val_loss"] = _global_mean_loss(module, Xv, yv, world)
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
    seconds = time.monotonic() - start
    log.info("trained %s for %.2f epochs in %.1fs (%s, best epoch %d)",
             [X.shape[1], *config.hidden, n_classes], epochs_run, seconds, stopped, best_epoch)
    return TrainResult(module=module, batch_size=bs, epochs_run=round(epochs_run, 3),
                       best_epoch=best_epoch, stopped=stopped, seconds=seconds, history=history)


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
