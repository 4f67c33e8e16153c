"""The scored-summary format: what serving tells the speed layer about each micro-batch.

Serving summarises every micro-batch it scored in one message (more only past
:data:`LABELLED_PER_MESSAGE` labelled events) on an internal topic with one partition
(:func:`transport.topics.scored_topic_name`): the events predicted per class, and the labelled
events with the version that predicted them and what it predicted (a classification's
probabilities, a regression's values). The speed layer decodes them with
:func:`parse_summary`.

A regression's summaries count no classes: its predictions are numbers, and a count per
distinct value would be a table key (and a web-view column) per event.
"""
from __future__ import annotations

import base64
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import orjson

from transport.schemas import CLASSIFICATION, REGRESSION, TASKS

__all__ = ["LABELLED_PER_MESSAGE", "summary_messages", "parse_summary", "ScoredSummary",
           "LabelledBatch"]

#: Most labelled events forwarded in one message (about 170 KB of JSON with 30 features).
LABELLED_PER_MESSAGE = 512


def summary_messages(model: Any, predicted: Sequence[Any], ids: Sequence[str],
                     labels: Sequence[Any], features: np.ndarray, outputs: np.ndarray,
                     ts: Sequence[int | None], shadow: bool = False) -> list[bytes]:
    """What serving tells the rest of the worker group about a scored micro-batch: how many
    events each class was predicted for, and the labelled events with what was predicted.

    One message per micro-batch (more only past :data:`LABELLED_PER_MESSAGE` labelled events),
    on a one-partition topic, so that one worker of the group keeps the counts and the quality
    per version and learns from the labels. The arrays travel as little-endian bytes in
    base64: neither side formats or parses a number per feature.

    Parameters
    ----------
    model
        The model that scored the batch (``version``, ``classes``, optionally
        ``base_version`` and ``task``, default classification).
    predicted
        The class predicted for each event (or its value, for a regression: not counted).
    ids, labels, features, outputs, ts
        The batch's scored events as columns, row ``i`` of each for the same event: ``labels``
        holds None for an unlabelled event (a class, or a number for a regression),
        ``features`` the raw ``(n, n_features)`` rows in the model's order and ``outputs`` the
        ``(n, n_outputs)`` prediction (probabilities, or one column of values).

    Returns
    -------
    list of bytes
        Compact JSON: ``task``, ``version`` and ``base_version`` of the model that scored the
        batch, ``scored`` (events) and ``classes`` (class -> events predicted, in the first
        message only; always empty for a regression); per labelled event (same order
        throughout) ``ids``, ``ts`` and ``labels`` (class indexes, or the numeric labels of a
        regression); ``n_features``, and ``features`` (float64, NaN where missing) as base64
        of row-major little-endian arrays; then ``probabilities`` (float32, ``(n,
        n_classes)``) of a classification or ``predicted`` (float32, one value per event) of
        a regression, likewise.
    """
    task = getattr(model, "task", CLASSIFICATION)
    regression = task == REGRESSION
    base_version = getattr(model, "base_version", model.version)
    labelled = [i for i, label in enumerate(labels) if label is not None]
    counts: dict[str, int] = {} if regression or shadow else Counter(map(str, predicted))
    if regression:
        def label_of(i: int) -> Any:
            return float(labels[i])
    else:
        # Validation matched every label to a class: strings to strings, ints to ints.
        index = {c: k for k, c in enumerate(model.classes)}

        def label_of(i: int) -> Any:
            return index[labels[i]]
    out = []
    for start in range(0, max(len(labelled), 1), LABELLED_PER_MESSAGE):
        chunk = labelled[start:start + LABELLED_PER_MESSAGE]
        first = start == 0
        message = {
            "task": task, "version": model.version, "base_version": base_version,
            "scored": len(predicted) if first and not shadow else 0,
            "classes": counts if first else {},
            "ids": [ids[i] for i in chunk], "ts": [ts[i] for i in chunk],
            "labels": [label_of(i) for i in chunk],
            "n_features": int(features.shape[1]),
            "features": _b64(features[chunk], "<f8")}
        if shadow:
            message["shadow"] = True
        if regression:
            message["predicted"] = _b64(outputs[chunk, 0], "<f4")
        else:
            message["probabilities"] = _b64(outputs[chunk], "<f4")
        out.append(orjson.dumps(message))
    return out


def _b64(array: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode()


@dataclass(frozen=True)
class LabelledBatch:
    """Labelled events one model version predicted, decoded from one forwarded message."""

    version: str
    base_version: str
    #: Class index of each event's label (int64), or its numeric label (float64, regression).
    labels: np.ndarray
    #: ``(n, n_features)`` raw features in the model's order, NaN where missing.
    features: np.ndarray
    #: ``(n, n_outputs)`` what the version predicted: probabilities (classification) or one
    #: column of values (regression).
    outputs: np.ndarray
    #: The model's task: ``"classification"`` or ``"regression"``.
    task: str = CLASSIFICATION

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def probabilities(self) -> np.ndarray:
        """``(n, n_classes)`` probabilities a classification predicted."""
        return self.outputs

    @property
    def predicted(self) -> np.ndarray:
        """``(n,)`` float64 values a regression predicted."""
        values: np.ndarray = self.outputs[:, 0].astype(np.float64)
        return values

    @property
    def correct(self) -> np.ndarray:
        """Whether the most probable class was the label, per event (classification)."""
        correct: np.ndarray = self.outputs.argmax(axis=1) == self.labels
        return correct

    @property
    def errors(self) -> np.ndarray:
        """Predicted value minus label, per event (regression), float64."""
        errors: np.ndarray = self.predicted - self.labels
        return errors


@dataclass(frozen=True)
class ScoredSummary:
    """One micro-batch as :func:`summary_messages` summarised it."""

    version: str
    scored: int
    #: Events predicted per class (class as a string); empty for a regression.
    classes: dict[str, int]
    #: Its labelled events, or None when it had none.
    labelled: LabelledBatch | None
    #: A shadow rollout candidate's predictions (not served; counted nowhere).
    shadow: bool = False


def parse_summary(raw: bytes | None) -> ScoredSummary:
    """Decode one message of :func:`summary_messages`; raise ``ValueError`` when malformed.

    A message without ``task`` (from a worker that predates regression) is a
    classification's."""
    try:
        m = orjson.loads(raw or b"")
        task = m.get("task", CLASSIFICATION)
        version, base_version = m["version"], m["base_version"]
        scored, classes = m["scored"], m["classes"]
        labels, n_features = m["labels"], m["n_features"]
        features = base64.b64decode(m["features"], validate=True)
        regression = task == REGRESSION
        outputs = base64.b64decode(m["predicted" if regression else "probabilities"],
                                   validate=True)
        shadow = m.get("shadow", False) is True
    except (orjson.JSONDecodeError, TypeError, KeyError, ValueError, AttributeError) as exc:
        raise ValueError(f"not a summary of scored events: {exc}") from None
    if not (task in TASKS and isinstance(version, str) and isinstance(base_version, str)
            and type(scored) is int and scored >= 0 and isinstance(classes, dict)
            and all(type(n) is int and n >= 0 for n in classes.values())
            and isinstance(labels, list) and all(
                _is_number(label) if regression else type(label) is int for label in labels)
            and type(n_features) is int and n_features >= 1):
        raise ValueError("not a summary of scored events: bad field types")
    if not labels:
        return ScoredSummary(version, scored, classes, None, shadow)
    n = len(labels)
    if len(features) != 8 * n * n_features or len(outputs) % (4 * n) or (
            regression and len(outputs) != 4 * n):
        raise ValueError("not a summary of scored events: array sizes do not match the "
                         "labels")
    X = np.frombuffer(features, dtype="<f8").reshape(n, n_features)
    P = np.frombuffer(outputs, dtype="<f4").reshape(n, -1)
    if regression:
        y = np.asarray(labels, dtype=np.float64)
    else:
        y = np.asarray(labels, dtype=np.int64)
        if P.shape[1] < 2 or y.min() < 0 or y.max() >= P.shape[1]:
            raise ValueError("not a summary of scored events: a label is not a class index")
    return ScoredSummary(version, scored, classes,
                         LabelledBatch(version, base_version, y, X, P, task), shadow)


def _is_number(value: Any) -> bool:
    """A finite JSON number (never a boolean)."""
    return type(value) in (int, float) and math.isfinite(value)
