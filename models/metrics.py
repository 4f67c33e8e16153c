"""Classification and regression figures shared by the batch layer (held-out metrics) and the
speed layer (live quality), computed by scikit-learn.

Log loss needs a floor under the probability of the true class: a network's float32 softmax
gives an exact 0 to a class it is sure against, and ``-log 0`` is infinite. Both layers clip
with :data:`LOG_LOSS_EPS`, defined here only, so a model's test log loss in its manifest and
its live log loss in ``quality_by_version`` are the same figure for the same predictions.

Examples
--------
>>> import numpy as np
>>> roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
0.75
>>> round(log_loss(np.array([0, 1]), np.array([[0.5, 0.5], [1.0, 0.0]])), 4)
8.4056
>>> regression_metrics(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 4.0]))["mae"]
0.3333333333333333
"""
from __future__ import annotations

import numpy as np

__all__ = ["LOG_LOSS_EPS", "clip_probabilities", "log_loss", "roc_auc", "regression_metrics"]

#: Probabilities are clipped to ``[LOG_LOSS_EPS, 1]`` (each row then renormalised) before the
#: log: one confident mistake costs ``-log(1e-7)``, about 16, not infinity. 1e-7 is about the
#: resolution of the float32 probabilities the networks produce.
LOG_LOSS_EPS = 1e-7


def clip_probabilities(proba: np.ndarray) -> np.ndarray:
    """``(n, n_classes)`` float64 probabilities clipped to ``[LOG_LOSS_EPS, 1]``, rows summing
    to 1 again."""
    p = np.clip(np.asarray(proba, dtype=np.float64), LOG_LOSS_EPS, 1.0)
    if p.ndim != 2:
        raise ValueError(f"need (n, n_classes) probabilities, got shape {p.shape}")
    normalised: np.ndarray = p / p.sum(axis=1, keepdims=True)
    return normalised


def log_loss(y_true: np.ndarray, proba: np.ndarray, *, sample_weight: np.ndarray | None = None,
             normalize: bool = True) -> float:
    """Mean (or, with ``normalize=False``, summed) negative log-likelihood of the labels.

    Parameters
    ----------
    y_true : numpy.ndarray
        ``(n,)`` class indices into the columns of ``proba``.
    proba : numpy.ndarray
        ``(n, n_classes)`` predicted probabilities.
    sample_weight : numpy.ndarray, optional
        Per-row weights (the weighted mean, or the weighted sum with ``normalize=False``).
    normalize : bool
        Mean when True, sum when False.
    """
    from sklearn.metrics import log_loss as sk_log_loss

    p = clip_probabilities(proba)
    y = np.asarray(y_true, dtype=np.int64)
    if len(y) == 0:
        return 0.0 if not normalize else float("nan")
    return float(sk_log_loss(y, p, labels=np.arange(p.shape[1]), sample_weight=sample_weight,
                             normalize=normalize))


def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the binary labels ``y_true`` (1 = positive);
    NaN when only one class is present."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y_true).astype(bool)
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, np.asarray(scores, dtype=np.float64)))


def regression_metrics(y_true: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Root mean squared error, mean absolute error and R^2 of predicted values.

    Parameters
    ----------
    y_true : numpy.ndarray
        ``(n,)`` true values.
    predicted : numpy.ndarray
        ``(n,)`` or ``(n, 1)`` predicted values.

    Returns
    -------
    dict
        ``rmse``, ``mae``, ``r2`` (scikit-learn's: 1 - residual over total sum of squares
        around the mean of ``y_true``; 0.0 when ``y_true`` is constant and the prediction is
        not exact) and ``n`` (rows).
    """
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    y = np.asarray(y_true, dtype=np.float64).reshape(-1)
    p = np.asarray(predicted, dtype=np.float64)
    if p.ndim == 2 and p.shape[1] == 1:
        p = p[:, 0]
    if p.shape != y.shape:
        raise ValueError(f"need one predicted value per true value ({len(y)}), got {p.shape}")
    if len(y) == 0:
        raise ValueError("no rows to evaluate")
    return {"rmse": float(np.sqrt(mean_squared_error(y, p))),
            "mae": float(mean_absolute_error(y, p)),
            "r2": float(r2_score(y, p)) if len(y) > 1 else 0.0,
            "n": int(len(y))}
