"""Hyper-parameter search: the candidates a batch run trains and compares.

As in Oryx's ``MLUpdate``, each hyper-parameter is given as one value, a list of alternatives
or a range, and the job trains a configurable number of candidates drawn from that space, either
at random or on a grid. The syntax is the one of the ``BATCH_*`` settings:

* ``"0.001"``: one value;
* ``"0.001|0.003|0.01"``: alternatives (``hidden`` sizes are comma-separated layers, so
  ``"64,32|128"`` means two alternatives: 64-32 and 128);
* ``"0.0001:0.01"``: a range, inclusive (integers for ``epochs`` and ``batch_size``; the
  learning rate is drawn log-uniformly).

Examples
--------
>>> space = parse_space({"lr": "0.001|0.01", "hidden": "16", "dropout": "0.1",
...                      "epochs": "2", "batch_size": "64"})
>>> [c["lr"] for c in candidates(space, 4, "grid", seed=0)]
[0.001, 0.01]
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from batch.train import parse_hidden

__all__ = ["PARAMS", "Param", "parse_param", "parse_space", "candidates", "describe"]

#: Searchable hyper-parameters, in the order candidates describe them.
PARAMS: tuple[str, ...] = ("lr", "hidden", "dropout", "epochs", "batch_size")
# Points a range contributes to a grid: its ends and its (geometric, for lr) middle.
_GRID_POINTS = 3


@dataclass(frozen=True)
class Param:
    """One hyper-parameter's allowed values: ``values`` (alternatives) or a ``low..high`` range."""

    name: str
    values: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None

    @property
    def is_range(self) -> bool:
        """True for a ``low:high`` range."""
        return self.low is not None

    def grid(self) -> list[Any]:
        """Discrete values for a grid: the alternatives, or points spread over the range."""
        if not self.is_range:
            return list(self.values)
        assert self.low is not None and self.high is not None
        if self.name == "lr":
            points = np.geomspace(self.low, self.high, _GRID_POINTS)
        else:
            points = np.linspace(self.low, self.high, _GRID_POINTS)
        if self.name in ("epochs", "batch_size"):
            return sorted({int(round(p)) for p in points})
        return sorted({float(f"{p:.6g}") for p in points})

    def draw(self, rng: np.random.Generator) -> Any:
        """One random value: uniform over the alternatives or the range (log-uniform lr)."""
        if not self.is_range:
            return self.values[int(rng.integers(len(self.values)))]
        assert self.low is not None and self.high is not None
        if self.name in ("epochs", "batch_size"):
            return int(rng.integers(int(self.low), int(self.high) + 1))
        if self.name == "lr":
            value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        else:
            value = rng.uniform(self.low, self.high)
        return float(f"{value:.6g}")


def _scalar(name: str, text: str) -> Any:
    if name in ("epochs", "batch_size"):
        value: Any = int(text)
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
        return value
    value = float(text)
    if name == "lr" and not (value > 0 and math.isfinite(value)):
        raise ValueError(f"learning rate must be > 0, got {text}")
    if name == "dropout" and not 0.0 <= value < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {text}")
    return value


def parse_param(name: str, spec: Any) -> Param:
    """Parse one hyper-parameter from a setting string (or a plain value).

    Parameters
    ----------
    name : str
        One of :data:`PARAMS`.
    spec : str, number or sequence
        ``"v"``, ``"a|b|c"``, ``"low:high"``; a number (or, for ``hidden``, a sequence of
        layer sizes) is one value.

    Raises
    ------
    ValueError
        The text cannot be parsed or a value is out of its domain; the message says why.
    """
    if name not in PARAMS:
        raise ValueError(f"unknown hyper-parameter {name!r} (known: {', '.join(PARAMS)})")
    if name == "hidden":
        if not isinstance(spec, str):
            return Param(name, (parse_hidden(spec),))
        return Param(name, tuple(parse_hidden(part) for part in spec.split("|")))
    if not isinstance(spec, str):
        return Param(name, (_scalar(name, str(spec)),))
    text = spec.strip()
    if not text:
        raise ValueError(f"{name} is empty")
    if ":" in text:
        low_text, _, high_text = text.partition(":")
        low, high = _scalar(name, low_text.strip()), _scalar(name, high_text.strip())
        if not low < high:
            raise ValueError(f"{name} range {text!r} must be low:high with low < high")
        return Param(name, low=float(low), high=float(high))
    values = tuple(_scalar(name, part.strip()) for part in text.split("|"))
    return Param(name, tuple(dict.fromkeys(values)))


def parse_space(specs: Mapping[str, Any]) -> dict[str, Param]:
    """:func:`parse_param` for every entry of :data:`PARAMS` in ``specs`` (those it lacks are
    not searched)."""
    return {name: parse_param(name, specs[name]) for name in PARAMS if name in specs}


def candidates(space: Mapping[str, Param], n: int, method: str = "random", seed: int = 0
               ) -> list[dict[str, Any]]:
    """Up to ``n`` hyper-parameter combinations from ``space``.

    Parameters
    ----------
    space : mapping
        :func:`parse_space` output.
    n : int
        Number of candidates wanted (at least 1).
    method : {"random", "grid"}
        ``grid``: the Cartesian product of every parameter's :meth:`Param.grid`, all of it when
        it has at most ``n`` points, else ``n`` points of it chosen at random without
        repetition. ``random``: ``n`` independent draws (:meth:`Param.draw`); duplicates are
        dropped, so fewer may come back from a small space.
    seed : int
        Seeds the choice: the same arguments give the same candidates.

    Returns
    -------
    list of dict
        ``{"lr", "hidden", "dropout", "epochs", "batch_size"}`` per candidate. When every
        parameter has a single value the only candidate is that combination.
    """
    if n < 1:
        raise ValueError(f"need at least one candidate, got {n}")
    rng = np.random.default_rng(seed)
    names = [name for name in PARAMS if name in space]
    if method == "grid" or all(not p.is_range and len(p.values) == 1 for p in space.values()):
        grid = list(itertools.product(*(space[name].grid() for name in names)))
        if len(grid) > n:
            picked = sorted(rng.choice(len(grid), size=n, replace=False).tolist())
            grid = [grid[i] for i in picked]
        return [dict(zip(names, combo)) for combo in grid]
    if method != "random":
        raise ValueError(f"search method must be random or grid, got {method!r}")
    found: dict[tuple[Any, ...], dict[str, Any]] = {}
    for _ in range(n):
        combo = {name: space[name].draw(rng) for name in names}
        found.setdefault(tuple(combo[name] for name in names), combo)
    return list(found.values())


def describe(candidate: Mapping[str, Any]) -> str:
    """``lr 0.001 hidden 64-32 dropout 0.1 epochs 3 batch 512``: one candidate on one line
    (without hidden and dropout when the candidate has none: a factory's network)."""
    parts = [f"lr {candidate['lr']:.3g}"]
    if "hidden" in candidate:
        parts.append(f"hidden {'-'.join(str(h) for h in candidate['hidden']) or 'none'}")
    if "dropout" in candidate:
        parts.append(f"dropout {candidate['dropout']:.2f}")
    parts += [f"epochs {candidate['epochs']}", f"batch {candidate['batch_size']}"]
    return " ".join(parts)
