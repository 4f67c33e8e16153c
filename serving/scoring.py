"""Pure serving logic: sort a micro-batch into servable and dead-letter messages, score it.

Nothing here touches Kafka, so unit tests call it directly.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np
import orjson

from transport.rollout import to_candidate
from transport.schemas import (CLASSIFICATION, REGRESSION, InvalidEvent, ValidEvent, parse_event,
                               predicted_values, prediction_message, rounded_probabilities,
                               validate_event, value_prediction_message)

__all__ = ["SourceMessage", "Rejected", "Scorer", "triage", "score", "class_counts",
           "encode_predictions", "split_rows"]


@dataclass(frozen=True, slots=True)
class SourceMessage:
    """One input message and where it came from."""

    value: bytes | None
    topic: str
    partition: int | None
    offset: int | None


@dataclass(frozen=True, slots=True)
class Rejected:
    """An input message that cannot be served, with the reason."""

    message: SourceMessage
    reason: str


class Scorer(Protocol):
    """What serving needs of a model (``models.loaded.LoadedModel`` is one)."""

    @property
    def version(self) -> str: ...

    @property
    def features(self) -> Sequence[str]: ...

    @property
    def classes(self) -> Sequence[Any]: ...

    @property
    def task(self) -> str:
        """``"classification"`` or ``"regression"``."""

    def outputs(self, rows: np.ndarray) -> np.ndarray:
        """``(n, n_outputs)`` float32: class probabilities, or one column of values."""


def triage(messages: Sequence[SourceMessage], features: Sequence[str],
           classes: Sequence[Any], task: str = CLASSIFICATION
           ) -> tuple[list[tuple[SourceMessage, ValidEvent]], list[Rejected]]:
    """Split a batch into valid events (in order) and rejected messages with reasons."""
    valid: list[tuple[SourceMessage, ValidEvent]] = []
    rejected: list[Rejected] = []
    for message in messages:
        try:
            event = validate_event(parse_event(message.value), features, classes, task)
        except InvalidEvent as exc:
            rejected.append(Rejected(message, str(exc)))
        else:
            valid.append((message, event))
    return valid, rejected


def feature_matrix(events: Sequence[ValidEvent], n_features: int) -> np.ndarray:
    """Stack the events' feature vectors into one (n, n_features) float64 matrix."""
    if not events:
        return np.empty((0, n_features), dtype=np.float64)
    return np.stack([e.features for e in events])


def score(model: Scorer, events: Sequence[ValidEvent], now_ms: int) -> list[dict[str, Any]]:
    """Prediction messages (docs/contract.md) for ``events``, in order, from one forward pass."""
    if not events:
        return []
    outputs = model.outputs(feature_matrix(events, len(model.features)))
    return predictions_from(model, events, outputs, now_ms)


def predictions_from(model: Scorer, events: Sequence[ValidEvent], outputs: np.ndarray,
                     now_ms: int) -> list[dict[str, Any]]:
    """Pair each event with its row of ``outputs`` (:meth:`Scorer.outputs`) as a prediction
    message."""
    if model.task == REGRESSION:
        return [value_prediction_message(e.id, model.version, value, now_ms)
                for e, value in zip(events, predicted_values(outputs))]
    rows = rounded_probabilities(outputs).tolist()
    return [prediction_message(e.id, model.version, model.classes, row, now_ms)
            for e, row in zip(events, rows)]


def class_counts(predictions: Sequence[dict[str, Any]]) -> Counter[str]:
    """How many predictions named each class (keys as strings, for table keys); a
    classification's only."""
    return Counter(str(p["predicted"]) for p in predictions)


def encode_predictions(model: Scorer, ids: Sequence[str], outputs: np.ndarray,
                       now_ms: int) -> tuple[list[bytes], list[Any]]:
    """Prediction messages (docs/contract.md) for a scored micro-batch, as JSON bytes, and what
    each one predicted (a class, or a regression's value); the same messages
    :func:`predictions_from` builds, one pass each."""
    if not len(ids):
        return [], []
    version = model.version
    dumps = orjson.dumps
    if model.task == REGRESSION:
        values = predicted_values(outputs)
        return [dumps({"id": i, "model_version": version, "predicted": v, "ts": now_ms})
                for i, v in zip(ids, values)], list(values)
    classes = model.classes
    rounded = rounded_probabilities(outputs)
    # The first most probable class of the rounded row, as prediction_message picks it.
    predicted = [classes[k] for k in rounded.argmax(axis=1).tolist()]
    rows = rounded.tolist()
    encoded = [dumps({"id": i, "model_version": version, "predicted": c, "probabilities": r,
                      "ts": now_ms}) for i, c, r in zip(ids, predicted, rows)]
    return encoded, predicted


def split_rows(ids: Sequence[str], mode: str | None, share: float
               ) -> tuple[np.ndarray, np.ndarray]:
    """During a rollout, which of a micro-batch's events each model scores: the positions
    (into ``ids``) the serving version answers, and those the candidate scores.

    ``shadow``: both score every event (the candidate's predictions go to the shadow topic
    only); ``canary``: the ids whose stable hash falls below ``share`` are answered by the
    candidate, the others by the serving version; otherwise the serving version scores all.
    """
    everything = np.arange(len(ids), dtype=np.int64)
    if mode == "shadow":
        return everything, everything
    if mode == "canary":
        mask = to_candidate(ids, share)
        return np.flatnonzero(~mask), np.flatnonzero(mask)
    return everything, np.empty(0, dtype=np.int64)
