"""Message formats on Stratum's topics (CONTRACT.md) and the validation of input events.

Validation is a pure function of the raw message bytes and the active model's feature names
and classes, so it is unit-tested without Kafka and shared by the serving agent and
``POST /predict``.
"""
from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import orjson

__all__ = [
    "InvalidEvent",
    "ValidEvent",
    "parse_event",
    "validate_event",
    "prediction_message",
    "dead_letter_message",
    "label_matches",
]

MAX_ID_LENGTH = 256


class InvalidEvent(ValueError):
    """An input event that cannot be served; the message is the reason sent to the DLQ."""


@dataclass(frozen=True, slots=True)
class ValidEvent:
    """An input event that passed validation.

    ``features`` is in the model's feature order; missing values (``null``) are NaN and are
    imputed by the model's preprocessing like -999.0 markers.
    """

    id: str
    features: np.ndarray
    label: Any | None
    ts: int | None


def parse_event(raw: bytes | str | None) -> dict[str, Any]:
    """Decode one message value into a JSON object or raise :class:`InvalidEvent`."""
    if raw is None:
        raise InvalidEvent("empty message (null value)")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidEvent(f"not UTF-8: {exc.reason} at byte {exc.start}") from None
    if not raw.strip():
        raise InvalidEvent("empty message")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent(f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(obj, dict):
        raise InvalidEvent(f"not a JSON object but {_json_type(obj)}")
    return obj


def validate_event(obj: dict[str, Any], features: Sequence[str],
                   classes: Sequence[Any]) -> ValidEvent:
    """Check one decoded event against CONTRACT.md and the model's schema.

    Parameters
    ----------
    obj
        The decoded JSON object.
    features
        The model's ordered feature names.
    classes
        The model's class labels, used to check ``label`` when present.

    Raises
    ------
    InvalidEvent
        With a reason a person can act on.
    """
    event_id = obj.get("id")
    if event_id is None:
        raise InvalidEvent("missing field 'id'")
    if not isinstance(event_id, str):
        raise InvalidEvent(f"'id' must be a string, got {_json_type(event_id)}")
    if not event_id or len(event_id) > MAX_ID_LENGTH:
        raise InvalidEvent(f"'id' must have 1 to {MAX_ID_LENGTH} characters")
    if "features" not in obj:
        raise InvalidEvent("missing field 'features'")
    vector = _feature_vector(obj["features"], features)
    label = obj.get("label")
    if label is not None and not any(label_matches(label, c) for c in classes):
        raise InvalidEvent(f"unknown label {label!r}; the model's classes are {list(classes)!r}")
    ts = obj.get("ts")
    if ts is not None and (isinstance(ts, bool) or not isinstance(ts, int) or ts < 0):
        raise InvalidEvent(f"'ts' must be epoch milliseconds (a non-negative integer), got {ts!r}")
    unknown = sorted(set(obj) - {"id", "features", "label", "ts"})
    if unknown:
        raise InvalidEvent(f"unknown fields {unknown}")
    return ValidEvent(id=event_id, features=vector, label=label, ts=ts)


def label_matches(label: Any, cls: Any) -> bool:
    """True when an event's label names class ``cls`` (strings and integers, never bools)."""
    if isinstance(label, bool) or isinstance(cls, bool):
        return False
    if isinstance(cls, int) and isinstance(label, int):
        return label == cls
    return isinstance(label, str) and isinstance(cls, str) and label == cls


def _feature_vector(raw: Any, names: Sequence[str]) -> np.ndarray:
    if isinstance(raw, dict):
        try:
            values = [raw[name] for name in names]
        except KeyError:
            missing = [n for n in names if n not in raw]
            raise InvalidEvent(f"missing features {_first(missing)}") from None
        if len(raw) != len(names):
            known = set(names)
            raise InvalidEvent(f"unknown features {_first([k for k in raw if k not in known])}")
    elif isinstance(raw, list):
        if len(raw) != len(names):
            raise InvalidEvent(f"'features' has {len(raw)} values, the model expects {len(names)}")
        values = raw
    else:
        raise InvalidEvent(f"'features' must be an object or a list, got {_json_type(raw)}")
    if all(type(v) is float for v in values):  # the common case, checked at C speed
        vector = np.array(values, dtype=np.float64)
        if np.isinf(vector).any():
            i = int(np.flatnonzero(np.isinf(vector))[0])
            raise InvalidEvent(f"feature {names[i]!r} is infinite")
        return vector
    return np.array([_number(v, name) for v, name in zip(values, names)], dtype=np.float64)


def _number(value: Any, name: str) -> float:
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidEvent(f"feature {name!r} is not a number: {value!r}"[:200])
    if isinstance(value, float) and math.isinf(value):
        raise InvalidEvent(f"feature {name!r} is infinite")
    return float(value)


def _first(items: list[str], n: int = 5) -> str:
    shown = ", ".join(repr(i) for i in items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value), "a value")


def prediction_message(event_id: str, model_version: str, classes: Sequence[Any],
                       probabilities: Sequence[float], ts: int) -> dict[str, Any]:
    """A CONTRACT ``predictions`` value; ``predicted`` is the most probable class.

    ``probabilities`` are plain floats in the order of ``classes``.
    """
    probs = list(probabilities)
    best = max(range(len(probs)), key=probs.__getitem__)
    return {"id": event_id, "model_version": model_version, "predicted": classes[best],
            "probabilities": probs, "ts": ts}


def dead_letter_message(reason: str, raw: bytes | None, topic: str, partition: int | None,
                        offset: int | None) -> dict[str, Any]:
    """A CONTRACT ``events-dlq`` value: the reason, the original message and where it was."""
    message: dict[str, Any] = {"error": reason, "raw": "",
                               "source": {"topic": topic, "partition": partition,
                                          "offset": offset}}
    if raw is not None:
        try:
            message["raw"] = raw.decode("utf-8")
        except UnicodeDecodeError:
            message["raw"] = base64.b64encode(raw).decode("ascii")
            message["raw_encoding"] = "base64"
    return message
