"""Networks for tabular data beyond the built-in MLP, written as a user writes their own.

Each function here is a *model factory* (docs/contract.md, "Your own network"): it takes the
feature count, the output count and keyword hyper-parameters, and returns an ``nn.Module`` that
maps ``(n, n_features)`` preprocessed float32 rows to ``(n, n_outputs)`` logits or values.
Train with one by naming it::

    BATCH_MODEL=models.zoo:residual_mlp BATCH_MODEL_PARAMS='{"width": 128, "blocks": 3}'

and let the workers load it with ``MODEL_FACTORIES=models.zoo:residual_mlp``.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["ResidualMLP", "residual_mlp"]


class _Block(nn.Module):
    """``x + Linear(Dropout(ReLU(Linear(LayerNorm(x)))))``: a pre-norm residual block."""

    def __init__(self, width: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.inner = nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Dropout(dropout),
                                   nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + self.inner(self.norm(x))
        return out


class ResidualMLP(nn.Module):
    """A residual MLP for tabular data (Gorishniy et al., "Revisiting Deep Learning Models for
    Tabular Data", 2021): an input projection, ``blocks`` pre-norm residual blocks, then a
    normalised linear output layer (which the speed layer can refit)."""

    def __init__(self, n_features: int, n_outputs: int, width: int = 64, blocks: int = 2,
                 dropout: float = 0.1) -> None:
        super().__init__()
        if min(n_features, n_outputs, width) < 1 or blocks < 0 or not 0 <= dropout < 1:
            raise ValueError(f"ResidualMLP needs positive sizes, blocks >= 0 and dropout in "
                             f"[0, 1); got width={width}, blocks={blocks}, dropout={dropout}")
        self.project = nn.Linear(n_features, width)
        self.blocks = nn.Sequential(*(_Block(width, dropout) for _ in range(blocks)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(torch.relu(self.norm(self.blocks(self.project(x)))))
        return out


def residual_mlp(n_features: int, n_outputs: int, width: int = 64, blocks: int = 2,
                 dropout: float = 0.1) -> nn.Module:
    """Factory of :class:`ResidualMLP`."""
    return ResidualMLP(n_features, n_outputs, width=width, blocks=blocks, dropout=dropout)
