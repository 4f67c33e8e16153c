"""Model factories the tests name (``tests.factories:...``): networks a user might write."""
from __future__ import annotations

import torch
from torch import nn


def ends_in_tanh(n_features: int, n_outputs: int) -> nn.Module:
    """A network whose output is bounded: not one a regression's scale can be folded into."""
    return nn.Sequential(nn.Linear(n_features, 8), nn.ReLU(), nn.Linear(8, n_outputs), nn.Tanh())


def wrong_width(n_features: int, n_outputs: int) -> nn.Module:
    """A network that ignores ``n_outputs``."""
    return nn.Sequential(nn.Linear(n_features, n_outputs + 1))


class _FailsOnLargeInputs(nn.Module):
    def __init__(self, n_features: int, n_outputs: int) -> None:
        super().__init__()
        self.linear = nn.Linear(n_features, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x.abs() > 10).any()):
            raise RuntimeError("an input beyond 10 standard deviations")
        return self.linear(x)


def fails_on_large_inputs(n_features: int, n_outputs: int) -> nn.Module:
    """A network that passes its reference rows and fails on outlying live inputs."""
    return _FailsOnLargeInputs(n_features, n_outputs)
