"""Hyper-parameters fitted to the data: what a run trains with where a setting says ``auto``.

The built-in network's shape, dropout, mini-batch, epochs and patience default to ``auto``
(``BATCH_HIDDEN``, ``BATCH_DROPOUT``, ``BATCH_BATCH_SIZE``, ``BATCH_EPOCHS``, and
``BATCH_PATIENCE`` unset), and a run picks them from the number of training rows once it has
split the data, so that a first run on a few hundred rows and one on millions both land near
what a tuned model reaches:

==================  ===================  ===================  ==========================
training rows       under 2,000          2,000 to 50,000      50,000 and more
==================  ===================  ===================  ==========================
hidden layers       128                  256-128              500-1000-500 (CERN's)
dropout             0.1                  0.1                  0.4
mini-batch          rows/50, 32 to 512 (a power of two); an epoch has at least 50 steps
epochs at most      10,000 steps' worth, 10 to 200           the same, 3 to 20
patience            10 epochs            10 epochs            3 epochs
==================  ===================  ===================  ==========================

Small data gets a small network, little dropout and many passes, stopped by the validation loss
(as scikit-learn's ``MLPClassifier`` trains a 100-unit layer for up to 200 epochs); large data
gets the CERN network and few passes, each of which already holds many steps. A value given in
a setting or option always wins over the fitted one.
"""
from __future__ import annotations

import math
from typing import Any

__all__ = ["AUTO", "FITTED", "is_auto", "fitted"]

#: The value of a hyper-parameter setting that asks for the fitted value.
AUTO = "auto"
#: The hyper-parameters :func:`fitted` provides.
FITTED = ("hidden", "dropout", "batch_size", "epochs", "patience")

_SMALL_ROWS = 2_000
_LARGE_ROWS = 50_000
_STEP_BUDGET = 10_000
# batch.train caps the mini-batch so that an epoch takes at least this many steps.
_MIN_STEPS_PER_EPOCH = 50


def is_auto(value: Any) -> bool:
    """Whether a hyper-parameter's value asks for the fitted one."""
    return isinstance(value, str) and value.strip().lower() == AUTO


def fitted(rows: int) -> dict[str, Any]:
    """The fitted hyper-parameters for ``rows`` training rows (see the module's table).

    >>> fitted(300)["hidden"], fitted(300)["epochs"]
    ((128,), 200)
    >>> fitted(70_000)["hidden"], fitted(70_000)["batch_size"], fitted(70_000)["epochs"]
    ((500, 1000, 500), 512, 20)
    """
    rows = max(1, int(rows))
    batch_size = int(min(512, max(32, 2 ** round(math.log2(max(rows / 50, 1))))))
    steps_per_epoch = math.ceil(rows / min(batch_size, math.ceil(rows / _MIN_STEPS_PER_EPOCH)))
    epochs = math.ceil(_STEP_BUDGET / steps_per_epoch)
    if rows < _LARGE_ROWS:
        hidden: tuple[int, ...] = (128,) if rows < _SMALL_ROWS else (256, 128)
        return {"hidden": hidden, "dropout": 0.1, "batch_size": batch_size,
                "epochs": min(200, max(10, epochs)), "patience": 10}
    return {"hidden": (500, 1000, 500), "dropout": 0.4, "batch_size": batch_size,
            "epochs": min(20, max(3, epochs)), "patience": 3}
