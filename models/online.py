"""Incremental model updates: the speed layer's output-layer fine-tuning and its UP messages.

Between two batch rebuilds the speed layer keeps the serving model current with what the
labelled stream teaches: the hidden layers of the base version stay frozen, and only the last
linear layer (the logits) is refitted on a buffer of recent labelled examples, weighted
towards the newest so that it follows a drifting decision boundary. Each refit is published
as an ``UP`` message carrying the whole output layer (not a delta), the base version it
belongs to and a sequence number; serving applies it to that base only, in order.

>>> update = learner.fit(head, X_new, y_new, seq=3)              # doctest: +SKIP
>>> message = update.to_message()                                # JSON-ready dict
>>> same = ModelUpdate.from_message(message)                     # validated
>>> serving = apply_update(base, same)                           # version "<base>+3"

The ``UP`` message itself (:class:`~transport.protocol.ModelUpdate`, re-exported here) is
defined with the rest of the update topic's protocol in :mod:`transport.protocol`. Everything
here is plain numpy/torch: no Kafka, so unit tests call it directly.
"""
from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from models.network import with_output_layer
from models.errors import ModelError
from models.manifest import REGRESSION, utc_now_iso
from models.preprocessing import missing_mask
from models.loaded import LoadedModel
from transport.protocol import ModelUpdate

__all__ = ["ModelUpdate", "apply_update", "output_layer", "hidden_activations",
           "recency_weights", "OutputLayerLearner", "BaseNotHeld", "start_learning_process",
           "refit"]

def output_layer(model: LoadedModel) -> nn.Linear:
    """The linear layer that computes ``model``'s outputs (the logits, or the value).

    Raises
    ------
    ModelError
        The network does not end in a linear layer: the speed layer cannot update it.
    """
    return model.output_layer()[1]


def apply_update(base: LoadedModel, update: ModelUpdate) -> LoadedModel:
    """A new model: ``base`` with its output layer replaced by ``update``'s.

    ``base`` is left untouched (it may be serving in another thread); the hidden layers are
    shared with it, since nothing ever modifies them, and only the output layer is new.

    Raises
    ------
    ModelError
        The update belongs to another model or base version, or its shape does not fit.
    """
    if update.model != base.name:
        raise ModelError(f"update for model {update.model!r} cannot apply to {base.name!r}")
    if update.base_version != base.base_version:
        raise ModelError(f"update {update.version} is for base version {update.base_version}, "
                         f"not {base.base_version}")
    current = output_layer(base)
    if update.weight.shape != tuple(current.weight.shape) or update.bias.shape != tuple(
            current.bias.shape):
        raise ModelError(f"update {update.version} has an output layer of shape "
                         f"{list(update.weight.shape)} + {list(update.bias.shape)}, the "
                         f"network needs {list(current.weight.shape)} + "
                         f"{list(current.bias.shape)}")
    layer = nn.Linear(current.in_features, current.out_features)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(np.asarray(update.weight, dtype=np.float32)))
        layer.bias.copy_(torch.from_numpy(np.asarray(update.bias, dtype=np.float32)))
    module = with_output_layer(base.module, base.output_layer()[0], layer.eval())
    model = LoadedModel(base.manifest, module, manifest_uri=base.manifest_uri,
                        sha256=base.sha256)
    model.version = update.version
    model.base_version = base.base_version
    model.update_seq = update.seq
    return model


def hidden_activations(model: LoadedModel, X: np.ndarray) -> np.ndarray:
    """Inputs of the output layer for raw feature rows: the network's last hidden layer.

    Parameters
    ----------
    model : LoadedModel
        The model whose preprocessing and hidden layers are applied.
    X : numpy.ndarray
        ``(n, n_features)`` raw values in the model's feature order (missing as NaN/-999).

    Returns
    -------
    numpy.ndarray
        ``(n, last_hidden)`` float32.
    """
    X = np.asarray(X, dtype=np.float64)
    inputs = torch.from_numpy(model.preprocessor.transform(X))
    seen: list[torch.Tensor] = []
    handle = output_layer(model).register_forward_pre_hook(
        lambda _layer, args: seen.append(args[0]))
    try:
        with torch.inference_mode():
            model.module(inputs)
    finally:
        handle.remove()
    features: np.ndarray = seen[-1].float().numpy()
    return features


def recency_weights(n: int, half_life: float) -> np.ndarray:
    """Weights of ``n`` examples, oldest first, halving every ``half_life`` examples back in
    time; they sum to 1."""
    age = np.arange(n - 1, -1, -1, dtype=np.float64)
    weights: np.ndarray = np.power(0.5, age / max(half_life, 1e-9))
    return weights / float(weights.sum())


class OutputLayerLearner:
    """Refits the output layer of one base version on a buffer of recent labelled examples.

    The frozen hidden layers turn each example into its activations once, when it enters the
    buffer; a refit then is a weighted, L2-regularised multinomial logistic regression on those
    activations (L-BFGS), started from the chain's current output layer and pulled towards it,
    with weights halving every ``half_life`` examples back in time so that it follows drift.
    The buffer keeps the newest ``capacity`` examples.

    A learner belongs to one base version. Its methods are not thread-safe: call them from
    one thread at a time (the speed agent runs them in a single worker thread).

    Parameters
    ----------
    base : LoadedModel
        The base version (its hidden layers are used, never changed).
    capacity : int
        Most examples kept.
    half_life : float
        Recency half-life, in examples.
    l2 : float
        Strength of the pull towards the starting weights.
    max_iter : int
        L-BFGS iterations per refit.
    """

    def __init__(self, base: LoadedModel, capacity: int = 4000, half_life: float = 1000.0,
                 l2: float = 1e-3, max_iter: int = 40) -> None:
        if capacity < 1 or half_life <= 0 or l2 < 0 or max_iter < 1:
            raise ModelError("learner needs capacity >= 1, half_life > 0, l2 >= 0, "
                             "max_iter >= 1")
        self.base = base
        self.capacity = capacity
        self.half_life = half_life
        self.l2 = l2
        self.max_iter = max_iter
        width = output_layer(base).in_features
        self._H = np.empty((0, width), dtype=np.float32)
        self._regression = base.task == REGRESSION
        self._y = np.empty(0, dtype=np.float64 if self._regression else np.int64)
        self._X = np.empty((0, base.n_features), dtype=np.float64)

    @property
    def size(self) -> int:
        """Examples in the buffer."""
        return len(self._y)

    def add(self, X: np.ndarray, y: np.ndarray) -> None:
        """Append labelled examples: raw rows in the base's feature order, and class indexes
        (classification) or target values (regression)."""
        X = np.asarray(X, dtype=np.float64).reshape(-1, self.base.n_features)
        y = np.asarray(y, dtype=self._y.dtype).reshape(-1)
        if len(X) != len(y):
            raise ModelError(f"{len(X)} rows but {len(y)} labels")
        if self._regression:
            if not np.isfinite(y).all():
                raise ModelError("regression targets must be finite numbers")
        elif len(y) and (y.min() < 0 or y.max() >= len(self.base.classes)):
            raise ModelError(f"class indexes must be in [0, {len(self.base.classes)})")
        if not len(y):
            return
        H = hidden_activations(self.base, X)
        keep = self.capacity
        self._H = np.concatenate([self._H, H])[-keep:]
        self._y = np.concatenate([self._y, y])[-keep:]
        self._X = np.concatenate([self._X, X])[-keep:]

    def fit(self, head: LoadedModel, seq: int, model: str | None = None) -> ModelUpdate:
        """Refit the output layer from ``head``'s and return it as update number ``seq``.

        Parameters
        ----------
        head : LoadedModel
            The chain's newest model (the base or the base with its latest update): the fit
            starts from, and is regularised towards, its output layer.
        seq : int
            Sequence number of the update.
        model : str, optional
            Model name (default: the base's).
        """
        if head.base_version != self.base.base_version:
            raise ModelError(f"head {head.version} is not of base {self.base.base_version}")
        if self.size == 0:
            raise ModelError("no labelled examples to learn from")
        started = time.perf_counter()
        start = output_layer(head)
        W0 = start.weight.detach().clone()
        b0 = start.bias.detach().clone()
        H = torch.from_numpy(self._H)
        y = torch.from_numpy(self._y)
        w = torch.from_numpy(recency_weights(self.size, self.half_life).astype(np.float32))
        if self._regression:
            W_new, b_new = _ridge_towards(H, y, w, W0, b0, self.l2)
            figures = {"rmse_before": _weighted_rmse(H, y, w, W0, b0),
                       "rmse_after": _weighted_rmse(H, y, w, W_new, b_new)}
        else:
            W_new, b_new, figures = self._fit_logistic(H, y, w, W0, b0)
        if not (torch.isfinite(W_new).all() and torch.isfinite(b_new).all()):
            raise ModelError("the output-layer fit diverged (non-finite weights)")
        extra = {
            "fit": {**figures, "half_life": self.half_life, "l2": self.l2,
                    "from_version": head.version,
                    "seconds": round(time.perf_counter() - started, 4)},
            "statistics": _feature_statistics(self.base.features, self._X),
        }
        return ModelUpdate(model=model or self.base.name, base_version=self.base.base_version,
                           seq=seq, weight=W_new.numpy().astype(np.float32),
                           bias=b_new.numpy().astype(np.float32), n_examples=self.size,
                           created_at=utc_now_iso(), extra=extra)

    def _fit_logistic(self, H: torch.Tensor, y: torch.Tensor, w: torch.Tensor,
                      W0: torch.Tensor, b0: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """Weighted multinomial logistic regression pulled towards ``W0, b0`` (L-BFGS)."""
        before = _weighted_scores(H, y, w, W0, b0)
        W = W0.clone().requires_grad_(True)
        b = b0.clone().requires_grad_(True)
        optimizer = torch.optim.LBFGS([W, b], lr=1.0, max_iter=self.max_iter,
                                      line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            losses = nn.functional.cross_entropy(H @ W.T + b, y, reduction="none")
            loss = (w * losses).sum() + 0.5 * self.l2 * (
                (W - W0).square().sum() + (b - b0).square().sum())
            loss.backward()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
            return loss

        with torch.enable_grad():
            optimizer.step(closure)  # type: ignore[no-untyped-call]
        W_new, b_new = W.detach(), b.detach()
        after = _weighted_scores(H, y, w, W_new, b_new)
        return W_new, b_new, {"accuracy_before": before[0], "log_loss_before": before[1],
                              "accuracy_after": after[0], "log_loss_after": after[1]}


def _ridge_towards(H: torch.Tensor, y: torch.Tensor, w: torch.Tensor, W0: torch.Tensor,
                   b0: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The output layer of a regression refitted in closed form: weighted least squares on
    the activations, pulled towards ``W0, b0`` (minimises ``sum w (h.W + b - y)^2 +
    l2 |[W, b] - [W0, b0]|^2``)."""
    A = torch.cat([H.double(), torch.ones(len(H), 1, dtype=torch.float64)], dim=1)
    theta0 = torch.cat([W0.double().reshape(-1), b0.double().reshape(-1)])
    weighted = A * w.double().unsqueeze(1)
    lhs = weighted.T @ A + max(l2, 1e-9) * torch.eye(A.shape[1], dtype=torch.float64)
    rhs = weighted.T @ y.double() + l2 * theta0
    theta = torch.linalg.solve(lhs, rhs)
    return (theta[:-1].reshape(1, -1).float(), theta[-1:].float())


def _weighted_rmse(H: torch.Tensor, y: torch.Tensor, w: torch.Tensor, W: torch.Tensor,
                   b: torch.Tensor) -> float:
    """Recency-weighted root mean squared error of a regression's output layer."""
    with torch.no_grad():
        error = (H.double() @ W.double().T + b.double()).reshape(-1) - y.double()
        return round(float(torch.sqrt((w.double() * error.square()).sum())), 6)


def _weighted_scores(H: torch.Tensor, y: torch.Tensor, w: torch.Tensor, W: torch.Tensor,
                     b: torch.Tensor) -> tuple[float, float]:
    """Recency-weighted accuracy and log loss of an output layer on the buffer."""
    with torch.no_grad():
        logits = H @ W.T + b
        accuracy = float((w * (logits.argmax(dim=1) == y).float()).sum())
        log_loss = float((w * nn.functional.cross_entropy(logits, y, reduction="none")).sum())
    return round(accuracy, 6), round(log_loss, 6)


def _feature_statistics(features: list[str], X: np.ndarray) -> dict[str, Any]:
    """Count, mean and standard deviation of the present values of each feature in ``X``:
    refreshed statistics of the recent stream, to compare with the base's preprocessing."""
    present = ~missing_mask(X)
    count = present.sum(axis=0)
    values = np.where(present, X, 0.0)
    safe = np.maximum(count, 1)
    mean = values.sum(axis=0) / safe
    var = np.maximum(np.square(values).sum(axis=0) / safe - mean ** 2, 0.0)
    return {"features": list(features), "count": count.astype(int).tolist(),
            "mean": [round(float(m), 6) if c else None for m, c in zip(mean, count)],
            "std": [round(float(math.sqrt(v)), 6) if c else None for v, c in zip(var, count)]}


# -- a learner in a process of its own ---------------------------------------------------------
#
# A refit is a burst of Python-level work (L-BFGS steps, autograd) that holds the GIL: run in
# a thread of the serving process it would stall the event loop for as long. The speed layer
# runs it in a process of its own instead (a ProcessPoolExecutor of one spawned process), at a
# lower priority than serving. The process keeps the learner, and its buffer, between refits.

_process_learner: OutputLayerLearner | None = None


class BaseNotHeld(ModelError):
    """The learning process holds no learner for the base: send the base model."""


def start_learning_process(threads: int, niceness: int = 10) -> None:
    """Initialiser of the learning process: its threads, its priority and its imports."""
    import importlib
    import os

    torch.set_num_threads(threads)
    if niceness:
        os.nice(niceness)
    # The first optimizer built imports torch._dynamo (seconds of CPU): paid now.
    importlib.import_module("torch._dynamo")


def refit(base: LoadedModel | None, base_version: str, capacity: int, half_life: float,
          newest: ModelUpdate | None, X: np.ndarray, y: np.ndarray, seq: int) -> ModelUpdate:
    """In the learning process: add the examples to the learner of ``base_version`` and refit
    from the chain's head, ``newest`` applied to the base. Sending ``base`` starts a new
    learner, without the examples of the last one; without it, the process's learner for
    ``base_version`` goes on.

    Raises
    ------
    BaseNotHeld
        ``base`` is None and the process has no learner for ``base_version``.
    """
    global _process_learner
    learner = _process_learner
    if base is not None or learner is None or learner.base.base_version != base_version:
        if base is None:
            raise BaseNotHeld(f"the learning process holds no learner for {base_version}")
        learner = _process_learner = OutputLayerLearner(base, capacity=capacity,
                                                        half_life=half_life)
    learner.add(X, y)
    head = apply_update(learner.base, newest) if newest is not None else learner.base
    return learner.fit(head, seq)
