"""Model factories the tests name (``tests.factories:...``): networks a user might write."""
from __future__ import annotations

from torch import nn


def ends_in_tanh(n_features: int, n_outputs: int) -> nn.Module:
    """A network whose output is bounded: not one a regression's scale can be folded into."""
    return nn.Sequential(nn.Linear(n_features, 8), nn.ReLU(), nn.Linear(8, n_outputs), nn.Tanh())


def wrong_width(n_features: int, n_outputs: int) -> nn.Module:
    """A network that ignores ``n_outputs``."""
    return nn.Sequential(nn.Linear(n_features, n_outputs + 1))
