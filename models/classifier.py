"""The network: a multilayer perceptron classifier that outputs logits.

Its default shape, 30-500-1000-500-2 with dropout 0.4, is the one of the CERN Kafka/Spark
high-energy-physics pipeline; every size is configurable because a small machine must be able to
bootstrap a model in seconds.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from models.errors import ModelError

__all__ = ["MLPClassifier", "DEFAULT_HIDDEN", "DEFAULT_DROPOUT"]

#: Hidden layer sizes of the CERN HEP pipeline's classifier.
DEFAULT_HIDDEN: tuple[int, ...] = (500, 1000, 500)
#: Dropout probability after every hidden layer.
DEFAULT_DROPOUT = 0.4


class MLPClassifier(nn.Module):
    """``Linear -> ReLU -> Dropout`` blocks followed by a linear layer of logits.

    Parameters
    ----------
    n_features : int
        Input width (number of preprocessed features).
    n_classes : int
        Output width, one logit per class (at least 2).
    hidden : sequence of int
        Sizes of the hidden layers, input side first; may be empty (logistic regression).
    dropout : float
        Dropout probability after each hidden activation, in ``[0, 1)``.
    """

    def __init__(self, n_features: int, n_classes: int,
                 hidden: Sequence[int] = DEFAULT_HIDDEN, dropout: float = DEFAULT_DROPOUT
                 ) -> None:
        super().__init__()
        hidden = tuple(int(h) for h in hidden)
        if n_features < 1:
            raise ModelError(f"n_features must be >= 1, got {n_features}")
        if n_classes < 2:
            raise ModelError(f"n_classes must be >= 2, got {n_classes}")
        if any(h < 1 for h in hidden):
            raise ModelError(f"hidden sizes must be >= 1, got {list(hidden)}")
        if not 0.0 <= dropout < 1.0:
            raise ModelError(f"dropout must be in [0, 1), got {dropout}")
        self.n_features = int(n_features)
        self.n_classes = int(n_classes)
        self.hidden = hidden
        self.dropout = float(dropout)
        layers: list[nn.Module] = []
        width = self.n_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(self.dropout)]
            width = size
        layers.append(nn.Linear(width, self.n_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(n, n_classes)`` for a ``(n, n_features)`` float32 batch."""
        logits: torch.Tensor = self.net(x)
        return logits

    def architecture(self) -> dict[str, Any]:
        """JSON-ready description from which :meth:`from_architecture` rebuilds the module."""
        return {"type": "mlp", "n_features": self.n_features, "n_classes": self.n_classes,
                "hidden": list(self.hidden), "dropout": self.dropout}

    @classmethod
    def from_architecture(cls, arch: Mapping[str, Any]) -> "MLPClassifier":
        """Build an untrained module from :meth:`architecture` output."""
        if arch.get("type", "mlp") != "mlp":
            raise ModelError(f"unsupported architecture type {arch.get('type')!r}")
        try:
            return cls(int(arch["n_features"]), int(arch["n_classes"]),
                       hidden=[int(h) for h in arch["hidden"]],
                       dropout=float(arch["dropout"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"bad architecture {dict(arch)!r}: {exc}") from None
