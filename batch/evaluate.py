"""Held-out metrics and the evaluation policy that decides whether a candidate is published.

The figures come from scikit-learn through :mod:`models.metrics`, which the speed layer's live
quality uses too (one log-loss clipping, :data:`models.metrics.LOG_LOSS_EPS`); no Spark or
torch, so the policy is unit-tested alone.

Examples
--------
>>> import numpy as np
>>> roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
0.75
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from models.metrics import log_loss, regression_metrics, roc_auc

__all__ = ["classification_metrics", "regression_metrics", "roc_auc", "majority_rate",
           "mean_predictor_rmse", "Decision", "evaluate_policy", "LOWER_IS_BETTER",
           "default_metric"]


def classification_metrics(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """Accuracy, log loss and (two classes) AUC of predicted probabilities.

    Parameters
    ----------
    y_true : numpy.ndarray
        ``(n,)`` class indices.
    proba : numpy.ndarray
        ``(n, n_classes)`` probabilities, columns in class-index order.

    Returns
    -------
    dict
        ``accuracy``, ``log_loss`` (:func:`models.metrics.log_loss`: mean negative
        log-likelihood, probabilities clipped to ``[LOG_LOSS_EPS, 1]``), ``auc`` of the second
        class against the first when there are two classes, and ``n`` (rows).
    """
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim != 2 or len(p) != len(y):
        raise ValueError(f"need (n, n_classes) probabilities for {len(y)} labels, got {p.shape}")
    if len(y) == 0:
        raise ValueError("no rows to evaluate")
    metrics = {
        "accuracy": float(np.mean(p.argmax(axis=1) == y)),
        "log_loss": log_loss(y, p),
    }
    if p.shape[1] == 2:
        metrics["auc"] = roc_auc(y == 1, p[:, 1])
    metrics["n"] = int(len(y))
    return metrics


def majority_rate(class_counts: Mapping[Any, int]) -> float:
    """Accuracy of always predicting the most frequent class."""
    total = sum(class_counts.values())
    return max(class_counts.values()) / total if total else 0.0


def mean_predictor_rmse(y_true: np.ndarray, train_mean: float) -> float:
    """Root mean squared error of always predicting the training split's mean: the regression
    baseline a model must beat."""
    y = np.asarray(y_true, dtype=np.float64)
    return float(np.sqrt(np.mean((y - train_mean) ** 2))) if len(y) else 0.0


def default_metric(task: str) -> str:
    """The metric ``BATCH_METRIC=auto`` means: accuracy for a classification, rmse for a
    regression."""
    return "rmse" if task == "regression" else "accuracy"


@dataclass(frozen=True)
class Decision:
    """Outcome of the evaluation policy."""

    accepted: bool
    reason: str


#: Metrics where lower is better (for the others, accuracy, auc and r2, higher is better).
LOWER_IS_BETTER = frozenset({"log_loss", "rmse", "mae"})


def evaluate_policy(metrics: Mapping[str, float], baseline: float,
                    min_accuracy: float = 0.0, metric: str = "accuracy",
                    active_metrics: Mapping[str, float] | None = None,
                    active_version: str | None = None, tolerance: float = 0.0,
                    active_unavailable: str | None = None,
                    task: str = "classification",
                    active_task: str | None = None) -> Decision:
    """Decide whether a candidate is good enough to publish.

    A classification must (1) beat the majority-class rate on the test split and (2) reach
    ``min_accuracy`` on it; a regression must (1) have a test RMSE below that of always
    predicting the training split's mean (``baseline``). Then (3), when there is an active
    model to compare with, the candidate must not be worse than the active model on ``metric``
    by more than ``tolerance`` on the same test rows (lower is better for
    :data:`LOWER_IS_BETTER`, higher for the others).

    An active model of another task than the candidate's (``active_task``) rejects it
    whatever the comparison: serving would switch from classes to values or back. The
    comparison fails closed: an active model that exists but could not be scored
    (``active_unavailable``), or a ``metric`` that either side lacks or that is not a finite
    number, rejects the candidate with the reason. Only when there is no active model at all
    (the first model: ``active_metrics`` and ``active_unavailable`` both None) is the comparison
    skipped.

    Parameters
    ----------
    metrics : mapping
        Test metrics of the candidate (needs ``accuracy`` or ``rmse``, and ``metric``).
    baseline : float
        Majority-class rate (classification) or the mean predictor's RMSE (regression,
        :func:`mean_predictor_rmse`) on the same test split.
    min_accuracy : float
        Least test accuracy to publish a classification.
    metric : str
        ``accuracy``, ``auc``, ``r2`` (higher is better), ``log_loss``, ``rmse`` or ``mae``
        (lower is better).
    active_metrics : mapping, optional
        The active model's metrics on the same test rows; None when there is none to compare
        with.
    active_version : str, optional
        The active model's version, for the reason.
    tolerance : float
        How much worse than the active model, in ``metric``'s own units, still counts as not
        worse.
    active_unavailable : str, optional
        Why an active model that exists could not be scored on the test rows (it does not
        load, its classes or features do not match the data, ...): the candidate is rejected.
    task : str
        The candidate's task, ``classification`` or ``regression``.
    active_task : str, optional
        The active model's task, when known.

    Returns
    -------
    Decision
    """
    name = f"the active model {active_version}" if active_version else "the active model"
    if active_task is not None and active_task != task:
        return Decision(False, f"{name} is a {active_task} and the candidate a {task}: a "
                               "model does not change its task unless forced (--force)")
    if task == "regression":
        rmse = float(metrics["rmse"])
        if not rmse < baseline:
            return Decision(False, f"test rmse {rmse:.4g} does not beat always predicting the "
                                   f"training mean (rmse {baseline:.4g})")
        reason = (f"test rmse {rmse:.4g} beats always predicting the training mean "
                  f"(rmse {baseline:.4g})")
    else:
        accuracy = float(metrics["accuracy"])
        if not accuracy > baseline:
            return Decision(False, f"test accuracy {accuracy:.4f} does not beat the "
                                   f"majority-class rate {baseline:.4f}")
        if accuracy < min_accuracy:
            return Decision(False, f"test accuracy {accuracy:.4f} is below the threshold "
                                   f"{min_accuracy:.4f} (BATCH_MIN_ACCURACY)")
        reason = (f"test accuracy {accuracy:.4f} beats the majority-class rate "
                  f"{baseline:.4f}")
    if active_unavailable is not None:
        return Decision(False, f"cannot compare with {name}: {active_unavailable}")
    if active_metrics is None:
        return Decision(True, reason)
    for side, figures in (("the candidate", metrics), (name, active_metrics)):
        value = figures.get(metric)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return Decision(False, f"cannot compare with {name}: {side} has no "
                                   f"{metric} on the test rows (BATCH_METRIC={metric}, "
                                   f"got {value!r})")
    mine, theirs = float(metrics[metric]), float(active_metrics[metric])
    if metric in LOWER_IS_BETTER:
        worse, sign = mine > theirs + tolerance, "<=" if mine <= theirs else ">"
    else:
        worse, sign = mine < theirs - tolerance, ">=" if mine >= theirs else "<"
    comparison = f"{metric} {mine:.4f} {sign} {theirs:.4f} of {name} on the same test rows"
    if worse:
        return Decision(False, f"worse than {name}: {comparison}"
                               + (f" (tolerance {tolerance:g})" if tolerance else ""))
    return Decision(True, f"{reason}; not worse than {name}: {comparison}")
