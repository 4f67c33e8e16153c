"""The one preprocessing implementation that training and serving share.

A raw feature value is *missing* when it is NaN, +/-inf or the marker ``-999.0`` (the ATLAS
Higgs convention for "undefined"). A missing value is replaced by the feature's fill value (the
mean of the present training values), then every feature is standardised with the mean and
standard deviation of its present training values. Because the batch layer computes the
statistics in Spark and the serving layer applies them per micro-batch, both go through
:class:`Preprocessor` so they cannot drift apart.

This module needs numpy only: it runs inside Spark tasks, where importing torch would be waste.

Examples
--------
>>> import numpy as np
>>> p = fit_preprocessor(["a", "b"], np.array([[1.0, -999.0], [3.0, 4.0]]))
>>> p.fill
[2.0, 4.0]
>>> p.transform(np.array([[np.nan, 4.0]])).tolist()
[[0.0, 0.0]]
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import msgspec
import numpy as np

from models.errors import ModelError

__all__ = [
    "MISSING_MARKER",
    "MAX_STANDARDISED",
    "Preprocessor",
    "missing_mask",
    "sufficient_statistics",
    "preprocessor_from_stats",
    "fit_preprocessor",
    "CONSTANT_RELATIVE_STD",
    "is_constant",
    "constant_features",
]

#: The value that marks an undefined feature in the raw data (besides NaN and +/-inf).
MISSING_MARKER = -999.0

# A standard deviation at most this (plus the relative part below) is treated as zero.
_MIN_STD = 1e-12
#: A feature whose standard deviation is at most this fraction of its mean's magnitude (plus
#: 1e-12) is constant: it gets ``std = 1`` and so is standardised to 0, and the batch run
#: reports it. The statistics are sums of values and of their squares, so a constant column's
#: computed spread is rounding noise of about ``sqrt(rows * 1e-16)`` of its magnitude (about
#: 3e-6 for 200,000 rows summed in one Spark partition); dividing by that would amplify the
#: noise a millionfold. One rule, :func:`is_constant`, for training, the report and serving.
CONSTANT_RELATIVE_STD = 1e-5
#: Largest standardised magnitude passed on to a network. A finite raw value can be as large as
#: 1.8e308; standardised and cast to float32 it becomes infinite, and the network's output NaN
#: (a prediction without probabilities, an update that poisons the weights). A million
#: standard deviations from the mean says nothing more than "very far out" does.
MAX_STANDARDISED = 1e6


def missing_mask(X: np.ndarray) -> np.ndarray:
    """Boolean mask of the missing entries of ``X`` (NaN, +/-inf or ``-999.0``).

    Parameters
    ----------
    X : numpy.ndarray
        Raw feature values, any shape, floating point.

    Returns
    -------
    numpy.ndarray
        ``bool`` array of the same shape, True where the value is missing.
    """
    X = np.asarray(X, dtype=np.float64)
    missing: np.ndarray = ~np.isfinite(X) | (X == MISSING_MARKER)
    return missing


def is_constant(mean: Any, std: Any) -> np.ndarray:
    """Per feature, whether a standard deviation ``std`` around ``mean`` counts as no spread.

    The one rule of the project: :func:`preprocessor_from_stats` gives such features
    ``std = 1``, :func:`constant_features` reports them, and :class:`Preprocessor` refuses
    parameters that would scale one by ``1 / std`` (a manifest written before the rule).
    """
    mean_a = np.abs(np.asarray(mean, dtype=np.float64))
    std_a = np.asarray(std, dtype=np.float64)
    return std_a <= _MIN_STD + CONSTANT_RELATIVE_STD * mean_a


@dataclass(frozen=True)
class Preprocessor:
    """Imputation and standardisation of raw feature vectors, fitted on training data.

    Parameters
    ----------
    features : list of str
        Feature names, in the column order ``transform`` expects.
    fill : list of float
        Value that replaces a missing entry, per feature.
    mean, std : list of float
        Standardisation parameters per feature: ``(x - mean) / std``; ``std`` is never 0, and
        is 1 for a constant feature (:func:`is_constant`).
    """

    features: list[str]
    fill: list[float]
    mean: list[float]
    std: list[float]
    # float64 copies of the parameters, built once: transform runs per serving micro-batch.
    _fill: np.ndarray = field(init=False, repr=False, compare=False)
    _mean: np.ndarray = field(init=False, repr=False, compare=False)
    _scale: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = len(self.features)
        if n == 0:
            raise ModelError("preprocessor needs at least one feature")
        if len(set(self.features)) != n:
            raise ModelError("preprocessor feature names must be unique")
        for name in ("fill", "mean", "std"):
            values = getattr(self, name)
            if len(values) != n:
                raise ModelError(f"preprocessor {name!r} has {len(values)} values, "
                                 f"expected {n} (one per feature)")
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                raise ModelError(f"preprocessor {name!r} must hold finite numbers")
        if any(s <= 0 for s in self.std):
            raise ModelError("preprocessor 'std' must be positive")
        flat = [i for i, (m, s) in enumerate(zip(self.mean, self.std))
                if s != 1.0 and is_constant(m, s)]
        if flat:
            i = flat[0]
            raise ModelError(
                f"preprocessor 'std' of {self.features[i]!r} is {self.std[i]:g} around a mean "
                f"of {self.mean[i]:g}: no spread by the constant-feature rule (a constant "
                "feature has std 1); scaling by it would amplify rounding noise")
        object.__setattr__(self, "features", list(self.features))
        for name in ("fill", "mean", "std"):
            object.__setattr__(self, name, [float(v) for v in getattr(self, name)])
        object.__setattr__(self, "_fill", np.asarray(self.fill, dtype=np.float64))
        object.__setattr__(self, "_mean", np.asarray(self.mean, dtype=np.float64))
        object.__setattr__(self, "_scale", 1.0 / np.asarray(self.std, dtype=np.float64))

    @property
    def n_features(self) -> int:
        """Number of input columns."""
        return len(self.features)

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Impute missing entries and standardise.

        Parameters
        ----------
        X : numpy.ndarray
            ``(n, n_features)`` raw values in :attr:`features` order; may hold NaN, +/-inf or
            ``-999.0`` for missing values. Not modified.

        Returns
        -------
        numpy.ndarray
            ``(n, n_features)`` ``float32`` array, C-contiguous, ready for the network;
            values beyond :data:`MAX_STANDARDISED` are clipped to it.
        """
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ModelError(f"expected an array of shape (n, {self.n_features}), "
                             f"got {X.shape}")
        out = np.where(missing_mask(X), self._fill, X)
        with np.errstate(over="ignore"):  # overflow to inf is clipped just below
            out -= self._mean
            out *= self._scale
        np.clip(out, -MAX_STANDARDISED, MAX_STANDARDISED, out=out)
        return np.ascontiguousarray(out, dtype=np.float32)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready parameters (the manifest's ``"preprocessing"`` entry)."""
        return {
            "missing": {"marker": MISSING_MARKER, "nan": True, "inf": True},
            "features": list(self.features),
            "fill": list(self.fill),
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, data: Any) -> "Preprocessor":
        """Rebuild from :meth:`to_dict` output; raise :class:`ModelError` on bad input."""
        try:
            params = msgspec.convert(data, _Parameters)
        except msgspec.ValidationError as exc:
            raise ModelError(f"preprocessing parameters: {exc}") from None
        if params.missing.marker != MISSING_MARKER:
            # Serving would silently treat the wrong value as missing: refuse instead.
            raise ModelError(f"unsupported missing marker {params.missing.marker!r}")
        return cls(features=params.features, fill=params.fill, mean=params.mean,
                   std=params.std)


class _Missing(msgspec.Struct):
    marker: float = MISSING_MARKER


class _Parameters(msgspec.Struct):
    """The schema of :meth:`Preprocessor.to_dict` output (its relations are checked by
    :class:`Preprocessor` itself)."""

    features: list[str]
    fill: list[float]
    mean: list[float]
    std: list[float]
    missing: _Missing = msgspec.field(default_factory=_Missing)


def sufficient_statistics(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Count, sum and sum of squares of the present values of each column of ``X``.

    The numpy twin of the Spark aggregate the batch job runs; statistics of partitions can be
    added together.

    Parameters
    ----------
    X : numpy.ndarray
        ``(n, n_features)`` raw values.

    Returns
    -------
    tuple of numpy.ndarray
        ``(count, sum, sumsq)``, each of shape ``(n_features,)``, ``float64``.
    """
    X = np.asarray(X, dtype=np.float64)
    present = ~missing_mask(X)
    values = np.where(present, X, 0.0)
    return (present.sum(axis=0).astype(np.float64), values.sum(axis=0),
            np.square(values).sum(axis=0))


def preprocessor_from_stats(features: Sequence[str], count: Sequence[float] | np.ndarray,
                            total: Sequence[float] | np.ndarray,
                            sumsq: Sequence[float] | np.ndarray) -> Preprocessor:
    """Fit a :class:`Preprocessor` from per-feature sufficient statistics of present values.

    Parameters
    ----------
    features : sequence of str
        Feature names, in column order.
    count, total, sumsq : sequence of float
        Per feature: number, sum and sum of squares of the present (non-missing) training values.

    Returns
    -------
    Preprocessor
        ``fill = mean`` of the present values (0 when a feature is never present); ``std`` is the
        population standard deviation of the present values, 1 for a constant feature (see
        :func:`constant_features`).
    """
    count_a, mean, std = _moments(features, count, total, sumsq)
    std = np.where(_constant(count_a, mean, std), 1.0, std)
    return Preprocessor(features=list(features), fill=mean.tolist(), mean=mean.tolist(),
                        std=std.tolist())


def constant_features(features: Sequence[str], count: Sequence[float] | np.ndarray,
                      total: Sequence[float] | np.ndarray,
                      sumsq: Sequence[float] | np.ndarray) -> list[str]:
    """The features that :func:`preprocessor_from_stats` treats as constant for the same
    statistics: fewer than two present values, or no spread by :func:`is_constant`.

    They carry no information; they stay in the model (standardised to 0, so serving can keep
    sending them) and the batch run reports them.
    """
    count_a, mean, std = _moments(features, count, total, sumsq)
    return [name for name, flat in zip(features, _constant(count_a, mean, std)) if flat]


def _moments(features: Sequence[str], count: Sequence[float] | np.ndarray,
             total: Sequence[float] | np.ndarray, sumsq: Sequence[float] | np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    count_a = np.asarray(count, dtype=np.float64)
    total_a = np.asarray(total, dtype=np.float64)
    sumsq_a = np.asarray(sumsq, dtype=np.float64)
    n = len(features)
    if not (count_a.shape == total_a.shape == sumsq_a.shape == (n,)):
        raise ModelError(f"need one count, sum and sum of squares per feature ({n})")
    if np.any(count_a < 0) or not np.all(np.isfinite(total_a) & np.isfinite(sumsq_a)):
        raise ModelError("sufficient statistics must be finite, counts non-negative")
    safe = np.maximum(count_a, 1.0)
    mean = np.where(count_a > 0, total_a / safe, 0.0)
    # E[x^2] - E[x]^2 can come out slightly negative from rounding: clamp before the sqrt.
    var = np.maximum(sumsq_a / safe - mean ** 2, 0.0)
    return count_a, mean, np.sqrt(var)


def _constant(count: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    constant: np.ndarray = (count < 2) | is_constant(mean, std)
    return constant


def fit_preprocessor(features: Sequence[str], X: np.ndarray) -> Preprocessor:
    """Fit a :class:`Preprocessor` on an in-memory training matrix.

    Parameters
    ----------
    features : sequence of str
        Feature names, in column order of ``X``.
    X : numpy.ndarray
        ``(n, len(features))`` raw training values.

    Returns
    -------
    Preprocessor
        The same parameters :func:`preprocessor_from_stats` gives for the statistics of ``X``.
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != len(features):
        raise ModelError(f"expected an array of shape (n, {len(features)}), got {X.shape}")
    return preprocessor_from_stats(features, *sufficient_statistics(X))
